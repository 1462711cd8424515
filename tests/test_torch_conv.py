"""vigrad.torch.BayesianConv2d (issue 14, item 2) against plain torch autograd.

Oracles: the same sampled forward written in plain differentiable torch --
``torch.nn.functional.conv2d`` with the weights ``loc + softplus(rho) * eps`` built from the same
noise (eps = row 0 of vigrad._core.standard_normal(key, (1, P)); Flipout's signs from
np.random.default_rng(key), input channels then output channels, as vigrad.torch.BayesianLinear),
the KL term from torch.distributions -- compared in float64 to rtol 1e-10 (only the order of the
sums differs); torch.autograd.gradcheck (finite differences); a Bayesian CNN that must learn the
digits.
"""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import vigrad as vg  # noqa: E402
import vigrad.torch as vgt  # noqa: E402
from vigrad import _core  # noqa: E402
from vigrad.datasets import load_digits, train_test_split  # noqa: E402

F = torch.nn.functional
F64 = torch.float64
ESTIMATORS = ["reparam", "flipout"]
MIXTURE = vg.ScaleMixtureNormal(0.5, 1.0, math.exp(-2))
NORMAL = vg.Normal(0.2, 1.3)
PRIORS = [(NORMAL, "mc"), (NORMAL, "analytic"), (MIXTURE, "mc")]
PRIOR_IDS = ["normal-mc", "normal-analytic", "mixture-mc"]
# the reference's own padding="same" convolutions with an even kernel warn about a padded copy
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
# (in, out, kernel, stride, padding, dilation, groups, bias, input (N, H, W))
GEOMETRIES = {
    "plain": (2, 3, 3, 1, 0, 1, 1, True, (4, 6, 5)),
    "strided-padded": (3, 4, (3, 2), (2, 1), (1, 2), 1, 1, True, (3, 7, 6)),
    "dilated-grouped-nobias": (4, 6, 3, 1, 2, (2, 1), 2, False, (2, 7, 7)),
    "same-odd": (2, 2, (2, 3), 1, "same", 1, 1, True, (3, 5, 4)),
    "valid-depthwise": (3, 3, 2, 1, "valid", 1, 3, True, (2, 4, 4)),
}


# -- plain-torch reference ---------------------------------------------------------------------------
def t64(v):
    return torch.tensor(v, dtype=F64)


def ref_log_prior(w, prior):
    if isinstance(prior, vg.Normal):
        return torch.distributions.Normal(t64(prior.loc), t64(prior.scale)).log_prob(w)
    pi, s1, s2 = float(prior.pi), float(prior.sigma1), float(prior.sigma2)
    return torch.logsumexp(torch.stack([
        math.log(pi) + torch.distributions.Normal(t64(0.0), t64(s1)).log_prob(w),
        math.log1p(-pi) + torch.distributions.Normal(t64(0.0), t64(s2)).log_prob(w)]), dim=0)


def conv_noise(layer, key, batch):
    """eps (P,) in the layer's dtype (the float32 draws are not the rounding of the float64 ones)
    and Flipout's signs (batch, in) and (batch, out), both as float64."""
    dt = np.float32 if layer.loc.dtype == torch.float32 else np.float64
    eps = np.empty((1, layer.num_params), dt)
    _core.standard_normal(key, eps, 1)
    signs = np.random.default_rng(key).integers(0, 2, size=(batch, layer.in_channels + layer.out_channels),
                                                dtype=np.int8)
    signs = torch.from_numpy(2.0 * signs - 1.0)
    return (torch.from_numpy(eps[0].astype(np.float64)), signs[:, :layer.in_channels, None, None],
            signs[:, layer.in_channels:, None, None])


def ref_conv(layer, loc, rho, x, key):
    """(y, kl) of the layer's sampled forward with key in plain differentiable float64 torch."""
    eps, s_in, s_out = conv_noise(layer, key, x.shape[0])
    sigma = F.softplus(rho)
    k = math.prod(layer.weight_shape)

    def split(flat):
        return flat[:k].view(layer.weight_shape), (flat[k:] if layer.has_bias else None)

    def conv(inp, w, b):
        return F.conv2d(inp, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    if layer.estimator == "reparam":
        y = conv(x, *split(loc + sigma * eps))
    else:
        y = conv(x, *split(loc)) + conv(x * s_in, *split(sigma * eps)) * s_out
    if layer.kl == "analytic":
        m, s = float(layer.prior.loc), float(layer.prior.scale)
        kl = (math.log(s) - torch.log(sigma) + 0.5 * (sigma**2 + (loc - m) ** 2) / s**2 - 0.5).sum()
    else:
        w = loc + sigma * eps
        kl = (torch.distributions.Normal(loc, sigma).log_prob(w) - ref_log_prior(w, layer.prior)).sum()
    return y, kl


def close(a, b, rtol=1e-10, atol=1e-12):
    a, b = (t.detach().double() if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=F64) for t in (a, b))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def make(geometry, estimator="reparam", prior=MIXTURE, kl="mc", dtype=F64, seed=0, init_rho=-1.5):
    cin, cout, k, s, p, d, g, b, _ = GEOMETRIES[geometry]
    return vgt.BayesianConv2d(cin, cout, k, s, p, d, g, b, prior=prior, estimator=estimator, kl=kl,
                              init_rho=init_rho, seed=seed, dtype=dtype)


def make_input(geometry, dtype=F64, seed=1):
    cin, *_, (n, h, w) = GEOMETRIES[geometry]
    return torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- parity with torch autograd ----------------------------------------------------------------------
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("prior,kl", PRIORS, ids=PRIOR_IDS)
def test_gradients_equal_torch_autograd_through_conv2d(geometry, estimator, prior, kl):
    assert_matches_reference(make(geometry, estimator, prior, kl), make_input(geometry).requires_grad_())


def assert_matches_reference(layer, x, c=0.37):
    """The layer's forward and backward on x under a nonlinear loss (G varies per element) against
    ref_conv, autograd through conv2d on an NCHW copy of x with the same noise: the output, the KL
    and the gradients of x, loc and rho.  Returns the layer's output."""
    loc = layer.loc.detach().clone().requires_grad_()
    rho = layer.rho.detach().clone().requires_grad_()
    out = layer(x)
    kl_v = vgt.kl_loss(layer)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    (torch.tanh(out) * target).sum().add(c * kl_v).backward()
    x_r = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
    y_r, kl_r = ref_conv(layer, loc, rho, x_r, layer.last_key)
    (torch.tanh(y_r) * target).sum().add(c * kl_r).backward()
    close(out, y_r)
    close(kl_v, kl_r)
    close(x.grad, x_r.grad)
    close(layer.loc.grad, loc.grad)
    close(layer.rho.grad, rho.grad)
    return out


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_channels_last_input_gives_the_contiguous_results_in_channels_last(estimator):
    """An NHWC input (torch's channels-last memory format, as a network after a channels-last
    conversion feeds it) gives the values and gradients of the reference on the NCHW copy, the
    output in channels-last as torch's conv2d gives it."""
    x = make_input("plain").contiguous(memory_format=torch.channels_last).requires_grad_()
    out = assert_matches_reference(make("plain", estimator), x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_conv_layers_chain_the_input_gradient(estimator):
    a = vgt.BayesianConv2d(2, 3, 3, padding=1, estimator=estimator, init_rho=-1.0, seed=1, dtype=F64)
    b = vgt.BayesianConv2d(3, 2, 2, stride=2, estimator=estimator, init_rho=-1.0, seed=2, dtype=F64)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    before = [(m.loc.detach().clone().requires_grad_(), m.rho.detach().clone().requires_grad_()) for m in (a, b)]
    out = b(torch.relu(a(x)))
    (out.square().sum() + 0.1 * vgt.kl_loss(torch.nn.Sequential(a, b))).backward()
    h, kl_a = ref_conv(a, *before[0], x, a.last_key)
    y, kl_b = ref_conv(b, *before[1], torch.relu(h), b.last_key)
    (y.square().sum() + 0.1 * (kl_a + kl_b)).backward()
    close(out, y)
    for m, (lr_, rr_) in zip((a, b), before):
        close(m.loc.grad, lr_.grad)
        close(m.rho.grad, rr_.grad)


@pytest.mark.parametrize("geometry", ["strided-padded", "dilated-grouped-nobias", "same-odd"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("prior,kl", [(NORMAL, "mc"), (MIXTURE, "mc")], ids=["normal", "mixture"])
def test_gradcheck(geometry, estimator, prior, kl):
    layer = make(geometry, estimator, prior, kl)
    x = make_input(geometry)[:2, :, :5, :5].clone().requires_grad_()
    loc = layer.loc.detach().clone().requires_grad_()
    rho = layer.rho.detach().clone().requires_grad_()

    def f(x, loc, rho):
        with torch.no_grad():
            layer.noise_step.zero_()  # the same key, hence the same noise, in every call
        y = torch.func.functional_call(layer, {"loc": loc, "rho": rho}, (x,))
        return y, layer.last_kl

    # fast mode: the Jacobian along random directions (the full one costs a backward per output element)
    assert torch.autograd.gradcheck(f, (x, loc, rho), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    if geometry == "same-odd":  # and one full Jacobian per estimator and prior
        assert torch.autograd.gradcheck(f, (x[:1], loc, rho), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float32_against_the_float64_reference(estimator):
    layer = make("strided-padded", estimator, dtype=torch.float32, init_rho=-1.0)
    x = make_input("strided-padded")
    out = layer(x.float())
    assert out.dtype == torch.float32 and layer.last_kl.dtype == torch.float32
    (out.square().sum() + 0.1 * vgt.kl_loss(layer)).backward()
    assert layer.loc.grad.dtype == torch.float32 and layer.rho.grad.dtype == torch.float32
    loc = layer.loc.detach().double().requires_grad_()
    rho = layer.rho.detach().double().requires_grad_()
    y_r, kl_r = ref_conv(layer, loc, rho, x, layer.last_key)
    (y_r.square().sum() + 0.1 * kl_r).backward()
    close(out, y_r, rtol=1e-5, atol=1e-5)
    close(layer.last_kl, kl_r, rtol=1e-5, atol=1e-4)
    close(layer.loc.grad, loc.grad, rtol=1e-4, atol=1e-4)
    close(layer.rho.grad, rho.grad, rtol=1e-4, atol=1e-4)


# -- the core calls --------------------------------------------------------------------------------
def test_one_core_call_for_the_draw_and_one_for_the_gradients(monkeypatch):
    calls = []
    for name in ("bbb_grad_mixture", "bbb_noise_kl_mixture", "bbb_noise", "pathwise_grad_mixture", "softplus"):
        real = getattr(_core, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args))
            return _real(*args, **kwargs)
        monkeypatch.setattr(_core, name, wrapper)
    for est, data in (("reparam", "reparam"), ("flipout", "times_eps")):
        calls.clear()
        layer = make("plain", est, MIXTURE)
        out = layer(make_input("plain"))
        assert [c[0] for c in calls] == ["bbb_noise_kl_mixture"]  # the weights and the KL value, one pass
        calls.clear()
        (out.sum() + 0.25 * vgt.kl_loss(layer)).backward()
        assert [c[0] for c in calls] == ["bbb_grad_mixture"]
        args = calls[0][1]
        assert args[:3] == (data, "mc", layer.last_key) and args[-2] == 0.25  # kl_weight = grad of the KL
        assert args[3].__array_interface__["data"][0] == layer.loc.data_ptr()  # a view of the parameters


# -- modes, views, reproducibility -------------------------------------------------------------------
def test_eval_mode_uses_the_means_and_sampling_context():
    for geometry in ("same-odd", "dilated-grouped-nobias"):
        layer = make(geometry, init_rho=0.0)
        x = make_input(geometry)
        layer(x)
        kl_train, step = layer.last_kl, layer.noise_step.clone()
        layer.eval()
        y = layer(x)
        close(y, F.conv2d(x, layer.weight_loc, layer.bias_loc, layer.stride, layer.padding, layer.dilation,
                          layer.groups), rtol=0, atol=0)
        assert layer.last_kl is kl_train and torch.equal(layer.noise_step, step)
        with torch.no_grad(), vgt.sampling(layer):
            a, b = layer(x), layer(x)
        assert not torch.equal(a, b) and int(layer.noise_step[1]) == 2  # the eval stream
        close(a, ref_conv(layer, layer.loc, layer.rho, x, vgt.derive_key(layer.seed, 0, 1))[0])
        layer.train()
        with vgt.sampling(layer, False):
            close(layer(x), y, rtol=0, atol=0)


def test_unbatched_input_and_views_and_init():
    torch.manual_seed(0)
    layer = vgt.BayesianConv2d(4, 6, (3, 2), groups=2)
    assert layer.weight_shape == (6, 2, 3, 2) and layer.num_params == 6 * 2 * 3 * 2 + 6
    assert {n for n, _ in layer.named_parameters()} == {"loc", "rho"}
    assert layer.weight_loc.shape == (6, 2, 3, 2) and layer.bias_rho.shape == (6,)
    assert layer.weight_loc.data_ptr() == layer.loc.data_ptr()
    assert layer.bias_loc.data_ptr() == layer.loc.data_ptr() + 72 * layer.loc.element_size()
    bound = 1 / math.sqrt(2 * 3 * 2)
    assert float(layer.loc.detach().abs().max()) <= bound and float(layer.loc.detach().std()) > bound / 4
    assert torch.all(layer.rho == -7.0) and layer.loc.dtype == torch.get_default_dtype()
    assert isinstance(layer.prior, vg.ScaleMixtureNormal) and math.isclose(float(layer.prior.sigma2), math.exp(-6))
    torch.manual_seed(0)
    assert torch.equal(vgt.BayesianConv2d(4, 6, (3, 2), groups=2).loc, layer.loc)  # torch.manual_seed reproduces
    nb = vgt.BayesianConv2d(2, 3, 1, bias=False, seed=0)
    assert nb.num_params == 6 and nb.bias_loc is None and nb.bias_rho is None and nb.bias_scale is None
    assert "bias=False" in repr(nb) and "estimator='reparam'" in repr(nb)
    a = vgt.BayesianConv2d(2, 3, 3, seed=5, dtype=F64)
    b = vgt.BayesianConv2d(2, 3, 3, seed=5, dtype=F64)
    x = torch.randn(2, 5, 5, dtype=F64)
    ya = a(x)
    assert ya.shape == (3, 3, 3)
    close(ya, b(x[None])[0], rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_seeded_layers_reproduce_resume_and_copy(estimator):
    x = make_input("plain")
    a, b, c = (make("plain", estimator, seed=s) for s in (11, 11, 12))
    ya, yb = [a(x) for _ in range(3)], [b(x) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(ya, yb)) and not torch.equal(ya[0], ya[1])
    assert not torch.equal(c(x), ya[0]) and a.last_key == vgt.derive_key(11, 2)
    d = make("plain", estimator, seed=5)
    d.load_state_dict(a.state_dict())
    assert torch.equal(d(x), b(x))  # continues the stream where it stopped
    clone = copy.deepcopy(a)
    assert clone.last_kl is None and torch.equal(clone(x), a(x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_same_bits_whatever_the_thread_count(estimator):
    """Fixed counts 1, 2, 7, and workers=None, which alternates between one thread and all of them
    over its first steps (vigrad._layer_ops.Threads) and then picks by measurement: every step's
    outputs, KL and gradients have the same bits."""
    outs = []
    for workers in (None, 1, 2, 7):
        layer = vgt.BayesianConv2d(3, 8, 3, padding=1, estimator=estimator, init_rho=-2.0, seed=3, workers=workers,
                                   dtype=torch.float32)
        steps = []
        for _ in range(4):
            layer.zero_grad()
            y = layer(torch.ones(2, 3, 6, 6))
            (y.square().sum() + vgt.kl_loss(layer)).backward()
            steps.append((y.detach(), layer.last_kl.detach(), layer.loc.grad.clone(), layer.rho.grad.clone()))
        outs.append(steps)
    for other in outs[1:]:
        assert all(torch.equal(u, v) for s0, s1 in zip(outs[0], other) for u, v in zip(s0, s1))


def test_errors():
    with pytest.raises(ValueError, match="in_channels"):
        vgt.BayesianConv2d(0, 2, 3)
    with pytest.raises(ValueError, match=r"groups must divide in_channels and out_channels, got groups=2"):
        vgt.BayesianConv2d(3, 4, 3, groups=2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints, got 2.5"):
        vgt.BayesianConv2d(1, 2, 2.5)
    with pytest.raises(TypeError, match="kernel_size"):
        vgt.BayesianConv2d(1, 2, (3, 3, 3))
    with pytest.raises(ValueError, match=r"stride must be >= 1, got \(1, 0\)"):
        vgt.BayesianConv2d(1, 2, 3, stride=(1, 0))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        vgt.BayesianConv2d(1, 2, 3, padding=-1)
    with pytest.raises(ValueError, match="'valid' or 'same', got 'full'"):
        vgt.BayesianConv2d(1, 2, 3, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        vgt.BayesianConv2d(1, 2, 3, stride=2, padding="same")
    with pytest.raises(TypeError, match="bias must be a bool"):
        vgt.BayesianConv2d(1, 2, 3, bias=None)
    with pytest.raises(ValueError, match="estimator must be one of 'reparam', 'flipout', got 'local'"):
        vgt.BayesianConv2d(1, 2, 3, estimator="local")
    with pytest.raises(ValueError, match="Normal prior"):
        vgt.BayesianConv2d(1, 2, 3, kl="analytic")
    with pytest.raises(ValueError, match="seed"):
        vgt.BayesianConv2d(1, 2, 3, seed=-1)
    layer = vgt.BayesianConv2d(2, 3, 3, dilation=2, seed=0)
    step = layer.noise_step.clone()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, H, W\) or \(2, H, W\), got \(1, 3, 5, 5\)"):
        layer(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"spatial size \(4, 5\) with padding \(0, 0\) is smaller than the dilated "
                                         r"kernel \(5 along axis -2\)"):
        layer(torch.zeros(1, 2, 4, 5))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(torch.zeros(1, 2, 5, 5, dtype=F64))
    with pytest.raises(vgt.DeviceError, match="CPU tensors; x is on meta"):
        layer(torch.zeros(1, 2, 5, 5, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.zeros((1, 2, 5, 5), np.float32))
    assert torch.equal(layer.noise_step, step)  # refused before any draw


def test_double_backward_is_refused_clearly():
    layer = make("plain")
    x = make_input("plain").requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# -- a Bayesian CNN on the digits (one_torch_thread: tests/conftest.py) --------------------------------

def digits_cnn(estimator, seed):
    return torch.nn.Sequential(
        vgt.BayesianConv2d(1, 16, 3, padding=1, estimator=estimator, seed=3 * seed, dtype=torch.float32),
        torch.nn.ReLU(),
        vgt.BayesianConv2d(16, 32, 3, padding=1, estimator=estimator, seed=3 * seed + 1, dtype=torch.float32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        vgt.BayesianLinear(32 * 4 * 4, 10, estimator=estimator, seed=3 * seed + 2, dtype=torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_bayesian_cnn_learns_the_digits(estimator, one_torch_thread):
    X, y = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_fraction=0.25, rng=0)
    Xtr, Xte = (torch.from_numpy(np.ascontiguousarray(a, np.float32)).reshape(-1, 1, 8, 8) for a in (Xtr, Xte))
    ytr = torch.from_numpy(ytr)
    model = digits_cnn(estimator, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    N, B = Xtr.shape[0], 64
    M = math.ceil(N / B)
    first = last = None
    for epoch in range(20):
        perm = torch.randperm(N, generator=gen)
        total = 0.0
        for i in range(M):
            idx = perm[i * B:(i + 1) * B]
            nll = F.cross_entropy(model(Xtr[idx]), ytr[idx], reduction="sum")
            loss = nll + vgt.kl_loss(model) / M
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(nll.detach())
        first = total / N if first is None else first
        last = total / N
    assert last < first / 4  # the training NLL falls
    model.eval()
    with torch.no_grad(), vgt.sampling(model):
        p = sum(torch.softmax(model(Xte).double(), dim=1) for _ in range(10)).numpy() / 10
    acc = vg.metrics.accuracy(p, yte)
    assert acc >= 0.95, acc
