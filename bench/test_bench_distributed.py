"""Issue 12: data-parallel Bayes by Backprop on Dask, against one process and PyTorch DDP.

The network of the Bayes-by-Backprop benchmark, 784-400-400-10, float32, categorical, reparam,
Adam 1e-3, trained on a pool of 8192 random rows with a global minibatch of 128 or 4096 rows.
Each round runs STEPS optimiser steps (1 with --benchmark-disable); throughput in examples/s is
STEPS x B / the round's time (``report_distributed.py`` prints it, with the per-step overhead).

impl
  one-process        BayesianMLP's own step (Adam fused into the backward pass), vigrad's threads
  in-process-k       the k-way split of a client of k workers, run in this process: the arithmetic
                     of a sharded step without the network (the KL part apart, Adam unfused)
  dask-k             a LocalCluster of k worker processes (1 thread each, Dask's default of
                     OMP_NUM_THREADS=1), the pool placed once outside the timing; per step the
                     parameters go out and a gradient comes back per worker
  dask-roundtrip-k   the communication alone: per step k tasks that take the parameters and
                     return an array of their size (np.negative: no compute to speak of)
  torch-ddp-2        the same network of vigrad.torch.BayesianLinear layers under PyTorch's
                     DistributedDataParallel, gloo on loopback, 2 processes of 1 thread, B/2
                     rows each (bench/ddp_worker.py)

The per-step overhead of the round trip is dask-1 minus one-process (what a user sees) and, for
the communication alone, dask-roundtrip-k.  (in-process-k computes the driver's KL part and the
shards one after the other, where dask-k computes them at the same time.)  Checks, outside the timing: dask-k gives the bits of
in-process-k from the same start; DDP's ranks hold the same parameters after a round.
A timing never decides anything here.  The machine where these ran for development is shared:
no figure is claimed; see bench/README.md for the cost model and how to run this on a quiet one.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import vigrad as vg
from vigrad import _trainer

from benchlib import tag

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
import vigrad.distributed as vgd  # noqa: E402

SIZES = [784, 400, 400, 10]
POOL = 8192
BATCHES = [128, 4096]
STEPS = {128: 10, 4096: 3}
KL_WEIGHT = 1.0 / 64
LOOPBACK_NO_DASHBOARD = dict(host="127.0.0.1", dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False})


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    return rng.random((POOL, 784), dtype=np.float32), rng.integers(0, 10, POOL)


def _batches(B, steps, seed):
    order = np.random.default_rng(seed)
    return [order.choice(POOL, B, replace=False) for _ in range(steps)]


def _steps(benchmark, B):
    return 1 if benchmark.disabled else STEPS[B]


class Trainer:
    """The steps of BayesianMLP.fit without its per-call set-up (the placement above all): the
    model's own fused step, or a sharded step (``shards``, with or without ``client``)."""

    def __init__(self, X, y, shards=None, client=None):
        self.model = vg.BayesianMLP(SIZES, likelihood="categorical", rng=0)
        m = self.model
        m._opt_state = (0, np.zeros_like(m._theta), np.zeros_like(m._theta))
        self.updater = _trainer.Updater(vg.optim.adam(1e-3), m._theta, m._opt_state[1], m._opt_state[2])
        self.X, self.y = X, y
        self.engine = None if shards is None else vgd._MinibatchShards(m, X, y, shards, client)
        self.step = 0

    def run(self, batches):
        m, up = self.model, self.updater
        for idx in batches:
            s = self.step
            if self.engine is None:
                nll, _ = m._threads["step"].run(lambda w: m._train_step(self.X[idx], self.y[idx], KL_WEIGHT, s, up,
                                                                        True, None, w))
            else:
                hyper = up.hyper(s)
                nll, _ = self.engine.gradient(idx, KL_WEIGHT, s)
                m._apply_update(s, up, None, m.workers, hyper)
            self.step += 1
        return nll

    def close(self):
        if self.engine is not None:
            self.engine.close()


@pytest.fixture(scope="module", params=[1, 2], ids=lambda k: f"workers{k}")
def client(request):
    k = request.param
    with distributed.LocalCluster(n_workers=k, threads_per_worker=1, processes=True, **LOOPBACK_NO_DASHBOARD) as cl, \
            distributed.Client(cl) as c:
        c.wait_for_workers(k, timeout=120)
        yield c


def _group(B):
    return f"dist-784-400-400-10-b{B}"


@pytest.mark.parametrize("B", BATCHES)
def test_one_process(benchmark, pool, B):
    steps = _steps(benchmark, B)
    t = Trainer(*pool)
    t.run(_batches(B, 1, 9))  # warm up
    batches = _batches(B, steps, 1)
    tag(benchmark, _group(B), impl="one-process", batch=B, steps_per_round=steps, examples_per_round=B * steps)
    assert np.isfinite(benchmark.pedantic(t.run, args=(batches,), rounds=3, iterations=1))


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("k", [1, 2])
def test_in_process_shards(benchmark, pool, B, k):
    steps = _steps(benchmark, B)
    t = Trainer(*pool, shards=k)
    t.run(_batches(B, 1, 9))
    batches = _batches(B, steps, 1)
    tag(benchmark, _group(B), impl=f"in-process-{k}", batch=B, shards=k, steps_per_round=steps,
        examples_per_round=B * steps)
    assert np.isfinite(benchmark.pedantic(t.run, args=(batches,), rounds=3, iterations=1))


@pytest.mark.parametrize("B", BATCHES)
def test_dask(benchmark, pool, client, B):
    k = len(client.scheduler_info()["workers"])
    steps = _steps(benchmark, B)
    t = Trainer(*pool, shards=k, client=client)
    try:
        t.run(_batches(B, 1, 9))  # warm up: the workers build their replicas
        batches = _batches(B, steps, 1)
        tag(benchmark, _group(B), impl=f"dask-{k}", batch=B, workers=k, steps_per_round=steps,
            examples_per_round=B * steps)
        assert np.isfinite(benchmark.pedantic(t.run, args=(batches,), rounds=3, iterations=1))
    finally:
        t.close()
    # the check: two steps from the same start give the bits of the same split in this process
    a, b = Trainer(*pool, shards=k, client=client), Trainer(*pool, shards=k)
    try:
        for tr in (a, b):
            tr.run(_batches(B, 2, 5))
        np.testing.assert_array_equal(a.model._theta, b.model._theta)
    finally:
        a.close()


def test_dask_roundtrip(benchmark, pool, client):
    """Parameters out, a gradient-sized array back, on every worker: the round trip alone."""
    k = len(client.scheduler_info()["workers"])
    theta = Trainer(*pool).model._theta.copy()

    def round_trips(n):
        for _ in range(n):
            futs = [client.submit(np.negative, theta, pure=False) for _ in range(k)]
            out = client.gather(futs)
        return out

    round_trips(2)
    steps = 1 if benchmark.disabled else 10
    tag(benchmark, "dist-roundtrip-784-400-400-10", impl=f"dask-roundtrip-{k}", workers=k, steps_per_round=steps,
        bytes_per_step=2 * k * theta.nbytes)
    out = benchmark.pedantic(round_trips, args=(steps,), rounds=3, iterations=1)
    np.testing.assert_array_equal(out[-1], -theta)


@pytest.fixture(scope="module")
def ddp(torch):
    """Two DDP ranks (bench/ddp_worker.py), waiting for commands on stdin."""
    pytest.importorskip("torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", VIGRAD_BENCH_POOL=str(POOL))
    procs = [subprocess.Popen([sys.executable, script, str(r), "2", str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for r in range(2)]

    def run(B, steps):
        for p in procs:
            p.stdin.write(f"run {B} {steps}\n")
            p.stdin.flush()
        replies = [p.stdout.readline().split() for p in procs]
        if not all(r and r[0] == "done" for r in replies):
            raise RuntimeError(f"a DDP rank failed: {replies}")
        return [(float(r[1]), float(r[2])) for r in replies]

    try:
        yield run
    finally:
        for p in procs:
            try:
                p.stdin.write("quit\n")
                p.stdin.close()
                p.wait(timeout=60)
            except Exception:
                p.kill()
                p.wait()


@pytest.mark.parametrize("B", BATCHES)
def test_torch_ddp(benchmark, ddp, B):
    steps = _steps(benchmark, B)
    ddp(B, 1)  # warm up
    tag(benchmark, _group(B), impl="torch-ddp-2", batch=B, workers=2, steps_per_round=steps,
        examples_per_round=B * steps)
    out = benchmark.pedantic(ddp, args=(B, steps), rounds=3, iterations=1)
    assert all(np.isfinite(loss) for loss, _ in out)
    assert out[0][1] == out[1][1]  # DDP kept the two ranks' parameters equal
