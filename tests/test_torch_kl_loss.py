"""vigrad.torch.kl_loss refuses a stale KL (issue 14, item 4).

Before the fix, ``loss = kl_loss(model) + nll(model(x))`` (the KL asked for before this step's
forward) returned a zero on the first step and an old graph's tensor afterwards (torch then failed
with "Trying to backward through the graph a second time", or with retain_graph=True silently used
the previous step's KL).  Every assertion that a StaleKLError is raised fails on that code.
"""

import math

import pytest

torch = pytest.importorskip("torch")

import vigrad as vg  # noqa: E402
import vigrad.torch as vgt  # noqa: E402

F64 = torch.float64


def linear_model(seed=0):
    return torch.nn.Sequential(vgt.BayesianLinear(4, 5, init_rho=-2.0, seed=seed, dtype=F64), torch.nn.Tanh(),
                               vgt.BayesianLinear(5, 3, init_rho=-2.0, seed=seed + 1, dtype=F64))


def conv_model(seed=0):
    return torch.nn.Sequential(vgt.BayesianConv2d(1, 2, 3, padding=1, init_rho=-2.0, seed=seed, dtype=F64),
                               torch.nn.Tanh(), torch.nn.Flatten(),
                               vgt.BayesianLinear(2 * 2 * 2, 3, init_rho=-2.0, seed=seed + 1, dtype=F64))


MODELS = {"linear": (linear_model, (6, 4)), "conv": (conv_model, (6, 1, 2, 2))}


@pytest.fixture(params=sorted(MODELS))
def model_and_input(request):
    make, shape = MODELS[request.param]
    g = torch.Generator().manual_seed(3)
    return make(), torch.randn(shape, generator=g, dtype=F64), torch.randint(0, 3, (shape[0],), generator=g)


def nll(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="sum")


def test_before_any_forward_raises(model_and_input):
    model, x, y = model_and_input
    with pytest.raises(vgt.StaleKLError, match=r"no sampled forward yet.*after this step's forward"):
        vgt.kl_loss(model)
    assert isinstance(vgt.StaleKLError("x"), RuntimeError)


def test_the_issue_loop_with_kl_before_the_forward_raises_on_the_first_step(model_and_input):
    model, x, y = model_and_input
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(vgt.StaleKLError, match="after this step's forward"):
        for _ in range(3):
            opt.zero_grad()
            loss = vgt.kl_loss(model) + nll(model(x), y)  # wrong order: the KL of no / the last forward
            loss.backward()
            opt.step()


def test_after_backward_raises_and_the_next_forward_is_fresh(model_and_input):
    model, x, y = model_and_input
    for step in range(3):
        out = model(x)
        kl = vgt.kl_loss(model)  # the right order: after this step's forward
        expected = sum(m.last_kl for m in model if isinstance(m, (vgt.BayesianLinear, vgt.BayesianConv2d)))
        assert torch.equal(kl.detach(), expected.detach()) and kl.requires_grad
        (nll(out, y) + kl / 10).backward()
        with pytest.raises(vgt.StaleKLError, match=r"layer 0 .*already consumed.*before backward"):
            vgt.kl_loss(model)


@pytest.mark.parametrize("what", ["kl_only", "nll_only", "retain_graph"])
def test_every_kind_of_backward_through_the_forward_consumes_it(model_and_input, what):
    model, x, y = model_and_input
    out = model(x)
    if what == "kl_only":
        vgt.kl_loss(model).backward()
    elif what == "nll_only":
        nll(out, y).backward()
    else:  # the graph survives, but this step's gradients have been taken: a later KL would be the old one
        (nll(out, y) + vgt.kl_loss(model)).backward(retain_graph=True)
    with pytest.raises(vgt.StaleKLError, match="already consumed"):
        vgt.kl_loss(model)


def test_one_stale_layer_among_fresh_ones_is_named(model_and_input):
    model, x, y = model_and_input
    first, last = model[0], model[-1]
    h = torch.randn(x.shape[0], last.in_features, dtype=F64)
    nll(model(x), y).backward()  # both layers' forwards consumed
    last(h)  # a new forward of the last layer only
    with pytest.raises(vgt.StaleKLError, match=r"layer 0 \("):
        vgt.kl_loss(model)
    vgt.kl_loss(last)  # the fresh layer alone is fine
    first(x)  # now the first is fresh ...
    nll(last(h), y).backward()  # ... and the last consumed
    with pytest.raises(vgt.StaleKLError, match=rf"layer {len(model) - 1} \("):
        vgt.kl_loss(model)
    vgt.kl_loss(first)


def test_no_grad_forwards_and_sampled_eval_forwards_are_fresh(model_and_input):
    model, x, y = model_and_input
    with torch.no_grad():
        model(x)
        a = vgt.kl_loss(model)
        assert float(vgt.kl_loss(model)) == float(a) and math.isfinite(float(a))  # asking twice is fine
    nll(model(x), y).backward()
    model.eval()
    model(x)  # eval mode uses the means and records no KL: the consumed one stays
    with pytest.raises(vgt.StaleKLError):
        vgt.kl_loss(model)
    with torch.no_grad(), vgt.sampling(model):
        model(x)
    assert math.isfinite(float(vgt.kl_loss(model)))


def test_a_model_without_vigrad_layers_has_zero_kl_and_bad_models_are_refused():
    assert vgt.kl_loss(torch.nn.Linear(2, 2)).item() == 0.0
    with pytest.raises(TypeError, match="nn.Module"):
        vgt.kl_loss([linear_model()])
    layer = vgt.BayesianLinear(2, 2, prior=vg.Normal(0.0, 1.0), seed=0, dtype=F64)
    layer(torch.ones(1, 2, dtype=F64))
    layer.reset_parameters()  # a reset forgets the KL term of the old parameters
    with pytest.raises(vgt.StaleKLError, match="no sampled forward"):
        vgt.kl_loss(layer)
