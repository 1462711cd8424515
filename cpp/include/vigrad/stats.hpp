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

VIGRAD_ISA_END
}  // namespace vigrad::core
