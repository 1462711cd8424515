"""Threads (issue 15, item 13), measured with the variants interleaved: vigrad.torch layers.

test_bench_threads.py times each variant (``workers`` = None / 1 / max) in its own pytest-benchmark
group, one after the other, 5 rounds of 10 steps each.  With one other busy process on a 2-core
machine the OS's scheduling of that process drifts over seconds, so variants timed at different
moments see different machines (the same variant's median moved 19-48 ms between runs).  This
script builds the three models once and alternates them round by round (forward order, then
reverse), so that every variant sees the same drift; it reports the median ms per step.

    python bench/threads_interleaved.py                 # torch threads 1 and 2, idle and busy, 20 rounds
    python bench/threads_interleaved.py --rounds 40 --torch-threads 2 --load busy

"busy": one extra process spinning a core while the rounds run.  Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vigrad as vg  # noqa: E402
from test_bench_threads import STEPS, TORCH_SIZES, _data, _torch_model, _torch_steps  # noqa: E402


def measure(torch, torch_threads, load, rounds):
    torch.set_num_threads(torch_threads)
    X, y = (torch.from_numpy(a) for a in _data(TORCH_SIZES[0], TORCH_SIZES[-1], STEPS))
    variants = {"default": None, "one": 1, "max": vg.max_workers}
    models = {}
    for name, workers in variants.items():
        model = _torch_model(torch, workers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):  # warm-up; the default's choice settles in ~10 steps
            _torch_steps(torch, model, opt, X, y)
        models[name] = (model, opt)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
    times = {name: [] for name in variants}
    try:
        time.sleep(0.5)
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                model, opt = models[name]
                t0 = time.perf_counter()
                _torch_steps(torch, model, opt, X, y)
                times[name].append((time.perf_counter() - t0) / STEPS * 1e3)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return {name: float(np.median(v)) for name, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--load", nargs="+", choices=["idle", "busy"], default=["busy", "idle"])
    args = ap.parse_args(argv)
    import torch

    print(f"{'group (median ms per step)':<34} {'default':>8} {'one':>8} {'max':>8}  default/best")
    for tt in args.torch_threads:
        for load in args.load:
            med = measure(torch, tt, load, args.rounds)
            ratio = med["default"] / min(med.values())
            flag = " !" if ratio > 1.3 else ""
            print(f"{f'torch-784-400-400-10-t{tt}-{load}':<34} {med['default']:8.2f} {med['one']:8.2f} "
                  f"{med['max']:8.2f}  {ratio:.2f}x{flag}", flush=True)


if __name__ == "__main__":
    main()
