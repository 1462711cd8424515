"""Fixed-form Gaussian families beyond mean field (the lecture slides' full-rank
Cholesky and low-rank + diagonal families), on vigrad's C++ core.

Every family has ``sample`` (with the noise on request), ``log_prob``, ``entropy``,
``mean`` and ``cov``.  Their unconstrained parameters are what :func:`vigrad.fit`
optimises; the pathwise gradients of F = E_q[log q] - E_q[log p] run in the core.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._validation import as_float_array, check_finite, check_num_samples, resolve_key, resolve_workers

__all__ = ["FullRankGaussian", "LowRankGaussian"]

_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _softplus_inv(y):
    return y + np.log(-np.expm1(-y))


def _readonly(a):
    a.flags.writeable = False
    return a


def _as_batch(z, d, dtype, name="z"):
    z = as_float_array(z, name, dtype=dtype)
    if z.shape == (d,):
        return np.ascontiguousarray(z).reshape(1, d), False
    if z.ndim == 2 and z.shape[1] == d:
        return np.ascontiguousarray(z), True
    raise ValueError(f"{name} must have shape ({d},) or (S, {d}), got {z.shape}")


class FullRankGaussian:
    r"""Full-rank Gaussian N(loc, L L^T) with L lower triangular.

    Parameters
    ----------
    loc : array_like, shape (d,)
    tril : array_like, shape (d, d)
        Unconstrained parameters: the strict lower triangle is L's, and L's diagonal is
        softplus(diag(tril)) > 0.  The upper triangle is ignored.  Use
        :meth:`from_scale_tril` or :meth:`from_cov` to start from L or a covariance.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> q = vg.FullRankGaussian.from_cov([0.0, 1.0], [[1.0, 0.9], [0.9, 1.0]])
    >>> bool(np.allclose(q.cov, [[1.0, 0.9], [0.9, 1.0]]))
    True
    >>> z = q.sample(20000, rng=0)
    >>> bool(abs(np.corrcoef(z.T)[0, 1] - 0.9) < 0.01)
    True
    """

    def __init__(self, loc, tril):
        loc = as_float_array(loc, "loc")
        tril = as_float_array(tril, "tril")
        if loc.ndim != 1:
            raise ValueError(f"loc must be 1-D (d,), got shape {loc.shape}")
        d = loc.shape[0]
        if tril.shape != (d, d):
            raise ValueError(f"tril must have shape ({d}, {d}) to match loc, got {tril.shape}")
        dtype = np.result_type(loc.dtype, tril.dtype)
        loc = np.array(loc, dtype=dtype, copy=True)
        tril = np.tril(np.array(tril, dtype=dtype, copy=True))
        check_finite(loc, "loc")
        check_finite(tril, "tril")
        L = tril.copy()
        diag = _softplus(np.diag(tril).astype(np.float64)).astype(dtype)
        if d and not (diag > 0).all():
            raise ValueError("tril's diagonal gives a zero scale (softplus underflows); use larger values")
        L[np.diag_indices(d)] = diag
        self._loc, self._tril, self._L = _readonly(loc), _readonly(tril), _readonly(L)

    @classmethod
    def from_scale_tril(cls, loc, scale_tril) -> "FullRankGaussian":
        """From L itself (lower triangular with a positive diagonal)."""
        L = as_float_array(scale_tril, "scale_tril")
        if L.ndim != 2 or L.shape[0] != L.shape[1]:
            raise ValueError(f"scale_tril must be square (d, d), got {L.shape}")
        check_finite(L, "scale_tril")
        diag = np.diag(L)
        if not (diag > 0).all():
            raise ValueError(f"scale_tril must have a positive diagonal, got min {float(diag.min())}")
        raw = np.tril(L).astype(L.dtype, copy=True)
        raw[np.diag_indices(L.shape[0])] = _softplus_inv(diag.astype(np.float64)).astype(L.dtype)
        return cls(loc, raw)

    @classmethod
    def from_cov(cls, loc, cov) -> "FullRankGaussian":
        """From a symmetric positive definite covariance (the Cholesky factor of its symmetric part).

        ``cov`` must be symmetric to rounding: ``|cov[i, j] - cov[j, i]| <= sqrt(eps) *
        sqrt(|cov[i, i] cov[j, j]|)`` with eps the machine epsilon of its dtype (a correlation
        off by 1.5e-8 in float64, 3.5e-4 in float32: far more than the rounding of any product
        that should be symmetric, far less than a matrix given with one triangle missing).
        """
        cov = as_float_array(cov, "cov")
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"cov must be square (d, d), got {cov.shape}")
        check_finite(cov, "cov")
        c = cov.astype(np.float64)
        sd = np.sqrt(np.abs(np.diag(c)))
        excess = np.abs(c - c.T) - np.sqrt(np.finfo(cov.dtype).eps) * np.outer(sd, sd)
        if (excess > 0).any():
            i, j = (int(k) for k in np.unravel_index(np.argmax(excess), excess.shape))
            raise ValueError(f"cov must be symmetric (within sqrt(eps) of the correlation scale for {cov.dtype}), "
                             f"got cov[{i}, {j}] = {float(cov[i, j])!r} and cov[{j}, {i}] = {float(cov[j, i])!r}")
        try:
            L = np.linalg.cholesky(0.5 * (c + c.T)).astype(cov.dtype)
        except np.linalg.LinAlgError:
            raise ValueError("cov must be symmetric positive definite") from None
        return cls.from_scale_tril(loc, L)

    loc = property(lambda self: self._loc, doc="The mean (read-only).")
    tril = property(lambda self: self._tril, doc="Unconstrained lower-triangular parameters (read-only).")
    scale_tril = property(lambda self: self._L, doc="L, with cov = L L^T (read-only).")
    mean = loc
    shape = property(lambda self: self._loc.shape)
    size = property(lambda self: self._loc.size)
    dtype = property(lambda self: self._loc.dtype)

    @property
    def cov(self) -> np.ndarray:
        return self._L @ self._L.T

    def __repr__(self):
        return f"FullRankGaussian(d={self.size}, dtype={self.dtype})"

    def sample(self, num_samples, *, rng=None, workers=None, return_noise=False):
        """z = loc + L eps, eps ~ N(0, I) from the counter-based generator: (S, d)."""
        S = check_num_samples(num_samples, minimum=0)
        d = self.size
        z = np.empty((S, d), self.dtype)
        eps = np.empty((S, d), self.dtype) if return_noise else None
        _core.fullrank_sample(resolve_key(rng), self._loc, self._L, z, eps, resolve_workers(workers))
        return (z, eps) if return_noise else z

    def log_prob(self, z, *, workers=None):
        """log q(z): (S, d) -> (S,), or (d,) -> scalar.  O(d^2) per sample."""
        z2, batched = _as_batch(z, self.size, self.dtype)
        out = _core.fullrank_log_prob(self._loc, self._L, z2, resolve_workers(workers))
        return out if batched else out[0]

    def entropy(self):
        """sum log L_ii + d (1 + log 2 pi) / 2."""
        d = self.size
        return self.dtype.type(np.sum(np.log(np.diag(self._L).astype(np.float64))) + d * (_HALF_LOG_2PI + 0.5))

    # -- what vigrad.fit needs -------------------------------------------------------
    def _params(self):
        return (self._loc, self._tril)

    @classmethod
    def _from_params(cls, params):
        return cls(*params)

    def _noise_shape(self, S):
        """The shape of the standard-normal noise behind S draws."""
        return (S, self.size)

    def _sample_noise(self, S, key, workers, out=None):
        d = self.size
        z, eps = out if out is not None else (np.empty((S, d), self.dtype), np.empty(self._noise_shape(S), self.dtype))
        _core.fullrank_sample(key, self._loc, self._L, z, eps, workers)
        return z, eps

    def _pathwise(self, eps, grad_log_p, mode, workers):
        g_loc, g_L = _core.fullrank_pathwise_grad(self._L, eps, grad_log_p, mode, workers)
        d = self.size
        g_L[np.diag_indices(d)] *= _sigmoid(np.diag(self._tril).astype(np.float64)).astype(self.dtype)
        return (g_loc, g_L)

    def _score_terms(self, z, eps):
        """Per-sample d log q(z) / dtheta for fixed z: (S, d) and (S, d, d)."""
        L = self._L.astype(np.float64)
        v = np.linalg.solve(L.T, eps.astype(np.float64).T).T  # Sigma^-1 (z - loc) = L^-T eps
        h_L = np.tril(v[:, :, None] * eps.astype(np.float64)[:, None, :]) - np.diag(1.0 / np.diag(L))
        h_L[:, np.arange(self.size), np.arange(self.size)] *= _sigmoid(np.diag(self._tril).astype(np.float64))
        return (v, h_L)


class LowRankGaussian:
    r"""Low-rank plus diagonal Gaussian N(loc, diag(D^2) + U U^T), D = softplus(rho), U (d, r).

    Sampling costs O(d r) per sample; log_prob and entropy cost O(d r^2) through the
    Woodbury identity and the matrix determinant lemma: the (d, d) covariance is never formed
    (except by :attr:`cov`, on request).

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> q = vg.LowRankGaussian.from_diag(np.zeros(3), np.ones(3), [[1.0], [1.0], [0.0]])
    >>> q.cov
    array([[2., 1., 0.],
           [1., 2., 0.],
           [0., 0., 1.]])
    >>> bool(np.isclose(q.entropy(), 0.5 * np.log(np.linalg.det(q.cov)) + 1.5 * (1 + np.log(2 * np.pi))))
    True
    """

    def __init__(self, loc, rho, cov_factor):
        loc = as_float_array(loc, "loc")
        rho = as_float_array(rho, "rho")
        U = as_float_array(cov_factor, "cov_factor")
        if loc.ndim != 1:
            raise ValueError(f"loc must be 1-D (d,), got shape {loc.shape}")
        d = loc.shape[0]
        if rho.shape != (d,):
            raise ValueError(f"rho must have shape ({d},) like loc, got {rho.shape}")
        if U.ndim != 2 or U.shape[0] != d:
            raise ValueError(f"cov_factor must have shape ({d}, rank), got {U.shape}")
        if not 1 <= U.shape[1] <= 256:
            raise ValueError(f"cov_factor's rank must be between 1 and 256, got {U.shape[1]}")
        dtype = np.result_type(loc.dtype, rho.dtype, U.dtype)
        loc, rho, U = (np.array(a, dtype=dtype, copy=True) for a in (loc, rho, U))
        for a, n in ((loc, "loc"), (rho, "rho"), (U, "cov_factor")):
            check_finite(a, n)
        diag = _softplus(rho.astype(np.float64)).astype(dtype)
        if d and not (diag > 0).all():
            raise ValueError("rho gives a zero diagonal scale (softplus underflows); use larger values")
        self._loc, self._rho, self._U, self._diag = (_readonly(a) for a in (loc, rho, U, diag))

    @classmethod
    def from_diag(cls, loc, diag, cov_factor) -> "LowRankGaussian":
        """From the diagonal scales D > 0 instead of rho."""
        diag = as_float_array(diag, "diag")
        check_finite(diag, "diag")
        if not (diag > 0).all():
            raise ValueError(f"diag must be > 0, got min {float(diag.min())}")
        return cls(loc, _softplus_inv(diag.astype(np.float64)).astype(diag.dtype), cov_factor)

    loc = property(lambda self: self._loc, doc="The mean (read-only).")
    rho = property(lambda self: self._rho, doc="Unconstrained diagonal parameters, diag = softplus(rho).")
    diag = property(lambda self: self._diag, doc="Diagonal scales D (read-only).")
    cov_factor = property(lambda self: self._U, doc="U (d, r) (read-only).")
    mean = loc
    shape = property(lambda self: self._loc.shape)
    size = property(lambda self: self._loc.size)
    rank = property(lambda self: self._U.shape[1])
    dtype = property(lambda self: self._loc.dtype)

    @property
    def cov(self) -> np.ndarray:
        """The dense (d, d) covariance diag(D^2) + U U^T (O(d^2) memory)."""
        return np.diag(self._diag**2) + self._U @ self._U.T

    def __repr__(self):
        return f"LowRankGaussian(d={self.size}, rank={self.rank}, dtype={self.dtype})"

    def sample(self, num_samples, *, rng=None, workers=None, return_noise=False):
        """z = loc + D eps1 + U eps2: (S, d); the noise is (S, d + r)."""
        S = check_num_samples(num_samples, minimum=0)
        z, eps = self._sample_noise(S, resolve_key(rng), resolve_workers(workers))
        return (z, eps) if return_noise else z

    def log_prob(self, z, *, workers=None):
        """log q(z): (S, d) -> (S,), or (d,) -> scalar."""
        z2, batched = _as_batch(z, self.size, self.dtype)
        out = _core.lowrank_log_prob(self._loc, self._diag, self._U, z2, resolve_workers(workers))
        return out if batched else out[0]

    def entropy(self):
        return self.dtype.type(_core.lowrank_entropy(self._diag, self._U, resolve_workers(None)))

    # -- what vigrad.fit needs -------------------------------------------------------
    def _params(self):
        return (self._loc, self._rho, self._U)

    @classmethod
    def _from_params(cls, params):
        return cls(*params)

    def _noise_shape(self, S):
        """The shape of the standard-normal noise behind S draws: d for the diagonal, r for the factor."""
        return (S, self.size + self.rank)

    def _sample_noise(self, S, key, workers, out=None):
        d = self.size
        z, eps = out if out is not None else (np.empty((S, d), self.dtype), np.empty(self._noise_shape(S), self.dtype))
        _core.lowrank_sample(key, self._loc, self._diag, self._U, z, eps, workers)
        return z, eps

    def _pathwise(self, eps, grad_log_p, mode, workers):
        g_loc, g_diag, g_U = _core.lowrank_pathwise_grad(self._diag, self._U, eps, grad_log_p, mode, workers)
        return (g_loc, g_diag * _sigmoid(self._rho.astype(np.float64)).astype(self.dtype), g_U)

    def _score_terms(self, z, eps):
        U = self._U.astype(np.float64)
        prec = np.linalg.inv(self.cov.astype(np.float64))
        w = (z.astype(np.float64) - self._loc) @ prec  # Sigma^-1 (z - loc)
        PU = prec @ U
        h_U = w[:, :, None] * (w @ U)[:, None, :] - PU
        D = self._diag.astype(np.float64)
        h_rho = (w * w - np.diag(prec)) * D * _sigmoid(self._rho.astype(np.float64))
        return (w, h_rho, h_U)
