"""The worked examples in examples/: each runs in fast mode and states the right numbers.

Every script is imported from the examples directory (importlib) and its ``main(fast=True,
outdir=...)`` is called once per session, with matplotlib hidden (sys.modules["matplotlib"] =
None), so the in-process runs take the no-matplotlib path and write nothing.  The numbers they
return are held to oracles computed here: closed forms, SciPy quadrature / optimisation, or
scikit-learn.  Each script also runs once as a subprocess with --fast --outdir tmp_path (with
matplotlib when it is installed, MPLBACKEND=Agg), which must leave the repository untouched.

Tolerances (all with the scripts' fixed seeds, so the outcomes are deterministic):

* Monte Carlo estimates: within 4 standard errors of the exact value (5 for the variances of the
  gradient estimators, whose standard errors are themselves estimated from heavy-tailed samples).
* score > score + baseline > pathwise: each gap at least 5 SE of the difference (the fast run
  gives >= 11.1 SE at S = 4 and more at S = 16 and 64, with 3000 replicates per cell at q = N(0, 1)).
* stochastic fits: the seed example's Polyak averages within 0.04 (mu) / 0.03 (sigma) of the
  optimum, about 5 batch-means SE; reverse-KL modes |mean| within 0.2 of 2 and sd within 20 % of
  0.5; vg.fit's Gaussians within 3 % (mean field) / 6 % (full, low rank) in sd.
* minibatch SGD: every minibatch method's best validation loss within a factor 1.05 of full-batch
  GD's, and every method within a factor 1.1 of scikit-learn's L2-regularised logistic regression.
"""

import contextlib
import importlib.util
import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vg_testutil import EXAMPLES, load_example

NAMES = ["seed_bbb_1d", "minibatch_sgd", "entropy_kl_basics", "forward_vs_reverse_kl", "jensen_gap_lognormal",
         "cavi_normal_gamma", "correlated_posterior_meanfield", "score_vs_pathwise", "torch_bbb_digits"]
NEEDS = {"minibatch_sgd": "sklearn", "torch_bbb_digits": "torch"}  # optional packages an example imports
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
START = time.time()


@pytest.fixture(scope="module")
def run_fast(tmp_path_factory):
    """name -> (module, result dict, stdout, outdir): main(fast=True) once, matplotlib hidden."""
    cache = {}

    def get(name):
        if name not in cache:
            module = load_example(name)
            outdir = tmp_path_factory.mktemp(name)
            buf = io.StringIO()
            with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
                mp.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
                result = module.main(fast=True, outdir=outdir)
            cache[name] = (module, result, buf.getvalue(), outdir)
        return cache[name]

    return get


def within_se(estimate, exact, se, k=4.0):
    return abs(estimate - exact) <= k * se


# ---------------------------------------------------------------------------------------------- plumbing

def test_every_example_is_listed_and_documented():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))  # _common: plumbing
    assert scripts == sorted(NAMES)
    readme = (EXAMPLES / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.py" in readme


@pytest.mark.parametrize("name", NAMES)
def test_in_process_run_without_matplotlib(name, run_fast):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    _, result, out, outdir = run_fast(name)
    assert isinstance(result, dict) and result["png"] is None
    assert "plot skipped: matplotlib not installed" in out
    assert list(Path(outdir).iterdir()) == []
    assert not (EXAMPLES / f"{name}.png").exists() or (EXAMPLES / f"{name}.png").stat().st_mtime < START


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_script_runs_as_a_subprocess(name, tmp_path):
    if name == "torch_bbb_digits":
        pytest.importorskip("torch")
    before = sorted(p.name for p in EXAMPLES.iterdir())
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")  # no examples/__pycache__ either
    env.pop("VIGRAD_EXAMPLES_FAST", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--fast", "--outdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in EXAMPLES.iterdir()) == before  # nothing written next to the scripts
    produced = [p.name for p in tmp_path.iterdir()]
    if name == "minibatch_sgd" and not HAS_SKLEARN:
        assert "scikit-learn is not installed" in proc.stdout and produced == []
    elif HAS_MPL:
        assert produced == [f"{name}.png"] and (tmp_path / f"{name}.png").stat().st_size > 1000
    else:
        assert "plot skipped: matplotlib not installed" in proc.stdout and produced == []


def test_fast_mode_from_the_environment(tmp_path):
    # run_path does not put the script's directory on sys.path as `python examples/NAME.py` does
    env = dict(os.environ, VIGRAD_EXAMPLES_FAST="1", MPLBACKEND="Agg", PYTHONPATH=str(EXAMPLES),
               PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c",
                           "import sys, runpy; sys.modules['matplotlib'] = None; "
                           f"sys.argv = ['entropy_kl_basics.py', '--outdir', {str(tmp_path)!r}]; "
                           f"runpy.run_path({str(EXAMPLES / 'entropy_kl_basics.py')!r}, run_name='__main__')"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "over 100000 labels" in proc.stdout  # the fast setting
    assert "plot skipped: matplotlib not installed" in proc.stdout


# ---------------------------------------------------------------------------------------------- seed

def test_seed_bbb_1d(run_fast):
    _, r, out, _ = run_fast("seed_bbb_1d")
    exact_mu, exact_sigma = 0.25, math.sqrt(0.5)
    exact_f = 0.5 * math.log(2) + 1 / 16  # -log of the evidence  int N(w; 0, 1) exp(-(w - 0.5)^2 / 2) dw
    assert r["grad_max_abs_diff"] < 1e-12
    assert r["mu_avg_se"] < 0.015 and r["sigma_avg_se"] < 0.01
    assert abs(r["mu_avg"] - exact_mu) < 0.04
    assert abs(r["sigma_avg"] - exact_sigma) < 0.03
    mu, s = r["mu_avg"], r["sigma_avg"]
    f_at_avg = (-math.log(s) + (s * s + mu * mu) / 2 - 0.5) + 0.5 * ((mu - 0.5) ** 2 + s * s)
    assert r["F_at_avg"] == pytest.approx(f_at_avg, abs=1e-12)
    assert exact_f <= f_at_avg < exact_f + 2e-3  # F* is the minimum over the family
    assert r["F_trace_mean"] > exact_f
    assert "step  90" in out


# ---------------------------------------------------------------------------------------------- SGD

def test_minibatch_sgd(run_fast):
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    module, r, out, _ = run_fast("minibatch_sgd")
    assert not r["skipped"]
    X, y, Xv, yv = module.load_data()
    m = r["methods"]
    gd = m["gd"]
    per_epoch = math.ceil(len(y) / 32)
    assert gd["steps"] == gd["epochs"]
    for key in ("shuffle", "replacement", "nesterov_clip"):
        assert m[key]["steps"] == m[key]["epochs"] * per_epoch
        assert m[key]["val_loss"] <= 1.05 * gd["val_loss"], (key, m[key]["val_loss"], gd["val_loss"])
        assert m[key]["epochs_to_target"] is not None
        assert m[key]["epochs_to_target"] < gd["epochs_to_target"]  # fewer passes over the data than GD
    clf = LogisticRegression(C=1.0, max_iter=10000).fit(X, y)
    z = Xv @ clf.coef_[0] + clf.intercept_[0]
    sk_val = float(np.mean(np.logaddexp(0, z) - yv * z))
    for key in ("gd", "shuffle", "replacement", "nesterov_clip"):
        assert m[key]["val_loss"] <= 1.1 * sk_val, (key, m[key]["val_loss"], sk_val)
        assert m[key]["val_accuracy"] >= 0.95
        assert m[key]["train_loss"] < math.log(2)  # better than the initial w = 0


# ---------------------------------------------------------------------------------------------- entropy, KL

def test_entropy_kl_basics(run_fast):
    _, r, out, _ = run_fast("entropy_kl_basics")
    bits = r["entropy_bits"]
    # the slides' numbers, to 1e-3
    assert bits["fair coin (0.5, 0.5)"] == pytest.approx(1.0, abs=1e-3)
    assert bits["biased coin (0.9, 0.1)"] == pytest.approx(0.469, abs=1e-3)
    assert bits["fair 4-sided die"] == pytest.approx(2.0, abs=1e-3)
    assert bits["fair 6-sided die"] == pytest.approx(math.log2(6), abs=1e-3)
    assert bits["non-uniform (0.5, 0.25, 0.25)"] == pytest.approx(1.5, abs=1e-3)
    assert bits["deterministic (1, 0)"] == 0.0
    for name, b in bits.items():
        assert r["entropy_nats"][name] == pytest.approx(b * math.log(2), abs=1e-12)
    kl = r["kl_bits"]
    assert kl["two_outcome"] == pytest.approx(0.029, abs=1e-3)
    # the three-outcome pair: the slides say ~0.066 and ~0.084 bits; the sums are 0.1045 / 0.1332
    P, Q = [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]
    assert kl["three_outcome"] == pytest.approx(sum(p * math.log2(p / q) for p, q in zip(P, Q)), abs=1e-12)
    assert kl["three_outcome_reverse"] == pytest.approx(sum(q * math.log2(q / p) for p, q in zip(P, Q)), abs=1e-12)
    assert kl["three_outcome"] == pytest.approx(0.1045, abs=1e-3)
    assert kl["three_outcome_reverse"] == pytest.approx(0.1332, abs=1e-3)
    assert abs(kl["three_outcome"] - 0.066) > 0.03 and abs(kl["three_outcome_reverse"] - 0.084) > 0.03
    for row in r["normal_entropy"]:
        exact = 0.5 * math.log(2 * math.pi * math.e * row["sigma"] ** 2)
        assert row["closed_form"] == pytest.approx(exact, abs=1e-12)
        assert row["vigrad"] == pytest.approx(exact, abs=1e-12)
        assert within_se(row["mc"], exact, row["mc_se"])
    for row in r["bernoulli_kl"]:
        p, q = row["p"], row["q"]
        exact = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        assert row["closed_form"] == pytest.approx(exact, abs=1e-12)
        if row["mc_se"] == 0:
            assert row["mc"] == pytest.approx(exact, abs=1e-12)
        else:
            assert within_se(row["mc"], exact, row["mc_se"])
    g = r["gaussian_kl"]
    fwd = math.log(1 / 0.5) + (0.25 + 1.0) / 2 - 0.5  # KL(N(1, 0.25) || N(0, 1))
    rev = math.log(0.5 / 1) + (1 + 1.0) / (2 * 0.25) - 0.5  # KL(N(0, 1) || N(1, 0.25))
    assert g["forward"]["vigrad"] == pytest.approx(fwd, rel=1e-12)
    assert g["reverse"]["vigrad"] == pytest.approx(rev, rel=1e-12)
    assert within_se(g["forward"]["mc"], fwd, g["forward"]["mc_se"])
    assert within_se(g["reverse"]["mc"], rev, g["reverse"]["mc_se"])
    ce = r["cross_entropy"]
    assert ce["CE"] == pytest.approx(-sum(p * math.log(q) for p, q in zip(P, Q)), abs=1e-12)
    assert ce["CE"] == pytest.approx(ce["H"] + ce["KL"], abs=1e-12)
    assert within_se(ce["nll"], ce["CE"], ce["nll_se"])


# ---------------------------------------------------------------------------------------------- forward vs reverse

def test_forward_vs_reverse_kl(run_fast):
    _, r, _, _ = run_fast("forward_vs_reverse_kl")
    fits = r["reverse_fits"]
    for f in fits[:2]:  # the MAP-started fits land on the mode on init's side
        assert f["converged"]
        assert abs(abs(f["mean"]) - 2.0) < 0.2 and np.sign(f["mean"]) == np.sign(f["init"])
        assert abs(f["sd"] - 0.5) < 0.2 * 0.5
        assert r["reverse_optimum"]["kl"] - 1e-9 <= f["kl"] < r["reverse_optimum"]["kl"] + 0.01
    # the forward fit: exact moment matching, mean 0 and variance 0.5 (0.25 + 4) * 2 - 0 = 4.25
    fwd = r["forward"]
    assert fwd["mean"] == 0.0
    assert fwd["sd"] == pytest.approx(math.sqrt(4.25), rel=1e-14)
    assert within_se(fwd["mc_mean"], 0.0, fwd["mc_mean_se"])
    assert fwd["mc_sd"] == pytest.approx(math.sqrt(4.25), rel=0.01)
    assert fwd["kl_nearby_min"] > fwd["kl"]
    # the reverse-KL optima by SciPy quadrature and optimisation, independent of the example's
    integrate = pytest.importorskip("scipy.integrate")
    optimize = pytest.importorskip("scipy.optimize")

    def log_p(z):
        c = -0.5 * math.log(2 * math.pi * 0.25) + math.log(0.5)
        return np.logaddexp(c - 2 * (z + 2) ** 2, c - 2 * (z - 2) ** 2)

    def rkl(mu, s):
        def integrand(z):
            lq = -0.5 * math.log(2 * math.pi * s * s) - 0.5 * ((z - mu) / s) ** 2
            return math.exp(lq) * (lq - log_p(z))
        return integrate.quad(integrand, mu - 12 * s, mu + 12 * s, epsabs=1e-12, limit=200)[0]

    mode = optimize.minimize(lambda v: rkl(v[0], math.exp(v[1])), [1.5, math.log(0.7)], method="Nelder-Mead",
                             options=dict(xatol=1e-7, fatol=1e-12))
    assert r["reverse_optimum"]["mean"] == pytest.approx(mode.x[0], abs=2e-3)
    assert r["reverse_optimum"]["sd"] == pytest.approx(math.exp(mode.x[1]), abs=2e-3)
    assert r["reverse_optimum"]["kl"] == pytest.approx(mode.fun, abs=1e-6)
    centre = optimize.minimize_scalar(lambda ls: rkl(0.0, math.exp(ls)), bracket=(0.0, 0.5, 1.0))
    assert r["centre_optimum"]["sd"] == pytest.approx(math.exp(centre.x), abs=2e-3)
    assert r["centre_optimum"]["kl"] == pytest.approx(centre.fun, abs=1e-6)
    assert r["centre_optimum"]["mu_curvature"] > 0
    # vg.fit from init = 0 without the MAP start stops near that central local optimum
    c = fits[2]
    assert abs(c["mean"]) < 0.5 and abs(c["sd"] - math.exp(centre.x)) < 0.15 * math.exp(centre.x)
    assert c["kl"] > r["reverse_optimum"]["kl"] + 1.0


# ---------------------------------------------------------------------------------------------- Jensen, ELBO

def test_jensen_gap_lognormal(run_fast):
    _, r, _, _ = run_fast("jensen_gap_lognormal")
    for row in r["jensen"]:
        s = row["s"]
        assert row["gap_exact"] == pytest.approx(s * s / 2, rel=1e-14)
        assert within_se(row["gap_mc"], s * s / 2, row["gap_se"]), row
        assert row["E_log_X"] == r["m"]
    # the slides' figure: E[X] = 1.83, gap = 0.41 (s^2 = 0.82)
    slide = [row for row in r["jensen"] if abs(row["s"] ** 2 - 0.82) < 1e-12][0]
    assert slide["gap_exact"] == pytest.approx(0.41, abs=1e-12)
    assert slide["E_X_mc"] == pytest.approx(math.exp(0.2 + 0.41), rel=0.01)
    x = 2.0
    log_ev = -0.5 * math.log(2 * math.pi * 2) - x * x / 4  # N(x; 0, 2)
    assert r["log_evidence"] == pytest.approx(log_ev, abs=1e-14)
    for row in r["elbo"]:
        mu, s = row["mu"], row["sigma"]
        elbo = (-0.5 * math.log(2 * math.pi) - 0.5 * ((x - mu) ** 2 + s * s)) - (-math.log(s) + (s * s + mu * mu) / 2 - 0.5)
        kl_post = math.log(math.sqrt(0.5) / s) + (s * s + (mu - x / 2) ** 2) / (2 * 0.5) - 0.5
        assert row["elbo_exact"] == pytest.approx(elbo, abs=1e-12)
        assert row["kl_post"] == pytest.approx(kl_post, abs=1e-12)
        assert row["elbo_plus_kl"] == pytest.approx(log_ev, abs=1e-12)
        assert row["elbo_mc"] <= log_ev + 1e-12
        if row["note"] == "posterior":
            assert row["elbo_mc"] == pytest.approx(log_ev, abs=1e-12) and row["mc_spread"] < 1e-12
        else:
            assert within_se(row["elbo_mc"], elbo, row["elbo_mc_se"]), row


# ---------------------------------------------------------------------------------------------- CAVI

def test_cavi_normal_gamma(run_fast):
    _, r, _, _ = run_fast("cavi_normal_gamma")
    x, p = r["x"], r["prior"]
    n, xbar = len(x), float(np.mean(x))
    lam = p["lambda0"] + n
    mu_post = (p["lambda0"] * p["mu0"] + n * xbar) / lam
    a = p["a0"] + n / 2
    b = p["b0"] + 0.5 * float(np.sum((x - xbar) ** 2)) + p["lambda0"] * n * (xbar - p["mu0"]) ** 2 / (2 * lam)
    log_ev = (math.lgamma(a) - math.lgamma(p["a0"]) + p["a0"] * math.log(p["b0"]) - a * math.log(b)
              + 0.5 * math.log(p["lambda0"] / lam) - 0.5 * n * math.log(2 * math.pi))
    c = r["cavi"]
    assert c["converged"]
    assert c["mu_n"] == pytest.approx(mu_post, rel=1e-12)
    assert c["E_tau"] == pytest.approx(a / b, rel=1e-9)
    assert c["a_n"] == a + 0.5
    assert c["sd_mu"] == pytest.approx(math.sqrt(b / (lam * a)), rel=1e-9)  # < exact sqrt(b / (lam (a - 1)))
    assert c["sd_mu"] < math.sqrt(b / (lam * (a - 1)))
    assert c["sd_tau"] < math.sqrt(a) / b
    assert r["exact"]["log_evidence"] == pytest.approx(log_ev, abs=1e-10)
    elbo = c["elbo"]
    assert np.all(np.diff(elbo) >= -1e-12 * abs(elbo[-1]))
    gap = log_ev - elbo[-1]
    assert 0 < gap and gap == pytest.approx(1 / (4 * a), rel=0.05)
    gaps = [g["gap"] for g in r["gaps"]]
    assert all(g > 0 for g in gaps) and all(g1 > g2 for g1, g2 in zip(gaps, gaps[1:]))
    assert [t["elbo"] for t in r["trace"]] == pytest.approx(list(elbo), abs=0)


# ---------------------------------------------------------------------------------------------- mean field

def test_correlated_posterior_meanfield(run_fast):
    _, r, _, _ = run_fast("correlated_posterior_meanfield")
    Sigma, m = r["true_cov"], r["true_mean"]
    prec = np.linalg.inv(Sigma)
    sd_true = np.sqrt(np.diag(Sigma))
    sd_cond = 1 / np.sqrt(np.diag(prec))
    assert np.all(sd_cond < sd_true)
    fits = r["fits"]
    for fam, f in fits.items():
        assert f["converged"], fam
        np.testing.assert_allclose(f["mean"], m, atol=0.05 * sd_true.max())
    np.testing.assert_allclose(fits["meanfield"]["sd"], sd_cond, rtol=0.03)
    for fam in ("fullrank", "lowrank"):
        np.testing.assert_allclose(fits[fam]["sd"], sd_true, rtol=0.06)
        corr = fits[fam]["cov"][0, 1] / math.sqrt(fits[fam]["cov"][0, 0] * fits[fam]["cov"][1, 1])
        assert corr == pytest.approx(Sigma[0, 1] / math.sqrt(Sigma[0, 0] * Sigma[1, 1]), abs=0.03)
        assert fits[fam]["kl"] < 0.01
    # the best mean-field KL: (1/2) (sum log Lambda_ii + log det Sigma), reached to within 1e-3
    mf_best = 0.5 * (np.sum(np.log(np.diag(prec))) + np.linalg.slogdet(Sigma)[1])
    assert r["meanfield_optimum_kl"] == pytest.approx(mf_best, abs=1e-12)
    assert mf_best - 1e-9 <= fits["meanfield"]["kl"] < mf_best + 1e-3


# ---------------------------------------------------------------------------------------------- estimators

def _moments_by_quadrature(mu, sigma, x=2.0):
    """Single-sample moments of the loc-gradient estimators, by Gauss-Hermite quadrature (independent
    of the example's algebra): f = log q - log p(z) - log N(x; z, 1), score g = f eps / sigma."""
    t, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    z = mu + sigma * t
    h = 0.5 * math.log(2 * math.pi)
    f = (-h - math.log(sigma) - 0.5 * t * t) - (-h - 0.5 * z * z) - (-h - 0.5 * (x - z) ** 2)
    E = lambda v: float(np.sum(w * v))  # noqa: E731
    g = f * t / sigma
    U, V = f - E(f), t / sigma
    return {"score_var1": E(g * g) - E(g) ** 2, "mu22": E(U * U * V * V), "mu11": E(U * V), "mu20": E(U * U),
            "mu02": E(V * V), "pathwise_var1": E((2 * z - x) ** 2) - E(2 * z - x) ** 2,
            "stl_var1": E((2 * z - x - t / sigma) ** 2) - E(2 * z - x - t / sigma) ** 2, "grad": E(2 * z - x)}


def _loo_variance(mo, S):
    """Variance of the unbiased sample covariance of S iid pairs (what the leave-one-out baseline is)."""
    return mo["mu22"] / S - (S - 2) * mo["mu11"] ** 2 / (S * (S - 1)) + mo["mu20"] * mo["mu02"] / (S * (S - 1))


@pytest.mark.slow
def test_score_vs_pathwise(run_fast):
    _, r, _, _ = run_fast("score_vs_pathwise")
    res = r["results"]
    points = {"q = N(0, 1)": (0.0, 1.0), "q = posterior N(1, 1/2)": (1.0, math.sqrt(0.5))}
    for label, (mu, sigma) in points.items():
        mo = _moments_by_quadrature(mu, sigma)
        for (name, S), cell in res[label].items():
            if cell is None:
                assert name == "score+loo" and S == 1
                continue
            exact = {"score": mo["score_var1"] / S, "pathwise": mo["pathwise_var1"] / S,
                     "stl": mo["stl_var1"] / S, "score+loo": _loo_variance(mo, S) if S > 1 else None}[name]
            if exact < 1e-20:  # zero-variance estimators at the posterior
                assert cell["var"] < 1e-20, (label, name, S)
                assert cell["mean"] == pytest.approx(mo["grad"], abs=1e-12)
            else:
                assert cell["exact"] == pytest.approx(exact, rel=1e-9)
                assert within_se(cell["var"], exact, cell["var_se"], k=5.0), (label, name, S, cell)
                assert within_se(cell["mean"], mo["grad"], cell["mean_se"], k=5.0), (label, name, S, cell)
    # at q = N(0, 1): score > score + baseline > pathwise, many SE apart
    off = res["q = N(0, 1)"]
    for S in (4, 16, 64):
        a, b, c = off[("score", S)], off[("score+loo", S)], off[("pathwise", S)]
        assert a["var"] - b["var"] >= 5 * math.hypot(a["var_se"], b["var_se"]), S
        assert b["var"] - c["var"] >= 5 * math.hypot(b["var_se"], c["var_se"]), S
        assert r["z_scores"][S][0] >= 5 and r["z_scores"][S][1] >= 5
    # at the posterior STL has zero variance, the pathwise estimator does not
    post = res["q = posterior N(1, 1/2)"]
    for S in (1, 4, 16, 64):
        assert post[("stl", S)]["var"] < 1e-20
        assert post[("pathwise", S)]["var"] > 0.1 / S


def test_torch_bbb_digits(run_fast):
    """The PyTorch network of vgt.BayesianLinear layers learns the digits, and lands where
    vg.BayesianMLP (the same model in vigrad's NumPy layer) does."""
    pytest.importorskip("torch")
    _, result, out, _ = run_fast("torch_bbb_digits")
    assert "accuracy" in out
    r = result["estimators"]["reparam"]
    assert r["accuracy"] > 0.9 and r["numpy_twin"]["accuracy"] > 0.9
    assert abs(r["accuracy"] - r["numpy_twin"]["accuracy"]) < 0.05
