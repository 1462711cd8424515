"""vigrad.optim: optimisers against known minimisers and PyTorch, schedules and clipping against
closed forms, bit-exact checkpoint/resume, dtype and no-mutation contracts, early stopping, the
Stan step-size search, and every error path."""

import math

import numpy as np
import pytest

import vigrad.optim as optim

# ----------------------------------------------------------------------------- problems


def _quadratic(seed=0, dim=5):
    """f(x) = 0.5 x'Ax - b'x with eigenvalues 0.5..4 (condition number 8); minimiser A^{-1} b."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    A = Q @ np.diag(np.linspace(0.5, 4.0, dim)) @ Q.T
    b = rng.standard_normal(dim)
    return A, b, np.linalg.solve(A, b)


def _rosenbrock_grad(x):
    return np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])


def _run(opt, grad, x0, steps):
    x, state = x0, opt.init(x0)
    for _ in range(steps):
        x, state = opt.update(grad(x), state, x)
    return x, state


# ----------------------------------------------------------------------------- convergence

QUADRATIC_CASES = [
    ("sgd", lambda: optim.sgd(0.4), 300),
    ("sgd_momentum", lambda: optim.sgd(0.2, momentum=0.6), 300),
    ("sgd_nesterov", lambda: optim.sgd(0.2, momentum=0.6, nesterov=True), 300),
    ("adam", lambda: optim.adam(optim.exponential(0.1, 0.998)), 3000),
    ("rmsprop", lambda: optim.rmsprop(optim.exponential(0.05, 0.995)), 2000),
    ("rmsprop_momentum", lambda: optim.rmsprop(optim.exponential(0.01, 0.995), momentum=0.5), 2000),
]


@pytest.mark.parametrize("name,make,steps", QUADRATIC_CASES, ids=[c[0] for c in QUADRATIC_CASES])
def test_reaches_quadratic_minimiser(name, make, steps):
    """Each optimiser ends within 1e-9 (max abs) of A^{-1} b, starting 1+ away."""
    A, b, x_star = _quadratic()
    x, state = _run(make(), lambda x: A @ x - b, np.zeros_like(b), steps)
    assert np.max(np.abs(x_star)) > 0.5
    np.testing.assert_allclose(x, x_star, rtol=0, atol=1e-9)
    assert int(state.step) == steps


def test_adam_reaches_rosenbrock_minimum():
    """Adam from the classic start (-1.2, 1) ends within 1e-6 of the minimiser (1, 1)."""
    x, _ = _run(optim.adam(0.02), _rosenbrock_grad, np.array([-1.2, 1.0]), 5000)
    np.testing.assert_allclose(x, [1.0, 1.0], rtol=0, atol=1e-6)


def test_multiple_param_arrays_match_concatenated_run():
    """Elementwise optimisers: a tuple of arrays evolves exactly like their concatenation."""
    A, b, x_star = _quadratic(seed=1, dim=6)
    opt = optim.adam(0.05)
    joint, _ = _run(opt, lambda x: A @ x - b, np.zeros(6), 50)
    parts = (np.zeros(2), np.zeros((2, 2)))
    state = opt.init(parts)
    for _ in range(50):
        x = np.concatenate([parts[0], parts[1].ravel()])
        g = A @ x - b
        parts, state = opt.update((g[:2], g[2:].reshape(2, 2)), state, parts)
    assert isinstance(parts, tuple) and parts[1].shape == (2, 2)
    np.testing.assert_array_equal(np.concatenate([parts[0], parts[1].ravel()]), joint)


# ----------------------------------------------------------------------------- PyTorch parity


def _torch_pair(torch_opt_factory, opt, steps=8, seed=3, **torch_kw):
    """Apply the same gradient sequence (independent of the params) to vigrad and torch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    p0 = (rng.standard_normal(4), rng.standard_normal((2, 3)))
    grads = [(rng.standard_normal(4) * 3, rng.standard_normal((2, 3)) * 0.1) for _ in range(steps)]
    tp = [torch.tensor(p.copy(), dtype=torch.float64, requires_grad=True) for p in p0]
    topt = torch_opt_factory(torch)(tp, **torch_kw)
    params, state = p0, opt.init(p0)
    for g in grads:
        params, state = opt.update(g, state, params)
        for t, gi in zip(tp, g):
            t.grad = torch.tensor(gi, dtype=torch.float64)
        topt.step()
        for mine, theirs in zip(params, tp):
            np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-12, atol=0)
    return params


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.01, b1=0.5, b2=0.9, eps=1e-3)])
def test_adam_matches_torch(kw):
    kw = dict(kw)
    lr = kw.pop("lr")
    b1, b2, eps = kw.get("b1", 0.9), kw.get("b2", 0.999), kw.get("eps", 1e-8)
    _torch_pair(lambda t: t.optim.Adam, optim.adam(lr, **kw), lr=lr, betas=(b1, b2), eps=eps)


def test_adam_weight_decay_matches_torch_adamw():
    _torch_pair(lambda t: t.optim.AdamW, optim.adam(0.05, weight_decay=0.1), lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.3, True)])
def test_sgd_matches_torch(momentum, nesterov):
    _torch_pair(lambda t: t.optim.SGD, optim.sgd(0.05, momentum=momentum, nesterov=nesterov),
                lr=0.05, momentum=momentum, nesterov=nesterov)


def test_sgd_weight_decay_without_momentum_matches_torch():
    """Decoupled p(1 - lr wd) - lr g equals PyTorch's coupled p - lr (g + wd p) for plain SGD."""
    _torch_pair(lambda t: t.optim.SGD, optim.sgd(0.05, weight_decay=0.2), lr=0.05, weight_decay=0.2)


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_rmsprop_matches_torch(momentum):
    _torch_pair(lambda t: t.optim.RMSprop, optim.rmsprop(0.01, decay=0.9, eps=1e-6, momentum=momentum),
                lr=0.01, alpha=0.9, eps=1e-6, momentum=momentum)


# ----------------------------------------------------------------------------- closed forms


def test_adam_first_steps_closed_form():
    """Step 1 of Adam moves each coordinate by lr * g / (|g| + eps) (bias correction cancels)."""
    g = np.array([2.0, -0.5, 1e-3])
    opt = optim.adam(0.1, eps=1e-8)
    x, state = opt.update(g, opt.init(np.zeros(3)), np.zeros(3))
    np.testing.assert_allclose(x, -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-14)
    np.testing.assert_allclose(state.m[0], 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(state.v[0], 0.001 * g * g, rtol=1e-15)
    # with a constant gradient every bias-corrected step is lr * g / (|g| + eps)
    opt = optim.adam(0.1)
    x, state = np.zeros(3), opt.init(np.zeros(3))
    for t in range(1, 6):
        x, state = opt.update(g, state, x)
        np.testing.assert_allclose(x, -0.1 * t * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_schedule_is_evaluated_at_the_step_count_from_zero():
    """sgd with a constant gradient g: x_T = x_0 - g * sum_{t<T} lr(t)."""
    sched = optim.robbins_monro(0.5, b=2.0, kappa=0.6)
    g = np.array([1.0, -2.0])
    x, state = _run(optim.sgd(sched), lambda x: g, np.zeros(2), 7)
    expect = -g * sum(0.5 / (2.0 + t) ** 0.6 for t in range(7))
    np.testing.assert_allclose(x, expect, rtol=1e-14)


def test_schedules_closed_forms():
    steps = np.arange(0, 40)
    s = optim.constant(0.3)
    assert [s(int(t)) for t in steps] == [0.3] * 40
    s = optim.step_decay(2.0, 0.1, every=7)
    np.testing.assert_allclose([s(int(t)) for t in steps], 2.0 * 0.1 ** (steps // 7), rtol=1e-15)
    assert s(6) == 2.0 and s(7) == pytest.approx(0.2, rel=1e-15)
    s = optim.exponential(0.5, 0.9)
    np.testing.assert_allclose([s(int(t)) for t in steps], 0.5 * 0.9 ** steps, rtol=1e-14)
    s = optim.robbins_monro(3.0, b=4.0, kappa=0.75)
    np.testing.assert_allclose([s(int(t)) for t in steps], 3.0 / (4.0 + steps) ** 0.75, rtol=1e-15)
    assert optim.robbins_monro(1.0)(0) == 1.0  # defaults b=1, kappa=0.75
    assert optim.robbins_monro(1.0)(15) == pytest.approx(16 ** -0.75, rel=1e-15)


def test_schedule_reprs_and_equality():
    assert repr(optim.constant(0.1)) == "Constant(lr=0.1)"
    assert repr(optim.step_decay(1, 0.5, 3)) == "StepDecay(lr=1.0, factor=0.5, every=3)"
    assert repr(optim.exponential(1, 0.5)) == "Exponential(lr=1.0, rate=0.5)"
    assert repr(optim.robbins_monro(2)) == "RobbinsMonro(a=2.0, b=1.0, kappa=0.75)"
    assert optim.exponential(1, 0.5) == optim.exponential(1.0, 0.5) != optim.exponential(1, 0.6)
    with pytest.raises(AttributeError, match="immutable"):
        optim.constant(0.1).lr = 1.0
    assert "Exponential(lr=1.0, rate=0.5)" in repr(optim.adam(optim.exponential(1, 0.5)))
    assert repr(optim.sgd(0.1)).startswith("Optimizer(name='sgd', lr=0.1, momentum=0.0")


# ----------------------------------------------------------------------------- clipping


def test_global_norm_and_clipping_by_hand():
    grads = (np.array([3.0, 0.0]), np.array([[0.0], [4.0]]))
    assert optim.global_norm(grads) == 5.0
    c = optim.clip_by_global_norm(grads, 2.5)  # factor 0.5
    np.testing.assert_array_equal(c[0], [1.5, 0.0])
    np.testing.assert_array_equal(c[1], [[0.0], [2.0]])
    same = optim.clip_by_global_norm(grads, 5.0)  # not above the limit: unchanged
    np.testing.assert_array_equal(same[1], grads[1])
    assert same[1] is not grads[1]
    v = optim.clip_by_value((np.array([-3.0, 0.25, 7.0]),), 1.0)
    np.testing.assert_array_equal(v[0], [-1.0, 0.25, 1.0])
    single = optim.clip_by_value(np.array([2.0, -2.0]), 0.5)
    assert isinstance(single, np.ndarray)
    np.testing.assert_array_equal(single, [0.5, -0.5])


def test_global_norm_does_not_overflow():
    assert optim.global_norm(np.array([3e200, 4e200])) == pytest.approx(5e200, rel=1e-15)
    c = optim.clip_by_global_norm(np.array([3e200, 4e200]), 1.0)
    np.testing.assert_allclose(c, [0.6, 0.8], rtol=1e-15)


def test_update_clips_value_then_norm():
    """update(clip_value=v, clip_norm=c) equals update on grads clipped by hand in that order."""
    grads = (np.array([10.0, -0.5]), np.array([3.0]))
    # value first: (1, -0.5), (1); norm sqrt(2.25) = 1.5, then scaled to 0.75: factor 0.5
    hand = (np.array([0.5, -0.25]), np.array([0.5]))
    params = (np.ones(2), np.ones(1))
    clipped = optim.sgd(1.0, clip_value=1.0, clip_norm=0.75)
    plain = optim.sgd(1.0)
    a, _ = clipped.update(grads, clipped.init(params), params)
    b, _ = plain.update(hand, plain.init(params), params)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-15)
    # norm first would give a different answer: the order matters and is the documented one
    norm_first = optim.clip_by_value(optim.clip_by_global_norm(grads, 0.75), 1.0)
    assert not np.allclose(1.0 - norm_first[0], a[0])


# ----------------------------------------------------------------------------- checkpoints

CKPT_CASES = [
    ("adam", lambda: optim.adam(optim.step_decay(0.05, 0.5, 30), clip_norm=2.0, weight_decay=0.01)),
    ("sgd_nesterov", lambda: optim.sgd(optim.robbins_monro(0.2), momentum=0.9, nesterov=True, clip_value=1.0)),
    ("sgd_plain", lambda: optim.sgd(0.05)),
    ("rmsprop", lambda: optim.rmsprop(optim.exponential(0.01, 0.99), momentum=0.5, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,make", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_checkpoint_resume_is_bit_exact(name, make, dtype, tmp_path):
    """100 steps = 50 steps + np.savez + np.load + 50 steps, bit for bit (noisy gradients)."""
    A, b, _ = _quadratic(seed=2, dim=4)

    def grads(params, t):
        noise = np.random.default_rng(t).standard_normal(7)
        x = params[0]
        return (A @ x - b + noise[:4], params[1] - noise[4:].reshape(3, 1))

    p0 = (np.zeros(4, dtype), np.ones((3, 1), dtype))
    opt = make()
    params, state = p0, opt.init(p0)
    for t in range(100):
        params, state = opt.update(grads(params, t), state, params)

    params2, state2 = p0, opt.init(p0)
    for t in range(50):
        params2, state2 = opt.update(grads(params2, t), state2, params2)
    path = tmp_path / "ckpt.npz"
    np.savez(path, p0=params2[0], p1=params2[1], **optim.state_to_dict(state2, prefix="opt."))
    del params2, state2
    opt = make()  # a fresh process would rebuild the optimiser from its config
    with np.load(path) as d:
        params2 = (d["p0"], d["p1"])
        state2 = optim.state_from_dict(opt, d, prefix="opt.")
    assert int(state2.step) == 50
    for t in range(50, 100):
        params2, state2 = opt.update(grads(params2, t), state2, params2)

    for x, y in zip(params, params2):
        assert x.dtype == y.dtype == dtype
        np.testing.assert_array_equal(x, y)
    flat, flat2 = optim.state_to_dict(state), optim.state_to_dict(state2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        assert flat[k].dtype == flat2[k].dtype
        np.testing.assert_array_equal(flat[k], flat2[k])


def test_state_dict_layout():
    opt = optim.rmsprop(0.1, momentum=0.5)
    params = (np.zeros(2), np.zeros((1, 3), np.float32))
    state = opt.init(params)
    d = optim.state_to_dict(state)
    assert sorted(d) == ["kind", "momentum_buf.0", "momentum_buf.1", "square_avg.0", "square_avg.1", "step"]
    assert str(d["kind"]) == "rmsprop" and d["step"].dtype == np.int64 and d["step"].shape == ()
    assert d["square_avg.1"].dtype == np.float32 and d["square_avg.1"].shape == (1, 3)
    assert sorted(optim.state_to_dict(optim.sgd(0.1).init(params))) == ["kind", "step"]
    back = optim.state_from_dict(opt, d)
    assert type(back) is optim.RMSpropState and back.square_avg[0] is not d["square_avg.0"]


# ----------------------------------------------------------------------------- dtype / purity


@pytest.mark.parametrize("make", [lambda: optim.adam(0.1), lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
                                  lambda: optim.rmsprop(0.01, momentum=0.5, weight_decay=0.1)])
def test_float32_is_preserved(make):
    """float32 params (with float64 grads) stay float32, state included, and track float64."""
    opt = make()
    p32 = (np.array([1.0, -2.0], np.float32), np.array([[0.5]], np.float32))
    p64 = tuple(p.astype(np.float64) for p in p32)
    s32, s64 = opt.init(p32), opt.init(p64)
    for t in range(20):
        g = (np.array([0.3, -1.0]) * (t + 1) ** 0.5, np.array([[2.0]]))
        p32, s32 = opt.update(g, s32, p32)
        p64, s64 = opt.update(g, s64, p64)
    assert all(p.dtype == np.float32 for p in p32)
    assert all(a.dtype == np.float32 for a in optim.state_to_dict(s32).values() if a.dtype.kind == "f")
    for a, b in zip(p32, p64):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_caller_arrays_are_not_modified():
    params = (np.array([1.0, 2.0]), np.array([[3.0]]))
    grads = (np.array([0.5, -0.5]), np.array([[1.0]]))
    for opt in (optim.adam(0.1, weight_decay=0.1, clip_norm=0.1, clip_value=0.2),
                optim.sgd(0.1, momentum=0.9), optim.rmsprop(0.1, momentum=0.9)):
        state = opt.init(params)
        state = opt.update(grads, state, params)[1]  # non-zero moments
        keep_p, keep_g = [p.copy() for p in params], [g.copy() for g in grads]
        keep_s = {k: v.copy() for k, v in optim.state_to_dict(state).items()}
        new_p, new_s = opt.update(grads, state, params)
        for a, b in zip(params, keep_p):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(grads, keep_g):
            np.testing.assert_array_equal(a, b)
        for k, v in optim.state_to_dict(state).items():
            np.testing.assert_array_equal(v, keep_s[k])
        assert all(not np.shares_memory(a, b) for a in new_p for b in params + grads)
    assert optim.clip_by_value(grads, 0.1)[0] is not grads[0]
    np.testing.assert_array_equal(grads[0], [0.5, -0.5])


def test_single_array_in_single_array_out():
    opt = optim.adam(0.1)
    x = np.array([1.0, 2.0])
    new, state = opt.update(x, opt.init(x), x)
    assert isinstance(new, np.ndarray) and new.shape == (2,)
    assert isinstance(state.m, tuple) and len(state.m) == 1
    assert opt.name == "adam" and opt.hyperparams["b1"] == 0.9


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_min_with_min_delta():
    stopper = optim.EarlyStopping(patience=3, min_delta=0.1)
    s = stopper.init()
    assert s == optim.EarlyStoppingState(math.inf, -1, 0, 0)
    out = []
    for v in [5.0, 4.0, 3.95, 3.91, 3.92, 3.0, 3.0, 2.95, 2.91]:
        s, stop, improved = stopper.update(s, v)
        out.append((stop, improved))
    # 3.95, 3.91, 3.92 are not below 4.0 - 0.1; 3.0 improves; 3.0, 2.95, 2.91 are not below 2.9
    assert out == [(False, True), (False, True), (False, False), (False, False), (True, False),
                   (False, True), (False, False), (False, False), (True, False)]
    assert s == optim.EarlyStoppingState(best=3.0, best_step=5, bad_steps=3, step=9)


def test_early_stopping_max_and_checkpoint():
    stopper = optim.EarlyStopping(patience=2, mode="max")
    s = stopper.init()
    assert s.best == -math.inf
    s, stop, improved = stopper.update(s, np.float32(1.0))
    s, stop, improved = stopper.update(s, 0.5)
    assert (stop, improved) == (False, False)
    # the state survives a round trip through plain arrays (np.savez of s._asdict())
    restored = optim.EarlyStoppingState(*(np.asarray(v) for v in s))
    s2, stop, improved = stopper.update(restored, 2.0)
    assert (stop, improved) == (False, True) and s2 == (2.0, 2, 0, 3)
    s2, stop, _ = stopper.update(s2, -np.inf)
    s2, stop, _ = stopper.update(s2, 2.0)  # equal is not an improvement
    assert stop and s2.bad_steps == 2


# ----------------------------------------------------------------------------- step-size search


def test_search_step_size_follows_stans_rule():
    calls = []

    def run(eta):
        calls.append(eta)
        if eta == 100.0:
            raise FloatingPointError("overflow")
        if eta == 10.0:
            return float("inf")
        return {1.0: 3.0, 0.1: 2.0, 0.01: 2.5, 0.001: 1.0}[eta]

    best, scores = optim.search_step_size(run, candidates=(0.001, 1.0, 100.0, 0.01, 10.0, 0.1))
    # decreasing order; 0.01 is worse than the finite best (0.1) so 0.001 is never tried
    assert calls == [100.0, 10.0, 1.0, 0.1, 0.01]
    assert best == 0.1
    assert list(scores.items()) == [(100.0, math.inf), (10.0, math.inf), (1.0, 3.0), (0.1, 2.0), (0.01, 2.5)]


def test_search_step_size_keeps_going_while_diverging_and_ties_go_to_larger():
    best, scores = optim.search_step_size(lambda eta: float("nan") if eta > 0.05 else 1.0)
    assert best == 0.01 and len(scores) == 5
    # -inf is a broken trial too, not a best score that would end the search
    best, scores = optim.search_step_size(lambda eta: -math.inf if eta > 5 else abs(eta - 1.0))
    assert best == 1.0 and scores == {100.0: math.inf, 10.0: math.inf, 1.0: 0.0, 0.1: 0.9}
    best, scores = optim.search_step_size(lambda eta: 1.0, candidates=[1.0, 2.0])
    assert best == 2.0 and scores == {2.0: 1.0, 1.0: 1.0}


def test_search_step_size_with_a_real_optimiser():
    """On the quadratic, 100-step Adam trials from the same start: the objective falls from
    eta = 100 down to 0.1 and rises again at 0.01, so the search tries all five and picks 0.1,
    whose trial ends within 1e-4 of the minimum."""
    A, b, x_star = _quadratic()
    f = lambda x: 0.5 * x @ A @ x - b @ x  # noqa: E731

    def run(eta):
        x, _ = _run(optim.adam(eta), lambda x: A @ x - b, np.zeros(5), 100)
        return f(x)

    best, scores = optim.search_step_size(run)
    assert list(scores) == [100.0, 10.0, 1.0, 0.1, 0.01]
    assert best == 0.1 == min(scores, key=scores.get)
    assert abs(scores[0.1] - f(x_star)) < 1e-4


def test_search_step_size_errors():
    with pytest.raises(ValueError, match="every candidate step size diverged"):
        optim.search_step_size(lambda eta: float("inf"))
    with pytest.raises(TypeError, match="run must be callable"):
        optim.search_step_size(3.0)
    with pytest.raises(ValueError, match="at least one"):
        optim.search_step_size(lambda e: 1.0, candidates=())
    with pytest.raises(ValueError, match=r"candidates\[1\] must be > 0"):
        optim.search_step_size(lambda e: 1.0, candidates=(1.0, -1.0))
    with pytest.raises(ValueError, match="distinct"):
        optim.search_step_size(lambda e: 1.0, candidates=(1.0, 1.0))
    with pytest.raises(TypeError, match="candidates must be a sequence"):
        optim.search_step_size(lambda e: 1.0, candidates=1.0)
    with pytest.raises(TypeError, match="run\\(eta\\) must return a real scalar"):
        optim.search_step_size(lambda e: "x")
    with pytest.raises(KeyError):  # a bug in run is not mistaken for divergence
        optim.search_step_size(lambda e: {}[e])


# ----------------------------------------------------------------------------- errors

CONSTRUCTOR_ERRORS = [
    (lambda: optim.adam(0.0), ValueError, "lr must be > 0, got 0.0"),
    (lambda: optim.adam(-1.0), ValueError, "lr must be > 0"),
    (lambda: optim.adam("0.1"), TypeError, "lr must be a real number, got str"),
    (lambda: optim.adam(float("nan")), ValueError, "lr must be finite"),
    (lambda: optim.adam(b1=1.0), ValueError, r"b1 must be in \[0, 1\), got 1.0"),
    (lambda: optim.adam(b2=-0.1), ValueError, r"b2 must be in \[0, 1\), got -0.1"),
    (lambda: optim.adam(eps=0.0), ValueError, "eps must be > 0"),
    (lambda: optim.adam(clip_norm=0.0), ValueError, "clip_norm must be > 0"),
    (lambda: optim.adam(clip_value=-1.0), ValueError, "clip_value must be > 0"),
    (lambda: optim.adam(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (lambda: optim.sgd(0.1, momentum=1.0), ValueError, r"momentum must be in \[0, 1\), got 1.0"),
    (lambda: optim.sgd(0.1, nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
    (lambda: optim.sgd(0.1, momentum=0.5, nesterov=1), TypeError, "nesterov must be a bool"),
    (lambda: optim.rmsprop(decay=1.5), ValueError, r"decay must be in \[0, 1\)"),
    (lambda: optim.rmsprop(momentum=-0.5), ValueError, r"momentum must be in \[0, 1\)"),
    (lambda: optim.constant(0), ValueError, "lr must be > 0"),
    (lambda: optim.step_decay(1.0, 0.0, 3), ValueError, "factor must be > 0"),
    (lambda: optim.step_decay(1.0, 0.5, 0), ValueError, "every must be >= 1, got 0"),
    (lambda: optim.step_decay(1.0, 0.5, 2.5), TypeError, "every must be an integer"),
    (lambda: optim.exponential(1.0, -0.5), ValueError, "rate must be > 0"),
    (lambda: optim.robbins_monro(1.0, kappa=0.5), ValueError, r"kappa must be in \(0.5, 1\]"),
    (lambda: optim.robbins_monro(1.0, kappa=1.1), ValueError, r"kappa must be in \(0.5, 1\]"),
    (lambda: optim.robbins_monro(0.0), ValueError, "a must be > 0"),
    (lambda: optim.robbins_monro(1.0, b=0.0), ValueError, "b must be > 0"),
    (lambda: optim.constant(0.1)(-1), ValueError, "step must be >= 0, got -1"),
    (lambda: optim.constant(0.1)(1.5), TypeError, "step must be a non-negative integer"),
    (lambda: optim.clip_by_value(np.ones(2), 0.0), ValueError, "limit must be > 0"),
    (lambda: optim.clip_by_global_norm(np.ones(2), -1.0), ValueError, "max_norm must be > 0"),
    (lambda: optim.global_norm(()), ValueError, "grads must hold at least one array"),
    (lambda: optim.EarlyStopping(patience=0), ValueError, "patience must be >= 1, got 0"),
    (lambda: optim.EarlyStopping(min_delta=-1.0), ValueError, "min_delta must be >= 0"),
    (lambda: optim.EarlyStopping(mode="best"), ValueError, "mode must be 'min' or 'max', got 'best'"),
]


@pytest.mark.parametrize("call,exc,match", CONSTRUCTOR_ERRORS, ids=[c[2][:40] for c in CONSTRUCTOR_ERRORS])
def test_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _update_errors():
    opt = optim.adam(0.1)
    params = (np.zeros(3), np.zeros((2, 2)))
    good = (np.ones(3), np.ones((2, 2)))
    state = opt.init(params)
    p32 = (np.zeros(3, np.float32), np.zeros((2, 2), np.float32))
    bad_grad = np.ones((2, 2))
    bad_grad[1, 0] = np.nan
    return [
        (lambda: opt.update((np.ones(3),), state, params), ValueError,
         r"grads must hold one array per parameter \(2\), got 1"),
        (lambda: opt.update((np.ones(3), np.ones(4)), state, params), ValueError,
         r"grads\[1\] must have the shape of params\[1\], \(2, 2\), got \(4,\)"),
        (lambda: opt.update((np.ones(3), bad_grad), state, params), ValueError,
         r"grads contain non-finite values \(array 1, index \(1, 0\)"),
        # finite float64 grads that overflow when cast to the float32 params
        (lambda: opt.update((np.ones(3), np.full((2, 2), 1e300)), opt.init(p32), p32), ValueError,
         r"grads contain non-finite values \(array 1, index \(0, 0\): inf"),
        (lambda: opt.update(good, optim.sgd(0.1).init(params), params), TypeError,
         "state must be an AdamState"),
        (lambda: opt.update(good, opt.init((np.zeros(3), np.zeros(4))), params), ValueError,
         r"state.m\[1\] must match params\[1\] \(\(2, 2\) float64\), got \(4,\) float64"),
        (lambda: opt.update(good, opt.init((np.zeros(3), np.zeros((2, 2), np.float32))), params), ValueError,
         r"state.m\[1\] must match params\[1\]"),
        (lambda: opt.update(good, opt.init(params[:1]), params), ValueError,
         r"state.m must be a tuple of 2 arrays \(one per parameter\), got 1"),
        (lambda: opt.update(good, state._replace(step=np.array(-1)), params), ValueError,
         "state.step must be a 0-d non-negative integer"),
        (lambda: opt.update(good, state, (np.zeros(3), np.zeros((2, 2), bool))), TypeError,
         r"params\[1\] must be real numbers, got bool"),
        (lambda: opt.update(("a", np.ones((2, 2))), state, params), TypeError, r"grads\[0\] must be an array"),
        (lambda: opt.update((), state, ()), ValueError, "params must hold at least one array, got an empty tuple"),
        (lambda: optim.sgd(lambda t: -1.0).update(np.ones(2), optim.sgd(1.0).init(np.ones(2)), np.ones(2)),
         ValueError, "lr schedule must return a finite value >= 0, got -1.0 at step 0"),
        (lambda: optim.sgd(lambda t: "x").update(np.ones(2), optim.sgd(1.0).init(np.ones(2)), np.ones(2)),
         TypeError, "lr schedule must return a real number"),
        (lambda: optim.sgd(0.1).update(np.ones(2), optim.sgd(0.1, momentum=0.5).init(np.ones(2)), np.ones(2)),
         ValueError, r"state.momentum_buf must be \(\) for this optimiser's settings"),
    ]


@pytest.mark.parametrize("case", range(len(_update_errors())))
def test_update_errors_change_nothing(case):
    call, exc, match = _update_errors()[case]
    with pytest.raises(exc, match=match):
        call()


def test_non_finite_grads_leave_everything_unchanged():
    opt = optim.adam(0.1)
    params = np.array([1.0, 2.0])
    state = opt.init(params)
    params, state = opt.update(np.array([1.0, 1.0]), state, params)
    before = (params.copy(), {k: v.copy() for k, v in optim.state_to_dict(state).items()})
    with pytest.raises(ValueError, match=r"grads contain non-finite values \(array 0, index \(1,\)"):
        opt.update(np.array([1.0, np.inf]), state, params)
    np.testing.assert_array_equal(params, before[0])
    for k, v in optim.state_to_dict(state).items():
        np.testing.assert_array_equal(v, before[1][k])


def test_state_dict_errors():
    opt = optim.adam(0.1)
    d = optim.state_to_dict(opt.init(np.zeros(2)))
    with pytest.raises(ValueError, match="d holds a 'adam' state, but opt is 'sgd'"):
        optim.state_from_dict(optim.sgd(0.1), d)
    with pytest.raises(ValueError, match=r"d has no key 'opt/kind'"):
        optim.state_from_dict(opt, d, prefix="opt/")
    with pytest.raises(ValueError, match="0-d non-negative integer"):
        optim.state_from_dict(opt, {**d, "step": np.array(1.5)})
    with pytest.raises(TypeError, match="opt must be an Optimizer"):
        optim.state_from_dict("adam", d)
    with pytest.raises(TypeError, match="state must be an AdamState, SGDState or RMSpropState, got dict"):
        optim.state_to_dict(d)
    with pytest.raises(TypeError, match="prefix must be a str"):
        optim.state_to_dict(opt.init(np.zeros(2)), prefix=1)


def test_early_stopping_update_errors():
    stopper = optim.EarlyStopping()
    with pytest.raises(ValueError, match="value must not be NaN"):
        stopper.update(stopper.init(), float("nan"))
    with pytest.raises(TypeError, match="value must be a real scalar, got str"):
        stopper.update(stopper.init(), "1.0")
    with pytest.raises(TypeError, match="value must be a real scalar, got ndarray"):
        stopper.update(stopper.init(), np.ones(2))
    with pytest.raises(TypeError, match="state must be an EarlyStoppingState"):
        stopper.update(None, 1.0)


# ----------------------------------------------------------------------------- one update rule, fused

RULES = [
    ("adam", lambda: optim.adam(0.05)),
    ("adamw", lambda: optim.adam(0.05, weight_decay=0.1)),
    ("sgd", lambda: optim.sgd(0.05)),
    ("sgd_nesterov_wd", lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("rmsprop", lambda: optim.rmsprop(0.01)),
    ("rmsprop_momentum", lambda: optim.rmsprop(0.01, momentum=0.5, weight_decay=0.1)),
]


def _params_and_grads(dtype, seed=0, steps=5):
    rng = np.random.default_rng(seed)
    # 3000 elements: three kernel blocks, the last one partial
    params = (rng.standard_normal(3000).astype(dtype), rng.standard_normal((7, 11)).astype(dtype))
    grads = [tuple(rng.standard_normal(p.shape).astype(dtype) for p in params) for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("name,make", RULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_out_of_place_workers_and_layout_give_the_same_bits(name, make, dtype):
    """One kernel per rule: in place or into fresh arrays, 1 or 3 threads, contiguous or strided
    parameters, the arithmetic is the same to the bit."""
    opt = make()
    params, grads = _params_and_grads(dtype)
    a, sa = params, opt.init(params)
    b = tuple(p.copy() for p in params)
    sb = opt.init(b)
    c = (np.repeat(params[0], 2)[::2], np.asfortranarray(params[1]))  # non-contiguous views
    assert not c[0].flags.c_contiguous and not c[1].flags.c_contiguous
    sc = opt.init(c)
    for g in grads:
        a, sa = opt.update(g, sa, a, workers=1)
        b, sb = opt.update(g, sb, b, inplace=True, workers=3)
        c, sc = opt.update(g, sc, c, workers=2)
    for x, y, z in zip(a, b, c):
        assert x.dtype == y.dtype == z.dtype == dtype
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    for f in sa._fields[1:]:
        for x, y in zip(getattr(sa, f), getattr(sb, f)):
            np.testing.assert_array_equal(x, y)


def test_in_place_writes_the_callers_arrays_and_checks_first():
    opt = optim.adam(0.1)
    x = np.array([1.0, -2.0])
    state = opt.init(x)
    x2, state2 = opt.update(2 * x, state, x, inplace=True)
    assert x2 is x and state2.m[0] is state.m[0] and int(state2.step) == 1 and int(state.step) == 0
    np.testing.assert_allclose(x, [0.9, -1.9], rtol=1e-8)  # 1 - 0.1 g / (|g| + eps)
    before = x.copy(), state2.m[0].copy()
    with pytest.raises(ValueError, match="non-finite"):
        opt.update(np.array([np.nan, 1.0]), state2, x, inplace=True)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(state2.m[0], before[1])
    with pytest.raises(ValueError, match="inplace=True needs C-contiguous writeable arrays"):
        opt.update(np.ones(2), opt.init(np.ones(4)[::2]), np.ones(4)[::2], inplace=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        opt.update(np.ones(2), state2, x, inplace=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_is_the_step_fused_into_the_bayes_by_backprop_backward(dtype):
    """vg.optim.adam on a layer's gradients gives the bits that the fused Adam of the BBB
    backward pass (AdamStep in bbb.hpp) writes, and _core.adam_update too."""
    import vigrad as vg
    from vigrad import _core

    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 30)).astype(dtype)
    g_out = rng.standard_normal((16, 20)).astype(dtype)
    fused = vg.BayesianLinear(30, 20, dtype=dtype, rng=1)
    plain = vg.BayesianLinear(30, 20, dtype=dtype, rng=1)
    opt = optim.adam(0.01)
    state = opt.init((plain.loc.copy(), plain.rho.copy()))
    n = fused.num_params
    moments = tuple(np.zeros(n, dtype) for _ in range(4))  # m_loc, v_loc, m_rho, v_rho
    by_core = (plain.loc.copy(), plain.rho.copy())
    core_m = [np.zeros(n, dtype) for _ in range(4)]
    b1, b2, eps = opt.hyperparams["b1"], opt.hyperparams["b2"], opt.hyperparams["eps"]
    for step in range(4):
        fused.forward(x, key=100 + step)
        fused._backward(g_out, 0.5, "mc", need_grad_x=False, adam=(moments, (step, 0.01, b1, b2, eps)))
        plain.forward(x, key=100 + step)
        res = plain.backward(g_out, kl_weight=0.5)
        (loc, rho), state = opt.update((res.grad_loc, res.grad_rho), state, (plain.loc, plain.rho))
        plain.loc[...] = loc
        plain.rho[...] = rho
        _core.adam_update(by_core[0], res.grad_loc, core_m[0], core_m[1], step, 0.01, b1, b2, eps, 1)
        _core.adam_update(by_core[1], res.grad_rho, core_m[2], core_m[3], step, 0.01, b1, b2, eps, 1)
    np.testing.assert_array_equal(fused.loc, plain.loc)
    np.testing.assert_array_equal(fused.rho, plain.rho)
    np.testing.assert_array_equal(by_core[0], plain.loc)
    np.testing.assert_array_equal(moments[1], state.v[0])


def test_bayesian_mlp_fit_takes_an_optimizer():
    import vigrad as vg

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -1.0, 0.5], np.float32)).astype(np.float32)

    def fit(**kw):
        m = vg.BayesianMLP([3, 8, 1], rng=0)
        m.fit(X, y, epochs=3, batch_size=16, **kw)
        return m._theta.copy()

    base = fit()
    np.testing.assert_array_equal(fit(lr=1e-3), base)  # the default is adam(1e-3)
    np.testing.assert_array_equal(fit(optimizer=optim.adam(1e-3)), base)
    sgd = fit(optimizer=optim.sgd(1e-3, momentum=0.9))
    assert np.isfinite(sgd).all() and not np.array_equal(sgd, base)
    # plain Adam is fused; Adam with clipping steps through vg.optim in place: the same rule
    clipped = fit(optimizer=optim.adam(1e-3, clip_norm=1e30))
    np.testing.assert_allclose(clipped, base, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="give lr or optimizer, not both"):
        fit(lr=1e-3, optimizer=optim.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer must be a vigrad.optim Optimizer"):
        fit(optimizer="adam")
    with pytest.raises(ValueError, match="checkpoint and resume keep Adam's state"):
        fit(optimizer=optim.sgd(0.1), checkpoint="unused.npz")


@pytest.mark.parametrize("kernel", ["adam", "sgd", "sgd_momentum", "sgd_nesterov", "rmsprop", "rmsprop_momentum"])
@pytest.mark.parametrize("decay", [1.0, 0.995])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 1024, 5000])
def test_update_kernels_match_the_numpy_reference(kernel, decay, dtype, n):
    """_core.optim_* against vigrad.reference.optim_* on the same arguments (float64 rtol 1e-12,
    float32 1e-5), in place and into fresh outputs."""
    from vigrad import _core
    from vigrad import reference as ref

    rng = np.random.default_rng(n)
    p, g = rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype)
    a, b = (rng.normal(size=n) * 0.1).astype(dtype), (rng.random(n) * 0.1).astype(dtype)
    rtol = 1e-12 if dtype == np.float64 else 1e-5

    def call(mod, inplace):
        st = [x.copy() for x in (p, a, b)]
        out = st if inplace else [np.empty_like(x) for x in st]
        if kernel == "adam":
            ok = mod.optim_adam(st[0], g, st[1], st[2], out[0], out[1], out[2], 3, 1e-2, 0.9, 0.999, 1e-8, decay, 2)
        elif kernel.startswith("sgd"):
            mom = kernel != "sgd"
            ok = mod.optim_sgd(st[0], g, st[1] if mom else None, out[0], out[1] if mom else None, 0.05,
                               0.9 if mom else 0.0, kernel == "sgd_nesterov", decay, 2)
        else:
            mom = kernel == "rmsprop_momentum"
            ok = mod.optim_rmsprop(st[0], g, st[2], st[1] if mom else None, out[0], out[2], out[1] if mom else None,
                                   0.01, 0.99, 1e-8, 0.5 if mom else 0.0, decay, 2)
        return ok, out

    written = {"adam": (0, 1, 2), "sgd": (0,), "sgd_momentum": (0, 1), "sgd_nesterov": (0, 1),
               "rmsprop": (0, 2), "rmsprop_momentum": (0, 1, 2)}[kernel]
    for inplace in (False, True):
        ok_c, got = call(_core, inplace)
        ok_r, want = call(ref, inplace)
        assert ok_c is ok_r is True
        for i in written:
            np.testing.assert_allclose(got[i], want[i], rtol=rtol, atol=rtol)
    g[n // 2] = np.nan
    assert call(_core, False)[0] is False and call(ref, False)[0] is False
