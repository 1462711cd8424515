"""The pieces of :meth:`vigrad.BayesianMLP.fit`, each readable and testable on its own.

``fit`` is a short driver over them (see ``BayesianMLP._fit``):

- :class:`BatchPlan` -- the minibatches: which examples each step sees, epoch after epoch,
  a pure function of a seed and resumable at any epoch;
- :func:`kl_weights` -- the weight of the KL term in each minibatch's cost (1/M, or Blundell's pi_i);
- :func:`resolve_optimizer`, :class:`Updater` -- the optimiser (a :mod:`vigrad.optim` one, Adam
  by default) and its step on the flat parameter vector, on the core's Adam kernel where it can;
  :func:`clip_global_norm`;
- :class:`History` -- the per-epoch record (loss, NLL, KL, validation) and the progress line;
- :func:`validation_metrics`, :class:`EarlyStop` -- validation and early stopping on its NLL;
- :func:`check_checkpointable`, :func:`restore_checkpoint` -- checkpoints (written by the
  model's atomic ``save``);
- :class:`Rewind` -- putting the parameters and the optimiser state back at an earlier step.

The gradient of one minibatch is the model's own (``BayesianMLP._minibatch_gradient``).

The driver trains BayesianMLP only.  A torch.nn.Module of vigrad.torch layers is trained by a
torch loop (autograd, torch.optim, state_dict checkpoints; its layers key their noise by their
own forward counters): sharing the driver would need an adapter for parameters, optimiser
state, noise counters, prediction and saving about as long as the driver.  The pieces that take
plain values (BatchPlan, kl_weights, History, EarlyStop on a parameter array) serve such a loop
as they are.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterator, List, NamedTuple, Optional

import numpy as np

from . import _core
from . import data as _data
from . import optim as _optim
from ._validation import check_num_samples

__all__ = ["BatchPlan", "EarlyStop", "History", "Rewind", "SNAPSHOT_EVERY", "Updater", "check_checkpointable",
           "clip_global_norm", "kl_weights", "new_history", "resolve_optimizer", "restore_checkpoint",
           "validation_metrics"]

_SHUFFLE_MODES = ("shuffle", "replacement")
_KL_WEIGHTINGS = ("uniform", "blundell")
#: The default optimiser's learning rate.
DEFAULT_LR = 1e-3


# -- minibatches and the KL weighting ------------------------------------------------------------------
class BatchPlan(NamedTuple):
    """Which examples each step of a fit sees.

    ``per_epoch`` = M minibatches make an epoch; "shuffle" (Algorithm 1 of the slides) draws a
    permutation per epoch and cuts it into M slices, "replacement" (Algorithm 2) draws every
    minibatch with replacement.  :meth:`batches` is a pure function of its seed: started at an
    epoch, it yields the minibatches an uninterrupted stream yields from there."""

    num_examples: int
    batch_size: int
    epochs: int
    mode: str
    per_epoch: int

    @classmethod
    def make(cls, num_examples, batch_size, epochs, mode) -> "BatchPlan":
        batch_size = check_num_samples(batch_size, "batch_size")
        epochs = check_num_samples(epochs, "epochs")
        if mode not in _SHUFFLE_MODES:
            raise ValueError(f"shuffle must be 'shuffle' or 'replacement', got {mode!r}")
        batch_size = min(batch_size, num_examples) if mode == "shuffle" else batch_size
        return cls(num_examples, batch_size, epochs, mode, _data.num_batches(num_examples, batch_size))

    def batches(self, seed: int, start_epoch: int = 0) -> Iterator[_data.Batch]:
        """The minibatches from epoch ``start_epoch`` to the last; ``batch.step % per_epoch`` is the
        minibatch's place in its epoch."""
        shuffle = self.mode == "shuffle"
        return _data.minibatches(self.num_examples, self.batch_size, mode=self.mode,
                                 num_epochs=self.epochs if shuffle else None,
                                 num_steps=None if shuffle else self.epochs * self.per_epoch,
                                 rng=seed, start_step=start_epoch * self.per_epoch)


def _blundell_weights(M):
    """pi_i = 2^(M - i) / (2^M - 1), i = 1..M, computed without overflow."""
    i = np.arange(1, M + 1, dtype=np.float64)
    return np.exp2(-i) / -np.expm1(-M * math.log(2.0))


def kl_weights(per_epoch: int, kind: str) -> np.ndarray:
    """The KL weight of each of the M = ``per_epoch`` minibatches of an epoch, summing to one over
    the epoch (so an epoch's costs add up to the ELBO's KL once): "uniform" 1/M, or "blundell"
    pi_i = 2^(M-i) / (2^M - 1) (Blundell et al. 2015, eq. 9: the early minibatches carry the prior)."""
    if kind not in _KL_WEIGHTINGS:
        raise ValueError(f"kl_weighting must be 'uniform' or 'blundell', got {kind!r}")
    return np.full(per_epoch, 1.0 / per_epoch) if kind == "uniform" else _blundell_weights(per_epoch)


# -- the optimiser -------------------------------------------------------------------------------------
def resolve_optimizer(lr, optimizer) -> _optim.Optimizer:
    """The fit's optimiser: ``optimizer`` (a :mod:`vigrad.optim` Optimizer), or Adam with step size
    ``lr`` (a float or a schedule; None: 1e-3) and Adam's usual b1 = 0.9, b2 = 0.999, eps = 1e-8."""
    if optimizer is None:
        return _optim.adam(DEFAULT_LR if lr is None else lr)
    if lr is not None:
        raise ValueError("give lr or optimizer, not both (the optimizer carries its own learning rate)")
    if not isinstance(optimizer, _optim.Optimizer):
        raise TypeError(f"optimizer must be a vigrad.optim Optimizer (vg.optim.adam(...), sgd(...), rmsprop(...)), "
                        f"got {type(optimizer).__name__}")
    return optimizer


def clip_global_norm(grad, max_norm: float) -> None:
    """Scale ``grad`` in place so that its L2 norm (summed in float64) is at most ``max_norm``."""
    g = grad.astype(np.float64)
    norm = float(np.sqrt(np.dot(g, g)))
    if norm > max_norm:
        grad *= grad.dtype.type(max_norm / norm)


class Updater:
    """The optimiser's step on a flat parameter vector, in place.

    Adam without clipping or weight decay runs on the core's Adam kernel: :meth:`apply` after a
    gradient, or fused into each layer's backward pass by the caller with :meth:`hyper` (``fusable``).
    Its moments are the arrays ``m``, ``v`` given (the model's, saved in its checkpoints).  Any other
    optimiser runs its own ``update`` (Adam then still on ``m`` and ``v``; SGD or RMSprop on a state
    made for this fit).  ``arrays`` are the state arrays a rollback restores with the parameters."""

    def __init__(self, optimizer: _optim.Optimizer, theta, m, v):
        self.optimizer = optimizer
        h = optimizer.hyperparams
        self.schedule = _optim._as_schedule(h["lr"])
        self.m, self.v = m, v
        self.fusable = (optimizer.name == "adam" and h["clip_norm"] is None and h["clip_value"] is None
                        and h["weight_decay"] == 0.0)
        if optimizer.name == "adam":
            self._state = _optim.AdamState(np.array(0, np.int64), (m,), (v,))
        else:
            self._state = optimizer.init(theta)
        self.arrays = tuple(a for f in self._state._fields[1:] for a in getattr(self._state, f))

    def hyper(self, step: int):
        """(step, lr, b1, b2, eps) of the core's Adam kernel at ``step`` (fusable optimisers only)."""
        h = self.optimizer.hyperparams
        return step, _optim._lr_at(self.schedule, step), h["b1"], h["b2"], h["eps"]

    def apply(self, theta, grad, step: int, workers: int, hyper=None) -> None:
        """theta (and the state) after update number ``step`` with gradient ``grad``."""
        if self.fusable:
            _core.adam_update(theta, grad, self.m, self.v, *(hyper or self.hyper(step)), workers)
            return
        new_theta, new_state = self.optimizer.update(grad, self._state._replace(step=np.array(step, np.int64)),
                                                     theta)
        np.copyto(theta, new_theta)
        for a, b in zip(self.arrays, (b for f in new_state._fields[1:] for b in getattr(new_state, f))):
            np.copyto(a, b)


# -- history and progress ------------------------------------------------------------------------------
def _metric_name(likelihood):
    return "val_accuracy" if likelihood == "categorical" else "val_rmse"


def new_history(validation: bool, likelihood: str) -> Dict[str, list]:
    """An empty history: "loss", "nll", "kl", and with validation "val_nll" and "val_accuracy"
    (categorical) or "val_rmse" (Gaussian)."""
    out = {k: [] for k in ("loss", "nll", "kl")}
    if validation:
        out["val_nll"] = []
        out[_metric_name(likelihood)] = []
    return out


class History:
    """Per-epoch figures in ``record`` (the model's history dict, appended to in place):
    "nll" the mean NLL per example over the epoch's minibatches, "kl" the mean of their KL values,
    "loss" = nll + kl / N, the cost F per example; validation figures when added.  Remembers at
    which step each epoch of this fit ended, to drop the epochs a rollback undoes."""

    def __init__(self, record: Dict[str, list], num_examples: int, per_epoch: int, epochs: int, likelihood: str):
        self.record, self.N, self.M, self.epochs = record, num_examples, per_epoch, epochs
        self.metric = _metric_name(likelihood)
        self._sums = [0.0, 0.0, 0]
        self._ends: List[int] = []

    def add_step(self, nll: float, kl: float, rows: int) -> None:
        """One minibatch's NLL sum over its ``rows`` examples and its KL value."""
        self._sums[0] += nll
        self._sums[1] += kl
        self._sums[2] += rows

    def end_epoch(self, step: int) -> None:
        """Close the epoch that ended at ``step`` (the number of steps taken)."""
        nll, kl, rows = self._sums
        self._ends.append(step)
        self.record["nll"].append(nll / rows)
        self.record["kl"].append(kl / self.M)
        self.record["loss"].append(nll / rows + self.record["kl"][-1] / self.N)
        self._sums = [0.0, 0.0, 0]

    def add_timing(self, seconds: float, wait_seconds: float) -> None:
        """A sharded fit's epoch: "seconds", the wall time of its steps, and "wait_seconds", the part
        spent waiting for the shards' gradients, after :meth:`end_epoch`.  Only sharded fits record
        them (the history of an unsharded fit is a pure function of the seed, compared bit for
        bit): epochs trained before, unsharded, get NaN, so that entry e is epoch e's."""
        for key, value in (("seconds", seconds), ("wait_seconds", wait_seconds)):
            values = self.record.setdefault(key, [])
            values.extend([math.nan] * (len(self.record["loss"]) - 1 - len(values)))
            values.append(value)

    def add_validation(self, nll: float, metric: float) -> None:
        self.record.setdefault("val_nll", []).append(nll)
        self.record.setdefault(self.metric, []).append(metric)

    def line(self, epoch: int, seconds: float) -> str:
        """The progress line of epoch ``epoch`` (from 0), after its figures were added."""
        r = self.record
        out = (f"epoch {epoch + 1:>4}/{self.epochs}  loss {r['loss'][-1]:.4f}  nll {r['nll'][-1]:.4f}  "
               f"kl {r['kl'][-1]:.1f}")
        if len(r.get("val_nll", ())) == len(r["loss"]):
            out += f"  val_nll {r['val_nll'][-1]:.4f}"
        if len(r.get("wait_seconds", ())) == len(r["loss"]):
            out += f"  waited {r['wait_seconds'][-1]:.1f} of {r['seconds'][-1]:.1f} s"
        return out + f"  ({seconds:.1f} s)"

    def roll_back(self, step: int) -> None:
        """Keep the epochs the parameters of ``step`` have completed (those of this fit that ended
        after it are dropped)."""
        keep = len(self.record["loss"]) - sum(end > step for end in self._ends)
        for values in self.record.values():
            del values[keep:]
        self._ends = [end for end in self._ends if end <= step]


# -- validation and early stopping ---------------------------------------------------------------------
def validation_metrics(model, X, y, num_samples: int, epoch: int):
    """(mean NLL per example, accuracy or RMSE) of ``model``'s predictive distribution on (X, y),
    from ``num_samples`` weight draws seeded by the epoch.  A ValueError when an output is not finite."""
    if model.likelihood == "categorical":
        p = model.predict_proba(X, num_samples=num_samples, rng=epoch)
        nll = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
        return nll, float(np.mean(p.argmax(axis=1) == y))
    mean, std = model.predict(X, num_samples=num_samples, return_std=True, rng=epoch)
    y2 = y.reshape(mean.shape)
    nll = float(np.mean(0.5 * ((y2 - mean) / std) ** 2 + np.log(std) + 0.5 * math.log(2 * math.pi)))
    return nll, float(np.sqrt(np.mean((y2 - mean) ** 2)))


class EarlyStop:
    """Stop when the validation NLL has not improved for ``patience`` epochs
    (:class:`vigrad.optim.EarlyStopping`), keeping a copy of the parameters of the best epoch."""

    def __init__(self, patience: int):
        self.rule = _optim.EarlyStopping(patience=check_num_samples(patience, "early_stopping"))
        self.state = self.rule.init()
        self.best: Optional[np.ndarray] = None

    def update(self, value: float, theta) -> bool:
        """Record an epoch's validation NLL with its parameters; True when training should stop."""
        self.state, stop, improved = self.rule.update(self.state, value)
        if improved:
            self.best = theta.copy()
        return stop

    def restore(self, theta) -> None:
        """Put the best epoch's parameters into ``theta`` (nothing when no epoch was validated)."""
        if self.best is not None:
            theta[...] = self.best


# -- checkpoints ---------------------------------------------------------------------------------------
def check_checkpointable(optimizer, checkpoint, resume) -> None:
    """Checkpoints hold Adam's state; resuming needs an existing checkpoint."""
    if (checkpoint is not None or resume) and optimizer.name != "adam":
        raise ValueError(f"checkpoint and resume keep Adam's state; optimizer {optimizer.name!r} has no checkpoint "
                         f"format (train with Adam, or without checkpoint)")
    if resume and (checkpoint is None or not os.path.exists(checkpoint)):
        raise ValueError(f"resume=True needs an existing checkpoint file, got {checkpoint!r}")


def restore_checkpoint(model, path) -> int:
    """Load ``path`` (written by ``model.save``) into ``model``: parameters, Adam state, noise key,
    history.  Returns the number of epochs it holds, where the fit continues."""
    saved = type(model).load(path)
    if saved.sizes != model.sizes or saved._theta.shape != model._theta.shape:
        raise ValueError("the checkpoint holds a different architecture")
    model._theta[...] = saved._theta
    model._opt_state = saved._opt_state
    model._base_key = saved._base_key
    model.history = saved.history
    return len(model.history.get("loss", []))


# -- rollback ------------------------------------------------------------------------------------------
#: A fit copies (parameters, optimiser state) every this many steps to be able to roll back.
SNAPSHOT_EVERY = 32


class Rewind:
    """What fit needs to put the model back at any step since the older of two snapshots of its
    arrays (parameters, optimiser state), taken every SNAPSHOT_EVERY steps, and the minibatches
    since.  A step is a pure function of the parameters, the optimiser state, the minibatch and
    the step number, so replaying the recorded steps from a snapshot gives the state of a later
    step bit for bit, without a copy per step (a copy costs about a fifth of a step of a
    784-400-400-10 net)."""

    def __init__(self, arrays, start: int):
        self.arrays = arrays
        self.start = start
        self.snaps = []  # [(step, copies of arrays)], oldest first, at most two
        self.batches = {}  # step -> (minibatch indices, index in the epoch)

    def record(self, step: int, indices, i: int) -> None:
        """Called before each step: snapshot when one is due, and remember the minibatch."""
        if not self.snaps or step - self.snaps[-1][0] >= SNAPSHOT_EVERY:
            if len(self.snaps) == 2:
                old, bufs = self.snaps.pop(0)
                for s in range(old, self.snaps[0][0]):
                    del self.batches[s]
                for b, a in zip(bufs, self.arrays):
                    np.copyto(b, a)
            else:
                bufs = tuple(a.copy() for a in self.arrays)
            self.snaps.append((step, bufs))
        self.batches[step] = (indices, i)

    def rewind(self, target: int, replay) -> int:
        """Put the arrays at step ``target`` (at least the fit's first step), replaying the steps
        from the snapshot before it with ``replay(step, indices, i)``; returns that step."""
        target = max(target, self.start)
        if not self.snaps:  # nothing ran
            return target
        step, bufs = next(sn for sn in reversed(self.snaps) if sn[0] <= target)
        for a, b in zip(self.arrays, bufs):
            np.copyto(a, b)
        for s in range(step, target):
            replay(s, *self.batches[s])
        return target
