"""vigrad.mapfit: L-BFGS (NumPy and SciPy paths), the batched numerical Hessian, and the
Laplace approximation, against closed-form minimisers, Hessians and inverses."""

import doctest

import numpy as np
import pytest

import vigrad.mapfit as mapfit

PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("scipy") is None, reason="scipy is not installed"))]


def rosenbrock(x):
    """sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2, minimum 0 at x = 1."""
    a, b = x[:-1], x[1:]
    f = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    g[1:] += 200.0 * (b - a * a)
    return f, g


def spd(d, seed, cond=100.0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * np.geomspace(1.0, cond, d)) @ Q.T


class Counted:
    def __init__(self, fun):
        self.fun, self.calls = fun, 0

    def __call__(self, x):
        self.calls += 1
        return self.fun(x)


def test_docstring_examples_run():
    result = doctest.testmod(mapfit, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_module_surface():
    for name in ("lbfgs", "LbfgsResult", "numerical_hessian", "laplace_approximation", "LaplaceResult"):
        assert name in mapfit.__all__ and hasattr(mapfit, name)


# -- lbfgs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_scipy", PATHS)
@pytest.mark.parametrize("d", [2, 10])
def test_lbfgs_minimises_rosenbrock(d, use_scipy):
    x0 = np.tile([-1.2, 1.0], d // 2)
    before = x0.copy()
    fun = Counted(rosenbrock)
    res = mapfit.lbfgs(fun, x0, use_scipy=use_scipy, gtol=1e-9)
    np.testing.assert_array_equal(x0, before)
    assert res.converged, res.message
    assert np.max(np.abs(res.x - 1.0)) < 1e-6
    assert res.fun < 1e-12 and res.fun == rosenbrock(res.x)[0]
    np.testing.assert_array_equal(res.grad, rosenbrock(res.x)[1])
    assert res.nfev == fun.calls and 0 < res.nit < 1000
    assert isinstance(res, mapfit.LbfgsResult) and isinstance(res.fun, float) and isinstance(res.converged, bool)


def test_lbfgs_numpy_default_tolerances_reach_rosenbrock():
    res = mapfit.lbfgs(rosenbrock, np.tile([-1.2, 1.0], 5), use_scipy=False)
    assert res.converged and np.max(np.abs(res.x - 1.0)) < 1e-6


@pytest.mark.parametrize("use_scipy", PATHS)
def test_lbfgs_solves_a_random_spd_quadratic(use_scipy):
    d = 30
    A = spd(d, 0, cond=1e3)
    b = np.random.default_rng(1).standard_normal(d)
    x_star = np.linalg.solve(A, b)
    lam_min, lam_max = 1.0, 1e3
    f_star = 0.5 * x_star @ A @ x_star - b @ x_star
    # The smallest gradient a line search can still see: near x*, a step changes f by about
    # |g|^2 / (2 lam_max), which must exceed the rounding of f, eps |f*|.  gtol sits 10x above
    # that floor (7.5e-7 here), so no run depends on the last bits of the BLAS products.
    floor = np.sqrt(2 * lam_max * np.finfo(float).eps * abs(f_star))
    gtol = 10 * floor
    # ftol = 0: stop on the gradient alone (ftol would fix x only to ~sqrt(ftol))
    res = mapfit.lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(d), use_scipy=use_scipy,
                       gtol=gtol, ftol=0.0)
    assert res.converged, res.message
    # |x - x*| <= |A^-1| |g| <= sqrt(d) gtol / lam_min at the stop
    np.testing.assert_allclose(res.x, x_star, rtol=0, atol=np.sqrt(d) * gtol / lam_min)
    assert res.x.shape == (d,) and res.x.dtype == np.float64


def test_lbfgs_backtracks_from_non_finite_values():
    """f = sum(x - log x) is +inf / NaN for x <= 0; the first step from x0 = 0.01 (gradient
    -99) overshoots into x < 0 and the search must back off.  Minimum at x = 1."""

    def fun(x):
        with np.errstate(invalid="ignore", divide="ignore"):
            f = float(np.sum(x - np.log(x))) if (x > 0).all() else np.inf
            return f, 1.0 - 1.0 / x

    res = mapfit.lbfgs(fun, np.array([0.01, 3.0, 0.5]), use_scipy=False, gtol=1e-10)
    assert res.converged, res.message
    np.testing.assert_allclose(res.x, 1.0, atol=1e-8)

    def nan_outside(x):  # f or the gradient NaN beyond |x| > 2 counts as too far too
        if np.abs(x).max() > 2:
            return np.nan, 2 * x
        return float((x - 1.5) @ (x - 1.5)), 2 * (x - 1.5)

    res = mapfit.lbfgs(nan_outside, np.array([-1.9]), use_scipy=False)
    assert res.converged and abs(res.x[0] - 1.5) < 1e-6

    def nan_grad(x):
        return float(x @ x), (2 * x if np.abs(x).max() <= 2 else np.full_like(x, np.nan))

    res = mapfit.lbfgs(nan_grad, np.array([1.9, -1.0]), use_scipy=False)
    assert res.converged and np.abs(res.x).max() < 1e-6


def test_lbfgs_stops_and_reports():
    res = mapfit.lbfgs(rosenbrock, np.array([-1.2, 1.0]), max_iter=3, use_scipy=False)
    assert not res.converged and res.nit == 3 and "max_iter" in res.message
    res = mapfit.lbfgs(rosenbrock, np.array([-1.2, 1.0]), max_iter=0, use_scipy=False)
    assert res.nit == 0 and res.nfev == 1 and not res.converged
    np.testing.assert_array_equal(res.x, [-1.2, 1.0])
    res = mapfit.lbfgs(rosenbrock, np.ones(4), use_scipy=False)  # already at the minimum
    assert res.converged and res.nit == 0 and res.nfev == 1
    # ftol: a loose relative reduction stops early and still counts as converged
    res = mapfit.lbfgs(rosenbrock, np.array([-1.2, 1.0]), ftol=1e-2, gtol=0.0, use_scipy=False)
    assert res.converged and "ftol" in res.message and res.nit < 30


def test_lbfgs_survives_a_fun_that_scribbles_on_its_input():
    A = spd(5, 3)

    def fun(x):
        out = 0.5 * x @ A @ x, A @ x
        x[:] = 1e300
        return out

    res = mapfit.lbfgs(fun, np.ones(5), use_scipy=False, gtol=1e-10, ftol=0.0)
    assert res.converged and np.abs(res.x).max() < 1e-8


def test_lbfgs_use_scipy_none_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(mapfit, "_scipy_optimize", lambda: None)
    res = mapfit.lbfgs(rosenbrock, np.array([-1.2, 1.0]))
    assert res.converged and res.message in ("max |grad| <= gtol", "relative reduction of f <= ftol")
    with pytest.raises(ImportError, match="use_scipy=True needs scipy"):
        mapfit.lbfgs(rosenbrock, np.array([-1.2, 1.0]), use_scipy=True)


def test_lbfgs_scipy_path_reuses_the_x0_evaluation():
    pytest.importorskip("scipy")
    fun = Counted(rosenbrock)
    res = mapfit.lbfgs(fun, np.array([-1.2, 1.0]), use_scipy=True)
    assert res.converged and res.nfev == fun.calls
    fun2 = Counted(rosenbrock)
    from scipy.optimize import minimize
    ref = minimize(fun2, np.array([-1.2, 1.0]), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-6, "ftol": 1e-12, "maxcor": 10})
    assert fun.calls == fun2.calls  # one check of x0, shared with SciPy's first call
    np.testing.assert_array_equal(res.x, ref.x)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(fun=3), TypeError, "fun must be callable"),
    (dict(x0=np.ones((2, 2))), ValueError, r"x0 must be 1-D"),
    (dict(x0=np.ones(0)), ValueError, "at least one coordinate"),
    (dict(x0=np.array([1.0, np.nan])), ValueError, "x0 must be finite"),
    (dict(x0=np.array([1 + 0j, 2])), TypeError, "x0 must be real"),
    (dict(max_iter=-1), ValueError, "max_iter must be >= 0"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an integer"),
    (dict(history=0), ValueError, "history must be >= 1"),
    (dict(gtol=-1.0), ValueError, "gtol must be >= 0"),
    (dict(ftol=np.nan), ValueError, "ftol must be finite"),
    (dict(use_scipy="yes"), TypeError, "use_scipy must be None, True or False"),
    (dict(fun=lambda x: float(x @ x)), TypeError, r"fun must return a pair \(f, grad\)"),
    (dict(fun=lambda x: ("a", x)), TypeError, "real scalar f"),
    (dict(fun=lambda x: (float(x @ x), x[:1])), ValueError, r"gradient returned by fun must have shape \(2,\)"),
    (dict(fun=lambda x: (np.inf, x)), ValueError, r"fun\(x0\) must be finite, got f = inf at x0 = \[ 1\. -2\.\]"),
    (dict(fun=lambda x: (1.0, np.array([0.0, np.nan]))), ValueError,
     r"fun\(x0\) must be finite, got gradient \[ 0\. nan\] at x0"),
])
def test_lbfgs_errors(kwargs, err, match):
    args = dict(fun=rosenbrock, x0=np.array([1.0, -2.0]))
    args.update(kwargs)
    fun, x0 = args.pop("fun"), args.pop("x0")
    with pytest.raises(err, match=match):
        mapfit.lbfgs(fun, x0, use_scipy=args.pop("use_scipy", False), **args)


# -- numerical_hessian ------------------------------------------------------------------------

def test_numerical_hessian_of_a_quadratic_is_exact_in_one_batched_call():
    d = 7
    A = spd(d, 4)
    x = np.random.default_rng(5).normal(scale=10.0, size=d)
    before = x.copy()
    shapes = []

    def grad_batch(X):
        shapes.append(X.shape)
        return X @ A + 3.0

    H = mapfit.numerical_hessian(grad_batch, x)
    np.testing.assert_array_equal(x, before)
    assert shapes == [(2 * d, d)]
    np.testing.assert_allclose(H, A, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(H, H.T)
    assert H.dtype == np.float64


def test_numerical_hessian_of_a_correlated_gaussian_log_density_is_minus_the_precision():
    cov = np.array([[2.0, 0.9, 0.3], [0.9, 1.0, -0.4], [0.3, -0.4, 0.5]])
    P = np.linalg.inv(cov)
    mu = np.array([1.0, -2.0, 0.5])
    H = mapfit.numerical_hessian(lambda X: -(X - mu) @ P, np.array([0.2, 0.1, -3.0]))
    np.testing.assert_allclose(H, -P, rtol=1e-9, atol=1e-9 * np.abs(P).max())


def test_numerical_hessian_of_a_non_quadratic_is_second_order_accurate():
    """f = sum(exp(x)) + x0 x1^2: H = diag(exp(x)) + [[0, 2 x1], [2 x1, 2 x0]].  Central
    differences with h ~ 6e-6 err by ~h^2 f''' / 6 + eps |g| / h, under 1e-9 here."""
    def grad_batch(X):
        G = np.exp(X)
        G[:, 0] += X[:, 1] ** 2
        G[:, 1] += 2 * X[:, 0] * X[:, 1]
        return G

    x = np.array([0.3, -1.2])
    want = np.diag(np.exp(x)) + np.array([[0.0, 2 * x[1]], [2 * x[1], 2 * x[0]]])
    np.testing.assert_allclose(mapfit.numerical_hessian(grad_batch, x), want, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(mapfit.numerical_hessian(grad_batch, x, step=1e-4), want, rtol=1e-6)
    np.testing.assert_allclose(mapfit.numerical_hessian(grad_batch, x, step=[1e-4, 1e-5]), want, rtol=1e-6)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(grad_batch=None), TypeError, "grad_batch must be callable"),
    (dict(x=np.ones((2, 2))), ValueError, "x must be 1-D"),
    (dict(x=np.ones(0)), ValueError, "at least one coordinate"),
    (dict(x=[1.0, np.inf]), ValueError, "x must be finite"),
    (dict(step=0.0), ValueError, "step must be > 0"),
    (dict(step=True), TypeError, "step must be real"),
    (dict(step=[1e-3]), ValueError, r"step must be a float or have shape \(2,\)"),
    (dict(step=[1e-3, -1.0]), ValueError, "step must be finite and > 0"),
    (dict(step=1e-300, x=[1.0, 2.0]), ValueError, "step is too small"),
    (dict(grad_batch=lambda X: X[:2]), ValueError, r"must return shape \(n, d\) = \(4, 2\)"),
    (dict(grad_batch=lambda X: X * np.nan), ValueError, "gradients returned by grad_batch must be finite"),
])
def test_numerical_hessian_errors(kwargs, err, match):
    args = dict(grad_batch=lambda X: 2 * X, x=np.ones(2))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        mapfit.numerical_hessian(args.pop("grad_batch"), args.pop("x"), **args)


# -- laplace_approximation --------------------------------------------------------------------

def test_laplace_of_an_spd_matrix_inverts_it():
    A = spd(6, 6, cond=1e4)
    before = A.copy()
    res = mapfit.laplace_approximation(A)
    np.testing.assert_array_equal(A, before)
    assert isinstance(res, mapfit.LaplaceResult) and res.jitter == 0.0
    np.testing.assert_allclose(res.cov @ A, np.eye(6), atol=1e-9)
    np.testing.assert_array_equal(res.cov, res.cov.T)
    L, T = res.precision_cholesky, res.scale_tril
    for M in (L, T):
        np.testing.assert_array_equal(M, np.tril(M))
        assert (np.diag(M) > 0).all()
    np.testing.assert_allclose(L @ L.T, A, rtol=1e-12, atol=1e-12 * np.abs(A).max())
    np.testing.assert_allclose(T @ T.T, res.cov, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(T, np.linalg.cholesky(np.linalg.inv(A)), rtol=1e-8, atol=1e-12)


def test_laplace_jitters_an_indefinite_matrix_by_the_smallest_power_of_ten():
    H = np.array([[2.0, 0.0], [0.0, -1e-7]])
    res = mapfit.laplace_approximation(H)
    # c = 1e-8 * max|diag| = 2e-8 is too little, 2e-7 makes the -1e-7 eigenvalue positive
    assert res.jitter == pytest.approx(2e-7, rel=1e-12)
    P = H + res.jitter * np.eye(2)
    np.testing.assert_allclose(res.cov, np.linalg.inv(P), rtol=1e-9)
    np.testing.assert_allclose(res.precision_cholesky @ res.precision_cholesky.T, P, rtol=1e-12)
    assert mapfit.laplace_approximation(np.zeros((3, 3))).jitter == pytest.approx(1e-8)
    res = mapfit.laplace_approximation(-np.eye(2))  # needs more than 1: c = 1e-8 ... 10
    assert res.jitter == pytest.approx(10.0) and np.allclose(res.cov, np.eye(2) / 9.0)


def test_laplace_of_the_numerical_hessian_recovers_the_covariance():
    cov = np.array([[2.0, 0.9], [0.9, 1.0]])
    P = np.linalg.inv(cov)
    mode = mapfit.lbfgs(lambda x: (0.5 * (x - 1) @ P @ (x - 1), P @ (x - 1)), np.zeros(2), use_scipy=False)
    H = mapfit.numerical_hessian(lambda X: (X - 1) @ P, mode.x)
    np.testing.assert_allclose(mapfit.laplace_approximation(H).cov, cov, rtol=1e-8)


@pytest.mark.parametrize("bad,err,match", [
    (np.ones(3), ValueError, r"H must be a square \(d, d\) matrix"),
    (np.ones((2, 3)), ValueError, r"H must be a square"),
    (np.ones((0, 0)), ValueError, "at least 1 x 1"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), ValueError, "H must be finite"),
    (np.array([[1.0, 0.5], [0.4, 1.0]]), ValueError, "H must be symmetric"),
    (np.array([[1e-10, 1.0], [1.0, 1e-10]]), ValueError, "not positive definite"),
    (np.eye(2, dtype=complex), TypeError, "H must be real"),
])
def test_laplace_errors(bad, err, match):
    with pytest.raises(err, match=match):
        mapfit.laplace_approximation(bad)
