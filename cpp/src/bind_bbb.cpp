// Bindings: Bayes-by-Backprop layer passes and the fused Adam step.
#include <cmath>
#include <string>

#include "pybind.hpp"
#include "vigrad/kernels.hpp"
#include "vigrad/parallel.hpp"

namespace vigrad::bind {

namespace {

core::DataGrad parse_data(const std::string& s) {
  if (s == "reparam") return core::DataGrad::kReparam;
  if (s == "times_eps") return core::DataGrad::kTimesEps;
  if (s == "direct") return core::DataGrad::kDirect;
  throw py::value_error("data must be 'reparam', 'times_eps' or 'direct', got '" + s + "'");
}

core::KLPart parse_kl(const std::string& s) {
  if (s == "none") return core::KLPart::kNone;
  if (s == "mc") return core::KLPart::kMC;
  if (s == "analytic") return core::KLPart::kAnalytic;
  throw py::value_error("kl must be 'none', 'mc' or 'analytic', got '" + s + "'");
}

// The output arrays: given (both or neither; (D,), writeable, not overlapping an input or each
// other), allocated here, or (with a fused Adam step and none given) not formed.
template <class Real>
struct GradOut {
  std::optional<carray<Real>> loc, rho;
  bool accumulate;
  bool want_kl;
  std::optional<py::tuple> adam_state;  // (m_loc, v_loc, m_rho, v_rho)
  std::optional<py::tuple> adam;        // (step, lr, b1, b2, eps)
};

// The fused Adam step's arrays and constants, checked; loc and rho are updated in place.
template <class Real>
core::AdamArgs<Real> adam_target(const GradOut<Real>& out, const carray<Real>& loc, const carray<Real>& rho,
                                   const carray<Real>& A, const std::optional<carray<Real>>& BC) {
  if (out.adam_state.has_value() != out.adam.has_value())
    throw py::value_error("adam_state and adam must be given together");
  if (out.accumulate) throw py::value_error("accumulate=True cannot be combined with a fused Adam step");
  if (out.adam_state->size() != 4)
    throw py::value_error("adam_state must be (m_loc, v_loc, m_rho, v_rho), got " +
                          std::to_string(out.adam_state->size()) + " items");
  if (out.adam->size() != 5)
    throw py::value_error("adam must be (step, lr, b1, b2, eps), got " + std::to_string(out.adam->size()) + " items");
  const std::int64_t D = loc.shape(0);
  const char* names[] = {"adam_state[0] (m_loc)", "adam_state[1] (v_loc)", "adam_state[2] (m_rho)",
                         "adam_state[3] (v_rho)"};
  std::vector<carray<Real>> st;
  for (int i = 0; i < 4; ++i) {
    py::handle h = (*out.adam_state)[i];
    if (!py::isinstance<carray<Real>>(h))
      throw py::type_error(std::string(names[i]) + " must be a C-contiguous array of the parameters' dtype");
    st.push_back(py::reinterpret_borrow<carray<Real>>(h));
    require_shape(st.back(), {D}, names[i], "(D,) like loc");
    if (!st.back().writeable()) throw py::value_error(std::string(names[i]) + " must be writeable");
  }
  // the arrays the step writes must not overlap each other or anything the pass reads: a block
  // would read another block's updated values, and the result would depend on the thread count
  const py::array* written[] = {&loc, &rho, &st[0], &st[1], &st[2], &st[3]};
  for (int i = 0; i < 6; ++i)
    for (int j = i + 1; j < 6; ++j)
      if (overlaps(*written[i], *written[j]))
        throw py::value_error("loc, rho and adam_state's arrays must not overlap");
  std::vector<std::pair<const char*, const py::array*>> others{{"A", &A}};
  if (BC) others.emplace_back("B_or_C", &*BC);
  if (out.loc) others.emplace_back("out_loc", &*out.loc);
  if (out.rho) others.emplace_back("out_rho", &*out.rho);
  for (const auto& [name, o] : others)
    for (const py::array* w : written)
      if (overlaps(*o, *w))
        throw py::value_error(std::string(name) + " must not overlap loc, rho or adam_state's arrays");
  if (!loc.writeable() || !rho.writeable()) throw py::value_error("a fused Adam step needs writeable loc and rho");
  const auto& a = *out.adam;
  if (!py::isinstance<py::int_>(a[0]) || py::isinstance<py::bool_>(a[0]))
    throw py::type_error("adam step must be an int, got " + std::string(py::str(py::type::of(a[0]).attr("__name__"))));
  const auto step = py::cast<std::int64_t>(a[0]);
  if (step < 0) throw py::value_error("adam step must be >= 0, got " + std::to_string(step));
  double h[4];
  const char* hn[] = {"lr", "b1", "b2", "eps"};
  for (int i = 0; i < 4; ++i) {
    py::handle v = a[i + 1];
    if (!py::isinstance<py::float_>(v) && !py::isinstance<py::int_>(v))
      throw py::type_error(std::string("adam ") + hn[i] + " must be a real number");
    h[i] = py::cast<double>(v);
  }
  if (!(std::isfinite(h[0]) && h[0] >= 0.0))
    throw py::value_error("adam lr must be finite and >= 0, got " + std::to_string(h[0]));
  for (int i = 1; i < 3; ++i)
    if (!(h[i] >= 0.0 && h[i] < 1.0))
      throw py::value_error(std::string("adam ") + hn[i] + " must be in [0, 1), got " + std::to_string(h[i]));
  if (!(std::isfinite(h[3]) && h[3] > 0.0))
    throw py::value_error("adam eps must be finite and > 0, got " + std::to_string(h[3]));
  carray<Real> lw = loc, rw = rho;  // handles, for mutable_data
  return core::AdamArgs<Real>{lw.mutable_data(),    rw.mutable_data(),    st[0].mutable_data(),
                              st[1].mutable_data(), st[2].mutable_data(), st[3].mutable_data(),
                              step,                 h[0],                 h[1],
                              h[2],                 h[3]};
}

template <class Real>
py::tuple run_grad(const std::string& data, const std::string& kl, std::uint64_t key, const carray<Real>& loc,
                   const carray<Real>& rho, const carray<Real>& A, const std::optional<carray<Real>>& BC,
                   const core::PriorArgs<Real>& prior, double kw, int workers, const GradOut<Real>& out) {
  const std::int64_t D = loc.shape(0);
  const core::DataGrad dg = parse_data(data);
  const core::KLPart kp = parse_kl(kl);
  if (dg != core::DataGrad::kReparam) {
    if (!BC) throw py::value_error("data='" + data + "' needs the second gradient array");
    require_shape(*BC, {D}, "B_or_C", "(D,) like loc");
  }
  if (out.loc.has_value() != out.rho.has_value())
    throw py::value_error("out_loc and out_rho must be given together");
  if (out.accumulate && !out.loc) throw py::value_error("accumulate=True needs out_loc and out_rho");
  carray<Real> gl, gr;
  if (out.loc) {
    gl = *out.loc;
    gr = *out.rho;
    require_shape(gl, {D}, "out_loc", "(D,) like loc");
    require_shape(gr, {D}, "out_rho", "(D,) like loc");
    if (!gl.writeable() || !gr.writeable()) throw py::value_error("out_loc and out_rho must be writeable");
    if (overlaps(gl, gr)) throw py::value_error("out_loc and out_rho must not overlap");
    const std::pair<const char*, const py::array*> ins[] = {
        {"loc", &loc}, {"rho", &rho}, {"A", &A}, {"B_or_C", BC ? &*BC : nullptr}};
    for (const auto& [name, in] : ins)
      if (in && (overlaps(gl, *in) || overlaps(gr, *in)))
        throw py::value_error(std::string("out_loc and out_rho must not overlap ") + name);
  } else if (!out.adam) {
    gl = carray<Real>(D);
    gr = carray<Real>(D);
  }
  std::optional<core::AdamArgs<Real>> adam;
  if (out.adam || out.adam_state) adam = adam_target(out, loc, rho, A, BC);
  std::vector<double> work(static_cast<std::size_t>(core::num_blocks(D)));
  const Real *l = loc.data(), *r = rho.data(), *a = A.data(), *bc = BC ? BC->data() : nullptr;
  const bool have_out = out.loc || !adam;
  Real *glp = have_out ? gl.mutable_data() : nullptr, *grp = have_out ? gr.mutable_data() : nullptr;
  const core::AdamArgs<Real>* adam_p = adam ? &*adam : nullptr;
  bool finite = true;
  double klv = 0.0;
  {
    py::gil_scoped_release release;
    klv = core::kernels<Real>().bbb_grad(dg, kp, out.want_kl, prior, key, l, r, a, bc, D, kw, glp, grp, out.accumulate,
                                         work.data(), &finite, workers, adam_p);
  }
  if (!have_out) return py::make_tuple(py::none(), py::none(), klv, finite);
  return py::make_tuple(gl, gr, klv, finite);
}

// bbb_noise_kl: the run-time use / kl strings to template arguments.
template <class Real>
double run_noise_kl(const std::string& use, const std::string& kl, std::uint64_t key, const carray<Real>& loc,
                    const carray<Real>& rho, std::optional<carray<Real>>& out, const core::PriorArgs<Real>& prior,
                    int workers) {
  require_ndim(loc, 1, "loc");
  const std::int64_t D = loc.shape(0);
  require_shape(rho, {D}, "rho", "(D,) like loc");
  check_workers(workers);
  const core::KLPart kp = parse_kl(kl);
  core::NoiseUse u;
  if (use == "weights") u = core::NoiseUse::kWeights;
  else if (use == "perturbation") u = core::NoiseUse::kPerturbation;
  else if (use == "none") u = core::NoiseUse::kNone;
  else throw py::value_error("use must be 'weights', 'perturbation' or 'none', got '" + use + "'");
  Real* o = nullptr;
  if (u != core::NoiseUse::kNone) {
    if (!out) throw py::value_error("use='" + use + "' needs the out array");
    require_shape(*out, {D}, "out", "(D,) like loc");
    if (overlaps(*out, loc) || overlaps(*out, rho)) throw py::value_error("out must not overlap loc or rho");
    o = out->mutable_data();
  }
  if (kp == core::KLPart::kAnalytic && prior.kind != core::PriorKind::kNormal) throw py::value_error("kl='analytic' needs a Normal prior; use 'mc'");
  std::vector<double> work(static_cast<std::size_t>(core::num_blocks(D)));
  const Real *l = loc.data(), *r = rho.data();
  py::gil_scoped_release release;
  return core::kernels<Real>().bbb_noise_kl(u, kp, prior, key, l, r, D, o, work.data(), workers);
}

template <class Real>
void check_lr(const carray<Real>& loc, const carray<Real>& rho, const carray<Real>& A) {
  require_ndim(loc, 1, "loc");
  const std::int64_t D = loc.shape(0);
  require_shape(rho, {D}, "rho", "(D,) like loc");
  require_shape(A, {D}, "A", "(D,) like loc");
}

// The keyword options of bbb_grad_normal / bbb_grad_mixture, for both docstrings.
constexpr const char* kGradOptionsDoc =
    "With out_loc / out_rho the gradients go there (added to them with accumulate=True); with\n"
    "compute_kl=False the KL value is not formed (returned as 0.0; bbb_noise_kl gives it).  With\n"
    "adam_state=(m_loc, v_loc, m_rho, v_rho) and adam=(step, lr, b1, b2, eps) the gradients also take an\n"
    "Adam step on loc and rho in the same pass (blocks with non-finite gradients are left alone); the\n"
    "gradients are then returned only into out_loc / out_rho, else as None.";

template <class Real>
void def_bbb(py::module_& m) {
  m.def(
      "bbb_noise",
      [](const std::string& use, std::uint64_t key, carray<Real> loc, carray<Real> rho, carray<Real> out, int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        require_shape(rho, {D}, "rho", "(D,) like loc");
        require_shape(out, {D}, "out", "(D,) like loc");
        check_workers(workers);
        const bool weights = use == "weights";
        if (!weights && use != "perturbation")
          throw py::value_error("use must be 'weights' or 'perturbation', got '" + use + "'");
        const Real *l = loc.data(), *r = rho.data();
        Real* o = out.mutable_data();
        const core::NoiseUse u = weights ? core::NoiseUse::kWeights : core::NoiseUse::kPerturbation;
        py::gil_scoped_release release;
        core::kernels<Real>().bbb_noise_kl(u, core::KLPart::kNone, flat_prior<Real>(), key, l, r, D, o, nullptr,
                                           workers);
      },
      py::arg("use"), py::arg("key"), py::arg("loc").noconvert(), py::arg("rho").noconvert(),
      py::arg("out").noconvert(), py::arg("workers"),
      "out = loc + softplus(rho) eps ('weights') or softplus(rho) eps ('perturbation'), eps = draws (key, 0, j).");
  m.def(
      "bbb_noise_kl_normal",
      [](const std::string& use, const std::string& kl, std::uint64_t key, carray<Real> loc, carray<Real> rho,
         std::optional<carray<Real>> out, carray<Real> pm, carray<Real> ps, int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        return run_noise_kl(use, kl, key, loc, rho, out, normal_prior(pm, ps, D), workers);
      },
      py::arg("use"), py::arg("kl"), py::arg("key"), py::arg("loc").noconvert(), py::arg("rho").noconvert(),
      py::arg("out").noconvert(), py::arg("prior_loc").noconvert(), py::arg("prior_scale").noconvert(),
      py::arg("workers"),
      "bbb_noise (use 'weights', 'perturbation', or 'none': out may be None) and the layer's KL value\n"
      "(kl 'none', 'mc' or 'analytic', Normal prior) in one pass: the KL bbb_grad_normal returns for the key.");
  m.def(
      "bbb_noise_kl_mixture",
      [](const std::string& use, const std::string& kl, std::uint64_t key, carray<Real> loc, carray<Real> rho,
         std::optional<carray<Real>> out, carray<Real> pi, carray<Real> s1, carray<Real> s2, int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        return run_noise_kl(use, kl, key, loc, rho, out, mixture_prior(pi, s1, s2, D), workers);
      },
      py::arg("use"), py::arg("kl"), py::arg("key"), py::arg("loc").noconvert(), py::arg("rho").noconvert(),
      py::arg("out").noconvert(), py::arg("pi").noconvert(), py::arg("sigma1").noconvert(),
      py::arg("sigma2").noconvert(), py::arg("workers"),
      "bbb_noise and the layer's KL value (kl 'none' or 'mc') in one pass, scale-mixture prior: the KL\n"
      "bbb_grad_mixture returns for the key.");
  m.def(
      "bbb_grad_normal",
      [](const std::string& data, const std::string& kl, std::uint64_t key, carray<Real> loc, carray<Real> rho,
         carray<Real> A, std::optional<carray<Real>> BC, carray<Real> pm, carray<Real> ps, double kw, int workers,
         std::optional<carray<Real>> out_loc, std::optional<carray<Real>> out_rho, bool accumulate,
         bool compute_kl, std::optional<py::tuple> adam_state, std::optional<py::tuple> adam) {
        check_lr(loc, rho, A);
        check_workers(workers);
        const std::int64_t D = loc.shape(0);
        const core::PriorArgs<Real> prior = normal_prior(pm, ps, D);
        const GradOut<Real> out{out_loc, out_rho, accumulate, compute_kl, adam_state, adam};
        return run_grad(data, kl, key, loc, rho, A, BC, prior, kw, workers, out);
      },
      py::arg("data"), py::arg("kl"), py::arg("key"), py::arg("loc").noconvert(), py::arg("rho").noconvert(),
      py::arg("A").noconvert(), py::arg("B_or_C").noconvert(), py::arg("prior_loc").noconvert(),
      py::arg("prior_scale").noconvert(), py::arg("kl_weight"), py::arg("workers"), py::kw_only(),
      py::arg("out_loc").noconvert() = py::none(), py::arg("out_rho").noconvert() = py::none(),
      py::arg("accumulate") = false, py::arg("compute_kl") = true, py::arg("adam_state") = py::none(),
      py::arg("adam") = py::none(),
      (std::string("Fused backward pass of a Bayes-by-Backprop layer, Normal prior: (grad_loc, grad_rho, kl, "
                   "finite).\n") + kGradOptionsDoc).c_str());
  m.def(
      "bbb_grad_mixture",
      [](const std::string& data, const std::string& kl, std::uint64_t key, carray<Real> loc, carray<Real> rho,
         carray<Real> A, std::optional<carray<Real>> BC, carray<Real> pi, carray<Real> s1, carray<Real> s2, double kw,
         int workers, std::optional<carray<Real>> out_loc, std::optional<carray<Real>> out_rho, bool accumulate,
         bool compute_kl, std::optional<py::tuple> adam_state, std::optional<py::tuple> adam) {
        check_lr(loc, rho, A);
        check_workers(workers);
        if (kl == "analytic") throw py::value_error("kl='analytic' needs a Normal prior; use 'mc'");
        const std::int64_t D = loc.shape(0);
        const core::PriorArgs<Real> prior = mixture_prior(pi, s1, s2, D);
        const GradOut<Real> out{out_loc, out_rho, accumulate, compute_kl, adam_state, adam};
        return run_grad(data, kl, key, loc, rho, A, BC, prior, kw, workers, out);
      },
      py::arg("data"), py::arg("kl"), py::arg("key"), py::arg("loc").noconvert(), py::arg("rho").noconvert(),
      py::arg("A").noconvert(), py::arg("B_or_C").noconvert(), py::arg("pi").noconvert(), py::arg("sigma1").noconvert(),
      py::arg("sigma2").noconvert(), py::arg("kl_weight"), py::arg("workers"), py::kw_only(),
      py::arg("out_loc").noconvert() = py::none(), py::arg("out_rho").noconvert() = py::none(),
      py::arg("accumulate") = false, py::arg("compute_kl") = true, py::arg("adam_state") = py::none(),
      py::arg("adam") = py::none(),
      (std::string("Fused backward pass of a Bayes-by-Backprop layer, scale-mixture prior: (grad_loc, grad_rho, "
                   "kl, finite).\n") + kGradOptionsDoc).c_str());
  m.def(
      "adam_update",
      [](carray<Real> p, carray<Real> g, carray<Real> mm, carray<Real> v, std::int64_t step, double lr, double b1,
         double b2, double eps, int workers) {
        require_ndim(p, 1, "params");
        const std::int64_t n = p.shape(0);
        require_shape(g, {n}, "grads", "(n,) like params");
        require_shape(mm, {n}, "m", "(n,) like params");
        require_shape(v, {n}, "v", "(n,) like params");
        check_workers(workers);
        Real *pp = p.mutable_data(), *mp = mm.mutable_data(), *vp = v.mutable_data();
        const Real* gp = g.data();
        py::gil_scoped_release release;
        core::kernels<Real>().adam_update(pp, gp, mp, vp, n, step, lr, b1, b2, eps, workers);
      },
      py::arg("params").noconvert(), py::arg("grads").noconvert(), py::arg("m").noconvert(), py::arg("v").noconvert(),
      py::arg("step"), py::arg("lr"), py::arg("b1"), py::arg("b2"), py::arg("eps"), py::arg("workers"),
      "One Adam step in place on flat arrays (params, m, v are updated).");
}

}  // namespace

void bind_bbb(py::module_& m) {
  def_bbb<double>(m);
  def_bbb<float>(m);
}

}  // namespace vigrad::bind
