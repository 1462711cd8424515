"""The optimiser every fit in vigrad uses: functional, optax-style, on the core's fused kernels.

An optimiser is a small immutable object with ``init`` and ``update``; its state is a
NamedTuple of plain ndarrays, so ``np.savez`` of the parameters and the state (see
:func:`state_to_dict` / :func:`state_from_dict`) resumes a run bit for bit::

    opt = optim.adam(1e-2)
    state = opt.init(params)
    for _ in range(num_steps):
        params, state = opt.update(grads_of(params), state, params)

``params`` (and ``grads``) are a tuple of float32/float64 arrays, or a single array,
which is treated as a 1-tuple and returned as a single array.  Gradients are those of
the quantity being *minimised*.  ``update`` returns new arrays and never writes to the
caller's ``params``, ``grads`` or ``state``; every check runs before any arithmetic.
``update(grads, state, params, inplace=True)`` instead writes the new values into ``params``
and the state's moment arrays (C-contiguous and writeable) and returns them with a new step.

This module is the only place an update rule is written.  Each rule is one fused pass of the
C++ core over each parameter array (``vigrad/optim.hpp``: the moments, the step and the
decoupled weight decay per element, in blocks whose results do not depend on the thread
count); out of place and in place run the same arithmetic, and Adam's is the one fused into
the Bayes-by-Backprop backward pass, so ``vg.optim.adam``, ``BayesianMLP.fit`` and
``vg.fit`` take the same steps to the bit.  ``workers`` (keyword of ``update``) follows
``scipy.fft``.

State layout (the step is a 0-d int64 array, the moments are tuples with one array per
parameter, each of that parameter's shape and dtype):

=============  ==============================================================
``adam``       ``AdamState(step, m, v)``
``sgd``        ``SGDState(step, momentum_buf)`` (``momentum_buf == ()`` when momentum is 0)
``rmsprop``    ``RMSpropState(step, square_avg, momentum_buf)`` (``()`` likewise)
=============  ==============================================================

``step`` counts the updates already applied; the update number ``t`` (from 0) uses the
learning rate ``lr(t)`` of a schedule.  Weight decay is *decoupled* in all three
optimisers, as in AdamW (Loshchilov & Hutter 2019): before the step,
``p <- p * (1 - lr * weight_decay)``; it is not added to the gradient and is not clipped.
Clipping (``clip_value`` then ``clip_norm``) is applied to the gradients before the
moments are updated.

Also here: learning-rate schedules (:func:`constant`, :func:`step_decay`,
:func:`exponential`, :func:`robbins_monro`), :class:`EarlyStopping`, and Stan ADVI's
step-size search :func:`search_step_size`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from . import _core
from ._validation import as_float_array, check_num_samples, check_real, resolve_workers

__all__ = [
    "Optimizer",
    "AdamState",
    "SGDState",
    "RMSpropState",
    "adam",
    "sgd",
    "rmsprop",
    "constant",
    "step_decay",
    "exponential",
    "robbins_monro",
    "global_norm",
    "clip_by_global_norm",
    "clip_by_value",
    "state_to_dict",
    "state_from_dict",
    "EarlyStopping",
    "EarlyStoppingState",
    "search_step_size",
]


# --------------------------------------------------------------------------- schedules


def _check_step(step) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (numbers.Integral, np.ndarray)):
        raise TypeError(f"step must be a non-negative integer, got {type(step).__name__}")
    if isinstance(step, np.ndarray):
        if step.ndim != 0 or step.dtype.kind not in "iu":
            raise TypeError(f"step must be a non-negative integer, got array of shape {step.shape} dtype {step.dtype}")
    s = int(step)
    if s < 0:
        raise ValueError(f"step must be >= 0, got {s}")
    return s


class _Schedule:
    """Base of the schedules: callable ``step -> float`` with a readable repr."""

    __slots__ = ()

    def _params(self):  # pragma: no cover - overridden
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self):
        return hash((type(self).__name__, tuple(self._params().items())))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **kw):
        for k, v in kw.items():
            object.__setattr__(self, k, v)


class Constant(_Schedule):
    __slots__ = ("lr",)

    def __init__(self, lr):
        self._set(lr=check_real(lr, "lr", positive=True))

    def _params(self):
        return {"lr": self.lr}

    def __call__(self, step) -> float:
        _check_step(step)
        return self.lr


class StepDecay(_Schedule):
    __slots__ = ("lr", "factor", "every")

    def __init__(self, lr, factor, every):
        lr = check_real(lr, "lr", positive=True)
        factor = check_real(factor, "factor", positive=True)
        every = check_num_samples(every, "every", minimum=1)
        self._set(lr=lr, factor=factor, every=every)

    def _params(self):
        return {"lr": self.lr, "factor": self.factor, "every": self.every}

    def __call__(self, step) -> float:
        return self.lr * self.factor ** (_check_step(step) // self.every)


class Exponential(_Schedule):
    __slots__ = ("lr", "rate")

    def __init__(self, lr, rate):
        self._set(lr=check_real(lr, "lr", positive=True), rate=check_real(rate, "rate", positive=True))

    def _params(self):
        return {"lr": self.lr, "rate": self.rate}

    def __call__(self, step) -> float:
        return self.lr * self.rate ** _check_step(step)


class RobbinsMonro(_Schedule):
    __slots__ = ("a", "b", "kappa")

    def __init__(self, a, b=1.0, kappa=0.75):
        a = check_real(a, "a", positive=True)
        b = check_real(b, "b", positive=True)
        kappa = check_real(kappa, "kappa")
        if not 0.5 < kappa <= 1.0:
            raise ValueError(f"kappa must be in (0.5, 1] (Robbins-Monro conditions), got {kappa}")
        self._set(a=a, b=b, kappa=kappa)

    def _params(self):
        return {"a": self.a, "b": self.b, "kappa": self.kappa}

    def __call__(self, step) -> float:
        return self.a / (self.b + _check_step(step)) ** self.kappa


def constant(lr) -> Constant:
    """The schedule ``step -> lr``.

    Examples
    --------
    >>> from vigrad import optim
    >>> s = optim.constant(0.1)
    >>> s, s(0), s(1000)
    (Constant(lr=0.1), 0.1, 0.1)
    """
    return Constant(lr)


def step_decay(lr, factor, every) -> StepDecay:
    """The schedule ``step -> lr * factor ** (step // every)`` (piecewise constant).

    ``lr > 0``, ``factor > 0`` (usually < 1) and ``every >= 1`` an integer.

    Examples
    --------
    >>> from vigrad import optim
    >>> s = optim.step_decay(1.0, 0.5, every=10)
    >>> s, [s(t) for t in (0, 9, 10, 25)]
    (StepDecay(lr=1.0, factor=0.5, every=10), [1.0, 1.0, 0.5, 0.25])
    """
    return StepDecay(lr, factor, every)


def exponential(lr, rate) -> Exponential:
    """The schedule ``step -> lr * rate ** step`` (``lr > 0``, ``rate > 0``).

    Examples
    --------
    >>> from vigrad import optim
    >>> s = optim.exponential(1.0, 0.5)
    >>> s, [s(t) for t in range(4)]
    (Exponential(lr=1.0, rate=0.5), [1.0, 0.5, 0.25, 0.125])
    """
    return Exponential(lr, rate)


def robbins_monro(a, b=1.0, kappa=0.75) -> RobbinsMonro:
    """The schedule ``t -> a / (b + t) ** kappa`` (Robbins & Monro 1951; Hoffman et al. 2013).

    For ``kappa`` in (0.5, 1] the steps satisfy sum(lr) = inf and sum(lr^2) < inf, the
    conditions under which stochastic approximation converges; ``a > 0`` and ``b > 0``.

    Examples
    --------
    >>> from vigrad import optim
    >>> s = optim.robbins_monro(1.0, b=1.0, kappa=1.0)
    >>> s, [s(t) for t in range(4)]
    (RobbinsMonro(a=1.0, b=1.0, kappa=1.0), [1.0, 0.5, 0.3333333333333333, 0.25])
    """
    return RobbinsMonro(a, b, kappa)


def _as_schedule(lr) -> Callable[[int], float]:
    if callable(lr):
        return lr
    return Constant(lr)


def _lr_at(schedule, step: int) -> float:
    value = schedule(step)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)):
        raise TypeError(f"lr schedule must return a real number, got {type(value).__name__} at step {step}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"lr schedule must return a finite value >= 0, got {value} at step {step}")
    return value


# --------------------------------------------------------------------------- pytrees


def _as_tuple(x, name: str):
    """(tuple of float arrays, was_single)."""
    single = not isinstance(x, (tuple, list))
    items = (x,) if single else tuple(x)
    if not items:
        raise ValueError(f"{name} must hold at least one array, got an empty {type(x).__name__}")
    arrs = tuple(as_float_array(a, name if single else f"{name}[{i}]") for i, a in enumerate(items))
    return arrs, single


def _check_finite_grads(grads) -> None:
    for i, g in enumerate(grads):
        ok = np.isfinite(g)
        if not ok.all():
            bad = np.argwhere(~ok)
            where = tuple(int(j) for j in bad[0])
            raise ValueError(
                f"grads contain non-finite values (array {i}, index {where}: {float(g[where])}; "
                f"{len(bad)} non-finite in that array)"
            )


def _norm_sq(grads, alloc=None) -> float:
    """sum_i ||g_i||^2 in float64; ``alloc(shape, dtype)`` makes the arrays of the squares
    (default: fresh ones; vg.vi's step recycles them)."""
    with np.errstate(over="ignore"):
        return float(sum(np.sum(np.square(g, dtype=np.float64,
                                          out=None if alloc is None else alloc(np.shape(g), np.float64)))
                         for g in grads))


def _global_norm(grads, alloc=None) -> float:
    total = _norm_sq(grads, alloc)
    if math.isinf(total):  # finite entries whose squares overflow: rescale first
        big = max(float(np.max(np.abs(g), initial=0.0)) for g in grads)
        total = _norm_sq(tuple(g.astype(np.float64) / big for g in grads))
        return big * math.sqrt(total)
    return math.sqrt(total)


def global_norm(grads) -> float:
    """The L2 norm of all entries of all arrays, ``sqrt(sum_i ||g_i||^2)``, in float64.

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad import optim
    >>> optim.global_norm((np.array([3.0]), np.array([[4.0, 0.0]])))
    5.0
    """
    arrs, _ = _as_tuple(grads, "grads")
    return _global_norm(arrs)


def _clip_value(grads, limit):
    return tuple(np.clip(g, -limit, limit) for g in grads)


def _clip_norm(grads, max_norm):
    norm = _global_norm(grads)
    if not norm > max_norm:
        return tuple(g.copy() for g in grads)
    factor = max_norm / norm
    return tuple(g * g.dtype.type(factor) for g in grads)


def clip_by_value(grads, limit):
    """Clip every entry of every gradient array to ``[-limit, limit]`` (``limit > 0``).

    Returns new arrays, in the same form as ``grads`` (a single array or a tuple).

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad import optim
    >>> optim.clip_by_value(np.array([-3.0, 0.5, 2.0]), 1.0)
    array([-1. ,  0.5,  1. ])
    """
    limit = check_real(limit, "limit", positive=True)
    arrs, single = _as_tuple(grads, "grads")
    out = _clip_value(arrs, limit)
    return out[0] if single else out


def clip_by_global_norm(grads, max_norm):
    """Rescale all gradient arrays together so their global L2 norm is at most ``max_norm``.

    When ``global_norm(grads) > max_norm`` every array is multiplied by
    ``max_norm / global_norm(grads)`` (directions are kept); otherwise the values are
    returned unchanged (as new arrays, in the same form as ``grads``).

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad import optim
    >>> optim.clip_by_global_norm((np.array([3.0]), np.array([4.0, 0.0])), 1.0)
    (array([0.6]), array([0.8, 0. ]))
    """
    max_norm = check_real(max_norm, "max_norm", positive=True)
    arrs, single = _as_tuple(grads, "grads")
    out = _clip_norm(arrs, max_norm)
    return out[0] if single else out


# --------------------------------------------------------------------------- optimisers


class AdamState(NamedTuple):
    """State of :func:`adam`: the update count and the first and second moments."""

    step: np.ndarray
    """0-d int64: updates applied so far."""
    m: tuple
    """First moments, one array per parameter."""
    v: tuple
    """Second (raw) moments, one array per parameter."""


class SGDState(NamedTuple):
    """State of :func:`sgd`: the update count and the momentum buffers (``()`` without momentum)."""

    step: np.ndarray
    momentum_buf: tuple


class RMSpropState(NamedTuple):
    """State of :func:`rmsprop`: update count, running mean of g², momentum buffers (``()`` without)."""

    step: np.ndarray
    square_avg: tuple
    momentum_buf: tuple


_STATE_TYPES = {"adam": AdamState, "sgd": SGDState, "rmsprop": RMSpropState}


class Optimizer(NamedTuple):
    """An optimiser: ``state = init(params)``; ``params, state = update(grads, state, params)``."""

    name: str
    """"adam", "sgd" or "rmsprop"."""
    init: Callable
    """``init(params) -> state``: zero moments of the params' shapes and dtypes, step 0."""
    update: Callable
    """``update(grads, state, params, *, inplace=False, workers=None) -> (new_params, new_state)``;
    with ``inplace=False`` nothing is written to the arguments."""
    hyperparams: Mapping[str, Any]
    """The arguments the optimiser was built with (read-only)."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"Optimizer(name={self.name!r}, {args})"


def _check_unit_interval(x, name):
    v = check_real(x, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


def _common_args(lr, clip_norm, clip_value, weight_decay):
    if not callable(lr):
        check_real(lr, "lr", positive=True)
    schedule = _as_schedule(lr)
    if clip_norm is not None:
        clip_norm = check_real(clip_norm, "clip_norm", positive=True)
    if clip_value is not None:
        clip_value = check_real(clip_value, "clip_value", positive=True)
    weight_decay = check_real(weight_decay, "weight_decay", nonnegative=True)
    return schedule, clip_norm, clip_value, weight_decay


def _zeros_like(params):
    return tuple(np.zeros_like(p) for p in params)


def _step_array(step: int) -> np.ndarray:
    return np.array(step, dtype=np.int64)


def _check_moments(moments, params, name):
    if not isinstance(moments, tuple) or len(moments) != len(params):
        got = len(moments) if isinstance(moments, tuple) else type(moments).__name__
        raise ValueError(f"state.{name} must be a tuple of {len(params)} arrays (one per parameter), got {got}")
    for i, (m, p) in enumerate(zip(moments, params)):
        if not isinstance(m, np.ndarray) or m.shape != p.shape or m.dtype != p.dtype:
            desc = f"{m.shape} {m.dtype}" if isinstance(m, np.ndarray) else type(m).__name__
            raise ValueError(
                f"state.{name}[{i}] must match params[{i}] ({p.shape} {p.dtype}), got {desc}"
            )


def _flat(a: np.ndarray) -> np.ndarray:
    """A C-contiguous 1-D view of ``a`` (a copy only when ``a`` is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1)


def _check_inplace(arrs, what):
    for i, a in enumerate(arrs):
        if not (a.flags.c_contiguous and a.flags.writeable):
            raise ValueError(f"inplace=True needs C-contiguous writeable arrays, got {what}[{i}] "
                             f"(contiguous {a.flags.c_contiguous}, writeable {a.flags.writeable})")


def _make(name, hyper, schedule, clip_norm, clip_value, weight_decay, moment_fields, kernel):
    """Build an Optimizer around a core kernel.

    ``kernel(p, g, moments, out_p, out_moments, step, lr, decay, workers) -> bool`` runs the rule
    on flat arrays of one dtype (``moments`` / ``out_moments``: dicts field -> flat array), writing
    to the outputs, which may be the inputs themselves; ``step`` counts the updates before this
    one, ``decay = 1 - lr * weight_decay``; it returns whether every gradient was finite.
    ``moment_fields`` lists the state's tuple fields that are in use (others are ``()``).
    ``update`` takes a private keyword for vg.vi's step: ``_alloc(shape, dtype)`` makes the
    out-of-place outputs (default ``np.empty``; vg.vi recycles the arrays of earlier states).
    """
    state_type = _STATE_TYPES[name]
    tuple_fields = state_type._fields[1:]

    def init(params):
        arrs, _ = _as_tuple(params, "params")
        fields = {f: (_zeros_like(arrs) if f in moment_fields else ()) for f in tuple_fields}
        return state_type(step=_step_array(0), **fields)

    def _checked(grads, state, params, inplace, workers):
        """update()'s arguments checked: (params, grads in their dtype, clipped, single, step, lr, workers)."""
        p_arrs, single = _as_tuple(params, "params")
        g_raw, _ = _as_tuple(grads, "grads")
        if len(g_raw) != len(p_arrs):
            raise ValueError(f"grads must hold one array per parameter ({len(p_arrs)}), got {len(g_raw)}")
        for i, (g, p) in enumerate(zip(g_raw, p_arrs)):
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] must have the shape of params[{i}], {p.shape}, got {g.shape}")
        with np.errstate(over="ignore"):  # float64 grads too large for float32 params: caught below
            g_arrs = tuple(g.astype(p.dtype, copy=False) for g, p in zip(g_raw, p_arrs))
        if not isinstance(state, state_type):
            raise TypeError(f"state must be an {state_type.__name__} (from {name}().init), got {type(state).__name__}")
        step = state.step
        if not (isinstance(step, (np.ndarray, np.integer, int)) and np.ndim(step) == 0
                and np.asarray(step).dtype.kind in "iu" and int(step) >= 0):
            raise ValueError(f"state.step must be a 0-d non-negative integer array, got {step!r}")
        step = int(step)
        for f in tuple_fields:
            if f in moment_fields:
                _check_moments(getattr(state, f), p_arrs, f)
            elif not (isinstance(getattr(state, f), tuple) and len(getattr(state, f)) == 0):
                raise ValueError(f"state.{f} must be () for this optimiser's settings, "
                                 f"got {type(getattr(state, f)).__name__} of length {len(getattr(state, f))}")
        if not isinstance(inplace, (bool, np.bool_)):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        nw = resolve_workers(workers)
        lr = _lr_at(schedule, step)
        if inplace:
            _check_inplace(p_arrs, "params")
            for f in moment_fields:
                _check_inplace(getattr(state, f), f"state.{f}")
        if inplace or clip_value is not None or clip_norm is not None:
            # in place nothing may change before the check, and clipping would hide an inf; otherwise
            # the kernel reports a non-finite gradient and its fresh outputs are dropped
            _check_finite_grads(g_arrs)

        if clip_value is not None:
            g_arrs = _clip_value(g_arrs, clip_value)
        if clip_norm is not None:
            g_arrs = _clip_norm(g_arrs, clip_norm)
        return p_arrs, g_arrs, single, step, lr, nw

    def update(grads, state, params, *, inplace=False, workers=None, _alloc=None, _trusted=False):
        if _trusted and clip_value is None and clip_norm is None:
            # vg.vi's step, out of place, on a state this optimiser made from these very params (vg.vi
            # checks that by identity) and the family's gradients of their shapes: the checks are
            # skipped (they were most of a step's Python at small d), the arithmetic is the same
            p_arrs, single, step, nw = tuple(params), False, int(state.step), workers
            g_arrs = tuple(g.astype(p.dtype, copy=False) for g, p in zip(grads, p_arrs))
            lr = _lr_at(schedule, step)
        else:
            p_arrs, g_arrs, single, step, lr, nw = _checked(grads, state, params, inplace, workers)
        decay = 1.0 - lr * weight_decay if weight_decay else 1.0
        new_params, new_moments = [], {f: [] for f in moment_fields}
        outputs = []
        for i, (g, p) in enumerate(zip(g_arrs, p_arrs)):
            moments = {f: getattr(state, f)[i] for f in moment_fields}
            if inplace:
                out_p, out_m = p, moments
            else:
                alloc = np.empty if _alloc is None else _alloc
                out_p = alloc(p.shape, p.dtype)
                out_m = {f: alloc(p.shape, p.dtype) for f in moment_fields}
            outputs.append((p, g, moments, out_p, out_m))
            new_params.append(out_p)
            for f in moment_fields:
                new_moments[f].append(out_m[f])
        finite = True
        for p, g, moments, out_p, out_m in outputs:
            ok = kernel(_flat(p), _flat(g), {f: _flat(a) for f, a in moments.items()}, out_p.reshape(-1),
                        {f: a.reshape(-1) for f, a in out_m.items()}, step, lr, decay, nw)
            finite = finite and ok
        if not finite:  # out of place: the outputs are dropped, the caller's arrays were only read
            _check_finite_grads(g_arrs)
        fields = {f: (tuple(new_moments[f]) if f in moment_fields else ()) for f in tuple_fields}
        new_state = state_type(step=_step_array(step + 1), **fields)
        return (new_params[0] if single else tuple(new_params)), new_state

    return Optimizer(name=name, init=init, update=update, hyperparams=MappingProxyType(hyper))


def adam(lr=1e-3, *, b1=0.9, b2=0.999, eps=1e-8, clip_norm=None, clip_value=None, weight_decay=0.0) -> Optimizer:
    """Adam (Kingma & Ba 2015) with bias correction; AdamW with ``weight_decay > 0``.

    With ``t`` the 1-based update number::

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    (the rule of ``torch.optim.Adam`` / ``AdamW``, equal to rounding: the core evaluates the step
    as ``a * m / (sqrt(v) * r + eps)`` with ``a = lr / (1 - b1^t)`` and ``r = 1 / sqrt(1 - b2^t)``,
    one division per element where torch takes two).

    Parameters
    ----------
    lr : float or callable
        Learning rate > 0, or a schedule ``step -> float`` (step from 0).
    b1, b2 : float
        Decay rates of the moments, in [0, 1).
    eps : float
        > 0, added to the denominator.
    clip_norm, clip_value : float or None
        Clip the gradients by their global L2 norm / elementwise before the update.
    weight_decay : float
        >= 0, decoupled (AdamW) weight decay.

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad import optim
    >>> opt = optim.adam(0.1)
    >>> x = np.array([1.0, -2.0])
    >>> state = opt.init(x)
    >>> x, state = opt.update(2 * x, state, x)  # gradient of sum(x^2)
    >>> x, state.step
    (array([ 0.9, -1.9]), array(1))
    """
    schedule, clip_norm, clip_value, weight_decay = _common_args(lr, clip_norm, clip_value, weight_decay)
    b1 = _check_unit_interval(b1, "b1")
    b2 = _check_unit_interval(b2, "b2")
    eps = check_real(eps, "eps", positive=True)

    def kernel(p, g, mom, out_p, out_mom, step, lr_t, decay, workers):
        return _core.optim_adam(p, g, mom["m"], mom["v"], out_p, out_mom["m"], out_mom["v"], step, lr_t,
                                b1, b2, eps, decay, workers)

    hyper = dict(lr=lr, b1=b1, b2=b2, eps=eps, clip_norm=clip_norm, clip_value=clip_value, weight_decay=weight_decay)
    return _make("adam", hyper, schedule, clip_norm, clip_value, weight_decay, ("m", "v"), kernel)


def sgd(lr, *, momentum=0.0, nesterov=False, clip_norm=None, clip_value=None, weight_decay=0.0) -> Optimizer:
    """Stochastic gradient descent, with optional (Nesterov) momentum as in ``torch.optim.SGD``.

    ``buf <- momentum * buf + g``; the step is ``lr * buf``, or ``lr * (g + momentum * buf)``
    with ``nesterov=True``; plain ``lr * g`` when ``momentum == 0``.  The buffer starts at
    zero, so the first step is ``lr * g`` (as PyTorch's, which starts it at ``g``).

    Parameters
    ----------
    lr : float or callable
        Learning rate > 0, or a schedule ``step -> float`` (step from 0).
    momentum : float
        In [0, 1).
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0``).
    clip_norm, clip_value : float or None
        Clip the gradients by their global L2 norm / elementwise before the update.
    weight_decay : float
        >= 0, decoupled: ``p <- p (1 - lr wd)`` before the step (for plain SGD this equals
        PyTorch's coupled L2 decay; with momentum it differs).

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad import optim
    >>> opt = optim.sgd(0.1, momentum=0.5)
    >>> x = np.array([1.0, -2.0])
    >>> state = opt.init(x)
    >>> for _ in range(2):
    ...     x, state = opt.update(2 * x, state, x)  # gradient of sum(x^2)
    >>> x
    array([ 0.54, -1.08])
    """
    schedule, clip_norm, clip_value, weight_decay = _common_args(lr, clip_norm, clip_value, weight_decay)
    momentum = _check_unit_interval(momentum, "momentum")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    nesterov = bool(nesterov)
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum > 0, got momentum=0.0")

    def kernel(p, g, mom, out_p, out_mom, step, lr_t, decay, workers):
        return _core.optim_sgd(p, g, mom.get("momentum_buf"), out_p, out_mom.get("momentum_buf"), lr_t, momentum,
                               nesterov, decay, workers)

    fields = ("momentum_buf",) if momentum > 0 else ()
    hyper = dict(lr=lr, momentum=momentum, nesterov=nesterov, clip_norm=clip_norm, clip_value=clip_value,
                 weight_decay=weight_decay)
    return _make("sgd", hyper, schedule, clip_norm, clip_value, weight_decay, fields, kernel)


def rmsprop(lr=1e-2, *, decay=0.99, eps=1e-8, momentum=0.0, clip_norm=None, clip_value=None,
            weight_decay=0.0) -> Optimizer:
    """RMSprop (Tieleman & Hinton 2012) as in ``torch.optim.RMSprop`` (``alpha`` is ``decay``).

    ``s <- decay s + (1 - decay) g^2``; ``d = g / (sqrt(s) + eps)``; with momentum
    ``buf <- momentum buf + d`` and the step is ``lr * buf``, otherwise ``lr * d``.

    Parameters
    ----------
    lr : float or callable
        Learning rate > 0, or a schedule ``step -> float`` (step from 0).
    decay : float
        In [0, 1), the smoothing constant of the running mean of g^2.
    eps : float
        > 0, added to the denominator.
    momentum : float
        In [0, 1).
    clip_norm, clip_value : float or None
        Clip the gradients by their global L2 norm / elementwise before the update.
    weight_decay : float
        >= 0, decoupled: ``p <- p (1 - lr wd)`` before the step (PyTorch's is coupled).

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad import optim
    >>> opt = optim.rmsprop(0.01, decay=0.0, eps=1e-12)
    >>> x = np.array([1.0, -2.0])
    >>> x, _ = opt.update(2 * x, opt.init(x), x)  # with decay 0 the step is lr * sign(g)
    >>> x
    array([ 0.99, -1.99])
    """
    schedule, clip_norm, clip_value, weight_decay = _common_args(lr, clip_norm, clip_value, weight_decay)
    decay = _check_unit_interval(decay, "decay")
    eps = check_real(eps, "eps", positive=True)
    momentum = _check_unit_interval(momentum, "momentum")

    def kernel(p, g, mom, out_p, out_mom, step, lr_t, wd_decay, workers):
        return _core.optim_rmsprop(p, g, mom["square_avg"], mom.get("momentum_buf"), out_p, out_mom["square_avg"],
                                   out_mom.get("momentum_buf"), lr_t, decay, eps, momentum, wd_decay, workers)

    fields = ("square_avg", "momentum_buf") if momentum > 0 else ("square_avg",)
    hyper = dict(lr=lr, decay=decay, eps=eps, momentum=momentum, clip_norm=clip_norm, clip_value=clip_value,
                 weight_decay=weight_decay)
    return _make("rmsprop", hyper, schedule, clip_norm, clip_value, weight_decay, fields, kernel)


def _resolve(lr, optimizer, default_lr) -> Optimizer:
    """The optimiser of a fit's ``lr`` / ``optimizer`` arguments: ``optimizer`` itself, or Adam with
    step size ``lr`` (``default_lr`` when None); giving both is an error."""
    if optimizer is not None:
        if lr is not None:
            raise ValueError("give lr or optimizer, not both (lr is the step size of the default Adam)")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a vigrad.optim Optimizer (e.g. vg.optim.adam(1e-3)), "
                            f"got {type(optimizer).__name__}")
        return optimizer
    return adam(default_lr if lr is None else lr)


def _plain_adam(opt: Optimizer):
    """(b1, b2, eps) when ``opt`` is Adam without clipping or weight decay (the step the
    Bayes-by-Backprop kernels can fuse into their backward pass), else None."""
    h = opt.hyperparams
    if opt.name != "adam" or h["clip_norm"] is not None or h["clip_value"] is not None or h["weight_decay"]:
        return None
    return h["b1"], h["b2"], h["eps"]


# --------------------------------------------------------------------------- checkpoints


def _check_prefix(prefix):
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return prefix


def state_to_dict(state, *, prefix: str = "") -> dict:
    """A flat ``{name: ndarray}`` view of an optimiser state, e.g. for ``np.savez``.

    Keys: ``prefix + "kind"`` (the optimiser's name as a 0-d str array),
    ``prefix + "step"`` and ``prefix + f"{field}.{i}"`` for each moment array.  Use a
    ``prefix`` to store the state next to the parameters in one file.  The arrays are
    the state's own (no copies); :func:`state_from_dict` copies.

    Examples
    --------
    >>> import io
    >>> import numpy as np
    >>> from vigrad import optim
    >>> opt = optim.adam(0.1)
    >>> x = np.array([1.0, -2.0])
    >>> state = opt.init(x)
    >>> x, state = opt.update(2 * x, state, x)
    >>> sorted(optim.state_to_dict(state, prefix="opt/"))
    ['opt/kind', 'opt/m.0', 'opt/step', 'opt/v.0']
    >>> f = io.BytesIO()
    >>> np.savez(f, x=x, **optim.state_to_dict(state, prefix="opt/"))
    >>> _ = f.seek(0)
    >>> with np.load(f) as d:
    ...     x2, state2 = d["x"], optim.state_from_dict(opt, d, prefix="opt/")
    >>> bool(np.array_equal(opt.update(2 * x2, state2, x2)[0], opt.update(2 * x, state, x)[0]))
    True
    """
    prefix = _check_prefix(prefix)
    kinds = {v: k for k, v in _STATE_TYPES.items()}
    if type(state) not in kinds:
        raise TypeError(f"state must be an AdamState, SGDState or RMSpropState, got {type(state).__name__}")
    out = {prefix + "kind": np.array(kinds[type(state)]), prefix + "step": np.asarray(state.step)}
    for f in state._fields[1:]:
        for i, arr in enumerate(getattr(state, f)):
            out[f"{prefix}{f}.{i}"] = arr
    return out


def state_from_dict(opt: Optimizer, d, *, prefix: str = ""):
    """The state of ``opt`` stored by :func:`state_to_dict` in ``d`` (a dict or an ``np.load`` file).

    The arrays are copied, with their stored dtypes; keys of ``d`` without the prefix's
    structure (e.g. the parameters) are ignored.  ``update`` checks the shapes against
    the parameters.  See :func:`state_to_dict` for an example.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an Optimizer (from optim.adam/sgd/rmsprop), got {type(opt).__name__}")
    prefix = _check_prefix(prefix)
    keys = set(d.keys())
    for k in ("kind", "step"):
        if prefix + k not in keys:
            raise ValueError(f"d has no key {prefix + k!r}: not a state saved with state_to_dict(prefix={prefix!r})")
    kind = str(np.asarray(d[prefix + "kind"]))
    if kind != opt.name:
        raise ValueError(f"d holds a {kind!r} state, but opt is {opt.name!r}")
    step = np.asarray(d[prefix + "step"])
    if step.ndim != 0 or step.dtype.kind not in "iu" or int(step) < 0:
        raise ValueError(f"d[{prefix + 'step'!r}] must be a 0-d non-negative integer, got {step!r}")
    state_type = _STATE_TYPES[opt.name]
    fields = {}
    for f in state_type._fields[1:]:
        arrs = []
        while f"{prefix}{f}.{len(arrs)}" in keys:
            arrs.append(np.array(d[f"{prefix}{f}.{len(arrs)}"], copy=True))
        fields[f] = tuple(arrs)
    return state_type(step=np.array(int(step), dtype=np.int64), **fields)


# --------------------------------------------------------------------------- early stopping


class EarlyStoppingState(NamedTuple):
    """State of :class:`EarlyStopping` (plain scalars: save with ``state._asdict()``)."""

    best: float
    """Best value so far (+inf / -inf before the first update for mode "min" / "max")."""
    best_step: int
    """Step of the best value (-1 before the first update)."""
    bad_steps: int
    """Updates since the last improvement."""
    step: int
    """Updates so far."""


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when a monitored value has not improved for ``patience`` updates.

    A value improves on the best when ``value < best - min_delta`` (``mode="min"``) or
    ``value > best + min_delta`` (``mode="max"``); the first finite value always does.
    ``update`` returns ``should_stop = bad_steps >= patience``.  Functional: the state is
    a NamedTuple of scalars, so it checkpoints with the rest of a run.

    Parameters
    ----------
    patience : int
        >= 1, updates without improvement before stopping.
    min_delta : float
        >= 0, the least change that counts as an improvement.
    mode : {"min", "max"}
        Whether lower or higher values are better.

    Examples
    --------
    >>> from vigrad import optim
    >>> stopper = optim.EarlyStopping(patience=2)
    >>> s = stopper.init()
    >>> for value in [3.0, 2.0, 2.5, 2.1, 1.0]:
    ...     s, stop, improved = stopper.update(s, value)
    ...     print(value, stop, improved)
    ...     if stop:
    ...         break
    3.0 False True
    2.0 False True
    2.5 False False
    2.1 True False
    >>> s
    EarlyStoppingState(best=2.0, best_step=1, bad_steps=2, step=4)
    """

    patience: int = 10
    min_delta: float = 0.0
    mode: str = "min"

    def __post_init__(self):
        object.__setattr__(self, "patience", check_num_samples(self.patience, "patience", minimum=1))
        object.__setattr__(self, "min_delta", check_real(self.min_delta, "min_delta", nonnegative=True))
        if not isinstance(self.mode, str) or self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def init(self) -> EarlyStoppingState:
        """The state before any value: best = +inf ("min") or -inf ("max")."""
        return EarlyStoppingState(best=math.inf if self.mode == "min" else -math.inf, best_step=-1,
                                  bad_steps=0, step=0)

    def update(self, state: EarlyStoppingState, value) -> tuple[EarlyStoppingState, bool, bool]:
        """Record ``value``; returns ``(new_state, should_stop, improved)``.  NaN raises ValueError."""
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)) \
                or np.ndim(value) != 0:
            raise TypeError(f"value must be a real scalar, got {type(value).__name__}")
        value = float(value)
        if math.isnan(value):
            raise ValueError("value must not be NaN (a diverged objective?), got nan")
        if not isinstance(state, tuple) or len(state) != 4:
            raise TypeError(f"state must be an EarlyStoppingState (from init()), got {type(state).__name__}")
        best, best_step, bad_steps, step = float(state[0]), int(state[1]), int(state[2]), int(state[3])
        if self.mode == "min":
            improved = value < best - self.min_delta
        else:
            improved = value > best + self.min_delta
        if improved:
            best, best_step, bad_steps = value, step, 0
        else:
            bad_steps += 1
        new = EarlyStoppingState(best=best, best_step=best_step, bad_steps=bad_steps, step=step + 1)
        return new, bad_steps >= self.patience, bool(improved)


# --------------------------------------------------------------------------- step-size search

_DIVERGENCE_ERRORS = (ArithmeticError, ValueError)


def search_step_size(run: Callable[[float], float], candidates=(100.0, 10.0, 1.0, 0.1, 0.01)):
    """Stan ADVI's adaptive step-size search (Kucukelbir et al. 2017, Stan's ``adapt_engaged``).

    ``run(eta)`` runs a short trial of the optimisation at step size ``eta`` (from the
    same starting point each time) and returns the objective to *minimise*, e.g. the mean
    -ELBO over the trial's last iterations.  A trial that diverges returns NaN or +-inf, or
    raises ``ValueError`` / ``ArithmeticError`` (e.g. the optimisers' non-finite gradient
    error, ``FloatingPointError``); any of these scores +inf.  Other exceptions propagate.

    Stan's rule: the candidates are tried in decreasing order; the search stops early as
    soon as a candidate scores worse than the best so far while that best is finite (a
    smaller step will only be slower), and the best candidate is returned (ties go to
    the larger step).  Stan's own sequence is 100, 10, 1, 0.1, 0.01.

    Parameters
    ----------
    run : callable
        ``eta -> float``.
    candidates : sequence of float
        Distinct step sizes > 0 (sorted into decreasing order).

    Returns
    -------
    best_eta : float
    scores : dict
        ``{eta: score}`` for the candidates tried, in the order tried (+inf for divergence).

    Raises
    ------
    ValueError
        When every candidate diverges.

    Examples
    --------
    >>> from vigrad import optim
    >>> def run(eta):  # a trial that diverges for eta >= 10 and is best at eta = 1
    ...     return float("nan") if eta >= 10 else (eta - 1.0) ** 2
    >>> optim.search_step_size(run)
    (1.0, {100.0: inf, 10.0: inf, 1.0: 0.0, 0.1: 0.81})
    """
    if not callable(run):
        raise TypeError(f"run must be callable (eta -> objective), got {type(run).__name__}")
    if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
        raise TypeError(f"candidates must be a sequence of step sizes, got {type(candidates).__name__}")
    etas = [check_real(c, f"candidates[{i}]", positive=True) for i, c in enumerate(candidates)]
    if not etas:
        raise ValueError("candidates must hold at least one step size, got none")
    if len(set(etas)) != len(etas):
        raise ValueError(f"candidates must be distinct, got {etas}")
    etas.sort(reverse=True)

    scores: dict = {}
    best_eta, best = None, math.inf
    for eta in etas:
        try:
            value = run(eta)
        except _DIVERGENCE_ERRORS:
            value = math.inf
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)) \
                or np.ndim(value) != 0:
            raise TypeError(f"run(eta) must return a real scalar, got {type(value).__name__} for eta={eta}")
        value = float(value)
        if not math.isfinite(value):  # nan, +inf and -inf all mean the trial broke down
            value = math.inf
        scores[eta] = value
        if value < best:
            best_eta, best = eta, value
        elif value > best:  # worse than a best that is finite (nothing is worse than +inf)
            break
    if best_eta is None:
        raise ValueError(f"every candidate step size diverged (scores {scores}); try smaller candidates")
    return best_eta, scores
