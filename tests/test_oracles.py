"""vigrad against independent oracles: SciPy densities, closed forms, finite differences,
the seed document's own gradient code, and PyTorch autograd on the same noise."""

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logsumexp

import vigrad as vg

from vg_testutil import random_problem, seed_log_lik, torch_or_skip

TOL = {np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12), np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5)}


def softplus(x):
    return np.logaddexp(0.0, x)


# -- densities, entropy, KL --------------------------------------------------------------------

def test_meanfield_log_prob_and_entropy_match_scipy(dtype):
    loc, rho, eps, _ = random_problem(6, 40, dtype)
    q = vg.MeanFieldGaussian(loc.reshape(5, 8), rho.reshape(5, 8))
    w = q.sample(6, rng=3)
    want = stats.norm.logpdf(w.astype(np.float64), loc.reshape(5, 8), q.scale.astype(np.float64)).sum(axis=(1, 2))
    np.testing.assert_allclose(q.log_prob(w), want, rtol=TOL[np.dtype(dtype)]["rtol"] * 10)
    assert q.log_prob(w).dtype == dtype and q.log_prob(w[0]).shape == ()
    np.testing.assert_allclose(q.log_prob(w[2]), want[2], rtol=TOL[np.dtype(dtype)]["rtol"] * 10)
    np.testing.assert_allclose(q.entropy(), stats.norm(scale=q.scale.astype(np.float64)).entropy().sum(),
                               rtol=TOL[np.dtype(dtype)]["rtol"] * 10)
    np.testing.assert_allclose(np.diag(q.cov), q.scale.reshape(-1) ** 2)
    assert q.cov.shape == (40, 40) and q.mean is q.loc


def test_from_scale_round_trips(dtype):
    scale = np.array([1e-30 if dtype == np.float64 else 1e-20, 1e-3, 0.5, 1.0, 30.0, 1e6], dtype)
    q = vg.MeanFieldGaussian.from_scale(np.zeros(6, dtype), scale)
    # softplus(softplus_inv(s)) is as well conditioned as exp near rho: |rho| ulp, plus a few ulp
    bound = 4 * np.finfo(dtype).eps * (1 + np.abs(q.rho.astype(np.float64))) * scale
    assert np.all(np.abs(q.scale.astype(np.float64) - scale) <= bound)


def test_normal_prior_matches_scipy(dtype):
    w = (2 * np.random.default_rng(0).standard_normal((4, 2, 3))).astype(dtype)
    m, s = np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.3, 4.0])
    p = vg.Normal(m, s)  # broadcasts over the event (2, 3)
    want = stats.norm.logpdf(w.astype(np.float64), m, s).sum(axis=(1, 2))
    np.testing.assert_allclose(p.log_prob(w), want, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(p.grad_log_prob(w), -(w.astype(np.float64) - m) / s**2, **TOL[np.dtype(dtype)])
    np.testing.assert_allclose(vg.Normal(0.0, 2.0).log_prob(w[0, 0]), stats.norm.logpdf(w[0, 0], 0, 2).sum(),
                               **TOL[np.dtype(dtype)])


def mixture_logpdf(w, pi, s1, s2):
    return logsumexp([np.log(pi) + stats.norm.logpdf(w, 0, s1), np.log1p(-pi) + stats.norm.logpdf(w, 0, s2)], axis=0)


def test_scale_mixture_matches_scipy_and_finite_differences(dtype):
    pi, s1, s2 = 0.3, 1.0, np.exp(-3)
    p = vg.ScaleMixtureNormal(pi, s1, s2)
    w = np.linspace(-3, 3, 61).astype(dtype).reshape(1, -1)
    w64 = w.astype(np.float64)
    np.testing.assert_allclose(p.log_prob(w), mixture_logpdf(w64, pi, s1, s2).sum(axis=1), **TOL[np.dtype(dtype)])
    h = 1e-6
    fd = (mixture_logpdf(w64 + h, pi, s1, s2) - mixture_logpdf(w64 - h, pi, s1, s2)) / (2 * h)
    np.testing.assert_allclose(p.grad_log_prob(w), fd, rtol=1e-6 if dtype == np.float64 else 1e-4, atol=1e-6)


@pytest.mark.parametrize("w", [1e3, -1e3, 40.0])
def test_scale_mixture_is_finite_far_in_the_tails(dtype, w):
    """|w| = 1e3 with sigma2 = e^-8: naive code gives log(0) for the narrow component and
    log(pi N(w; 0, 1)) underflows too; log-sum-exp stays exact."""
    pi, s1, s2 = 0.5, 1.0, np.exp(-8)
    p = vg.ScaleMixtureNormal(pi, s1, s2)
    x = np.array([w], dtype)
    with np.errstate(divide="ignore"):
        naive = np.log(pi * stats.norm.pdf(w, 0, s1) + (1 - pi) * stats.norm.pdf(w, 0, s2))
    assert not np.isfinite(naive) or abs(w) < 100
    want = np.log(pi) + stats.norm.logpdf(w, 0, s1)  # the narrow component is exp(-1e12) smaller
    np.testing.assert_allclose(p.log_prob(x), want, rtol=TOL[np.dtype(dtype)]["rtol"])
    np.testing.assert_allclose(p.grad_log_prob(x), [-w / s1**2], rtol=TOL[np.dtype(dtype)]["rtol"])


def test_kl_divergence_closed_form_and_monte_carlo():
    q = vg.MeanFieldGaussian([0.3, -1.0, 2.0], [0.1, -2.0, 1.0])
    m, s = np.array([0.0, 1.0, 0.5]), np.array([1.0, 2.0, 0.7])
    sig = q.scale
    closed = np.sum(np.log(s / sig) + (sig**2 + (q.loc - m) ** 2) / (2 * s**2) - 0.5)
    kl = vg.kl_divergence(q, vg.Normal(m, s))
    np.testing.assert_allclose(kl, closed, rtol=1e-13)
    w = q.sample(200_000, rng=9)
    terms = q.log_prob(w) - vg.Normal(m, s).log_prob(w)
    se = terms.std() / np.sqrt(terms.size)
    assert abs(terms.mean() - kl) < 4 * se  # fails with probability ~6e-5
    assert vg.kl_divergence(q, q) == pytest.approx(0.0, abs=1e-14)
    np.testing.assert_allclose(vg.kl_divergence(q, vg.MeanFieldGaussian.from_scale(m, s)), closed, rtol=1e-13)


# -- gradients: finite differences of the fixed-noise objective ------------------------------------

def mc_objective(loc, rho, eps, log_lik, prior_logpdf, kl, kl_weight, prior_ms=None):
    """F-hat(theta) for fixed noise: the function whose exact gradient Proposition 1 computes."""
    sigma = softplus(rho)
    w = loc + sigma * eps
    ll = log_lik(w).mean()
    if kl == "analytic":
        m, s = prior_ms
        klv = np.sum(np.log(s / sigma) + (sigma**2 + (loc - m) ** 2) / (2 * s**2) - 0.5)
    else:
        klv = np.mean(np.sum(stats.norm.logpdf(w, loc, sigma) - prior_logpdf(w), axis=1))
    return kl_weight * klv - ll


def fd_grad(fun, x, h=1e-6):
    g = np.empty_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        g.flat[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return g


def loglik_sin(w):
    return np.sum(np.sin(w) - 0.1 * w**2, axis=1)


def loglik_sin_grad(w):
    return np.cos(w) - 0.2 * w


PRIORS = {
    "normal": (vg.Normal(0.2, 1.5), lambda w: stats.norm.logpdf(w, 0.2, 1.5)),
    "mixture": (vg.ScaleMixtureNormal(0.5, 1.0, 0.3), lambda w: mixture_logpdf(w, 0.5, 1.0, 0.3)),
}


@pytest.mark.parametrize("prior_name,kl", [("normal", "mc"), ("normal", "analytic"), ("mixture", "mc")])
def test_pathwise_grad_equals_finite_differences(prior_name, kl):
    prior, logpdf = PRIORS[prior_name]
    loc, rho, eps, _ = random_problem(5, 6, np.float64, seed=8)
    w = loc + softplus(rho) * eps
    gl, gr = vg.pathwise_grad(loc, rho, eps, loglik_sin_grad(w), prior, kl=kl, kl_weight=0.3)
    ms = (0.2, 1.5)
    f_loc = lambda x: mc_objective(x, rho, eps, loglik_sin, logpdf, kl, 0.3, ms)  # noqa: E731
    f_rho = lambda x: mc_objective(loc, x, eps, loglik_sin, logpdf, kl, 0.3, ms)  # noqa: E731
    np.testing.assert_allclose(gl, fd_grad(f_loc, loc), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gr, fd_grad(f_rho, rho), rtol=1e-6, atol=1e-8)


def test_elbo_grad_uses_the_noise_of_sample_with_the_same_seed(dtype):
    """elbo_grad(rng=seed) draws exactly q.sample(S, rng=seed): so its result can be checked
    against pathwise_grad and a SciPy evaluation of F on that noise."""
    loc, rho, _, _ = random_problem(1, 7, dtype, seed=2)
    q = vg.MeanFieldGaussian(loc, rho)
    prior, logpdf = PRIORS["mixture"]
    res = vg.elbo_grad(q, seed_log_lik, prior, num_samples=4, kl_weight=0.5, rng=42)
    w, eps = q.sample(4, rng=42, return_noise=True)
    gl, gr = vg.pathwise_grad(loc, rho, eps, seed_log_lik(w)[1], prior, kl_weight=0.5)
    np.testing.assert_array_equal(res.grad_loc, gl)
    np.testing.assert_array_equal(res.grad_rho, gr)
    w64 = w.astype(np.float64)
    log_q = stats.norm.logpdf(w64, loc.astype(np.float64), q.scale.astype(np.float64)).sum(axis=1)
    kl_mc = np.mean(log_q - logpdf(w64).sum(axis=1))
    ll = seed_log_lik(w64)[0].mean()
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(res.kl, kl_mc, rtol=tol["rtol"] * 100, atol=tol["atol"] * 10)
    np.testing.assert_allclose(res.log_lik, ll, rtol=tol["rtol"] * 100)
    np.testing.assert_allclose(res.loss, 0.5 * kl_mc - ll, rtol=tol["rtol"] * 100, atol=tol["atol"] * 10)


# -- gradients: the seed document's own code ---------------------------------------------------

def seed_estimate_gradient(mu, rho, epsilon):
    """Verbatim arithmetic of the seed's estimate_gradient for one sample (prior N(0,1),
    log P(D|w) = -(w - 0.5)^2 / 2), with the noise passed in."""
    sigma = np.log1p(np.exp(rho))
    d_sigma_d_rho = 1.0 / (1.0 + np.exp(-rho))
    w = mu + sigma * epsilon
    df_dw = (-(w - mu) / sigma**2) - (-w) - (-(w - 0.5))
    df_dmu = (w - mu) / sigma**2
    df_drho = -(1.0 / sigma) * d_sigma_d_rho + ((w - mu) ** 2 / sigma**3) * d_sigma_d_rho
    return df_dw * 1.0 + df_dmu, df_dw * d_sigma_d_rho * epsilon + df_drho


def test_pathwise_grad_equals_the_seed_code():
    mu, rho = np.array([0.0, 0.2, -0.7]), np.array([-3.0, 0.5, -1.0])
    eps = np.random.default_rng(1).standard_normal((8, 3))
    per_sample = [seed_estimate_gradient(mu, rho, e) for e in eps]
    want_mu = np.mean([g[0] for g in per_sample], axis=0)
    want_rho = np.mean([g[1] for g in per_sample], axis=0)
    w = mu + np.log1p(np.exp(rho)) * eps
    gl, gr = vg.pathwise_grad(mu, rho, eps, -(w - 0.5), vg.Normal(0.0, 1.0))
    np.testing.assert_allclose(gl, want_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gr, want_rho, rtol=1e-11, atol=1e-12)


def test_exact_gradient_of_the_seed_example_in_closed_form():
    """kl='analytic' with many samples of eps = 0 and +-1 pairs gives the exact dF/dtheta:
    dF/dmu = 2 mu - 0.5, dF/drho = sigmoid(rho) (2 sigma - 1 / sigma)."""
    mu, rho = np.array([0.3]), np.array([-0.5])
    sigma = softplus(rho)
    eps = np.array([[1.0], [-1.0]])  # E[eps] = 0, E[eps^2] = 1 exactly for this quadrature
    w = mu + sigma * eps
    gl, gr = vg.pathwise_grad(mu, rho, eps, -(w - 0.5), vg.Normal(0.0, 1.0), kl="analytic")
    np.testing.assert_allclose(gl, 2 * mu - 0.5, rtol=1e-14)
    np.testing.assert_allclose(gr, expit(rho) * (2 * sigma - 1 / sigma), rtol=1e-14)


# -- gradients: PyTorch autograd on the same noise -----------------------------------------------

@torch_or_skip
@pytest.mark.parametrize("prior_name", ["normal", "mixture"])
def test_pathwise_grad_equals_torch_autograd(dtype, prior_name):
    import torch

    loc, rho, eps, _ = random_problem(4, 300, dtype, seed=12)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tl = torch.tensor(loc, dtype=tdt, requires_grad=True)
    tr = torch.tensor(rho, dtype=tdt, requires_grad=True)
    te = torch.tensor(eps, dtype=tdt)
    sigma = torch.nn.functional.softplus(tr)
    w = tl + sigma * te
    log_q = torch.distributions.Normal(tl, sigma).log_prob(w)
    c = lambda v: torch.tensor(v, dtype=tdt)  # noqa: E731  (python floats would become float32 tensors)
    if prior_name == "normal":
        log_p = torch.distributions.Normal(c(0.2), c(1.5)).log_prob(w)
    else:
        log_p = torch.logsumexp(torch.stack([
            c(np.log(0.5)) + torch.distributions.Normal(c(0.0), c(1.0)).log_prob(w),
            c(np.log(0.5)) + torch.distributions.Normal(c(0.0), c(0.3)).log_prob(w)]), dim=0)
    log_lik = (torch.sin(w) - 0.1 * w**2).sum(dim=1)
    F = 0.3 * (log_q - log_p).sum(dim=1).mean() - log_lik.mean()
    F.backward()
    glik = loglik_sin_grad(w.detach().numpy()).astype(dtype)
    gl, gr = vg.pathwise_grad(loc, rho, eps, glik, PRIORS[prior_name][0], kl_weight=0.3)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gl, tl.grad.numpy(), **tol)
    np.testing.assert_allclose(gr, tr.grad.numpy(), **tol)
