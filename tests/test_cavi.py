"""vg.cavi.normal_gamma: CAVI for the slides' Normal-Gamma model, held to the exact posterior.

Oracles, all derived here and independent of vigrad.cavi:

* the exact posterior (Normal-Gamma conjugacy): lambda_N = lambda0 + N,
  mu_N = (lambda0 mu0 + N xbar) / lambda_N, a = a0 + N/2,
  b = b0 + S/2 + lambda0 N (xbar - mu0)^2 / (2 lambda_N)   with S = sum (x_i - xbar)^2;
* the exact log evidence
  log p(x) = lgamma(a) - lgamma(a0) + a0 log b0 - a log b + log(lambda0 / lambda_N) / 2 - N log(2 pi) / 2,
  (integrate mu out of the Gaussian part, then tau out of the Gamma kernel), itself checked
  against two-dimensional numerical integration with scipy.integrate;
* the ELBO and KL(q || posterior) by numerical integration over (mu, tau).

What the tests found, and the tolerances that follow from it:

* at the fixed point E_q[tau] equals the exact E[tau] = a / b exactly, not approximately:
  the fixed point of b_n = b0 + (S' + lambda_N / tau_n) / 2 with tau_n = lambda_N a_n / b_n is
  b_n = b a_n / (a_n - 1/2), and a_n - 1/2 = a0 + N/2 = a, so a_n / b_n = a / b.  CAVI's larger
  shape a_n = a0 + (N+1)/2 is exactly compensated by the extra 1/tau_n in b_n.  The tolerance,
  1e-9 relative, is the iteration's stopping rule (tol = 1e-10 on the parameters' change, times
  the contraction factor's 1 / (1 - 1/(2 a_n)) <= 2, plus rounding).  What q gets wrong is the
  spread: Var_q(mu) = b / (lambda_N a) against the exact (Student-t) b / (lambda_N (a - 1)),
  Var_q(tau) = a_n / b_n^2 = Var(tau) a / a_n.
* the gap log p(x) - ELBO = KL(q || posterior) = (log a_n - digamma(a_n)) / 2
  + KL(Gamma(a_n, b_n) || Gamma(a, b)) depends on a alone and is about 1 / (4 a): it shrinks
  like 1 / (2N).
* the ELBO trace is non-decreasing up to rounding: once converged it wobbles by a few tens of
  ulp (measured: at most 64 ulp of |ELBO| over 350 random problems up to N = 10^4), so the
  check allows 1e-12 |ELBO|.
"""

import doctest
import math

import numpy as np
import pytest

import vigrad.cavi as cavi

LOG_2PI = math.log(2 * math.pi)


def exact_posterior(x, mu0=0.0, lambda0=1.0, a0=1.0, b0=1.0):
    """(mu_N, lambda_N, a, b, log p(x)) of the Normal-Gamma model, in closed form."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    xbar = x.mean()
    lam = lambda0 + n
    mu = (lambda0 * mu0 + n * xbar) / lam
    a = a0 + n / 2
    b = b0 + 0.5 * np.sum((x - xbar) ** 2) + lambda0 * n * (xbar - mu0) ** 2 / (2 * lam)
    log_ev = (math.lgamma(a) - math.lgamma(a0) + a0 * math.log(b0) - a * math.log(b)
              + 0.5 * math.log(lambda0 / lam) - 0.5 * n * LOG_2PI)
    return mu, lam, a, b, log_ev


def log_joint(x, mu, tau, mu0, lambda0, a0, b0):
    """log p(x, mu, tau) for scalar mu, tau > 0."""
    n = len(x)
    ll = 0.5 * n * (math.log(tau) - LOG_2PI) - 0.5 * tau * float(np.sum((x - mu) ** 2))
    lp_mu = 0.5 * (math.log(lambda0 * tau) - LOG_2PI) - 0.5 * lambda0 * tau * (mu - mu0) ** 2
    lp_tau = a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1) * math.log(tau) - b0 * tau
    return ll + lp_mu + lp_tau


def log_normal(z, m, prec):
    return 0.5 * (math.log(prec) - LOG_2PI) - 0.5 * prec * (z - m) ** 2


def log_gamma_pdf(t, a, b):
    return a * math.log(b) - math.lgamma(a) + (a - 1) * math.log(t) - b * t


PRIOR = dict(mu0=0.5, lambda0=2.0, a0=3.0, b0=2.0)
SMALL_X = np.array([1.3, -0.4, 0.9])


# ---------------------------------------------------------------------------------------------- ELBO

@pytest.mark.parametrize("n", [1, 3, 10, 100, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_elbo_never_decreases(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, n)
    for prior in (dict(), PRIOR, dict(mu0=-5.0, lambda0=0.01, a0=0.1, b0=10.0)):
        res = cavi.normal_gamma(x, **prior)
        assert res.converged and res.elbo.shape == (res.num_iter,)
        steps = np.diff(res.elbo)
        assert np.all(steps >= -1e-12 * abs(res.elbo[-1])), steps
        assert steps[0] > 0  # the start (q(tau) = prior) is not the fixed point


def test_elbo_closed_form_matches_numerical_integration():
    """The closed-form ELBO at a q that is not the fixed point (one sweep), against
    the double integral of q(mu) q(tau) [log p(x, mu, tau) - log q(mu) - log q(tau)]."""
    integrate = pytest.importorskip("scipy.integrate")
    res = cavi.normal_gamma(SMALL_X, **PRIOR, max_iter=1)
    assert res.num_iter == 1 and not res.converged
    m, t, a, b = res.mu_n, res.tau_n, res.a_n, res.b_n
    sd_mu = 1 / math.sqrt(t)

    def integrand(mu, tau):
        lq = log_normal(mu, m, t) + log_gamma_pdf(tau, a, b)
        return math.exp(lq) * (log_joint(SMALL_X, mu, tau, **PRIOR) - lq)

    val, err = integrate.dblquad(integrand, 1e-12, a / b + 40 * math.sqrt(a) / b,
                                 m - 40 * sd_mu, m + 40 * sd_mu, epsabs=1e-11, epsrel=1e-11)
    assert res.elbo[0] == pytest.approx(val, rel=1e-8, abs=1e-8)


def test_log_evidence_closed_form_matches_numerical_integration():
    integrate = pytest.importorskip("scipy.integrate")
    *_, log_ev = exact_posterior(SMALL_X, **PRIOR)

    def joint(mu, tau):
        return math.exp(log_joint(SMALL_X, mu, tau, **PRIOR))

    val, err = integrate.dblquad(joint, 0.0, np.inf, -np.inf, np.inf, epsabs=0, epsrel=1e-10)
    assert math.log(val) == pytest.approx(log_ev, abs=1e-8)


def test_gap_is_kl_to_the_posterior():
    """log p(x) - ELBO = KL(q || p(mu, tau | x)), the KL by numerical integration."""
    integrate = pytest.importorskip("scipy.integrate")
    res = cavi.normal_gamma(SMALL_X, **PRIOR)
    mu_post, lam, a, b, log_ev = exact_posterior(SMALL_X, **PRIOR)
    m, t, an, bn = res.mu_n, res.tau_n, res.a_n, res.b_n
    sd_mu = 1 / math.sqrt(t)

    def integrand(mu, tau):
        lq = log_normal(mu, m, t) + log_gamma_pdf(tau, an, bn)
        lp = log_normal(mu, mu_post, lam * tau) + log_gamma_pdf(tau, a, b)
        return math.exp(lq) * (lq - lp)

    kl, _ = integrate.dblquad(integrand, 1e-12, an / bn + 40 * math.sqrt(an) / bn,
                              m - 40 * sd_mu, m + 40 * sd_mu, epsabs=1e-12, epsrel=1e-10)
    gap = log_ev - res.elbo[-1]
    assert kl > 0.01
    assert gap == pytest.approx(kl, rel=1e-7, abs=1e-10)


def test_elbo_below_log_evidence_and_gap_shrinks_with_n():
    rng = np.random.default_rng(3)
    x_all = rng.normal(-1.0, 0.7, 4096)
    gaps = []
    for n in (1, 4, 16, 64, 256, 1024, 4096):
        x = x_all[:n]
        res = cavi.normal_gamma(x, **PRIOR)
        *_, a, b, log_ev = exact_posterior(x, **PRIOR)
        gap = log_ev - res.elbo[-1]
        assert gap > 0
        gaps.append(gap)
        # the gap in closed form: E_q KL(q(mu) || p(mu | tau)) + KL(q(tau) || p(tau))
        an, bn = res.a_n, res.b_n
        kl_tau = ((an - a) * cavi._digamma(an) - math.lgamma(an) + math.lgamma(a)
                  + a * (math.log(bn) - math.log(b)) + an * (b - bn) / bn)
        assert gap == pytest.approx(0.5 * (math.log(an) - cavi._digamma(an)) + kl_tau, rel=1e-6, abs=1e-12)
        if n >= 256:
            assert gap * 4 * a == pytest.approx(1.0, rel=0.02)  # ~ 1 / (4 a) = 1 / (2N) for large N
    assert all(g1 > g2 for g1, g2 in zip(gaps, gaps[1:])), gaps


# ---------------------------------------------------------------------------------------------- fixed point

@pytest.mark.parametrize("prior", [dict(), PRIOR, dict(mu0=3.0, lambda0=0.1, a0=0.05, b0=0.5)])
@pytest.mark.parametrize("n", [1, 7, 500])
def test_fixed_point_satisfies_the_update_equations(prior, n):
    x = np.random.default_rng(n).normal(1.0, 2.0, n)
    p = {**dict(mu0=0.0, lambda0=1.0, a0=1.0, b0=1.0), **prior}
    res = cavi.normal_gamma(x, **prior)
    assert res.converged
    e_tau = res.a_n / res.b_n
    mu_n = (p["lambda0"] * p["mu0"] + n * x.mean()) / (p["lambda0"] + n)
    tau_n = (p["lambda0"] + n) * e_tau
    a_n = p["a0"] + (n + 1) / 2
    e_sq = np.sum((x - res.mu_n) ** 2 + 1 / res.tau_n) + p["lambda0"] * ((res.mu_n - p["mu0"]) ** 2 + 1 / res.tau_n)
    b_n = p["b0"] + 0.5 * e_sq
    assert res.mu_n == pytest.approx(mu_n, rel=1e-12, abs=1e-12)
    assert res.tau_n == pytest.approx(tau_n, rel=1e-10)
    assert res.a_n == a_n
    assert res.b_n == pytest.approx(b_n, rel=1e-10)


@pytest.mark.parametrize("n", [1, 5, 50, 5000])
def test_against_the_exact_posterior(n):
    x = np.random.default_rng(10 + n).normal(4.0, 0.5, n)
    res = cavi.normal_gamma(x, **PRIOR)
    mu_post, lam, a, b, _ = exact_posterior(x, **PRIOR)
    assert res.mu_n == pytest.approx(mu_post, rel=1e-12)
    # E_q[tau] = a_n / b_n equals the exact a / b (see the module docstring for why); 1e-9 is
    # the stopping rule's tolerance
    assert res.a_n - 0.5 == a
    assert res.a_n / res.b_n == pytest.approx(a / b, rel=1e-9)
    # q's spread: Var_q(mu) = b / (lambda_N a) < the exact Student-t variance b / (lambda_N (a - 1))
    assert 1 / res.tau_n == pytest.approx(b / (lam * a), rel=1e-9)
    if a > 1:
        assert 1 / res.tau_n < b / (lam * (a - 1))
    # Var_q(tau) = a_n / b_n^2 = (exact Var(tau) = a / b^2) * a / a_n
    assert res.a_n / res.b_n ** 2 == pytest.approx(a / b ** 2 * a / res.a_n, rel=1e-9)


def test_iterations_and_flags():
    x = np.array([0.3, 1.1, -0.2, 0.8])
    one = cavi.normal_gamma(x, max_iter=1)
    assert one.num_iter == 1 and not one.converged and one.elbo.shape == (1,)
    full = cavi.normal_gamma(x)
    assert full.converged and 2 <= full.num_iter < 50
    assert isinstance(full.mu_n, float) and isinstance(full.converged, bool) and isinstance(full.num_iter, int)
    # tol = 0: runs until the parameters stop changing in floating point (or max_iter)
    exact = cavi.normal_gamma(x, tol=0.0, max_iter=200)
    assert exact.num_iter <= 200
    assert exact.b_n == pytest.approx(full.b_n, rel=1e-10)
    # a loose tol stops earlier
    loose = cavi.normal_gamma(x, tol=1e-3)
    assert loose.converged and loose.num_iter < full.num_iter


def test_inputs_are_not_modified_and_dtypes_accepted():
    x = np.array([0.5, 2.0, 1.5], dtype=np.float32)
    x.flags.writeable = False
    before = x.copy()
    res32 = cavi.normal_gamma(x)
    np.testing.assert_array_equal(x, before)
    res64 = cavi.normal_gamma(x.astype(np.float64))
    res_list = cavi.normal_gamma([0.5, 2.0, 1.5])
    res_int = cavi.normal_gamma(np.array([1, 2, 3]))
    assert res32.mu_n == res64.mu_n == res_list.mu_n
    assert res_int.mu_n == pytest.approx(6 / 4)


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(x=[]), ValueError, ["x", "empty"]),
    (dict(x=np.ones((2, 2))), ValueError, ["x", "1-D", "(2, 2)"]),
    (dict(x=5.0), ValueError, ["x", "1-D", "()"]),
    (dict(x=[1.0, np.nan]), ValueError, ["x", "finite", "index 1"]),
    (dict(x=[1.0, np.inf]), ValueError, ["x", "finite"]),
    (dict(x=[1e200, -1e200]), ValueError, ["x", "float64", "not finite"]),
    (dict(x=[1e308, 1e308]), ValueError, ["x", "float64", "not finite"]),
    (dict(x=[True, False]), TypeError, ["x", "bool"]),
    (dict(x=["a"]), TypeError, ["x"]),
    (dict(x=[1.0], lambda0=0.0), ValueError, ["lambda0", "> 0", "0.0"]),
    (dict(x=[1.0], a0=-1.0), ValueError, ["a0", "> 0", "-1.0"]),
    (dict(x=[1.0], b0=0.0), ValueError, ["b0", "> 0"]),
    (dict(x=[1.0], b0=np.inf), ValueError, ["b0", "finite"]),
    (dict(x=[1.0], mu0=np.nan), ValueError, ["mu0", "finite"]),
    (dict(x=[1.0], mu0="0"), TypeError, ["mu0", "real"]),
    (dict(x=[1.0], tol=-1e-3), ValueError, ["tol", ">= 0"]),
    (dict(x=[1.0], max_iter=0), ValueError, ["max_iter", ">= 1", "0"]),
    (dict(x=[1.0], max_iter=2.5), TypeError, ["max_iter", "integer"]),
])
def test_errors_name_the_argument(kwargs, exc, words):
    x = kwargs.pop("x")
    with pytest.raises(exc) as info:
        cavi.normal_gamma(x, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        cavi.normal_gamma([1.0, 2.0], 0.0)


# ---------------------------------------------------------------------------------------------- digamma

def test_digamma_known_values_without_scipy():
    euler = 0.57721566490153286061
    assert cavi._digamma(1.0) == pytest.approx(-euler, abs=1e-14)
    assert cavi._digamma(0.5) == pytest.approx(-euler - 2 * math.log(2), abs=1e-14)
    harmonic = 0.0
    for k in range(1, 40):
        harmonic += 1 / k
        assert cavi._digamma(k + 1.0) == pytest.approx(harmonic - euler, abs=1e-13)
    # the recurrence psi(x + 1) = psi(x) + 1/x across the switch to the series at 10
    for x0 in (0.3, 9.5, 9.999999, 10.0, 10.5, 123.4):
        assert cavi._digamma(x0 + 1) - cavi._digamma(x0) == pytest.approx(1 / x0, rel=1e-12, abs=1e-13)
    # the root x* = 1.46163214496836...
    assert abs(cavi._digamma(1.4616321449683623)) < 1e-14
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="x must be a finite number > 0"):
            cavi._digamma(bad)


def test_digamma_against_scipy():
    special = pytest.importorskip("scipy.special")
    xs = np.concatenate([np.logspace(-8, 8, 3001), np.linspace(0.01, 30.0, 3000),
                         np.linspace(1.40, 1.52, 1201)])
    got = np.array([cavi._digamma(v) for v in xs])
    want = special.digamma(xs)
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < 1e-12, (xs[err.argmax()], err.max())


def test_doctests():
    result = doctest.testmod(cavi, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
