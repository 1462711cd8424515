"""Diagnostics for variational approximations: Pareto-smoothed importance sampling
(PSIS) and its k-hat, and the signal-to-noise ratio of stochastic gradients.

NumPy only; SciPy is not needed.

References
----------
Zhang, J. and Stephens, M. A. (2009). A new and efficient estimation method for the
generalized Pareto distribution. Technometrics 51(3), 316-325.

Yao, Y., Vehtari, A., Simpson, D. and Gelman, A. (2018). Yes, but did it work?
Evaluating variational inference. ICML.

Vehtari, A., Simpson, D., Gelman, A., Yao, Y. and Gabry, J. (2024). Pareto smoothed
importance sampling. JMLR 25(72), 1-58.  Reference implementations: ``loo::gpdfit`` and
``loo::psis`` (R), ``arviz.psislw`` (Python).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ._validation import as_float_array, check_finite, check_real

__all__ = [
    "PsisResult",
    "gpd_fit",
    "psis",
    "khat_message",
    "gradient_snr",
    "block_snr",
    "KHAT_GOOD",
    "KHAT_OK",
    "MIN_TAIL",
]

#: k-hat below this: the importance weights have finite variance; PSIS estimates are reliable.
KHAT_GOOD = 0.5
#: k-hat up to this: heavy-tailed weights, PSIS still usable (Yao et al. 2018); above: unreliable.
KHAT_OK = 0.7
#: The fewest tail draws a generalized Pareto fit is attempted with (loo's ``min_len``).
MIN_TAIL = 5

_PRIOR_K_N = 10      # weakly informative prior on k: 10 pseudo-observations ...
_PRIOR_K_MEAN = 0.5  # ... at k = 0.5 (loo's wip = TRUE, ArviZ's prior_k)
_PRIOR_BS = 3        # Zhang & Stephens' grid scale, from the first quartile


class PsisResult(NamedTuple):
    """Result of :func:`psis`."""

    log_weights: np.ndarray
    """Smoothed log weights, float64, the shape of the input, normalised so that
    ``logsumexp(log_weights) == 0`` (``exp(log_weights)`` sums to 1)."""
    khat: float
    """Estimated generalized Pareto shape of the weight tail; ``inf`` when no fit was
    possible (fewer than :data:`MIN_TAIL` tail draws, or a degenerate tail)."""
    tail_len: int
    """M, the number of largest weights the Pareto fit used and replaced (0 when the
    tail was too short to fit)."""


def _gpd_fit_sorted(x: np.ndarray) -> tuple[float, float]:
    """Zhang & Stephens on ascending-sorted x >= 0 with x[-1] > 0; (nan, nan) if it breaks down."""
    n = x.size
    m = 30 + int(math.sqrt(n))
    quartile = x[int(n / 4 + 0.5) - 1]
    if not (quartile > 0 and x[-1] > 0):
        return math.nan, math.nan
    # a tiny quartile (a nearly degenerate tail) overflows theta: the fit then breaks down below
    # and returns nan, so the floating-point warnings on the way are not the caller's business
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        theta = 1.0 - np.sqrt(m / (np.arange(1, m + 1, dtype=np.float64) - 0.5))
        theta /= _PRIOR_BS * quartile
        theta += 1.0 / x[-1]
        # k(theta_j) = mean(log1p(-theta_j x)), in blocks of grid points of at most ~8 MB
        k_grid = np.empty(m)
        block = max(1, (1 << 20) // n)
        for j in range(0, m, block):
            k_grid[j:j + block] = np.log1p(-theta[j:j + block, None] * x[None, :]).mean(axis=1)
        # n times the profile log likelihood at each grid point
        len_scale = n * (np.log(-(theta / k_grid)) - k_grid - 1.0)
        # w_j = 1 / sum_i exp(l_i - l_j): the normalised likelihoods, without overflow
        weights = 1.0 / np.exp(len_scale[None, :] - len_scale[:, None]).sum(axis=1)
    keep = weights >= 10 * np.finfo(np.float64).eps
    if not keep.any():
        return math.nan, math.nan
    weights, theta = weights[keep], theta[keep]
    weights /= weights.sum()
    theta_post = float(np.sum(theta * weights))
    k = float(np.log1p(-theta_post * x).mean())
    sigma = -k / theta_post
    k = (n * k + _PRIOR_K_N * _PRIOR_K_MEAN) / (n + _PRIOR_K_N)
    if not (math.isfinite(k) and math.isfinite(sigma) and sigma > 0):
        return math.nan, math.nan
    return k, sigma


def gpd_fit(x) -> tuple[float, float]:
    r"""Fit a generalized Pareto distribution (location 0) to exceedances ``x > 0``.

    The empirical-Bayes estimator of Zhang & Stephens (2009) exactly as PSIS uses it
    (``loo::gpdfit(x, wip = TRUE, min_grid_pts = 30)``, ArviZ ``_gpdfit``): with the
    GPD written through ``theta = -k / sigma``, the profile likelihood is evaluated on
    ``M = 30 + floor(sqrt(n))`` grid points

        theta_j = 1 / x_(n) + (1 - sqrt(M / (j - 1/2))) / (3 x_(q)),  q = floor(n / 4 + 1/2),

    theta is their likelihood-weighted mean (grid points of weight below ``10 eps``
    dropped), ``k = mean(log1p(-theta x))`` and ``sigma = -k / theta``.  Finally a weakly
    informative prior shrinks k towards 0.5 by 10 pseudo-observations:
    ``k = (n k + 5) / (n + 10)``.  ``sigma`` is computed before that adjustment, as in
    the references.

    Parameters
    ----------
    x : array_like, 1-D, at least 2 values, finite and > 0
        Exceedances over the threshold, in any order (not modified).

    Returns
    -------
    k : float
        Shape (scipy's ``genpareto`` ``c``): k > 0 heavy tail with moments of order
        < 1/k, k = 0 exponential, k < 0 bounded support.
    sigma : float
        Scale, > 0.

    Raises
    ------
    TypeError
        ``x`` is not an array of real numbers.
    ValueError
        ``x`` is not 1-D, has fewer than 2 values, or holds a non-finite or
        non-positive value.

    Examples
    --------
    Exponential data is a GPD with k = 0:

    >>> import numpy as np
    >>> from vigrad.diagnostics import gpd_fit
    >>> x = np.random.default_rng(1).exponential(2.0, size=20000)
    >>> k, sigma = gpd_fit(x)
    >>> bool(abs(k) < 0.03), bool(abs(sigma - 2.0) < 0.1)
    (True, True)
    """
    arr = as_float_array(x, "x", dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"x must hold at least 2 exceedances, got {arr.size}")
    check_finite(arr, "x")
    if not (arr > 0).all():
        i = int(np.argmin(arr > 0))
        raise ValueError(f"x must be > 0 (exceedances over the threshold), got {float(arr[i])} at index {i}")
    k, sigma = _gpd_fit_sorted(np.sort(arr))
    if not math.isfinite(k):  # pragma: no cover - only for data spanning > 300 orders of magnitude
        raise ValueError("the generalized Pareto fit of x broke down (the profile likelihood overflowed)")
    return k, sigma


def _gpd_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """Inverse CDF of GPD(k, sigma) at 0 < p < 1 (loo's qgpd)."""
    if abs(k) < np.finfo(np.float64).eps:
        return -sigma * np.log1p(-p)
    return sigma * np.expm1(-k * np.log1p(-p)) / k


def _logsumexp(a: np.ndarray) -> float:
    m = float(np.max(a))
    return m + math.log(float(np.sum(np.exp(a - m))))


def psis(log_weights) -> PsisResult:
    r"""Pareto-smoothed importance sampling of one set of log importance ratios.

    For S draws from the proposal q with log ratios ``log p(w_s) - log q(w_s)`` (up to a
    constant), following ``loo::psis(r_eff = 1)``:

    1. The tail length is ``M = ceil(min(0.2 S, 3 sqrt(S)))``.
    2. The log ratios are shifted by their maximum (so the largest weight is 1).
    3. A generalized Pareto distribution (:func:`gpd_fit`) is fitted to the M largest
       weights' exceedances over the (M+1)-th largest weight, the cutoff.
    4. Those M weights are replaced, in their order, by ``c + F^{-1}((i - 1/2) / M)``,
       i = 1..M: the cutoff weight c plus the fitted GPD's quantiles.  Smoothed weights
       are truncated at the largest raw weight.
    5. The log weights are normalised to ``logsumexp = 0``.

    k-hat is the fitted shape: see :func:`khat_message` for its reading.

    Edge cases, decided here (and matching loo and ArviZ, which return k-hat = inf):

    * ``M < 5`` (S <= 20): no fit is attempted; ``khat = inf``, ``tail_len = 0``, and
      the log weights are only normalised.
    * A degenerate tail, where the fit is impossible (the largest M weights all equal
      the cutoff, e.g. constant log weights, or more than about a quarter of them tie
      with it or are zero): ``khat = inf``, ``tail_len = 0``, weights only normalised.
      ``inf`` reads as "unreliable", the safe side.

    Parameters
    ----------
    log_weights : array_like, 1-D, at least one value
        Log importance ratios.  ``-inf`` is allowed (a draw of zero weight); NaN and
        ``+inf`` are refused.  Not modified.

    Returns
    -------
    PsisResult
        ``(log_weights, khat, tail_len)``: smoothed, normalised log weights (float64),
        the Pareto shape estimate, and M (0 when no fit was made).

    Raises
    ------
    TypeError
        ``log_weights`` is not an array of real numbers.
    ValueError
        ``log_weights`` is not 1-D, is empty, holds NaN or ``+inf``, or is all ``-inf``.

    Examples
    --------
    Target N(0, 1), proposal N(0, 1.2^2) (wider than the target: bounded weights):

    >>> import numpy as np
    >>> from vigrad.diagnostics import psis
    >>> w = np.random.default_rng(0).normal(0.0, 1.2, size=4000)
    >>> lr = -0.5 * w**2 + 0.5 * (w / 1.2) ** 2        # log N(w; 0, 1) - log N(w; 0, 1.2^2) + const
    >>> res = psis(lr)
    >>> res.tail_len, bool(res.khat < 0.5), round(float(np.exp(res.log_weights).sum()), 12)
    (190, True, 1.0)
    """
    lw = as_float_array(log_weights, "log_weights", dtype=np.float64)
    if lw.ndim != 1:
        raise ValueError(f"log_weights must be 1-D (one set of S log ratios), got shape {lw.shape}")
    S = lw.size
    if S == 0:
        raise ValueError("log_weights must hold at least one value, got an empty array")
    bad = np.isnan(lw) | (lw == np.inf)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"log_weights must be finite or -inf (a zero weight), got {float(lw[i])} at index {i}"
        )
    top = float(lw.max())
    if top == -np.inf:
        raise ValueError("log_weights must hold at least one finite value, got all -inf (every weight zero)")

    x = lw - top  # a new array: the caller's is never touched
    M = int(math.ceil(min(0.2 * S, 3.0 * math.sqrt(S))))
    khat, tail_len = math.inf, 0
    if M >= MIN_TAIL:
        order = np.argsort(x, kind="stable")
        tail_idx = order[S - M:]
        tail = x[tail_idx]                        # ascending, tail[-1] == 0
        cutoff = float(x[order[S - M - 1]])       # the (M+1)-th largest
        exp_cutoff = math.exp(cutoff)
        k, sigma = _gpd_fit_sorted(np.exp(tail) - exp_cutoff)
        if math.isfinite(k):
            p = (np.arange(1, M + 1, dtype=np.float64) - 0.5) / M
            with np.errstate(divide="ignore"):
                x[tail_idx] = np.log(_gpd_quantile(p, k, sigma) + exp_cutoff)
            np.minimum(x, 0.0, out=x)             # truncate at the largest raw weight
            khat, tail_len = k, M
    x -= _logsumexp(x)
    return PsisResult(x, float(khat), tail_len)


def khat_message(khat) -> str:
    """A one-line reading of a PSIS k-hat (Yao et al. 2018; Vehtari et al. 2024).

    * ``khat < 0.5`` -- "good": the importance weights have finite variance and the
      approximation is close to the target.
    * ``0.5 <= khat <= 0.7`` -- "ok": heavy-tailed weights; PSIS estimates are still
      usable but converge slowly.
    * ``khat > 0.7`` (or ``inf``: no fit possible) -- "unreliable".

    The message starts with that label ("good", "ok" or "unreliable").

    Parameters
    ----------
    khat : float
        A finite real number or ``+inf``; NaN is refused.

    Examples
    --------
    >>> from vigrad.diagnostics import khat_message
    >>> [khat_message(k).split(":")[0] for k in (0.2, 0.6, 0.9, float("inf"))]
    ['good', 'ok', 'unreliable', 'unreliable']
    """
    if khat == math.inf and not isinstance(khat, (bool, np.bool_)):
        return ("unreliable: khat = inf, the weight tail could not be fitted (too few draws "
                "or a degenerate tail); do not trust importance-sampling estimates")
    k = check_real(khat, "khat")
    if k < KHAT_GOOD:
        return f"good: khat = {k:.2f} < {KHAT_GOOD}; the importance weights have finite variance"
    if k <= KHAT_OK:
        return (f"ok: khat = {k:.2f} in [{KHAT_GOOD}, {KHAT_OK}]; heavy-tailed weights, PSIS "
                "estimates are usable but converge slowly")
    return (f"unreliable: khat = {k:.2f} > {KHAT_OK}; the approximation misses the target's "
            "tails, do not trust importance-sampling estimates")


def _snr(g: np.ndarray) -> np.ndarray:
    mean = g.mean(axis=0)
    std = g.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(mean) / std


def _check_grads(grads, name: str) -> np.ndarray:
    g = as_float_array(grads, name)
    if g.ndim < 1:
        raise ValueError(f"{name} must have shape (n, ...) with n gradient samples on axis 0, got a scalar")
    if g.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 gradient samples on axis 0, got {g.shape[0]}")
    check_finite(g, name)
    return g.astype(np.float64, copy=False)


def gradient_snr(grads) -> np.ndarray:
    r"""Per-coordinate signal-to-noise ratio of stochastic gradients.

    For n gradient samples ``g_1..g_n`` stacked on axis 0,

        SNR_j = |mean_i g_ij| / std_i g_ij,   std with ddof = 1 (the unbiased variance),

    computed in float64.  A coordinate with zero spread gets ``inf`` (nonzero mean) or
    ``nan`` (all samples exactly 0: no signal and no noise).

    Parameters
    ----------
    grads : array_like, shape (n, ...), n >= 2, finite
        Not modified.

    Returns
    -------
    ndarray, float64, shape ``grads.shape[1:]``

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad.diagnostics import gradient_snr
    >>> g = np.array([[1.0, 0.0], [3.0, 1.0], [5.0, -1.0]])   # means 3, 0; stds 2, 1
    >>> gradient_snr(g).tolist()
    [1.5, 0.0]
    """
    return _snr(_check_grads(grads, "grads"))


def block_snr(grads_by_block) -> dict[str, float]:
    r"""Mean gradient SNR of each parameter block.

    For each block (e.g. ``"loc"``, ``"scale"``), the arithmetic mean over the block's
    coordinates of :func:`gradient_snr` of its ``(n, ...)`` gradient samples.  Blocks may
    differ in shape and in n.  A coordinate whose SNR is ``inf`` or ``nan`` (zero spread)
    makes its block's mean ``inf`` or ``nan``.

    Parameters
    ----------
    grads_by_block : Mapping[str, array_like of shape (n, ...)]
        Each value: n >= 2 finite gradient samples on axis 0, at least one coordinate.

    Returns
    -------
    dict[str, float]
        The blocks in the mapping's order.

    Examples
    --------
    >>> import numpy as np
    >>> from vigrad.diagnostics import block_snr
    >>> g_loc = np.array([[1.0, 2.0], [3.0, 2.5]])     # SNRs 2/sqrt(2), 2.25/sqrt(0.125)
    >>> g_scale = np.array([[0.1], [-0.1], [0.0]])     # mean 0: SNR 0
    >>> {k: round(v, 4) for k, v in block_snr({"loc": g_loc, "scale": g_scale}).items()}
    {'loc': 3.8891, 'scale': 0.0}
    """
    if not isinstance(grads_by_block, Mapping):
        raise TypeError(
            f"grads_by_block must be a mapping of block name to (n, ...) gradients, got {type(grads_by_block).__name__}"
        )
    if len(grads_by_block) == 0:
        raise ValueError("grads_by_block must hold at least one block, got an empty mapping")
    checked = {}
    for key, value in grads_by_block.items():
        if not isinstance(key, str):
            raise TypeError(f"grads_by_block keys must be str block names, got {type(key).__name__} {key!r}")
        name = f"grads_by_block[{key!r}]"
        g = _check_grads(value, name)
        if g[0].size == 0:
            raise ValueError(f"{name} must have at least one coordinate, got shape {g.shape}")
        checked[key] = g
    return {key: float(np.mean(_snr(g))) for key, g in checked.items()}
