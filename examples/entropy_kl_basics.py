"""Entropy, KL divergence, cross-entropy and NLL: the slides' numbers, recomputed.

* Shannon entropy H(P) = -sum p_i log p_i in bits (log2) and nats (ln) for the slides'
  examples: fair coin (1 bit), biased coin 0.9/0.1 (~0.469 bits), fair 4-sided die (2 bits),
  fair 6-sided die (log2 6 ~ 2.585 bits), (0.5, 0.25, 0.25) (1.5 bits).
* Differential entropy of N(mu, sigma^2), (1/2) log(2 pi e sigma^2) nats, against
  vg.MeanFieldGaussian.entropy() and a Monte Carlo estimate -mean log q(w), w ~ q (vigrad's
  sampler and log_prob).
* Discrete KL(P || Q) = sum p_i log(p_i / q_i): (0.6, 0.4) || (0.5, 0.5) ~ 0.029 bits as on
  the slides.  For (0.6, 0.3, 0.1) || (0.5, 0.25, 0.25) the slides quote ~0.066 bits and
  ~0.084 bits for the reverse; the sums give 0.1045 and 0.1332 bits (0.0725 and 0.0923 nats),
  printed below term by term: the slides' two numbers are wrong (the asymmetry they
  illustrate, KL(Q||P) > KL(P||Q) here, holds).
* Bernoulli KL in closed form against Monte Carlo (NumPy draws), and Gaussian KL with
  vg.kl_divergence against the formula and a Monte Carlo estimate made with vigrad
  (q.sample, q.log_prob, vg.Normal.log_prob), both directions.
* Cross-entropy H(P, Q) = H(P) + KL(P || Q), and the mean negative log-likelihood of labels
  drawn from P under a model Q converging to it.

Monte Carlo estimates are printed with their standard error (SE).

Run: python examples/entropy_kl_basics.py [--fast] [--outdir DIR]
"""

from __future__ import annotations

import math

import numpy as np

import vigrad as vg

import _common  # examples/_common.py, beside this script

ENTROPY_EXAMPLES = {
    "fair coin (0.5, 0.5)": [0.5, 0.5],
    "biased coin (0.9, 0.1)": [0.9, 0.1],
    "fair 4-sided die": [0.25] * 4,
    "fair 6-sided die": [1 / 6] * 6,
    "non-uniform (0.5, 0.25, 0.25)": [0.5, 0.25, 0.25],
    "deterministic (1, 0)": [1.0, 0.0],
}
SLIDE_ENTROPY_BITS = {"fair coin (0.5, 0.5)": 1.0, "biased coin (0.9, 0.1)": 0.47, "fair 4-sided die": 2.0,
                      "fair 6-sided die": 2.585, "non-uniform (0.5, 0.25, 0.25)": 1.5, "deterministic (1, 0)": 0.0}


def entropy(p, base=math.e):
    """-sum p log p, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    nz = p > 0
    return float(-np.sum(p[nz] * np.log(p[nz])) / math.log(base)) + 0.0  # + 0.0: no "-0.0"


def kl(p, q, base=math.e):
    """sum p log(p / q) (0 where p = 0; inf where q = 0 < p)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    nz = p > 0
    if np.any(q[nz] == 0):
        return math.inf
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])) / math.log(base))


def cross_entropy(p, q, base=math.e):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    nz = p > 0
    return float(-np.sum(p[nz] * np.log(q[nz])) / math.log(base))


def bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def gaussian_kl(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) in nats."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def mc(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def main(fast=False, outdir=None):
    n_mc = 100_000 if fast else 2_000_000
    rng = np.random.default_rng(2026)
    out = {"n_mc": n_mc}

    print("Shannon entropy                     bits     nats   (slides, bits)")
    ent_bits, ent_nats = {}, {}
    for name, p in ENTROPY_EXAMPLES.items():
        ent_bits[name], ent_nats[name] = entropy(p, 2), entropy(p)
        print(f"  {name:<31} {ent_bits[name]:7.4f}  {ent_nats[name]:7.4f}   {SLIDE_ENTROPY_BITS[name]}")
    print(f"  maximum entropy on n outcomes is log n: uniform on 6 gives {ent_nats['fair 6-sided die']:.4f}"
          f" = ln 6 = {math.log(6):.4f} nats")
    out["entropy_bits"], out["entropy_nats"] = ent_bits, ent_nats

    print("\nDifferential entropy of N(0, sigma^2), nats:  (1/2) log(2 pi e sigma^2)  vg entropy()  "
          "Monte Carlo -E log q")
    normal = []
    for k, sigma in enumerate((0.1, 0.5, 1.0, 2.0)):
        q = vg.MeanFieldGaussian.from_scale([0.0], [sigma])
        closed = 0.5 * math.log(2 * math.pi * math.e * sigma**2)
        w = q.sample(n_mc, rng=k)
        est, se = mc(-q.log_prob(w))
        normal.append({"sigma": sigma, "closed_form": closed, "vigrad": float(q.entropy()), "mc": est, "mc_se": se})
        print(f"  sigma = {sigma:<4}  {closed:10.6f}  {float(q.entropy()):10.6f}  {est:10.6f} +- {se:.6f}")
    print("  (negative for sigma < 1/sqrt(2 pi e) = 0.242: differential entropy is not a count of bits)")
    out["normal_entropy"] = normal

    print("\nDiscrete KL divergence")
    P2, Q2 = [0.6, 0.4], [0.5, 0.5]
    P3, Q3 = [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]
    kl2 = kl(P2, Q2, 2)
    kl3, kl3_rev = kl(P3, Q3, 2), kl(Q3, P3, 2)
    print(f"  KL((0.6,0.4) || (0.5,0.5))             = {kl2:.4f} bits = {kl(P2, Q2):.4f} nats   (slides: 0.029 bits)")
    print(f"  KL((0.6,0.3,0.1) || (0.5,0.25,0.25))   = {kl3:.4f} bits = {kl(P3, Q3):.4f} nats   (slides: 0.066)")
    terms = [p * math.log2(p / q) for p, q in zip(P3, Q3)]
    print("      terms p_i log2(p_i/q_i): " + " + ".join(f"{t:.4f}" for t in terms) + f" = {sum(terms):.4f}")
    print(f"  KL((0.5,0.25,0.25) || (0.6,0.3,0.1))   = {kl3_rev:.4f} bits = {kl(Q3, P3):.4f} nats   (slides: 0.084)")
    terms = [q * math.log2(q / p) for p, q in zip(P3, Q3)]
    print("      terms q_i log2(q_i/p_i): " + " + ".join(f"{t:.4f}" for t in terms) + f" = {sum(terms):.4f}")
    print("  -> the slides' 0.066 / 0.084 bits for the three-outcome pair do not match the sums; the"
          " asymmetry KL(Q||P) > KL(P||Q) does hold")
    print(f"  support: KL((0.5,0.5) || (1,0)) = {kl([0.5, 0.5], [1.0, 0.0])}  (Q gives 0 to an outcome P can produce)")
    out["kl_bits"] = {"two_outcome": kl2, "three_outcome": kl3, "three_outcome_reverse": kl3_rev}

    print("\nBernoulli KL(Ber(p) || Ber(q)), nats: closed form vs Monte Carlo mean of log P(x)/Q(x), x ~ Ber(p)")
    bern = []
    for p, q in ((0.6, 0.5), (0.9, 0.1), (0.5, 0.5)):
        x = rng.random(n_mc) < p
        ratio = np.where(x, math.log(p / q), math.log((1 - p) / (1 - q)))
        est, se = mc(ratio)
        closed = bernoulli_kl(p, q)
        bern.append({"p": p, "q": q, "closed_form": closed, "mc": est, "mc_se": se})
        print(f"  p = {p}, q = {q}:  {closed:.6f}   MC {est:.6f} +- {se:.6f}")
    out["bernoulli_kl"] = bern

    print("\nGaussian KL, nats: q = N(1, 0.5^2), p = N(0, 1)")
    q = vg.MeanFieldGaussian.from_scale([1.0], [0.5])
    p = vg.Normal(0.0, 1.0)
    w = q.sample(n_mc, rng=7)
    est, se = mc(q.log_prob(w) - p.log_prob(w))
    fwd_vg = float(vg.kl_divergence(q, p))
    fwd_formula = gaussian_kl(1.0, 0.5, 0.0, 1.0)
    p_as_q = vg.MeanFieldGaussian.from_scale([0.0], [1.0])
    z = p_as_q.sample(n_mc, rng=8)
    rev_est, rev_se = mc(p_as_q.log_prob(z) - vg.Normal(1.0, 0.5).log_prob(z))
    rev_vg = float(vg.kl_divergence(p_as_q, vg.Normal(1.0, 0.5)))
    rev_formula = gaussian_kl(0.0, 1.0, 1.0, 0.5)
    print(f"  KL(q || p): vg.kl_divergence {fwd_vg:.6f}  formula {fwd_formula:.6f}  MC {est:.6f} +- {se:.6f}")
    print(f"  KL(p || q): vg.kl_divergence {rev_vg:.6f}  formula {rev_formula:.6f}  MC {rev_est:.6f} +- {rev_se:.6f}")
    out["gaussian_kl"] = {"forward": {"vigrad": fwd_vg, "closed_form": fwd_formula, "mc": est, "mc_se": se},
                          "reverse": {"vigrad": rev_vg, "closed_form": rev_formula, "mc": rev_est, "mc_se": rev_se}}

    print("\nCross-entropy and NLL (P = true label distribution, Q = model), nats")
    H, CE, K = entropy(P3), cross_entropy(P3, Q3), kl(P3, Q3)
    labels = rng.choice(3, size=n_mc, p=P3)
    nll, nll_se = mc(-np.log(np.asarray(Q3))[labels])
    print(f"  H(P) = {H:.6f}, KL(P || Q) = {K:.6f}, H(P) + KL = {H + K:.6f}, H(P, Q) = {CE:.6f}")
    print(f"  mean NLL -log Q(y) over {n_mc} labels y ~ P: {nll:.6f} +- {nll_se:.6f} (-> H(P, Q))")
    print("  the NLL can never go below H(P): the KL part is what a better model can remove")
    out["cross_entropy"] = {"H": H, "KL": K, "CE": CE, "nll": nll, "nll_se": nll_se}

    png = None
    plt = _common.pyplot()
    if plt is None:
        print("plot skipped: matplotlib not installed")
    else:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        ps = np.linspace(1e-4, 1 - 1e-4, 400)
        axes[0].plot(ps, [entropy([v, 1 - v], 2) for v in ps])
        axes[0].set_xlabel("p")
        axes[0].set_ylabel("H (bits)")
        axes[0].set_title("Bernoulli entropy (max 1 bit at p = 0.5)")
        sig = np.linspace(0.05, 3, 300)
        axes[1].plot(sig, 0.5 * np.log(2 * np.pi * np.e * sig**2), label="(1/2) log(2 pi e sigma^2)")
        axes[1].plot([d["sigma"] for d in normal], [d["mc"] for d in normal], "o", label="Monte Carlo (vigrad)")
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].set_xlabel("sigma")
        axes[1].set_ylabel("h (nats)")
        axes[1].set_title("Gaussian differential entropy")
        axes[1].legend(fontsize=8)
        qs = np.linspace(0.01, 0.99, 300)
        axes[2].plot(qs, [bernoulli_kl(0.6, v) for v in qs], label="KL(Ber(0.6) || Ber(q))")
        axes[2].plot(qs, [bernoulli_kl(v, 0.6) for v in qs], label="KL(Ber(q) || Ber(0.6))")
        axes[2].set_ylim(0, 2)
        axes[2].set_xlabel("q")
        axes[2].set_title("KL is asymmetric")
        axes[2].legend(fontsize=8)
        fig.tight_layout()
        png = _common.save(fig, plt, outdir, __file__)
    out["png"] = png
    return out


# -- shared example plumbing (each example is self-contained) ------------------------------------------




if __name__ == "__main__":
    _common.cli(main, __doc__)
