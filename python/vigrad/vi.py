"""Functional black-box variational inference: ``vg.VI``, the pure step under :func:`vigrad.fit`.

As numpyro's ``SVI`` (``init`` / ``update``) and blackjax's VI (``init`` / ``step`` with a
NamedTuple state), a fit is a loop the caller may write::

    vi = vg.VI(log_joint, family="fullrank", optimizer=vg.optim.adam(0.05), num_samples=8)
    state = vi.init(init, rng=0)          # VIState: a NamedTuple of arrays, picklable
    for _ in range(500):
        state, info = vi.step(state)      # pure: the same state gives the same bits
    q = vi.q(state)                       # the Gaussian at this state, in the original coordinates

The step minimises F(q) = E_q[log q(z)] - E_q[log p(z)] (the negative ELBO) with the pathwise,
sticking-the-landing or score-function gradient of the family's parameters and one update of
the optimiser (:mod:`vigrad.optim`).  Its randomness is a pure function of the state: the
Philox key of step t is derived from (state.key, t), so a state saved after any step resumes
bit for bit.

``init(..., precondition=True)`` starts at the MAP found by L-BFGS and runs in coordinates
whitened by the Laplace approximation there, z = m + T x (:meth:`VI.laplace`); the family is
then fitted in x and :meth:`VI.q` maps it back.  :class:`ConvergenceMonitor` decides when the
iterates have stopped moving and averages them; :func:`vigrad.fit` composes the three.

References
----------
Kucukelbir, A., Tran, D., Ranganath, R., Gelman, A. and Blei, D. M. (2017). Automatic
differentiation variational inference.  JMLR 18(14).

Dhaka, A. K., Catalina, A., Andersen, M. R., Magnusson, M., Huggins, J. H. and Vehtari, A.
(2020). Robust, accurate stochastic optimization for variational inference.  NeurIPS.

Welandawe, M., Andersen, M. R., Vehtari, A. and Huggins, J. H. (2022). Robust, automated, and
accurate black-box variational inference.  arXiv:2203.15945.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from statistics import NormalDist
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from . import _core
from . import mapfit as _mapfit
from . import optim as _optim
from ._validation import as_float_array, check_num_samples, check_real, resolve_rng, resolve_workers
from .distributions import MeanFieldGaussian
from .families import FullRankGaussian, LowRankGaussian

__all__ = ["VI", "VIState", "VIInfo", "Laplace", "ConvergenceMonitor", "MonitorReport", "FitError",
           "DEFAULT_LR", "FAMILIES", "ESTIMATORS"]

#: The families and estimators :class:`VI` and :func:`vigrad.fit` accept.
FAMILIES = ("meanfield", "fullrank", "lowrank")
ESTIMATORS = ("pathwise", "score", "stl")
#: Adam's step size when no optimizer is given (see :func:`vigrad.fit` for how it was chosen).
DEFAULT_LR = 0.05

_CLASSES = {"meanfield": MeanFieldGaussian, "fullrank": FullRankGaussian, "lowrank": LowRankGaussian}
_BLOCK_NAMES = {"meanfield": ("loc", "scale"), "fullrank": ("loc", "scale_tril"),
                "lowrank": ("loc", "diag", "cov_factor")}
_UNIT_RHO = float(np.log(np.expm1(1.0)))  # softplus(_UNIT_RHO) == 1
_KEY_TAG = 0x56494B59  # "VIKY": step keys are Philox(key; step, tag)


class FitError(ValueError):
    """A fit stopped: the log joint returned a non-finite value or gradient, or the optimisation
    diverged.  ``step`` is the step it happened at (-1 before the first step, e.g. in the MAP
    search); ``result`` holds the last finite state as a :class:`vigrad.FitResult` with
    ``converged=False`` (None when raised by :meth:`VI.step`, whose input state is that state)."""

    def __init__(self, message, step, result):
        super().__init__(message)
        self.step = step
        self.result = result


# -- the log joint ----------------------------------------------------------------------------------

class _LogJoint:
    """The user's log joint with its output checked: the values (and gradients) as float64 of
    the right shapes, non-finite values a FitError naming where and which sample.  z is passed
    as a read-only view, so that the log joint cannot change the arrays the fit uses."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"log_joint must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, z, need_grads, where, step=-1):
        view = z.view()
        view.flags.writeable = False
        return self.parse(self.fn(view), z, need_grads, where, step)

    @staticmethod
    def parse(out, z, need_grads, where, step=-1):
        """(values, grads or None) from what the log joint returned for z."""
        S = z.shape[0]
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ValueError(f"log_joint must return values or (values, grads), got a tuple of {len(out)}")
            values, grads = out
        else:
            values, grads = out, None
        values = np.asarray(as_float_array(values, "log_joint values"), dtype=np.float64)
        if values.shape != (S,):
            raise ValueError(f"log_joint values must have shape ({S},) for z of shape {z.shape}, got {values.shape}")
        bad = ~np.isfinite(values)
        if bad.any():
            s = int(np.argmax(bad))
            raise FitError(f"log_joint returned {float(values[s])} at {where} for sample {s} "
                           f"(z = {np.array2string(z[s], precision=4, threshold=8)})", step, None)
        if not need_grads or grads is None:
            if need_grads:
                raise ValueError("log_joint must return (values, grads) for the pathwise and stl estimators "
                                 "(or use estimator='score')")
            return values, None
        grads = np.asarray(as_float_array(grads, "log_joint grads"), dtype=np.float64)
        if grads.shape != z.shape:
            raise ValueError(f"log_joint grads must have the shape of z {z.shape}, got {grads.shape}")
        return values, np.ascontiguousarray(grads)


def _check_grads(grads, where, step):
    """A FitError naming the sample and element of the first non-finite gradient, if any."""
    bad = ~np.isfinite(grads)
    if bad.any():
        s, j = (int(i) for i in np.argwhere(bad)[0])
        raise FitError(f"log_joint returned a non-finite gradient at {where} for sample {s}, element {j}",
                       step, None)


def _has_grads(log_joint, x0):
    """Call log_joint once at x0 (read-only): whether it returns gradients; its values are checked."""
    z = np.array(x0[None, :], dtype=np.float64)
    view = z.view()
    view.flags.writeable = False
    out = log_joint(view)
    has = isinstance(out, tuple) and len(out) == 2 and out[1] is not None
    _LogJoint.parse(out, z, has, "init")
    return has


# -- work arrays ------------------------------------------------------------------------------------

class _Reuse:
    """(S, d) work arrays reused from step to step (a fresh one is page-faulted in every step:
    at d = 10^5, S = 8 that doubled the time of the sampling), unless something else still
    holds one, e.g. a log joint that kept its z (or a view of it): then that one is left alone
    and a new array takes its place."""

    def __init__(self):
        self.bufs = {}

    def get(self, name, shape, dtype):
        buf, unused = self.bufs.get(name, (None, 0))
        # reused only when its reference count is what it was right after it was made, counted at
        # this same place (so the count does not depend on how the interpreter passes locals)
        if buf is None or buf.shape != shape or buf.dtype != dtype or sys.getrefcount(buf) > unused:
            buf = np.empty(shape, dtype)
            self.bufs[name] = (buf, 0)
            unused = sys.getrefcount(buf)  # a statement of its own, like the check above
            self.bufs[name] = (buf, unused)
        return buf


class _Recycle:
    """New arrays for the step's out-of-place results (the optimiser's parameters and moments, the
    next q's scales, the squares of the gradient norm), made from the memory of earlier ones that
    nothing holds any more (only this pool: the reference count they had right after they were made).  A state, a view of one
    of its arrays, a buffer export or a pickle keeps an array from being reused; one not reused
    is never written.  A fresh array per step page-faults in its memory (or, with glibc's
    malloc, makes the heap shrink and grow around the log joint's own temporaries)."""

    _KEEP = 24  # arrays kept per shape and dtype: a state's worth and then some

    def __init__(self):
        self.free = {}
        self.next = {}  # per key: where the next search starts (arrays come free in turn)

    @staticmethod
    def _count(kept, i):
        buf, unused = kept[i]
        return buf, unused, sys.getrefcount(buf)

    def __call__(self, shape, dtype):
        key = (tuple(shape), np.dtype(dtype))
        kept = self.free.setdefault(key, [])
        n, start = len(kept), self.next.get(key, 0)
        for k in range(n):
            i = (start + k) % n
            buf, unused, now = self._count(kept, i)
            if now == unused:
                self.next[key] = i + 1
                buf.flags.writeable = True  # the pool's own array: nothing else sees it
                return buf
        buf = np.empty(shape, dtype)
        if len(kept) < self._KEEP:
            kept.append((buf, 0))
            del buf
            # counted where and as the check above counts, so the two agree on any interpreter
            buf, _, unused = self._count(kept, -1)
            kept[-1] = (buf, unused)
        return buf


# -- preconditioning ------------------------------------------------------------------------------------

class Laplace(NamedTuple):
    """The MAP and the Laplace whitening z = shift + T x of :meth:`VI.laplace`."""

    x: np.ndarray
    """Where the MAP search stopped, (d,)."""
    converged: bool
    """Whether the MAP search met its convergence test."""
    nfev: int
    """Log-joint calls of the MAP search and the curvature."""
    scale: Optional[np.ndarray]
    """T: (d,) per-coordinate scales (mean field, low rank) or the (d, d) lower-triangular Cholesky
    factor of the Laplace covariance (full rank); None when the curvature is unusable."""
    hessian_diag: np.ndarray
    """diag of the Hessian of -log p at x (exact when ``exact``, else the grouped-probe estimate)."""
    exact: bool
    """True when the whole Hessian was formed (full rank, or d <= num_probes)."""
    cov: Optional[np.ndarray]
    """The Laplace covariance (d, d) when the whole Hessian was formed and is positive definite."""
    message: str
    """Empty when usable; otherwise why the curvature could not be used."""

    @property
    def usable(self) -> bool:
        """Whether the whitening exists (the curvature at x is positive)."""
        return self.scale is not None


_MAP_MAX_ITER = 200  # the MAP only seeds the fit, which moves on from wherever it stopped
_NUM_PROBES = 64     # curvature probes of the mean-field / low-rank Laplace (VI.laplace)


def _laplace(log_joint, family, x0, gen, num_probes):
    """MAP by L-BFGS from x0, then the family's whitening (see VI.laplace)."""
    target = _LogJoint(log_joint)
    calls = [0]

    def neg(x):
        calls[0] += 1
        v, g = target(x[None, :], True, "the MAP search")
        _check_grads(g, "the MAP search", -1)
        return -float(v[0]), -g[0]

    opt = _mapfit.lbfgs(neg, x0, max_iter=_MAP_MAX_ITER)
    m = np.asarray(opt.x, dtype=np.float64)
    d = m.size

    def grad_batch(X):
        calls[0] += 1
        X = np.ascontiguousarray(X, dtype=np.float64)
        g = target(X, True, "the Laplace curvature")[1]
        _check_grads(g, "the Laplace curvature", -1)
        return -g

    if family == "fullrank" or d <= num_probes:
        H = _mapfit.numerical_hessian(grad_batch, m)
        lap = _mapfit.laplace_approximation(H)
        hdiag, exact = np.diag(H).copy(), True
        if lap.jitter > 0:
            # the search stopped where -log p is not convex (a saddle or a minimum: e.g. the point
            # between two modes, where the gradient is zero too): no usable Laplace approximation
            return Laplace(m, bool(opt.converged), calls[0], None, hdiag, True, None,
                           "the Hessian at the point the MAP search stopped at is not positive definite "
                           "(a saddle or a minimum of the density)")
        cov = np.asarray(lap.cov)
        if family == "fullrank":
            T = np.asarray(lap.scale_tril)
        elif family == "meanfield":
            T = 1.0 / np.sqrt(hdiag)  # the mean-field optimum of a Gaussian: 1 / sqrt(diag precision)
        else:
            T = np.sqrt(np.diag(cov))  # marginal sds; the factor takes the correlations (VI.init)
        return Laplace(m, bool(opt.converged), calls[0], T, hdiag, exact, cov, "")
    res = _mapfit.hessian_diagonal(grad_batch, m, num_probes=num_probes, rng=gen)
    hdiag = res.diag
    good = hdiag > 0
    if not good.any():
        return Laplace(m, bool(opt.converged), calls[0], None, hdiag, False, None,
                       "the estimated curvature at the point the MAP search stopped at is not positive "
                       "in any coordinate")
    T = np.ones(d)
    T[good] = 1.0 / np.sqrt(hdiag[good])
    msg = ""
    if not good.all():
        msg = (f"the estimated curvature is not positive in {int((~good).sum())} of {d} coordinates; "
               "those keep unit scale")
    return Laplace(m, bool(opt.converged), calls[0], T, hdiag, False, None, msg)


def _lowrank_from_correlation(R, rank):
    """D, U with diag(D^2) + U U^T close to the correlation matrix R (top eigenvectors)."""
    lam, V = np.linalg.eigh(R)
    lam, V = lam[::-1][:rank], V[:, ::-1][:, :rank]
    U = V * np.sqrt(np.maximum(lam, 0.0) * 0.95)
    D2 = np.maximum(np.diag(R) - np.sum(U * U, axis=1), 0.05)
    return np.sqrt(D2), U


# -- the state ----------------------------------------------------------------------------------------

class VIState(NamedTuple):
    """The whole state of a :class:`VI` run: arrays only, so it pickles, copies and resumes."""

    params: tuple
    """The family's unconstrained parameters in the fitted coordinates x: (loc, rho) for mean
    field, (loc, tril) for full rank, (loc, rho, cov_factor) for low rank (read-only arrays)."""
    opt_state: Any
    """The optimiser's state (a NamedTuple of arrays, see :mod:`vigrad.optim`)."""
    key: np.ndarray
    """0-d uint64: the Philox key the step keys derive from."""
    step: np.ndarray
    """0-d int64: steps taken."""
    shift: np.ndarray
    """z = shift + T x: (d,), or (0,) without preconditioning."""
    scale: np.ndarray
    """T: (d,) diagonal, (d, d) lower triangular, or (0,) without preconditioning."""


class VIInfo(NamedTuple):
    """What one :meth:`VI.step` saw, at the state it started from."""

    loss: float
    """The -ELBO estimate of q (in the original coordinates) over this step's samples."""
    grad_norm: float
    """Global L2 norm of the gradient of the -ELBO in the parameters."""
    grads: tuple
    """The gradient, one array per parameter block (in the fitted coordinates)."""


def _step_key(key: int, step: int) -> int:
    ctr = np.array([[step & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF, _KEY_TAG, 0]], dtype=np.uint32)
    out = _core.philox4x32_10(ctr, key).astype(np.uint64)
    return int(out[0, 0] | (out[0, 1] << np.uint64(32)))


def _score_gradient(q, z, eps, log_p):
    """Score-function gradient of F with the leave-one-out baseline and, per coordinate, the
    control variate c * mean(h) built from E[d log q / dtheta] = 0 (Ranganath et al. 2014)."""
    S = z.shape[0]
    f = q.log_prob(z).astype(np.float64) - log_p  # per-sample cost
    b = (f.sum() - f) / (S - 1)
    c = f - b
    grads = []
    for h in q._score_terms(z, eps):
        h = np.asarray(h, dtype=np.float64)
        hs = h.reshape(S, -1)
        gs = c[:, None] * hs
        g = gs.mean(axis=0)
        hc = hs - hs.mean(axis=0)
        var = np.einsum("sj,sj->j", hc, hc)
        cov = np.einsum("sj,sj->j", gs - g, hc)
        a = np.divide(cov, var, out=np.zeros_like(cov), where=var > 0)
        g = g - a * hs.mean(axis=0)
        grads.append(g.reshape(h.shape[1:]))
    return tuple(grads)


def _to_original(family, qx, shift, T):
    """q fitted in x (z = shift + T x) in z."""
    if T.size == 0:
        return qx
    if family == "meanfield":
        return MeanFieldGaussian.from_scale(shift + T * qx.loc, T * qx.scale)
    if family == "fullrank":
        return FullRankGaussian.from_scale_tril(shift + T @ qx.loc, T @ qx.scale_tril)
    return LowRankGaussian.from_diag(shift + T * qx.loc, T * qx.diag, T[:, None] * qx.cov_factor)


def _entropy(q, workers):
    """q's entropy on ``workers`` threads (the families' entropy() takes every CPU)."""
    if isinstance(q, MeanFieldGaussian):
        return float(_core.mf_entropy(q.scale.reshape(-1), workers))
    if isinstance(q, LowRankGaussian):
        return float(_core.lowrank_entropy(q.diag, q.cov_factor, workers))
    return float(q.entropy())


def _log_det(T):
    if T.size == 0:
        return 0.0
    return float(np.sum(np.log(np.diag(T) if T.ndim == 2 else T)))


class VI:
    r"""Black-box VI as a pure step: ``state = vi.init(init)``, ``state, info = vi.step(state)``.

    Parameters
    ----------
    log_joint : callable
        ``log_joint(z)`` for a read-only batch z of shape (S, d) returns ``(values (S,), grads
        (S, d))`` with grads = d log p / dz; the values alone are enough for ``estimator="score"``.
    family : {"meanfield", "fullrank", "lowrank"}
    rank : int, for "lowrank"
        1 <= rank < d.
    optimizer : vigrad.optim.Optimizer or None
        Default ``vg.optim.adam(DEFAULT_LR)``.
    num_samples : int or None
        Samples per step (default 8; 32 for "score").
    estimator : {"pathwise", "score", "stl"}
        Reparameterisation (exact entropy gradient), score function (leave-one-out baseline and
        a control variate), or sticking the landing.
    workers : int or None
        Threads of the core's kernels (``scipy.fft`` semantics); results do not depend on it.

    Notes
    -----
    :meth:`step` is pure: it reads the state and returns a new one, and the same state gives
    the same bits (its work arrays are per thread and their contents never reach a result).
    Its new arrays reuse the memory of earlier states' arrays that nothing references any more,
    and each thread's VI keeps the latest log joint's gradient until its next step (an (S, d)
    array: freeing it at the end of the step made glibc's malloc return the log joint's own
    temporaries to the system, to be page-faulted in again at every call).
    Costs per step: S log-joint evaluations in one call, the family's sampling and pathwise
    gradient in the core (O(S d) mean field, O(S d r) low rank, O(S d^2) full rank) and one
    fused optimiser pass.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> def log_joint(z):                      # N([1, -2], diag(0.25, 4))
    ...     r = (z - [1.0, -2.0]) / [0.25, 4.0]
    ...     return -0.5 * np.sum(r * (z - [1.0, -2.0]), axis=1), -r
    >>> vi = vg.VI(log_joint, family="meanfield", optimizer=vg.optim.adam(0.05))
    >>> state = vi.init(np.zeros(2), rng=0)
    >>> for _ in range(600):
    ...     state, info = vi.step(state)
    >>> q = vi.q(state)
    >>> bool(np.allclose(q.mean, [1.0, -2.0], atol=0.3)), bool(np.allclose(q.scale, [0.5, 2.0], rtol=0.2))
    (True, True)
    >>> import pickle
    >>> again = pickle.loads(pickle.dumps(state))
    >>> bool(np.array_equal(vi.step(again)[0].params[0], vi.step(state)[0].params[0]))
    True
    """

    def __init__(self, log_joint: Callable, family: str = "meanfield", *, rank: Optional[int] = None,
                 optimizer=None, num_samples: Optional[int] = None, estimator: str = "pathwise", workers=None):
        self._target = _LogJoint(log_joint)
        if not isinstance(family, str) or family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}")
        if not isinstance(estimator, str) or estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
        if family == "lowrank":
            if rank is None:
                raise ValueError("family='lowrank' needs rank (1 <= rank < d)")
            rank = check_num_samples(rank, "rank")
        elif rank is not None:
            raise ValueError(f"rank applies to family='lowrank' only, got family={family!r}")
        S = check_num_samples(num_samples if num_samples is not None else (32 if estimator == "score" else 8),
                              "num_samples")
        if estimator == "score" and S < 2:
            raise ValueError(f"estimator='score' needs num_samples >= 2 (leave-one-out baseline), got {S}")
        if optimizer is None:
            optimizer = _optim.adam(DEFAULT_LR)
        if not isinstance(optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a vigrad.optim Optimizer (e.g. vg.optim.adam(0.05)), "
                            f"got {type(optimizer).__name__}")
        self.log_joint = log_joint
        self.family, self.rank, self.estimator = family, rank, estimator
        self.num_samples, self.optimizer = S, optimizer
        self.workers = resolve_workers(workers)
        self._cls = _CLASSES[family]
        self._local = threading.local()
        self._logdet = (None, 0.0)

    def __repr__(self):
        rank = f", rank={self.rank}" if self.family == "lowrank" else ""
        return (f"VI(family={self.family!r}{rank}, estimator={self.estimator!r}, num_samples={self.num_samples}, "
                f"optimizer={self.optimizer!r})")

    def _with_num_samples(self, num_samples):
        """The same VI with another number of samples per step."""
        return VI(self.log_joint, self.family, rank=self.rank, optimizer=self.optimizer, num_samples=num_samples,
                  estimator=self.estimator, workers=self.workers)

    @property
    def block_names(self) -> tuple:
        """The names of the parameter blocks, e.g. ("loc", "scale") for mean field."""
        return _BLOCK_NAMES[self.family]

    # -- preconditioning -------------------------------------------------------------------------
    def laplace(self, init, *, rng=None, num_probes: int = _NUM_PROBES) -> Laplace:
        r"""The MAP by L-BFGS from ``init`` and the Laplace whitening for this family.

        The MAP search is :func:`vigrad.mapfit.lbfgs` with its default tolerances and at most 200
        iterations (an ill-conditioned posterior in 10^5 dimensions then starts the fit within a
        fraction of an sd of its mode; the fit moves on from there).

        Full rank: the Hessian H of -log p at the MAP m by central differences of the gradient
        (one batched call of 2d points, O(d^2) memory) and T the Cholesky factor of H^-1.
        Mean field and low rank: T = 1 / sqrt(diag H), the mean-field optimum of a Gaussian, from
        :func:`vigrad.mapfit.hessian_diagonal`: O(d) memory and 2 min(d, num_probes) gradient
        evaluations; exact for d <= num_probes (then the whole Hessian is formed and, for low
        rank, T is the Laplace marginal sds and :meth:`init` starts the factor at the top
        eigenvectors of the Laplace correlation).  Coordinates whose estimated curvature is not
        positive keep unit scale.

        Parameters
        ----------
        init : array_like, shape (d,)
            Where the MAP search starts.
        rng : int, numpy.random.Generator or None, keyword-only
            The probe signs (d > num_probes only).
        num_probes : int

        Returns
        -------
        Laplace
            ``scale`` is None (``usable`` False) when the point the search stopped at is not a
            maximum of the density; ``message`` says why.

        Raises
        ------
        FitError
            When the log joint returns a non-finite value or gradient during the search.
        """
        x0 = _check_init(init)
        num_probes = check_num_samples(num_probes, "num_probes")
        return _laplace(self.log_joint, self.family, x0, resolve_rng(rng), num_probes)

    # -- init, step, q -----------------------------------------------------------------------------
    def init(self, init, *, rng=None, precondition=False) -> VIState:
        """The state at the start: q centred on ``init`` with unit scales, or, preconditioned, N(0, I)
        in the whitened coordinates (the Laplace approximation for full rank and mean field).

        Parameters
        ----------
        init : array_like, shape (d,), finite
        rng : int, numpy.random.Generator or None, keyword-only
            Draws the state's key, then (low rank) the starting factor.
        precondition : bool or Laplace
            True: ``self.laplace(init, rng=rng)`` first (with the same generator); a
            :class:`Laplace` from :meth:`laplace`: use it; False: fit in the original coordinates.
            An unusable Laplace (``usable`` False) falls back to False with a RuntimeWarning.

        Returns
        -------
        VIState
        """
        x0 = _check_init(init)
        gen = resolve_rng(rng)
        lap = None
        if isinstance(precondition, Laplace):
            lap = precondition
            if lap.x.shape != x0.shape:
                raise ValueError(f"precondition is a Laplace for d = {lap.x.size}, but init has d = {x0.size}")
        elif isinstance(precondition, (bool, np.bool_)):
            if precondition:
                lap = _laplace(self.log_joint, self.family, x0, gen, _NUM_PROBES)
        elif precondition is not None:
            raise TypeError(f"precondition must be a bool or a Laplace (from VI.laplace), "
                            f"got {type(precondition).__name__}")
        if lap is not None and not lap.usable:
            warnings.warn(f"vg.VI: {lap.message}; fitting from init without preconditioning",
                          RuntimeWarning, stacklevel=2)
            lap = None
        elif lap is not None and lap.message:
            warnings.warn(f"vg.VI: {lap.message}", RuntimeWarning, stacklevel=2)
        d = x0.size
        if self.family == "lowrank" and not self.rank < d:
            raise ValueError(f"rank must satisfy 1 <= rank < d = {d}, got {self.rank}")
        key = int(gen.integers(0, 2**64, dtype=np.uint64))
        if lap is None:
            shift, T, loc = np.zeros(0), np.zeros(0), x0.copy()
        else:
            shift, T, loc = lap.x.copy(), np.array(lap.scale, dtype=np.float64), np.zeros(d)
        if self.family == "meanfield":
            params = (loc, np.full(d, _UNIT_RHO))
        elif self.family == "fullrank":
            tril = np.zeros((d, d))
            tril[np.diag_indices(d)] = _UNIT_RHO
            params = (loc, tril)
        elif lap is not None and lap.cov is not None:
            Dx, Ux = _lowrank_from_correlation(lap.cov / np.outer(T, T), self.rank)
            params = LowRankGaussian.from_diag(loc, Dx, Ux)._params()
        else:
            # the factor starts small and random: at U = 0 the score estimator's gradient in U vanishes
            params = (loc, np.full(d, _UNIT_RHO), 0.1 * gen.standard_normal((d, self.rank)))
        params = tuple(_frozen(np.array(p, dtype=np.float64)) for p in params)
        self._cls._from_params(params)  # the family's own checks
        opt_state = self.optimizer.init(params)
        self._local.made = (opt_state, params)
        return VIState(params, opt_state, np.array(key, dtype=np.uint64), np.array(0, dtype=np.int64),
                       _frozen(shift), _frozen(T))

    def q(self, state: VIState):
        """The family distribution at ``state``, in the original coordinates."""
        _check_state(state)
        return _to_original(self.family, self._cls._from_params(state.params), state.shift, state.scale)

    def q_fitted(self, state: VIState):
        """The family distribution at ``state`` in the fitted (whitened) coordinates x."""
        _check_state(state)
        return self._cls._from_params(state.params)

    def _pool(self):
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = _Reuse()
        return pool

    def _q_entropy(self, params, workers):
        """(q, its entropy or None) at the fitted parameters, checked (a ValueError if not valid).
        Mean field: softplus, the checks and the entropy in one pass (``_core.mf_scale_entropy``),
        into a recycled array."""
        if self.family == "meanfield":
            loc, rho = params
            if loc.dtype == rho.dtype and loc.flags.c_contiguous and rho.flags.c_contiguous:
                scale = self._recycle()(rho.shape, rho.dtype)
                entropy, ok = _core.mf_scale_entropy(loc.reshape(-1), rho.reshape(-1), scale.reshape(-1), workers)
                if ok:
                    return self._cls._from_params(params, workers, scale=scale), float(entropy)
        return self._cls._from_params(params, workers), None

    def _log_det(self, T):
        ref, value = self._logdet
        if ref is not T:
            value = _log_det(T)
            self._logdet = (T, value)
        return value

    def _recycle(self):
        rec = getattr(self._local, "recycle", None)
        if rec is None:
            rec = self._local.recycle = _Recycle()
        return rec

    def step(self, state: VIState):
        """One stochastic gradient step: ``(new_state, info)``; ``state`` is not modified.

        Raises
        ------
        FitError
            The log joint returned a non-finite value or gradient (the message names the step,
            the sample and the element), or the -ELBO, its gradient or the new parameters are
            not finite (``err.result`` is None: ``state`` is the last finite state).
        """
        return self._step(state)

    def _step(self, state: VIState, grad_norm=True):
        """:meth:`step`; ``grad_norm=False``: info.grad_norm is nan (a pass over the gradient that
        vg.fit without a callback never reads)."""
        _check_state(state)
        params, shift, T = state.params, state.shift, state.scale
        t = int(state.step)
        S, nw = self.num_samples, self.workers
        cached = getattr(self._local, "q", None)
        if cached is not None and cached[0] is params:
            q, entropy = cached[1], cached[2]
        else:
            q, entropy = self._q_entropy(params, nw)
        d = q.size
        pool = self._pool()
        x, eps = q._sample_noise(S, _step_key(int(state.key), t), nw,
                                 out=(pool.get("x", (S, d), q.dtype), pool.get("eps", q._noise_shape(S), q.dtype)))
        if T.size == 0:
            z = x
        else:
            z = pool.get("z", (S, d), np.dtype(np.float64))
            if T.ndim == 1:
                np.multiply(x, T, out=z)
            else:
                np.matmul(x, T.T, out=z)
            z += shift
        where = f"step {t}"
        need_grads = self.estimator != "score"
        log_p, g = self._target(z, need_grads, where, t)
        # the previous step's gradient array is let go only now that this one is made: freed at the
        # end of the step, glibc's malloc returned the log joint's (S, d) temporaries, which sit at
        # the top of the heap, to the system every step, and the log joint page-faulted them in
        # again at every call (measured at d = 10^5, S = 8: 1 000-1 500 page faults a call
        # against ~50 with this); one (S, d) array more is held between steps
        self._local.held = g
        if need_grads:
            gx = g if T.size == 0 else (g * T if T.ndim == 1 else g @ T)
            grads = q._pathwise(eps, np.ascontiguousarray(gx), "stl" if self.estimator == "stl" else "mc", nw)
        else:
            grads = _score_gradient(q, x, eps, log_p)
        del z, x, eps  # the work arrays are free for the next step
        if entropy is None:
            entropy = _entropy(q, nw)
        loss = -(float(log_p.sum()) / S) - entropy - self._log_det(T)  # log_p.mean()'s bits, without its overhead
        if not math.isfinite(loss):
            raise FitError(f"the fit diverged at step {t}: the -ELBO is not finite", t, None)
        try:
            # the optimiser's kernel reports a non-finite gradient (in the family's gradients,
            # which are non-finite whenever an input is): the (S, d) ones are searched only then
            # a state this VI's step made (or init), unchanged: the optimiser skips its checks
            made = getattr(self._local, "made", None)
            trusted = made is not None and made[0] is state.opt_state and made[1] is params
            new_params, opt_state = self.optimizer.update(grads, state.opt_state, params, workers=nw,
                                                          _alloc=self._recycle(), _trusted=trusted)
        except ValueError:
            if not all(np.isfinite(gb).all() for gb in grads):
                if g is not None:
                    _check_grads(g, where, t)
                raise FitError(f"the fit diverged at step {t}: the gradient of the -ELBO is not finite", t,
                               None) from None
            raise
        del g
        new_params = tuple(_frozen(p) for p in new_params)
        try:
            self._local.q = (new_params, *self._q_entropy(new_params, nw))  # checked; the next step's q
        except ValueError as exc:
            raise FitError(f"the fit diverged at step {t}: {exc}", t, None) from None
        self._local.made = (opt_state, new_params)
        info = VIInfo(loss, _optim._global_norm(grads, self._recycle()) if grad_norm else math.nan, tuple(grads))
        return VIState(new_params, opt_state, state.key, np.array(t + 1, dtype=np.int64), shift, T), info


def _frozen(a):
    a.flags.writeable = False
    return a


def _check_init(init):
    x0 = np.array(as_float_array(init, "init", dtype=np.float64), copy=True)
    if x0.ndim != 1 or x0.size < 1:
        raise ValueError(f"init must be a 1-D array of the d >= 1 parameters, got shape {x0.shape}")
    if not np.isfinite(x0).all():
        raise ValueError("init must be finite")
    return x0


def _check_state(state):
    if not isinstance(state, VIState):
        raise TypeError(f"state must be a VIState (from VI.init or VI.step), got {type(state).__name__}")


# -- convergence ----------------------------------------------------------------------------------------

class MonitorReport(NamedTuple):
    """The state of a :class:`ConvergenceMonitor` after its last check."""

    converged: bool
    """The stopping rule held at the last check."""
    window: int
    """Steps in the averaging window."""
    max_mcse: float
    """The largest Monte Carlo standard error of the window-averaged parameters, each in units of
    its coordinate's sd (the stopping statistic); nan before the first check."""
    max_drift_z: float
    """The largest |difference of the window halves' means| over its standard error; nan before
    the first check."""
    tau: float
    """The iterates' integrated autocorrelation time (steps), pooled over the tracked parameters."""
    mcse_loc: np.ndarray
    """MCSE of the averaged mean, per coordinate, in the fitted coordinates (empty before a check)."""
    restarts: int
    """How often the window's first half was dropped because the iterates were still drifting."""


def _evenly_spaced(n, k):
    """min(n, k) distinct indices spread evenly over [0, n), first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.intp))


def _moment_sums(x, c, s1, s2, workers):
    """In place, a = float64(x) - c (c None: a = x): s1 += a, s2 += a * a, in one core pass with
    NumPy's rounding (``_core.moment_sums``).  c, s1, s2: C-contiguous float64 of x's shape."""
    x = np.ascontiguousarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float64, copy=False)
    _core.moment_sums(x.reshape(-1), None if c is None else c.reshape(-1), s1.reshape(-1), s2.reshape(-1),
                      workers)


class _Segment:
    """Sums over consecutive steps of every parameter, shifted by the segment's first iterate c
    (deviations are small, so the variance does not cancel): n, c, sum(x - c), sum((x - c)^2)."""

    __slots__ = ("n", "c", "s1", "s2", "nl", "l1", "l2", "_moments")

    def __init__(self, params):
        self._moments = {}  # block -> moments(block), while no iterate is added
        self.n = 0
        self.c = tuple(np.array(p, dtype=np.float64) for p in params)
        self.s1 = tuple(np.zeros(p.shape) for p in params)
        self.s2 = tuple(np.zeros(p.shape) for p in params)
        self.nl, self.l1, self.l2 = 0, 0.0, 0.0  # the losses' count, sum and sum of squares

    def add(self, params, loss, workers=1):
        """Add one iterate."""
        if loss is not None:
            self.nl += 1
            self.l1 += loss
            self.l2 += loss * loss
        self.n += 1
        self._moments.clear()
        for c, s1, s2, x in zip(self.c, self.s1, self.s2, params):
            _moment_sums(x, c, s1, s2, workers)

    def moments(self, i):
        """(mean, M2) of block i: the sum of squared deviations from the mean.  Kept until the next
        add: a check asks a complete segment for them three times (the window and its halves),
        and again at every later check while the segment stays in the window."""
        got = self._moments.get(i)
        if got is None:
            # mean = c + s1 / n and M2 = max(s2 - s1 * (s1 / n), 0), in two arrays
            m = self.s1[i] / self.n
            mean = self.c[i] + m
            np.multiply(self.s1[i], m, out=m)
            np.subtract(self.s2[i], m, out=m)
            got = self._moments[i] = (mean, np.maximum(m, 0.0, out=m))
        return got


def _combine(moments, workers=1):
    """(n, mean, M2) of the union of groups given as [(n, mean, M2)] (Chan et al.'s update).

    mean = (0 + n_1 m_1 + n_2 m_2 + ...) / n and M2 = 0 + sum_i (M_i + n_i (m_i - mean)^2), left
    to right.  Arrays: one core pass over the groups (``_core.combine_moments``, NumPy's
    rounding); a check combines up to 16 segments of every parameter, and the NumPy fold took
    five passes and temporaries per segment."""
    n = sum(k for k, _, _ in moments)
    if not isinstance(moments[0][1], np.ndarray):
        mean = sum(k * m for k, m, _ in moments) / n
        m2 = sum(M + k * (m - mean) ** 2 for k, m, M in moments)
        return n, mean, m2
    shape = moments[0][1].shape
    mean, m2 = np.empty(shape), np.empty(shape)
    _core.combine_moments([float(k) for k, _, _ in moments],
                          [np.ascontiguousarray(m, dtype=np.float64).reshape(-1) for _, m, _ in moments],
                          [np.ascontiguousarray(M, dtype=np.float64).reshape(-1) for _, _, M in moments],
                          mean.reshape(-1), m2.reshape(-1), workers)
    return n, mean, m2


def _t_quantile(p, nu):
    """Student's t quantile by the Cornish-Fisher expansion in 1/nu (Abramowitz & Stegun 26.7.5):
    within 4 % of the exact value for nu >= 6 down to tail probabilities of 1e-6; at smaller nu
    it errs low (a stricter test)."""
    z = NormalDist().inv_cdf(p)
    z2 = z * z
    g1 = z * (z2 + 1.0) / 4.0
    g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0
    g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0
    g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0
    return z + g1 / nu + g2 / nu**2 + g3 / nu**3 + g4 / nu**4


def _geyer(ac):
    """Geyer's (1992) initial monotone sequence estimate 2 sum(rho) - 1 from the autocorrelations
    ac (N, m) of each column (ac[0] == 1), >= 1 per column."""
    N = ac.shape[0]
    pairs = ac[0:N - 1:2] + ac[1:N:2]  # (N // 2, m)
    ok = np.cumprod(pairs > 0, axis=0).astype(bool)  # up to the first non-positive pair
    mono = np.minimum.accumulate(np.where(ok, pairs, np.inf), axis=0)
    return np.maximum(1.0, 2.0 * np.where(ok, mono, 0.0).sum(axis=0) - 1.0)


def _autocorr_times(X):
    """Integrated autocorrelation times of the columns of X (N, m): (pooled, per column).

    Each column is detrended (its least-squares line removed: a drift, which the drift test is
    for, would otherwise read as a long autocorrelation and keep the window from ever being
    tested) and normalised; "pooled" sums the column-averaged autocorrelations by Geyer's
    initial monotone sequence, usable from a short window; the per-column values are noisier
    but catch a parameter that relaxes much more slowly than the rest."""
    N, m = X.shape
    if N < 4:
        return 1.0, np.ones(m)
    t = np.arange(N, dtype=np.float64) - 0.5 * (N - 1)
    Xc = X - X.mean(axis=0)
    Xc = Xc - np.outer(t, (t @ Xc) / (t @ t))
    v = np.einsum("ij,ij->j", Xc, Xc)
    keep = v > 0
    per = np.ones(m)
    if not keep.any():
        return 1.0, per
    Xc = Xc[:, keep] / np.sqrt(v[keep])
    f = np.fft.rfft(Xc, 2 * N, axis=0)
    ac = np.fft.irfft(f * np.conj(f), 2 * N, axis=0)[:N]  # column norms are 1: ac[0] == 1
    per[keep] = _geyer(ac)
    return float(_geyer(ac.mean(axis=1, keepdims=True))[0]), per


class ConvergenceMonitor:
    r"""When to stop a :class:`VI` run, and the iterate average to return.

    With a constant step size the iterates settle into a stationary Markov chain around the
    optimum; their average over the stationary stretch is the answer, with a Monte Carlo
    standard error (MCSE) like any MCMC estimate (Dhaka et al. 2020; Welandawe et al. 2022).
    The monitor keeps a window of the latest steps and, at the end of every segment of
    ``check_every`` steps (segments merge in pairs past 16, doubling their length), tests:

    1. **Drift** (stationarity): for every parameter, the difference between the means of the
       window's two halves over its standard error, against Student's t with N / tau degrees of
       freedom at level ``alpha``, Bonferroni-corrected over the parameters (split-R-hat compares
       the same two halves; this form keeps its false-alarm rate as the number of parameters
       grows), and the -ELBO estimates' decrease between the halves (they are nearly independent
       from step to step).  A drift bigger than ``tol`` sds, or a -ELBO still falling, drops the
       window's first half (a restart); the window is then tested again only once it covers at
       least as many steps as the run had taken at the restart: a run that drifted stops only when
       the second half of it is stationary, as MCMC discards its first half.
    2. **Precision**: the MCSE of every window-averaged parameter, as the change it makes in its
       coordinate's mean or sd in units of that sd (loc: MCSE / sd; scales: MCSE of the log sd).
       The run has converged when the largest is below ``tol``.

    Windows shorter than ``min_window`` steps or 5 autocorrelation times are not tested.

    Standard errors use the integrated autocorrelation time tau of the iterates: their
    autocorrelations averaged over (up to 256 evenly spaced) parameters, each detrended, from
    their per-step history in the window, summed by Geyer's initial monotone sequence.  With
    Adam's momentum tau is ~20 steps at lr 0.05, and per-parameter estimates from windows of a
    few tau are too noisy to test with.  MCSE = sd * sqrt(tau / N) for N steps.  Measured on
    stationary stretches of the posteriordb posteriors' fits, the drift test's family-wise false
    alarm rate at alpha = 0.01 was 4 % of windows at N = 150, 1.3 % at 300, 1 % at 600.

    Memory: up to 16 segments of two sums per parameter (32 copies of the parameters) and the
    history of the tracked parameters (at most 4096 x 256 floats; thinned by 2 past that).

    Limits (measured): with the default Laplace start the MCSE it reports is calibrated (the
    fitted mean's error over its MCSE had RMS 1.03 over 30 seeds of a Gaussian target); from a far
    start (``map_init=False``) it was optimistic, RMS 1.5-1.7, the first windows holding a
    transient's tail.  Wandering slower than the window cannot be seen at all: with the "stl"
    estimator and Adam, a mean-field mean along a near-singular posterior direction drifted by
    ~0.5 sd over hundreds of steps and the monitor stopped with an MCSE 10 times too small
    (pathwise, the default, did not wander).

    Parameters
    ----------
    vi : VI
    tol : float > 0
        The MCSE to reach, in units of the sd (default 0.05).
    check_every : int >= 1
        Steps per segment at the start (default 10).
    min_window : int >= 2
        The fewest steps a converged window holds (default 150).
    alpha : float in (0, 1)
        Level of the drift test (default 0.01), Bonferroni-corrected over the parameters.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> def log_joint(z):
    ...     return -0.5 * np.sum(z * z, axis=1), -z
    >>> vi = vg.VI(log_joint)
    >>> state = vi.init(np.ones(3), rng=0)
    >>> monitor = vg.vi.ConvergenceMonitor(vi, tol=0.05)
    >>> while not monitor.update(state):
    ...     state, info = vi.step(state)
    >>> q = monitor.q()
    >>> bool(np.all(np.abs(q.mean) < 0.25)), monitor.report().converged
    (True, True)
    """

    _MAX_SEGMENTS = 16
    _MAX_TRACKED = 256
    _MAX_HISTORY = 4096

    def __init__(self, vi: VI, *, tol: float = 0.05, check_every: int = 10, min_window: int = 150,
                 alpha: float = 0.01):
        if not isinstance(vi, VI):
            raise TypeError(f"vi must be a VI, got {type(vi).__name__}")
        self.vi = vi
        self.tol = check_real(tol, "tol", positive=True)
        self.check_every = check_num_samples(check_every, "check_every")
        self.min_window = check_num_samples(min_window, "min_window", minimum=2)
        self._required = self.min_window
        self._seen = 0
        self.alpha = check_real(alpha, "alpha")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        self._seg_len = self.check_every
        self._segments = []       # complete segments of the window, oldest first
        self._current = None      # the segment being filled
        self._hist = []           # per-step rows of the tracked parameters, in the window
        self._thin = 1            # keep every _thin-th step in _hist
        self._since_row = 0
        self._tracked = None      # (block, flat index) pairs
        self._state = None
        self._restarts = 0
        self._report = MonitorReport(False, 0, math.nan, math.nan, math.nan, np.zeros(0), 0)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _track(self, params):
        sizes = [p.size for p in params]
        total = sum(sizes)
        picks = _evenly_spaced(total, self._MAX_TRACKED)
        offsets = np.cumsum([0] + sizes)
        out = []
        for b in range(len(params)):
            sel = picks[(picks >= offsets[b]) & (picks < offsets[b + 1])] - offsets[b]
            out.append(sel)
        self._tracked = out

    def _row(self, params):
        return np.concatenate([p.reshape(-1)[sel] for p, sel in zip(params, self._tracked)])

    def update(self, state: VIState, loss: Optional[float] = None) -> bool:
        """Record the iterate ``state`` (call once per step, with the state after it) and the
        step's -ELBO estimate ``loss`` (``info.loss``, optional); True: stop."""
        _check_state(state)
        if loss is not None:
            loss = float(loss)
        self._state = state
        p = state.params
        self._seen += 1
        if self._tracked is None:
            self._track(p)
        if self._current is None:
            self._current = _Segment(p)
        self._current.add(p, loss, self.vi.workers)
        self._since_row += 1
        if self._since_row >= self._thin:
            self._hist.append(self._row(p))
            self._since_row = 0
            if len(self._hist) > self._MAX_HISTORY:
                self._hist = self._hist[1::2]
                self._thin *= 2
        if self._current.n < self._seg_len:
            return False
        self._segments.append(self._current)
        self._current = None
        if len(self._segments) == self._MAX_SEGMENTS:
            self._segments = [_merge(a, b) for a, b in zip(self._segments[0::2], self._segments[1::2])]
            self._seg_len *= 2
        return self._check()

    def window(self) -> int:
        """Steps in the averaging window."""
        return sum(sg.n for sg in self._segments) + (self._current.n if self._current is not None else 0)

    # -- the rule ----------------------------------------------------------------------------------
    def _check(self):
        segs = self._segments
        k = len(segs)
        N = sum(sg.n for sg in segs)
        if k < 2 or N < self._required:
            return False  # short windows are not tested: their tau, and so their errors, are too noisy
        X = np.asarray(self._hist[-max(2, N // self._thin):])
        tau, tau_cols = _autocorr_times(X)
        tau *= self._thin
        tau_max = max(tau, float(tau_cols.max(initial=1.0)) * self._thin)
        if N < 5.0 * tau:
            return False  # too short for the autocorrelation, and so the standard errors, to be measured
        # a tracked parameter's MCSE uses the larger of the pooled tau and its own
        tau_tracked = []
        col = 0
        for sel in self._tracked:
            tau_tracked.append(np.maximum(tau, tau_cols[col:col + sel.size] * self._thin))
            col += sel.size
        h = k // 2
        nb = len(self._state.params)
        nw = self.vi.workers
        # the window's halves, then the whole window from them (and the middle segment when k is
        # odd): each segment is read twice, not three times
        halves, whole = [], []
        for i in range(nb):
            A = _combine([(sg.n, *sg.moments(i)) for sg in segs[:h]], nw)
            B = _combine([(sg.n, *sg.moments(i)) for sg in segs[k - h:]], nw)
            halves.append((A, B))
            whole.append(_combine([A] + [(sg.n, *sg.moments(i)) for sg in segs[h:k - h]] + [B], nw))
        mean = tuple(w[1] for w in whole)
        units = _mcse_units(self.vi.family, mean, self.vi.workers)
        n_params = sum(np.size(m) for m in mean)
        n_free = 0  # parameters that moved in the window
        # the halves' standard errors rest on about N / tau effective draws: Student's t with that
        # many degrees of freedom, Bonferroni-corrected over the parameters
        zc = _t_quantile(1.0 - self.alpha / (2.0 * max(n_params, 1)), N / tau)
        max_z, max_mcse, mcse_loc = 0.0, 0.0, None
        drift = False
        for i in range(nb):
            (nA, mA, MA), (nB, mB, MB) = halves[i]
            se = np.sqrt((MA / (nA - 1) + MB / (nB - 1)) * tau / nA)
            diff = np.abs(mB - mA)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(se > 0, diff / se, np.where(diff > 0, np.inf, 0.0))
            max_z = max(max_z, float(z.max(initial=0.0)))
            drift = drift or bool(np.any((z > zc) & (diff * units[i] > self.tol)))
            n, _, M2 = whole[i]
            n_free += int(np.count_nonzero(M2 > 0))
            mcse = np.sqrt(M2 / (n - 1) * tau / n)
            sel = self._tracked[i]
            flat = mcse.reshape(-1)
            flat[sel] = np.sqrt(M2.reshape(-1)[sel] / (n - 1) * tau_tracked[i] / n)
            max_mcse = max(max_mcse, float((mcse * units[i]).max(initial=0.0)))
            if i == 0:
                mcse_loc = mcse
        # the -ELBO estimates are nearly independent from step to step (fresh samples): a decrease
        # between the halves beyond its standard error means the fit is still improving, by more
        # than the tolerance can resolve when it exceeds the KL of tol sds in every parameter
        if all(sg.nl == sg.n for sg in segs):
            LA = [(sg.nl, sg.l1 / sg.nl, sg.l2 - sg.l1 * sg.l1 / sg.nl) for sg in segs[:h]]
            LB = [(sg.nl, sg.l1 / sg.nl, sg.l2 - sg.l1 * sg.l1 / sg.nl) for sg in segs[k - h:]]
            (na, ma, va), (nb_, mb, vb) = _combine(LA), _combine(LB)
            se_l = math.sqrt(max(va / (na - 1) / na + vb / (nb_ - 1) / nb_, 0.0))
            z_loss = (ma - mb) / se_l if se_l > 0 else 0.0
            if z_loss > NormalDist().inv_cdf(1.0 - self.alpha / (2.0 * (n_params + 1))) \
                    and ma - mb > 0.5 * self.tol**2 * n_free:
                drift = True
        if drift:
            # the run drifted until now: the window must now cover at least as many steps as came
            # before (the second half of the run stationary, as MCMC discards the first half)
            self._required = max(self.min_window, self._seen)
            dropped = sum(sg.n for sg in segs[:h])
            self._segments = segs[h:]
            self._hist = self._hist[max(0, len(self._hist) - (N - dropped) // self._thin):]
            self._restarts += 1
        # a parameter whose autocorrelation time is a fifth of the window or more has not been
        # measured: no stop before the window is 5 times the slowest one's
        converged = not drift and max_mcse <= self.tol and N >= 5.0 * tau_max
        self._report = MonitorReport(converged, self.window(), max_mcse, max_z, tau, mcse_loc, self._restarts)
        return converged

    # -- results -----------------------------------------------------------------------------------
    def average(self) -> tuple:
        """The parameters averaged over the window (the last state's when it is empty)."""
        if self._state is None:
            raise ValueError("the monitor has seen no state yet")
        segs = self._segments + ([self._current] if self._current is not None else [])
        if not segs:
            return self._state.params
        return tuple(_combine([(sg.n, *sg.moments(i)) for sg in segs], self.vi.workers)[1]
                     for i in range(len(self._state.params)))

    def q(self):
        """The family at the window average, in the original coordinates."""
        st = self._state
        return _to_original(self.vi.family, self.vi._cls._from_params(self.average()), st.shift, st.scale)

    def report(self) -> MonitorReport:
        """The statistics of the last check (and the current window length)."""
        return self._report._replace(window=self.window())


def _merge(a, b):
    """One segment of two consecutive ones (shifted by the first one's c)."""
    out = _Segment.__new__(_Segment)
    out._moments = {}
    out.n, out.c = a.n + b.n, a.c
    out.nl, out.l1, out.l2 = a.nl + b.nl, a.l1 + b.l1, a.l2 + b.l2
    s1, s2 = [], []
    for i in range(len(a.c)):
        d = b.c[i] - a.c[i]  # b's sums re-centred on a.c
        s1.append(a.s1[i] + b.s1[i] + b.n * d)
        s2.append(a.s2[i] + b.s2[i] + 2.0 * d * b.s1[i] + b.n * d * d)
    out.s1, out.s2 = tuple(s1), tuple(s2)
    return out


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _mcse_units(family, params, workers=1):
    """Per parameter, the factor that turns its MCSE into the change of its coordinate's mean or
    sd in units of that sd (first order).  Mean field: softplus and sigmoid by the core's kernels
    (NumPy's logaddexp took 1.7 ms at d = 10^5, twice per check)."""
    if family == "meanfield":
        loc, rho = params
        flat = np.ascontiguousarray(rho, dtype=np.float64).reshape(-1)
        scale = _core.softplus(flat, workers).reshape(rho.shape)
        return (1.0 / scale, _core.sigmoid(flat, workers).reshape(rho.shape) / scale)
    if family == "fullrank":
        loc, tril = params
        d = loc.size
        L = np.tril(tril)
        L[np.diag_indices(d)] = np.logaddexp(0.0, np.diag(tril))
        sd = np.sqrt(np.sum(L * L, axis=1))
        u = np.tril(np.ones((d, d))) / sd[:, None]
        u[np.diag_indices(d)] *= _sigmoid(np.diag(tril))
        return (1.0 / sd, u)
    loc, rho, U = params
    D = np.logaddexp(0.0, rho)
    sd = np.sqrt(D * D + np.sum(U * U, axis=1))
    return (1.0 / sd, _sigmoid(rho) / sd, np.ones_like(U) / sd[:, None])
