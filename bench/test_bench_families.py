"""Black-box VI (issue 4): full-rank and low-rank sampling + gradient kernels against the NumPy
reference.  (vg.fit's cost per step is in test_bench_fit.py.)

Groups: fullrank-d100, fullrank-d1000 (S = 8), lowrank-d1e5-r10 (S = 8).  Each group checks that
the implementations agree, outside the timed calls.
"""

import numpy as np
import pytest

import vigrad as vg
from vigrad import _core
from vigrad import reference as ref

from benchlib import tag

S = 8


def _fullrank(d):
    rng = np.random.default_rng(d)
    A = rng.standard_normal((d, d))
    L = np.linalg.cholesky(A @ A.T / d + np.eye(d))
    loc = rng.standard_normal(d)
    g = rng.standard_normal((S, d))
    return loc, L, g


def _lowrank(d, r):
    rng = np.random.default_rng(r)
    return rng.standard_normal(d), np.abs(rng.standard_normal(d)) + 0.3, 0.3 * rng.standard_normal((d, r)), \
        rng.standard_normal((S, d))


def fullrank_step(impl, loc, L, g, key=7):
    """Sample (with the noise) and the pathwise gradient of one step."""
    z, eps = np.empty_like(g), np.empty_like(g)
    impl.fullrank_sample(key, loc, L, z, eps, vg.max_workers)
    return z, impl.fullrank_pathwise_grad(L, eps, g, "mc", vg.max_workers)


def lowrank_step(impl, loc, diag, U, g, key=7):
    d, r = U.shape
    z, eps = np.empty((S, d)), np.empty((S, d + r))
    impl.lowrank_sample(key, loc, diag, U, z, eps, vg.max_workers)
    return z, impl.lowrank_pathwise_grad(diag, U, eps, g, "mc", vg.max_workers)


@pytest.mark.parametrize("d", [100, 1000])
@pytest.mark.parametrize("impl", ["vigrad", "numpy-reference"])
def test_fullrank_sample_and_gradient(benchmark, impl, d):
    loc, L, g = _fullrank(d)
    mod = _core if impl == "vigrad" else ref
    tag(benchmark, f"fullrank-d{d}", impl=impl, d=d, S=S)
    z, grads = benchmark(fullrank_step, mod, loc, L, g)
    z_ref, grads_ref = fullrank_step(ref, loc, L, g)
    np.testing.assert_allclose(z, z_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", ["vigrad", "numpy-reference"])
def test_lowrank_sample_and_gradient(benchmark, impl):
    """d = 10^5, r = 10.  The dense reference cannot form the (d, d) covariance at this size, so
    the reference here is a Woodbury NumPy version of the same arithmetic."""
    loc, diag, U, g = _lowrank(10**5, 10)
    tag(benchmark, "lowrank-d1e5-r10", impl=impl, d=10**5, r=10, S=S)
    fn = lowrank_step if impl == "vigrad" else _lowrank_numpy_woodbury
    z, grads = benchmark(fn, _core, loc, diag, U, g)
    z2, grads2 = _lowrank_numpy_woodbury(_core, loc, diag, U, g)
    np.testing.assert_allclose(z, z2, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, grads2):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def _lowrank_numpy_woodbury(_unused, loc, diag, U, g, key=7):
    """The same step in NumPy: noise from the reference generator, entropy gradient by Woodbury."""
    d, r = U.shape
    eps = np.empty((S, d + r))
    ref.standard_normal(key, eps, 1)
    z = loc + diag * eps[:, :d] + eps[:, d:] @ U.T
    W = U / diag[:, None] ** 2
    C = np.eye(r) + U.T @ W
    Ci = np.linalg.inv(C)
    a = -g
    g_loc = a.mean(axis=0)
    g_diag = (a * eps[:, :d]).mean(axis=0) - (1 / diag**2 - np.einsum("ik,kl,il->i", W, Ci, W)) * diag
    g_U = a.T @ eps[:, d:] / S - W @ Ci
    return z, (g_loc, g_diag, g_U)

