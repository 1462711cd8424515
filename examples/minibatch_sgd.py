"""Full-batch gradient descent vs minibatch SGD (the slides' Algorithms 1 and 2) on real data.

Logistic regression on scikit-learn's breast-cancer data (569 tumours, 30 features, benign
or malignant), standardised with the training split's statistics; 70 % train, 30 %
validation.  The loss is the mean negative log-likelihood (binary cross-entropy)

    f(w, b) = (1/n) sum_i l_i,   l_i = log(1 + exp(z_i)) - y_i z_i,   z_i = x_i.w + b,

minimised with vigrad's optimisers (vg.optim) on the minibatches of vg.data:

* full-batch GD: the exact gradient, one step per epoch;
* SGD with epoch shuffling (Algorithm 1, vg.data.minibatches(mode="shuffle")): a fresh
  permutation each epoch, consecutive slices of 32;
* SGD with replacement (Algorithm 2, mode="replacement"): 32 i.i.d. uniform indices per step,
  as many steps per epoch as Algorithm 1;
* SGD with Nesterov momentum 0.9 and gradient clipping (clip_norm) on Algorithm 1's batches.

The data are nearly separable, so the unregularised weights keep growing and the model
overfits: the validation loss has a minimum and then rises.  The runs therefore use early
stopping (optim.EarlyStopping) on the validation loss, checked once per epoch, and keep the
parameters of the best epoch; the table also shows the validation loss where each run
stopped, and a full-batch run without early stopping over the whole budget.  At an equal budget of epochs (passes over the data) the minibatch methods take
~13 steps per pass and reach the validation minimum in far fewer passes than full-batch GD.

Needs scikit-learn for the data (prints a message and returns without it).

Run: python examples/minibatch_sgd.py [--fast] [--outdir DIR]
"""

from __future__ import annotations


import numpy as np

import vigrad as vg
from vigrad import optim

import _common  # examples/_common.py, beside this script
BATCH = 32


def load_data(seed=0):
    """Standardised breast-cancer data split 70/30, or None without scikit-learn."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        return None
    X, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.7 * len(y))
    tr, va = perm[:n_train], perm[n_train:]
    mx, sx = X[tr].mean(axis=0), X[tr].std(axis=0)
    Xs = (X - mx) / sx
    return Xs[tr], y[tr].astype(np.float64), Xs[va], y[va].astype(np.float64)


def loss(params, X, y):
    """Mean binary cross-entropy (negative log-likelihood per example)."""
    w, b = params
    z = X @ w + b
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def grad(params, X, y):
    """Gradient of the mean loss over the rows given (a minibatch or all of them)."""
    w, b = params
    z = X @ w + b
    r = np.exp(-np.logaddexp(0.0, -z)) - y  # sigmoid(z) - y
    return (X.T @ r / len(y), np.array([r.mean()]))


def accuracy(params, X, y):
    w, b = params
    return float(np.mean(((X @ w + b) > 0) == (y > 0.5)))


def train(name, opt, X, y, Xv, yv, *, num_epochs, mode, patience, seed):
    """Run one method; return a dict of its results (parameters of the best validation epoch)."""
    n, d = X.shape
    params = (np.zeros(d), np.zeros(1))
    state = opt.init(params)
    stopper = optim.EarlyStopping(patience=patience)
    es = stopper.init()
    best = params
    steps = 0
    per_epoch = 1 if mode == "full" else vg.data.num_batches(n, BATCH)
    if mode == "full":
        batches = None
    elif mode == "shuffle":
        batches = iter(vg.data.minibatches(n, BATCH, mode="shuffle", num_epochs=num_epochs, rng=seed))
    else:
        batches = iter(vg.data.minibatches(n, BATCH, mode="replacement", num_steps=num_epochs * per_epoch,
                                           rng=seed))
    train_curve, val_curve = [], []
    stopped = False
    for epoch in range(num_epochs):
        for _ in range(per_epoch):
            if batches is None:
                g = grad(params, X, y)
            else:
                idx = next(batches).indices
                g = grad(params, X[idx], y[idx])
            params, state = opt.update(g, state, params)
            steps += 1
        val = loss(params, Xv, yv)
        train_curve.append(loss(params, X, y))
        val_curve.append(val)
        es, stop, improved = stopper.update(es, val)
        if improved:
            best = params
        if stop:
            stopped = True
            break
    return {"name": name, "train_loss": loss(best, X, y), "val_loss": loss(best, Xv, yv),
            "val_accuracy": accuracy(best, Xv, yv), "last_val_loss": val_curve[-1], "steps": steps,
            "epochs": epoch + 1, "best_epoch": es.best_step + 1, "stopped_early": stopped,
            "train_curve": np.array(train_curve), "val_curve": np.array(val_curve)}


def main(fast=False, outdir=None):
    data = load_data()
    if data is None:
        print("minibatch_sgd skipped: scikit-learn is not installed (pip install scikit-learn)")
        return {"skipped": True, "png": None}
    X, y, Xv, yv = data
    num_epochs = 400 if fast else 3000
    patience = 40 if fast else 200
    per_epoch = vg.data.num_batches(X.shape[0], BATCH)
    print(f"breast-cancer logistic regression: {X.shape[0]} train / {Xv.shape[0]} validation rows, "
          f"{X.shape[1]} standardised features; loss = mean negative log-likelihood (cross-entropy)")
    print(f"budget {num_epochs} epochs; batch {BATCH} ({per_epoch} minibatch steps per epoch); early stopping "
          f"on the validation loss with patience {patience} epochs")

    # Hessian of the mean loss <= X^T X / (4 n), largest eigenvalue ~3.4: GD is stable for lr < 0.6
    runs = [
        train("full-batch GD (lr 0.5)", optim.sgd(0.5), X, y, Xv, yv,
              num_epochs=num_epochs, mode="full", patience=patience, seed=1),
        train("SGD, Algorithm 1 (shuffle, lr 0.1)", optim.sgd(0.1), X, y, Xv, yv,
              num_epochs=num_epochs, mode="shuffle", patience=patience, seed=1),
        train("SGD, Algorithm 2 (replacement, lr 0.1)", optim.sgd(0.1), X, y, Xv, yv,
              num_epochs=num_epochs, mode="replacement", patience=patience, seed=1),
        train("Nesterov 0.9 + clip_norm 1 (lr 0.01)", optim.sgd(0.01, momentum=0.9, nesterov=True, clip_norm=1.0),
              X, y, Xv, yv, num_epochs=num_epochs, mode="shuffle", patience=patience, seed=1),
        train("full-batch GD, no early stopping", optim.sgd(0.5), X, y, Xv, yv,
              num_epochs=num_epochs, mode="full", patience=num_epochs, seed=1),
    ]
    target = 1.01 * runs[0]["val_loss"]
    for r in runs:
        hit = np.flatnonzero(r["val_curve"] <= target)
        r["epochs_to_target"] = int(hit[0]) + 1 if hit.size else None
    print(f"{'method':<40} {'train':>7} {'val':>7} {'val acc':>7} {'best ep':>7} {'steps':>6} {'epochs':>6} "
          f"{'val at stop':>11}")
    for r in runs:
        print(f"{r['name']:<40} {r['train_loss']:>7.4f} {r['val_loss']:>7.4f} {r['val_accuracy']:>7.3f} "
              f"{r['best_epoch']:>7} {r['steps']:>6} {r['epochs']:>6} {r['last_val_loss']:>11.4f}"
              f"{'  (early stop)' if r['stopped_early'] else ''}")
    print("(train/val/val acc at the best validation epoch; 'val at stop' where the run ended)")
    gd_val = runs[0]["val_loss"]
    print("best validation loss relative to full-batch GD's: "
          + ", ".join(f"{r['name'].split(' (')[0]} {r['val_loss'] / gd_val:.3f}" for r in runs[1:4]))
    print("epochs until the validation loss is within 1% of full-batch GD's best: "
          + ", ".join(f"{r['name'].split(' (')[0]} {r['epochs_to_target']}" for r in runs[:4]))

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for r in runs:
            epochs = np.arange(1, len(r["val_curve"]) + 1)
            axes[0].plot(epochs, r["train_curve"], lw=1, label=r["name"])
            axes[1].plot(epochs, r["val_curve"], lw=1, label=r["name"])
            axes[1].plot(r["best_epoch"], r["val_loss"], "k.", ms=6)
        for ax, title in ((axes[0], "training loss"), (axes[1], "validation loss (dots: best epoch)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("epoch (passes over the training data)")
            ax.set_title(title)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    out = {"skipped": False, "png": png, "methods": {}}
    for key, r in zip(("gd", "shuffle", "replacement", "nesterov_clip", "gd_no_early_stopping"), runs):
        out["methods"][key] = {k: v for k, v in r.items() if not k.endswith("_curve")}
    return out


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
