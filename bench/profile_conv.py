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


#: Operator -> part of the step, for the per-part table (self CPU time of each operator).
PARTS = {
    "aten::mkldnn_convolution": "conv forward",
    "aten::convolution_backward": "conv backward (input + weight)",
    "aten::max_pool2d_with_indices": "max-pool fwd + bwd",
    "aten::max_pool2d_with_indices_backward": "max-pool fwd + bwd",
    "aten::clamp_min": "ReLU fwd + bwd",
    "aten::threshold_backward": "ReLU fwd + bwd",
    "aten::mm": "linear products (mm, addmm)",
    "aten::addmm": "linear products (mm, addmm)",
    "_LinearFn": "vigrad layer functions (core calls + Python)",
    "_LinearFnBackward": "vigrad layer functions (core calls + Python)",
    "_Conv2dFn": "vigrad layer functions (core calls + Python)",
    "_Conv2dFnBackward": "vigrad layer functions (core calls + Python)",
}


def parts(prof, n):
    """Self CPU ms per step by part: the operator's own part, else the optimizer's when it runs
    under Optimizer.step / zero_grad, else "other ops" (plain PyTorch's Bayesian arithmetic, glue)."""
    out = {}
    for e in prof.events():
        part = PARTS.get(e.name)
        if part is None:
            a = e
            while a is not None and not a.name.startswith("Optimizer."):
                a = a.cpu_parent
            part = "optimizer (Adam step, zero_grad)" if a is not None else "other ops"
        out[part] = out.get(part, 0.0) + e.self_cpu_time_total / n / 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--impl", action="append",
                    help="default: the deterministic network, plain PyTorch, vigrad reparam and Flipout")
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
    if args.no_profiler:
        return
    # torch.profiler times are wall-clock: a round in which other processes took the CPU inflates
    # them.  So each implementation is profiled round by round (interleaved), and each part's figure
    # is its minimum over the rounds.
    by_part = {impl: [] for impl in impls}
    ops = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                steps[impl]()
            by_part[impl].append(parts(prof, tbc.STEPS))
            ops[impl].append({e.key: (e.self_cpu_time_total / tbc.STEPS / 1e3, e.count / tbc.STEPS)
                              for e in prof.key_averages()})
    for impl in impls:
        names = set().union(*by_part[impl])
        best = {k: min(r.get(k, 0.0) for r in by_part[impl]) for k in names}
        total = sum(best.values())
        print(f"\n== {impl}, {args.threads} thread(s): profiler self CPU by part, min over {rounds} rounds "
              f"(sum {total:.2f} ms/step; the profiler adds a few us per operator)")
        for part, ms in sorted(best.items(), key=lambda kv: -kv[1]):
            print(f"      {part:50s} {ms:7.3f} ms/step {100 * ms / total:5.1f} %")
        if args.top:
            keys = set().union(*ops[impl])
            best_ops = {k: min(r.get(k, (0.0, 0.0))[0] for r in ops[impl]) for k in keys}
            calls = {k: max(r.get(k, (0.0, 0.0))[1] for r in ops[impl]) for k in keys}
            print(f"   {'operator':58s} {'ms/step':>8s} {'calls/step':>10s}")
            for k in sorted(keys, key=lambda k: -best_ops[k])[:args.top]:
                print(f"   {k[:58]:58s} {best_ops[k]:8.3f} {calls[k]:10.1f}")

if __name__ == "__main__":
    main()
