"""Vectorised NumPy log densities, with exact gradients, for the posteriordb reference posteriors.

The data, the reference moments and the model descriptions come from posteriordb
(https://github.com/stan-dev/posteriordb; BSD-3-Clause, Copyright (c) 2011-2024, Stan Developers
and their Assignees), via ``tests/data/posteriordb_refs.json`` (see that file's ``source``,
``license`` and ``notes`` fields, and ``tests/data/README.md``). Each log density below is a
hand translation of the posteriordb Stan program (as summarised in the entry's
``logdensity_notes``) to the entry's unconstrained parameterisation (``unconstrained.names`` /
``unconstrained.transform``), *including* the log-Jacobian of the constraining transform, and
up to an additive constant. ``test_posteriordb_models.py`` checks the gradients against finite
differences and the densities against the reference moments by importance sampling.

Usage::

    from posteriordb_models import REFS, MODEL_NAMES, get_model
    m = get_model("kidiq-kidscore_momiq")
    lp, grad = m.log_joint(z)          # z (S, m.dim) float64 -> (S,), (S, m.dim)
    m.ref_mean, m.ref_sd, m.ref_cov    # unconstrained reference moments
    m.mf_sd_pred                       # sd of the optimal mean-field Gaussian if p were Gaussian

Everything is vectorised over the batch S (the ARMA/GARCH recursions and the GP's Cholesky
tangents loop over time steps / matrix columns, never over samples). Only NumPy is needed.

Conventions: constants are dropped, so for sigma = exp(u)
HalfCauchy(sigma | 0, s)  ->  -log1p((sigma/s)^2),  HalfNormal(sigma | 0, s) -> -sigma^2/(2 s^2),
Normal(x | m, s) -> -(x-m)^2/(2 s^2) - log s  (the -log s only where s is a parameter),
and the log-Jacobian of sigma = exp(u) is +u.

All ten posteriors in the data file are implemented; every ``logdensity_notes`` was compared
with the Stan program in posteriordb (posterior_database/models/stan/<model>.stan) and agrees.
``m.constrain(z)`` maps to posteriordb's own parameters (``m.param_names``, e.g. theta and f, not
theta_trans and f_tilde), whose reference moments are ``m.ref_mean_constrained`` etc.
"""

import json
import os
from functools import lru_cache

import numpy as np

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "posteriordb_refs.json")

# log_joint evaluates a big batch in blocks of rows so that temporaries stay around this many
# float64 elements (a block is still a vectorised batch, not a per-sample loop).
_BLOCK_ELEMS = 1 << 21


@lru_cache(maxsize=None)
def _load_json():
    with open(_DATA) as fh:
        return json.load(fh)


def load_refs():
    """dict name -> entry of tests/data/posteriordb_refs.json (the shared, cached parse)."""
    return {e["name"]: e for e in _load_json()["posteriors"]}


REFS = load_refs()


# ----------------------------------------------------------------------------- small helpers

def _log_sigmoid(x):
    """log(1 / (1 + exp(-x))), stable for large |x|."""
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return np.exp(_log_sigmoid(x))


def _half_cauchy_log_scale(u, s):
    """HalfCauchy(sigma | 0, s) + log-Jacobian for sigma = exp(u): value and d/du.

    -log1p((e^u/s)^2) + u; written with logaddexp / sigmoid so that it cannot overflow."""
    x = 2.0 * (u - np.log(s))
    return -np.logaddexp(0.0, x) + u, -2.0 * _sigmoid(x) + 1.0


def _half_normal_log_scale(u, s):
    """HalfNormal(sigma | 0, s) + log-Jacobian for sigma = exp(u): value and d/du."""
    t = np.exp(2.0 * u) / (s * s)
    return -0.5 * t + u, -t + 1.0


# ----------------------------------------------------------------------------- model families

def _linear_regression(X, y, beta_prior_sd=None, sigma_prior=None):
    """y ~ N(X beta, sigma), z = (beta, log sigma).

    beta_prior_sd: None (flat) or the sd of an independent N(0, sd) prior on every beta.
    sigma_prior: None (flat in sigma), ("halfcauchy", s) or ("halfnormal", s).
    The log-Jacobian +log sigma is always added."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    N, p = X.shape

    def log_joint(z):
        beta, u = z[:, :p], z[:, p]
        inv_var = np.exp(-2.0 * u)
        r = y[None, :] - beta @ X.T                       # (S, N)
        ss = np.einsum("sn,sn->s", r, r)
        lp = -N * u - 0.5 * ss * inv_var
        g = np.empty_like(z)
        g[:, :p] = (r @ X) * inv_var[:, None]
        g[:, p] = -N + ss * inv_var
        if beta_prior_sd is not None:
            lp = lp - 0.5 * np.einsum("sp,sp->s", beta, beta) / beta_prior_sd ** 2
            g[:, :p] -= beta / beta_prior_sd ** 2
        if sigma_prior is None:                           # flat in sigma: Jacobian only
            v, dv = u, np.ones_like(u)
        elif sigma_prior[0] == "halfcauchy":
            v, dv = _half_cauchy_log_scale(u, sigma_prior[1])
        elif sigma_prior[0] == "halfnormal":
            v, dv = _half_normal_log_scale(u, sigma_prior[1])
        else:
            raise ValueError(sigma_prior)
        g[:, p] += dv
        return lp + v, g

    def constrain(z):                                     # (beta, sigma)
        return np.column_stack([z[:, :p], np.exp(z[:, p])])

    return log_joint, 4 * N, constrain


def _kidscore_momiq(d):
    X = np.column_stack([np.ones(d["N"]), d["mom_iq"]])
    return _linear_regression(X, d["kid_score"], None, ("halfcauchy", 2.5))


def _kidscore_interaction(d):
    hs, iq = np.asarray(d["mom_hs"], float), np.asarray(d["mom_iq"], float)
    X = np.column_stack([np.ones(d["N"]), hs, iq, hs * iq])
    return _linear_regression(X, d["kid_score"], None, ("halfcauchy", 2.5))


def _logmesquite(d):
    lg = {k: np.log(np.asarray(d[k], float))
          for k in ("weight", "diam1", "diam2", "canopy_height", "total_height", "density")}
    X = np.column_stack([np.ones(d["N"]), lg["diam1"], lg["diam2"], lg["canopy_height"],
                         lg["total_height"], lg["density"], np.asarray(d["group"], float)])
    return _linear_regression(X, lg["weight"], None, None)


def _blr(d):
    X = np.asarray(d["X"], float).reshape(d["N"], d["D"])
    return _linear_regression(X, d["y"], 10.0, ("halfnormal", 10.0))


def _arK(d):
    K, T, y = d["K"], d["T"], np.asarray(d["y"], float)
    t = np.arange(K, T)                                   # 0-based t = K..T-1 (Stan's K+1..T)
    X = np.column_stack([np.ones(T - K)] + [y[t - k] for k in range(1, K + 1)])
    return _linear_regression(X, y[t], 10.0, ("halfcauchy", 2.5))


def _eight_schools_noncentered(d):
    y = np.asarray(d["y"], float)
    s2 = np.asarray(d["sigma"], float) ** 2
    J = d["J"]

    def log_joint(z):
        tt, mu, u = z[:, :J], z[:, J], z[:, J + 1]
        tau = np.exp(u)
        theta = mu[:, None] + tau[:, None] * tt
        r = (y - theta) / s2                              # d/dtheta of sum N(y | theta, sigma)
        hc, dhc = _half_cauchy_log_scale(u, 5.0)
        lp = (-0.5 * np.einsum("sj,sj->s", tt, tt) - 0.5 * np.einsum("sj,sj->s", r, y - theta)
              - mu ** 2 / 50.0 + hc)
        g = np.empty_like(z)
        g[:, :J] = -tt + tau[:, None] * r
        g[:, J] = r.sum(axis=1) - mu / 25.0
        g[:, J + 1] = tau * np.einsum("sj,sj->s", r, tt) + dhc
        return lp, g

    def constrain(z):                                     # (theta[1..J], mu, tau)
        tau = np.exp(z[:, J + 1])
        return np.column_stack([z[:, J:J + 1] + tau[:, None] * z[:, :J], z[:, J], tau])

    return log_joint, 8 * J, constrain


def _low_dim_gauss_mix(d):
    y = np.asarray(d["y"], float)

    def log_joint(z):
        a, b, s1, s2, t = (z[:, i] for i in range(5))
        gap = np.exp(b)
        mu1, mu2 = a, a + gap
        iv1, iv2 = np.exp(-2.0 * s1), np.exp(-2.0 * s2)
        lt, l1t = _log_sigmoid(t), _log_sigmoid(-t)       # log theta, log(1 - theta)
        theta = np.exp(lt)
        e1 = y[None, :] - mu1[:, None]                    # (S, N)
        e2 = y[None, :] - mu2[:, None]
        c1 = (lt - s1)[:, None] - 0.5 * e1 * e1 * iv1[:, None]
        c2 = (l1t - s2)[:, None] - 0.5 * e2 * e2 * iv2[:, None]
        lse = np.logaddexp(c1, c2)
        w1 = np.exp(c1 - lse)                             # responsibilities
        w2 = 1.0 - w1
        lp = lse.sum(axis=1)
        g_mu1 = np.einsum("sn,sn->s", w1, e1) * iv1
        g_mu2 = np.einsum("sn,sn->s", w2, e2) * iv2
        g_s1 = -w1.sum(axis=1) + np.einsum("sn,sn->s", w1, e1 * e1) * iv1
        g_s2 = -w2.sum(axis=1) + np.einsum("sn,sn->s", w2, e2 * e2) * iv2
        g_t = w1.sum(axis=1) - y.size * theta
        # priors mu ~ N(0, 2), sigma ~ HalfNormal(0, 2), theta ~ Beta(5, 5), and the
        # log-Jacobian b + s1 + s2 + log theta + log(1 - theta)
        lp = lp - (mu1 ** 2 + mu2 ** 2) / 8.0
        g_mu1, g_mu2 = g_mu1 - mu1 / 4.0, g_mu2 - mu2 / 4.0
        hn1, dhn1 = _half_normal_log_scale(s1, 2.0)
        hn2, dhn2 = _half_normal_log_scale(s2, 2.0)
        lp = lp + hn1 + hn2 + 5.0 * (lt + l1t) + b
        g = np.empty_like(z)
        g[:, 0] = g_mu1 + g_mu2
        g[:, 1] = g_mu2 * gap + 1.0
        g[:, 2] = g_s1 + dhn1
        g[:, 3] = g_s2 + dhn2
        g[:, 4] = g_t + 5.0 - 10.0 * theta
        return lp, g

    def constrain(z):                             # (mu[1], mu[2], sigma[1], sigma[2], theta)
        return np.column_stack([z[:, 0], z[:, 0] + np.exp(z[:, 1]), np.exp(z[:, 2]),
                                np.exp(z[:, 3]), _sigmoid(z[:, 4])])

    return log_joint, 12 * len(y), constrain


def _arma11(d):
    y = np.asarray(d["y"], float)
    T = d["T"]

    def log_joint(z):
        mu, phi, th, u = z[:, 0], z[:, 1], z[:, 2], z[:, 3]
        # err_1 = y_1 - (mu + phi mu); err_t = y_t - (mu + phi y_{t-1} + theta err_{t-1}),
        # with forward-mode tangents d err_t / d(mu, phi, theta)
        err = y[0] - mu * (1.0 + phi)
        dm, dp, dt = -(1.0 + phi), -mu, np.zeros_like(mu)
        ss = err * err
        gm, gp, gt = err * dm, err * dp, np.zeros_like(mu)
        for i in range(1, T):
            dm, dp, dt = -1.0 - th * dm, -y[i - 1] - th * dp, -err - th * dt
            err = y[i] - mu - phi * y[i - 1] - th * err
            ss += err * err
            gm += err * dm
            gp += err * dp
            gt += err * dt
        iv = np.exp(-2.0 * u)
        hc, dhc = _half_cauchy_log_scale(u, 2.5)
        lp = -T * u - 0.5 * ss * iv - mu ** 2 / 200.0 - (phi ** 2 + th ** 2) / 8.0 + hc
        g = np.empty_like(z)
        g[:, 0] = -gm * iv - mu / 100.0
        g[:, 1] = -gp * iv - phi / 4.0
        g[:, 2] = -gt * iv - th / 4.0
        g[:, 3] = -T + ss * iv + dhc
        return lp, g

    def constrain(z):                                     # (mu, phi, theta, sigma)
        return np.column_stack([z[:, :3], np.exp(z[:, 3])])

    return log_joint, 32, constrain


def _garch11(d):
    y = np.asarray(d["y"], float)
    T = d["T"]
    s1sq = float(d["sigma1"]) ** 2

    def log_joint(z):
        mu, u, v, w = z[:, 0], z[:, 1], z[:, 2], z[:, 3]
        a0 = np.exp(u)
        la1, l1a1 = _log_sigmoid(v), _log_sigmoid(-v)     # log alpha1, log(1 - alpha1)
        lsw, l1sw = _log_sigmoid(w), _log_sigmoid(-w)
        a1, sw = np.exp(la1), np.exp(lsw)
        b1 = np.exp(l1a1) * sw
        # sigma^2_t and its tangents wrt (mu, alpha0, alpha1, beta1); sigma^2_1 is data
        zero = np.zeros_like(mu)
        h = np.full_like(mu, s1sq)
        dh_m, dh_a0, dh_a1, dh_b1 = zero, zero, zero, zero
        e = y[0] - mu
        lp = -0.5 * np.log(h) - 0.5 * e * e / h
        G_mu = e / h                                      # direct d/dmu of the N(y_t | mu, .) terms
        G_m = G_a0 = G_a1 = G_b1 = zero                   # accumulated via d/d sigma^2_t
        for t in range(1, T):
            ep = y[t - 1] - mu
            dh_m = -2.0 * a1 * ep + b1 * dh_m
            dh_a0 = 1.0 + b1 * dh_a0
            dh_a1 = ep * ep + b1 * dh_a1
            dh_b1 = h + b1 * dh_b1
            h = a0 + a1 * ep * ep + b1 * h
            e = y[t] - mu
            ih = 1.0 / h
            lp = lp - 0.5 * np.log(h) - 0.5 * e * e * ih
            G_mu = G_mu + e * ih
            gh = 0.5 * ih * (e * e * ih - 1.0)                # d lp / d sigma^2_t
            G_m = G_m + gh * dh_m
            G_a0 = G_a0 + gh * dh_a0
            G_a1 = G_a1 + gh * dh_a1
            G_b1 = G_b1 + gh * dh_b1
        # flat priors; log-Jacobian u + log a1 + 2 log(1 - a1) + log s(w) + log(1 - s(w))
        lp = lp + u + la1 + 2.0 * l1a1 + lsw + l1sw
        da1 = a1 * np.exp(l1a1)                           # d alpha1 / dv
        g = np.empty_like(z)
        g[:, 0] = G_mu + G_m
        g[:, 1] = G_a0 * a0 + 1.0
        g[:, 2] = (G_a1 - G_b1 * sw) * da1 + (1.0 - a1) - 2.0 * a1
        g[:, 3] = G_b1 * b1 * (1.0 - sw) + (1.0 - sw) - sw
        return lp, g

    def constrain(z):                                     # (mu, alpha0, alpha1, beta1)
        a1 = _sigmoid(z[:, 2])
        return np.column_stack([z[:, 0], np.exp(z[:, 1]), a1, (1.0 - a1) * _sigmoid(z[:, 3])])

    return log_joint, 32, constrain


def _cholesky_with_tangents(K, dKs):
    """Batched Cholesky factor L of K (S, N, N) and its forward-mode derivatives along each
    symmetric direction in dKs, by the column-by-column recurrence (a loop over the N columns,
    vectorised over S). Returns L, [dL...], bad where bad[s] flags a non-positive pivot, i.e.
    a K[s] that is not numerically positive definite (Stan's cholesky_decompose rejects it)."""
    S, N, _ = K.shape
    L = np.zeros_like(K)
    dLs = [np.zeros_like(K) for _ in dKs]
    bad = np.zeros(S, dtype=bool)
    for j in range(N):
        Lj = L[:, j, :j]                                  # (S, j)
        piv = K[:, j, j] - np.einsum("sk,sk->s", Lj, Lj)
        ok = piv > 0.0
        bad |= ~ok
        Ljj = np.sqrt(np.where(ok, piv, 1.0))
        L[:, j, j] = Ljj
        if j + 1 < N:
            L[:, j + 1:, j] = (K[:, j + 1:, j]
                               - np.einsum("sik,sk->si", L[:, j + 1:, :j], Lj)) / Ljj[:, None]
        for dK, dL in zip(dKs, dLs):
            dLj = dL[:, j, :j]
            dLjj = (dK[:, j, j] - 2.0 * np.einsum("sk,sk->s", Lj, dLj)) / (2.0 * Ljj)
            dL[:, j, j] = dLjj
            if j + 1 < N:
                dL[:, j + 1:, j] = (dK[:, j + 1:, j]
                                    - np.einsum("sik,sk->si", dL[:, j + 1:, :j], Lj)
                                    - np.einsum("sik,sk->si", L[:, j + 1:, :j], dLj)
                                    - L[:, j + 1:, j] * dLjj[:, None]) / Ljj[:, None]
    return L, dLs, bad


def _gp_pois_regr(d):
    x = np.asarray(d["x"], float)
    k = np.asarray(d["k"], float)
    N = d["N"]
    D2 = (x[:, None] - x[None, :]) ** 2
    jitter = 1e-10 * np.eye(N)

    def cov(lr, la):                                      # gp_exp_quad_cov(x, alpha, rho)
        E = np.exp(-0.5 * D2[None] / np.exp(2.0 * lr)[:, None, None])
        return np.exp(2.0 * la)[:, None, None] * E

    def log_joint(z):
        lr, la, ft = z[:, 0], z[:, 1], z[:, 2:]
        rho, alpha = np.exp(lr), np.exp(la)
        aE = cov(lr, la)
        # d K / d log_rho and d K / d log_alpha (the jitter is constant)
        L, (dL_r, dL_a), bad = _cholesky_with_tangents(
            aE + jitter, [aE * D2[None] / (rho ** 2)[:, None, None], 2.0 * aE])
        f = np.einsum("sij,sj->si", L, ft)
        ef = np.exp(f)
        gf = k - ef                                        # d/df of sum Poisson(k | exp f)
        # Gamma(rho | 25, 4) + log rho = 25 log rho - 4 rho; HalfNormal(alpha | 0, 2) + log alpha
        lp = (np.einsum("si,i->s", f, k) - ef.sum(axis=1) - 0.5 * np.einsum("si,si->s", ft, ft)
              + 25.0 * lr - 4.0 * rho - alpha ** 2 / 8.0 + la)
        g = np.empty_like(z)
        g[:, 0] = np.einsum("si,sij,sj->s", gf, dL_r, ft) + 25.0 - 4.0 * rho
        g[:, 1] = np.einsum("si,sij,sj->s", gf, dL_a, ft) - alpha ** 2 / 4.0 + 1.0
        g[:, 2:] = np.einsum("sij,si->sj", L, gf) - ft
        if bad.any():                                      # outside the support, as in Stan
            lp[bad] = -np.inf
            g[bad] = np.nan
        return lp, g

    def constrain(z):                                     # (rho, alpha, f[1..N])
        L, _, bad = _cholesky_with_tangents(cov(z[:, 0], z[:, 1]) + jitter, [])
        f = np.einsum("sij,sj->si", L, z[:, 2:])
        f[bad] = np.nan
        return np.column_stack([np.exp(z[:, 0]), np.exp(z[:, 1]), f])

    return log_joint, 8 * N * N, constrain


_BUILDERS = {
    "kidiq-kidscore_momiq": _kidscore_momiq,
    "kidiq-kidscore_interaction": _kidscore_interaction,
    "mesquite-logmesquite": _logmesquite,
    "sblrc-blr": _blr,
    "arK-arK": _arK,
    "eight_schools-eight_schools_noncentered": _eight_schools_noncentered,
    "low_dim_gauss_mix-low_dim_gauss_mix": _low_dim_gauss_mix,
    "arma-arma11": _arma11,
    "garch-garch11": _garch11,
    "gp_pois_regr-gp_pois_regr": _gp_pois_regr,
}

# implemented models, in the data file's order
MODEL_NAMES = [n for n in REFS if n in _BUILDERS]
# the four used by the black-box VI tests
REQUIRED = ["kidiq-kidscore_momiq", "eight_schools-eight_schools_noncentered", "sblrc-blr",
            "arK-arK"]


class PosteriorModel:
    """One posteriordb posterior in its unconstrained parameterisation.

    log_joint(z): z (S, dim) -> (values (S,), grads (S, dim)); a 1-D z of shape (dim,) gives
    (scalar, (dim,)). Values are the log density up to a constant, including the log-Jacobian.
    Points outside the model's support (only possible for gp_pois_regr, where K(rho, alpha) +
    1e-10 I can fail to be numerically positive definite for extreme rho, alpha, as Stan's
    cholesky_decompose would reject) get value -inf and NaN gradients.

    Attributes: name, names (unconstrained, in order), dim, ref_mean, ref_sd, ref_corr, ref_cov
    (unconstrained reference moments), mf_sd_pred, param_names and ref_mean_constrained /
    ref_sd_constrained / ref_mcse_mean_constrained (posteriordb's parameters, see constrain),
    entry (the raw JSON entry)."""

    def __init__(self, name):
        if name not in _BUILDERS:
            raise KeyError(f"unknown or unimplemented posterior {name!r}; have {MODEL_NAMES}")
        entry = REFS[name]
        unc = entry["unconstrained"]
        self.name = name
        self.entry = entry
        self.names = list(unc["names"])
        self.dim = len(self.names)
        self.ref_mean = np.asarray(unc["mean"], dtype=np.float64)
        self.ref_sd = np.asarray(unc["sd"], dtype=np.float64)
        self.ref_corr = np.asarray(unc["corr"], dtype=np.float64)
        self.ref_cov = self.ref_corr * np.outer(self.ref_sd, self.ref_sd)
        self.mf_sd_pred = (np.asarray(unc["mf_gauss_sd_pred"], dtype=np.float64)
                           if "mf_gauss_sd_pred" in unc else None)
        self.param_names = list(entry["param_names"])
        self.ref_mean_constrained = np.asarray(entry["ref_mean"], dtype=np.float64)
        self.ref_sd_constrained = np.asarray(entry["ref_sd"], dtype=np.float64)
        self.ref_mcse_mean_constrained = np.asarray(entry["ref_mcse_mean"], dtype=np.float64)
        self._fn, work, self._constrain = _BUILDERS[name](entry["data"])
        self._block = max(1, _BLOCK_ELEMS // max(1, work))

    def _batch(self, z):
        z = np.asarray(z, dtype=np.float64)
        single = z.ndim == 1
        z2 = z[None, :] if single else z
        if z2.ndim != 2 or z2.shape[1] != self.dim:
            raise ValueError(f"{self.name}: expected z of shape (S, {self.dim}), got {z.shape}")
        return z2, single

    def constrain(self, z):
        """Map unconstrained z (S, dim) to the reference draws' parameters (S, len(param_names)),
        in the order of ``param_names`` (includes transformed parameters such as theta, f)."""
        z2, single = self._batch(z)
        out = self._constrain(z2)
        return out[0] if single else out

    def log_joint(self, z):
        z2, single = self._batch(z)
        S = z2.shape[0]
        if S <= self._block:
            lp, g = self._fn(z2)
        else:
            parts = [self._fn(z2[i:i + self._block]) for i in range(0, S, self._block)]
            lp = np.concatenate([p[0] for p in parts])
            g = np.concatenate([p[1] for p in parts])
        return (lp[0], g[0]) if single else (lp, g)

    __call__ = log_joint

    def __repr__(self):
        return f"PosteriorModel({self.name!r}, dim={self.dim})"


def get_model(name):
    return PosteriorModel(name)
