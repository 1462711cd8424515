"""Bayes by Backprop in PyTorch with vigrad's layers: a 64-128-10 network on the digits.

The network is an ordinary ``torch.nn.Sequential`` of two ``vigrad.torch.BayesianLinear`` layers
with a ReLU between them (Blundell et al.'s scale-mixture prior, rho0 = -7), trained by
``torch.optim.Adam`` on the minibatch cost

    F_i = NLL(minibatch i) + KL[q || prior] / M          (M minibatches per epoch),

written ``loss = cross_entropy(model(x), y, reduction="sum") + vgt.kl_loss(model) / M``.  PyTorch
does the matrix products and the optimiser; vigrad's core samples the weights, regenerates the
noise in the backward pass and computes the gradient of the KL and of the sampling path in one
fused kernel call per layer.

The predictive distribution is the Monte Carlo average of the softmax over weight draws (eval
mode inside ``with vgt.sampling(model)``), scored on the held-out quarter by accuracy, NLL and
the expected calibration error (vigrad.metrics); beside it the mean-weight network (plain eval
mode) and, as an independent check, the same network (prior, init, estimator, epochs, batch,
learning rate) trained by vigrad's NumPy ``vg.BayesianMLP``, which runs the same kernels without
PyTorch.  The figure is the reliability diagram of the predictive.

Needs PyTorch (``pip install vigrad[torch]``).
Run: python examples/torch_bbb_digits.py [--fast] [--outdir DIR]
(full: 40 epochs and the three estimators reparam / local / flipout; --fast: 8 epochs, reparam.)
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

import vigrad as vg
import vigrad.torch as vgt
from vigrad.datasets import load_digits, train_test_split

import _common  # examples/_common.py, beside this script


def build_model(estimator="reparam", seed=0, hidden=128, dtype=torch.float32):
    """64 -> hidden -> 10 with ReLU, every layer a vigrad BayesianLinear (default scale-mixture prior)."""
    return nn.Sequential(
        vgt.BayesianLinear(64, hidden, estimator=estimator, seed=2 * seed, dtype=dtype),
        nn.ReLU(),
        vgt.BayesianLinear(hidden, 10, estimator=estimator, seed=2 * seed + 1, dtype=dtype),
    )


def train(model, X, y, *, epochs, batch_size=64, lr=3e-3, seed=0):
    """Minibatch Adam on F_i = NLL_i + KL / M; returns per epoch (loss per example, NLL per example, KL)."""
    N = X.shape[0]
    M = math.ceil(N / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(N, generator=gen)
        nll_sum = kl_sum = 0.0
        for i in range(M):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            nll = nn.functional.cross_entropy(model(X[idx]), y[idx], reduction="sum")
            kl = vgt.kl_loss(model)  # the KL terms of this forward's weight samples
            loss = nll + kl / M
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            nll_sum += float(nll.detach())
            kl_sum += float(kl.detach())
        history.append(((nll_sum + kl_sum / M) / N, nll_sum / N, kl_sum / M))
    return history


@torch.no_grad()
def predict_proba(model, X, num_samples=30):
    """Monte Carlo predictive: the softmax averaged over num_samples weight draws, (N, 10) float64."""
    model.eval()
    with vgt.sampling(model):  # eval mode would use the mean weights; sample instead
        p = sum(torch.softmax(model(X).double(), dim=1) for _ in range(num_samples)) / num_samples
    return p.numpy()


@torch.no_grad()
def mean_weight_proba(model, X):
    model.eval()  # eval mode: the mean weights, no sampling
    return torch.softmax(model(X).double(), dim=1).numpy()


def scores(p, y):
    return {"accuracy": vg.metrics.accuracy(p, y), "nll": vg.metrics.nll(p, y),
            "ece": vg.metrics.expected_calibration_error(p, y)}


def reliability(p, y, num_bins=10):
    """(mean confidence, accuracy, count) per confidence bin."""
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
    out = []
    for b in range(num_bins):
        m = bins == b
        if m.any():
            out.append((float(conf[m].mean()), float((pred[m] == y[m]).mean()), int(m.sum())))
    return out


def main(fast=False, outdir=None):
    # one PyTorch thread: a 64-128-10 network's operations are too small to gain from two, and on
    # a machine where other work holds the cores PyTorch's OpenMP threads, spinning between
    # operations, make a step up to 100x slower (vigrad.torch's notes on threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _main(fast, outdir)
    finally:
        torch.set_num_threads(threads)


def _main(fast, outdir):
    epochs = 8 if fast else 40
    lr = 1e-2 if fast else 3e-3
    estimators = ["reparam"] if fast else ["reparam", "local", "flipout"]
    num_samples = 10 if fast else 30

    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_fraction=0.25, rng=0)
    Xtr_t, ytr_t, Xte_t = torch.from_numpy(Xtr), torch.from_numpy(ytr), torch.from_numpy(Xte)
    print(f"digits: {len(Xtr)} train / {len(Xte)} test; 64-128-10 Bayesian MLP in PyTorch (vigrad.torch layers), "
          f"{epochs} epochs, batch 64, Adam lr {lr:g}, predictive from {num_samples} weight draws")
    out = {"epochs": epochs, "num_samples": num_samples, "estimators": {}}
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first optimiser imports torch._dynamo (~1 s)
    curves = {}
    for est in estimators:
        model = build_model(est, seed=0)
        t0 = time.perf_counter()
        hist = train(model, Xtr_t, ytr_t, epochs=epochs, lr=lr, seed=0)
        seconds = time.perf_counter() - t0
        p = predict_proba(model, Xte_t, num_samples)
        bayes = scores(p, yte)
        mean_w = scores(mean_weight_proba(model, Xte_t), yte)
        curves[est] = reliability(p, yte)
        # the independent check: vigrad's NumPy Bayes-by-Backprop MLP on the same data and settings
        t0 = time.perf_counter()
        twin = vg.BayesianMLP([64, 128, 10], likelihood="categorical", estimator=est, rng=0)
        twin.fit(Xtr, ytr, epochs=epochs, batch_size=64, lr=lr)
        twin_scores = scores(twin.predict_proba(Xte, num_samples=num_samples, rng=0), yte)
        twin_seconds = time.perf_counter() - t0
        out["estimators"][est] = dict(bayes, mean_weights=mean_w, numpy_twin=twin_scores, train_seconds=seconds,
                                      final_loss=hist[-1][0], final_nll=hist[-1][1], final_kl=hist[-1][2])
        print(f"{est:>8}  torch + vigrad.torch: accuracy {bayes['accuracy']:.4f}  NLL {bayes['nll']:.4f}  "
              f"ECE {bayes['ece']:.4f}   (train {seconds:.1f} s; final loss/example {hist[-1][0]:.4f}, "
              f"KL {hist[-1][2]:.4g})")
        print(f"{'':>8}  mean weights:        accuracy {mean_w['accuracy']:.4f}  NLL {mean_w['nll']:.4f}  "
              f"ECE {mean_w['ece']:.4f}")
        print(f"{'':>8}  vg.BayesianMLP:      accuracy {twin_scores['accuracy']:.4f}  NLL {twin_scores['nll']:.4f}  "
              f"ECE {twin_scores['ece']:.4f}   (train {twin_seconds:.1f} s)")
    first = out["estimators"][estimators[0]]
    out.update(accuracy=first["accuracy"], nll=first["nll"], ece=first["ece"])

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
        for est, pts in curves.items():
            c, a, _ = zip(*pts)
            ax.plot(c, a, marker="o", label=f"{est} (ECE {out['estimators'][est]['ece']:.3f})")
        ax.set_xlabel("confidence (max predictive probability)")
        ax.set_ylabel("accuracy")
        ax.set_title("digits, 64-128-10 Bayes by Backprop (PyTorch)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    out["png"] = png
    return out


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__, fast_help="8 epochs, one estimator")
