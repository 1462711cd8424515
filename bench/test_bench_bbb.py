"""Bayes by Backprop (issue 5): one training step of Blundell et al.'s MNIST network,
784-400-400-10, batch 128, float32, scale-mixture prior (0.5, 1, e^-6), one sample, Adam:
vigrad's BayesianMLP (reparam, local, flipout) against the same model written plainly in
PyTorch eager with autograd.  Target: vigrad reparam >= 3x plain PyTorch, <= 6 ms.

Each round runs 10 steps (the time per step is the figure / 10).  The check: both models
learn on the same data (the loss falls), and vigrad's gradient on one batch equals plain
autograd on the same noise (tests/test_bnn.py holds that exactly; here a smoke check).
"""

import math

import numpy as np
import pytest

import vigrad as vg

from benchlib import tag

SIZES = [784, 400, 400, 10]
B = 128
STEPS = 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.random((B * STEPS, 784)).astype(np.float32)
    y = rng.integers(0, 10, B * STEPS)
    return X, y


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_vigrad_step(benchmark, data, estimator):
    X, y = data
    model = vg.BayesianMLP(SIZES, likelihood="categorical", estimator=estimator, rng=0)
    model.fit(X[:B], y[:B], epochs=1, batch_size=B)  # warm up

    def ten_steps():
        return model.fit(X, y, epochs=1, batch_size=B, lr=1e-3)["loss"][-1]

    tag(benchmark, "bbb-step-784-400-400-10", impl=f"vigrad-{estimator}", batch=B, dtype="float32",
        steps_per_round=STEPS)
    loss = benchmark.pedantic(ten_steps, rounds=5, iterations=1)
    assert np.isfinite(loss)


def test_torch_eager_step(benchmark, data, torch):
    X, y = data
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    log_half, s2 = math.log(0.5), math.exp(-6)

    class Layer(torch.nn.Module):
        def __init__(self, i, o):
            super().__init__()
            b = 1 / math.sqrt(i)
            self.mu = torch.nn.Parameter(torch.empty(o, i).uniform_(-b, b))
            self.rho = torch.nn.Parameter(torch.full((o, i), -7.0))
            self.bmu = torch.nn.Parameter(torch.empty(o).uniform_(-b, b))
            self.brho = torch.nn.Parameter(torch.full((o,), -7.0))

        def forward(self, x):
            self.kl = 0
            ws = []
            for mu, rho in ((self.mu, self.rho), (self.bmu, self.brho)):
                sigma = torch.nn.functional.softplus(rho)
                w = mu + sigma * torch.randn_like(sigma)
                log_q = (-0.5 * math.log(2 * math.pi) - torch.log(sigma) - 0.5 * ((w - mu) / sigma) ** 2).sum()
                c1 = log_half - 0.5 * math.log(2 * math.pi) - 0.5 * w**2
                c2 = log_half - 0.5 * math.log(2 * math.pi) - math.log(s2) - 0.5 * (w / s2) ** 2
                self.kl = self.kl + log_q - torch.logaddexp(c1, c2).sum()
                ws.append(w)
            return x @ ws[0].T + ws[1]

    layers = [Layer(SIZES[i], SIZES[i + 1]) for i in range(3)]
    params = [p for layer in layers for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)

    def ten_steps():
        for i in range(STEPS):
            xb, yb = Xt[i * B:(i + 1) * B], yt[i * B:(i + 1) * B]
            h = xb
            for j, layer in enumerate(layers):
                h = layer(h)
                if j < 2:
                    h = torch.relu(h)
            loss = torch.nn.functional.cross_entropy(h, yb, reduction="sum") + sum(l.kl for l in layers) / STEPS
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    ten_steps()  # warm up
    tag(benchmark, "bbb-step-784-400-400-10", impl="torch-eager-reparam", batch=B, dtype="float32",
        steps_per_round=STEPS)
    loss = benchmark.pedantic(ten_steps, rounds=5, iterations=1)
    assert math.isfinite(loss)


def test_memory_per_step(data):
    """Peak memory NumPy reports during one vigrad training step (parameters excluded)."""
    import tracemalloc

    X, y = data
    model = vg.BayesianMLP(SIZES, likelihood="categorical", rng=0)
    model.fit(X[:B], y[:B], epochs=1, batch_size=B)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    model.fit(X[:B], y[:B], epochs=1, batch_size=B)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    P = model.num_params
    print(f"\nvigrad 784-400-400-10 step: peak extra allocation {(peak - base) / 2**20:.1f} MiB "
          f"(parameters: {2 * P * 4 / 2**20:.1f} MiB for loc and rho)")
    # O(parameters + activations): a few parameter-sized buffers (weights, gradients), no S x D noise
    assert peak - base < 8 * P * 4 + 64 * B * 784 * 4


def test_vigrad_torch_layers_step(benchmark, data, torch):
    """The same network built from vigrad.torch.BayesianLinear inside PyTorch (issue 7:
    target >= 2x the plain-torch layers above)."""
    import vigrad.torch as vgt

    X, y = data
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    layers = torch.nn.ModuleList([vgt.BayesianLinear(SIZES[i], SIZES[i + 1], seed=i) for i in range(3)])
    opt = torch.optim.Adam(layers.parameters(), lr=1e-3)

    def ten_steps():
        for i in range(STEPS):
            xb, yb = Xt[i * B:(i + 1) * B], yt[i * B:(i + 1) * B]
            h = xb
            for j, layer in enumerate(layers):
                h = layer(h)
                if j < 2:
                    h = torch.relu(h)
            loss = torch.nn.functional.cross_entropy(h, yb, reduction="sum") + vgt.kl_loss(layers) / STEPS
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    ten_steps()
    tag(benchmark, "bbb-step-784-400-400-10", impl="torch+vigrad.torch-reparam", batch=B, dtype="float32",
        steps_per_round=STEPS)
    loss = benchmark.pedantic(ten_steps, rounds=5, iterations=1)
    assert math.isfinite(loss)
