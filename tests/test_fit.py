"""vg.fit: black-box VI held to exact posteriors (conjugate regression, Gaussians) and to
posteriordb reference posteriors, with its log-joint calls counted; the convergence rule on a
posterior that drifts slowly; errors, divergence, determinism, diagnostics.

Bounds on a fitted q are stated in its own Monte Carlo standard errors where the answer is exact
(the family holds the posterior): the fit reports the MCSE of its mean (diagnostics.mcse_mean)
and stops when every parameter's MCSE is below ``tol`` sds, so a mean within 5 MCSE and sds
within 5 tol (on the log scale) are 5-standard-error bounds."""

import math

import numpy as np
import pytest

import vigrad as vg

from posteriordb_models import get_model


def gaussian_log_joint(mu, cov):
    prec = np.linalg.inv(cov)

    def log_joint(z):
        r = z - mu
        g = -r @ prec
        return 0.5 * np.einsum("si,si->s", r, g), g

    return log_joint, prec


def gaussian_kl(m0, S0, m1, S1):
    """KL(N(m0, S0) || N(m1, S1)) in closed form."""
    d = len(m0)
    P1 = np.linalg.inv(S1)
    r = m1 - m0
    return 0.5 * (np.trace(P1 @ S0) + r @ P1 @ r - d + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1])


# -- exact oracles ----------------------------------------------------------------------------------

def conjugate_regression(seed=0, n=60, d=4, noise=0.5, prior_sd=3.0):
    """y = X beta + N(0, noise^2) with strongly correlated features and a N(0, prior_sd^2) prior:
    the posterior is N(m, V) in closed form."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 1))
    X = base + 0.15 * rng.standard_normal((n, d))  # feature correlations ~0.98
    beta = rng.standard_normal(d)
    y = X @ beta + noise * rng.standard_normal(n)
    prec = X.T @ X / noise**2 + np.eye(d) / prior_sd**2
    V = np.linalg.inv(prec)
    m = V @ X.T @ y / noise**2

    def log_joint(z):
        r = y[None, :] - z @ X.T
        values = -0.5 * np.sum(r * r, axis=1) / noise**2 - 0.5 * np.sum(z * z, axis=1) / prior_sd**2
        grads = r @ X / noise**2 - z / prior_sd**2
        return values, grads

    return log_joint, m, V, prec


@pytest.mark.parametrize("estimator", ["pathwise", "stl"])
def test_fullrank_recovers_the_conjugate_posterior(estimator):
    log_joint, m, V, _ = conjugate_regression()
    tol = 0.02
    res = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", estimator=estimator, rng=1, tol=tol)
    d = res.diagnostics
    assert d.converged and d.stop_reason == "converged" and d.max_mcse <= tol
    sd = np.sqrt(np.diag(V))
    assert np.all(d.mcse_mean <= 1.5 * tol * sd)  # the loc's MCSE, mapped back through the Laplace factor
    assert np.all(np.abs(res.q.mean - m) <= 5 * d.mcse_mean)
    # 14 parameters each within ~tol of the optimum: KL(q || posterior) ~ 7 tol^2 = 0.003 typically
    assert gaussian_kl(res.q.mean, res.q.cov, m, V) < 0.03
    assert d.psis_khat < 0.5  # q is the posterior: importance weights are near-constant


@pytest.mark.parametrize("rng", [2, 3])
def test_meanfield_sds_are_the_reverse_kl_optimum(rng):
    """For a Gaussian posterior the mean-field KL(q||p) optimum has sd 1/sqrt(diag(precision)),
    well below the marginal sds when features are correlated.  (Pathwise only: with "stl" and
    Adam the mean-field mean wanders along this posterior's near-singular direction by ~lr x 10
    sds over hundreds of steps, slower than any window the monitor can measure; SGD does not.)"""
    log_joint, m, V, prec = conjugate_regression()
    tol = 0.02
    res = vg.fit(log_joint, np.zeros(len(m)), family="meanfield", rng=rng, tol=tol)
    assert res.diagnostics.converged
    target = 1.0 / np.sqrt(np.diag(prec))
    assert np.all(np.abs(np.log(res.q.scale / target)) < 5 * tol)
    assert np.all(target < 0.5 * np.sqrt(np.diag(V)))  # the test means something: MF underestimates
    # the mean-field optimum's mean is the posterior mean; the MCSE is in units of q's own sd
    assert np.all(np.abs(res.q.mean - m) <= 5 * res.diagnostics.mcse_mean)
    assert np.all(res.diagnostics.mcse_mean <= 1.5 * tol * target)


def test_lowrank_recovers_one_dominant_direction():
    d = 20
    rng = np.random.default_rng(3)
    u = rng.standard_normal(d)
    u *= 3.0 / np.linalg.norm(u)
    diag = rng.uniform(0.2, 0.6, d)
    cov = np.diag(diag**2) + np.outer(u, u)
    mu = rng.standard_normal(d)
    log_joint, _ = gaussian_log_joint(mu, cov)
    res = vg.fit(log_joint, np.zeros(d), family="lowrank", rank=1, estimator="stl", rng=4, tol=0.02)
    q = res.q
    assert res.diagnostics.converged
    assert np.all(np.abs(q.mean - mu) < 0.1 * np.sqrt(np.diag(cov)))
    np.testing.assert_allclose(q.cov, cov, rtol=0.1, atol=0.02)
    cos = abs(q.cov_factor[:, 0] @ u) / (np.linalg.norm(q.cov_factor) * np.linalg.norm(u))
    assert cos > 0.99
    np.testing.assert_allclose(q.diag, diag, rtol=0.1)


def test_scales_1e4_apart_and_correlation_0_99():
    sd = np.array([1e-2, 1.0, 1e2, 1e1])
    corr = np.full((4, 4), 0.99) + 0.01 * np.eye(4)
    cov = corr * np.outer(sd, sd)
    mu = np.array([0.01, -1.0, 50.0, 3.0])
    log_joint, _ = gaussian_log_joint(mu, cov)
    tol = 0.02
    res = vg.fit(log_joint, np.zeros(4), family="fullrank", rng=5, tol=tol)
    assert res.diagnostics.steps <= 3000 and res.diagnostics.converged
    assert np.all(np.abs(res.q.mean - mu) <= 5 * res.diagnostics.mcse_mean)
    assert np.all(np.abs(np.log(np.sqrt(np.diag(res.q.cov)) / sd)) < 5 * tol)


def test_score_estimator_converges_without_gradients():
    mu, sd = np.array([1.0, -2.0]), np.array([0.5, 2.0])

    def log_joint(z):  # values only
        return -0.5 * np.sum(((z - mu) / sd) ** 2, axis=1)

    res = vg.fit(log_joint, np.zeros(2), estimator="score", rng=6, num_steps=5000)
    d = res.diagnostics
    assert d.map is None and d.converged
    assert np.all(np.abs(res.q.mean - mu) <= 5 * d.mcse_mean)
    assert np.all(np.abs(np.log(res.q.scale / sd)) < 5 * 0.05)


# -- the convergence rule ---------------------------------------------------------------------------

def test_a_slow_drift_is_not_mistaken_for_convergence():
    """Score-function gradients from q = N(0, I) towards N(mu, 1), mu 3 sds away in each of 4
    coordinates, with Adam at a small step: the iterates drift to mu over hundreds of steps with
    the drift buried in gradient noise (an Adam step moves ~lr x SNR).  A rule that stopped once
    the MCSE of a short window was small would return q still on the way (checked: the iterate
    average over steps 50-200 is off by more than 1 sd); the fit must run on to mu."""
    mu = np.full(4, 3.0)

    def log_joint(z):
        return -0.5 * np.sum((z - mu) ** 2, axis=1)

    seen = []

    def callback(state, info):
        seen.append(np.array(state.params[0]))

    res = vg.fit(log_joint, np.zeros(4), estimator="score", map_init=False, lr=0.01, num_samples=8,
                 rng=0, num_steps=20000, callback=callback)
    early = np.mean(seen[50:200], axis=0)
    assert np.max(np.abs(early - mu)) > 1.0  # an early stop would be wrong
    d = res.diagnostics
    assert d.converged and d.steps > 400
    assert np.all(np.abs(res.q.mean - mu) < 0.25)
    assert np.all(np.abs(res.q.mean - mu) <= 5 * d.mcse_mean + 0.05)


# -- posteriordb reference posteriors ----------------------------------------------------------------

TARGETS = ["kidiq-kidscore_momiq", "sblrc-blr", "arK-arK"]


def _check_against_reference(model, q, family):
    """The issue's target: every mean within 0.2 reference sd, every sd within [0.8, 1.25] of the
    reference (mean field: of mf_gauss_sd_pred, the mean-field optimum if p were Gaussian)."""
    z = np.abs(q.mean - model.ref_mean) / model.ref_sd
    ref = model.ref_sd if family == "fullrank" else np.asarray(model.mf_sd_pred)
    ratio = np.sqrt(np.diag(q.cov)) / ref
    return z, ratio


@pytest.mark.slow
@pytest.mark.parametrize("family", ["fullrank", "meanfield"])
@pytest.mark.parametrize("name", TARGETS)
def test_posteriordb_targets_within_400_log_joint_calls(name, family):
    """kidiq, sblrc and arK, full rank and mean field, seeds 0-2, all defaults, started at 0:
    on target in every run, with at most 400 calls of the log joint, MAP search, curvature and
    PSIS draws included (measured: 189-250)."""
    model = get_model(name)
    for seed in range(3):
        calls = [0]

        def log_joint(z):
            calls[0] += 1
            return model.log_joint(z)

        res = vg.fit(log_joint, np.zeros(model.dim), family=family, rng=seed)
        d = res.diagnostics
        z, ratio = _check_against_reference(model, res.q, family)
        print(f"{name} {family} seed {seed}: calls {calls[0]} (MAP {d.map.nfev}), steps {d.steps}, "
              f"max |mean - ref| / sd {z.max():.3f}, sd ratio {ratio.min():.3f}..{ratio.max():.3f}, "
              f"MCSE {d.max_mcse:.3f}")
        assert d.converged and d.stop_reason == "converged"
        assert d.log_joint_calls == calls[0] <= 400
        assert np.all(z < 0.2)
        assert np.all((0.8 <= ratio) & (ratio <= 1.25))
        assert np.isfinite(d.psis_khat)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["fullrank", "meanfield"])
def test_eight_schools_noncentered(family):
    """Means within 0.2 sd and sds within 20 % except log tau, whose sd a Gaussian KL(q || p) fit
    cannot match: the posterior is skewed in it, and the reverse-KL optimum puts about 0.6 of the
    reference sd there (with every estimator, and in long runs at small steps); that band is
    asserted instead.  The Laplace start is poor here (log tau 1.3 sd off, its sd 0.4 of the
    reference), so these fits drift for hundreds of steps: the rule must wait for them."""
    model = get_model("eight_schools-eight_schools_noncentered")
    for seed in range(3):  # measured: 1000-3000 steps for mean field, 3000-9500 for full rank
        res = vg.fit(model.log_joint, np.zeros(model.dim), family=family, rng=seed, num_steps=30000)
        z, ratio = _check_against_reference(model, res.q, family)
        print(f"eight schools {family} seed {seed}: steps {res.diagnostics.steps}, max z {z.max():.3f}, "
              f"sd ratio {ratio[:-1].min():.3f}..{ratio[:-1].max():.3f}, log tau {ratio[-1]:.3f}")
        assert res.diagnostics.converged
        assert np.all(z < 0.2)
        assert np.all(np.abs(ratio[:-1] - 1) < 0.2)
        assert 0.45 < ratio[-1] < 0.75


# -- errors, divergence, determinism ------------------------------------------------------------------

def good(z):
    return -0.5 * np.sum(z * z, axis=1), -z


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"family": "diag"}, ValueError, "family must be one of 'meanfield', 'fullrank', 'lowrank', got 'diag'"),
    ({"estimator": "reinforce"}, ValueError, "estimator must be one of"),
    ({"family": "lowrank"}, ValueError, "needs rank"),
    ({"family": "lowrank", "rank": 3}, ValueError, r"rank must satisfy 1 <= rank < d = 3, got 3"),
    ({"family": "lowrank", "rank": 0}, ValueError, "rank must be >= 1"),
    ({"rank": 1}, ValueError, "rank applies to family='lowrank' only"),
    ({"num_samples": 0}, ValueError, "num_samples must be >= 1"),
    ({"estimator": "score", "num_samples": 1}, ValueError, "needs num_samples >= 2"),
    ({"lr": -1.0}, ValueError, "lr must be > 0"),
    ({"lr": "fast"}, ValueError, "lr must be a positive float"),
    ({"lr": 0.1, "optimizer": vg.optim.adam(0.1)}, ValueError, "give lr or optimizer, not both"),
    ({"optimizer": "adam"}, TypeError, "optimizer must be a vigrad.optim Optimizer"),
    ({"tol": 0.0}, ValueError, "tol must be > 0"),
    ({"callback": 3}, TypeError, "callback must be callable"),
    ({"map_init": "yes"}, TypeError, "map_init must be a bool"),
])
def test_bad_options(kwargs, exc, match):
    calls = []

    def lj(z):
        calls.append(1)
        return good(z)

    with pytest.raises(exc, match=match):
        vg.fit(lj, np.zeros(3), rng=0, **kwargs)
    assert not calls  # refused before any work


def test_bad_init_and_log_joint():
    with pytest.raises(ValueError, match=r"init must be a 1-D array"):
        vg.fit(good, np.zeros((2, 2)))
    with pytest.raises(TypeError, match="log_joint must be callable"):
        vg.fit(None, np.zeros(2))
    with pytest.raises(ValueError, match=r"log_joint values must have shape \(1,\)"):
        vg.fit(lambda z: (np.zeros(3), -z), np.zeros(2))
    with pytest.raises(ValueError, match=r"log_joint grads must have the shape of z"):
        vg.fit(lambda z: (np.zeros(z.shape[0]), -z[:, :1]), np.zeros(2))
    with pytest.raises(ValueError, match="must return \\(values, grads\\) for the pathwise"):
        vg.fit(lambda z: np.zeros(z.shape[0]), np.zeros(2))


def test_non_finite_log_joint_names_step_and_sample():
    def bad(z):
        v, g = good(z)
        v = np.where(z[:, 0] > 2.5, np.nan, v)  # rare: only far in the tail
        return v, g

    with pytest.raises(vg.FitError, match=r"log_joint returned nan at step \d+ for sample \d+") as info:
        vg.fit(bad, np.zeros(2), rng=0, map_init=False, num_samples=16, num_steps=5000, tol=1e-6)
    err = info.value
    assert err.step >= 0 and isinstance(err.result.q, vg.MeanFieldGaussian)
    assert np.isfinite(err.result.q.loc).all()
    d = err.result.diagnostics
    assert d["converged"] is False and d.stop_reason == "error" and d.steps == err.step
    assert set(d) == set(vg.fit(good, np.zeros(2), rng=0, num_steps=5).diagnostics)  # the same keys


@pytest.mark.parametrize("map_init", [True, False])
def test_nan_at_the_start_is_a_fit_error(map_init):
    """Issue 15 (12): a log joint that is NaN at init raised the private bbvi._NonFinite."""
    def nan_everywhere(z):
        return np.full(z.shape[0], np.nan), -z

    with pytest.raises(vg.FitError, match="log_joint returned nan at init") as info:
        vg.fit(nan_everywhere, np.zeros(3), rng=0, map_init=map_init)
    assert info.value.step == -1 and info.value.result.diagnostics.stop_reason == "error"

    def nan_in_the_map_search(z):  # finite at init, NaN once the search moves
        v, g = good(z - 5.0)
        return np.where(np.abs(z[:, 0]) > 0.5, np.nan, v), g

    with pytest.raises(vg.FitError, match="the MAP search") as info:
        vg.fit(nan_in_the_map_search, np.zeros(3), rng=0)
    assert type(info.value) is vg.FitError


@pytest.mark.parametrize("estimator,map_init", [("score", False), ("pathwise", False), ("pathwise", True),
                                                ("stl", True)])
def test_the_log_joint_gets_a_read_only_z(estimator, map_init):
    """Issue 15 (6): a log joint that shifts z in place (z -= m) used to corrupt the fit under
    the score estimator (mean ~0 instead of [1, -2]); every z it is given is now read-only, so the
    same code is an error, and one that copies first fits the right mean."""
    m = np.array([1.0, -2.0])

    def in_place(z):
        z -= m
        return -0.5 * np.sum(z * z, axis=1), -z

    with pytest.raises(ValueError, match="read-only"):
        vg.fit(in_place, np.zeros(2), estimator=estimator, map_init=map_init, rng=0)

    flags = []

    def copying(z):
        flags.append(z.flags.writeable)
        r = z - m
        return -0.5 * np.sum(r * r, axis=1), -r

    res = vg.fit(copying, np.zeros(2), estimator=estimator, map_init=map_init, rng=0, num_steps=3000)
    assert not any(flags)  # the probe, the MAP search, the curvature, the steps and the PSIS draws
    assert np.all(np.abs(res.q.mean - m) <= 5 * res.diagnostics.mcse_mean + 0.02)


def test_gradient_snr_of_a_large_block_is_over_4096_evenly_spaced_coordinates():
    """Past 4096 coordinates a block's SNR is the mean over 4096 evenly spaced ones (as its
    docstring says), computed here from the steps' gradients; the SNR over all of them differs."""
    d = 5000
    rng = np.random.default_rng(3)
    mu, prec = rng.standard_normal(d), rng.uniform(0.5, 4.0, d)
    grads = []

    def lj(z):
        r = z - mu
        return -0.5 * np.einsum("sj,sj->s", r * prec, r), -r * prec

    res = vg.fit(lj, np.zeros(d), rng=0, map_init=False, num_steps=130, psis_samples=0,
                 callback=lambda s, i: grads.append(i.grads) and False)
    assert res.diagnostics.steps == 130
    window = grads[100:]
    picks = np.unique(np.linspace(0, d - 1, 4096).round().astype(np.intp))
    assert picks.size == 4096
    for b, name in enumerate(("loc", "scale")):
        G = np.array([g[b] for g in window])
        ratio = np.abs(G.mean(axis=0)) / G.std(axis=0, ddof=1)
        assert res.diagnostics.grad_snr[name] == pytest.approx(np.mean(ratio[picks]), rel=1e-9)
        assert res.diagnostics.grad_snr[name] != pytest.approx(np.mean(ratio), rel=1e-9)


@pytest.mark.parametrize("fail_at", [37, 130])
def test_a_failed_step_leaves_the_gradient_snr_of_the_steps_before_it(fail_at):
    """A step whose gradient is not finite does not reach the SNR's running sums (kept in place
    across its 100-step windows): the failed fit reports the SNR of the steps before it, computed
    here from their gradients (np.std, ddof=1) over the current window."""
    calls, grads = [0], []

    def lj(z):
        calls[0] += 1
        v, g = good(z)
        if calls[0] == fail_at + 2:  # the probe at init, then one call per step
            g = g.copy()
            g[1, 0] = np.nan
        return v, g

    with pytest.raises(vg.FitError, match="gradient") as info:
        vg.fit(lj, np.zeros(2), rng=0, map_init=False, num_steps=1000, tol=1e-6,
               callback=lambda s, i: grads.append(i.grads) and False)
    assert len(grads) == fail_at
    window = grads[len(grads) // 100 * 100:]
    snr = info.value.result.diagnostics.grad_snr
    for b, name in enumerate(("loc", "scale")):
        G = np.array([g[b] for g in window])
        want = np.mean(np.abs(G.mean(axis=0)) / G.std(axis=0, ddof=1))
        assert snr[name] == pytest.approx(want, rel=1e-9)


def test_divergence_stops_with_the_last_finite_state():
    def steep(z):  # a log density whose gradient explodes away from 0
        return -np.sum(np.exp(3 * z), axis=1), -3 * np.exp(3 * z)

    with pytest.raises(vg.FitError) as info:
        vg.fit(steep, np.zeros(2), rng=0, map_init=False, lr=300.0, num_steps=2000)
    assert np.isfinite(info.value.result.q.loc).all()


def test_same_seed_same_bits_any_workers():
    log_joint, m, V, _ = conjugate_regression()
    a = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", rng=9, workers=1)
    b = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", rng=9, workers=2)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.q.scale_tril, b.q.scale_tril)
    c = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", rng=10)
    assert not np.array_equal(a.losses, c.losses)


def test_diagnostics_are_typed_and_readable_by_key(capsys):
    res = vg.fit(good, np.zeros(3), family="lowrank", rank=1, rng=0, progress=True)
    d = res.diagnostics
    assert isinstance(d, vg.bbvi.FitDiagnostics)
    assert set(d) >= {"converged", "grad_snr", "psis_khat", "elbo_trace", "steps", "stop_reason", "mcse_mean"}
    assert d["converged"] is d.converged is True and d["num_steps"] == d.steps == len(res.losses)
    assert d["stop_reason"] == "converged"
    assert set(d["grad_snr"]) == {"loc", "diag", "cov_factor"}
    assert len(d.elbo_trace) == d.steps // 20 and d.mcse_mean.shape == (3,)
    assert d.window <= d.steps and d.log_joint_calls >= d.steps
    assert isinstance(d.optimizer, vg.optim.Optimizer) and d.optimizer.hyperparams["lr"] == vg.vi.DEFAULT_LR
    with pytest.raises(KeyError):
        d["no such key"]
    with pytest.raises(AttributeError):
        d.converged = False
    assert "vg.fit: step" in capsys.readouterr().err


def test_stop_reasons_num_steps_and_callback():
    res = vg.fit(good, np.zeros(2), rng=0, num_steps=30)
    assert res.diagnostics.stop_reason == "num_steps" and not res.diagnostics.converged
    assert res.diagnostics.steps == 30 == len(res.losses)
    seen = []

    def stop_at_7(state, info):
        seen.append((int(state.step), info.loss))
        return int(state.step) == 7

    res = vg.fit(good, np.zeros(2), rng=0, callback=stop_at_7)
    assert res.diagnostics.stop_reason == "callback" and res.diagnostics.steps == 7
    np.testing.assert_array_equal([s for s, _ in seen], np.arange(1, 8))
    np.testing.assert_array_equal([v for _, v in seen], res.losses)


def test_optimizer_argument_is_used():
    res_lr = vg.fit(good, np.zeros(3), rng=0, map_init=False, lr=0.1, num_steps=40)
    res_opt = vg.fit(good, np.zeros(3), rng=0, map_init=False, optimizer=vg.optim.adam(0.1), num_steps=40)
    np.testing.assert_array_equal(res_lr.losses, res_opt.losses)  # lr=x is adam(x)
    res_sgd = vg.fit(good, np.ones(3), rng=0, map_init=False, optimizer=vg.optim.sgd(0.05, momentum=0.5))
    assert res_sgd.diagnostics.converged and res_sgd.diagnostics.optimizer.name == "sgd"
    assert np.all(np.abs(res_sgd.q.mean) <= 5 * res_sgd.diagnostics.mcse_mean)


def test_a_stationary_point_that_is_not_a_maximum_falls_back_with_a_warning():
    """Two modes at +-2: from init 0 the gradient is 0 and L-BFGS stops between them, where the
    Hessian of -log p is negative; the fit warns and runs without the Laplace whitening, finding
    a Gaussian on the target's scale instead of one with loc ~ -5800 (what it returned before)."""
    def log_joint(z):
        a, b = -0.5 * ((z - 2) / 0.5) ** 2, -0.5 * ((z + 2) / 0.5) ** 2
        m = np.maximum(a, b)
        wa, wb = np.exp(a - m), np.exp(b - m)
        values = (m + np.log(wa + wb))[:, 0]
        grads = (wa * (-(z - 2) / 0.25) + wb * (-(z + 2) / 0.25)) / (wa + wb)
        return values, grads

    with pytest.warns(RuntimeWarning, match="not positive definite"):
        res = vg.fit(log_joint, np.zeros(1), rng=0)
    assert not res.diagnostics.map.usable and res.diagnostics.map.scale is None
    assert abs(res.q.mean[0]) < 2.5 and 0.3 < res.q.scale[0] < 2.5


def test_a_z_the_log_joint_keeps_is_never_overwritten():
    """vg.fit reuses its (S, d) work arrays between steps, but not one the log joint still holds."""
    kept = []

    def log_joint(z):
        kept.append((z, z.copy()))
        return -0.5 * np.sum(z * z, axis=1), -z

    vg.fit(log_joint, np.zeros(3), rng=0, num_steps=40, map_init=False, psis_samples=0)
    assert len(kept) > 40
    for z, snapshot in kept:
        np.testing.assert_array_equal(z, snapshot)


def test_reused_work_arrays_give_the_same_fit_as_fresh_ones():
    """The same seed gives the same bits whether the log joint keeps its z (fresh arrays every
    step) or not (the work arrays reused)."""
    def lj(z):
        return -0.5 * np.sum((z - 1.0) ** 2, axis=1), -(z - 1.0)

    kept = []

    def lj_keeping(z):
        kept.append(z)
        return lj(z)

    for map_init in (False, True):
        a = vg.fit(lj, np.zeros(4), rng=3, num_steps=60, map_init=map_init, psis_samples=0)
        b = vg.fit(lj_keeping, np.zeros(4), rng=3, num_steps=60, map_init=map_init, psis_samples=0)
        np.testing.assert_array_equal(a.losses, b.losses)
        np.testing.assert_array_equal(a.q.loc, b.q.loc)


@pytest.mark.parametrize("schedule,exc,match", [
    (lambda t: -0.05, ValueError, "finite value >= 0"),
    (lambda t: float("nan"), ValueError, "finite value >= 0"),
    (lambda t: "0.1", TypeError, "real number"),
])
def test_a_bad_lr_schedule_value_is_an_error(schedule, exc, match):
    def lj(z):
        return -0.5 * np.sum(z * z, axis=1), -z

    with pytest.raises(exc, match=match):
        vg.fit(lj, np.zeros(2), rng=0, num_steps=20, lr=schedule, map_init=False, psis_samples=0)


def test_losses_are_the_elbo_in_the_original_coordinates():
    """The -ELBO of a q equal to the (normalised) posterior is 0 up to Monte Carlo noise; with the
    Laplace whitening the loss must include log |det T| to say so."""
    cov = np.array([[4.0, 1.9], [1.9, 1.0]])
    mu = np.array([1.0, 2.0])
    prec = np.linalg.inv(cov)
    log_norm = -np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(cov)[1]

    def log_joint(z):
        r = z - mu
        g = -r @ prec
        return 0.5 * np.einsum("si,si->s", r, g) + log_norm, g

    res = vg.fit(log_joint, np.zeros(2), family="fullrank", rng=0, estimator="stl")
    tail = res.losses[-100:]
    assert abs(tail.mean()) < 5 * tail.std() / math.sqrt(tail.size) + 0.01
