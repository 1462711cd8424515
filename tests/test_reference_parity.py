"""The C++ core against the pure-NumPy reference, kernel by kernel, on the same inputs
(the same noise for the gradient estimators)."""

import numpy as np
import pytest

from vigrad import _core
from vigrad import reference as ref

from vg_testutil import RTOL, SHAPES, assert_close, random_problem

PRIOR_KINDS = ["scalar", "array"]


def normal_params(D, dtype, kind):
    if kind == "scalar":
        return np.array([0.3], dtype), np.array([1.7], dtype)
    rng = np.random.default_rng(5)
    return rng.normal(size=D).astype(dtype), rng.uniform(0.5, 2.0, size=D).astype(dtype)


def mixture_params(D, dtype, kind):
    if kind == "scalar":
        return np.array([0.25], dtype), np.array([1.0], dtype), np.array([np.exp(-6)], dtype)
    rng = np.random.default_rng(6)
    return (rng.uniform(0.1, 0.9, D).astype(dtype), rng.uniform(0.5, 2.0, D).astype(dtype),
            rng.uniform(0.01, 0.2, D).astype(dtype))


@pytest.mark.parametrize("S,D", SHAPES)
def test_standard_normal_and_sample(S, D, dtype):
    a, b = np.empty((S, D), dtype), np.empty((S, D), dtype)
    _core.standard_normal(2024, a, 2)
    ref.standard_normal(2024, b, 1)
    # Box-Muller through libmvec vs NumPy's log/cos: a few ulp of |z| <= 8.5
    assert_close(a, b, dtype, scale=10.0)
    loc, rho, _, _ = random_problem(S, D, dtype)
    scale = ref.softplus(rho, 1)
    w1, e1, w2, e2 = (np.empty((S, D), dtype) for _ in range(4))
    _core.sample(7, loc, scale, w1, e1, 2)
    ref.sample(7, loc, scale, w2, e2, 1)
    assert_close(e1, e2, dtype, scale=10.0)
    assert_close(w1, w2, dtype, scale=10.0)
    # w is built from the eps returned with it: within 2 ulp of the summands (the core may fuse a multiply-add)
    ulp = np.finfo(dtype).eps
    np.testing.assert_array_less(np.abs(w1 - (loc + scale * e1)), 2 * ulp * (np.abs(loc) + np.abs(scale * e1)) + 1e-300)


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 4099])
def test_elementwise_transforms(n, dtype):
    x = np.random.default_rng(n).normal(scale=20.0, size=n).astype(dtype)
    x[: n // 4] = np.linspace(-1000, 1000, n // 4)  # the stable forms hold far out
    assert_close(_core.softplus(x, 2), ref.softplus(x, 1), dtype)
    assert_close(_core.sigmoid(x, 2), ref.sigmoid(x, 1), dtype)
    y = np.abs(x) + dtype(1e-3)
    assert_close(_core.softplus_inv(y, 2), ref.softplus_inv(y, 1), dtype, scale=1.0)


@pytest.mark.parametrize("S,D", SHAPES)
def test_mf_log_prob_and_entropy(S, D, dtype):
    loc, rho, eps, _ = random_problem(S, D, dtype)
    scale = ref.softplus(rho, 1)
    w = (loc + scale * eps).astype(dtype)
    # row sums of D terms of size ~1
    assert_close(_core.mf_log_prob(loc, scale, w, 2), ref.mf_log_prob(loc, scale, w, 1), dtype, scale=D + 1)
    assert_close(_core.mf_entropy(scale, 2), ref.mf_entropy(scale, 1), dtype, scale=D + 1)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("S,D", SHAPES)
def test_prior_kernels(S, D, dtype, kind):
    w = (3.0 * np.random.default_rng(1).standard_normal((S, D))).astype(dtype)
    m, s = normal_params(D, dtype, kind)
    assert_close(_core.normal_log_prob(w, m, s, 2), ref.normal_log_prob(w, m, s, 1), dtype, scale=10 * (D + 1))
    assert_close(_core.normal_grad_log_prob(w, m, s, 2), ref.normal_grad_log_prob(w, m, s, 1), dtype, scale=10)
    pi, s1, s2 = mixture_params(D, dtype, kind)
    assert_close(_core.mixture_log_prob(w, pi, s1, s2, 2), ref.mixture_log_prob(w, pi, s1, s2, 1), dtype,
                 scale=10 * (D + 1))
    # gradients reach |w| / s2^2 ~ 1e6 for the narrow component
    g_scale = 1.0 / float(np.min(s2, initial=1.0)) ** 2 * 10
    assert_close(_core.mixture_grad_log_prob(w, pi, s1, s2, 2), ref.mixture_grad_log_prob(w, pi, s1, s2, 1),
                 dtype, scale=g_scale)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("D", [0, 1, 5, 3000])
def test_kl_mf_normal(D, dtype, kind):
    loc, rho, _, _ = random_problem(1, D, dtype)
    m, s = normal_params(D, dtype, kind)
    got, want = _core.kl_mf_normal(loc, rho, m, s, 0.7, 2), ref.kl_mf_normal(loc, rho, m, s, 0.7, 1)
    assert_close(got[0], want[0], dtype, scale=D + 1)
    assert_close(got[1], want[1], dtype, scale=10)
    assert_close(got[2], want[2], dtype, scale=10)


def _summand_scale(eps, glik):
    if eps.size == 0:
        return 10.0
    return 10.0 * (1.0 + float(np.abs(glik).mean()) + float((eps * eps).mean()))


@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("mode", ["mc", "stl", "analytic"])
@pytest.mark.parametrize("S,D", [(1, 1), (3, 5), (1000, 257), (2, 0)])
def test_pathwise_grad_normal(S, D, dtype, mode, kind):
    loc, rho, eps, glik = random_problem(S, D, dtype)
    m, s = normal_params(D, dtype, kind)
    got = _core.pathwise_grad_normal(loc, rho, eps, glik, m, s, mode, 0.3, 2)
    want = ref.pathwise_grad_normal(loc, rho, eps, glik, m, s, mode, 0.3, 1)
    sc = _summand_scale(eps, glik)
    assert got[3] is True and want[3] is True
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(got[0], want[0], dtype, scale=sc)
    assert_close(got[1], want[1], dtype, scale=sc)
    assert_close(got[2], want[2], dtype, scale=sc * (D + 1))


@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("mode", ["mc", "stl"])
@pytest.mark.parametrize("S,D", [(1, 1), (3, 5), (1000, 257), (2, 0)])
def test_pathwise_grad_mixture(S, D, dtype, mode, kind):
    loc, rho, eps, glik = random_problem(S, D, dtype)
    loc *= dtype(0.1)  # weights near zero, where both components matter
    pi, s1, s2 = mixture_params(D, dtype, kind)
    got = _core.pathwise_grad_mixture(loc, rho, eps, glik, pi, s1, s2, mode, 1.0, 2)
    want = ref.pathwise_grad_mixture(loc, rho, eps, glik, pi, s1, s2, mode, 1.0, 1)
    w = (loc + ref.softplus(rho, 1) * eps).astype(np.float64)
    gp = ref.mixture_grad_log_prob(w, pi.astype(np.float64), s1.astype(np.float64), s2.astype(np.float64), 1)
    # the summands are gp * (1, eps): their size sets the floor
    sc = _summand_scale(eps, glik) + 10.0 * float(np.abs(gp * (1 + np.abs(eps))).mean()) if eps.size else 10.0
    assert_close(got[0], want[0], dtype, scale=sc)
    assert_close(got[1], want[1], dtype, scale=sc)
    assert_close(got[2], want[2], dtype, scale=sc * (D + 1))


@pytest.mark.parametrize("baseline,value", [("none", 0.0), ("constant", 1.5), ("loo", 0.0)])
@pytest.mark.parametrize("S,D", [(2, 1), (3, 5), (1000, 257), (2, 0)])
def test_score_grad(S, D, dtype, baseline, value):
    loc, rho, eps, _ = random_problem(S, D, dtype)
    f = np.random.default_rng(3).normal(size=S).astype(dtype)
    got = _core.score_grad(loc, rho, eps, f, baseline, value, 2)
    want = ref.score_grad(loc, rho, eps, f, baseline, value, 1)
    sc = 10.0 * (1.0 + float(np.abs(f).mean()) + abs(value))
    assert got[2] is True
    assert_close(got[0], want[0], dtype, scale=sc)
    assert_close(got[1], want[1], dtype, scale=sc)


def test_reference_has_every_core_kernel():
    core_names = {n for n in dir(_core) if not n.startswith("_")} - {"build_info", "has_openmp", "max_threads"}
    assert core_names == set(ref.__all__)


@pytest.mark.parametrize("use", ["weights", "perturbation"])
@pytest.mark.parametrize("D", [0, 1, 5, 1024, 2500])
def test_bbb_noise(D, dtype, use):
    loc, rho, _, _ = random_problem(1, D, dtype)
    got, want = np.empty(D, dtype), np.empty(D, dtype)
    _core.bbb_noise(use, 11, loc, rho, got, 2)
    ref.bbb_noise(use, 11, loc, rho, want, 1)
    assert_close(got, want, dtype, scale=10.0)


def _bbb_args(D, dtype, data, prior):
    loc, rho, eps, glik = random_problem(2, D, dtype, seed=D)
    loc *= dtype(0.1)
    A, BC = glik[0].copy(), (glik[1].copy() if data != "reparam" else None)
    pp = normal_params(D, dtype, "array") if prior == "normal" else mixture_params(D, dtype, "scalar")
    return (data, "mc", 5, loc, rho, A, BC, *pp)


@pytest.mark.parametrize("prior,kl", [("normal", "none"), ("normal", "mc"), ("normal", "analytic"),
                                      ("mixture", "none"), ("mixture", "mc")])
@pytest.mark.parametrize("data", ["reparam", "times_eps", "direct"])
@pytest.mark.parametrize("D", [1, 7, 2500])
def test_bbb_grad(D, dtype, data, prior, kl):
    args = list(_bbb_args(D, dtype, data, prior))
    args[1] = kl
    core_fn, ref_fn = (_core.bbb_grad_normal, ref.bbb_grad_normal) if prior == "normal" else \
        (_core.bbb_grad_mixture, ref.bbb_grad_mixture)
    got = core_fn(*args, 0.7, 2)
    want = ref_fn(*args, 0.7, 1)
    assert got[3] is True and want[3] is True
    assert got[0].dtype == dtype and got[1].dtype == dtype
    # mixture: the prior gradient reaches 1/s2^2 |w| ~ 400 |w|; its size sets the floor
    sc = 10.0 * (1.0 + float(np.abs(want[0]).mean()) + float(np.abs(want[1]).mean()))
    cond = _noise_conditioning(ref_fn, args, dtype) if kl == "mc" else (0.0, 0.0)
    for k in (0, 1):
        diff = np.abs(got[k].astype(np.float64) - want[k].astype(np.float64))
        bound = RTOL[np.dtype(dtype)] * (np.abs(want[k]) + sc) + cond[k]
        assert np.all(diff <= bound), f"output {k}: worst |core - reference| / bound = {np.max(diff / bound):.3g}"
    assert_close(got[2], want[2], dtype, scale=sc * (D + 1))


def _noise_conditioning(ref_fn, args, dtype):
    """How far the fused gradient moves when the layer's own noise moves by a few ulp.

    bbb_grad draws eps from its key inside the kernel (Box-Muller: a log, a sqrt and a cos), and
    the core and NumPy round those, and w = loc + sigma * eps, each at the dtype's precision with
    their own libm / libmvec (whose last bits differ from CPU to CPU).  With the mixture prior the
    prior gradient is ~ w / s2^2, so an ulp of eps can move an element of the gradient by
    sigma / s2^2 * ulp(eps): ~1e-3 in float32 where the gradient is ~300.  That part of the
    difference is the problem's conditioning, not an error of either side, so the bound adds it,
    measured on the reference by moving its noise by 4 ulp of eps and of w / sigma (both signs)."""
    from vigrad.reference import _kernels as refk

    tiny = 4.0 * float(np.finfo(dtype).eps)
    loc, rho = args[3].astype(np.float64), args[4].astype(np.float64)
    sigma = np.logaddexp(0.0, rho)
    normals = refk._normals
    base = ref_fn(*args, 0.7, 1)
    worst = [np.zeros(loc.shape), np.zeros(loc.shape)]
    for sign in (1.0, -1.0):
        def moved(key, S, D, dt, sign=sign):
            e = normals(key, S, D, dt).astype(np.float64)
            return e + sign * tiny * (np.abs(e) + np.abs(loc + sigma * e) / sigma)
        refk._normals = moved
        try:
            out = ref_fn(*args, 0.7, 1)
        finally:
            refk._normals = normals
        for k in (0, 1):
            worst[k] = np.maximum(worst[k], np.abs(out[k].astype(np.float64) - base[k].astype(np.float64)))
    return worst


@pytest.mark.parametrize("impl", ["core", "reference"])
def test_bbb_grad_out_and_accumulate(impl, dtype):
    mod = _core if impl == "core" else ref
    D = 2500
    args = _bbb_args(D, dtype, "times_eps", "mixture")
    gl, gr, klv, fin = mod.bbb_grad_mixture(*args, 0.5, 2)
    ol, orr = np.full(D, 3.0, dtype), np.full(D, -1.0, dtype)
    res = mod.bbb_grad_mixture(*args, 0.5, 2, out_loc=ol, out_rho=orr)
    assert res[0] is ol and res[1] is orr and res[2] == klv and res[3] == fin
    np.testing.assert_array_equal(ol, gl)
    np.testing.assert_array_equal(orr, gr)
    mod.bbb_grad_mixture(*args, 0.5, 2, out_loc=ol, out_rho=orr, accumulate=True)
    np.testing.assert_array_equal(ol, gl + gl)
    np.testing.assert_array_equal(orr, gr + gr)
    # compute_kl=False: the same gradients, the KL value not formed
    gl2, gr2, kl2, fin2 = mod.bbb_grad_mixture(*args, 0.5, 2, compute_kl=False)
    np.testing.assert_array_equal(gl2, gl)
    np.testing.assert_array_equal(gr2, gr)
    assert kl2 == 0.0 and fin2 == fin
    with pytest.raises(ValueError, match="together"):
        mod.bbb_grad_mixture(*args, 0.5, 2, out_loc=ol)
    with pytest.raises(ValueError, match="accumulate"):
        mod.bbb_grad_mixture(*args, 0.5, 2, accumulate=True)
    with pytest.raises(ValueError, match="out_loc"):
        mod.bbb_grad_mixture(*args, 0.5, 2, out_loc=ol[:-1], out_rho=orr)
    with pytest.raises(ValueError, match="analytic"):
        mod.bbb_grad_mixture(args[0], "analytic", *args[2:], 0.5, 2)


def test_bbb_grad_out_checks(dtype):
    D = 100
    args = _bbb_args(D, dtype, "times_eps", "normal")
    loc, A = args[3], args[5]
    ol, orr = np.empty(D, dtype), np.empty(D, dtype)
    with pytest.raises(ValueError, match="overlap A"):
        _core.bbb_grad_normal(*args, 0.5, 1, out_loc=A, out_rho=orr)
    with pytest.raises(ValueError, match="overlap loc"):
        _core.bbb_grad_normal(*args, 0.5, 1, out_loc=ol, out_rho=loc)
    with pytest.raises(ValueError, match="must not overlap"):
        _core.bbb_grad_normal(*args, 0.5, 1, out_loc=ol, out_rho=ol)
    ro = np.empty(D, dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.bbb_grad_normal(*args, 0.5, 1, out_loc=ol, out_rho=ro)
    with pytest.raises(TypeError):  # another dtype: no silent copy
        _core.bbb_grad_normal(*args, 0.5, 1, out_loc=np.zeros(D, np.float16), out_rho=orr)


@pytest.mark.parametrize("n", [1, 1000, 5000])
def test_adam_update(n, dtype):
    rng = np.random.default_rng(n)
    p, g = rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype)
    m, v = (rng.normal(size=n) * 0.1).astype(dtype), (rng.random(n) * 0.1).astype(dtype)
    state = [[a.copy() for a in (p, m, v)] for _ in range(2)]
    _core.adam_update(state[0][0], g, state[0][1], state[0][2], 4, 1e-2, 0.9, 0.999, 1e-8, 2)
    ref.adam_update(state[1][0], g, state[1][1], state[1][2], 4, 1e-2, 0.9, 0.999, 1e-8, 1)
    for a, b in zip(state[0], state[1]):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("use", ["weights", "perturbation", "none"])
@pytest.mark.parametrize("prior,kl", [("normal", "none"), ("normal", "mc"), ("normal", "analytic"), ("mixture", "mc")])
@pytest.mark.parametrize("D", [1, 2500])
def test_bbb_noise_kl(D, dtype, prior, kl, use):
    data, _, key, loc, rho, A, BC, *pp = _bbb_args(D, dtype, "reparam", prior)
    names = ("bbb_noise_kl_normal", "bbb_grad_normal") if prior == "normal" else \
        ("bbb_noise_kl_mixture", "bbb_grad_mixture")
    got, want = (np.empty(D, dtype) if use != "none" else None for _ in range(2))
    klc = getattr(_core, names[0])(use, kl, key, loc, rho, got, *pp, 2)
    klr = getattr(ref, names[0])(use, kl, key, loc, rho, want, *pp, 1)
    assert_close(klc, klr, dtype, scale=100.0 * (D + 1))
    # the KL bbb_grad computes from the same key: bit for bit where both form w = loc + sigma eps
    # alike ('perturbation' also needs sigma eps alone, so gcc may not fuse that multiply-add)
    klg = getattr(_core, names[1])(data, kl, key, loc, rho, A, BC, *pp, 1.0, 2)[2]
    if use == "perturbation":
        assert_close(klc, klg, dtype, scale=100.0 * (D + 1))
    else:
        assert klc == klg
    if use != "none":
        assert_close(got, want, dtype, scale=10.0)
        plain = np.empty(D, dtype)
        _core.bbb_noise(use, key, loc, rho, plain, 1)
        np.testing.assert_array_equal(got, plain)


def test_bbb_noise_kl_errors():
    D = 10
    loc, rho = np.zeros(D), np.zeros(D)
    pp = (np.array([0.5]), np.array([1.0]), np.array([0.1]))
    for mod in (_core, ref):
        with pytest.raises(ValueError, match="needs the out array"):
            mod.bbb_noise_kl_mixture("weights", "mc", 1, loc, rho, None, *pp, 1)
        with pytest.raises(ValueError, match="analytic"):
            mod.bbb_noise_kl_mixture("none", "analytic", 1, loc, rho, None, *pp, 1)
        with pytest.raises(ValueError, match="use must be"):
            mod.bbb_noise_kl_mixture("both", "mc", 1, loc, rho, None, *pp, 1)
    with pytest.raises(ValueError, match="overlap"):
        _core.bbb_noise_kl_mixture("weights", "mc", 1, loc, rho, loc, *pp, 1)


@pytest.mark.parametrize("impl", ["core", "reference"])
@pytest.mark.parametrize("D", [7, 2500])
def test_bbb_grad_fused_adam(impl, D, dtype):
    """adam_state / adam: the gradients of the call, then one adam_update on loc and rho."""
    mod = _core if impl == "core" else ref
    args = list(_bbb_args(D, dtype, "times_eps", "mixture"))
    loc, rho = args[3].copy(), args[4].copy()
    rng = np.random.default_rng(D)
    state = [(rng.normal(size=D) * 0.01).astype(dtype) if i % 2 == 0 else (rng.random(D) * 0.01).astype(dtype)
             for i in range(4)]
    hyper = (3, 1e-2, 0.9, 0.999, 1e-8)
    gl, gr, klv, fin = mod.bbb_grad_mixture(*args, 0.5, 2)
    want = [loc.copy(), rho.copy()] + [a.copy() for a in state]
    mod.adam_update(want[0], gl, want[2], want[3], *hyper, 1)
    mod.adam_update(want[1], gr, want[4], want[5], *hyper, 1)
    got_state = [a.copy() for a in state]
    res = mod.bbb_grad_mixture(*args, 0.5, 2, adam_state=tuple(got_state), adam=hyper)
    assert res[0] is None and res[1] is None and res[2] == klv and res[3] == fin
    for got, w in zip([args[3], args[4]] + got_state, want):
        assert_close(got, w, dtype, scale=10.0)


def test_bbb_grad_fused_adam_errors():
    D = 10
    args = list(_bbb_args(D, np.float64, "reparam", "normal"))
    st = tuple(np.zeros(D) for _ in range(4))
    hyper = (0, 1e-3, 0.9, 0.999, 1e-8)
    for mod in (_core, ref):
        with pytest.raises(ValueError, match="together"):
            mod.bbb_grad_normal(*args, 1.0, 1, adam_state=st)
        with pytest.raises(ValueError, match="accumulate"):
            mod.bbb_grad_normal(*args, 1.0, 1, adam_state=st, adam=hyper, accumulate=True,
                                out_loc=np.zeros(D), out_rho=np.zeros(D))
        with pytest.raises(ValueError, match="adam_state must be"):
            mod.bbb_grad_normal(*args, 1.0, 1, adam_state=st[:3], adam=hyper)
        with pytest.raises(ValueError, match="adam must be"):
            mod.bbb_grad_normal(*args, 1.0, 1, adam_state=st, adam=hyper[:4])
    with pytest.raises(TypeError, match="m_loc"):
        _core.bbb_grad_normal(*args, 1.0, 1, adam_state=(np.zeros(D, np.float32),) + st[1:], adam=hyper)
    with pytest.raises(ValueError, match="overlap"):
        _core.bbb_grad_normal(*args, 1.0, 1, adam_state=(st[0], st[0], st[2], st[3]), adam=hyper)
    args[3].flags.writeable = False
    with pytest.raises(ValueError, match="writeable loc"):
        _core.bbb_grad_normal(*args, 1.0, 1, adam_state=st, adam=hyper)


def test_bbb_grad_fused_adam_checks_its_hyperparameters_and_overlaps():
    D = 10
    args = list(_bbb_args(D, np.float64, "times_eps", "normal"))
    st = tuple(np.zeros(D) for _ in range(4))
    for hyper, exc, match in [((0, 1e-3, 1.0, 0.999, 1e-8), ValueError, "b1 must be in"),
                              ((0, 1e-3, 0.9, -0.1, 1e-8), ValueError, "b2 must be in"),
                              ((0, float("nan"), 0.9, 0.999, 1e-8), ValueError, "lr must be finite"),
                              ((0, -1e-3, 0.9, 0.999, 1e-8), ValueError, "lr must be finite"),
                              ((0, 1e-3, 0.9, 0.999, 0.0), ValueError, "eps must be"),
                              ((-1, 1e-3, 0.9, 0.999, 1e-8), ValueError, "step must be >= 0"),
                              ((1.5, 1e-3, 0.9, 0.999, 1e-8), TypeError, "step must be an int"),
                              ((0, "x", 0.9, 0.999, 1e-8), TypeError, "lr must be a real")]:
        with pytest.raises(exc, match=match):
            _core.bbb_grad_normal(*args, 1.0, 1, adam_state=st, adam=hyper)
    hyper = (0, 1e-3, 0.9, 0.999, 1e-8)
    loc = args[3]
    with pytest.raises(ValueError, match="out_rho must not overlap"):
        _core.bbb_grad_normal(*args, 1.0, 1, adam_state=st, adam=hyper, out_loc=np.zeros(D), out_rho=st[1])
    with pytest.raises(ValueError, match="A must not overlap"):
        _core.bbb_grad_normal(*args[:5], loc, *args[6:], 1.0, 1, adam_state=st, adam=hyper)
    with pytest.raises(ValueError, match="B_or_C must not overlap"):
        _core.bbb_grad_normal(*args[:6], st[2], *args[7:], 1.0, 1, adam_state=st, adam=hyper)
    np.testing.assert_array_equal(st[0], 0.0)  # nothing was written


@pytest.mark.parametrize("impl", ["core", "reference"])
def test_bbb_grad_compute_kl_false_for_every_kl_mode(impl, dtype):
    mod = _core if impl == "core" else ref
    args = list(_bbb_args(100, dtype, "reparam", "normal"))
    for kl in ("mc", "analytic"):
        args[1] = kl
        gl, gr, klv, fin = mod.bbb_grad_normal(*args, 0.5, 2)
        gl2, gr2, kl2, fin2 = mod.bbb_grad_normal(*args, 0.5, 2, compute_kl=False)
        assert klv != 0.0 and kl2 == 0.0 and fin2 == fin
        np.testing.assert_array_equal(gl2, gl)
        np.testing.assert_array_equal(gr2, gr)
