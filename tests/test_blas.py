"""vigrad's matrix products on its own threads (_core.gemm through NumPy's OpenBLAS, vigrad._blas)
against NumPy, and the NumPy fallback."""

import os
import subprocess
import sys

import numpy as np
import pytest

import vigrad as vg
from vigrad import _blas, _core
from vigrad import reference as ref

needs_blas = pytest.mark.skipif(not _blas.available(), reason="no OpenBLAS with a per-thread setting loaded")


@needs_blas
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (63, 5, 7), (64, 3, 1), (65, 17, 33), (200, 40, 9), (1000, 3, 2)])
def test_gemm_matches_numpy_for_any_thread_count(M, N, K, trans_a, trans_b, dtype):
    rng = np.random.default_rng(M + N + K)
    A = rng.normal(size=(K, M) if trans_a else (M, K)).astype(dtype)
    B = rng.normal(size=(N, K) if trans_b else (K, N)).astype(dtype)
    A0, B0 = A.copy(), B.copy()
    C0 = rng.normal(size=(M, N)).astype(dtype)
    outs = []
    for workers in (1, 2, 3, 7):
        C = np.empty((M, N), dtype)
        _core.gemm(trans_a, trans_b, A, B, C, 0.0, workers)
        Cacc = C0.copy()
        _core.gemm(trans_a, trans_b, A, B, Cacc, 1.0, workers)
        outs.append((C, Cacc))
    for C, Cacc in outs[1:]:  # bit-identical whatever the thread count
        np.testing.assert_array_equal(C, outs[0][0])
        np.testing.assert_array_equal(Cacc, outs[0][1])
    want, want_acc = np.empty((M, N), dtype), C0.copy()
    ref.gemm(trans_a, trans_b, A, B, want, 0.0, 1)
    ref.gemm(trans_a, trans_b, A, B, want_acc, 1.0, 1)
    tol = {np.float64: 1e-12, np.float32: 1e-5}[dtype]
    scale = np.sqrt(K) * 4  # entries are sums of K products of standard normals
    np.testing.assert_allclose(outs[0][0], want, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(outs[0][1], want_acc, rtol=tol, atol=tol * (scale + 4))
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(B, B0)


@needs_blas
def test_gemm_empty_and_errors():
    A, B = np.ones((3, 0)), np.ones((0, 4))
    C = np.full((3, 4), 5.0)
    _core.gemm(False, False, A, B, C, 1.0, 2)
    assert (C == 5.0).all()
    _core.gemm(False, False, A, B, C, 0.0, 2)
    assert (C == 0.0).all()
    A, B, C = np.ones((3, 2)), np.ones((2, 4)), np.empty((3, 4))
    with pytest.raises(ValueError, match="op\\(A\\) is 3 x 2 but op\\(B\\) is 4 x 2"):
        _core.gemm(False, True, A, B, C, 0.0, 1)
    with pytest.raises(ValueError, match="C must have shape"):
        _core.gemm(False, False, A, B, np.empty((4, 3)), 0.0, 1)
    with pytest.raises(ValueError, match="beta"):
        _core.gemm(False, False, A, B, C, 0.5, 1)
    big = np.ones((4, 4))
    with pytest.raises(ValueError, match="overlap"):  # C: the first 8 entries of A
        _core.gemm(False, False, big, np.ones((4, 2)), big[:2].reshape(4, 2), 0.0, 1)
    with pytest.raises(TypeError):  # another dtype: no silent conversion
        _core.gemm(False, False, A.astype(np.float32), B, C, 0.0, 1)
    with pytest.raises(TypeError):  # not C-contiguous
        _core.gemm(False, False, np.ones((2, 3)).T, B, C, 0.0, 1)


def test_matmul_helper_matches_numpy(dtype):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(70, 9)).astype(dtype), rng.normal(size=(11, 9)).astype(dtype)
    out = _blas.matmul(a, b, trans_b=True, workers=2)
    tol = {np.float64: 1e-12, np.float32: 1e-5}[dtype]
    np.testing.assert_allclose(out, a @ b.T, rtol=tol, atol=tol * 12)
    _blas.matmul(a, b, trans_b=True, out=out, accumulate=True, workers=2)
    np.testing.assert_allclose(out, 2 * (a @ b.T), rtol=tol, atol=tol * 24)


def test_numpy_fallback_in_a_fresh_process():
    """VIGRAD_BLAS=numpy: no OpenBLAS registered, NumPy's matmul and one vigrad thread by default;
    training still learns."""
    code = (
        "import numpy as np, vigrad as vg\n"
        "from vigrad import _blas, _core\n"
        "assert not _blas.available() and _core._blas_name() == ''\n"
        "m = vg.BayesianMLP([8, 16, 2], likelihood='categorical', rng=0)\n"
        "assert m.workers == 1\n"
        "X = np.random.default_rng(0).random((64, 8)).astype(np.float32); y = (X[:, 0] > 0.5).astype(int)\n"
        "h = m.fit(X, y, epochs=30, batch_size=32, lr=1e-2)\n"
        "assert h['nll'][-1] < h['nll'][0], h['nll']\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VIGRAD_BLAS="numpy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_blas
def test_registered_blas_is_numpys_openblas():
    assert "openblas" in _blas.name().lower() and _core._blas_name() == _blas.name()
    assert vg.BayesianMLP([3, 2], rng=0).workers == vg.max_workers


@needs_blas
def test_numpys_openblas_is_chosen_even_when_scipys_loaded_first():
    """SciPy's wheel bundles another OpenBLAS; whichever loaded first, vigrad uses NumPy's (else the
    last bits of a training run would depend on import order)."""
    pytest.importorskip("scipy.linalg")
    code = (
        "import scipy.linalg, numpy as np\n"
        "scipy.linalg.solve(np.eye(3), np.ones(3))\n"
        "from vigrad import _blas\n"
        "print(_blas.name())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    assert out.stdout.strip() in os.listdir(libs)
    assert out.stdout.strip() == _blas.name()
