"""Minibatch index streams for stochastic variational inference.

:func:`minibatches` yields the item indices of each minibatch together with the factor
``scale = n / len(indices)`` that makes ``scale * sum_{i in B} log p(y_i | w)`` an
unbiased estimate of the full-data log-likelihood ``sum_{i=1}^n log p(y_i | w)``:

* ``mode="shuffle"`` (Algorithm 1, sampling without replacement): each epoch draws a
  uniform random permutation of ``0..n-1`` and yields consecutive slices of it, so
  every item is used exactly once per epoch (the last batch is smaller when
  ``batch_size`` does not divide ``n``, or dropped with ``drop_last=True``).
* ``mode="replacement"`` (Algorithm 2): every batch is ``batch_size`` i.i.d. uniform
  draws from ``0..n-1``.

The stream is a pure function of the seed drawn from ``rng`` when :func:`minibatches`
is called: epoch ``e``'s permutation ("shuffle") or step ``s``'s draws ("replacement")
come from a child ``numpy.random.SeedSequence`` with spawn key ``(e,)`` or ``(s,)``, so
``start_step=k`` skips the first ``k`` batches in O(1) and a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from ._validation import check_num_samples, resolve_rng

__all__ = ["Batch", "minibatches", "num_batches"]

_MODES = ("shuffle", "replacement")


class Batch(NamedTuple):
    """One minibatch of :func:`minibatches`."""

    indices: np.ndarray
    """int64 indices of the batch's items in ``0..n-1``."""
    scale: float
    """``n / len(indices)``: multiplies the minibatch log-likelihood sum to make it unbiased."""
    epoch: int
    """Pass over the data: counted by permutations for "shuffle", ``step * batch_size // n`` for "replacement"."""
    step: int
    """Index of the batch in the stream, from 0."""


def _check_bool(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def num_batches(n, batch_size, drop_last=False) -> int:
    """Batches in one epoch of ``n`` items: ``ceil(n / batch_size)``, or ``n // batch_size`` with ``drop_last``.

    Examples
    --------
    >>> from vigrad import data
    >>> data.num_batches(10, 3), data.num_batches(10, 3, drop_last=True), data.num_batches(9, 3)
    (4, 3, 3)
    """
    n = check_num_samples(n, "n")
    batch_size = check_num_samples(batch_size, "batch_size")
    drop_last = _check_bool(drop_last, "drop_last")
    return n // batch_size if drop_last else -(-n // batch_size)


def _child_generator(entropy, key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(key,))))


def minibatches(n, batch_size, *, mode="shuffle", num_epochs=None, num_steps=None, drop_last=False,
                start_step=0, rng=None) -> Iterator[Batch]:
    """Stream the minibatches of ``n`` items (Algorithm 1 "shuffle", Algorithm 2 "replacement").

    Parameters
    ----------
    n : int
        >= 1, number of items.
    batch_size : int
        >= 1; at most ``n`` for ``mode="shuffle"``.
    mode : {"shuffle", "replacement"}
        Without replacement, a fresh permutation per epoch; or i.i.d. uniform draws.
    num_epochs : int or None
        ``mode="shuffle"`` only: stop after this many epochs.
    num_steps : int or None
        Stop after this many batches in all (counting those skipped by ``start_step``).
        Required for ``mode="replacement"``.  For "shuffle", when both are given the
        stream stops at whichever comes first; with neither, ``num_epochs=1``; with only
        ``num_steps``, the epochs are unlimited.
    drop_last : bool
        ``mode="shuffle"`` only: drop each epoch's last batch when it is smaller.
    start_step : int
        >= 0, skip the first ``start_step`` batches (to resume a run): the stream is then
        identical to the uninterrupted stream from that batch on.
    rng : int, numpy.random.Generator or None
        Seed for the stream (SPEC 7).  A Generator is advanced once, at this call.

    Returns
    -------
    iterator of Batch
        ``(indices, scale, epoch, step)``; ``indices`` is a new int64 array each time.

    Examples
    --------
    >>> from vigrad import data
    >>> for b in data.minibatches(5, 2, num_epochs=2, rng=0):
    ...     print(b.epoch, b.step, b.indices, b.scale)
    0 0 [1 0] 2.5
    0 1 [4 2] 2.5
    0 2 [3] 5.0
    1 3 [1 2] 2.5
    1 4 [3 0] 2.5
    1 5 [4] 5.0
    >>> [b.indices.tolist() for b in data.minibatches(10, 3, mode="replacement", num_steps=2, rng=0)]
    [[5, 6, 3], [3, 5, 9]]
    """
    n = check_num_samples(n, "n")
    batch_size = check_num_samples(batch_size, "batch_size")
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode must be 'shuffle' or 'replacement', got {mode!r}")
    if num_epochs is not None:
        num_epochs = check_num_samples(num_epochs, "num_epochs", minimum=0)
    if num_steps is not None:
        num_steps = check_num_samples(num_steps, "num_steps", minimum=0)
    drop_last = _check_bool(drop_last, "drop_last")
    start_step = check_num_samples(start_step, "start_step", minimum=0)

    if mode == "shuffle":
        if batch_size > n:
            raise ValueError(f"batch_size must be <= n ({n}) for mode='shuffle', got {batch_size}")
        per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if num_epochs is None and num_steps is None:
            num_epochs = 1
        total = num_steps
        if num_epochs is not None:
            total = num_epochs * per_epoch if total is None else min(total, num_epochs * per_epoch)
    else:
        if num_epochs is not None:
            raise ValueError("num_epochs applies to mode='shuffle' only; give num_steps for mode='replacement', "
                             f"got num_epochs={num_epochs}")
        if num_steps is None:
            raise ValueError("num_steps must be given for mode='replacement', got None")
        if drop_last:
            raise ValueError("drop_last applies to mode='shuffle' only (every 'replacement' batch is full), got True")
        total = num_steps
    if start_step > total:
        raise ValueError(f"start_step must be <= the stream's {total} batches, got {start_step}")

    entropy = [int(x) for x in resolve_rng(rng).integers(0, 2**63, size=2, dtype=np.int64)]

    if mode == "shuffle":
        return _shuffle_stream(n, batch_size, per_epoch, total, start_step, entropy)
    return _replacement_stream(n, batch_size, total, start_step, entropy)


def _shuffle_stream(n, batch_size, per_epoch, total, start_step, entropy):
    epoch, perm = -1, None
    for step in range(start_step, total):
        e, j = divmod(step, per_epoch)
        if e != epoch:
            epoch = e
            perm = _child_generator(entropy, e).permutation(n).astype(np.int64, copy=False)
        idx = perm[j * batch_size:(j + 1) * batch_size].copy()
        yield Batch(indices=idx, scale=n / len(idx), epoch=e, step=step)


def _replacement_stream(n, batch_size, total, start_step, entropy):
    scale = n / batch_size
    for step in range(start_step, total):
        idx = _child_generator(entropy, step).integers(0, n, size=batch_size, dtype=np.int64)
        yield Batch(indices=idx, scale=scale, epoch=step * batch_size // n, step=step)

