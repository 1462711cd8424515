// Mean-field Gaussian q(w) = prod_j N(w_j | loc_j, scale_j^2): sampling, log-density,
// entropy, elementwise transforms, and log-densities of priors over (S, D) arrays.
//
// Arrays are C-contiguous, row-major (S, D); the caller allocates every output.
#pragma once

#include <algorithm>
#include <cstdint>

#include "math.hpp"
#include "parallel.hpp"
#include "philox.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// out[s, j] = standard normal draw (key, s, j).
template <class Real>
void standard_normal(std::uint64_t key, std::int64_t S, std::int64_t D, Real* out, int workers) {
  if (S == 0 || D == 0) return;
  constexpr int P = NormalTraits<Real>::per_counter;
  const PhiloxKey k = make_key(key);
  const std::int64_t total = S * ((D + P - 1) / P);
  parallel_for_blocks(num_blocks(total, kCounterBlock), workers_for(total * 64, workers), [&](std::int64_t b) {
    const std::int64_t f0 = b * kCounterBlock, f1 = std::min(total, f0 + kCounterBlock);
    for_each_normal_run<Real>(k, D, f0, f1, [&](std::int64_t s, std::int64_t j0, std::int64_t m, const Real* z) {
      std::copy(z, z + m, out + s * D + j0);
    });
  });
}

// w[s, j] = loc[j] + scale[j] * eps[s, j] with eps the draw (key, s, j); eps is
// written too when eps_out is not null.
template <class Real>
void sample(std::uint64_t key, const Real* loc, const Real* scale, std::int64_t S, std::int64_t D,
            Real* w, Real* eps_out, int workers) {
  if (S == 0 || D == 0) return;
  constexpr int P = NormalTraits<Real>::per_counter;
  const PhiloxKey k = make_key(key);
  const std::int64_t total = S * ((D + P - 1) / P);
  parallel_for_blocks(num_blocks(total, kCounterBlock), workers_for(total * 64, workers), [&](std::int64_t b) {
    const std::int64_t f0 = b * kCounterBlock, f1 = std::min(total, f0 + kCounterBlock);
    if (eps_out) {
      for_each_normal_run<Real>(k, D, f0, f1, [&](std::int64_t s, std::int64_t j0, std::int64_t m, const Real* z) {
        Real* e = eps_out + s * D + j0;
        Real* o = w + s * D + j0;
        const Real *l = loc + j0, *sc = scale + j0;
        for (std::int64_t i = 0; i < m; ++i) e[i] = z[i];
        for (std::int64_t i = 0; i < m; ++i) o[i] = l[i] + sc[i] * z[i];
      });
    } else {
      for_each_normal_run<Real>(k, D, f0, f1, [&](std::int64_t s, std::int64_t j0, std::int64_t m, const Real* z) {
        Real* o = w + s * D + j0;
        const Real *l = loc + j0, *sc = scale + j0;
        for (std::int64_t i = 0; i < m; ++i) o[i] = l[i] + sc[i] * z[i];
      });
    }
  });
}


template <class Real>
void transform(Transform t, const Real* x, std::int64_t n, Real* y, int workers) {
  parallel_for_blocks(num_blocks(n), workers_for(n * 32, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(n - j0, kBlock);
    const Real* xb = x + j0;
    Real* yb = y + j0;
    switch (t) {
      case Transform::kSoftplus:
        for (std::int64_t i = 0; i < m; ++i) yb[i] = softplus(xb[i]);
        break;
      case Transform::kSoftplusInv:
        for (std::int64_t i = 0; i < m; ++i) yb[i] = softplus_inv(xb[i]);
        break;
      case Transform::kSigmoid:
        for (std::int64_t i = 0; i < m; ++i) yb[i] = sigmoid(xb[i]);
        break;
    }
  });
}

// Deterministic sum over j of f(j) for j in [0, D): block partials in `work`
// (num_blocks(D) doubles), combined in block order.
template <class Real, class F>
double block_sum(std::int64_t D, double* work, int workers, F&& f) {
  const std::int64_t nb = num_blocks(D);
  parallel_for_blocks(nb, workers_for(D * 32, workers), [&](std::int64_t b) {
    alignas(64) Real v[kBlock];
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    for (std::int64_t i = 0; i < m; ++i) v[i] = f(j0 + i);
    work[b] = lane_sum(v, m);
  });
  double total = 0.0;
  for (std::int64_t b = 0; b < nb; ++b) total += work[b];
  return total;
}

// Row sums over (S, D) tiles: out[s] = offset + scale_by * sum_j f(s, j).
// `work` holds S * num_blocks(D) doubles.
template <class Real, class F>
void row_sums(std::int64_t S, std::int64_t D, double offset, double scale_by, double* work, Real* out,
              int workers, F&& f) {
  const std::int64_t nb = num_blocks(D);
  parallel_for_blocks(S * nb, workers_for(S * D * 16, workers), [&](std::int64_t t) {
    const std::int64_t s = t / nb, b = t % nb;
    alignas(64) Real v[kBlock];
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    for (std::int64_t i = 0; i < m; ++i) v[i] = f(s, j0 + i);
    work[t] = lane_sum(v, m);
  });
  for (std::int64_t s = 0; s < S; ++s) {
    double acc = 0.0;
    for (std::int64_t b = 0; b < nb; ++b) acc += work[s * nb + b];
    out[s] = static_cast<Real>(offset + scale_by * acc);
  }
}

// log q(w[s]) summed over the event.  `work`: max(S, 1) * num_blocks(D) doubles.
template <class Real>
void mf_log_prob(const Real* loc, const Real* scale, const Real* w, std::int64_t S, std::int64_t D,
                 Real* out, double* work, int workers) {
  const double sum_log_scale =
      block_sum<Real>(D, work, workers, [&](std::int64_t j) { return std::log(scale[j]); });
  const double offset = -static_cast<double>(D) * kHalfLog2Pi<double> - sum_log_scale;
  row_sums<Real>(S, D, offset, -0.5, work, out, workers, [&](std::int64_t s, std::int64_t j) {
    const Real z = (w[s * D + j] - loc[j]) / scale[j];
    return z * z;
  });
}

// Entropy of q: sum_j (log(2 pi e) / 2 + log scale_j).  `work`: num_blocks(D) doubles.
template <class Real>
double mf_entropy(const Real* scale, std::int64_t D, double* work, int workers) {
  const double sum_log_scale =
      block_sum<Real>(D, work, workers, [&](std::int64_t j) { return std::log(scale[j]); });
  return static_cast<double>(D) * (kHalfLog2Pi<double> + 0.5) + sum_log_scale;
}

// log p(w[s]) summed over the event, for any prior accessor.
template <class Real, class Prior>
void prior_log_prob(const Prior& prior, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                    double* work, int workers) {
  row_sums<Real>(S, D, 0.0, 1.0, work, out, workers, [&](std::int64_t s, std::int64_t j) {
    Real lp, g;
    prior.eval(j, w[s * D + j], lp, g);
    return lp;
  });
}

// d log p / dw elementwise over (S, D).
template <class Real, class Prior>
void prior_grad_log_prob(const Prior& prior, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                         int workers) {
  const std::int64_t nb = num_blocks(D);
  parallel_for_blocks(S * nb, workers_for(S * D * 16, workers), [&](std::int64_t t) {
    const std::int64_t s = t / nb, b = t % nb;
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    const Real* wb = w + s * D;
    Real* ob = out + s * D;
    for (std::int64_t j = j0; j < j0 + m; ++j) ob[j] = prior.grad(j, wb[j]);
  });
}

VIGRAD_ISA_END
}  // namespace vigrad::core
