"""Mean-field Gaussian variational family and priors over weights.

The heavy lifting (sampling, log-densities, entropy, KL) runs in vigrad's C++
core; these classes check arguments, hold parameters and give NumPy arrays back
in the dtype they were given (float32 or float64).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from . import _core
from ._validation import (
    as_float_array,
    check_finite,
    check_num_samples,
    resolve_key,
    resolve_workers,
)

__all__ = ["MeanFieldGaussian", "Normal", "ScaleMixtureNormal", "kl_divergence"]


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _split_samples(w: np.ndarray, event_shape: Tuple[int, ...], name: str = "w"):
    """(w as (S, D), True) for a batch (S, *event), or (w as (1, D), False) for one sample."""
    d = int(np.prod(event_shape, dtype=np.int64))
    if w.shape == tuple(event_shape):
        return np.ascontiguousarray(w).reshape(1, d), False
    if w.ndim == len(event_shape) + 1 and w.shape[1:] == tuple(event_shape):
        return np.ascontiguousarray(w).reshape(w.shape[0], d), True
    raise ValueError(
        f"{name} must have shape {tuple(event_shape)} (one sample) or (S, *{tuple(event_shape)}), got {w.shape}"
    )


class MeanFieldGaussian:
    r"""Mean-field Gaussian :math:`q(w) = \prod_j N(w_j \mid loc_j, scale_j^2)`, scale = softplus(rho).

    Parameters
    ----------
    loc, rho : array_like
        Means and softplus-parameterised scales, of one shape (the event shape).
        float32 and float64 are kept (mixed inputs promote to float64; integers
        become float64).  Both are copied, so later changes to the caller's
        arrays do not reach the distribution.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> q = vg.MeanFieldGaussian(np.zeros(3), np.full(3, -3.0))
    >>> w, eps = q.sample(4, rng=0, return_noise=True)
    >>> w.shape, bool(np.allclose(w, q.loc + q.scale * eps))
    ((4, 3), True)
    >>> float(q.log_prob(q.loc)) > float(q.log_prob(q.loc + 1))
    True
    """

    def __init__(self, loc, rho):
        loc = as_float_array(loc, "loc")
        rho = as_float_array(rho, "rho")
        if loc.shape != rho.shape:
            raise ValueError(f"loc and rho must have the same shape, got {loc.shape} and {rho.shape}")
        dtype = np.result_type(loc.dtype, rho.dtype)
        loc = np.array(loc, dtype=dtype, order="C", copy=True)
        rho = np.array(rho, dtype=dtype, order="C", copy=True)
        check_finite(loc, "loc")
        check_finite(rho, "rho")
        scale = _core.softplus(rho.reshape(-1), resolve_workers(None)).reshape(rho.shape)
        if scale.size and not (scale > 0).all():
            idx = tuple(int(i) for i in np.argwhere(~(scale > 0))[0])
            raise ValueError(
                f"rho gives a scale of 0 in {dtype} (softplus underflows), rho[{idx}] = {float(rho[idx])}; "
                f"use rho > {-87 if dtype == np.float32 else -745}"
            )
        self._loc = _readonly(loc)
        self._rho = _readonly(rho)
        self._scale = _readonly(scale)

    @classmethod
    def from_scale(cls, loc, scale) -> "MeanFieldGaussian":
        """Build from scales instead of rho: rho = softplus^{-1}(scale), scale > 0.

        Examples
        --------
        >>> import numpy as np, vigrad as vg
        >>> q = vg.MeanFieldGaussian.from_scale([0.0, 1.0], [1.0, 0.5])
        >>> bool(np.allclose(q.scale, [1.0, 0.5]))
        True
        """
        scale = as_float_array(scale, "scale")
        check_finite(scale, "scale")
        if scale.size and not (scale > 0).all():
            idx = tuple(int(i) for i in np.argwhere(~(scale > 0))[0])
            raise ValueError(f"scale must be > 0, got scale[{idx}] = {float(scale[idx])}")
        loc_arr = as_float_array(loc, "loc")
        if loc_arr.shape != scale.shape:
            raise ValueError(f"loc and scale must have the same shape, got {loc_arr.shape} and {scale.shape}")
        dtype = np.result_type(loc_arr.dtype, scale.dtype)
        s = np.asarray(scale, dtype=dtype, order="C")
        rho = _core.softplus_inv(s.reshape(-1), resolve_workers(None)).reshape(s.shape)
        return cls(loc_arr.astype(dtype, copy=False), rho)

    # -- parameters -----------------------------------------------------------------
    @property
    def loc(self) -> np.ndarray:
        """Means (read-only view)."""
        return self._loc

    @property
    def rho(self) -> np.ndarray:
        """Unconstrained scale parameters, scale = softplus(rho) (read-only view)."""
        return self._rho

    @property
    def scale(self) -> np.ndarray:
        """Standard deviations softplus(rho) (read-only view)."""
        return self._scale

    @property
    def shape(self) -> Tuple[int, ...]:
        """The event shape."""
        return self._loc.shape

    @property
    def dtype(self) -> np.dtype:
        return self._loc.dtype

    @property
    def size(self) -> int:
        """Number of elements in the event."""
        return self._loc.size

    @property
    def mean(self) -> np.ndarray:
        """The mean, ``loc``."""
        return self._loc

    @property
    def cov(self) -> np.ndarray:
        """Dense (d, d) covariance diag(scale**2) over the flattened event (d = size)."""
        return np.diag(self._scale.reshape(-1) ** 2)

    def __repr__(self) -> str:
        return f"MeanFieldGaussian(shape={self.shape}, dtype={self.dtype})"

    # -- sampling and densities ------------------------------------------------------
    def sample(self, num_samples, *, rng=None, workers=None, return_noise=False):
        """Draw ``w = loc + scale * eps`` with eps ~ N(0, I) from vigrad's counter-based generator.

        Parameters
        ----------
        num_samples : int
            Number of samples S >= 0.
        rng : int, numpy.random.Generator or None, keyword-only
            Seed source (SPEC 7).  The same seed gives the same bits for any ``workers``.
        workers : int or None, keyword-only
            Threads: None or -1 for all CPUs, -k for all but k - 1.
        return_noise : bool, keyword-only
            Also return ``eps``.

        Returns
        -------
        w : ndarray, shape (S, *shape)
        eps : ndarray, shape (S, *shape), only with ``return_noise=True``

        Examples
        --------
        >>> import vigrad as vg
        >>> q = vg.MeanFieldGaussian([0.0, 10.0], [0.0, 0.0])
        >>> w = q.sample(1000, rng=1)
        >>> w.shape, bool(abs(w[:, 0].mean()) < 0.15), bool(abs(w[:, 1].mean() - 10) < 0.15)   # 4.7 SE
        ((1000, 2), True, True)
        """
        S = check_num_samples(num_samples, minimum=0)
        nw = resolve_workers(workers)
        key = resolve_key(rng)
        d = self.size
        w = np.empty((S, d), dtype=self.dtype)
        eps = np.empty((S, d), dtype=self.dtype) if return_noise else None
        _core.sample(key, self._loc.reshape(-1), self._scale.reshape(-1), w, eps, nw)
        w = w.reshape((S,) + self.shape)
        if return_noise:
            return w, eps.reshape((S,) + self.shape)
        return w

    def log_prob(self, w, *, workers=None):
        """log q(w) summed over the event: (S, *shape) -> (S,), or one sample of ``shape`` -> scalar.

        Examples
        --------
        >>> import numpy as np, vigrad as vg
        >>> q = vg.MeanFieldGaussian.from_scale(np.zeros(2), np.ones(2))
        >>> round(float(q.log_prob(np.zeros(2))), 6)   # -log(2 pi)
        -1.837877
        """
        w = as_float_array(w, "w", dtype=self.dtype)
        w2, batched = _split_samples(w, self.shape)
        out = _core.mf_log_prob(self._loc.reshape(-1), self._scale.reshape(-1), w2, resolve_workers(workers))
        return out if batched else out[0]

    def entropy(self):
        """Differential entropy in nats, sum_j (log(2 pi e) / 2 + log scale_j).

        Examples
        --------
        >>> import numpy as np, vigrad as vg
        >>> round(float(vg.MeanFieldGaussian.from_scale([0.0], [1.0]).entropy()), 6)
        1.418939
        """
        return self.dtype.type(_core.mf_entropy(self._scale.reshape(-1), resolve_workers(None)))


    # -- what vigrad.fit needs (a 1-D event) ----------------------------------------------
    def _params(self):
        return (self._loc, self._rho)

    @classmethod
    def _from_params(cls, params, workers=None, scale=None):
        """From an optimiser's arrays, without the checks and copies of __init__ (vg.fit checks the
        finiteness of every step's gradients and loss instead).  ``scale``: softplus(rho), already
        computed and checked (finite loc and rho, scale > 0: ``_core.mf_scale_entropy``)."""
        loc, rho = params
        if scale is not None:
            self = object.__new__(cls)
            self._loc, self._rho, self._scale = _readonly(loc), _readonly(rho), _readonly(scale)
            return self
        if not (np.isfinite(loc).all() and np.isfinite(rho).all()):
            return cls(loc, rho)  # the full check, with its error message
        self = object.__new__(cls)
        self._loc, self._rho = _readonly(loc), _readonly(rho)
        self._scale = _readonly(_core.softplus(rho.reshape(-1), resolve_workers(workers)).reshape(rho.shape))
        if self._scale.size and not (self._scale > 0).all():
            return cls(loc, rho)
        return self

    def _noise_shape(self, S):
        """The shape of the standard-normal noise behind S draws."""
        return (S, self.size)

    def _sample_noise(self, S, key, workers, out=None):
        d = self.size
        w, eps = out if out is not None else (np.empty((S, d), self.dtype), np.empty(self._noise_shape(S), self.dtype))
        _core.sample(key, self._loc.reshape(-1), self._scale.reshape(-1), w, eps, workers)
        return w, eps

    def _pathwise(self, eps, grad_log_p, mode, workers):
        gl, gr, _, _ = _core.pathwise_grad_flat(self._loc.reshape(-1), self._rho.reshape(-1), eps, grad_log_p, mode,
                                                1.0, workers)
        return (gl.reshape(self.shape), gr.reshape(self.shape))

    def _score_terms(self, z, eps):
        """Per-sample d log q(z) / d(loc, rho) for fixed z."""
        sigma = self._scale.astype(np.float64)
        sg = np.exp(-np.logaddexp(0.0, -self._rho.astype(np.float64)))
        e = eps.astype(np.float64)
        return (e / sigma, (e * e - 1.0) * sg / sigma)


class _Prior:
    """Shared machinery: parameters as float64 arrays, broadcast per event shape on demand."""

    _names: Tuple[str, ...] = ()

    def __init__(self, **params):
        self._params = {}
        for name, value in params.items():
            arr = as_float_array(value, name, dtype=np.float64)
            check_finite(arr, name)
            self._params[name] = _readonly(np.array(arr, copy=True))
        self._cache = {}

    def _flat_params(self, dtype, event_shape):
        """The parameters as 1-D arrays of size 1 (all scalar) or D (broadcast to the event)."""
        key = (np.dtype(dtype), tuple(event_shape))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        values = [self._params[n] for n in self._names]
        if all(v.ndim == 0 for v in values):
            flat = tuple(np.full(1, v, dtype=dtype) for v in values)
        else:
            flat = []
            for n, v in zip(self._names, values):
                try:
                    b = np.broadcast_to(v, event_shape)
                except ValueError:
                    raise ValueError(
                        f"{type(self).__name__} parameter {n} of shape {v.shape} does not broadcast to the "
                        f"event shape {tuple(event_shape)}"
                    ) from None
                flat.append(np.ascontiguousarray(b, dtype=dtype).reshape(-1))
            flat = tuple(flat)
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = flat
        return flat

    def _prepare(self, w, name="w"):
        w = as_float_array(w, name)
        if w.ndim <= 1:
            event = w.shape
            w2 = np.ascontiguousarray(w).reshape(1, w.size)
            return w, w2, event, False
        event = w.shape[1:]
        w2 = np.ascontiguousarray(w).reshape(w.shape[0], int(np.prod(event, dtype=np.int64)))  # also for S = 0
        return w, w2, event, True

    def log_prob(self, w, *, workers=None):
        """log p(w): w (S, ...) -> (S,), summing every axis but the first; a 1-D w is one sample -> scalar."""
        w, w2, event, batched = self._prepare(w)
        out = self._log_prob(w2, self._flat_params(w.dtype, event), resolve_workers(workers))
        return out if batched else out[0]

    def grad_log_prob(self, w, *, workers=None):
        """d log p / dw, the same shape as w."""
        w, w2, event, _ = self._prepare(w)
        g = self._grad(w2, self._flat_params(w.dtype, event), resolve_workers(workers))
        return g.reshape(w.shape)


class Normal(_Prior):
    """Normal prior N(loc, scale^2) on every weight; loc and scale are scalars or arrays
    that broadcast to the event shape of the weights.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> p = vg.Normal(0.0, 1.0)
    >>> round(float(p.log_prob(np.zeros(2))), 6)
    -1.837877
    >>> p.grad_log_prob(np.array([[1.0, -2.0]]))
    array([[-1.,  2.]])
    """

    _names = ("loc", "scale")

    def __init__(self, loc=0.0, scale=1.0):
        super().__init__(loc=loc, scale=scale)
        s = self._params["scale"]
        if s.size and not (s > 0).all():
            raise ValueError(f"scale must be > 0, got min {s.min()!r}")

    @property
    def loc(self):
        return self._params["loc"]

    @property
    def scale(self):
        return self._params["scale"]

    def __repr__(self):
        return f"Normal(loc={self.loc.tolist()!r}, scale={self.scale.tolist()!r})"

    def _log_prob(self, w2, params, workers):
        return _core.normal_log_prob(w2, *params, workers)

    def _grad(self, w2, params, workers):
        return _core.normal_grad_log_prob(w2, *params, workers)


class ScaleMixtureNormal(_Prior):
    """Blundell et al.'s scale-mixture prior pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2), per weight.

    Parameters
    ----------
    pi : float or array_like, in (0, 1)
    sigma1, sigma2 : float or array_like, > 0
        Usually sigma1 > sigma2 (a wide and a narrow component), e.g. (0.5, 1, e^-6).

    Evaluated with log-sum-exp, so log p and its gradient stay finite for weights far
    in the tails (|w| = 1e3 with sigma2 = e^-8), where the naive sum of densities underflows.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> p = vg.ScaleMixtureNormal(0.5, 1.0, np.exp(-6))
    >>> bool(np.isfinite(p.log_prob(np.array([1e3]))))
    True
    """

    _names = ("pi", "sigma1", "sigma2")

    def __init__(self, pi, sigma1, sigma2):
        super().__init__(pi=pi, sigma1=sigma1, sigma2=sigma2)
        p = self._params["pi"]
        if p.size and not ((p > 0) & (p < 1)).all():
            raise ValueError(f"pi must lie in (0, 1), got {p.tolist()!r}")
        for n in ("sigma1", "sigma2"):
            s = self._params[n]
            if s.size and not (s > 0).all():
                raise ValueError(f"{n} must be > 0, got {s.tolist()!r}")

    @property
    def pi(self):
        return self._params["pi"]

    @property
    def sigma1(self):
        return self._params["sigma1"]

    @property
    def sigma2(self):
        return self._params["sigma2"]

    def __repr__(self):
        return f"ScaleMixtureNormal(pi={self.pi.tolist()!r}, sigma1={self.sigma1.tolist()!r}, sigma2={self.sigma2.tolist()!r})"

    def _log_prob(self, w2, params, workers):
        return _core.mixture_log_prob(w2, *params, workers)

    def _grad(self, w2, params, workers):
        return _core.mixture_grad_log_prob(w2, *params, workers)


def kl_divergence(q, p, *, workers=None):
    """KL[q || p] in closed form, summed over the event.

    ``q`` is a :class:`MeanFieldGaussian`; ``p`` a :class:`Normal` (scalar or array
    parameters) or another MeanFieldGaussian of the same shape.  The scale-mixture
    prior has no closed form: use ``kl="mc"`` in :func:`vigrad.elbo_grad`.

    Examples
    --------
    >>> import vigrad as vg
    >>> q = vg.MeanFieldGaussian.from_scale([1.0], [1.0])
    >>> float(vg.kl_divergence(q, vg.Normal(0.0, 1.0)))   # (mu^2) / 2
    0.5
    """
    if not isinstance(q, MeanFieldGaussian):
        raise TypeError(f"q must be a MeanFieldGaussian, got {type(q).__name__}")
    if isinstance(p, MeanFieldGaussian):
        if p.shape != q.shape:
            raise ValueError(f"q and p must have the same shape, got {q.shape} and {p.shape}")
        p = Normal(p.loc, p.scale)
    if isinstance(p, ScaleMixtureNormal):
        raise NotImplementedError(
            "KL[MeanFieldGaussian || ScaleMixtureNormal] has no closed form; estimate it by Monte Carlo "
            "(elbo_grad(..., kl='mc'))"
        )
    if not isinstance(p, Normal):
        raise TypeError(f"p must be a Normal or a MeanFieldGaussian, got {type(p).__name__}")
    m, s = p._flat_params(q.dtype, q.shape)
    kl, _, _ = _core.kl_mf_normal(q.loc.reshape(-1), q.rho.reshape(-1), m, s, 1.0, resolve_workers(workers))
    return q.dtype.type(kl)

