"""Argument checking shared by the public API.

Every check runs before any work starts and raises ``TypeError`` (wrong kind of
object) or ``ValueError`` (wrong shape or value) with a message that names the
argument and says what was expected and what was given.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from . import _core

__all__ = [
    "as_float_array",
    "check_finite",
    "check_num_samples",
    "resolve_key",
    "resolve_workers",
    "max_workers",
    "check_real",
]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Threads a call may use: the CPUs this process may run on (1 without OpenMP).
max_workers: int = _usable_cpus() if _core.has_openmp else 1


def as_float_array(x, name: str, dtype=None) -> np.ndarray:
    """``x`` as a float32 or float64 ndarray (no copy when it already is one).

    Integers become float64; bool, complex, string and object arrays are refused.
    With ``dtype`` the result is cast to it (a copy only where needed).
    """
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} must be an array of real numbers, got {type(x).__name__}: {exc}") from None
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{name} must be real (float32 or float64), got complex dtype {arr.dtype}")
    if kind == "b":
        raise TypeError(f"{name} must be real numbers, got bool dtype")
    if kind not in "iuf":
        raise TypeError(f"{name} must be an array of real numbers (float32 or float64), got dtype {arr.dtype}")
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    elif kind in "iu" or arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return arr


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise ValueError when ``arr`` holds NaN or inf, saying where the first one is."""
    ok = np.isfinite(arr)
    if not ok.all():
        bad = np.argwhere(~ok)
        where = tuple(int(i) for i in bad[0]) if arr.ndim else ()
        raise ValueError(
            f"{name} must be finite, got {len(bad)} non-finite value(s); the first, {float(arr[where])}, at index {where}"
        )


def check_real(x, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real scalar (not bool), optionally > 0 or >= 0."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    v = float(x)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def check_num_samples(n, name: str = "num_samples", minimum: int = 1) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(n).__name__} {n!r}")
    n = int(n)
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def resolve_workers(workers) -> int:
    """scipy.fft semantics: None -> all usable CPUs, -1 -> all, -k -> all but k - 1; 0 is an error."""
    if workers is None:
        return max_workers
    if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, numbers.Integral):
        raise TypeError(f"workers must be an integer or None, got {type(workers).__name__}")
    w = int(workers)
    if w == 0:
        raise ValueError("workers must be nonzero (None or -1 for all CPUs), got 0")
    if w < 0:
        w = max_workers + 1 + w
        if w < 1:
            raise ValueError(f"workers={workers} leaves no CPU (this machine has {max_workers})")
    return w


def resolve_rng(rng) -> np.random.Generator:
    """SPEC 7: an int seed, a numpy Generator or None (fresh OS entropy)."""
    if rng is None or isinstance(rng, (numbers.Integral, np.random.SeedSequence)) and not isinstance(rng, bool):
        if isinstance(rng, numbers.Integral) and int(rng) < 0:
            raise ValueError(f"rng seed must be non-negative, got {rng}")
        return np.random.default_rng(None if rng is None else (rng if isinstance(rng, np.random.SeedSequence) else int(rng)))
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(
        f"rng must be an int seed, a numpy.random.Generator or None, got {type(rng).__name__}"
    )


def resolve_key(rng) -> int:
    """A 64-bit Philox key drawn from ``rng``: the same seed gives the same key."""
    gen = resolve_rng(rng)
    return int(gen.integers(0, 2**64, dtype=np.uint64))
