"""Bayes by Backprop networks (Blundell et al. 2015) on vigrad's C++ core.

A :class:`BayesianLinear` layer holds a mean-field Gaussian over its weights and biases
(one flat vector, weights first).  The matrix products go to NumPy's BLAS; sampling, the
softplus, prior and KL terms and the assembly of the gradient run fused in the core, and
the weight noise is regenerated from the counter-based generator in the backward pass
rather than stored.  Three estimators:

- ``"reparam"``: one weight sample per minibatch (and per Monte Carlo sample), as Blundell et al.
- ``"local"``: the local reparameterisation trick (Kingma et al. 2015): pre-activations are
  sampled from N(x mu^T + mu_b, x^2 sigma^2^T + sigma_b^2), independently per example.
- ``"flipout"`` (Wen et al. 2018): one perturbation shared by the minibatch, decorrelated per
  example by random sign flips of inputs and outputs.

:class:`BayesianMLP` stacks them with ReLU, a Gaussian (learned or fixed noise) or
categorical likelihood, and trains by minibatch Adam on F_i = kl_weight_i KL - log P(D_i | w).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import _blas, _core
from . import data as _data
from . import optim as _optim
from ._validation import as_float_array, check_finite, check_num_samples, check_real, resolve_rng, resolve_workers
from .distributions import Normal, ScaleMixtureNormal

__all__ = ["BayesianLinear", "BayesianMLP", "LayerGrads", "TrainingError"]

_ESTIMATORS = ("reparam", "local", "flipout")
_FORMAT = "vigrad.BayesianMLP"
_FORMAT_VERSION = 1


def layer_workers(workers):
    """Threads for a layer's fused elementwise passes and matrix products.  None means every core
    when vigrad runs the matrix products on its own threads (:mod:`vigrad._blas`: NumPy's OpenBLAS
    found), else one: NumPy's matmul then runs on OpenBLAS's pool, whose threads keep spinning
    after each product, and an OpenMP team on the same cores waits for a core at every barrier
    (2 cores, 784-400-400-10, batch 128: 5.4 ms per step with one thread, 34 ms with two)."""
    if workers is None:
        return resolve_workers(None) if _blas.available() else 1
    return resolve_workers(workers)


def default_prior():
    """Blundell et al.'s scale mixture 0.5 N(0, 1) + 0.5 N(0, e^-12) (sigma2 = e^-6)."""
    return ScaleMixtureNormal(0.5, 1.0, math.exp(-6))


class LayerGrads(NamedTuple):
    """What :meth:`BayesianLinear.backward` returns."""

    grad_x: np.ndarray
    grad_loc: np.ndarray
    grad_rho: np.ndarray
    kl: float


class TrainingError(ValueError):
    """Training stopped on a non-finite loss or gradient; the message names the layer and the step.

    A non-finite loss stops the step before any update.  A non-finite gradient is found while
    the layers take their fused Adam steps (one sample, no clipping): the layers above the named
    one have then taken theirs, and in the named layer every block of 1024 parameters whose
    gradient is finite has too; no non-finite value is ever written into the parameters."""


def _derive_keys(base: int, step: int, sample: int, n: int) -> List[int]:
    """n 64-bit keys for (step, sample), a pure function of (base, step, sample): training
    resumed at any step draws exactly the noise of an uninterrupted run."""
    ctr = np.zeros((n, 4), dtype=np.uint32)
    ctr[:, 0] = np.arange(n, dtype=np.uint32)
    ctr[:, 1] = sample & 0xFFFFFFFF
    ctr[:, 2] = step & 0xFFFFFFFF
    ctr[:, 3] = (step >> 32) & 0xFFFFFFFF
    out = _core.philox4x32_10(ctr, base).astype(np.uint64)
    return [int(x) for x in (out[:, 0] | (out[:, 1] << np.uint64(32)))]


def _prior_kernel(prior, dtype, D):
    if isinstance(prior, Normal):
        return _core.bbb_grad_normal, prior._flat_params(dtype, (D,))
    if isinstance(prior, ScaleMixtureNormal):
        return _core.bbb_grad_mixture, prior._flat_params(dtype, (D,))
    raise TypeError(f"prior must be a vigrad Normal or ScaleMixtureNormal, got {type(prior).__name__}")


class BayesianLinear:
    """A fully connected layer with a mean-field Gaussian over its weights and biases.

    Parameters
    ----------
    in_features, out_features : int
    prior : Normal or ScaleMixtureNormal, keyword-only
        Default: Blundell et al.'s scale mixture (0.5, 1, e^-6).
    estimator : {"reparam", "local", "flipout"}, keyword-only
    dtype : float32 or float64
    init_rho : float
        Initial rho of every parameter (scale softplus(init_rho)); the means start as PyTorch's
        nn.Linear (uniform in +-1/sqrt(in_features)).
    rng : int, Generator or None
        Seeds the initial means and the layer's noise key.
    params : (loc, rho) views, optional
        Flat arrays of size in*out + out to use as parameter storage (BayesianMLP shares one buffer).
    workers : int or None
        Threads for the fused elementwise passes and the matrix products; None means every core
        when vigrad can run the products on its own threads, else 1 (see :func:`layer_workers`).

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> layer = vg.BayesianLinear(3, 2, rng=0)
    >>> x = np.ones((4, 3), np.float32)
    >>> y = layer.forward(x, key=1)
    >>> g = layer.backward(np.ones_like(y), kl_weight=0.1)
    >>> y.shape, g.grad_x.shape, g.grad_loc.shape
    ((4, 2), (4, 3), (8,))
    """

    def __init__(self, in_features, out_features, *, prior=None, estimator="reparam", dtype=np.float32,
                 init_rho=-7.0, rng=None, params=None, workers=None):
        self.in_features = check_num_samples(in_features, "in_features")
        self.out_features = check_num_samples(out_features, "out_features")
        if not isinstance(estimator, str) or estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(map(repr, _ESTIMATORS))}, got {estimator!r}")
        self.estimator = estimator
        self.prior = default_prior() if prior is None else prior
        if not isinstance(self.prior, (Normal, ScaleMixtureNormal)):
            raise TypeError(f"prior must be a vigrad Normal or ScaleMixtureNormal, got {type(self.prior).__name__}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.workers = layer_workers(workers)
        n = self.num_params
        if params is None:
            loc, rho = np.empty(n, self.dtype), np.empty(n, self.dtype)
        else:
            loc, rho = params
            if loc.shape != (n,) or rho.shape != (n,) or loc.dtype != self.dtype or rho.dtype != self.dtype:
                raise ValueError(f"params must be two ({n},) {self.dtype} arrays")
        gen = resolve_rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        loc[...] = gen.uniform(-bound, bound, n)
        rho[...] = check_real(init_rho, "init_rho")
        self.loc, self.rho = loc, rho
        self.key = int(gen.integers(0, 2**64, dtype=np.uint64))
        self._sign_rng = np.random.default_rng(gen.integers(0, 2**63))
        self._cache = None
        self._buffers = {}
        self._kernel, self._prior_params = _prior_kernel(self.prior, self.dtype, n)

    @property
    def num_params(self) -> int:
        return self.in_features * self.out_features + self.out_features

    def _split(self, flat):
        k = self.in_features * self.out_features
        return flat[:k].reshape(self.out_features, self.in_features), flat[k:]

    @property
    def weight_loc(self):
        return self._split(self.loc)[0]

    @property
    def bias_loc(self):
        return self._split(self.loc)[1]

    @property
    def weight_scale(self):
        return self._split(_core.softplus(self.rho, self.workers))[0]

    def __repr__(self):
        return (f"BayesianLinear({self.in_features}, {self.out_features}, estimator={self.estimator!r}, "
                f"prior={self.prior!r}, dtype={self.dtype})")

    # -- forward / backward -------------------------------------------------------------------
    def _buffer(self, name, shape):
        """A persistent work array: a fresh megabyte-sized temporary per call is page-faulted in
        every time (measured: ~0.1 ms per MB), and a training step needs several."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self._buffers[name] = np.empty(shape, self.dtype)
        return buf

    def _mm(self, a, b, **kw):
        return _blas.matmul(a, b, workers=self.workers, **kw)

    def forward(self, x, *, key=None, sample=True):
        """Outputs (B, out) for inputs (B, in).  ``key`` fixes the noise (an int); None draws one.
        With sample=False the mean weights are used (no noise, nothing cached for backward)."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {x.shape}")
        M, mb = self._split(self.loc)
        if not sample:
            self._cache = None
            out = self._mm(x, M, trans_b=True)
            out += mb
            return out
        key = int(self._sign_rng.integers(0, 2**63)) if key is None else int(key)
        n = self.num_params
        if self.estimator == "reparam":
            w = self._buffer("w", (n,))
            _core.bbb_noise("weights", key, self.loc, self.rho, w, self.workers)
            W, b = self._split(w)
            self._cache = (key, x, W)
            out = self._mm(x, W, trans_b=True)
            out += b
            return out
        if self.estimator == "flipout":
            dw = self._buffer("w", (n,))
            _core.bbb_noise("perturbation", key, self.loc, self.rho, dw, self.workers)
            dW, db = self._split(dw)
            signs = np.random.default_rng(key).integers(0, 2, size=(x.shape[0], self.in_features + self.out_features),
                                                        dtype=np.int8)
            signs = (2 * signs - 1).astype(self.dtype)
            S, R = signs[:, :self.in_features], signs[:, self.in_features:]
            xs = x * S
            self._cache = (key, x, xs, S, R, dW, M)
            pert = self._mm(xs, dW, trans_b=True)
            pert += db
            pert *= R
            out = self._mm(x, M, trans_b=True)
            out += mb
            out += pert
            return out
        # local reparameterisation
        var = _core.softplus(self.rho, self.workers)
        var *= var
        V, vb = self._split(var)
        x2 = x * x
        delta = self._mm(x2, V, trans_b=True)
        delta += vb
        std = np.sqrt(delta)
        zeta = np.empty((1, x.shape[0] * self.out_features), self.dtype)
        _core.standard_normal(key ^ 0x5DEECE66D, zeta, self.workers)
        zeta = zeta.reshape(x.shape[0], self.out_features)
        self._cache = (key, x, x2, V, std, zeta, M)
        out = self._mm(x, M, trans_b=True)
        out += mb
        out += std * zeta
        return out

    def _param_grad(self, G, x, name):
        """[G^T x (flattened), column sums of G]: the gradient of sum(G * (x W^T + b)) in (W, b),
        written into a persistent buffer."""
        k = self.in_features * self.out_features
        out = self._buffer(name, (self.num_params,))
        self._mm(G, x, trans_a=True, out=out[:k].reshape(self.out_features, self.in_features))
        np.sum(G, axis=0, out=out[k:])
        return out

    def backward(self, grad_out, *, kl_weight=1.0, kl="mc") -> LayerGrads:
        """Gradient of F = NLL + kl_weight KL[q || prior] given dNLL/d(outputs) (B, out).

        Returns grad_x and dF/dloc, dF/drho (flat, weights first), the KL part included
        (``kl="mc"``: log q - log p at the sampled weights, any prior; ``"analytic"``: closed form,
        Normal prior; ``"none"``: the data term only), and the KL value.
        """
        return self._backward(grad_out, kl_weight, kl)

    def _backward(self, grad_out, kl_weight, kl, out=None, accumulate=False, need_grad_x=True,
                  adam=None) -> LayerGrads:
        """backward, with the parameter gradients written to (or, with accumulate, added to) the
        arrays ``out = (grad_loc, grad_rho)``, and grad_x skipped (None) when not needed.  With
        ``adam = ((m_loc, v_loc, m_rho, v_rho), (step, lr, b1, b2, eps))`` the kernel also takes
        the Adam step on loc and rho (the gradients are then None unless ``out`` is given)."""
        if self._cache is None:
            raise ValueError("backward needs a forward(x, sample=True) first")
        G = np.ascontiguousarray(grad_out, dtype=self.dtype)
        key, x = self._cache[0], self._cache[1]
        if G.shape != (x.shape[0], self.out_features):
            raise ValueError(f"grad_out must have shape {(x.shape[0], self.out_features)}, got {G.shape}")
        A = self._param_grad(G, x, "A")
        grad_x = None
        if self.estimator == "reparam":
            W = self._cache[2]
            if need_grad_x:
                grad_x = self._mm(G, W)
            data, BC = "reparam", None
        elif self.estimator == "flipout":
            _, _, xs, S, R, dW, M = self._cache
            GR = G * R
            BC = self._param_grad(GR, xs, "B")
            if need_grad_x:
                grad_x = self._mm(GR, dW)
                grad_x *= S
                self._mm(G, M, out=grad_x, accumulate=True)
            data = "times_eps"
        else:
            _, _, x2, V, std, zeta, M = self._cache
            H = G * zeta / (2.0 * std)
            BC = self._param_grad(H, x2, "B")
            BC *= _core.softplus(self.rho, self.workers)
            BC *= self.dtype.type(2)
            if need_grad_x:
                grad_x = self._mm(H, V)
                grad_x *= x
                grad_x *= self.dtype.type(2)
                self._mm(G, M, out=grad_x, accumulate=True)
            data = "direct"
        kw = {} if out is None else {"out_loc": out[0], "out_rho": out[1], "accumulate": accumulate}
        if adam is not None:  # the fused Adam step: (m_loc, v_loc, m_rho, v_rho), (step, lr, b1, b2, eps)
            kw["adam_state"], kw["adam"] = adam
        gl, gr, klv, finite = self._kernel(data, kl, key, self.loc, self.rho, A, BC, *self._prior_params, kl_weight,
                                           self.workers, **kw)
        self._last_finite = finite
        if grad_x is not None:
            grad_x = grad_x.astype(self.dtype, copy=False)
        return LayerGrads(grad_x, gl, gr, float(klv))


def _blundell_weights(M):
    """pi_i = 2^(M - i) / (2^M - 1), i = 1..M, computed without overflow."""
    i = np.arange(1, M + 1, dtype=np.float64)
    return np.exp2(-i) / -np.expm1(-M * math.log(2.0))


class BayesianMLP:
    """A Bayes-by-Backprop multilayer perceptron: BayesianLinear layers with ReLU between them.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths from input to output, at least two (e.g. (64, 128, 10)).
    likelihood : {"gaussian", "categorical"}
        "gaussian": regression with homoscedastic noise, learned (a point estimate of log sigma)
        unless ``noise_std`` is given; "categorical": softmax over sizes[-1] classes.
    prior : Normal or ScaleMixtureNormal
        Default: Blundell et al.'s scale mixture (0.5, 1, e^-6).
    estimator : {"reparam", "local", "flipout"}
    num_samples : int
        Monte Carlo samples per training step; their gradients are averaged.
    dtype : float32 (default) or float64
    rng : int, Generator or None
        Seeds the initial means and every noise key: the same seed trains to the same bits.
    noise_std : float, optional
        Fixed observation noise for the Gaussian likelihood.
    init_rho : float
        Initial rho of every weight (default -7: at these training lengths the initial scale sets
        the calibration; see bench/README.md).
    kl : {"mc", "analytic"}
        The KL term: Monte Carlo at the sampled weights (any prior) or closed form (Normal prior).
    workers : int or None
        Threads for the fused elementwise passes and the matrix products; None means every core
        when vigrad can run the products on its own threads (NumPy's OpenBLAS found), else 1,
        because two thread pools on the same cores wait for each other (see
        :func:`vigrad.bnn.layer_workers`).  Results are bit-identical for any value.

    Examples
    --------
    >>> import numpy as np, vigrad as vg
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 2)).astype(np.float32); y = (X[:, 0] > 0).astype(int)
    >>> model = vg.BayesianMLP([2, 16, 2], likelihood="categorical", rng=0)
    >>> history = model.fit(X, y, epochs=30, batch_size=32, lr=1e-2)
    >>> bool((model.predict(X) == y).mean() > 0.9), model.predict_proba(X[:3]).shape
    (True, (3, 2))
    """

    def __init__(self, sizes, *, likelihood="gaussian", prior=None, estimator="reparam", num_samples=1,
                 dtype=np.float32, rng=None, noise_std=None, init_rho=-7.0, kl="mc", workers=None):
        try:
            sizes = [int(s) for s in sizes]
        except (TypeError, ValueError):
            raise TypeError(f"sizes must be a sequence of ints, got {sizes!r}") from None
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least two layers (input and output), got {sizes}")
        if min(sizes) < 1:
            raise ValueError(f"every layer size must be >= 1, got {sizes}")
        if likelihood not in ("gaussian", "categorical"):
            raise ValueError(f"likelihood must be 'gaussian' or 'categorical', got {likelihood!r}")
        if likelihood == "categorical" and sizes[-1] < 2:
            raise ValueError(f"a categorical likelihood needs >= 2 output classes, got sizes[-1] = {sizes[-1]}")
        if kl not in ("mc", "analytic"):
            raise ValueError(f"kl must be 'mc' or 'analytic', got {kl!r}")
        prior = default_prior() if prior is None else prior
        if kl == "analytic" and not isinstance(prior, Normal):
            raise ValueError("kl='analytic' needs a Normal prior (no closed form for the scale mixture)")
        self.sizes, self.likelihood, self.prior, self.kl = sizes, likelihood, prior, kl
        self.estimator = estimator
        self.num_samples = check_num_samples(num_samples, "num_samples")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.noise_std = None if noise_std is None else check_real(noise_std, "noise_std", positive=True)
        self.init_rho = float(init_rho)
        self.workers = layer_workers(workers)
        gen = resolve_rng(rng)
        self._base_key = int(gen.integers(0, 2**64, dtype=np.uint64))
        counts = [sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1)]
        self._n_weights = sum(counts)
        learn_noise = likelihood == "gaussian" and self.noise_std is None
        self._theta = np.zeros(2 * self._n_weights + (1 if learn_noise else 0), self.dtype)
        self._grad = np.zeros_like(self._theta)
        self.layers: List[BayesianLinear] = []
        self._param_slices = []  # each layer's (loc, rho) slices of the flat parameter vector
        off = 0
        for i, n in enumerate(counts):
            self._param_slices.append((slice(off, off + n), slice(self._n_weights + off, self._n_weights + off + n)))
            views = tuple(self._theta[sl] for sl in self._param_slices[-1])
            self.layers.append(BayesianLinear(sizes[i], sizes[i + 1], prior=prior, estimator=estimator,
                                              dtype=self.dtype, init_rho=init_rho, rng=gen, params=views,
                                              workers=self.workers))
            off += n
        self._learn_noise = learn_noise
        self._opt_state = None  # (step, m, v) of the fused Adam
        self.history: Dict[str, list] = {}

    # -- parameters -------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Number of weights and biases (each has a mean and a scale)."""
        return self._n_weights

    @property
    def noise_scale(self) -> Optional[float]:
        """The Gaussian likelihood's noise sd (learned or fixed); None for categorical."""
        if self.likelihood != "gaussian":
            return None
        return self.noise_std if not self._learn_noise else float(np.exp(self._theta[-1]))

    def __repr__(self):
        return (f"BayesianMLP({self.sizes}, likelihood={self.likelihood!r}, estimator={self.estimator!r}, "
                f"num_samples={self.num_samples}, dtype={self.dtype})")

    # -- the network ---------------------------------------------------------------------------------
    def _forward(self, x, keys=None, sample=True):
        h = x
        acts = []
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, key=None if keys is None else keys[i], sample=sample)
            if i + 1 < len(self.layers):
                acts.append(h > 0)
                h = np.maximum(h, 0)
        return h, acts

    def _nll_and_grad(self, f, y):
        """Sum of -log p(y | f) over the batch and its gradient in f (and in log sigma)."""
        if self.likelihood == "categorical":
            m = f.max(axis=1, keepdims=True)
            e = np.exp(f - m)
            z = e.sum(axis=1, keepdims=True)
            nll = float(np.sum(np.log(z[:, 0]) + m[:, 0] - f[np.arange(len(y)), y]))
            g = e / z
            g[np.arange(len(y)), y] -= 1
            return nll, g.astype(self.dtype, copy=False), 0.0
        sigma = self.noise_scale
        r = (f - y) / sigma
        nll = float(0.5 * np.sum(r * r) + r.size * (math.log(sigma) + 0.5 * math.log(2 * math.pi)))
        g_log_sigma = float(r.size - np.sum(r * r)) if self._learn_noise else 0.0
        return nll, (r / sigma).astype(self.dtype, copy=False), g_log_sigma

    def _step_grad(self, xb, yb, kl_weight, step, adam=None):
        """Average over num_samples of the gradient of kl_weight KL + sum NLL; fills self._grad.
        The layers write their gradients straight into self._grad's slices.  With ``adam =
        (m, v, (step, lr, b1, b2, eps))`` (one sample only) each layer's kernel takes the Adam
        step on its parameters instead, while the gradient is in cache; only the learned noise
        scale's gradient, if any, is left in self._grad[-1]."""
        nll_tot = kl_tot = 0.0
        L = len(self.layers)
        if self._learn_noise:
            self._grad[-1] = 0
        for s in range(self.num_samples):
            keys = _derive_keys(self._base_key, step, s, L)
            f, acts = self._forward(xb, keys)
            nll, g, g_ls = self._nll_and_grad(f, yb)
            if not np.isfinite(nll):
                raise TrainingError(f"non-finite loss at step {step}: {self._first_bad_layer(xb, keys)}")
            for i in range(L - 1, -1, -1):
                sl, sr = self._param_slices[i]
                if adam is None:
                    res = self.layers[i]._backward(g, kl_weight, self.kl, out=(self._grad[sl], self._grad[sr]),
                                                   accumulate=s > 0, need_grad_x=i > 0)
                else:
                    m, v, hyper = adam
                    res = self.layers[i]._backward(g, kl_weight, self.kl, need_grad_x=i > 0,
                                                   adam=((m[sl], v[sl], m[sr], v[sr]), hyper))
                if not self.layers[i]._last_finite:
                    raise TrainingError(f"non-finite gradient in layer {i} at step {step}")
                kl_tot += res.kl
                if i > 0:
                    g = res.grad_x
                    g *= acts[i - 1]
            if self._learn_noise:
                self._grad[-1] += g_ls
            nll_tot += nll
        if self.num_samples > 1:
            self._grad /= self.num_samples
        return nll_tot / self.num_samples, kl_tot / self.num_samples

    def _first_bad_layer(self, x, keys):
        h = x
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, key=keys[i])
            if not np.isfinite(h).all():
                return f"the output of layer {i} is not finite"
            h = np.maximum(h, 0) if i + 1 < len(self.layers) else h
        return "the likelihood is not finite at these outputs"

    # -- data checks ---------------------------------------------------------------------------------
    def _check_X(self, X, name="X"):
        X = as_float_array(X, name)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"{name} must have shape (N, {self.sizes[0]}), got {X.shape}")
        check_finite(X, name)
        with np.errstate(over="ignore"):
            Xc = np.ascontiguousarray(X, dtype=self.dtype)
        if not np.isfinite(Xc).all():
            raise ValueError(f"{name} has values beyond the range of the model's dtype {self.dtype}")
        return Xc

    def _check_y(self, y, n, name="y"):
        if self.likelihood == "categorical":
            y = np.asarray(y)
            if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            if y.dtype.kind not in "iu":
                raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
            if y.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like X, got {y.shape}")
            K = self.sizes[-1]
            if n and (y.min() < 0 or y.max() >= K):
                raise ValueError(f"{name} labels must lie in [0, {K}), got min {y.min()} and max {y.max()}")
            return y.astype(np.int64)
        y = as_float_array(y, name)
        out = self.sizes[-1]
        if y.shape == (n,) and out == 1:
            y = y.reshape(n, 1)
        if y.shape != (n, out):
            raise ValueError(f"{name} must have shape ({n},) or ({n}, {out}) like X, got {y.shape}")
        check_finite(y, name)
        with np.errstate(over="ignore"):
            yc = np.ascontiguousarray(y, dtype=self.dtype)
        if not np.isfinite(yc).all():
            raise ValueError(f"{name} has values beyond the range of the model's dtype {self.dtype}")
        return yc

    # -- training ----------------------------------------------------------------------------------
    def fit(self, X, y, *, epochs, batch_size=128, lr=None, kl_weighting="uniform", validation_data=None,
            progress=False, shuffle="shuffle", clip_norm=None, early_stopping=None, val_samples=10,
            checkpoint=None, resume=False, optimizer=None):
        """Train by minibatch stochastic optimisation (Adam by default) on F_i = kl_weight_i KL[q || prior]
        - log P(D_i | w).

        Parameters
        ----------
        X : (N, sizes[0]) array; y : labels (N,) or targets (N,) / (N, sizes[-1])
        epochs : int
        batch_size : int
        lr : float or schedule (callable step -> float, e.g. vg.optim.exponential(...))
            The step size of the default optimiser, ``vg.optim.adam(lr)`` (None: 1e-3).
        optimizer : vigrad.optim.Optimizer, optional
            Any optimiser of :mod:`vigrad.optim` instead of lr (not both).  Plain Adam (no clipping or
            weight decay) with one sample runs fused into each layer's backward pass; every other
            update is the optimiser's own in-place step.  ``checkpoint`` keeps Adam's state only.
        kl_weighting : {"uniform", "blundell"}
            1/M for M minibatches per epoch, or Blundell's pi_i = 2^(M-i)/(2^M-1) for the i-th.
        validation_data : (X_val, y_val), optional
        progress : bool
            One line per epoch on stderr: loss, NLL, KL (and validation NLL).
        shuffle : {"shuffle", "replacement"}
            Epoch shuffling (the slides' Algorithm 1) or sampling with replacement (Algorithm 2).
        clip_norm : float, optional
            Clip the gradient's global norm.
        early_stopping : int, optional
            Patience in epochs on the validation NLL; the best parameters are restored.
        val_samples : int
            Monte Carlo samples for the validation predictions.
        checkpoint : path, optional
            Save the model and optimiser state after every epoch; ``resume=True`` continues from
            the checkpoint's epoch, reproducing an uninterrupted run bit for bit.

        Returns
        -------
        dict
            Per-epoch lists: "loss" (F per example), "nll", "kl", and with validation data
            "val_nll" and "val_accuracy" or "val_rmse".
        """
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        N = X.shape[0]
        if N == 0:
            raise ValueError("X must hold at least one example")
        epochs = check_num_samples(epochs, "epochs")
        batch_size = check_num_samples(batch_size, "batch_size")
        if kl_weighting not in ("uniform", "blundell"):
            raise ValueError(f"kl_weighting must be 'uniform' or 'blundell', got {kl_weighting!r}")
        if shuffle not in ("shuffle", "replacement"):
            raise ValueError(f"shuffle must be 'shuffle' or 'replacement', got {shuffle!r}")
        if lr is not None and not callable(lr):
            check_real(lr, "lr", positive=True)
        opt = _optim._resolve(lr, optimizer, 1e-3)
        schedule = _optim._as_schedule(opt.hyperparams["lr"])
        fusable = _optim._plain_adam(opt)
        if fusable is None and opt.name != "adam" and checkpoint is not None:
            raise ValueError(f"checkpoint saves Adam's state; optimizer={opt.name!r} has no checkpoint format")
        if clip_norm is not None:
            clip_norm = check_real(clip_norm, "clip_norm", positive=True)
        if validation_data is not None:
            Xv = self._check_X(validation_data[0], "validation X")
            yv = self._check_y(validation_data[1], Xv.shape[0], "validation y")
        if early_stopping is not None:
            if validation_data is None:
                raise ValueError("early_stopping needs validation_data")
            stopper = _optim.EarlyStopping(patience=check_num_samples(early_stopping, "early_stopping"))
        batch_size = min(batch_size, N) if shuffle == "shuffle" else batch_size
        M = _data.num_batches(N, batch_size)
        kl_w = np.full(M, 1.0 / M) if kl_weighting == "uniform" else _blundell_weights(M)

        start_epoch = 0
        if resume:
            if checkpoint is None or not os.path.exists(checkpoint):
                raise ValueError(f"resume=True needs an existing checkpoint file, got {checkpoint!r}")
            saved = BayesianMLP.load(checkpoint)
            if saved.sizes != self.sizes or saved._theta.shape != self._theta.shape:
                raise ValueError("the checkpoint holds a different architecture")
            self._theta[...] = saved._theta
            self._opt_state = saved._opt_state
            self._base_key = saved._base_key
            self.history = saved.history
            start_epoch = len(self.history.get("loss", []))
        if self._opt_state is None:
            self._opt_state = (0, np.zeros_like(self._theta), np.zeros_like(self._theta))
        if not resume:
            self.history = {k: [] for k in ("loss", "nll", "kl")}
            if validation_data is not None:
                self.history["val_nll"] = []
                self.history["val_accuracy" if self.likelihood == "categorical" else "val_rmse"] = []
        es_state = stopper.init() if early_stopping is not None else None
        best_theta = None
        data_seed = _derive_keys(self._base_key, 2**62, 0, 1)[0]
        stream = _data.minibatches(N, batch_size, mode=shuffle,
                                   num_epochs=epochs if shuffle == "shuffle" else None,
                                   num_steps=None if shuffle == "shuffle" else epochs * M,
                                   rng=data_seed, start_step=start_epoch * M)
        step, m, v = self._opt_state
        # the fused path (Adam inside each layer's backward kernel) needs the whole gradient of a
        # step from one pass: one sample and no clipping by the global norm
        fused = self.num_samples == 1 and clip_norm is None and fusable is not None
        # optimisers other than Adam keep their own state for this call (moments as theta)
        other = opt.init(self._theta) if opt.name != "adam" else None
        t0 = time.perf_counter()
        sums = [0.0, 0.0, 0]
        for batch in stream:
            i = batch.step % M
            xb, yb = X[batch.indices], y[batch.indices]
            if fused:  # one sample, no clipping: each layer's kernel takes its Adam step
                hyper = (step, _optim._lr_at(schedule, step), *fusable)
                nll, klv = self._step_grad(xb, yb, float(kl_w[i]), step, adam=(m, v, hyper))
                if self._learn_noise:
                    _core.adam_update(self._theta[-1:], self._grad[-1:], m[-1:], v[-1:], *hyper, 1)
            else:
                nll, klv = self._step_grad(xb, yb, float(kl_w[i]), step)
                if clip_norm is not None:
                    norm = float(np.sqrt(np.dot(self._grad.astype(np.float64), self._grad.astype(np.float64))))
                    if norm > clip_norm:
                        self._grad *= self.dtype.type(clip_norm / norm)
                if other is None:  # Adam: the moments m, v kept on the model
                    state = _optim.AdamState(np.array(step, dtype=np.int64), (m,), (v,))
                    opt.update(self._grad, state, self._theta, inplace=True, workers=self.workers)
                else:
                    _, other = opt.update(self._grad, other, self._theta, inplace=True, workers=self.workers)
            step += 1
            sums[0] += nll
            sums[1] += klv
            sums[2] += len(batch.indices)
            if i == M - 1:  # end of an epoch
                epoch = batch.step // M
                self._opt_state = (step, m, v)
                n_seen = sums[2]
                self.history["nll"].append(sums[0] / n_seen)
                self.history["kl"].append(sums[1] / M)
                # F per example over the epoch: (sum of the minibatch NLLs + KL) / N
                self.history["loss"].append(sums[0] / n_seen + self.history["kl"][-1] / N)
                sums = [0.0, 0.0, 0]
                line = (f"epoch {epoch + 1:>4}/{epochs}  loss {self.history['loss'][-1]:.4f}  "
                        f"nll {self.history['nll'][-1]:.4f}  kl {self.history['kl'][-1]:.1f}")
                stop = False
                if validation_data is not None:
                    vn, vm = self._evaluate(Xv, yv, val_samples, epoch)
                    self.history["val_nll"].append(vn)
                    self.history["val_accuracy" if self.likelihood == "categorical" else "val_rmse"].append(vm)
                    line += f"  val_nll {vn:.4f}"
                    if es_state is not None:
                        es_state, stop, improved = stopper.update(es_state, vn)
                        if improved:
                            best_theta = self._theta.copy()
                if progress:
                    print(line + f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
                if checkpoint is not None:
                    self.save(checkpoint)
                if stop:
                    break
        self._opt_state = (step, m, v)
        if best_theta is not None:
            self._theta[...] = best_theta
        return self.history

    def _evaluate(self, Xv, yv, S, epoch):
        if self.likelihood == "categorical":
            p = self.predict_proba(Xv, num_samples=S, rng=epoch)
            nll = float(-np.mean(np.log(np.clip(p[np.arange(len(yv)), yv], 1e-12, None))))
            return nll, float(np.mean(p.argmax(axis=1) == yv))
        mean, std = self.predict(Xv, num_samples=S, return_std=True, rng=epoch)
        yv2 = yv.reshape(mean.shape)
        nll = float(np.mean(0.5 * ((yv2 - mean) / std) ** 2 + np.log(std) + 0.5 * math.log(2 * math.pi)))
        return nll, float(np.sqrt(np.mean((yv2 - mean) ** 2)))

    # -- prediction ----------------------------------------------------------------------------------
    def _sample_outputs(self, X, num_samples, rng):
        X = self._check_X(X)
        S = check_num_samples(num_samples, "num_samples")
        base = int(resolve_rng(rng).integers(0, 2**64, dtype=np.uint64)) if rng is not None else self._base_key ^ 0xA5A5
        outs = []
        for s in range(S):
            f, _ = self._forward(X, _derive_keys(base, 2**61, s, len(self.layers)))
            outs.append(f)
        return np.stack(outs)

    def predict_proba(self, X, *, num_samples=30, rng=None):
        """Classification: the Monte Carlo average of softmax over num_samples weight draws, (N, classes)."""
        if self.likelihood != "categorical":
            raise ValueError("predict_proba needs a categorical likelihood")
        return self.sample_proba(X, num_samples=num_samples, rng=rng).mean(axis=0)

    def sample_proba(self, X, *, num_samples=30, rng=None):
        """Per-draw softmax probabilities (S, N, classes), for vg.metrics.mutual_information."""
        f = self._sample_outputs(X, num_samples, rng).astype(np.float64)
        f -= f.max(axis=2, keepdims=True)
        e = np.exp(f)
        return e / e.sum(axis=2, keepdims=True)

    def predict(self, X, *, num_samples=30, return_std=False, rng=None):
        """Regression: the predictive mean (N,) or (N, out) (and the predictive sd, which includes
        the noise); classification: the labels of the highest averaged probability."""
        if self.likelihood == "categorical":
            return self.predict_proba(X, num_samples=num_samples, rng=rng).argmax(axis=1)
        f = self._sample_outputs(X, num_samples, rng).astype(np.float64)
        mean = f.mean(axis=0)
        squeeze = self.sizes[-1] == 1
        if not return_std:
            return mean[:, 0] if squeeze else mean
        std = np.sqrt(f.var(axis=0) + self.noise_scale**2)
        return (mean[:, 0], std[:, 0]) if squeeze else (mean, std)

    # -- persistence ---------------------------------------------------------------------------------
    def _metadata(self):
        if isinstance(self.prior, Normal):
            prior = {"kind": "normal", "loc": self.prior.loc.tolist(), "scale": self.prior.scale.tolist()}
        else:
            prior = {"kind": "scale_mixture", "pi": self.prior.pi.tolist(), "sigma1": self.prior.sigma1.tolist(),
                     "sigma2": self.prior.sigma2.tolist()}
        step = self._opt_state[0] if self._opt_state is not None else 0
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "sizes": self.sizes, "likelihood": self.likelihood,
                "estimator": self.estimator, "num_samples": self.num_samples, "dtype": self.dtype.name,
                "prior": prior, "noise_std": self.noise_std, "init_rho": self.init_rho, "kl": self.kl,
                "base_key": str(self._base_key), "step": int(step), "history": self.history}

    @staticmethod
    def _checksum(meta_json: str, arrays) -> str:
        h = hashlib.sha256(meta_json.encode())
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def save(self, path):
        """Write the model (architecture, prior, dtype, parameters, optimiser state, history) to a
        versioned .npz with a SHA-256 checksum."""
        meta = json.dumps(self._metadata(), sort_keys=True)
        m, v = (self._opt_state[1], self._opt_state[2]) if self._opt_state is not None else (
            np.zeros(0, self.dtype), np.zeros(0, self.dtype))
        arrays = [self._theta, m, v]
        with open(path, "wb") as fh:
            np.savez(fh, meta=np.array(meta), theta=self._theta, adam_m=m, adam_v=v,
                     checksum=np.array(self._checksum(meta, arrays)))

    @classmethod
    def load(cls, path) -> "BayesianMLP":
        """Read a model written by :meth:`save`; a corrupted file, another format version or a wrong
        path raise a clear error."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no saved BayesianMLP at {path!r}")
        try:
            with np.load(path, allow_pickle=False) as f:
                meta_json, theta = str(f["meta"]), f["theta"]
                m, v, checksum = f["adam_m"], f["adam_v"], str(f["checksum"])
        except Exception as exc:  # zip or npy damage
            raise ValueError(f"{path!r} is not a readable vigrad model file ({type(exc).__name__}: {exc})") from None
        try:
            meta = json.loads(meta_json)
        except json.JSONDecodeError:
            raise ValueError(f"{path!r}: the metadata is corrupted") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path!r} is not a {_FORMAT} file (format {meta.get('format')!r})")
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path!r} has format version {meta.get('version')}; this vigrad reads version "
                             f"{_FORMAT_VERSION}")
        if cls._checksum(meta_json, [theta, m, v]) != checksum:
            raise ValueError(f"{path!r}: checksum mismatch, the file is corrupted")
        p = meta["prior"]
        prior = (Normal(p["loc"], p["scale"]) if p["kind"] == "normal"
                 else ScaleMixtureNormal(p["pi"], p["sigma1"], p["sigma2"]))
        model = cls(meta["sizes"], likelihood=meta["likelihood"], prior=prior, estimator=meta["estimator"],
                    num_samples=meta["num_samples"], dtype=np.dtype(meta["dtype"]), rng=0,
                    noise_std=meta["noise_std"], init_rho=meta["init_rho"], kl=meta["kl"])
        if theta.shape != model._theta.shape:
            raise ValueError(f"{path!r}: {theta.size} parameters stored, the architecture needs {model._theta.size}")
        model._theta[...] = theta
        model._base_key = int(meta["base_key"])
        model.history = meta["history"]
        if m.size:
            model._opt_state = (int(meta["step"]), m.copy(), v.copy())
        return model
