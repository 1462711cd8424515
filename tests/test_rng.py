"""Philox4x32-10 known answers and the counter addressing of normal draws."""

import numpy as np
import pytest

import vigrad as vg
from vigrad import _core
from vigrad import reference as ref

# Random123's published known-answer vectors for philox4x32_10 (kat_vectors):
# (counter, key (k0, k1), expected output)
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("impl", [_core, ref], ids=["core", "reference"])
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(impl, ctr, key, expected):
    out = impl.philox4x32_10(np.array([ctr], dtype=np.uint32), key[0] | (key[1] << 32))
    assert tuple(int(x) for x in out[0]) == expected


def test_philox_core_equals_reference_on_random_counters():
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, size=(5000, 4), dtype=np.uint32)
    key = int(rng.integers(0, 2**64, dtype=np.uint64))
    np.testing.assert_array_equal(_core.philox4x32_10(ctr, key), ref.philox4x32_10(ctr, key))


def test_draw_depends_on_key_sample_and_element_only(dtype):
    """Draw (s, j) is the same whatever the array's shape: a prefix of rows and columns."""
    big = np.empty((9, 23), dtype)
    _core.standard_normal(99, big, 2)
    for S, D in [(1, 1), (4, 5), (9, 7), (3, 23)]:
        small = np.empty((S, D), dtype)
        _core.standard_normal(99, small, 1)
        np.testing.assert_array_equal(small, big[:S, :D])


def test_draw_counter_layout_double():
    """Double draws (s, 2c) and (s, 2c + 1) come from Philox counter (c, 0, s, 0)."""
    key = 0x0123456789ABCDEF
    z = np.empty((3, 6), np.float64)
    _core.standard_normal(key, z, 1)
    x = ref.philox4x32_10(np.array([[2, 0, 1, 0]], dtype=np.uint32), key)[0].astype(np.uint64)
    one = np.uint64(0x3FF0000000000000)
    u1 = 2.0 - ((x[0] << np.uint64(20)) | (x[1] >> np.uint64(12)) | one).view(np.float64)
    u2 = ((x[2] << np.uint64(20)) | (x[3] >> np.uint64(12)) | one).view(np.float64) - 1.0
    r = np.sqrt(-2.0 * np.log(u1))
    np.testing.assert_allclose(z[1, 4:6], [r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)],
                               rtol=1e-12, atol=1e-14)


def test_keys_and_seeds():
    q = vg.MeanFieldGaussian(np.zeros(1000), np.zeros(1000))
    a = q.sample(3, rng=1)
    np.testing.assert_array_equal(a, q.sample(3, rng=1))
    np.testing.assert_array_equal(a, q.sample(3, rng=np.random.default_rng(1)))
    assert not np.array_equal(a, q.sample(3, rng=2))
    gen = np.random.default_rng(5)
    assert not np.array_equal(q.sample(3, rng=gen), q.sample(3, rng=gen))  # a Generator advances
    assert not np.array_equal(q.sample(3), q.sample(3))  # None: fresh entropy


def test_float32_draws_are_not_float64_draws_rounded():
    """float32 has its own stream (4 normals per counter): documented, so check it holds."""
    a, b = np.empty((2, 8), np.float32), np.empty((2, 8), np.float64)
    _core.standard_normal(3, a, 1)
    _core.standard_normal(3, b, 1)
    assert not np.allclose(a, b.astype(np.float32))


@pytest.mark.parametrize("D", [1, 63, 64, 65, 1024, 2500])
def test_bbb_noise_draws_are_those_of_sample(D, dtype):
    """The BBB kernels' row-0 fast path draws exactly the normals of the general one: with loc = 0
    (so no multiply-add to fuse) bbb_noise equals sample with scale = softplus(rho), bit for bit."""
    rho = np.random.default_rng(D).normal(size=D).astype(dtype)
    zeros = np.zeros(D, dtype)
    w, eps = np.empty((1, D), dtype), np.empty((1, D), dtype)
    _core.sample(77, zeros, _core.softplus(rho, 1), w, eps, 1)
    for use, want in (("weights", w[0]), ("perturbation", w[0])):
        got = np.empty(D, dtype)
        _core.bbb_noise(use, 77, zeros, rho, got, 2)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("S,D", [(700, 3), (40000, 3), (20000, 7), (9, 129), (600, 129), (80, 2047), (300, 513)])
def test_draws_for_short_and_long_rows_any_threads(S, D, dtype):
    """Rows shorter than 64 counters go through the cross-row lanes, longer ones row by row: both
    give the reference's draws, and the same bits for any thread count (the larger shapes have
    enough counters, >= 2^15, for the work to be split)."""
    outs = []
    for workers in (1, 2, 3):
        out = np.empty((S, D), dtype)
        _core.standard_normal(31, out, workers)
        outs.append(out)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    want = np.empty((S, D), dtype)
    ref.standard_normal(31, want, 1)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(outs[0], want, rtol=rtol, atol=rtol * 10)
