// Priors over weights, evaluated element by element: Normal(loc, scale) and
// Blundell et al.'s scale mixture pi N(0, s1^2) + (1 - pi) N(0, s2^2).
//
// Each prior comes in two forms selected at compile time: every parameter a
// scalar (constants folded once), or every parameter an array over the event.
#pragma once

#include <cmath>
#include <cstdint>

#include "math.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

template <class Real, bool Array>
struct NormalPrior;

template <class Real>
struct NormalPrior<Real, false> {
  Real m, s, inv_s, log_s;
  NormalPrior(const Real* loc, const Real* scale)
      : m(loc[0]), s(scale[0]), inv_s(Real(1) / scale[0]), log_s(std::log(scale[0])) {}
  Real loc(std::int64_t) const { return m; }
  Real scale(std::int64_t) const { return s; }
  void eval(std::int64_t, Real w, Real& lp, Real& g) const {
    const Real z = (w - m) * inv_s;
    lp = -kHalfLog2Pi<Real> - log_s - Real(0.5) * z * z;
    g = -z * inv_s;
  }
  Real grad(std::int64_t, Real w) const { return -(w - m) * inv_s * inv_s; }
};

template <class Real>
struct NormalPrior<Real, true> {
  const Real* m;
  const Real* s;
  NormalPrior(const Real* loc, const Real* scale) : m(loc), s(scale) {}
  Real loc(std::int64_t j) const { return m[j]; }
  Real scale(std::int64_t j) const { return s[j]; }
  void eval(std::int64_t j, Real w, Real& lp, Real& g) const {
    const Real inv_s = Real(1) / s[j];
    const Real z = (w - m[j]) * inv_s;
    lp = -kHalfLog2Pi<Real> - std::log(s[j]) - Real(0.5) * z * z;
    g = -z * inv_s;
  }
  Real grad(std::int64_t j, Real w) const {
    const Real inv_s = Real(1) / s[j];
    return -(w - m[j]) * inv_s * inv_s;
  }
};

// log p(w) = -log(2 pi)/2 + logsumexp(a, b) with
//   a = log(pi) - log(s1) - w^2 / (2 s1^2),  b = log(1 - pi) - log(s2) - w^2 / (2 s2^2),
// evaluated as max(a, b) + log(1 + exp(-|a - b|)): finite wherever a or b is, e.g.
// |w| = 1e3 with s2 = e^-8, where exp(b) underflows.  The gradient weights the
// two components by their responsibilities, formed from the same exp.
// The most negative argument given to exp: just above where it underflows.  libmvec's exp
// takes a slow path on underflow, which every weight with |w| > ~0.03 hits for sigma2 = e^-6
// (20x slower there: 4.2 ms against 0.2 ms per 314k weights); exp(bound) (~1e-35 / 1e-304) is
// far below the rounding of 1 + t, so the results do not change beyond that.  The bound is read
// at run time (from a volatile, once per prior): with a compile-time constant gcc rewrites
// exp(x > c ? x : c) as x > c ? exp(x) : exp(c), calling exp on the underflowing x after all.
template <class Real> inline constexpr Real kMinExp = Real(-80);
template <> inline constexpr double kMinExp<double> = -700.0;

template <class Real>
inline Real opaque_min_exp() {
  static volatile Real bound = kMinExp<Real>;
  return bound;
}

template <class Real>
inline void mixture_eval(Real w, Real c1, Real c2, Real h1, Real h2, Real lo, Real& lp, Real& g) {
  const Real w2 = w * w;
  const Real a = c1 - h1 * w2;
  const Real b = c2 - h2 * w2;
  const Real d = a - b;
  const Real nd = -std::fabs(d);
  const Real t = std::exp(nd > lo ? nd : lo);
  const Real inv = Real(1) / (Real(1) + t);
  const Real r_big = inv, r_small = t * inv;
  const Real r1 = d >= Real(0) ? r_big : r_small;
  const Real r2 = d >= Real(0) ? r_small : r_big;
  // log(1 + t), not log1p(t): libmvec's log1p takes a slow path on tiny arguments; the
  // absolute error, one ulp of 1, is below the rounding of log p itself
  lp = (d >= Real(0) ? a : b) + std::log(Real(1) + t) - kHalfLog2Pi<Real>;
  g = Real(-2) * w * (r1 * h1 + r2 * h2);
}

template <class Real, bool Array>
struct MixturePrior;

template <class Real>
struct MixturePrior<Real, false> {
  Real c1, c2, h1, h2, lo;
  MixturePrior(const Real* pi, const Real* s1, const Real* s2)
      : c1(std::log(pi[0]) - std::log(s1[0])),
        c2(std::log1p(-pi[0]) - std::log(s2[0])),
        h1(Real(0.5) / (s1[0] * s1[0])),
        h2(Real(0.5) / (s2[0] * s2[0])),
        lo(opaque_min_exp<Real>()) {}
  void eval(std::int64_t, Real w, Real& lp, Real& g) const { mixture_eval(w, c1, c2, h1, h2, lo, lp, g); }
  Real grad(std::int64_t j, Real w) const {
    Real lp, g;
    eval(j, w, lp, g);
    return g;
  }
};

template <class Real>
struct MixturePrior<Real, true> {
  const Real *pi, *s1, *s2;
  Real lo;
  MixturePrior(const Real* pi_, const Real* s1_, const Real* s2_)
      : pi(pi_), s1(s1_), s2(s2_), lo(opaque_min_exp<Real>()) {}
  void eval(std::int64_t j, Real w, Real& lp, Real& g) const {
    const Real c1 = std::log(pi[j]) - std::log(s1[j]);
    const Real c2 = std::log1p(-pi[j]) - std::log(s2[j]);
    mixture_eval(w, c1, c2, Real(0.5) / (s1[j] * s1[j]), Real(0.5) / (s2[j] * s2[j]), lo, lp, g);
  }
  Real grad(std::int64_t j, Real w) const {
    Real lp, g;
    eval(j, w, lp, g);
    return g;
  }
};

// No prior term: log p = 0.  With it the mean-field pathwise kernel computes the
// gradient of E_q[log q] - E_q[log P(D | w)], the negative ELBO of a black-box log
// joint passed in as the "likelihood".
template <class Real>
struct FlatPrior {
  void eval(std::int64_t, Real, Real& lp, Real& g) const {
    lp = Real(0);
    g = Real(0);
  }
  Real grad(std::int64_t, Real) const { return Real(0); }
};

VIGRAD_ISA_END
}  // namespace vigrad::core
