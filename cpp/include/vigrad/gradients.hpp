// Gradient estimators for F(theta) = kl_weight * KL[q || p] - E_q[log P(D | w)]
// with q mean-field Gaussian, theta = (loc, rho), scale = softplus(rho),
// w = loc + scale * eps  (Blundell et al. 2015, Proposition 1).
//
// All kernels take the noise explicitly; they are the deterministic twins of the
// estimators in the Python layer.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "math.hpp"
#include "parallel.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// How the KL part enters the pathwise estimator (KLMode, declared in kernels.hpp).
//  kMC:       log q(w) - log p(w) inside the expectation, both paths of Proposition 1
//             (through w, and the direct d/dtheta of log q); exact for any prior.
//  kSTL:      as kMC but without the direct score term d log q / dtheta
//             (sticking the landing, Roeder et al. 2017): zero variance at the optimum.
//  kAnalytic: closed-form KL[q || Normal] and its exact gradient.

template <class Real> struct Accum { using type = double; };

// Per sample s and element j, with e = eps[s, j], g = d log P(D|w)/dw at w = loc + scale e,
// gp = d log p / dw, sg = sigmoid(rho) = d scale / d rho:
//   kMC:       a = -kw gp - g;                 dF/dloc = mean a,  dF/drho = sg mean(a e) - kw sg / scale
//   kSTL:      a = kw (-e / scale - gp) - g;   dF/dloc = mean a,  dF/drho = sg mean(a e)
//   kAnalytic: a = -g;                         dF/dloc = mean a + kw dKL/dloc, dF/drho = sg mean(a e) + kw dKL/drho
// The returned value is the KL part of F (unweighted): the Monte Carlo estimate
// mean_s sum_j [log q(w) - log p(w)] for kMC / kSTL, the closed form for kAnalytic.
// `work`: num_blocks(D) doubles.  `*finite` is false when any output is not finite.
template <KLMode Mode, class Real, class Prior>
double pathwise_grad(const Real* loc, const Real* rho, const Real* eps, const Real* glik,
                     std::int64_t S, std::int64_t D, const Prior& prior, double kl_weight,
                     Real* grad_loc, Real* grad_rho, double* work, bool* finite, int workers) {
  using Acc = typename Accum<Real>::type;
  const std::int64_t nb = num_blocks(D);
  const Real kw = static_cast<Real>(kl_weight);
  const Acc inv_S = Acc(1) / static_cast<Acc>(S);
  std::atomic<bool> bad{false};
  parallel_for_blocks(nb, workers_for(S * D * 32, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    alignas(64) Real sigma[kBlock], sg[kBlock], inv_sigma[kBlock], log_sigma[kBlock];
    alignas(64) Acc acc_a[kBlock], acc_ae[kBlock], acc_k[kBlock];
    const Real* mu = loc + j0;
    for (std::int64_t i = 0; i < m; ++i) {
      softplus_sigmoid(rho[j0 + i], sigma[i], sg[i]);
      inv_sigma[i] = Real(1) / sigma[i];
      log_sigma[i] = std::log(sigma[i]);
      acc_a[i] = 0; acc_ae[i] = 0; acc_k[i] = 0;
    }
    for (std::int64_t s = 0; s < S; ++s) {
      const Real* e = eps + s * D + j0;
      const Real* g = glik + s * D + j0;
      for (std::int64_t i = 0; i < m; ++i) {
        Real a;
        if constexpr (Mode == KLMode::kAnalytic) {
          a = -g[i];
        } else {
          const Real w = mu[i] + sigma[i] * e[i];
          Real lp, gp;
          prior.eval(j0 + i, w, lp, gp);
          if constexpr (Mode == KLMode::kMC) {
            a = -kw * gp - g[i];
          } else {
            a = kw * (-e[i] * inv_sigma[i] - gp) - g[i];
          }
          acc_k[i] += static_cast<Acc>(Real(-0.5) * e[i] * e[i] - lp);
        }
        acc_a[i] += static_cast<Acc>(a);
        acc_ae[i] += static_cast<Acc>(a * e[i]);
      }
    }
    // Finish the block: gradients and the KL part (vectorised), then finiteness.
    alignas(64) double kl_terms[kBlock];
    Real* out_l = grad_loc + j0;
    Real* out_r = grad_rho + j0;
    for (std::int64_t i = 0; i < m; ++i) {
      const Acc sgi = sg[i];
      Acc gl = acc_a[i] * inv_S;
      Acc gr = sgi * (acc_ae[i] * inv_S);
      if constexpr (Mode == KLMode::kMC) {
        gr -= static_cast<Acc>(kw) * sgi * static_cast<Acc>(inv_sigma[i]);
        kl_terms[i] = acc_k[i] * inv_S - kHalfLog2Pi<double> - static_cast<double>(log_sigma[i]);
      } else if constexpr (Mode == KLMode::kSTL) {
        kl_terms[i] = acc_k[i] * inv_S - kHalfLog2Pi<double> - static_cast<double>(log_sigma[i]);
      } else {
        const Acc pm = prior.loc(j0 + i), ps = prior.scale(j0 + i);
        const Acc sgm = sigma[i], dm = static_cast<Acc>(mu[i]) - pm;
        const Acc inv_ps2 = Acc(1) / (ps * ps);
        gl += static_cast<Acc>(kw) * dm * inv_ps2;
        gr += static_cast<Acc>(kw) * sgi * (sgm * inv_ps2 - Acc(1) / sgm);
        kl_terms[i] = std::log(static_cast<double>(ps)) - static_cast<double>(log_sigma[i]) +
                      0.5 * static_cast<double>((sgm * sgm + dm * dm) * inv_ps2) - 0.5;
      }
      out_l[i] = static_cast<Real>(gl);
      out_r[i] = static_cast<Real>(gr);
    }
    const bool ok = all_finite(out_l, m) && all_finite(out_r, m);
    work[b] = lane_sum(kl_terms, m);
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  double kl = 0.0;
  for (std::int64_t b = 0; b < nb; ++b) kl += work[b];
  *finite = !bad.load() && std::isfinite(kl);
  return kl;
}

// Closed-form KL[q || Normal(m, s)] summed over the event, and its gradient
// (times kl_weight) in loc and rho.
template <class Real, class Prior>
double kl_normal(const Real* loc, const Real* rho, std::int64_t D, const Prior& prior, double kl_weight,
                 Real* grad_loc, Real* grad_rho, double* work, int workers) {
  const std::int64_t nb = num_blocks(D);
  parallel_for_blocks(nb, workers_for(D * 32, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    alignas(64) double terms[kBlock];
    for (std::int64_t i = 0; i < m; ++i) {
      const std::int64_t j = j0 + i;
      Real sp, sgr;
      softplus_sigmoid(rho[j], sp, sgr);
      const double sgm = sp, sg = sgr;
      const double pm = prior.loc(j), ps = prior.scale(j);
      const double dm = static_cast<double>(loc[j]) - pm, inv_ps2 = 1.0 / (ps * ps);
      terms[i] = std::log(ps) - std::log(sgm) + 0.5 * (sgm * sgm + dm * dm) * inv_ps2 - 0.5;
      grad_loc[j] = static_cast<Real>(kl_weight * dm * inv_ps2);
      grad_rho[j] = static_cast<Real>(kl_weight * sg * (sgm * inv_ps2 - 1.0 / sgm));
    }
    work[b] = lane_sum(terms, m);
  });
  double kl = 0.0;
  for (std::int64_t b = 0; b < nb; ++b) kl += work[b];
  return kl;
}


// Score-function (REINFORCE) gradient of E_q[f]:
//   mean_s (f_s - b_s) d log q(w_s) / dtheta,
//   d log q / dloc = e / scale,  d log q / drho = (e^2 - 1) sigmoid(rho) / scale,
// with b_s = 0, a constant, or the mean of f over the other samples (leave-one-out,
// needs S >= 2).  `coef`: S doubles of scratch.  Returns false when an output is not finite.
template <class Real>
bool score_grad(const Real* loc, const Real* rho, const Real* eps, const Real* f, std::int64_t S,
                std::int64_t D, Baseline baseline, double baseline_value, Real* grad_loc, Real* grad_rho,
                double* coef, int workers) {
  (void)loc;
  using Acc = typename Accum<Real>::type;
  const double total = lane_sum(f, S);
  for (std::int64_t s = 0; s < S; ++s) {
    double b = 0.0;
    if (baseline == Baseline::kConstant) b = baseline_value;
    if (baseline == Baseline::kLeaveOneOut) b = (total - static_cast<double>(f[s])) / static_cast<double>(S - 1);
    coef[s] = (static_cast<double>(f[s]) - b) / static_cast<double>(S);
  }
  const std::int64_t nb = num_blocks(D);
  std::atomic<bool> bad{false};
  parallel_for_blocks(nb, workers_for(S * D * 4, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    alignas(64) Acc acc_e[kBlock], acc_e2[kBlock];
    for (std::int64_t i = 0; i < m; ++i) { acc_e[i] = 0; acc_e2[i] = 0; }
    for (std::int64_t s = 0; s < S; ++s) {
      const Real* e = eps + s * D + j0;
      const Acc c = static_cast<Acc>(coef[s]);
      for (std::int64_t i = 0; i < m; ++i) {
        const Acc ei = e[i];
        acc_e[i] += c * ei;
        acc_e2[i] += c * (ei * ei - Acc(1));
      }
    }
    Real* out_l = grad_loc + j0;
    Real* out_r = grad_rho + j0;
    for (std::int64_t i = 0; i < m; ++i) {
      Real sp, sgr;
      softplus_sigmoid(rho[j0 + i], sp, sgr);
      const Acc inv_sigma = Acc(1) / static_cast<Acc>(sp);
      out_l[i] = static_cast<Real>(acc_e[i] * inv_sigma);
      out_r[i] = static_cast<Real>(acc_e2[i] * static_cast<Acc>(sgr) * inv_sigma);
    }
    const bool ok = all_finite(out_l, m) && all_finite(out_r, m);
    if (!ok) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

VIGRAD_ISA_END
}  // namespace vigrad::core
