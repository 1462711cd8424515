"""Issue 14, item 3: BayesianMLP.fit's pieces (vigrad._trainer), each tested alone against an
independent oracle, then the driver's wiring of them (optimizer=, the minibatch gradient of row
shards), and the one layer implementation seen from both front ends."""

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

import vigrad as vg
from vigrad import _layer_ops, _trainer
from vigrad._layer_ops import derive_keys

ESTIMATORS = ["reparam", "local", "flipout"]


def _classification(n=48, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)


# -- minibatches ------------------------------------------------------------------------------------

def test_batch_plan_shuffle_sees_every_example_once_per_epoch():
    plan = _trainer.BatchPlan.make(23, 5, 4, "shuffle")
    assert plan.per_epoch == 5 and plan.batch_size == 5
    batches = list(plan.batches(seed=7))
    assert len(batches) == 4 * 5
    for e in range(4):
        epoch = batches[5 * e:5 * (e + 1)]
        assert [len(b.indices) for b in epoch] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sort(np.concatenate([b.indices for b in epoch])), np.arange(23))
    # different epochs, different orders; the same seed, the same stream
    assert not np.array_equal(batches[0].indices, batches[5].indices)
    again = list(plan.batches(seed=7))
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(batches, again))
    assert _trainer.BatchPlan.make(7, 100, 1, "shuffle").batch_size == 7  # at most one epoch per batch


def test_batch_plan_replacement_and_resume_at_an_epoch():
    plan = _trainer.BatchPlan.make(10, 4, 3, "replacement")
    batches = list(plan.batches(seed=1))
    assert plan.per_epoch == 3 and len(batches) == 9
    assert all(len(b.indices) == 4 and b.indices.min() >= 0 and b.indices.max() < 10 for b in batches)
    for mode in ("shuffle", "replacement"):
        plan = _trainer.BatchPlan.make(10, 4, 5, mode)
        full = list(plan.batches(seed=3))
        tail = list(plan.batches(seed=3, start_epoch=2))
        assert [b.step for b in tail] == [b.step for b in full[2 * plan.per_epoch:]]
        assert all(np.array_equal(a.indices, b.indices) for a, b in zip(tail, full[2 * plan.per_epoch:]))


@pytest.mark.parametrize("args,exc,match", [
    ((10, 0, 1, "shuffle"), ValueError, "batch_size must be >= 1"),
    ((10, 2, 0, "shuffle"), ValueError, "epochs must be >= 1"),
    ((10, 2, 1, "sorted"), ValueError, "shuffle must be 'shuffle' or 'replacement', got 'sorted'"),
])
def test_batch_plan_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        _trainer.BatchPlan.make(*args)


# -- the KL weighting -------------------------------------------------------------------------------

def test_kl_weights_uniform_and_blundell():
    np.testing.assert_array_equal(_trainer.kl_weights(4, "uniform"), [0.25] * 4)
    M = 6
    exact = [Fraction(2 ** (M - i), 2**M - 1) for i in range(1, M + 1)]
    np.testing.assert_allclose(_trainer.kl_weights(M, "blundell"), [float(f) for f in exact], rtol=1e-15)
    big = _trainer.kl_weights(3000, "blundell")  # 2^3000 overflows a float; the weights must not
    assert np.all(np.isfinite(big)) and np.all(np.diff(big) <= 0) and math.isclose(big.sum(), 1.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="kl_weighting must be 'uniform' or 'blundell', got 'linear'"):
        _trainer.kl_weights(3, "linear")


# -- the optimiser ----------------------------------------------------------------------------------

def test_resolve_optimizer():
    opt = _trainer.resolve_optimizer(None, None)
    assert opt.name == "adam" and opt.hyperparams["lr"] == 1e-3
    assert (opt.hyperparams["b1"], opt.hyperparams["b2"], opt.hyperparams["eps"]) == (0.9, 0.999, 1e-8)
    assert _trainer.resolve_optimizer(0.05, None).hyperparams["lr"] == 0.05
    sgd = vg.optim.sgd(0.1)
    assert _trainer.resolve_optimizer(None, sgd) is sgd
    with pytest.raises(ValueError, match="give lr or optimizer, not both"):
        _trainer.resolve_optimizer(0.1, sgd)
    with pytest.raises(TypeError, match="optimizer must be a vigrad.optim Optimizer .* got str"):
        _trainer.resolve_optimizer(None, "adam")
    with pytest.raises(ValueError, match="lr must be > 0"):
        _trainer.resolve_optimizer(-1.0, None)


def test_clip_global_norm():
    g = np.array([3.0, 4.0, 0.0], np.float32)
    _trainer.clip_global_norm(g, 1.0)
    np.testing.assert_allclose(g, [0.6, 0.8, 0.0], rtol=1e-6)
    g = np.array([0.3, -0.4])
    before = g.copy()
    _trainer.clip_global_norm(g, 1.0)
    np.testing.assert_array_equal(g, before)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_updater_plain_adam_runs_the_core_kernel_as_adam(dtype):
    """Adam without clipping or weight decay: fusable, on the model's moment arrays, and the same
    steps as vigrad.optim's NumPy Adam (another implementation) to rounding."""
    rng = np.random.default_rng(0)
    theta = rng.normal(size=50).astype(dtype)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    schedule = vg.optim.exponential(0.05, 0.9)
    up = _trainer.Updater(vg.optim.adam(schedule), theta, m, v)
    assert up.fusable and up.arrays[0] is m and up.arrays[1] is v
    assert up.hyper(3) == (3, 0.05 * 0.9**3, 0.9, 0.999, 1e-8)
    ref_opt = vg.optim.adam(schedule)
    ref, state = theta.copy(), ref_opt.init(theta)
    for step in range(6):
        g = rng.normal(size=50).astype(dtype)
        up.apply(theta, g, step, workers=1)
        ref, state = ref_opt.update(g, state, ref)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(theta, ref, rtol=rtol, atol=rtol * 0.3)
    np.testing.assert_allclose(m, state.m[0], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(v, state.v[0], rtol=rtol, atol=rtol)


def test_updater_sgd_with_momentum_against_its_formula():
    rng = np.random.default_rng(1)
    theta = rng.normal(size=20)
    up = _trainer.Updater(vg.optim.sgd(0.1, momentum=0.5), theta, np.zeros(20), np.zeros(20))
    assert not up.fusable and len(up.arrays) == 1
    ref, buf = theta.copy(), np.zeros(20)
    for step in range(5):
        g = rng.normal(size=20)
        up.apply(theta, g, step, workers=1)
        buf = 0.5 * buf + g
        ref = ref - 0.1 * buf
    np.testing.assert_allclose(theta, ref, rtol=1e-14)
    np.testing.assert_allclose(up.arrays[0], buf, rtol=1e-14)  # the state is updated in place


def test_updater_adamw_steps_on_the_models_moments():
    """Adam with weight decay is not fusable: its own update, with the model's m, v as its state
    and the model's step count (bias correction of update t + 1)."""
    rng = np.random.default_rng(2)
    theta = rng.normal(size=10)
    m, v = rng.random(10) * 0.1, rng.random(10) * 0.01
    m0, v0, theta0 = m.copy(), v.copy(), theta.copy()
    up = _trainer.Updater(vg.optim.adam(0.01, weight_decay=0.1), theta, m, v)
    assert not up.fusable
    g = rng.normal(size=10)
    up.apply(theta, g, 7, workers=1)  # update number 8
    m1 = m0 + (g - m0) * 0.1
    v1 = 0.999 * v0 + 0.001 * g * g
    ref = theta0 * (1 - 0.01 * 0.1) - 0.01 * (m1 / (1 - 0.9**8)) / (np.sqrt(v1 / (1 - 0.999**8)) + 1e-8)
    np.testing.assert_allclose(theta, ref, rtol=1e-12)
    np.testing.assert_allclose(m, m1, rtol=1e-14)
    np.testing.assert_allclose(v, v1, rtol=1e-14)


# -- history and progress ---------------------------------------------------------------------------

def test_history_epochs_validation_line_and_roll_back():
    record = _trainer.new_history(True, "categorical")
    assert list(record) == ["loss", "nll", "kl", "val_nll", "val_accuracy"]
    h = _trainer.History(record, num_examples=10, per_epoch=2, epochs=3, likelihood="categorical")
    h.add_step(6.0, 40.0, 6)
    h.add_step(2.0, 20.0, 4)
    h.end_epoch(2)
    assert record["nll"] == [0.8] and record["kl"] == [30.0] and record["loss"] == [0.8 + 30.0 / 10]
    h.add_validation(0.5, 0.75)
    line = h.line(0, 1.25)
    assert line.startswith("epoch    1/3  loss 3.8000  nll 0.8000  kl 30.0  val_nll 0.5000") and "(1.2 s)" in line
    for step in (4, 6):
        h.add_step(1.0, 10.0, 5)
        h.add_step(1.0, 10.0, 5)
        h.end_epoch(step)
        h.add_validation(0.4, 0.8)
    assert len(record["loss"]) == 3
    h.roll_back(5)  # the parameters of step 5 completed the epochs that ended at steps 2 and 4
    assert all(len(values) == 2 for values in record.values())
    assert _trainer.new_history(False, "gaussian") == {"loss": [], "nll": [], "kl": []}
    assert "val_rmse" in _trainer.new_history(True, "gaussian")


# -- validation and early stopping ------------------------------------------------------------------

def test_validation_metrics_against_scipy():
    X, y = _classification()
    clf = vg.BayesianMLP([3, 8, 2], likelihood="categorical", rng=0, dtype=np.float64)
    clf.fit(X, y, epochs=2, batch_size=16)
    nll, acc = _trainer.validation_metrics(clf, X, y, 4, epoch=3)
    p = clf.predict_proba(X, num_samples=4, rng=3)
    assert math.isclose(nll, -np.mean(np.log(p[np.arange(len(y)), y])), rel_tol=1e-12)
    assert acc == np.mean(p.argmax(axis=1) == y)
    reg = vg.BayesianMLP([3, 8, 1], likelihood="gaussian", rng=0, dtype=np.float64)
    t = X[:, 0] - X[:, 2]
    reg.fit(X, t, epochs=2, batch_size=16)
    nll, rmse = _trainer.validation_metrics(reg, X, t.reshape(-1, 1), 4, epoch=1)
    mean, std = reg.predict(X, num_samples=4, return_std=True, rng=1)
    assert math.isclose(nll, -np.mean(stats.norm.logpdf(t, mean, std)), rel_tol=1e-12)
    assert math.isclose(rmse, math.sqrt(np.mean((t - mean) ** 2)), rel_tol=1e-12)


def test_early_stop_keeps_the_best_parameters():
    stop = _trainer.EarlyStop(2)
    theta = np.zeros(3)
    decisions = []
    for k, value in enumerate([3.0, 2.0, 2.5, 1.5, 1.6, 1.7, 0.1]):
        theta[:] = k
        decisions.append(stop.update(value, theta))
        if decisions[-1]:
            break
    assert decisions == [False, False, False, False, False, True]
    stop.restore(theta)
    np.testing.assert_array_equal(theta, [3.0, 3.0, 3.0])  # epoch 3 had the best value, 1.5
    untouched = np.ones(2)
    _trainer.EarlyStop(1).restore(untouched)
    np.testing.assert_array_equal(untouched, [1.0, 1.0])
    with pytest.raises(ValueError, match="early_stopping must be >= 1"):
        _trainer.EarlyStop(0)


# -- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_checks_and_restore(tmp_path):
    sgd = vg.optim.sgd(0.1)
    with pytest.raises(ValueError, match="optimizer 'sgd' has no checkpoint format"):
        _trainer.check_checkpointable(sgd, tmp_path / "c.npz", False)
    with pytest.raises(ValueError, match="resume=True needs an existing checkpoint file"):
        _trainer.check_checkpointable(vg.optim.adam(), tmp_path / "missing.npz", True)
    _trainer.check_checkpointable(vg.optim.adam(), None, False)
    X, y = _classification()
    a = vg.BayesianMLP([3, 8, 2], likelihood="categorical", rng=0)
    a.fit(X, y, epochs=3, batch_size=16, checkpoint=tmp_path / "c.npz")
    b = vg.BayesianMLP([3, 8, 2], likelihood="categorical", rng=1)
    assert _trainer.restore_checkpoint(b, tmp_path / "c.npz") == 3
    np.testing.assert_array_equal(b._theta, a._theta)
    assert b._base_key == a._base_key and b.history == a.history and b._opt_state[0] == a._opt_state[0] == 9
    np.testing.assert_array_equal(b._opt_state[1], a._opt_state[1])
    with pytest.raises(ValueError, match="different architecture"):
        _trainer.restore_checkpoint(vg.BayesianMLP([3, 9, 2], likelihood="categorical"), tmp_path / "c.npz")


# -- rollback ---------------------------------------------------------------------------------------

def test_rewind_replays_from_the_snapshot_before_the_target():
    """A toy 'training' whose step depends on the state, the minibatch and the step number:
    rewinding to any step since the older snapshot gives the state of a run stopped there."""
    def step_fn(arrays, s, indices, i):
        a, b = arrays
        a += np.sin(b + s) * indices.sum() + i
        b *= 0.99
        b += 0.01 * a

    def run(n):
        arrays = (np.zeros(4), np.ones(4))
        for s in range(n):
            step_fn(arrays, s, np.arange(s % 5), s % 3)
        return arrays

    arrays = (np.zeros(4), np.ones(4))
    rewind = _trainer.Rewind(arrays, 0)
    replays = []

    def replay(s, indices, i):
        replays.append(s)
        step_fn(arrays, s, indices, i)

    for s in range(100):
        rewind.record(s, np.arange(s % 5), s % 3)
        step_fn(arrays, s, np.arange(s % 5), s % 3)
    assert [sn[0] for sn in rewind.snaps] == [64, 96] and min(rewind.batches) == 64  # two snapshots kept
    for target in (99, 97, 96, 70):
        assert rewind.rewind(target, replay) == target
        for got, want in zip(arrays, run(target)):
            np.testing.assert_array_equal(got, want)
    assert max(len(range(sn[0], 99)) for sn in rewind.snaps) <= 2 * _trainer.SNAPSHOT_EVERY
    fresh = _trainer.Rewind((np.zeros(2),), 5)
    assert fresh.rewind(3, replay) == 5  # nothing ran: the fit's first step


# -- the driver ---------------------------------------------------------------------------------------

def test_fit_with_sgd_is_sgd_on_the_minibatch_gradients():
    """optimizer=vg.optim.sgd(lr): theta <- theta - lr * (gradient of the minibatch), over the
    minibatches of the fit's plan, with the noise of each step."""
    X, y = _classification(n=40)
    model = vg.BayesianMLP([3, 6, 2], likelihood="categorical", rng=3, dtype=np.float64, init_rho=-3.0)
    oracle = copy.deepcopy(model)
    model.fit(X, y, epochs=3, batch_size=16, optimizer=vg.optim.sgd(0.05))
    plan = _trainer.BatchPlan.make(40, 16, 3, "shuffle")
    kl_w = _trainer.kl_weights(plan.per_epoch, "uniform")
    for step, batch in enumerate(plan.batches(derive_keys(oracle._base_key, 2**62, 0, 1)[0])):
        oracle._minibatch_gradient(X[batch.indices], y[batch.indices], kl_w[step % plan.per_epoch], step)
        oracle._theta -= 0.05 * oracle._grad
    np.testing.assert_allclose(model._theta, oracle._theta, rtol=1e-12, atol=1e-14)
    assert model._opt_state[0] == 9 and len(model.history["loss"]) == 3


def test_fit_with_an_adam_optimizer_gives_the_bits_of_lr():
    X, y = _classification()
    runs = []
    for kw in ({"lr": 0.01}, {"optimizer": vg.optim.adam(0.01)}):
        for clip in (None, 10.0):  # the fused and the unfused path
            m = vg.BayesianMLP([3, 8, 2], likelihood="categorical", rng=2)
            m.fit(X, y, epochs=2, batch_size=16, clip_norm=clip, **kw)
            runs.append(m._theta.copy())
    np.testing.assert_array_equal(runs[0], runs[2])
    np.testing.assert_array_equal(runs[1], runs[3])


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"lr": 0.1, "optimizer": vg.optim.sgd(0.1)}, ValueError, "give lr or optimizer, not both"),
    ({"optimizer": "sgd"}, TypeError, "optimizer must be a vigrad.optim Optimizer"),
    ({"optimizer": vg.optim.rmsprop(0.1), "checkpoint": "x.npz"}, ValueError, "no checkpoint format"),
    ({"validation_data": (np.zeros((3, 3)), np.zeros(3, int)), "val_samples": 0}, ValueError,
     "val_samples must be >= 1"),
])
def test_fit_refuses_bad_training_arguments_before_any_step(kwargs, exc, match):
    X, y = _classification()
    m = vg.BayesianMLP([3, 8, 2], likelihood="categorical", rng=2)
    theta = m._theta.copy()
    with pytest.raises(exc, match=match):
        m.fit(X, y, epochs=2, batch_size=16, **kwargs)
    np.testing.assert_array_equal(m._theta, theta)
    assert m._opt_state is None


def test_diverged_sgd_momentum_fit_rolls_back_its_momentum_too():
    """The optimiser state of SGD with momentum is rolled back with the parameters: after the
    failure, the model continues exactly as a model stopped before the bad step."""
    X, y = _classification(n=80, d=6)
    lr = lambda s: 1e-2 if s < 40 else 1e30  # noqa: E731

    def make():
        return vg.BayesianMLP([6, 32, 2], likelihood="categorical", rng=4)

    m = make()
    with np.errstate(all="ignore"), pytest.raises(vg.bnn.TrainingError, match="rolled back to the start of step 40"):
        m.fit(X, y, epochs=30, batch_size=20, optimizer=vg.optim.sgd(lr, momentum=0.9))
    oracle = make()
    oracle.fit(X, y, epochs=10, batch_size=20, optimizer=vg.optim.sgd(lr, momentum=0.9))
    np.testing.assert_array_equal(m._theta, oracle._theta)
    assert m.history == oracle.history and m._opt_state[0] == 40


# -- the gradient of row shards ---------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_minibatch_gradient_of_row_shards_adds_up(estimator):
    """The rows [0, r) and [r, B) of a minibatch, the second with row_offset=r and without the KL
    part, give gradients and NLL sums that add up to the whole minibatch's (each example keeps its
    per-example noise), to the rounding of a float64 sum."""
    X, y = _classification(n=20)
    m = vg.BayesianMLP([3, 7, 2], likelihood="categorical", estimator=estimator, rng=5, dtype=np.float64,
                       init_rho=-1.0, num_samples=2)
    nll, kl = m._minibatch_gradient(X, y, 0.3, 11)
    whole = m._grad.copy()
    nll_a, kl_a = m._minibatch_gradient(X[:8], y[:8], 0.3, 11)
    part_a = m._grad.copy()
    nll_b, kl_b = m._minibatch_gradient(X[8:], y[8:], 0.3, 11, row_offset=8, with_kl=False)
    np.testing.assert_allclose(part_a + m._grad, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    assert math.isclose(nll_a + nll_b, nll, rel_tol=1e-12) and kl_a == kl and kl_b == 0.0
    if estimator != "reparam":  # the noise of the second shard without its offset is another noise
        m._minibatch_gradient(X[8:], y[8:], 0.3, 11, with_kl=False)
        assert not np.allclose(part_a + m._grad, whole, rtol=1e-6)


def test_per_example_noise_is_a_function_of_the_row_position():
    key = 2**63 + 12345
    signs = _layer_ops.flipout_signs(key, 0, 9, 4, 3, np.float32)
    assert set(np.unique(signs)) == {-1.0, 1.0} and signs.shape == (9, 7)
    np.testing.assert_array_equal(_layer_ops.flipout_signs(key, 5, 4, 4, 3, np.float32), signs[5:])
    zeta = _layer_ops.local_noise(key, 0, 9, 5, np.float64, 2)
    np.testing.assert_array_equal(_layer_ops.local_noise(key, 6, 3, 5, np.float64, 1), zeta[6:])
    # the draws are the core's standard normals of the salted key, row-major
    z = np.empty((1, 45))
    vg._core.standard_normal(key ^ _layer_ops.LOCAL_KEY_SALT, z, 1)
    np.testing.assert_array_equal(zeta.reshape(-1), z[0])
    assert abs(zeta.mean()) < 4 / math.sqrt(45) and abs(zeta.std() - 1) < 0.5


# -- one implementation, two front ends ---------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_numpy_and_torch_layers_compute_the_same_thing(estimator):
    """The torch layer's forward and its gradients for F = sum(G y) + c KL equal the NumPy layer's
    on the same parameters and key (their products differ: torch's BLAS and vigrad's gemm), in
    float64 to the rounding of sums of 7 products."""
    torch = pytest.importorskip("torch")
    import vigrad.torch as vgt

    prior = vg.ScaleMixtureNormal(0.5, 1.0, 0.1)
    t = vgt.BayesianLinear(7, 5, prior=prior, estimator=estimator, init_rho=-1.0, seed=3, dtype=torch.float64)
    n = vg.BayesianLinear(7, 5, prior=prior, estimator=estimator, dtype=np.float64, rng=0)
    n.loc[:], n.rho[:] = t.loc.detach().numpy(), t.rho.detach().numpy()
    rng = np.random.default_rng(4)
    x, G = rng.normal(size=(6, 7)), rng.normal(size=(6, 5))
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    kl = vgt.kl_loss(t)
    ((yt * torch.tensor(G)).sum() + 0.3 * kl).backward()
    y = n.forward(x, key=t.last_key)
    g = n.backward(G, kl_weight=0.3)
    for got, want in ((yt, y), (xt.grad, g.grad_x), (t.loc.grad, g.grad_loc), (t.rho.grad, g.grad_rho)):
        want = np.asarray(want)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert math.isclose(kl.item(), g.kl, rel_tol=1e-12)
