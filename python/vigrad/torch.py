"""PyTorch adapter: vigrad's fused kernels as autograd functions and a Bayes-by-Backprop layer.

``import vigrad.torch as vgt`` (needs ``pip install vigrad[torch]``; ``import vigrad`` alone never
imports torch).  Everything here runs vigrad's C++ core on the memory of CPU tensors (float32 or
float64): contiguous tensors are handed over as zero-copy NumPy views, the core's outputs come back
through ``torch.from_numpy``.

- :func:`sample_weights`: ``w = loc + softplus(rho) * eps`` and the KL term, differentiable in
  ``loc`` and ``rho`` through the fused pathwise kernel (one call for both outputs' gradients).
- :class:`BayesianLinear`: an ``nn.Module`` with a mean-field Gaussian over its weights and
  biases, estimators "reparam", "local" (local reparameterisation) and "flipout", the noise drawn
  by vigrad's counter-based generator and regenerated in the backward pass, whose single fused
  kernel call yields dF/dloc and dF/drho for ``F = NLL + kl_weight * KL``.
- :class:`BayesianConv2d`: the same for a 2-D convolution (torch's conv2d on the sampled kernel),
  estimators "reparam" and "flipout".
- :func:`kl_loss`: the sum of the KL terms of every vigrad layer in a model, from this step's
  forward (a stale one raises :class:`StaleKLError`).

Eval mode (``module.eval()``) uses the mean weights: no noise, no KL recorded.  To draw Monte
Carlo predictions in eval mode, wrap them in ``with vgt.sampling(model): ...``.

Threads: vigrad's core and PyTorch load the same OpenMP runtime (libgomp), so their parallel
regions share one pool of threads, whose idle threads spin for a while before they sleep.  On a
machine where other processes hold the cores, every region then waits at its barrier for a
thread the OS has not scheduled: a small network's step can take 100x longer with two threads
than with one (measured on 2 cores shared with several busy processes, 64-128-10 at batch 64:
175 ms against 1.2 ms), in PyTorch's own operations as much as in vigrad's.  vigrad's layers
choose their threads by measurement (``workers=None``); for PyTorch's, ``torch.set_num_threads(1)``
for a small model, or ``OMP_WAIT_POLICY=passive`` in the environment before Python starts (idle
threads then sleep at once), removes the stalls (see bench/test_bench_threads.py).

Examples
--------
>>> import torch, vigrad as vg, vigrad.torch as vgt
>>> model = torch.nn.Sequential(vgt.BayesianLinear(4, 8, seed=0), torch.nn.ReLU(),
...                             vgt.BayesianLinear(8, 3, seed=1))
>>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
>>> loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") + 0.01 * vgt.kl_loss(model)
>>> loss.backward()
>>> model[0].loc.grad.shape, model[0].rho.grad.shape
(torch.Size([40]), torch.Size([40]))
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import time
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import _core
from . import _layer_ops as _ops
from ._layer_ops import Threads as _Threads
from ._validation import check_num_samples, check_real, resolve_workers
from .distributions import Normal

__all__ = ["BayesianConv2d", "BayesianLinear", "DeviceError", "StaleKLError", "derive_key", "kl_loss", "sample_weights",
           "sampling"]

_ESTIMATORS = _ops.ESTIMATORS
_KL_MODES = _ops.KL_MODES
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: XORed into the key for the local reparameterisation's per-example draws (as vigrad.bnn).
_LOCAL_KEY_SALT = _ops.LOCAL_KEY_SALT
#: Serialises the read-and-advance of a layer's noise counter, so that two threads forwarding one
#: layer at once never draw the same key.  One lock for every layer (a Lock attribute would not
#: survive copy.deepcopy or pickling of a module), held for two array accesses.
_COUNTER_LOCK = threading.Lock()


class DeviceError(TypeError, ValueError):
    """A tensor is not on the CPU (vigrad's core runs on CPU memory); both a TypeError and a ValueError."""


class StaleKLError(RuntimeError):
    """:func:`kl_loss` was called when a layer holds no KL term of the current step: before any
    sampled forward, or after a backward pass has consumed the forward that produced it."""


class _KLRecord:
    """One sampled forward's KL term; ``consumed`` turns True when a backward pass runs through that
    forward (its graph is then freed, or at least already used for this step's gradients)."""

    __slots__ = ("consumed",)

    def __init__(self):
        self.consumed = False


# -- tensor <-> core plumbing ------------------------------------------------------------------
def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise DeviceError(f"vigrad's core runs on CPU tensors; {name} is on {t.device} "
                          f"(move it with .cpu(), a module with .to('cpu'))")
    if t.dtype not in _NP_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (vigrad's core supports these two), got {t.dtype}")
    return t


def _same_dtype(pairs):
    (n0, t0), rest = pairs[0], pairs[1:]
    for n, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n0} and {n} must have the same dtype, got {t0.dtype} and {t.dtype}")


def _np(t):
    """Zero-copy NumPy view of a CPU tensor's memory (a contiguous copy first when it is strided)."""
    return t.detach().contiguous().numpy()


def _prior_flat(prior, np_dtype, shape):
    return prior._flat_params(np_dtype, tuple(shape))


def _check_prior(prior):
    _ops.check_prior(prior)


def _check_kl(kl, prior):
    _ops.check_kl(kl, prior)


# -- sample_weights --------------------------------------------------------------------------------
class _SampleWeights(torch.autograd.Function):
    """(w, kl) from (loc, rho, eps); backward = one fused pathwise kernel call.

    The kernel returns the gradient of F = kw KL - mean_s sum_j glik_sj w_sj.  The gradient
    torch needs is that of L = sum_sj gw_sj w_sj + gk KL, i.e. F with glik = -S gw and kw = gk.
    """

    @staticmethod
    def forward(ctx, loc, rho, eps, prior, kl, workers):
        shape = tuple(loc.shape)
        D = loc.numel()
        single = tuple(eps.shape) == shape
        S = 1 if single else eps.shape[0]
        l1, r1 = _np(loc).reshape(D), _np(rho).reshape(D)
        e2 = _np(eps).reshape(S, D)
        np_dtype = l1.dtype
        params = _prior_flat(prior, np_dtype, shape)
        sigma = _core.softplus(r1, workers)
        w = torch.empty((S, D), dtype=loc.dtype)
        wn = w.numpy()
        np.multiply(e2, sigma, out=wn)
        wn += l1
        if kl == "analytic":
            klv, _, _ = _core.kl_mf_normal(l1, r1, *params, 0.0, workers)
        else:
            log_q = _core.mf_log_prob(l1, sigma, wn, workers).astype(np.float64)
            log_p = prior._log_prob(wn, params, workers).astype(np.float64)
            klv = float(np.mean(log_q - log_p))
        ctx.save_for_backward(loc, rho, eps)
        ctx.meta = (shape, S, D, prior, kl, workers)
        w = w.reshape(shape if single else (S,) + shape)
        return w, torch.tensor(klv, dtype=loc.dtype)

    @staticmethod
    def backward(ctx, grad_w, grad_kl):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = _SampleWeights._backward(ctx, grad_w, grad_kl)
        return _guard_double_backward(grads, ctx.saved_tensors[:2]) if create_graph else grads

    @staticmethod
    def _backward(ctx, grad_w, grad_kl):
        loc, rho, eps = ctx.saved_tensors
        shape, S, D, prior, kl, workers = ctx.meta
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None
        l1, r1 = _np(loc).reshape(D), _np(rho).reshape(D)
        e2 = _np(eps).reshape(S, D)
        if grad_w is None:
            glik = np.zeros((S, D), l1.dtype)
        else:
            glik = (grad_w.reshape(S, D) * (-float(S))).contiguous().numpy()
        gk = 0.0 if grad_kl is None else float(grad_kl.detach())
        params = _prior_flat(prior, l1.dtype, shape)
        mode = "analytic" if kl == "analytic" else "mc"
        fn = _core.pathwise_grad_normal if isinstance(prior, Normal) else _core.pathwise_grad_mixture
        gl, gr, _, _ = fn(l1, r1, e2, glik, *params, mode, gk, workers)
        gl = torch.from_numpy(gl).reshape(shape) if ctx.needs_input_grad[0] else None
        gr = torch.from_numpy(gr).reshape(shape) if ctx.needs_input_grad[1] else None
        return gl, gr, None, None, None, None


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient computed under create_graph=True, anchoring it to the parameters so
    that differentiating it again raises (vigrad's kernels give first derivatives only)."""

    @staticmethod
    def forward(ctx, value, *anchors):
        return value.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("vigrad.torch: the gradients computed by vigrad's kernels are not differentiable "
                           "(double backward, e.g. create_graph=True through sample_weights or BayesianLinear, "
                           "is not supported)")


def _guard_double_backward(grads, anchors):
    """Under create_graph=True, wrap each gradient so that a second differentiation raises
    instead of silently treating it as a constant."""
    anchors = [a for a in anchors if a.requires_grad]
    if not anchors:
        return grads
    return tuple(g if g is None else _NoDoubleBackward.apply(g, *anchors) for g in grads)


def sample_weights(loc, rho, eps, prior, kl="mc", *, workers=None) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Weights ``w = loc + softplus(rho) * eps`` and the KL term, differentiable in loc and rho.

    Parameters
    ----------
    loc, rho : Tensor, one shape (any), float32 or float64, on the CPU
    eps : Tensor, shape (S, *loc.shape), or loc.shape for a single sample
        The standard-normal noise; treated as data (no gradient flows to it).
    prior : vigrad.Normal or vigrad.ScaleMixtureNormal
    kl : {"mc", "analytic"}
        "mc": the Monte Carlo estimate mean_s sum_j [log q(w_sj) - log p(w_sj)] at these samples
        (Proposition 1 of Blundell et al., any prior); "analytic": the closed form KL[q || Normal]
        (Normal prior only; eps still defines w).
    workers : int or None
        Threads for the core (None: vigrad.max_workers).

    Returns
    -------
    w : Tensor, the shape of eps
    kl : 0-d Tensor, the dtype of loc

    The backward pass is one call of vigrad's fused pathwise kernel for the gradients of both
    outputs; non-finite values propagate as in any torch op.  Double backward is not supported
    (differentiating the gradients again raises a RuntimeError).

    Examples
    --------
    >>> import torch, vigrad as vg, vigrad.torch as vgt
    >>> loc = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    >>> rho = torch.full((3,), -1.0, dtype=torch.float64, requires_grad=True)
    >>> eps = torch.randn(4, 3, dtype=torch.float64)
    >>> w, kl = vgt.sample_weights(loc, rho, eps, vg.Normal(0.0, 1.0))
    >>> (w.square().sum() + kl).backward()
    >>> w.shape, loc.grad.shape
    (torch.Size([4, 3]), torch.Size([3]))
    """
    _check_prior(prior)
    _check_kl(kl, prior)
    for name, t in (("loc", loc), ("rho", rho), ("eps", eps)):
        _check_tensor(t, name)
    _same_dtype([("loc", loc), ("rho", rho), ("eps", eps)])
    if rho.shape != loc.shape:
        raise ValueError(f"loc and rho must have the same shape, got {tuple(loc.shape)} and {tuple(rho.shape)}")
    shape = tuple(loc.shape)
    if tuple(eps.shape) != shape and (eps.dim() != loc.dim() + 1 or tuple(eps.shape[1:]) != shape):
        raise ValueError(f"eps must have shape (S, *{shape}) or {shape} (one sample), got {tuple(eps.shape)}")
    if tuple(eps.shape) != shape and eps.shape[0] < 1:
        raise ValueError("eps must hold at least one sample, got S = 0")
    return _SampleWeights.apply(loc, rho, eps, prior, kl, resolve_workers(workers))


# -- the Bayes-by-Backprop layer ------------------------------------------------------------------
def derive_key(seed: int, step: int, stream: int = 0) -> int:
    """The 64-bit noise key of forward number ``step`` of a layer seeded with ``seed`` (stream 0:
    training-mode forwards, 1: sampled eval-mode forwards).  A pure function (Philox, as
    vigrad.BayesianMLP's keys), so a seeded layer draws the same noise on every run."""
    return _ops.derive_keys(int(seed), int(step), int(stream), 1)[0]


class _Spec(NamedTuple):
    estimator: str
    kl: str
    key: int
    ops: object  # the layer's vigrad._layer_ops.LinearOps
    workers: int
    in_features: int
    out_features: int
    buffers: dict  # the module's backward work arrays (A, B / C), reused between steps
    record: _KLRecord  # marked consumed by the backward pass


def _work(spec, name, n, dtype):
    """A persistent 1-D work tensor of the layer (a fresh megabyte-sized one per backward is
    page-faulted in every time).  Per module: two threads running backward through the same
    module at once would share it (as they would share the module's parameters' gradients)."""
    buf = spec.buffers.get(name)
    if buf is None or buf.shape[0] != n or buf.dtype != dtype:
        buf = spec.buffers[name] = torch.empty(n, dtype=dtype)
    return buf


class _TorchProducts:
    """The matrix products vigrad._layer_ops runs a layer on, for torch tensors: torch's BLAS
    (addmm, mm) on torch's threads; the backward's work arrays are the module's (``spec.buffers``)."""

    def __init__(self, spec, dtype):
        self.spec, self.dtype = spec, dtype

    @staticmethod
    def linear(x, W, b):
        return torch.addmm(b, x, W.t())

    @staticmethod
    def matmul(a, b):
        return a @ b

    @staticmethod
    def matmul_add(out, a, b):
        out += a @ b

    @staticmethod
    def param_grad(G, x, out):
        k = G.shape[1] * x.shape[1]
        torch.mm(G.t(), x, out=out[:k].view(G.shape[1], x.shape[1]))
        torch.sum(G, 0, out=out[k:])
        return out

    def work(self, name, n):
        return _work(self.spec, name, n, self.dtype)

    def empty(self, n):
        return torch.empty(n, dtype=self.dtype)

    wrap = staticmethod(torch.from_numpy)

    @staticmethod
    def numpy(t):
        return t.numpy()

    @staticmethod
    def sqrt(t):
        return t.sqrt_()


def _layer_forward_done(ctx, x, loc, rho, spec, y, klv):
    """What a layer function's forward keeps for :func:`_layer_backward`; returns (y, the KL value as
    a 0-d tensor)."""
    ctx.save_for_backward(x, loc, rho)
    ctx.spec, ctx.out_shape = spec, tuple(y.shape)
    return y, torch.tensor(klv, dtype=loc.dtype)


def _layer_backward(data_grads, ctx, grad_y, grad_kl):
    """The backward of a layer function (linear or convolution) for L = sum(grad_y * y) + grad_kl * KL.

    Marks the forward's KL term consumed (see :func:`kl_loss`); ``data_grads(ctx, x, G, need_x,
    need_params)`` gives ``(grad_x, A, B_or_C, data)``, the gradient in x and the flat data gradients
    of the layer's shape (as vigrad._layer_ops.LinearOps.backward); one fused bbb_grad call
    (vigrad._layer_ops.ParamOps.param_grads, kl_weight = grad_kl) turns them into the gradients in
    loc and rho.  No graph is built; under create_graph=True a second differentiation raises."""
    ctx.spec.record.consumed = True
    create_graph = torch.is_grad_enabled()
    with torch.no_grad():
        x, loc, rho = ctx.saved_tensors
        spec = ctx.spec
        need_x = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        G = grad_y if grad_y is not None else torch.zeros(ctx.out_shape, dtype=loc.dtype)
        grad_x, A, BC, data = data_grads(ctx, x, G, need_x, need_p)
        gl = gr = None
        if need_p:
            gk = 0.0 if grad_kl is None else float(grad_kl.detach())
            kl_mode = spec.kl if gk != 0.0 else "none"
            # the KL value came from the forward's one-pass kernel: not formed again here
            gl, gr, _, _ = spec.ops.param_grads(data, kl_mode, spec.key, _np(loc), _np(rho), A.numpy(),
                                                None if BC is None else BC.numpy(), gk, spec.workers,
                                                compute_kl=False)
            gl = torch.from_numpy(gl) if ctx.needs_input_grad[1] else None
            gr = torch.from_numpy(gr) if ctx.needs_input_grad[2] else None
        grads = (grad_x, gl, gr, None)
    return _guard_double_backward(grads, ctx.saved_tensors) if create_graph else grads


class _LinearFn(torch.autograd.Function):
    """(y, kl) = the layer's sampled forward; backward: the products in torch and one fused
    bbb_grad call with kl_weight = grad_kl.  The arithmetic is vigrad._layer_ops's, as for
    vigrad.bnn.BayesianLinear."""

    @staticmethod
    def forward(ctx, x, loc, rho, spec):
        # the noise and the KL term at it in one pass (the KL's gradient is the one the backward
        # kernel adds, from the same key)
        y, klv, ctx.cache = spec.ops.forward(_TorchProducts(spec, loc.dtype), spec.key, x.detach(),
                                             loc.detach().contiguous(), rho.detach().contiguous(), kl=spec.kl,
                                             workers=spec.workers)
        return _layer_forward_done(ctx, x, loc, rho, spec, y, klv)

    @staticmethod
    def backward(ctx, grad_y, grad_kl):
        return _layer_backward(_LinearFn._data_grads, ctx, grad_y, grad_kl)

    @staticmethod
    def _data_grads(ctx, x, G, need_x, need_params):
        return ctx.spec.ops.backward(_TorchProducts(ctx.spec, G.dtype), ctx.cache, G, need_x=need_x,
                                     need_params=need_params)


class _BayesianLayer(nn.Module):
    """What vigrad.torch's layers share: the flat ``loc`` / ``rho`` Parameters (weights then
    biases), the prior, the seed and the noise counters, the key of each sampled forward, the
    record of its KL term, the checks of an input's type, device and dtype.  A subclass sets
    ``num_params``, ``_fan_in`` and ``_split`` (the weight and bias views of a flat vector)."""

    _estimators: Tuple[str, ...] = _ESTIMATORS

    def _setup(self, *, prior, estimator, kl, init_rho, seed, dtype, workers):
        self.estimator = _ops.check_estimator(estimator, self._estimators)
        self.prior = _ops.default_prior() if prior is None else prior
        _check_prior(self.prior)
        _check_kl(kl, self.prior)
        self.kl = kl
        self.init_rho = check_real(init_rho, "init_rho")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _NP_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        # None: one thread or every core for vigrad's kernels, whichever the layer's forwards
        # measure faster (vigrad._layer_ops.Threads): two threads help a large layer on an idle machine
        # (784-400-400-10 step: 5.3 ms with two, 7.2 ms with one) and cost many times that when
        # other work holds the cores
        self.workers = resolve_workers(workers)
        self._threads = _Threads(self.workers, workers is None)
        self._work_buffers = {}
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        n = self.num_params
        self.loc = nn.Parameter(torch.empty(n, dtype=dtype))
        self.rho = nn.Parameter(torch.empty(n, dtype=dtype))
        self.register_buffer("noise_seed", torch.tensor(int(seed), dtype=torch.int64))
        self.register_buffer("noise_step", torch.zeros(2, dtype=torch.int64))
        self.sampling: Optional[bool] = None
        self.last_kl: Optional[torch.Tensor] = None
        self.last_key: Optional[int] = None
        self._kl_record: Optional[_KLRecord] = None

    def __getstate__(self):
        # copy.deepcopy / pickle: drop the last KL term, which holds a piece of the autograd graph
        # (non-leaf tensors cannot be deep-copied); the copy starts as if no forward had run
        state = super().__getstate__()
        state["last_kl"] = state["_kl_record"] = None
        return state

    @property
    def seed(self) -> int:
        return int(self.noise_seed)

    def reset_parameters(self):
        """Means uniform in +-1/sqrt(fan_in) (nn.Linear's and nn.Conv2d's bound) from a generator
        seeded by the layer's seed, rho = init_rho; the noise counters restart."""
        gen = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self._fan_in)
        with torch.no_grad():  # drawn in float64, so a float32 layer holds the rounding of the float64 one
            self.loc.copy_(torch.empty(self.num_params, dtype=torch.float64).uniform_(-bound, bound, generator=gen))
            self.rho.fill_(self.init_rho)
            self.noise_step.zero_()
        self.last_kl = self.last_key = self._kl_record = None

    # views of the flat parameters
    @property
    def weight_loc(self):
        return self._split(self.loc)[0]

    @property
    def bias_loc(self):
        return self._split(self.loc)[1]

    @property
    def weight_rho(self):
        return self._split(self.rho)[0]

    @property
    def bias_rho(self):
        return self._split(self.rho)[1]

    @property
    def weight_scale(self):
        """softplus(weight_rho), differentiable."""
        return nn.functional.softplus(self.weight_rho)

    @property
    def bias_scale(self):
        b = self.bias_rho
        return None if b is None else nn.functional.softplus(b)

    def _check_tensor_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        loc, rho = self.loc, self.rho
        for name, t in (("x is", x), ("the layer's parameters are", loc)):
            if not t.is_cpu:
                raise DeviceError(f"vigrad's core runs on CPU tensors; {name} on {t.device} "
                                  f"(move it with .cpu(), the module with .to('cpu'))")
        if loc.dtype not in _NP_DTYPES or rho.dtype != loc.dtype:
            raise TypeError(f"the layer's parameters must be float32 or float64 (vigrad's core supports these "
                            f"two), got loc {loc.dtype} and rho {rho.dtype}")
        if x.dtype != loc.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {loc.dtype}: convert the "
                            f"input (x.to({loc.dtype})) or the layer (layer.to({x.dtype}))")

    def _ops_for(self, make):
        """The layer's vigrad._layer_ops object (``make()``), made again only when the estimator, the
        prior or the parameters' dtype has changed since the last forward."""
        key = (self.estimator, self.prior, self.loc.dtype)
        cached = self.__dict__.get("_ops_cache")
        if cached is None or cached[0][0] != key[0] or cached[0][1] is not key[1] or cached[0][2] != key[2]:
            cached = self.__dict__["_ops_cache"] = (key, make())
        return cached[1]

    def _samples(self) -> bool:
        return self.training if self.sampling is None else bool(self.sampling)

    #: Forwards whose keys one call of the generator derives (see :meth:`_key`).
    _KEY_BLOCK = 64

    def _key(self, seed, step, stream):
        """``derive_key(seed, step, stream)``, from a block of ``_KEY_BLOCK`` consecutive steps'
        keys derived at once (one generator call per block of forwards instead of one per forward)."""
        block = step // self._KEY_BLOCK
        cache = self.__dict__.get("_key_cache")
        if cache is None or cache[0] != (seed, stream, block):
            keys = _ops.derive_step_keys(seed, block * self._KEY_BLOCK, self._KEY_BLOCK, stream)
            cache = self.__dict__["_key_cache"] = ((seed, stream, block), keys.tolist())
        return cache[1][step - block * self._KEY_BLOCK]

    def _next_draw(self):
        """The key of this sampled forward (the counter of its stream advances), the number of
        threads it runs on (its backward uses the same) and a fresh KL record."""
        stream = 0 if self.training else 1
        # the buffers through NumPy views of their memory: a torch op per access costs more than the
        # rest of this method (the buffers are CPU int64 tensors outside any autograd graph)
        counters = self.noise_step.numpy()
        with _COUNTER_LOCK:
            step = int(counters[stream])
            counters[stream] = step + 1
        key = self._key(int(self.noise_seed.numpy()), step, stream)
        return key, self._threads.pick(), _KLRecord()

    def _sampled_forward(self, fn, x, spec):
        """``fn.apply(x, loc, rho, spec)`` (a sampled forward), timed for the thread picker when it
        has a choice; records the forward's KL term and key.  Returns the outputs."""
        threads = self._threads
        if len(threads.choices) == 1:  # nothing to choose between: not timed
            y, kl = fn.apply(x, self.loc, self.rho, spec)
        else:
            t0 = time.perf_counter()
            y, kl = fn.apply(x, self.loc, self.rho, spec)
            threads.record(spec.workers, time.perf_counter() - t0)
        self.last_kl, self.last_key, self._kl_record = kl, spec.key, spec.record
        return y


class BayesianLinear(_BayesianLayer):
    r"""A fully connected layer with a mean-field Gaussian over its weights and biases (Bayes by Backprop).

    Parameters
    ----------
    in_features, out_features : int
    prior : vigrad.Normal or vigrad.ScaleMixtureNormal, keyword-only
        Default: Blundell et al.'s scale mixture 0.5 N(0, 1) + 0.5 N(0, e^-12).
    estimator : {"reparam", "local", "flipout"}, keyword-only
        "reparam": one weight sample per forward (Blundell et al.); "local": the local
        reparameterisation trick (pre-activations sampled per example); "flipout": a shared
        perturbation decorrelated per example by random sign flips.
    kl : {"mc", "analytic"}, keyword-only
        The layer's KL term: Monte Carlo log q(w) - log p(w) at w = loc + softplus(rho) eps
        (eps from the forward's key; for "local" a weight sample separate from the
        pre-activation noise), or the closed form (Normal prior only).
    init_rho : float
        Initial rho of every parameter (scale softplus(init_rho)).
    seed : int in [0, 2**63) or None
        Seeds the initial means (uniform in +-1/sqrt(in_features), as nn.Linear) and the noise:
        forward number t in training mode uses the key ``derive_key(seed, t)``.  None draws the
        seed from torch's global generator, so ``torch.manual_seed`` makes the layer reproducible.
    dtype : torch.float32 or torch.float64, optional
        Default: torch.get_default_dtype().  ``module.to(torch.float64)`` converts later.
    workers : int or None
        Threads for vigrad's kernels.  None: one thread or vigrad.max_workers, whichever the
        layer's forwards measure faster, re-measured as the machine's load changes.  PyTorch's
        own operations run on ``torch.get_num_threads()`` threads of the same OpenMP pool; see
        the module's notes on threads.

    Attributes
    ----------
    loc, rho : Parameter, shape (out*in + out,)
        The flat variational parameters, weights (out, in) row-major then biases;
        ``weight_loc``, ``bias_loc``, ``weight_rho``, ``bias_rho`` are views.
    last_kl : 0-d Tensor or None
        The KL term of the most recent sampled forward (in the autograd graph).
    last_key : int or None
        The noise key of the most recent sampled forward.
    sampling : None, True or False
        None (default): sample in training mode, use the mean weights in eval mode; True / False
        force either (see :func:`sampling`).
    noise_seed, noise_step : buffers
        The seed and the forward counters (training stream, eval stream), saved in state_dict so
        that a reloaded layer continues the noise stream where it stopped.

    Notes
    -----
    In training mode each forward draws fresh noise and records the layer's KL term (``last_kl``,
    summed over a model by :func:`kl_loss`); the backward pass regenerates the noise from the key
    and makes one fused kernel call, with the gradient reaching ``last_kl`` as the KL weight, so
    ``loss = nll + c * vgt.kl_loss(model)`` backpropagates correctly for any c.  Forwarding a layer
    twice before ``backward`` replaces ``last_kl``: for several Monte Carlo samples add up
    ``kl_loss`` after each forward.  In eval mode the forward uses the mean weights, draws nothing
    and leaves ``last_kl`` as it was (the last sampled forward's KL).  Inside ``with
    vgt.sampling(model):`` eval-mode forwards sample, with keys from a separate stream, so
    evaluating never shifts the training noise.  Threads forwarding one layer at once each take
    the next key of its stream (never the same one); ``last_kl`` and ``last_key`` are then those
    of whichever forward finished last.
    """

    def __init__(self, in_features, out_features, *, prior=None, estimator="reparam", kl="mc", init_rho=-7.0,
                 seed=None, dtype=None, workers=None):
        super().__init__()
        self.in_features = check_num_samples(in_features, "in_features")
        self.out_features = check_num_samples(out_features, "out_features")
        self._setup(prior=prior, estimator=estimator, kl=kl, init_rho=init_rho, seed=seed, dtype=dtype,
                    workers=workers)
        self.reset_parameters()

    @property
    def num_params(self) -> int:
        return self.in_features * self.out_features + self.out_features

    @property
    def _fan_in(self) -> int:
        return self.in_features

    def _split(self, flat):
        k = self.in_features * self.out_features
        return flat[:k].view(self.out_features, self.in_features), flat[k:]

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, estimator={self.estimator!r}, "
                f"kl={self.kl!r}, prior={self.prior!r}, seed={self.seed}")

    def _check_input(self, x):
        self._check_tensor_input(x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")

    def forward(self, x):
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        ops = self._ops_for(lambda: _ops.LinearOps(self.in_features, self.out_features, self.estimator, self.prior,
                                                   _NP_DTYPES[self.loc.dtype]))
        if not self._samples():
            y = ops.mean(_TorchProducts(None, self.loc.dtype), x2, self.loc)
            return y.reshape(*lead, self.out_features)
        key, nw, record = self._next_draw()
        spec = _Spec(self.estimator, self.kl, key, ops, nw, self.in_features, self.out_features, self._work_buffers,
                     record)
        y = self._sampled_forward(_LinearFn, x2, spec)
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)


# -- Bayesian convolutions --------------------------------------------------------------------------
class _ConvSpec(NamedTuple):
    estimator: str
    kl: str
    key: int
    ops: object  # the layer's vigrad._layer_ops.ParamOps (the noise and fused-gradient calls)
    workers: int
    weight_shape: tuple  # (out_channels, in_channels // groups, kh, kw)
    bias: bool
    stride: tuple
    padding: tuple  # numeric, symmetric (an asymmetric "same" is padded before the function)
    dilation: tuple
    groups: int
    buffers: dict
    record: _KLRecord


def _conv(spec, x, weight, bias):
    return nn.functional.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def _conv_backward(spec, G, x, weight, need_x, need_w):
    """(grad_x, grad_weight, grad_bias) of sum(G * conv2d(x, weight, bias)): torch's convolution
    backward, one call for the three (None where not asked for)."""
    return torch.ops.aten.convolution_backward(G, x, weight, [weight.shape[0]] if spec.bias else None,
                                               list(spec.stride), list(spec.padding), list(spec.dilation), False,
                                               [0, 0], spec.groups, [need_x, need_w, need_w and spec.bias])


def _split_conv(flat, spec):
    k = math.prod(spec.weight_shape)
    return flat[:k].view(spec.weight_shape), (flat[k:] if spec.bias else None)


def _fill_flat(buf, spec, g_weight, g_bias):
    """The flat gradient (weights then biases) in a work tensor, for the core."""
    w, b = _split_conv(buf, spec)
    w.copy_(g_weight)
    if b is not None:
        b.copy_(g_bias)
    return buf


class _Conv2dFn(torch.autograd.Function):
    """(y, kl) = the convolution's sampled forward (torch's conv2d on weights drawn by one
    bbb_noise_kl call); backward: torch's convolution backward for dNLL/dw and one fused bbb_grad
    call with kl_weight = grad_kl, as _LinearFn."""

    @staticmethod
    def forward(ctx, x, loc, rho, spec):
        dt = loc.dtype
        x_in, x = x, x.detach()
        loc_t, rho_t = loc.detach().contiguous(), rho.detach().contiguous()
        noise = torch.empty(loc_t.shape[0], dtype=dt)
        # the noise and the KL term at it in one pass of the core, as for the linear layer
        p = _TorchProducts(spec, dt)
        if spec.estimator == "reparam":
            klv = spec.ops.noise(p, "weights", spec.kl, spec.key, loc_t, rho_t, noise, spec.workers)
            W, b = _split_conv(noise, spec)
            y = _conv(spec, x, W, b)
            ctx.cache = (W,)
        else:  # Flipout (Wen et al. 2018): y = conv(x, M) + conv(x * s, dW) * r, signs per example and channel
            klv = spec.ops.noise(p, "perturbation", spec.kl, spec.key, loc_t, rho_t, noise, spec.workers)
            dW, db = _split_conv(noise, spec)
            M, mb = _split_conv(loc_t, spec)
            c_in, c_out = x.shape[1], spec.weight_shape[0]
            # the linear layer's signs with the channels as features: (B, c_in) then (B, c_out)
            signs = torch.from_numpy(_ops.flipout_signs(spec.key, 0, x.shape[0], c_in, c_out, spec.ops.dtype))
            Sg, R = signs[:, :c_in, None, None], signs[:, c_in:, None, None]
            xs = x * Sg
            y = _conv(spec, x, M, mb).addcmul_(_conv(spec, xs, dW, db), R)
            ctx.cache = (xs, Sg, R, dW, M)
        return _layer_forward_done(ctx, x_in, loc, rho, spec, y, klv)

    @staticmethod
    def backward(ctx, grad_y, grad_kl):
        return _layer_backward(_Conv2dFn._data_grads, ctx, grad_y, grad_kl)

    @staticmethod
    def _data_grads(ctx, x, G, need_x, need_p):
        """dNLL/dx and the flat data gradients for the fused kernel, from torch's convolution backward."""
        spec = ctx.spec
        dt = G.dtype
        P = spec.ops.num_params
        A = BC = None
        if spec.estimator == "reparam":
            (W,) = ctx.cache
            grad_x, gW, gb = _conv_backward(spec, G, x, W, need_x, need_p)
            if need_p:
                A = _fill_flat(_work(spec, "A", P, dt), spec, gW, gb)
            data = "reparam"
        else:
            xs, Sg, R, dW, M = ctx.cache
            grad_x, gM, gmb = _conv_backward(spec, G, x, M, need_x, need_p)
            GR = G * R
            grad_xs, gdW, gdb = _conv_backward(spec, GR, xs, dW, need_x, need_p)
            if need_x:
                grad_x = grad_x.addcmul_(grad_xs, Sg)
            if need_p:
                A = _fill_flat(_work(spec, "A", P, dt), spec, gM, gmb)
                BC = _fill_flat(_work(spec, "B", P, dt), spec, gdW, gdb)
            data = "times_eps"
        return grad_x, A, BC, data


def _pair(v, name, minimum):
    """An int or a pair of ints, each >= minimum, as a pair."""
    items = (v, v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
    if (not isinstance(items, (tuple, list)) or len(items) != 2
            or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if any(int(i) < minimum for i in items):
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(items[0]), int(items[1])


class BayesianConv2d(_BayesianLayer):
    r"""A 2-D convolution with a mean-field Gaussian over its kernel and biases (Bayes by Backprop).

    The convolution is torch's own (``torch.nn.functional.conv2d``); the weight draw and the KL
    term are one call of vigrad's core in the forward, the gradients in loc and rho one fused call
    in the backward, as for :class:`BayesianLinear`.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride, dilation : int or (int, int), default 1
    padding : int, (int, int), "valid" or "same", default 0
        Zero padding, as ``torch.nn.Conv2d`` ("same" needs stride 1; an odd total padding puts the
        extra row / column at the bottom / right, as torch does).
    groups : int, default 1
        Divides in_channels and out_channels.
    bias : bool, default True
    prior : vigrad.Normal or vigrad.ScaleMixtureNormal, keyword-only
        Default: Blundell et al.'s scale mixture 0.5 N(0, 1) + 0.5 N(0, e^-12).
    estimator : {"reparam", "flipout"}, keyword-only
        "reparam": one kernel sample per forward, shared by the batch; "flipout" (Wen et al.
        2018): the mean kernel plus a shared perturbation dW decorrelated per example by random
        signs on the input and output channels, ``conv(x, M) + conv(x * s, dW) * r``.
    kl : {"mc", "analytic"}, keyword-only
        As for :class:`BayesianLinear`.
    init_rho : float
        Initial rho of every parameter (scale softplus(init_rho)).
    seed : int in [0, 2**63) or None
        Seeds the initial means (uniform in +-1/sqrt(fan_in), fan_in = in_channels / groups * kh *
        kw, nn.Conv2d's bound) and the noise (forward number t in training mode: key
        ``derive_key(seed, t)``).  None draws it from torch's global generator.
    dtype : torch.float32 or torch.float64, optional
        Default: torch.get_default_dtype().
    workers : int or None
        Threads for vigrad's kernels, as for :class:`BayesianLinear` (None: one thread or
        vigrad.max_workers, whichever the layer's forwards measure faster).

    Attributes
    ----------
    loc, rho : Parameter, shape (out * in / groups * kh * kw + out,)
        The flat variational parameters, the kernel (out, in / groups, kh, kw) row-major then the
        biases (none with bias=False); ``weight_loc``, ``bias_loc``, ``weight_rho``, ``bias_rho``
        are views (``bias_*`` None without biases).
    last_kl, last_key, sampling, noise_seed, noise_step
        As for :class:`BayesianLinear`: eval mode uses the means, :func:`sampling` and
        :func:`kl_loss` cover the layer.

    Examples
    --------
    >>> import torch, vigrad.torch as vgt
    >>> conv = vgt.BayesianConv2d(1, 4, 3, padding=1, estimator="flipout", seed=0)
    >>> x = torch.randn(8, 1, 6, 6)
    >>> out = conv(x)
    >>> (out.square().sum() + vgt.kl_loss(conv) / 100).backward()
    >>> out.shape, conv.weight_loc.shape, conv.rho.grad.shape
    (torch.Size([8, 4, 6, 6]), torch.Size([4, 1, 3, 3]), torch.Size([40]))
    """

    _estimators = ("reparam", "flipout")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 *, prior=None, estimator="reparam", kl="mc", init_rho=-7.0, seed=None, dtype=None, workers=None):
        super().__init__()
        self.in_channels = check_num_samples(in_channels, "in_channels")
        self.out_channels = check_num_samples(out_channels, "out_channels")
        self.groups = check_num_samples(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups must divide in_channels and out_channels, got groups={self.groups} with "
                             f"in_channels={self.in_channels}, out_channels={self.out_channels}")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as torch.nn.Conv2d), got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding", 0)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.has_bias = bool(bias)
        # the numeric padding handed to conv2d, and the extra bottom / right rows of an odd "same"
        if self.padding == "valid":
            self._pad, self._pad_extra = (0, 0), None
        elif self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            self._pad = (total[0] // 2, total[1] // 2)
            extra = (0, total[1] - 2 * self._pad[1], 0, total[0] - 2 * self._pad[0])  # F.pad order: W then H
            self._pad_extra = extra if any(extra) else None
        else:
            self._pad, self._pad_extra = self.padding, None
        self._setup(prior=prior, estimator=estimator, kl=kl, init_rho=init_rho, seed=seed, dtype=dtype,
                    workers=workers)
        self.reset_parameters()

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    @property
    def num_params(self) -> int:
        return math.prod(self.weight_shape) + (self.out_channels if self.has_bias else 0)

    @property
    def _fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    def _split(self, flat):
        k = math.prod(self.weight_shape)
        return flat[:k].view(self.weight_shape), (flat[k:] if self.has_bias else None)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.has_bias:
            s += ", bias=False"
        return s + f", estimator={self.estimator!r}, kl={self.kl!r}, prior={self.prior!r}, seed={self.seed}"

    def _check_input(self, x):
        self._check_tensor_input(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        extra = self._pad_extra or (0, 0, 0, 0)
        for axis, size, pad, more in ((0, x.shape[-2], self._pad[0], extra[3]), (1, x.shape[-1], self._pad[1],
                                                                                  extra[1])):
            span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
            if size + 2 * pad + more < span:
                raise ValueError(f"x's spatial size {tuple(x.shape[-2:])} with padding {self.padding!r} is smaller "
                                 f"than the dilated kernel ({span} along axis {axis - 2})")

    def forward(self, x):
        self._check_input(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._pad_extra is not None:
            x = nn.functional.pad(x, self._pad_extra)
        if not self._samples():
            y = nn.functional.conv2d(x, self.weight_loc, self.bias_loc, self.stride, self._pad, self.dilation,
                                     self.groups)
        else:
            key, nw, record = self._next_draw()
            ops = self._ops_for(lambda: _ops.ParamOps(self.num_params, self.prior, _NP_DTYPES[self.loc.dtype]))
            spec = _ConvSpec(self.estimator, self.kl, key, ops, nw, self.weight_shape, self.has_bias, self.stride,
                             self._pad, self.dilation, self.groups, self._work_buffers, record)
            y = self._sampled_forward(_Conv2dFn, x, spec)
        return y.squeeze(0) if unbatched else y


def _named_layers(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BayesianLayer)]


def _layers(model):
    return [m for _, m in _named_layers(model)]


def kl_loss(model) -> torch.Tensor:
    """The sum of the KL terms of every vigrad layer in ``model``, from this step's forward.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    0-d Tensor in the autograd graph: the sum of each layer's ``last_kl`` (a zero tensor when the
    model holds no vigrad layer, whose KL is then zero).

    Raises
    ------
    StaleKLError
        When a layer holds no KL term of the current step: it has run no sampled forward yet, or a
        backward pass has already consumed the forward that produced its KL.  Call ``kl_loss``
        after the forward of this step and before its backward:
        ``loss = nll(model(x), y) + kl_loss(model) / M``.  (The old behaviour, a zero on the first
        step and an old graph's tensor afterwards, silently dropped the KL or failed in torch.)

    Examples
    --------
    >>> import torch, vigrad.torch as vgt
    >>> layer = vgt.BayesianLinear(3, 2, seed=0)
    >>> loss = layer(torch.ones(4, 3)).sum() + vgt.kl_loss(layer)   # after the forward: fine
    >>> loss.backward()
    >>> try:                                                         # that forward is used up
    ...     vgt.kl_loss(layer)
    ... except vgt.StaleKLError as e:
    ...     print("call kl_loss after this step's forward" in str(e))
    True
    """
    total = None
    for name, m in _named_layers(model):
        rec = m._kl_record
        where = f"layer {name or '<model>'} ({type(m).__name__})"
        if m.last_kl is None or rec is None:
            raise StaleKLError(f"kl_loss(model): {where} has run no sampled forward yet, so there is no KL term; "
                               f"call kl_loss after this step's forward (loss = nll(model(x), y) + kl_loss(model))")
        if rec.consumed:
            raise StaleKLError(f"kl_loss(model): {where} holds the KL of a forward whose graph a backward pass has "
                               f"already consumed; call kl_loss after this step's forward "
                               f"(loss = nll(model(x), y) + kl_loss(model)), before backward()")
        total = m.last_kl if total is None else total + m.last_kl
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype())
    return total


@contextlib.contextmanager
def sampling(model, enabled=True):
    """Within the block every vigrad layer of ``model`` samples its weights (``enabled=True``,
    e.g. Monte Carlo predictions in eval mode) or uses the means (False), whatever its mode.

    >>> import torch, vigrad.torch as vgt
    >>> layer = vgt.BayesianLinear(2, 2, seed=0, init_rho=0.0).eval()
    >>> x = torch.ones(1, 2)
    >>> with torch.no_grad(), vgt.sampling(layer):
    ...     a, b = layer(x), layer(x)
    >>> bool((a != b).any()), bool((layer(x) == layer(x)).all())
    (True, True)
    """
    layers = _layers(model)
    saved = [m.sampling for m in layers]
    for m in layers:
        m.sampling = bool(enabled)
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.sampling = s
