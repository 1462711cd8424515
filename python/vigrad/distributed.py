"""Data parallelism on Dask: a log joint summed over shards of the data, and the sharded
minibatch gradient of :meth:`vigrad.BayesianMLP.fit`.

Optional extra: ``pip install "vigrad[dask]"``.  Only this module imports dask, and only when a
client is given.

The estimators are pure functions of (parameters, key, rows of data), and the noise is regenerated
from the key where it is used, so only parameters travel:

- :func:`shard_log_joint` places the rows on the workers once; each call sends the samples ``z``
  out and brings back one ``(values, grads)`` pair per shard, which the caller adds in shard order.
- ``BayesianMLP.fit(X, y, ..., client=client)`` places the training set on the workers once; each
  step sends the parameters and the row indices of each shard of the minibatch out and brings
  back one gradient per shard (see ``_MinibatchShards``).

With ``client=None`` the same split runs in this process with the same additions in the same order,
so the two give the same bits.  A call waits at most :data:`TIMEOUT` seconds for the workers and
checks every half second that the client still has its scheduler: a lost scheduler is a
:class:`ShardError` at once, never a hang.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
import time
import warnings
from typing import Callable, List, Sequence

import numpy as np

__all__ = ["ShardError", "TIMEOUT", "shard_log_joint", "split_rows"]

#: The longest a call waits for its parts, in seconds, before it raises ShardError (a worker that
#: hangs); a lost scheduler or a closed client is an error at once, whatever this says.
TIMEOUT = 600.0
# how often a wait looks at the client's connection to its scheduler, in seconds
_POLL = 0.5
# exceptions by which Dask reports a failure of the cluster rather than of the task
_CLUSTER_FAILURES = ("CommClosedError", "KilledWorker")


class ShardError(RuntimeError):
    """A shard's task raised, returned something malformed, or the cluster failed.

    ``shard`` is the index of the shard (None when the failure is the cluster's as a whole);
    ``step`` the step of BayesianMLP.fit it happened at (None for a sharded log joint).  The
    original exception, if any, is chained as ``__cause__``.
    """

    def __init__(self, message: str, shard: int | None = None, step: int | None = None):
        super().__init__(message)
        self.shard = shard
        self.step = step

    def __reduce__(self):
        return type(self), (str(self), self.shard, self.step)


def split_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """The row ranges ``[start, stop)`` of ``shards`` contiguous shards of ``n`` rows.

    The first ``n % shards`` shards get one row more (as ``numpy.array_split``).  The split depends
    on ``n`` and ``shards`` only; with ``n < shards`` the last shards are empty.  (A pure function:
    nothing is sent anywhere.)

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


def _check_client(client) -> int:
    """The number of workers of a running client; TypeError / ValueError otherwise."""
    if not hasattr(client, "submit") or not hasattr(client, "scatter") or not hasattr(client, "scheduler_info"):
        raise TypeError(f"client must be a dask.distributed.Client or None, got {type(client).__name__}")
    status = getattr(client, "status", None)
    if status != "running":
        raise ValueError(f"client must be running, got status {status!r}")
    n_workers = len(client.scheduler_info()["workers"])
    if n_workers < 1:
        raise ValueError("client has no workers (wait for them first: client.wait_for_workers(n))")
    return n_workers


def _check_shards(shards, most: int, what: str) -> int:
    if isinstance(shards, bool) or not isinstance(shards, numbers.Integral):
        raise TypeError(f"shards must be an int, got {type(shards).__name__}")
    shards = int(shards)
    if not 1 <= shards <= most:
        raise ValueError(f"shards must be between 1 and {what.format(most)}, got {shards}")
    return shards


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


# -- where the tasks run ---------------------------------------------------------------------------
class _TaskFailed(Exception):
    """A task raised ``exc`` (the caller words the error); ``index`` is the task's place in its call."""

    def __init__(self, index: int, exc: BaseException):
        super().__init__(index, exc)
        self.index, self.exc = index, exc


class _InProcess:
    """The executor of ``client=None``: one object per slot in this process, the tasks run in order
    (at :meth:`wait`)."""

    def __init__(self, objects):
        self.objects = objects

    def submit(self, tasks):
        return tasks

    def wait(self, tasks, what):
        out = []
        for j, (slot, fn, args) in enumerate(tasks):
            try:
                out.append(fn(self.objects[slot], *args))
            except Exception as exc:
                raise _TaskFailed(j, exc) from exc
        return out

    def cancel(self, tasks):
        pass

    def close(self):
        self.objects = []


class _OnCluster:
    """The executor of a client: one object per slot placed on the workers once, and tasks
    ``fn(object, *args)`` on them that survive a lost worker.

    ``make(slot)`` builds a slot's object in this process.  :meth:`place` sends it to the worker
    that holds the fewest slot objects (slot i to worker i while each has one) and, with
    ``copies=2``, a copy to a second worker.  A task runs where its object is (Dask's data
    locality); its other arguments travel inside the task.  When every copy of an object died with
    its workers (Dask's memory manager may drop an extra copy, so this is no rare case), the object
    is placed again from this process and the task run again, at most ``MAX_PLACEMENTS`` times in
    one call.  A wait checks every ``_POLL`` seconds that the client still has its scheduler and
    gives up after :data:`TIMEOUT` seconds."""

    MAX_PLACEMENTS = 3

    def __init__(self, client, make, slots: int, copies: int):
        self.client, self.make, self.copies = client, make, copies
        self.futures: list = [None] * slots
        try:
            for i in range(slots):
                self.futures[i] = self.place(i)
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(f"could not place the data on the workers: {type(exc).__name__}: {exc}") from exc

    def _keys(self, slot):
        f = self.futures[slot]
        return [] if f is None else [x.key for x in (f if isinstance(f, list) else [f])]

    def place(self, slot):
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:
            raise ShardError("the cluster has no workers to hold the data")
        held = dict.fromkeys(workers, 0)
        others = [k for j in range(len(self.futures)) if j != slot for k in self._keys(j)]
        if others:
            for addrs in self.client.who_has(others).values():
                for a in addrs:
                    if a in held:
                        held[a] += 1
        target = min(workers, key=lambda w: (held[w], (workers.index(w) - slot) % len(workers)))
        # hash=False: two equal objects are still two objects
        fut = self.client.scatter(self.make(slot), workers=[target], hash=False)
        if self.copies > 1 and len(workers) > 1:
            with contextlib.suppress(Exception):  # best effort: a worker may be leaving right now
                self.client.replicate(fut, n=self.copies)
        return fut

    def _place_again(self, slot, tries=3):
        """place(slot) while workers come and go: a worker listed a moment ago may be gone when
        the data reaches the scheduler (a KeyError there); try again half a second later."""
        for attempt in range(tries):
            try:
                return self.place(slot)
            except Exception:
                if attempt + 1 == tries or self.client.status != "running":
                    raise
                time.sleep(0.5)

    def submit(self, tasks):
        """Send the tasks ``[(slot, fn, args)]``; returns the handle :meth:`wait` takes."""
        client = self.client
        if getattr(client, "status", "running") != "running":
            raise ShardError(f"the Dask client is {client.status}; the sharded computation needs a running client")
        try:
            with warnings.catch_warnings():
                # the arguments travel inside each task on purpose: a task whose worker dies is run
                # again elsewhere with nothing to fetch first
                warnings.filterwarnings("ignore", message="Sending large graph")
                futs = [client.submit(fn, self.futures[slot], *args, pure=False) for slot, fn, args in tasks]
        except Exception as exc:
            raise ShardError(f"could not send the tasks to the workers: {type(exc).__name__}: {exc}") from exc
        return tasks, futs

    def cancel(self, handle):
        with contextlib.suppress(Exception):
            self.client.cancel(handle[1])

    def close(self):
        futures, self.futures = self.futures, []
        with contextlib.suppress(Exception):
            self.client.cancel([f for x in futures if x is not None for f in (x if isinstance(x, list) else [x])])

    def _lost_scheduler(self, what):
        return ShardError(f"{what}: the Dask client lost its scheduler (client status {self.client.status!r})")

    def _wait_done(self, futs, what):
        """Until no future of ``futs`` is pending (each finished, erred or cancelled); a lost
        scheduler or TIMEOUT seconds raise ShardError."""
        import distributed

        deadline = time.monotonic() + TIMEOUT
        pending = list(futs)
        while pending:
            if self.client.status != "running":
                raise self._lost_scheduler(what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShardError(f"{what}: the workers did not answer within {TIMEOUT:g} s "
                                 f"(vigrad.distributed.TIMEOUT)")
            try:
                distributed.wait(pending, timeout=min(_POLL, left))
            except TimeoutError:
                pass
            except Exception:  # Dask raises as soon as one is cancelled; the others may still run
                time.sleep(0.01)
            # ("lost": a result that died with its worker, which the scheduler computes again)
            pending = [f for f in pending if f.status in ("pending", "lost")]

    def wait(self, handle, what):
        """The tasks' results in order; ShardError when the cluster fails, _TaskFailed when a task raised."""
        tasks, futs = handle[0], list(handle[1])
        results = [None] * len(futs)
        todo = list(range(len(futs)))
        for attempt in range(self.MAX_PLACEMENTS):
            self._wait_done([futs[j] for j in todo], what)
            lost, done = [], []
            for j in todo:
                status = futs[j].status
                if status == "finished":
                    done.append(j)
                elif status == "error":
                    exc = futs[j].exception()
                    if type(exc).__name__ in _CLUSTER_FAILURES:
                        raise ShardError(f"{what}: the cluster failed while computing shard {j}: "
                                         f"{type(exc).__name__}: {exc}", j) from exc
                    raise _TaskFailed(j, exc) from exc
                elif self.client.status != "running":
                    raise self._lost_scheduler(what)
                else:  # cancelled: every copy of the task's object died with its workers
                    lost.append(j)
            try:
                for j, r in zip(done, self.client.gather([futs[j] for j in done])):
                    results[j] = r
            except Exception as exc:
                if self.client.status != "running":
                    raise self._lost_scheduler(what) from exc
                raise ShardError(f"{what}: could not fetch the results: {type(exc).__name__}: {exc}") from exc
            if not lost:
                return results
            if attempt + 1 < self.MAX_PLACEMENTS:
                try:
                    for slot in sorted({tasks[j][0] for j in lost}):
                        self.futures[slot] = self._place_again(slot)
                except Exception as exc:
                    if self.client.status != "running":
                        raise self._lost_scheduler(what) from exc
                    raise ShardError(f"{what}: could not place the data of shard {lost[0]} on the workers again: "
                                     f"{type(exc).__name__}: {exc}", lost[0]) from exc
                for j, f in zip(lost, self.submit([tasks[j] for j in lost])[1]):
                    futs[j] = f
                todo = lost
        raise ShardError(f"{what}: the data of shard {lost[0]} was lost with its workers {self.MAX_PLACEMENTS} "
                         f"times", lost[0])


# -- a sharded log joint ---------------------------------------------------------------------------
def _call_shard(arrays, log_lik, z, shard):
    """Runs on a worker that holds the shard (or in this process): one shard's likelihood."""
    z = np.array(z, copy=True)
    z.setflags(write=False)
    return log_lik(z, *arrays)


class _ShardedLogJoint:
    """``log_joint(z) -> (values (S,), grads (S, d))`` summed over the shards (see shard_log_joint)."""

    def __init__(self, log_lik, arrays, n, shards, client, log_prior):
        self.log_lik, self.log_prior, self.client = log_lik, log_prior, client
        self.shards, self.rows = shards, n
        self.bounds = split_rows(n, shards)
        self._lock = threading.Lock()

        def rows_of(i):
            s, e = self.bounds[i]
            return [_materialise(a, s, e) for a in arrays]

        if client is None:
            self._exec = _InProcess([rows_of(i) for i in range(shards)])
        else:  # two copies of each shard, so that losing one worker usually loses no shard
            self._exec = _OnCluster(client, rows_of, shards, copies=2)

    def __repr__(self):
        where = "this process" if self.client is None else f"{len(self.client.scheduler_info()['workers'])} workers"
        return f"<sharded log joint: {self.rows} rows in {self.shards} shards on {where}>"

    def __call__(self, z):
        z = np.asarray(z)
        if z.ndim != 2 or z.dtype.kind != "f":
            raise ValueError(f"z must be a float array of shape (S, d), got dtype {z.dtype} and shape {z.shape}")
        S, d = z.shape
        # z travels inside each task (S x d numbers): a task whose worker dies is simply run again
        # elsewhere, with nothing to fetch first
        zc = np.array(z, copy=True)
        tasks = [(i, _call_shard, (self.log_lik, zc, i)) for i in range(self.shards)]
        with self._lock:
            try:
                results = self._exec.wait(self._exec.submit(tasks), "the sharded log joint")
            except _TaskFailed as failed:
                exc = failed.exc
                raise ShardError(f"log_lik raised on shard {failed.index}: {type(exc).__name__}: {exc}",
                                 failed.index) from exc
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


def shard_log_joint(log_lik: Callable, data: Sequence, *, client=None, log_prior: Callable | None = None,
                    shards: int | None = None) -> Callable:
    """A log joint whose likelihood runs on the shards of ``data``, for ``vg.fit`` and the estimators.

    Parameters
    ----------
    log_lik : callable
        ``log_lik(z, *shard_arrays) -> (values (S,), grads (S, d))``: the log-likelihood of one
        shard's rows and its gradient in ``z`` (S, d).  ``z`` is read-only.  It is pickled and sent to
        the workers with every call (keep it a module-level function or a small closure).
    data : tuple of arrays
        Arrays with the same number of rows, e.g. ``(X, y)``; NumPy arrays or dask arrays (taken row
        range by row range).  The rows are split into ``shards`` contiguous parts (see
        :func:`split_rows`).
    client : dask.distributed.Client or None
        With a client, each shard is sent to the workers once, here (to two workers where there are
        two or more, so that losing one usually loses no shard), and stays there; a shard whose
        every copy is lost is sent again from this process.  Each call then sends ``z`` (S x d
        numbers) and ``log_lik`` inside each shard's task and brings back one ``(values, grads)``
        per shard (S x (d + 1) numbers); the rows never travel again.  Without one, the same split
        runs in this process.
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
        exception the ``__cause__``), returned the wrong shapes, or the cluster failed (a lost
        scheduler at once; workers silent for :data:`TIMEOUT` seconds).

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
    n_workers = None if client is None else _check_client(client)
    if shards is None:
        shards = n_workers if client is not None else 1
    shards = _check_shards(shards, n, "the number of rows ({})")
    return _ShardedLogJoint(log_lik, arrays, n, shards, client, log_prior)


# -- the sharded minibatch gradient of BayesianMLP.fit ---------------------------------------------
class _Held:
    """What one worker holds for a sharded fit, sent once: the model's recipe (architecture, prior,
    dtype, noise key; no parameters) and the training arrays.  The model replicas that compute the
    shards' gradients are built where it lives, on first use, one per task running at once."""

    def __init__(self, meta, X, y, workers=None):
        self.meta, self.X, self.y, self.workers = meta, X, y, workers
        self._pool: List = []
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"meta": self.meta, "X": self.X, "y": self.y, "workers": None}

    def __setstate__(self, state):
        self.__init__(state["meta"], state["X"], state["y"], state["workers"])

    @contextlib.contextmanager
    def replica(self):
        from .bnn import BayesianMLP

        with self._lock:
            model = self._pool.pop() if self._pool else None
        if model is None:
            model = BayesianMLP._from_metadata(self.meta, workers=self.workers)
        try:
            yield model
        finally:
            with self._lock:
                self._pool.append(model)


def _shard_gradient(held, theta, step, indices, row_offset, kl_weight):
    """Runs where ``held`` is: for the parameters ``theta``, the gradient sum (and the NLL sum) of
    the training rows ``indices``, which sit at ``[row_offset, row_offset + len(indices))`` in
    the minibatch of ``step``, without the KL part."""
    with held.replica() as model:
        np.copyto(model._theta, theta)
        nll, _ = model._minibatch_gradient(held.X[indices], held.y[indices], kl_weight, step, row_offset=row_offset,
                                           with_kl=False)
        return model._grad.copy(), nll


def _format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _check_fit_shards(client, shards, batch_rows: int):
    """The shard count of ``BayesianMLP.fit(..., client, shards)`` (None: no sharding), checked
    before any work: ``client`` running with workers, 1 <= shards <= the rows of a minibatch."""
    if client is None and shards is None:
        return None
    n_workers = None if client is None else _check_client(client)
    if shards is None:
        shards = n_workers
    return _check_shards(shards, batch_rows, "the rows of a minibatch (batch_size {})")


class _MinibatchShards:
    """The gradient of a minibatch computed in ``shards`` parts, on a client's workers or in this
    process (``client=None``), for :meth:`vigrad.BayesianMLP.fit`.

    Shard j computes the minibatch's rows at the positions ``split_rows(B, shards)[j]``, with the
    step's noise keys and ``row_offset`` = its first position, without the KL part: the
    per-example noise ("local", "flipout") is keyed by the row's position in the minibatch, so
    every example gets the noise it gets unsharded (keying it by the row's index in the training
    set instead would change the bits of every unsharded fit).  The driver adds the parts in shard
    order, then the KL part, which it computes itself (once, while the workers compute).

    What travels.  Each step sends every shard the parameters (2P + 1 numbers, inside its task,
    through the scheduler) and brings back its gradient (the same size): 2 x (2P + 1) x dtype size
    bytes per shard, whatever else is done.  For the rows there were three ways:

    (a) send each shard's minibatch rows with its task: B x (D + 1) x dtype size bytes per step;
    (b) place the training set on each worker once and send each shard's row indices: B x 8 bytes
        per step;
    (c) place a partition of the training set (N / k rows per worker) and let each worker take the
        minibatch rows of its part.

    This is (b), because every step waits for its slowest message: for 784-400-400-10 in float32
    on two shards (15.3 MB of parameters and gradients per step), (a) adds 0.40 MB per step at
    batch 128 and 12.9 MB at batch 4096, (b) 1 kB and 33 kB.  The placement is paid once, before
    the first step: N x (D + 1) numbers to each of k workers, in total what (a) sends in k epochs
    (so in bytes summed over a fit (b) wins when it runs for more epochs than there are workers;
    per step it always does).  (c) would hold N / k rows per worker instead of N, but a
    minibatch's rows fall into the parts at random, so the parts' sizes vary from step to step
    (the slowest sets the pace) and each worker would need the noise of scattered positions; and
    BayesianMLP.fit takes X as one array in this process, so the training set fits one machine
    anyway.  All three give the same bits: the same rows with the same noise, and only integers
    and parameters in transit, which arrive as they left.  A worker that dies takes its copy
    with it; the shard's task is run again after the copy is placed again from this process (no
    step is lost or changed).
    """

    def __init__(self, model, X, y, shards: int, client=None):
        meta = model._metadata()
        meta.pop("history")  # the recipe only
        self.model, self.X, self.y, self.shards, self.client = model, X, y, shards, client
        self.wait_seconds = 0.0
        self._empty = (X[:0], y[:0])
        self._in_process = None
        if client is None:
            self.slots = 1
            self._exec = _InProcess([_Held(meta, X, y, workers=model.workers)])
        else:
            self.slots = len(client.scheduler_info()["workers"])
            self._exec = _OnCluster(client, lambda slot: _Held(meta, X, y), self.slots, copies=1)

    def in_process(self) -> "_MinibatchShards":
        """The same split in this process: the rollback replays steps with it, without the cluster."""
        if self.client is None:
            return self
        if self._in_process is None:
            self._in_process = _MinibatchShards(self.model, self.X, self.y, self.shards)
        return self._in_process

    def describe(self, batch_rows: int) -> str:
        """What the progress output says about the split: the workers, the shards, the bytes per step."""
        k = min(self.shards, batch_rows)
        if self.client is None:
            return f"sharded fit: each minibatch in {self.shards} shards, in this process (nothing sent)"
        workers = sorted(self.client.scheduler_info()["workers"])
        p = self.model._theta.nbytes
        return (f"sharded fit on {len(workers)} Dask workers ({', '.join(workers)}): each minibatch in "
                f"{self.shards} shards; per step {_format_bytes(2 * k * p + 8 * batch_rows)} sent and received: "
                f"{_format_bytes(p)} of parameters out to each shard, {_format_bytes(p)} of gradient back from "
                f"each, {_format_bytes(8 * batch_rows)} of row indices; the training set "
                f"({_format_bytes(self.X.nbytes + self.y.nbytes)}) was sent once to each worker")

    def gradient(self, indices, kl_weight: float, step: int):
        """The gradient of the minibatch ``indices`` at ``step`` into ``model._grad``; returns
        (NLL sum, KL).  Writes nothing of the model but that work array: a failure leaves the
        model as it was."""
        from .bnn import TrainingError

        model = self.model
        bounds = split_rows(len(indices), self.shards)
        ids = [j for j, (s, e) in enumerate(bounds) if e > s]  # (a short last minibatch may leave shards empty)
        theta = model._theta.copy()  # what the tasks see, whatever happens to the model meanwhile
        tasks = [(j % self.slots, _shard_gradient, (theta, step, indices[bounds[j][0]:bounds[j][1]], bounds[j][0],
                                                      kl_weight)) for j in ids]
        handle = self._exec.submit(tasks)
        try:  # the KL part, here, while the workers compute
            _, klv = model._threads["step"].run(lambda w: model._minibatch_gradient(*self._empty, kl_weight, step,
                                                                                     workers=w))
        except BaseException:
            self._exec.cancel(handle)
            raise
        t0 = time.perf_counter()
        try:
            parts = self._exec.wait(handle, f"step {step}")
        except _TaskFailed as failed:
            exc = failed.exc
            if isinstance(exc, TrainingError):
                raise exc from None
            raise ShardError(f"step {step}: shard {ids[failed.index]} raised {type(exc).__name__}: {exc}",
                             ids[failed.index], step) from exc
        except ShardError as exc:
            exc.step = step
            raise
        finally:
            self.wait_seconds += time.perf_counter() - t0
        total = parts[0][0]
        for g, _ in parts[1:]:  # shard order, then the KL part: the same additions wherever they ran
            total += g
        total += model._grad
        np.copyto(model._grad, total)
        nll = 0.0
        for _, v in parts:
            nll += v
        if not np.isfinite(model._grad).all():
            raise TrainingError(f"non-finite gradient at step {step}: the sum of the shards' parts", step)
        return nll, klv

    def close(self):
        """Let go of the data placed on the workers."""
        self._exec.close()
