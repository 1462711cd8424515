"""Turn pytest-benchmark JSON files from this suite into the Markdown tables of bench/README.md.

    python bench/report.py /tmp/bench.json [more runs ...]

Per (group, implementation) the figure is the median, over the runs, of each run's median
time; "runs" counts the runs used and "spread" gives the lowest and highest of their
medians.  A run is used for a group only when other processes kept less than QUIET cores
busy during every benchmark of the group ("foreign_cpu", recorded by conftest.py); when no
run qualifies, the least disturbed one is used and the row is marked.  Ratios are between
these figures, "other / vigrad".
"""

import json
import statistics
import sys

QUIET = 0.1
TARGETS = [
    # (what, group, slower impl, target ratio over vigrad)
    ("sampling, float64: NumPy / vigrad", "sample-float64", "numpy", 3.0),
    ("pathwise_grad, Normal, float64, S=1: NumPy reference / vigrad", "pathwise-normal-float64-S1-D1e6", "numpy-ref",
     5.0),
    ("pathwise_grad, mixture, float64, S=1: NumPy reference / vigrad", "pathwise-mixture-float64-S1-D1e6", "numpy-ref",
     5.0),
    ("pathwise_grad, Normal, float64, S=8: NumPy reference / vigrad", "pathwise-normal-float64-S8-D1e6", "numpy-ref",
     5.0),
    ("pathwise_grad, mixture, float64, S=8: NumPy reference / vigrad", "pathwise-mixture-float64-S8-D1e6", "numpy-ref",
     5.0),
    ("elbo_grad, float64, S=1: torch eager / vigrad", "elbo-float64-S1", "torch", 4.0),
    ("elbo_grad, float64, S=8: torch eager / vigrad", "elbo-float64-S8", "torch", 4.0),
]
DTYPE_GROUPS = ["sample-{}", "pathwise-normal-{}-S1-D1e6", "pathwise-mixture-{}-S1-D1e6", "pathwise-normal-{}-S8-D1e6",
                "pathwise-mixture-{}-S8-D1e6", "elbo-{}-S1", "elbo-{}-S8"]
IMPLS = ["vigrad", "numpy", "numpy-ref", "torch"]
#: The groups of test_bench_sampling/gradients/elbo.py; other benchmarks in bench/ are left out.
KINDS = ["sample", "pathwise", "elbo"]


class Row:
    """One (group, impl): the benchmarks of the runs used, and the figures over them."""

    def __init__(self, benchmarks, disturbed):
        self.benchmarks = benchmarks
        self.disturbed = disturbed  # None, or the foreign load of the least disturbed run
        medians = [b["stats"]["median"] * 1e3 for b in benchmarks]
        self.median = statistics.median(medians)
        self.low, self.high = min(medians), max(medians)
        self.min = min(b["stats"]["min"] * 1e3 for b in benchmarks)
        self.rounds = sum(b["stats"]["rounds"] for b in benchmarks)

    @property
    def info(self):
        return self.benchmarks[-1]["extra_info"]

    def values(self, key):
        return [b["extra_info"][key] for b in self.benchmarks if b["extra_info"].get(key) is not None]


def load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    by_group = {}  # group -> list of (foreign load, {impl: benchmark}), one per run holding it
    for data in runs:
        groups = {}
        for b in data["benchmarks"]:
            if b["group"].split("-")[0] in KINDS:
                groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b
        for group, impls in groups.items():
            load_ = max(b["extra_info"].get("foreign_cpu", 0.0) for b in impls.values())
            by_group.setdefault(group, []).append((load_, impls))
    table = {}
    for group, entries in by_group.items():
        used = [impls for load_, impls in entries if load_ < QUIET]
        disturbed = None
        if not used:
            disturbed, best = min(entries, key=lambda e: e[0])
            used = [best]
        for impl in {i for impls in used for i in impls}:
            table[(group, impl)] = Row([impls[impl] for impls in used if impl in impls], disturbed)
    return runs, table


def fmt(x):
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def group_order(group):
    return (KINDS.index(group.split("-")[0]), group)


def targets_table(table):
    lines = ["| target | measured | required | met? |", "|---|---:|---:|---|"]

    def line(what, a, b, target):
        if a is None or b is None:
            return f"| {what} | not measured | ≥ {target}× | — |"
        r = a.median / b.median
        met = "yes" if r >= target else "**no**"
        return f"| {what} | {r:.2f}× ({fmt(a.median)} / {fmt(b.median)} ms) | ≥ {target}× | {met} |"

    for what, group, slow, target in TARGETS:
        lines.append(line(what, table.get((group, slow)), table.get((group, "vigrad")), target))
    for pattern in DTYPE_GROUPS:
        what = f"vigrad float64 / float32: {pattern.format('*')}"
        lines.append(line(what, table.get((pattern.format("float64"), "vigrad")),
                          table.get((pattern.format("float32"), "vigrad")), 1.5))
    return "\n".join(lines)


def groups_table(table):
    lines = ["| group | impl | median ms | spread of run medians | min ms | runs | rounds | / vigrad |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for group in sorted({g for g, _ in table}, key=group_order):
        base = table.get((group, "vigrad"))
        for impl in IMPLS:
            row = table.get((group, impl))
            if row is None:
                continue
            ratio = "" if impl == "vigrad" or base is None else f"{row.median / base.median:.2f}×"
            mark = "" if row.disturbed is None else f" (disturbed: foreign {row.disturbed})"
            lines.append(f"| {group}{mark} | {impl} | {fmt(row.median)} | {fmt(row.low)}–{fmt(row.high)} | "
                         f"{fmt(row.min)} | {len(row.benchmarks)} | {row.rounds} | {ratio} |")
    return "\n".join(lines)


def memory_table(table):
    lines = ["| workload | impl | peak allocation | in units of D · itemsize | page faults per call |",
             "|---|---|---:|---:|---:|"]
    for (group, impl), row in sorted(table.items(), key=lambda kv: (group_order(kv[0][0]), kv[0][1])):
        info = row.info
        if info.get("D") != 10**6 or "peak_alloc_bytes" not in info:
            continue
        unit = info["D"] * (8 if info["dtype"] == "float64" else 4)
        faults = row.values("page_faults_per_call")
        faults = f"{min(faults):.0f}–{max(faults):.0f}" if faults else ""
        for key, label in (("peak_alloc_bytes_first_call", ", first call in a thread"),
                           ("peak_alloc_bytes", ", repeated call" if "peak_alloc_bytes_first_call" in info else "")):
            if key in info:
                peak = info[key]
                lines.append(f"| {group}{label} | {impl} | {peak / 2**20:.2f} MiB ({peak} B) | {peak / unit:.3f} | "
                             f"{faults if key == 'peak_alloc_bytes' else ''} |")
    return "\n".join(lines)


def sweep_table(table):
    lines = ["| dtype | D | vigrad ms | NumPy ref ms | torch ms | ref / vigrad | torch / vigrad | vigrad ns/element |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted((row.info["dtype"], row.info["D"], group) for (group, impl), row in table.items()
                  if impl == "vigrad" and group.startswith("pathwise-normal-") and row.info["S"] == 1)
    for dtype, D, group in keys:
        v, r, t = (table.get((group, i)) for i in ("vigrad", "numpy-ref", "torch"))
        cells = " | ".join(fmt(x.median) if x else "—" for x in (v, r, t))
        ratios = " | ".join(f"{x.median / v.median:.1f}×" if x else "—" for x in (r, t))
        lines.append(f"| {dtype} | 10^{len(str(D)) - 1} | {cells} | {ratios} | {v.median * 1e6 / D:.2f} |")
    return "\n".join(lines)


def main(paths):
    runs, table = load(paths)
    builds = sorted({d["machine_info"].get("vigrad", {}).get("installed_sha1") for d in runs})
    print(f"{len(runs)} runs, {runs[0]['datetime']} to {runs[-1]['datetime']}; vigrad build(s): {', '.join(builds)}\n")
    for title, fn in (("Targets", targets_table), ("All groups", groups_table), ("Memory", memory_table),
                      ("Size sweep (pathwise_grad, Normal prior, S = 1)", sweep_table)):
        print(f"### {title}\n\n{fn(table)}\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["/tmp/bench.json"])
