"""vigrad.metrics: predictive metrics for classification and regression.

Oracles: scikit-learn's log_loss / accuracy_score / brier_score_loss (when installed),
scipy.stats.entropy and scipy.stats.norm.logpdf, an independent loop-per-bin ECE in the
style of Guo et al.'s code, hand-computed small examples, closed forms (uniform
predictions have entropy log K; identical samples have zero mutual information;
confidently disagreeing samples have log 2), and the sampling distribution of the ECE
of a calibrated predictor (bound derived in test_ece_of_calibrated_predictor_is_small).
"""

import doctest
import math

import numpy as np
import pytest
from scipy import stats

import vigrad.metrics as metrics

LOG2 = math.log(2.0)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def random_probs(n, k, seed, scale=2.0):
    """(n, k) probabilities: softmax of N(0, scale^2) logits (rows bounded away from 0 for
    moderate scale, so eps clipping never matters)."""
    return softmax(np.random.default_rng(seed).normal(0.0, scale, (n, k)))


def sample_labels(probs, rng):
    """One label per row drawn from the row's categorical distribution (inverse CDF)."""
    u = rng.random(probs.shape[0])
    return np.minimum((u[:, None] > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


def ece_reference(probs, labels, num_bins):
    """Guo et al. (2017): loop over bins (lo, hi], weight |acc - conf| by the bin's share."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    ece = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return ece


def test_docstring_examples_run():
    result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_module_surface():
    expected = {"nll", "accuracy", "expected_calibration_error", "brier_score", "predictive_entropy",
                "mutual_information", "expected_entropy", "rmse", "gaussian_nll"}
    assert set(metrics.__all__) == expected
    for name in metrics.__all__:
        assert callable(getattr(metrics, name))
        assert "Examples" in getattr(metrics, name).__doc__


# -- nll --------------------------------------------------------------------------------------

def test_nll_hand_example():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    got = metrics.nll(probs, [0, 1, 0])
    assert type(got) is float
    assert got == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.3)) / 3, rel=1e-15)


def test_nll_matches_sklearn_log_loss():
    skm = pytest.importorskip("sklearn.metrics")
    for k in (2, 3, 7):
        p = random_probs(500, k, seed=k)
        y = sample_labels(p, np.random.default_rng(100 + k))
        assert metrics.nll(p, y) == pytest.approx(skm.log_loss(y, p, labels=np.arange(k)), rel=1e-12)


def test_nll_clips_the_true_label_probability_at_eps():
    probs = [[1.0, 0.0], [0.5, 0.5]]
    assert metrics.nll(probs, [1, 0]) == pytest.approx((-math.log(1e-12) + LOG2) / 2, rel=1e-14)
    assert metrics.nll(probs, [1, 0], eps=1e-3) == pytest.approx((-math.log(1e-3) + LOG2) / 2, rel=1e-14)
    # probabilities above eps are untouched; a certain, correct prediction costs exactly 0 (not -0.0)
    assert metrics.nll(probs, [0, 0], eps=0.4) == pytest.approx(LOG2 / 2, rel=1e-15)
    zero = metrics.nll([[1.0, 0.0]], [0])
    assert zero == 0.0 and math.copysign(1.0, zero) == 1.0


# -- accuracy ---------------------------------------------------------------------------------

def test_accuracy_matches_sklearn_accuracy_score():
    skm = pytest.importorskip("sklearn.metrics")
    p = random_probs(1000, 5, seed=3)
    y = sample_labels(p, np.random.default_rng(4))
    expected = skm.accuracy_score(y, p.argmax(axis=1))
    assert metrics.accuracy(p, y) == expected
    assert metrics.accuracy(p.argmax(axis=1), y) == expected


def test_accuracy_hand_examples_and_ties():
    # ties go to the lowest class: [0.5, 0.5] predicts class 0
    assert metrics.accuracy([[0.5, 0.5], [0.5, 0.5]], [0, 1]) == 0.5
    assert metrics.accuracy([[0.2, 0.4, 0.4]], [1]) == 1.0
    assert metrics.accuracy([3, 1, 4, 1, 5], [3, 1, 4, 1, 9]) == 0.8
    assert metrics.accuracy(np.array([1.0, 2.0]), [1, 2]) == 1.0     # whole-number floats are labels
    got = metrics.accuracy([[1.0, 0.0]], [1])
    assert type(got) is float and got == 0.0
    # the predicted labels' range is not tied to any K
    assert metrics.accuracy(np.array([10**12], dtype=np.uint64), [10**12]) == 1.0


# -- expected calibration error ---------------------------------------------------------------

def test_ece_hand_example():
    """Bins (0, 0.5], (0.5, 1].  Bin 1: [0.5, 0.5] (predicts 0, label 1): acc 0, conf 0.5.
    Bin 2: conf 0.9 right, 0.8 wrong, 0.7 right: acc 2/3, conf 0.8.
    ECE = 1/4 * 0.5 + 3/4 * |2/3 - 0.8| = 0.125 + 0.1 = 0.225."""
    probs = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]
    assert metrics.expected_calibration_error(probs, [1, 0, 0, 0], num_bins=2) == pytest.approx(0.225, abs=1e-15)


def test_ece_bins_include_their_right_edge():
    # num_bins = 5: confidence 0.6 is in (0.4, 0.6] with 0.5; 0.8 in (0.6, 0.8]; 1.0 in (0.8, 1]
    probs = [[0.6, 0.4], [0.5, 0.5], [0.8, 0.2], [1.0, 0.0]]
    labels = [0, 1, 0, 0]
    # bin (0.4, 0.6]: acc 1/2, conf 0.55 -> 2/4 * 0.05; (0.6, 0.8]: 1 vs 0.8 -> 1/4 * 0.2; (0.8, 1]: 0
    expected = 0.5 * 0.05 + 0.25 * 0.2
    assert metrics.expected_calibration_error(probs, labels, num_bins=5) == pytest.approx(expected, abs=1e-15)
    # were 0.6 put in (0.6, 0.8] instead, that bin would be acc 1, conf 0.7 and the result differs
    wrong = 0.25 * 0.5 + 0.5 * 0.3
    assert abs(metrics.expected_calibration_error(probs, labels, num_bins=5) - wrong) > 0.05


@pytest.mark.parametrize("num_bins", [1, 2, 10, 15, 37])
def test_ece_matches_loop_reference(num_bins):
    p = random_probs(2000, 4, seed=num_bins)
    y = sample_labels(softmax(np.log(p) / 0.7), np.random.default_rng(num_bins))
    got = metrics.expected_calibration_error(p, y, num_bins=num_bins)
    assert got == pytest.approx(ece_reference(p, y, num_bins), rel=1e-12, abs=1e-15)
    assert 0.0 <= got <= 1.0


def test_ece_single_bin_is_gap_between_accuracy_and_mean_confidence():
    p = random_probs(300, 3, seed=9)
    y = sample_labels(p, np.random.default_rng(9))
    expected = abs(metrics.accuracy(p, y) - p.max(axis=1).mean())
    assert metrics.expected_calibration_error(p, y, num_bins=1) == pytest.approx(expected, rel=1e-12)


def test_ece_of_certain_correct_predictions_is_zero():
    assert metrics.expected_calibration_error(np.eye(4), [0, 1, 2, 3]) == 0.0
    assert metrics.expected_calibration_error(np.eye(4), [1, 2, 3, 0]) == 1.0


N_CAL, M_CAL, DELTA = 20000, 15, 1e-6
# E[ECE] <= 0.5 sqrt(M / N) plus the deviation that is exceeded with probability <= DELTA.
ECE_BOUND = 0.5 * math.sqrt(M_CAL / N_CAL) + math.sqrt(math.log(1 / DELTA) / (2 * N_CAL))  # 0.0323


def calibration_problem(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (N_CAL, 3))
    p = softmax(logits)
    return logits, p, sample_labels(p, rng)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_of_calibrated_predictor_is_small(seed):
    """Labels drawn from the stated probabilities: a calibrated predictor.

    Bound.  Given the probabilities (hence the bins), the labels are independent.  With
    g_b = sum_{i in B_b} (1[y_i = yhat_i] - conf_i), ECE = sum_b |g_b| / N.  For a
    calibrated predictor E g_b = 0 and Var g_b = sum conf_i (1 - conf_i) <= n_b / 4, so
    E ECE <= sum_b sqrt(n_b) / (2 N) <= sqrt(M N) / (2 N) = 0.5 sqrt(M / N) (Cauchy-Schwarz)
    = 0.0137 for N = 20000, M = 15.  Changing one label moves the ECE by at most 1 / N,
    so by McDiarmid P(ECE > E ECE + t) <= exp(-2 N t^2); t = sqrt(log(1e6) / (2 N)) =
    0.0186 makes that 1e-6.  Total: ECE_BOUND = 0.0323.  (Seeds 0-4 give 0.004-0.010.)
    """
    _, p, y = calibration_problem(seed)
    assert metrics.expected_calibration_error(p, y, num_bins=M_CAL) < ECE_BOUND


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_of_overconfident_predictor_is_clearly_larger(seed):
    """The same labels, but the predictor reports softmax(logits / 0.4): sharper than the
    truth.  Its population ECE, with each 1[y_i = yhat_i] replaced by its expectation
    p_i[yhat_i], is about 0.143; the sampled ECE differs from it by at most
    sum_b |g_b - E g_b| / N, which obeys the same bound as above."""
    logits, p, y = calibration_problem(seed)
    q = softmax(logits / 0.4)
    ece = metrics.expected_calibration_error(q, y, num_bins=M_CAL)
    # population ECE: expected correctness in place of the labels, bins as in the docstring
    rows = np.arange(N_CAL)
    pred, conf = q.argmax(axis=1), q.max(axis=1)
    assert np.array_equal(pred, p.argmax(axis=1))
    b = np.clip(np.ceil(conf * M_CAL).astype(int) - 1, 0, M_CAL - 1)
    gap = np.bincount(b, weights=p[rows, pred] - conf, minlength=M_CAL)
    population = np.abs(gap).sum() / N_CAL
    assert abs(ece - population) < ECE_BOUND
    assert population > 3 * ECE_BOUND
    assert ece > 3 * ECE_BOUND > 3 * metrics.expected_calibration_error(p, y, num_bins=M_CAL)


# -- Brier score ------------------------------------------------------------------------------

def test_brier_hand_example_and_extremes():
    # (0.3^2 + 0.2^2 + 0.1^2) and (0.5^2 + 0.5^2): mean (0.14 + 0.5) / 2
    got = metrics.brier_score([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], [0, 1])
    assert type(got) is float and got == pytest.approx(0.32, abs=1e-15)
    assert metrics.brier_score(np.eye(3), [0, 1, 2]) == 0.0
    assert metrics.brier_score(np.eye(3), [1, 2, 0]) == 2.0
    assert metrics.brier_score(np.full((2, 4), 0.25), [0, 3]) == pytest.approx(0.75, abs=1e-15)


def test_brier_binary_is_twice_sklearn_brier_score_loss():
    skm = pytest.importorskip("sklearn.metrics")
    p = random_probs(800, 2, seed=5)
    y = sample_labels(p, np.random.default_rng(6))
    assert metrics.brier_score(p, y) == pytest.approx(2 * skm.brier_score_loss(y, p[:, 1]), rel=1e-12)


def test_brier_multiclass_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    import inspect
    if "scale_by_half" not in inspect.signature(skm.brier_score_loss).parameters:
        pytest.skip("this scikit-learn has no multi-class brier_score_loss")
    p = random_probs(800, 5, seed=7)
    y = sample_labels(p, np.random.default_rng(8))
    expected = skm.brier_score_loss(y, p, labels=np.arange(5), scale_by_half=False)
    assert metrics.brier_score(p, y) == pytest.approx(expected, rel=1e-12)


# -- entropy and its decomposition ------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 10, 1000])
def test_entropy_of_uniform_prediction_is_log_k(k):
    h = metrics.predictive_entropy(np.full((3, k), 1.0 / k))
    assert h.dtype == np.float64 and h.shape == (3,)
    np.testing.assert_allclose(h, math.log(k), rtol=1e-13, atol=1e-15)
    stacked = np.full((4, 3, k), 1.0 / k)
    np.testing.assert_allclose(metrics.expected_entropy(stacked), math.log(k), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(metrics.mutual_information(stacked), 0.0, atol=1e-13)


def test_entropies_match_scipy():
    rng = np.random.default_rng(11)
    s = softmax(rng.normal(0.0, 2.0, (6, 50, 4)))
    s[0, 0] = [1.0, 0.0, 0.0, 0.0]                       # 0 log 0 = 0
    np.testing.assert_allclose(metrics.predictive_entropy(s[2]), stats.entropy(s[2], axis=1), rtol=1e-13)
    np.testing.assert_allclose(metrics.predictive_entropy(s), stats.entropy(s.mean(axis=0), axis=1), rtol=1e-13)
    np.testing.assert_allclose(metrics.expected_entropy(s), stats.entropy(s, axis=2).mean(axis=0), rtol=1e-13)
    assert metrics.predictive_entropy(s[0])[0] == 0.0


def test_decomposition_total_is_epistemic_plus_aleatoric():
    rng = np.random.default_rng(12)
    s = softmax(rng.normal(0.0, 3.0, (20, 100, 5)))
    total, mi, ale = metrics.predictive_entropy(s), metrics.mutual_information(s), metrics.expected_entropy(s)
    np.testing.assert_allclose(total, mi + ale, rtol=1e-12, atol=1e-14)
    assert (mi >= 0).all() and (mi <= math.log(5) + 1e-12).all()
    for arr in (total, mi, ale):
        assert arr.dtype == np.float64 and arr.shape == (100,)


def test_mutual_information_of_identical_samples_is_zero():
    p = random_probs(40, 6, seed=13)
    mi = metrics.mutual_information(np.stack([p] * 7))
    assert (mi >= 0).all() and (mi < 1e-14).all()       # clipped: never a rounding negative
    assert metrics.mutual_information(p[None]).max() == 0.0      # one sample: exactly 0


def test_mutual_information_of_confidently_disagreeing_samples_is_log2():
    s = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert metrics.mutual_information(s)[0] == pytest.approx(LOG2, rel=1e-15)
    assert metrics.expected_entropy(s)[0] == 0.0
    # nearly confident: log 2 - h(a), with h the binary entropy, -> log 2 as a -> 0
    for a in (1e-2, 1e-4, 1e-8):
        s = np.array([[[1 - a, a]], [[a, 1 - a]]])
        h = -(a * math.log(a) + (1 - a) * math.log1p(-a))
        assert metrics.mutual_information(s)[0] == pytest.approx(LOG2 - h, rel=1e-12)
    # S = 4 samples, each certain of a different class of K = 4: log 4 (the log S bound)
    assert metrics.mutual_information(np.eye(4)[:, None, :])[0] == pytest.approx(math.log(4), rel=1e-15)


# -- regression -------------------------------------------------------------------------------

def test_rmse_hand_examples():
    got = metrics.rmse([1.0, 2.0, 3.0], [1.0, 5.0, 7.0])          # sqrt((0 + 9 + 16) / 3)
    assert type(got) is float and got == pytest.approx(math.sqrt(25 / 3), rel=1e-15)
    assert metrics.rmse(np.full((2, 3), 4.0), np.ones((2, 3))) == 3.0
    assert metrics.rmse(2.5, 2.5) == 0.0


@pytest.mark.parametrize("shared_std", [True, False])
def test_gaussian_nll_matches_scipy_norm_logpdf(shared_std):
    rng = np.random.default_rng(14)
    mean, y = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    std = 0.7 if shared_std else rng.uniform(0.1, 3.0, (50, 2))
    got = metrics.gaussian_nll(mean, std, y)
    assert type(got) is float
    assert got == pytest.approx(-stats.norm.logpdf(y, mean, std).mean(), rel=1e-13)


def test_gaussian_nll_constant_is_included():
    assert metrics.gaussian_nll([3.0], [1.0], [3.0]) == pytest.approx(0.5 * math.log(2 * math.pi), rel=1e-15)
    assert metrics.gaussian_nll([0.0], 2.0, [2.0]) == pytest.approx(0.5 * math.log(2 * math.pi) + math.log(2) + 0.5,
                                                                    rel=1e-15)


# -- dtypes, copies -------------------------------------------------------------------------

def all_calls(dtype):
    rng = np.random.default_rng(15)
    s = softmax(rng.normal(0.0, 2.0, (5, 30, 4))).astype(dtype)
    p = s.mean(axis=0, dtype=np.float64).astype(dtype)
    y = sample_labels(p.astype(np.float64), rng)
    mean, target = rng.normal(size=30).astype(dtype), rng.normal(size=30).astype(dtype)
    std = rng.uniform(0.5, 2.0, 30).astype(dtype)
    args = {
        "nll": (p, y), "accuracy": (p, y), "expected_calibration_error": (p, y), "brier_score": (p, y),
        "predictive_entropy": (s,), "mutual_information": (s,), "expected_entropy": (s,),
        "rmse": (mean, target), "gaussian_nll": (mean, std, target),
    }
    return args


def test_float32_inputs_agree_with_float64():
    a32, a64 = all_calls(np.float32), all_calls(np.float64)
    for name in metrics.__all__:
        fn = getattr(metrics, name)
        widened = tuple(x.astype(np.float64) if x.dtype == np.float32 else x for x in a32[name])
        got, ref = fn(*a32[name]), fn(*widened)
        if isinstance(ref, float):
            assert type(got) is float, name
            assert got == pytest.approx(ref, rel=1e-14, abs=1e-15), name       # arithmetic is in float64
        else:
            assert got.dtype == np.float64 and got.shape == (30,), name
            np.testing.assert_allclose(got, ref, rtol=1e-14, atol=1e-15, err_msg=name)
        # and float32 rounding of the inputs changes the result only slightly
        np.testing.assert_allclose(fn(*a64[name]), got, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_caller_arrays_are_not_modified(dtype):
    args = all_calls(dtype)
    for name, arrays in args.items():
        before = [a.copy() for a in arrays]
        for a in arrays:
            a.flags.writeable = False                          # any write would raise
        getattr(metrics, name)(*arrays)
        for a, b in zip(arrays, before):
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_integer_and_list_inputs_are_accepted():
    assert metrics.nll(np.eye(2, dtype=np.int64), [0, 1]) == 0.0
    assert metrics.brier_score([[1, 0], [0, 1]], np.array([0.0, 1.0])) == 0.0
    assert metrics.accuracy([[1, 0]], np.array([0], dtype=np.uint8)) == 1.0
    assert metrics.rmse([1, 2], [1, 4]) == pytest.approx(math.sqrt(2.0))


def test_row_sum_tolerance_is_1e6():
    ok = np.array([[0.5 + 4e-7, 0.5]])
    assert metrics.brier_score(ok, [0]) == pytest.approx((0.5 - 4e-7) ** 2 + 0.25)
    with pytest.raises(ValueError, match=r"probs must sum to 1 .*within 1e-06.*index \(0,\)"):
        metrics.brier_score(np.array([[0.5 + 2e-6, 0.5]]), [0])


# -- errors ---------------------------------------------------------------------------------

P = [[0.5, 0.5], [0.1, 0.9]]
S = [[[0.5, 0.5]], [[0.1, 0.9]]]
CLASSIFIERS = [metrics.nll, metrics.accuracy, metrics.expected_calibration_error, metrics.brier_score]
BAD_PROBS = [
    ([[0.5, np.nan], [0.1, 0.9]], ValueError, r"must be finite.*nan.*\(0, 1\)"),
    ([[0.5, 0.5], [np.inf, 0.9]], ValueError, r"must be finite.*inf.*\(1, 0\)"),
    ([[0.5, 0.5], [-0.2, 1.2]], ValueError, r"probabilities in \[0, 1\], got 2 value\(s\) outside.*-0.2, at index \(1, 0\)"),
    ([[0.5, 0.5], [0.1, 0.8]], ValueError, r"sum to 1 along its last axis.*index \(1,\).*0.9"),
    (np.zeros((0, 2)), ValueError, r"must not be empty.*\(0, 2\)"),
    (np.zeros((2, 0)), ValueError, r"must not be empty.*\(2, 0\)"),
    ([[True, False], [False, True]], TypeError, "bool"),
    ([["a", "b"], ["c", "d"]], TypeError, "dtype"),
    (np.array([[0.5, 0.5], [0.1, 0.9]], dtype=complex), TypeError, "complex"),
]


@pytest.mark.parametrize("fn", CLASSIFIERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("probs, exc, match", BAD_PROBS)
def test_classification_metrics_refuse_bad_probs(fn, probs, exc, match):
    name = "probs_or_labels_pred" if fn is metrics.accuracy else "probs"
    with pytest.raises(exc, match=name + ".*" + match if exc is ValueError else name):
        fn(probs, [0, 1])


@pytest.mark.parametrize("fn", [metrics.nll, metrics.expected_calibration_error, metrics.brier_score],
                         ids=lambda f: f.__name__)
def test_classification_metrics_refuse_probs_of_wrong_rank(fn):
    for probs in ([0.5, 0.5], S, 0.5):
        with pytest.raises(ValueError, match=r"probs must have shape \(N, K\), got shape"):
            fn(probs, [0, 1])


BAD_LABELS = [
    ([0, 1, 1], ValueError, r"labels must have length N = 2 to match .*, got length 3"),
    ([0, 2], ValueError, r"labels must be in \[0, 2\) \(K = 2 classes\), got 2 at index 1"),
    ([-1, 0], ValueError, r"labels must be >= 0, got -1 at index 0"),
    ([0.0, 1.5], ValueError, r"labels must be whole numbers.*1.5.*index 1"),
    ([0.0, np.nan], ValueError, r"labels must be whole numbers.*nan.*index 1"),
    ([[0, 1]], ValueError, r"labels must be 1-D, shape \(N,\), got shape \(1, 2\)"),
    (7, ValueError, r"labels must be 1-D"),
    ([True, False], TypeError, r"labels must be integer class labels, got bool"),
    (["0", "1"], TypeError, r"labels must be integer class labels .*got dtype"),
    (None, TypeError, r"labels must be integer class labels .*got dtype object"),
]


@pytest.mark.parametrize("fn", CLASSIFIERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("labels, exc, match", BAD_LABELS)
def test_classification_metrics_refuse_bad_labels(fn, labels, exc, match):
    with pytest.raises(exc, match=match):
        fn(P, labels)


def test_empty_labels_are_refused():
    with pytest.raises(ValueError, match=r"probs_or_labels_pred must not be empty"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match=r"labels must not be empty"):
        metrics.accuracy([0], [])


def test_accuracy_specific_errors():
    with pytest.raises(ValueError, match=r"probs_or_labels_pred must have shape \(N, K\) .* or \(N,\) .*3-D"):
        metrics.accuracy(S, [0, 1])
    with pytest.raises(ValueError, match=r"probs_or_labels_pred must have shape .*0-D"):
        metrics.accuracy(1, [1])
    with pytest.raises(ValueError, match=r"probs_or_labels_pred must be >= 0, got -3"):
        metrics.accuracy([-3, 1], [0, 1])
    with pytest.raises(ValueError, match=r"probs_or_labels_pred must be whole numbers"):
        metrics.accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match=r"labels must have length N = 2 to match probs_or_labels_pred, got length 1"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match=r"probs_or_labels_pred must be < 2\*\*63"):
        metrics.accuracy(np.array([2.0**63]), [0])
    with pytest.raises(TypeError, match=r"probs_or_labels_pred must be an array"):
        metrics.accuracy([[0.5, 0.5], [1.0]], [0, 1])


@pytest.mark.parametrize("eps, exc, match", [
    (0.0, ValueError, r"eps must be > 0, got 0.0"),
    (-1e-3, ValueError, r"eps must be > 0"),
    (1.0, ValueError, r"eps must be in \(0, 1\), got 1.0"),
    (np.nan, ValueError, r"eps must be finite"),
    ("small", TypeError, r"eps must be a real number, got str"),
    (True, TypeError, r"eps must be a real number, got bool"),
])
def test_nll_refuses_bad_eps(eps, exc, match):
    with pytest.raises(exc, match=match):
        metrics.nll(P, [0, 1], eps=eps)


@pytest.mark.parametrize("num_bins, exc, match", [
    (0, ValueError, r"num_bins must be >= 1, got 0"),
    (-5, ValueError, r"num_bins must be >= 1, got -5"),
    (2.5, TypeError, r"num_bins must be an integer, got float"),
    (True, TypeError, r"num_bins must be an integer, got bool"),
    (None, TypeError, r"num_bins must be an integer, got NoneType"),
])
def test_ece_refuses_bad_num_bins(num_bins, exc, match):
    with pytest.raises(exc, match=match):
        metrics.expected_calibration_error(P, [0, 1], num_bins=num_bins)


@pytest.mark.parametrize("fn, name", [(metrics.mutual_information, "sample_probs"),
                                      (metrics.expected_entropy, "sample_probs"),
                                      (metrics.predictive_entropy, "probs")])
def test_entropy_functions_refuse_bad_input(fn, name):
    with pytest.raises(ValueError, match=name + r" must be finite"):
        fn([[[0.5, np.nan]], [[0.1, 0.9]]])
    with pytest.raises(ValueError, match=name + r" must be probabilities in \[0, 1\]"):
        fn([[[1.5, -0.5]], [[0.1, 0.9]]])
    with pytest.raises(ValueError, match=name + r" must sum to 1 along its last axis.*index \(1, 0\)"):
        fn([[[0.5, 0.5]], [[0.1, 0.1]]])
    for shape in ((0, 2, 2), (2, 0, 2), (2, 2, 0)):
        with pytest.raises(ValueError, match=name + r" must not be empty"):
            fn(np.zeros(shape))
    with pytest.raises(TypeError, match=name):
        fn(np.ones((1, 1, 1), dtype=bool))
    for bad in ([0.5, 0.5], np.full((1, 1, 1, 2), 0.5)):
        with pytest.raises(ValueError, match=name + r" must have shape .*got shape"):
            fn(bad)


def test_sample_functions_refuse_2d_input():
    for fn in (metrics.mutual_information, metrics.expected_entropy):
        with pytest.raises(ValueError, match=r"sample_probs must have shape \(S, N, K\), got shape \(2, 2\) \(2-D\)"):
            fn(P)


@pytest.mark.parametrize("fn", [metrics.rmse, lambda a, b: metrics.gaussian_nll(a, 1.0, b)],
                         ids=["rmse", "gaussian_nll"])
def test_regression_metrics_refuse_bad_values(fn):
    first = "pred_mean" if fn is metrics.rmse else "mean"
    with pytest.raises(ValueError, match=first + r" and y must have the same shape, got \(3,\) and \(3, 1\)"):
        fn([1.0, 2.0, 3.0], [[1.0], [2.0], [3.0]])
    with pytest.raises(ValueError, match=first + r" must be finite.*nan.*\(1,\)"):
        fn([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"y must be finite.*inf"):
        fn([1.0, 2.0], [1.0, -np.inf])
    with pytest.raises(ValueError, match=first + r" must not be empty"):
        fn([], [])
    with pytest.raises(TypeError, match=first + ".*bool"):
        fn([True], [1.0])
    with pytest.raises(TypeError, match=r"y must be .*dtype"):
        fn([1.0], ["1.0"])


@pytest.mark.parametrize("std, exc, match", [
    (0.0, ValueError, r"std must be > 0, got 0.0 at index \(\)"),
    (-1.0, ValueError, r"std must be > 0, got -1.0"),
    ([1.0, 0.0, 2.0], ValueError, r"std must be > 0, got 0.0 at index \(1,\)"),
    ([1.0, 2.0], ValueError, r"std must be a scalar or have the shape of y, \(3,\), got shape \(2,\)"),
    ([1.0, np.inf, 1.0], ValueError, r"std must be finite"),
    (np.nan, ValueError, r"std must be finite"),
    ([], ValueError, r"std must not be empty"),
    ("1", TypeError, r"std must be .*dtype"),
])
def test_gaussian_nll_refuses_bad_std(std, exc, match):
    with pytest.raises(exc, match=match):
        metrics.gaussian_nll([0.0, 1.0, 2.0], std, [0.5, 1.0, 1.5])
