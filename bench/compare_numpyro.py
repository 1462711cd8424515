"""Time and log-joint calls to the same -ELBO: ``vg.fit`` vs NumPyro's AutoMultivariateNormal /
AutoLowRankMultivariateNormal, NumPyro's SVI step compiled by JAX.

    python bench/compare_numpyro.py [--quick] [--repeats 3] [--seed 0]

The protocol of compare_pyro.py (whose judge, targets and table this script shares): kidiq
(d = 3) and sblrc (d = 6), a full-rank and a low-rank guide, 8 samples per step, float64,
everything started at z = 0; every q scored by the same judge (exact entropy + 20000 common
draws of the NumPy log density); target = the worse final -ELBO + 0.05 nats.  NumPyro gets a JAX
port of the log density (checked against the NumPy one at start-up, rtol 1e-10) under a flat
improper prior, ``Trace_ELBO(num_particles=8, vectorize_particles=True)`` and
``numpyro.optim.Adam`` at compare_pyro's per-model step size, for 16000 steps run in 40
compiled chunks (``jax.lax.fori_loop`` over ``svi.update`` under ``jax.jit``), scored between
chunks; the compile time is reported apart and left out of the time to target.  Its log-joint
calls are its steps (each evaluates the 8 particles in one vectorised batch); vigrad's are
``diagnostics.log_joint_calls`` (MAP search, curvature, steps, PSIS draws).

Without numpyro and jax the script says so and exits with status 0 (``pip install numpyro``;
they are not vigrad dependencies).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see compare_pyro.py

import numpy as np  # noqa: E402

import vigrad as vg  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pyro import (CHECKPOINTS, NUM_PARTICLES, PORT_RTOL, PYRO_LR, RANKS, TOLERANCE, NegElbo,  # noqa: E402
                          get_model, run_all, settings_for, table_row, vigrad_runs)

try:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal
    from numpyro.infer.initialization import init_to_value
except ImportError as exc:
    MISSING = exc.name
else:
    MISSING = None
    jax.config.update("jax_enable_x64", True)


def jax_log_density(model):
    """The JAX port of ``model.log_joint``'s values (as compare_pyro.torch_log_density)."""
    data = model.entry["data"]
    if model.name == "kidiq-kidscore_momiq":
        X = np.column_stack([np.ones(data["N"]), data["mom_iq"]])
        y, beta_sd, (kind, s) = data["kid_score"], None, ("halfcauchy", 2.5)
    elif model.name == "sblrc-blr":
        X = np.asarray(data["X"], float).reshape(data["N"], data["D"])
        y, beta_sd, (kind, s) = data["y"], 10.0, ("halfnormal", 10.0)
    else:
        raise ValueError(f"no JAX port of {model.name!r}")
    X, y = jnp.asarray(X), jnp.asarray(y)
    n, p = X.shape
    log_s = float(np.log(s))

    def log_density(z):
        beta, u = z[..., :p], z[..., p]
        resid = y - beta @ X.T
        lp = -n * u - 0.5 * (resid * resid).sum(-1) * jnp.exp(-2.0 * u)
        if beta_sd is not None:
            lp = lp - 0.5 * (beta * beta).sum(-1) / beta_sd ** 2
        if kind == "halfcauchy":
            lp = lp - jnp.logaddexp(jnp.zeros_like(u), 2.0 * (u - log_s))
        else:
            lp = lp - 0.5 * jnp.exp(2.0 * u) / s ** 2
        return lp + u

    return log_density


def check_port(model, log_density, rng):
    z = model.ref_mean + 3.0 * model.ref_sd * rng.standard_normal((16, model.dim))
    want = model.log_joint(z)[0]
    got = np.asarray(log_density(jnp.asarray(z)))
    err = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))
    if not err <= PORT_RTOL:
        raise AssertionError(f"{model.name}: the JAX log density differs from the NumPy one by {err:.3g}")
    return err


def numpyro_run(model, log_density, family, rank, steps, lr, judge, seed):
    """SVI from z = 0 for ``steps`` steps in CHECKPOINTS compiled chunks, scored between them.

    Returns (checkpoints, compile seconds); a checkpoint is (steps, SVI seconds so far, -ELBO, loc,
    cov, log-joint calls)."""
    d = model.dim

    def npy_model():
        theta = numpyro.sample("theta", ndist.ImproperUniform(ndist.constraints.real_vector, (), (d,)))
        numpyro.factor("log_density", log_density(theta))

    init = init_to_value(values={"theta": jnp.zeros(d)})
    if family == "fullrank":
        guide = AutoMultivariateNormal(npy_model, init_loc_fn=init)
    else:
        guide = AutoLowRankMultivariateNormal(npy_model, init_loc_fn=init, rank=rank)
    elbo = Trace_ELBO(num_particles=NUM_PARTICLES, vectorize_particles=True)
    svi = SVI(npy_model, guide, numpyro.optim.Adam(lr), elbo)
    every = max(1, steps // CHECKPOINTS)

    @jax.jit
    def chunk(state):
        return jax.lax.fori_loop(0, every, lambda i, s: svi.update(s)[0], state)

    state = svi.init(jax.random.PRNGKey(seed))
    t0 = time.perf_counter()
    jax.block_until_ready(chunk.lower(state).compile())
    compile_s = time.perf_counter() - t0
    elapsed, checkpoints = 0.0, []
    for done in range(every, every * (steps // every) + 1, every):
        t0 = time.perf_counter()
        state = jax.block_until_ready(chunk(state))
        elapsed += time.perf_counter() - t0
        posterior = guide.get_posterior(svi.get_params(state))
        loc = np.asarray(posterior.loc, dtype=np.float64)
        cov = np.asarray(posterior.covariance_matrix, dtype=np.float64)
        checkpoints.append((done, elapsed, judge(loc, cov), loc, cov, done))
    return checkpoints, compile_s


def compare(model, family, args, settings):
    rank = RANKS[model.name] if family == "lowrank" else None
    judge = NegElbo(model, settings["eval_samples"], args.seed)
    log_density = jax_log_density(model)
    vg_repeats = [vigrad_runs(model, family, rank, settings["vg_sweep"], judge, args.seed)
                  for _ in range(args.repeats)]
    lr = PYRO_LR[model.name]
    runs = [numpyro_run(model, log_density, family, rank, settings["steps"][model.name], lr, judge, args.seed)
            for _ in range(args.repeats)]
    npy_repeats = [r for r, _ in runs]
    compile_s = statistics.median(c for _, c in runs)
    final_vg = statistics.median(r[-1][2] for r in vg_repeats)
    final_npy = statistics.median(r[-1][2] for r in npy_repeats)
    target = max(final_vg, final_npy) + TOLERANCE
    return [table_row(model, family, rank, "vigrad", vg_repeats, final_vg, target),
            table_row(model, family, rank, f"numpyro lr {lr} (compile {compile_s:.1f} s)", npy_repeats,
                      final_npy, target)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, a small judge, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timings are the median of this many runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if MISSING is not None:
        print(f"compare_numpyro: needs numpyro and jax (pip install numpyro); {MISSING} is not installed, "
              "nothing to compare.")
        return 0
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    settings = settings_for(args)
    models = [get_model(name) for name in RANKS]
    rng = np.random.default_rng(args.seed)
    port_errs = [check_port(m, jax_log_density(m), rng) for m in models]
    print(f"vigrad {vg.__version__}, numpyro {numpyro.__version__}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}); float64; {NUM_PARTICLES} samples per step; NumPyro Adam, "
          f"{'quick: ' if args.quick else ''}steps {settings['steps']}; judge: {settings['eval_samples']} "
          f"draws; target = worse final -ELBO + {TOLERANCE}; median of {args.repeats}; "
          f"JAX port max rel. error {max(port_errs):.1e}")
    run_all(models, compare, args, settings)
    return 0

if __name__ == "__main__":
    sys.exit(main())
