// Bindings: full-rank and low-rank Gaussian families, and the mean-field kernel with no prior term.
#include <cmath>
#include <optional>
#include <string>

#include "pybind.hpp"
#include "vigrad/kernels.hpp"
#include "vigrad/math.hpp"
#include "vigrad/parallel.hpp"

namespace vigrad::bind {

namespace {

core::KLMode parse_family_mode(const std::string& mode) {
  if (mode == "mc") return core::KLMode::kMC;
  if (mode == "stl") return core::KLMode::kSTL;
  throw py::value_error("mode must be 'mc' or 'stl', got '" + mode + "'");
}

template <class Real>
std::int64_t check_tril(const carray<Real>& L) {
  require_ndim(L, 2, "L");
  const std::int64_t d = L.shape(0);
  if (L.shape(1) != d) throw py::value_error("L must be square (d, d), got " + shape_str(L));
  const Real* p = L.data();
  for (std::int64_t i = 0; i < d; ++i) {
    const Real v = p[i * d + i];
    if (!(v > Real(0)) || !std::isfinite(v))
      throw py::value_error("L must have a positive finite diagonal, got L[" + std::to_string(i) + ", " +
                            std::to_string(i) + "] = " + std::to_string(static_cast<double>(v)));
  }
  return d;
}

template <class Real>
std::vector<Real> transposed(const Real* A, std::int64_t rows, std::int64_t cols) {
  std::vector<Real> T(static_cast<std::size_t>(rows * cols));
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t k = 0; k < cols; ++k) T[k * rows + i] = A[i * cols + k];
  return T;
}

struct LowRankDims {
  std::int64_t d, r;
};

template <class Real>
LowRankDims check_lowrank(const carray<Real>& diag, const carray<Real>& U) {
  require_ndim(diag, 1, "diag");
  const std::int64_t d = diag.shape(0);
  require_ndim(U, 2, "U");
  if (U.shape(0) != d) throw py::value_error("U must have shape (d, r) with d = diag.size, got " + shape_str(U));
  const std::int64_t r = U.shape(1);
  if (r > core::kMaxRank)
    throw py::value_error("rank must be <= " + std::to_string(core::kMaxRank) + ", got " + std::to_string(r));
  const Real* p = diag.data();
  for (std::int64_t i = 0; i < d; ++i)
    if (!(p[i] > Real(0)) || !std::isfinite(p[i]))
      throw py::value_error("diag must be positive and finite, got diag[" + std::to_string(i) +
                            "] = " + std::to_string(static_cast<double>(p[i])));
  return {d, r};
}

// The Woodbury factor of a low-rank covariance, computed with the GIL released.
struct Factor {
  std::vector<double> WT, K;
  double log_det;
};

template <class Real>
Factor make_factor(const Real* diag, const Real* UT, std::int64_t d, std::int64_t r, int workers) {
  Factor f{std::vector<double>(static_cast<std::size_t>(r * d)), std::vector<double>(static_cast<std::size_t>(r * r)), 0.0};
  std::vector<double> work(static_cast<std::size_t>(core::num_blocks(d) * r * r));
  f.log_det = core::kernels<Real>().lowrank_factor(diag, UT, d, r, f.WT.data(), f.K.data(), work.data(), workers);
  return f;
}

template <class Real>
void def_families(py::module_& m) {
  // ------------------------------------------------------------------ mean field, for vg.fit's step
  m.def(
      "mf_scale_entropy",
      [](carray<Real> loc, carray<Real> rho, carray<Real> scale, int workers) {
        require_ndim(loc, 1, "loc");
        const std::int64_t D = loc.shape(0);
        require_shape(rho, {D}, "rho", "(D,) like loc");
        require_shape(scale, {D}, "out_scale", "(D,) like loc");
        if (!scale.writeable()) throw py::value_error("out_scale must be writeable");
        if (overlaps(scale, loc) || overlaps(scale, rho)) throw py::value_error("out_scale must not overlap loc or rho");
        check_workers(workers);
        std::vector<double> work(static_cast<std::size_t>(core::num_blocks(D)));
        const Real *l = loc.data(), *r = rho.data();
        Real* sc = scale.mutable_data();
        bool ok = true;
        double entropy;
        {
          py::gil_scoped_release release;
          entropy = core::kernels<Real>().mf_scale_entropy(l, r, D, sc, work.data(), &ok, workers);
        }
        return py::make_tuple(entropy, ok);
      },
      py::arg("loc").noconvert(), py::arg("rho").noconvert(), py::arg("out_scale").noconvert(), py::arg("workers"),
      "out_scale = softplus(rho) and the entropy of N(loc, diag(out_scale^2)) in one pass: (entropy, ok), ok "
      "False when loc or rho is not finite or a scale is 0; the same bits as softplus and mf_entropy.");
  // ------------------------------------------------------------------ full rank
  m.def(
      "fullrank_sample",
      [](std::uint64_t key, carray<Real> loc, carray<Real> L, carray<Real> z, std::optional<carray<Real>> eps,
         int workers) {
        const std::int64_t d = check_tril(L);
        require_shape(loc, {d}, "loc", "(d,) like L");
        require_ndim(z, 2, "z");
        const std::int64_t S = z.shape(0);
        require_shape(z, {S, d}, "z", "(S, d)");
        if (eps) require_shape(*eps, {S, d}, "eps", "(S, d) like z");
        check_workers(workers);
        std::vector<Real> scratch(eps ? 0 : static_cast<std::size_t>(S * d));
        Real* e = eps ? eps->mutable_data() : scratch.data();
        const Real *l = loc.data(), *Lp = L.data();
        Real* zp = z.mutable_data();
        py::gil_scoped_release release;
        const std::vector<Real> LT = transposed(Lp, d, d);
        const core::Kernels<Real>& k = core::kernels<Real>();
        k.standard_normal(key, S, d, e, workers);
        k.fullrank_affine(l, LT.data(), e, S, d, zp, workers);
      },
      py::arg("key"), py::arg("loc").noconvert(), py::arg("L").noconvert(), py::arg("z").noconvert(),
      py::arg("eps").noconvert(), py::arg("workers"),
      "z[s] = loc + L eps[s], eps the normal draws (key, s, j); eps written when given.");
  m.def(
      "fullrank_affine",
      [](carray<Real> loc, carray<Real> L, carray<Real> eps, int workers) {
        const std::int64_t d = check_tril(L);
        require_shape(loc, {d}, "loc", "(d,) like L");
        require_ndim(eps, 2, "eps");
        const std::int64_t S = eps.shape(0);
        require_shape(eps, {S, d}, "eps", "(S, d)");
        check_workers(workers);
        carray<Real> z({S, d});
        const Real *l = loc.data(), *Lp = L.data(), *e = eps.data();
        Real* zp = z.mutable_data();
        {
          py::gil_scoped_release release;
          const std::vector<Real> LT = transposed(Lp, d, d);
          core::kernels<Real>().fullrank_affine(l, LT.data(), e, S, d, zp, workers);
        }
        return z;
      },
      py::arg("loc").noconvert(), py::arg("L").noconvert(), py::arg("eps").noconvert(), py::arg("workers"),
      "z[s] = loc + L eps[s] for the given noise.");
  m.def(
      "fullrank_log_prob",
      [](carray<Real> loc, carray<Real> L, carray<Real> z, int workers) {
        const std::int64_t d = check_tril(L);
        require_shape(loc, {d}, "loc", "(d,) like L");
        require_ndim(z, 2, "z");
        const std::int64_t S = z.shape(0);
        require_shape(z, {S, d}, "z", "(S, d)");
        check_workers(workers);
        carray<Real> out(S);
        const Real *l = loc.data(), *Lp = L.data(), *zp = z.data();
        Real* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          const std::vector<Real> LT = transposed(Lp, d, d);
          std::vector<Real> u(static_cast<std::size_t>(S * d));
          core::kernels<Real>().fullrank_log_prob(l, Lp, LT.data(), zp, S, d, o, u.data(), workers);
        }
        return out;
      },
      py::arg("loc").noconvert(), py::arg("L").noconvert(), py::arg("z").noconvert(), py::arg("workers"),
      "log N(z[s] | loc, L L^T), (S, d) -> (S,).");
  m.def(
      "fullrank_pathwise_grad",
      [](carray<Real> L, carray<Real> eps, carray<Real> g, const std::string& mode, int workers) {
        const std::int64_t d = check_tril(L);
        require_ndim(eps, 2, "eps");
        const std::int64_t S = eps.shape(0);
        require_shape(eps, {S, d}, "eps", "(S, d) with d = L.shape[0]");
        require_shape(g, {S, d}, "grad_log_p", "(S, d) like eps");
        if (S < 1) throw py::value_error("eps must hold at least one sample, got S = 0");
        const core::KLMode md = parse_family_mode(mode);
        check_workers(workers);
        carray<Real> gl(d), gL({d, d});
        const Real *Lp = L.data(), *e = eps.data(), *gp = g.data();
        Real *glp = gl.mutable_data(), *gLp = gL.mutable_data();
        {
          py::gil_scoped_release release;
          std::vector<Real> a(static_cast<std::size_t>(S * d));
          core::kernels<Real>().fullrank_pathwise_grad(md, Lp, e, gp, S, d, glp, gLp, a.data(), workers);
        }
        return py::make_tuple(gl, gL);
      },
      py::arg("L").noconvert(), py::arg("eps").noconvert(), py::arg("grad_log_p").noconvert(), py::arg("mode"),
      py::arg("workers"),
      "(dF/dloc, dF/dL) for F = E[log q] - E[log p], full-rank family, mode 'mc' or 'stl'.");

  // ------------------------------------------------------------------ low rank
  m.def(
      "lowrank_sample",
      [](std::uint64_t key, carray<Real> loc, carray<Real> diag, carray<Real> U, carray<Real> z,
         std::optional<carray<Real>> eps, int workers) {
        const auto [d, r] = check_lowrank(diag, U);
        require_shape(loc, {d}, "loc", "(d,) like diag");
        require_ndim(z, 2, "z");
        const std::int64_t S = z.shape(0);
        require_shape(z, {S, d}, "z", "(S, d)");
        if (eps) require_shape(*eps, {S, d + r}, "eps", "(S, d + r)");
        check_workers(workers);
        std::vector<Real> scratch(eps ? 0 : static_cast<std::size_t>(S * (d + r)));
        Real* e = eps ? eps->mutable_data() : scratch.data();
        const Real *l = loc.data(), *dg = diag.data(), *Up = U.data();
        Real* zp = z.mutable_data();
        py::gil_scoped_release release;
        const std::vector<Real> UT = transposed(Up, d, r);
        const core::Kernels<Real>& k = core::kernels<Real>();
        k.standard_normal(key, S, d + r, e, workers);
        k.lowrank_affine(l, dg, UT.data(), e, S, d, r, zp, workers);
      },
      py::arg("key"), py::arg("loc").noconvert(), py::arg("diag").noconvert(), py::arg("U").noconvert(),
      py::arg("z").noconvert(), py::arg("eps").noconvert(), py::arg("workers"),
      "z[s] = loc + diag * eps1[s] + U eps2[s]; eps (S, d + r) = the draws (key, s, j), written when given.");
  m.def(
      "lowrank_affine",
      [](carray<Real> loc, carray<Real> diag, carray<Real> U, carray<Real> eps, int workers) {
        const auto [d, r] = check_lowrank(diag, U);
        require_shape(loc, {d}, "loc", "(d,) like diag");
        require_ndim(eps, 2, "eps");
        const std::int64_t S = eps.shape(0);
        require_shape(eps, {S, d + r}, "eps", "(S, d + r)");
        check_workers(workers);
        carray<Real> z({S, d});
        const Real *l = loc.data(), *dg = diag.data(), *Up = U.data(), *e = eps.data();
        Real* zp = z.mutable_data();
        {
          py::gil_scoped_release release;
          const std::vector<Real> UT = transposed(Up, d, r);
          core::kernels<Real>().lowrank_affine(l, dg, UT.data(), e, S, d, r, zp, workers);
        }
        return z;
      },
      py::arg("loc").noconvert(), py::arg("diag").noconvert(), py::arg("U").noconvert(), py::arg("eps").noconvert(),
      py::arg("workers"), "z[s] = loc + diag * eps1[s] + U eps2[s] for the given noise (S, d + r).");
  m.def(
      "lowrank_log_prob",
      [](carray<Real> loc, carray<Real> diag, carray<Real> U, carray<Real> z, int workers) {
        const auto [d, r] = check_lowrank(diag, U);
        require_shape(loc, {d}, "loc", "(d,) like diag");
        require_ndim(z, 2, "z");
        const std::int64_t S = z.shape(0);
        require_shape(z, {S, d}, "z", "(S, d)");
        check_workers(workers);
        carray<Real> out(S);
        const Real *l = loc.data(), *dg = diag.data(), *Up = U.data(), *zp = z.data();
        Real* o = out.mutable_data();
        double log_det;
        {
          py::gil_scoped_release release;
          const std::vector<Real> UT = transposed(Up, d, r);
          const Factor f = make_factor(dg, UT.data(), d, r, workers);
          log_det = f.log_det;
          if (std::isfinite(log_det)) {
            std::vector<Real> res(static_cast<std::size_t>(S * d));
            core::kernels<Real>().lowrank_log_prob(l, dg, f.WT.data(), f.K.data(), f.log_det, zp, S, d, r, o, res.data(),
                                                  workers);
          }
        }
        if (!std::isfinite(log_det)) throw py::value_error("the covariance diag^2 + U U^T is not positive definite");
        return out;
      },
      py::arg("loc").noconvert(), py::arg("diag").noconvert(), py::arg("U").noconvert(), py::arg("z").noconvert(),
      py::arg("workers"), "log N(z[s] | loc, diag^2 + U U^T) by the Woodbury identity, O(S d r + d r^2).");
  m.def(
      "lowrank_entropy",
      [](carray<Real> diag, carray<Real> U, int workers) {
        const auto [d, r] = check_lowrank(diag, U);
        check_workers(workers);
        const Real *dg = diag.data(), *Up = U.data();
        double log_det;
        {
          py::gil_scoped_release release;
          const std::vector<Real> UT = transposed(Up, d, r);
          log_det = make_factor(dg, UT.data(), d, r, workers).log_det;
        }
        if (!std::isfinite(log_det)) throw py::value_error("the covariance diag^2 + U U^T is not positive definite");
        return 0.5 * log_det + static_cast<double>(d) * (core::kHalfLog2Pi<double> + 0.5);
      },
      py::arg("diag").noconvert(), py::arg("U").noconvert(), py::arg("workers"),
      "Entropy of N(., diag^2 + U U^T) by the matrix determinant lemma, O(d r^2).");
  m.def(
      "lowrank_pathwise_grad",
      [](carray<Real> diag, carray<Real> U, carray<Real> eps, carray<Real> g, const std::string& mode, int workers) {
        const auto [d, r] = check_lowrank(diag, U);
        require_ndim(eps, 2, "eps");
        const std::int64_t S = eps.shape(0);
        require_shape(eps, {S, d + r}, "eps", "(S, d + r)");
        require_shape(g, {S, d}, "grad_log_p", "(S, d)");
        if (S < 1) throw py::value_error("eps must hold at least one sample, got S = 0");
        const core::KLMode md = parse_family_mode(mode);
        check_workers(workers);
        carray<Real> gl(d), gd(d), gU({d, r});
        const Real *dg = diag.data(), *Up = U.data(), *e = eps.data(), *gp = g.data();
        Real *glp = gl.mutable_data(), *gdp = gd.mutable_data(), *gUp = gU.mutable_data();
        bool ok;
        {
          py::gil_scoped_release release;
          const std::vector<Real> UT = transposed(Up, d, r);
          const Factor f = make_factor(dg, UT.data(), d, r, workers);
          ok = std::isfinite(f.log_det);
          if (ok) {
            std::vector<Real> a(static_cast<std::size_t>(S * d));
            core::kernels<Real>().lowrank_pathwise_grad(md, dg, UT.data(), f.WT.data(), f.K.data(), e, gp, S, d, r,
                                                        glp, gdp, gUp, a.data(), workers);
          }
        }
        if (!ok) throw py::value_error("the covariance diag^2 + U U^T is not positive definite");
        return py::make_tuple(gl, gd, gU);
      },
      py::arg("diag").noconvert(), py::arg("U").noconvert(), py::arg("eps").noconvert(),
      py::arg("grad_log_p").noconvert(), py::arg("mode"), py::arg("workers"),
      "(dF/dloc, dF/ddiag, dF/dU) for F = E[log q] - E[log p], low-rank family, mode 'mc' or 'stl'.");

  // ------------------------------------------------------------------ mean field, no prior
  m.def(
      "pathwise_grad_flat",
      [](carray<Real> loc, carray<Real> rho, carray<Real> eps, carray<Real> glik, const std::string& mode,
         double kl_weight, int workers) {
        const auto [S, D] = check_pathwise(loc, rho, eps, glik);
        const core::KLMode md = parse_family_mode(mode);
        check_workers(workers);
        carray<Real> gl(D), gr(D);
        std::vector<double> work(static_cast<std::size_t>(core::num_blocks(D)));
        const Real *l = loc.data(), *r = rho.data(), *e = eps.data(), *g = glik.data();
        Real *glp = gl.mutable_data(), *grp = gr.mutable_data();
        bool finite = true;
        double kl;
        {
          py::gil_scoped_release release;
          kl = core::kernels<Real>().pathwise_grad(md, flat_prior<Real>(), l, r, e, g, S, D, kl_weight, glp, grp,
                                                   work.data(), &finite, workers);
        }
        return py::make_tuple(gl, gr, kl, finite);
      },
      py::arg("loc").noconvert(), py::arg("rho").noconvert(), py::arg("eps").noconvert(),
      py::arg("grad_log_lik").noconvert(), py::arg("mode"), py::arg("kl_weight"), py::arg("workers"),
      "Mean-field pathwise gradient of kl_weight * E[log q] - E[log lik] (no prior term): "
      "(grad_loc, grad_rho, E[log q] estimate, finite).");
}

}  // namespace

void bind_families(py::module_& m) {
  def_families<double>(m);
  def_families<float>(m);
}

}  // namespace vigrad::bind
