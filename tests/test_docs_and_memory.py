"""Docstring examples run; pathwise_grad allocates nothing but its outputs; properties over
random shapes and values (hypothesis)."""

import doctest
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vigrad as vg
import vigrad.bbvi
import vigrad.bnn
import vigrad.cavi
import vigrad.data
import vigrad.diagnostics
import vigrad.distributions
import vigrad.estimators
import vigrad.families
import vigrad.mapfit
import vigrad.metrics
import vigrad.optim
from vigrad import _core
from vigrad import reference as ref


@pytest.mark.parametrize("module", [vigrad.distributions, vigrad.estimators, vigrad.families, vigrad.bbvi,
                                    vigrad.optim, vigrad.data, vigrad.diagnostics, vigrad.mapfit, vigrad.bnn,
                                    vigrad.cavi, vigrad.metrics])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pathwise_grad_allocates_only_its_outputs(dtype):
    """NumPy reports its allocations to tracemalloc: the peak during the call is the two
    (D,) outputs, not anything of size S x D."""
    S, D = 8, 200_000
    rng = np.random.default_rng(0)
    loc, rho = rng.standard_normal(D).astype(dtype), rng.standard_normal(D).astype(dtype)
    eps, glik = rng.standard_normal((S, D)).astype(dtype), rng.standard_normal((S, D)).astype(dtype)
    prior = vg.ScaleMixtureNormal(0.5, 1.0, 0.1)
    vg.pathwise_grad(loc, rho, eps, glik, prior)  # warm the prior's parameter cache
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = vg.pathwise_grad(loc, rho, eps, glik, prior)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    outputs = 2 * D * np.dtype(dtype).itemsize
    assert peak - base <= outputs + 64 * 1024, (peak - base, outputs)
    assert out[0].nbytes + out[1].nbytes == outputs


shapes = st.tuples(st.integers(1, 6), st.integers(0, 70))
floats = st.floats(-3.0, 3.0, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), kw=st.floats(0.0, 2.0), mode=st.sampled_from(["mc", "stl"]),
       pi=st.floats(0.05, 0.95), mix=st.booleans())
def test_property_pathwise_matches_reference(shape, seed, kw, mode, pi, mix):
    S, D = shape
    rng = np.random.default_rng(seed)
    loc, rho = rng.normal(size=D), rng.normal(-1, 2, size=D)
    eps, glik = rng.standard_normal((S, D)), rng.normal(scale=3, size=(S, D))
    if mix:
        args = (np.array([pi]), np.array([1.0]), np.array([0.2]))
        got = _core.pathwise_grad_mixture(loc, rho, eps, glik, *args, mode, kw, 2)
        want = ref.pathwise_grad_mixture(loc, rho, eps, glik, *args, mode, kw, 1)
    else:
        args = (np.array([0.1]), np.array([1.3]))
        got = _core.pathwise_grad_normal(loc, rho, eps, glik, *args, mode, kw, 2)
        want = ref.pathwise_grad_normal(loc, rho, eps, glik, *args, mode, kw, 1)
    # summands reach |w| / sigma2^2 = 25 |w|; floor the tolerance at their size
    scale = 100.0 * (1 + np.abs(glik).max(initial=0) + np.abs(eps).max(initial=0) ** 2)
    for g, h in zip(got[:2], want[:2]):
        np.testing.assert_allclose(g, h, rtol=1e-12, atol=1e-12 * scale)


@settings(max_examples=100, deadline=None)
@given(x=st.lists(st.floats(-700, 700, allow_nan=False), min_size=1, max_size=50))
def test_property_softplus_is_stable_and_inverts(x):
    x = np.array(x)
    y = vg.MeanFieldGaussian(np.zeros_like(x), x).scale
    np.testing.assert_allclose(y, np.logaddexp(0.0, x), rtol=1e-14)
    back = vg.MeanFieldGaussian.from_scale(np.zeros_like(x), y).rho
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-12)
