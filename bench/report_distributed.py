"""The issue-12 table of bench/README.md from pytest-benchmark JSON files of
bench/test_bench_distributed.py:

    python -m pytest bench/test_bench_distributed.py --benchmark-only --benchmark-json=dist.json
    python bench/report_distributed.py dist.json [more runs ...]

Per (group, impl): the median over the runs of each run's median time per step, the examples/s it
gives, and the largest foreign load seen (``foreign_cpu``, conftest.py: above ~0.1 the figures are
disturbed).  Then the per-step overhead of the round trip: dask-1 minus one-process (what a user
sees, the unfused Adam step included), and the bare round trip (dask-roundtrip-k: the parameters
out and a gradient back, nothing computed).  (dask-1 minus in-process-1 is no measure of the
network: in-process-1 computes the driver's KL part and the shard one after the other, dask-1 at
the same time.)
"""

import json
import statistics
import sys
from collections import defaultdict

ORDER = ["one-process", "in-process-1", "in-process-2", "dask-1", "dask-2", "torch-ddp-2"]


def per_step(paths):
    """{(group, impl): (median seconds per step, largest foreign_cpu, extra_info)}."""
    seen = defaultdict(list)
    for path in paths:
        with open(path) as f:
            for b in json.load(f)["benchmarks"]:
                if b["group"] and b["group"].startswith(("dist-", "dist-roundtrip-")):
                    info = b["extra_info"]
                    seen[(b["group"], info["impl"])].append((b["stats"]["median"] / info["steps_per_round"],
                                                             info.get("foreign_cpu", float("nan")), info))
    return {key: (statistics.median(t for t, _, _ in v), max(f for _, f, _ in v), v[-1][2]) for key, v in seen.items()}


def main(paths):
    rows = per_step(paths)
    groups = sorted({g for g, _ in rows if not g.startswith("dist-roundtrip")}, key=lambda g: int(g.rsplit("b", 1)[1]))
    for group in groups:
        B = int(group.rsplit("b", 1)[1])
        print(f"\n### batch {B}\n")
        print("| impl | ms per step | examples/s | foreign_cpu |")
        print("|---|---:|---:|---:|")
        for impl in ORDER:
            if (group, impl) in rows:
                t, foreign, _ = rows[(group, impl)]
                print(f"| {impl} | {t * 1e3:.2f} | {B / t:,.0f} | {foreign:.2f} |")
        have = {impl: rows[(group, impl)][0] for g, impl in rows if g == group}
        if "dask-1" in have:
            if "one-process" in have:
                print(f"\noverhead per step, dask-1 - one-process: {(have['dask-1'] - have['one-process']) * 1e3:.2f} ms")
    for (group, impl), (t, foreign, info) in sorted(rows.items()):
        if group.startswith("dist-roundtrip"):
            print(f"\n{impl}: {t * 1e3:.2f} ms per round trip, {info['bytes_per_step'] / 1e6:.1f} MB moved "
                  f"(foreign_cpu {foreign:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
