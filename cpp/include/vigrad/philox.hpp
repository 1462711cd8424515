// Counter-based normal random numbers: Philox4x32-10 (Salmon et al. 2011,
// Random123) and a Box-Muller transform written so that gcc vectorises it.
//
// Every normal draw is a pure function of (key, sample index s, element index j):
// the counter of draw (s, j) is (c, c >> 32, s, s >> 32) with c = j / P, where P is
// the number of normals one Philox call yields (2 in double, 4 in float), and the
// draw is the (j % P)-th of them.  No state is carried between draws, so any
// partition of the work over threads gives the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "config.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

struct PhiloxKey {
  std::uint32_t k0, k1;
};

inline PhiloxKey make_key(std::uint64_t key) {
  return PhiloxKey{static_cast<std::uint32_t>(key), static_cast<std::uint32_t>(key >> 32)};
}

// One Philox4x32-10 block, in place.  Straight-line code so that a loop over
// independent counters vectorises.
inline void philox4x32_10(std::uint32_t& x0, std::uint32_t& x1, std::uint32_t& x2,
                          std::uint32_t& x3, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint64_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    const std::uint64_t p0 = M0 * x0;
    const std::uint64_t p1 = M1 * x2;
    const std::uint32_t y0 = static_cast<std::uint32_t>(p1 >> 32) ^ x1 ^ k0;
    const std::uint32_t y1 = static_cast<std::uint32_t>(p1);
    const std::uint32_t y2 = static_cast<std::uint32_t>(p0 >> 32) ^ x3 ^ k1;
    const std::uint32_t y3 = static_cast<std::uint32_t>(p0);
    x0 = y0; x1 = y1; x2 = y2; x3 = y3;
    k0 += W0; k1 += W1;
  }
}

// Raw Philox over n counters (n x 4 words in, n x 4 words out), for known-answer tests.
inline void philox4x32_10_many(const std::uint32_t* ctr, std::int64_t n, PhiloxKey key,
                               std::uint32_t* out) {
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t x0 = ctr[4 * i], x1 = ctr[4 * i + 1], x2 = ctr[4 * i + 2], x3 = ctr[4 * i + 3];
    philox4x32_10(x0, x1, x2, x3, key.k0, key.k1);
    out[4 * i] = x0; out[4 * i + 1] = x1; out[4 * i + 2] = x2; out[4 * i + 3] = x3;
  }
}

template <class Real> struct NormalTraits;
template <> struct NormalTraits<double> { static constexpr int per_counter = 2; };
template <> struct NormalTraits<float> { static constexpr int per_counter = 4; };

// Counters processed together: a compile-time trip count, so the loops below are
// fully vectorised with no scalar remainder whose rounding could differ.
inline constexpr int kLanes = 16;

inline double bits_to_double(std::uint64_t b) {
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

// Box-Muller on uniforms built from Philox words.  Double: 52-bit uniforms made
// by the exponent trick, u1 in (0, 1], u2 in [0, 1), so |z| <= 8.49.
// Float: 31-bit u1 = (x >> 1) * 2^-31 + 2^-32 in (0, 1] (|z| <= 6.66) and
// 24-bit u2.  The sine is cos(t - pi/2): gcc fuses sin and cos of one argument
// into sincos, which has no vector variant.
inline void box_muller(std::uint32_t x0, std::uint32_t x1, std::uint32_t x2, std::uint32_t x3, double* z) {
  constexpr double two_pi = 6.283185307179586;
  constexpr double half_pi = 1.5707963267948966;
  const std::uint64_t a = (static_cast<std::uint64_t>(x0) << 20) | (x1 >> 12);
  const std::uint64_t b = (static_cast<std::uint64_t>(x2) << 20) | (x3 >> 12);
  const double u1 = 2.0 - bits_to_double(0x3FF0000000000000ull | a);
  const double u2 = bits_to_double(0x3FF0000000000000ull | b) - 1.0;
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double t = two_pi * u2;
  z[0] = r * std::cos(t);
  z[1] = r * std::cos(t - half_pi);
}

inline void box_muller(std::uint32_t x0, std::uint32_t x1, std::uint32_t x2, std::uint32_t x3, float* z) {
  constexpr float two_pi = 6.28318530717958648f;
  constexpr float half_pi = 1.57079632679489662f;
  constexpr float s31 = 4.656612873077392578125e-10f;  // 2^-31
  constexpr float s32 = 2.3283064365386962890625e-10f; // 2^-32
  constexpr float s24 = 5.9604644775390625e-08f;       // 2^-24
  const float u1a = static_cast<float>(static_cast<std::int32_t>(x0 >> 1)) * s31 + s32;
  const float u2a = static_cast<float>(static_cast<std::int32_t>(x1 >> 8)) * s24;
  const float u1b = static_cast<float>(static_cast<std::int32_t>(x2 >> 1)) * s31 + s32;
  const float u2b = static_cast<float>(static_cast<std::int32_t>(x3 >> 8)) * s24;
  const float ra = std::sqrt(-2.0f * std::log(u1a));
  const float rb = std::sqrt(-2.0f * std::log(u1b));
  const float ta = two_pi * u2a;
  const float tb = two_pi * u2b;
  z[0] = ra * std::cos(ta);
  z[1] = ra * std::cos(ta - half_pi);
  z[2] = rb * std::cos(tb);
  z[3] = rb * std::cos(tb - half_pi);
}

// The draws of the kLanes consecutive counters f0 + l of row s in element order: draw k of
// counter f0 + l at z[l * P + k].  A call, not inlined: inlined into a caller's loop gcc 12 did
// not vectorise it ("latch block not empty", 6x slower).  Writing the draws in element order
// directly made the samplers 1.6-1.9x faster than the earlier lane-major output with an
// element-by-element transpose.
template <class Real>
[[gnu::noinline]] void normal_lanes_row(PhiloxKey key, std::uint64_t s, std::uint64_t f0, Real* __restrict z) {
  constexpr int P = NormalTraits<Real>::per_counter;
  const std::uint32_t x2s = static_cast<std::uint32_t>(s), x3s = static_cast<std::uint32_t>(s >> 32);
  for (int l = 0; l < kLanes; ++l) {
    const std::uint64_t f = f0 + static_cast<std::uint64_t>(l);
    std::uint32_t x0 = static_cast<std::uint32_t>(f), x1 = static_cast<std::uint32_t>(f >> 32), x2 = x2s, x3 = x3s;
    philox4x32_10(x0, x1, x2, x3, key.k0, key.k1);
    box_muller(x0, x1, x2, x3, z + l * P);
  }
}

// The draws of kLanes counters given word by word (lane l: c0[l], c1[l], c2[l], c3[l]), in lane
// order: draw k of lane l at z[l * P + k].  A call, for the same reason as normal_lanes_row.
template <class Real>
[[gnu::noinline]] void normal_lanes_ctr(PhiloxKey key, const std::uint32_t* c0, const std::uint32_t* c1,
                                        const std::uint32_t* c2, const std::uint32_t* c3, Real* __restrict z) {
  constexpr int P = NormalTraits<Real>::per_counter;
  for (int l = 0; l < kLanes; ++l) {
    std::uint32_t x0 = c0[l], x1 = c1[l], x2 = c2[l], x3 = c3[l];
    philox4x32_10(x0, x1, x2, x3, key.k0, key.k1);
    box_muller(x0, x1, x2, x3, z + l * P);
  }
}

// The draws of the flat counter range [f_begin, f_end) (f = s * C + c, C counters per row of D
// elements), handed out in runs of consecutive elements of one row: emit(s, j0, m, z) with the
// draw (s, j0 + i) at z[i], i < m.  Draws past the end of a row are dropped.
//
// Long rows go kLanes counters of one row at a time (normal_lanes_row: 1.6-1.9x faster than
// the lane-by-lane bookkeeping below), wasting at most kLanes - 1 counters at a row's end; short
// rows (C < 4 kLanes) go kLanes consecutive counters across row ends, which wastes nothing (a
// row of D = 3 doubles needs 2 counters, not 16).
template <class Real, class Emit>
inline void for_each_normal_run(PhiloxKey key, std::int64_t D, std::int64_t f_begin, std::int64_t f_end,
                                Emit&& emit) {
  constexpr int P = NormalTraits<Real>::per_counter;
  const std::int64_t C = (D + P - 1) / P;
  alignas(64) Real z[kLanes * P];
  if (C >= 4 * kLanes) {
    for (std::int64_t f = f_begin; f < f_end;) {
      const std::int64_t s = f / C, c = f % C;
      const std::int64_t c_stop = (C - c < f_end - f) ? C : c + (f_end - f);  // this row's part of the range
      for (std::int64_t cc = c; cc < c_stop; cc += kLanes) {
        normal_lanes_row(key, static_cast<std::uint64_t>(s), static_cast<std::uint64_t>(cc), z);
        const std::int64_t j0 = cc * P;
        std::int64_t m = (c_stop - cc) * P;
        if (m > kLanes * P) m = kLanes * P;
        if (m > D - j0) m = D - j0;
        emit(s, j0, m, static_cast<const Real*>(z));
      }
      f += c_stop - c;
    }
    return;
  }
  alignas(64) std::uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  std::int64_t rs[kLanes], rc[kLanes];
  std::int64_t s = f_begin / C, c = f_begin % C;
  for (std::int64_t f = f_begin; f < f_end; f += kLanes) {
    const int n = static_cast<int>(f_end - f < kLanes ? f_end - f : kLanes);
    for (int l = 0; l < kLanes; ++l) {
      // lanes past n repeat the last counter: computed, then dropped
      rs[l] = s;
      rc[l] = c;
      c0[l] = static_cast<std::uint32_t>(c);
      c1[l] = static_cast<std::uint32_t>(static_cast<std::uint64_t>(c) >> 32);
      c2[l] = static_cast<std::uint32_t>(s);
      c3[l] = static_cast<std::uint32_t>(static_cast<std::uint64_t>(s) >> 32);
      if (l + 1 < n && ++c == C) { c = 0; ++s; }
    }
    normal_lanes_ctr(key, c0, c1, c2, c3, z);
    for (int l = 0; l < n;) {  // one run per row among the n lanes
      int l1 = l + 1;
      while (l1 < n && rs[l1] == rs[l]) ++l1;
      const std::int64_t j0 = rc[l] * P, j1 = rc[l1 - 1] * P + P;
      emit(rs[l], j0, (j1 < D ? j1 : D) - j0, static_cast<const Real*>(z + l * P));
      l = l1;
    }
    if (++c == C) { c = 0; ++s; }  // the first counter of the next chunk
  }
}

// Counters in one parallel block of the flat counter space.
inline constexpr std::int64_t kCounterBlock = 1024;

VIGRAD_ISA_END
}  // namespace vigrad::core
