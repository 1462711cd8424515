// One instruction-set level's kernel table.
//
// CMake compiles this file once per level (VIGRAD_ISA_NS = baseline, avx2, avx512 or native, with
// that level's -m flags); every kernel header then lives in the inline namespace of that name, so
// each object has its own copies of everything it instantiates.  The table turns the bindings'
// run-time choices (prior kind, estimator mode, ...) into the headers' template arguments.
// Nothing here allocates, throws or touches Python.
#include <optional>
#include <type_traits>

#include "vigrad/bbb.hpp"
#include "vigrad/families.hpp"
#include "vigrad/gradients.hpp"
#include "vigrad/kernels.hpp"
#include "vigrad/meanfield.hpp"
#include "vigrad/optim.hpp"
#include "vigrad/priors.hpp"
#include "vigrad/stats.hpp"

#ifndef VIGRAD_ISA_LEVEL
#error "compile kernels.cpp with VIGRAD_ISA_LEVEL (and VIGRAD_ISA_NS) set to the level's name"
#endif

namespace vigrad::core {
VIGRAD_ISA_BEGIN
namespace {

template <class P>
inline constexpr bool is_normal = false;
template <class R, bool A>
inline constexpr bool is_normal<NormalPrior<R, A>> = true;

// f(prior) with the prior object PriorArgs describes.  WithFlat: whether the flat prior is a
// valid choice for this kernel (it is instantiated only where it is).
template <bool WithFlat, class Real, class F>
auto with_prior(const PriorArgs<Real>& p, F&& f) {
  switch (p.kind) {
    case PriorKind::kNormal:
      if (p.per_element) return f(NormalPrior<Real, true>(p.p0, p.p1));
      return f(NormalPrior<Real, false>(p.p0, p.p1));
    case PriorKind::kMixture:
      if (p.per_element) return f(MixturePrior<Real, true>(p.p0, p.p1, p.p2));
      return f(MixturePrior<Real, false>(p.p0, p.p1, p.p2));
    case PriorKind::kFlat:
      if constexpr (WithFlat) return f(FlatPrior<Real>{});
      break;
  }
  invalid_kernel_call("this kernel does not take the flat prior");
}

template <class Real>
double pathwise(KLMode mode, const PriorArgs<Real>& p, const Real* l, const Real* r, const Real* e, const Real* g,
                std::int64_t S, std::int64_t D, double kw, Real* gl, Real* gr, double* work, bool* finite,
                int workers) {
  return with_prior<true>(p, [&](const auto& prior) -> double {
    using P = std::decay_t<decltype(prior)>;
    switch (mode) {
      case KLMode::kMC:
        return pathwise_grad<KLMode::kMC>(l, r, e, g, S, D, prior, kw, gl, gr, work, finite, workers);
      case KLMode::kSTL:
        return pathwise_grad<KLMode::kSTL>(l, r, e, g, S, D, prior, kw, gl, gr, work, finite, workers);
      case KLMode::kAnalytic:
        if constexpr (is_normal<P>)
          return pathwise_grad<KLMode::kAnalytic>(l, r, e, g, S, D, prior, kw, gl, gr, work, finite, workers);
        break;
    }
    invalid_kernel_call("the analytic KL needs a Normal prior");
  });
}

template <class Real>
double kl_normal_entry(const PriorArgs<Real>& p, const Real* l, const Real* r, std::int64_t D, double kw, Real* gl,
                       Real* gr, double* work, int workers) {
  return with_prior<false>(p, [&](const auto& prior) -> double {
    if constexpr (is_normal<std::decay_t<decltype(prior)>>)
      return kl_normal<Real>(l, r, D, prior, kw, gl, gr, work, workers);
    invalid_kernel_call("the closed-form KL needs a Normal prior");
  });
}

template <class Real>
void fullrank_grad_entry(KLMode mode, const Real* L, const Real* e, const Real* g, std::int64_t S, std::int64_t d,
                         Real* gl, Real* gL, Real* a, int workers) {
  if (mode == KLMode::kMC) return fullrank_pathwise_grad<KLMode::kMC>(L, e, g, S, d, gl, gL, a, workers);
  if (mode == KLMode::kSTL) return fullrank_pathwise_grad<KLMode::kSTL>(L, e, g, S, d, gl, gL, a, workers);
  invalid_kernel_call("the full-rank family takes mode 'mc' or 'stl'");
}

template <class Real>
void lowrank_grad_entry(KLMode mode, const Real* diag, const Real* UT, const double* WT, const double* K,
                        const Real* e, const Real* g, std::int64_t S, std::int64_t d, std::int64_t r, Real* gl,
                        Real* gd, Real* gU, Real* a, int workers) {
  if (mode == KLMode::kMC)
    return lowrank_pathwise_grad<KLMode::kMC>(diag, UT, WT, K, e, g, S, d, r, gl, gd, gU, a, workers);
  if (mode == KLMode::kSTL)
    return lowrank_pathwise_grad<KLMode::kSTL>(diag, UT, WT, K, e, g, S, d, r, gl, gd, gU, a, workers);
  invalid_kernel_call("the low-rank family takes mode 'mc' or 'stl'");
}

template <class Real>
double noise_kl_entry(NoiseUse use, KLPart kp, const PriorArgs<Real>& p, std::uint64_t key, const Real* l,
                      const Real* r, std::int64_t D, Real* out, double* work, int workers) {
  return with_prior<true>(p, [&](const auto& prior) -> double {
    using P = std::decay_t<decltype(prior)>;
    auto run = [&](auto use_c) -> double {
      constexpr NoiseUse U = decltype(use_c)::value;
      switch (kp) {
        case KLPart::kNone:
          return bbb_noise_kl<U, KLPart::kNone>(key, l, r, D, prior, out, work, workers);
        case KLPart::kMC:
          if constexpr (!std::is_same_v<P, FlatPrior<Real>>)
            return bbb_noise_kl<U, KLPart::kMC>(key, l, r, D, prior, out, work, workers);
          break;
        case KLPart::kAnalytic:
          if constexpr (is_normal<P>)
            return bbb_noise_kl<U, KLPart::kAnalytic>(key, l, r, D, prior, out, work, workers);
          break;
      }
      invalid_kernel_call("bbb_noise_kl: this KL part needs another prior");
    };
    switch (use) {
      case NoiseUse::kWeights:
        return run(std::integral_constant<NoiseUse, NoiseUse::kWeights>{});
      case NoiseUse::kPerturbation:
        return run(std::integral_constant<NoiseUse, NoiseUse::kPerturbation>{});
      case NoiseUse::kNone:
        break;
    }
    return run(std::integral_constant<NoiseUse, NoiseUse::kNone>{});
  });
}

template <class Real>
double bbb_grad_entry(DataGrad dg, KLPart kp, bool want_kl, const PriorArgs<Real>& p, std::uint64_t key,
                      const Real* l, const Real* r, const Real* A, const Real* BC, std::int64_t D, double kw, Real* gl,
                      Real* gr, bool acc, double* work, bool* finite, int workers, const AdamArgs<Real>* adam_args) {
  std::optional<AdamTarget<Real>> adam;
  if (adam_args) {
    const AdamArgs<Real>& a = *adam_args;
    adam = AdamTarget<Real>{a.loc,   a.rho,   a.m_loc, a.v_loc, a.m_rho, a.v_rho,
                            AdamStep<Real>(a.step, a.lr, a.b1, a.b2, a.eps)};
  }
  const AdamTarget<Real>* ad = adam ? &*adam : nullptr;
  return with_prior<false>(p, [&](const auto& prior) -> double {
    using P = std::decay_t<decltype(prior)>;
    auto go = [&](auto dg_c) -> double {
      constexpr DataGrad DG = decltype(dg_c)::value;
      switch (kp) {
        case KLPart::kNone:
          return bbb_grad<DG, KLPart::kNone>(key, l, r, A, BC, D, prior, kw, gl, gr, acc, work, finite, workers, ad);
        case KLPart::kMC:
          if (!want_kl)
            return bbb_grad<DG, KLPart::kMC, Real, P, false>(key, l, r, A, BC, D, prior, kw, gl, gr, acc, work,
                                                             finite, workers, ad);
          return bbb_grad<DG, KLPart::kMC>(key, l, r, A, BC, D, prior, kw, gl, gr, acc, work, finite, workers, ad);
        case KLPart::kAnalytic:
          if constexpr (is_normal<P>) {
            if (!want_kl)
              return bbb_grad<DG, KLPart::kAnalytic, Real, P, false>(key, l, r, A, BC, D, prior, kw, gl, gr, acc,
                                                                     work, finite, workers, ad);
            return bbb_grad<DG, KLPart::kAnalytic>(key, l, r, A, BC, D, prior, kw, gl, gr, acc, work, finite,
                                                   workers, ad);
          }
          break;
      }
      invalid_kernel_call("bbb_grad: the analytic KL needs a Normal prior");
    };
    switch (dg) {
      case DataGrad::kReparam:
        return go(std::integral_constant<DataGrad, DataGrad::kReparam>{});
      case DataGrad::kTimesEps:
        return go(std::integral_constant<DataGrad, DataGrad::kTimesEps>{});
      case DataGrad::kDirect:
        break;
    }
    return go(std::integral_constant<DataGrad, DataGrad::kDirect>{});
  });
}

template <class Real>
Kernels<Real> make_kernels() {
  Kernels<Real> k{};
  k.standard_normal = &standard_normal<Real>;
  k.sample = &sample<Real>;
  k.transform = &transform<Real>;
  k.mf_log_prob = &mf_log_prob<Real>;
  k.mf_entropy = &mf_entropy<Real>;
  k.mf_scale_entropy = &mf_scale_entropy<Real>;
  k.moment_sums = &moment_sums<Real>;
  k.combine_moments = &combine_moments;
  k.prior_log_prob = [](const PriorArgs<Real>& p, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                        double* work, int workers) {
    with_prior<true>(p, [&](const auto& prior) { prior_log_prob<Real>(prior, w, S, D, out, work, workers); });
  };
  k.prior_grad_log_prob = [](const PriorArgs<Real>& p, const Real* w, std::int64_t S, std::int64_t D, Real* out,
                             int workers) {
    with_prior<true>(p, [&](const auto& prior) { prior_grad_log_prob<Real>(prior, w, S, D, out, workers); });
  };
  k.pathwise_grad = &pathwise<Real>;
  k.kl_normal = &kl_normal_entry<Real>;
  k.score_grad = &score_grad<Real>;
  k.fullrank_affine = &fullrank_affine<Real>;
  k.fullrank_log_prob = &fullrank_log_prob<Real>;
  k.fullrank_pathwise_grad = &fullrank_grad_entry<Real>;
  k.lowrank_affine = &lowrank_affine<Real>;
  k.lowrank_factor = &lowrank_factor<Real>;
  k.lowrank_log_prob = &lowrank_log_prob<Real>;
  k.lowrank_pathwise_grad = &lowrank_grad_entry<Real>;
  k.bbb_noise_kl = &noise_kl_entry<Real>;
  k.bbb_grad = &bbb_grad_entry<Real>;
  k.adam_update = &adam_update<Real>;
  k.adam_step = &adam_step<Real>;
  k.sgd_step = &sgd_step<Real>;
  k.rmsprop_step = &rmsprop_step<Real>;
  return k;
}

}  // namespace
VIGRAD_ISA_END

#define VIGRAD_STR2(x) #x
#define VIGRAD_STR(x) VIGRAD_STR2(x)
#define VIGRAD_TABLE_FN2(level) kernel_table_##level
#define VIGRAD_TABLE_FN(level) VIGRAD_TABLE_FN2(level)

const KernelTable& VIGRAD_TABLE_FN(VIGRAD_ISA_LEVEL)() {
  static const KernelTable table{VIGRAD_STR(VIGRAD_ISA_LEVEL), instruction_set(), make_kernels<float>(),
                                 make_kernels<double>()};
  return table;
}

}  // namespace vigrad::core
