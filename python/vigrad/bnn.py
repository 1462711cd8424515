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

The layer's arithmetic, keys and noise are :mod:`vigrad._layer_ops`'s, shared with
:class:`vigrad.torch.BayesianLinear`; this module gives it NumPy arrays and vigrad's gemm.

:class:`BayesianMLP` stacks them with ReLU, a Gaussian (learned or fixed noise) or
categorical likelihood, and trains by minibatch Adam on F_i = kl_weight_i KL - log P(D_i | w).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterable
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from . import _blas, _core
from . import _layer_ops as _ops
from . import _trainer
from ._validation import as_float_array, check_finite, check_num_samples, check_real, resolve_rng, resolve_workers
from .distributions import Normal, ScaleMixtureNormal

__all__ = ["BayesianLinear", "BayesianMLP", "LayerGrads", "TrainingError"]

_FORMAT = "vigrad.BayesianMLP"
_FORMAT_VERSION = 1

# one implementation of the layer for both front ends (see vigrad._layer_ops); the old names stay
_Threads = _ops.Threads
_derive_keys = _ops.derive_keys
default_prior = _ops.default_prior


def layer_workers(workers):
    """The most threads a layer's fused elementwise passes and matrix products may use.  For None:
    every core when vigrad runs the matrix products on its own threads (:mod:`vigrad._blas`: NumPy's
    OpenBLAS found), and then :class:`_Threads` chooses between one thread and all of them by
    measurement; else one: NumPy's matmul then runs on OpenBLAS's pool, whose threads keep spinning
    after each product, and an OpenMP team on the same cores waits for a core at every barrier
    (2 cores, 784-400-400-10, batch 128: 5.4 ms per step with one thread, 34 ms with two)."""
    if workers is None:
        return resolve_workers(None) if _blas.available() else 1
    return resolve_workers(workers)


class LayerGrads(NamedTuple):
    """What :meth:`BayesianLinear.backward` returns."""

    grad_x: np.ndarray
    grad_loc: np.ndarray
    grad_rho: np.ndarray
    kl: float


class TrainingError(ValueError):
    """Training stopped on a non-finite loss, gradient or validation output; the message names the
    layer and the step.

    The model is then rolled back: its parameters and optimiser state are those at the start of
    the last step whose loss and gradient were finite (``restored_step``, one before the failed
    ``step``; the state before the fit when its first step failed), bit for bit as an
    uninterrupted fit that had stopped there, so that it predicts and trains again."""

    def __init__(self, message, step=None, restored_step=None):
        super().__init__(message)
        self.step = step
        self.restored_step = restored_step

    def __reduce__(self):  # the step survives pickling (a sharded fit's worker raises it)
        return type(self), (str(self), self.step, self.restored_step)


def _write_atomically(path, write):
    """Call ``write(fh)`` on a new file in the folder of ``path``, flush and fsync it, rename it
    over ``path`` (os.replace, atomic on POSIX and Windows) and fsync the folder, so that a crash
    at any moment leaves the old file or the new one.  The new file has the old one's
    permissions (the umask's default for a new path)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _finite_as(a, name, dtype, owner):
    """The finite real array ``a`` as C-contiguous ``dtype``; a ValueError names the argument when
    a value is not finite or lies beyond the range of ``dtype``."""
    check_finite(a, name)
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(a, dtype=dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} has values beyond the range of the {owner}'s dtype {dtype}")
    return out


def _check_key(key) -> int:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral):
        raise TypeError(f"key must be an int in [0, 2**64) or None, got {type(key).__name__} {key!r}")
    if not 0 <= int(key) < 2**64:
        raise ValueError(f"key must be in [0, 2**64), got {key}")
    return int(key)


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
        Threads for the fused elementwise passes and the matrix products.  None: one thread or
        every core, whichever the layer measures faster for its forward and its backward calls,
        re-measured as the machine's load changes (see :class:`vigrad._layer_ops.Threads`); one thread
        when vigrad cannot run the products on its own threads (:func:`layer_workers`).

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
        self.estimator = _ops.check_estimator(estimator)
        self.prior = _ops.check_prior(default_prior() if prior is None else prior)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.workers = layer_workers(workers)
        self._threads = {k: _Threads(self.workers, workers is None) for k in ("forward", "backward")}
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
        self._cache = None  # what the last training forward keeps for backward (an _ops.Saved)
        self._buffers = {}
        self._ops = _ops.LinearOps(self.in_features, self.out_features, self.estimator, self.prior, self.dtype)

    @property
    def num_params(self) -> int:
        return self.in_features * self.out_features + self.out_features

    def __getstate__(self):
        # copies start without the work buffers and the forward's cache
        state = self.__dict__.copy()
        state["_buffers"], state["_cache"] = {}, None
        return state

    def _split(self, flat):
        return _ops.split(flat, self.in_features, self.out_features)

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

    def _products(self, workers):
        """The layer's matrix products on ``workers`` threads, work arrays from its buffers."""
        return _ops.NumpyProducts(workers, self.dtype, self._buffer)

    def forward(self, x, *, key=None, sample=True):
        """Outputs (B, out) for inputs (B, in).  ``key`` fixes the noise (an int in [0, 2**64));
        None draws one.  With sample=False the mean weights are used (no noise, nothing cached
        for backward)."""
        if not isinstance(sample, (bool, np.bool_)):
            raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
        if key is not None:
            key = _check_key(key)
        x = self._check_array(x, "x", (None, self.in_features), "(batch, in_features)")
        if sample and key is None:
            key = int(self._sign_rng.integers(0, 2**63))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, whatever errstate says
            out = self._threads["forward"].run(lambda w: self._forward(x, key, sample, workers=w))
        if not np.isfinite(out).all():
            self._cache = None
            raise ValueError(f"the layer's output overflowed to a non-finite value although x and the parameters are "
                             f"finite (largest |x| {float(np.abs(x).max(initial=0))}): scale the inputs down")
        return out

    def _check_array(self, a, name, shape, layout):
        """A finite real array of the given shape (None: any length), as C-contiguous self.dtype."""
        a = as_float_array(a, name)
        if a.ndim != len(shape) or any(n is not None and n != k for n, k in zip(shape, a.shape)):
            want = ", ".join("batch" if n is None else str(n) for n in shape)
            raise ValueError(f"{name} must have shape {layout} = ({want}), got {a.shape}")
        return _finite_as(a, name, self.dtype, "layer")

    def _forward(self, x, key, sample=True, train=True, workers=None, row_offset=0):
        """forward on checked arguments.  train=True keeps what backward needs (the layer's one
        cache) and writes the sampled weights into the layer's persistent buffer; train=False
        touches no state of the layer (fresh arrays, nothing cached), so that any number of
        threads may predict with one layer at once.  workers: threads for this call (None: the
        layer's).  row_offset: the position of x's first row in its minibatch (the per-example
        noise of "local" and "flipout" is keyed by it)."""
        nw = self.workers if workers is None else workers
        p = self._products(nw)
        if not sample:
            if train:
                self._cache = None
            return self._ops.mean(p, x, self.loc)
        noise_out = self._buffer("w", (self.num_params,)) if train else None
        out, _, saved = self._ops.forward(p, key, x, self.loc, self.rho, noise_out=noise_out, row_offset=row_offset,
                                          workers=nw)
        if train:
            self._cache = saved
        return out

    def backward(self, grad_out, *, kl_weight=1.0, kl="mc") -> LayerGrads:
        """Gradient of F = NLL + kl_weight KL[q || prior] given dNLL/d(outputs) (B, out).

        Returns grad_x and dF/dloc, dF/drho (flat, weights first), the KL part included
        (``kl="mc"``: log q - log p at the sampled weights, any prior; ``"analytic"``: closed form,
        Normal prior; ``"none"``: the data term only), and the KL value.
        """
        kl_weight = check_real(kl_weight, "kl_weight", nonnegative=True)
        _ops.check_kl(kl, self.prior, ("mc", "analytic", "none"))
        if self._cache is None:
            raise ValueError("backward needs a forward(x, sample=True) first")
        G = self._check_array(grad_out, "grad_out", (self._cache.x.shape[0], self.out_features),
                              "(batch, out_features)")
        with np.errstate(over="ignore", invalid="ignore"):
            res = self._threads["backward"].run(lambda w: self._backward(G, kl_weight, kl, workers=w))
        if not (self._last_finite and np.isfinite(res.grad_x).all()):
            raise ValueError("the gradient overflowed to a non-finite value although every input is finite "
                             f"(largest |grad_out| {float(np.abs(G).max(initial=0))}, kl_weight {kl_weight})")
        return res

    def _backward(self, grad_out, kl_weight, kl, out=None, accumulate=False, need_grad_x=True,
                  adam=None, workers=None) -> LayerGrads:
        """backward, with the parameter gradients written to (or, with accumulate, added to) the
        arrays ``out = (grad_loc, grad_rho)``, and grad_x skipped (None) when not needed.  With
        ``adam = ((m_loc, v_loc, m_rho, v_rho), (step, lr, b1, b2, eps))`` the kernel also takes
        the Adam step on loc and rho (the gradients are then None unless ``out`` is given).
        workers: threads for this call (None: the layer's)."""
        nw = self.workers if workers is None else workers
        saved = self._cache
        if saved is None:
            raise ValueError("backward needs a forward(x, sample=True) first")
        G = np.ascontiguousarray(grad_out, dtype=self.dtype)
        if G.shape != (saved.x.shape[0], self.out_features):
            raise ValueError(f"grad_out must have shape {(saved.x.shape[0], self.out_features)}, got {G.shape}")
        grad_x, A, BC, data = self._ops.backward(self._products(nw), saved, G, need_x=need_grad_x)
        kw = {} if out is None else {"out_loc": out[0], "out_rho": out[1], "accumulate": accumulate}
        if adam is not None:  # the fused Adam step: (m_loc, v_loc, m_rho, v_rho), (step, lr, b1, b2, eps)
            kw["adam_state"], kw["adam"] = adam
        gl, gr, klv, finite = self._ops.param_grads(data, kl, saved.key, self.loc, self.rho, A, BC, kl_weight, nw,
                                                    **kw)
        self._last_finite = finite
        if grad_x is not None:
            grad_x = grad_x.astype(self.dtype, copy=False)
        return LayerGrads(grad_x, gl, gr, float(klv))


class _Guard:
    """Who may use a model's parameters: one training thread, or any number of threads that only
    read them (predictions, save).  Training waits for the reads in flight and then refuses new
    ones from other threads: their result would mix the parameters of different steps."""

    def __init__(self):
        self._cond = threading.Condition()
        self._trainer = None
        self._readers = 0

    @contextlib.contextmanager
    def training(self):
        me = threading.get_ident()
        with self._cond:
            if self._trainer is not None:
                raise RuntimeError("BayesianMLP.fit is already running on this model (in another thread, or "
                                   "re-entered); train one model from one thread at a time, or train copies "
                                   "(copy.deepcopy(model))")
            self._trainer = me
        try:  # (an interrupt while waiting must free the model too)
            with self._cond:
                self._cond.wait_for(lambda: self._readers == 0)
            yield
        finally:
            with self._cond:
                self._trainer = None

    @contextlib.contextmanager
    def reading(self, what):
        me = threading.get_ident()
        with self._cond:
            if self._trainer is not None and self._trainer != me:
                raise RuntimeError(f"BayesianMLP.{what} was called while fit is training this model in another "
                                   f"thread: the parameters change at every step; call it after fit returns, "
                                   f"or on a copy (copy.deepcopy(model))")
            counted = self._trainer is None  # a read inside fit (its validation, its checkpoint) is fit's own
            self._readers += counted
        try:
            yield
        finally:
            if counted:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()


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
        Default: Blundell et al.'s scale mixture (0.5, 1, e^-6).  On small data sets, where the
        KL summed over all weights outweighs the likelihood, its narrow component leaves the
        network under-confident; a wider prior calibrates better (the digits, 1 347 examples,
        9 610 weights: ``vg.Normal(0.0, 2.0)`` with He-uniform initial means takes the test NLL
        from 0.11 to 0.084 and the ECE from 0.031 to 0.017; bench/README.md, issue 14).
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
        Threads for the fused elementwise passes and the matrix products.  None: one thread or
        every core, whichever measures faster for this model's training steps (and, separately,
        its predictions), re-measured as the load of the machine changes: on an idle machine
        two threads are up to ~1.8x faster for a large network, on a machine where other work
        holds the cores they can be ten times slower (see :class:`vigrad._layer_ops.Threads`).  One
        thread when vigrad cannot run the products on its own threads (NumPy's OpenBLAS not
        found, :func:`vigrad.bnn.layer_workers`).  Results are bit-identical for any value.

    Notes
    -----
    Threads: any number of threads may call ``predict``, ``predict_proba``, ``sample_proba`` and
    ``save`` on one model at once, with the bits of serial calls.  ``fit`` holds the model: a
    second ``fit`` on it, or a prediction or save from another thread while it trains, raises a
    RuntimeError (they would see the parameters of different steps).  ``copy.deepcopy(model)``
    gives an independent model, to train copies in parallel.

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
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
            raise TypeError(f"sizes must be a sequence of ints, got {type(sizes).__name__} {sizes!r}")
        sizes = list(sizes)
        for k, n in enumerate(sizes):
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
                raise TypeError(f"sizes[{k}] must be an int, got {type(n).__name__} {n!r} (sizes = {sizes!r})")
        sizes = [int(n) for n in sizes]
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least two layers (input and output), got {sizes}")
        if min(sizes) < 1:
            raise ValueError(f"every layer size must be >= 1, got {sizes}")
        if likelihood not in ("gaussian", "categorical"):
            raise ValueError(f"likelihood must be 'gaussian' or 'categorical', got {likelihood!r}")
        if likelihood == "categorical" and sizes[-1] < 2:
            raise ValueError(f"a categorical likelihood needs >= 2 output classes, got sizes[-1] = {sizes[-1]}")
        prior = default_prior() if prior is None else prior
        _ops.check_kl(kl, prior)
        self.sizes, self.likelihood, self.prior, self.kl = sizes, likelihood, prior, kl
        self.estimator = estimator
        self.num_samples = check_num_samples(num_samples, "num_samples")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.noise_std = None if noise_std is None else check_real(noise_std, "noise_std", positive=True)
        self.init_rho = float(init_rho)
        self.workers = layer_workers(workers)
        self._threads = {k: _Threads(self.workers, workers is None) for k in ("step", "predict")}
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
        self._opt_state = None  # (step count, Adam m, Adam v), kept across fits and in checkpoints
        self.history: Dict[str, list] = {}
        self._guard = _Guard()

    def __getstate__(self):
        # copy.deepcopy and pickle: the guard is per object; the layers' parameter views are
        # re-pointed into the copy's flat vector by __setstate__
        state = self.__dict__.copy()
        del state["_guard"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._guard = _Guard()
        for layer, (sl, sr) in zip(self.layers, self._param_slices):
            layer.loc, layer.rho = self._theta[sl], self._theta[sr]

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
        if not self._learn_noise:
            return self.noise_std
        log_sigma = float(self._theta[-1])
        return math.exp(log_sigma) if log_sigma < 709.0 else math.inf

    def __repr__(self):
        return (f"BayesianMLP({self.sizes}, likelihood={self.likelihood!r}, estimator={self.estimator!r}, "
                f"num_samples={self.num_samples}, dtype={self.dtype})")

    # -- the network ---------------------------------------------------------------------------------
    def _forward(self, x, keys=None, sample=True, train=True, workers=None, row_offset=0):
        """The network's outputs and the ReLU masks; train=False changes no state of the layers
        (safe from many threads at once).  row_offset: the position of x's first row in its
        minibatch (see :meth:`_minibatch_gradient`)."""
        h = np.ascontiguousarray(x, dtype=self.dtype)
        acts = []
        for i, layer in enumerate(self.layers):
            if keys is None:
                h = layer.forward(h, sample=sample)
            else:
                h = layer._forward(h, keys[i], sample, train, workers, row_offset)
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
        if not 0.0 < sigma < math.inf:  # a diverged learned scale: a non-finite loss, which the caller reports
            return math.inf, None, 0.0
        r = (f - y) / sigma
        nll = float(0.5 * np.sum(r * r) + r.size * (math.log(sigma) + 0.5 * math.log(2 * math.pi)))
        g_log_sigma = float(r.size - np.sum(r * r)) if self._learn_noise else 0.0
        return nll, (r / sigma).astype(self.dtype, copy=False), g_log_sigma

    def _minibatch_gradient(self, xb, yb, kl_weight, step, *, row_offset=0, with_kl=True, adam=None,
                            workers=None):
        """The gradient of one minibatch's cost, F = kl_weight KL + the sum of -log p(y | x, w) over
        its rows, averaged over num_samples weight draws: a function of the parameters (the model's
        ``_theta``), the noise keys of ``step`` and the rows (xb, yb).  Fills self._grad (the
        layers write their slices in place); returns (NLL sum over the rows, KL).

        Sums over rows add up: the rows ``[r, r + len(xb))`` of a minibatch, given as
        ``row_offset=r`` (the per-example noise of "local" and "flipout" is keyed by the row's
        place in the minibatch), give the part of the minibatch's gradient those rows contribute,
        and ``with_kl=False`` leaves the KL part out (to be added once).  With ``adam = (m, v,
        (step, lr, b1, b2, eps))`` (one sample only) each layer's kernel takes the Adam step on
        its parameters instead, while the gradient is in cache; only the learned noise scale's
        gradient, if any, is left in self._grad[-1]."""
        nll_tot = kl_tot = 0.0
        L = len(self.layers)
        kl = self.kl if with_kl else "none"
        if self._learn_noise:
            self._grad[-1] = 0
        for s in range(self.num_samples):
            keys = _derive_keys(self._base_key, step, s, L)
            f, acts = self._forward(xb, keys, workers=workers, row_offset=row_offset)
            nll, g, g_ls = self._nll_and_grad(f, yb)
            if not np.isfinite(nll):
                raise TrainingError(f"non-finite loss at step {step}: {self._first_bad_layer(xb, keys, row_offset)}",
                                    step)
            for i in range(L - 1, -1, -1):
                sl, sr = self._param_slices[i]
                if adam is None:
                    res = self.layers[i]._backward(g, kl_weight, kl, out=(self._grad[sl], self._grad[sr]),
                                                   accumulate=s > 0, need_grad_x=i > 0, workers=workers)
                else:
                    m, v, hyper = adam
                    res = self.layers[i]._backward(g, kl_weight, kl, need_grad_x=i > 0,
                                                   adam=((m[sl], v[sl], m[sr], v[sr]), hyper), workers=workers)
                if not self.layers[i]._last_finite:
                    raise TrainingError(f"non-finite gradient in layer {i} at step {step}", step)
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

    def _first_bad_layer(self, x, keys, row_offset=0):
        h = x
        for i, layer in enumerate(self.layers):
            h = layer._forward(h, keys[i], train=False, row_offset=row_offset)
            if not np.isfinite(h).all():
                return f"the output of layer {i} is not finite"
            h = np.maximum(h, 0) if i + 1 < len(self.layers) else h
        if self.likelihood == "gaussian" and not 0.0 < self.noise_scale < math.inf:
            return f"the learned noise scale is {self.noise_scale}"
        return "the likelihood is not finite at these outputs"

    # -- data checks ---------------------------------------------------------------------------------
    def _check_X(self, X, name="X"):
        X = as_float_array(X, name)
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ValueError(f"{name} must have shape (N, {self.sizes[0]}), got {X.shape}")
        return _finite_as(X, name, self.dtype, "model")

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
        return _finite_as(y, name, self.dtype, "model")

    # -- training ----------------------------------------------------------------------------------
    def fit(self, X, y, *, epochs, batch_size=128, lr=None, kl_weighting="uniform", validation_data=None,
            progress=False, shuffle="shuffle", clip_norm=None, early_stopping=None, val_samples=10,
            checkpoint=None, resume=False, optimizer=None, client=None, shards=None):
        """Train by minibatch stochastic optimisation (Adam by default) on
        F_i = kl_weight_i KL[q || prior] - log P(D_i | w).

        Parameters
        ----------
        X : (N, sizes[0]) array; y : labels (N,) or targets (N,) / (N, sizes[-1])
        epochs : int
        batch_size : int
        lr : float or schedule (callable step -> float, e.g. vg.optim.exponential(...)), optional
            The step size of the default optimiser, ``vg.optim.adam(lr)`` (None: 1e-3).
        optimizer : vigrad.optim.Optimizer, optional
            Any optimiser of :mod:`vigrad.optim` instead of ``lr`` (not both).  Adam without
            clipping or weight decay runs on the core's Adam kernel, fused into each layer's
            backward pass with one sample and no ``clip_norm``; any other runs its own update.
            Its step counter is the model's (it continues across fits); the state of an optimiser
            other than Adam lasts for this fit, and ``checkpoint`` keeps Adam's state only.
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
            Save the model and optimiser state after every epoch, atomically (see :meth:`save`:
            a fit stopped at any moment, even by SIGKILL, leaves the previous checkpoint or the
            new one); ``resume=True`` continues from the checkpoint's epoch, reproducing an
            uninterrupted run bit for bit (with or without a client).
        client : dask.distributed.Client, optional
            Data parallelism on Dask's workers (the extra ``vigrad[dask]``).  The training set
            (X and y as checked, in the model's dtype) and the model's recipe (architecture, prior,
            dtype, noise key) are sent once to each worker and stay there.  Every step draws its
            minibatch as without a client, splits it into ``shards`` parts by position and sends
            each part's row indices (8 bytes a row) and the parameters (2P + 1 numbers) to a
            worker inside its task; each worker returns its rows' gradient sum (2P + 1 numbers)
            and NLL sum, computed with the step's noise keys (the weights' noise is regenerated
            there and never travels).  This process adds the parts in shard order, adds the KL part
            (computed here, once, while the workers compute) and takes the optimiser step; the
            parameters and the optimiser state never leave it.  A worker that dies is replaced by
            Dask (a nanny restarts it) and its part computed again: the same bits.  A lost
            scheduler or workers silent for ``vigrad.distributed.TIMEOUT`` seconds raise
            :class:`vigrad.distributed.ShardError` naming the step, with the model at the start of
            that step as a fit stopped there.  Indices rather than rows travel because they are
            smaller on every step's critical path: B x 8 bytes against B x (D + 1) x dtype size
            (the comparison in full, with the cost of the placement:
            ``vigrad.distributed._MinibatchShards``).
        shards : int, optional
            The number of parts of each minibatch, 1 <= shards <= batch_size; default: one per
            worker of ``client``.  Without a client, ``shards=k`` computes the same k parts in this
            process, with the same additions in the same order: a fit with a client of k workers
            and one with ``shards=k`` give the same bits.  Against the unsharded fit the gradient
            differs by the order of its sums only (measured on the digits, 64-32-10, 2 epochs,
            every estimator: the parameters differ by at most one ulp of their largest entries,
            4.8e-7 in float32 and 8.9e-16 in float64; see tests/test_distributed.py).  A sharded
            fit takes the optimiser's separate update (the same Adam kernel), never the update
            fused into the backward pass.  The per-example noise of "local" and "flipout" is keyed
            by the row's position in the minibatch (not by the row's index in X), so each example
            gets the noise it gets unsharded.

        Returns
        -------
        dict
            Per-epoch lists: "loss" (F per example), "nll", "kl", and with validation data
            "val_nll" and "val_accuracy" or "val_rmse".  A sharded fit adds "seconds" (the wall
            time of the epoch's steps) and "wait_seconds" (of which waiting for the shards' parts:
            for the workers with a client, computing them without), and with ``progress`` prints
            the workers, the shards and the bytes sent and received per step.

        Raises
        ------
        TrainingError
            On a non-finite loss, gradient or validation output.  The parameters and the
            optimiser state are first rolled back to the start of the last step whose loss and
            gradient were finite (``err.restored_step``), bit for bit as a fit stopped there; the
            error says so.  The rollback costs a copy of the parameters and the optimiser state
            every 32 steps (two such copies are kept) and, on failure, the replay of at most 32 steps.
        RuntimeError
            When the model is already being trained (see the class notes on threads).
        vigrad.distributed.ShardError
            With ``client``: the cluster failed (``.step`` names the step; the model is at its start).

        Any other exception inside a step (a KeyboardInterrupt) leaves the model at the start of
        that step, never half updated.

        Notes
        -----
        The pieces of the training loop (minibatches, KL weights, the optimiser's step, history,
        validation and early stopping, checkpoints, rollback) are in :mod:`vigrad._trainer`; the
        gradient of a minibatch is :meth:`_minibatch_gradient`.
        """
        with self._guard.training():
            return self._fit(X, y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                             kl_weighting=kl_weighting, validation_data=validation_data, progress=progress,
                             shuffle=shuffle, clip_norm=clip_norm, early_stopping=early_stopping,
                             val_samples=val_samples, checkpoint=checkpoint, resume=resume, client=client,
                             shards=shards)

    def _fit(self, X, y, *, epochs, batch_size, lr, optimizer, kl_weighting, validation_data, progress, shuffle,
             clip_norm, early_stopping, val_samples, checkpoint, resume, client, shards):
        """fit, with the model held for training (see _Guard): every argument is checked first,
        then the driver runs the steps and closes the epochs."""
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        N = X.shape[0]
        if N == 0:
            raise ValueError("X must hold at least one example")
        plan = _trainer.BatchPlan.make(N, batch_size, epochs, shuffle)
        kl_w = _trainer.kl_weights(plan.per_epoch, kl_weighting)
        opt = _trainer.resolve_optimizer(lr, optimizer)
        if clip_norm is not None:
            clip_norm = check_real(clip_norm, "clip_norm", positive=True)
        val = None
        if validation_data is not None:
            Xv = self._check_X(validation_data[0], "validation X")
            val = (Xv, self._check_y(validation_data[1], Xv.shape[0], "validation y"))
            val_samples = check_num_samples(val_samples, "val_samples")
        if early_stopping is not None and val is None:
            raise ValueError("early_stopping needs validation_data")
        stopper = None if early_stopping is None else _trainer.EarlyStop(early_stopping)
        _trainer.check_checkpointable(opt, checkpoint, resume)
        if client is not None or shards is not None:
            from . import distributed as _distributed

            shards = _distributed._check_fit_shards(client, shards, plan.batch_size)

        start_epoch = _trainer.restore_checkpoint(self, checkpoint) if resume else 0
        if self._opt_state is None:
            self._opt_state = (0, np.zeros_like(self._theta), np.zeros_like(self._theta))
        if not resume:
            self.history = _trainer.new_history(val is not None, self.likelihood)
        history = _trainer.History(self.history, N, plan.per_epoch, plan.epochs, self.likelihood)
        step, m, v = self._opt_state
        updater = _trainer.Updater(opt, self._theta, m, v)
        # the fused path (Adam inside each layer's backward kernel) needs the whole gradient of a
        # step from one pass: one sample and no clipping by the global norm
        # (a sharded step (client or shards) takes the separate update: its gradient comes in parts)
        fused = updater.fusable and self.num_samples == 1 and clip_norm is None and shards is None
        # the placement (after the checkpoint's noise key is restored): the data goes out once here
        sharded = None if shards is None else _distributed._MinibatchShards(self, X, y, shards, client)
        dirty = False  # True while a step may have written part of theta or the optimiser state

        def train_step(s, indices, i, sharded=sharded):
            """Step s on minibatch `indices` (number i of its epoch), in place on theta and the state."""
            nonlocal dirty
            if sharded is None:
                dirty = True
                return self._threads["step"].run(lambda w: self._train_step(
                    X[indices], y[indices], float(kl_w[i]), s, updater, fused, clip_norm, w))
            hyper = updater.hyper(s) if updater.fusable else None  # the schedule first, as _train_step
            nll, klv = sharded.gradient(indices, float(kl_w[i]), s)  # writes only the work array _grad
            dirty = True
            self._apply_update(s, updater, clip_norm, self.workers, hyper)
            return nll, klv

        def replay(s, indices, i):
            """A step again, for the rollback: a sharded fit's in this process (the same bits, and no
            need of a cluster that may be what failed)."""
            return train_step(s, indices, i, None if sharded is None else sharded.in_process())

        # On a non-finite step (TrainingError) the model goes back to the start of the step
        # before; on any other exception in the middle of a step (KeyboardInterrupt, a lost
        # cluster), to the start of that step: never left diverged or half updated.
        rewind = _trainer.Rewind((self._theta,) + updater.arrays, step)
        t0 = time.perf_counter()
        try:
            if sharded is not None and progress:
                print(sharded.describe(plan.batch_size), file=sys.stderr, flush=True)
            data_seed = _derive_keys(self._base_key, 2**62, 0, 1)[0]  # the minibatches' own stream of keys
            t_epoch = time.perf_counter()
            for batch in plan.batches(data_seed, start_epoch):
                i = batch.step % plan.per_epoch
                rewind.record(step, batch.indices, i)
                nll, klv = train_step(step, batch.indices, i)
                step += 1
                dirty = False
                history.add_step(nll, klv, len(batch.indices))
                if i == plan.per_epoch - 1:
                    timing = None
                    if sharded is not None:  # this epoch's wall time and time waiting for the shards
                        timing = (time.perf_counter() - t_epoch, sharded.wait_seconds)
                        sharded.wait_seconds = 0.0
                    if self._end_epoch(batch.step // plan.per_epoch, step, history, val, val_samples, stopper,
                                       progress, t0, checkpoint, timing):
                        break
                    t_epoch = time.perf_counter()
        except TrainingError as exc:
            failed = step if exc.step is None else exc.step
            back = rewind.rewind(failed - 1, replay)
            self._opt_state = (back, m, v)
            history.roll_back(back)
            where = (f"the start of step {back}, the last step whose loss and gradient were finite" if back < failed
                     else f"step {back}, as before this fit")
            raise TrainingError(f"{exc}; the parameters and the optimiser state are rolled back to {where}",
                                failed, back) from None
        except BaseException as exc:
            if dirty:
                rewind.rewind(step, replay)
            self._opt_state = (step, m, v)
            if sharded is not None and isinstance(exc, _distributed.ShardError):
                raise _distributed.ShardError(f"{exc}; the parameters and the optimiser state are those at the start "
                                              f"of step {step}, as a fit stopped there", exc.shard, exc.step) from exc
            raise
        finally:
            if sharded is not None:
                sharded.close()
        self._opt_state = (step, m, v)
        if stopper is not None:
            stopper.restore(self._theta)
        return self.history

    def _end_epoch(self, epoch, step, history, val, val_samples, stopper, progress, t0, checkpoint,
                   timing=None) -> bool:
        """After the last step of an epoch: its history (and a sharded fit's ``timing``, (seconds,
        seconds waiting for the shards)), validation, early stopping, progress line and checkpoint.
        True when early stopping ends the fit."""
        self._opt_state = (step,) + tuple(self._opt_state[1:])
        history.end_epoch(step)
        if timing is not None:
            history.add_timing(*timing)
        stop = False
        if val is not None:
            try:
                vn, vm = _trainer.validation_metrics(self, *val, val_samples, epoch)
            except ValueError as exc:  # non-finite outputs: the parameters of this step diverged
                raise TrainingError(f"validation after step {step - 1} (epoch {epoch + 1}): {exc}", step) from None
            history.add_validation(vn, vm)
            stop = stopper is not None and stopper.update(vn, self._theta)
        if progress:
            print(history.line(epoch, time.perf_counter() - t0), file=sys.stderr, flush=True)
        if checkpoint is not None:
            self.save(checkpoint)
        return stop

    def _train_step(self, xb, yb, kl_weight, step, updater, fused, clip_norm, workers=None):
        """One optimiser step on a minibatch, in place on theta and the optimiser's state;
        returns (NLL sum, KL)."""
        nw = self.workers if workers is None else workers
        hyper = updater.hyper(step) if updater.fusable else None  # the schedule first: nothing written if it raises
        if fused:  # one sample, no clipping: each layer's kernel takes its Adam step
            nll, klv = self._minibatch_gradient(xb, yb, kl_weight, step, adam=(updater.m, updater.v, hyper),
                                                workers=nw)
            if self._learn_noise:
                _core.adam_update(self._theta[-1:], self._grad[-1:], updater.m[-1:], updater.v[-1:], *hyper, 1)
            return nll, klv
        nll, klv = self._minibatch_gradient(xb, yb, kl_weight, step, workers=nw)
        self._apply_update(step, updater, clip_norm, nw, hyper)
        return nll, klv

    def _apply_update(self, step, updater, clip_norm, workers, hyper):
        """The optimiser's step from the gradient in self._grad (clipped first when asked)."""
        if clip_norm is not None:
            _trainer.clip_global_norm(self._grad, clip_norm)
        updater.apply(self._theta, self._grad, step, workers, hyper)

    # -- prediction ----------------------------------------------------------------------------------
    def _sample_outputs(self, X, num_samples, rng, what):
        X = self._check_X(X)
        S = check_num_samples(num_samples, "num_samples")
        base = int(resolve_rng(rng).integers(0, 2**64, dtype=np.uint64)) if rng is not None else self._base_key ^ 0xA5A5
        out = np.empty((S, X.shape[0], self.sizes[-1]), self.dtype)
        with self._guard.reading(what):
            for s in range(S):
                keys = _derive_keys(base, 2**61, s, len(self.layers))
                out[s], _ = self._threads["predict"].run(lambda w: self._forward(X, keys, train=False, workers=w))
            noise = self.noise_scale
        if not np.isfinite(out).all():
            bad = ~np.isfinite(out).all(axis=2)
            s, n = (int(k) for k in np.argwhere(bad)[0])
            raise ValueError(f"the network's outputs are not finite for {int(bad.sum())} of the {S} x {X.shape[0]} "
                             f"(sample, example) pairs, the first at sample {s}, example {n}: the inputs are too "
                             f"large for these parameters, or the parameters diverged")
        return out, noise

    def predict_proba(self, X, *, num_samples=30, rng=None):
        """Classification: the Monte Carlo average of softmax over num_samples weight draws, (N, classes).
        Like every prediction, a ValueError when a network output is not finite."""
        if self.likelihood != "categorical":
            raise ValueError("predict_proba needs a categorical likelihood")
        return self._proba(X, num_samples, rng, "predict_proba").mean(axis=0)

    def sample_proba(self, X, *, num_samples=30, rng=None):
        """Per-draw softmax probabilities (S, N, classes), for vg.metrics.mutual_information."""
        return self._proba(X, num_samples, rng, "sample_proba")

    def _proba(self, X, num_samples, rng, what):
        f = self._sample_outputs(X, num_samples, rng, what)[0].astype(np.float64)
        f -= f.max(axis=2, keepdims=True)
        e = np.exp(f)
        return e / e.sum(axis=2, keepdims=True)

    def predict(self, X, *, num_samples=30, return_std=False, rng=None):
        """Regression: the predictive mean (N,) or (N, out) (and the predictive sd, which includes
        the noise); classification: the labels of the highest averaged probability."""
        if self.likelihood == "categorical":
            return self._proba(X, num_samples, rng, "predict").mean(axis=0).argmax(axis=1)
        f, noise = self._sample_outputs(X, num_samples, rng, "predict")
        f = f.astype(np.float64)
        mean = f.mean(axis=0)
        squeeze = self.sizes[-1] == 1
        if not return_std:
            return mean[:, 0] if squeeze else mean
        std = np.sqrt(f.var(axis=0) + noise**2)
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
        versioned .npz with a SHA-256 checksum.

        The file is replaced atomically (a temporary file in the same folder, flushed and
        fsynced, then renamed over ``path``): whenever the process stops, even by SIGKILL or a
        power cut, ``path`` holds the previous file or the new one, never a mix.  A kill in the
        middle can leave the temporary file (``.<name>.<pid>.<random>.tmp``) behind."""
        with self._guard.reading("save"):
            meta = json.dumps(self._metadata(), sort_keys=True)
            m, v = (self._opt_state[1], self._opt_state[2]) if self._opt_state is not None else (
                np.zeros(0, self.dtype), np.zeros(0, self.dtype))
            arrays = [self._theta, m, v]
            checksum = self._checksum(meta, arrays)
            _write_atomically(path, lambda fh: np.savez(fh, meta=np.array(meta), theta=self._theta, adam_m=m,
                                                        adam_v=v, checksum=np.array(checksum)))

    @classmethod
    def _from_metadata(cls, meta, workers=None) -> "BayesianMLP":
        """A model of the architecture, prior, dtype and noise key in ``meta`` (:meth:`_metadata`),
        its parameters those of a new model (``load`` fills them; a sharded fit sends them)."""
        p = meta["prior"]
        prior = (Normal(p["loc"], p["scale"]) if p["kind"] == "normal"
                 else ScaleMixtureNormal(p["pi"], p["sigma1"], p["sigma2"]))
        model = cls(meta["sizes"], likelihood=meta["likelihood"], prior=prior, estimator=meta["estimator"],
                    num_samples=meta["num_samples"], dtype=np.dtype(meta["dtype"]), rng=0,
                    noise_std=meta["noise_std"], init_rho=meta["init_rho"], kl=meta["kl"], workers=workers)
        model._base_key = int(meta["base_key"])
        return model

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
        model = cls._from_metadata(meta)
        if theta.shape != model._theta.shape:
            raise ValueError(f"{path!r}: {theta.size} parameters stored, the architecture needs {model._theta.size}")
        model._theta[...] = theta
        model.history = meta["history"]
        if m.size:
            model._opt_state = (int(meta["step"]), m.copy(), v.copy())
        return model
