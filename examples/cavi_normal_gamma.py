"""Mean-field CAVI for the slides' Normal-Gamma model, beside the exact posterior.

Model: x_i ~ N(mu, 1/tau), mu | tau ~ N(mu0, 1/(lambda0 tau)), tau ~ Gamma(a0, rate=b0).
vg.cavi.normal_gamma alternates the slides' closed-form updates

    q(mu)  = N(mu_N, 1/tau_N),  mu_N = (lambda0 mu0 + N xbar)/(lambda0 + N),  tau_N = (lambda0 + N) E[tau]
    q(tau) = Gamma(a_N, b_N),   a_N = a0 + (N+1)/2,  b_N = b0 + E_mu[sum (x_i - mu)^2 + lambda0 (mu - mu0)^2]/2

and evaluates the ELBO in closed form after each sweep.  The model is conjugate, so the exact
posterior is known: tau ~ Gamma(a, b), mu | tau ~ N(mu_N, 1/(lambda_N tau)) with
lambda_N = lambda0 + N, a = a0 + N/2, b = b0 + S/2 + lambda0 N (xbar - mu0)^2 / (2 lambda_N),
S = sum (x_i - xbar)^2, and the log evidence is
log p(x) = lgamma(a) - lgamma(a0) + a0 log b0 - a log b + log(lambda0/lambda_N)/2 - N log(2 pi)/2.

What the comparison shows: CAVI gets E[mu] and E[tau] exactly right (at the fixed point
b_N = b a_N / (a_N - 1/2), so a_N / b_N = a / b), but it cannot represent the coupling of mu
and tau in the posterior (mu's spread depends on tau), so it underestimates the spread:
Var_q(mu) = b / (lambda_N a) against the exact Student-t variance b / (lambda_N (a - 1)).
The ELBO stays below log p(x) by KL(q || posterior) ~ 1/(4a) ~ 1/(2N).

Run: python examples/cavi_normal_gamma.py [--fast] [--outdir DIR]
"""

from __future__ import annotations

import math

import numpy as np

import vigrad.cavi as cavi

import _common  # examples/_common.py, beside this script
PRIOR = dict(mu0=0.0, lambda0=1.0, a0=2.0, b0=2.0)


def exact_posterior(x, mu0, lambda0, a0, b0):
    n = len(x)
    xbar = float(np.mean(x))
    lam = lambda0 + n
    mu = (lambda0 * mu0 + n * xbar) / lam
    a = a0 + n / 2
    b = b0 + 0.5 * float(np.sum((x - xbar) ** 2)) + lambda0 * n * (xbar - mu0) ** 2 / (2 * lam)
    log_ev = (math.lgamma(a) - math.lgamma(a0) + a0 * math.log(b0) - a * math.log(b)
              + 0.5 * math.log(lambda0 / lam) - 0.5 * n * math.log(2 * math.pi))
    return {"mu": mu, "lambda": lam, "a": a, "b": b, "log_evidence": log_ev,
            "E_tau": a / b, "sd_tau": math.sqrt(a) / b,
            "sd_mu": math.sqrt(b / (lam * (a - 1))) if a > 1 else math.inf}


def main(fast=False, outdir=None):
    rng = np.random.default_rng(42)
    x = rng.normal(1.5, 0.8, 20)  # true mu = 1.5, tau = 1 / 0.8^2 = 1.5625
    n = len(x)
    print(f"data: N = {n} draws of N(1.5, 0.8^2) (true tau = {1 / 0.64:.4f}); xbar = {x.mean():.4f}")
    print(f"prior: mu0 = {PRIOR['mu0']}, lambda0 = {PRIOR['lambda0']}, a0 = {PRIOR['a0']}, b0 = {PRIOR['b0']}")

    res = cavi.normal_gamma(x, **PRIOR)
    ex = exact_posterior(x, **PRIOR)
    print(f"\nCAVI sweeps (q(tau) starts at the prior); converged = {res.converged} after {res.num_iter} sweeps")
    print(" sweep      mu_N        tau_N         b_N       E_q[tau]          ELBO        ELBO change")
    trace = []
    for k in range(1, res.num_iter + 1):
        r = cavi.normal_gamma(x, **PRIOR, max_iter=k)  # the state after k sweeps
        change = r.elbo[-1] - r.elbo[-2] if k > 1 else float("nan")
        trace.append({"sweep": k, "mu_n": r.mu_n, "tau_n": r.tau_n, "b_n": r.b_n, "elbo": float(r.elbo[-1])})
        print(f"  {k:>3}   {r.mu_n:9.6f}   {r.tau_n:10.6f}   {r.b_n:10.6f}   {r.a_n / r.b_n:10.6f}   "
              f"{r.elbo[-1]:12.8f}   {change:12.3e}")

    sd_mu_q = 1 / math.sqrt(res.tau_n)
    e_tau_q, sd_tau_q = res.a_n / res.b_n, math.sqrt(res.a_n) / res.b_n
    print("\n                    CAVI q(mu) q(tau)     exact posterior")
    print(f"  E[mu]             {res.mu_n:12.6f}          {ex['mu']:12.6f}")
    print(f"  sd(mu)            {sd_mu_q:12.6f}          {ex['sd_mu']:12.6f}   (Student-t marginal; ratio "
          f"{sd_mu_q / ex['sd_mu']:.4f} = sqrt((a-1)/a))")
    print(f"  E[tau]            {e_tau_q:12.6f}          {ex['E_tau']:12.6f}")
    print(f"  sd(tau)           {sd_tau_q:12.6f}          {ex['sd_tau']:12.6f}   (ratio {sd_tau_q / ex['sd_tau']:.4f}"
          f" = sqrt(a / a_N))")
    print(f"  shape of tau      {res.a_n:12.6f}          {ex['a']:12.6f}   (a0 + (N+1)/2 vs a0 + N/2)")
    print(f"  ELBO / log p(x)   {res.elbo[-1]:12.6f}          {ex['log_evidence']:12.6f}   "
          f"gap = KL(q || posterior) = {ex['log_evidence'] - res.elbo[-1]:.6f}")

    print("  (ELBO changes of ~1e-15 once converged are rounding: the ELBO is flat there)")
    print("\nthe gap log p(x) - ELBO against N (fresh data from N(1.5, 0.8^2) for each N): ~ 1/(4a) = 1/(4 a0 + 2N)")
    gaps = []
    ns = (1, 5, 20, 100, 1000) if fast else (1, 2, 5, 10, 20, 50, 100, 1000, 10000)
    for m in ns:
        xm = np.random.default_rng(m).normal(1.5, 0.8, m)
        rm = cavi.normal_gamma(xm, **PRIOR)
        em = exact_posterior(xm, **PRIOR)
        gap = em["log_evidence"] - float(rm.elbo[-1])
        gaps.append({"n": m, "gap": gap, "approx": 1 / (4 * em["a"]), "sweeps": rm.num_iter})
        print(f"  N = {m:>5}: gap {gap:.6f}   1/(4a) = {1 / (4 * em['a']):.6f}   ({rm.num_iter} sweeps)")

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].plot([t["sweep"] for t in trace], [t["elbo"] for t in trace], "o-", label="ELBO after each sweep")
        axes[0].axhline(ex["log_evidence"], color="k", ls="--", label="log p(x) (exact)")
        axes[0].set_xlabel("sweep")
        axes[0].set_title("CAVI: ELBO rises to a fixed point below log p(x)")
        axes[0].legend(fontsize=8)
        mus = np.linspace(ex["mu"] - 4 * ex["sd_mu"], ex["mu"] + 4 * ex["sd_mu"], 200)
        taus = np.linspace(max(1e-3, ex["E_tau"] - 4 * ex["sd_tau"]), ex["E_tau"] + 4 * ex["sd_tau"], 200)
        MU, TAU = np.meshgrid(mus, taus)

        def log_gamma(t, a, b):
            return a * math.log(b) - math.lgamma(a) + (a - 1) * np.log(t) - b * t

        log_post = log_gamma(TAU, ex["a"], ex["b"]) + 0.5 * np.log(ex["lambda"] * TAU / (2 * math.pi)) \
            - 0.5 * ex["lambda"] * TAU * (MU - ex["mu"]) ** 2
        log_q = log_gamma(TAU, res.a_n, res.b_n) + 0.5 * math.log(res.tau_n / (2 * math.pi)) \
            - 0.5 * res.tau_n * (MU - res.mu_n) ** 2
        levels = np.exp(np.max(log_post)) * np.array([0.05, 0.2, 0.5, 0.8])
        axes[1].contour(MU, TAU, np.exp(log_post), levels=levels, colors="k")
        axes[1].contour(MU, TAU, np.exp(log_q), levels=np.exp(np.max(log_q)) * np.array([0.05, 0.2, 0.5, 0.8]),
                        colors="C1", linestyles="--")
        axes[1].plot([], [], "k", label="exact posterior")
        axes[1].plot([], [], "C1--", label="CAVI q(mu) q(tau)")
        axes[1].set_xlabel("mu")
        axes[1].set_ylabel("tau")
        axes[1].set_title("posterior couples mu and tau; q cannot")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    return {"n": n, "cavi": {"mu_n": res.mu_n, "tau_n": res.tau_n, "a_n": res.a_n, "b_n": res.b_n,
                             "E_tau": e_tau_q, "sd_mu": sd_mu_q, "sd_tau": sd_tau_q, "elbo": res.elbo.copy(),
                             "converged": res.converged, "num_iter": res.num_iter},
            "exact": ex, "x": x, "prior": dict(PRIOR), "trace": trace, "gaps": gaps, "png": png}


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
