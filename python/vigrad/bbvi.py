"""Black-box variational inference: ``vg.fit(log_joint, init, ...)``, a short driver over :class:`vigrad.VI`.

Fits a Gaussian q (mean-field, full-rank or low-rank + diagonal) to an unnormalised density p
by stochastic optimisation of the negative ELBO F(q) = E_q[log q(z)] - E_q[log p(z)], and
stops when the answer stops moving (:class:`vigrad.vi.ConvergenceMonitor`).

Robust by default: when ``log_joint`` returns gradients, the fit starts at the MAP found by
L-BFGS and runs in coordinates whitened by the Laplace approximation there (:meth:`VI.laplace`),
then maps q back.  Posteriors whose scales differ by 10^4 or whose correlations reach 0.99 then
look like N(0, I) to the optimiser.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np

from . import diagnostics as _diag
from . import optim as _optim
from ._validation import as_float_array, check_num_samples, check_real, resolve_rng, resolve_workers
from .vi import (DEFAULT_LR, VI, ConvergenceMonitor, FitError, Laplace, _check_init, _evenly_spaced, _has_grads,
                 _moment_sums)

__all__ = ["fit", "FitResult", "FitError", "FitDiagnostics"]


class FitResult(NamedTuple):
    """Result of :func:`fit`."""

    q: Any
    """The fitted family (MeanFieldGaussian, FullRankGaussian or LowRankGaussian) in the original coordinates."""
    losses: np.ndarray
    """The -ELBO estimate at every step."""
    diagnostics: "FitDiagnostics"
    """See :class:`FitDiagnostics` (readable by key too: ``diagnostics["converged"]``)."""


@dataclass(frozen=True, eq=False)
class FitDiagnostics(Mapping):
    """How a :func:`fit` went.  Attributes, also readable by key (``d["converged"]``; the key
    ``"num_steps"`` reads :attr:`steps`, its name before this type existed)."""

    converged: bool
    """The stopping rule held (:class:`vigrad.vi.ConvergenceMonitor`)."""
    stop_reason: str
    """"converged", "num_steps" (the step budget ran out), "callback" (the callback asked) or
    "error" (on :attr:`FitError.result`)."""
    steps: int
    """Steps taken."""
    mcse_mean: np.ndarray
    """Monte Carlo standard error of the returned mean, per coordinate, in the original
    coordinates (nan when the window was too short to estimate it)."""
    max_mcse: float
    """The stopping statistic: the largest MCSE of the averaged parameters, in units of sd."""
    drift_z: float
    """The largest difference of the averaging window halves' means over its standard error, at
    the last check (the drift test; see :class:`vigrad.vi.ConvergenceMonitor`)."""
    tau: float
    """The iterates' integrated autocorrelation time in steps, at the last check."""
    window: int
    """Steps averaged into the returned q."""
    grad_snr: Dict[str, float]
    """Mean |E g| / sd(g) of each parameter block's gradient over the last 100 steps (over every
    coordinate of a block up to 4096 of them, else over 4096 evenly spaced ones)."""
    psis_khat: float
    """Pareto k-hat of log p - log q over draws from q (Yao et al. 2018): < 0.7 usable."""
    elbo_trace: np.ndarray
    """The -ELBO estimate averaged over each 20 steps."""
    log_joint_calls: int
    """Calls of ``log_joint`` (the MAP search, the curvature, the steps and the PSIS draws)."""
    num_samples: int
    """Samples per step at the end (see ``num_samples`` of :func:`fit`)."""
    optimizer: Any
    """The optimiser used (a :class:`vigrad.optim.Optimizer`)."""
    map: Optional[Laplace] = field(default=None)
    """The MAP search and the Laplace whitening (:class:`vigrad.vi.Laplace`), or None."""

    def __getitem__(self, key):
        if key == "num_steps":
            return self.steps
        if isinstance(key, str) and key in _FIELD_NAMES:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(_FIELD_NAMES)

    def __len__(self):
        return len(_FIELD_NAMES)


_FIELD_NAMES = tuple(f.name for f in fields(FitDiagnostics))
_SNR_WINDOW = 100
_SNR_COORDS = 4096  # coordinates per block in the SNR's sums (evenly spaced beyond)
_SAMPLES_GROWTH = 4  # the default num_samples grows to at most 4 times its start
_TRACE_EVERY = 20


class _Counted:
    """The log joint, counting its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, z):
        self.calls += 1
        return self.fn(z)


class _GradStats:
    """Per-coordinate running sums of the gradients over windows of _SNR_WINDOW steps (for the SNR),
    of every coordinate of a block up to _SNR_COORDS of them, else of _SNR_COORDS evenly spaced
    ones: the SNR is a mean over coordinates, and at d = 10^5 summing all of them cost 3 % of a
    step for a diagnostic."""

    def __init__(self, names, workers=1):
        self.names, self.n, self.sums, self.last, self.workers = names, 0, None, None, workers
        self.picks = None

    def add(self, grads):
        if self.sums is None:
            self.picks = [None if g.size <= _SNR_COORDS else _evenly_spaced(g.size, _SNR_COORDS) for g in grads]
            sizes = [g.size if k is None else k.size for g, k in zip(grads, self.picks)]
            self.sums = [[np.zeros(n), np.zeros(n)] for n in sizes]
        for (s1, s2), g, k in zip(self.sums, grads, self.picks):
            g = np.asarray(g).reshape(-1)
            _moment_sums(g if k is None else g[k], None, s1, s2, self.workers)
        self.n += 1
        if self.n == _SNR_WINDOW:
            self.last, self.n = self.snr(), 0
            for s1, s2 in self.sums:  # the next window starts from zero, in the same arrays
                s1.fill(0.0)
                s2.fill(0.0)

    def snr(self):
        if self.n < 2:
            return self.last if self.last is not None else {n: math.nan for n in self.names}
        out = {}
        for name, (s1, s2) in zip(self.names, self.sums):
            mean = s1 / self.n
            sd = np.sqrt(np.maximum(s2 / self.n - mean * mean, 0.0) * self.n / (self.n - 1))
            ratio = np.divide(np.abs(mean), sd, out=np.full(mean.shape, np.inf), where=sd > 0)
            ok = np.isfinite(ratio)
            out[name] = float(np.mean(ratio[ok])) if ok.any() else math.inf
        return out


def _optimizer_from(lr, optimizer):
    """The optimiser for fit's lr / optimizer arguments ("adaptive" is resolved later)."""
    if isinstance(lr, str):
        if lr != "adaptive":
            raise ValueError(f"lr must be a positive float, a schedule, 'adaptive' or None, got {lr!r}")
        if optimizer is not None:
            raise ValueError("give lr or optimizer, not both (lr is the step size of the default Adam)")
        return "adaptive"
    if lr is not None and not callable(lr):
        lr = check_real(lr, "lr", positive=True)
    return _optim._resolve(lr, optimizer, DEFAULT_LR)


def fit(log_joint: Callable, init, *, family: str = "meanfield", rank: Optional[int] = None,
        estimator: str = "pathwise", num_samples: Optional[int] = None, num_steps: int = 10000,
        lr=None, optimizer=None, rng=None, progress: bool = False, callback: Optional[Callable] = None,
        tol: float = 0.05, map_init: Optional[bool] = None, psis_samples: int = 1000, workers=None) -> FitResult:
    r"""Fit a Gaussian approximation q(z) to the density exp(log_joint(z)) / Z by black-box VI.

    A driver over :class:`vigrad.VI`: the MAP and Laplace whitening (``map_init``), steps of
    ``VI.step`` until :class:`vigrad.vi.ConvergenceMonitor` says the iterates have stopped
    moving, then the iterate average over the final window, the PSIS k-hat of that q and the
    diagnostics.

    Parameters
    ----------
    log_joint : callable
        ``log_joint(z)`` for a read-only batch z of shape (S, d) returns ``(values (S,), grads
        (S, d))`` with grads = d log p / dz; returning the values alone is enough for
        ``estimator="score"``.  It is called once per step on the batch of that step's samples.
    init : array_like, shape (d,)
        Starting point (and, when gradients are available, where the MAP search starts).
    family : {"meanfield", "fullrank", "lowrank"}
    rank : int, for "lowrank"
        1 <= rank < d.
    estimator : {"pathwise", "score", "stl"}
        Reparameterisation (exact entropy gradient), score function (leave-one-out baseline and a
        control variate), or sticking the landing.
    num_samples : int or None
        Samples per step, fixed.  None (default): 8 (32 for "score") at the start, doubled each time
        the convergence window restarts because the iterates still drift, up to 4 times that: an
        optimiser that normalises its steps (Adam) progresses along a weak, consistent gradient
        in proportion to its signal-to-noise ratio, which grows as the square root of the samples.
    num_steps : int
        Maximum number of steps (default 10000).
    lr : float, callable schedule, "adaptive" or None
        The step size of the default optimiser, Adam: ``lr=0.05`` is ``optimizer=vg.optim.adam(0.05)``
        (None: ``vigrad.vi.DEFAULT_LR`` = 0.05).  "adaptive": Stan's search over 100, 10, 1, 0.1,
        0.01 with 50-step trial runs.
    optimizer : vigrad.optim.Optimizer or None
        Any optimiser of :mod:`vigrad.optim` instead (give lr or optimizer, not both).
    rng : int, numpy.random.Generator or None, keyword-only
    progress : bool
        Print a line per convergence check to stderr.
    callback : callable or None
        ``callback(state, info)`` after every step, with the new :class:`vigrad.vi.VIState` and the
        step's :class:`vigrad.vi.VIInfo`; returning True stops the fit (``stop_reason="callback"``).
    tol : float
        Convergence: the Monte Carlo standard error of the averaged parameters, each in units of its
        coordinate's sd (the mean's MCSE over the sd, and the MCSE of the log-sd), must fall below
        tol, over a window whose two halves agree (no drift between them beyond their standard
        errors, nor a falling -ELBO; Dhaka et al. 2020; see ConvergenceMonitor).  The default 0.05
        returns means and sds known to about 5 % of an sd; each halving of tol costs about four
        times the steps.  On posteriordb's kidiq, sblrc and arK the default fits took 189-270 calls
        of the log joint, MAP search included; eight schools 1 000-9 500 steps.
    map_init : bool or None
        Start at the MAP and whiten with the Laplace approximation (default: when gradients are
        available).  Cost: the L-BFGS search, then 2d gradient evaluations in one call and O(d^2)
        memory for full rank, or 2 min(d, 64) evaluations and O(d) memory for mean field and low rank
        (:meth:`VI.laplace`).
    psis_samples : int
        Draws from q for the PSIS k-hat diagnostic, evaluated in calls of at most 2^22 / d draws.
    workers : int or None

    Returns
    -------
    FitResult
        ``q`` (in the original coordinates; the iterate average over the final window),
        ``losses`` and ``diagnostics`` (:class:`FitDiagnostics`).

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
    x0 = _check_init(init)
    d = x0.size
    opt = _optimizer_from(lr, optimizer)
    counted = _Counted(log_joint)
    vi = VI(counted, family, rank=rank, optimizer=opt if opt != "adaptive" else None, num_samples=num_samples,
            estimator=estimator, workers=workers)
    if family == "lowrank" and not vi.rank < d:
        raise ValueError(f"rank must satisfy 1 <= rank < d = {d}, got {vi.rank}")
    num_steps = check_num_samples(num_steps, "num_steps")
    tol = check_real(tol, "tol", positive=True)
    psis_samples = check_num_samples(psis_samples, "psis_samples", minimum=0)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if map_init is not None and not isinstance(map_init, (bool, np.bool_)):
        raise TypeError(f"map_init must be a bool or None, got {type(map_init).__name__}")
    nw = resolve_workers(workers)
    gen = resolve_rng(rng)

    # -- preconditioning and the start --------------------------------------------------------------
    try:
        has_grads = _has_grads(counted, x0)
    except FitError as exc:
        raise _start_error(vi, x0, exc, counted, nw) from None
    if estimator != "score" and not has_grads:
        raise ValueError("log_joint must return (values, grads) for the pathwise and stl estimators "
                         "(or use estimator='score')")
    if map_init is None:
        map_init = has_grads
    if map_init and not has_grads:
        raise ValueError("map_init=True needs log_joint to return gradients")
    lap = None
    if map_init:
        try:
            lap = vi.laplace(x0, rng=gen)
        except FitError as exc:
            raise _start_error(vi, x0, exc, counted, nw) from None
        if not lap.usable:
            warnings.warn(f"vg.fit: {lap.message}; fitting from init without preconditioning",
                          RuntimeWarning, stacklevel=2)
        elif lap.message:
            warnings.warn(f"vg.fit: {lap.message}", RuntimeWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # said above already
        state0 = vi.init(x0, rng=gen, precondition=lap if lap is not None and lap.usable else False)
    if opt == "adaptive":
        opt = _adaptive_optimizer(vi, state0, num_steps)
        vi = VI(counted, family, rank=rank, optimizer=opt, num_samples=vi.num_samples, estimator=estimator,
                workers=workers)
        state0 = state0._replace(opt_state=opt.init(state0.params))

    # -- the loop -----------------------------------------------------------------------------------
    monitor = ConvergenceMonitor(vi, tol=tol)
    stats = _GradStats(vi.block_names, nw)
    losses = np.empty(num_steps)
    state, stop_reason, t = state0, "num_steps", 0
    t_start = time.perf_counter()
    restarts, max_samples = 0, vi.num_samples * (_SAMPLES_GROWTH if num_samples is None else 1)
    while t < num_steps:
        try:
            new_state, info = vi._step(state, grad_norm=callback is not None)  # info.grad_norm: for the callback
        except FitError as exc:
            partial = _result(vi, monitor, state, losses[:t], stats, counted, opt, lap, "error", gen, 0, nw,
                              last_state=True)
            raise FitError(f"vg.fit: {exc}", exc.step, partial) from None
        losses[t] = info.loss
        t += 1
        state = new_state
        stats.add(info.grads)
        stop = monitor.update(state, info.loss)
        if monitor.report().restarts > restarts:
            # still drifting: more samples per step raise the gradient's signal to noise, and so
            # the progress per step of an optimiser that normalises its steps (Adam)
            restarts = monitor.report().restarts
            if vi.num_samples < max_samples:
                vi = vi._with_num_samples(2 * vi.num_samples)
        if progress and (stop or t % 100 == 0):
            _report(t, num_steps, losses[max(0, t - 100):t].mean(), monitor.report(), time.perf_counter() - t_start)
        if stop:
            stop_reason = "converged"
            break
        if callback is not None and callback(state, info) is True:
            stop_reason = "callback"
            break
    if progress:
        print(file=sys.stderr)
    return _result(vi, monitor, state, losses[:t], stats, counted, opt, lap, stop_reason, gen, psis_samples, nw)


def _result(vi, monitor, state, losses, stats, counted, opt, lap, stop_reason, gen, psis_samples, workers,
            last_state=False):
    """The FitResult at the end of a fit (or, with last_state, at the last finite state)."""
    rep = monitor.report()
    q = vi.q(state) if last_state else monitor.q()
    mcse_x = rep.mcse_loc
    T = state.scale
    if mcse_x.size == 0:
        mcse = np.full(q.size, np.nan)
    elif T.size == 0:
        mcse = mcse_x
    elif T.ndim == 1:
        mcse = T * mcse_x
    else:
        mcse = np.sqrt((T * T) @ (mcse_x * mcse_x))
    khat = _psis_khat(q, counted, psis_samples, gen, workers, q.size)
    n = len(losses) // _TRACE_EVERY * _TRACE_EVERY
    trace = losses[:n].reshape(-1, _TRACE_EVERY).mean(axis=1) if n else np.zeros(0)
    diags = FitDiagnostics(
        converged=stop_reason == "converged", stop_reason=stop_reason, steps=int(state.step), mcse_mean=mcse,
        max_mcse=float(rep.max_mcse), drift_z=float(rep.max_drift_z), tau=float(rep.tau),
        window=0 if last_state else int(rep.window),
        grad_snr=stats.snr(), psis_khat=khat, elbo_trace=trace, log_joint_calls=counted.calls,
        num_samples=vi.num_samples, optimizer=opt,
        map=lap)
    return FitResult(q, np.array(losses), diags)


def _start_error(vi, x0, exc, counted, workers):
    """The FitError of a failure before the first step: its result is q at init with unit scales."""
    state = vi.init(x0, rng=0)
    monitor = ConvergenceMonitor(vi)
    monitor.update(state)
    partial = _result(vi, monitor, state, np.zeros(0), _GradStats(vi.block_names), counted, vi.optimizer, None,
                      "error", None, 0, workers, last_state=True)
    return FitError(f"vg.fit: {exc}", -1, partial)


def _adaptive_optimizer(vi, state0, num_steps):
    """Stan's step-size search: 50-step trials of Adam from state0."""
    trial_steps = min(50, num_steps)

    def trial(eta):
        v = VI(vi.log_joint, vi.family, rank=vi.rank, optimizer=_optim.adam(eta), num_samples=vi.num_samples,
               estimator=vi.estimator, workers=vi.workers)
        st = state0._replace(opt_state=v.optimizer.init(state0.params))
        ls = []
        try:
            for _ in range(trial_steps):
                st, info = v.step(st)
                ls.append(info.loss)
        except FitError:
            return math.inf
        tail = ls[-max(1, len(ls) // 2):]
        return float(np.mean(tail))

    eta, _ = _optim.search_step_size(trial)
    return _optim.adam(eta)


def _report(t, steps, mean, rep, elapsed):
    line = (f"vg.fit: step {t:>6}/{steps}  -ELBO {mean:12.5g}  max MCSE/sd {rep.max_mcse:8.3g}  "
            f"drift z {rep.max_drift_z:6.2f}  window {rep.window}  ({elapsed:.1f} s)")
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


_PSIS_CHUNK = 1 << 22  # elements of z per log-joint call of the PSIS draws (32 MiB)


def _psis_khat(q, log_joint, n, gen, workers, d):
    """Pareto k-hat of the importance ratios p / q over n draws from q (Yao et al. 2018), drawn and
    evaluated in chunks of at most _PSIS_CHUNK elements (O(d) memory)."""
    if n < 20:
        return float("nan")
    per_call = max(1, _PSIS_CHUNK // max(d, 1))
    log_w = []
    for start in range(0, n, per_call):
        z = q.sample(min(per_call, n - start), rng=gen, workers=workers)
        z.flags.writeable = False
        out = log_joint(z)
        log_p = np.asarray(as_float_array(out[0] if isinstance(out, tuple) else out, "log_joint values"),
                           dtype=np.float64)
        if log_p.shape != (z.shape[0],):
            raise ValueError(f"log_joint values must have shape ({z.shape[0]},) for z of shape {z.shape}, "
                             f"got {log_p.shape}")
        log_w.append(log_p - q.log_prob(z, workers=workers).astype(np.float64))
    log_w = np.concatenate(log_w)
    if not np.isfinite(log_w).all():
        return float("inf")
    return float(_diag.psis(log_w).khat)
