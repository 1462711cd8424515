"""Bad input raises a clear TypeError / ValueError naming the argument, before any work."""

import numpy as np
import pytest

import vigrad as vg
from vigrad import _core

from vg_testutil import random_problem, seed_log_lik


# -- the binding contract: dtype, ndim, shape, contiguity --------------------------------

def _args(S=3, D=4, dtype=np.float64):
    loc, rho, eps, glik = random_problem(S, D, dtype)
    one = np.ones(1, dtype)
    return [loc, rho, eps, glik, one * 0, one, "mc", 1.0, 1]


def test_binding_rejects_wrong_dtype_with_typeerror():
    args = _args()
    args[2] = args[2].astype(np.float32)  # mixed precision
    with pytest.raises(TypeError):
        _core.pathwise_grad_normal(*args)
    args = _args()
    args[0] = args[0].astype(np.int64)
    with pytest.raises(TypeError):
        _core.pathwise_grad_normal(*args)
    with pytest.raises(TypeError):
        _core.softplus(np.ones(3, np.complex128), 1)


def test_binding_rejects_non_contiguous_with_typeerror():
    args = _args(S=3, D=8)
    args[2] = np.asfortranarray(args[2])
    with pytest.raises(TypeError):
        _core.pathwise_grad_normal(*args)
    args = _args(S=3, D=8)
    args[0] = np.ones(16)[::2]
    with pytest.raises(TypeError):
        _core.pathwise_grad_normal(*args)


@pytest.mark.parametrize("i,bad,match", [
    (0, np.ones((2, 2)), "loc must be 1-D"),
    (1, np.ones(5), r"rho must have shape \(D,\)"),
    (2, np.ones(12), "eps must be 2-D"),
    (2, np.ones((3, 5)), r"eps must have shape \(S, D\)"),
    (3, np.ones((2, 4)), r"grad_log_lik must have shape \(S, D\)"),
    (4, np.ones(3), "prior loc must have size 1 or 4"),
    (6, "bogus", "mode must be"),
    (8, 0, "workers must be >= 1"),
])
def test_binding_rejects_bad_shapes_and_values_with_valueerror(i, bad, match):
    args = _args()
    args[i] = bad
    with pytest.raises(ValueError, match=match):
        _core.pathwise_grad_normal(*args)


def test_binding_other_kernels_check_shapes():
    w = np.ones((2, 3))
    with pytest.raises(ValueError, match="w must have shape"):
        _core.mf_log_prob(np.ones(4), np.ones(4), w, 1)
    with pytest.raises(ValueError, match="eps must have shape"):
        _core.sample(0, np.ones(3), np.ones(3), w, np.ones((3, 3)), 1)
    with pytest.raises(ValueError, match="f must have shape"):
        _core.score_grad(np.ones(3), np.ones(3), w, np.ones(3), "none", 0.0, 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        _core.score_grad(np.ones(3), np.ones(3), np.ones((1, 3)), np.ones(1), "loo", 0.0, 1)
    with pytest.raises(ValueError, match="counters must have shape"):
        _core.philox4x32_10(np.ones((2, 3), np.uint32), 0)
    with pytest.raises(ValueError, match="mode must be 'mc' or 'stl'"):
        _core.pathwise_grad_mixture(np.ones(3), np.ones(3), w, w, *[np.ones(1)] * 3, "analytic", 1.0, 1)


# -- the public API --------------------------------------------------------------------------

@pytest.mark.parametrize("bad,exc,match", [
    (np.ones(3, np.complex128), TypeError, "loc must be real.*complex"),
    (np.array(["a", "b", "c"]), TypeError, "loc must be an array of real numbers"),
    (np.array([object(), 1, 2], dtype=object), TypeError, "loc must be an array of real numbers"),
    (np.ones(3, bool), TypeError, "loc must be real numbers, got bool"),
    (np.ones(4), ValueError, r"loc and rho must have the same shape, got \(4,\) and \(3,\)"),
    (np.array([0.0, np.nan, 1.0]), ValueError, r"loc must be finite.*index \(1,\)"),
    (np.array([0.0, np.inf, 1.0]), ValueError, "loc must be finite"),
])
def test_meanfield_rejects_bad_loc(bad, exc, match):
    with pytest.raises(exc, match=match):
        vg.MeanFieldGaussian(bad, np.zeros(3))


def test_meanfield_rejects_bad_rho_and_scale():
    with pytest.raises(ValueError, match="rho must be finite"):
        vg.MeanFieldGaussian(np.zeros(2), np.array([0.0, -np.inf]))
    with pytest.raises(ValueError, match="scale of 0"):
        vg.MeanFieldGaussian(np.zeros(2, np.float32), np.array([0.0, -200.0], np.float32))
    with pytest.raises(ValueError, match=r"scale must be > 0, got scale\[\(1,\)\] = "):
        vg.MeanFieldGaussian.from_scale(np.zeros(2), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="scale must be > 0"):
        vg.MeanFieldGaussian.from_scale(np.zeros(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="scale must be finite"):
        vg.MeanFieldGaussian.from_scale(np.zeros(2), np.array([1.0, np.nan]))


@pytest.mark.parametrize("n,exc,match", [
    (-1, ValueError, "num_samples must be >= 0, got -1"),
    (2.5, TypeError, "num_samples must be an integer, got float"),
    (3.0, TypeError, "num_samples must be an integer"),
    (True, TypeError, "num_samples must be an integer"),
    ("3", TypeError, "num_samples must be an integer"),
])
def test_sample_rejects_bad_num_samples(n, exc, match):
    with pytest.raises(exc, match=match):
        vg.MeanFieldGaussian(np.zeros(2), np.zeros(2)).sample(n)


def test_workers_and_rng_are_checked():
    q = vg.MeanFieldGaussian(np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="workers must be nonzero"):
        q.sample(1, workers=0)
    with pytest.raises(TypeError, match="workers must be an integer"):
        q.sample(1, workers=1.5)
    with pytest.raises(ValueError, match="leaves no CPU"):
        q.sample(1, workers=-1000)
    with pytest.raises(TypeError, match="rng must be an int seed, a numpy.random.Generator or None"):
        q.sample(1, rng=np.random.RandomState(0))
    with pytest.raises(TypeError, match="rng must be"):
        q.sample(1, rng="seed")
    with pytest.raises(ValueError, match="rng seed must be non-negative"):
        q.sample(1, rng=-3)
    with pytest.raises(TypeError):
        q.sample(1, 0)  # rng is keyword-only


def test_log_prob_shape_errors():
    q = vg.MeanFieldGaussian(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"w must have shape \(2, 3\) \(one sample\) or \(S, \*\(2, 3\)\), got \(3, 2\)"):
        q.log_prob(np.zeros((3, 2)))
    with pytest.raises(TypeError, match="w must be real"):
        q.log_prob(np.zeros((2, 3), complex))


def test_prior_parameter_errors():
    with pytest.raises(ValueError, match=r"pi must lie in \(0, 1\)"):
        vg.ScaleMixtureNormal(1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"pi must lie in \(0, 1\)"):
        vg.ScaleMixtureNormal(0.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="sigma2 must be > 0"):
        vg.ScaleMixtureNormal(0.5, 1.0, -0.1)
    with pytest.raises(ValueError, match="sigma1 must be finite"):
        vg.ScaleMixtureNormal(0.5, np.nan, 0.1)
    with pytest.raises(ValueError, match="scale must be > 0"):
        vg.Normal(0.0, 0.0)
    with pytest.raises(TypeError, match="loc must be real"):
        vg.Normal(1j, 1.0)
    p = vg.Normal(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match=r"parameter loc of shape \(3,\) does not broadcast to the event shape \(4,\)"):
        p.log_prob(np.zeros((2, 4)))


def test_kl_divergence_errors():
    q = vg.MeanFieldGaussian(np.zeros(2), np.zeros(2))
    with pytest.raises(NotImplementedError, match="no closed form"):
        vg.kl_divergence(q, vg.ScaleMixtureNormal(0.5, 1.0, 0.1))
    with pytest.raises(TypeError, match="q must be a MeanFieldGaussian"):
        vg.kl_divergence(vg.Normal(), vg.Normal())
    with pytest.raises(TypeError, match="p must be a Normal"):
        vg.kl_divergence(q, "normal")
    with pytest.raises(ValueError, match="same shape"):
        vg.kl_divergence(q, vg.MeanFieldGaussian(np.zeros(3), np.zeros(3)))


class TestElboGradErrors:
    q = vg.MeanFieldGaussian(np.zeros(3), np.zeros(3))
    p = vg.Normal()

    @pytest.mark.parametrize("kwargs,exc,match", [
        ({"estimator": "reinforce"}, ValueError, "estimator must be one of 'pathwise', 'score', 'stl', got 'reinforce'"),
        ({"kl": "exact"}, ValueError, "kl must be one of 'mc', 'analytic'"),
        ({"num_samples": 0}, ValueError, "num_samples must be >= 1, got 0"),
        ({"num_samples": 1.5}, TypeError, "num_samples must be an integer"),
        ({"kl_weight": -1.0}, ValueError, "kl_weight must be >= 0"),
        ({"kl_weight": np.nan}, ValueError, "kl_weight must be finite"),
        ({"kl_weight": "1"}, TypeError, "kl_weight must be a real number"),
        ({"baseline": "loo"}, ValueError, "baseline applies to estimator='score' only"),
        ({"estimator": "score", "baseline": "mean"}, ValueError, "baseline must be None, 'loo' or a float"),
        ({"estimator": "score", "baseline": "loo"}, ValueError, "baseline='loo' needs num_samples >= 2, got 1"),
        ({"estimator": "stl", "kl": "analytic"}, ValueError, "only with kl='mc'"),
        ({"workers": 0}, ValueError, "workers must be nonzero"),
    ])
    def test_bad_options(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            vg.elbo_grad(self.q, seed_log_lik, self.p, **kwargs)

    def test_bad_objects(self):
        with pytest.raises(TypeError, match="q must be a MeanFieldGaussian"):
            vg.elbo_grad(np.zeros(3), seed_log_lik, self.p)
        with pytest.raises(TypeError, match="log_lik must be callable"):
            vg.elbo_grad(self.q, 3.0, self.p)
        with pytest.raises(TypeError, match="prior must be a vigrad Normal or ScaleMixtureNormal"):
            vg.elbo_grad(self.q, seed_log_lik, "N(0,1)")
        with pytest.raises(ValueError, match="kl='analytic' needs a Normal prior"):
            vg.elbo_grad(self.q, seed_log_lik, vg.ScaleMixtureNormal(0.5, 1, 0.1), kl="analytic")

    @pytest.mark.parametrize("log_lik,match", [
        (lambda w: (np.zeros(w.shape[0] + 1), -w), r"log_lik values must have shape \(2,\) \(one per sample\), got \(3,\)"),
        (lambda w: (np.zeros(w.shape[0]), -w[:, :2]), r"log_lik grads must have the shape of w \(2, 3\), got \(2, 2\)"),
        (lambda w: np.zeros(w.shape[0]), "must return \\(values, grads\\) for the pathwise"),
        (lambda w: (np.zeros(2), -w, 1), "got a tuple of 3"),
        (lambda w: (np.array([0.0, np.nan]), -w), "log_lik returned a non-finite value nan for sample 1"),
        (lambda w: (np.zeros(2), np.where(np.arange(3) == 2, np.inf, -w)), r"log_lik grads must be finite, got inf at index \(0, 2\)"),
    ])
    def test_bad_callback_results(self, log_lik, match):
        with pytest.raises(ValueError, match=match):
            vg.elbo_grad(self.q, log_lik, self.p, num_samples=2, rng=0)

    def test_callback_cannot_change_the_samples(self):
        def log_lik(w):
            w[0, 0] = 5.0
            return seed_log_lik(w)

        with pytest.raises(ValueError, match="read-only"):
            vg.elbo_grad(self.q, log_lik, self.p)


def test_pathwise_grad_errors():
    loc, rho, eps, glik = random_problem(3, 4, np.float64)
    p = vg.Normal()
    with pytest.raises(ValueError, match=r"eps must have shape \(S, \*\(4,\)\), got \(3, 5\)"):
        vg.pathwise_grad(loc, rho, np.zeros((3, 5)), glik, p)
    with pytest.raises(ValueError, match="grad_log_lik must have the shape of eps"):
        vg.pathwise_grad(loc, rho, eps, glik[:2], p)
    with pytest.raises(ValueError, match="at least one sample"):
        vg.pathwise_grad(loc, rho, eps[:0], glik[:0], p)
    with pytest.raises(ValueError, match="stl=True drops the score term"):
        vg.pathwise_grad(loc, rho, eps, glik, p, kl="analytic", stl=True)
    with pytest.raises(TypeError, match="stl must be a bool"):
        vg.pathwise_grad(loc, rho, eps, glik, p, stl="yes")
    bad = glik.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"grad_log_lik must be finite, got nan at index \(1, 2\)"):
        vg.pathwise_grad(loc, rho, eps, bad, p)
    bad = loc.copy()
    bad[3] = np.inf
    with pytest.raises(ValueError, match=r"loc must be finite, got inf at index \(3,\)"):
        vg.pathwise_grad(bad, rho, eps, glik, p)
    with pytest.raises(ValueError, match="overflowed"):
        vg.pathwise_grad(loc, rho, eps, np.full_like(glik, 1e308), p)


def test_score_grad_errors():
    loc, rho, eps, _ = random_problem(3, 4, np.float64)
    with pytest.raises(ValueError, match=r"f must have shape \(3,\), got \(4,\)"):
        vg.score_grad(loc, rho, eps, np.zeros(4))
    with pytest.raises(ValueError, match=r"f must be finite, got nan at index \(0,\)"):
        vg.score_grad(loc, rho, eps, np.array([np.nan, 0.0, 0.0]))
