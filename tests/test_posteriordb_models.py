"""Tests of the NumPy translations of the posteriordb reference posteriors (posteriordb_models.py).

posteriordb: https://github.com/stan-dev/posteriordb, BSD-3-Clause, Copyright (c) 2011-2024,
Stan Developers and their Assignees (data and reference moments: tests/data/posteriordb_refs.json).

Independent oracles, for every implemented posterior:

1. gradients against 4th-order central finite differences of the values (and, for the GP, whose
   values carry Cholesky rounding noise, against complex-step derivatives of a separate
   row-by-row implementation written directly from the Stan program);
2. the density against the reference posterior, by self-normalised importance sampling (IS):
   a multivariate Student-t(7) proposal centred at the unconstrained reference mean with
   covariance 1.3 * ref_cov (the data file's numpy_translation_check), 40000 draws, seed 0.
   The IS mean of every coordinate must lie within 4 standard errors of the reference mean and
   the IS sd within 10% of the reference sd, both in the unconstrained space and for posteriordb's
   own (constrained) parameters. Standard errors:
     SE_IS  = max(delta-method SE sqrt(sum_i w_i^2 (x_i - mean)^2), sd / sqrt(ESS)),
              ESS = 1 / sum_i w_i^2 (Kish) with normalised weights w;
     SE_ref = constrained: posteriordb's stored ref_mcse_mean;
              unconstrained: unc_sd / sqrt(min ref_ess_bulk) -- the reference's Monte Carlo
              error moved to the unconstrained scale (bulk-ESS is rank based, so it is unchanged
              by the monotone log / logit maps; for the non-monotone maps (theta_trans, f_tilde,
              the ordered gap) the minimum over parameters is a proxy). This is the "small floor".
     z = (IS mean - ref mean) / sqrt(SE_IS^2 + SE_ref^2).
   The t proposal is poor for gp_pois_regr (ESS ~ 600 of 40000: f_tilde's conditional posterior
   moves with the kernel hyper-parameters), so there the proposal is t(7) on (log rho, log alpha)
   times a t(10) conditional-Laplace proposal for f_tilde given them (10000 draws); the IS
   estimator is consistent whatever the proposal, so this changes efficiency, not the oracle.
   Negative controls show the check catches small translation errors (a wrong half-Cauchy scale,
   a wrong log-Jacobian exponent).
3. vectorisation: a batch equals row-by-row evaluation, also when evaluated in blocks.

``python test_posteriordb_models.py`` prints the IS table.
"""

import numpy as np
import pytest

from posteriordb_models import MODEL_NAMES, REFS, REQUIRED, get_model, load_refs

GP = "gp_pois_regr-gp_pois_regr"


def _near_mean(model, n, seed, scale=0.5):
    """n points ref_mean + scale * N(0, ref_cov) (in the bulk of the posterior)."""
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(model.ref_cov)
    return model.ref_mean + scale * rng.standard_normal((n, model.dim)) @ L.T


# ----------------------------------------------------------------------------- registry

def test_every_entry_is_implemented():
    assert set(REQUIRED) <= set(MODEL_NAMES)
    assert MODEL_NAMES == list(REFS) == list(load_refs())
    with pytest.raises(KeyError):
        get_model("no-such-posterior")


def test_load_refs_does_not_depend_on_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sorted(load_refs()) == sorted(REFS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metadata(name):
    m = get_model(name)
    unc = REFS[name]["unconstrained"]
    assert m.name == name
    assert m.names == unc["names"]
    assert m.dim == len(m.names) == REFS[name]["dimension_unconstrained"]
    assert m.ref_mean.shape == m.ref_sd.shape == (m.dim,)
    assert m.ref_cov.shape == (m.dim, m.dim)
    np.testing.assert_array_equal(m.ref_cov, m.ref_cov.T)
    np.testing.assert_allclose(np.diag(m.ref_cov), m.ref_sd ** 2, rtol=1e-12)
    np.linalg.cholesky(m.ref_cov)                         # positive definite
    # the file's mean-field anchor is 1/sqrt(diag(Cov^-1)) of this covariance
    np.testing.assert_allclose(1.0 / np.sqrt(np.diag(np.linalg.inv(m.ref_cov))), m.mf_sd_pred,
                               rtol=2e-3)
    assert m.constrain(m.ref_mean).shape == (len(m.param_names),)
    assert m.param_names == REFS[name]["param_names"]


def test_bad_shapes_raise():
    m = get_model("kidiq-kidscore_momiq")
    for bad in (np.zeros((2, 4)), np.zeros(2), np.zeros((1, 2, 3))):
        with pytest.raises(ValueError):
            m.log_joint(bad)


# ----------------------------------------------------------------------------- 1. gradients

def _central_fd(model, z, rel_step):
    """4th-order central differences (-f(+2h) + 8f(+h) - 8f(-h) + f(-2h)) / 12h, per coordinate,
    with h = rel_step * ref_sd; all 4 * n * dim evaluations in one batch."""
    n, d = z.shape
    h = rel_step * model.ref_sd
    offs = np.array([2.0, 1.0, -1.0, -2.0])
    pts = z[:, None, None, :] + offs[None, :, None, None] * (np.eye(d) * h)[None, None]
    v, _ = model.log_joint(pts.reshape(-1, d))
    v = v.reshape(n, 4, d)
    return (-v[:, 0] + 8.0 * v[:, 1] - 8.0 * v[:, 2] + v[:, 3]) / (12.0 * h)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_matches_finite_differences(name):
    m = get_model(name)
    z = _near_mean(m, 5, seed=1)
    lp, g = m.log_joint(z)
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(g))
    fd = _central_fd(m, z, 1e-3)
    # error relative to |g| + 1/sd (the gradient's natural scale: near the mode g ~ 0)
    err = np.abs(g - fd) / (np.abs(g) + 1.0 / m.ref_sd)
    # the GP's K(rho, alpha) is near singular (cond ~ 1e8-1e9), so its values carry ~1e-10
    # Cholesky rounding noise that the differences amplify; test_gp_gradient_complex_step
    # checks its gradient to 1e-6 without that noise
    tol = 1e-4 if name == GP else 1e-6
    assert err.max() < tol, (name, err.max(axis=0))


def _gp_reference_log_density(z, x, k):
    """The gp_pois_regr Stan program, one point, in plain (complex-step friendly) arithmetic:
    textbook Cholesky, no conjugation. Constants as in posteriordb_models (dropped)."""
    N = len(x)
    rho, alpha, f_tilde = np.exp(z[0]), np.exp(z[1]), z[2:]
    K = np.empty((N, N), dtype=z.dtype)
    for i in range(N):
        for j in range(N):
            K[i, j] = alpha ** 2 * np.exp(-((x[i] - x[j]) ** 2) / (2.0 * rho ** 2))
        K[i, i] += 1e-10
    L = np.zeros_like(K)
    for j in range(N):
        L[j, j] = np.sqrt(K[j, j] - np.sum(L[j, :j] * L[j, :j]))
        for i in range(j + 1, N):
            L[i, j] = (K[i, j] - np.sum(L[i, :j] * L[j, :j])) / L[j, j]
    f = L @ f_tilde
    return (np.sum(k * f - np.exp(f))                      # k ~ poisson_log(f)
            + 24.0 * np.log(rho) - 4.0 * rho               # rho ~ gamma(25, 4)
            - alpha ** 2 / 8.0                             # alpha ~ normal(0, 2), alpha > 0
            - 0.5 * np.sum(f_tilde * f_tilde)              # f_tilde ~ normal(0, 1)
            + z[0] + z[1])                                 # log-Jacobians of rho, alpha


def test_gp_gradient_complex_step():
    m = get_model(GP)
    x = np.asarray(m.entry["data"]["x"], float)
    k = np.asarray(m.entry["data"]["k"], float)
    z = _near_mean(m, 4, seed=2, scale=1.0)
    lp, g = m.log_joint(z)
    hc = 1e-30
    ref_lp = np.array([_gp_reference_log_density(zi, x, k) for zi in z])
    cs = np.array([[_gp_reference_log_density(zi + 1j * hc * e, x, k).imag / hc
                    for e in np.eye(m.dim)] for zi in z])
    # same values up to one additive constant (here 0) ...
    np.testing.assert_allclose(lp - ref_lp, 0.0, atol=1e-6)
    # ... and the same gradient
    err = np.abs(g - cs) / (np.abs(cs) + 1.0 / m.ref_sd)
    assert err.max() < 1e-6, err.max(axis=0)


# ----------------------------------------------------------------------------- 2. the density

def _mvt(rng, n, d, df):
    """n standard multivariate-t(df) vectors and their log densities up to a constant."""
    u = rng.standard_normal((n, d)) * np.sqrt(df / rng.chisquare(df, n))[:, None]
    return u, -0.5 * (df + d) * np.log1p(np.einsum("nd,nd->n", u, u) / df)


def _t_proposal(model, n, rng, df=7.0, scale=1.3):
    L = np.linalg.cholesky(scale * model.ref_cov)
    u, log_q = _mvt(rng, n, model.dim, df)
    return model.ref_mean + u @ L.T, log_q                 # |det L| is the same for all draws


def _gp_proposal(model, n, rng, newton_steps=12, df=10.0, inflate=1.2):
    """t(7) on h = (log rho, log alpha) (1.3 x their reference covariance), times a t(10)
    around the mode of p(f_tilde | h, k) with scale matrix (inflate * Hessian^-1) there."""
    d = model.entry["data"]
    x, k, N = np.asarray(d["x"], float), np.asarray(d["k"], float), d["N"]
    Lh = np.linalg.cholesky(1.3 * model.ref_cov[:2, :2])
    u, log_q = _mvt(rng, n, 2, 7.0)
    h = model.ref_mean[:2] + u @ Lh.T
    K = (np.exp(2 * h[:, 1])[:, None, None]
         * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / np.exp(2 * h[:, 0])[:, None, None]))
    L = np.linalg.cholesky(K + 1e-10 * np.eye(N))

    def objective(ft):
        f = np.einsum("sij,sj->si", L, ft)
        return f @ k - np.exp(f).sum(axis=1) - 0.5 * np.einsum("si,si->s", ft, ft)

    def newton_parts(ft):
        ef = np.exp(np.einsum("sij,sj->si", L, ft))
        grad = np.einsum("sij,si->sj", L, k - ef) - ft
        hess = np.einsum("sij,si,sik->sjk", L, ef, L) + np.eye(N)
        return grad, hess

    ft = np.zeros((n, N))
    for _ in range(newton_steps):                          # damped Newton, vectorised over draws
        grad, hess = newton_parts(ft)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        o0, t = objective(ft), np.ones(n)
        for _ in range(30):
            worse = ~(objective(ft + t[:, None] * step) >= o0)
            if not worse.any():
                break
            t[worse] *= 0.5
        ft = ft + t[:, None] * step
    _, hess = newton_parts(ft)
    C = np.linalg.cholesky(hess / inflate)                 # q(f_tilde | h) precision C C^T
    v, log_q2 = _mvt(rng, n, N, df)
    ft = ft + np.linalg.solve(np.swapaxes(C, 1, 2), v[..., None])[..., 0]
    log_q = log_q + log_q2 + np.log(np.diagonal(C, axis1=1, axis2=2)).sum(axis=1)
    return np.column_stack([h, ft]), log_q


def _weighted_check(x, w, ess, ref_mean, ref_sd, se_ref):
    mean = w @ x
    dx = x - mean
    sd = np.sqrt(w @ (dx * dx))
    se_is = np.maximum(np.sqrt((w * w) @ (dx * dx)), sd / np.sqrt(ess))
    return (mean - ref_mean) / np.sqrt(se_is ** 2 + se_ref ** 2), sd / ref_sd


def importance_check(model, log_joint=None, n=None, seed=0):
    """Self-normalised IS of the model's density; returns a dict with ess, n, the z-scores and
    sd ratios of the unconstrained coordinates and of posteriordb's parameters."""
    log_joint = log_joint or model.log_joint
    rng = np.random.default_rng(seed)
    if model.name == GP:
        n = n or 10_000
        x, log_q = _gp_proposal(model, n, rng)
    else:
        n = n or 40_000
        x, log_q = _t_proposal(model, n, rng)
    lp, _ = log_joint(x)
    lw = lp - log_q
    w = np.exp(lw - lw.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w * w)
    se_ref_unc = model.ref_sd / np.sqrt(min(model.entry["ref_ess_bulk"]))
    z_unc, r_unc = _weighted_check(x, w, ess, model.ref_mean, model.ref_sd, se_ref_unc)
    z_con, r_con = _weighted_check(model.constrain(x), w, ess, model.ref_mean_constrained,
                                   model.ref_sd_constrained, model.ref_mcse_mean_constrained)
    return dict(n=n, ess=ess, z_unc=z_unc, sd_ratio_unc=r_unc, z_con=z_con, sd_ratio_con=r_con)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_density_reproduces_reference_posterior(name):
    m = get_model(name)
    r = importance_check(m)
    assert r["ess"] > 0.2 * r["n"], r["ess"]              # enough draws for the checks to bite
    for kind in ("unc", "con"):
        z, ratio = r["z_" + kind], r["sd_ratio_" + kind]
        assert np.all(np.abs(z) < 4.0), (kind, np.round(z, 2))
        assert np.all(np.abs(ratio - 1.0) < 0.10), (kind, np.round(ratio, 3))


def test_importance_check_catches_small_translation_errors():
    # eight schools with tau ~ HalfCauchy(0, 1) instead of (0, 5)
    m = get_model("eight_schools-eight_schools_noncentered")

    def wrong_scale(z):
        lp, g = m.log_joint(z)
        u = z[:, -1]
        return lp + np.logaddexp(0.0, 2.0 * (u - np.log(5.0))) - np.logaddexp(0.0, 2.0 * u), g

    assert np.abs(importance_check(m, wrong_scale)["z_unc"]).max() > 4.0
    # garch11 with log-Jacobian log(1 - alpha1) instead of 2 log(1 - alpha1)
    m = get_model("garch-garch11")

    def wrong_jacobian(z):
        lp, g = m.log_joint(z)
        return lp + np.logaddexp(0.0, z[:, 2]), g          # + softplus(v) = - log(1 - alpha1)

    assert np.abs(importance_check(m, wrong_jacobian)["z_unc"]).max() > 4.0


# ----------------------------------------------------------------------------- 3. vectorisation

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batch_equals_row_by_row(name):
    m = get_model(name)
    z = _near_mean(m, 7, seed=3, scale=1.0)
    lp, g = m.log_joint(z)
    assert lp.shape == (7,) and g.shape == (7, m.dim)
    assert lp.dtype == g.dtype == np.float64
    rows = [m.log_joint(z[i:i + 1]) for i in range(7)]
    ones = [m.log_joint(z[i]) for i in range(7)]           # 1-D input -> scalar, (dim,)
    for got in (rows, ones):
        lp_r = np.array([np.squeeze(v) for v, _ in got])
        g_r = np.array([np.reshape(gr, -1) for _, gr in got])
        np.testing.assert_allclose(lp_r, lp, rtol=1e-12, atol=1e-12 * np.abs(lp).max())
        np.testing.assert_allclose(g_r, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())
    assert np.ndim(ones[0][0]) == 0 and ones[0][1].shape == (m.dim,)
    # block-wise evaluation of a large batch gives the same numbers
    m._block = 3
    lp_b, g_b = m.log_joint(z)
    np.testing.assert_allclose(lp_b, lp, rtol=1e-12, atol=1e-12 * np.abs(lp).max())
    np.testing.assert_allclose(g_b, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())
    # constrain is vectorised too
    c = m.constrain(z)
    np.testing.assert_allclose(np.array([m.constrain(zi) for zi in z]), c, rtol=1e-12, atol=1e-14)
    # float32 input is accepted and evaluated in float64
    lp32, _ = m.log_joint(z.astype(np.float32))
    assert lp32.dtype == np.float64


def test_gp_outside_support_is_minus_inf():
    m = get_model(GP)
    z = np.vstack([m.ref_mean, np.r_[3.0, 8.0, np.zeros(11)]])   # rho ~ 20, alpha ~ 3000
    lp, g = m.log_joint(z)
    assert np.isfinite(lp[0]) and np.all(np.isfinite(g[0]))
    assert lp[1] == -np.inf and np.all(np.isnan(g[1]))


if __name__ == "__main__":                                 # the IS table
    import time
    for name in MODEL_NAMES:
        t0 = time.perf_counter()
        r = importance_check(get_model(name))
        print(f"{name:42s} n={r['n']:6d} ess={r['ess']:7.0f} "
              f"max|z| unc {np.abs(r['z_unc']).max():.2f} con {np.abs(r['z_con']).max():.2f}  "
              f"sd ratio unc [{r['sd_ratio_unc'].min():.3f}, {r['sd_ratio_unc'].max():.3f}] "
              f"con [{r['sd_ratio_con'].min():.3f}, {r['sd_ratio_con'].max():.3f}]  "
              f"{time.perf_counter() - t0:.2f}s")
