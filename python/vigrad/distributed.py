"""Data parallelism on Dask: a log joint whose likelihood is summed over shards of the data.

Optional extra: ``pip install "vigrad[dask]"``.  Only this module imports dask, and only when a
client is given.

The estimators are pure functions of (parameters, key, rows of data), so only parameters travel:
:func:`shard_log_joint` places the rows on the workers once, and each call sends the samples ``z``
out and brings back one ``(values, grads)`` pair per shard, which the caller adds in shard order.
With ``client=None`` the same split runs in this process with the same additions in the same order,
so the two give the same bits.
"""

from __future__ import annotations

import numbers
import threading
from typing import Callable, Sequence

import numpy as np

__all__ = ["ShardError", "shard_log_joint", "split_rows"]


class ShardError(RuntimeError):
    """A shard's ``log_lik`` raised, returned something malformed, or the cluster failed.

    ``shard`` is the index of the shard (None when the failure is the cluster's); the original
    exception is chained as ``__cause__``.
    """

    def __init__(self, message: str, shard: int | None = None):
        super().__init__(message)
        self.shard = shard


def split_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """The row ranges ``[start, stop)`` of ``shards`` contiguous shards of ``n`` rows.

    The first ``n % shards`` shards get one row more (as ``numpy.array_split``).  The split depends
    on ``n`` and ``shards`` only.

    >>> split_rows(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _check_data(data) -> tuple[list, int]:
    if not isinstance(data, (tuple, list)) or len(data) == 0:
        raise TypeError(f"data must be a non-empty tuple of arrays with one row per example, got {type(data).__name__}")
    arrays, rows = [], []
    for i, a in enumerate(data):
        if hasattr(a, "chunks") and hasattr(a, "compute"):  # a dask array: rows are taken lazily
            arr = a
        else:
            arr = np.asarray(a)
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"data[{i}] must be a numeric array, got dtype {arr.dtype}")
        if arr.ndim < 1:
            raise ValueError(f"data[{i}] must have at least one axis (the rows), got a scalar")
        arrays.append(arr)
        rows.append(int(arr.shape[0]))
    if len(set(rows)) != 1:
        raise ValueError(f"the arrays of data must have the same number of rows, got {rows}")
    return arrays, rows[0]


def _materialise(a, start: int, stop: int) -> np.ndarray:
    part = a[start:stop]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.ascontiguousarray(part)


def _check_result(res, S: int, d: int, dtype, shard: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(res, tuple) or len(res) != 2:
        raise ShardError(f"log_lik on shard {shard} must return (values (S,), grads (S, d)), "
                         f"got {type(res).__name__}", shard)
    v, g = np.asarray(res[0]), np.asarray(res[1])
    if v.shape != (S,) or g.shape != (S, d):
        raise ShardError(f"log_lik on shard {shard} must return values of shape {(S,)} and grads of shape "
                         f"{(S, d)}, got {v.shape} and {g.shape}", shard)
    return v.astype(dtype, copy=False), g.astype(dtype, copy=False)


def _call_shard(log_lik, z, arrays, shard):
    """Runs on the worker that holds the shard (or in this process): one shard's likelihood."""
    z = np.array(z, copy=True)
    z.setflags(write=False)
    return log_lik(z, *arrays)


class _ShardedLogJoint:
    """``log_joint(z) -> (values (S,), grads (S, d))`` summed over the shards (see shard_log_joint)."""

    # how often one call may place a lost shard again before it gives up
    _MAX_PLACEMENTS = 3

    def __init__(self, log_lik, arrays, n, shards, client, log_prior):
        self.log_lik, self.log_prior, self.client = log_lik, log_prior, client
        self.shards, self.rows = shards, n
        self.bounds = split_rows(n, shards)
        self._lock = threading.Lock()
        self._arrays = arrays
        if client is None:
            self._local = [[_materialise(a, s, e) for a in arrays] for s, e in self.bounds]
            self._futures = None
        else:
            self._local = None
            self._futures = [self._place(i) for i in range(shards)]

    def _place(self, i, pin=True):
        """Sends shard i's rows to the workers: to one chosen by the shard's index (``pin``; else
        where the scheduler likes), and a copy to a second worker where there is one, so that
        losing one worker usually loses no shard.  Dask's memory manager may drop the extra copy
        later: a shard whose every copy was lost is placed again from this process's arrays
        (see _remote)."""
        s, e = self.bounds[i]
        parts = [_materialise(a, s, e) for a in self._arrays]
        workers = sorted(self.client.scheduler_info()["workers"])
        where = [workers[i % len(workers)]] if pin and workers else None
        # hash=False: two equal shards are still two objects
        fut = self.client.scatter(parts, workers=where, hash=False)
        if len(workers) > 1:
            try:
                self.client.replicate(fut, n=2)
            except Exception:  # best effort: a worker may be leaving right now
                pass
        return fut

    def __repr__(self):
        where = "this process" if self.client is None else f"{len(self.client.scheduler_info()['workers'])} workers"
        return f"<sharded log joint: {self.rows} rows in {self.shards} shards on {where}>"

    def __call__(self, z):
        z = np.asarray(z)
        if z.ndim != 2 or z.dtype.kind != "f":
            raise ValueError(f"z must be a float array of shape (S, d), got dtype {z.dtype} and shape {z.shape}")
        S, d = z.shape
        if self.client is None:
            results = []
            for i, arrays in enumerate(self._local):
                try:
                    results.append(_call_shard(self.log_lik, z, arrays, i))
                except Exception as exc:
                    raise ShardError(f"log_lik raised on shard {i}: {type(exc).__name__}: {exc}", i) from exc
        else:
            results = self._remote(z)
        values = np.zeros(S, z.dtype)
        grads = np.zeros((S, d), z.dtype)
        for i, res in enumerate(results):  # shard order: the same additions however they ran
            v, g = _check_result(res, S, d, z.dtype, i)
            values += v
            grads += g
        if self.log_prior is not None:
            zp = np.array(z, copy=True)
            zp.setflags(write=False)
            v, g = _check_result(self.log_prior(zp), S, d, z.dtype, -1)
            values += v
            grads += g
        return values, grads

    def _remote(self, z):
        client = self.client
        if getattr(client, "status", "running") != "running":
            raise ShardError(f"the Dask client is {client.status}; the sharded log joint needs a running client")
        with self._lock:
            # z travels inside each task (S x d numbers), not scattered to one worker first: a
            # task whose worker dies is simply run again elsewhere, with nothing to re-fetch
            zc = np.array(z, copy=True)
            results = [None] * self.shards
            todo = list(range(self.shards))
            for attempt in range(self._MAX_PLACEMENTS):
                try:
                    futs = {i: client.submit(_call_shard, self.log_lik, zc, self._futures[i], i, pure=False)
                            for i in todo}
                except Exception as exc:
                    raise ShardError(f"could not send the samples to the workers: {type(exc).__name__}: "
                                     f"{exc}") from exc
                lost = []
                for i, f in futs.items():
                    try:
                        results[i] = f.result()
                    except Exception as exc:
                        name = type(exc).__name__
                        if name in ("FutureCancelledError", "CancelledError") and attempt + 1 < self._MAX_PLACEMENTS:
                            lost.append(i)  # every copy of the shard's rows went with a dead worker
                        elif name in ("FutureCancelledError", "CancelledError", "CommClosedError",
                                      "TimeoutError", "KilledWorker"):
                            raise ShardError(f"the cluster failed while computing shard {i}: {name}: {exc}",
                                             i) from exc
                        else:
                            raise ShardError(f"log_lik raised on shard {i}: {name}: {exc}", i) from exc
                if not lost:
                    break
                try:
                    for i in lost:
                        self._futures[i] = self._place(i, pin=False)
                except Exception as exc:
                    raise ShardError(f"could not place shard {i} on the workers again: {type(exc).__name__}: "
                                     f"{exc}", i) from exc
                todo = lost
            return results


def shard_log_joint(log_lik: Callable, data: Sequence, *, client=None, log_prior: Callable | None = None,
                    shards: int | None = None) -> Callable:
    """A log joint whose likelihood runs on the shards of ``data``, for ``vg.fit`` and the estimators.

    Parameters
    ----------
    log_lik : callable
        ``log_lik(z, *shard_arrays) -> (values (S,), grads (S, d))``: the log-likelihood of one
        shard's rows and its gradient in ``z`` (S, d).  ``z`` is read-only.  It is pickled and sent to
        the workers once per call (keep it a module-level function or a small closure).
    data : tuple of arrays
        Arrays with the same number of rows, e.g. ``(X, y)``; NumPy arrays or dask arrays (taken row
        range by row range).  The rows are split into ``shards`` contiguous parts (see
        :func:`split_rows`).
    client : dask.distributed.Client or None
        With a client, each shard is placed on the workers once (on two workers where there are two
        or more, so that losing one loses no shard) and stays there; each call sends ``z`` to the
        workers and brings back one ``(values, grads)`` per shard.  Without one, the same split runs
        in this process.
    log_prior : callable, optional
        ``log_prior(z) -> (values, grads)``, evaluated once per call in this process and added last.
    shards : int, optional
        The number of parts, 1 <= shards <= rows; default: one per worker with a client, 1 without.

    Returns
    -------
    callable
        ``log_joint(z) -> (values (S,), grads (S, d))``: the shards' results added in shard order,
        then ``log_prior``.  For the same ``shards`` the result is the same bits with or without a
        client.

    Raises
    ------
    ShardError
        From the returned callable: a shard's ``log_lik`` raised (its index is ``.shard``, its
        exception the ``__cause__``), returned the wrong shapes, or the cluster failed.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.arange(12.0).reshape(6, 2); y = np.ones(6)
    >>> def log_lik(z, X, y):
    ...     r = y - z @ X.T                      # (S, rows)
    ...     return -0.5 * (r * r).sum(axis=1), r @ X
    >>> lj = shard_log_joint(log_lik, (X, y), shards=3)
    >>> v, g = lj(np.zeros((2, 2)))
    >>> float(v[0]), g.shape
    (-3.0, (2, 2))
    """
    if not callable(log_lik):
        raise TypeError(f"log_lik must be callable, got {type(log_lik).__name__}")
    if log_prior is not None and not callable(log_prior):
        raise TypeError(f"log_prior must be callable or None, got {type(log_prior).__name__}")
    arrays, n = _check_data(data)
    if client is not None:
        status = getattr(client, "status", None)
        if not hasattr(client, "submit") or not hasattr(client, "scatter"):
            raise TypeError(f"client must be a dask.distributed.Client or None, got {type(client).__name__}")
        if status != "running":
            raise ValueError(f"client must be running, got status {status!r}")
        n_workers = len(client.scheduler_info()["workers"])
        if n_workers < 1:
            raise ValueError("client has no workers")
    if shards is None:
        shards = n_workers if client is not None else 1
    if isinstance(shards, bool) or not isinstance(shards, numbers.Integral):
        raise TypeError(f"shards must be an int, got {type(shards).__name__}")
    shards = int(shards)
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be between 1 and the number of rows ({n}), got {shards}")
    return _ShardedLogJoint(log_lik, arrays, n, shards, client, log_prior)
