// Bayes by Backprop layers: the elementwise work of a training step, fused.
//
// A layer's parameters are one flat vector (weights then biases) with a mean-field
// Gaussian q: w = loc + softplus(rho) * eps.  The matrix products run in BLAS (bind_blas.cpp);
// here are the passes over the parameters:
//   forward:  w = loc + sigma eps                    (reparameterisation)
//             dw = sigma eps                         (Flipout's shared perturbation)
//   backward: dF/dloc, dF/drho for F = NLL + kl_weight KL[q || prior], from
//             A = dNLL/dloc and C = dNLL/dsigma, with C given, or C = B eps
//             (B = dNLL/dw for the reparameterisation, dNLL/d(dw) for Flipout).
// The noise is never stored: eps is regenerated from (key, 0, j) in the backward pass,
// bit for bit the draws of the forward pass.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "gradients.hpp"
#include "math.hpp"
#include "parallel.hpp"
#include "philox.hpp"
#include "priors.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// buf[i] = draw (key, 0, j0 + i) for i < m; j0 must be a multiple of the draws per counter.
// Straight into buf, without for_each_normal_run's row bookkeeping.
template <class Real>
inline void normals_row0(PhiloxKey key, std::int64_t j0, std::int64_t m, Real* buf) {
  constexpr int P = NormalTraits<Real>::per_counter;
  const std::int64_t f0 = j0 / P;
  std::int64_t i = 0;
  for (; i + kLanes * P <= m; i += kLanes * P) normal_lanes_row(key, 0, static_cast<std::uint64_t>(f0 + i / P), buf + i);
  if (i < m) {
    alignas(64) Real z[kLanes * P];
    normal_lanes_row(key, 0, static_cast<std::uint64_t>(f0 + i / P), z);
    std::copy(z, z + (m - i), buf + i);
  }
}


// One element's KL term.  MC: log q(w) - log p(w) at w = loc + sigma eps, with lp = log p(w).
// Analytic: KL[N(loc, sigma^2) || N(m, s^2)] with inv_ps2 = 1 / s^2, dm = loc - m.
// In Real: a double log of a converted float would mix vector widths and stop gcc vectorising.
template <class Real>
inline double mc_kl_term(Real eps, Real lp, Real sigma) {
  return static_cast<double>(Real(-0.5) * eps * eps - lp - std::log(sigma) - kHalfLog2Pi<Real>);
}

template <class Real>
inline double analytic_kl_term(Real ps, Real inv_ps2, Real dm, Real sigma) {
  return static_cast<double>(std::log(ps) - std::log(sigma) + Real(0.5) * (sigma * sigma + dm * dm) * inv_ps2 -
                             Real(0.5));
}

// The weight noise and the layer's KL value in one pass, eps = draws (key, 0, j):
//   out = loc + softplus(rho) eps (Use = kWeights), softplus(rho) eps (kPerturbation), or
//   nothing (kNone);  returns the KL value bbb_grad computes from the same key (bit for bit
//   where both form w = loc + sigma eps alike), 0 for KP = kNone.
// `Use` is a template parameter: a run-time switch read inside the loop (through the lambda's
// captured reference) made gcc version the loop on aliasing, and the vector version was never
// taken: 3.6x slower.  `work`: num_blocks(D) doubles (unused, may be null, for KP = kNone).
template <NoiseUse Use, KLPart KP, class Real, class Prior>
double bbb_noise_kl(std::uint64_t key, const Real* loc, const Real* rho, std::int64_t D, const Prior& prior,
                    Real* out, double* work, int workers) {
  const PhiloxKey k = make_key(key);
  parallel_for_blocks(num_blocks(D), workers_for(D * 64, workers), [=](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    alignas(64) Real eps[kBlock];
    alignas(64) double kl_terms[KP == KLPart::kNone ? 1 : kBlock];
    const Prior pr = prior;
    normals_row0(k, j0, m, eps);
    for (std::int64_t i = 0; i < m; ++i) {
      const std::int64_t j = j0 + i;
      const Real sigma = softplus(rho[j]);
      const Real w = loc[j] + sigma * eps[i];
      if constexpr (Use == NoiseUse::kWeights) out[j] = w;
      else if constexpr (Use == NoiseUse::kPerturbation) out[j] = sigma * eps[i];
      if constexpr (KP == KLPart::kMC) {
        Real lp, gp;
        pr.eval(j, w, lp, gp);
        kl_terms[i] = mc_kl_term(eps[i], lp, sigma);
      } else if constexpr (KP == KLPart::kAnalytic) {
        const Real pm = pr.loc(j), ps = pr.scale(j);
        kl_terms[i] = analytic_kl_term(ps, Real(1) / (ps * ps), loc[j] - pm, sigma);
      }
    }
    if constexpr (KP != KLPart::kNone) work[b] = lane_sum(kl_terms, m);
  });
  double kl = 0.0;
  if constexpr (KP != KLPart::kNone)
    for (std::int64_t b = 0; b < num_blocks(D); ++b) kl += work[b];
  return kl;
}

// One Adam step (Kingma & Ba, with bias correction), the arithmetic of vg.optim.adam:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),  t = step + 1,
// evaluated as p - a (m / (sqrt(v) r + eps)) with the scalars a = lr / (1 - b1^t) and
// r = 1 / sqrt(1 - b2^t) computed once in double: one division and one square root per element.
// Both go through the one divider, which bounds the loop (Zen 4: ~5 cycles per 4 doubles for a
// division, ~9 for a square root); with three divisions a step of 10^5 doubles took 187 us on
// one Zen 4 core, with one 133-137 us.
template <class Real>
struct AdamStep {
  Real c1, c2, b1, b2, one_b1, one_b2, eps;  // c1 = lr / (1 - b1^t), c2 = 1 / sqrt(1 - b2^t)
  AdamStep(std::int64_t step, double lr_, double b1_, double b2_, double eps_) {
    const double t = static_cast<double>(step + 1);
    c1 = static_cast<Real>(lr_ / (1.0 - std::pow(b1_, t)));
    c2 = static_cast<Real>(1.0 / std::sqrt(1.0 - std::pow(b2_, t)));
    b1 = static_cast<Real>(b1_);
    b2 = static_cast<Real>(b2_);
    one_b1 = static_cast<Real>(1.0 - b1_);
    one_b2 = static_cast<Real>(1.0 - b2_);
    eps = static_cast<Real>(eps_);
  }
  // One element: (m, v, p) from (g, m, v, p).  Both loops below run this, so in-place and
  // out-of-place steps give the same bits.
  static inline Real element(Real gj, Real mj, Real vj, Real pj, Real a, Real r, Real rb1, Real rb2,
                             Real ob1, Real ob2, Real re, Real& m_new, Real& v_new) {
    m_new = rb1 * mj + ob1 * gj;
    v_new = rb2 * vj + ob2 * (gj * gj);
    return pj - a * (m_new / (std::sqrt(v_new) * r + re));
  }
  // p, m, v[0, n) updated in place with the gradient g.  The scalars are copied to locals first:
  // read through `this`, they are Real objects the stores to p, m, v might alias, and gcc reloaded
  // them every iteration and did not vectorise (6x slower).
  void apply(Real* p, const Real* g, Real* m, Real* v, std::int64_t n) const {
    const Real a = c1, r = c2, rb1 = b1, rb2 = b2, ob1 = one_b1, ob2 = one_b2, re = eps;
    for (std::int64_t j = 0; j < n; ++j) {
      Real mj, vj;
      const Real pj = element(g[j], m[j], v[j], p[j], a, r, rb1, rb2, ob1, ob2, re, mj, vj);
      m[j] = mj;
      v[j] = vj;
      p[j] = pj;
    }
  }
  // The same from (p, m, v) into outputs that overlap no input (the out-of-place
  // Optimizer.update): one pass that reads each input once, where copying the inputs to the
  // outputs and then running apply() there spent half the time in the copies (d = 10^5).
  void apply_to(const Real* __restrict p, const Real* __restrict g, const Real* __restrict m,
                const Real* __restrict v, Real* __restrict po, Real* __restrict mo, Real* __restrict vo,
                std::int64_t n) const {
    const Real a = c1, r = c2, rb1 = b1, rb2 = b2, ob1 = one_b1, ob2 = one_b2, re = eps;
    for (std::int64_t j = 0; j < n; ++j) {
      Real mj, vj;
      po[j] = element(g[j], m[j], v[j], p[j], a, r, rb1, rb2, ob1, ob2, re, mj, vj);
      mo[j] = mj;
      vo[j] = vj;
    }
  }
};

// bbb_grad's optional fused Adam step on the layer's own (loc, rho) with their moments.
template <class Real>
struct AdamTarget {
  Real *loc, *rho, *m_loc, *v_loc, *m_rho, *v_rho;
  AdamStep<Real> step;
};

// The fused backward pass (see the file comment).  Per element, with sg = sigmoid(rho):
//   dF/dloc = A + kl_weight dKL/dloc,   dF/drho = (C + kl_weight dKL/dsigma) sg
//   MC:       dKL/dloc = -gp(w),  dKL/dsigma = -gp(w) eps - 1/sigma,  w = loc + sigma eps
//   analytic: dKL/dloc = (loc - m)/s^2,  dKL/dsigma = sigma/s^2 - 1/sigma   (Normal prior)
// Returns the KL value (MC: sum of log q(w) - log p(w); analytic: closed form).
// With `accumulate` the gradients are added to grad_loc / grad_rho instead of written there.
// `work`: num_blocks(D) doubles.
// WantKL = false: the KL value is not formed (returns 0): the caller has it from bbb_noise_kl.
// With `adam` the block's gradients also take an Adam step on (loc, rho) right away, while they
// are in cache (a separate pass re-read 4 parameter-sized arrays); a block whose gradients are
// not all finite is left alone.  grad_loc / grad_rho may then be null (not written).
template <DataGrad DG, KLPart KP, class Real, class Prior, bool WantKL = true>
double bbb_grad(std::uint64_t key, const Real* loc, const Real* rho, const Real* A, const Real* BC, std::int64_t D,
                const Prior& prior, double kl_weight, Real* grad_loc, Real* grad_rho, bool accumulate, double* work,
                bool* finite, int workers, const AdamTarget<Real>* adam = nullptr) {
  const PhiloxKey k = make_key(key);
  const Real kw = static_cast<Real>(kl_weight);
  std::atomic<bool> bad{false};
  parallel_for_blocks(num_blocks(D), workers_for(D * 64, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    alignas(64) Real eps[kBlock];
    alignas(64) double kl_terms[kBlock];
    // results go to block-local buffers first: with the outputs written directly gcc vectorised
    // the loop only behind a run-time alias check, which sent Flipout and local calls (a second
    // input array) to the scalar fallback, 7x slower
    alignas(64) Real out_l[kBlock], out_r[kBlock];
    // a local copy: the outputs are Real* too, so gcc could not prove that the stores below leave
    // the prior's (scalar) members alone, and would neither hoist their loads nor vectorise
    const Prior pr = prior;
    constexpr bool need_eps = DG != DataGrad::kDirect || KP == KLPart::kMC;
    if constexpr (need_eps) normals_row0(k, j0, m, eps);
    for (std::int64_t i = 0; i < m; ++i) {
      const std::int64_t j = j0 + i;
      Real sigma, sg;
      softplus_sigmoid(rho[j], sigma, sg);
      Real c;
      if constexpr (DG == DataGrad::kReparam) c = A[j] * eps[i];
      else if constexpr (DG == DataGrad::kTimesEps) c = BC[j] * eps[i];
      else c = BC[j];
      Real gl = A[j], gs = c;
      double klv = 0.0;
      if constexpr (KP == KLPart::kMC) {
        const Real w = loc[j] + sigma * eps[i];
        Real lp, gp;
        pr.eval(j, w, lp, gp);
        gl += kw * (-gp);
        gs += kw * (-gp * eps[i] - Real(1) / sigma);
        klv = mc_kl_term(eps[i], lp, sigma);
      } else if constexpr (KP == KLPart::kAnalytic) {
        const Real pm = pr.loc(j), ps = pr.scale(j);
        const Real inv_ps2 = Real(1) / (ps * ps), dm = loc[j] - pm;
        gl += kw * dm * inv_ps2;
        gs += kw * (sigma * inv_ps2 - Real(1) / sigma);
        klv = analytic_kl_term(ps, inv_ps2, dm, sigma);
      }
      out_l[i] = gl;
      out_r[i] = gs * sg;
      if constexpr (WantKL) kl_terms[i] = klv;
    }
    if (accumulate) {
      for (std::int64_t i = 0; i < m; ++i) grad_loc[j0 + i] += out_l[i];
      for (std::int64_t i = 0; i < m; ++i) grad_rho[j0 + i] += out_r[i];
    } else if (grad_loc) {
      std::copy(out_l, out_l + m, grad_loc + j0);
      std::copy(out_r, out_r + m, grad_rho + j0);
    }
    work[b] = WantKL ? lane_sum(kl_terms, m) : 0.0;
    const bool ok = all_finite(out_l, m) && all_finite(out_r, m);
    if (!ok) bad.store(true, std::memory_order_relaxed);
    if (adam && ok) {
      adam->step.apply(adam->loc + j0, out_l, adam->m_loc + j0, adam->v_loc + j0, m);
      adam->step.apply(adam->rho + j0, out_r, adam->m_rho + j0, adam->v_rho + j0, m);
    }
  });
  double kl = 0.0;
  for (std::int64_t b = 0; b < num_blocks(D); ++b) kl += work[b];
  *finite = !bad.load() && std::isfinite(kl);
  return kl;
}

// One Adam step in place over n parameters (AdamStep).
template <class Real>
void adam_update(Real* p, const Real* g, Real* m, Real* v, std::int64_t n, std::int64_t step, double lr,
                 double b1, double b2, double eps, int workers) {
  const AdamStep<Real> st(step, lr, b1, b2, eps);
  parallel_for_blocks(num_blocks(n), workers_for(n * 8, workers), [=](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, j1 = std::min(n, j0 + kBlock);
    st.apply(p + j0, g + j0, m + j0, v + j0, j1 - j0);
  });
}

VIGRAD_ISA_END
}  // namespace vigrad::core
