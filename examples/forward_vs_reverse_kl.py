"""Forward vs reverse KL: one Gaussian fitted to a two-mode target.

The slides' target p(x) = 0.5 N(-2, 0.5^2) + 0.5 N(2, 0.5^2), the family q = N(mu, sigma^2).

* Reverse KL, KL(q || p) (what variational inference minimises), fitted with vg.fit: mode
  seeking.  vg.fit starts from the MAP it finds by L-BFGS from ``init``, so init = 1.0 lands on
  the mode at +2 and init = -1.0 on the mode at -2: q ~ N(+-2, 0.5^2), KL ~ log 2 (the other
  half of p's mass is simply ignored).  There is also a higher-cost local optimum at the
  centre, q ~ N(0, 1.74^2) (KL ~ 1.87), which vg.fit reaches from init = 0 when the MAP start
  is turned off (map_init=False).  (init = 0 is a stationary point of log p -- the density's
  minimum between the modes -- so a MAP search cannot start there.)  The centre is a shallow
  optimum behind a ridge (KL ~ 1.94 at mu ~ +-0.9): that fit takes 32 samples per step, with
  8 the gradient noise can carry q onto the ridge.
* Forward KL, KL(p || q): minimised by moment matching, mean 0 and variance
  0.5 (0.25 + 4) + 0.5 (0.25 + 4) - 0 = 4.25, so sigma = sqrt(4.25) ~ 2.06: mass covering,
  centred where p has almost no mass.  The moments are exact; a Monte Carlo estimate from
  draws of p is printed beside them.

Both KLs are also evaluated by quadrature (the reverse KL in closed form up to one narrow
term, integrated on a fine grid; the forward KL on a fine grid), and the reverse-KL optima found
by a grid search on that, as independent checks of the fits.

Run: python examples/forward_vs_reverse_kl.py [--fast] [--outdir DIR]
"""

from __future__ import annotations

import math

import numpy as np

import vigrad as vg

import _common  # examples/_common.py, beside this script
MEANS, SD, WEIGHTS = np.array([-2.0, 2.0]), 0.5, np.array([0.5, 0.5])


def log_p(z):
    """log p(z) of the two-mode mixture, elementwise, with its normalising constant."""
    z = np.asarray(z, dtype=np.float64)
    comps = [math.log(w) - 0.5 * math.log(2 * math.pi * SD**2) - 0.5 * ((z - m) / SD) ** 2
             for m, w in zip(MEANS, WEIGHTS)]
    return np.logaddexp(*comps)


def log_joint(z):
    """vg.fit's callback: z (S, 1) -> (log p (S,), d log p / dz (S, 1))."""
    a = -0.5 * ((z - MEANS[0]) / SD) ** 2
    b = -0.5 * ((z - MEANS[1]) / SD) ** 2
    m = np.logaddexp(a, b)
    ra, rb = np.exp(a - m), np.exp(b - m)  # responsibilities
    grad = -(ra * (z - MEANS[0]) + rb * (z - MEANS[1])) / SD**2
    const = math.log(0.5) - 0.5 * math.log(2 * math.pi * SD**2)
    return (m + const).sum(axis=1), grad


# log p(z) = C - 2 (z^2 + 4) + log(2 cosh 8z) = C - 2 (z^2 + 4) + 8 |z| + log(1 + exp(-16 |z|)), with
# C = log 0.5 - log(2 pi 0.25) / 2.  Under q = N(mu, sigma^2) every term has a closed form except the last,
# a narrow bump (width ~1/16) at z = 0 that quadrature over q's own scale would miss (Gauss-Hermite does
# miss it for wide q); it is integrated on a fine grid around 0.
_C = math.log(0.5) - 0.5 * math.log(2 * math.pi * SD**2)
_BUMP_Z = np.linspace(-3.0, 3.0, 2401)  # step 0.0025; the kink z = 0 is node 1200, a panel boundary
_BUMP_G = np.log1p(np.exp(-16.0 * np.abs(_BUMP_Z)))
_BUMP_W = np.tile([2.0, 4.0], 1201)[:2401] * (_BUMP_Z[1] - _BUMP_Z[0]) / 3  # composite Simpson
_BUMP_W[[0, -1]] = (_BUMP_Z[1] - _BUMP_Z[0]) / 3
_erf = np.vectorize(math.erf, otypes=[np.float64])


def expected_log_p(mu, sigma):
    """E_q[log p(z)] for q = N(mu, sigma^2); broadcasts over arrays mu, sigma (sigma >= 0.05)."""
    mu, sigma = np.broadcast_arrays(np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64))
    abs_mean = sigma * math.sqrt(2 / math.pi) * np.exp(-0.5 * (mu / sigma) ** 2) + mu * _erf(mu / (sigma * math.sqrt(2)))
    m, s = mu.reshape(-1, 1), sigma.reshape(-1, 1)
    bump = np.empty(m.shape[0])
    for i in range(0, m.shape[0], 256):  # in chunks: 256 x 2401 doubles at a time
        dens = np.exp(-0.5 * ((_BUMP_Z - m[i:i + 256]) / s[i:i + 256]) ** 2) / (s[i:i + 256] * math.sqrt(2 * math.pi))
        bump[i:i + 256] = dens @ (_BUMP_G * _BUMP_W)
    return _C - 2.0 * (mu**2 + sigma**2 + 4.0) + 8.0 * abs_mean + bump.reshape(mu.shape)


def reverse_kl(mu, sigma):
    """KL(N(mu, sigma^2) || p) = -H(q) - E_q[log p] (broadcasts over mu, sigma)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    entropy = 0.5 * np.log(2 * math.pi * math.e * sigma**2)
    return -entropy - expected_log_p(mu, sigma)


_FINE_Z = np.linspace(-10.0, 10.0, 200001)
_LOG_P_FINE = log_p(_FINE_Z)
_P_FINE = np.exp(_LOG_P_FINE)
_DZ = _FINE_Z[1] - _FINE_Z[0]


def forward_kl(mu, sigma):
    """KL(p || N(mu, sigma^2)) by the trapezoid rule on a fine grid (step 1e-4)."""
    log_q = -0.5 * math.log(2 * math.pi * sigma**2) - 0.5 * ((_FINE_Z - mu) / sigma) ** 2
    return float(np.sum(_P_FINE * (_LOG_P_FINE - log_q)) * _DZ)


def grid_minimum(f, mu_range, sigma_range, rounds=6, n=41):
    """Minimise f(mu, sigma) by repeatedly refining a grid around the best point."""
    (m0, m1), (s0, s1) = mu_range, sigma_range
    for _ in range(rounds):
        mus, sigmas = np.linspace(m0, m1, n), np.linspace(s0, s1, n)
        M, S = np.meshgrid(mus, sigmas, indexing="ij")
        vals = f(M, S)
        i, j = np.unravel_index(np.argmin(vals), vals.shape)
        dm, ds = (m1 - m0) / (n - 1), (s1 - s0) / (n - 1)
        m0, m1 = mus[i] - 2 * dm, mus[i] + 2 * dm
        s0, s1 = max(sigmas[j] - 2 * ds, 1e-3), sigmas[j] + 2 * ds
    return float(mus[i]), float(sigmas[j]), float(vals[i, j])


def main(fast=False, outdir=None):
    num_steps = 3000 if fast else 10000
    n_mc = 200_000 if fast else 4_000_000
    print("target p = 0.5 N(-2, 0.5^2) + 0.5 N(2, 0.5^2); family q = N(mu, sigma^2)")

    print(f"\nreverse KL(q || p) with vg.fit (mean field = one Gaussian here, pathwise, <= {num_steps} steps)")
    fits = []
    for init, kwargs, label in (([1.0], {}, "init = +1 (MAP start)"), ([-1.0], {}, "init = -1 (MAP start)"),
                                ([0.0], {"map_init": False, "num_samples": 32}, "init = 0, map_init=False")):
        res = vg.fit(log_joint, np.array(init), num_steps=num_steps, rng=0, **kwargs)
        loc, scale = float(res.q.loc[0]), float(res.q.scale[0])
        kl_q = float(reverse_kl(loc, scale))
        fits.append({"init": init[0], "label": label, "mean": loc, "sd": scale, "kl": kl_q,
                     "converged": bool(res.diagnostics["converged"]), "steps": int(res.diagnostics["num_steps"]),
                     "psis_khat": float(res.diagnostics["psis_khat"])})
        print(f"  {label:<26} q = N({loc:+.4f}, {scale:.4f}^2)  KL(q||p) = {kl_q:.4f}  "
              f"converged {res.diagnostics['converged']} after {res.diagnostics['num_steps']} steps, "
              f"PSIS k-hat {res.diagnostics['psis_khat']:.2f}")
    mode = grid_minimum(reverse_kl, (1.0, 3.0), (0.2, 1.0))
    centre = grid_minimum(reverse_kl, (0.0, 0.0), (0.5, 3.0))  # mu = 0 held fixed (a degenerate grid)
    curv = float((reverse_kl(1e-3, centre[1]) - 2 * reverse_kl(0.0, centre[1]) + reverse_kl(-1e-3, centre[1])) / 1e-6)
    print(f"  quadrature + grid search: the optima N(+-{mode[0]:.4f}, {mode[1]:.4f}^2) with KL {mode[2]:.5f} "
          f"(log 2 = {math.log(2):.5f});")
    print(f"  the centre optimum N(0, {centre[1]:.4f}^2) with KL {centre[2]:.4f} "
          f"(d^2 KL / d mu^2 = {curv:.2f} > 0 there: a local minimum, not a saddle)")

    mean_exact = float(np.sum(WEIGHTS * MEANS))
    var_exact = float(np.sum(WEIGHTS * (SD**2 + MEANS**2)) - mean_exact**2)
    rng = np.random.default_rng(5)
    comp = rng.random(n_mc) < WEIGHTS[1]
    x = np.where(comp, MEANS[1], MEANS[0]) + SD * rng.standard_normal(n_mc)
    mc_mean, mc_sd = float(x.mean()), float(x.std(ddof=1))
    mc_mean_se = mc_sd / math.sqrt(n_mc)
    sd_exact = math.sqrt(var_exact)
    kl_fwd = forward_kl(mean_exact, sd_exact)
    # moment matching is the minimiser: nearby (mu, sigma) give a larger forward KL
    nearby = min(forward_kl(mean_exact + dm, sd_exact * ds) for dm in (-0.1, 0.0, 0.1) for ds in (0.95, 1.0, 1.05)
                 if (dm, ds) != (0.0, 1.0))
    print("\nforward KL(p || q): moment matching")
    print(f"  exact      mean {mean_exact:+.4f}  sd {sd_exact:.4f} (= sqrt(4.25))")
    print(f"  MC ({n_mc} draws of p)  mean {mc_mean:+.4f} +- {mc_mean_se:.4f}  sd {mc_sd:.4f}")
    print(f"  KL(p || q_fwd) = {kl_fwd:.4f}; the smallest over 8 perturbed (mu, sigma) around it: {nearby:.4f}")
    rev = fits[0]
    print(f"  cross-check: KL(p || q_rev) = {forward_kl(rev['mean'], rev['sd']):.1f} (the reverse fit misses a mode"
          f" entirely), KL(q_fwd || p) = {float(reverse_kl(mean_exact, sd_exact)):.4f}")

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        xs = np.linspace(-6, 6, 800)
        axes[0].plot(xs, np.exp(log_p(xs)), "k", lw=2, label="p")

        def npdf(x_, m, s):
            return np.exp(-0.5 * ((x_ - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

        for f, c in zip(fits, ("C0", "C2", "C4")):
            axes[0].plot(xs, npdf(xs, f["mean"], f["sd"]), c, label=f"reverse KL, {f['label']}")
        axes[0].plot(xs, npdf(xs, mean_exact, sd_exact), "C3--", label="forward KL (moment matching)")
        axes[0].set_title("fits")
        axes[0].legend(fontsize=7)
        M, S = np.meshgrid(np.linspace(-3.5, 3.5, 141), np.linspace(0.2, 3.0, 113), indexing="ij")
        K = reverse_kl(M, S)
        cs = axes[1].contour(M, S, K, levels=[0.7, 0.8, 1.0, 1.3, 1.6, 1.88, 1.95, 2.2, 2.5, 3.0, 4.0, 6.0], linewidths=0.8)
        axes[1].clabel(cs, fontsize=6)
        axes[1].plot([mode[0], -mode[0], 0.0], [mode[1], mode[1], centre[1]], "k*", ms=9,
                     label="optima (grid search)")
        axes[1].plot([f["mean"] for f in fits], [f["sd"] for f in fits], "ro", mfc="none", label="vg.fit")
        axes[1].set_xlabel("mu")
        axes[1].set_ylabel("sigma")
        axes[1].set_title("reverse KL(q || p) landscape")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    return {"reverse_fits": fits,
            "reverse_optimum": {"mean": mode[0], "sd": mode[1], "kl": mode[2]},
            "centre_optimum": {"mean": 0.0, "sd": centre[1], "kl": centre[2], "mu_curvature": curv},
            "forward": {"mean": mean_exact, "sd": sd_exact, "mc_mean": mc_mean, "mc_mean_se": mc_mean_se,
                        "mc_sd": mc_sd, "kl": kl_fwd, "kl_nearby_min": nearby},
            "png": png}


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
