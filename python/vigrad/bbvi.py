"""Black-box variational inference: ``vg.fit(log_joint, init, ...)``.

Fits a Gaussian q (mean-field, full-rank or low-rank + diagonal) to an unnormalised
density p by stochastic optimisation of the negative ELBO

    F(q) = E_q[log q(z)] - E_q[log p(z)] = -H(q) - E_q[log p(z)],

with the pathwise (reparameterisation), sticking-the-landing or score-function
gradient, Adam, and a stopping rule on the relative change of a smoothed F
(like Stan ADVI's ``tol_rel_obj``).

Robust by default: when ``log_joint`` returns gradients, the fit starts at the MAP
found by L-BFGS and runs in coordinates whitened by the Laplace approximation there
(full rank: its Cholesky factor; mean field and low rank: per-coordinate scales, so
the family is unchanged), then maps q back.  Posteriors whose scales differ by 10^4
or whose correlations reach 0.99 then look like N(0, I) to the optimiser.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np

from . import _core
from . import diagnostics as _diag
from . import mapfit as _mapfit
from . import optim as _optim
from ._validation import as_float_array, check_num_samples, check_real, resolve_rng, resolve_workers
from .distributions import MeanFieldGaussian
from .families import FullRankGaussian, LowRankGaussian

__all__ = ["fit", "FitResult", "FitError"]

_FAMILIES = ("meanfield", "fullrank", "lowrank")
_ESTIMATORS = ("pathwise", "score", "stl")
_BLOCK_NAMES = {"meanfield": ("loc", "scale"), "fullrank": ("loc", "scale_tril"),
                "lowrank": ("loc", "diag", "cov_factor")}


class FitResult(NamedTuple):
    """Result of :func:`fit`."""

    q: Any
    """The fitted family (MeanFieldGaussian, FullRankGaussian or LowRankGaussian) in the original coordinates."""
    losses: np.ndarray
    """The -ELBO estimate at every step."""
    diagnostics: Dict[str, Any]
    """"converged", "elbo_trace" (smoothed -ELBO per window), "grad_snr" (per parameter block),
    "psis_khat" (Pareto k-hat of log p - log q; < 0.7 usable), "num_steps", "lr", "map" (or None)."""


class FitError(ValueError):
    """vg.fit stopped: the log joint misbehaved or the optimisation diverged.  ``result`` holds
    the last finite state (a FitResult with converged=False), ``step`` the step it happened at."""

    def __init__(self, message, step, result):
        super().__init__(message)
        self.step = step
        self.result = result


# -- the log joint ------------------------------------------------------------------------------

class _Reuse:
    """Work arrays reused from step to step (a fresh (S, d) array is page-faulted in at every
    step: at d = 10^5, S = 8, that doubled the time of the sampling), unless something else
    still holds one, e.g. a log_joint that kept its z: then that one is left alone and a new
    array takes its place."""

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


class _Target:
    """log_joint with its output checked, in whitened coordinates z = m + T x."""

    def __init__(self, log_joint, d, shift, T, kind):
        self.log_joint, self.d = log_joint, d
        self.shift, self.T, self.kind = shift, T, kind  # kind: None, "diag" or "tril"
        self.step = -1
        self.pool = None  # a _Reuse for z, set by vg.fit (also used by the PSIS draws after the fit)

    def to_z(self, x):
        if self.kind is None:
            return x
        z = np.empty(x.shape) if self.pool is None else self.pool.get("z", x.shape, np.dtype(np.float64))
        if self.kind == "diag":
            np.multiply(x, self.T, out=z)
        else:
            np.matmul(x, self.T.T, out=z)
        z += self.shift
        return z

    def check_grads(self, grads, where="step"):
        """Raise naming the step, sample and element of the first non-finite gradient."""
        bad = ~np.isfinite(grads)
        if bad.any():
            s, j = (int(i) for i in np.argwhere(bad)[0])
            raise _NonFinite(f"log_joint returned a non-finite gradient at {where} {self.step} for sample {s}, "
                             f"element {j}")

    def __call__(self, x, need_grads, where="step", check_grads=True):
        z = self.to_z(x)
        out = self.log_joint(z)
        S = x.shape[0]
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
            raise _NonFinite(f"log_joint returned {float(values[s])} at {where} {self.step} for sample {s} "
                             f"(z = {np.array2string(z[s], precision=4, threshold=8)})")
        if not need_grads:
            return values, None
        if grads is None:
            raise ValueError("log_joint must return (values, grads) for the pathwise and stl estimators "
                             "(or use estimator='score')")
        grads = np.asarray(as_float_array(grads, "log_joint grads"), dtype=np.float64)
        if grads.shape != z.shape:
            raise ValueError(f"log_joint grads must have the shape of z {z.shape}, got {grads.shape}")
        if check_grads:
            self.check_grads(grads, where)
        if self.kind == "diag":
            grads = grads * self.T
        elif self.kind == "tril":
            grads = grads @ self.T
        return values, np.ascontiguousarray(grads)


class _NonFinite(ValueError):
    pass


def _log_joint_grads(target, x):
    """The raw gradients of log_joint at the whitened points x (for error messages only)."""
    out = target.log_joint(target.to_z(x))
    return np.asarray(out[1], dtype=np.float64)


def _probe(log_joint, init):
    """Call log_joint once on init: the values' shape, whether gradients come back."""
    out = log_joint(init[None, :].copy())
    has_grads = isinstance(out, tuple) and len(out) == 2 and out[1] is not None
    return has_grads


# -- families in whitened coordinates ---------------------------------------------------------------

def _initial_q(family, d, rank, start, rng, scale0=1.0):
    """q at the start: loc = start, unit scales (times scale0); the low-rank factor small and random
    (at U = 0 the score estimator's gradient in U vanishes)."""
    rho0 = float(np.log(np.expm1(scale0)))
    if family == "meanfield":
        return MeanFieldGaussian(start, np.full(d, rho0))
    if family == "fullrank":
        tril = np.zeros((d, d))
        tril[np.diag_indices(d)] = rho0
        return FullRankGaussian(start, tril)
    U = 0.1 * scale0 * rng.standard_normal((d, rank))
    return LowRankGaussian(start, np.full(d, rho0), U)


def _lowrank_from_correlation(R, rank):
    """D, U with diag(D^2) + U U^T close to the correlation matrix R (top eigenvectors)."""
    lam, V = np.linalg.eigh(R)
    lam, V = lam[::-1][:rank], V[:, ::-1][:, :rank]
    U = V * np.sqrt(np.maximum(lam, 0.0) * 0.95)
    D2 = np.maximum(np.diag(R) - np.sum(U * U, axis=1), 0.05)
    return np.sqrt(D2), U


def _to_original(family, qx, target):
    """Map q fitted in x (z = m + T x) back to z."""
    if target.kind is None:
        return qx
    m, T = target.shift, target.T
    if family == "meanfield":
        return MeanFieldGaussian.from_scale(m + T * qx.loc, T * qx.scale)
    if family == "fullrank":
        return FullRankGaussian.from_scale_tril(m + T @ qx.loc, T @ qx.scale_tril)
    return LowRankGaussian.from_diag(m + T * qx.loc, T * qx.diag, T[:, None] * qx.cov_factor)


def _entropy(q):
    return float(q.entropy())


# -- gradient estimators ------------------------------------------------------------------------------

def _score_gradient(q, z, eps, log_p, control_variate=True):
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
        if control_variate:
            hc = hs - hs.mean(axis=0)
            var = np.einsum("sj,sj->j", hc, hc)
            cov = np.einsum("sj,sj->j", gs - g, hc)
            a = np.divide(cov, var, out=np.zeros_like(cov), where=var > 0)
            g = g - a * hs.mean(axis=0)
        grads.append(g.reshape(h.shape[1:]))
    return tuple(grads)


class _WindowStats:
    """Per-coordinate running mean and variance of the gradients over one window (for the SNR)."""

    def __init__(self):
        self.n = 0
        self.sums = None

    def add(self, grads):
        if self.sums is None:
            self.sums = [[np.zeros(g.shape), np.zeros(g.shape)] for g in grads]
        for (s1, s2), g in zip(self.sums, grads):
            g64 = np.asarray(g, dtype=np.float64)
            s1 += g64
            s2 += g64 * g64
        self.n += 1

    def snr(self, names):
        out = {}
        if self.n < 2:
            return {n: float("nan") for n in names}
        for name, (s1, s2) in zip(names, self.sums):
            mean = s1 / self.n
            var = np.maximum(s2 / self.n - mean * mean, 0.0) * self.n / (self.n - 1)
            sd = np.sqrt(var)
            ratio = np.divide(np.abs(mean), sd, out=np.full(mean.shape, np.inf), where=sd > 0)
            out[name] = float(np.mean(ratio[np.isfinite(ratio)])) if np.isfinite(ratio).any() else float("inf")
        return out


# -- the fit ----------------------------------------------------------------------------------------

def fit(log_joint: Callable, init, *, family: str = "meanfield", rank: Optional[int] = None,
        estimator: str = "pathwise", num_samples: Optional[int] = None, num_steps: int = 10000,
        lr=None, rng=None, progress: bool = False, tol_rel_obj: float = 1e-4, eval_every: int = 100,
        max_window: Optional[int] = None,
        map_init: Optional[bool] = None, psis_samples: int = 1000, workers=None) -> FitResult:
    r"""Fit a Gaussian approximation q(z) to the density exp(log_joint(z)) / Z by black-box VI.

    Parameters
    ----------
    log_joint : callable
        ``log_joint(z)`` for a batch z of shape (S, d) returns ``(values (S,), grads (S, d))`` with
        grads = d log p / dz; returning the values alone is enough for ``estimator="score"``.  It is
        called once per step on the batch of that step's samples.
    init : array_like, shape (d,)
        Starting point (and, when gradients are available, where the MAP search starts).
    family : {"meanfield", "fullrank", "lowrank"}
    rank : int, for "lowrank"
        1 <= rank < d.
    estimator : {"pathwise", "score", "stl"}
        Reparameterisation (exact entropy gradient), score function (leave-one-out baseline and a
        control variate), or sticking the landing.
    num_samples : int
        Samples per step (default 8; 32 for "score").
    num_steps : int
        Maximum number of steps (default 10000).
    lr : float, callable schedule, "adaptive" or None
        Adam's step size.  None: 0.02 in whitened coordinates, 0.05 otherwise.  "adaptive": Stan's
        search over 100, 10, 1, 0.1, 0.01 with short trial runs.
    rng : int, numpy.random.Generator or None, keyword-only
    progress : bool
        Print the smoothed -ELBO every window to stderr.
    tol_rel_obj : float
        Convergence: every ``eval_every`` steps the mean -ELBO over the last W steps is compared
        with the mean over the W steps before.  The pair is flat when the relative change is
        below tol_rel_obj (as Stan ADVI's rule) or the change is within two standard errors of
        the noise.  While flat, W doubles from eval_every up to ``max_window``; a flat pair at
        the longest window means convergence, so slow drifts hidden by the noise of short
        windows are not mistaken for it.  q is then the average iterate over the last 2 W
        steps (Polyak-Ruppert averaging).
    eval_every : int
        Steps between checks and the shortest window (default 100).
    max_window : int
        The longest comparison window (default 8 * eval_every).
    map_init : bool or None
        Start at the MAP and whiten with the Laplace approximation (default: when gradients
        are available).
    psis_samples : int
        Draws from q for the PSIS k-hat diagnostic (capped so that they fit in ~800 MB).
    workers : int or None

    Returns
    -------
    FitResult
        ``q`` (in the original coordinates; the average iterate over the final flat stretch),
        ``losses`` and ``diagnostics``.

    Raises
    ------
    FitError
        When log_joint returns non-finite values or gradients (the message names the step and the
        sample) or the optimisation diverges; ``err.result`` holds the last finite state.

    Examples
    --------
    A correlated 2-d Gaussian: mean field finds the conditional sds 1/sqrt(diag(precision)),
    full rank the whole covariance.

    >>> import numpy as np, vigrad as vg
    >>> cov = np.array([[1.0, 0.9], [0.9, 1.0]]); prec = np.linalg.inv(cov)
    >>> def log_joint(z):
    ...     return -0.5 * np.einsum("si,ij,sj->s", z, prec, z), -z @ prec
    >>> res = vg.fit(log_joint, np.zeros(2), family="fullrank", rng=0)
    >>> bool(np.allclose(res.q.cov, cov, atol=0.05)), res.diagnostics["converged"]
    (True, True)
    >>> res = vg.fit(log_joint, np.zeros(2), family="meanfield", rng=0)
    >>> bool(np.allclose(res.q.scale, 1 / np.sqrt(np.diag(prec)), rtol=0.05))
    True
    """
    # -- arguments --------------------------------------------------------------------------------
    if not callable(log_joint):
        raise TypeError(f"log_joint must be callable, got {type(log_joint).__name__}")
    init = np.array(as_float_array(init, "init", dtype=np.float64), copy=True)
    if init.ndim != 1 or init.size < 1:
        raise ValueError(f"init must be a 1-D array of the d >= 1 parameters, got shape {init.shape}")
    if not np.isfinite(init).all():
        raise ValueError("init must be finite")
    d = init.size
    if not isinstance(family, str) or family not in _FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, _FAMILIES))}, got {family!r}")
    if not isinstance(estimator, str) or estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, _ESTIMATORS))}, got {estimator!r}")
    if family == "lowrank":
        if rank is None:
            raise ValueError("family='lowrank' needs rank (1 <= rank < d)")
        rank = check_num_samples(rank, "rank")
        if not 1 <= rank < d:
            raise ValueError(f"rank must satisfy 1 <= rank < d = {d}, got {rank}")
    elif rank is not None:
        raise ValueError(f"rank applies to family='lowrank' only, got family={family!r}")
    S = check_num_samples(num_samples if num_samples is not None else (32 if estimator == "score" else 8),
                          "num_samples")
    if estimator == "score" and S < 2:
        raise ValueError(f"estimator='score' needs num_samples >= 2 (leave-one-out baseline), got {S}")
    num_steps = check_num_samples(num_steps, "num_steps")
    eval_every = check_num_samples(eval_every, "eval_every")
    max_window = eval_every * 8 if max_window is None else check_num_samples(max_window, "max_window")
    if max_window < eval_every:
        raise ValueError(f"max_window must be >= eval_every = {eval_every}, got {max_window}")
    tol_rel_obj = check_real(tol_rel_obj, "tol_rel_obj", nonnegative=True)
    psis_samples = check_num_samples(psis_samples, "psis_samples", minimum=0)
    nw = resolve_workers(workers)
    gen = resolve_rng(rng)

    # -- MAP and Laplace whitening ---------------------------------------------------------------
    has_grads = _probe(log_joint, init)
    if estimator != "score" and not has_grads:
        raise ValueError("log_joint must return (values, grads) for the pathwise and stl estimators "
                         "(or use estimator='score')")
    if map_init is None:
        map_init = has_grads
    if map_init and not has_grads:
        raise ValueError("map_init=True needs log_joint to return gradients")
    target = _Target(log_joint, d, None, None, None)
    map_info = None
    start = init
    if map_init:
        target.step = -1

        def neg(x):
            v, g = target(x[None, :], True, where="MAP search, evaluation")
            return -float(v[0]), -g[0]

        opt_res = _mapfit.lbfgs(neg, init)
        m = np.asarray(opt_res.x, dtype=np.float64)

        def grad_batch(X):
            return -target(np.asarray(X, dtype=np.float64), True, where="Laplace Hessian, evaluation")[1]

        H = _mapfit.numerical_hessian(grad_batch, m)
        lap = _mapfit.laplace_approximation(H)
        cov = np.asarray(lap.cov)
        if lap.jitter > 0:
            # the search stopped where -log p is not convex (a saddle or a minimum: e.g. the point
            # between two modes, where the gradient is zero too): no usable Laplace approximation
            warnings.warn(
                "vg.fit: the Hessian at the point the MAP search stopped at is not positive definite "
                "(a saddle or a minimum of the density); fitting from init without preconditioning",
                RuntimeWarning, stacklevel=2)
            map_info = {"x": m, "converged": False, "laplace_cov": None, "jitter": float(lap.jitter)}
            map_init = False
        else:
            if family == "fullrank":
                target = _Target(log_joint, d, m, np.asarray(lap.scale_tril), "tril")
            elif family == "meanfield":
                target = _Target(log_joint, d, m, 1.0 / np.sqrt(np.diag(H)), "diag")
            else:
                target = _Target(log_joint, d, m, np.sqrt(np.diag(cov)), "diag")
            map_info = {"x": m, "converged": bool(opt_res.converged), "laplace_cov": cov, "jitter": 0.0}
            start = np.zeros(d)

    if family == "lowrank" and map_init:
        Dx, Ux = _lowrank_from_correlation(cov / np.outer(target.T, target.T), rank)
        q = LowRankGaussian.from_diag(start, Dx, Ux)
    else:
        q = _initial_q(family, d, rank, start, gen)

    if lr is None:
        lr = 0.02 if map_init else 0.05
    names = _BLOCK_NAMES[family]
    need_grads = estimator != "score"
    mode = "stl" if estimator == "stl" else "mc"

    def run(q0, lr_value, steps, record):
        """Adam from q0 for up to `steps` steps; returns (q_avg, losses, converged, trace, snr, steps_done)."""
        # Adam in place through the core (one fused pass per block of parameters), on two sets of
        # parameter arrays used in turn: the step writes the set qc does not hold, so that a
        # failed step leaves qc, the last finite state, as it was
        sets = [[np.array(p, dtype=np.float64) for p in q0._params()] for _ in range(2)]
        params = sets[0]
        moments = [(np.zeros(p.size), np.zeros(p.size)) for p in params]
        pool = _Reuse()
        target.pool = pool
        eps_shape = q0._noise_shape(S)
        cls = type(q0)
        qc = q0
        losses = np.empty(steps)
        trace, converged = [], False
        chunk_avgs = []  # the mean iterate of each eval_every-step chunk
        W = eval_every  # the comparison window: doubles while the -ELBO stays flat
        avg = [np.zeros_like(p) for p in params]
        n_avg = 0
        stats = _WindowStats()
        t_last = time.perf_counter()
        for t in range(steps):
            target.step = t
            key = int(gen.integers(0, 2**64, dtype=np.uint64))
            z_x = eps = log_p = g = grads = None  # last step's references: their buffers can be reused
            z_x, eps = qc._sample_noise(S, key, nw, out=(pool.get("x", (S, d), qc.dtype),
                                                         pool.get("eps", eps_shape, qc.dtype)))
            try:
                # the (S, d) gradients are checked only when the family's gradients (smaller, and
                # non-finite whenever an input is) come out non-finite: one pass less per step
                log_p, g = target(z_x, need_grads, check_grads=False)
                if need_grads:
                    grads = qc._pathwise(eps, g, mode, nw)
                    if not all(np.isfinite(gb).all() for gb in grads):
                        target.check_grads(g if target.kind is None else np.asarray(_log_joint_grads(target, z_x)))
                else:
                    grads = _score_gradient(qc, z_x, eps, log_p)
            except _NonFinite as exc:
                raise FitError(str(exc), t, _partial(qc, losses[:t], trace)) from None
            loss = -float(log_p.mean()) - _entropy(qc)
            if not np.isfinite(loss) or not all(np.isfinite(gb).all() for gb in grads):
                raise FitError(f"vg.fit diverged at step {t}: the -ELBO or its gradient is not finite",
                               t, _partial(qc, losses[:t], trace))
            losses[t] = loss
            lr_t = _optim._lr_at(lr_value, t) if callable(lr_value) else lr_value
            new = sets[(t + 1) % 2]
            for p_new, p, gb, (m, v) in zip(new, params, grads, moments):
                np.copyto(p_new, p)
                gb = np.ascontiguousarray(gb, dtype=np.float64).reshape(-1)
                _core.adam_update(p_new.reshape(-1), gb, m, v, t, lr_t, 0.9, 0.999, 1e-8, nw)
            params = new
            try:
                q_next = cls._from_params(tuple(p.view() for p in params))
            except ValueError as exc:
                raise FitError(f"vg.fit diverged at step {t}: {exc}", t, _partial(qc, losses[:t], trace)) from None
            qc = q_next
            if not record:
                continue
            stats.add(grads)
            for a, p in zip(avg, params):
                a += p
            n_avg += 1
            if (t + 1) % eval_every:
                continue
            n = t + 1
            trace.append(float(losses[n - eval_every:n].mean()))
            chunk_avgs.append([a / n_avg for a in avg])
            avg, n_avg = [np.zeros_like(p) for p in params], 0
            rel = float("nan")
            if n >= 2 * W:
                new_w, old_w = losses[n - W:n], losses[n - 2 * W:n - W]
                delta = abs(new_w.mean() - old_w.mean())
                rel = delta / max(abs(new_w.mean()), 1e-300)
                noise = 2.0 * math.sqrt((new_w.var(ddof=1) + old_w.var(ddof=1)) / W)
                if rel < tol_rel_obj or delta < noise:
                    if W >= max_window:
                        converged = True
                    else:
                        W *= 2
                else:
                    W = eval_every
            if progress:
                _report(n, steps, trace[-1], rel, time.perf_counter() - t_last)
            if converged or n == steps:
                break
            snr_last, stats = stats, _WindowStats()
        steps_done = t + 1
        # Polyak-Ruppert: the average iterate over the last 2 W steps (flat at every scale up to W),
        # or over the last chunk when the fit stopped without converging
        if record and chunk_avgs:
            k = min(len(chunk_avgs), 2 * W // eval_every if (converged or W > eval_every) else 1)
            q_avg = cls._from_params(tuple(sum(c[i] for c in chunk_avgs[-k:]) / k for i in range(len(params))))
        else:
            q_avg = qc
        snr = stats if stats.n >= 2 else locals().get("snr_last", stats)
        return q_avg, losses[:steps_done], converged, trace, snr.snr(names), steps_done

    if isinstance(lr, str):
        if lr != "adaptive":
            raise ValueError(f"lr must be a positive float, a schedule, 'adaptive' or None, got {lr!r}")
        trial_steps = min(50 * max(1, eval_every // 50), num_steps)

        def trial(eta):
            try:
                _, ls, _, _, _, _ = run(q, eta, trial_steps, record=False)
            except FitError:
                return float("inf")
            tail = ls[-max(1, len(ls) // 2):]
            return float(np.mean(tail)) if np.isfinite(tail).all() else float("inf")

        lr, _ = _optim.search_step_size(trial)
    elif not callable(lr):
        lr = check_real(lr, "lr", positive=True)

    q_x, losses, converged, trace, snr, steps_done = run(q, lr, num_steps, record=True)
    if progress:
        print(file=sys.stderr)
    q_final = _to_original(family, q_x, target)
    diagnostics = {
        "converged": converged,
        "elbo_trace": np.array(trace),
        "grad_snr": snr,
        "psis_khat": _psis_khat(q_final, log_joint, psis_samples, gen, nw, d),
        "num_steps": steps_done,
        "lr": lr,
        "map": map_info,
    }
    return FitResult(q_final, losses, diagnostics)


def _partial(q, losses, trace):
    return FitResult(q, np.array(losses), {"converged": False, "elbo_trace": np.array(trace)})


def _report(t, steps, mean, rel, elapsed):
    line = f"vg.fit: step {t:>6}/{steps}  -ELBO {mean:12.5g}  rel change {rel:9.3g}  ({elapsed:.1f} s)"
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


def _psis_khat(q, log_joint, n, gen, workers, d):
    """Pareto k-hat of the importance ratios p / q over n draws from q (Yao et al. 2018)."""
    n = min(n, max(0, int(1e8 // max(d, 1))))
    if n < 20:
        return float("nan")
    z = q.sample(n, rng=gen, workers=workers)
    out = log_joint(z)
    log_p = np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float64)
    log_w = log_p - q.log_prob(z, workers=workers).astype(np.float64)
    if not np.isfinite(log_w).all():
        return float("inf")
    return float(_diag.psis(log_w).khat)
