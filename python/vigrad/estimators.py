"""Gradient estimators for the variational free energy of Blundell et al. (2015),

    F(theta) = kl_weight * KL[q(w | theta) || p(w)] - E_q[log P(D | w)]  (= -ELBO for kl_weight = 1),

for a mean-field Gaussian q with theta = (loc, rho), scale = softplus(rho).
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from . import _core
from ._validation import (
    as_float_array,
    check_num_samples,
    check_real,
    resolve_key,
    resolve_workers,
)
from .distributions import MeanFieldGaussian, Normal, ScaleMixtureNormal

__all__ = ["ElboGrad", "elbo_grad", "pathwise_grad", "score_grad"]

_ESTIMATORS = ("pathwise", "score", "stl")
_KL_MODES = ("mc", "analytic")


class ElboGrad(NamedTuple):
    """Result of :func:`elbo_grad`."""

    loss: float
    """Estimate of F = kl_weight * KL - E_q[log P(D | w)] for these samples."""
    grad_loc: np.ndarray
    """dF/dloc, the shape of loc."""
    grad_rho: np.ndarray
    """dF/drho, the shape of loc."""
    kl: float
    """The KL part of F (unweighted): Monte Carlo for kl="mc", closed form for kl="analytic"."""
    log_lik: float
    """Mean of log P(D | w) over the samples."""


_workspace = threading.local()


class _NoiseBuffer:
    """A per-thread (S, D) buffer for the noise, kept between calls: the noise never
    leaves elbo_grad, and a fresh 8 MB array costs as much in page faults as the
    sampling itself.  One buffer per thread, so concurrent calls never share it; a
    call made from inside a log_lik callback (re-entrant) gets a fresh array."""

    def __init__(self, S, D, dtype):
        self.shape, self.dtype = (S, D), np.dtype(dtype)

    def __enter__(self):
        buf = getattr(_workspace, "eps", None)
        if getattr(_workspace, "busy", False):
            self.owned = False
            return np.empty(self.shape, dtype=self.dtype)
        if buf is None or buf.shape != self.shape or buf.dtype != self.dtype:
            buf = np.empty(self.shape, dtype=self.dtype)
            _workspace.eps = buf
        _workspace.busy = self.owned = True
        return buf

    def __exit__(self, *exc):
        if self.owned:
            _workspace.busy = False
        return False


def _check_prior(prior):
    if not isinstance(prior, (Normal, ScaleMixtureNormal)):
        raise TypeError(f"prior must be a vigrad Normal or ScaleMixtureNormal, got {type(prior).__name__}")


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _nonfinite_report(arrays, what):
    """Name the first input that holds a non-finite value, or say the result overflowed."""
    for name, arr in arrays:
        ok = np.isfinite(arr)
        if not ok.all():
            idx = tuple(int(i) for i in np.argwhere(~ok)[0])
            return ValueError(f"{name} must be finite, got {float(arr[idx])} at index {idx}")
    return ValueError(f"{what} overflowed to a non-finite value although every input is finite")


def _run_pathwise(loc, rho, eps, glik, prior, mode, kl_weight, workers, event_shape):
    """Core call on flat arrays: loc, rho (D,), eps, glik (S, D); the prior's parameters broadcast
    (NumPy's rule) to the event shape, then flattened like loc."""
    params = prior._flat_params(loc.dtype, event_shape)
    if isinstance(prior, Normal):
        return _core.pathwise_grad_normal(loc, rho, eps, glik, *params, mode, kl_weight, workers)
    return _core.pathwise_grad_mixture(loc, rho, eps, glik, *params, mode, kl_weight, workers)


def pathwise_grad(loc, rho, eps, grad_log_lik, prior, *, kl="mc", kl_weight=1.0, stl=False, workers=None):
    r"""Fused Proposition-1 gradient of F with the noise given.

    With ``w = loc + softplus(rho) * eps`` for each of the S samples, returns
    dF/dloc and dF/drho averaged over the samples, both paths of Proposition 1
    included (through w, and the direct derivative of log q).  One pass over
    ``eps`` and ``grad_log_lik``; nothing is allocated but the two outputs.

    Parameters
    ----------
    loc, rho : ndarray, shape ``shape``
    eps, grad_log_lik : ndarray, shape (S, *shape)
        The standard-normal noise and d log P(D | w) / dw at each sample's w.
    prior : Normal or ScaleMixtureNormal
    kl : {"mc", "analytic"}
        "mc": log q - log p inside the expectation (any prior); "analytic": the
        closed-form KL and its exact gradient (Normal prior only).
    kl_weight : float >= 0
        Multiplies the KL part (minibatch weighting).
    stl : bool
        Sticking the landing: drop the direct score term of log q (kl="mc" only).
    workers : int or None

    Returns
    -------
    grad_loc, grad_rho : ndarray, shape ``shape``, the dtype of loc

    Examples
    --------
    The seed's example: prior N(0, 1), log P(D | w) = -(w - 0.5)^2 / 2.

    >>> import numpy as np, vigrad as vg
    >>> loc, rho = np.array([0.0]), np.array([-3.0])
    >>> eps = np.array([[0.3], [-1.2]])
    >>> w = loc + np.log1p(np.exp(rho)) * eps
    >>> g_loc, g_rho = vg.pathwise_grad(loc, rho, eps, -(w - 0.5), vg.Normal(0.0, 1.0))
    >>> bool(np.allclose(g_loc, np.mean(2 * w - 0.5, axis=0)))
    True
    """
    _check_prior(prior)
    _check_choice(kl, "kl", _KL_MODES)
    kw = check_real(kl_weight, "kl_weight", nonnegative=True)
    if not isinstance(stl, (bool, np.bool_)):
        raise TypeError(f"stl must be a bool, got {type(stl).__name__}")
    loc = as_float_array(loc, "loc")
    dtype = np.result_type(loc.dtype, as_float_array(rho, "rho").dtype)
    loc = np.asarray(loc, dtype=dtype, order="C")  # (not ascontiguousarray: it makes a scalar event 1-D)
    rho = np.asarray(as_float_array(rho, "rho"), dtype=dtype, order="C")
    if rho.shape != loc.shape:
        raise ValueError(f"loc and rho must have the same shape, got {loc.shape} and {rho.shape}")
    eps = np.asarray(as_float_array(eps, "eps"), dtype=dtype, order="C")
    glik = np.asarray(as_float_array(grad_log_lik, "grad_log_lik"), dtype=dtype, order="C")
    shape = loc.shape
    if eps.ndim != loc.ndim + 1 or eps.shape[1:] != shape:
        raise ValueError(f"eps must have shape (S, *{shape}), got {eps.shape}")
    if glik.shape != eps.shape:
        raise ValueError(f"grad_log_lik must have the shape of eps {eps.shape}, got {glik.shape}")
    if eps.shape[0] < 1:
        raise ValueError("eps must hold at least one sample, got S = 0")
    if kl == "analytic":
        if stl:
            raise ValueError("stl=True drops the score term of log q, which exists only with kl='mc'")
        if not isinstance(prior, Normal):
            raise ValueError("kl='analytic' needs a Normal prior (no closed form for the scale mixture); use kl='mc'")
    mode = "analytic" if kl == "analytic" else ("stl" if stl else "mc")
    S, D = eps.shape[0], loc.size
    flat = (loc.reshape(D), rho.reshape(D), eps.reshape(S, D), glik.reshape(S, D))
    gl, gr, _, finite = _run_pathwise(*flat, prior, mode, kw, resolve_workers(workers), shape)
    if not finite:
        raise _nonfinite_report(
            [("loc", loc), ("rho", rho), ("eps", eps), ("grad_log_lik", glik)], "the gradient"
        )
    return gl.reshape(shape), gr.reshape(shape)


def score_grad(loc, rho, eps, f, *, baseline=None, workers=None):
    r"""Score-function (REINFORCE) gradient of E_q[f] with the noise given.

    Returns mean_s (f_s - b_s) d log q(w_s) / d(loc, rho) for w_s = loc + softplus(rho) * eps_s,
    with the baseline b: None (0), a float, or "loo" (the mean of f over the other samples).

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> eps = np.random.default_rng(0).standard_normal((20000, 1))
    >>> g_loc, _ = vg.score_grad(np.zeros(1), np.zeros(1), eps, eps[:, 0] * 2.0, baseline="loo")
    >>> bool(abs(g_loc[0] - 2.0 / np.log(2.0)) < 0.1)   # E[f eps / scale] = 2 / scale, scale = log 2
    True
    """
    loc = as_float_array(loc, "loc")
    dtype = np.result_type(loc.dtype, as_float_array(rho, "rho").dtype)
    loc = np.asarray(loc, dtype=dtype, order="C")  # (not ascontiguousarray: it makes a scalar event 1-D)
    rho = np.asarray(as_float_array(rho, "rho"), dtype=dtype, order="C")
    if rho.shape != loc.shape:
        raise ValueError(f"loc and rho must have the same shape, got {loc.shape} and {rho.shape}")
    eps = np.asarray(as_float_array(eps, "eps"), dtype=dtype, order="C")
    if eps.ndim != loc.ndim + 1 or eps.shape[1:] != loc.shape:
        raise ValueError(f"eps must have shape (S, *{loc.shape}), got {eps.shape}")
    S = eps.shape[0]
    f = np.asarray(as_float_array(f, "f"), dtype=dtype, order="C")
    if f.shape != (S,):
        raise ValueError(f"f must have shape ({S},), got {f.shape}")
    kind, value = _baseline_args(baseline, S)
    D = loc.size
    gl, gr, finite = _core.score_grad(
        loc.reshape(D), rho.reshape(D), eps.reshape(S, D), f, kind, value, resolve_workers(workers)
    )
    if not finite:
        raise _nonfinite_report([("loc", loc), ("rho", rho), ("eps", eps), ("f", f)], "the gradient")
    return gl.reshape(loc.shape), gr.reshape(loc.shape)


def _baseline_args(baseline, S):
    if S < 1:
        raise ValueError("eps must hold at least one sample, got S = 0")
    if baseline is None:
        return "none", 0.0
    if isinstance(baseline, str):
        if baseline != "loo":
            raise ValueError(f"baseline must be None, 'loo' or a float, got {baseline!r}")
        if S < 2:
            raise ValueError(f"baseline='loo' needs num_samples >= 2, got {S}")
        return "loo", 0.0
    return "constant", check_real(baseline, "baseline")


def _call_log_lik(log_lik, w, need_grads, dtype):
    S = w.shape[0]
    out = log_lik(w)
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(f"log_lik must return values or a (values, grads) tuple, got a tuple of {len(out)}")
        values, grads = out
    else:
        if need_grads:
            raise ValueError(
                "log_lik must return (values, grads) for the pathwise and stl estimators, "
                f"got a single {type(out).__name__}"
            )
        values, grads = out, None
    values = np.asarray(as_float_array(values, "log_lik values"), dtype=np.float64)
    if values.shape != (S,):
        raise ValueError(f"log_lik values must have shape ({S},) (one per sample), got {values.shape}")
    if not np.isfinite(values).all():
        s = int(np.argwhere(~np.isfinite(values))[0, 0])
        raise ValueError(f"log_lik returned a non-finite value {float(values[s])} for sample {s}")
    if need_grads:
        grads = as_float_array(grads, "log_lik grads", dtype=dtype)
        if grads.shape != w.shape:
            raise ValueError(f"log_lik grads must have the shape of w {w.shape}, got {grads.shape}")
        grads = np.ascontiguousarray(grads)
    return values, grads


def elbo_grad(q, log_lik, prior, *, num_samples=1, estimator="pathwise", kl="mc", kl_weight=1.0,
              baseline=None, rng=None, workers=None) -> ElboGrad:
    r"""Monte Carlo estimate of F = kl_weight * KL[q || prior] - E_q[log P(D | w)] and its gradient.

    Parameters
    ----------
    q : MeanFieldGaussian
    log_lik : callable
        ``log_lik(w)`` for w of shape (S, *q.shape).  For "pathwise" and "stl" it returns
        ``(values (S,), grads (S, *q.shape))`` with grads = d log P(D | w) / dw; for "score"
        the values alone are enough (a tuple is accepted, the grads unused).
    prior : Normal or ScaleMixtureNormal
    num_samples : int >= 1
    estimator : {"pathwise", "score", "stl"}
        "pathwise": Proposition 1 (reparameterisation); "score": score function / REINFORCE;
        "stl": pathwise without the score term of log q (sticking the landing).
    kl : {"mc", "analytic"}
        "mc": log q - log p inside the expectation; "analytic": closed form (Normal prior).
    kl_weight : float >= 0
        Multiplies the KL part, e.g. 1/M for M minibatches or Blundell's pi_i.
    baseline : None, "loo" or float
        Score estimator only: none, leave-one-out mean over the other samples (needs
        num_samples >= 2), or a constant.
    rng : int, numpy.random.Generator or None, keyword-only
    workers : int or None, keyword-only

    Returns
    -------
    ElboGrad
        ``loss``, ``grad_loc``, ``grad_rho`` (and ``kl``, ``log_lik``).

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> q = vg.MeanFieldGaussian(np.zeros(1), np.full(1, -3.0))
    >>> def log_lik(w):                       # the seed's -(w - 0.5)^2 / 2
    ...     return -0.5 * ((w - 0.5) ** 2).sum(axis=1), -(w - 0.5)
    >>> res = vg.elbo_grad(q, log_lik, vg.Normal(0.0, 1.0), num_samples=8, rng=0)
    >>> res.grad_loc.shape, bool(res.grad_loc[0] < 0)     # loc should move up, towards 0.25
    ((1,), True)
    """
    if not isinstance(q, MeanFieldGaussian):
        raise TypeError(f"q must be a MeanFieldGaussian, got {type(q).__name__}")
    if not callable(log_lik):
        raise TypeError(f"log_lik must be callable, got {type(log_lik).__name__}")
    _check_prior(prior)
    S = check_num_samples(num_samples)
    _check_choice(estimator, "estimator", _ESTIMATORS)
    _check_choice(kl, "kl", _KL_MODES)
    kw = check_real(kl_weight, "kl_weight", nonnegative=True)
    if kl == "analytic" and not isinstance(prior, Normal):
        raise ValueError("kl='analytic' needs a Normal prior (no closed form for the scale mixture); use kl='mc'")
    if estimator == "stl" and kl == "analytic":
        raise ValueError("estimator='stl' drops the score term of log q, which exists only with kl='mc'")
    if estimator != "score" and baseline is not None:
        raise ValueError(f"baseline applies to estimator='score' only, got estimator={estimator!r}")
    if estimator == "score":
        bkind, bvalue = _baseline_args(baseline, S)
    nw = resolve_workers(workers)
    key = resolve_key(rng)

    D = q.size
    loc, rho, scale = q.loc.reshape(D), q.rho.reshape(D), q.scale.reshape(D)
    w = np.empty((S, D), dtype=q.dtype)
    with _NoiseBuffer(S, D, q.dtype) as eps:
        _core.sample(key, loc, scale, w, eps, nw)
        w_user = w.reshape((S,) + q.shape)
        w_user.flags.writeable = False  # the callback must not change the samples it is shown
        values, grads = _call_log_lik(log_lik, w_user, estimator != "score", q.dtype)
        mean_ll = float(values.mean())

        if estimator in ("pathwise", "stl"):
            mode = "analytic" if kl == "analytic" else estimator.replace("pathwise", "mc")
            gl, gr, kl_part, finite = _run_pathwise(loc, rho, eps, grads.reshape(S, D), prior, mode, kw, nw, q.shape)
            if not finite:
                raise _nonfinite_report([("log_lik grads", grads)], "the gradient")
            return ElboGrad(kw * kl_part - mean_ll, gl.reshape(q.shape), gr.reshape(q.shape), kl_part, mean_ll)

        # score function: f_s is the per-sample cost
        if kl == "mc":
            params = prior._flat_params(q.dtype, q.shape)
            log_q = _core.mf_log_prob(loc, scale, w, nw).astype(np.float64)
            log_p = prior._log_prob(w, params, nw).astype(np.float64)
            kl_s = log_q - log_p
            f = kw * kl_s - values
            kl_part = float(kl_s.mean())
            g_kl_loc = g_kl_rho = None
        else:
            m, s = prior._flat_params(q.dtype, q.shape)
            kl_part, g_kl_loc, g_kl_rho = _core.kl_mf_normal(loc, rho, m, s, kw, nw)
            f = -values
        gl, gr, finite = _core.score_grad(loc, rho, eps, f.astype(q.dtype), bkind, bvalue, nw)
        if not finite:
            raise _nonfinite_report([("log_lik values", values)], "the gradient")
        if g_kl_loc is not None:
            gl = gl + g_kl_loc
            gr = gr + g_kl_rho
        return ElboGrad(kw * kl_part - mean_ll, gl.reshape(q.shape), gr.reshape(q.shape), kl_part, mean_ll)
