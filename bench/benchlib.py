"""Shared workloads and checks for vigrad's benchmarks.

Every workload is built once per (size, dtype, seed) and cached read-only, so the
implementations in one benchmark group see identical arguments.  The checks run
outside the timed calls; a timing never decides a test.
"""

from __future__ import annotations

import functools
import math
import tracemalloc
from dataclasses import dataclass

import numpy as np

try:
    import resource
except ImportError:  # pragma: no cover - not Unix
    resource = None

import vigrad as vg
from vigrad import reference as ref

#: The issue's problem size.
D = 10**6
SEED = 20240611
DTYPES = [np.float64, np.float32]
#: Implementations agree to this relative tolerance (absolute floor: RTOL * magnitude).
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def dtype_id(dtype) -> str:
    return np.dtype(dtype).name


def size_id(n: int) -> str:
    """10**6 -> '1e6'."""
    return f"1e{round(math.log10(n))}" if n >= 10 and 10 ** round(math.log10(n)) == n else str(n)


def tag(benchmark, group: str, **info) -> None:
    """Put a benchmark in its group and record its parameters in the JSON."""
    benchmark.group = group
    benchmark.extra_info.update({k: (np.dtype(v).name if k == "dtype" else v) for k, v in info.items()})
    benchmark.extra_info.setdefault("workers", vg.max_workers)


# -- workloads ------------------------------------------------------------------------------

def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=16)
def variational_params(D: int, dtype):
    """loc ~ N(0, 1) and rho ~ -3 + 0.1 N(0, 1) (scale ~ 0.05, Blundell's usual start), shape (D,)."""
    rng = np.random.default_rng(SEED)
    loc = rng.standard_normal(D).astype(dtype)
    rho = (-3.0 + 0.1 * rng.standard_normal(D)).astype(dtype)
    return _readonly(loc, rho)


@functools.lru_cache(maxsize=16)
def pathwise_problem(D: int, S: int, dtype):
    """loc, rho (D,), eps (S, D) and grad_log_lik = -(w - 0.5) at w = loc + softplus(rho) eps,
    the gradient of the seed's log-likelihood -(w - 0.5)^2 / 2, all in ``dtype``."""
    loc, rho = variational_params(D, dtype)
    eps = np.random.default_rng(SEED + S).standard_normal((S, D)).astype(dtype)
    w = loc + np.logaddexp(0, rho).astype(dtype) * eps
    glik = -(w - dtype(0.5))
    return _readonly(loc, rho, eps, glik)


def seed_log_lik(w):
    """The seed's log P(D | w) = -(w - 0.5)^2 / 2, summed per sample, and its gradient (user code)."""
    r = w - 0.5
    return -0.5 * (r * r).reshape(r.shape[0], -1).sum(axis=1), -r


# -- priors ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PriorCase:
    """One prior in its three spellings: vigrad object, raw kernel arguments, torch log-density."""

    name: str
    params: tuple
    #: Magnitude of the gradient's summands, for the absolute tolerance floor RTOL * tol_scale.
    tol_scale: float = 10.0

    @property
    def vigrad(self):
        return vg.Normal(*self.params) if self.name == "normal" else vg.ScaleMixtureNormal(*self.params)

    def flat(self, dtype):
        """The kernel arguments: each parameter as a (1,) array of ``dtype``."""
        return tuple(np.array([p], dtype=dtype) for p in self.params)

    def kernel(self, module):
        """module.pathwise_grad_normal or module.pathwise_grad_mixture (module: _core or reference)."""
        return getattr(module, f"pathwise_grad_{self.name}")

    def torch_log_prob(self, torch, w):
        if self.name == "normal":
            m, s = self.params
            return -HALF_LOG_2PI - math.log(s) - 0.5 * ((w - m) / s) ** 2
        pi, s1, s2 = self.params
        a = math.log(pi) - HALF_LOG_2PI - math.log(s1) - 0.5 * (w / s1) ** 2
        b = math.log1p(-pi) - HALF_LOG_2PI - math.log(s2) - 0.5 * (w / s2) ** 2
        return torch.logaddexp(a, b)


NORMAL = PriorCase("normal", (0.0, 1.0))
# Blundell et al.'s (pi, sigma1, sigma2).  Near w = 0 the narrow component's gradient -w / sigma2^2
# multiplies the rounding of w = loc + scale * eps (|loc| up to ~0.3 there) by e^12: about 2e-3 in
# float32 (seen: 2.6e-3 on 3 of 10^6 elements, vigrad and torch alike), hence the larger floor.
MIXTURE = PriorCase("mixture", (0.5, 1.0, math.exp(-6)), tol_scale=50.0)
PRIORS = [NORMAL, MIXTURE]


# -- checks ---------------------------------------------------------------------------------

def assert_agree(actual, desired, dtype, scale=1.0):
    """Agreement at the dtype's tolerance; the absolute floor RTOL * scale covers entries
    that are sums with cancellation (scale: the magnitude of the summands)."""
    rtol = RTOL[np.dtype(dtype)]
    for a, d in zip(actual, desired):
        a, d = (np.asarray(x, dtype=np.float64) for x in (a, d))
        assert a.shape == d.shape
        np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * scale)


def assert_standard_normal(z):
    """z (any shape, >= 10^5 draws) looks like N(0, 1): mean and variance within 6 standard errors."""
    z = np.asarray(z, dtype=np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 6 * math.sqrt(2.0 / n)


def peak_alloc(fn):
    """(peak bytes allocated during fn() beyond what was live before, fn's result).

    NumPy reports its array buffers to tracemalloc; the result is still alive at the
    peak, so it is included."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before, out


def page_faults_per_call(fn, calls=5):
    """Minor page faults per call of fn() (after one warm-up call), or None where the OS does
    not count them.  Output arrays that the allocator takes fresh from the OS fault on first
    touch: ~1000 faults cost ~2 ms here.  Whether they do depends on the heap's history."""
    if resource is None:
        return None
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


@functools.lru_cache(maxsize=16)
def reference_pathwise(prior: PriorCase, D: int, S: int, dtype):
    """The NumPy reference on :func:`pathwise_problem`: ((grad_loc, grad_rho), peak bytes it
    allocated).  Cached, as it is slow."""
    loc, rho, eps, glik = pathwise_problem(D, S, dtype)
    peak, (gl, gr, _, finite) = peak_alloc(
        lambda: prior.kernel(ref)(loc, rho, eps, glik, *prior.flat(dtype), "mc", 1.0, 1))
    assert finite
    return _readonly(gl, gr), peak


# -- PyTorch --------------------------------------------------------------------------------

def torch_params(torch, loc, rho):
    """Leaf tensors (copies) for loc and rho that require grad."""
    return (torch.tensor(np.array(loc), requires_grad=True), torch.tensor(np.array(rho), requires_grad=True))


def torch_free_energy_step(torch, loc, rho, prior: PriorCase, eps=None, num_samples=1):
    """One eager autograd step of F = mean_s sum_j [log q(w) - log p(w) - log P(D | w)] with
    w = loc + softplus(rho) eps and the seed's log-likelihood -(w - 0.5)^2 / 2.

    ``eps`` (S, D) is used when given, else drawn with torch.randn.  Returns (F, dF/dloc, dF/drho).
    """
    loc.grad = rho.grad = None
    if eps is None:
        eps = torch.randn((num_samples,) + tuple(loc.shape), dtype=loc.dtype)
    scale = torch.nn.functional.softplus(rho)
    w = loc + scale * eps
    log_q = -HALF_LOG_2PI - torch.log(scale) - 0.5 * ((w - loc) / scale) ** 2
    log_lik = -0.5 * (w - 0.5) ** 2
    F = (log_q - prior.torch_log_prob(torch, w) - log_lik).sum() / eps.shape[0]
    F.backward()
    return F, loc.grad, rho.grad

