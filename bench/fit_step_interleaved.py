"""vg.fit per step against its parts (issue 13, item 5), measured with the two sides interleaved.

test_bench_fit.py times each side in its own pytest-benchmark group, 3 rounds one after the other.
Between the groups the process's heap and the machine change (the Gaussian log joint alone took
87 ms in one run and 279-299 ms in the next two), so the two sides of one ratio see different
conditions.  This script alternates them round by round (vg.fit then parts, then the reverse) in
one process, each round 50 steps as in test_bench_fit.py, and reports per log joint the median
ms per step of each side and the median and quartiles of the per-round ratio vg.fit / parts.

    python bench/fit_step_interleaved.py                    # both log joints, 15 rounds
    python bench/fit_step_interleaved.py --rounds 30 --log-joint gaussian

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
from test_bench_fit import D, LOG_JOINTS, S, STEPS, _parts, _vi  # noqa: E402


def measure(name, rounds):
    log_joint = LOG_JOINTS[name]
    vi = _vi(log_joint)
    state = vi.init(np.zeros(D), rng=0)
    _, info = vi.step(state)  # the parts give the fit's first gradient to the bit (as test_bench_fit)
    for a, b in zip(_parts(vi, state, 1), info.grads):
        np.testing.assert_array_equal(a, b)

    def fit():
        res = vg.fit(log_joint, np.zeros(D), rng=0, num_steps=STEPS, map_init=False, psis_samples=0,
                     num_samples=S)
        assert res.diagnostics.steps == STEPS

    sides = {"vg.fit": fit, "parts": lambda: _parts(vi, state, STEPS)}
    for run in sides.values():  # warm-up
        run()
    times = {side: [] for side in sides}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            sides[side]()
            times[side].append((time.perf_counter() - t0) / STEPS * 1e3)
    ratio = np.array(times["vg.fit"]) / np.array(times["parts"])
    return {side: float(np.median(v)) for side, v in times.items()}, np.percentile(ratio, [25, 50, 75])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--log-joint", choices=list(LOG_JOINTS), action="append")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2, got {args.rounds}")
    print(f"d = {D}, S = {S}, {STEPS} steps a round, {args.rounds} rounds, workers = {vg.max_workers}")
    print(f"{'log joint':<22}{'vg.fit ms/step':>15}{'parts ms/step':>15}{'ratio q25':>11}{'median':>9}{'q75':>8}")
    for name in args.log_joint or list(LOG_JOINTS):
        med, (q25, q50, q75) = measure(name, args.rounds)
        print(f"{name:<22}{med['vg.fit']:>15.2f}{med['parts']:>15.2f}{q25:>11.3f}{q50:>9.3f}{q75:>8.3f}",
              flush=True)


if __name__ == "__main__":
    main()
