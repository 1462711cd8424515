"""vigrad.data: Algorithm 1 (shuffle) covers every item once per epoch, Algorithm 2 (replacement)
draws uniformly and independently (chi-square tests at significance 1e-3 with fixed seeds), the
scale makes the minibatch sum unbiased (exact enumeration and Monte Carlo within 4 standard
errors), determinism by seed, resume via start_step, and the errors."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

import vigrad.data as data

ALPHA = 1e-3  # significance of the chi-square tests (fixed seeds: they pass or fail deterministically)


def _chi2_pvalue(counts):
    counts = np.asarray(counts, dtype=float).ravel()
    expected = counts.sum() / counts.size
    stat = ((counts - expected) ** 2 / expected).sum()
    return stats.chi2.sf(stat, counts.size - 1)


# ----------------------------------------------------------------------------- Algorithm 1


@pytest.mark.parametrize("n,batch_size,drop_last", [
    (10, 3, False), (10, 3, True), (9, 3, False), (9, 3, True), (1, 1, False), (7, 7, True),
    (100, 16, False), (100, 16, True), (5, 1, False),
])
def test_shuffle_covers_every_index_once_per_epoch(n, batch_size, drop_last):
    num_epochs = 3
    per_epoch = data.num_batches(n, batch_size, drop_last=drop_last)
    batches = list(data.minibatches(n, batch_size, num_epochs=num_epochs, drop_last=drop_last, rng=7))
    assert len(batches) == num_epochs * per_epoch
    assert [b.step for b in batches] == list(range(len(batches)))
    for e in range(num_epochs):
        epoch = batches[e * per_epoch:(e + 1) * per_epoch]
        assert all(b.epoch == e for b in epoch)
        sizes = [len(b.indices) for b in epoch]
        idx = np.concatenate([b.indices for b in epoch])
        assert idx.dtype == np.int64
        if drop_last:
            assert sizes == [batch_size] * (n // batch_size)
            assert len(np.unique(idx)) == len(idx) and idx.min() >= 0 and idx.max() < n
        else:
            last = n - batch_size * (per_epoch - 1)
            assert sizes == [batch_size] * (per_epoch - 1) + [last]
            np.testing.assert_array_equal(np.sort(idx), np.arange(n))
        for b in epoch:
            assert b.scale == n / len(b.indices)


def test_shuffle_drop_last_drops_different_items_each_epoch():
    """The dropped remainder comes from each epoch's own permutation, so over epochs every item is used."""
    batches = data.minibatches(10, 3, num_epochs=20, drop_last=True, rng=1)
    seen = np.concatenate([b.indices for b in batches])
    assert set(seen.tolist()) == set(range(10))


def test_shuffle_permutations_are_uniform():
    """n = 4, one batch per epoch: the 24 orders occur equally often over 2400 epochs (chi-square,
    23 dof)."""
    perms = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.zeros(24)
    for b in data.minibatches(4, 4, num_epochs=2400, rng=2024):
        counts[perms[tuple(b.indices.tolist())]] += 1
    assert counts.min() > 0
    assert _chi2_pvalue(counts) > ALPHA


# ----------------------------------------------------------------------------- Algorithm 2


def test_replacement_is_uniform_and_independent():
    """n = 10, 3000 batches of 7: the 21000 draws are uniform over 0..9 (9 dof), and the pairs at
    positions (0, 1) are uniform over the 100 ordered pairs, repeats included (99 dof)."""
    n, bs, steps = 10, 7, 3000
    batches = list(data.minibatches(n, bs, mode="replacement", num_steps=steps, rng=11))
    idx = np.stack([b.indices for b in batches])
    assert idx.shape == (steps, bs) and idx.dtype == np.int64
    assert _chi2_pvalue(np.bincount(idx.ravel(), minlength=n)) > ALPHA
    assert _chi2_pvalue(np.bincount(idx[:, 0] * n + idx[:, 1], minlength=n * n)) > ALPHA
    # with replacement: batches with a repeated item are the norm (P(no repeat) = 10!/(3! 10^7) = 0.06)
    repeats = np.mean([len(np.unique(r)) < bs for r in idx])
    assert abs(repeats - (1 - math.factorial(10) / (math.factorial(3) * 10**7))) < 4 * math.sqrt(0.06 * 0.94 / steps)


def test_replacement_fields():
    batches = list(data.minibatches(10, 4, mode="replacement", num_steps=8, rng=0))
    assert [b.step for b in batches] == list(range(8))
    assert [b.epoch for b in batches] == [s * 4 // 10 for s in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert all(b.scale == 2.5 for b in batches)
    # batch_size > n is allowed with replacement
    big = list(data.minibatches(3, 5, mode="replacement", num_steps=2, rng=0))
    assert all(len(b.indices) == 5 and b.scale == 0.6 for b in big)


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("mode", ["shuffle", "replacement"])
def test_scale_makes_the_sum_unbiased_exactly(mode):
    """E[scale * sum_{i in B} l_i] = sum_i l_i, by exact enumeration of every batch of the
    stream's sizes: all subsets of that size ("shuffle": a uniform permutation makes each
    equally likely) or all ordered tuples of uniform draws ("replacement")."""
    n = 6
    ll = np.array([-0.3, -1.7, -0.2, -4.0, -0.9, -2.5])
    kw = dict(num_epochs=1) if mode == "shuffle" else dict(num_steps=2)
    batches = list(data.minibatches(n, 4, mode=mode, rng=3, **kw))
    sizes = {len(b.indices) for b in batches}
    assert sizes == ({4, 2} if mode == "shuffle" else {4})
    for b in batches:
        k = len(b.indices)
        if mode == "shuffle":
            support = list(itertools.combinations(range(n), k))
        else:
            support = list(itertools.product(range(n), repeat=k))
        mean = np.mean([b.scale * ll[list(s)].sum() for s in support])
        assert mean == pytest.approx(ll.sum(), rel=1e-13)


@pytest.mark.parametrize("mode", ["shuffle", "replacement"])
def test_scale_makes_the_sum_unbiased_monte_carlo(mode):
    """The stream's own batches: the mean of scale * sum_B l over 4000 full batches is within 4
    standard errors of sum l (SE from the closed-form variance of the estimator)."""
    n, bs, steps = 50, 5, 4000
    ll = np.random.default_rng(0).normal(-1.0, 1.0, size=n)
    kw = dict(num_steps=steps, drop_last=True) if mode == "shuffle" else dict(num_steps=steps)
    est = np.array([b.scale * ll[b.indices].sum() for b in data.minibatches(n, bs, mode=mode, rng=5, **kw)])
    var_pop = ll.var()
    # Var[scale * sum_B] = n^2 var_pop / bs, times the finite-population correction without replacement
    var = n**2 * var_pop / bs * ((n - bs) / (n - 1) if mode == "shuffle" else 1.0)
    # batches within one shuffle epoch are negatively correlated, so this SE is conservative there
    assert abs(est.mean() - ll.sum()) < 4 * math.sqrt(var / steps)
    assert est.var() == pytest.approx(var, rel=0.1)


# ----------------------------------------------------------------------------- determinism / resume


@pytest.mark.parametrize("mode,kw", [("shuffle", dict(num_epochs=3)), ("replacement", dict(num_steps=12))])
def test_determinism_by_seed(mode, kw):
    def run(rng):
        return [b.indices.tolist() for b in data.minibatches(11, 4, mode=mode, rng=rng, **kw)]

    assert run(42) == run(42) == run(np.random.default_rng(42))
    assert run(42) != run(43)
    gen = np.random.default_rng(42)
    assert run(gen) != run(gen)  # a Generator is advanced by each call
    assert len(run(None)) == len(run(0))


def test_epochs_use_different_permutations():
    orders = [b.indices.tolist() for b in data.minibatches(20, 20, num_epochs=5, rng=0)]
    assert len({tuple(o) for o in orders}) == 5


@pytest.mark.parametrize("mode,kw", [
    ("shuffle", dict(num_epochs=4)),
    ("shuffle", dict(num_epochs=4, drop_last=True)),
    ("shuffle", dict(num_steps=13)),
    ("shuffle", dict(num_epochs=2, num_steps=100)),
    ("replacement", dict(num_steps=15)),
])
def test_resume_with_start_step_equals_uninterrupted_stream(mode, kw):
    full = list(data.minibatches(10, 3, mode=mode, rng=9, **kw))
    for k in range(len(full) + 1):
        rest = list(data.minibatches(10, 3, mode=mode, rng=9, start_step=k, **kw))
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            np.testing.assert_array_equal(a.indices, b.indices)
            assert (a.scale, a.epoch, a.step) == (b.scale, b.epoch, b.step)


def test_stopping_rules():
    assert len(list(data.minibatches(10, 3, rng=0))) == 4  # shuffle default: one epoch
    assert len(list(data.minibatches(10, 3, num_steps=9, rng=0))) == 9  # unlimited epochs, 9 steps
    assert len(list(data.minibatches(10, 3, num_epochs=2, num_steps=100, rng=0))) == 8  # first to stop
    assert len(list(data.minibatches(10, 3, num_epochs=2, num_steps=5, rng=0))) == 5
    assert list(data.minibatches(10, 3, num_epochs=0, rng=0)) == []
    assert list(data.minibatches(10, 3, mode="replacement", num_steps=0, rng=0)) == []


def test_yielded_indices_are_fresh_arrays():
    it = data.minibatches(6, 2, num_epochs=1, rng=0)
    first = next(it)
    first.indices[:] = -1
    rest = np.concatenate([b.indices for b in it])
    assert len(set(rest.tolist())) == 4 and rest.min() >= 0


def test_num_batches():
    assert data.num_batches(10, 3) == 4
    assert data.num_batches(10, 3, drop_last=True) == 3
    assert data.num_batches(9, 3) == data.num_batches(9, 3, drop_last=True) == 3
    assert data.num_batches(2, 5) == 1 and data.num_batches(2, 5, drop_last=True) == 0


# ----------------------------------------------------------------------------- errors

ERRORS = [
    (dict(n=0, batch_size=1), ValueError, "n must be >= 1, got 0"),
    (dict(n=2.5, batch_size=1), TypeError, "n must be an integer, got float"),
    (dict(n=True, batch_size=1), TypeError, "n must be an integer, got bool"),
    (dict(n=10, batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(n=10, batch_size=np.float64(2)), TypeError, "batch_size must be an integer"),
    (dict(n=3, batch_size=5), ValueError, r"batch_size must be <= n \(3\) for mode='shuffle', got 5"),
    (dict(n=10, batch_size=2, mode="bootstrap"), ValueError,
     "mode must be 'shuffle' or 'replacement', got 'bootstrap'"),
    (dict(n=10, batch_size=2, mode=None), ValueError, "mode must be 'shuffle' or 'replacement', got None"),
    (dict(n=10, batch_size=2, mode="replacement"), ValueError, "num_steps must be given for mode='replacement'"),
    (dict(n=10, batch_size=2, mode="replacement", num_steps=5, num_epochs=1), ValueError,
     "num_epochs applies to mode='shuffle' only"),
    (dict(n=10, batch_size=2, mode="replacement", num_steps=5, drop_last=True), ValueError,
     "drop_last applies to mode='shuffle' only"),
    (dict(n=10, batch_size=2, num_epochs=-1), ValueError, "num_epochs must be >= 0, got -1"),
    (dict(n=10, batch_size=2, num_steps=1.0), TypeError, "num_steps must be an integer"),
    (dict(n=10, batch_size=2, drop_last="yes"), TypeError, "drop_last must be a bool, got str"),
    (dict(n=10, batch_size=2, start_step=-1), ValueError, "start_step must be >= 0, got -1"),
    (dict(n=10, batch_size=2, start_step=6), ValueError, "start_step must be <= the stream's 5 batches, got 6"),
    (dict(n=10, batch_size=2, rng="seed"), TypeError, "rng must be an int seed, a numpy.random.Generator or None"),
    (dict(n=10, batch_size=2, rng=-1), ValueError, "rng seed must be non-negative"),
]


@pytest.mark.parametrize("kw,exc,match", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_errors_are_raised_at_the_call(kw, exc, match):
    """Raised by the call itself, before any batch is requested."""
    kw = dict(kw)
    n, bs = kw.pop("n"), kw.pop("batch_size")
    with pytest.raises(exc, match=match):
        data.minibatches(n, bs, **kw)


def test_num_batches_errors():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        data.num_batches(0, 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -2"):
        data.num_batches(4, -2)
    with pytest.raises(TypeError, match="drop_last must be a bool, got int"):
        data.num_batches(4, 2, 1)
