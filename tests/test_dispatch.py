"""Run-time instruction-set dispatch: the level in use, VIGRAD_ISA, and agreement across levels.

Each level's kernels are the same source compiled with other vector instructions, so within a
level the bits are fixed (test_determinism runs under every level in CI), and across levels
results differ only by rounding: glibc's libmvec has one variant of log / exp / cos per vector
width (each within 4 ulp of the exact value), and the AVX2 / AVX-512 levels fuse multiply-adds.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import vigrad as vg

TESTS = Path(__file__).resolve().parent
LEVELS = list(vg.build_info["isa_available"])
SUPPORTED = list(vg.build_info["isa_supported"])
# When this suite itself runs under an emulated CPU (CI: ``QEMU_CPU=EPYC-Rome qemu-x86_64 python -m
# pytest ...``), the subprocesses must run on the same emulated CPU, not natively on the host:
# VIGRAD_TEST_EMULATOR names the emulator (QEMU_CPU is inherited with the environment).
EMULATOR = os.environ.get("VIGRAD_TEST_EMULATOR", "").split()


def _run(code, isa=None, check=True):
    env = dict(os.environ)
    env.pop("VIGRAD_ISA", None)
    if isa is not None:
        env["VIGRAD_ISA"] = isa
    r = subprocess.run([*EMULATOR, sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       cwd=str(TESTS), timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"subprocess failed (VIGRAD_ISA={isa}):\n{r.stdout}\n{r.stderr}")
    return r


def test_build_info_names_the_levels():
    info = vg.build_info
    assert info["isa_available"], "no level built in"
    assert set(info["isa_supported"]) <= set(info["isa_available"])
    assert info["isa"] in info["isa_supported"]
    forced = os.environ.get("VIGRAD_ISA", "")
    if forced and forced != "auto":
        assert info["isa"] == forced
    else:
        # the best level the CPU runs: the levels are listed lowest first
        assert info["isa"] == info["isa_supported"][-1]
    if not info["native"]:
        assert "baseline" in info["isa_available"]


def test_default_is_the_best_supported_level():
    out = _run("import json, vigrad as vg; print(json.dumps(vg.build_info))").stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["isa"] == SUPPORTED[-1]


@pytest.mark.parametrize("level", SUPPORTED)
def test_vigrad_isa_forces_a_level(level):
    out = _run("import vigrad as vg; print(vg.build_info['isa'], vg.build_info['instruction_set'])", isa=level)
    isa, compiled_for = out.stdout.split()
    assert isa == level
    expected = {"baseline": ("sse2", "sse4.2", "avx", "generic", "neon"), "avx2": ("avx2",), "avx512": ("avx512",)}
    if level in expected:
        assert compiled_for in expected[level]


def test_unknown_level_is_a_clear_import_error():
    r = _run("import vigrad", isa="avx1024", check=False)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "VIGRAD_ISA" in r.stderr and "avx1024" in r.stderr
    for level in LEVELS:
        assert f"'{level}'" in r.stderr


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv not in SUPPORTED] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="this CPU runs every level built in"))])
def test_level_the_cpu_lacks_is_a_clear_import_error(level):
    r = _run("import vigrad", isa=level, check=False)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "lacks" in r.stderr


def test_python_m_vigrad_info_prints_the_levels():
    out = _run("import sys; from vigrad.__main__ import main; sys.exit(main(['info']))").stdout
    info = json.loads(out)
    assert info["isa"] in info["isa_available"]


# -------------------------------------------------------------------- agreement across levels

_COMPUTE = """
import sys
import numpy as np
import vigrad as vg
from test_determinism import _all_results

out = {}
for dt in (np.float64, np.float32):
    name = np.dtype(dt).name
    for k, v in _all_results(dt, 2).items():
        for i, a in enumerate(v if isinstance(v, tuple) else (v,)):
            out[f"{name}/{k}/{i}"] = np.asarray(a)
    rng = np.random.default_rng(5)
    d = 40
    A = rng.standard_normal((d, d)).astype(dt)
    q = vg.FullRankGaussian.from_cov(np.zeros(d, dt), (A @ A.T / d + np.eye(d, dtype=dt)).astype(dt))
    z = q.sample(16, rng=3)
    out[f"{name}/fullrank_sample"] = z
    out[f"{name}/fullrank_log_prob"] = q.log_prob(z)
    X = rng.standard_normal((256, 8)).astype(dt)
    y = (X[:, 0] > 0).astype(np.int64)
    m = vg.BayesianMLP([8, 16, 2], likelihood="categorical", dtype=dt, rng=0)
    m.fit(X, y, epochs=2, batch_size=64, lr=1e-2)
    out[f"{name}/bbb_proba"] = m.predict_proba(X, num_samples=4, rng=1)
np.savez(sys.argv[1] if len(sys.argv) > 1 else "out.npz", **out)
"""


@pytest.fixture(scope="module")
def per_level(tmp_path_factory):
    res = {}
    for level in SUPPORTED:
        path = tmp_path_factory.mktemp("isa") / f"{level}.npz"
        code = _COMPUTE.replace('sys.argv[1] if len(sys.argv) > 1 else "out.npz"', repr(str(path)))
        _run(code, isa=level)
        with np.load(path) as f:
            res[level] = {k: f[k] for k in f.files}
    return res


# Relative to the largest magnitude of each result: a few ulps per libmvec call or fused
# multiply-add, carried through sums of ~10^4 terms and two epochs of training.
BOUND = {"float64": 1e-11, "float32": 1e-4}


@pytest.mark.skipif(len(SUPPORTED) < 2, reason="this CPU runs one level only")
def test_levels_agree_within_rounding(per_level):
    base_level = SUPPORTED[0]
    base = per_level[base_level]
    worst = {}
    for level in SUPPORTED[1:]:
        other = per_level[level]
        assert other.keys() == base.keys()
        for k in base:
            a, b = base[k].astype(np.float64), other[k].astype(np.float64)
            assert a.shape == b.shape, k
            assert np.array_equal(np.isfinite(a), np.isfinite(b)), k
            scale = max(np.max(np.abs(a[np.isfinite(a)]), initial=0.0), np.finfo(np.float64).tiny)
            err = np.max(np.abs(a - b)[np.isfinite(a)], initial=0.0) / scale
            worst[(level, k)] = err
            assert err <= BOUND[k.split("/")[0]], f"{k}: {level} vs {base_level} differ by {err:.3g} (relative)"
    # and the levels are not silently the same code: the vector widths change some bits
    assert any(v > 0 for v in worst.values())
