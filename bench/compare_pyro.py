"""Time to the same -ELBO: ``vg.fit`` vs Pyro's AutoMultivariateNormal / AutoLowRankMultivariateNormal.

Two posteriordb posteriors, kidiq-kidscore_momiq (d = 3) and sblrc-blr (d = 6), each fitted
with a full-rank Gaussian (``vg.fit(family="fullrank")`` vs AutoMultivariateNormal) and a
low-rank + diagonal one of the same rank (``family="lowrank"`` vs AutoLowRankMultivariateNormal).

    python bench/compare_pyro.py [--quick] [--repeats 3] [--pyro-lr LR] [--seed 0]

Protocol
--------
* One target density.  vigrad gets the NumPy log density of ``tests/posteriordb_models.py``
  (unconstrained parameters, log-Jacobian included, constants dropped); Pyro gets a torch port of
  it (:func:`torch_log_density`) under a flat improper prior on the unconstrained vector
  (``ImproperUniform`` + ``pyro.factor``).  At start-up the port must equal the NumPy density
  to rtol 1e-10 (float64) at random points, or the script stops.
* One judge.  Every fitted q is scored by :class:`NegElbo`: -ELBO = -H(q) - E_q[log p] with
  H(q) exact and E_q[log p] over 20000 draws z = loc + L eps, the same eps for every q (common
  random numbers, so two fits are compared on identical noise), log p the NumPy density.
* Each method's own settings: 8 samples per step for both (vg.fit's default; Pyro
  ``Trace_ELBO(num_particles=8, vectorize_particles=True)``), float64, 2 threads, both
  started at z = 0.  vg.fit with its defaults (MAP start by L-BFGS, Laplace whitening, Adam
  lr 0.05, its convergence monitor, the iterate average over the final window).  Pyro: ``pyro.optim.Adam`` at a fixed lr
  per model (:data:`PYRO_LR`: the best final -ELBO of the full-rank guide among 0.003 to 0.3
  tried; ``--pyro-lr`` overrides) for :data:`PYRO_STEPS` steps, the guide's default
  ``init_scale``; its final q is the last iterate.
* Target: the worse of the two final -ELBOs (medians over the repeats) plus
  :data:`TOLERANCE` nats.  Time to target:
  - Pyro: the SVI run is scored every 1/40 of its budget; the time to target is the SVI time
    (``svi.step`` calls only, scoring excluded) up to the first checkpoint at or below the target;
    its log-joint calls are its steps (each evaluates the 8 particles in one batch).
  - vigrad: ``vg.fit`` is timed whole (MAP search, fit, PSIS k-hat), once to its own
    convergence and once for each ``num_steps`` in :data:`VG_SWEEP` below that; the time to
    target is the time of the shortest of these fits that reaches the target, and its calls of
    the log joint (``diagnostics.log_joint_calls``: MAP search, curvature, steps, PSIS draws).  A second vigrad
    row, ``map_init=False``, runs the same way in the raw coordinates, as Pyro does (no MAP
    start, no Laplace whitening): it separates the starting strategy from the speed per step.
* Every timing is the median over ``--repeats`` runs with the same seed (same trajectory, only
  the clock differs).  The table also gives each q's largest error against posteriordb's
  reference posterior: |mean - ref mean| / ref sd and |sd / ref sd - 1|, over the coordinates.

Without torch or pyro-ppl the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# NumPy's OpenBLAS threads spin for ~0.1 s after a product: the judge's products (20000 draws),
# left threaded, slowed the torch step timed after them from 1.2 to 2.5 ms.  Set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import vigrad as vg  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from posteriordb_models import get_model  # noqa: E402

try:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, init_to_value
except ImportError as exc:
    MISSING = exc.name
else:
    MISSING = None

# model -> low-rank rank (about d / 3)
RANKS = {"kidiq-kidscore_momiq": 1, "sblrc-blr": 2}
# Pyro's Adam step size and SVI steps per model.  In the raw coordinates Adam needs ~13000 steps
# on both: kidiq's intercept and slope have sds 6 and 0.06 and correlation -0.99; sblrc's betas
# have sds 0.001 (hence a small lr), and log sigma, pushed up while they are far off, comes back slowly.
PYRO_LR = {"kidiq-kidscore_momiq": 0.1, "sblrc-blr": 0.01}
PYRO_STEPS = {"kidiq-kidscore_momiq": 16000, "sblrc-blr": 16000}
VG_SWEEP = (25, 50, 100, 200, 400, 800, 1600, 3200)
NUM_PARTICLES = 8
EVAL_SAMPLES = 20000
CHECKPOINTS = 40
TOLERANCE = 0.05
PORT_RTOL = 1e-10
QUICK = {"pyro_steps": 400, "vg_sweep": (25, 100), "eval_samples": 2000}


# -- the target density in torch ----------------------------------------------------------------

def torch_log_density(model):
    """The torch port of ``model.log_joint``'s values: z (..., d) -> (...).

    Both models are ``_linear_regression`` in tests/posteriordb_models.py, z = (beta, log sigma):
    -N u - ||y - X beta||^2 / (2 sigma^2), a N(0, s) prior on beta (sblrc, s = 10), and for sigma
    HalfCauchy(0, 2.5) (kidiq) or HalfNormal(0, 10) (sblrc) plus the log-Jacobian u."""
    data = model.entry["data"]
    if model.name == "kidiq-kidscore_momiq":
        X = np.column_stack([np.ones(data["N"]), data["mom_iq"]])
        y, beta_sd, sigma_prior = data["kid_score"], None, ("halfcauchy", 2.5)
    elif model.name == "sblrc-blr":
        X = np.asarray(data["X"], float).reshape(data["N"], data["D"])
        y, beta_sd, sigma_prior = data["y"], 10.0, ("halfnormal", 10.0)
    else:
        raise ValueError(f"no torch port of {model.name!r}")
    X = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.float64)
    n, p = X.shape
    kind, s = sigma_prior
    log_s = float(np.log(s))

    def log_density(z):
        beta, u = z[..., :p], z[..., p]
        resid = y - beta @ X.T
        lp = -n * u - 0.5 * (resid * resid).sum(-1) * torch.exp(-2.0 * u)
        if beta_sd is not None:
            lp = lp - 0.5 * (beta * beta).sum(-1) / beta_sd ** 2
        if kind == "halfcauchy":  # -log1p((sigma / s)^2), as the NumPy logaddexp form
            lp = lp - torch.logaddexp(torch.zeros_like(u), 2.0 * (u - log_s))
        else:
            lp = lp - 0.5 * torch.exp(2.0 * u) / s ** 2
        return lp + u

    return log_density


def check_port(model, log_density, rng):
    """Raise unless the torch port equals the NumPy density at random points (rtol PORT_RTOL)."""
    z = model.ref_mean + 3.0 * model.ref_sd * rng.standard_normal((16, model.dim))
    want = model.log_joint(z)[0]
    got = log_density(torch.tensor(z)).numpy()
    err = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))
    if not err <= PORT_RTOL:
        raise AssertionError(f"{model.name}: the torch log density differs from the NumPy one by {err:.3g} "
                             f"(relative), more than {PORT_RTOL}")
    return err


# -- the common judge -----------------------------------------------------------------------------

class NegElbo:
    """-ELBO of a Gaussian q = N(loc, cov) under ``model``: -H(q) - mean log p(loc + L eps_i).

    The eps_i (num_samples, d) are drawn once, so every q is scored on the same noise."""

    def __init__(self, model, num_samples, seed):
        self.model = model
        self.eps = np.random.default_rng(seed).standard_normal((num_samples, model.dim))

    def __call__(self, loc, cov):
        L = np.linalg.cholesky(cov)
        d = loc.size
        entropy = float(np.sum(np.log(np.diag(L)))) + 0.5 * d * (1.0 + np.log(2.0 * np.pi))
        log_p = self.model.log_joint(loc + self.eps @ L.T)[0]
        return -entropy - float(np.mean(log_p))


def reference_errors(model, loc, cov):
    """(max |mean - ref mean| / ref sd, max |sd / ref sd - 1|) over the coordinates."""
    sd = np.sqrt(np.diag(cov))
    return (float(np.max(np.abs(loc - model.ref_mean) / model.ref_sd)),
            float(np.max(np.abs(sd / model.ref_sd - 1.0))))


# -- the two methods ------------------------------------------------------------------------------

def run_vigrad(model, family, rank, num_steps, seed, map_init=True):
    """One timed ``vg.fit`` from z = 0: (wall seconds, steps done, log-joint calls, loc, cov)."""
    t0 = time.perf_counter()
    res = vg.fit(model.log_joint, np.zeros(model.dim), family=family, rank=rank,
                 num_steps=num_steps, rng=seed, map_init=map_init)
    wall = time.perf_counter() - t0
    d = res.diagnostics
    return wall, d.steps, d.log_joint_calls, np.array(res.q.loc), np.array(res.q.cov)


def vigrad_runs(model, family, rank, sweep, judge, seed, map_init=True):
    """vg.fit to its own convergence, then with each num_steps in ``sweep`` below that.

    Returns a list of (steps, wall, -ELBO, loc, cov, calls), the shortest fit first, the full one
    last."""
    wall, steps, calls, loc, cov = run_vigrad(model, family, rank, 10000, seed, map_init)
    full = (steps, wall, judge(loc, cov), loc, cov, calls)
    runs = []
    for n in (k for k in sweep if k < steps):
        w, s, k_, l_, c = run_vigrad(model, family, rank, n, seed, map_init)
        runs.append((s, w, judge(l_, c), l_, c, k_))
    return runs + [full]


def pyro_run(model, log_density, family, rank, steps, lr, judge, seed):
    """SVI from z = 0 for ``steps`` steps, scored every steps / CHECKPOINTS steps.

    Returns a list of checkpoints (steps, SVI seconds so far, -ELBO, loc, cov, log-joint calls);
    the last one is the final q."""
    d = model.dim

    def pyro_model():
        theta = pyro.sample("theta", dist.ImproperUniform(dist.constraints.real, (), (d,)))
        pyro.factor("log_density", log_density(theta))

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    init = init_to_value(values={"theta": torch.zeros(d)})
    if family == "fullrank":
        guide = AutoMultivariateNormal(pyro_model, init_loc_fn=init)
    else:
        guide = AutoLowRankMultivariateNormal(pyro_model, init_loc_fn=init, rank=rank)
    elbo = Trace_ELBO(num_particles=NUM_PARTICLES, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(pyro_model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    every = max(1, steps // CHECKPOINTS)
    elapsed = 0.0
    checkpoints = []
    for start in range(0, steps, every):
        t0 = time.perf_counter()
        for _ in range(min(every, steps - start)):
            svi.step()
        elapsed += time.perf_counter() - t0
        with torch.no_grad():
            posterior = guide.get_posterior()
            loc = posterior.loc.numpy().copy()
            cov = posterior.covariance_matrix.numpy().copy()
        done = min(start + every, steps)
        checkpoints.append((done, elapsed, judge(loc, cov), loc, cov, done))
    return checkpoints


# -- the comparison -------------------------------------------------------------------------------

def first_reaching(runs, target):
    """(steps, seconds, log-joint calls) of the first run / checkpoint whose -ELBO is at or below
    target, or (None, None, None) when none does."""
    return next(((steps, wall, calls) for steps, wall, value, _, _, calls in runs if value <= target),
                (None, None, None))


def compare(model, family, args, settings):
    """Rows of the table for one model and family (vigrad, then Pyro)."""
    rank = RANKS[model.name] if family == "lowrank" else None
    judge = NegElbo(model, settings["eval_samples"], args.seed)
    log_density = torch_log_density(model)
    vg_repeats = [vigrad_runs(model, family, rank, settings["vg_sweep"], judge, args.seed)
                  for _ in range(args.repeats)]
    # vg.fit in the raw coordinates, as Pyro runs (no MAP start, no Laplace whitening)
    vg_raw_repeats = [vigrad_runs(model, family, rank, settings["vg_sweep"], judge, args.seed, map_init=False)
                      for _ in range(args.repeats)]
    lr = args.pyro_lr or PYRO_LR[model.name]
    pyro_repeats = [pyro_run(model, log_density, family, rank, settings["steps"][model.name],
                             lr, judge, args.seed)
                    for _ in range(args.repeats)]
    final_vg = statistics.median(r[-1][2] for r in vg_repeats)
    final_pyro = statistics.median(r[-1][2] for r in pyro_repeats)
    target = max(final_vg, final_pyro) + TOLERANCE
    rows = []
    final_raw = statistics.median(r[-1][2] for r in vg_raw_repeats)
    for method, repeats, final in (("vigrad", vg_repeats, final_vg),
                                   ("vigrad, map_init=False", vg_raw_repeats, final_raw),
                                   ("pyro", pyro_repeats, final_pyro)):
        rows.append(table_row(model, family, rank, f"pyro lr {lr}" if method == "pyro" else method, repeats,
                              final, target))
    return rows


def table_row(model, family, rank, method, repeats, final, target):
    """One row of the table from ``repeats`` (each a list of runs / checkpoints, the final last)."""
    steps, _, _, loc, cov, calls = repeats[0][-1]
    reached = [first_reaching(r, target) for r in repeats]
    return {
        "model": model.name.split("-")[0], "family": family + (f"({rank})" if rank else ""),
        "method": method, "steps": steps, "calls": calls,
        "wall": statistics.median(r[-1][1] for r in repeats),
        "neg_elbo": final, "ref_err": reference_errors(model, loc, cov), "target": target,
        "steps_to_target": reached[0][0], "calls_to_target": reached[0][2],
        "time_to_target": (statistics.median(t for _, t, _ in reached)
                           if all(t is not None for _, t, _ in reached) else None),
    }


def print_table(rows):
    head = ("model", "family", "method", "steps", "calls", "wall s", "-ELBO", "mean err", "sd err",
            "target", "steps@tgt", "calls@tgt", "s to tgt")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|")
    for r in rows:
        cells = (r["model"], r["family"], r["method"], str(r["steps"]), str(r["calls"]), f"{r['wall']:.3f}",
                 f"{r['neg_elbo']:.3f}", f"{r['ref_err'][0]:.3f}", f"{r['ref_err'][1]:.3f}",
                 f"{r['target']:.3f}", str(r["steps_to_target"] or "not reached"),
                 str(r["calls_to_target"] or "-"),
                 "-" if r["time_to_target"] is None else f"{r['time_to_target']:.3f}")
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, a small judge, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timings are the median of this many runs")
    ap.add_argument("--pyro-lr", type=float, help="pyro.optim.Adam's step size (default: PYRO_LR)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if MISSING is not None:
        print(f"compare_pyro: needs torch and pyro-ppl (pip install pyro-ppl); {MISSING} is not installed, "
              "nothing to compare.")
        return 0
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    settings = settings_for(args)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    models = [get_model(name) for name in RANKS]
    rng = np.random.default_rng(args.seed)
    port_errs = [check_port(m, torch_log_density(m), rng) for m in models]
    print(f"vigrad {vg.__version__}, pyro {pyro.__version__}, torch {torch.__version__}; float64, "
          f"2 threads; {NUM_PARTICLES} samples per step; Pyro Adam, "
          f"{'quick: ' if args.quick else ''}steps {settings['steps']}; judge: "
          f"{settings['eval_samples']} draws; target = worse final -ELBO + {TOLERANCE}; "
          f"median of {args.repeats}; torch port max rel. error {max(port_errs):.1e}")
    run_all(models, compare, args, settings)
    return 0


def settings_for(args):
    """The step budgets, vg.fit sweep and judge size of a full or ``--quick`` run."""
    if args.quick:
        args.repeats = 1
        return {"steps": dict.fromkeys(PYRO_STEPS, QUICK["pyro_steps"]), "vg_sweep": QUICK["vg_sweep"],
                "eval_samples": QUICK["eval_samples"]}
    return {"steps": PYRO_STEPS, "vg_sweep": VG_SWEEP, "eval_samples": EVAL_SAMPLES}


def run_all(models, compare, args, settings):
    """Every model and family through ``compare``, then the table."""
    rows = []
    t0 = time.perf_counter()
    for model in models:
        for family in ("fullrank", "lowrank"):
            rows += compare(model, family, args, settings)
    print_table(rows)
    print(f"({time.perf_counter() - t0:.0f} s in all)")

if __name__ == "__main__":
    sys.exit(main())
