"""The demo (``python -m vigrad demo``): the seed's worked example end to end, then Bayes by
Backprop networks on real data.

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

__all__ = ["run_demo", "run_bbb_demo", "matplotlib_pyplot", "EXACT_MU", "EXACT_SIGMA", "EXACT_F"]

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
    print("vigrad demo: Bayes by Backprop on the seed's example (prior N(0,1), log P(D|w) = -(w-0.5)^2/2)", file=out)
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


def matplotlib_pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def run_bbb_demo(*, seed=0, epochs=40, out=sys.stdout, plot=None, progress=True):
    """Bayes by Backprop on real data: a 64-128-10 BayesianMLP on the shipped digits, its test
    accuracy / NLL / calibration, and its uncertainty off the data; then Blundell et al.'s toy
    curve, whose predictive sd grows away from the training range (``plot``: a PNG of the band,
    which needs matplotlib: an ImportError before any work when it is missing)."""
    plt = None if plot is None else matplotlib_pyplot()
    if plot is not None and plt is None:
        raise ImportError(f"plot={plot!r} needs matplotlib, which is not installed (pip install matplotlib)")
    from . import metrics
    from .bnn import BayesianMLP
    from .datasets import load_digits, make_blundell_curve, train_test_split

    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_fraction=0.25, rng=seed)
    print(f"vigrad demo: Bayes by Backprop, 64-128-10 on the digits ({len(Xtr)} train / {len(Xte)} test images, "
          f"UCI optdigits, CC BY 4.0), scale-mixture prior, {epochs} epochs", file=out)
    t0 = time.perf_counter()
    model = BayesianMLP([64, 128, 10], likelihood="categorical", rng=seed)
    model.fit(Xtr, ytr, epochs=epochs, batch_size=64, lr=3e-3)
    t_fit = time.perf_counter() - t0
    p_samples = model.sample_proba(Xte, num_samples=20, rng=seed)
    p = p_samples.mean(axis=0)
    print(f"  test accuracy {metrics.accuracy(p, yte):.3f}  NLL {metrics.nll(p, yte):.3f}  "
          f"ECE {metrics.expected_calibration_error(p, yte):.3f}  ({t_fit:.1f} s to train)", file=out)
    noise = np.random.default_rng(seed).uniform(0, 1, size=(len(Xte), 64)).astype(np.float32)
    q_samples = model.sample_proba(noise, num_samples=20, rng=seed)
    for name, ps in (("test digits", p_samples), ("uniform-noise images", q_samples)):
        print(f"  {name:<21} predictive entropy {metrics.predictive_entropy(ps).mean():.3f} nats, "
              f"mutual information (epistemic) {metrics.mutual_information(ps).mean():.3f} nats", file=out)

    Xc, yc = make_blundell_curve(1024, rng=seed)
    reg = BayesianMLP([1, 64, 64, 1], likelihood="gaussian", rng=seed, init_rho=-5.0)
    t0 = time.perf_counter()
    reg.fit(Xc, yc, epochs=200, batch_size=32, lr=1e-2)
    grid = np.linspace(-0.6, 1.2, 181).reshape(-1, 1).astype(np.float32)
    mean, std = reg.predict(grid, num_samples=100, return_std=True, rng=seed)
    inside = (grid[:, 0] >= 0.0) & (grid[:, 0] <= 0.5)
    print(f"vigrad demo: Blundell et al.'s curve, trained on x in [0, 0.5] ({time.perf_counter() - t0:.1f} s): "
          f"predictive sd {np.median(std[inside]):.3f} inside the data, {np.median(std[~inside]):.3f} outside "
          f"({np.median(std[~inside]) / np.median(std[inside]):.1f}x)", file=out)
    if plot is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.fill_between(grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3, label="mean +- 2 sd")
        ax.plot(grid[:, 0], mean, label="predictive mean")
        ax.scatter(Xc[::4, 0], yc[::4], s=4, c="k", label="training data")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(loc="upper left")
        ax.set_title("Bayes by Backprop: the predictive band widens off the data")
        fig.tight_layout()
        fig.savefig(plot, dpi=100)
        plt.close(fig)
        print(f"  predictive band written to {plot}", file=out)
    return {"accuracy": metrics.accuracy(p, yte), "nll": metrics.nll(p, yte),
            "ece": metrics.expected_calibration_error(p, yte),
            "mi_test": float(metrics.mutual_information(p_samples).mean()),
            "mi_noise": float(metrics.mutual_information(q_samples).mean()),
            "std_inside": float(np.median(std[inside])), "std_outside": float(np.median(std[~inside]))}
