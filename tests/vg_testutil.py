"""Shared helpers for vigrad's tests (imported by name; a conftest.py would clash with bench/'s)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

DTYPES = [np.float64, np.float32]
# core vs reference on the same inputs (STYLE.md): float64 rtol 1e-12, float32 rtol 1e-5
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
SHAPES = [(1, 1), (3, 5), (1000, 257), (0, 5), (4, 0)]


def assert_close(core, ref, dtype, scale=1.0):
    """Relative agreement at the dtype's tolerance, with an absolute floor of rtol * scale
    for entries that are sums with cancellation (scale: the magnitude of the summands)."""
    rtol = RTOL[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(core, dtype=np.float64), np.asarray(ref, dtype=np.float64),
                               rtol=rtol, atol=rtol * scale)


def random_problem(S, D, dtype, seed=0):
    """loc, rho (D,), eps, glik (S, D) in dtype, with moderate scales."""
    rng = np.random.default_rng(seed)
    loc = rng.standard_normal(D).astype(dtype)
    rho = (rng.standard_normal(D) - 1.0).astype(dtype)
    eps = rng.standard_normal((S, D)).astype(dtype)
    glik = rng.standard_normal((S, D)).astype(dtype)
    return loc, rho, eps, glik


def seed_log_lik(w):
    """The seed's log P(D | w) = -(w - 0.5)^2 / 2 summed over the event, and its gradient."""
    r = w - 0.5
    return -0.5 * (r * r).reshape(r.shape[0], -1).sum(axis=1), -r


torch_or_skip = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="torch is not installed"
)


def load_example(name):
    """Import examples/NAME.py as a module, without writing examples/__pycache__."""
    spec = importlib.util.spec_from_file_location(f"vigrad_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.path.insert(0, str(EXAMPLES))  # the scripts import examples/_common.py, as when run from there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.dont_write_bytecode = saved
    return module
