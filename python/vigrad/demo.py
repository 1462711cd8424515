"""The seed's worked example, end to end (``python -m vigrad demo``).

Bayes by Backprop on one weight: prior P(w) = N(0, 1), log P(D | w) = -(w - 0.5)^2 / 2,
q(w) = N(mu, softplus(rho)^2), plain gradient descent on F with Proposition 1's
pathwise gradient, lr 0.01, mu0 = 0, rho0 = -3, M samples per step.

The posterior is N(1/4, 1/2), which lies in the family, so the exact optimum is
mu* = 0.25, sigma* = sqrt(1/2), and F* = -log Z = log(2) / 2 + 1/16.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .distributions import MeanFieldGaussian, Normal
from .estimators import elbo_grad

__all__ = ["run_demo", "EXACT_MU", "EXACT_SIGMA", "EXACT_F"]

EXACT_MU = 0.25
EXACT_SIGMA = math.sqrt(0.5)
EXACT_F = 0.5 * math.log(2.0) + 1.0 / 16.0


def _log_lik(w):
    r = w - 0.5
    return -0.5 * np.einsum("sj,sj->s", r, r), -r


def run_demo(*, steps=3000, samples=10, lr=0.01, dim=1, seed=0, estimator="pathwise", dtype="float64",
             out=sys.stdout, progress=True):
    """Fit the seed's example and return a dict of what was found.

    ``dim`` > 1 fits that many independent copies at once (every copy has the same
    optimum), which shows the core's speed on a large parameter vector.
    """
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    loc = np.zeros(dim, dtype=dt)
    rho = np.full(dim, -3.0, dtype=dt)
    prior = Normal(0.0, 1.0)
    print(f"vigrad demo: Bayes by Backprop on the seed's example (prior N(0,1), log P(D|w) = -(w-0.5)^2/2)", file=out)
    print(f"  plain gradient descent, lr={lr}, mu0=0, rho0=-3, M={samples} samples/step, {steps} steps, "
          f"{dim} weight(s), {estimator} estimator, {dt.name}", file=out)
    tty = progress and hasattr(out, "isatty") and out.isatty()
    report_every = max(1, steps // 10)
    losses = np.empty(steps)
    half = steps // 2
    avg_loc = np.zeros(dim)
    avg_sigma = np.zeros(dim)
    t0 = time.perf_counter()
    for t in range(steps):
        q = MeanFieldGaussian(loc, rho)
        if t >= half:  # Polyak-Ruppert average of the second half of the iterates
            avg_loc += q.loc
            avg_sigma += q.scale
        res = elbo_grad(q, _log_lik, prior, num_samples=samples, estimator=estimator, rng=rng)
        loc = loc - lr * res.grad_loc
        rho = rho - lr * res.grad_rho
        losses[t] = res.loss / dim
        if progress and ((t + 1) % report_every == 0 or t + 1 == steps):
            sigma = np.logaddexp(0.0, rho.astype(np.float64))
            line = (f"  step {t + 1:>6}/{steps}  F/weight {losses[max(0, t - report_every + 1):t + 1].mean():8.4f}  "
                    f"mu {loc.mean():.4f}  sigma {sigma.mean():.4f}  ({time.perf_counter() - t0:.2f} s)")
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)
    if tty:
        print(file=out)
    elapsed = time.perf_counter() - t0
    sigma = np.logaddexp(0.0, rho.astype(np.float64))
    mu_hat, sigma_hat = float(loc.mean()), float(sigma.mean())
    n_avg = steps - half
    mu_avg, sigma_avg = float(avg_loc.mean() / n_avg), float(avg_sigma.mean() / n_avg)
    tail = losses[-max(1, steps // 10):].mean()
    print(f"  fitted  mu = {mu_hat:.4f}  sigma = {sigma_hat:.4f}   (last iterate, mean over {dim} weight(s))", file=out)
    print(f"  average mu = {mu_avg:.4f}  sigma = {sigma_avg:.4f}   (iterates {half}..{steps - 1})", file=out)
    print(f"  exact   mu = {EXACT_MU:.4f}  sigma = {EXACT_SIGMA:.4f}   (posterior N(1/4, 1/2))", file=out)
    print(f"  F per weight over the last 10% of steps {tail:.4f}; exact minimum {EXACT_F:.4f}", file=out)
    print(f"  time {elapsed:.3f} s ({1e3 * elapsed / steps:.3f} ms/step)", file=out)
    return {"mu": mu_hat, "sigma": sigma_hat, "mu_avg": mu_avg, "sigma_avg": sigma_avg, "loss": float(tail),
            "seconds": elapsed, "losses": losses}
