"""Bayesian CNN step (issue 14): LeNet-5 on 28x28 inputs, every layer Bayesian.

conv 1->6 5x5 (padding 2), ReLU, max-pool 2, conv 6->16 5x5, ReLU, max-pool 2, 400-120-84-10 with
ReLUs; batch 128, float32, scale-mixture prior (0.5, 1, e^-6), rho0 = -7, one weight sample per
step, Adam 1e-3, the KL summed over all weights and divided by the number of batches.  The
implementations of the same network and step, in one group:

* ``vigrad.torch-reparam`` / ``vigrad.torch-flipout``: vgt.BayesianConv2d and vgt.BayesianLinear
  (torch's conv2d and matrix products; vigrad's core draws the weights with the KL value in one
  call per layer, and gives dF/dloc, dF/drho in one fused call per layer);
* ``torch-eager-reparam``: the network written plainly in PyTorch -- weights loc + softplus(rho) eps
  with torch.randn, log q and the scale-mixture log prior in torch ops, autograd for everything;
* ``blitz-reparam``: blitz's BayesianConv2d / BayesianLinear (blitz-bayesian-pytorch, never a
  vigrad dependency; ``pip install --no-deps blitz-bayesian-pytorch`` suffices, it needs only torch),
  skipped when not installed.  blitz draws its own initialisation (means N(0, 0.1));
* ``torch-deterministic``: the network with point weights (nn.Conv2d, nn.Linear), the cost the
  Bayesian versions add to: plain PyTorch's step divided by this one bounds the speed-up any
  implementation keeping torch's convolution can reach over plain PyTorch;
* the same with ``-cl``: the network after its first convolution in the channels-last memory
  format (a generic PyTorch choice, given to plain PyTorch and vigrad alike: torch's max-pool is
  much cheaper in NHWC).

Target (issue 14): vigrad reparam >= 2x faster per step than plain PyTorch.

Each round runs 10 steps (the time per step is the figure / 10).  The checks, outside the timed
calls: on one batch, in float64, the plain-torch network given the noise vigrad drew (regenerated
from each layer's key) has vigrad's loss and gradients to rtol 1e-8; every timed implementation
ends with a finite loss.
"""

import math

import numpy as np
import pytest

from benchlib import tag

B = 128
STEPS = 10
GROUP = "bcnn-step-lenet5-28x28"
# (kind, in, out, kernel, padding)
LENET = [("conv", 1, 6, 5, 2), ("conv", 6, 16, 5, 0), ("linear", 400, 120), ("linear", 120, 84),
         ("linear", 84, 10)]
PI, SIGMA1, SIGMA2, RHO0 = 0.5, 1.0, math.exp(-6), -7.0


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.random((B * STEPS, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, B * STEPS)
    return X, y


def lenet_forward(torch, layers, x, channels_last=False):
    """The LeNet-5 body around any five layer callables.  ``channels_last``: the first convolution's
    output is copied into the channels-last memory format (NHWC), and ReLU, max-pool and the second
    convolution follow it there (the first convolution, with one input channel, stays NCHW: torch
    reads a single channel's strides as NCHW)."""
    F = torch.nn.functional
    h = layers[0](x)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    h = F.max_pool2d(torch.relu(h), 2)
    h = F.max_pool2d(torch.relu(layers[1](h)), 2).flatten(1)
    h = torch.relu(layers[2](h))
    return layers[4](torch.relu(layers[3](h)))


def vigrad_lenet(torch, estimator, dtype):
    import vigrad as vg
    import vigrad.torch as vgt

    prior = vg.ScaleMixtureNormal(PI, SIGMA1, SIGMA2)
    layers = []
    for i, spec in enumerate(LENET):
        kw = dict(prior=prior, estimator=estimator, init_rho=RHO0, seed=i, dtype=dtype)
        if spec[0] == "conv":
            layers.append(vgt.BayesianConv2d(spec[1], spec[2], spec[3], padding=spec[4], **kw))
        else:
            layers.append(vgt.BayesianLinear(spec[1], spec[2], **kw))
    return torch.nn.ModuleList(layers)


def plain_lenet(torch):
    """The same network in plain PyTorch: flat loc / rho per layer (weights then biases, the layout
    of vigrad's layers, so parameters and gradients compare directly)."""
    F = torch.nn.functional
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    class Layer(torch.nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.spec = spec
            if spec[0] == "conv":
                self.wshape = (spec[2], spec[1], spec[3], spec[3])
            else:
                self.wshape = (spec[2], spec[1])
            fan_in = math.prod(self.wshape[1:])
            n = math.prod(self.wshape) + spec[2]
            b = 1 / math.sqrt(fan_in)
            self.loc = torch.nn.Parameter(torch.empty(n).uniform_(-b, b))
            self.rho = torch.nn.Parameter(torch.full((n,), RHO0))
            self.eps = None  # set to inject given noise (the agreement check)

        def forward(self, x):
            sigma = F.softplus(self.rho)
            eps = torch.randn_like(sigma) if self.eps is None else self.eps
            w = self.loc + sigma * eps
            log_q = (-half_log_2pi - torch.log(sigma) - 0.5 * eps**2).sum()
            c1 = math.log(PI) - half_log_2pi - math.log(SIGMA1) - 0.5 * (w / SIGMA1) ** 2
            c2 = math.log1p(-PI) - half_log_2pi - math.log(SIGMA2) - 0.5 * (w / SIGMA2) ** 2
            self.kl = log_q - torch.logaddexp(c1, c2).sum()
            k = math.prod(self.wshape)
            W, bias = w[:k].view(self.wshape), w[k:]
            if self.spec[0] == "conv":
                return F.conv2d(x, W, bias, padding=self.spec[4])
            return F.linear(x, W, bias)

    return torch.nn.ModuleList([Layer(s) for s in LENET])


def blitz_lenet(torch):
    bm = pytest.importorskip("blitz.modules")
    kw = dict(prior_sigma_1=SIGMA1, prior_sigma_2=SIGMA2, prior_pi=PI, posterior_rho_init=RHO0)
    layers = []
    for spec in LENET:
        if spec[0] == "conv":
            layers.append(bm.BayesianConv2d(spec[1], spec[2], (spec[3], spec[3]), padding=spec[4], **kw))
        else:
            layers.append(bm.BayesianLinear(spec[1], spec[2], **kw))
    return torch.nn.ModuleList(layers)


def kl_of(torch, impl, layers):
    if impl.startswith("vigrad"):
        import vigrad.torch as vgt

        return vgt.kl_loss(layers)
    if impl.startswith("torch-deterministic"):
        return 0.0
    if impl.startswith("blitz"):
        return sum(m.log_variational_posterior - m.log_prior for m in layers)
    return sum(m.kl for m in layers)


def make_steps(torch, impl, layers, X, y):
    """Ten training steps; an ``impl`` ending in "-cl" runs the body after the first convolution in
    the channels-last memory format (torch's ReLU, max-pool and conv2d in NHWC: a generic PyTorch
    choice, open to every implementation alike)."""
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    cl = impl.endswith("-cl")
    opt = torch.optim.Adam(layers.parameters(), lr=1e-3)

    def ten_steps():
        for i in range(STEPS):
            xb, yb = Xt[i * B:(i + 1) * B], yt[i * B:(i + 1) * B]
            out = lenet_forward(torch, layers, xb, cl)
            loss = (torch.nn.functional.cross_entropy(out, yb, reduction="sum")
                    + kl_of(torch, impl, layers) / STEPS)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    return ten_steps


def deterministic_lenet(torch):
    """The same network with point weights (nn.Conv2d, nn.Linear): the cost every Bayesian version
    adds to, and so the bound on any speed-up over plain PyTorch that keeps torch's convolution."""
    nn = torch.nn
    return nn.ModuleList([nn.Conv2d(s[1], s[2], s[3], padding=s[4]) if s[0] == "conv" else nn.Linear(s[1], s[2])
                          for s in LENET])


def build_lenet(torch, impl):
    torch.manual_seed(0)
    if impl.startswith("vigrad"):
        return vigrad_lenet(torch, impl.split("-")[1], torch.float32)
    if impl.startswith("blitz"):
        return blitz_lenet(torch)
    if impl.startswith("torch-deterministic"):
        return deterministic_lenet(torch)
    return plain_lenet(torch)


@pytest.mark.parametrize("impl", ["vigrad.torch-reparam", "vigrad.torch-flipout", "torch-eager-reparam",
                                  "blitz-reparam", "torch-deterministic", "vigrad.torch-reparam-cl",
                                  "torch-eager-reparam-cl", "torch-deterministic-cl"])
def test_lenet_step(benchmark, data, torch, impl):
    X, y = data
    layers = build_lenet(torch, impl)
    ten_steps = make_steps(torch, impl, layers, X, y)
    ten_steps()  # warm up
    tag(benchmark, GROUP, impl=impl, batch=B, dtype="float32", steps_per_round=STEPS)
    loss = benchmark.pedantic(ten_steps, rounds=5, iterations=1)
    assert math.isfinite(loss)


def test_plain_torch_on_vigrads_noise_gives_vigrads_step(data, torch):
    """The comparison is of one computation: float64, one batch, reparam."""
    from vigrad import _core

    X, y = data
    xb, yb = torch.from_numpy(X[:B]).double(), torch.from_numpy(y[:B])
    vig = vigrad_lenet(torch, "reparam", torch.float64)
    plain = plain_lenet(torch).double()
    with torch.no_grad():
        for p, v in zip(plain, vig):
            p.loc.copy_(v.loc)
            p.rho.copy_(v.rho)
    F = torch.nn.functional
    out_v = lenet_forward(torch, vig, xb)
    loss_v = F.cross_entropy(out_v, yb, reduction="sum") + kl_of(torch, "vigrad", vig) / STEPS
    loss_v.backward()
    for p, v in zip(plain, vig):
        eps = np.empty((1, v.num_params), np.float64)
        _core.standard_normal(v.last_key, eps, 1)
        p.eps = torch.from_numpy(eps[0])
    out_p = lenet_forward(torch, plain, xb)
    loss_p = F.cross_entropy(out_p, yb, reduction="sum") + kl_of(torch, "torch", plain) / STEPS
    loss_p.backward()
    torch.testing.assert_close(loss_v, loss_p, rtol=1e-10, atol=0)
    for p, v in zip(plain, vig):
        for a, b in ((v.loc.grad, p.loc.grad), (v.rho.grad, p.rho.grad)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max()))
