"""One whole gradient step at D = 10^6: sampling, the user's log-likelihood, the gradient.

vigrad: vg.elbo_grad with the seed's log-likelihood -(w - 0.5)^2 / 2 and its gradient
written in NumPy.  PyTorch: the same step in eager mode (torch.randn noise, softplus,
log q, Normal(0, 1) log p, the log-likelihood, .backward()).  Normal(0, 1) prior,
kl="mc", S = 1 and 8 samples.  Target: vigrad >= 4x torch eager in float64.
The vigrad benchmarks also record the memory a call allocates.
"""

import threading

import numpy as np
import pytest

import vigrad as vg
from vigrad import reference as ref

from benchlib import (D, DTYPES, NORMAL, SEED, assert_agree, dtype_id, page_faults_per_call, peak_alloc,
                      seed_log_lik, tag, torch_free_energy_step, torch_params, variational_params)

pytestmark = [pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id),
              pytest.mark.parametrize("S", [1, 8], ids=lambda s: f"S{s}")]


def _setup(benchmark, impl, dtype, S):
    tag(benchmark, f"elbo-{dtype_id(dtype)}-S{S}", impl=impl, prior=NORMAL.name, D=D, S=S, dtype=dtype)
    return vg.MeanFieldGaussian(*variational_params(D, dtype))


def _same_noise(q, S):
    """The noise elbo_grad(..., rng=SEED) draws (the same seed gives the same key)."""
    return q.sample(S, rng=SEED, return_noise=True)[1]


def _in_new_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()))
    t.start()
    t.join()
    return box["out"]


def test_elbo_vigrad(benchmark, dtype, S):
    q = _setup(benchmark, "vigrad", dtype, S)
    prior = NORMAL.vigrad

    def step():
        return vg.elbo_grad(q, seed_log_lik, prior, num_samples=S, rng=SEED)

    # Memory: the first call in a thread, and a repeated call (elbo_grad may keep scratch per thread).
    benchmark.extra_info["peak_alloc_bytes_first_call"] = _in_new_thread(lambda: peak_alloc(step)[0])
    step()
    benchmark.extra_info["peak_alloc_bytes"] = peak_alloc(step)[0]
    benchmark.extra_info["page_faults_per_call"] = page_faults_per_call(step)
    res = benchmark(step)

    # the NumPy reference on the same noise
    eps = _same_noise(q, S)
    w = (q.loc + q.scale * eps).astype(dtype)
    values, glik = seed_log_lik(w)
    gl, gr, kl, finite = ref.pathwise_grad_normal(q.loc, q.rho, eps, glik, *NORMAL.flat(dtype), "mc", 1.0, 1)
    assert finite
    assert_agree((res.grad_loc, res.grad_rho), (gl, gr), dtype, NORMAL.tol_scale)
    assert_agree([res.loss, res.kl], [kl - values.mean(dtype=np.float64), kl], dtype)


def test_elbo_torch(benchmark, torch, dtype, S):
    q = _setup(benchmark, "torch", dtype, S)
    loc, rho = torch_params(torch, q.loc, q.rho)
    torch.manual_seed(SEED)
    _, gl, gr = benchmark(torch_free_energy_step, torch, loc, rho, NORMAL, num_samples=S)
    assert gl.shape == gr.shape == (D,) and torch.isfinite(gl).all() and torch.isfinite(gr).all()

    # the same formulation on vigrad's noise gives vigrad's loss and gradient
    F, gl, gr = torch_free_energy_step(torch, loc, rho, NORMAL, eps=torch.from_numpy(_same_noise(q, S)))
    res = vg.elbo_grad(q, seed_log_lik, NORMAL.vigrad, num_samples=S, rng=SEED)
    assert_agree((gl.numpy(), gr.numpy()), (res.grad_loc, res.grad_rho), dtype, NORMAL.tol_scale)
    assert_agree([F.item()], [res.loss], dtype)
