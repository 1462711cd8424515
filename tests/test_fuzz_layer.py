"""Seeded fuzz of the NumPy layer (vg.BayesianLinear) and of vg.metrics (issue 15), like the
hypothesis properties of the core in test_docs_and_memory.py.

Each seed draws a random valid call (shapes, dtypes, estimator, prior, key, weights) and checks
it against an oracle: the layer's forward against NumPy on the same noise (the core's
standard_normal, Philox), its reparam backward against the closed-form gradient, its other
estimators' backward against central finite differences; the metrics against their formulas
written out in NumPy.  Then the seed corrupts one argument (NaN, inf, complex, object, bool,
wrong shape, wrong kind, out of range): the call must raise TypeError or ValueError, nothing
else, and no argument may change.  The outcome is deterministic for each seed."""

import numpy as np
import pytest

import vigrad as vg
from vigrad import _core

SEEDS = range(60)
ESTIMATORS = ["reparam", "local", "flipout"]


def _softplus(x):
    return np.logaddexp(0.0, x)


def _normals(key, n, dtype=np.float64):
    """The core's standard normals for `key`, drawn in `dtype` (as the layer draws them), as float64."""
    z = np.empty((1, n), dtype)
    _core.standard_normal(key, z, 1)
    return z[0].astype(np.float64)


def _layer_case(seed):
    rng = np.random.default_rng(seed)
    n_in, n_out, B = (int(v) for v in rng.integers(1, 9, 3))
    dtype = np.float64 if rng.random() < 0.5 else np.float32
    estimator = ESTIMATORS[int(rng.integers(3))]
    if rng.random() < 0.5:
        prior = vg.Normal(float(rng.normal()), float(rng.uniform(0.3, 2.0)))
    else:
        prior = vg.ScaleMixtureNormal(float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.8, 2.0)),
                                      float(rng.uniform(0.05, 0.5)))
    layer = vg.BayesianLinear(n_in, n_out, prior=prior, estimator=estimator, dtype=dtype,
                              init_rho=float(rng.uniform(-4.0, 0.0)), rng=int(rng.integers(2**31)))
    x = rng.normal(size=(B, n_in)).astype(dtype)
    G = rng.normal(size=(B, n_out)).astype(dtype)
    key = int(rng.integers(0, 2**64, dtype=np.uint64))
    kl_weight = float(rng.uniform(0.0, 2.0))
    return rng, layer, x, G, key, kl_weight


def _forward_oracle(layer, x, key):
    """The layer's sampled forward in float64 NumPy on the same noise."""
    loc, rho = layer.loc.astype(np.float64), layer.rho.astype(np.float64)
    k, n_out, n_in = layer.in_features * layer.out_features, layer.out_features, layer.in_features
    sigma = _softplus(rho)
    M, mb = loc[:k].reshape(n_out, n_in), loc[k:]
    x = x.astype(np.float64)
    if layer.estimator == "reparam":
        w = loc + sigma * _normals(key, loc.size, layer.dtype)
        return x @ w[:k].reshape(n_out, n_in).T + w[k:]
    if layer.estimator == "flipout":
        d = sigma * _normals(key, loc.size, layer.dtype)
        signs = 2.0 * np.random.default_rng(key).integers(0, 2, size=(x.shape[0], n_in + n_out), dtype=np.int8) - 1
        S, R = signs[:, :n_in], signs[:, n_in:]
        return x @ M.T + mb + ((x * S) @ d[:k].reshape(n_out, n_in).T + d[k:]) * R
    var = sigma**2
    std = np.sqrt((x * x) @ var[:k].reshape(n_out, n_in).T + var[k:])
    zeta = np.empty((1, x.shape[0] * n_out), layer.dtype)
    _core.standard_normal(key ^ 0x5DEECE66D, zeta, 1)
    return x @ M.T + mb + std * zeta.reshape(x.shape[0], n_out)


def _log_prior_grad(prior, w):
    if isinstance(prior, vg.Normal):
        return -(w - float(prior.loc)) / float(prior.scale) ** 2
    pi, s1, s2 = float(prior.pi), float(prior.sigma1), float(prior.sigma2)
    a = np.log(pi) - np.log(s1) - 0.5 * (w / s1) ** 2
    b = np.log1p(-pi) - np.log(s2) - 0.5 * (w / s2) ** 2
    r = 1.0 / (1.0 + np.exp(b - a))  # responsibility of the first component
    return -w * (r / s1**2 + (1 - r) / s2**2)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_numpy_layer_valid_calls_match_the_oracles(seed):
    rng, layer, x, G, key, kw = _layer_case(seed)
    tol = dict(rtol=1e-10, atol=1e-10) if layer.dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    x0, G0 = x.copy(), G.copy()
    y = layer.forward(x, key=key)
    assert y.dtype == layer.dtype and y.shape == (x.shape[0], layer.out_features)
    np.testing.assert_allclose(y, _forward_oracle(layer, x, key), **tol)
    mean = layer.forward(x, sample=False)
    k = layer.in_features * layer.out_features
    M, mb = layer.loc[:k].reshape(layer.out_features, layer.in_features), layer.loc[k:]
    np.testing.assert_allclose(mean, x.astype(np.float64) @ M.T.astype(np.float64) + mb, **tol)
    y = layer.forward(x, key=key)
    if layer.estimator == "reparam":
        g = layer.backward(G, kl_weight=kw)
        loc, rho = layer.loc.astype(np.float64), layer.rho.astype(np.float64)
        eps = _normals(key, loc.size, layer.dtype)
        sigma = _softplus(rho)
        w = loc + sigma * eps
        A = np.concatenate([(G.astype(np.float64).T @ x.astype(np.float64)).reshape(-1), G.sum(axis=0)])
        dlogp = _log_prior_grad(layer.prior, w)
        sg = 1.0 / (1.0 + np.exp(-rho))
        np.testing.assert_allclose(g.grad_loc, A - kw * dlogp, **tol)
        np.testing.assert_allclose(g.grad_rho, (A - kw * dlogp) * eps * sg - kw * sg / sigma, **tol)
        W = w[:k].reshape(layer.out_features, layer.in_features)
        np.testing.assert_allclose(g.grad_x, G.astype(np.float64) @ W, **tol)
    elif layer.dtype == np.float64:
        # the data term only: F = sum(G * forward(x; theta)), by central differences on one
        # random direction in (loc, rho, x)
        g = layer.backward(G, kl_weight=kw, kl="none")
        d_loc, d_rho, d_x = rng.normal(size=layer.loc.size), rng.normal(size=layer.rho.size), rng.normal(size=x.shape)
        h = 1e-6
        loc0, rho0 = layer.loc.copy(), layer.rho.copy()

        def F(t):
            layer.loc[...] = loc0 + t * d_loc
            layer.rho[...] = rho0 + t * d_rho
            return float(np.sum(G * _forward_oracle(layer, x + t * d_x, key)))

        fd = (F(h) - F(-h)) / (2 * h)
        layer.loc[...], layer.rho[...] = loc0, rho0
        got = g.grad_loc @ d_loc + g.grad_rho @ d_rho + np.sum(g.grad_x * d_x)
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-7)
        assert g.kl == 0.0
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(G, G0)


def _corruptions(rng, x, G):
    """(name, call) pairs, each a valid call with one argument spoiled."""
    bad = x.astype(np.float64)
    bad[tuple(int(rng.integers(s)) for s in bad.shape)] = rng.choice([np.nan, np.inf, -np.inf])
    badG = G.astype(np.float64)
    badG[tuple(int(rng.integers(s)) for s in badG.shape)] = np.nan
    return [
        ("nonfinite x", lambda L: L.forward(bad, key=1)),
        ("complex x", lambda L: L.forward(x + 1j, key=1)),
        ("object x", lambda L: L.forward(x.astype(object), key=1)),
        ("None x", lambda L: L.forward(np.full(x.shape, None), key=1)),
        ("bool x", lambda L: L.forward(x > 0, key=1)),
        ("string x", lambda L: L.forward(np.full(x.shape, "1"), key=1)),
        ("x 1-D", lambda L: L.forward(x[0], key=1)),
        ("x columns", lambda L: L.forward(np.ones((x.shape[0], x.shape[1] + 1)), key=1)),
        ("x too large", lambda L: L.forward(x.astype(np.float64) * (1e300 if L.dtype == np.float32 else np.inf),
                                            key=1)),
        ("key float", lambda L: L.forward(x, key=float(rng.uniform(0, 10)))),
        ("key negative", lambda L: L.forward(x, key=-int(rng.integers(1, 2**40)))),
        ("key huge", lambda L: L.forward(x, key=2**64 + int(rng.integers(2**20)))),
        ("key str", lambda L: L.forward(x, key="7")),
        ("sample int", lambda L: L.forward(x, key=1, sample=1)),
        ("nonfinite grad_out", lambda L: (L.forward(x, key=1), L.backward(badG))),
        ("complex grad_out", lambda L: (L.forward(x, key=1), L.backward(G + 1j))),
        ("grad_out rows", lambda L: (L.forward(x, key=1), L.backward(np.ones((G.shape[0] + 1, G.shape[1]))))),
        ("kl_weight negative", lambda L: (L.forward(x, key=1), L.backward(G, kl_weight=-float(rng.uniform(0.1, 5))))),
        ("kl_weight nan", lambda L: (L.forward(x, key=1), L.backward(G, kl_weight=float("nan")))),
        ("kl_weight inf", lambda L: (L.forward(x, key=1), L.backward(G, kl_weight=float("inf")))),
        ("kl_weight str", lambda L: (L.forward(x, key=1), L.backward(G, kl_weight="1"))),
        ("kl mode", lambda L: (L.forward(x, key=1), L.backward(G, kl="MC"))),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_numpy_layer_bad_calls_raise_and_change_nothing(seed):
    rng, layer, x, G, key, kw = _layer_case(seed)
    cases = _corruptions(rng, x, G)
    for i in rng.choice(len(cases), 4, replace=False):
        name, call = cases[i]
        loc0, rho0, x0, G0 = layer.loc.copy(), layer.rho.copy(), x.copy(), G.copy()
        with np.errstate(all="raise"):  # no warning on the way to the error
            with pytest.raises((TypeError, ValueError)):
                call(layer)
        for a, b in ((layer.loc, loc0), (layer.rho, rho0), (x, x0), (G, G0)):
            np.testing.assert_array_equal(a, b, err_msg=name)


# -- metrics ------------------------------------------------------------------------------------------

def _probs(rng, shape, dtype):
    """Softmax rows computed in `dtype` (float16/32/64), so that their sums carry its rounding."""
    logits = rng.normal(scale=rng.uniform(0.1, 4.0), size=shape).astype(dtype)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype)


def _entropy(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)


def _metric_case(seed):
    rng = np.random.default_rng(10_000 + seed)
    N, K, S = int(rng.integers(1, 40)), int(rng.integers(2, 12)), int(rng.integers(1, 6))
    dtype = [np.float16, np.float32, np.float64][int(rng.integers(3))]
    sp = _probs(rng, (S, N, K), dtype)
    p = _probs(rng, (N, K), dtype)
    y = rng.integers(0, K, N)
    return rng, sp, p, y


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_metrics_valid_calls_match_their_formulas(seed):
    rng, sp, p, y = _metric_case(seed)
    P, SP = p.astype(np.float64), sp.astype(np.float64)
    N, K = P.shape
    p0, sp0, y0 = p.copy(), sp.copy(), y.copy()
    labels = y.astype(float) if rng.random() < 0.3 else y  # float labels holding whole numbers
    m = vg.metrics
    assert m.nll(p, labels) == pytest.approx(-np.mean(np.log(np.maximum(P[np.arange(N), y], 1e-12))), rel=1e-12)
    assert m.accuracy(p, labels) == np.mean(P.argmax(axis=1) == y)
    assert m.accuracy(P.argmax(axis=1), labels) == np.mean(P.argmax(axis=1) == y)
    onehot = np.eye(K)[y]
    assert m.brier_score(p, labels) == pytest.approx(np.mean(np.sum((P - onehot) ** 2, axis=1)), rel=1e-12)
    bins = int(rng.integers(1, 20))
    conf, pred = P.max(axis=1), P.argmax(axis=1)
    ece = 0.0
    for b in range(bins):  # bin b: (b / bins, (b + 1) / bins]
        inside = (conf > b / bins) & (conf <= (b + 1) / bins)
        if inside.any():
            ece += inside.sum() / N * abs(np.mean(pred[inside] == y[inside]) - conf[inside].mean())
    assert m.expected_calibration_error(p, labels, num_bins=bins) == pytest.approx(ece, abs=1e-12)
    total, aleatoric = _entropy(SP.mean(axis=0)), _entropy(SP).mean(axis=0)
    np.testing.assert_allclose(m.predictive_entropy(sp), total, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.expected_entropy(sp), aleatoric, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.mutual_information(sp), np.maximum(total - aleatoric, 0.0), rtol=1e-9, atol=1e-12)
    mean, std, target = rng.normal(size=N), rng.uniform(0.1, 3.0, N), rng.normal(size=N)
    assert m.rmse(mean, target) == pytest.approx(np.sqrt(np.mean((mean - target) ** 2)), rel=1e-12)
    want = np.mean(0.5 * ((target - mean) / std) ** 2 + np.log(std)) + 0.5 * np.log(2 * np.pi)
    assert m.gaussian_nll(mean, std, target) == pytest.approx(want, rel=1e-12)
    for a, b in ((p, p0), (sp, sp0), (y, y0)):
        np.testing.assert_array_equal(a, b)


def _bad_metric_calls(rng, sp, p, y):
    N, K = p.shape
    m = vg.metrics
    nanp = p.astype(np.float64)
    nanp[int(rng.integers(N)), int(rng.integers(K))] = np.nan
    neg = p.astype(np.float64)
    neg[int(rng.integers(N)), 0] = -0.25
    unnorm = p.astype(np.float64) * rng.choice([0.5, 1.5, 3.0])
    bad_y = y.copy()
    bad_y[int(rng.integers(N))] = K + int(rng.integers(0, 5))
    return [
        lambda: m.nll(nanp, y), lambda: m.nll(neg, y), lambda: m.nll(unnorm, y),
        lambda: m.nll(p, bad_y), lambda: m.nll(p, -1 - y), lambda: m.nll(p, y + 0.5),
        lambda: m.nll(p, y[:-1] if N > 1 else np.zeros(2, int)), lambda: m.nll(p, y > 0),
        lambda: m.nll(p[0], y), lambda: m.nll(p + 0j, y), lambda: m.nll(p.astype(object), y),
        lambda: m.nll(p, y, eps=0.0), lambda: m.nll(p, y, eps=float("nan")),
        lambda: m.accuracy(np.zeros((0, K)), y), lambda: m.accuracy(p[None], y),
        lambda: m.expected_calibration_error(p, y, num_bins=0),
        lambda: m.expected_calibration_error(p, y, num_bins=2.5),
        lambda: m.brier_score(unnorm, y), lambda: m.predictive_entropy(np.zeros((2, 2, 2, 2))),
        lambda: m.mutual_information(p), lambda: m.expected_entropy(sp * 2),
        lambda: m.rmse(np.zeros(N), np.zeros(N + 1)), lambda: m.rmse(np.full(N, np.inf), np.zeros(N)),
        lambda: m.gaussian_nll(np.zeros(N), -np.ones(N), np.zeros(N)),
        lambda: m.gaussian_nll(np.zeros(N), np.ones(N + 1), np.zeros(N)),
        lambda: m.gaussian_nll(np.zeros(N), "1", np.zeros(N)),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_metrics_bad_calls_raise_and_change_nothing(seed):
    rng, sp, p, y = _metric_case(seed)
    calls = _bad_metric_calls(rng, sp, p, y)
    p0, sp0, y0 = p.copy(), sp.copy(), y.copy()
    for i in rng.choice(len(calls), 6, replace=False):
        with np.errstate(all="raise"), pytest.raises((TypeError, ValueError)):
            calls[i]()
    for a, b in ((p, p0), (sp, sp0), (y, y0)):
        np.testing.assert_array_equal(a, b)
