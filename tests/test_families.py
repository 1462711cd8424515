"""Full-rank and low-rank Gaussian families: core vs NumPy reference, SciPy densities,
sample moments, determinism, errors."""

import numpy as np
import pytest
from scipy import stats

import vigrad as vg
from vigrad import _core
from vigrad import reference as ref

from vg_testutil import assert_close


def spd_tril(d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    return np.linalg.cholesky(A @ A.T / d + np.eye(d)).astype(dtype)


def lowrank_params(d, r, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(d).astype(dtype), (np.abs(rng.standard_normal(d)) + 0.3).astype(dtype),
            (0.5 * rng.standard_normal((d, r))).astype(dtype))


@pytest.mark.parametrize("d,S", [(1, 1), (5, 3), (130, 7)])
def test_fullrank_kernels_match_reference(d, S, dtype):
    L = spd_tril(d, dtype)
    rng = np.random.default_rng(1)
    loc = rng.standard_normal(d).astype(dtype)
    eps, g = rng.standard_normal((S, d)).astype(dtype), rng.standard_normal((S, d)).astype(dtype)
    z = _core.fullrank_affine(loc, L, eps, 2)
    assert_close(z, ref.fullrank_affine(loc, L, eps, 1), dtype, scale=10 * np.sqrt(d))
    assert_close(_core.fullrank_log_prob(loc, L, z, 2), ref.fullrank_log_prob(loc, L, z, 1), dtype, scale=10 * d)
    for mode in ("mc", "stl"):
        for a, b in zip(_core.fullrank_pathwise_grad(L, eps, g, mode, 2), ref.fullrank_pathwise_grad(L, eps, g, mode, 1)):
            assert_close(a, b, dtype, scale=10 * np.sqrt(d))
    z1, e1, z2, e2 = (np.empty((S, d), dtype) for _ in range(4))
    _core.fullrank_sample(9, loc, L, z1, e1, 2)
    ref.fullrank_sample(9, loc, L, z2, e2, 1)
    assert_close(e1, e2, dtype, scale=10)
    assert_close(z1, z2, dtype, scale=10 * np.sqrt(d))


@pytest.mark.parametrize("d,r,S", [(2, 1, 1), (7, 3, 4), (3000, 10, 3)])
def test_lowrank_kernels_match_reference(d, r, S, dtype):
    loc, diag, U = lowrank_params(d, r, dtype)
    rng = np.random.default_rng(2)
    eps, g = rng.standard_normal((S, d + r)).astype(dtype), rng.standard_normal((S, d)).astype(dtype)
    if d > 500:  # the dense reference costs O(d^3): compare on a subset of checks
        z = _core.lowrank_affine(loc, diag, U, eps, 2)
        assert_close(z, ref.lowrank_affine(loc, diag, U, eps, 1), dtype, scale=10)
        assert_close(_core.lowrank_entropy(diag, U, 2), ref.lowrank_entropy(diag, U, 1), dtype, scale=10 * d)
        assert_close(_core.lowrank_log_prob(loc, diag, U, z, 2), ref.lowrank_log_prob(loc, diag, U, z, 1), dtype,
                     scale=10 * d)
        return
    z = _core.lowrank_affine(loc, diag, U, eps, 2)
    assert_close(z, ref.lowrank_affine(loc, diag, U, eps, 1), dtype, scale=10)
    assert_close(_core.lowrank_log_prob(loc, diag, U, z, 2), ref.lowrank_log_prob(loc, diag, U, z, 1), dtype,
                 scale=10 * d)
    assert_close(_core.lowrank_entropy(diag, U, 2), ref.lowrank_entropy(diag, U, 1), dtype, scale=10 * d)
    for mode in ("mc", "stl"):
        for a, b in zip(_core.lowrank_pathwise_grad(diag, U, eps, g, mode, 2),
                        ref.lowrank_pathwise_grad(diag, U, eps, g, mode, 1)):
            assert_close(a, b, dtype, scale=100)


def test_pathwise_grad_flat_matches_reference(dtype):
    rng = np.random.default_rng(3)
    loc, rho = rng.standard_normal(300).astype(dtype), rng.standard_normal(300).astype(dtype)
    eps, g = rng.standard_normal((5, 300)).astype(dtype), rng.standard_normal((5, 300)).astype(dtype)
    for mode in ("mc", "stl"):
        a, b = _core.pathwise_grad_flat(loc, rho, eps, g, mode, 1.0, 2), ref.pathwise_grad_flat(loc, rho, eps, g, mode, 1.0, 1)
        for x, y in zip(a[:3], b[:3]):
            assert_close(x, y, dtype, scale=1000)


def test_densities_and_entropy_match_scipy():
    d = 6
    L = spd_tril(d, np.float64, seed=4)
    loc = np.arange(d, dtype=float)
    q = vg.FullRankGaussian.from_scale_tril(loc, L)
    z = q.sample(50, rng=1)
    mvn = stats.multivariate_normal(loc, L @ L.T)
    np.testing.assert_allclose(q.log_prob(z), mvn.logpdf(z), rtol=1e-12)
    np.testing.assert_allclose(q.entropy(), mvn.entropy(), rtol=1e-12)
    np.testing.assert_allclose(q.cov, L @ L.T, rtol=1e-14)
    loc, diag, U = lowrank_params(d, 2, np.float64, seed=5)
    q2 = vg.LowRankGaussian.from_diag(loc, diag, U)
    mvn2 = stats.multivariate_normal(loc, np.diag(diag**2) + U @ U.T)
    z2 = q2.sample(50, rng=2)
    np.testing.assert_allclose(q2.log_prob(z2), mvn2.logpdf(z2), rtol=1e-12)
    np.testing.assert_allclose(q2.log_prob(z2[0]), mvn2.logpdf(z2[0]), rtol=1e-12)
    np.testing.assert_allclose(q2.entropy(), mvn2.entropy(), rtol=1e-12)


@pytest.mark.parametrize("family", ["fullrank", "lowrank"])
def test_sample_moments(family):
    """Sample mean within 4 SE, sample covariance entries within 4 SE (Wishart: var(S_ij) = (s_ij^2 + s_ii s_jj)/n)."""
    n = 200_000
    if family == "fullrank":
        q = vg.FullRankGaussian.from_cov([1.0, -2.0, 0.5], [[2.0, 0.9, 0.1], [0.9, 1.0, -0.3], [0.1, -0.3, 0.5]])
    else:
        q = vg.LowRankGaussian.from_diag([1.0, -2.0, 0.5], [0.5, 1.0, 0.2], [[1.0], [0.5], [-0.8]])
    z = q.sample(n, rng=11)
    cov = q.cov
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(z.mean(axis=0) - q.mean) < 4 * se_mean)
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    assert np.all(np.abs(np.cov(z.T) - cov) < 4 * se_cov)


@pytest.mark.parametrize("family", ["fullrank", "lowrank"])
def test_families_are_deterministic_across_workers(family):
    if family == "fullrank":
        q = vg.FullRankGaussian.from_scale_tril(np.zeros(40), spd_tril(40, np.float64))
    else:
        q = vg.LowRankGaussian.from_diag(*lowrank_params(3000, 5, np.float64))
    a = q.sample(9, rng=3, workers=1)
    for w in (2, 7):
        b = q.sample(9, rng=3, workers=w)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(q.log_prob(a, workers=1), q.log_prob(a, workers=w))
    z, eps = q.sample(4, rng=5, return_noise=True)
    g = np.random.default_rng(0).standard_normal(z.shape)
    g1 = q._pathwise(eps, g, "stl", 1)
    for w in (2, 7):
        for x, y in zip(g1, q._pathwise(eps, g, "stl", w)):
            np.testing.assert_array_equal(x, y)


def test_family_errors():
    with pytest.raises(ValueError, match=r"tril must have shape \(2, 2\) to match loc"):
        vg.FullRankGaussian(np.zeros(2), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="cov must be symmetric positive definite"):
        vg.FullRankGaussian.from_cov(np.zeros(2), [[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="scale_tril must have a positive diagonal"):
        vg.FullRankGaussian.from_scale_tril(np.zeros(2), [[1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(ValueError, match=r"cov_factor must have shape \(3, rank\)"):
        vg.LowRankGaussian(np.zeros(3), np.zeros(3), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="diag must be > 0"):
        vg.LowRankGaussian.from_diag(np.zeros(2), [1.0, 0.0], np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"z must have shape \(2,\) or \(S, 2\)"):
        vg.FullRankGaussian(np.zeros(2), np.zeros((2, 2))).log_prob(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="L must have a positive finite diagonal"):
        _core.fullrank_log_prob(np.zeros(2), np.zeros((2, 2)), np.zeros((1, 2)), 1)
    with pytest.raises(ValueError, match="rank must be <= 256"):
        _core.lowrank_entropy(np.ones(300), np.ones((300, 257)), 1)
