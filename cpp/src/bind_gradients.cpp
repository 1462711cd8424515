// Bindings: the fused pathwise gradient of Proposition 1 and the score-function gradient.
#include <string>

#include "pybind.hpp"
#include "vigrad/kernels.hpp"
#include "vigrad/parallel.hpp"

namespace vigrad::bind {

namespace {

core::KLMode parse_mode(const std::string& mode, bool allow_analytic) {
  if (mode == "mc") return core::KLMode::kMC;
  if (mode == "stl") return core::KLMode::kSTL;
  if (mode == "analytic" && allow_analytic) return core::KLMode::kAnalytic;
  throw py::value_error(std::string("mode must be ") + (allow_analytic ? "'mc', 'stl' or 'analytic'" : "'mc' or 'stl'") +
                        ", got '" + mode + "'");
}

template <class Real>
py::tuple run_pathwise(core::KLMode mode, const carray<Real>& loc, const carray<Real>& rho, const carray<Real>& eps,
                       const carray<Real>& glik, Dims d, const core::PriorArgs<Real>& prior, double kl_weight,
                       int workers) {
  carray<Real> gl(d.D), gr(d.D);
  std::vector<double> work(static_cast<std::size_t>(core::num_blocks(d.D)));
  const Real *l = loc.data(), *r = rho.data(), *e = eps.data(), *g = glik.data();
  Real *glp = gl.mutable_data(), *grp = gr.mutable_data();
  bool finite = true;
  double kl;
  {
    py::gil_scoped_release release;
    kl = core::kernels<Real>().pathwise_grad(mode, prior, l, r, e, g, d.S, d.D, kl_weight, glp, grp, work.data(),
                                             &finite, workers);
  }
  return py::make_tuple(gl, gr, kl, finite);
}

template <class Real>
void def_grads(py::module_& m) {
  m.def(
      "pathwise_grad_normal",
      [](carray<Real> loc, carray<Real> rho, carray<Real> eps, carray<Real> glik, carray<Real> prior_loc,
         carray<Real> prior_scale, const std::string& mode, double kl_weight, int workers) {
        const Dims d = check_pathwise(loc, rho, eps, glik);
        const core::KLMode md = parse_mode(mode, true);
        check_workers(workers);
        return run_pathwise(md, loc, rho, eps, glik, d, normal_prior(prior_loc, prior_scale, d.D), kl_weight,
                            workers);
      },
      py::arg("loc").noconvert(), py::arg("rho").noconvert(), py::arg("eps").noconvert(),
      py::arg("grad_log_lik").noconvert(), py::arg("prior_loc").noconvert(), py::arg("prior_scale").noconvert(),
      py::arg("mode"), py::arg("kl_weight"), py::arg("workers"),
      "Fused Proposition-1 gradient with a Normal prior: (grad_loc, grad_rho, kl_part, finite).");
  m.def(
      "pathwise_grad_mixture",
      [](carray<Real> loc, carray<Real> rho, carray<Real> eps, carray<Real> glik, carray<Real> pi,
         carray<Real> s1, carray<Real> s2, const std::string& mode, double kl_weight, int workers) {
        const Dims d = check_pathwise(loc, rho, eps, glik);
        const core::KLMode md = parse_mode(mode, false);
        check_workers(workers);
        return run_pathwise(md, loc, rho, eps, glik, d, mixture_prior(pi, s1, s2, d.D), kl_weight, workers);
      },
      py::arg("loc").noconvert(), py::arg("rho").noconvert(), py::arg("eps").noconvert(),
      py::arg("grad_log_lik").noconvert(), py::arg("pi").noconvert(), py::arg("sigma1").noconvert(),
      py::arg("sigma2").noconvert(), py::arg("mode"), py::arg("kl_weight"), py::arg("workers"),
      "Fused Proposition-1 gradient with the scale-mixture prior: (grad_loc, grad_rho, kl_part, finite).");
  m.def(
      "score_grad",
      [](carray<Real> loc, carray<Real> rho, carray<Real> eps, carray<Real> f, const std::string& baseline,
         double baseline_value, int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        require_shape(rho, {D}, "rho", "(D,) like loc");
        require_ndim(eps, 2, "eps");
        const std::int64_t S = eps.shape(0);
        require_shape(eps, {S, D}, "eps", "(S, D) with D = loc.size");
        require_shape(f, {S}, "f", "(S,) with S = eps.shape[0]");
        if (S < 1) throw py::value_error("eps must hold at least one sample, got S = 0");
        core::Baseline b;
        if (baseline == "none") b = core::Baseline::kNone;
        else if (baseline == "constant") b = core::Baseline::kConstant;
        else if (baseline == "loo") b = core::Baseline::kLeaveOneOut;
        else throw py::value_error("baseline must be 'none', 'constant' or 'loo', got '" + baseline + "'");
        if (b == core::Baseline::kLeaveOneOut && S < 2)
          throw py::value_error("the leave-one-out baseline needs at least 2 samples, got S = " + std::to_string(S));
        check_workers(workers);
        carray<Real> gl(D), gr(D);
        std::vector<double> coef(static_cast<std::size_t>(S));
        const Real *l = loc.data(), *r = rho.data(), *e = eps.data(), *fp = f.data();
        Real *glp = gl.mutable_data(), *grp = gr.mutable_data();
        bool finite;
        {
          py::gil_scoped_release release;
          finite = core::kernels<Real>().score_grad(l, r, e, fp, S, D, b, baseline_value, glp, grp, coef.data(),
                                                    workers);
        }
        return py::make_tuple(gl, gr, finite);
      },
      py::arg("loc").noconvert(), py::arg("rho").noconvert(), py::arg("eps").noconvert(), py::arg("f").noconvert(),
      py::arg("baseline"), py::arg("baseline_value"), py::arg("workers"),
      "Score-function gradient of E_q[f]: (grad_loc, grad_rho, finite).");
}

}  // namespace

void bind_gradients(py::module_& m) {
  def_grads<double>(m);
  def_grads<float>(m);
}

}  // namespace vigrad::bind
