"""The pathwise gradient (Proposition 1, kl="mc") with the noise given: vg.pathwise_grad
vs the NumPy reference kernel on identical arguments vs PyTorch eager autograd on the
same noise.

Main grid: D = 10^6, Normal(0, 1) and scale-mixture priors, float64 and float32,
S = 1 and 8 samples.  Size sweep: Normal prior, S = 1, D = 10^3 ... 10^6 (and 10^7
in float32).  Target: vigrad >= 5x the NumPy reference in float64.  The vigrad
benchmarks also record (and bound) the memory pathwise_grad allocates.
"""

import numpy as np
import pytest

import vigrad as vg
from vigrad import reference as ref

from benchlib import (D, DTYPES, NORMAL, PRIORS, assert_agree, dtype_id, page_faults_per_call, pathwise_problem,
                      peak_alloc, reference_pathwise, size_id, tag, torch_free_energy_step, torch_params)

#: Allowance over the two outputs for what pathwise_grad may allocate besides (Python objects).
SMALL_CHANGE = 64 * 1024


def _cases(slow_above=None):
    """(prior, dtype, S, D) for the main grid and the size sweep; pytest.param with ids.
    Sizes above ``slow_above`` are marked slow."""
    grid = [(p, dt, S, D) for p in PRIORS for dt in DTYPES for S in (1, 8)]
    sweep = [(NORMAL, dt, 1, n) for dt in DTYPES for n in (10**3, 10**4, 10**5)]
    sweep += [(NORMAL, np.float32, 1, 10**7)]
    out = []
    for prior, dt, S, n in grid + sweep:
        marks = [pytest.mark.slow] if slow_above is not None and n > slow_above else []
        out.append(pytest.param(prior, dt, S, n, marks=marks, id=f"{prior.name}-{dtype_id(dt)}-S{S}-D{size_id(n)}"))
    return out


CASES = pytest.mark.parametrize("prior,dtype,S,n", _cases())


def _setup(benchmark, impl, prior, dtype, S, n):
    tag(benchmark, f"pathwise-{prior.name}-{dtype_id(dtype)}-S{S}-D{size_id(n)}",
        impl=impl, prior=prior.name, D=n, S=S, dtype=dtype)
    return pathwise_problem(n, S, dtype)


@CASES
def test_pathwise_vigrad(benchmark, prior, dtype, S, n):
    loc, rho, eps, glik = _setup(benchmark, "vigrad", prior, dtype, S, n)
    p = prior.vigrad

    def call():
        return vg.pathwise_grad(loc, rho, eps, glik, p)

    peak, _ = peak_alloc(call)
    benchmark.extra_info["peak_alloc_bytes"] = peak
    benchmark.extra_info["page_faults_per_call"] = page_faults_per_call(call)
    out = benchmark(call)
    assert_agree(out, reference_pathwise(prior, n, S, dtype)[0], dtype, prior.tol_scale)
    # "nothing is allocated but the two outputs"
    assert peak <= 2 * n * np.dtype(dtype).itemsize + SMALL_CHANGE


@pytest.mark.parametrize("prior,dtype,S,n", _cases(slow_above=10**6))
def test_pathwise_reference(benchmark, prior, dtype, S, n):
    loc, rho, eps, glik = _setup(benchmark, "numpy-ref", prior, dtype, S, n)
    benchmark.extra_info["peak_alloc_bytes"] = reference_pathwise(prior, n, S, dtype)[1]
    gl, gr, _, finite = benchmark(prior.kernel(ref), loc, rho, eps, glik, *prior.flat(dtype), "mc", 1.0,
                                  vg.max_workers)
    assert finite
    assert_agree((gl, gr), vg.pathwise_grad(loc, rho, eps, glik, prior.vigrad), dtype, prior.tol_scale)


@CASES
def test_pathwise_torch(benchmark, torch, prior, dtype, S, n):
    loc, rho, eps, glik = _setup(benchmark, "torch", prior, dtype, S, n)
    loc_t, rho_t = torch_params(torch, loc, rho)
    eps_t = torch.from_numpy(eps.copy())
    _, gl, gr = benchmark(torch_free_energy_step, torch, loc_t, rho_t, prior, eps_t)
    assert_agree((gl.numpy(), gr.numpy()), vg.pathwise_grad(loc, rho, eps, glik, prior.vigrad), dtype, prior.tol_scale)
