"""The package surface: version and build facts, the contract's names, the demo."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import vigrad as vg


def test_package_facts():
    assert isinstance(vg.__version__, str) and vg.__version__.count(".") == 2
    assert isinstance(vg.has_openmp, bool)
    assert isinstance(vg.max_workers, int) and vg.max_workers >= 1
    info = vg.build_info
    for key in ("compiler", "flags", "instruction_set", "openmp"):
        assert key in info
    assert info["openmp"] == vg.has_openmp
    assert "-ffast-math" not in info["flags"]
    if not vg.has_openmp:
        assert vg.max_workers == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_kernels_use_the_machines_vector_units():
    """With AVX-512 or AVX2 on the CPU, the kernels in use must have been compiled for it (by
    run-time dispatch, or VIGRAD_NATIVE), or they run up to ~5x slower."""
    info = vg.build_info
    if os.environ.get("VIGRAD_ISA", "auto") not in ("", "auto"):
        pytest.skip(f"VIGRAD_ISA={os.environ['VIGRAD_ISA']} forces a level")
    if not any(f in info["flags"] for f in ("-mavx2", "-march=native")):
        pytest.skip("not an x86-64 gcc / clang build")
    if os.environ.get("VIGRAD_TEST_EMULATOR"):
        pytest.skip("under qemu-user /proc/cpuinfo describes the host, not the emulated CPU")
    flags = set(open("/proc/cpuinfo").read().split())
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        assert info["instruction_set"] == "avx512"
        assert info["isa"] in ("avx512", "native")
    elif {"avx2", "fma"} <= flags:
        assert info["instruction_set"] == "avx2"
        assert info["isa"] in ("avx2", "native")


def test_contract_names_exist():
    names = ["MeanFieldGaussian", "Normal", "ScaleMixtureNormal", "kl_divergence", "elbo_grad", "pathwise_grad"]
    for n in names:
        assert hasattr(vg, n) and n in vg.__all__
    q = vg.MeanFieldGaussian.from_scale(np.zeros(2, np.float32), np.ones(2, np.float32))
    for attr in ("loc", "rho", "scale", "shape", "dtype", "mean", "cov"):
        getattr(q, attr)
    assert q.dtype == np.float32 and q.sample(3, rng=0).dtype == np.float32
    res = vg.elbo_grad(q, lambda w: (np.zeros(w.shape[0]), np.zeros_like(w)), vg.Normal(), rng=0)
    assert isinstance(res.loss, float) and res.grad_loc.dtype == np.float32 and res.grad_rho.shape == (2,)


def test_float32_and_float64_preserved_end_to_end(dtype):
    q = vg.MeanFieldGaussian(np.zeros((2, 3), dtype), np.zeros((2, 3), dtype))
    w, eps = q.sample(4, rng=0, return_noise=True)
    assert w.dtype == eps.dtype == dtype and w.shape == (4, 2, 3)
    assert q.log_prob(w).dtype == dtype and q.entropy().dtype == dtype
    p = vg.ScaleMixtureNormal(0.5, 1.0, 0.1)
    assert p.log_prob(w).dtype == dtype and p.grad_log_prob(w).dtype == dtype
    gl, gr = vg.pathwise_grad(q.loc, q.rho, eps, -w, p)
    assert gl.dtype == gr.dtype == dtype and gl.shape == (2, 3)
    assert vg.kl_divergence(q, vg.Normal()).dtype == dtype


def test_zero_sized_events_and_samples():
    q = vg.MeanFieldGaussian(np.zeros((3, 0)), np.zeros((3, 0)))
    assert q.sample(5, rng=0).shape == (5, 3, 0)
    np.testing.assert_array_equal(q.log_prob(np.zeros((5, 3, 0))), np.zeros(5))
    assert q.entropy() == 0.0
    q2 = vg.MeanFieldGaussian(np.zeros(4), np.zeros(4))
    assert q2.sample(0, rng=0).shape == (0, 4)
    assert q2.log_prob(np.zeros((0, 4))).shape == (0,)
    gl, gr = vg.pathwise_grad(np.zeros(0), np.zeros(0), np.zeros((2, 0)), np.zeros((2, 0)), vg.Normal())
    assert gl.shape == gr.shape == (0,)


def test_scalar_event():
    q = vg.MeanFieldGaussian(0.5, -1.0)
    w = q.sample(7, rng=1)
    assert w.shape == (7,) and q.log_prob(w).shape == (7,) and q.log_prob(0.5).shape == ()


def test_demo_reaches_the_exact_optimum():
    from vigrad.demo import EXACT_F, EXACT_MU, EXACT_SIGMA, run_demo

    out = io.StringIO()
    # STL has zero variance at the optimum, so plain gradient descent lands on it exactly
    r = run_demo(steps=3000, samples=10, estimator="stl", out=out)
    assert abs(r["mu"] - EXACT_MU) < 1e-6 and abs(r["sigma"] - EXACT_SIGMA) < 1e-6
    assert abs(r["loss"] - EXACT_F) < 1e-6
    text = out.getvalue()
    assert "exact   mu = 0.2500  sigma = 0.7071" in text and "time" in text
    # the pathwise estimator of the seed: the averaged iterates land near the optimum
    r = run_demo(steps=3000, samples=10, out=io.StringIO(), progress=False)
    assert abs(r["mu_avg"] - EXACT_MU) < 0.02 and abs(r["sigma_avg"] - EXACT_SIGMA) < 0.02


def test_python_m_vigrad_demo_runs():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "vigrad", "demo", "--steps", "300"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "step    300/300" in out.stdout and "fitted" in out.stdout and "exact" in out.stdout
    info = subprocess.run([sys.executable, "-m", "vigrad", "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and '"instruction_set"' in info.stdout
    from vigrad import _blas

    assert json.loads(info.stdout)["blas_on_vigrad_threads"] == _blas.name()
    bad = subprocess.run([sys.executable, "-m", "vigrad", "demo", "--steps", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "--steps" in bad.stderr


def test_bbb_demo_runs_and_reports(tmp_path):
    """The demo's Bayes-by-Backprop part: digits accuracy, and uncertainty that grows off the data."""
    from vigrad.demo import run_bbb_demo

    out = io.StringIO()
    r = run_bbb_demo(epochs=20, out=out, plot=None)
    assert r["accuracy"] > 0.93 and r["std_outside"] > 3 * r["std_inside"]
    text = out.getvalue()
    assert "test accuracy" in text and "predictive sd" in text and "UCI optdigits" in text
