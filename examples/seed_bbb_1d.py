"""The seed's Bayes-by-Backprop example on one weight, with vigrad.

Prior P(w) = N(0, 1), log P(D | w) = -(w - 0.5)^2 / 2 (the seed's dummy likelihood, without
a normalising constant), q(w) = N(mu, softplus(rho)^2), plain gradient descent on the
variational free energy F = KL[q || P] - E_q[log P(D | w)] with the pathwise gradient of
Proposition 1, one sample per step, lr = 0.01, mu0 = 0, rho0 = -3, exactly as the seed.

The posterior is N(1/4, 1/2), inside the family, so the exact optimum is mu* = 0.25,
sigma* = sqrt(1/2) and F* = -log Z = log(2)/2 + 1/16.  The seed ran 100 steps (sigma was
still 0.11); run long enough, gradient descent with a constant step and one sample keeps
fluctuating around the optimum, and the average of the iterates over the second half
(Polyak-Ruppert) pins it down.

Also checked: the seed's hand-derived gradient formulas and vg.pathwise_grad give the same
numbers on the same noise.

Run: python examples/seed_bbb_1d.py [--fast] [--outdir DIR]
"""

from __future__ import annotations

import math

import numpy as np

import vigrad as vg

import _common  # examples/_common.py, beside this script
EXACT_MU = 0.25
EXACT_SIGMA = math.sqrt(0.5)
EXACT_F = 0.5 * math.log(2.0) + 1.0 / 16.0


def log_lik(w):
    """The seed's log P(D | w) = -(w - 0.5)^2 / 2 and its gradient, for w of shape (S, 1)."""
    r = w - 0.5
    return -0.5 * (r * r).sum(axis=1), -r


def seed_gradient(mu, rho, eps):
    """The seed's estimate_gradient, verbatim in substance (its hand-derived partials), on given noise."""
    sigma = np.log1p(np.exp(rho))
    dsig = 1.0 / (1.0 + np.exp(-rho))
    w = mu + sigma * eps
    df_dw = -(w - mu) / sigma**2 + w + (w - 0.5)
    df_dmu = (w - mu) / sigma**2
    df_drho = -(1.0 / sigma) * dsig + ((w - mu) ** 2 / sigma**3) * dsig
    g_mu = df_dw * 1.0 + df_dmu
    g_rho = df_dw * dsig * eps + df_drho
    return g_mu.mean(axis=0), g_rho.mean(axis=0)


def batch_means_se(x, num_batches=20):
    """Standard error of the mean of a correlated series by batch means."""
    m = len(x) // num_batches
    means = np.asarray(x[: m * num_batches]).reshape(num_batches, m).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(num_batches))


def run(num_steps, *, lr=0.01, num_samples=1, seed=0, report=print):
    prior = vg.Normal(0.0, 1.0)
    loc, rho = np.array([0.0]), np.array([-3.0])
    rng = np.random.default_rng(seed)
    mus, sigmas, losses = np.empty(num_steps), np.empty(num_steps), np.empty(num_steps)
    for t in range(num_steps):
        q = vg.MeanFieldGaussian(loc, rho)
        res = vg.elbo_grad(q, log_lik, prior, num_samples=num_samples, rng=rng)
        loc = loc - lr * res.grad_loc
        rho = rho - lr * res.grad_rho
        mus[t], sigmas[t], losses[t] = loc[0], np.logaddexp(0.0, rho[0]), res.loss
        if t < 100 and t % 10 == 0:
            report(f"  step {t:>3}: mu {mus[t]:.4f}  rho {rho[0]:.4f}  sigma {sigmas[t]:.4f}  F estimate {res.loss:.4f}")
    return mus, sigmas, losses


def main(fast=False, outdir=None):
    num_steps = 6000 if fast else 40000
    print("Seed example: prior N(0,1), log P(D|w) = -(w-0.5)^2/2, q = N(mu, softplus(rho)^2)")
    print(f"plain gradient descent, lr 0.01, mu0 = 0, rho0 = -3, 1 sample/step (pathwise), {num_steps} steps")

    # the seed's hand-written gradient and vigrad's fused kernel, on the same noise
    q0 = vg.MeanFieldGaussian(np.array([0.0]), np.array([-3.0]))
    w, eps = q0.sample(1000, rng=1, return_noise=True)
    g_vg = vg.pathwise_grad(q0.loc, q0.rho, eps, log_lik(w)[1], vg.Normal(0.0, 1.0))
    g_seed = seed_gradient(q0.loc, q0.rho, eps)
    grad_diff = float(max(np.abs(g_vg[0] - g_seed[0]).max(), np.abs(g_vg[1] - g_seed[1]).max()))
    print(f"seed's hand-derived gradient vs vg.pathwise_grad on 1000 draws: max |difference| = {grad_diff:.1e}")

    print("the first 100 steps (the seed printed these; its own noise differs):")
    mus, sigmas, losses = run(num_steps)
    half = num_steps // 2
    mu_avg, sigma_avg = float(mus[half:].mean()), float(sigmas[half:].mean())
    mu_se, sigma_se = batch_means_se(mus[half:]), batch_means_se(sigmas[half:])
    f_tail = float(losses[half:].mean())
    f_se = batch_means_se(losses[half:])
    print(f"after {num_steps} steps:")
    print(f"  last iterate      mu = {mus[-1]:.4f}  sigma = {sigmas[-1]:.4f}")
    print(f"  Polyak average    mu = {mu_avg:.4f} +- {mu_se:.4f}  sigma = {sigma_avg:.4f} +- {sigma_se:.4f}"
          f"   (steps {half}..{num_steps - 1}, +- batch-means SE)")
    print(f"  exact optimum     mu = {EXACT_MU:.4f}             sigma = {EXACT_SIGMA:.4f}   (posterior N(1/4, 1/2))")
    # F at the averaged q in closed form: KL by vg.kl_divergence, E_q[log P(D|w)] = -((mu - 0.5)^2 + sigma^2) / 2
    q_avg = vg.MeanFieldGaussian.from_scale([mu_avg], [sigma_avg])
    f_at_avg = float(vg.kl_divergence(q_avg, vg.Normal(0.0, 1.0))) + 0.5 * ((mu_avg - 0.5) ** 2 + sigma_avg**2)
    print(f"  F at the averaged q (closed form) {f_at_avg:.5f}; exact minimum F* = log(2)/2 + 1/16 = {EXACT_F:.5f}")
    print(f"  mean F estimate along the second half {f_tail:.4f} +- {f_se:.4f}: above F* because the iterates"
          f" themselves keep fluctuating around the optimum")

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = np.arange(1, num_steps + 1)
        axes[0].plot(steps, mus, lw=0.6, label="mu")
        axes[0].plot(steps, sigmas, lw=0.6, label="sigma")
        axes[0].axhline(EXACT_MU, color="C0", ls="--", lw=1)
        axes[0].axhline(EXACT_SIGMA, color="C1", ls="--", lw=1)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("step")
        axes[0].set_title("iterates (dashed: exact optimum)")
        axes[0].legend()
        window = max(1, num_steps // 200)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes[1].plot(np.arange(window, num_steps + 1), smooth, lw=0.8)
        axes[1].axhline(EXACT_F, color="k", ls="--", lw=1, label="F* exact")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("step")
        axes[1].set_title(f"F estimate (moving average of {window})")
        axes[1].legend()
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    return {"num_steps": num_steps, "grad_max_abs_diff": grad_diff,
            "mu_last": float(mus[-1]), "sigma_last": float(sigmas[-1]),
            "mu_avg": mu_avg, "sigma_avg": sigma_avg, "mu_avg_se": mu_se, "sigma_avg_se": sigma_se,
            "F_at_avg": f_at_avg, "F_trace_mean": f_tail, "F_trace_mean_se": f_se, "exact_mu": EXACT_MU, "exact_sigma": EXACT_SIGMA,
            "exact_F": EXACT_F, "png": png}


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
