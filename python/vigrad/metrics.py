r"""Predictive metrics for Bayesian neural networks: classification and regression.

Classification metrics take predictive probabilities ``probs`` of shape ``(N, K)`` (N
examples, K classes) -- for a Bayesian model the Monte Carlo average of the softmax over
S posterior samples -- and integer ``labels`` of shape ``(N,)`` in ``0..K-1``.  The
uncertainty decomposition (:func:`predictive_entropy`, :func:`mutual_information`,
:func:`expected_entropy`) takes the stack of per-sample probabilities, shape ``(S, N, K)``:

    H[mean_s p_s]  =  (H[mean_s p_s] - mean_s H[p_s])  +  mean_s H[p_s]
     total            epistemic (mutual information)     aleatoric (expected entropy)

Regression metrics take a predictive mean (and standard deviation) and targets of the
same shape.

Conventions
-----------
* Entropies are in nats, with ``0 log 0 = 0``.
* float32 and float64 inputs are accepted (integers too, as float64); all arithmetic is
  done in float64.  Scalar metrics are returned as Python floats, per-example ones as
  float64 arrays of shape ``(N,)``.  Inputs are never modified.
* Every argument is checked before any work and a ``TypeError`` (wrong kind of object)
  or ``ValueError`` (wrong shape or value) names it and says what was expected and what
  was given: empty inputs, mismatched shapes, NaN or inf, probabilities outside [0, 1],
  probability rows (the last axis) whose sum differs from 1 by more than the tolerance
  ``max(1e-6, (K + 2) eps)``, labels
  that are not whole numbers or lie outside ``[0, K)``.
* The tolerance on the row sums follows the input: ``eps`` is the machine epsilon of its
  dtype (float16 9.8e-4, float32 1.2e-7, float64 and integers 2.2e-16) and ``K`` the length of
  the last axis.  A softmax computed in that dtype is off by at most (K + 2) eps / 2 (the
  rounding of the exponentials, of their sum added one by one, and of the division), so a
  float16 softmax over 10 classes or a float32 one over 10 000 passes, with a margin of 2.
* Labels may have any integer dtype, or a float dtype holding whole numbers; bool is
  refused.
* Where a prediction is needed (:func:`accuracy`, :func:`expected_calibration_error`)
  it is the argmax of the row; ties go to the lowest class index (``numpy.argmax``).

References
----------
Guo, C., Pleiss, G., Sun, Y. and Weinberger, K. Q. (2017). On calibration of modern
neural networks. ICML.

Brier, G. W. (1950). Verification of forecasts expressed in terms of probability.
Monthly Weather Review 78(1), 1-3.

Houlsby, N., Huszar, F., Ghahramani, Z. and Lengyel, M. (2011). Bayesian active
learning for classification and preference learning (BALD). arXiv:1112.5745.

Depeweg, S., Hernandez-Lobato, J. M., Doshi-Velez, F. and Udluft, S. (2018).
Decomposition of uncertainty in Bayesian deep learning for efficient and risk-sensitive
learning. ICML.
"""

from __future__ import annotations

import math

import numpy as np

from ._validation import as_float_array, check_finite, check_num_samples, check_real

__all__ = [
    "nll",
    "accuracy",
    "expected_calibration_error",
    "brier_score",
    "predictive_entropy",
    "mutual_information",
    "expected_entropy",
    "rmse",
    "gaussian_nll",
]

#: Smallest tolerance on |sum of a probability row - 1| (see _sum_tolerance).
_SUM_ATOL = 1e-6
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# -- argument checking ------------------------------------------------------------------------

def _first_index(mask: np.ndarray) -> tuple:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _sum_tolerance(dtype: np.dtype, num_classes: int) -> float:
    """max(1e-6, (K + 2) eps): twice the worst-case rounding error of the sum of a softmax over K
    classes computed in ``dtype`` (eps of float64 for integer input)."""
    eps = np.finfo(dtype).eps if dtype.kind == "f" else np.finfo(np.float64).eps
    return max(_SUM_ATOL, (num_classes + 2) * float(eps))


def _check_probs(probs, name: str, ndims: tuple[int, ...], layout: str) -> np.ndarray:
    """Validated probabilities as float64 (a copy when the input was not float64)."""
    given = probs.dtype if isinstance(probs, np.ndarray) else None
    arr = as_float_array(probs, name)
    if arr.ndim not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got shape {arr.shape} ({arr.ndim}-D)")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    check_finite(arr, name)
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        where = _first_index(bad)
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got {int(bad.sum())} value(s) outside; "
            f"the first, {float(arr[where])!r}, at index {where}"
        )
    sums = arr.sum(axis=-1, dtype=np.float64)
    tol = _sum_tolerance(given if given is not None else arr.dtype, arr.shape[-1])
    off = np.abs(sums - 1.0) > tol
    if off.any():
        where = _first_index(off)
        raise ValueError(
            f"{name} must sum to 1 along its last axis (within {tol:.3g} for {arr.shape[-1]} classes in "
            f"{given if given is not None else arr.dtype}), got "
            f"{int(off.sum())} row(s) that do not; the first, at index {where}, sums to {float(sums[where])!r}"
        )
    return arr.astype(np.float64, copy=False)


def _check_labels(labels, name: str, n: int | None, num_classes: int | None, against: str = "probs") -> np.ndarray:
    """Validated labels as int64 (1-D, whole numbers, >= 0 and < num_classes when given)."""
    if isinstance(labels, np.ndarray):
        arr = labels
    else:
        try:
            arr = np.asarray(labels)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name} must be an array of integer class labels, got {type(labels).__name__}: {exc}") from None
    kind = arr.dtype.kind
    if kind == "b":
        raise TypeError(f"{name} must be integer class labels, got bool dtype")
    if kind not in "iuf":
        raise TypeError(f"{name} must be integer class labels (an integer or float dtype), got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, shape (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} must have length N = {n} to match {against}, got length {arr.shape[0]}")
    if kind == "f":
        notwhole = ~np.isfinite(arr)
        notwhole[~notwhole] = arr[~notwhole] != np.floor(arr[~notwhole])
        if notwhole.any():
            i = _first_index(notwhole)[0]
            raise ValueError(
                f"{name} must be whole numbers (class labels), got {int(notwhole.sum())} that are not; "
                f"the first, {float(arr[i])!r}, at index {i}"
            )
    neg = arr < 0
    if neg.any():
        i = _first_index(neg)[0]
        raise ValueError(f"{name} must be >= 0, got {arr[i].item()!r} at index {i}")
    if num_classes is not None:
        big = arr >= num_classes
        if big.any():
            i = _first_index(big)[0]
            raise ValueError(
                f"{name} must be in [0, {num_classes}) (K = {num_classes} classes), got {arr[i].item()!r} at index {i}"
            )
    elif kind in "uf":
        big = arr >= 2**63
        if big.any():
            i = _first_index(big)[0]
            raise ValueError(f"{name} must be < 2**63, got {arr[i].item()!r} at index {i}")
    return arr.astype(np.int64, copy=False)


def _check_values(x, name: str) -> np.ndarray:
    arr = as_float_array(x, name)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    check_finite(arr, name)
    return arr.astype(np.float64, copy=False)


def _entropy(p: np.ndarray) -> np.ndarray:
    """-sum p log p over the last axis (nats, 0 log 0 = 0) of float64 p; never -0.0."""
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    h = -np.einsum("...k,...k->...", p, logp)
    h += 0.0
    return h


# -- classification ---------------------------------------------------------------------------

def nll(probs, labels, *, eps: float = 1e-12) -> float:
    r"""Mean negative log predictive probability of the true label (nats).

    ``-(1/N) sum_i log max(probs[i, labels[i]], eps)``.  The probability of the true
    label is clipped below at ``eps``, so a true label given probability 0 costs
    ``-log(eps)`` (27.6 nats for the default) instead of making the mean infinite;
    probabilities at or above ``eps`` are used as they are.  For a Bayesian model
    ``probs`` should be the Monte Carlo average of the per-sample softmax (the posterior
    predictive), not a single sample's.

    Parameters
    ----------
    probs : array_like, shape (N, K)
        Predictive probabilities; each row in [0, 1] and summing to 1 (see Conventions).
    labels : array_like of int, shape (N,)
        True classes in ``0..K-1``.
    eps : float, keyword-only
        Lower clip for the true-label probability, ``0 < eps < 1``.

    Returns
    -------
    float
        The mean negative log-likelihood, >= 0.

    Examples
    --------
    >>> import math
    >>> import numpy as np
    >>> import vigrad.metrics as metrics
    >>> probs = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    >>> metrics.nll(probs, [0, 2]) == -(math.log(0.5) + math.log(0.25)) / 2
    True
    >>> round(metrics.nll([[1.0, 0.0]], [1]), 4)             # clipped: -log(1e-12)
    27.631
    """
    eps = check_real(eps, "eps", positive=True)
    if not eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    p = _check_probs(probs, "probs", (2,), "(N, K)")
    y = _check_labels(labels, "labels", p.shape[0], p.shape[1])
    p_true = np.maximum(p[np.arange(p.shape[0]), y], eps)
    return float(-np.mean(np.log(p_true))) + 0.0


def accuracy(probs_or_labels_pred, labels) -> float:
    r"""Fraction of examples whose predicted class equals the true label.

    Parameters
    ----------
    probs_or_labels_pred : array_like, shape (N, K) or (N,)
        Either predictive probabilities (each row in [0, 1], summing to 1, see Conventions),
        whose row-wise argmax is the prediction (ties: the lowest class), or predicted
        class labels (whole numbers >= 0).
    labels : array_like of int, shape (N,)
        True classes; in ``0..K-1`` when probabilities are given, >= 0 otherwise.

    Returns
    -------
    float
        The accuracy in [0, 1].

    Examples
    --------
    >>> import vigrad.metrics as metrics
    >>> metrics.accuracy([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.5, 0.5]], [0, 1, 1, 0])
    0.75
    >>> metrics.accuracy([2, 0, 1, 1], [2, 0, 0, 1])
    0.75
    """
    name = "probs_or_labels_pred"
    if isinstance(probs_or_labels_pred, np.ndarray):
        ndim = probs_or_labels_pred.ndim
    else:
        try:
            ndim = np.ndim(probs_or_labels_pred)
        except (ValueError, TypeError) as exc:  # ragged nested sequences
            raise TypeError(f"{name} must be an array, got {type(probs_or_labels_pred).__name__}: {exc}") from None
    if ndim == 2:
        p = _check_probs(probs_or_labels_pred, name, (2,), "(N, K) or (N,)")
        y = _check_labels(labels, "labels", p.shape[0], p.shape[1], against=name)
        pred = np.argmax(p, axis=1)
    elif ndim == 1:
        pred = _check_labels(probs_or_labels_pred, name, None, None)
        y = _check_labels(labels, "labels", pred.shape[0], None, against=name)
    else:
        raise ValueError(
            f"{name} must have shape (N, K) (probabilities) or (N,) (predicted labels), got {ndim}-D input"
        )
    return float(np.mean(pred == y))


def expected_calibration_error(probs, labels, *, num_bins: int = 15) -> float:
    r"""Expected calibration error of the top-label confidence (Guo et al. 2017).

    The confidence of example i is ``conf_i = max_k probs[i, k]`` and its prediction the
    argmax (ties: the lowest class).  The confidences are put in ``M = num_bins``
    equal-width bins on (0, 1]: bin ``b`` (``b = 1..M``) holds the examples with

        (b - 1) / M  <  conf_i  <=  b / M,

    i.e. the bins are open on the left and **include their right edge**, so a confidence
    of exactly 1 falls in the last bin and one of exactly ``b / M`` in bin ``b`` (the
    edges are the float64 values of ``b / M``; float32 probabilities are widened
    exactly before the comparison).  A confidence is never 0, since it is at least 1/K.
    Then

        ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|,

    with ``acc(B_b)`` the fraction of correct predictions and ``conf(B_b)`` the mean
    confidence in the bin; empty bins contribute nothing.  For a calibrated predictor the
    expectation is at most ``0.5 * sqrt(M / N)`` (sampling noise), so compare ECEs at
    equal N and M.

    Parameters
    ----------
    probs : array_like, shape (N, K)
        Predictive probabilities; each row in [0, 1] and summing to 1 (see Conventions).
    labels : array_like of int, shape (N,)
        True classes in ``0..K-1``.
    num_bins : int, keyword-only
        M >= 1, the number of bins (15 as in Guo et al.).

    Returns
    -------
    float
        The ECE in [0, 1].

    Examples
    --------
    Two bins, (0, 0.5] and (0.5, 1]; the example at confidence 0.5 is in the first:

    >>> import vigrad.metrics as metrics
    >>> probs = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]
    >>> labels = [1, 0, 0, 0]
    >>> # bin 1: 1 example, acc 0, conf 0.5;  bin 2: 3 examples, acc 2/3, conf 0.8
    >>> round(metrics.expected_calibration_error(probs, labels, num_bins=2), 12)
    0.225
    """
    m = check_num_samples(num_bins, "num_bins")
    p = _check_probs(probs, "probs", (2,), "(N, K)")
    y = _check_labels(labels, "labels", p.shape[0], p.shape[1])
    n = p.shape[0]
    pred = np.argmax(p, axis=1)
    conf = p[np.arange(n), pred]
    correct = (pred == y).astype(np.float64)
    edges = np.arange(m + 1, dtype=np.float64) / m
    # bin b-1 (0-based) <=> edges[b-1] < conf <= edges[b]; searchsorted 'left' gives b
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, m - 1)
    count = np.bincount(idx, minlength=m)
    gap = np.bincount(idx, weights=correct, minlength=m) - np.bincount(idx, weights=conf, minlength=m)
    # sum_b |B_b|/N * |acc_b - conf_b| = sum_b |sum_{i in B_b} (correct_i - conf_i)| / N
    return float(np.sum(np.abs(gap[count > 0])) / n)


def brier_score(probs, labels) -> float:
    r"""Multi-class Brier score: ``(1/N) sum_i sum_k (probs[i, k] - 1[labels[i] = k])^2``.

    Brier's (1950) original form, in [0, 2].  For two classes it is twice the binary
    score ``mean((p_1 - y)^2)`` that e.g. ``sklearn.metrics.brier_score_loss`` reports
    for binary problems.

    Parameters
    ----------
    probs : array_like, shape (N, K)
        Predictive probabilities; each row in [0, 1] and summing to 1 (see Conventions).
    labels : array_like of int, shape (N,)
        True classes in ``0..K-1``.

    Returns
    -------
    float
        The mean squared error of the probability vectors, in [0, 2].

    Examples
    --------
    >>> import vigrad.metrics as metrics
    >>> # (0.25 + 0.25 + 0) and (0.04 + 0.04 + 0): mean 0.29
    >>> round(metrics.brier_score([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]], [0, 1]), 12)
    0.29
    """
    p = _check_probs(probs, "probs", (2,), "(N, K)")
    y = _check_labels(labels, "labels", p.shape[0], p.shape[1])
    n = p.shape[0]
    sq = np.einsum("ik,ik->i", p, p)  # sum_k p_k^2, then correct the true class:
    sq += 1.0 - 2.0 * p[np.arange(n), y]  # (p_y - 1)^2 - p_y^2 = 1 - 2 p_y
    return float(np.mean(sq))


def predictive_entropy(probs) -> np.ndarray:
    r"""Entropy of the predictive distribution, per example (nats): ``H[mean_s p_s]``.

    The total predictive uncertainty, ``-sum_k pbar_k log pbar_k`` with ``0 log 0 = 0``,
    between 0 (one class certain) and ``log K`` (uniform).

    Parameters
    ----------
    probs : array_like, shape (N, K) or (S, N, K)
        Predictive probabilities, or per-sample probabilities, which are averaged over
        the S samples first; each row (last axis) in [0, 1] and summing to 1 (see Conventions).

    Returns
    -------
    numpy.ndarray, float64, shape (N,)

    Examples
    --------
    >>> import numpy as np
    >>> import vigrad.metrics as metrics
    >>> h = metrics.predictive_entropy([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    >>> bool(np.isclose(h[0], np.log(4))), float(h[1])
    (True, 0.0)
    >>> samples = [[[1.0, 0.0]], [[0.0, 1.0]]]           # S = 2 samples, N = 1, K = 2
    >>> bool(np.isclose(metrics.predictive_entropy(samples)[0], np.log(2)))
    True
    """
    p = _check_probs(probs, "probs", (2, 3), "(N, K) or (S, N, K)")
    if p.ndim == 3:
        p = p.mean(axis=0)
    return _entropy(p)


def expected_entropy(sample_probs) -> np.ndarray:
    r"""Mean entropy of the per-sample predictive distributions: ``mean_s H[p_s]`` (nats).

    The aleatoric part of the predictive entropy: the uncertainty that remains when the
    weights are known.

    Parameters
    ----------
    sample_probs : array_like, shape (S, N, K)
        Probabilities under each of S posterior samples; each row (last axis) in [0, 1]
        and summing to 1 (see Conventions).

    Returns
    -------
    numpy.ndarray, float64, shape (N,)

    Examples
    --------
    >>> import vigrad.metrics as metrics
    >>> samples = [[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]   # S = 2, N = 2
    >>> h = metrics.expected_entropy(samples)
    >>> float(h[0]), round(float(h[1]), 6)                # confident samples; log 2
    (0.0, 0.693147)
    """
    p = _check_probs(sample_probs, "sample_probs", (3,), "(S, N, K)")
    return _entropy(p).mean(axis=0)


def mutual_information(sample_probs) -> np.ndarray:
    r"""Mutual information between the label and the weights, per example (nats).

    ``I[y; w] = H[mean_s p_s] - mean_s H[p_s]``: predictive entropy minus expected
    entropy, the epistemic part of the uncertainty (the BALD score of Houlsby et al.
    2011).  It is >= 0 by the concavity of entropy; values that come out negative by
    rounding (about machine epsilon) are clipped to 0.  It is at most ``log K`` and at
    most ``log S``.

    Parameters
    ----------
    sample_probs : array_like, shape (S, N, K)
        Probabilities under each of S posterior samples; each row (last axis) in [0, 1]
        and summing to 1 (see Conventions).

    Returns
    -------
    numpy.ndarray, float64, shape (N,)

    Examples
    --------
    Samples that confidently disagree carry log 2 nats about the weights; samples that
    agree carry none, however uncertain each is:

    >>> import vigrad.metrics as metrics
    >>> samples = [[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]   # S = 2, N = 2
    >>> mi = metrics.mutual_information(samples)
    >>> round(float(mi[0]), 6), float(mi[1])
    (0.693147, 0.0)
    """
    p = _check_probs(sample_probs, "sample_probs", (3,), "(S, N, K)")
    mi = _entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0)
    return np.maximum(mi, 0.0)


# -- regression -------------------------------------------------------------------------------

def rmse(pred_mean, y) -> float:
    r"""Root mean squared error ``sqrt(mean((pred_mean - y)^2))`` over all entries.

    Parameters
    ----------
    pred_mean : array_like
        Predictions (for a Bayesian model, the predictive mean), finite.
    y : array_like
        Targets, finite, the same shape as ``pred_mean`` (no broadcasting).

    Returns
    -------
    float

    Examples
    --------
    >>> import vigrad.metrics as metrics
    >>> metrics.rmse([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 0.0])
    2.0
    """
    m = _check_values(pred_mean, "pred_mean")
    t = _check_values(y, "y")
    if m.shape != t.shape:
        raise ValueError(f"pred_mean and y must have the same shape, got {m.shape} and {t.shape}")
    r = m - t
    return float(np.sqrt(np.mean(r * r)))


def gaussian_nll(mean, std, y) -> float:
    r"""Mean Gaussian negative log-likelihood ``-(1/n) sum_i log N(y_i | mean_i, std_i^2)``.

    Each term is ``0.5 log(2 pi) + log std_i + 0.5 ((y_i - mean_i) / std_i)^2``,
    constant included, so the value equals the mean of
    ``-scipy.stats.norm.logpdf(y, mean, std)``.  ``std`` is the predictive standard
    deviation (for a Bayesian regression model typically including the observation
    noise), not a variance.

    Parameters
    ----------
    mean : array_like
        Predictive means, finite.
    std : float or array_like
        Predictive standard deviations, finite and > 0: a scalar (shared) or an array of
        the shape of ``y``.
    y : array_like
        Targets, finite, the shape of ``mean`` (no broadcasting).

    Returns
    -------
    float

    Examples
    --------
    >>> import math
    >>> import vigrad.metrics as metrics
    >>> metrics.gaussian_nll([0.0], 1.0, [0.0]) == 0.5 * math.log(2 * math.pi)
    True
    >>> round(metrics.gaussian_nll([0.0, 1.0], [1.0, 2.0], [1.0, 1.0]), 6)
    1.515512
    """
    m = _check_values(mean, "mean")
    s = _check_values(std, "std")
    t = _check_values(y, "y")
    if m.shape != t.shape:
        raise ValueError(f"mean and y must have the same shape, got {m.shape} and {t.shape}")
    if s.ndim != 0 and s.shape != t.shape:
        raise ValueError(f"std must be a scalar or have the shape of y, {t.shape}, got shape {s.shape}")
    bad = ~(s > 0)
    if bad.any():
        where = _first_index(bad) if s.ndim else ()
        raise ValueError(f"std must be > 0, got {float(s[where])!r} at index {where}")
    z = (t - m) / s
    return float(np.mean(0.5 * z * z + np.log(s)) + _HALF_LOG_2PI)
