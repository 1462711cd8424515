"""vigrad.distributed: a log joint summed over shards of the data, on Dask or in this process.

The oracle for the sums is the unsharded likelihood (equal up to the order of the additions) and,
for the engine, the same split run in this process (equal to the bit).
"""

import os
import signal

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
    kw = dict(rng=4, num_steps=60, map_init=False, psis_samples=0, eval_every=20)
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
    kw = dict(rng=5, num_steps=40, map_init=False, psis_samples=0, eval_every=20)
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
