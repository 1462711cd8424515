// Full-rank and low-rank-plus-diagonal Gaussian families (the lecture slides'
// fixed-form families), with sampling, log-density and fused pathwise gradients of
//     F = E_q[log q(z)] - E_q[log p(z)]     (= -ELBO for a log joint p)
// given g_s = d log p / dz at each sample.
//
//  full rank:  z = loc + L eps,              L lower triangular, positive diagonal.
//  low rank:   z = loc + D eps1 + U eps2,    Sigma = diag(D^2) + U U^T, U (d, r);
//              eps = (eps1 (d), eps2 (r)) are the d + r normals of one sample.
//
// Loops run over contiguous rows (axpy form) in a fixed order, so they vectorise
// without reassociation and give the same bits for any thread count.  The caller
// allocates outputs and scratch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "gradients.hpp"
#include "math.hpp"
#include "meanfield.hpp"
#include "parallel.hpp"

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// Samples per parallel block in the per-sample kernels.
inline constexpr std::int64_t kSampleBlock = 4;

// ---------------------------------------------------------------- full rank

// LT = L^T (row k of LT is column k of L), d x d.
template <class Real>
void transpose(const Real* A, std::int64_t d, Real* AT) {
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t k = 0; k < d; ++k) AT[k * d + i] = A[i * d + k];
}

// z[s] = loc + L eps[s]; eps given.  LT = L^T.
template <class Real>
void fullrank_affine(const Real* loc, const Real* LT, const Real* eps, std::int64_t S, std::int64_t d, Real* z,
                     int workers) {
  workers = workers_for(S * d * d / 2, workers);
  parallel_for_blocks(num_blocks(S, kSampleBlock), workers, [&](std::int64_t b) {
    const std::int64_t s1 = std::min(S, (b + 1) * kSampleBlock);
    for (std::int64_t s = b * kSampleBlock; s < s1; ++s) {
      Real* zs = z + s * d;
      const Real* es = eps + s * d;
      for (std::int64_t i = 0; i < d; ++i) zs[i] = loc[i];
      for (std::int64_t k = 0; k < d; ++k) {
        const Real e = es[k];
        const Real* col = LT + k * d;  // L[i, k] for i >= k
        for (std::int64_t i = k; i < d; ++i) zs[i] += col[i] * e;
      }
    }
  });
}

// Solve L u = r in place (forward substitution, column form).
template <class Real>
inline void tril_solve(const Real* LT, std::int64_t d, Real* r) {
  for (std::int64_t k = 0; k < d; ++k) {
    const Real uk = r[k] / LT[k * d + k];
    r[k] = uk;
    const Real* col = LT + k * d;
    for (std::int64_t i = k + 1; i < d; ++i) r[i] -= uk * col[i];
  }
}

// Solve L^T v = r in place (back substitution, row form on L).
template <class Real>
inline void triu_solve_transposed(const Real* L, std::int64_t d, Real* r) {
  for (std::int64_t i = d - 1; i >= 0; --i) {
    const Real vi = r[i] / L[i * d + i];
    r[i] = vi;
    const Real* row = L + i * d;
    for (std::int64_t k = 0; k < i; ++k) r[k] -= vi * row[k];
  }
}

// log q(z[s]) = -|L^{-1}(z - loc)|^2 / 2 - sum log L_ii - d log(2 pi) / 2.  `u`: S * d scratch.
template <class Real>
void fullrank_log_prob(const Real* loc, const Real* L, const Real* LT, const Real* z, std::int64_t S,
                       std::int64_t d, Real* out, Real* u, int workers) {
  double sum_log_diag = 0.0;
  for (std::int64_t i = 0; i < d; ++i) sum_log_diag += std::log(static_cast<double>(L[i * d + i]));
  const double offset = -static_cast<double>(d) * kHalfLog2Pi<double> - sum_log_diag;
  workers = workers_for(S * d * d / 2, workers);
  parallel_for_blocks(num_blocks(S, kSampleBlock), workers, [&](std::int64_t b) {
    const std::int64_t s1 = std::min(S, (b + 1) * kSampleBlock);
    for (std::int64_t s = b * kSampleBlock; s < s1; ++s) {
      Real* us = u + s * d;
      for (std::int64_t i = 0; i < d; ++i) us[i] = z[s * d + i] - loc[i];
      tril_solve(LT, d, us);
      for (std::int64_t i = 0; i < d; ++i) us[i] = us[i] * us[i];
      out[s] = static_cast<Real>(offset - 0.5 * lane_sum(us, d));
    }
  });
}

// Pathwise gradient of F for the full-rank family, in (loc, L):
//   a_s = -g_s (kMC: the entropy's exact gradient diag(-1/L_ii) is added to dF/dL)
//   a_s = -L^{-T} eps_s - g_s (kSTL: d log q / dz along the path, no score term)
//   dF/dloc = mean a_s,   dF/dL = tril(mean a_s eps_s^T) [+ diag(-1/L_ii)]
// grad_L is d x d with the upper triangle set to 0.  `a`: S * d scratch.
template <KLMode Mode, class Real>
void fullrank_pathwise_grad(const Real* L, const Real* eps, const Real* g, std::int64_t S, std::int64_t d,
                            Real* grad_loc, Real* grad_L, Real* a, int workers) {
  static_assert(Mode != KLMode::kAnalytic, "full rank: use kMC (exact entropy gradient) or kSTL");
  workers = workers_for(S * d * d, workers);
  parallel_for_blocks(num_blocks(S, kSampleBlock), workers, [&](std::int64_t b) {
    const std::int64_t s1 = std::min(S, (b + 1) * kSampleBlock);
    for (std::int64_t s = b * kSampleBlock; s < s1; ++s) {
      Real* as = a + s * d;
      const Real* gs = g + s * d;
      if constexpr (Mode == KLMode::kSTL) {
        for (std::int64_t i = 0; i < d; ++i) as[i] = eps[s * d + i];
        triu_solve_transposed(L, d, as);
        for (std::int64_t i = 0; i < d; ++i) as[i] = -as[i] - gs[i];
      } else {
        for (std::int64_t i = 0; i < d; ++i) as[i] = -gs[i];
      }
    }
  });
  using Acc = double;
  const Acc inv_S = Acc(1) / static_cast<Acc>(S);
  // rows of grad_L in blocks; each row sums over samples in order
  constexpr std::int64_t kRows = 16;
  parallel_for_blocks(num_blocks(d, kRows), workers, [&](std::int64_t b) {
    const std::int64_t i1 = std::min(d, (b + 1) * kRows);
    alignas(64) Acc acc[kBlock];
    for (std::int64_t i = b * kRows; i < i1; ++i) {
      Real* row = grad_L + i * d;
      Acc gl = 0;
      for (std::int64_t k0 = 0; k0 <= i; k0 += kBlock) {
        const std::int64_t m = std::min<std::int64_t>(i + 1 - k0, kBlock);
        for (std::int64_t k = 0; k < m; ++k) acc[k] = 0;
        for (std::int64_t s = 0; s < S; ++s) {
          const Acc ai = a[s * d + i];
          const Real* es = eps + s * d + k0;
          for (std::int64_t k = 0; k < m; ++k) acc[k] += ai * static_cast<Acc>(es[k]);
        }
        for (std::int64_t k = 0; k < m; ++k) row[k0 + k] = static_cast<Real>(acc[k] * inv_S);
      }
      for (std::int64_t k = i + 1; k < d; ++k) row[k] = Real(0);
      for (std::int64_t s = 0; s < S; ++s) gl += static_cast<Acc>(a[s * d + i]);
      grad_loc[i] = static_cast<Real>(gl * inv_S);
      if constexpr (Mode == KLMode::kMC) row[i] = static_cast<Real>(static_cast<Acc>(row[i]) - Acc(1) / L[i * d + i]);
    }
  });
}

// ---------------------------------------------------------------- low rank

// z[s] = loc + D eps1[s] + U eps2[s] with eps[s] = (eps1 (d), eps2 (r)).  UT = U^T (r x d).
template <class Real>
void lowrank_affine(const Real* loc, const Real* diag, const Real* UT, const Real* eps, std::int64_t S,
                    std::int64_t d, std::int64_t r, Real* z, int workers) {
  const std::int64_t n = d + r;
  workers = workers_for(S * d * (r + 1), workers);
  parallel_for_blocks(num_blocks(S, kSampleBlock), workers, [&](std::int64_t b) {
    const std::int64_t s1 = std::min(S, (b + 1) * kSampleBlock);
    for (std::int64_t s = b * kSampleBlock; s < s1; ++s) {
      Real* zs = z + s * d;
      const Real* e1 = eps + s * n;
      const Real* e2 = e1 + d;
      for (std::int64_t i = 0; i < d; ++i) zs[i] = loc[i] + diag[i] * e1[i];
      for (std::int64_t k = 0; k < r; ++k) {
        const Real e = e2[k];
        const Real* u = UT + k * d;
        for (std::int64_t i = 0; i < d; ++i) zs[i] += u[i] * e;
      }
    }
  });
}

// The Woodbury pieces of Sigma = D^2 + U U^T, all in double:
//   WT = (U / D^2)^T (r x d),  C = I + U^T D^-2 U = K K^T (r x r, K lower),
//   log|Sigma| = 2 sum log D + 2 sum log K_kk.
// `WT`: r * d doubles, `K`: r * r doubles, `work`: num_blocks(d) * r * r doubles.
// Returns log|Sigma|, or NaN when C is not positive definite.
template <class Real>
double lowrank_factor(const Real* diag, const Real* UT, std::int64_t d, std::int64_t r, double* WT, double* K,
                      double* work, int workers) {
  const std::int64_t nb = num_blocks(d);
  workers = workers_for(d * r * r, workers);
  parallel_for_blocks(nb, workers, [&](std::int64_t b) {
    const std::int64_t i0 = b * kBlock, i1 = std::min(d, i0 + kBlock);
    double* part = work + b * r * r;
    for (std::int64_t k = 0; k < r; ++k) {
      double* wk = WT + k * d;
      const Real* uk = UT + k * d;
      for (std::int64_t i = i0; i < i1; ++i) {
        const double di = diag[i];
        wk[i] = static_cast<double>(uk[i]) / (di * di);
      }
    }
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t l = 0; l <= k; ++l) {
        const double* wk = WT + k * d;
        const Real* ul = UT + l * d;
        double acc = 0.0;
        for (std::int64_t i = i0; i < i1; ++i) acc += wk[i] * static_cast<double>(ul[i]);
        part[k * r + l] = acc;
      }
  });
  for (std::int64_t k = 0; k < r; ++k)
    for (std::int64_t l = 0; l <= k; ++l) {
      double c = (k == l) ? 1.0 : 0.0;
      for (std::int64_t b = 0; b < nb; ++b) c += work[b * r * r + k * r + l];
      K[k * r + l] = c;
    }
  // Cholesky of C in place (lower)
  double log_det = 0.0;
  for (std::int64_t j = 0; j < r; ++j) {
    double v = K[j * r + j];
    for (std::int64_t p = 0; p < j; ++p) v -= K[j * r + p] * K[j * r + p];
    if (!(v > 0.0)) return std::nan("");
    const double kjj = std::sqrt(v);
    K[j * r + j] = kjj;
    log_det += 2.0 * std::log(kjj);
    for (std::int64_t i = j + 1; i < r; ++i) {
      double t = K[i * r + j];
      for (std::int64_t p = 0; p < j; ++p) t -= K[i * r + p] * K[j * r + p];
      K[i * r + j] = t / kjj;
    }
    for (std::int64_t i = 0; i < j; ++i) K[i * r + j] = 0.0;
  }
  double sum_log_d = 0.0;
  for (std::int64_t i = 0; i < d; ++i) sum_log_d += std::log(static_cast<double>(diag[i]));
  return 2.0 * sum_log_d + log_det;
}

// y = C^{-1} t for the r-vector t, with C = K K^T.
inline void chol_solve(const double* K, std::int64_t r, double* t) {
  for (std::int64_t i = 0; i < r; ++i) {
    double v = t[i];
    for (std::int64_t p = 0; p < i; ++p) v -= K[i * r + p] * t[p];
    t[i] = v / K[i * r + i];
  }
  for (std::int64_t i = r - 1; i >= 0; --i) {
    double v = t[i];
    for (std::int64_t p = i + 1; p < r; ++p) v -= K[p * r + i] * t[p];
    t[i] = v / K[i * r + i];
  }
}

// For residual res (d), fill t (r) = W^T res in a fixed order.
template <class Real>
inline void project(const double* WT, std::int64_t d, std::int64_t r, const Real* res, double* t) {
  for (std::int64_t k = 0; k < r; ++k) {
    const double* wk = WT + k * d;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::int64_t i = 0;
    for (; i + 8 <= d; i += 8)
      for (int l = 0; l < 8; ++l) acc[l] += wk[i + l] * static_cast<double>(res[i + l]);
    for (int l = 0; i < d; ++i, ++l) acc[l] += wk[i] * static_cast<double>(res[i]);
    t[k] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
}


// log q(z[s]) by Woodbury: res^T Sigma^-1 res = sum res^2 / D^2 - t^T C^-1 t, t = W^T res.
// `res`: S * d scratch.
template <class Real>
void lowrank_log_prob(const Real* loc, const Real* diag, const double* WT, const double* K, double log_det,
                      const Real* z, std::int64_t S, std::int64_t d, std::int64_t r, Real* out, Real* res,
                      int workers) {
  workers = workers_for(S * d * (r + 1), workers);
  parallel_for_blocks(num_blocks(S, kSampleBlock), workers, [&](std::int64_t b) {
    const std::int64_t s1 = std::min(S, (b + 1) * kSampleBlock);
    double t[kMaxRank], y[kMaxRank];
    for (std::int64_t s = b * kSampleBlock; s < s1; ++s) {
      Real* rs = res + s * d;
      for (std::int64_t i = 0; i < d; ++i) rs[i] = z[s * d + i] - loc[i];
      project(WT, d, r, rs, t);
      for (std::int64_t k = 0; k < r; ++k) y[k] = t[k];
      chol_solve(K, r, y);
      double ty = 0.0;
      for (std::int64_t k = 0; k < r; ++k) ty += t[k] * y[k];
      for (std::int64_t i = 0; i < d; ++i) {
        const Real q = rs[i] / diag[i];
        rs[i] = q * q;
      }
      const double quad = lane_sum(rs, d) - ty;
      out[s] = static_cast<Real>(-static_cast<double>(d) * kHalfLog2Pi<double> - 0.5 * log_det - 0.5 * quad);
    }
  });
}

// Pathwise gradient of F for the low-rank family in (loc, D, U):
//   kMC:  a_s = -g_s, plus the exact entropy gradient -Sigma^-1 U = -W C^-1 for U and
//         -diag(Sigma^-1) D for D, diag(Sigma^-1)_i = 1/D_i^2 - W_i C^-1 W_i^T
//   kSTL: a_s = -Sigma^-1 (z_s - loc) - g_s
//   dF/dloc = mean a,  dF/dD = mean a * eps1,  dF/dU = mean a eps2^T
// grad_U is (d, r).  `a`: S * d scratch.
template <KLMode Mode, class Real>
void lowrank_pathwise_grad(const Real* diag, const Real* UT, const double* WT, const double* K, const Real* eps,
                           const Real* g, std::int64_t S, std::int64_t d, std::int64_t r, Real* grad_loc,
                           Real* grad_diag, Real* grad_U, Real* a, int workers) {
  static_assert(Mode != KLMode::kAnalytic, "low rank: use kMC (exact entropy gradient) or kSTL");
  const std::int64_t n = d + r;
  workers = workers_for(S * d * (r + 1) + d * r * r, workers);
  parallel_for_blocks(num_blocks(S, kSampleBlock), workers, [&](std::int64_t b) {
    const std::int64_t s1 = std::min(S, (b + 1) * kSampleBlock);
    double t[kMaxRank];
    for (std::int64_t s = b * kSampleBlock; s < s1; ++s) {
      Real* as = a + s * d;
      const Real* gs = g + s * d;
      if constexpr (Mode == KLMode::kSTL) {
        const Real* e1 = eps + s * n;
        const Real* e2 = e1 + d;
        // res = D eps1 + U eps2, then Sigma^-1 res = res / D^2 - W C^-1 W^T res
        for (std::int64_t i = 0; i < d; ++i) as[i] = diag[i] * e1[i];
        for (std::int64_t k = 0; k < r; ++k) {
          const Real e = e2[k];
          const Real* u = UT + k * d;
          for (std::int64_t i = 0; i < d; ++i) as[i] += u[i] * e;
        }
        project(WT, d, r, as, t);
        chol_solve(K, r, t);
        for (std::int64_t i = 0; i < d; ++i) as[i] = as[i] / (diag[i] * diag[i]);
        for (std::int64_t k = 0; k < r; ++k) {
          const double c = t[k];
          const double* wk = WT + k * d;
          for (std::int64_t i = 0; i < d; ++i) as[i] = static_cast<Real>(as[i] - wk[i] * c);
        }
        for (std::int64_t i = 0; i < d; ++i) as[i] = -as[i] - gs[i];
      } else {
        for (std::int64_t i = 0; i < d; ++i) as[i] = -gs[i];
      }
    }
  });
  const double inv_S = 1.0 / static_cast<double>(S);
  parallel_for_blocks(num_blocks(d), workers, [&](std::int64_t b) {
    const std::int64_t i0 = b * kBlock, m = std::min(d - i0, kBlock);
    alignas(64) double acc_a[kBlock], acc_d[kBlock];
    alignas(64) double acc_u[kBlock];
    for (std::int64_t i = 0; i < m; ++i) { acc_a[i] = 0; acc_d[i] = 0; }
    for (std::int64_t s = 0; s < S; ++s) {
      const Real* as = a + s * d + i0;
      const Real* e1 = eps + s * n + i0;
      for (std::int64_t i = 0; i < m; ++i) {
        acc_a[i] += static_cast<double>(as[i]);
        acc_d[i] += static_cast<double>(as[i]) * static_cast<double>(e1[i]);
      }
    }
    for (std::int64_t i = 0; i < m; ++i) {
      grad_loc[i0 + i] = static_cast<Real>(acc_a[i] * inv_S);
      grad_diag[i0 + i] = static_cast<Real>(acc_d[i] * inv_S);
    }
    for (std::int64_t k = 0; k < r; ++k) {
      for (std::int64_t i = 0; i < m; ++i) acc_u[i] = 0;
      for (std::int64_t s = 0; s < S; ++s) {
        const double e = eps[s * n + d + k];
        const Real* as = a + s * d + i0;
        for (std::int64_t i = 0; i < m; ++i) acc_u[i] += static_cast<double>(as[i]) * e;
      }
      for (std::int64_t i = 0; i < m; ++i) grad_U[(i0 + i) * r + k] = static_cast<Real>(acc_u[i] * inv_S);
    }
    if constexpr (Mode == KLMode::kMC) {
      // entropy gradient: Sigma^-1 U = W C^-1 (row i: C^-1 W_i^T), diag(Sigma^-1)_i = 1/D_i^2 - W_i C^-1 W_i^T
      double w[kMaxRank];
      for (std::int64_t i = 0; i < m; ++i) {
        const std::int64_t ii = i0 + i;
        for (std::int64_t k = 0; k < r; ++k) w[k] = WT[k * d + ii];
        double wcw = 0.0;
        double y[kMaxRank];
        for (std::int64_t k = 0; k < r; ++k) y[k] = w[k];
        chol_solve(K, r, y);
        for (std::int64_t k = 0; k < r; ++k) {
          wcw += w[k] * y[k];
          grad_U[ii * r + k] = static_cast<Real>(static_cast<double>(grad_U[ii * r + k]) - y[k]);
        }
        const double dd = diag[ii];
        const double sinv = 1.0 / (dd * dd) - wcw;
        grad_diag[ii] = static_cast<Real>(static_cast<double>(grad_diag[ii]) - sinv * dd);
      }
    }
  });
}

// The mean-field q of a fit's step from its parameters, in one pass over blocks: scale =
// softplus(rho) (transform's loop), whether loc and rho are finite and every scale > 0 (else
// *ok = false), and the entropy (mf_entropy's block sums of log scale, combined in block order:
// the same bits as softplus then mf_entropy, whose loops these are).  `work`: num_blocks(D) doubles.
template <class Real>
double mf_scale_entropy(const Real* loc, const Real* rho, std::int64_t D, Real* scale, double* work, bool* ok,
                        int workers) {
  std::atomic<bool> bad{false};
  const std::int64_t nb = num_blocks(D);
  parallel_for_blocks(nb, workers_for(D * 32, workers), [&](std::int64_t b) {
    const std::int64_t j0 = b * kBlock, m = std::min(D - j0, kBlock);
    const Real* rb = rho + j0;
    Real* sb = scale + j0;
    for (std::int64_t i = 0; i < m; ++i) sb[i] = softplus(rb[i]);
    std::int64_t not_positive = 0;
    for (std::int64_t i = 0; i < m; ++i) not_positive += !(sb[i] > Real(0));
    if (not_positive != 0 || !all_finite(loc + j0, m) || !all_finite(rb, m)) bad.store(true, std::memory_order_relaxed);
    alignas(64) Real v[kBlock];
    for (std::int64_t i = 0; i < m; ++i) v[i] = std::log(sb[i]);
    work[b] = lane_sum(v, m);
  });
  *ok = !bad.load();
  double total = 0.0;
  for (std::int64_t b = 0; b < nb; ++b) total += work[b];
  return static_cast<double>(D) * (kHalfLog2Pi<double> + 0.5) + total;
}

VIGRAD_ISA_END
}  // namespace vigrad::core
