// The update rules of vg.optim (Adam, SGD, RMSprop) as fused passes over flat arrays.
//
// Every rule reads (params, grads, state) and writes (params, state) to outputs that are either
// the inputs themselves (in place) or separate arrays (out of place: the functional
// Optimizer.update).  Both run the same arithmetic on the same blocks, so the two give the same
// bits, and so does Adam fused into the Bayes-by-Backprop backward pass (AdamStep, bbb.hpp).
// Decoupled weight decay multiplies the parameters by `decay` = 1 - lr * weight_decay before the
// step (skipped when decay == 1).  Each call returns whether every gradient was finite; a block
// is computed either way, so an out-of-place caller discards its outputs when it was not.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "bbb.hpp"
#include "parallel.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// Per block: out = in (or in * decay for the parameters) unless out is in.
template <class Real>
inline void take_block(const Real* in, Real* out, std::int64_t n) {
  if (out != in) std::copy(in, in + n, out);
}

template <class Real>
inline void take_params(const Real* in, Real* out, std::int64_t n, Real decay, bool decayed) {
  if (decayed) {
    for (std::int64_t j = 0; j < n; ++j) out[j] = in[j] * decay;
  } else {
    take_block(in, out, n);
  }
}

// The blocks of an update: f(j0, m) for the block [j0, j0 + m); returns whether g is all finite.
template <class Real, class F>
inline bool for_update_blocks(const Real* g, std::int64_t n, int workers, F&& f) {
  std::atomic<bool> bad{false};
  parallel_for_blocks(num_blocks(n), workers_for(n * 8, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(n - j0, kBlock);
    if (!all_finite(g + j0, m)) bad.store(true, std::memory_order_relaxed);
    f(j0, m);
  });
  return !bad.load();
}

// Adam: the arithmetic of AdamStep (bbb.hpp), after the optional weight decay.
template <class Real>
bool adam_step(const Real* p, const Real* g, const Real* m, const Real* v, Real* p_out, Real* m_out, Real* v_out,
               std::int64_t n, std::int64_t step, double lr, double b1, double b2, double eps, double decay,
               int workers) {
  const AdamStep<Real> st(step, lr, b1, b2, eps);
  const Real dc = static_cast<Real>(decay);
  const bool decayed = decay != 1.0;
  // out of place (the bindings allow outputs that are their inputs or overlap nothing), no decay:
  // one pass from the inputs into the outputs, the same arithmetic as in place
  const bool apart = !decayed && p_out != p && m_out != m && v_out != v;
  return for_update_blocks(g, n, workers, [&](std::int64_t j0, std::int64_t len) {
    if (apart) {
      st.apply_to(p + j0, g + j0, m + j0, v + j0, p_out + j0, m_out + j0, v_out + j0, len);
      return;
    }
    take_params(p + j0, p_out + j0, len, dc, decayed);
    take_block(m + j0, m_out + j0, len);
    take_block(v + j0, v_out + j0, len);
    st.apply(p_out + j0, g + j0, m_out + j0, v_out + j0, len);
  });
}

// SGD with optional (Nesterov) momentum, as torch.optim.SGD with a zero-initialised buffer:
//   buf = momentum buf + g;  d = nesterov ? g + momentum buf : buf   (d = g without momentum)
//   p = p - lr d
template <class Real>
struct SGDStep {
  Real lr, mom;
  bool nesterov;
  void apply(Real* p, const Real* g, Real* buf, std::int64_t n) const {
    const Real rlr = lr, rm = mom;  // locals: see AdamStep::apply
    if (buf == nullptr) {
      for (std::int64_t j = 0; j < n; ++j) p[j] = p[j] - rlr * g[j];
    } else if (nesterov) {
      for (std::int64_t j = 0; j < n; ++j) {
        const Real b = rm * buf[j] + g[j];
        buf[j] = b;
        p[j] = p[j] - rlr * (g[j] + rm * b);
      }
    } else {
      for (std::int64_t j = 0; j < n; ++j) {
        const Real b = rm * buf[j] + g[j];
        buf[j] = b;
        p[j] = p[j] - rlr * b;
      }
    }
  }
};

// buf / buf_out: null without momentum.
template <class Real>
bool sgd_step(const Real* p, const Real* g, const Real* buf, Real* p_out, Real* buf_out, std::int64_t n, double lr,
              double momentum, bool nesterov, double decay, int workers) {
  const SGDStep<Real> st{static_cast<Real>(lr), static_cast<Real>(momentum), nesterov};
  const Real dc = static_cast<Real>(decay);
  const bool decayed = decay != 1.0;
  return for_update_blocks(g, n, workers, [&](std::int64_t j0, std::int64_t len) {
    take_params(p + j0, p_out + j0, len, dc, decayed);
    if (buf) take_block(buf + j0, buf_out + j0, len);
    st.apply(p_out + j0, g + j0, buf ? buf_out + j0 : nullptr, len);
  });
}

// RMSprop as torch.optim.RMSprop (alpha = decay of the running mean of g^2):
//   s = alpha s + (1 - alpha) g^2;  d = g / (sqrt(s) + eps)
//   buf = momentum buf + d; p = p - lr buf   (without momentum: p = p - lr d)
template <class Real>
struct RMSpropStep {
  Real lr, alpha, one_alpha, eps, mom;
  void apply(Real* p, const Real* g, Real* s, Real* buf, std::int64_t n) const {
    const Real rlr = lr, ra = alpha, oa = one_alpha, re = eps, rm = mom;  // locals: see AdamStep::apply
    if (buf == nullptr) {
      for (std::int64_t j = 0; j < n; ++j) {
        const Real gj = g[j];
        const Real sj = ra * s[j] + oa * (gj * gj);
        s[j] = sj;
        p[j] = p[j] - rlr * (gj / (std::sqrt(sj) + re));
      }
    } else {
      for (std::int64_t j = 0; j < n; ++j) {
        const Real gj = g[j];
        const Real sj = ra * s[j] + oa * (gj * gj);
        s[j] = sj;
        const Real b = rm * buf[j] + gj / (std::sqrt(sj) + re);
        buf[j] = b;
        p[j] = p[j] - rlr * b;
      }
    }
  }
};

template <class Real>
bool rmsprop_step(const Real* p, const Real* g, const Real* s, const Real* buf, Real* p_out, Real* s_out,
                  Real* buf_out, std::int64_t n, double lr, double alpha, double eps, double momentum, double decay,
                  int workers) {
  const RMSpropStep<Real> st{static_cast<Real>(lr), static_cast<Real>(alpha), static_cast<Real>(1.0 - alpha),
                             static_cast<Real>(eps), static_cast<Real>(momentum)};
  const Real dc = static_cast<Real>(decay);
  const bool decayed = decay != 1.0;
  return for_update_blocks(g, n, workers, [&](std::int64_t j0, std::int64_t len) {
    take_params(p + j0, p_out + j0, len, dc, decayed);
    take_block(s + j0, s_out + j0, len);
    if (buf) take_block(buf + j0, buf_out + j0, len);
    st.apply(p_out + j0, g + j0, s_out + j0, buf ? buf_out + j0 : nullptr, len);
  });
}

VIGRAD_ISA_END
}  // namespace vigrad::core
