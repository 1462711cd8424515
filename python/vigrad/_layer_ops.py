"""The Bayes-by-Backprop linear layer, written once for every front end.

:class:`vigrad.BayesianLinear` (NumPy arrays) and :class:`vigrad.torch.BayesianLinear` (torch
tensors) are thin front ends over this module.  It holds, once:

- the forward pass of the three estimators (:meth:`LinearOps.forward`): "reparam" (one weight
  sample per forward, Blundell et al. 2015), "local" (the local reparameterisation trick, Kingma
  et al. 2015: pre-activations sampled per example from N(x mu^T + mu_b, x^2 sigma^2^T + sigma_b^2))
  and "flipout" (Wen et al. 2018: one perturbation shared by the minibatch, decorrelated per
  example by random signs of inputs and outputs);
- the backward pass up to the data gradients the fused core kernel takes (:meth:`LinearOps.backward`),
  and that kernel, which adds the KL part and assembles dF/dloc, dF/drho (:meth:`ParamOps.param_grads`,
  shared with vigrad.torch's convolution, as is the forward's noise call :meth:`ParamOps.noise`);
- the keys: :func:`derive_keys` (a pure function of (base, step, sample)), the salt of the local
  estimator's per-example draws, the Flipout signs; and the default prior and the argument checks.

The arithmetic is parameterised by the *products* a front end gives (:class:`NumpyProducts`, or
vigrad.torch's on torch.mm / addmm): ``linear(x, W, b) = x W^T + b``, ``matmul(a, b) = a b``,
``matmul_add(out, a, b): out += a b`` and ``param_grad(G, x, out) = [G^T x, 1^T G]``, plus the
array plumbing (``empty``, ``wrap``, ``numpy``, ``sqrt``).  Everything else -- the elementwise
arithmetic, its order, the noise -- is here, so that both front ends compute the same thing in the
same order; the products are where they differ (vigrad's gemm on its own threads, or torch's BLAS).

Per-example noise ("local" and "flipout") is a pure function of the key and the row's position in
the minibatch: a forward over the rows ``[row_offset, row_offset + B)`` of a minibatch draws the
noise those rows get in a forward over the whole minibatch, so a minibatch split into shards gives
every example the noise it has unsplit.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, List, NamedTuple, Optional

import numpy as np

from . import _blas, _core
from .distributions import Normal, ScaleMixtureNormal

__all__ = ["ESTIMATORS", "KL_MODES", "LOCAL_KEY_SALT", "LinearOps", "NumpyProducts", "ParamOps", "Saved", "Threads",
           "check_estimator", "check_kl", "check_prior", "default_prior", "derive_keys", "derive_step_keys",
           "flipout_signs", "local_noise", "split"]

ESTIMATORS = ("reparam", "local", "flipout")
KL_MODES = ("mc", "analytic")
#: XORed into a forward's key for the local reparameterisation's per-example draws.
LOCAL_KEY_SALT = 0x5DEECE66D
#: Below this many multiply-adds a matrix product runs on one thread (the core's kMinParallelWork).
MIN_PARALLEL_WORK = 1 << 21


# -- priors, estimators, keys --------------------------------------------------------------------
def default_prior():
    """Blundell et al.'s scale mixture 0.5 N(0, 1) + 0.5 N(0, e^-12) (sigma2 = e^-6)."""
    return ScaleMixtureNormal(0.5, 1.0, math.exp(-6))


def check_estimator(estimator, choices=ESTIMATORS) -> str:
    """``estimator`` one of ``choices`` (a layer that has no use for some estimator passes fewer)."""
    if not isinstance(estimator, str) or estimator not in choices:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, choices))}, got {estimator!r}")
    return estimator


def check_prior(prior):
    if not isinstance(prior, (Normal, ScaleMixtureNormal)):
        raise TypeError(f"prior must be a vigrad Normal or ScaleMixtureNormal, got {type(prior).__name__}")
    return prior


def check_kl(kl, prior, modes=KL_MODES) -> str:
    """``kl`` one of ``modes``; "analytic" only with a Normal prior (the scale mixture has no closed form)."""
    if not isinstance(kl, str) or kl not in modes:
        names = ", ".join(map(repr, modes[:-1])) + f" or {modes[-1]!r}"
        raise ValueError(f"kl must be {names}, got {kl!r}")
    if kl == "analytic" and not isinstance(prior, Normal):
        raise ValueError("kl='analytic' needs a Normal prior (no closed form for the scale mixture); use kl='mc'")
    return kl


def derive_keys(base: int, step: int, sample: int, n: int) -> List[int]:
    """n 64-bit keys for (step, sample), a pure function of (base, step, sample): training
    resumed at any step draws exactly the noise of an uninterrupted run."""
    ctr = np.zeros((n, 4), dtype=np.uint32)
    ctr[:, 0] = np.arange(n, dtype=np.uint32)
    ctr[:, 1] = sample & 0xFFFFFFFF
    ctr[:, 2] = step & 0xFFFFFFFF
    ctr[:, 3] = (step >> 32) & 0xFFFFFFFF
    out = _core.philox4x32_10(ctr, base).astype(np.uint64)
    return [int(x) for x in (out[:, 0] | (out[:, 1] << np.uint64(32)))]


def derive_step_keys(base: int, first_step: int, n: int, sample: int) -> np.ndarray:
    """The keys ``derive_keys(base, step, sample, 1)[0]`` of the n steps ``first_step, ...,
    first_step + n - 1`` in one call of the generator (uint64 array): a layer draws a block of
    its forwards' keys at once instead of one call per forward."""
    steps = np.arange(first_step, first_step + n, dtype=np.uint64)
    ctr = np.zeros((n, 4), dtype=np.uint32)
    ctr[:, 1] = sample & 0xFFFFFFFF
    ctr[:, 2] = (steps & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    ctr[:, 3] = (steps >> np.uint64(32)).astype(np.uint32)
    out = _core.philox4x32_10(ctr, base).astype(np.uint64)
    return out[:, 0] | (out[:, 1] << np.uint64(32))


def flipout_signs(key: int, row_offset: int, rows: int, n_in: int, n_out: int, dtype) -> np.ndarray:
    """Flipout's signs (+-1 in ``dtype``) for the rows ``[row_offset, row_offset + rows)`` of a
    minibatch, shape (rows, n_in + n_out): input signs first, then output signs.  Row r's signs are
    row r of NumPy's generator seeded by the key, drawn row after row (so a row's signs do not
    depend on how many rows follow it)."""
    signs = np.random.default_rng(key).integers(0, 2, size=(row_offset + rows, n_in + n_out), dtype=np.int8)
    out = signs[row_offset:].astype(dtype)
    out *= 2
    out -= 1
    return out


def local_noise(key: int, row_offset: int, rows: int, n_out: int, dtype, workers: int) -> np.ndarray:
    """The local estimator's pre-activation noise for the rows ``[row_offset, row_offset + rows)``
    of a minibatch, shape (rows, n_out): entry (r, j) is the core's normal draw (key ^ salt, 0,
    r * n_out + j), a pure function of the key and the position."""
    z = np.empty((1, (row_offset + rows) * n_out), dtype)
    _core.standard_normal(key ^ LOCAL_KEY_SALT, z, workers)
    return z[0, row_offset * n_out:].reshape(rows, n_out)


def split(flat, n_in: int, n_out: int):
    """The weight (n_out, n_in) and bias (n_out,) views of a flat parameter vector (weights first)."""
    k = n_in * n_out
    return flat[:k].reshape(n_out, n_in), flat[k:]


# -- threads -------------------------------------------------------------------------------------
class Threads:
    """How many threads a repeated call runs on: a fixed number (``workers`` given), or with
    ``workers=None`` one thread or all of them, whichever measures faster, re-measured as the
    machine's load changes.

    Why measure: vigrad's threads are an OpenMP team (libgomp, one pool shared with PyTorch when
    both are loaded), whose idle threads spin for a while (GOMP_SPINCOUNT) before they sleep.  On
    an idle machine a team of two runs a large network's step up to ~1.8x faster than one thread;
    when other processes hold the cores, each parallel region waits at its barrier for a thread
    the OS has not scheduled, while the spinning ones take the CPU from it (measured on 2 cores
    with other work running: 784-400-400-10, batch 128, 11 ms per step on one thread, 122 ms on
    two).  No fixed choice comes within 1.3x of the best in both cases; a measurement does.  The
    results are bit-identical for any number of threads, so switching never changes them.

    The first calls alternate between the choices (the first of each discarded: thread start,
    page faults); then the faster by an exponential moving average of the call times is used,
    and the other one is timed once every ``PROBE * (its time / the best time)`` calls, so that
    the probes cost about 1/PROBE of the time and the choice follows the load."""

    SAMPLES, PROBE, MAX_GAP, ALPHA = 3, 32, 4096, 0.3

    def __init__(self, workers, auto):
        self.choices = (1, workers) if auto and workers > 1 else (workers,)
        self._reset()

    def _reset(self):
        self._lock = threading.Lock()
        self._seen = dict.fromkeys(self.choices, 0)
        self._ema = {}
        self._calls = self._next_probe = 0

    def __getstate__(self):  # copies and pickles start measuring afresh
        return {"choices": self.choices}

    def __setstate__(self, state):
        self.choices = state["choices"]
        self._reset()

    def pick(self) -> int:
        if len(self.choices) == 1:
            return self.choices[0]
        with self._lock:
            fewest = min(self.choices, key=self._seen.get)
            if self._seen[fewest] <= self.SAMPLES:  # one discarded + SAMPLES timed, alternating
                return fewest
            best = min(self.choices, key=self._ema.get)
            if self._calls >= self._next_probe:
                return self.choices[0] if best != self.choices[0] else self.choices[1]
            return best

    def record(self, choice, seconds):
        with self._lock:
            self._calls += 1
            self._seen[choice] += 1
            if self._seen[choice] == 1:
                return
            old = self._ema.get(choice)
            self._ema[choice] = seconds if old is None else old + self.ALPHA * (seconds - old)
            if len(self._ema) < len(self.choices):
                return
            best = min(self._ema.values())
            if self._ema[choice] > best:  # the other one was timed: when to time it next
                gap = self.PROBE * self._ema[choice] / max(best, 1e-9)
                self._next_probe = self._calls + int(min(gap, self.MAX_GAP))

    def run(self, fn):
        """fn(workers), on the chosen number of threads, timed when there is a choice."""
        if len(self.choices) == 1:
            return fn(self.choices[0])
        w = self.pick()
        t0 = time.perf_counter()
        out = fn(w)
        self.record(w, time.perf_counter() - t0)
        return out


# -- the products a front end gives --------------------------------------------------------------
class NumpyProducts:
    """The NumPy front end's products: vigrad's gemm on the OpenMP team that runs the fused
    kernels (see :mod:`vigrad._blas`; NumPy's matmul where no OpenBLAS is registered), on one
    thread below ~2M multiply-adds, where a team's start and barrier cost more than they save.
    ``buffer(name, n)``, when given, supplies persistent 1-D work arrays for the gradients."""

    def __init__(self, workers: int, dtype, buffer=None):
        self.workers = workers
        self.dtype = np.dtype(dtype)
        self._buffer = buffer

    def _mm(self, a, b, **kw):
        rows, inner = (a.shape[1], a.shape[0]) if kw.get("trans_a") else a.shape
        cols = b.shape[0] if kw.get("trans_b") else b.shape[1]
        return _blas.matmul(a, b, workers=self.workers if rows * inner * cols >= MIN_PARALLEL_WORK else 1, **kw)

    def linear(self, x, W, b):
        out = self._mm(x, W, trans_b=True)
        out += b
        return out

    def matmul(self, a, b):
        return self._mm(a, b)

    def matmul_add(self, out, a, b):
        self._mm(a, b, out=out, accumulate=True)

    def param_grad(self, G, x, out):
        self._mm(G, x, trans_a=True, out=out[:G.shape[1] * x.shape[1]].reshape(G.shape[1], x.shape[1]))
        np.sum(G, axis=0, out=out[G.shape[1] * x.shape[1]:])
        return out

    def work(self, name, n):
        return np.empty(n, self.dtype) if self._buffer is None else self._buffer(name, (n,))

    def empty(self, n):
        return np.empty(n, self.dtype)

    @staticmethod
    def wrap(a):
        return a

    @staticmethod
    def numpy(a):
        return a

    @staticmethod
    def sqrt(a):
        return np.sqrt(a)


# -- the layer ---------------------------------------------------------------------------------------
class Saved(NamedTuple):
    """What a sampled forward keeps for its backward (None where the estimator has no use for it)."""

    key: int
    x: Any
    W: Any = None  # reparam: the sampled weights (n_out, n_in)
    M: Any = None  # flipout, local: the mean weights
    xs: Any = None  # flipout: x * S
    S: Any = None  # flipout: input signs (B, n_in)
    R: Any = None  # flipout: output signs (B, n_out)
    dW: Any = None  # flipout: the weight perturbation
    x2: Any = None  # local: x * x
    V: Any = None  # local: the weight variances
    std: Any = None  # local: the pre-activations' sd
    zeta: Any = None  # local: the pre-activation noise
    sigma: Any = None  # local: softplus(rho), flat


class ParamOps:
    """The core's two calls on a layer's flat mean-field Gaussian (``num_params`` weights, any layer
    shape) under one prior and dtype: the noise with the KL value at it (:meth:`noise`, the forward)
    and the fused gradient kernel (:meth:`param_grads`, the backward).  :class:`LinearOps` adds the
    linear layer's products; vigrad.torch's convolution uses these two calls around torch's conv2d."""

    def __init__(self, num_params: int, prior, dtype):
        self.num_params = num_params
        self.prior = check_prior(prior)
        self.dtype = np.dtype(dtype)
        normal = isinstance(prior, Normal)
        self.grad_kernel = _core.bbb_grad_normal if normal else _core.bbb_grad_mixture
        self.noise_kernel = _core.bbb_noise_kl_normal if normal else _core.bbb_noise_kl_mixture
        self.prior_params = prior._flat_params(self.dtype, (self.num_params,))

    def noise(self, p, use, kl, key, loc, rho, out, workers) -> Optional[float]:
        """The noise of ``key`` into ``out`` (use "weights": loc + sigma eps; "perturbation": sigma eps;
        "none": nothing) and the layer's KL value at the weights of that key (kl "mc" or "analytic";
        None for "none"), in one pass of the core."""
        if use == "none" and kl == "none":
            return None
        klv = self.noise_kernel(use, kl, key, p.numpy(loc), p.numpy(rho), None if out is None else p.numpy(out),
                                *self.prior_params, workers)
        return None if kl == "none" else klv

    def param_grads(self, data, kl, key, loc, rho, A, BC, kl_weight, workers, **kw):
        """The fused kernel (NumPy arrays): dF/dloc, dF/drho for F = NLL + kl_weight KL from the data
        gradients (see :meth:`LinearOps.backward`), the KL part (kl "mc", "analytic" or "none") at the
        weights of ``key`` regenerated from it.  Returns ``(grad_loc, grad_rho, kl_value, finite)``; ``kw``
        passes the kernel's options (out_loc / out_rho / accumulate, compute_kl, a fused Adam step)."""
        return self.grad_kernel(data, kl, key, loc, rho, A, BC, *self.prior_params, kl_weight, workers, **kw)


class LinearOps(ParamOps):
    """The operations of a Bayesian linear layer (n_in -> n_out) for one estimator, prior and dtype.

    The parameters are flat (weights (n_out, n_in) row-major, then biases), as are the gradients
    the fused kernel returns.  ``p`` in every method is the front end's products (see the module's
    docstring); ``loc`` and ``rho`` are C-contiguous arrays of the front end's type whose memory
    ``p.numpy`` hands to the core without a copy."""

    def __init__(self, n_in: int, n_out: int, estimator: str, prior, dtype):
        self.estimator = check_estimator(estimator)
        super().__init__(n_in * n_out + n_out, prior, dtype)
        self.n_in, self.n_out = n_in, n_out

    def mean(self, p, x, loc):
        """Outputs with the mean weights: x M^T + mu_b (no noise)."""
        M, mb = split(loc, self.n_in, self.n_out)
        return p.linear(x, M, mb)

    def forward(self, p, key, x, loc, rho, *, kl="none", noise_out=None, row_offset=0, workers=1):
        """The sampled forward of the rows ``[row_offset, row_offset + B)`` of a minibatch.

        Returns ``(y, kl_value, saved)``: the outputs (B, n_out), the KL value at this key's weights
        (None for kl="none": the backward's kernel then forms it), and what :meth:`backward` needs.
        ``noise_out``: a flat array for the sampled weights (or perturbation), else a new one."""
        n_in, n_out, P = self.n_in, self.n_out, self.num_params
        B = x.shape[0]
        M, mb = split(loc, n_in, n_out)
        if self.estimator == "reparam":
            w = p.empty(P) if noise_out is None else noise_out
            klv = self.noise(p, "weights", kl, key, loc, rho, w, workers)
            W, b = split(w, n_in, n_out)
            return p.linear(x, W, b), klv, Saved(key, x, W=W)
        if self.estimator == "flipout":
            dw = p.empty(P) if noise_out is None else noise_out
            klv = self.noise(p, "perturbation", kl, key, loc, rho, dw, workers)
            dW, db = split(dw, n_in, n_out)
            signs = p.wrap(flipout_signs(key, row_offset, B, n_in, n_out, self.dtype))
            S, R = signs[:, :n_in], signs[:, n_in:]
            xs = x * S
            pert = p.linear(xs, dW, db)
            pert *= R
            out = p.linear(x, M, mb)
            out += pert
            return out, klv, Saved(key, x, M=M, xs=xs, S=S, R=R, dW=dW)
        # local reparameterisation: the KL at a weight sample of the key, separate from the
        # pre-activation noise (salted key)
        klv = self.noise(p, "none", kl, key, loc, rho, None, workers)
        sigma = p.wrap(_core.softplus(p.numpy(rho), workers))
        var = sigma * sigma
        V, vb = split(var, n_in, n_out)
        x2 = x * x
        std = p.sqrt(p.linear(x2, V, vb))
        zeta = p.wrap(local_noise(key, row_offset, B, n_out, self.dtype, workers))
        out = p.linear(x, M, mb)
        out += std * zeta
        return out, klv, Saved(key, x, M=M, x2=x2, V=V, std=std, zeta=zeta, sigma=sigma)

    def backward(self, p, saved: Saved, G, *, need_x=True, need_params=True):
        """Backward of the data term given G = dNLL/dy (B, n_out): ``(grad_x, A, B_or_C, data)``,
        grad_x None unless ``need_x``; A (and B or C) are the flat data gradients the fused kernel
        takes (``p.work`` arrays), None unless ``need_params``; ``data`` names their kind for the
        kernel ("reparam": A = dNLL/dw; "times_eps": A, B with dNLL/dsigma = B eps; "direct":
        A = dNLL/dloc, C = dNLL/dsigma)."""
        P = self.num_params
        x = saved.x
        A = p.param_grad(G, x, p.work("A", P)) if need_params else None
        grad_x = BC = None
        if self.estimator == "reparam":
            if need_x:
                grad_x = p.matmul(G, saved.W)
            return grad_x, A, None, "reparam"
        if self.estimator == "flipout":
            GR = G * saved.R
            if need_params:
                BC = p.param_grad(GR, saved.xs, p.work("B", P))
            if need_x:
                grad_x = p.matmul(GR, saved.dW)
                grad_x *= saved.S
                p.matmul_add(grad_x, G, saved.M)
            return grad_x, A, BC, "times_eps"
        H = G * saved.zeta / (2.0 * saved.std)
        if need_params:
            BC = p.param_grad(H, saved.x2, p.work("B", P))
            BC *= saved.sigma
            BC *= 2.0  # dNLL/dsigma = 2 sigma dNLL/dvar
        if need_x:
            grad_x = p.matmul(H, saved.V)
            grad_x *= x
            grad_x *= 2.0
            p.matmul_add(grad_x, G, saved.M)
        return grad_x, A, BC, "direct"
