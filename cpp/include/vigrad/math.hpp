// Numerically stable scalar building blocks, written so that loops over them
// vectorise (ternaries, not branches or fmax).
#pragma once

#include <cmath>

#include "config.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

template <class Real> inline constexpr Real kHalfLog2Pi = Real(0.91893853320467274178);

// Logistic sigmoid 1 / (1 + exp(-x)): accurate to a few ulp for every x; exp(-x)
// overflows to inf (and the result to 0) only where the true value is subnormal.
// Written without a select: gcc 12 on AVX2 would not if-convert a select on the
// result of one vector-math call in a loop that makes another ("control flow in loop").
template <class Real>
inline Real sigmoid(Real x) {
  return Real(1) / (Real(1) + std::exp(-x));
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), and its derivative sigmoid(x).
template <class Real>
inline void softplus_sigmoid(Real x, Real& sp, Real& sg) {
  sp = (x > Real(0) ? x : Real(0)) + std::log1p(std::exp(-std::fabs(x)));
  sg = sigmoid(x);
}

template <class Real>
inline Real softplus(Real x) {
  return (x > Real(0) ? x : Real(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// Inverse of softplus for y > 0: x = y + log(-expm1(-y)).  Exact in the limits:
// y -> 0 gives log(y), large y gives y.
template <class Real>
inline Real softplus_inv(Real y) {
  return y + std::log(-std::expm1(-y));
}

VIGRAD_ISA_END
}  // namespace vigrad::core
