"""NumPy reference kernels (see the package docstring).  ``workers`` is accepted and ignored."""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "philox4x32_10", "standard_normal", "sample", "softplus", "softplus_inv", "sigmoid",
    "mf_log_prob", "mf_entropy", "normal_log_prob", "normal_grad_log_prob", "mixture_log_prob",
    "mixture_grad_log_prob", "kl_mf_normal", "pathwise_grad_normal", "pathwise_grad_mixture", "score_grad",
    "fullrank_affine", "fullrank_sample", "fullrank_log_prob", "fullrank_pathwise_grad", "lowrank_affine",
    "lowrank_sample", "lowrank_log_prob", "lowrank_entropy", "lowrank_pathwise_grad", "pathwise_grad_flat",
    "bbb_noise", "bbb_grad_normal", "bbb_grad_mixture", "adam_update", "optim_adam", "optim_sgd", "optim_rmsprop",
    "moment_sums",
]

_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


# -- Philox4x32-10 and the normal transform ---------------------------------------------

def _philox(x0, x1, x2, x3, key):
    """Philox4x32-10 on uint32 arrays, 64-bit key split as (low, high)."""
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    x0, x1, x2, x3 = (np.asarray(x, dtype=np.uint32) for x in (x0, x1, x2, x3))
    for _ in range(10):
        p0 = x0.astype(np.uint64) * _M0
        p1 = x2.astype(np.uint64) * _M1
        y0 = (p1 >> np.uint64(32)).astype(np.uint32) ^ x1 ^ np.uint32(k0)
        y1 = (p1 & _MASK32).astype(np.uint32)
        y2 = (p0 >> np.uint64(32)).astype(np.uint32) ^ x3 ^ np.uint32(k1)
        y3 = (p0 & _MASK32).astype(np.uint32)
        x0, x1, x2, x3 = y0, y1, y2, y3
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return x0, x1, x2, x3


def philox4x32_10(counters, key):
    """Philox4x32-10 of each row of counters (n, 4) uint32 under the 64-bit key."""
    c = np.asarray(counters, dtype=np.uint32)
    out = _philox(c[:, 0], c[:, 1], c[:, 2], c[:, 3], int(key))
    return np.stack(out, axis=1)


def _normals(key, S, D, dtype):
    """(S, D) standard normals: draw (s, j) from counter (j // P, 0, s, 0) (low and high words)."""
    P = 2 if dtype == np.float64 else 4
    C = -(-D // P)
    s, c = np.meshgrid(np.arange(S, dtype=np.uint64), np.arange(C, dtype=np.uint64), indexing="ij")
    s, c = s.reshape(-1), c.reshape(-1)
    lo = lambda v: (v & _MASK32).astype(np.uint32)  # noqa: E731
    hi = lambda v: (v >> np.uint64(32)).astype(np.uint32)  # noqa: E731
    x0, x1, x2, x3 = _philox(lo(c), hi(c), lo(s), hi(s), key)
    if P == 2:
        one = np.uint64(0x3FF0000000000000)
        a = (x0.astype(np.uint64) << np.uint64(20)) | (x1.astype(np.uint64) >> np.uint64(12))
        b = (x2.astype(np.uint64) << np.uint64(20)) | (x3.astype(np.uint64) >> np.uint64(12))
        u1 = 2.0 - (a | one).view(np.float64)
        u2 = (b | one).view(np.float64) - 1.0
        r = np.sqrt(-2.0 * np.log(u1))
        t = 6.283185307179586 * u2
        z = np.stack([r * np.cos(t), r * np.cos(t - 1.5707963267948966)], axis=1)
    else:
        f = np.float32
        s31, s32, s24 = f(2.0**-31), f(2.0**-32), f(2.0**-24)
        two_pi, half_pi = f(6.28318530717958648), f(1.57079632679489662)
        u1a = (x0 >> np.uint32(1)).astype(np.int32).astype(f) * s31 + s32
        u2a = (x1 >> np.uint32(8)).astype(np.int32).astype(f) * s24
        u1b = (x2 >> np.uint32(1)).astype(np.int32).astype(f) * s31 + s32
        u2b = (x3 >> np.uint32(8)).astype(np.int32).astype(f) * s24
        ra, rb = np.sqrt(f(-2.0) * np.log(u1a)), np.sqrt(f(-2.0) * np.log(u1b))
        ta, tb = two_pi * u2a, two_pi * u2b
        z = np.stack([ra * np.cos(ta), ra * np.cos(ta - half_pi), rb * np.cos(tb), rb * np.cos(tb - half_pi)], axis=1)
    return z.reshape(S, C * P)[:, :D].astype(dtype)


def standard_normal(key, out, workers):
    """Fill out (S, D) with the normal draws (key, s, j)."""
    out[...] = _normals(int(key), out.shape[0], out.shape[1], out.dtype)


def sample(key, loc, scale, w, eps, workers):
    """w[s, j] = loc[j] + scale[j] * eps[s, j]; eps written when given."""
    z = _normals(int(key), w.shape[0], w.shape[1], w.dtype)
    if eps is not None:
        eps[...] = z
    w[...] = loc + scale * z


# -- elementwise ----------------------------------------------------------------------------

def _f64(x):
    return np.asarray(x, dtype=np.float64)


def softplus(x, workers):
    return np.logaddexp(0.0, _f64(x)).astype(x.dtype)


def softplus_inv(y, workers):
    y64 = _f64(y)
    return (y64 + np.log(-np.expm1(-y64))).astype(y.dtype)


def sigmoid(x, workers):
    x64 = _f64(x)
    return np.exp(-np.logaddexp(0.0, -x64)).astype(x.dtype)


# -- densities ------------------------------------------------------------------------------

def mf_log_prob(loc, scale, w, workers):
    z = (_f64(w) - _f64(loc)) / _f64(scale)
    lp = -_HALF_LOG_2PI - np.log(_f64(scale)) - 0.5 * z * z
    return lp.sum(axis=1).astype(w.dtype)


def mf_entropy(scale, workers):
    return float(np.sum(0.5 + _HALF_LOG_2PI + np.log(_f64(scale))))


def mf_scale_entropy(loc, rho, out_scale, workers):
    with np.errstate(invalid="ignore", over="ignore"):
        out_scale[...] = softplus(rho, workers)
    ok = bool(np.isfinite(loc).all() and np.isfinite(rho).all() and (out_scale > 0).all())
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 where not ok
        return mf_entropy(out_scale, workers), ok


def _normal_lp(w, m, s):
    z = (w - m) / s
    return -_HALF_LOG_2PI - np.log(s) - 0.5 * z * z


def normal_log_prob(w, loc, scale, workers):
    return _normal_lp(_f64(w), _f64(loc), _f64(scale)).sum(axis=1).astype(w.dtype)


def normal_grad_log_prob(w, loc, scale, workers):
    return (-(_f64(w) - _f64(loc)) / _f64(scale) ** 2).astype(w.dtype)


def _mixture_parts(w, pi, s1, s2):
    a = np.log(pi) + _normal_lp(w, 0.0, s1)
    b = np.log1p(-pi) + _normal_lp(w, 0.0, s2)
    lp = np.logaddexp(a, b)
    r1 = np.exp(a - lp)
    r2 = np.exp(b - lp)
    grad = -w * (r1 / s1**2 + r2 / s2**2)
    return lp, grad


def mixture_log_prob(w, pi, sigma1, sigma2, workers):
    lp, _ = _mixture_parts(_f64(w), _f64(pi), _f64(sigma1), _f64(sigma2))
    return lp.sum(axis=1).astype(w.dtype)


def mixture_grad_log_prob(w, pi, sigma1, sigma2, workers):
    _, g = _mixture_parts(_f64(w), _f64(pi), _f64(sigma1), _f64(sigma2))
    return g.astype(w.dtype)


def _kl_terms(loc, sigma, m, s):
    return np.log(s) - np.log(sigma) + (sigma**2 + (loc - m) ** 2) / (2 * s**2) - 0.5


def kl_mf_normal(loc, rho, prior_loc, prior_scale, kl_weight, workers):
    """(KL[q || N(m, s^2)], kl_weight dKL/dloc, kl_weight dKL/drho)."""
    mu, r = _f64(loc), _f64(rho)
    m, s = _f64(prior_loc), _f64(prior_scale)
    sigma = np.logaddexp(0.0, r)
    sg = np.exp(-np.logaddexp(0.0, -r))
    kl = float(np.sum(_kl_terms(mu, sigma, m, s)))
    g_loc = kl_weight * (mu - m) / s**2
    g_rho = kl_weight * (sigma / s**2 - 1.0 / sigma) * sg
    return kl, g_loc.astype(loc.dtype), g_rho.astype(loc.dtype)


# -- gradient estimators --------------------------------------------------------------------

def _pathwise(loc, rho, eps, glik, prior_lp_grad, mode, kl_weight, analytic_prior=None):
    """Proposition 1 written term by term:
    d/dtheta f(t(theta, eps), theta) = df/dw dw/dtheta + df/dtheta,
    f = kw (log q(w) - log p(w)) - log P(D|w), dw/dloc = 1, dw/drho = eps sigmoid(rho).
    """
    mu, r, e, g = _f64(loc), _f64(rho), _f64(eps), _f64(glik)
    sigma = np.logaddexp(0.0, r)
    sg = np.exp(-np.logaddexp(0.0, -r))
    w = mu + sigma * e
    S = e.shape[0]
    if mode == "analytic":
        m, s = analytic_prior
        kl, gkl_loc, gkl_rho = kl_mf_normal(mu, r, m, s, kl_weight, 0)
        df_dw = -g
        g_loc = df_dw.mean(axis=0) + gkl_loc
        g_rho = (df_dw * e * sg).mean(axis=0) + gkl_rho
        return g_loc, g_rho, kl
    lp, gp = prior_lp_grad(w)
    dlogq_dw = -(w - mu) / sigma**2
    df_dw = kl_weight * (dlogq_dw - gp) - g
    g_loc = (df_dw * 1.0).mean(axis=0)
    g_rho = (df_dw * e * sg).mean(axis=0)
    if mode == "mc":
        # direct terms: d log q / dloc = (w - mu) / sigma^2,
        # d log q / drho = (-1 / sigma + (w - mu)^2 / sigma^3) sigmoid(rho)
        g_loc = g_loc + kl_weight * ((w - mu) / sigma**2).mean(axis=0)
        g_rho = g_rho + kl_weight * ((-1.0 / sigma + (w - mu) ** 2 / sigma**3) * sg).mean(axis=0)
    log_q = -_HALF_LOG_2PI - np.log(sigma) - 0.5 * ((w - mu) / sigma) ** 2
    kl = float(np.sum(log_q - lp) / S)
    return g_loc, g_rho, kl


def _finish(loc, g_loc, g_rho, kl):
    gl, gr = g_loc.astype(loc.dtype), g_rho.astype(loc.dtype)
    finite = bool(np.isfinite(gl).all() and np.isfinite(gr).all() and np.isfinite(kl))
    return gl, gr, kl, finite


def _check_mode(mode, allowed):
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")


def pathwise_grad_normal(loc, rho, eps, grad_log_lik, prior_loc, prior_scale, mode, kl_weight, workers):
    """(grad_loc, grad_rho, kl_part, finite) for a Normal prior; mode 'mc', 'stl' or 'analytic'."""
    _check_mode(mode, ("mc", "stl", "analytic"))
    m, s = _f64(prior_loc), _f64(prior_scale)

    def prior_lp_grad(w):
        return _normal_lp(w, m, s), -(w - m) / s**2

    with np.errstate(all="ignore"):
        out = _pathwise(loc, rho, eps, grad_log_lik, prior_lp_grad, mode, kl_weight, (m, s))
    return _finish(loc, *out)


def pathwise_grad_mixture(loc, rho, eps, grad_log_lik, pi, sigma1, sigma2, mode, kl_weight, workers):
    """(grad_loc, grad_rho, kl_part, finite) for the scale-mixture prior; mode 'mc' or 'stl'."""
    _check_mode(mode, ("mc", "stl"))
    p, s1, s2 = _f64(pi), _f64(sigma1), _f64(sigma2)
    with np.errstate(all="ignore"):
        out = _pathwise(loc, rho, eps, grad_log_lik, lambda w: _mixture_parts(w, p, s1, s2), mode, kl_weight)
    return _finish(loc, *out)


def score_grad(loc, rho, eps, f, baseline, baseline_value, workers):
    """(grad_loc, grad_rho, finite): mean_s (f_s - b_s) d log q(w_s) / dtheta."""
    e, r, fv = _f64(eps), _f64(rho), _f64(f)
    S = e.shape[0]
    if baseline == "none":
        b = np.zeros(S)
    elif baseline == "constant":
        b = np.full(S, float(baseline_value))
    elif baseline == "loo":
        b = (fv.sum() - fv) / (S - 1)
    else:
        raise ValueError(f"baseline must be 'none', 'constant' or 'loo', got {baseline!r}")
    sigma = np.logaddexp(0.0, r)
    sg = np.exp(-np.logaddexp(0.0, -r))
    c = (fv - b)[:, None]
    g_loc = (c * e / sigma).mean(axis=0)
    g_rho = (c * (e * e - 1.0) * sg / sigma).mean(axis=0)
    gl, gr = g_loc.astype(loc.dtype), g_rho.astype(loc.dtype)
    return gl, gr, bool(np.isfinite(gl).all() and np.isfinite(gr).all())


# -- full-rank and low-rank families ----------------------------------------------------------
# F = E_q[log q(z)] - E_q[log p(z)], g = d log p / dz at each sample.

def fullrank_affine(loc, L, eps, workers):
    return (_f64(loc) + _f64(eps) @ _f64(L).T).astype(eps.dtype)


def fullrank_sample(key, loc, L, z, eps, workers):
    e = _normals(int(key), z.shape[0], z.shape[1], z.dtype)
    if eps is not None:
        eps[...] = e
    z[...] = fullrank_affine(loc, L, e, workers)


def fullrank_log_prob(loc, L, z, workers):
    L64 = _f64(L)
    r = _f64(z) - _f64(loc)
    u = np.linalg.solve(L64, r.T).T  # L u = r
    d = L64.shape[0]
    return (-0.5 * np.sum(u * u, axis=1) - np.sum(np.log(np.diag(L64))) - d * _HALF_LOG_2PI).astype(z.dtype)


def fullrank_pathwise_grad(L, eps, grad_log_p, mode, workers):
    """dF/dloc, dF/dL with z = loc + L eps: "mc" adds the entropy's exact gradient, "stl" uses
    d log q / dz = -L^{-T} eps along the path."""
    _check_mode(mode, ("mc", "stl"))
    L64, e, g = _f64(L), _f64(eps), _f64(grad_log_p)
    S = e.shape[0]
    if mode == "stl":
        a = -np.linalg.solve(L64.T, e.T).T - g
    else:
        a = -g
    g_loc = a.mean(axis=0)
    g_L = np.tril(a.T @ e / S)
    if mode == "mc":
        g_L -= np.diag(1.0 / np.diag(L64))
    return g_loc.astype(L.dtype), g_L.astype(L.dtype)


def _lowrank_cov(diag, U):
    return np.diag(_f64(diag) ** 2) + _f64(U) @ _f64(U).T


def lowrank_affine(loc, diag, U, eps, workers):
    d = diag.shape[0]
    e = _f64(eps)
    return (_f64(loc) + _f64(diag) * e[:, :d] + e[:, d:] @ _f64(U).T).astype(eps.dtype)


def lowrank_sample(key, loc, diag, U, z, eps, workers):
    e = _normals(int(key), z.shape[0], diag.shape[0] + U.shape[1], z.dtype)
    if eps is not None:
        eps[...] = e
    z[...] = lowrank_affine(loc, diag, U, e, workers)


def lowrank_log_prob(loc, diag, U, z, workers):
    """Dense reference: the (d, d) covariance and its Cholesky (the core never forms it)."""
    cov = _lowrank_cov(diag, U)
    C = np.linalg.cholesky(cov)
    u = np.linalg.solve(C, (_f64(z) - _f64(loc)).T).T
    d = cov.shape[0]
    return (-0.5 * np.sum(u * u, axis=1) - np.sum(np.log(np.diag(C))) - d * _HALF_LOG_2PI).astype(z.dtype)


def lowrank_entropy(diag, U, workers):
    cov = _lowrank_cov(diag, U)
    sign, logdet = np.linalg.slogdet(cov)
    return float(0.5 * logdet + cov.shape[0] * (_HALF_LOG_2PI + 0.5))


def lowrank_pathwise_grad(diag, U, eps, grad_log_p, mode, workers):
    """dF/dloc, dF/ddiag, dF/dU with z = loc + diag eps1 + U eps2 (dense reference)."""
    _check_mode(mode, ("mc", "stl"))
    D, U64, e, g = _f64(diag), _f64(U), _f64(eps), _f64(grad_log_p)
    d = D.shape[0]
    e1, e2 = e[:, :d], e[:, d:]
    S = e.shape[0]
    prec = np.linalg.inv(_lowrank_cov(diag, U))
    if mode == "stl":
        res = D * e1 + e2 @ U64.T
        a = -(res @ prec) - g
    else:
        a = -g
    g_loc = a.mean(axis=0)
    g_diag = (a * e1).mean(axis=0)
    g_U = a.T @ e2 / S
    if mode == "mc":  # the entropy 0.5 log|Sigma|: d/dU = Sigma^-1 U, d/dD = diag(Sigma^-1) D
        g_U -= prec @ U64
        g_diag -= np.diag(prec) * D
    dt = diag.dtype
    return g_loc.astype(dt), g_diag.astype(dt), g_U.astype(dt)


def pathwise_grad_flat(loc, rho, eps, grad_log_lik, mode, kl_weight, workers):
    """Mean field with no prior term: the gradient of kl_weight E[log q] - E[log lik]."""
    _check_mode(mode, ("mc", "stl"))

    def flat(w):
        return np.zeros_like(w), np.zeros_like(w)

    with np.errstate(all="ignore"):
        out = _pathwise(loc, rho, eps, grad_log_lik, flat, mode, kl_weight)
    return _finish(loc, *out)


# -- Bayes by Backprop layer passes -----------------------------------------------------------------

def bbb_noise(use, key, loc, rho, out, workers):
    """out = loc + softplus(rho) eps ('weights') or softplus(rho) eps ('perturbation'), eps = draws (key, 0, j)."""
    if use not in ("weights", "perturbation"):
        raise ValueError(f"use must be 'weights' or 'perturbation', got {use!r}")
    _bbb_noise_kl(use, "none", key, loc, rho, out, None)


def _bbb_grad(data, kl, key, loc, rho, A, B_or_C, prior_lp_grad, kl_weight, analytic_prior=None):
    mu, r, a = _f64(loc), _f64(rho), _f64(A)
    eps = _normals(int(key), 1, mu.shape[0], loc.dtype)[0].astype(np.float64)
    sigma = np.logaddexp(0.0, r)
    sg = np.exp(-np.logaddexp(0.0, -r))
    if data == "reparam":
        c = a * eps
    elif data == "times_eps":
        c = _f64(B_or_C) * eps
    elif data == "direct":
        c = _f64(B_or_C)
    else:
        raise ValueError(f"data must be 'reparam', 'times_eps' or 'direct', got {data!r}")
    g_loc, g_sigma, klv = a.copy(), c.copy(), 0.0
    if kl == "mc":
        w = mu + sigma * eps
        lp, gp = prior_lp_grad(w)
        # Proposition 1 on log q(w) - log p(w): path terms through w plus the direct d log q / dtheta
        dlogq_dw = -(w - mu) / sigma**2
        g_loc += kl_weight * ((dlogq_dw - gp) + (w - mu) / sigma**2)
        g_sigma += kl_weight * ((dlogq_dw - gp) * eps + (-1.0 / sigma + (w - mu) ** 2 / sigma**3))
        klv = float(np.sum(-_HALF_LOG_2PI - np.log(sigma) - 0.5 * ((w - mu) / sigma) ** 2 - lp))
    elif kl == "analytic":
        m, s = analytic_prior
        g_loc += kl_weight * (mu - m) / s**2
        g_sigma += kl_weight * (sigma / s**2 - 1.0 / sigma)
        klv = float(np.sum(_kl_terms(mu, sigma, m, s)))
    elif kl != "none":
        raise ValueError(f"kl must be 'none', 'mc' or 'analytic', got {kl!r}")
    gl, gr = g_loc.astype(loc.dtype), (g_sigma * sg).astype(loc.dtype)
    finite = bool(np.isfinite(gl).all() and np.isfinite(gr).all() and np.isfinite(klv))
    return gl, gr, klv, finite


_BLOCK = 1024  # the core's block: a fused Adam step skips a block with a non-finite gradient


def _fused_adam(loc, rho, gl, gr, adam_state, adam, accumulate):
    if (adam_state is None) != (adam is None):
        raise ValueError("adam_state and adam must be given together")
    if accumulate:
        raise ValueError("accumulate=True cannot be combined with a fused Adam step")
    if len(adam_state) != 4:
        raise ValueError(f"adam_state must be (m_loc, v_loc, m_rho, v_rho), got {len(adam_state)} items")
    if len(adam) != 5:
        raise ValueError(f"adam must be (step, lr, b1, b2, eps), got {len(adam)} items")
    m_loc, v_loc, m_rho, v_rho = adam_state
    step, lr, b1, b2, eps = adam
    for b0 in range(0, loc.shape[0], _BLOCK):
        sl = slice(b0, b0 + _BLOCK)
        if np.isfinite(gl[sl]).all() and np.isfinite(gr[sl]).all():
            adam_update(loc[sl], gl[sl], m_loc[sl], v_loc[sl], step, lr, b1, b2, eps, 1)
            adam_update(rho[sl], gr[sl], m_rho[sl], v_rho[sl], step, lr, b1, b2, eps, 1)


def _write_out(result, out_loc, out_rho, accumulate, compute_kl, loc=None, rho=None, adam_state=None, adam=None):
    """The core's out_loc / out_rho / accumulate / compute_kl / fused-Adam conventions."""
    gl, gr, klv, finite = result
    if not compute_kl:  # the KL value is not formed: neither it nor its finiteness counts
        klv, finite = 0.0, bool(np.isfinite(gl).all() and np.isfinite(gr).all())
    if (out_loc is None) != (out_rho is None):
        raise ValueError("out_loc and out_rho must be given together")
    for name, o in (("out_loc", out_loc), ("out_rho", out_rho)):
        if o is not None and o.shape != gl.shape:
            raise ValueError(f"{name} must have shape (D,) like loc, got {o.shape}")
    fused = adam_state is not None or adam is not None
    if fused:
        _fused_adam(loc, rho, gl, gr, adam_state, adam, accumulate)
    if out_loc is None:
        if accumulate:
            raise ValueError("accumulate=True needs out_loc and out_rho")
        return (None, None, klv, finite) if fused else (gl, gr, klv, finite)
    if accumulate:
        out_loc += gl
        out_rho += gr
    else:
        out_loc[...] = gl
        out_rho[...] = gr
    return out_loc, out_rho, klv, finite


def bbb_grad_normal(data, kl, key, loc, rho, A, B_or_C, prior_loc, prior_scale, kl_weight, workers, *,
                    out_loc=None, out_rho=None, accumulate=False, compute_kl=True, adam_state=None,
                    adam=None):
    """Fused backward pass of a Bayes-by-Backprop layer with a Normal prior: (grad_loc, grad_rho, kl, finite).
    With out_loc / out_rho the gradients go there (added to them with accumulate=True); with
    compute_kl=False the KL value is returned as 0.0."""
    m, s = _f64(prior_loc), _f64(prior_scale)
    with np.errstate(all="ignore"):
        res = _bbb_grad(data, kl, key, loc, rho, A, B_or_C, lambda w: (_normal_lp(w, m, s), -(w - m) / s**2),
                        kl_weight, (m, s))
    return _write_out(res, out_loc, out_rho, accumulate, compute_kl, loc, rho, adam_state, adam)


def bbb_grad_mixture(data, kl, key, loc, rho, A, B_or_C, pi, sigma1, sigma2, kl_weight, workers, *,
                     out_loc=None, out_rho=None, accumulate=False, compute_kl=True, adam_state=None,
                     adam=None):
    """Fused backward pass of a Bayes-by-Backprop layer with the scale-mixture prior.
    With out_loc / out_rho the gradients go there (added to them with accumulate=True); with
    compute_kl=False the KL value is returned as 0.0."""
    if kl == "analytic":
        raise ValueError("kl='analytic' needs a Normal prior; use 'mc'")
    p, s1, s2 = _f64(pi), _f64(sigma1), _f64(sigma2)
    with np.errstate(all="ignore"):
        res = _bbb_grad(data, kl, key, loc, rho, A, B_or_C, lambda w: _mixture_parts(w, p, s1, s2), kl_weight)
    return _write_out(res, out_loc, out_rho, accumulate, compute_kl, loc, rho, adam_state, adam)


def _bbb_noise_kl(use, kl, key, loc, rho, out, prior_lp, analytic_prior=None):
    if use not in ("weights", "perturbation", "none"):
        raise ValueError(f"use must be 'weights', 'perturbation' or 'none', got {use!r}")
    if kl not in ("none", "mc", "analytic"):
        raise ValueError(f"kl must be 'none', 'mc' or 'analytic', got {kl!r}")
    if use != "none" and out is None:
        raise ValueError(f"use={use!r} needs the out array")
    mu = _f64(loc)
    eps = _normals(int(key), 1, mu.shape[0], loc.dtype)[0].astype(np.float64)
    sigma = np.logaddexp(0.0, _f64(rho))
    w = mu + sigma * eps
    if use != "none":
        out[...] = w if use == "weights" else sigma * eps
    if kl == "mc":
        return float(np.sum(-_HALF_LOG_2PI - np.log(sigma) - 0.5 * eps**2 - prior_lp(w)))
    if kl == "analytic":
        return float(np.sum(_kl_terms(mu, sigma, *analytic_prior)))
    return 0.0


def bbb_noise_kl_normal(use, kl, key, loc, rho, out, prior_loc, prior_scale, workers):
    """bbb_noise and the layer's KL value in one pass, Normal prior (the KL of bbb_grad_normal)."""
    m, s = _f64(prior_loc), _f64(prior_scale)
    with np.errstate(all="ignore"):
        return _bbb_noise_kl(use, kl, key, loc, rho, out, lambda w: _normal_lp(w, m, s), (m, s))


def bbb_noise_kl_mixture(use, kl, key, loc, rho, out, pi, sigma1, sigma2, workers):
    """bbb_noise and the layer's KL value in one pass, scale-mixture prior (the KL of bbb_grad_mixture)."""
    if kl == "analytic":
        raise ValueError("kl='analytic' needs a Normal prior; use 'mc'")
    p, s1, s2 = _f64(pi), _f64(sigma1), _f64(sigma2)
    with np.errstate(all="ignore"):
        return _bbb_noise_kl(use, kl, key, loc, rho, out, lambda w: _mixture_parts(w, p, s1, s2)[0])


def gemm(trans_a, trans_b, A, B, C, beta, workers):
    """C = op(A) op(B) + beta C (beta 0 or 1), in place (computed in float64)."""
    if beta not in (0.0, 1.0):
        raise ValueError(f"beta must be 0 or 1, got {beta}")
    a, b = (A.T if trans_a else A), (B.T if trans_b else B)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"op(A) is {a.shape[0]} x {a.shape[1]} but op(B) is {b.shape[0]} x {b.shape[1]}")
    if C.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"C must have shape (M, N) = {(a.shape[0], b.shape[1])}, got {C.shape}")
    C[...] = _f64(a) @ _f64(b) + (beta * _f64(C) if beta else 0.0)


def _adam_scalars(lr, b1, b2, t):
    """The core's order: lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) is evaluated as
    a (m / (sqrt(v) r + eps)), a = lr / (1 - b1^t), r = 1 / sqrt(1 - b2^t): one division per element."""
    return lr / (1.0 - b1**t), 1.0 / math.sqrt(1.0 - b2**t)


def adam_update(params, grads, m, v, step, lr, b1, b2, eps, workers):
    """One Adam step in place (params, m, v are written)."""
    t = step + 1
    g = grads
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * (g * g)
    a, r = _adam_scalars(lr, b1, b2, t)
    params[...] = params - a * (m / (np.sqrt(v) * r + eps))


def _decayed(params, decay):
    return params * decay if decay != 1.0 else params.astype(np.float64)


def optim_adam(params, grads, m, v, out_params, out_m, out_v, step, lr, b1, b2, eps, decay, workers):
    """One Adam step of vg.optim (decoupled weight decay first) into the outputs; returns whether
    every gradient was finite."""
    t = step + 1
    g = grads.astype(np.float64)
    p = _decayed(params.astype(np.float64), decay)
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * (g * g)
    a, r = _adam_scalars(lr, b1, b2, t)
    out_params[...] = p - a * (m1 / (np.sqrt(v1) * r + eps))
    out_m[...] = m1
    out_v[...] = v1
    return bool(np.isfinite(g).all())


def optim_sgd(params, grads, buf, out_params, out_buf, lr, momentum, nesterov, decay, workers):
    """One SGD step of vg.optim (buf None: no momentum); returns whether every gradient was finite."""
    g = grads.astype(np.float64)
    p = _decayed(params.astype(np.float64), decay)
    if buf is None:
        out_params[...] = p - lr * g
    else:
        b = momentum * buf + g
        out_params[...] = p - lr * (g + momentum * b if nesterov else b)
        out_buf[...] = b
    return bool(np.isfinite(g).all())


def optim_rmsprop(params, grads, square_avg, buf, out_params, out_square_avg, out_buf, lr, alpha, eps, momentum,
                  decay, workers):
    """One RMSprop step of vg.optim (buf None: no momentum); returns whether every gradient was finite."""
    g = grads.astype(np.float64)
    p = _decayed(params.astype(np.float64), decay)
    s = alpha * square_avg + (1 - alpha) * (g * g)
    d = g / (np.sqrt(s) + eps)
    if buf is None:
        out_params[...] = p - lr * d
    else:
        b = momentum * buf + d
        out_params[...] = p - lr * b
        out_buf[...] = b
    out_square_avg[...] = s
    return bool(np.isfinite(g).all())


# -- vg.fit's running sums ---------------------------------------------------------------

def moment_sums(x, c, s1, s2, workers):
    """In place: s1 += a, s2 += a * a, a = float64(x) - c (c None: a = float64(x))."""
    a = np.asarray(x, dtype=np.float64) - (0.0 if c is None else c)
    s1 += a
    s2 += a * a


def combine_moments(counts, means, m2s, out_mean, out_m2, workers):
    """Into out_mean and out_m2: the (mean, M2) of the union of groups (counts[i], means[i], m2s[i]),
    mean = (0 + sum_i counts_i means_i) / total and M2 = 0 + sum_i (m2s_i + counts_i (means_i - mean)^2),
    folded left to right."""
    total = float(sum(counts))
    acc = np.zeros(out_mean.shape)
    for k, m in zip(counts, means):
        acc = acc + float(k) * m
    out_mean[...] = acc / total
    acc = np.zeros(out_mean.shape)
    for k, m, M in zip(counts, means, m2s):
        acc = acc + (M + (m - out_mean) ** 2 * float(k))
    out_m2[...] = acc
