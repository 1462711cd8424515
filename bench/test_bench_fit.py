"""vg.fit per step (issue 13, item 5): one step of the fit against its unavoidable parts.

Mean field, d = 10^5, S = 8, no MAP start.  Each group times 50 steps of

* ``vg.fit``: the whole driver (VI.step: sampling, the log joint, the fused gradient, the -ELBO,
  the optimiser, the next step's q and its entropy in one pass; the convergence monitor's sums;
  the gradient statistics), started by one probing call of the log joint (excluded from the
  ratio by the per-step figures in bench/README.md, since it is 1 call in 51);
* ``parts``: the same 50 x (sampling with the noise, the log joint, the fused pathwise gradient),
  on the same keys and arrays, i.e. what any implementation of the step must do;
* ``log_joint``: the log joint alone on the same batches.

The target: vg.fit / parts <= 1.25.  Two log joints: a Gaussian (~1 ms at d = 10^5: the worst
case for the ratio) and the same Gaussian plus a rank-32 projection (z A) A^T that costs >= 5 ms.
Before timing, each group checks that the parts give the gradient the fit's step takes (same key,
same bits), so both sides do the same work.  Each benchmark also records its minor page faults per
step (``extra_info["minor_faults_per_step"]``, the fewest of its rounds): a fresh (S, d) array
page-faults in 6.4 MB, and the allocator's behaviour around the log joint's own temporaries was
most of what vg.fit added (see VI._step).
"""

import numpy as np
import pytest

try:
    import resource
except ImportError:  # pragma: no cover - not Unix
    resource = None

import vigrad as vg
from vigrad import optim

from benchlib import tag

D = 100_000
S = 8
STEPS = 50
_rng = np.random.default_rng(5)
_MU, _PREC = _rng.standard_normal(D), _rng.uniform(0.5, 2.0, D)
_A = _rng.standard_normal((D, 32)) / np.sqrt(D)  # 25.6 MB: the expensive log joint's projection


def cheap_log_joint(z):
    r = z - _MU
    g = -r * _PREC
    return 0.5 * np.einsum("sj,sj->s", r, g), g


def costly_log_joint(z):
    """The Gaussian plus -|z A|^2 / 2: two (8, 10^5) x (10^5, 32) products, >= 5 ms a call."""
    v, g = cheap_log_joint(z)
    p = z @ _A
    return v - 0.5 * np.einsum("sk,sk->s", p, p), g - p @ _A.T


LOG_JOINTS = {"gaussian": cheap_log_joint, "gaussian+projection": costly_log_joint}


def _vi(log_joint):
    return vg.VI(log_joint, "meanfield", optimizer=optim.adam(vg.vi.DEFAULT_LR), num_samples=S)


def _parts(vi, state, steps):
    """The unavoidable work of ``steps`` fit steps from ``state``: sample, log joint, gradient."""
    q = vi.q_fitted(state)
    key = int(state.key)
    x, eps = np.empty((S, D)), np.empty((S, D))
    grads = None
    for t in range(steps):
        q._sample_noise(S, vg.vi._step_key(key, t), vi.workers, out=(x, eps))
        _, g = vi.log_joint(x)
        grads = q._pathwise(eps, g, "mc", vi.workers)
    return grads


@pytest.fixture(scope="module", params=list(LOG_JOINTS))
def case(request):
    log_joint = LOG_JOINTS[request.param]
    vi = _vi(log_joint)
    state = vi.init(np.zeros(D), rng=0)
    # the parts give the first step's gradient to the bit
    _, info = vi.step(state)
    for a, b in zip(_parts(vi, state, 1), info.grads):
        np.testing.assert_array_equal(a, b)
    return request.param, log_joint, vi, state


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _counting(fn, counts):
    """fn, appending the minor page faults of each call to counts."""
    def run(*args, **kwargs):
        before = _faults()
        out = fn(*args, **kwargs)
        counts.append(_faults() - before)
        return out
    return run


@pytest.mark.parametrize("impl", ["vg.fit", "parts", "log_joint"])
def test_fit_step_against_its_parts(benchmark, case, impl):
    name, log_joint, vi, state = case
    tag(benchmark, f"fit-step-d1e5-{name}", impl=impl, d=D, S=S, steps=STEPS)
    counts = []
    try:
        _run(benchmark, counts, log_joint, vi, state, impl)
    finally:
        if counts:
            benchmark.extra_info["minor_faults_per_step"] = min(counts) / STEPS


def _run(benchmark, counts, log_joint, vi, state, impl):
    if impl == "vg.fit":
        res = benchmark.pedantic(_counting(vg.fit, counts), args=(log_joint, np.zeros(D)),
                                 kwargs=dict(rng=0, num_steps=STEPS, map_init=False, psis_samples=0,
                                             num_samples=S),
                                 rounds=3, iterations=1)
        assert res.diagnostics.steps == STEPS and np.isfinite(res.losses).all()
    elif impl == "parts":
        benchmark.pedantic(_counting(_parts, counts), args=(vi, state, STEPS), rounds=3, iterations=1)
    else:
        z = np.random.default_rng(0).standard_normal((S, D))

        def calls():
            for _ in range(STEPS):
                log_joint(z)

        benchmark.pedantic(_counting(calls, counts), rounds=3, iterations=1)


LONG_STEPS = 400


@pytest.mark.parametrize("impl", ["vg.fit", "parts"])
def test_fit_steps_with_checks_against_their_parts(benchmark, impl):
    """The same ratio over 400 steps: the 50 steps above never reach a convergence check (the
    monitor tests no window shorter than 150 steps), a real fit takes one every 10-40 steps.
    vg.fit runs with a tolerance it cannot reach (1e-9), so it takes every step; the Gaussian log
    joint only (the costly one: bench/fit_step_interleaved.py --steps 400)."""
    log_joint = LOG_JOINTS["gaussian"]
    tag(benchmark, "fit-steps-with-checks-d1e5-gaussian", impl=impl, d=D, S=S, steps=LONG_STEPS)
    if impl == "vg.fit":
        res = benchmark.pedantic(vg.fit, args=(log_joint, np.zeros(D)),
                                 kwargs=dict(rng=0, num_steps=LONG_STEPS, map_init=False, psis_samples=0,
                                             num_samples=S, tol=1e-9),
                                 rounds=3, iterations=1)
        assert res.diagnostics.steps == LONG_STEPS and np.isfinite(res.losses).all()
    else:
        vi = _vi(log_joint)
        state = vi.init(np.zeros(D), rng=0)
        grads = benchmark.pedantic(_parts, args=(vi, state, LONG_STEPS), rounds=3, iterations=1)
        assert all(np.isfinite(g).all() for g in grads)
