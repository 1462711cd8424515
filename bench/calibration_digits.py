"""Calibration of vg.BayesianMLP on the digits (issue 14, item 5): one configuration per call.

The protocol of bench/README.md ("Quality against peers"): the shipped digits scaled to [0, 1],
``vigrad.datasets.train_test_split(test_fraction=0.25, rng=seed)``, a 64-128-10 network, 60 epochs,
batch 64, Adam 3e-3, the KL summed over all weights with uniform minibatch weighting (no
tempering), the model seeded with ``rng=seed``; on the test split the Monte Carlo predictive's
accuracy, NLL, ECE (15 bins) and mean mutual information.  Mean +- standard error over the seeds.

What a configuration may change (the issue's list): the estimator, the initial rho, the spread of
the initial means (a factor on the default bound 1/sqrt(fan_in)), the prior's scales, the number
of test samples.  Every finished configuration is added to a JSON file (written atomically), so a
study can run one configuration at a time on a shared machine:

    python bench/calibration_digits.py --init-rho -7 --seeds 0 1 2 --out /tmp/calib.json
    python bench/calibration_digits.py --estimator local --init-rho -5 --seeds 0 1 2 --out /tmp/calib.json
    python bench/calibration_digits.py --prior normal:0.3 --seeds 0 1 2 --out /tmp/calib.json
    python bench/calibration_digits.py --table /tmp/calib.json

``--prior``: ``mixture:PI,SIGMA1,SIGMA2`` (default ``mixture:0.5,1,exp(-6)``) or
``normal:SCALE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

import vigrad as vg
from vigrad.datasets import load_digits, train_test_split

SIZES = [64, 128, 10]


def parse_prior(text):
    kind, _, args = text.partition(":")

    def number(a):  # a float, or exp(float)
        a = a.strip()
        return math.exp(float(a[4:-1])) if a.startswith("exp(") and a.endswith(")") else float(a)

    vals = [number(a) for a in args.split(",") if a.strip()]
    if kind == "mixture" and len(vals) == 3:
        return vg.ScaleMixtureNormal(*vals)
    if kind == "normal" and len(vals) == 1:
        return vg.Normal(0.0, vals[0])
    raise ValueError(f"--prior must be mixture:PI,SIGMA1,SIGMA2 or normal:SCALE, got {text!r}")


def run_one(seed, *, estimator, init_rho, prior, loc_scale, test_samples, epochs, batch_size, lr):
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_fraction=0.25, rng=seed)
    model = vg.BayesianMLP(SIZES, likelihood="categorical", estimator=estimator, prior=prior, init_rho=init_rho,
                           rng=seed)
    if loc_scale != 1.0:  # the initial means' spread, without touching the seeded draws
        for sl, _ in model._param_slices:
            model._theta[sl] *= model._theta.dtype.type(loc_scale)
    t0 = time.perf_counter()
    model.fit(Xtr, ytr, epochs=epochs, batch_size=batch_size, lr=lr)
    seconds = time.perf_counter() - t0
    sp = model.sample_proba(Xte, num_samples=test_samples, rng=seed)
    p = sp.mean(axis=0)
    return {"accuracy": vg.metrics.accuracy(p, yte), "nll": vg.metrics.nll(p, yte),
            "ece": vg.metrics.expected_calibration_error(p, yte),
            "mi": float(np.mean(vg.metrics.mutual_information(sp))),
            # mean confidence minus accuracy: > 0 over-confident, < 0 under-confident
            "conf_gap": float(p.max(axis=1).mean() - vg.metrics.accuracy(p, yte)), "fit_seconds": seconds}


def summarise(runs):
    out = {}
    for k in runs[0]:
        v = np.array([r[k] for r in runs], float)
        out[k] = (float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))
    return out


def save_atomic(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".calib-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def table(results):
    lines = ["| configuration | seeds | accuracy | NLL | ECE | MI (nats) | confidence - accuracy |",
             "|---|---:|---|---|---|---:|---:|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {s['accuracy'][0]:.3f} ± {s['accuracy'][1]:.3f} | "
                     f"{s['nll'][0]:.3f} ± {s['nll'][1]:.3f} | {s['ece'][0]:.3f} ± {s['ece'][1]:.3f} | "
                     f"{s['mi'][0]:.4f} | {s.get('conf_gap', (float('nan'),))[0]:+.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimator", default="reparam", choices=["reparam", "local", "flipout"])
    ap.add_argument("--init-rho", type=float, default=-7.0)
    ap.add_argument("--prior", default="mixture:0.5,1,exp(-6)")
    ap.add_argument("--loc-scale", type=float, default=1.0, help="factor on the initial means' bound")
    ap.add_argument("--test-samples", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=None, help="JSON file the configuration's result is added to")
    ap.add_argument("--table", default=None, help="print the Markdown table of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return None
    prior = parse_prior(args.prior)
    cfg = dict(estimator=args.estimator, init_rho=args.init_rho, prior=prior, loc_scale=args.loc_scale,
               test_samples=args.test_samples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    runs = []
    for seed in args.seeds:
        runs.append(run_one(seed, **cfg))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in runs[-1].items()), file=sys.stderr, flush=True)
    label = args.label or (f"{args.estimator}, rho0 {args.init_rho:g}, prior {args.prior}, loc x{args.loc_scale:g}, "
                           f"{args.test_samples} test samples")
    result = {"label": label, "config": {**cfg, "prior": repr(prior)}, "seeds": args.seeds, "runs": runs,
              "summary": summarise(runs)}
    if args.out:
        old = []
        if os.path.exists(args.out):
            with open(args.out) as f:
                old = json.load(f)
        save_atomic(args.out, old + [result])
    print(table([result]))
    return result


if __name__ == "__main__":
    main()
