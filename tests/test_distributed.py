"""vigrad.distributed: a log joint summed over shards of the data, on Dask or in this process.

The oracle for the sums is the unsharded likelihood (equal up to the order of the additions) and,
for the engine, the same split run in this process (equal to the bit).
"""

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import vigrad as vg
from vigrad import distributed as vgd

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")

N, D = 20_000, 20
# every server on the loopback address; the scheduler's HTTP server (health, metrics) on a free
# port there, with no dashboard
LOOPBACK_NO_DASHBOARD = dict(dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False})


def logistic_log_lik(z, X, y):
    """Bernoulli log-likelihood of the rows (X, y) and its gradient in z, for z (S, d)."""
    eta = z @ X.T
    v = (y * eta - np.logaddexp(0.0, eta)).sum(axis=1)
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))
    return v, (y - p) @ X


def gaussian_log_prior(z):
    return -0.5 * np.sum(z * z, axis=1), -z


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D)) / np.sqrt(D)
    w = rng.standard_normal(D)
    y = (rng.random(N) < 1.0 / (1.0 + np.exp(-X @ w))).astype(np.float64)
    return X, y


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       **LOOPBACK_NO_DASHBOARD)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def test_split_rows_covers_every_row_once():
    for n in (1, 7, 10, 1001):
        for k in range(1, min(n, 9) + 1):
            b = vgd.split_rows(n, k)
            assert b[0][0] == 0 and b[-1][1] == n and len(b) == k
            assert all(s1 == e0 for (_, e0), (s1, _) in zip(b, b[1:]))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == [len(a) for a in np.array_split(np.arange(n), k)]


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_local_shards_sum_to_the_whole(data, shards):
    X, y = data
    z = np.random.default_rng(1).standard_normal((5, D))
    lj = vgd.shard_log_joint(logistic_log_lik, (X, y), shards=shards, log_prior=gaussian_log_prior)
    v, g = lj(z)
    v0, g0 = logistic_log_lik(z, X, y)
    p0, pg = gaussian_log_prior(z)
    # the same sums in another order: relative to the sum of magnitudes, a few ulps per term
    scale_v = np.abs(y[None, :] * (z @ X.T)).sum(axis=1) + np.abs(np.logaddexp(0, z @ X.T)).sum(axis=1)
    np.testing.assert_array_less(np.abs(v - (v0 + p0)), 1e-13 * scale_v + 1e-300)
    np.testing.assert_allclose(g, g0 + pg, rtol=1e-11, atol=1e-11 * np.abs(X).sum())


def test_client_gives_the_bits_of_the_local_split(data, client):
    X, y = data
    z = np.random.default_rng(2).standard_normal((8, D))
    remote = vgd.shard_log_joint(logistic_log_lik, (X, y), client=client, log_prior=gaussian_log_prior)
    local = vgd.shard_log_joint(logistic_log_lik, (X, y), shards=2, log_prior=gaussian_log_prior)
    assert remote.shards == 2  # default: one shard per worker
    for a, b in zip(remote(z), local(z)):
        np.testing.assert_array_equal(a, b)
    z32 = z.astype(np.float32)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    r32 = vgd.shard_log_joint(logistic_log_lik, (X32, y32), client=client, shards=3)(z32)
    l32 = vgd.shard_log_joint(logistic_log_lik, (X32, y32), shards=3)(z32)
    assert r32[0].dtype == np.float32 and r32[1].dtype == np.float32
    for a, b in zip(r32, l32):
        np.testing.assert_array_equal(a, b)


def test_vg_fit_on_the_cluster_equals_the_local_split(data, client):
    X, y = data
    kw = dict(rng=4, num_steps=60, map_init=False, psis_samples=0)
    remote = vgd.shard_log_joint(logistic_log_lik, (X, y), client=client, log_prior=gaussian_log_prior)
    local = vgd.shard_log_joint(logistic_log_lik, (X, y), shards=2, log_prior=gaussian_log_prior)
    a = vg.fit(remote, np.zeros(D), **kw)
    b = vg.fit(local, np.zeros(D), **kw)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.q.mean, b.q.mean)
    np.testing.assert_array_equal(a.q.cov, b.q.cov)
    # against the unsharded likelihood: only the order of the additions differs
    whole = vg.fit(lambda z: tuple(u + w for u, w in zip(logistic_log_lik(z, X, y), gaussian_log_prior(z))),
                   np.zeros(D), **kw)
    np.testing.assert_allclose(a.q.mean, whole.q.mean, rtol=1e-8, atol=1e-10)


def test_a_killed_worker_changes_no_bit(data, client):
    X, y = data
    kw = dict(rng=5, num_steps=40, map_init=False, psis_samples=0)
    lj = vgd.shard_log_joint(logistic_log_lik, (X, y), client=client)
    calls = {"n": 0}
    pids = client.run(os.getpid)  # worker address -> process id
    victim = pids[sorted(pids)[0]]

    def killing(z):
        calls["n"] += 1
        if calls["n"] == 15:  # mid-fit: SIGKILL one worker process; its nanny restarts it
            os.kill(victim, signal.SIGKILL)
        return lj(z)

    a = vg.fit(killing, np.zeros(D), **kw)
    b = vg.fit(vgd.shard_log_joint(logistic_log_lik, (X, y), shards=2), np.zeros(D), **kw)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.q.mean, b.q.mean)
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()  # it did die, and was replaced


def test_bad_input_is_refused_before_any_work(data, client):
    X, y = data
    with pytest.raises(ValueError, match=r"same number of rows, got \[20000, 19999\]"):
        vgd.shard_log_joint(logistic_log_lik, (X, y[:-1]))
    with pytest.raises(ValueError, match="shards must be between 1 and the number of rows"):
        vgd.shard_log_joint(logistic_log_lik, (X, y), shards=0)
    with pytest.raises(ValueError, match=r"number of rows \(3\), got 4"):
        vgd.shard_log_joint(logistic_log_lik, (X[:3], y[:3]), shards=4)
    with pytest.raises(TypeError, match="shards must be an int"):
        vgd.shard_log_joint(logistic_log_lik, (X, y), shards=2.0)
    with pytest.raises(TypeError, match="log_lik must be callable"):
        vgd.shard_log_joint(None, (X, y))
    with pytest.raises(TypeError, match="data must be a non-empty tuple"):
        vgd.shard_log_joint(logistic_log_lik, X)
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client"):
        vgd.shard_log_joint(logistic_log_lik, (X, y), client=object())


def test_a_shards_exception_reaches_the_caller_with_its_index(data, client):
    X, y = data

    start, stop = vgd.split_rows(N, 3)[2]
    first = float(X[start, 0])

    def log_lik(z, Xs, ys):
        if Xs.shape[0] == stop - start and float(Xs[0, 0]) == first:  # the third shard of three
            raise FloatingPointError("boom")
        return logistic_log_lik(z, Xs, ys)

    z = np.zeros((2, D))
    for kw in (dict(client=client, shards=3), dict(shards=3)):
        lj = vgd.shard_log_joint(log_lik, (X, y), **kw)
        with pytest.raises(vgd.ShardError, match="shard 2: FloatingPointError: boom") as info:
            lj(z)
        assert info.value.shard == 2
    bad_shape = vgd.shard_log_joint(lambda z, Xs, ys: (np.zeros(3), np.zeros((3, D))), (X, y), shards=2)
    with pytest.raises(vgd.ShardError, match=r"shard 0 must return values of shape \(2,\)"):
        bad_shape(z)


def test_a_closed_client_is_a_clear_error(data):
    X, y = data
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       **LOOPBACK_NO_DASHBOARD)
    c = distributed.Client(cluster)
    lj = vgd.shard_log_joint(logistic_log_lik, (X[:100], y[:100]), client=c)
    c.close()
    cluster.close()
    with pytest.raises(vgd.ShardError, match="client is closed"):
        lj(np.zeros((2, D)))
    with pytest.raises(ValueError, match="client must be running"):
        vgd.shard_log_joint(logistic_log_lik, (X, y), client=c)
    m = vg.BayesianMLP([D, 4, 2], likelihood="categorical", rng=0)
    with pytest.raises(ValueError, match="client must be running, got status 'closed'"):
        m.fit(X[:100], y[:100].astype(int), epochs=1, batch_size=50, client=c)
    assert m._opt_state is None


# -- BayesianMLP.fit on a client -------------------------------------------------------------------
#
# The oracle for the engine is the same k-way split run in this process (equal to the bit); for the
# arithmetic, the unsharded fit (equal up to the order of the gradient's sums).

ESTIMATORS = ["reparam", "local", "flipout"]
# The sharded and the unsharded gradient of a step add the same terms in another order: a few ulps
# of the largest terms.  Adam's update is invariant to the gradient's scale, so a relative change
# d of a gradient component changes its update by about lr * d; over the 30 steps of 2 epochs at
# lr 1e-3 the parameters drift by far less than 100 ulps of their scale (|theta| <= ~5).
# Measured on this machine (2 epochs, every estimator, 2 or 3 shards): at most one ulp of the
# largest entries (rho ~ -5), 4.8e-7 in float32 and 8.9e-16 in float64; the per-epoch loss within
# 1e-8 relative in float32 and 3e-16 in float64.
SHARDED_VS_WHOLE_ATOL = {np.dtype(np.float32): 5e-5, np.dtype(np.float64): 1e-13}


@pytest.fixture(scope="module")
def digits():
    from vigrad.datasets import load_digits

    return load_digits()


def _mlp(estimator="reparam", dtype=np.float32, likelihood="categorical", rng=7, **kw):
    out = 10 if likelihood == "categorical" else 1
    return vg.BayesianMLP([64, 32, out], likelihood=likelihood, estimator=estimator, dtype=dtype, rng=rng,
                          init_rho=-5.0, **kw)


def _assert_same_bits(a, b):
    np.testing.assert_array_equal(a._theta, b._theta)
    assert a._opt_state[0] == b._opt_state[0]
    np.testing.assert_array_equal(a._opt_state[1], b._opt_state[1])
    np.testing.assert_array_equal(a._opt_state[2], b._opt_state[2])
    for k in ("loss", "nll", "kl"):
        assert a.history[k] == b.history[k], k


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bnn_fit_on_the_cluster_gives_the_bits_of_the_local_split(digits, client, estimator, dtype):
    X, y = digits
    kw = dict(epochs=2, batch_size=128)
    remote = _mlp(estimator, dtype)
    h = remote.fit(X, y, client=client, **kw)  # shards: one per worker
    local = _mlp(estimator, dtype)
    local.fit(X, y, shards=2, **kw)
    _assert_same_bits(remote, local)
    assert len(h["seconds"]) == len(h["wait_seconds"]) == 2
    assert all(0.0 <= w <= s for w, s in zip(h["wait_seconds"], h["seconds"]))
    # against one machine: the same sums in another order
    whole = _mlp(estimator, dtype)
    whole.fit(X, y, **kw)
    assert "seconds" not in whole.history
    diff = np.abs(remote._theta - whole._theta).max()
    assert 0.0 < diff <= SHARDED_VS_WHOLE_ATOL[np.dtype(dtype)], diff
    np.testing.assert_allclose(remote.history["loss"], whole.history["loss"], rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_bnn_gaussian_learned_noise_two_samples_more_shards_than_workers(client):
    """The other paths of a step: the Gaussian likelihood with its learned noise scale (its own
    gradient entry), two weight samples, clipping, another optimiser (SGD with momentum), a
    minibatch in 3 parts on 2 workers, and a last minibatch with fewer rows than shards
    (194 = 3 x 64 + 2: its 2 rows in 3 parts)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(194, 64))
    y = np.tanh(X[:, :3].sum(axis=1))
    kw = dict(epochs=3, batch_size=64, clip_norm=50.0, optimizer=vg.optim.sgd(1e-4, momentum=0.9))
    remote = _mlp("flipout", np.float64, "gaussian", num_samples=2)
    remote.fit(X, y, client=client, shards=3, **kw)
    local = _mlp("flipout", np.float64, "gaussian", num_samples=2)
    local.fit(X, y, shards=3, **kw)
    _assert_same_bits(remote, local)
    whole = _mlp("flipout", np.float64, "gaussian", num_samples=2)
    whole.fit(X, y, **kw)
    np.testing.assert_allclose(remote._theta, whole._theta, rtol=0, atol=1e-13)
    assert remote.noise_scale != _mlp("flipout", np.float64, "gaussian").noise_scale  # it was trained


def test_bnn_fit_survives_a_killed_worker_with_the_same_bits(digits, client):
    X, y = digits
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)  # worker address -> process id
    victim = pids[sorted(pids)[0]]
    m = _mlp("local")
    calls = {"n": 0}
    kl_part = m._minibatch_gradient  # the driver computes each step's KL part with it

    def killing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-step: the workers hold step 4's tasks; SIGKILL one, its nanny restarts it
            os.kill(victim, signal.SIGKILL)
        return kl_part(*args, **kwargs)

    m._minibatch_gradient = killing
    m.fit(X, y, epochs=2, batch_size=128, client=client)
    del m._minibatch_gradient
    assert calls["n"] == 30
    oracle = _mlp("local")
    oracle.fit(X, y, epochs=2, batch_size=128, shards=2)
    _assert_same_bits(m, oracle)
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()  # it did die, and was replaced


def test_bnn_checkpoint_and_resume_on_the_cluster(digits, client, tmp_path):
    X, y = digits
    path = tmp_path / "model.npz"
    first = _mlp("flipout")
    first.fit(X, y, epochs=1, batch_size=128, client=client, checkpoint=path)
    resumed = _mlp("flipout", rng=99)  # another noise key: the checkpoint's must be the one sent out
    resumed.fit(X, y, epochs=3, batch_size=128, client=client, checkpoint=path, resume=True)
    oracle = _mlp("flipout")
    oracle.fit(X, y, epochs=3, batch_size=128, shards=2)
    _assert_same_bits(resumed, oracle)
    assert len(resumed.history["seconds"]) == 3
    _assert_same_bits(vg.BayesianMLP.load(path), oracle)


def test_bnn_fit_diverging_on_a_worker_rolls_back_to_the_local_bits(digits, client):
    """Step 30 takes a 1e30 step; the next step's loss is not finite on a worker.  Its
    TrainingError reaches this process with its step, and the rollback (replayed in this process)
    leaves the model as the local split left it after 2 epochs."""
    X, y = digits
    lr = lambda s: 1e-3 if s < 30 else 1e30  # noqa: E731
    m = _mlp()
    with np.errstate(all="ignore"), pytest.raises(vg.bnn.TrainingError, match="rolled back to the start of step 30"
                                                  ) as info:
        m.fit(X, y, epochs=4, batch_size=128, lr=lr, client=client)
    assert info.value.step == 31 and info.value.restored_step == 30
    oracle = _mlp()
    oracle.fit(X, y, epochs=2, batch_size=128, lr=lr, shards=2)
    _assert_same_bits(m, oracle)


def test_bnn_fit_progress_names_the_workers_shards_and_bytes(digits, client, capsys):
    X, y = digits
    m = _mlp()
    m.fit(X[:512], y[:512], epochs=1, batch_size=128, client=client, progress=True)
    err = capsys.readouterr().err
    workers = sorted(client.scheduler_info()["workers"])
    p = m._theta.nbytes  # (64*32 + 32 + 32*10 + 10) * 2 float32 numbers
    assert p == 2 * 2410 * 4
    assert f"sharded fit on 2 Dask workers ({', '.join(workers)}): each minibatch in 2 shards" in err
    assert f"per step {(4 * p + 8 * 128) / 1000:.2f} kB sent and received" in err
    assert "waited" in err


@pytest.mark.parametrize("kw,exc,match", [
    (dict(shards=0), ValueError, r"shards must be between 1 and the rows of a minibatch \(batch_size 16\), got 0"),
    (dict(shards=17), ValueError, r"shards must be between 1 and the rows of a minibatch \(batch_size 16\), got 17"),
    (dict(shards=2.0), TypeError, "shards must be an int, got float"),
    (dict(client=object()), TypeError, "client must be a dask.distributed.Client or None, got object"),
])
def test_bnn_fit_bad_input_is_refused_before_any_work(digits, kw, exc, match):
    X, y = digits
    m = _mlp()
    theta = m._theta.copy()
    with pytest.raises(exc, match=match):
        m.fit(X[:40], y[:40], epochs=1, batch_size=16, **kw)
    np.testing.assert_array_equal(m._theta, theta)
    assert m._opt_state is None and m.history == {}


def test_bnn_shard_raising_names_the_step_and_shard_and_leaves_the_model(digits, monkeypatch):
    """A shard's task that raises (here in this process, the same code as on a worker): a
    ShardError naming the step and the shard, and the model as a fit stopped at that step."""
    X, y = digits[0][:256], digits[1][:256]
    m = _mlp()
    m.fit(X, y, epochs=1, batch_size=64, shards=2)  # steps 0..3
    real = vgd._shard_gradient

    def failing(held, theta, step, indices, row_offset, kl_weight):
        if step == 8 and row_offset > 0:
            raise MemoryError("no room")
        return real(held, theta, step, indices, row_offset, kl_weight)

    monkeypatch.setattr(vgd, "_shard_gradient", failing)
    with pytest.raises(vgd.ShardError, match=r"step 8: shard 1 raised MemoryError: no room; the parameters and "
                                             r"the optimiser state are those at the start of step 8") as info:
        m.fit(X, y, epochs=2, batch_size=64, shards=2)  # steps 4..11
    assert info.value.step == 8 and info.value.shard == 1
    assert isinstance(info.value.__cause__.__cause__, MemoryError)
    oracle = _mlp()
    oracle.fit(X, y, epochs=1, batch_size=64, shards=2)
    oracle.fit(X, y, epochs=1, batch_size=64, shards=2)  # steps 4..7
    _assert_same_bits(m, oracle)


def _start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, **kw)


def _stop(proc):
    """End a process this test started, and its children (its own session), by its id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_bnn_fit_whose_client_loses_its_scheduler_raises_naming_the_step(digits, tmp_path):
    """A scheduler in its own process, SIGKILLed in the middle of step 15 (the first of epoch 2):
    the fit raises at once, naming the step, and leaves the model as a fit of one epoch (steps
    0..14) left it, with that epoch's history."""
    X, y = digits
    file = tmp_path / "scheduler.json"
    scheduler = _start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", str(file)])
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = _start(["distributed.cli.dask_worker", "--scheduler-file", str(file), "--nthreads", "1",
                         "--no-dashboard", "--host", "127.0.0.1"])
        with distributed.Client(scheduler_file=str(file), timeout=60) as c:
            c.wait_for_workers(1, timeout=60)
            m = _mlp("flipout")
            calls = {"n": 0}
            kl_part = m._minibatch_gradient

            def killing(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 16:  # step 15, its task sent
                    os.kill(scheduler.pid, signal.SIGKILL)
                return kl_part(*args, **kwargs)

            m._minibatch_gradient = killing
            t0 = time.monotonic()
            with pytest.raises(vgd.ShardError, match=r"step 15: the Dask client lost its scheduler .*those at the "
                                                     r"start of step 15, as a fit stopped there") as info:
                m.fit(X, y, epochs=3, batch_size=128, client=c)
            assert time.monotonic() - t0 < 30  # no hang: the client would try to reconnect for 60 s
            del m._minibatch_gradient
            assert info.value.step == 15
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                _stop(proc)
    oracle = _mlp("flipout")
    oracle.fit(X, y, epochs=1, batch_size=128, shards=1)
    _assert_same_bits(m, oracle)
    assert len(m.history["loss"]) == 1


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(vgd, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_example_runs(tmp_path):
    """The README's "Past one machine" example, as a user runs it (its own LocalCluster)."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Past one machine")[1].split("```python\n")[1].split("```")[0]
    script = tmp_path / "example.py"
    script.write_text(block)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sharded fit on 2 Dask workers" in run.stderr and "epoch    3/3" in run.stderr


def test_bnn_history_timing_lines_up_with_the_epochs(digits, tmp_path):
    """Entry e of "seconds" is epoch e's, also when the first epochs were trained unsharded."""
    X, y = digits[0][:256], digits[1][:256]
    path = tmp_path / "m.npz"
    m = _mlp()
    m.fit(X, y, epochs=1, batch_size=64, checkpoint=path)
    assert "seconds" not in m.history
    r = _mlp()
    r.fit(X, y, epochs=3, batch_size=64, shards=2, checkpoint=path, resume=True)
    assert len(r.history["loss"]) == len(r.history["seconds"]) == len(r.history["wait_seconds"]) == 3
    assert np.isnan(r.history["seconds"][0]) and np.isnan(r.history["wait_seconds"][0])
    assert all(0.0 <= w <= s for w, s in zip(r.history["wait_seconds"][1:], r.history["seconds"][1:]))
