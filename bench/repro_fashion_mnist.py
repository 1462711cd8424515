"""Reproduce Blundell et al.'s MNIST comparison of priors on Fashion-MNIST.

Trains the paper's 784-400-400-10 Bayes-by-Backprop network (float32, one sample per step,
batch 128, Adam) with a Gaussian prior and with the scale-mixture prior, and reports the
test error of each.  Needs Debian's ``dataset-fashion-mnist`` package (the IDX files under
/usr/share/datasets/fashion-mnist); nothing is downloaded.

    python bench/repro_fashion_mnist.py [--epochs 10] [--estimator reparam] [--seed 0]

Prints one line per prior; the figures recorded in bench/README.md come from this script.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np

import vigrad as vg

DATA = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load():
    if not os.path.isdir(DATA):
        sys.exit(f"Fashion-MNIST not found at {DATA}: apt-get install dataset-fashion-mnist")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        X = read_idx(os.path.join(DATA, f"{prefix}-images-idx3-ubyte.gz")).reshape(-1, 784).astype(np.float32) / 255
        y = read_idx(os.path.join(DATA, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        parts[split] = (X, y)
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--estimator", choices=["reparam", "local", "flipout"], default="reparam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    data = load()
    Xtr, ytr = data["train"]
    Xte, yte = data["test"]
    priors = {"gaussian N(0, 1)": vg.Normal(0.0, 1.0),
              "scale mixture (0.5, 1, e^-6)": vg.ScaleMixtureNormal(0.5, 1.0, np.exp(-6))}
    print(f"Fashion-MNIST, 784-400-400-10, {args.estimator}, {args.epochs} epochs, batch 128, Adam {args.lr}, "
          f"float32, seed {args.seed}")
    results = {}
    for name, prior in priors.items():
        model = vg.BayesianMLP([784, 400, 400, 10], likelihood="categorical", prior=prior,
                               estimator=args.estimator, rng=args.seed)
        t0 = time.perf_counter()
        model.fit(Xtr, ytr, epochs=args.epochs, batch_size=128, lr=args.lr)
        dt = time.perf_counter() - t0
        p = model.predict_proba(Xte, num_samples=10, rng=args.seed)
        err = 1.0 - vg.metrics.accuracy(p, yte)
        steps = args.epochs * int(np.ceil(len(Xtr) / 128))
        results[name] = err
        print(f"  {name:<30} test error {100 * err:.2f} %  NLL {vg.metrics.nll(p, yte):.3f}  "
              f"ECE {vg.metrics.expected_calibration_error(p, yte):.3f}  ({dt:.0f} s, {1e3 * dt / steps:.1f} ms/step)",
              flush=True)
    return results


if __name__ == "__main__":
    main()
