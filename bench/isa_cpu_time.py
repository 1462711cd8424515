"""CPU time per call of vigrad's kernels, one thread, in several builds and instruction-set levels.

The companion of compare_builds.py for a busy machine: wall-clock timings on 2 shared cores swing
by several times when other processes run, while the CPU time a single-threaded call consumes
(time.process_time) hardly moves.  Each configuration runs in its own process; each kernel's
figure is the minimum over many calls.

    python bench/isa_cpu_time.py --venvs /work/venvs/cmp          # after compare_builds.py --build-only

Rows: sampling (D = 1e6), pathwise_grad (Normal / scale mixture, S = 1 and 8, D = 1e6), elbo_grad
end to end (D = 1e6, a NumPy log-likelihood), the full-rank family (d = 1000, S = 8: sampling and
gradient), Adam over 1e6 parameters, and one Bayes-by-Backprop step of Blundell's 784-400-400-10
network (batch 128, float32, scale mixture; its matrix products are NumPy's OpenBLAS, the same in
every build).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_builds import CONFIGS  # noqa: E402  (name: (build venv, VIGRAD_ISA, reference))

WORKER = r'''
import json, sys, time
import numpy as np
import vigrad as vg

def cpu(f, n):
    best = float("inf")
    for _ in range(n):
        t = time.process_time(); f(); best = min(best, time.process_time() - t)
    return best

out = {"isa": vg.build_info["isa"], "instruction_set": vg.build_info["instruction_set"]}
R = int(sys.argv[1])
rng = np.random.default_rng(0)
D = 10**6
mix = vg.ScaleMixtureNormal(0.5, 1.0, np.exp(-6))
for dt in (np.float64, np.float32):
    n = np.dtype(dt).name
    q = vg.MeanFieldGaussian(rng.standard_normal(D).astype(dt), np.full(D, -3.0, dt))
    out[f"sample {n}"] = cpu(lambda: q.sample(1, rng=1, workers=1), R)
    for prior_name, prior in (("normal", vg.Normal(0.0, 1.0)), ("mixture", mix)):
        for S in (1, 8):
            eps = rng.standard_normal((S, D)).astype(dt); g = rng.standard_normal((S, D)).astype(dt)
            out[f"pathwise_grad {prior_name} S={S} {n}"] = cpu(
                lambda: vg.pathwise_grad(q.loc, q.rho, eps, g, prior, workers=1), max(R // S, 3))
    def log_lik(w):
        r = w - 0.5
        return -0.5 * (r * r).sum(axis=1), -r
    out[f"elbo_grad S=1 {n}"] = cpu(lambda: vg.elbo_grad(q, log_lik, mix, rng=2, workers=1), R)
    p = np.zeros(D, dt); gr = rng.standard_normal(D).astype(dt); m = np.zeros(D, dt); v = np.zeros(D, dt)
    out[f"adam_update {n}"] = cpu(lambda: vg._core.adam_update(p, gr, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 1), R)
d = 1000
A = rng.standard_normal((d, d)) / np.sqrt(d)
fr = vg.FullRankGaussian.from_cov(np.zeros(d), A @ A.T + np.eye(d))
def fullrank():
    return fr.log_prob(fr.sample(8, rng=3))
out["fullrank d=1000 sample+log_prob f64"] = cpu(fullrank, max(R // 4, 3))
X = rng.standard_normal((128, 784)).astype(np.float32); y = rng.integers(0, 10, 128)
model = vg.BayesianMLP([784, 400, 400, 10], likelihood="categorical", estimator="reparam", rng=0, workers=1)
model.fit(X, y, epochs=1, batch_size=128)
out["bbb step 784-400-400-10 f32 (1 step)"] = cpu(lambda: model.fit(X, y, epochs=1, batch_size=128), max(R // 2, 3))
print(json.dumps(out))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venvs", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=20, help="calls per kernel (default 20)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res = {}
    for c in args.configs:
        build, isa, _ = CONFIGS[c]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        env.pop("VIGRAD_ISA", None)
        if isa:
            env["VIGRAD_ISA"] = isa
        py = args.venvs / build / "bin" / "python"
        r = subprocess.run([str(py), "-c", WORKER, str(args.rounds)], env=env, capture_output=True, text=True,
                           cwd="/")
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        res[c] = json.loads(r.stdout.strip().splitlines()[-1])
        print(c, res[c]["isa"], res[c]["instruction_set"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    rows = [k for k in res[args.configs[0]] if k not in ("isa", "instruction_set")]
    pairs = [(c, CONFIGS[c][2]) for c in args.configs if CONFIGS[c][2] in res]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"\nCPU: {model}; CPU ms per call, one thread, min over {args.rounds} calls\n")
    print("| kernel | " + " | ".join(args.configs) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    print("|" + "---|" * (1 + len(args.configs) + len(pairs)))
    for k in rows:
        cells = [f"{res[c][k] * 1e3:.2f}" for c in args.configs]
        ratios = [f"{res[a][k] / res[b][k]:.2f}" for a, b in pairs]
        print(f"| {k} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
