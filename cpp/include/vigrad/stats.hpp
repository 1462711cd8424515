// Running per-coordinate sums of vg.fit's convergence monitor and gradient statistics.
//
// moment_sums adds one vector to (sum a, sum a^2), a = x - c: the monitor sums its iterates
// shifted by a segment's first iterate c, the gradient statistics sum the gradients (no c).  It
// replaces four NumPy passes per block and step with one.  The arithmetic is NumPy's, rounded
// the same way on every instruction set: a = double(x) - c; s1 + a; s2 + a * a, each rounded,
// with no fused multiply-add (a contraction would round s2 differently on FMA machines only).
#pragma once

#include <algorithm>
#include <cstdint>

#include "parallel.hpp"

#if defined(__GNUC__) && !defined(__clang__)
#define VIGRAD_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define VIGRAD_NO_FP_CONTRACT
#endif

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// One block.  A function of its own: gcc's optimize attribute does not reach a lambda's body.
template <class Real>
VIGRAD_NO_FP_CONTRACT void moment_sums_block(const Real* __restrict x, const double* __restrict c,
                                             double* __restrict s1, double* __restrict s2, std::int64_t n) {
#ifdef __clang__
#pragma clang fp contract(off)
#endif
  if (c == nullptr) {
    for (std::int64_t j = 0; j < n; ++j) {
      const double a = static_cast<double>(x[j]);
      s1[j] += a;
      const double sq = a * a;
      s2[j] += sq;
    }
  } else {
    for (std::int64_t j = 0; j < n; ++j) {
      const double a = static_cast<double>(x[j]) - c[j];
      s1[j] += a;
      const double sq = a * a;
      s2[j] += sq;
    }
  }
}

// s1 += a, s2 += a * a for a = x - c (c null: a = x), over [0, n).  s1, s2 overlap nothing else.
template <class Real>
void moment_sums(const Real* x, const double* c, double* s1, double* s2, std::int64_t n, int workers) {
  parallel_for_blocks(num_blocks(n), workers_for(n * 4, workers), [=](std::int64_t b) {
    const std::int64_t j0 = b * kBlock;
    moment_sums_block<Real>(x + j0, c ? c + j0 : nullptr, s1 + j0, s2 + j0, std::min(n - j0, kBlock));
  });
}

// One block of combine_moments: [j0, j0 + n) of every group.
VIGRAD_NO_FP_CONTRACT inline void combine_moments_block(const double* const* means, const double* const* m2s,
                                                        const double* counts, std::int64_t k, double total,
                                                        std::int64_t j0, std::int64_t n, double* __restrict mean,
                                                        double* __restrict m2) {
#ifdef __clang__
#pragma clang fp contract(off)
#endif
  alignas(64) double acc[kBlock];
  for (std::int64_t j = 0; j < n; ++j) acc[j] = 0.0;
  for (std::int64_t i = 0; i < k; ++i) {
    const double ci = counts[i];
    const double* __restrict mi = means[i] + j0;
    for (std::int64_t j = 0; j < n; ++j) {
      const double t = ci * mi[j];
      acc[j] = acc[j] + t;
    }
  }
  double* __restrict mb = mean + j0;
  for (std::int64_t j = 0; j < n; ++j) mb[j] = acc[j] / total;
  for (std::int64_t j = 0; j < n; ++j) acc[j] = 0.0;
  for (std::int64_t i = 0; i < k; ++i) {
    const double ci = counts[i];
    const double* __restrict mi = means[i] + j0;
    const double* __restrict Mi = m2s[i] + j0;
    for (std::int64_t j = 0; j < n; ++j) {
      const double dv = mi[j] - mb[j];
      const double sq = dv * dv;
      const double w = sq * ci;
      const double t = Mi[j] + w;
      acc[j] = acc[j] + t;
    }
  }
  double* __restrict m2b = m2 + j0;
  for (std::int64_t j = 0; j < n; ++j) m2b[j] = acc[j];
}

// The (mean, M2) of the union of k groups given per element as (counts[i], means[i], m2s[i])
// (Chan et al.'s update, as vg.vi._combine folds it): mean = (0 + sum_i counts_i means_i) / total,
// M2 = 0 + sum_i (m2s_i + counts_i (means_i - mean)^2), left to right, every operation rounded as
// NumPy rounds it, so the bits are the NumPy fold's (vigrad.reference.combine_moments).  One
// pass over the groups per block, where the NumPy fold made five passes per group; a convergence
// check combines up to 16 segments of every parameter.  mean and m2 overlap nothing else.
inline void combine_moments(const double* const* means, const double* const* m2s, const double* counts,
                            std::int64_t k, std::int64_t n, double* mean, double* m2, int workers) {
  double total = 0.0;
  for (std::int64_t i = 0; i < k; ++i) total += counts[i];  // integers: exact
  parallel_for_blocks(num_blocks(n), workers_for(n * k * 8, workers), [=](std::int64_t b) {
    const std::int64_t j0 = b * kBlock;
    combine_moments_block(means, m2s, counts, k, total, j0, std::min(n - j0, kBlock), mean, m2);
  });
}

VIGRAD_ISA_END
}  // namespace vigrad::core
