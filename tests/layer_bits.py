"""The Bayes-by-Backprop outputs whose bits must not change when the layer code is refactored
(issue 14, "Unchanged bits").

:func:`compute` runs a fixed set of cases and returns ``{name: array}``: the NumPy layer's
forward / backward, the torch layer's forward / backward / eval and a few torch training steps,
and BayesianMLP fits (fused and unfused Adam, every estimator, float32 and float64) with their
predictions.  Small outputs are kept whole; the outputs of the medium-sized cases (sized so that
the matrix products split their inner dimension and their rows over threads) are kept as a
SHA-256 digest of their bytes plus a strided sample of entries and their float64 sum.

``python tests/layer_bits.py --record`` writes tests/data/layer_bits.npz with the outputs and
a fingerprint of what fixes the last bits of the products (vigrad's instruction-set level, the
OpenBLAS NumPy bundles, the CPU, torch's build and CPU capability).  The file in the repository
was recorded from the code before the refactor of issue 14 (commit f1e9627).  The "mlp" group was
recorded again when Adam's evaluation order changed on purpose (one division per element instead
of three; optim.hpp / bbb.hpp's AdamStep), after checking the new outputs against the old
recording at the tolerances of another machine: they differed by at most 6.5e-14 (float64) and
1.9e-4 (float32) of each output's largest entry; the "np" and "torch" groups kept their bits.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "layer_bits.npz"
ESTIMATORS = ("reparam", "local", "flipout")
DTYPES = (np.float32, np.float64)
#: entries sampled from each digested (medium-sized) output, for the comparison off the recording machine
SAMPLE = 256


def fingerprint() -> dict:
    """What decides the last bits of the outputs besides vigrad's own code."""
    import vigrad as vg
    from vigrad import _blas

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    # the compiler and libmvec too: clang contracts and vectorises differently from gcc
    out = {"isa": vg.build_info["isa"], "blas": _blas.name(), "numpy": np.__version__, "cpu": cpu,
           "machine": platform.machine(), "compiler": vg.build_info["compiler"],
           "libmvec": bool(vg.build_info["libmvec"])}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cpu"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        out["torch"] = None
    return out


def digest(a) -> dict:
    a = np.ascontiguousarray(a)
    flat = a.reshape(-1)
    stride = max(1, flat.size // SAMPLE)
    return {"sha256": np.array(hashlib.sha256(a.tobytes()).hexdigest() + f"|{a.dtype}|{a.shape}"),
            "sample": flat[::stride][:SAMPLE].copy(), "sum": np.array(flat.astype(np.float64).sum())}


def _put(out, name, value, big=False):
    value = np.asarray(value)
    if big:
        for k, v in digest(value).items():
            out[f"{name}#{k}"] = v
    else:
        out[name] = value.copy()


# -- the NumPy layer ---------------------------------------------------------------------------------

def _numpy_layer_cases(out):
    import vigrad as vg

    priors = {"mixture": (None, ("mc", "none")), "normal": (vg.Normal(0.1, 0.5), ("mc", "analytic"))}
    for est in ESTIMATORS:
        for dt in DTYPES:
            for pname, (prior, kls) in priors.items():
                tag = f"np/{est}/{np.dtype(dt).name}/{pname}"
                rng = np.random.default_rng(11)
                x = rng.normal(size=(6, 7)).astype(dt)
                G = rng.normal(size=(6, 5)).astype(dt)
                layer = vg.BayesianLinear(7, 5, prior=prior, estimator=est, dtype=dt, init_rho=-2.0, rng=3)
                _put(out, f"{tag}/loc0", layer.loc)
                for r, kl in enumerate(kls):  # two rounds: the work buffers are reused
                    y = layer.forward(x, key=1234 + r)
                    g = layer.backward(G, kl_weight=0.3, kl=kl)
                    for k, v in (("y", y), ("grad_x", g.grad_x), ("grad_loc", g.grad_loc), ("grad_rho", g.grad_rho),
                                 ("kl", g.kl)):
                        _put(out, f"{tag}/{kl}{r}/{k}", v)
                _put(out, f"{tag}/mean", layer.forward(x, sample=False))
                y = layer.forward(x)  # the key drawn from the layer's own generator
                _put(out, f"{tag}/auto/y", y)
                _put(out, f"{tag}/auto/grad_loc", layer.backward(G, kl_weight=1.0).grad_loc)
        # medium: the products split their inner dimension (> OpenBLAS's K block) and their rows
        for name, seed, (B, n_in, n_out), layer_seed, key, with_kl in (("medium", 12, (48, 24, 520), 4, 99, True),
                                                                      ("wide", 13, (40, 600, 30), 5, 98, False)):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(B, n_in)).astype(np.float32)
            G = rng.normal(size=(B, n_out)).astype(np.float32)
            layer = vg.BayesianLinear(n_in, n_out, estimator=est, init_rho=-3.0, rng=layer_seed)
            y = layer.forward(x, key=key)
            g = layer.backward(G, kl_weight=0.01)
            tag = f"np/{est}/{name}"
            for k, v in (("y", y), ("grad_x", g.grad_x), ("grad_loc", g.grad_loc), ("grad_rho", g.grad_rho)):
                _put(out, f"{tag}/{k}", v, big=True)
            if with_kl:
                _put(out, f"{tag}/kl", g.kl)


# -- BayesianMLP --------------------------------------------------------------------------------------

def _tiny(likelihood, n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = rng.integers(0, 4, n) if likelihood == "categorical" else X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=n)
    return X, y


def _record_model(out, tag, m, X, likelihood, big=False):
    _put(out, f"{tag}/theta", m._theta, big)
    _put(out, f"{tag}/adam_m", m._opt_state[1], big)
    _put(out, f"{tag}/adam_v", m._opt_state[2], big)
    _put(out, f"{tag}/step", m._opt_state[0])
    for k, v in m.history.items():
        _put(out, f"{tag}/history/{k}", np.array(v, dtype=np.float64))
    if likelihood == "categorical":
        _put(out, f"{tag}/proba", m.predict_proba(X, num_samples=3, rng=0), big)
        _put(out, f"{tag}/sample_proba", m.sample_proba(X[:5], num_samples=2, rng=7), big)
        _put(out, f"{tag}/labels", m.predict(X, num_samples=2))
    else:
        mean, std = m.predict(X, num_samples=3, return_std=True, rng=1)
        _put(out, f"{tag}/mean", mean, big)
        _put(out, f"{tag}/std", std, big)
        _put(out, f"{tag}/mean_default_rng", m.predict(X, num_samples=2), big)


def _mlp_cases(out):
    import vigrad as vg

    for est in ESTIMATORS:
        for dt in DTYPES:
            dn = np.dtype(dt).name
            for lik, sizes in (("categorical", [3, 8, 4]), ("gaussian", [3, 8, 1])):
                X, y = _tiny(lik)
                m = vg.BayesianMLP(sizes, likelihood=lik, estimator=est, dtype=dt, rng=2, init_rho=-3.0)
                m.fit(X, y, epochs=3, batch_size=8, lr=1e-2)  # the fused Adam path
                _record_model(out, f"mlp/{est}/{dn}/{lik}", m, X, lik)
    # the unfused path and the other options
    for dt in DTYPES:
        dn = np.dtype(dt).name
        X, y = _tiny("categorical")
        m = vg.BayesianMLP([3, 8, 4], likelihood="categorical", estimator="local", num_samples=2, dtype=dt, rng=3,
                           init_rho=-3.0)
        m.fit(X, y, epochs=3, batch_size=8, lr=1e-2, kl_weighting="blundell", shuffle="replacement")
        _record_model(out, f"mlp/unfused-samples/{dn}", m, X, "categorical")
        Xv, yv = _tiny("categorical", n=15, seed=1)
        m = vg.BayesianMLP([3, 8, 4], likelihood="categorical", estimator="flipout", dtype=dt, rng=4, init_rho=-3.0)
        m.fit(X, y, epochs=6, batch_size=8, lr=vg.optim.exponential(2e-2, 0.9), clip_norm=0.5,
              validation_data=(Xv, yv), early_stopping=2, val_samples=3)
        _record_model(out, f"mlp/unfused-clip-val/{dn}", m, X, "categorical")
        X, y = _tiny("gaussian")
        m = vg.BayesianMLP([3, 8, 1], likelihood="gaussian", estimator="reparam", num_samples=2, dtype=dt, rng=5,
                           init_rho=-3.0, prior=vg.Normal(0.0, 0.5), kl="analytic", noise_std=0.3)
        m.fit(X, y, epochs=3, batch_size=8, lr=1e-2)
        _record_model(out, f"mlp/unfused-analytic/{dn}", m, X, "gaussian")
        Xv, yv = _tiny("gaussian", n=15, seed=1)
        m = vg.BayesianMLP([3, 8, 1], likelihood="gaussian", estimator="local", dtype=dt, rng=6, init_rho=-3.0)
        m.fit(X, y, epochs=4, batch_size=16, lr=1e-2, validation_data=(Xv, yv), kl_weighting="blundell")
        _record_model(out, f"mlp/fused-val/{dn}", m, X, "gaussian")
    # medium: products that split over rows and the inner dimension, the fused kernels over blocks
    rng = np.random.default_rng(0)
    X, y = rng.random((320, 64)).astype(np.float32), rng.integers(0, 4, 320)
    for est in ESTIMATORS:
        m = vg.BayesianMLP([64, 600, 4], likelihood="categorical", estimator=est, rng=5)
        m.fit(X, y, epochs=2, batch_size=160)
        _record_model(out, f"mlp/{est}/medium", m, X[:40], "categorical", big=True)


# -- vigrad.torch -------------------------------------------------------------------------------------

def _torch_cases(out):
    import torch

    import vigrad as vg
    import vigrad.torch as vgt

    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's products are reproducible for a fixed thread count
    try:
        priors = {"mixture": (None, "mc"), "normal": (vg.Normal(0.1, 0.5), "analytic")}
        tdt = {np.float32: torch.float32, np.float64: torch.float64}
        for est in ESTIMATORS:
            for dt in DTYPES:
                for pname, (prior, kl) in priors.items():
                    tag = f"torch/{est}/{np.dtype(dt).name}/{pname}"
                    rng = np.random.default_rng(21)
                    x0 = torch.from_numpy(rng.normal(size=(2, 3, 7)).astype(dt))
                    G = torch.from_numpy(rng.normal(size=(2, 3, 5)).astype(dt))
                    layer = vgt.BayesianLinear(7, 5, prior=prior, estimator=est, kl=kl, init_rho=-2.0, seed=3,
                                               dtype=tdt[dt])
                    _put(out, f"{tag}/loc0", layer.loc.detach().numpy())
                    for r in range(2):
                        x = x0.clone().requires_grad_()
                        layer.zero_grad()
                        y = layer(x)
                        klv = vgt.kl_loss(layer)
                        ((y * G).sum() + 0.3 * klv).backward()
                        for k, v in (("y", y), ("kl", klv), ("grad_x", x.grad), ("grad_loc", layer.loc.grad),
                                     ("grad_rho", layer.rho.grad)):
                            _put(out, f"{tag}/{r}/{k}", v.detach().numpy())
                    layer.eval()
                    with torch.no_grad():
                        _put(out, f"{tag}/eval_mean", layer(x0).numpy())
                        with vgt.sampling(layer):
                            _put(out, f"{tag}/eval_sample", layer(x0).numpy())
            # medium, float32
            rng = np.random.default_rng(22)
            x = torch.from_numpy(rng.normal(size=(48, 24)).astype(np.float32)).requires_grad_()
            G = torch.from_numpy(rng.normal(size=(48, 520)).astype(np.float32))
            layer = vgt.BayesianLinear(24, 520, estimator=est, init_rho=-3.0, seed=4, dtype=torch.float32)
            y = layer(x)
            klv = vgt.kl_loss(layer)
            ((y * G).sum() + 0.01 * klv).backward()
            tag = f"torch/{est}/medium"
            for k, v in (("y", y), ("grad_x", x.grad), ("grad_loc", layer.loc.grad), ("grad_rho", layer.rho.grad)):
                _put(out, f"{tag}/{k}", v.detach().numpy(), big=True)
            _put(out, f"{tag}/kl", klv.detach().numpy())
            # a few training steps of a two-layer network
            for dt in DTYPES:
                rng = np.random.default_rng(23)
                X = torch.from_numpy(rng.normal(size=(32, 7)).astype(dt))
                Y = torch.from_numpy(rng.integers(0, 3, 32))
                net = torch.nn.Sequential(vgt.BayesianLinear(7, 16, estimator=est, seed=5, init_rho=-3.0,
                                                             dtype=tdt[dt]),
                                          torch.nn.ReLU(),
                                          vgt.BayesianLinear(16, 3, estimator=est, seed=6, init_rho=-3.0,
                                                             dtype=tdt[dt]))
                opt = torch.optim.Adam(net.parameters(), lr=1e-2)
                for _ in range(4):
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(net(X), Y, reduction="sum") + vgt.kl_loss(net) / 32
                    loss.backward()
                    opt.step()
                tag = f"torch/{est}/{np.dtype(dt).name}/train"
                for i in (0, 2):
                    _put(out, f"{tag}/{i}/loc", net[i].loc.detach().numpy())
                    _put(out, f"{tag}/{i}/rho", net[i].rho.detach().numpy())
    finally:
        torch.set_num_threads(saved)


GROUPS = {"np": _numpy_layer_cases, "mlp": _mlp_cases, "torch": _torch_cases}


def compute(groups=tuple(GROUPS)) -> dict:
    """The outputs of the cases of ``groups`` ("np": vg.BayesianLinear, "mlp": vg.BayesianMLP,
    "torch": vigrad.torch); every name starts with its group."""
    out = {}
    for g in groups:
        GROUPS[g](out)
    return out


def record(path=DATA):
    """Write the outputs as one byte blob and a JSON index (name -> dtype, shape, offset): an .npz
    entry per output would cost more in zip headers than the numbers themselves."""
    out = compute()
    index, chunks, offset = {}, [], 0
    for name in sorted(out):
        a = np.asarray(out[name])
        raw = a.tobytes()  # C order
        index[name] = [a.dtype.str, list(a.shape), offset, len(raw)]
        chunks.append(raw)
        offset += len(raw)
    np.savez_compressed(path, fingerprint=np.array(json.dumps(fingerprint(), sort_keys=True)),
                        index=np.array(json.dumps(index, sort_keys=True)),
                        blob=np.frombuffer(b"".join(chunks), dtype=np.uint8))
    return path


def load(path=DATA):
    """(fingerprint dict, {name: array}) as written by :func:`record`."""
    with np.load(path, allow_pickle=False) as f:
        fp, index, blob = json.loads(str(f["fingerprint"])), json.loads(str(f["index"])), f["blob"].tobytes()
    out = {}
    for name, (dt, shape, offset, n) in index.items():
        dt = np.dtype(dt)
        out[name] = np.frombuffer(blob[offset:offset + n], dtype=dt).reshape(shape).copy()
    return fp, out


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/layer_bits.py --record   (overwrites tests/data/layer_bits.npz)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(record())
