// The kernel table: what the bindings call, whichever instruction-set level runs it.
//
// The hot kernels are compiled once per x86-64 level (baseline SSE2, AVX2 + FMA, AVX-512;
// cpp/src/kernels.cpp, one object each) and each object fills one KernelTable with pointers to
// its own instantiations.  At import the module picks the best table the CPU supports, or the one
// VIGRAD_ISA names (cpp/src/dispatch.cpp).  The bindings are compiled once, for the baseline, and
// reach every kernel through kernels<Real>().
//
// This header is the boundary between the two: plain types only (enums, pointers, integers),
// no code, so nothing in it can be compiled differently on the two sides.
#pragma once

#include <cstdint>

namespace vigrad::core {

// How the KL part enters the mean-field pathwise estimator (gradients.hpp).
enum class KLMode { kMC, kSTL, kAnalytic };
// The score-function estimator's baseline (gradients.hpp).
enum class Baseline { kNone, kConstant, kLeaveOneOut };
// Elementwise transforms (meanfield.hpp).
enum class Transform { kSoftplus, kSoftplusInv, kSigmoid };
// Bayes-by-Backprop passes (bbb.hpp): what the drawn noise becomes, which data gradient the
// backward gets, and which KL part it adds.
enum class NoiseUse { kWeights, kPerturbation, kNone };
enum class DataGrad { kReparam, kTimesEps, kDirect };
enum class KLPart { kNone, kMC, kAnalytic };

// Largest rank of the low-rank family (its Woodbury scratch lives on the stack).
inline constexpr std::int64_t kMaxRank = 256;

// A prior as the bindings hand it over: the kind, whether its parameters are arrays over the
// event (else one value each), and up to three parameter pointers: (loc, scale) for a Normal,
// (pi, sigma1, sigma2) for the scale mixture, none for the flat prior (log p = 0).
enum class PriorKind { kFlat, kNormal, kMixture };
template <class Real>
struct PriorArgs {
  PriorKind kind;
  bool per_element;
  const Real* p0;
  const Real* p1;
  const Real* p2;
};

// bbb_grad's fused Adam step: the arrays it updates in place and its hyperparameters.
template <class Real>
struct AdamArgs {
  Real *loc, *rho, *m_loc, *v_loc, *m_rho, *v_rho;
  std::int64_t step;
  double lr, b1, b2, eps;
};

// One level's kernels for one floating-point type.  Each entry is the kernel of the same name in
// the headers, with run-time enums where the header has template parameters; the meaning of
// every argument is documented there.
template <class Real>
struct Kernels {
  // meanfield.hpp
  void (*standard_normal)(std::uint64_t key, std::int64_t S, std::int64_t D, Real* out, int workers);
  void (*sample)(std::uint64_t key, const Real* loc, const Real* scale, std::int64_t S, std::int64_t D, Real* w,
                 Real* eps_out, int workers);
  void (*transform)(Transform t, const Real* x, std::int64_t n, Real* y, int workers);
  void (*mf_log_prob)(const Real* loc, const Real* scale, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                      double* work, int workers);
  double (*mf_entropy)(const Real* scale, std::int64_t D, double* work, int workers);
  double (*mf_scale_entropy)(const Real* loc, const Real* rho, std::int64_t D, Real* scale, double* work,
                             bool* ok, int workers);
  void (*prior_log_prob)(const PriorArgs<Real>& prior, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                         double* work, int workers);
  void (*prior_grad_log_prob)(const PriorArgs<Real>& prior, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                              int workers);
  // gradients.hpp
  double (*pathwise_grad)(KLMode mode, const PriorArgs<Real>& prior, const Real* loc, const Real* rho,
                          const Real* eps, const Real* glik, std::int64_t S, std::int64_t D, double kl_weight,
                          Real* grad_loc, Real* grad_rho, double* work, bool* finite, int workers);
  double (*kl_normal)(const PriorArgs<Real>& prior, const Real* loc, const Real* rho, std::int64_t D,
                      double kl_weight, Real* grad_loc, Real* grad_rho, double* work, int workers);
  bool (*score_grad)(const Real* loc, const Real* rho, const Real* eps, const Real* f, std::int64_t S, std::int64_t D,
                     Baseline baseline, double baseline_value, Real* grad_loc, Real* grad_rho, double* coef,
                     int workers);
  // families.hpp
  void (*fullrank_affine)(const Real* loc, const Real* LT, const Real* eps, std::int64_t S, std::int64_t d, Real* z,
                          int workers);
  void (*fullrank_log_prob)(const Real* loc, const Real* L, const Real* LT, const Real* z, std::int64_t S,
                            std::int64_t d, Real* out, Real* u, int workers);
  void (*fullrank_pathwise_grad)(KLMode mode, const Real* L, const Real* eps, const Real* g, std::int64_t S,
                                 std::int64_t d, Real* grad_loc, Real* grad_L, Real* a, int workers);
  void (*lowrank_affine)(const Real* loc, const Real* diag, const Real* UT, const Real* eps, std::int64_t S,
                         std::int64_t d, std::int64_t r, Real* z, int workers);
  double (*lowrank_factor)(const Real* diag, const Real* UT, std::int64_t d, std::int64_t r, double* WT, double* K,
                           double* work, int workers);
  void (*lowrank_log_prob)(const Real* loc, const Real* diag, const double* WT, const double* K, double log_det,
                           const Real* z, std::int64_t S, std::int64_t d, std::int64_t r, Real* out, Real* res,
                           int workers);
  void (*lowrank_pathwise_grad)(KLMode mode, const Real* diag, const Real* UT, const double* WT, const double* K,
                                const Real* eps, const Real* g, std::int64_t S, std::int64_t d, std::int64_t r,
                                Real* grad_loc, Real* grad_diag, Real* grad_U, Real* a, int workers);
  // bbb.hpp
  double (*bbb_noise_kl)(NoiseUse use, KLPart kl, const PriorArgs<Real>& prior, std::uint64_t key, const Real* loc,
                         const Real* rho, std::int64_t D, Real* out, double* work, int workers);
  double (*bbb_grad)(DataGrad data, KLPart kl, bool want_kl, const PriorArgs<Real>& prior, std::uint64_t key,
                     const Real* loc, const Real* rho, const Real* A, const Real* BC, std::int64_t D, double kl_weight,
                     Real* grad_loc, Real* grad_rho, bool accumulate, double* work, bool* finite, int workers,
                     const AdamArgs<Real>* adam);
  void (*adam_update)(Real* p, const Real* g, Real* m, Real* v, std::int64_t n, std::int64_t step, double lr,
                      double b1, double b2, double eps, int workers);
  // optim.hpp
  bool (*adam_step)(const Real* p, const Real* g, const Real* m, const Real* v, Real* p_out, Real* m_out,
                    Real* v_out, std::int64_t n, std::int64_t step, double lr, double b1, double b2, double eps,
                    double decay, int workers);
  bool (*sgd_step)(const Real* p, const Real* g, const Real* buf, Real* p_out, Real* buf_out, std::int64_t n,
                   double lr, double momentum, bool nesterov, double decay, int workers);
  bool (*rmsprop_step)(const Real* p, const Real* g, const Real* s, const Real* buf, Real* p_out, Real* s_out,
                       Real* buf_out, std::int64_t n, double lr, double alpha, double eps, double momentum,
                       double decay, int workers);
  // stats.hpp
  void (*moment_sums)(const Real* x, const double* c, double* s1, double* s2, std::int64_t n, int workers);
  void (*combine_moments)(const double* const* means, const double* const* m2s, const double* counts, std::int64_t k,
                          std::int64_t n, double* mean, double* m2, int workers);
};

struct KernelTable {
  const char* level;         // "baseline", "avx2", "avx512" or "native"
  const char* compiled_for;  // the widest vector extension the compiler was given for this level
  Kernels<float> f32;
  Kernels<double> f64;
};

// The tables built into this module (dispatch.cpp): one per level, named kernel_table_<level>.
#define VIGRAD_DECLARE_TABLE(level) const KernelTable& kernel_table_##level();

// The table in use: set once while the module is imported, before any binding can run.
extern const KernelTable* active_table;

template <class Real>
inline const Kernels<Real>& kernels() {
  if constexpr (sizeof(Real) == sizeof(float)) return active_table->f32;
  else return active_table->f64;
}

// A combination of run-time arguments that the bindings rule out before calling a kernel (for
// example an analytic KL with a mixture prior).  Defined once, in baseline code, so that no
// kernel object instantiates exception machinery of its own.
[[noreturn]] void invalid_kernel_call(const char* what);

}  // namespace vigrad::core
