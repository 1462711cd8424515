"""The dispatching build against builds for one machine, row by row of bench/ (issue 11).

Builds vigrad several ways, each into its own virtual environment (with the system site packages,
so NumPy, torch and pytest-benchmark come from there), runs vigrad's own benchmark rows in each
configuration, alternating the configurations round after round so that a busy spell of the machine
hits all of them alike, and prints a table of each row's time against its reference build.

    python bench/compare_builds.py --venvs /tmp/vgb            # build, then measure (~25 min)
    python bench/compare_builds.py --venvs /tmp/vgb --no-build # measure again

Configurations (name: build, VIGRAD_ISA at run time):
  dispatch-avx512 / -avx2 / -baseline: the default build, each level forced;
  native: VIGRAD_NATIVE=ON (-march=native; the reference of dispatch-avx512 on an AVX-512 machine);
  znver3: VIGRAD_NATIVE=ON with VIGRAD_NATIVE_ARCH=znver3: what -march=native gives on an AMD Zen 3
          (AVX2 + FMA, no AVX-512), run here; the reference of dispatch-avx2;
  nolibmvec-avx512 / -baseline: VIGRAD_LIBMVEC=OFF, the compiler's own vectorisation of scalar math
          (what macOS, Windows and musl get), against dispatch-avx512 / -baseline.

Times are each benchmark's minimum over its rounds, then the median of those over the repeats:
on a shared 2-core machine the minimum is the figure least disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELECT = "vigrad or fit_overhead"

BUILDS = {
    "dispatch": [],
    "native": ["-Ccmake.define.VIGRAD_NATIVE=ON"],
    "znver3": ["-Ccmake.define.VIGRAD_NATIVE=ON", "-Ccmake.define.VIGRAD_NATIVE_ARCH=znver3"],
    "nolibmvec": ["-Ccmake.define.VIGRAD_LIBMVEC=OFF"],
}
# configuration: (build, VIGRAD_ISA or None, reference configuration or None)
CONFIGS = {
    "dispatch-avx512": ("dispatch", "avx512", "native"),
    "native": ("native", None, None),
    "dispatch-avx2": ("dispatch", "avx2", "znver3"),
    "znver3": ("znver3", None, None),
    "dispatch-baseline": ("dispatch", "baseline", None),
    "nolibmvec-avx512": ("nolibmvec", "avx512", "dispatch-avx512"),
    "nolibmvec-baseline": ("nolibmvec", "baseline", "dispatch-baseline"),
}


def python_of(venvs: Path, build: str) -> Path:
    return venvs / build / "bin" / "python"


def build(venvs: Path, name: str) -> None:
    venv = venvs / name
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    cmd = [str(python_of(venvs, name)), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--force-reinstall", *BUILDS[name], str(ROOT)]
    print("building", name, flush=True)
    subprocess.run(cmd, check=True)


def measure(venvs: Path, config: str, out: Path) -> dict[str, float]:
    build_name, isa, _ = CONFIGS[config]
    env = dict(os.environ)
    env.pop("VIGRAD_ISA", None)
    if isa:
        env["VIGRAD_ISA"] = isa
    cmd = [str(python_of(venvs, build_name)), "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider",
           "-k", SELECT, "-m", "not slow", "--benchmark-only", f"--benchmark-json={out}"]
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    isa_seen = data["machine_info"].get("vigrad", {}).get("build_info", {}).get("isa")
    if isa and isa_seen and isa_seen != isa:
        raise RuntimeError(f"{config}: ran on {isa_seen}, not {isa}")
    return {b["fullname"].split("::", 1)[1]: b["stats"]["min"] for b in data["benchmarks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venvs", type=Path, required=True, help="folder for the per-build virtual environments")
    ap.add_argument("--no-build", action="store_true", help="use the builds already in --venvs")
    ap.add_argument("--build-only", action="store_true", help="build, then stop")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all configurations (default 2)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", type=Path, help="also save the medians here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.venvs.mkdir(parents=True, exist_ok=True)
    needed = {CONFIGS[c][0] for c in args.configs}
    if not args.no_build:
        for b in BUILDS:
            if b in needed:
                build(args.venvs, b)
    if args.build_only:
        return 0
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for c in args.configs:
                print(f"round {r + 1}/{args.repeats}: {c}", flush=True)
                runs[c].append(measure(args.venvs, c, Path(tmp) / f"{c}-{r}.json"))
    med = {c: {k: statistics.median(run[k] for run in rs if k in run) for k in rs[0]} for c, rs in runs.items()}
    if args.json:
        args.json.write_text(json.dumps(med, indent=1, sort_keys=True))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"\nCPU: {model}; times in ms (min per run, median over {args.repeats} runs)\n")
    rows = sorted(set().union(*(m.keys() for m in med.values())))
    pairs = [(c, CONFIGS[c][2]) for c in args.configs if CONFIGS[c][2] in med]
    head = "| benchmark | " + " | ".join(args.configs) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |"
    print(head)
    print("|" + "---|" * (1 + len(args.configs) + len(pairs)))
    for row in rows:
        cells = [f"{med[c][row] * 1e3:.3f}" if row in med[c] else "" for c in args.configs]
        ratios = [f"{med[a][row] / med[b][row]:.2f}" if row in med[a] and row in med[b] else "" for a, b in pairs]
        print(f"| {row} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
