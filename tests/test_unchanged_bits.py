"""Issue 14, "Unchanged bits": the NumPy and torch Bayesian linear layers and BayesianMLP's training
give the bits recorded before their code was rewritten as one implementation (tests/layer_bits.py,
recorded from commit f1e9627 into tests/data/layer_bits.npz; BayesianMLP's training recorded again
when Adam's evaluation order changed, see layer_bits).

The last bits of a matrix product depend on the BLAS kernel the CPU selects, so the comparison is
exact (assert_array_equal, SHA-256 digests of the medium-sized outputs) where the recording's
fingerprint matches this machine: vigrad's instruction-set level, NumPy's OpenBLAS, the CPU model,
torch's version and CPU capability.  Elsewhere it is a normwise comparison at tolerances measured
on the recording machine with every kernel forced to AVX2 (VIGRAD_ISA=avx2, OPENBLAS_CORETYPE=
Haswell, ATEN_CPU_CAPABILITY=avx2), which differs from AVX-512 in half the outputs: at most 1e-13
(float64) and 2e-4 (float32, the Adam moments after 15 steps) of each output's largest entry; the
bounds below leave a factor of ten or more.
"""

import numpy as np
import pytest

import layer_bits

#: normwise relative bounds off the recording machine (see the module's docstring)
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 3e-3}


@pytest.fixture(scope="module")
def recorded():
    return layer_bits.load()


def _compare(group, recorded, new=None, exact=None):
    fp, ref = recorded
    ref = {k: v for k, v in ref.items() if k.split("/")[0] == group}
    assert ref, f"no recorded outputs for {group!r}"
    new = layer_bits.compute((group,)) if new is None else new
    assert sorted(new) == sorted(ref), "the cases differ from the recorded ones"
    exact = fp == layer_bits.fingerprint() if exact is None else exact
    bad = []
    for name, want in ref.items():
        got = new[name]
        if exact or want.dtype.kind in "iuUS" and not name.endswith("#sha256"):
            if not (got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)):
                bad.append(name)
            continue
        if name.endswith(("#sha256", "#sum")):  # bit patterns and sums with cancellation: not comparable
            continue
        rtol = RTOL[want.dtype] if "float32" not in name and "medium" not in name and "wide" not in name \
            else RTOL[np.dtype(np.float32)]
        scale = float(np.max(np.abs(want), initial=0.0))
        if got.shape != want.shape or np.max(np.abs(got.astype(np.float64) - want), initial=0.0) > rtol * scale:
            bad.append(name)
    how = "bit for bit" if exact else "to the tolerances of another machine's kernels"
    assert not bad, f"{len(bad)} of {len(ref)} outputs differ from the recording ({how}), e.g. {bad[:8]}"


def test_numpy_layer_gives_the_recorded_bits(recorded):
    _compare("np", recorded)


def test_bayesian_mlp_training_gives_the_recorded_bits(recorded):
    _compare("mlp", recorded)


def test_torch_layer_gives_the_recorded_bits(recorded):
    pytest.importorskip("torch")
    _compare("torch", recorded)


@pytest.mark.parametrize("exact", [True, False])
def test_the_comparison_sees_a_changed_output(recorded, exact):
    """One flipped bit of one output fails the exact comparison (through the digest for a
    medium-sized one); a change beyond the tolerance fails the other one."""
    _, ref = recorded
    same = {k: v for k, v in ref.items() if k.startswith("np/")}
    _compare("np", recorded, dict(same), exact)  # the recording itself passes
    for name in ("np/flipout/float64/normal/mc0/grad_rho", "np/local/medium/grad_loc#sample"):
        changed = dict(same)
        a = changed[name].copy()
        if exact:
            a.view(np.uint32 if a.dtype == np.float32 else np.uint64).reshape(-1)[3] ^= 1
        else:
            a.reshape(-1)[3] += 20 * RTOL[a.dtype] * np.abs(a).max()
        changed[name] = a
        with pytest.raises(AssertionError, match="1 of .* outputs differ"):
            _compare("np", recorded, changed, exact)
    if exact:
        changed = dict(same)
        big = np.frombuffer(bytes.fromhex(str(same["np/local/medium/y#sha256"])[:64]), np.uint8).copy()
        big[0] ^= 1
        changed["np/local/medium/y#sha256"] = np.array(big.tobytes().hex() + str(same["np/local/medium/y#sha256"])[64:])
        with pytest.raises(AssertionError, match="1 of .* outputs differ"):
            _compare("np", recorded, changed, exact)
