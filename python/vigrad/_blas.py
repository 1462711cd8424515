"""Matrix products on vigrad's own threads, through the OpenBLAS that NumPy already loaded.

A Bayes-by-Backprop step alternates BLAS products with vigrad's fused elementwise passes.  With
NumPy's matmul the products run on OpenBLAS's thread pool, whose threads keep spinning after each
product; an OpenMP team on the same cores then waits for a core at every barrier (2 cores,
784-400-400-10: 5.4 ms per step with one vigrad thread, 34 ms with two).  So vigrad runs the
products itself (``_core.gemm``): the same OpenMP team as the elementwise passes, each thread
calling OpenBLAS single-threaded (``openblas_set_num_threads_local``, OpenBLAS >= 0.3.27) on
fixed row chunks of the output, so the result does not depend on the thread count.

Nothing is linked at build time: :func:`available` looks for the OpenBLAS NumPy's wheel bundles,
already loaded in the process (e.g. ``numpy.libs/libscipy_openblas64_-*.so``), takes the addresses of
``cblas_sgemm`` / ``cblas_dgemm`` (with the wheel's symbol prefix and suffix) and registers them
with the core.  Where there is none (NumPy built on MKL or Accelerate, another OS, an OpenBLAS
without the thread-local setter, a NumPy not from a wheel) or ``VIGRAD_BLAS=numpy`` is set,
:func:`available` is False and the callers use NumPy's matmul with one vigrad thread.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import numpy as np

from . import _core

__all__ = ["available", "name", "matmul"]

# (prefix, suffix, ILP64): NumPy >= 2 wheels, NumPy 1.2x wheels, a plain OpenBLAS
_SYMBOLS = [("scipy_", "64_", True), ("", "64_", True), ("scipy_", "", False), ("", "", False)]
_state: dict = {}


def _loaded_openblas_paths():
    """NumPy's own OpenBLAS, if loaded: a library with 'openblas' in its name in the directory of
    libraries NumPy's wheel bundles (``numpy.libs``).  Only that one: SciPy's wheel bundles another
    OpenBLAS, and which of the two was found first would otherwise depend on import order, and the
    last bits of the products with it."""
    libs_dir = os.path.realpath(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs"))
    paths = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 6 or "openblas" not in os.path.basename(parts[5]).lower():
                    continue
                if os.path.dirname(os.path.realpath(parts[5])) == libs_dir and parts[5] not in paths:
                    paths.append(parts[5])
    except OSError:
        pass
    return paths


def _find() -> Optional[str]:
    if os.environ.get("VIGRAD_BLAS", "").lower() == "numpy" or not sys.platform.startswith("linux"):
        return None
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure NumPy's BLAS is loaded
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LOCAL", 0)
    for path in _loaded_openblas_paths():
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        try:
            set_local = lib.openblas_set_num_threads_local
        except AttributeError:
            continue  # OpenBLAS < 0.3.27: no per-thread setting
        for prefix, suffix, ilp64 in _SYMBOLS:
            try:
                sg, dg = getattr(lib, f"{prefix}cblas_sgemm{suffix}"), getattr(lib, f"{prefix}cblas_dgemm{suffix}")
            except AttributeError:
                continue
            addr = [ctypes.cast(f, ctypes.c_void_p).value for f in (sg, dg, set_local)]
            _core._register_blas(addr[0], addr[1], ilp64, addr[2], os.path.basename(path))
            _state["lib"] = lib  # keep the handle
            return os.path.basename(path)
    return None


def available() -> bool:
    """Whether vigrad runs its matrix products on its own threads (an OpenBLAS is registered)."""
    if "name" not in _state:
        _state["name"] = _find()
    return _state["name"] is not None


def name() -> Optional[str]:
    """The registered OpenBLAS library's file name, or None."""
    available()
    return _state["name"]


def matmul(a, b, *, trans_a=False, trans_b=False, out=None, accumulate=False, workers=1):
    """op(a) @ op(b) into ``out`` (added to it with accumulate): the core's gemm when
    :func:`available`, else NumPy's matmul (one thread of ours)."""
    A, B = (a.T if trans_a else a), (b.T if trans_b else b)
    if out is None:
        out = np.empty((A.shape[0], B.shape[1]), np.result_type(a, b))
        accumulate = False
    if available():
        _core.gemm(trans_a, trans_b, a, b, out, 1.0 if accumulate else 0.0, workers)
    elif accumulate:
        out += A @ B
    else:
        np.matmul(A, B, out=out)
    return out
