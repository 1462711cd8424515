"""Jensen's inequality and the ELBO: log E[X] >= E[log X], and log p(x) = ELBO + KL(q || posterior).

Part 1 (the slides' LogNormal example): X ~ LogNormal(m, s^2), i.e. log X ~ N(m, s^2), has
E[log X] = m and log E[X] = m + s^2/2, so the Jensen gap is s^2/2.  For m = 0.2 and
s^2 = 0.82 (the slides' figure: E[X] = 1.83, E[log X] = 0.2, log E[X] = 0.61, gap = 0.41) and
a few other s, the gap is estimated by Monte Carlo from draws log X = m + s eps made with
vigrad (vg.MeanFieldGaussian.sample); its standard error comes from the delta method
(the influence of one draw on log(mean X) - mean(log X) is X / E[X] - log X).

Part 2 (the slides' 1-D model): p(z) = N(0, 1), p(x | z) = N(x; z, 1), one observation x = 2.
The posterior is N(x/2, 1/2) and the evidence p(x) = N(x; 0, 2).  For a few q = N(mu, sigma^2)
the ELBO is estimated with vigrad's Monte Carlo estimator (vg.elbo_grad, kl="mc": the mean
over samples of log p(x | z) + log p(z) - log q(z), whose loss is -ELBO) and compared with
its closed form; KL(q || posterior) comes from vg.kl_divergence, and ELBO + KL = log p(x) for
every q.  The log-likelihood includes its normalising constant -log(2 pi)/2, so the ELBO is a
bound on the true log evidence.  At q = posterior every sample gives log p(x) exactly: the
Monte Carlo ELBO has no variance there.

Run: python examples/jensen_gap_lognormal.py [--fast] [--outdir DIR]
"""

from __future__ import annotations

import math

import numpy as np

import vigrad as vg

import _common  # examples/_common.py, beside this script
M = 0.2
S_VALUES = (0.25, 0.5, math.sqrt(0.82), 1.2)
X_OBS = 2.0
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def jensen_gap_mc(m, s, n, seed):
    """(gap estimate, SE, E[X] estimate, E[log X] estimate) from n draws of log X ~ N(m, s^2)."""
    q = vg.MeanFieldGaussian.from_scale([m], [s])
    log_x = q.sample(n, rng=seed)[:, 0]
    x = np.exp(log_x)
    mean_x, mean_log = float(x.mean()), float(log_x.mean())
    gap = math.log(mean_x) - mean_log
    influence = x / mean_x - log_x  # first-order influence of each draw on the gap estimate
    se = float(influence.std(ddof=1) / math.sqrt(n))
    return gap, se, mean_x, mean_log


def log_lik(z):
    """log p(x | z) = log N(x; z, 1) with its constant, for z (S, 1): values (S,) and grads (S, 1)."""
    r = X_OBS - z
    return -HALF_LOG_2PI - 0.5 * (r * r).sum(axis=1), r


def elbo_closed_form(mu, sigma):
    """E_q[log N(x; z, 1)] - KL(q || N(0, 1)) for q = N(mu, sigma^2)."""
    expected_ll = -HALF_LOG_2PI - 0.5 * ((X_OBS - mu) ** 2 + sigma**2)
    kl_prior = math.log(1 / sigma) + (sigma**2 + mu**2) / 2 - 0.5
    return expected_ll - kl_prior


def main(fast=False, outdir=None):
    n_jensen = 200_000 if fast else 4_000_000
    n_elbo, reps = (2_000, 20) if fast else (20_000, 50)
    out = {"m": M}

    print(f"Part 1: X ~ LogNormal(m = {M}, s^2): gap log E[X] - E[log X] = s^2 / 2, Monte Carlo with {n_jensen} draws")
    print("      s     E[log X]   log E[X]   gap s^2/2   MC gap     +- SE      (MC - exact) / SE")
    rows = []
    for k, s in enumerate(S_VALUES):
        gap, se, mean_x, mean_log = jensen_gap_mc(M, s, n_jensen, seed=100 + k)
        exact = s * s / 2
        rows.append({"s": s, "E_log_X": M, "log_E_X": M + exact, "gap_exact": exact, "gap_mc": gap, "gap_se": se,
                     "E_X_mc": mean_x, "E_log_X_mc": mean_log})
        print(f"  {s:6.4f}   {M:8.4f}   {M + exact:8.4f}   {exact:9.4f}   {gap:8.4f}   {se:8.5f}   {(gap - exact) / se:+6.2f}")
    slide = rows[2]
    print(f"  the slides' case s^2 = 0.82: E[X] = exp(m + s^2/2) = {math.exp(M + 0.41):.2f} (MC {slide['E_X_mc']:.2f}), "
          f"E[log X] = {M}, log E[X] = {M + 0.41:.2f}, gap = 0.41")
    out["jensen"] = rows

    log_ev = -0.5 * math.log(2 * math.pi * 2.0) - X_OBS**2 / 4  # log N(x; 0, 2)
    post_mu, post_sd = X_OBS / 2, math.sqrt(0.5)
    posterior = vg.Normal(post_mu, post_sd)
    prior = vg.Normal(0.0, 1.0)
    print(f"\nPart 2: p(z) = N(0,1), p(x|z) = N(x; z, 1), x = {X_OBS}: posterior N({post_mu}, 1/2), "
          f"log p(x) = log N(x; 0, 2) = {log_ev:.6f}")
    print(f"  ELBO by vigrad Monte Carlo: {reps} x vg.elbo_grad(num_samples={n_elbo}), mean +- SE over the repeats")
    print("  q = N(mu, sigma^2)        ELBO (MC)              ELBO exact   KL(q||post)   ELBO + KL    log p(x)")
    qs = [(0.0, 1.0, "prior"), (1.0, 0.5, ""), (2.0, 1.0, ""), (post_mu, post_sd, "posterior"), (-1.0, 2.0, "")]
    elbo_rows = []
    rng = np.random.default_rng(7)
    for mu, sigma, note in qs:
        q = vg.MeanFieldGaussian.from_scale([mu], [sigma])
        est = np.array([-vg.elbo_grad(q, log_lik, prior, num_samples=n_elbo, kl="mc", rng=rng).loss
                        for _ in range(reps)])
        mc, se = float(est.mean()), float(est.std(ddof=1) / math.sqrt(reps))
        exact = elbo_closed_form(mu, sigma)
        kl_post = float(vg.kl_divergence(q, posterior))
        elbo_rows.append({"mu": mu, "sigma": sigma, "note": note, "elbo_mc": mc, "elbo_mc_se": se, "elbo_exact": exact,
                          "kl_post": kl_post, "elbo_plus_kl": exact + kl_post, "log_evidence": log_ev,
                          "mc_spread": float(est.max() - est.min())})
        print(f"  N({mu:+.3f}, {sigma:.3f}^2) {note:<9} {mc:10.6f} +- {se:.6f}   {exact:10.6f}   {kl_post:10.6f}"
              f"   {exact + kl_post:10.6f}  {log_ev:10.6f}")
    post_row = elbo_rows[3]
    print(f"  at q = posterior the {reps} Monte Carlo ELBOs span {post_row['mc_spread']:.1e}: every sample of"
          f" log p(x, z) - log q(z) equals log p(x)")
    out["log_evidence"] = log_ev
    out["elbo"] = elbo_rows

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        ss = np.linspace(0, 1.5, 200)
        axes[0].plot(ss, np.full_like(ss, M), label="E[log X] = m")
        axes[0].plot(ss, M + ss**2 / 2, label="log E[X] = m + s^2/2")
        axes[0].errorbar([r["s"] for r in rows], [r["gap_mc"] + M for r in rows],
                         yerr=[4 * r["gap_se"] for r in rows], fmt="ko", ms=4, label="m + MC gap (+- 4 SE)")
        axes[0].set_xlabel("s")
        axes[0].set_title(f"Jensen gap for LogNormal(m = {M}, s^2)")
        axes[0].legend(fontsize=8)
        sig = np.linspace(0.2, 2.0, 200)
        for mu, c in ((0.0, "C0"), (post_mu, "C1"), (2.0, "C2")):
            axes[1].plot(sig, [elbo_closed_form(mu, v) for v in sig], c, label=f"ELBO, mu = {mu}")
        axes[1].axhline(log_ev, color="k", ls="--", label="log p(x)")
        axes[1].plot([r["sigma"] for r in elbo_rows], [r["elbo_mc"] for r in elbo_rows], "k.", label="vigrad MC")
        axes[1].axvline(post_sd, color="gray", lw=0.5)
        axes[1].set_xlabel("sigma")
        axes[1].set_title("ELBO <= log p(x); equality at the posterior")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    out["png"] = png
    return out


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
