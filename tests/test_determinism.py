"""Same seed, same bits: whatever the thread count, the memory alignment, or the Python
threads calling at once; and the caller's arrays are never written."""

import threading

import numpy as np
import pytest

import vigrad as vg

from vg_testutil import random_problem, seed_log_lik

WORKERS = [1, 2, 7]
SHAPE = (3001,)  # several blocks and a ragged tail


def _all_results(dtype, workers, seed=11):
    loc, rho, eps, glik = random_problem(4, SHAPE[0], dtype, seed=3)
    q = vg.MeanFieldGaussian(loc, rho)
    mix = vg.ScaleMixtureNormal(0.5, 1.0, np.exp(-6))
    out = {}
    out["w"], out["eps"] = q.sample(5, rng=seed, workers=workers, return_noise=True)
    out["log_q"] = q.log_prob(out["w"], workers=workers)
    out["log_p"] = mix.log_prob(out["w"], workers=workers)
    out["grad_p"] = mix.grad_log_prob(out["w"], workers=workers)
    out["pw"] = vg.pathwise_grad(loc, rho, eps, glik, mix, workers=workers)
    out["pw_an"] = vg.pathwise_grad(loc, rho, eps, glik, vg.Normal(0, 2), kl="analytic", workers=workers)
    out["score"] = vg.score_grad(loc, rho, eps, glik[:, 0], baseline="loo", workers=workers)
    for est in ("pathwise", "stl", "score"):
        r = vg.elbo_grad(q, seed_log_lik, mix, num_samples=3, estimator=est, rng=seed, workers=workers)
        out[est] = (np.array(r.loss), r.grad_loc, r.grad_rho)
    return out


def _assert_same_bits(a, b):
    for k in a:
        for x, y in zip(np.atleast_1d(a[k]) if not isinstance(a[k], tuple) else a[k],
                        np.atleast_1d(b[k]) if not isinstance(b[k], tuple) else b[k]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)


def test_bit_identical_for_any_worker_count(dtype):
    base = _all_results(dtype, 1)
    for w in WORKERS[1:] + [None, -1]:
        _assert_same_bits(base, _all_results(dtype, w))


def test_different_seeds_differ(dtype):
    a, b = _all_results(dtype, 2, seed=1), _all_results(dtype, 2, seed=2)
    for k in ("w", "pathwise", "score"):
        assert not np.array_equal(np.asarray(a[k][1] if isinstance(a[k], tuple) else a[k]),
                                  np.asarray(b[k][1] if isinstance(b[k], tuple) else b[k]))


@pytest.mark.parametrize("offset", [1, 3])
def test_bit_identical_for_misaligned_inputs(dtype, offset):
    """An input starting at any address gives the same bits (no alignment peeling)."""
    loc, rho, eps, glik = random_problem(3, 2049, dtype, seed=4)

    def shifted(a):
        buf = np.empty(a.size + offset, dtype)[offset:]
        buf[...] = a.reshape(-1)
        return buf.reshape(a.shape)

    mix = vg.ScaleMixtureNormal(0.5, 1.0, np.exp(-6))
    a = vg.pathwise_grad(loc, rho, eps, glik, mix)
    b = vg.pathwise_grad(shifted(loc), shifted(rho), shifted(eps), shifted(glik), mix)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    w = vg.MeanFieldGaussian(loc, rho).sample(2, rng=0)
    np.testing.assert_array_equal(mix.log_prob(w), mix.log_prob(shifted(w)))


def test_python_threads_at_once_match_serial(dtype):
    serial = [_all_results(dtype, 2, seed=s) for s in range(4)]
    results = [None] * 4

    def run(i):
        results[i] = _all_results(dtype, 2, seed=i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        _assert_same_bits(a, b)


def test_reentrant_elbo_grad_from_a_callback():
    """A log_lik that itself calls elbo_grad must not disturb the outer call's noise."""
    q = vg.MeanFieldGaussian(np.zeros(50), np.zeros(50))
    plain = vg.elbo_grad(q, seed_log_lik, vg.Normal(), num_samples=2, rng=0)

    def nested(w):
        vg.elbo_grad(q, seed_log_lik, vg.Normal(), num_samples=2, rng=123)
        return seed_log_lik(w)

    again = vg.elbo_grad(q, nested, vg.Normal(), num_samples=2, rng=0)
    np.testing.assert_array_equal(plain.grad_loc, again.grad_loc)
    np.testing.assert_array_equal(plain.grad_rho, again.grad_rho)


def test_caller_arrays_are_never_written(dtype):
    loc, rho, eps, glik = random_problem(4, 300, dtype)
    copies = [a.copy() for a in (loc, rho, eps, glik)]
    q = vg.MeanFieldGaussian(loc, rho)
    loc[0] = 99.0  # the distribution holds its own copy
    assert q.loc[0] != 99.0
    loc[0] = copies[0][0]
    w = q.sample(4, rng=0)
    w_copy = w.copy()
    q.log_prob(w)
    vg.Normal(0, 1).grad_log_prob(w)
    vg.pathwise_grad(loc, rho, eps, glik, vg.ScaleMixtureNormal(0.5, 1.0, 0.01))
    vg.score_grad(loc, rho, eps, glik[:, 0], baseline=0.5)
    for a, c in zip((loc, rho, eps, glik), copies):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(w, w_copy)
    with pytest.raises(ValueError):
        q.loc[0] = 1.0  # read-only views of the parameters
