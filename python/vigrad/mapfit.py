"""Mode finding and the Laplace approximation: L-BFGS, a batched finite-difference
Hessian, and a jittered Cholesky of the precision at the mode.

NumPy only; :func:`lbfgs` hands over to SciPy's L-BFGS-B when SciPy is installed
(``use_scipy=None``) but never needs it.

References
----------
Nocedal, J. and Wright, S. J. (2006). Numerical Optimization, 2nd ed., Springer:
Algorithm 7.4 (L-BFGS two-loop recursion), Algorithms 3.5 and 3.6 (strong Wolfe line
search with zoom), equation (8.7) (central differences of the gradient).

Curtis, A. R., Powell, M. J. D. and Reid, J. K. (1974). On the estimation of sparse
Jacobian matrices.  J. Inst. Math. Appl. 13, 117-119 (grouped probes).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import numpy as np

from ._validation import as_float_array, check_finite, check_num_samples, check_real, resolve_rng

__all__ = [
    "LbfgsResult",
    "LaplaceResult",
    "lbfgs",
    "numerical_hessian",
    "HessianDiagonal",
    "hessian_diagonal",
    "laplace_approximation",
]

_EPS = np.finfo(np.float64).eps
_C1, _C2 = 1e-4, 0.9        # sufficient decrease and curvature constants (N&W's choice for quasi-Newton)
_MAX_LS_EVALS = 40           # function evaluations per line search
_MAX_JITTER_STEPS = 17       # jitter c, 10 c, ..., 1e16 c


class LbfgsResult(NamedTuple):
    """Result of :func:`lbfgs`."""

    x: np.ndarray
    """The final point, float64, shape (d,)."""
    fun: float
    """f at ``x``."""
    grad: np.ndarray
    """The gradient at ``x``, float64, shape (d,)."""
    nit: int
    """Iterations (accepted steps)."""
    nfev: int
    """Calls of ``fun``."""
    converged: bool
    """True when a convergence test (gtol or ftol) was met."""
    message: str
    """Why the iterations stopped."""


class LaplaceResult(NamedTuple):
    """Result of :func:`laplace_approximation`: the Gaussian N(mode, cov) with precision H + jitter I."""

    cov: np.ndarray
    """(H + jitter I)^-1, symmetric, float64, (d, d); equals ``scale_tril @ scale_tril.T``."""
    precision_cholesky: np.ndarray
    """Lower-triangular L with ``L @ L.T == H + jitter I``."""
    scale_tril: np.ndarray
    """Lower-triangular Cholesky factor of ``cov`` (positive diagonal): ``mode + scale_tril @ z``
    with z ~ N(0, I) samples the approximation."""
    jitter: float
    """The multiple of the identity added to H to make it positive definite; 0.0 when H already was."""


# -- L-BFGS ------------------------------------------------------------------------------------

def _describe_point(x: np.ndarray) -> str:
    return np.array2string(x, threshold=8, edgeitems=3, precision=6)


class _Objective:
    """Calls the user's fun, checks and copies what it returns, counts the calls."""

    def __init__(self, fun, d):
        self.fun, self.d, self.nfev = fun, d, 0

    def __call__(self, x: np.ndarray):
        self.nfev += 1
        out = self.fun(x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"fun must return a pair (f, grad), got {type(out).__name__}")
        f, g = out
        try:
            f = float(np.asarray(f, dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            raise TypeError(f"fun must return a real scalar f as its first value, got {f!r}") from None
        g = np.array(as_float_array(g, "the gradient returned by fun"), dtype=np.float64)  # a copy
        if g.shape != (self.d,):
            raise ValueError(f"the gradient returned by fun must have shape ({self.d},), got {g.shape}")
        return f, g


def _finite(f, g) -> bool:
    return math.isfinite(f) and bool(np.isfinite(g).all())


def _interpolate(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi) -> float:
    """Minimiser of the cubic through (a_lo, f_lo, d_lo), (a_hi, f_hi, d_hi), kept at least
    10% of the interval away from its ends; bisection when the cubic is unusable."""
    lo, hi = min(a_lo, a_hi), max(a_lo, a_hi)
    width = hi - lo
    mid = 0.5 * (a_lo + a_hi)
    if not (math.isfinite(f_hi) and math.isfinite(d_hi)):
        return mid
    d1 = d_lo + d_hi - 3.0 * (f_lo - f_hi) / (a_lo - a_hi)
    rad = d1 * d1 - d_lo * d_hi
    if not rad >= 0:
        return mid
    d2 = math.copysign(math.sqrt(rad), a_hi - a_lo)
    denom = d_hi - d_lo + 2.0 * d2
    if denom == 0 or not math.isfinite(denom):
        return mid
    a = a_hi - (a_hi - a_lo) * (d_hi + d2 - d1) / denom
    if not (math.isfinite(a) and lo + 0.1 * width <= a <= hi - 0.1 * width):
        return mid
    return a


def _line_search(obj, x, f0, g0, p, alpha0):
    """Strong Wolfe line search (N&W Alg. 3.5 / 3.6).  A non-finite f or gradient at a trial
    point counts as failing sufficient decrease, so the search backtracks from it.

    Returns (alpha, f, g) of an accepted point, or None when no point with sufficient
    decrease was found.  When the Wolfe curvature condition cannot be met within the
    evaluation budget, the best point with sufficient decrease is returned."""
    dphi0 = float(g0 @ p)
    evals = 0

    def phi(a):
        nonlocal evals
        evals += 1
        f, g = obj(x + a * p)
        if not _finite(f, g):
            return math.inf, None, math.nan
        return f, g, float(g @ p)

    def zoom(a_lo, f_lo, g_lo, d_lo, a_hi, f_hi, d_hi):
        while evals < _MAX_LS_EVALS:
            a = _interpolate(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi)
            if a == a_lo or a == a_hi:  # interval exhausted at machine precision
                break
            f, g, d = phi(a)
            if f > f0 + _C1 * a * dphi0 or f >= f_lo:
                a_hi, f_hi, d_hi = a, f, d
            else:
                if abs(d) <= -_C2 * dphi0:
                    return a, f, g
                if d * (a_hi - a_lo) >= 0:
                    a_hi, f_hi, d_hi = a_lo, f_lo, d_lo
                a_lo, f_lo, g_lo, d_lo = a, f, g, d
        return (a_lo, f_lo, g_lo) if a_lo > 0 else None

    a_prev, f_prev, g_prev, d_prev = 0.0, f0, g0, dphi0
    a = alpha0
    while evals < _MAX_LS_EVALS:
        f, g, d = phi(a)
        if f > f0 + _C1 * a * dphi0 or (a_prev > 0 and f >= f_prev):
            return zoom(a_prev, f_prev, g_prev, d_prev, a, f, d)
        if abs(d) <= -_C2 * dphi0:
            return a, f, g
        if d >= 0:
            return zoom(a, f, g, d, a_prev, f_prev, d_prev)
        a_prev, f_prev, g_prev, d_prev = a, f, g, d
        a *= 4.0
    return (a_prev, f_prev, g_prev) if a_prev > 0 else None


def _two_loop(g, S, Y, rho):
    """-H g by the L-BFGS two-loop recursion (N&W Alg. 7.4), H0 = gamma I with
    gamma = s.y / y.y of the newest pair."""
    q = g.copy()
    alphas = []
    for s, y, r in zip(reversed(S), reversed(Y), reversed(rho)):
        a = r * float(s @ q)
        q -= a * y
        alphas.append(a)
    if S:
        q *= float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
    for s, y, r, a in zip(S, Y, rho, reversed(alphas)):
        b = r * float(y @ q)
        q += (a - b) * s
    return -q


def _lbfgs_numpy(obj, x, f, g, max_iter, gtol, ftol, history):
    S, Y, rho = [], [], []
    nit = 0
    if float(np.max(np.abs(g), initial=0.0)) <= gtol:
        return x, f, g, nit, True, "gradient below gtol at x0"
    message, converged = f"max_iter = {max_iter} iterations reached", False
    while nit < max_iter:
        p = _two_loop(g, S, Y, rho)
        dphi = float(g @ p)
        if not (dphi < 0 and math.isfinite(dphi)):  # not a descent direction: restart
            S, Y, rho = [], [], []
            p = -g
        alpha0 = 1.0 if S else min(1.0, 1.0 / float(np.linalg.norm(p)))
        found = _line_search(obj, x, f, g, p, alpha0)
        if found is None:
            if S:  # the quasi-Newton direction failed: forget the curvature pairs, try -g
                S, Y, rho = [], [], []
                continue
            message = "line search could not decrease f (at the limit of floating-point precision?)"
            break
        alpha, f_new, g_new = found
        s = alpha * p
        y = g_new - g
        sy = float(s @ y)
        if sy > _EPS * float(np.linalg.norm(s)) * float(np.linalg.norm(y)):  # curvature condition holds
            S.append(s)
            Y.append(y)
            rho.append(1.0 / sy)
            if len(S) > history:
                del S[0], Y[0], rho[0]
        x = x + s
        f_old, f, g = f, f_new, g_new
        nit += 1
        if float(np.max(np.abs(g))) <= gtol:
            message, converged = "max |grad| <= gtol", True
            break
        if f_old - f <= ftol * max(abs(f_old), abs(f), 1.0):
            message, converged = "relative reduction of f <= ftol", True
            break
    return x, f, g, nit, converged, message


def _scipy_optimize():
    try:
        from scipy import optimize
    except ImportError:
        return None
    return optimize


def lbfgs(
    fun: Callable[[np.ndarray], tuple],
    x0,
    *,
    max_iter: int = 1000,
    gtol: float = 1e-6,
    ftol: float = 1e-12,
    history: int = 10,
    use_scipy: bool | None = None,
) -> LbfgsResult:
    r"""Minimise a smooth function with L-BFGS.

    The NumPy implementation: the two-loop recursion with ``H0 = (s.y / y.y) I`` from the
    newest pair, a line search satisfying the strong Wolfe conditions (c1 = 1e-4, c2 = 0.9;
    bracketing and zoom with safeguarded cubic interpolation, Nocedal & Wright Alg. 3.5/3.6;
    first step ``min(1, 1/|g|)``, then 1), and curvature pairs with
    ``s.y <= eps |s| |y|`` skipped.  A trial point where f or the gradient is not finite
    counts as "too far": the search backtracks from it.  If the quasi-Newton direction
    finds no acceptable step, the memory is cleared and steepest descent tried once more.

    Stops when ``max |grad| <= gtol`` or ``(f_old - f_new) <= ftol * max(|f_old|, |f_new|, 1)``
    (both "converged"; the same tests as SciPy's L-BFGS-B ``gtol`` and ``ftol``), or after
    ``max_iter`` iterations, or when the line search fails (not converged).

    Parameters
    ----------
    fun : callable
        ``fun(x) -> (f, grad)`` for a float64 x of shape (d,): f, a real scalar to
        minimise, and its gradient, shape (d,).  It is given fresh arrays and may keep them.
    x0 : array_like, shape (d,), finite
        Starting point (not modified).
    max_iter : int >= 0
    gtol, ftol : float >= 0
        The two stopping tests above.  ftol bounds the last decrease of f, so it fixes x
        only to about ``sqrt(ftol * max(|f|, 1) / lambda_min)`` (lambda_min the smallest
        Hessian eigenvalue); pass ``ftol=0`` to stop on gtol alone.
    history : int >= 1
        Curvature pairs kept (SciPy's ``maxcor``).
    use_scipy : bool or None
        None: SciPy's ``minimize(method="L-BFGS-B", jac=True)`` when SciPy is importable,
        the NumPy implementation otherwise.  True / False force one or the other
        (True raises ImportError without SciPy).  How SciPy treats non-finite values
        during its search is SciPy's own business; f and grad at x0 are checked either way.

    Returns
    -------
    LbfgsResult
        ``(x, fun, grad, nit, nfev, converged, message)``.

    Raises
    ------
    TypeError
        ``fun`` is not callable, ``x0`` is not real numbers, a scalar argument has the
        wrong type, or ``fun`` does not return a pair (f, grad).
    ValueError
        ``x0`` is not 1-D or not finite, an option is out of range, the gradient returned
        has the wrong shape, or f or the gradient at x0 is not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad.mapfit import lbfgs
    >>> A = np.array([[3.0, 1.0], [1.0, 2.0]]); b = np.array([1.0, -1.0])
    >>> res = lbfgs(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(2), use_scipy=False)
    >>> res.converged, bool(np.allclose(res.x, np.linalg.solve(A, b), atol=1e-8))
    (True, True)
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable, returning (f, grad), got {type(fun).__name__}")
    x = _as_point(x0, "x0")
    max_iter = check_num_samples(max_iter, "max_iter", minimum=0)
    history = check_num_samples(history, "history", minimum=1)
    gtol = check_real(gtol, "gtol", nonnegative=True)
    ftol = check_real(ftol, "ftol", nonnegative=True)
    if use_scipy is not None and not isinstance(use_scipy, (bool, np.bool_)):
        raise TypeError(f"use_scipy must be None, True or False, got {type(use_scipy).__name__}")
    optimize = None
    if use_scipy or use_scipy is None:
        optimize = _scipy_optimize()
        if optimize is None and use_scipy:
            raise ImportError("use_scipy=True needs scipy, which is not installed; pass use_scipy=None or False")

    x = x.copy()
    obj = _Objective(fun, x.size)
    f, g = obj(x.copy())
    if not _finite(f, g):
        what = f"f = {f}" if not math.isfinite(f) else f"gradient {_describe_point(g)}"
        raise ValueError(f"fun(x0) must be finite, got {what} at x0 = {_describe_point(x)}")

    if optimize is None:
        x, f, g, nit, converged, message = _lbfgs_numpy(obj, x, f, g, max_iter, gtol, ftol, history)
        return LbfgsResult(x, float(f), g, nit, obj.nfev, bool(converged), message)

    first = [x.copy(), f, g]

    def wrapped(z):
        if first is not None and first[0] is not None and np.array_equal(z, first[0]):
            out = first[1], first[2].copy()
            first[0] = None  # reuse the x0 evaluation once
            return out
        return obj(np.array(z, dtype=np.float64))

    res = optimize.minimize(
        wrapped, x, jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": gtol, "ftol": ftol, "maxcor": history,
                 "maxfun": max(15000, 20 * max_iter)},
    )
    xr = np.array(res.x, dtype=np.float64)
    return LbfgsResult(xr, float(res.fun), np.array(res.jac, dtype=np.float64), int(res.nit), obj.nfev,
                       bool(res.success), str(res.message))


# -- Hessian and Laplace ------------------------------------------------------------------------

def _as_point(x, name: str) -> np.ndarray:
    """x as a finite float64 (d,) array with d >= 1, the errors naming it ``name``."""
    x = as_float_array(x, name, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, shape (d,), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} must have at least one coordinate, got shape (0,)")
    check_finite(x, name)
    return x


def _check_point(grad_batch, x):
    """The arguments of the Hessian functions: a callable, and x as a finite float64 (d,) array."""
    if not callable(grad_batch):
        raise TypeError(f"grad_batch must be callable, got {type(grad_batch).__name__}")
    return _as_point(x, "x")


def numerical_hessian(grad_batch: Callable[[np.ndarray], np.ndarray], x, *, step=None) -> np.ndarray:
    r"""Hessian by central differences of the gradient, in one batched gradient call.

    With ``h_i = step`` (or ``eps**(1/3) * max(1, |x_i|)`` by default, eps the float64
    machine epsilon), ``grad_batch`` is called once on the 2d points ``x + h_i e_i`` and
    ``x - h_i e_i``, and

        H[i, :] = (grad(x + h_i e_i) - grad(x - h_i e_i)) / (2 h_i),

    symmetrised as ``(H + H.T) / 2``.  The steps actually taken, ``(x_i + h_i) - x_i``, are
    used in the division, so rounding in forming the points costs no accuracy.  The error is
    O(h^2) in the third derivatives; exact up to rounding for a quadratic.

    Parameters
    ----------
    grad_batch : callable
        ``grad_batch(X) -> G`` for a float64 batch X of shape (n, d): the gradients at each
        row, shape (n, d).  Called exactly once, with n = 2d.
    x : array_like, shape (d,), finite
        Not modified.
    step : None, float > 0, or array_like of shape (d,) with values > 0

    Returns
    -------
    ndarray, float64, shape (d, d), symmetric

    Raises
    ------
    TypeError
        ``grad_batch`` is not callable, ``x`` or ``step`` are not real numbers.
    ValueError
        ``x`` is not 1-D or not finite, ``step`` is not positive or has the wrong shape,
        or ``grad_batch`` returns the wrong shape or non-finite values.

    Examples
    --------
    The negative log density of N(0, A^-1) is x.A.x / 2, with gradient A x:

    >>> import numpy as np
    >>> from vigrad.mapfit import numerical_hessian
    >>> A = np.array([[2.0, 0.5], [0.5, 1.0]])
    >>> H = numerical_hessian(lambda X: X @ A, np.array([0.3, -1.0]))
    >>> bool(np.allclose(H, A, rtol=0, atol=1e-8))
    True
    """
    x = _check_point(grad_batch, x)
    d = x.size
    if step is None:
        h = _EPS ** (1.0 / 3.0) * np.maximum(1.0, np.abs(x))
    elif isinstance(step, numbers.Real) and not isinstance(step, (bool, np.bool_)):
        h = np.full(d, check_real(step, "step", positive=True))
    else:
        h = np.array(as_float_array(step, "step", dtype=np.float64))
        if h.shape != (d,):
            raise ValueError(f"step must be a float or have shape ({d},), got shape {h.shape}")
        if not (np.isfinite(h).all() and (h > 0).all()):
            raise ValueError(f"step must be finite and > 0, got {_describe_point(h)}")
    up = x + h
    down = x - h
    h_up, h_down = up - x, x - down  # the steps as represented
    if not ((h_up > 0).all() and (h_down > 0).all()):
        raise ValueError("step is too small to move x at float64 precision")
    X = np.repeat(x[None, :], 2 * d, axis=0)
    idx = np.arange(d)
    X[idx, idx] = up
    X[d + idx, idx] = down
    G = grad_batch(X)
    G = as_float_array(G, "the gradients returned by grad_batch")
    if G.shape != (2 * d, d):
        raise ValueError(f"grad_batch must return shape (n, d) = ({2 * d}, {d}) for its (n, d) input, got {G.shape}")
    check_finite(G, "the gradients returned by grad_batch")
    G = G.astype(np.float64, copy=False)
    H = (G[:d] - G[d:]) / (h_up + h_down)[:, None]
    return 0.5 * (H + H.T)


class HessianDiagonal(NamedTuple):
    """Result of :func:`hessian_diagonal`."""

    diag: np.ndarray
    """The estimate of diag(H), float64, shape (d,)."""
    exact: bool
    """True when every probe moved one coordinate (d <= num_probes): then ``diag`` is the
    central-difference diagonal itself, as :func:`numerical_hessian` gives it."""
    num_probes: int
    """Probe directions used, min(d, num_probes)."""
    calls: int
    """Calls of ``grad_batch``."""


def hessian_diagonal(grad_batch: Callable[[np.ndarray], np.ndarray], x, *, num_probes: int = 64,
                     max_elements: int = 1 << 22, rng=None) -> HessianDiagonal:
    r"""The diagonal of a Hessian from a fixed number of gradient differences, in O(d) memory.

    The d coordinates are split into ``K = min(d, num_probes)`` groups, coordinate i in group
    ``i mod K`` (Curtis, Powell & Reid 1974), and each group is probed with one central
    difference of the gradient along ``v_g = sum_{i in g} s_i h_i e_i``, with signs
    ``s_i = +-1`` drawn from ``rng`` and the steps ``h_i`` of :func:`numerical_hessian`:

        H_ii ~ s_i (grad(x + v_g) - grad(x - v_g))_i / (2 h_i)
             = H_ii + sum_{j in g, j != i} s_i s_j H_ij h_j / h_i  + O(h^2).

    With d <= num_probes every group holds one coordinate and the result is the exact
    central-difference diagonal.  Otherwise it is exact when no two coordinates of a group
    interact, e.g. for a diagonal Hessian, or a banded one of bandwidth < K; in general the
    error of entry i is a random-sign sum of the ~d/K other entries of its row in its group:
    unbiased, with variance ``sum_{j in g, j != i} H_ij^2 (h_j / h_i)^2``.

    Cost: 2K gradient evaluations, in calls of at most ``max_elements // d`` points (at least
    two); memory O(d) per point, so ``max_elements`` floats per call (default 2^22, 32 MiB).

    Parameters
    ----------
    grad_batch : callable
        ``grad_batch(X) -> G`` for a float64 batch X of shape (n, d): the gradients at each
        row, shape (n, d).
    x : array_like, shape (d,), finite
        Not modified.
    num_probes : int >= 1
    max_elements : int >= 1
    rng : int, numpy.random.Generator or None, keyword-only
        The probe signs (unused when d <= num_probes).

    Returns
    -------
    HessianDiagonal
        ``(diag, exact, num_probes, calls)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`numerical_hessian`.

    Examples
    --------
    A diagonal Hessian is found exactly whatever the number of probes:

    >>> import numpy as np
    >>> from vigrad.mapfit import hessian_diagonal
    >>> a = np.linspace(1.0, 3.0, 1000)
    >>> res = hessian_diagonal(lambda X: X * a, np.zeros(1000), num_probes=8, rng=0)
    >>> res.exact, res.calls, bool(np.allclose(res.diag, a, rtol=1e-8))
    (False, 1, True)
    """
    x = _check_point(grad_batch, x)
    num_probes = check_num_samples(num_probes, "num_probes")
    max_elements = check_num_samples(max_elements, "max_elements")
    gen = resolve_rng(rng)
    d = x.size
    K = min(d, num_probes)
    exact = K == d
    h = _EPS ** (1.0 / 3.0) * np.maximum(1.0, np.abs(x))
    signs = np.ones(d) if exact else np.where(gen.random(d) < 0.5, -1.0, 1.0)
    step = (x + h) - x  # the steps as represented: the probe moves coordinate i by +-step_i
    if not (step > 0).all():
        raise ValueError("x is too large for a central difference at float64 precision")
    group = np.arange(d) % K
    per_call = max(2, (max_elements // d) // 2 * 2)  # an even number of points: the +- pairs
    diag = np.empty(d)
    calls = 0
    for g0 in range(0, K, per_call // 2):
        gs = np.arange(g0, min(K, g0 + per_call // 2))
        n = gs.size
        X = np.repeat(x[None, :], 2 * n, axis=0)
        for k, g in enumerate(gs):
            idx = np.flatnonzero(group == g)
            X[k, idx] += signs[idx] * step[idx]
            X[n + k, idx] -= signs[idx] * step[idx]
        G = as_float_array(grad_batch(X), "the gradients returned by grad_batch")
        calls += 1
        if G.shape != (2 * n, d):
            raise ValueError(f"grad_batch must return shape (n, d) = ({2 * n}, {d}) for its (n, d) input, "
                             f"got {G.shape}")
        check_finite(G, "the gradients returned by grad_batch")
        for k, g in enumerate(gs):
            idx = np.flatnonzero(group == g)
            diag[idx] = signs[idx] * (G[k, idx] - G[n + k, idx]) / (2.0 * step[idx])
    return HessianDiagonal(diag, bool(exact), int(K), calls)


def _cholesky(a):
    try:
        return np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return None


def laplace_approximation(H) -> LaplaceResult:
    r"""Gaussian (Laplace) approximation from the Hessian of the negative log density at its mode.

    The precision is ``P = H + jitter I``: jitter = 0 when H is positive definite (its
    Cholesky succeeds), else the smallest of ``c, 10 c, 100 c, ...`` with
    ``c = 1e-8 * max|diag H|`` (``1e-8`` if the diagonal is all zero) that makes it so.
    Returns ``cov = P^-1`` and both Cholesky factors, computed without forming an explicit
    inverse of a full matrix: with ``P = U U^T``, U upper triangular (from the Cholesky of
    P with its rows and columns reversed), ``scale_tril = U^-T`` is lower triangular and
    exactly the Cholesky factor of ``cov = scale_tril scale_tril^T``.

    Parameters
    ----------
    H : array_like, shape (d, d), finite, symmetric
        Symmetric to within ``1e-8 * max|H|`` (e.g. from :func:`numerical_hessian`); it is
        symmetrised before use.  Not modified.

    Returns
    -------
    LaplaceResult
        ``(cov, precision_cholesky, scale_tril, jitter)``.

    Raises
    ------
    TypeError
        ``H`` is not an array of real numbers.
    ValueError
        ``H`` is not square 2-D, is empty, not finite, not symmetric, or no jitter up to
        ``1e16 c`` makes it positive definite.

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad.mapfit import laplace_approximation
    >>> res = laplace_approximation(np.array([[4.0, 2.0], [2.0, 3.0]]))
    >>> res.cov.round(4).tolist(), res.jitter
    ([[0.375, -0.25], [-0.25, 0.5]], 0.0)
    >>> bool(np.allclose(res.scale_tril @ res.scale_tril.T, res.cov))
    True
    """
    A = as_float_array(H, "H", dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"H must be a square (d, d) matrix, got shape {A.shape}")
    if A.shape[0] == 0:
        raise ValueError("H must be at least 1 x 1, got shape (0, 0)")
    check_finite(A, "H")
    scale = float(np.max(np.abs(A)))
    asym = float(np.max(np.abs(A - A.T)))
    if asym > 1e-8 * scale:
        raise ValueError(f"H must be symmetric, got max |H - H.T| = {asym:.3g} with max |H| = {scale:.3g}")
    A = 0.5 * (A + A.T)  # a new array
    d = A.shape[0]
    rev = np.arange(d)[::-1]
    base = 1e-8 * float(np.max(np.abs(np.diag(A))))
    if base == 0.0:
        base = 1e-8
    jitter = 0.0
    for attempt in range(_MAX_JITTER_STEPS + 1):
        P = A if jitter == 0.0 else A + jitter * np.eye(d)
        L = _cholesky(P)
        M = _cholesky(P[np.ix_(rev, rev)]) if L is not None else None
        if M is not None:
            break
        jitter = base if jitter == 0.0 else jitter * 10.0
    else:
        raise ValueError(
            f"H is not positive definite and adding up to {jitter / 10.0:.3g} I did not make it so; "
            "is this the Hessian of the negative log density at a mode?"
        )
    U = M[np.ix_(rev, rev)]                     # upper triangular, P = U U^T
    scale_tril = np.linalg.solve(U, np.eye(d)).T  # U^-T: lower triangular
    scale_tril = np.tril(scale_tril)
    cov = scale_tril @ scale_tril.T
    cov = 0.5 * (cov + cov.T)
    return LaplaceResult(cov, L, scale_tril, float(jitter))
