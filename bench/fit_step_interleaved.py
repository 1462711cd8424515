"""vg.fit per step against its parts (issue 13, item 5), measured with the two sides interleaved.

test_bench_fit.py times each side in its own pytest-benchmark group, 3 rounds one after the other.
Between the groups the process's heap and the machine change (the Gaussian log joint alone took
87 ms in one run and 279-299 ms in the next two), so the two sides of one ratio see different
conditions.  This script alternates them round by round (vg.fit then parts, then the reverse) in
one process, each round 50 steps as in test_bench_fit.py, and reports per log joint the median
ms per step of each side and the median and quartiles of the per-round ratio vg.fit / parts.

    python bench/fit_step_interleaved.py                    # both log joints, 15 rounds
    python bench/fit_step_interleaved.py --rounds 30 --log-joint gaussian
    python bench/fit_step_interleaved.py --decompose        # + the parts with the step's own passes
    python bench/fit_step_interleaved.py --steps 400        # rounds long enough for the monitor's checks

vg.fit and the monitor run with a tolerance they cannot reach (1e-9), so every round takes its
steps.  The default 50-step rounds never reach a convergence check (the monitor tests no window
shorter than 150 steps); with ``--steps 400`` vg.fit takes a check every 10-40 steps, as a real fit
does, and the ratio includes them.

``--decompose`` adds three sides: "parts+passes", the parts plus, as bare kernel calls, the passes
over the parameters that a step of vg.fit adds to them (the out-of-place Adam of both blocks, the
next q's softplus with its entropy, the convergence monitor's sums of both blocks), on arrays that
alternate between two generations as a functional step's do; "VI.step", a loop of the functional
step alone (as vg.fit calls it, without the gradient norm no callback reads); and
"VI.step+monitor", that loop feeding a ConvergenceMonitor.  vg.fit adds the gradient statistics
and its own bookkeeping to the last.

Run it on an otherwise idle machine, and name the CPU (lscpu) with its figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vigrad as vg  # noqa: E402
from vigrad import _core  # noqa: E402
from vigrad.vi import _moment_sums  # noqa: E402
from test_bench_fit import D, LOG_JOINTS, S, STEPS, _parts, _vi  # noqa: E402


def _parts_and_passes(vi, state, steps):
    """_parts plus the step's own passes over the parameters (see the module docstring)."""
    q = vi.q_fitted(state)
    key = int(state.key)
    x, eps = np.empty((S, D)), np.empty((S, D))
    p, m, v = [np.zeros(D), np.full(D, 0.5)], [np.zeros(D), np.zeros(D)], [np.zeros(D), np.zeros(D)]
    gens = [[np.empty(D) for _ in range(7)] for _ in range(2)]  # p, m, v of both blocks; the scales
    c, s1, s2 = ([np.zeros(D), np.zeros(D)] for _ in range(3))
    h = vi.optimizer.hyperparams  # the fit's Adam (a constant lr)
    for t in range(steps):
        q._sample_noise(S, vg.vi._step_key(key, t), vi.workers, out=(x, eps))
        _, g = vi.log_joint(x)
        grads = q._pathwise(eps, g, "mc", vi.workers)
        G = gens[t % 2]
        for b in range(2):
            _core.optim_adam(p[b], grads[b], m[b], v[b], G[b], G[2 + b], G[4 + b], t, h["lr"], h["b1"],
                             h["b2"], h["eps"], 1.0, vi.workers)
        _core.mf_scale_entropy(G[0], G[1], G[6], vi.workers)
        for b in range(2):
            _moment_sums(G[b], c[b], s1[b], s2[b], vi.workers)
        p, m, v = G[0:2], G[2:4], G[4:6]
    return grads


def _steps(log_joint, steps, monitor):
    """``steps`` functional steps from z = 0 (as vg.fit takes them), feeding a monitor or not."""
    vi = _vi(log_joint)
    state = vi.init(np.zeros(D), rng=0)
    mon = vg.vi.ConvergenceMonitor(vi, tol=1e-9) if monitor else None
    for _ in range(steps):
        state, info = vi._step(state, grad_norm=False)
        if mon is not None:
            mon.update(state, info.loss)
    return state


def measure(name, rounds, decompose=False, steps=STEPS):
    log_joint = LOG_JOINTS[name]
    vi = _vi(log_joint)
    state = vi.init(np.zeros(D), rng=0)
    _, info = vi.step(state)  # the parts give the fit's first gradient to the bit (as test_bench_fit)
    for a, b in zip(_parts(vi, state, 1), info.grads):
        np.testing.assert_array_equal(a, b)

    def fit():
        res = vg.fit(log_joint, np.zeros(D), rng=0, num_steps=steps, map_init=False, psis_samples=0,
                     num_samples=S, tol=1e-9)
        assert res.diagnostics.steps == steps

    sides = {"vg.fit": fit, "parts": lambda: _parts(vi, state, steps)}
    if decompose:
        sides["parts+passes"] = lambda: _parts_and_passes(vi, state, steps)
        sides["VI.step"] = lambda: _steps(log_joint, steps, False)
        sides["VI.step+monitor"] = lambda: _steps(log_joint, steps, True)
    for run in sides.values():  # warm-up
        run()
    times = {side: [] for side in sides}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            sides[side]()
            times[side].append((time.perf_counter() - t0) / steps * 1e3)
    parts = np.array(times["parts"])
    ratios = {side: np.percentile(np.array(v) / parts, [25, 50, 75]) for side, v in times.items() if side != "parts"}
    return {side: float(np.median(v)) for side, v in times.items()}, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--log-joint", choices=list(LOG_JOINTS), action="append")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"steps a round (default {STEPS}; from 150 on, vg.fit's rounds include convergence checks)")
    parser.add_argument("--decompose", action="store_true",
                        help="also time the parts with the step's own passes over the parameters")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2, got {args.rounds}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    print(f"d = {D}, S = {S}, {args.steps} steps a round, {args.rounds} rounds, workers = {vg.max_workers}")
    print(f"{'log joint':<22}{'side':<17}{'ms/step':>9}{'/ parts q25':>13}{'median':>9}{'q75':>8}")
    for name in args.log_joint or list(LOG_JOINTS):
        med, ratios = measure(name, args.rounds, args.decompose, args.steps)
        for side, ms in med.items():
            q = ratios.get(side)
            tail = "" if q is None else f"{q[0]:>13.3f}{q[1]:>9.3f}{q[2]:>8.3f}"
            print(f"{name:<22}{side:<17}{ms:>9.2f}{tail}", flush=True)


if __name__ == "__main__":
    main()
