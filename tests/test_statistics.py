"""Fixed-seed statistical tests.  Every bound is stated in standard errors (SE); with 4 SE a
correct implementation fails a two-sided check with probability ~6e-5 per seed, and the
seeds are fixed, so the suite is deterministic."""

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

import vigrad as vg
from vigrad import _core

K = 4.0  # standard errors


def softplus(x):
    return np.logaddexp(0.0, x)


def assert_within_se(samples, expected, k=K, axis=0):
    samples = np.asarray(samples, dtype=np.float64)
    mean = samples.mean(axis=axis)
    se = samples.std(axis=axis, ddof=1) / np.sqrt(samples.shape[axis])
    assert np.all(np.abs(mean - expected) <= k * se), (mean, expected, se)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normal_draws_moments_ks_and_independence(dtype):
    z = np.empty((400, 1000), dtype)
    _core.standard_normal(20261124, z, 2)
    x = z.astype(np.float64).ravel()
    n = x.size
    assert abs(x.mean()) < K / np.sqrt(n)
    assert abs(x.var() - 1.0) < K * np.sqrt(2.0 / n)
    kurt = stats.kurtosis(x)  # excess kurtosis, SE sqrt(24 / n)
    assert abs(kurt) < K * np.sqrt(24.0 / n)
    tail = np.mean(np.abs(x) > 3.0)
    p3 = 2 * stats.norm.sf(3.0)
    assert abs(tail - p3) < K * np.sqrt(p3 * (1 - p3) / n)
    # KS: under N(0, 1) p < 1e-4 has probability 1e-4
    assert stats.kstest(x, "norm").pvalue > 1e-4
    # neighbours along the event (same Philox call) and along samples are uncorrelated: SE 1/sqrt(m)
    for a, b in [(z[:, :-1], z[:, 1:]), (z[:-1, :], z[1:, :]), (z[:, 0::4], z[:, 3::4])]:
        r = np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1]
        assert abs(r) < K / np.sqrt(a.size)


def test_sample_moments_follow_loc_and_scale(dtype=np.float64):
    loc, rho = np.array([-2.0, 0.0, 5.0]), np.array([-1.0, 0.0, 2.0])
    q = vg.MeanFieldGaussian(loc, rho)
    w = q.sample(100_000, rng=5)
    assert_within_se(w, loc)
    n = w.shape[0]
    var = w.var(axis=0, ddof=1)
    assert np.all(np.abs(var / q.scale**2 - 1) < K * np.sqrt(2.0 / (n - 1)))
    assert stats.kstest((w[:, 2] - loc[2]) / q.scale[2], "norm").pvalue > 1e-4


# -- the seed's worked example: exact F and dF/dtheta ---------------------------------------
# prior N(0, 1), log P(D | w) = -(w - 0.5)^2 / 2, q = N(mu, sigma^2):
#   F = -log sigma + sigma^2 + mu^2 / 2 + (mu - 0.5)^2 / 2 - 1/2
#   dF/dmu = 2 mu - 1/2,  dF/drho = sigmoid(rho) (2 sigma - 1 / sigma)
MU, RHO = 0.3, -0.5
SIGMA = float(softplus(RHO))
EXACT_F = -np.log(SIGMA) + SIGMA**2 + MU**2 / 2 + (MU - 0.5) ** 2 / 2 - 0.5
EXACT_GLOC = 2 * MU - 0.5
EXACT_GRHO = float(expit(RHO) * (2 * SIGMA - 1 / SIGMA))


def seed_ll(w):
    r = w - 0.5
    return -0.5 * (r * r).sum(axis=1), -r


@pytest.mark.parametrize("estimator,kl", [("pathwise", "mc"), ("pathwise", "analytic"), ("stl", "mc")])
def test_pathwise_estimators_are_unbiased(estimator, kl, dtype):
    """D independent copies of the 1-D problem: each element's gradient is an independent estimate."""
    D = 40_000
    q = vg.MeanFieldGaussian(np.full(D, MU, dtype), np.full(D, RHO, dtype))
    res = vg.elbo_grad(q, seed_ll, vg.Normal(0.0, 1.0), num_samples=2, estimator=estimator, kl=kl, rng=17)
    assert_within_se(res.grad_loc, EXACT_GLOC)
    assert_within_se(res.grad_rho, EXACT_GRHO)


def test_loss_is_unbiased():
    q = vg.MeanFieldGaussian(np.array([MU]), np.array([RHO]))
    for kl in ("mc", "analytic"):
        losses = [vg.elbo_grad(q, seed_ll, vg.Normal(), num_samples=4, kl=kl, rng=i).loss for i in range(3000)]
        assert_within_se(losses, EXACT_F)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", [None, "loo", 0.5])
@pytest.mark.parametrize("kl", ["mc", "analytic"])
def test_score_estimator_is_unbiased(baseline, kl):
    q = vg.MeanFieldGaussian(np.array([MU]), np.array([RHO]))
    g = np.array([
        np.r_[r.grad_loc, r.grad_rho] for r in (
            vg.elbo_grad(q, seed_ll, vg.Normal(), num_samples=4, estimator="score", kl=kl, baseline=baseline, rng=i)
            for i in range(4000))
    ])
    assert_within_se(g, [EXACT_GLOC, EXACT_GRHO])


def _data_log_lik(x):
    """log prod_i N(x_i | w, 1) for data x: a real likelihood, with its normalising constant."""
    def log_lik(w):
        r = x[None, :] - w  # w: (S, 1)
        return stats.norm.logpdf(r).sum(axis=1), r.sum(axis=1, keepdims=True)
    return log_lik


@pytest.mark.slow
def test_leave_one_out_baseline_reduces_score_variance():
    """With a real likelihood f carries a large offset (here -sum log N ~ 30), which the
    leave-one-out baseline removes; the plain score estimator's variance grows with it."""
    x = np.random.default_rng(0).normal(1.0, 1.0, size=20)
    log_lik = _data_log_lik(x)
    q = vg.MeanFieldGaussian(np.array([0.8]), np.array([-1.5]))
    n = 3000
    runs = {}
    for b in (None, "loo"):
        runs[b] = np.array([vg.elbo_grad(q, log_lik, vg.Normal(), num_samples=8, estimator="score",
                                         baseline=b, rng=i).grad_loc[0] for i in range(n)])
    var_none, var_loo = runs[None].var(ddof=1), runs["loo"].var(ddof=1)
    # SE of a sample variance ~ var * sqrt(2 / (n - 1)) for near-normal estimates; require the
    # gap to exceed 4 SE of the two combined
    gap_se = np.sqrt(2.0 / (n - 1)) * np.hypot(var_none, var_loo)
    assert var_none - var_loo > K * gap_se
    # both unbiased for the same gradient
    assert abs(runs[None].mean() - runs["loo"].mean()) < K * np.sqrt(var_none / n + var_loo / n)


def test_pathwise_variance_below_score_variance():
    q = vg.MeanFieldGaussian(np.array([0.8]), np.array([-1.5]))
    log_lik = _data_log_lik(np.random.default_rng(0).normal(1.0, 1.0, size=20))
    n = 1000
    g = {e: np.array([vg.elbo_grad(q, log_lik, vg.Normal(), num_samples=8, estimator=e, rng=i).grad_loc[0]
                      for i in range(n)]) for e in ("pathwise", "score")}
    gap_se = np.sqrt(2.0 / (n - 1)) * np.hypot(g["pathwise"].var(), g["score"].var())
    assert g["score"].var() - g["pathwise"].var() > K * gap_se


def test_stl_is_exactly_zero_at_the_exact_posterior(dtype):
    """At q = posterior N(1/4, 1/2) every sample's STL gradient is 0 (up to rounding),
    while the plain pathwise estimator still scatters."""
    D = 1000
    rho_star = float(np.log(np.expm1(np.sqrt(0.5))))
    q = vg.MeanFieldGaussian(np.full(D, 0.25, dtype), np.full(D, rho_star, dtype))
    stl = vg.elbo_grad(q, seed_ll, vg.Normal(), num_samples=16, estimator="stl", rng=0)
    tiny = 1e-12 if dtype == np.float64 else 2e-5
    assert np.abs(stl.grad_loc).max() < tiny and np.abs(stl.grad_rho).max() < tiny
    pw = vg.elbo_grad(q, seed_ll, vg.Normal(), num_samples=16, estimator="pathwise", rng=0)
    assert np.abs(pw.grad_rho).max() > 1e-2
    # and the pathwise mean is still zero there: unbiased at the optimum
    assert_within_se(pw.grad_loc, 0.0)
    assert_within_se(pw.grad_rho, 0.0)
