// Bindings: elementwise transforms, mean-field log-density and entropy, priors, closed-form KL.
#include <optional>

#include "pybind.hpp"
#include "vigrad/kernels.hpp"
#include "vigrad/parallel.hpp"

namespace vigrad::bind {

namespace {

template <class Real>
carray<Real> run_transform(core::Transform t, carray<Real> x, int workers) {
  check_workers(workers);
  carray<Real> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const std::int64_t n = x.size();
  const Real* xp = x.data();
  Real* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    core::kernels<Real>().transform(t, xp, n, yp, workers);
  }
  return y;
}

template <class Real>
carray<Real> log_prob_rows(const core::PriorArgs<Real>& prior, const carray<Real>& w, int workers) {
  const std::int64_t S = w.shape(0), D = w.shape(1);
  carray<Real> out(S);
  std::vector<double> work(static_cast<std::size_t>(S * core::num_blocks(D)));
  const Real* wp = w.data();
  Real* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    core::kernels<Real>().prior_log_prob(prior, wp, S, D, o, work.data(), workers);
  }
  return out;
}

template <class Real>
carray<Real> grad_rows(const core::PriorArgs<Real>& prior, const carray<Real>& w, int workers) {
  const std::int64_t S = w.shape(0), D = w.shape(1);
  carray<Real> out({S, D});
  const Real* wp = w.data();
  Real* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    core::kernels<Real>().prior_grad_log_prob(prior, wp, S, D, o, workers);
  }
  return out;
}

template <class Real>
void def_dists(py::module_& m) {
  m.def("softplus", [](carray<Real> x, int w) { return run_transform<Real>(core::Transform::kSoftplus, x, w); },
        py::arg("x").noconvert(), py::arg("workers"), "softplus(x) = log(1 + exp(x)), stable.");
  m.def("softplus_inv",
        [](carray<Real> y, int w) { return run_transform<Real>(core::Transform::kSoftplusInv, y, w); },
        py::arg("y").noconvert(), py::arg("workers"), "Inverse softplus, y > 0.");
  m.def("sigmoid", [](carray<Real> x, int w) { return run_transform<Real>(core::Transform::kSigmoid, x, w); },
        py::arg("x").noconvert(), py::arg("workers"), "Logistic sigmoid, stable.");

  m.def(
      "mf_log_prob",
      [](carray<Real> loc, carray<Real> scale, carray<Real> w, int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        require_shape(scale, {D}, "scale", "(D,) like loc");
        require_ndim(w, 2, "w");
        const std::int64_t S = w.shape(0);
        require_shape(w, {S, D}, "w", "(S, D) with D = loc.size");
        check_workers(workers);
        carray<Real> out(S);
        const std::int64_t nb = core::num_blocks(D);
        std::vector<double> work(static_cast<std::size_t>(std::max<std::int64_t>(S, 1) * nb));
        const Real *l = loc.data(), *sc = scale.data(), *wp = w.data();
        Real* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          core::kernels<Real>().mf_log_prob(l, sc, wp, S, D, o, work.data(), workers);
        }
        return out;
      },
      py::arg("loc").noconvert(), py::arg("scale").noconvert(), py::arg("w").noconvert(), py::arg("workers"),
      "log q(w[s]) summed over the event, (S, D) -> (S,).");
  m.def(
      "mf_entropy",
      [](carray<Real> scale, int workers) {
        require_ndim(scale, 1, "scale");
        check_workers(workers);
        const std::int64_t D = scale.shape(0);
        std::vector<double> work(static_cast<std::size_t>(core::num_blocks(D)));
        const Real* sc = scale.data();
        py::gil_scoped_release release;
        return core::kernels<Real>().mf_entropy(sc, D, work.data(), workers);
      },
      py::arg("scale").noconvert(), py::arg("workers"), "Entropy of the mean-field Gaussian, summed over the event.");

  m.def(
      "normal_log_prob",
      [](carray<Real> w, carray<Real> loc, carray<Real> scale, int workers) {
        require_ndim(w, 2, "w");
        check_workers(workers);
        return log_prob_rows<Real>(normal_prior(loc, scale, w.shape(1)), w, workers);
      },
      py::arg("w").noconvert(), py::arg("loc").noconvert(), py::arg("scale").noconvert(), py::arg("workers"),
      "log N(w | loc, scale^2) summed over each row of w (S, D).");
  m.def(
      "normal_grad_log_prob",
      [](carray<Real> w, carray<Real> loc, carray<Real> scale, int workers) {
        require_ndim(w, 2, "w");
        check_workers(workers);
        return grad_rows<Real>(normal_prior(loc, scale, w.shape(1)), w, workers);
      },
      py::arg("w").noconvert(), py::arg("loc").noconvert(), py::arg("scale").noconvert(), py::arg("workers"),
      "d log N(w | loc, scale^2) / dw, elementwise over (S, D).");
  m.def(
      "mixture_log_prob",
      [](carray<Real> w, carray<Real> pi, carray<Real> s1, carray<Real> s2, int workers) {
        require_ndim(w, 2, "w");
        check_workers(workers);
        return log_prob_rows<Real>(mixture_prior(pi, s1, s2, w.shape(1)), w, workers);
      },
      py::arg("w").noconvert(), py::arg("pi").noconvert(), py::arg("sigma1").noconvert(),
      py::arg("sigma2").noconvert(), py::arg("workers"),
      "log of the scale-mixture prior summed over each row of w (S, D).");
  m.def(
      "mixture_grad_log_prob",
      [](carray<Real> w, carray<Real> pi, carray<Real> s1, carray<Real> s2, int workers) {
        require_ndim(w, 2, "w");
        check_workers(workers);
        return grad_rows<Real>(mixture_prior(pi, s1, s2, w.shape(1)), w, workers);
      },
      py::arg("w").noconvert(), py::arg("pi").noconvert(), py::arg("sigma1").noconvert(),
      py::arg("sigma2").noconvert(), py::arg("workers"), "d log p / dw of the scale-mixture prior over (S, D).");

  m.def(
      "kl_mf_normal",
      [](carray<Real> loc, carray<Real> rho, carray<Real> prior_loc, carray<Real> prior_scale, double kl_weight,
         int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        require_shape(rho, {D}, "rho", "(D,) like loc");
        check_workers(workers);
        carray<Real> gl(D), gr(D);
        std::vector<double> work(static_cast<std::size_t>(core::num_blocks(D)));
        const Real *l = loc.data(), *r = rho.data();
        Real *glp = gl.mutable_data(), *grp = gr.mutable_data();
        const core::PriorArgs<Real> p = normal_prior(prior_loc, prior_scale, D);
        double kl;
        {
          py::gil_scoped_release release;
          kl = core::kernels<Real>().kl_normal(p, l, r, D, kl_weight, glp, grp, work.data(), workers);
        }
        return py::make_tuple(kl, gl, gr);
      },
      py::arg("loc").noconvert(), py::arg("rho").noconvert(), py::arg("prior_loc").noconvert(),
      py::arg("prior_scale").noconvert(), py::arg("kl_weight"), py::arg("workers"),
      "(KL[q || N(prior_loc, prior_scale^2)], kl_weight * dKL/dloc, kl_weight * dKL/drho).");
}

}  // namespace

void bind_distributions(py::module_& m) {
  def_dists<double>(m);
  def_dists<float>(m);
}

}  // namespace vigrad::bind
