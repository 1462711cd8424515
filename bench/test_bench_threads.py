"""Threads (issue 15, item 13): the default ``workers`` against one thread and every core, on an
idle machine and with one other busy process.  Target: the default within 1.3x of the best
setting in every group.

Workloads, one training step each (a round is STEPS steps; float32, batch 128, one sample):

* ``mlp-64-128-10``, ``mlp-784-400-400-10``, ``mlp-784-1200-1200-10``: vg.BayesianMLP (reparam,
  scale-mixture prior, fused Adam);
* ``torch-784-400-400-10-t1`` / ``-t2``: the same network of vigrad.torch.BayesianLinear layers
  trained by torch.optim.Adam, with torch.set_num_threads(1) / (2).

Variants: ``workers=None`` (the default: one thread or all, chosen by measurement after a warm-up
that is not timed), ``workers=1`` and ``workers=max`` (vigrad.max_workers).  Load: ``idle`` (nothing
started by the benchmark: run it on an otherwise idle machine) and ``busy`` (one extra process
spinning a core, started before the group and stopped after it).

Outside the timed calls, each benchmark checks that its setting trains to the same bits as one
thread (the results do not depend on the number of threads).

Run (repository root, an idle machine; about 4 min)::

    python -m pytest bench/test_bench_threads.py --benchmark-only --benchmark-json=threads.json
    OMP_WAIT_POLICY=passive python -m pytest bench/test_bench_threads.py --benchmark-only \\
        --benchmark-json=threads-passive.json        # idle OpenMP threads sleep at once
    python bench/test_bench_threads.py threads.json threads-passive.json     # the tables

Each variant is timed in its own group, seconds after the others: with a busy process the
machine drifts in between (bench/README.md, issue 15).  ``bench/threads_interleaved.py`` times the
torch workloads' variants round by round instead, so that all of them see the same drift.

The table gives, per workload and load, the median time per step of each variant and
default / best; ``foreign_cpu`` (bench/conftest.py) shows how busy the rest of the machine was
(about 1.0 in the busy groups, from the spinning process; above ~0.1 in an idle group means the
figures are disturbed).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import vigrad as vg

from benchlib import tag

B = 128
STEPS = 10
WARMUP_STEPS = 30  # the default's measurement settles in ~10 steps; the rest warms the caches
MLP_SIZES = {"mlp-64-128-10": [64, 128, 10], "mlp-784-400-400-10": [784, 400, 400, 10],
             "mlp-784-1200-1200-10": [784, 1200, 1200, 10]}
TORCH_SIZES = [784, 400, 400, 10]
VARIANTS = {"default": None, "one": 1, "max": vg.max_workers}


@pytest.fixture(scope="module", params=["idle", "busy"])
def load(request):
    """'busy': one process spinning a core for the duration of the group."""
    if request.param == "idle":
        yield "idle"
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield "busy"
    finally:
        proc.kill()
        proc.wait()


def _data(n_in, n_out, steps):
    rng = np.random.default_rng(0)
    return rng.random((B * steps, n_in)).astype(np.float32), rng.integers(0, n_out, B * steps)


def _mlp(sizes, workers):
    return vg.BayesianMLP(sizes, likelihood="categorical", rng=0, workers=workers)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("workload", list(MLP_SIZES))
def test_mlp_step(benchmark, load, workload, variant):
    sizes = MLP_SIZES[workload]
    X, y = _data(sizes[0], sizes[-1], STEPS)
    model = _mlp(sizes, VARIANTS[variant])
    warm = _data(sizes[0], sizes[-1], WARMUP_STEPS)
    model.fit(*warm, epochs=1, batch_size=B)

    def steps():
        return model.fit(X, y, epochs=1, batch_size=B, lr=1e-3)["loss"][-1]

    tag(benchmark, f"threads-{workload}-{load}", impl=variant, workers=str(VARIANTS[variant]), load=load,
        steps_per_round=STEPS)
    loss = benchmark.pedantic(steps, rounds=5, iterations=1)
    assert np.isfinite(loss)
    # the same bits as one thread, from the same start
    a, b = _mlp(sizes, VARIANTS[variant]), _mlp(sizes, 1)
    for m in (a, b):
        m.fit(X[:3 * B], y[:3 * B], epochs=1, batch_size=B)
    np.testing.assert_array_equal(a._theta, b._theta)


def _torch_model(torch, workers):
    import vigrad.torch as vgt

    layers = []
    for i in range(len(TORCH_SIZES) - 1):
        layers.append(vgt.BayesianLinear(TORCH_SIZES[i], TORCH_SIZES[i + 1], seed=i, workers=workers))
        if i + 2 < len(TORCH_SIZES):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _torch_steps(torch, model, opt, X, y):
    import vigrad.torch as vgt

    loss = None
    for i in range(len(X) // B):
        xb, yb = X[i * B:(i + 1) * B], y[i * B:(i + 1) * B]
        loss = torch.nn.functional.cross_entropy(model(xb), yb, reduction="sum") + vgt.kl_loss(model) / 100
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("torch_threads", [1, 2])
def test_torch_step(benchmark, torch, load, torch_threads, variant):
    X, y = (torch.from_numpy(a) for a in _data(TORCH_SIZES[0], TORCH_SIZES[-1], STEPS))
    saved = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        model = _torch_model(torch, VARIANTS[variant])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(WARMUP_STEPS // STEPS):
            _torch_steps(torch, model, opt, X, y)
        tag(benchmark, f"threads-torch-784-400-400-10-t{torch_threads}-{load}", impl=variant,
            workers=str(VARIANTS[variant]), load=load, torch_threads=torch_threads, steps_per_round=STEPS)
        loss = benchmark.pedantic(lambda: _torch_steps(torch, model, opt, X, y), rounds=5, iterations=1)
        assert np.isfinite(loss)
        # the same bits as one vigrad thread (torch's own threads fixed), from the same start
        grads = []
        for w in (VARIANTS[variant], 1):
            torch.manual_seed(0)
            m = _torch_model(torch, w)
            _torch_steps(torch, m, torch.optim.SGD(m.parameters(), lr=0.0), X[:B], y[:B])
            grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.set_num_threads(saved)


# -- the table ----------------------------------------------------------------------------------------

def report(paths):
    """Per group: the median seconds per step of each variant, and default / best."""
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        groups = {}
        for bm in data["benchmarks"]:
            if not (bm.get("group") or "").startswith("threads-"):
                continue
            per_step = bm["stats"]["median"] / bm["extra_info"].get("steps_per_round", 1)
            groups.setdefault(bm["group"], {})[bm["extra_info"]["impl"]] = (per_step, bm["extra_info"].get(
                "foreign_cpu"))
        print(f"\n{path}")
        print(f"{'group (ms per step)':<44} {'default':>9} {'one':>9} {'max':>9} {'default/best':>13}  foreign_cpu")
        for group, v in sorted(groups.items()):
            ms = {k: v[k][0] * 1e3 for k in v}
            best = min(ms.values())
            ratio = ms.get("default", float("nan")) / best
            foreign = "/".join(f"{v[k][1]:.2f}" for k in ("default", "one", "max") if k in v and v[k][1] is not None)
            print(f"{group[len('threads-'):]:<44} " + " ".join(f"{ms.get(k, float('nan')):9.3f}" for k in
                                                            ("default", "one", "max"))
                  + f" {ratio:12.2f}x{'' if ratio <= 1.3 else ' !'}  {foreign}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/test_bench_threads.py RESULT.json [MORE.json ...]")
    report(sys.argv[1:])
