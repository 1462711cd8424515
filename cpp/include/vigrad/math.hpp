// Numerically stable scalar building blocks, written so that loops over them
// vectorise (ternaries, not branches or fmax).
#pragma once

#include <cmath>

#include "config.hpp"

namespace vigrad::core {

template <class Real> inline constexpr Real kHalfLog2Pi = Real(0.91893853320467274178);

// softplus(x) = max(x, 0) + log1p(exp(-|x|)); sigmoid(x) from the same exp.
template <class Real>
inline void softplus_sigmoid(Real x, Real& sp, Real& sg) {
  const Real t = std::exp(-std::fabs(x));
  const Real inv = Real(1) / (Real(1) + t);
  sp = (x > Real(0) ? x : Real(0)) + std::log1p(t);
  sg = x >= Real(0) ? inv : t * inv;
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

template <class Real>
inline Real sigmoid(Real x) {
  const Real t = std::exp(-std::fabs(x));
  const Real inv = Real(1) / (Real(1) + t);
  return x >= Real(0) ? inv : t * inv;
}

}  // namespace vigrad::core
