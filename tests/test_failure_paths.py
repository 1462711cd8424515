"""When things go wrong (issue 15): a result is right or an error, never silently wrong.

One test (or a small group) per item: concurrent predictions, rollback of a diverged fit,
the NumPy layer's argument checks, an asymmetric covariance, layer sizes, multi-axis events,
low-precision probabilities, edge shapes, the demo's command line."""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import vigrad as vg

ESTIMATORS = ["reparam", "local", "flipout"]


def _classification(n=120, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)


# -- 1. concurrent use of one model ------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_concurrent_predictions_give_the_serial_bits(estimator):
    X, y = _classification()
    m = vg.BayesianMLP([6, 48, 3], likelihood="categorical", estimator=estimator, rng=0, init_rho=-3.0)
    m.fit(X, y, epochs=2, batch_size=32)
    r = vg.BayesianMLP([6, 48, 1], likelihood="gaussian", estimator=estimator, rng=0, init_rho=-3.0)
    r.fit(X, X[:, 0], epochs=2, batch_size=32)
    calls = [lambda i: m.predict_proba(X, num_samples=5, rng=i),
             lambda i: m.sample_proba(X, num_samples=3, rng=i),
             lambda i: m.predict(X, num_samples=4, rng=i),
             lambda i: np.stack(r.predict(X, num_samples=5, rng=i, return_std=True))]
    jobs = [(c, i) for c in range(len(calls)) for i in range(12)]
    serial = [calls[c](i) for c, i in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: calls[job[0]](job[1]), jobs))
    differ = [job for job, a, b in zip(jobs, serial, threaded) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} of {len(jobs)} concurrent calls differ from the serial ones"


def test_training_one_model_from_two_threads_raises_and_reads_wait_for_it(tmp_path):
    """The lr schedule (called once per step) holds the first fit inside its first step while the
    main thread tries to train, predict and save the same model."""
    X, y = _classification()
    m = vg.BayesianMLP([6, 16, 3], likelihood="categorical", rng=0)
    inside, release = threading.Event(), threading.Event()

    def lr(step):
        inside.set()
        release.wait(30)
        return 1e-3

    errors = []

    def train():
        try:
            m.fit(X, y, epochs=1, batch_size=40, lr=lr)
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=train)
    t.start()
    try:
        assert inside.wait(30)
        with pytest.raises(RuntimeError, match="fit is already running on this model"):
            m.fit(X, y, epochs=1)
        for call in (lambda: m.predict_proba(X), lambda: m.predict(X), lambda: m.sample_proba(X),
                     lambda: m.save(tmp_path / "m.npz")):
            with pytest.raises(RuntimeError, match="while fit is training this model in another thread"):
                call()
    finally:
        release.set()
        t.join(60)
    assert not errors and not t.is_alive()
    assert m._opt_state[0] == 3  # the first fit ran its three steps
    m.fit(X, y, epochs=1, batch_size=40)  # free again
    assert m.predict_proba(X, num_samples=2).shape == (len(X), 3)


def test_copies_train_independently_in_parallel():
    X, y = _classification()
    base = vg.BayesianMLP([6, 16, 3], likelihood="categorical", rng=0)
    base.fit(X, y, epochs=1, batch_size=40)
    start = base._theta.copy()
    serial = copy.deepcopy(base)
    serial.fit(X, y, epochs=3, batch_size=40, lr=1e-2)
    copies = [copy.deepcopy(base) for _ in range(3)]
    for c in copies:  # each copy's layers work on the copy's own flat parameter vector
        assert all(np.shares_memory(layer.loc, c._theta) for layer in c.layers)
        assert not np.shares_memory(c._theta, base._theta)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda c: c.fit(X, y, epochs=3, batch_size=40, lr=1e-2), copies))
    np.testing.assert_array_equal(base._theta, start)
    for c in copies:
        np.testing.assert_array_equal(c._theta, serial._theta)
