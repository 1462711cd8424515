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


# -- 2. a diverged fit is rolled back ------------------------------------------------------------

def _blow_up_at(step_ok):
    """A learning rate that trains sanely before step `step_ok` and explodes from it on."""
    return lambda s: 1e-2 if s < step_ok else 1e30


@pytest.mark.parametrize("likelihood,num_samples", [("categorical", 1), ("categorical", 2), ("gaussian", 1)])
def test_diverged_fit_rolls_back_to_the_last_finite_step(likelihood, num_samples):
    """Steps 0..39 train (10 epochs of 4 minibatches), step 40 takes a 1e30 step, and a later
    step overflows.  The model must come back exactly as a fit of those 10 epochs left it: the
    oracle is a second model that ran them and stopped (num_samples=2 takes the unfused path,
    the Gaussian likelihood learns its noise scale with its own Adam step)."""
    X, y = _classification(n=80)
    if likelihood == "gaussian":
        y = X[:, 0].astype(np.float64)
    out = 3 if likelihood == "categorical" else 1

    def make():
        return vg.BayesianMLP([6, 32, out], likelihood=likelihood, rng=4, num_samples=num_samples)

    m = make()
    with np.errstate(all="ignore"), pytest.raises(vg.bnn.TrainingError, match="rolled back to the start of step 40"
                                                  ) as info:
        m.fit(X, y, epochs=30, batch_size=20, lr=_blow_up_at(40))
    assert info.value.step == 41 and info.value.restored_step == 40
    oracle = make()
    oracle.fit(X, y, epochs=10, batch_size=20, lr=_blow_up_at(40))
    assert m.history == oracle.history  # the ten epochs the restored parameters completed
    assert m._opt_state[0] == oracle._opt_state[0] == 40
    np.testing.assert_array_equal(m._theta, oracle._theta)
    np.testing.assert_array_equal(m._opt_state[1], oracle._opt_state[1])
    np.testing.assert_array_equal(m._opt_state[2], oracle._opt_state[2])
    # the model predicts and trains again, with the oracle's bits
    with np.errstate(all="raise"):
        if likelihood == "categorical":
            np.testing.assert_array_equal(m.predict_proba(X, rng=0), oracle.predict_proba(X, rng=0))
        m.fit(X, y, epochs=2, batch_size=20, lr=1e-3)
        oracle.fit(X, y, epochs=2, batch_size=20, lr=1e-3)
    np.testing.assert_array_equal(m._theta, oracle._theta)


def test_a_fit_whose_first_step_fails_leaves_the_model_as_before():
    X, y = _classification(n=40)
    m = vg.BayesianMLP([6, 8, 1], likelihood="gaussian", rng=0)
    m.fit(X, X[:, 0], epochs=2, batch_size=20)
    theta, (step, mm, vv) = m._theta.copy(), (m._opt_state[0], m._opt_state[1].copy(), m._opt_state[2].copy())
    with np.errstate(all="ignore"), pytest.raises(vg.bnn.TrainingError, match=r"rolled back to step 4, as before"):
        m.fit(np.full((40, 6), 1e30), X[:, 0], epochs=1, batch_size=20)  # fits float32; the outputs overflow
    np.testing.assert_array_equal(m._theta, theta)
    assert m._opt_state[0] == step
    np.testing.assert_array_equal(m._opt_state[1], mm)
    np.testing.assert_array_equal(m._opt_state[2], vv)


def test_an_interrupt_inside_a_fused_step_puts_the_model_back_at_its_start():
    """A KeyboardInterrupt after the last layer took its fused Adam step and before the first
    did (step 37, past the snapshot at step 32): the model must be the model after steps 0..36."""
    X, y = _classification(n=80)
    m = vg.BayesianMLP([6, 16, 16, 3], likelihood="categorical", rng=5)
    inner = m.layers[0]._backward
    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 38:
            raise KeyboardInterrupt
        return inner(*args, **kw)

    m.layers[0]._backward = interrupted
    with pytest.raises(KeyboardInterrupt):
        m.fit(X, y, epochs=20, batch_size=20, lr=1e-2)
    del m.layers[0]._backward
    oracle = vg.BayesianMLP([6, 16, 16, 3], likelihood="categorical", rng=5)
    oracle.fit(X, y, epochs=10, batch_size=20, lr=1e-2)  # steps 0..39
    # steps 0..36 of that run: an oracle stopped by its schedule after step 36
    stopper = vg.BayesianMLP([6, 16, 16, 3], likelihood="categorical", rng=5)

    def lr(s):
        if s == 37:
            raise KeyboardInterrupt
        return 1e-2

    with pytest.raises(KeyboardInterrupt):
        stopper.fit(X, y, epochs=20, batch_size=20, lr=lr)  # raised before step 37 writes anything
    assert m._opt_state[0] == stopper._opt_state[0] == 37
    np.testing.assert_array_equal(m._theta, stopper._theta)
    assert not np.array_equal(m._theta, oracle._theta)


def test_validation_outputs_that_overflow_stop_the_fit_and_roll_it_back():
    """The validation after epoch 1 (one full-batch step) overflows: a TrainingError, and the
    model is back at the start of that step (here, as it was built)."""
    X, y = _classification(n=40)
    m = vg.BayesianMLP([6, 8, 3], likelihood="categorical", rng=0)
    start = m._theta.copy()
    Xv = np.full((5, 6), 3e38, np.float32)  # finite in float32; the outputs are not
    with np.errstate(all="ignore"), pytest.raises(vg.bnn.TrainingError,
                                                  match="validation after step 0 .*rolled back to the start of step 0"):
        m.fit(X, y, epochs=3, batch_size=40, validation_data=(Xv, np.zeros(5, int)))
    np.testing.assert_array_equal(m._theta, start)
    assert m._opt_state[0] == 0
    assert all(len(values) == 0 for values in m.history.values())  # the epoch was undone


def test_predictions_with_non_finite_outputs_raise():
    X, y = _classification(n=40)
    m = vg.BayesianMLP([6, 8, 3], likelihood="categorical", rng=0)
    m._theta[:6 * 8] = 1e20  # first-layer weight means that have run away
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="outputs are not finite for 6 of the 3 x 2"):
        m.predict_proba(np.full((2, 6), 1e20), num_samples=3)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="3 of the 3 x 2 .*the first at sample 0, example 1"):
        m.sample_proba(np.array([[0.0] * 6, [1e20] * 6]), num_samples=3)


# -- 3. the NumPy BayesianLinear checks its arguments ---------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda L, x: L.forward(x + 0.5j, key=1), TypeError, "x must be real.*complex"),
    (lambda L, x: L.forward(np.full((4, 3), None), key=1), TypeError, "x must be an array of real numbers.*object"),
    (lambda L, x: L.forward(np.where(x > 0.5, np.nan, x), key=1), ValueError, "x must be finite"),
    (lambda L, x: L.forward(x.astype(np.float64) * 1e300, key=1), ValueError, "x has values beyond the range of the layer's dtype float32"),
    (lambda L, x: L.forward(x[:, :2], key=1), ValueError, r"x must have shape \(batch, in_features\) = \(batch, 3\)"),
    (lambda L, x: L.forward(x, key=1.7), TypeError, "key must be an int in \\[0, 2\\*\\*64\\) or None, got float 1.7"),
    (lambda L, x: L.forward(x, key=True), TypeError, "key must be an int"),
    (lambda L, x: L.forward(x, key=-1), ValueError, r"key must be in \[0, 2\*\*64\), got -1"),
    (lambda L, x: L.forward(x, key=2**64), ValueError, r"key must be in \[0, 2\*\*64\)"),
    (lambda L, x: L.forward(x, key=1, sample="no"), TypeError, "sample must be a bool"),
    (lambda L, x: L.backward(np.full((4, 2), np.nan)), ValueError, "grad_out must be finite"),
    (lambda L, x: L.backward(np.ones((4, 2)) + 1j), TypeError, "grad_out must be real"),
    (lambda L, x: L.backward(np.ones((3, 2))), ValueError, r"grad_out must have shape \(batch, out_features\) = \(4, 2\)"),
    (lambda L, x: L.backward(np.ones((4, 2)), kl_weight=-1), ValueError, "kl_weight must be >= 0, got -1"),
    (lambda L, x: L.backward(np.ones((4, 2)), kl_weight=np.nan), ValueError, "kl_weight must be finite"),
    (lambda L, x: L.backward(np.ones((4, 2)), kl_weight="1"), TypeError, "kl_weight must be a real number"),
    (lambda L, x: L.backward(np.ones((4, 2)), kl="exact"), ValueError, "kl must be 'mc', 'analytic' or 'none'"),
    (lambda L, x: L.backward(np.ones((4, 2)), kl="analytic"), ValueError, "kl='analytic' needs a Normal prior"),
])
def test_numpy_layer_refuses_bad_arguments_naming_them(call, exc, match):
    L = vg.BayesianLinear(3, 2, rng=0)
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    L.forward(x, key=5)
    x0, loc0, rho0 = x.copy(), L.loc.copy(), L.rho.copy()
    with pytest.raises(exc, match=match):
        call(L, x)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(L.loc, loc0)
    np.testing.assert_array_equal(L.rho, rho0)


def test_numpy_layer_gradient_overflow_is_an_error():
    """Finite inputs whose gradient overflows float32: an error, not an inf gradient."""
    L = vg.BayesianLinear(3, 2, rng=0)
    L.forward(np.full((4, 3), 1e30, np.float32), key=1)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="the gradient overflowed"):
        L.backward(np.full((4, 2), 1e30, np.float32))


def test_numpy_layer_output_overflow_is_an_error():
    """float64 inputs and parameters that are finite but whose product overflows: an error (and
    no backward from it), not an inf output; the caller's errstate does not change that."""
    L = vg.BayesianLinear(3, 2, rng=0, dtype=np.float64)
    L.loc[:6] = 1e300
    for errstate in ("ignore", "raise"):
        with np.errstate(all=errstate), pytest.raises(ValueError, match="output overflowed"):
            L.forward(np.full((4, 3), 1e10), key=1)
    with pytest.raises(ValueError, match="needs a forward"):
        L.backward(np.ones((4, 2)))


def test_numpy_layer_accepts_every_valid_key():
    L = vg.BayesianLinear(3, 2, rng=0, init_rho=0.0)
    x = np.ones((2, 3), np.float32)
    outs = [L.forward(x, key=k) for k in (0, 2**63, 2**64 - 1, np.uint64(2**64 - 1))]
    np.testing.assert_array_equal(outs[2], outs[3])
    assert not np.array_equal(outs[0], outs[1])


# -- 4. an asymmetric covariance is refused -------------------------------------------------------

def test_from_cov_refuses_an_asymmetric_matrix():
    with pytest.raises(ValueError, match=r"cov must be symmetric .* got cov\[0, 1\] = 0.5 and cov\[1, 0\] = 0.0"):
        vg.FullRankGaussian.from_cov(np.zeros(2), [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"cov\[2, 0\]"):  # the worst pair is named
        vg.FullRankGaussian.from_cov(np.zeros(3), [[4.0, 0.0, 0.3], [0.0, 1.0, 0.1], [-0.5, 0.1, 1.0]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_from_cov_accepts_rounding_asymmetry(dtype):
    """A covariance whose triangles differ by rounding (A A^T of a float32 product, as one
    gets from data) is accepted, and the result's covariance is its symmetric part, to the
    backward error of a Cholesky factorisation and of rounding L to the dtype (a few d eps |C|)."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(40, 200)).astype(dtype)
    cov = (A @ A.T / 200).astype(dtype)
    cov[np.triu_indices(40, 1)] *= 1 + 4 * np.finfo(dtype).eps  # rounding-sized asymmetry, for sure
    q = vg.FullRankGaussian.from_cov(np.zeros(40, dtype), cov)
    sym = 0.5 * (cov.astype(np.float64) + cov.T.astype(np.float64))
    tol = 4 * 40 * np.finfo(dtype).eps * np.abs(sym).max()
    np.testing.assert_allclose(q.cov, sym, atol=tol)


# -- 5. layer sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes,exc,match", [
    ([4, 2.5, 2], TypeError, r"sizes\[1\] must be an int, got float 2.5"),
    ([4, 2.0, 2], TypeError, r"sizes\[1\] must be an int, got float 2.0"),
    ("42", TypeError, "sizes must be a sequence of ints, got str '42'"),
    (b"42", TypeError, "sizes must be a sequence of ints, got bytes"),
    (42, TypeError, "sizes must be a sequence of ints, got int 42"),
    ([4, True, 2], TypeError, r"sizes\[1\] must be an int, got bool True"),
    ([4, "8", 2], TypeError, r"sizes\[1\] must be an int, got str '8'"),
    ([4, None, 2], TypeError, r"sizes\[1\] must be an int, got NoneType"),
    (np.array([4.0, 2.0]), TypeError, r"sizes\[0\] must be an int, got float64"),
])
def test_layer_sizes_must_be_ints(sizes, exc, match):
    with pytest.raises(exc, match=match):
        vg.BayesianMLP(sizes)


def test_layer_sizes_accept_integer_sequences():
    for sizes in ([4, 8, 2], (4, 8, 2), np.array([4, 8, 2]), range(4, 1, -1), (n for n in (4, 8, 2))):
        m = vg.BayesianMLP(sizes, rng=0)
        assert all(type(n) is int for n in m.sizes) and len(m.sizes) in (3,)


# -- 7. save replaces the file atomically ---------------------------------------------------------

def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    X, y = _classification(n=40)
    m = vg.BayesianMLP([6, 8, 3], likelihood="categorical", rng=0)
    m.fit(X, y, epochs=1, batch_size=20)
    path = tmp_path / "model.npz"
    m.save(path)
    before = path.read_bytes()
    m.fit(X, y, epochs=1, batch_size=20)
    real = np.savez

    def savez_then_fail(fh, **arrays):  # half a file, then an interrupt
        real(fh, **arrays)
        fh.truncate(fh.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(KeyboardInterrupt):
        m.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]  # no temporary file left
    assert vg.BayesianMLP.load(path)._opt_state[0] == 2
    m.save(path)  # and a save that completes replaces it
    assert vg.BayesianMLP.load(path)._opt_state[0] == 4


def test_save_keeps_the_files_permissions(tmp_path):
    import os
    import stat

    m = vg.BayesianMLP([2, 3, 2], likelihood="categorical", rng=0)
    path = tmp_path / "model.npz"
    m.save(path)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what open() gives a new file under this umask
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(path, 0o640)
    m.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


# -- 8. one broadcasting rule for a prior against a multi-axis event --------------------------------

def _quadratic(w):
    r = w - 0.3
    return -0.5 * (r * r).reshape(len(w), -1).sum(axis=1), -r


@pytest.mark.parametrize("pshape", [(3, 4), (4,), (3, 1), (1, 4), ()])
@pytest.mark.parametrize("estimator,kl", [("pathwise", "mc"), ("pathwise", "analytic"), ("score", "mc"),
                                          ("score", "analytic"), ("stl", "mc")])
def test_prior_broadcasts_against_the_event_shape_everywhere(pshape, estimator, kl):
    """elbo_grad on a (3, 4) event with a prior of any shape NumPy broadcasts to (3, 4) equals
    elbo_grad on the flattened (12,) problem with the prior broadcast by hand (the same noise),
    and kl_divergence equals the closed form."""
    rng = np.random.default_rng(0)
    loc, rho = rng.normal(size=(3, 4)), rng.normal(-1, 0.3, size=(3, 4))
    mu, sd = rng.normal(size=pshape), rng.uniform(0.5, 2.0, size=pshape)
    q, p = vg.MeanFieldGaussian(loc, rho), vg.Normal(mu, sd)
    flat_q = vg.MeanFieldGaussian(loc.reshape(12), rho.reshape(12))
    flat_p = vg.Normal(np.broadcast_to(mu, (3, 4)).reshape(12), np.broadcast_to(sd, (3, 4)).reshape(12))
    kw = dict(num_samples=4, estimator=estimator, kl=kl, rng=7, baseline="loo" if estimator == "score" else None)
    got = vg.elbo_grad(q, _quadratic, p, **kw)
    want = vg.elbo_grad(flat_q, _quadratic, flat_p, **kw)
    # a scalar prior takes the core's scalar-parameter path: equal to rounding, not to the bit
    close = dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got.loss, want.loss, **close)
    np.testing.assert_allclose(got.grad_loc, want.grad_loc.reshape(3, 4), **close)
    np.testing.assert_allclose(got.grad_rho, want.grad_rho.reshape(3, 4), **close)
    s = np.logaddexp(0.0, rho)
    mu_b, sd_b = np.broadcast_to(mu, (3, 4)), np.broadcast_to(sd, (3, 4))
    closed = np.sum(np.log(sd_b / s) + (s**2 + (loc - mu_b) ** 2) / (2 * sd_b**2) - 0.5)
    np.testing.assert_allclose(vg.kl_divergence(q, p), closed, rtol=1e-12)
    eps = rng.standard_normal((2, 3, 4))
    g = vg.pathwise_grad(loc, rho, eps, -eps, p, kl=kl)
    g_flat = vg.pathwise_grad(loc.reshape(12), rho.reshape(12), eps.reshape(2, 12), -eps.reshape(2, 12), flat_p, kl=kl)
    np.testing.assert_allclose(g[0], g_flat[0].reshape(3, 4), **close)
    assert p.log_prob(eps).shape == (2,)


def test_a_prior_that_does_not_broadcast_is_refused_everywhere():
    q = vg.MeanFieldGaussian(np.zeros((3, 4)), np.zeros((3, 4)))
    p = vg.Normal(np.zeros(12), 1.0)
    match = r"Normal parameter loc of shape \(12,\) does not broadcast to the event shape \(3, 4\)"
    eps = np.zeros((2, 3, 4))
    for call in (lambda: vg.elbo_grad(q, _quadratic, p), lambda: vg.elbo_grad(q, _quadratic, p, estimator="score"),
                 lambda: vg.kl_divergence(q, p), lambda: p.log_prob(eps),
                 lambda: vg.pathwise_grad(q.loc, q.rho, eps, eps, p)):
        with pytest.raises(ValueError, match=match):
            call()


# -- 9. the probability-sum tolerance follows the dtype and the number of classes -------------------

def _softmax_sequential(logits, dtype):
    """A softmax computed in `dtype` with the normaliser summed one term at a time (as a plain
    loop, or a GPU kernel's serial reduction, does): rounding error up to K eps / 2."""
    f = logits.astype(dtype)
    e = np.exp(f - f.max(axis=1, keepdims=True))
    total = np.cumsum(e, axis=1, dtype=dtype)[:, -1:]
    return (e / total).astype(dtype)


@pytest.mark.parametrize("dtype,K", [(np.float16, 10), (np.float32, 10_000), (np.float32, 10)])
def test_low_precision_softmax_is_accepted(dtype, K):
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(50, K))
    p = _softmax_sequential(logits, dtype)
    y = rng.integers(0, K, 50)
    sums = p.sum(axis=1, dtype=np.float64)
    if (dtype, K) != (np.float32, 10):  # these rows are off by more than the old fixed 1e-6
        assert np.abs(sums - 1).max() > 1e-6
    want = -np.mean(np.log(p.astype(np.float64)[np.arange(50), y]))
    assert vg.metrics.nll(p, y) == pytest.approx(want, rel=1e-12)
    assert vg.metrics.brier_score(p, y) >= 0
    vg.metrics.predictive_entropy(p[None])  # the (S, N, K) checks take the same tolerance


@pytest.mark.parametrize("dtype,K", [(np.float16, 10), (np.float32, 10_000), (np.float32, 10), (np.float64, 10)])
def test_probabilities_off_by_more_than_the_tolerance_are_refused(dtype, K):
    eps = np.finfo(dtype).eps
    tol = max(1e-6, (K + 2) * eps)
    p = np.full((2, K), 1.0 / K)
    p[1, 0] += 2 * tol  # row 1 sums to 1 + 2 tol (representable in every dtype here)
    p = p.astype(dtype)
    assert p[1].sum(dtype=np.float64) - 1 > 1.5 * tol
    with pytest.raises(ValueError, match=r"must sum to 1 .*the first, at index \(1,\)"):
        vg.metrics.nll(p, [0, 0])


# -- 10. edge shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("prior", [vg.Normal(0.0, 1.0), vg.Normal(np.zeros(3), np.ones(3)),
                                   vg.ScaleMixtureNormal(0.5, 1.0, 0.1)])
def test_priors_take_zero_samples_and_empty_events(prior):
    lp = prior.log_prob(np.zeros((0, 3)))
    assert lp.shape == (0,) and lp.dtype == np.float64
    assert prior.grad_log_prob(np.zeros((0, 3), np.float32)).shape == (0, 3)
    assert prior.log_prob(np.zeros((0, 3), np.float32)).dtype == np.float32
    if all(v.ndim == 0 for v in prior._params.values()):
        np.testing.assert_array_equal(prior.log_prob(np.zeros((2, 0))), [0.0, 0.0])  # a sum over nothing


def test_scalar_events_are_accepted_by_every_estimator_function():
    """A scalar event (loc of shape ()) is the one-element event (1,) with the axis dropped."""
    rng = np.random.default_rng(0)
    eps = rng.standard_normal(5)
    glik = rng.standard_normal(5)
    prior = vg.Normal(0.2, 1.5)
    got = vg.pathwise_grad(0.3, -1.0, eps, glik, prior)
    want = vg.pathwise_grad(np.array([0.3]), np.array([-1.0]), eps[:, None], glik[:, None], prior)
    assert got[0].shape == got[1].shape == ()
    for g, w in zip(got, want):
        assert float(g) == float(w[0])
    got = vg.score_grad(0.3, -1.0, eps, glik, baseline="loo")
    want = vg.score_grad(np.array([0.3]), np.array([-1.0]), eps[:, None], glik, baseline="loo")
    assert got[0].shape == () and [float(g) for g in got] == [float(w[0]) for w in want]
    q = vg.MeanFieldGaussian.from_scale(0.5, 2.0)
    assert q.shape == () and float(q.scale) == pytest.approx(2.0, rel=1e-15)
    res = vg.elbo_grad(q, lambda w: (-0.5 * w**2, -w), prior, num_samples=3, rng=1)
    res1 = vg.elbo_grad(vg.MeanFieldGaussian.from_scale([0.5], [2.0]),
                        lambda w: (-0.5 * w[:, 0] ** 2, -w), prior, num_samples=3, rng=1)
    assert res.grad_loc.shape == () and float(res.grad_loc) == float(res1.grad_loc[0])


# -- Also: the demo's command line ---------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--plot", "band.png", "--part", "seed"], "--plot draws the Bayes-by-Backprop regression"),
])
def test_demo_refuses_bad_arguments_before_any_work(argv, match, capsys):
    from vigrad.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--quiet", *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert match in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing ran


def test_demo_plot_without_matplotlib_fails_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from vigrad.__main__ import main
    from vigrad.demo import run_bbb_demo

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    png = tmp_path / "band.png"
    with pytest.raises(SystemExit) as info:
        main(["demo", "--quiet", "--part", "bbb", "--plot", str(png)])
    assert info.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    with pytest.raises(ImportError, match="needs matplotlib"):
        run_bbb_demo(epochs=1, plot=str(png))
    assert not png.exists()


# -- 13. threads: workers=None chooses by measurement -------------------------------------------------

def _simulate(threads, cost, calls):
    """Drive a _Threads with synthetic call times cost(choice, call) -> seconds; returns the
    choices made and the total time."""
    chosen, total = [], 0.0
    for k in range(calls):
        w = threads.pick()
        t = cost(w, k)
        threads.record(w, t)
        chosen.append(w)
        total += t
    return np.array(chosen), total


@pytest.mark.parametrize("fast,slow,ratio", [(2, 1, 1.6), (1, 2, 1.6), (1, 2, 150.0), (2, 1, 1.05)])
def test_auto_threads_settle_on_the_faster_choice_within_a_few_percent(fast, slow, ratio):
    """Whichever of 1 and 2 threads is faster, by a little or by 150x (two threads on a loaded
    machine), the total time stays within 5 % of always using the faster one (the 1.3x the issue
    allows is for noisy real timings; here the timings are exact)."""
    from vigrad.bnn import _Threads

    t = _Threads(2, auto=True)
    best = 1e-3
    cost = lambda w, k: best if w == fast else best * ratio  # noqa: E731
    chosen, total = _simulate(t, cost, 20_000)
    assert total <= 1.05 * best * 20_000 + 8 * best * ratio  # + the first alternating calls
    assert (chosen[100:] == fast).mean() > 0.95


def test_auto_threads_follow_a_change_of_load():
    """Two threads are faster until call 5000 (an idle machine), then 20x slower (another process
    takes a core): the choice follows within a few hundred calls, and back when the load goes."""
    from vigrad.bnn import _Threads

    t = _Threads(2, auto=True)

    def cost(w, k):
        busy = 5000 <= k < 15000
        return (1e-3 if w == 1 else 20e-3) if busy else (1e-3 if w == 1 else 0.6e-3)

    chosen, _ = _simulate(t, cost, 20_000)
    assert (chosen[4000:5000] == 2).mean() > 0.95
    assert (chosen[6000:15000] == 1).mean() > 0.99
    assert (chosen[18000:] == 2).mean() > 0.95


def test_fixed_workers_are_never_measured_and_copies_measure_afresh():
    from vigrad.bnn import _Threads

    t = _Threads(3, auto=False)
    assert t.choices == (3,) and {t.run(lambda w: w) for _ in range(50)} == {3}
    assert _Threads(1, auto=True).choices == (1,)
    auto = _Threads(2, auto=True)
    _simulate(auto, lambda w, k: 1.0 if w == 1 else 2.0, 100)
    clone = copy.deepcopy(auto)
    assert clone._calls == 0 and clone.choices == (1, 2)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_auto_threads_give_the_bits_of_any_fixed_count(estimator):
    """workers=None switches between one and all threads while training; the result is the
    bit pattern of a fixed count (large enough that the kernels and products really split)."""
    rng = np.random.default_rng(0)
    X, y = rng.random((320, 64)).astype(np.float32), rng.integers(0, 4, 320)
    runs = []
    for w in (None, 1, 2):
        m = vg.BayesianMLP([64, 600, 4], likelihood="categorical", estimator=estimator, rng=5, workers=w)
        m.fit(X, y, epochs=3, batch_size=160)
        runs.append((m._theta.copy(), m.predict_proba(X, num_samples=4, rng=1)))
    for theta, p in runs[1:]:
        np.testing.assert_array_equal(theta, runs[0][0])
        np.testing.assert_array_equal(p, runs[0][1])
