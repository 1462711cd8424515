"""vigrad.torch: the PyTorch adapter (sample_weights, BayesianLinear, kl_loss) against plain torch autograd.

Oracles: torch.autograd.gradcheck (float64 finite differences), and the same computation written
in plain differentiable torch on the same noise (the noise is reconstructed from the layer's key:
eps = row 0 of vigrad._core.standard_normal(key, (1, P)), Flipout's signs from
np.random.default_rng(key), the local reparameterisation's zeta from key ^ 0x5DEECE66D, as
vigrad.bnn).  float64 comparisons hold to rtol 1e-10 (only the summation order differs).
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import vigrad as vg  # noqa: E402
import vigrad.torch as vgt  # noqa: E402
from vigrad import _core  # noqa: E402
from vigrad.datasets import load_digits, train_test_split  # noqa: E402

from vg_testutil import load_example  # noqa: E402

F64 = torch.float64
ESTIMATORS = ["reparam", "local", "flipout"]
MIXTURE = vg.ScaleMixtureNormal(0.5, 1.0, math.exp(-2))
NORMAL = vg.Normal(0.2, 1.3)


# -- plain-torch references ------------------------------------------------------------------------
def t64(v):
    return torch.tensor(v, dtype=F64)


def ref_log_prior(w, prior):
    """log p(w) summed over every axis but the first (all axes for a 1-D w)."""
    if isinstance(prior, vg.Normal):
        lp = torch.distributions.Normal(t64(prior.loc), t64(prior.scale)).log_prob(w)
    else:
        pi, s1, s2 = float(prior.pi), float(prior.sigma1), float(prior.sigma2)
        lp = torch.logsumexp(torch.stack([
            math.log(pi) + torch.distributions.Normal(t64(0.0), t64(s1)).log_prob(w),
            math.log1p(-pi) + torch.distributions.Normal(t64(0.0), t64(s2)).log_prob(w)]), dim=0)
    return lp


def ref_kl_analytic(loc, sigma, prior):
    m, s = float(prior.loc), float(prior.scale)
    return (math.log(s) - torch.log(sigma) + 0.5 * (sigma**2 + (loc - m) ** 2) / s**2 - 0.5).sum()


def ref_sample_weights(loc, rho, eps, prior, kl):
    sigma = torch.nn.functional.softplus(rho)
    w = loc + sigma * eps
    if kl == "analytic":
        return w, ref_kl_analytic(loc, sigma, prior)
    ws = w.reshape((-1,) + tuple(loc.shape))
    per = (torch.distributions.Normal(loc, sigma).log_prob(ws) - ref_log_prior(ws, prior)).reshape(ws.shape[0], -1)
    return w, per.sum(dim=1).mean()


def layer_noise(layer, key, batch):
    """The noise of one sampled forward, regenerated from its key as vigrad.bnn does (in the
    layer's dtype: the float32 draws are not the rounding of the float64 ones), as float64."""
    P = layer.num_params
    dt = np.float32 if layer.loc.dtype == torch.float32 else np.float64
    eps = np.empty((1, P), dt)
    _core.standard_normal(key, eps, 1)
    signs = np.random.default_rng(key).integers(0, 2, size=(batch, layer.in_features + layer.out_features),
                                                dtype=np.int8)
    zeta = np.empty((1, batch * layer.out_features), dt)
    _core.standard_normal(key ^ 0x5DEECE66D, zeta, 1)
    return (torch.from_numpy(eps[0].astype(np.float64)), torch.from_numpy(2.0 * signs - 1.0),
            torch.from_numpy(zeta.reshape(batch, layer.out_features).astype(np.float64)))


def ref_layer(layer, loc, rho, x, key):
    """(y, kl) of layer's sampled forward with key, in plain differentiable torch (float64)."""
    n_in, n_out = layer.in_features, layer.out_features
    k = n_in * n_out
    eps, signs, zeta = layer_noise(layer, key, x.shape[0])
    sigma = torch.nn.functional.softplus(rho)
    M, mb = loc[:k].view(n_out, n_in), loc[k:]
    if layer.estimator == "reparam":
        w = loc + sigma * eps
        y = x @ w[:k].view(n_out, n_in).T + w[k:]
    elif layer.estimator == "flipout":
        dw = sigma * eps
        S, R = signs[:, :n_in], signs[:, n_in:]
        y = x @ M.T + mb + ((x * S) @ dw[:k].view(n_out, n_in).T + dw[k:]) * R
    else:
        var = sigma * sigma
        y = x @ M.T + mb + torch.sqrt((x * x) @ var[:k].view(n_out, n_in).T + var[k:]) * zeta
    if layer.kl == "analytic":
        kl = ref_kl_analytic(loc, sigma, layer.prior)
    else:
        w_kl = loc + sigma * eps
        kl = (torch.distributions.Normal(loc, sigma).log_prob(w_kl) - ref_log_prior(w_kl, layer.prior)).sum()
    return y, kl


def close(a, b, rtol=1e-10, atol=1e-12):
    a, b = (t.detach().double() if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t, np.float64))
            for t in (a, b))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def params64(shape, seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=g, dtype=F64).requires_grad_()
    rho = (torch.randn(shape, generator=g, dtype=F64) - 1.0).requires_grad_()
    return loc, rho, g


# -- packaging -------------------------------------------------------------------------------------
def test_import_vigrad_does_not_import_torch_and_the_module_sees_pytorch():
    code = "import sys, vigrad; assert 'torch' not in sys.modules, 'vigrad imported torch'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert vgt.torch is torch  # `import torch` inside vigrad/torch.py is PyTorch, not itself
    assert vgt.__name__ == "vigrad.torch"


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(vgt, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- sample_weights --------------------------------------------------------------------------------
CASES = [(NORMAL, "mc"), (NORMAL, "analytic"), (MIXTURE, "mc")]


@pytest.mark.parametrize("prior,kl", CASES, ids=["normal-mc", "normal-analytic", "mixture-mc"])
@pytest.mark.parametrize("S", [None, 1, 3], ids=["one-sample-shape", "S1", "S3"])
def test_sample_weights_gradcheck(prior, kl, S):
    loc, rho, g = params64((2, 3), seed=1)
    eps = torch.randn(((S,) if S else ()) + (2, 3), generator=g, dtype=F64)
    assert torch.autograd.gradcheck(lambda l, r: vgt.sample_weights(l, r, eps, prior, kl), (loc, rho))


@pytest.mark.parametrize("prior,kl", CASES, ids=["normal-mc", "normal-analytic", "mixture-mc"])
@pytest.mark.parametrize("S", [None, 4])
def test_sample_weights_equals_plain_torch_autograd(prior, kl, S):
    loc, rho, g = params64((3, 2), seed=2)
    eps = torch.randn(((S,) if S else ()) + (3, 2), generator=g, dtype=F64)
    gw = torch.randn(eps.shape, generator=g, dtype=F64)
    c = -0.7  # any weighting of the KL, negative included
    w, kl_v = vgt.sample_weights(loc, rho, eps, prior, kl=kl)
    loss = (gw * w).sum() + c * kl_v
    g_loc, g_rho = torch.autograd.grad(loss, (loc, rho))
    w_r, kl_r = ref_sample_weights(loc, rho, eps, prior, kl)
    r_loc, r_rho = torch.autograd.grad((gw * w_r).sum() + c * kl_r, (loc, rho))
    assert w.shape == eps.shape and w.dtype == F64 and kl_v.shape == () and kl_v.dtype == F64
    close(w, w_r)
    close(kl_v, kl_r)
    close(g_loc, r_loc)
    close(g_rho, r_rho)


def test_sample_weights_kl_matches_vigrad_and_one_output_alone():
    loc, rho, g = params64((5,), seed=3)
    eps = torch.randn(2, 5, generator=g, dtype=F64)
    q = vg.MeanFieldGaussian(loc.detach().numpy(), rho.detach().numpy())
    _, kl_a = vgt.sample_weights(loc, rho, eps, NORMAL, kl="analytic")
    close(kl_a, float(vg.kl_divergence(q, NORMAL)), rtol=1e-12)
    # only w used (the grad of kl is zero), only kl used
    w, kl_v = vgt.sample_weights(loc, rho, eps, MIXTURE)
    w_r, kl_r = ref_sample_weights(loc, rho, eps, MIXTURE, "mc")
    close(torch.autograd.grad(w.sum(), (rho,), retain_graph=True)[0],
          torch.autograd.grad(w_r.sum(), (rho,), retain_graph=True)[0])
    close(torch.autograd.grad(kl_v, (loc,))[0], torch.autograd.grad(kl_r, (loc,))[0])
    # the vigrad estimator's own numbers: the gradient of F = KL - mean log P with glik = -S gw
    gw = torch.randn(2, 5, generator=g, dtype=F64)
    w, kl_v = vgt.sample_weights(loc, rho, eps, MIXTURE)
    gl, gr = torch.autograd.grad((gw * w).sum() + kl_v, (loc, rho))
    el, er = vg.pathwise_grad(loc.detach().numpy(), rho.detach().numpy(), eps.numpy(), -2.0 * gw.numpy(), MIXTURE)
    close(gl, el, rtol=1e-12)
    close(gr, er, rtol=1e-12)


def test_sample_weights_float32_and_strided_inputs():
    loc, rho, g = params64((4, 3), seed=4)
    eps = torch.randn(2, 4, 3, generator=g, dtype=F64)
    w64, kl64 = vgt.sample_weights(loc, rho, eps, MIXTURE)
    gl64, gr64 = torch.autograd.grad(w64.square().sum() + kl64, (loc, rho))
    l32 = loc.detach().float().requires_grad_()
    r32 = rho.detach().float().requires_grad_()
    w32, kl32 = vgt.sample_weights(l32, r32, eps.float(), MIXTURE)
    assert w32.dtype == torch.float32 and kl32.dtype == torch.float32
    gl32, gr32 = torch.autograd.grad(w32.square().sum() + kl32, (l32, r32))
    assert gl32.dtype == torch.float32 and gr32.dtype == torch.float32
    close(w32, w64, rtol=1e-5, atol=1e-5)
    close(kl32, kl64, rtol=1e-4, atol=1e-4)
    close(gl32, gl64, rtol=1e-4, atol=1e-4)
    close(gr32, gr64, rtol=1e-4, atol=1e-4)
    # non-contiguous (transposed-layout) parameters and noise: made contiguous, the same numbers
    l_nc = loc.detach().T.contiguous().T.requires_grad_()
    r_nc = rho.detach().T.contiguous().T.requires_grad_()
    e_nc = eps.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (l_nc.is_contiguous() or r_nc.is_contiguous() or e_nc.is_contiguous())
    w_nc, kl_nc = vgt.sample_weights(l_nc, r_nc, e_nc, MIXTURE)
    close(w_nc, w64, rtol=0, atol=0)
    close(kl_nc, kl64, rtol=0, atol=0)
    gl_nc, gr_nc = torch.autograd.grad(w_nc.square().sum() + kl_nc, (l_nc, r_nc))
    close(gl_nc, gl64, rtol=0, atol=0)
    close(gr_nc, gr64, rtol=0, atol=0)


def test_one_fused_kernel_call_per_backward_on_the_tensors_memory(monkeypatch):
    calls = []

    def spy(name):
        real = getattr(_core, name)

        def wrapper(*args, **kwargs):
            calls.append((name, args))
            return real(*args, **kwargs)
        monkeypatch.setattr(_core, name, wrapper)

    for name in ("pathwise_grad_mixture", "bbb_grad_mixture", "bbb_noise", "bbb_noise_kl_mixture"):
        spy(name)
    loc, rho, g = params64((4,), seed=6)
    w, kl = vgt.sample_weights(loc, rho, torch.randn(3, 4, dtype=F64), MIXTURE)
    assert calls == []
    ((w * w).sum() + 0.5 * kl).backward()
    assert [c[0] for c in calls] == ["pathwise_grad_mixture"]
    args = calls[0][1]
    assert args[0].__array_interface__["data"][0] == loc.data_ptr()  # zero-copy views of the parameters
    assert args[1].__array_interface__["data"][0] == rho.data_ptr()
    assert args[-2] == 0.5  # kl_weight = the gradient reaching kl
    calls.clear()
    layer = vgt.BayesianLinear(3, 2, prior=MIXTURE, seed=0, dtype=F64)
    out = layer(torch.randn(5, 3, dtype=F64))
    assert [c[0] for c in calls] == ["bbb_noise_kl_mixture"]  # the weights and the KL value, one pass
    calls.clear()
    (out.sum() + 0.25 * vgt.kl_loss(layer)).backward()
    assert [c[0] for c in calls] == ["bbb_grad_mixture"]
    args = calls[0][1]
    assert args[:3] == ("reparam", "mc", layer.last_key) and args[-2] == 0.25
    assert args[3].__array_interface__["data"][0] == layer.loc.data_ptr()


def test_sample_weights_errors():
    loc, rho, g = params64((3,), seed=5)
    eps = torch.randn(2, 3, dtype=F64)
    with pytest.raises(TypeError, match="loc and rho.*float64.*float32"):
        vgt.sample_weights(loc, rho.float(), eps, NORMAL)
    with pytest.raises(TypeError, match="loc and eps"):
        vgt.sample_weights(loc, rho, eps.float(), NORMAL)
    with pytest.raises(TypeError, match="float32 or float64"):
        vgt.sample_weights(loc.half(), rho.half(), eps.half(), NORMAL)
    with pytest.raises(TypeError, match="torch.Tensor"):
        vgt.sample_weights(loc.detach().numpy(), rho, eps, NORMAL)
    with pytest.raises(ValueError, match="same shape"):
        vgt.sample_weights(loc, rho[:2], eps, NORMAL)
    with pytest.raises(ValueError, match=r"eps must have shape \(S, \*\(3,\)\)"):
        vgt.sample_weights(loc, rho, torch.randn(2, 4, dtype=F64), NORMAL)
    with pytest.raises(ValueError, match="at least one sample"):
        vgt.sample_weights(loc, rho, torch.randn(0, 3, dtype=F64), NORMAL)
    with pytest.raises(ValueError, match="Normal prior"):
        vgt.sample_weights(loc, rho, eps, MIXTURE, kl="analytic")
    with pytest.raises(ValueError, match="kl must be"):
        vgt.sample_weights(loc, rho, eps, NORMAL, kl="closed")
    with pytest.raises(TypeError, match="prior must be"):
        vgt.sample_weights(loc, rho, eps, torch.distributions.Normal(0.0, 1.0))
    meta = torch.empty(3, dtype=F64, device="meta")  # a non-CPU device without a GPU
    with pytest.raises(vgt.DeviceError, match="vigrad's core runs on CPU tensors; loc is on meta"):
        vgt.sample_weights(meta, meta, eps, NORMAL)
    assert issubclass(vgt.DeviceError, TypeError) and issubclass(vgt.DeviceError, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_refused():
    loc = torch.zeros(3, device="cuda")
    with pytest.raises(TypeError, match="CPU tensors"):
        vgt.sample_weights(loc, loc, loc, NORMAL)
    layer = vgt.BayesianLinear(3, 2, seed=0)
    with pytest.raises(TypeError, match="CPU tensors"):
        layer(torch.zeros(1, 3, device="cuda"))
    with pytest.raises(TypeError, match="CPU tensors"):
        layer.cuda()(torch.zeros(1, 3, device="cuda"))


# -- BayesianLinear --------------------------------------------------------------------------------
def two_layer(estimator, prior, kl="mc", dtype=F64, seed=0):
    return torch.nn.Sequential(
        vgt.BayesianLinear(4, 5, prior=prior, estimator=estimator, kl=kl, init_rho=-1.5, seed=seed, dtype=dtype),
        torch.nn.Tanh(),
        vgt.BayesianLinear(5, 3, prior=prior, estimator=estimator, kl=kl, init_rho=-2.0, seed=seed + 1, dtype=dtype))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("prior,kl", CASES, ids=["normal-mc", "normal-analytic", "mixture-mc"])
def test_layer_gradients_equal_plain_torch_autograd(estimator, prior, kl):
    model = two_layer(estimator, prior, kl)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, 3, (6,), generator=g)
    c = 0.37
    before = [(m.loc.detach().clone().requires_grad_(), m.rho.detach().clone().requires_grad_())
              for m in (model[0], model[2])]
    out = model(x)
    kl_total = vgt.kl_loss(model)
    loss = torch.nn.functional.cross_entropy(out, y, reduction="sum") + c * kl_total
    loss.backward()
    # the same computation in plain torch on the noise regenerated from each layer's key
    x_r = x.detach().clone().requires_grad_()
    h, _ = ref_layer(model[0], *before[0], x_r, model[0].last_key)
    h = torch.tanh(h)
    f, _ = ref_layer(model[2], *before[1], h, model[2].last_key)
    kls = [ref_layer(m, *p, torch.zeros(1, m.in_features, dtype=F64), m.last_key)[1]
           for m, p in zip((model[0], model[2]), before)]
    loss_r = torch.nn.functional.cross_entropy(f, y, reduction="sum") + c * (kls[0] + kls[1])
    loss_r.backward()
    close(out, f)
    close(model[0].last_kl, kls[0])
    close(model[2].last_kl, kls[1])
    close(kl_total, kls[0] + kls[1])
    close(loss, loss_r)
    close(x.grad, x_r.grad)
    for m, (lr_, rr_) in zip((model[0], model[2]), before):
        close(m.loc.grad, lr_.grad)
        close(m.rho.grad, rr_.grad)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_layer_float32_and_leading_dims(estimator):
    m64 = vgt.BayesianLinear(3, 2, prior=MIXTURE, estimator=estimator, init_rho=-1.0, seed=3, dtype=F64)
    m32 = vgt.BayesianLinear(3, 2, prior=MIXTURE, estimator=estimator, init_rho=-1.0, seed=3, dtype=torch.float32)
    assert m32.loc.dtype == torch.float32 and m32.rho.dtype == torch.float32
    close(m32.loc, m64.loc.float(), rtol=0, atol=0)  # the same means, rounded
    x = torch.randn(2, 4, 3, dtype=F64)
    out = m32(x.float())
    assert out.shape == (2, 4, 2) and out.dtype == torch.float32 and m32.last_kl.dtype == torch.float32
    (out.square().sum() + 0.1 * m32.last_kl).backward()
    assert m32.loc.grad.dtype == torch.float32 and m32.rho.grad.dtype == torch.float32
    # against plain float64 torch on the layer's (float32) noise
    loc = m32.loc.detach().double().requires_grad_()
    rho = m32.rho.detach().double().requires_grad_()
    y_r, kl_r = ref_layer(m32, loc, rho, x.reshape(8, 3), m32.last_key)
    (y_r.square().sum() + 0.1 * kl_r).backward()
    close(out.reshape(8, 2), y_r, rtol=1e-5, atol=1e-5)
    close(m32.last_kl, kl_r, rtol=1e-5, atol=1e-4)
    close(m32.loc.grad, loc.grad, rtol=1e-4, atol=1e-4)
    close(m32.rho.grad, rho.grad, rtol=1e-4, atol=1e-4)
    # one example as a 1-D input
    assert m64(torch.ones(3, dtype=F64)).shape == (2,)
    # a non-contiguous input gives the numbers of its contiguous copy
    xt = torch.randn(3, 5, dtype=F64).T
    assert not xt.is_contiguous()
    a = vgt.BayesianLinear(3, 2, estimator=estimator, seed=9, dtype=F64)
    b = vgt.BayesianLinear(3, 2, estimator=estimator, seed=9, dtype=F64)
    close(a(xt), b(xt.contiguous()), rtol=0, atol=0)


def test_layer_parameters_views_and_init():
    torch.manual_seed(0)
    layer = vgt.BayesianLinear(7, 4)
    assert isinstance(layer.loc, torch.nn.Parameter) and isinstance(layer.rho, torch.nn.Parameter)
    assert layer.loc.shape == (7 * 4 + 4,) and layer.loc.dtype == torch.get_default_dtype()
    assert {n for n, _ in layer.named_parameters()} == {"loc", "rho"}
    assert layer.weight_loc.shape == (4, 7) and layer.bias_loc.shape == (4,)
    assert layer.weight_rho.shape == (4, 7) and layer.bias_rho.shape == (4,)
    assert layer.weight_loc.data_ptr() == layer.loc.data_ptr()
    assert layer.bias_rho.data_ptr() == layer.rho.data_ptr() + 28 * layer.rho.element_size()
    bound = 1 / math.sqrt(7)
    assert float(layer.loc.detach().abs().max()) <= bound and float(layer.loc.detach().std()) > bound / 4
    assert torch.all(layer.rho == -7.0)
    close(layer.weight_scale, torch.full((4, 7), math.log1p(math.exp(-7.0))), rtol=1e-6)
    assert isinstance(layer.prior, vg.ScaleMixtureNormal)
    assert float(layer.prior.pi) == 0.5 and float(layer.prior.sigma1) == 1.0
    assert math.isclose(float(layer.prior.sigma2), math.exp(-6))
    assert "estimator='reparam'" in repr(layer)
    # the default seed comes from torch's generator: torch.manual_seed reproduces the layer
    torch.manual_seed(0)
    again = vgt.BayesianLinear(7, 4)
    assert again.seed == layer.seed and torch.equal(again.loc, layer.loc)


def test_kl_term_against_closed_form():
    # analytic: exactly vg.kl_divergence
    layer = vgt.BayesianLinear(3, 2, prior=NORMAL, kl="analytic", init_rho=-1.0, seed=0, dtype=F64)
    assert layer.last_kl is None  # nothing ran yet
    layer(torch.randn(4, 3, dtype=F64))
    q = vg.MeanFieldGaussian(layer.loc.detach().numpy(), layer.rho.detach().numpy())
    exact = float(vg.kl_divergence(q, NORMAL))
    close(layer.last_kl, exact, rtol=1e-12)
    # mc: the mean over repeated forwards within 4 standard errors of the closed form
    mc = vgt.BayesianLinear(3, 2, prior=NORMAL, kl="mc", init_rho=-1.0, seed=0, dtype=F64)
    x = torch.randn(1, 3, dtype=F64)
    vals = []
    with torch.no_grad():
        for _ in range(400):
            mc(x)
            vals.append(float(vgt.kl_loss(mc)))
    vals = np.array(vals)
    assert len(set(vals.tolist())) == 400  # a fresh key per forward
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert abs(vals.mean() - exact) < 4 * se, (vals.mean(), exact, se)


def test_kl_loss_sums_layers_and_weights_the_gradient():
    model = two_layer("reparam", MIXTURE)
    model(torch.randn(5, 4, dtype=F64))
    total = vgt.kl_loss(model)
    close(total, model[0].last_kl + model[2].last_kl, rtol=0, atol=0)
    assert total.shape == () and total.requires_grad
    # d(c * KL)/d rho = c * d KL / d rho for any c: the KL weight is the incoming gradient
    grads = []
    for c in (1.0, 2.5):
        model.zero_grad()
        (c * total).backward(retain_graph=True)
        grads.append(model[0].rho.grad.clone())
    close(grads[1], 2.5 * grads[0], rtol=1e-12)
    # no vigrad layer: a zero tensor
    assert vgt.kl_loss(torch.nn.Linear(2, 2)).item() == 0.0
    with pytest.raises(TypeError, match="nn.Module"):
        vgt.kl_loss([model])


def test_eval_mode_uses_the_mean_and_sampling_context():
    layer = vgt.BayesianLinear(3, 2, init_rho=0.0, seed=0, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)
    layer(x)
    kl_train, key_train, step = layer.last_kl, layer.last_key, layer.noise_step.clone()
    layer.eval()
    y = layer(x)
    # the mean weights (to rounding: the layer may fuse the bias add, whose BLAS kernel is the CPU's)
    close(y, x @ layer.weight_loc.T + layer.bias_loc)
    assert layer.last_kl is kl_train and layer.last_key == key_train  # the eval forward records nothing
    assert torch.equal(layer.noise_step, step)
    y.sum().backward()  # the mean forward is differentiable in loc (plain torch)
    assert layer.loc.grad is not None and layer.rho.grad is None
    with torch.no_grad(), vgt.sampling(layer):
        a, b = layer(x), layer(x)
    assert not torch.equal(a, b) and layer.sampling is None
    assert int(layer.noise_step[0]) == 1 and int(layer.noise_step[1]) == 2  # a separate key stream
    layer.train()
    with vgt.sampling(layer, False):
        close(layer(x), y, rtol=0, atol=0)


def test_threads_forwarding_one_layer_never_draw_the_same_key(monkeypatch):
    """Each sampled forward takes the next key of the layer's counter, also when several threads
    forward one layer at once: with a thread switch forced between the counter's read and its
    write (vigrad.torch's int() made to sleep), 4 threads x 15 forwards draw the keys of steps
    0-59, each once, and the counter ends at 60."""
    import builtins
    import threading
    import time

    layer = vgt.BayesianLinear(3, 2, seed=5, workers=1)
    x = torch.ones(2, 3)
    real_int, lock, drawn = builtins.int, threading.Lock(), []

    def slow_int(*args):
        time.sleep(0.0005)  # another thread runs here
        return real_int(*args)

    original = type(layer)._next_draw

    def spy(self):
        out = original(self)
        with lock:
            drawn.append(out[0])
        return out

    def work():
        with torch.no_grad():
            for _ in range(15):
                layer(x)

    monkeypatch.setattr(vgt, "int", slow_int, raising=False)
    monkeypatch.setattr(type(layer), "_next_draw", spy)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert real_int(layer.noise_step[0]) == 60
    assert sorted(drawn) == sorted(vgt.derive_key(5, t) for t in range(60))


def test_seeded_layers_are_reproducible_and_state_dict_resumes_the_noise():
    x = torch.randn(3, 4)
    for est in ESTIMATORS:
        a = vgt.BayesianLinear(4, 3, estimator=est, seed=11, init_rho=-1.0)
        b = vgt.BayesianLinear(4, 3, estimator=est, seed=11, init_rho=-1.0)
        c = vgt.BayesianLinear(4, 3, estimator=est, seed=12, init_rho=-1.0)
        assert torch.equal(a.loc, b.loc) and not torch.equal(a.loc, c.loc)
        ya = [a(x) for _ in range(3)]
        yb = [b(x) for _ in range(3)]
        assert all(torch.equal(u, v) for u, v in zip(ya, yb))
        assert not torch.equal(ya[0], ya[1])  # a fresh key per forward
        assert a.last_key == vgt.derive_key(11, 2)
        # a layer loaded from the state dict continues the stream where it stopped
        d = vgt.BayesianLinear(4, 3, estimator=est, seed=5, init_rho=-1.0)
        d.load_state_dict(a.state_dict())
        assert d.seed == 11 and torch.equal(d(x), b(x))


def test_forward_keys_come_from_derive_key_across_key_blocks_streams_and_seed_changes():
    """The layers derive their keys a block of forwards at a time: every forward's key is still
    derive_key(seed, step, stream), across block boundaries, in both streams, after the seed changes."""
    from vigrad import _layer_ops

    # the block derivation against the one-key function, also where the step's low word carries
    for first in (0, 61, 2**32 - 3, 2**40 + 5):
        keys = _layer_ops.derive_step_keys(7, first, 6, 1)
        assert [int(k) for k in keys] == [_layer_ops.derive_keys(7, first + i, 1, 1)[0] for i in range(6)]
    layer = vgt.BayesianLinear(2, 2, seed=3, init_rho=-1.0)
    x = torch.randn(1, 2)
    block = type(layer)._KEY_BLOCK
    for t in range(block + 2):
        layer(x)
        assert layer.last_key == vgt.derive_key(3, t)
    layer.eval()
    with vgt.sampling(layer):
        layer(x)
    assert layer.last_key == vgt.derive_key(3, 0, 1)
    layer.train()
    other = vgt.BayesianLinear(2, 2, seed=9, init_rho=-1.0)
    layer.load_state_dict(other.state_dict())  # seed 9, counters at 0: the cached block is stale
    layer(x)
    assert layer.last_key == vgt.derive_key(9, 0)


def test_deepcopy_and_pickle_after_a_forward():
    import copy
    import pickle

    model = two_layer("flipout", MIXTURE)
    x = torch.randn(3, 4, dtype=F64)
    model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone[0].last_kl is None
        with pytest.raises(vgt.StaleKLError, match="no sampled forward"):
            vgt.kl_loss(clone)
        assert torch.equal(clone[0].loc, model[0].loc) and torch.equal(clone[0].noise_step, model[0].noise_step)
        assert clone(x).shape == (3, 3) and clone[0].last_kl is not None  # and it runs
    assert model[0].last_kl is not None  # the original keeps its KL term
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    assert torch.equal(a(x), b(x))  # copies continue the same noise stream


def test_layer_errors():
    layer = vgt.BayesianLinear(3, 2, seed=0)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\), got \(2, 4\)"):
        layer(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.zeros((2, 3), np.float32))
    with pytest.raises(vgt.DeviceError, match="CPU tensors; x is on meta"):
        layer(torch.zeros(2, 3, device="meta"))
    with pytest.raises(vgt.DeviceError, match="CPU tensors; the layer's parameters are on meta"):
        vgt.BayesianLinear(3, 2, seed=0).to("meta")(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        layer.half()(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="estimator"):
        vgt.BayesianLinear(3, 2, estimator="dropout")
    with pytest.raises(ValueError, match="Normal prior"):
        vgt.BayesianLinear(3, 2, kl="analytic")
    with pytest.raises(TypeError, match="prior"):
        vgt.BayesianLinear(3, 2, prior=torch.distributions.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="seed"):
        vgt.BayesianLinear(3, 2, seed=-1)
    with pytest.raises(TypeError, match="dtype"):
        vgt.BayesianLinear(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="in_features"):
        vgt.BayesianLinear(0, 2)


def test_double_backward_is_refused_clearly():
    loc, rho, g = params64((3,), seed=8)
    w, kl = vgt.sample_weights(loc, rho, torch.randn(2, 3, dtype=F64), NORMAL)
    (gl,) = torch.autograd.grad(kl, (loc,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gl.sum().backward()
    # first derivatives under create_graph=True are still right
    close(gl, torch.autograd.grad(kl, (loc,))[0], rtol=0, atol=0)
    layer = vgt.BayesianLinear(3, 2, seed=0, dtype=F64)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_short_training_run_on_the_digits_learns(estimator, tmp_path, one_torch_thread):
    ex = load_example("torch_bbb_digits")
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_fraction=0.25, rng=0)
    model = ex.build_model(estimator, seed=0, hidden=64)
    hist = ex.train(model, torch.from_numpy(Xtr), torch.from_numpy(ytr), epochs=5, lr=1e-2, seed=0)
    assert hist[-1][1] < hist[0][1]  # the NLL falls
    p = ex.predict_proba(model, torch.from_numpy(Xte), num_samples=5)
    assert vg.metrics.accuracy(p, yte) > 0.9
    assert vg.metrics.nll(p, yte) < 0.4
    if estimator == "reparam":  # the example's own entry point, fast mode
        res = ex.main(fast=True, outdir=tmp_path)
        assert res["accuracy"] > 0.9 and res["nll"] < 0.3 and 0 <= res["ece"] < 0.1
        assert res["estimators"]["reparam"]["numpy_twin"]["accuracy"] > 0.9
        assert res["png"] is None or Path(res["png"]).parent == tmp_path
