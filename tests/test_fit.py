"""vg.fit: black-box VI held to exact posteriors (conjugate regression, Gaussians) and to
posteriordb reference posteriors; errors, divergence, determinism."""

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
    res = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", estimator=estimator, rng=1)
    sd = np.sqrt(np.diag(V))
    assert np.all(np.abs(res.q.mean - m) < 0.1 * sd)
    # covariance entries within 10 % of the exact ones, or 0.1 sd_i sd_j for near-zero entries
    assert np.all(np.abs(res.q.cov - V) <= 0.1 * np.abs(V) + 0.1 * np.outer(sd, sd) * 0.1)
    assert res.diagnostics["converged"]
    assert res.diagnostics["psis_khat"] < 0.5  # q is the posterior: importance weights are near-constant


@pytest.mark.parametrize("estimator", ["pathwise", "stl"])
def test_meanfield_sds_are_the_reverse_kl_optimum(estimator):
    """For a Gaussian posterior the mean-field KL(q||p) optimum has sd 1/sqrt(diag(precision)),
    well below the marginal sds when features are correlated."""
    log_joint, m, V, prec = conjugate_regression()
    res = vg.fit(log_joint, np.zeros(len(m)), family="meanfield", estimator=estimator, rng=2)
    target = 1.0 / np.sqrt(np.diag(prec))
    np.testing.assert_allclose(res.q.scale, target, rtol=0.05)
    assert np.all(target < 0.5 * np.sqrt(np.diag(V)))  # the test means something: MF underestimates
    assert np.all(np.abs(res.q.mean - m) < 0.1 * np.sqrt(np.diag(V)))


def test_lowrank_recovers_one_dominant_direction():
    d = 20
    rng = np.random.default_rng(3)
    u = rng.standard_normal(d)
    u *= 3.0 / np.linalg.norm(u)
    diag = rng.uniform(0.2, 0.6, d)
    cov = np.diag(diag**2) + np.outer(u, u)
    mu = rng.standard_normal(d)
    log_joint, _ = gaussian_log_joint(mu, cov)
    res = vg.fit(log_joint, np.zeros(d), family="lowrank", rank=1, estimator="stl", rng=4)
    q = res.q
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
    res = vg.fit(log_joint, np.zeros(4), family="fullrank", rng=5)
    assert res.diagnostics["num_steps"] <= 3000 and res.diagnostics["converged"]
    assert np.all(np.abs(res.q.mean - mu) < 0.1 * sd)
    np.testing.assert_allclose(np.sqrt(np.diag(res.q.cov)), sd, rtol=0.1)


def test_score_estimator_converges_without_gradients():
    mu, sd = np.array([1.0, -2.0]), np.array([0.5, 2.0])

    def log_joint(z):  # values only
        return -0.5 * np.sum(((z - mu) / sd) ** 2, axis=1)

    res = vg.fit(log_joint, np.zeros(2), estimator="score", rng=6, num_steps=5000)
    assert res.diagnostics["map"] is None
    np.testing.assert_allclose(res.q.mean, mu, atol=0.1 * sd.max())
    np.testing.assert_allclose(res.q.scale, sd, rtol=0.15)


# -- posteriordb reference posteriors ----------------------------------------------------------------

POSTERIORS = ["kidiq-kidscore_momiq", "eight_schools-eight_schools_noncentered", "sblrc-blr", "arK-arK"]


@pytest.mark.slow
@pytest.mark.parametrize("name", POSTERIORS)
def test_fullrank_matches_posteriordb_reference(name):
    model = get_model(name)
    res = vg.fit(model.log_joint, model.ref_mean * 0.0 + np.asarray(model.ref_mean), family="fullrank", rng=7)
    q = res.q
    z = np.abs(q.mean - model.ref_mean) / model.ref_sd
    ratio = np.sqrt(np.diag(q.cov)) / model.ref_sd
    print(f"{name}: max |mean - ref| / ref_sd = {z.max():.3f}, sd ratio {ratio.min():.3f}..{ratio.max():.3f}, "
          f"khat {res.diagnostics['psis_khat']:.2f}, steps {res.diagnostics['num_steps']}")
    assert np.all(z < 0.2)
    close = _sd_exceptions(name, ratio)
    assert np.all(np.abs(ratio[close] - 1) < 0.2)
    assert np.isfinite(res.diagnostics["psis_khat"])


def _sd_exceptions(name, ratio):
    """Coordinates whose sd a Gaussian KL(q || p) fit cannot match: eight schools' log tau is
    skewed, and the reverse-KL optimum puts about 0.6 of the reference sd on it (the same with
    every estimator and with 30000-step runs at a fifth of the step size).  Assert that band
    instead, and return the mask of the other coordinates."""
    close = np.ones(len(ratio), bool)
    if name.startswith("eight_schools"):
        assert 0.45 < ratio[-1] < 0.75
        close[-1] = False
    return close


@pytest.mark.slow
@pytest.mark.parametrize("name", POSTERIORS)
def test_meanfield_matches_the_predicted_sds(name):
    model = get_model(name)
    res = vg.fit(model.log_joint, np.asarray(model.ref_mean), family="meanfield", rng=8)
    ratio = res.q.scale / np.asarray(model.mf_sd_pred)
    print(f"{name}: MF sd / mf_gauss_sd_pred = {ratio.min():.3f}..{ratio.max():.3f}")
    close = _sd_exceptions(name, ratio)  # mf_gauss_sd_pred assumes a Gaussian posterior too
    assert np.all(np.abs(ratio[close] - 1) < 0.1)
    assert np.all(np.abs(res.q.mean - model.ref_mean) / model.ref_sd < 0.2)
    assert np.isfinite(res.diagnostics["psis_khat"])


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
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vg.fit(good, np.zeros(3), rng=0, **kwargs)


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
        vg.fit(bad, np.zeros(2), rng=0, map_init=False, num_samples=16, num_steps=5000, tol_rel_obj=0.0)
    err = info.value
    assert err.step >= 0 and isinstance(err.result.q, vg.MeanFieldGaussian)
    assert np.isfinite(err.result.q.loc).all() and err.result.diagnostics["converged"] is False


def test_divergence_stops_with_the_last_finite_state():
    def steep(z):  # a log density whose gradient explodes away from 0
        return -np.sum(np.exp(3 * z), axis=1), -3 * np.exp(3 * z)

    with pytest.raises(vg.FitError) as info:
        vg.fit(steep, np.zeros(2), rng=0, map_init=False, lr=50.0, num_steps=2000)
    assert np.isfinite(info.value.result.q.loc).all()


def test_same_seed_same_bits_any_workers():
    log_joint, m, V, _ = conjugate_regression()
    a = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", rng=9, workers=1)
    b = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", rng=9, workers=2)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.q.scale_tril, b.q.scale_tril)
    c = vg.fit(log_joint, np.zeros(len(m)), family="fullrank", rng=10)
    assert not np.array_equal(a.losses, c.losses)


def test_diagnostics_and_progress(capsys):
    res = vg.fit(good, np.zeros(3), family="lowrank", rank=1, rng=0, progress=True)
    d = res.diagnostics
    assert set(d) >= {"converged", "grad_snr", "psis_khat", "elbo_trace", "num_steps"}
    assert set(d["grad_snr"]) == {"loc", "diag", "cov_factor"}
    assert len(d["elbo_trace"]) == d["num_steps"] // 100 and len(res.losses) == d["num_steps"]
    assert "vg.fit: step" in capsys.readouterr().err


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
    assert res.diagnostics["map"]["laplace_cov"] is None
    assert abs(res.q.mean[0]) < 2.5 and 0.3 < res.q.scale[0] < 2.5


def test_a_z_the_log_joint_keeps_is_never_overwritten():
    """vg.fit reuses its (S, d) work arrays between steps, but not one the log joint still holds."""
    kept = []

    def log_joint(z):
        kept.append((z, z.copy()))
        return -0.5 * np.sum(z * z, axis=1), -z

    vg.fit(log_joint, np.zeros(3), rng=0, num_steps=40, map_init=False, psis_samples=0, eval_every=20)
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
        a = vg.fit(lj, np.zeros(4), rng=3, num_steps=60, map_init=map_init, psis_samples=0, eval_every=20)
        b = vg.fit(lj_keeping, np.zeros(4), rng=3, num_steps=60, map_init=map_init, psis_samples=0, eval_every=20)
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
