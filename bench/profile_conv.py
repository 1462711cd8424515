"""Where the LeNet-5 Bayesian CNN step of test_bench_conv.py spends its CPU time (issue 14).

For each implementation (vigrad.torch reparam / Flipout, the plain-PyTorch network), on ``--threads``
threads (torch.set_num_threads and vigrad's ``workers``):

* the CPU time of a step (``time.process_time`` over ``--steps`` steps after a warm-up, divided by
  the number of steps): on one thread a figure that the load of other processes barely moves;
* ``torch.profiler``'s self CPU time per operator, summed over the steps (the vigrad core's calls
  appear as the autograd Functions' forward / backward records, the Python around them as the
  difference to the step's total).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python bench/profile_conv.py --threads 1
    python bench/profile_conv.py --threads 2 --impl vigrad.torch-reparam --top 25
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_bench_conv as tbc  # noqa: E402


def build(impl, workers):
    layers = tbc.build_lenet(torch, impl)
    if impl.startswith("vigrad") and workers is not None:
        for m in layers:
            m.workers = workers
            m._threads = type(m._threads)(workers, False)
    return layers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--impl", action="append", help="default: the deterministic network, plain PyTorch, vigrad reparam and Flipout")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--no-profiler", action="store_true")
    ap.add_argument("--workers", default=None,
                    help="vigrad's workers: an int, or 'auto' for the layers' default; default: --threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.random((tbc.B * tbc.STEPS, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, tbc.B * tbc.STEPS)
    impls = args.impl or ["torch-deterministic", "torch-eager-reparam", "vigrad.torch-reparam",
                          "vigrad.torch-flipout"]
    rounds = max(1, args.steps // tbc.STEPS)
    workers = args.threads if args.workers is None else None if args.workers == "auto" else int(args.workers)
    steps = {}
    for impl in impls:
        steps[impl] = tbc.make_steps(torch, impl, build(impl, workers), X, y)
        steps[impl]()  # warm up
    # CPU time per round of 10 steps, the implementations interleaved round by round so that a
    # change in the machine's load hits them alike; the minimum over rounds is the figure
    cpu = {impl: [] for impl in impls}
    wall = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[impl]()
            cpu[impl].append((time.process_time() - c0) / tbc.STEPS * 1e3)
            wall[impl].append((time.perf_counter() - t0) / tbc.STEPS * 1e3)
    print(f"ms/step on {args.threads} thread(s), min / median over {rounds} rounds of {tbc.STEPS} steps "
          f"(load {os.getloadavg()[0]:.1f}; wall-clock figures mean something only on an idle machine):")
    print(f"   {'':24s} {'CPU min':>8s} {'median':>7s} {'wall min':>9s} {'median':>7s}")
    for impl in impls:
        print(f"   {impl:24s} {min(cpu[impl]):8.2f} {np.median(cpu[impl]):7.2f} {min(wall[impl]):9.2f} "
              f"{np.median(wall[impl]):7.2f}")
    for impl in impls:
        ten = steps[impl]
        if args.no_profiler:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                ten()
        n = rounds * tbc.STEPS
        ev = prof.key_averages()
        rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ev) / n / 1e3
        print(f"   profiler: self CPU summed over operators {total:.2f} ms/step")
        print(f"   {'operator':58s} {'ms/step':>8s} {'calls/step':>10s}")
        for e in rows[:args.top]:
            print(f"   {e.key[:58]:58s} {e.self_cpu_time_total / n / 1e3:8.3f} {e.count / n:10.1f}")


if __name__ == "__main__":
    main()
