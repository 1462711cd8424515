"""Sampling one w = loc + softplus(rho) * eps at D = 10^6: vigrad's counter-based core
vs NumPy's Generator vs torch.randn, plus the affine map in each.

Target: vigrad >= 3x NumPy in float64.
"""

import numpy as np
import pytest

import vigrad as vg
from vigrad import reference as ref
from vigrad._validation import resolve_key  # the seed -> Philox key map q.sample uses

from benchlib import D, DTYPES, SEED, assert_agree, assert_standard_normal, dtype_id, tag, variational_params

pytestmark = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)

#: The NumPy reference sampler (Philox in NumPy) is compared on the first elements only.
PREFIX = 4096


def _setup(benchmark, impl, dtype):
    tag(benchmark, f"sample-{dtype_id(dtype)}", impl=impl, D=D, S=1, dtype=dtype)
    return vg.MeanFieldGaussian(*variational_params(D, dtype))


def _check_draw(q, w):
    """w is one draw from q: right dtype and size, (w - loc) / scale standard normal."""
    w = np.asarray(w)
    assert w.dtype == q.dtype and w.size == q.size
    assert_standard_normal((w.reshape(-1) - q.loc) / q.scale)


def test_sample_vigrad(benchmark, dtype):
    q = _setup(benchmark, "vigrad", dtype)
    w = benchmark(q.sample, 1, rng=SEED)
    _check_draw(q, w)
    # bit-for-bit the reference sampler's draw for the same key, up to libm rounding
    w_ref = np.empty((1, PREFIX), dtype)
    ref.sample(resolve_key(SEED), q.loc[:PREFIX], q.scale[:PREFIX], w_ref, None, 1)
    assert_agree([w[:, :PREFIX]], [w_ref], dtype, scale=10.0)


def test_sample_numpy(benchmark, dtype):
    q = _setup(benchmark, "numpy", dtype)
    gen = np.random.default_rng(SEED)
    loc, scale = q.loc, q.scale
    w = benchmark(lambda: loc + scale * gen.standard_normal(D, dtype=dtype))
    _check_draw(q, w)


def test_sample_torch(benchmark, dtype, torch):
    q = _setup(benchmark, "torch", dtype)
    loc, scale = torch.from_numpy(q.loc.copy()), torch.from_numpy(q.scale.copy())
    torch.manual_seed(SEED)
    w = benchmark(lambda: loc + scale * torch.randn(D, dtype=loc.dtype))
    _check_draw(q, w.numpy())
