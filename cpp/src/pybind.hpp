// Shared pybind11 helpers for vigrad's bindings.
//
// Convention: every array argument is declared `carray<Real>` with .noconvert(),
// so a wrong dtype or a non-C-contiguous array raises TypeError (no silent copy);
// shapes are checked here and raise ValueError.  The GIL is released only after
// every Python object has been read.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "vigrad/kernels.hpp"

namespace vigrad::bind {

namespace py = pybind11;

template <class T>
using carray = py::array_t<T, py::array::c_style>;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

inline void require_ndim(const py::array& a, py::ssize_t ndim, const char* name) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " +
                          shape_str(a));
}

inline void require_shape(const py::array& a, std::vector<py::ssize_t> shape, const char* name,
                          const std::string& what) {
  bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (std::size_t i = 0; same && i < shape.size(); ++i) same = a.shape(i) == shape[i];
  if (!same) throw py::value_error(std::string(name) + " must have shape " + what + ", got " + shape_str(a));
}

// Whether two arrays' memory ranges overlap (an output must not overlap an input).
inline bool overlaps(const py::array& a, const py::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// Prior parameters: 1-D, of size 1 (one value for every element) or D.
inline bool param_is_array(const py::array& a, std::int64_t D, const char* name) {
  require_ndim(a, 1, name);
  if (a.shape(0) == 1) return false;
  if (a.shape(0) == D) return true;
  throw py::value_error(std::string(name) + " must have size 1 or " + std::to_string(D) + ", got " +
                        std::to_string(a.shape(0)));
}

// The priors as the kernels take them, their parameters checked against the event size D.
template <class Real>
core::PriorArgs<Real> normal_prior(const carray<Real>& loc, const carray<Real>& scale, std::int64_t D) {
  const bool a = param_is_array(loc, D, "prior loc");
  if (param_is_array(scale, D, "prior scale") != a)
    throw py::value_error("prior loc and prior scale must both have size 1 or both size D");
  return {core::PriorKind::kNormal, a, loc.data(), scale.data(), nullptr};
}

template <class Real>
core::PriorArgs<Real> mixture_prior(const carray<Real>& pi, const carray<Real>& s1, const carray<Real>& s2,
                                    std::int64_t D) {
  const bool a = param_is_array(pi, D, "pi");
  if (param_is_array(s1, D, "sigma1") != a || param_is_array(s2, D, "sigma2") != a)
    throw py::value_error("pi, sigma1 and sigma2 must all have size 1 or all size D");
  return {core::PriorKind::kMixture, a, pi.data(), s1.data(), s2.data()};
}

template <class Real>
core::PriorArgs<Real> flat_prior() {
  return {core::PriorKind::kFlat, false, nullptr, nullptr, nullptr};
}

struct Dims {
  std::int64_t S, D;
};

// loc, rho (D,); eps and the log-likelihood gradient (S, D) with S >= 1.
template <class Real>
Dims check_pathwise(const carray<Real>& loc, const carray<Real>& rho, const carray<Real>& eps,
                    const carray<Real>& glik) {
  require_ndim(loc, 1, "loc");
  const std::int64_t D = loc.shape(0);
  require_shape(rho, {D}, "rho", "(D,) like loc");
  require_ndim(eps, 2, "eps");
  const std::int64_t S = eps.shape(0);
  require_shape(eps, {S, D}, "eps", "(S, D) with D = loc.size");
  require_shape(glik, {S, D}, "grad_log_lik", "(S, D) like eps");
  if (S < 1) throw py::value_error("eps must hold at least one sample, got S = 0");
  return {S, D};
}

inline int check_workers(int workers) {
  if (workers < 1) throw py::value_error("workers must be >= 1 at this level, got " + std::to_string(workers));
  return workers;
}

void bind_rng(py::module_& m);
void bind_distributions(py::module_& m);
void bind_gradients(py::module_& m);
void bind_families(py::module_& m);
void bind_bbb(py::module_& m);
void bind_blas(py::module_& m);

}  // namespace vigrad::bind
