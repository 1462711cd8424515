"""Gradient variance: score function (with and without a baseline) vs pathwise vs STL.

The slides' 1-D model: p(z) = N(0, 1), p(x | z) = N(x; z, 1), one observation x = 2, exact
posterior N(x/2, 1/2) = N(1, 1/2).  For q = N(mu, sigma^2) vg.elbo_grad estimates the gradient
of F = -ELBO with respect to loc = mu from S samples, with

* "score": the score-function (REINFORCE) estimator mean_s f(z_s) d log q(z_s)/d mu, where
  f = log q(z) - log p(z) - log p(x | z) is the per-sample cost;
* "score" + baseline="loo": f(z_s) replaced by f(z_s) minus the mean of f over the other
  S - 1 samples (a control variate; needs S >= 2);
* "pathwise": Proposition 1, d/dmu of f(mu + sigma eps);
* "stl": sticking the landing, the pathwise estimator without the score term of log q.

The log-likelihood includes its normalising constant, log p(x | z) = -log(2 pi)/2 - (x - z)^2/2
(and vigrad's prior and q densities include theirs), so f is the true log q - log p(x, z).
This matters for the score estimator without a baseline: a constant c added to f adds
c eps / sigma to every sample's gradient, so its variance carries a c^2 term; the baseline
removes any constant exactly.  The pathwise and STL estimators never see constants.

The variances are measured over R independent replicates at two q's -- q = N(0, 1) (not the
posterior) and q = the posterior -- for S = 1, 4, 16, 64, and compared with their closed
forms (derived in this file: with z = mu + sigma eps, f = A + B eps + C eps^2 and the
estimators are polynomials in Gaussian noise).  The standard error of a sample variance v is
sqrt((m4 - v^2) / R), m4 the fourth central moment.  At the posterior, f is the constant
-log p(x): the score estimator with the baseline and STL have zero variance there (up to
rounding), the plain score estimator does not (it sees the constant), and the pathwise
estimator keeps 4 sigma^2 / S.

Run: python examples/score_vs_pathwise.py [--fast] [--outdir DIR]
"""

from __future__ import annotations

import math

import numpy as np

import vigrad as vg

import _common  # examples/_common.py, beside this script
X_OBS = 2.0
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SAMPLE_SIZES = (1, 4, 16, 64)
ESTIMATORS = (("score", "score", None), ("score+loo", "score", "loo"), ("pathwise", "pathwise", None),
              ("stl", "stl", None))


def log_lik(z):
    """log N(x; z, 1) with its normalising constant, z (S, 1) -> (values (S,), grads (S, 1))."""
    r = X_OBS - z
    return -HALF_LOG_2PI - 0.5 * (r * r).sum(axis=1), r


def exact_variance(name, mu, sigma, S):
    """Closed-form variance of the loc-gradient estimator from S samples.

    f(z) = log q - log p(z) - log p(x|z) with z = mu + sigma eps is A + B eps + C eps^2 with
    A = log(2 pi)/2 - log sigma + x^2/2 + mu^2 - x mu,  B = sigma (2 mu - x),  C = sigma^2 - 1/2.
    score:     g = f eps / sigma;        Var = (A^2 + 2 B^2 + 15 C^2 + 6 A C) / (sigma^2 S)
    score+loo: the unbiased sample covariance of (f, eps / sigma); with U = f, V = eps / sigma,
               Var = mu22/S - (S-2) mu11^2/(S(S-1)) + mu20 mu02/(S(S-1)),
               mu22 = (3 B^2 + 10 C^2)/sigma^2, mu11 = B/sigma, mu20 = B^2 + 2 C^2, mu02 = 1/sigma^2
    pathwise:  g = 2 z - x;              Var = 4 sigma^2 / S
    stl:       g = 2 z - x - eps/sigma;  Var = (2 sigma - 1/sigma)^2 / S
    """
    A = HALF_LOG_2PI - math.log(sigma) + X_OBS**2 / 2 + mu**2 - X_OBS * mu
    B = sigma * (2 * mu - X_OBS)
    C = sigma**2 - 0.5
    if name == "score":
        v = (A * A + 2 * B * B + 15 * C * C + 6 * A * C) / (sigma**2 * S)
    elif name == "score+loo":
        if S < 2:
            return math.nan
        mu22, mu11 = (3 * B * B + 10 * C * C) / sigma**2, B / sigma
        mu20, mu02 = B * B + 2 * C * C, 1 / sigma**2
        v = mu22 / S - (S - 2) * mu11**2 / (S * (S - 1)) + mu20 * mu02 / (S * (S - 1))
    elif name == "pathwise":
        v = 4 * sigma**2 / S
    elif name == "stl":
        v = (2 * sigma - 1 / sigma) ** 2 / S
    else:
        raise ValueError(name)
    # at the posterior B = C = 0 exactly; sigma = sqrt(1/2) in floating point leaves ~1e-32
    return 0.0 if abs(v) < 1e-20 else v


def measure(q, estimator, baseline, S, reps, rng):
    prior = vg.Normal(0.0, 1.0)
    g = np.array([vg.elbo_grad(q, log_lik, prior, num_samples=S, estimator=estimator, baseline=baseline,
                               rng=rng).grad_loc[0] for _ in range(reps)])
    mean = float(g.mean())
    c = g - mean
    var = float(np.mean(c * c)) * reps / (reps - 1)
    m4 = float(np.mean(c**4))
    se = math.sqrt(max(m4 - var * var, 0.0) / reps)
    return {"mean": mean, "mean_se": math.sqrt(var / reps), "var": var, "var_se": se}


def main(fast=False, outdir=None):
    # --fast: fewer replicates, and fewer still at the posterior, where the ordering of the
    # estimators is not measured and three of them have (near) zero variance
    reps_at = {"q = N(0, 1)": 3000 if fast else 40000, "q = posterior N(1, 1/2)": 600 if fast else 40000}
    rng = np.random.default_rng(12345)
    post_mu, post_sd = X_OBS / 2, math.sqrt(0.5)
    points = {"q = N(0, 1)": (0.0, 1.0), "q = posterior N(1, 1/2)": (post_mu, post_sd)}
    print(f"model p(z) = N(0,1), p(x|z) = N(x; z, 1), x = {X_OBS}; posterior N({post_mu}, 1/2)")
    print("log p(x|z) includes its constant -log(2 pi)/2; gradient of F = -ELBO w.r.t. loc; replicates per cell "
          f"(fixed seed): {', '.join(f'{n} at {k}' for k, n in reps_at.items())}")
    results = {}
    for label, (mu, sigma) in points.items():
        n_reps = reps_at[label]
        q = vg.MeanFieldGaussian.from_scale([mu], [sigma])
        true_grad = 2 * mu - X_OBS  # dF/dmu = E[2z - x]
        print(f"\n{label}: exact dF/dloc = {true_grad:+.4f}")
        print(f"  {'S':>3}  {'estimator':<10} {'variance':>12} {'+- SE':>10} {'exact':>12}   {'mean gradient':>14}")
        cell = {}
        for S in SAMPLE_SIZES:
            for name, est, base in ESTIMATORS:
                if base == "loo" and S < 2:
                    cell[(name, S)] = None
                    print(f"  {S:>3}  {name:<10} {'(needs S >= 2)':>12}")
                    continue
                r = measure(q, est, base, S, n_reps, rng)
                r["exact"] = exact_variance(name, mu, sigma, S)
                cell[(name, S)] = r
                print(f"  {S:>3}  {name:<10} {r['var']:12.5g} {r['var_se']:10.3g} {r['exact']:12.5g}   "
                      f"{r['mean']:+8.4f} +- {r['mean_se']:.4f}")
        results[label] = cell

    off = results["q = N(0, 1)"]
    print("\nordering at q = N(0, 1), in standard errors of the difference of the variances:")
    z_scores = {}
    for S in SAMPLE_SIZES[1:]:
        a, b, c = off[("score", S)], off[("score+loo", S)], off[("pathwise", S)]
        z1 = (a["var"] - b["var"]) / math.hypot(a["var_se"], b["var_se"])
        z2 = (b["var"] - c["var"]) / math.hypot(b["var_se"], c["var_se"])
        z_scores[S] = (z1, z2)
        print(f"  S = {S:>2}: score - score+loo = {z1:6.1f} SE,  score+loo - pathwise = {z2:6.1f} SE")
    post = results["q = posterior N(1, 1/2)"]
    print("at the posterior: STL variance "
          + ", ".join(f"{post[('stl', S)]['var']:.1e}" for S in SAMPLE_SIZES)
          + "; score+loo " + ", ".join(f"{post[('score+loo', S)]['var']:.1e}" for S in SAMPLE_SIZES[1:])
          + " (zero up to rounding); pathwise 2/S; plain score (-log p(x))^2 / (sigma^2 S)")
    a_post = -(-0.5 * math.log(2 * math.pi * 2.0) - X_OBS**2 / 4)
    a_nc = a_post - HALF_LOG_2PI
    print(f"  without the likelihood's constant the plain score estimator would see f = {a_nc:.4f} instead of "
          f"{a_post:.4f} at the posterior: variance {a_nc**2 * 2:.3f} instead of {a_post**2 * 2:.3f} for S = 1")

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        floor = 1e-6
        for ax, (label, cell) in zip(axes, results.items()):
            mu, sigma = points[label]
            for k, (name, _, _) in enumerate(ESTIMATORS):
                Ss = [S for S in SAMPLE_SIZES if cell[(name, S)] is not None]
                v = [max(cell[(name, S)]["var"], floor) for S in Ss]
                ax.plot(Ss, v, "osD^"[k], color=f"C{k}", mfc="none", ms=5 + 2 * (3 - k), label=name)
                ex = [max(exact_variance(name, mu, sigma, S), floor) for S in Ss]
                ax.plot(Ss, ex, "-", color=f"C{k}", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("samples S")
            ax.set_title(f"{label} (lines: exact; {floor:g} = zero)")
        axes[0].set_ylabel("variance of the loc gradient")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    return {"reps": reps_at, "x": X_OBS, "results": results, "z_scores": z_scores, "png": png}


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
