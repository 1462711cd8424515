// vigrad._core: the compiled kernels.  One binding file per topic.
#include "pybind.hpp"
#include "vigrad/config.hpp"
#include "vigrad/parallel.hpp"

#ifndef VIGRAD_CXX_FLAGS
#define VIGRAD_CXX_FLAGS ""
#endif
#ifndef VIGRAD_BUILD_TYPE
#define VIGRAD_BUILD_TYPE ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "vigrad's C++ kernels (header-only core in cpp/include/vigrad).";
  vigrad::bind::bind_rng(m);
  vigrad::bind::bind_distributions(m);
  vigrad::bind::bind_gradients(m);
  vigrad::bind::bind_families(m);
  vigrad::bind::bind_bbb(m);
  vigrad::bind::bind_blas(m);
  vigrad::bind::bind_optim(m);

  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["flags"] = VIGRAD_CXX_FLAGS;
  info["build_type"] = VIGRAD_BUILD_TYPE;
  info["instruction_set"] = vigrad::core::instruction_set();
  info["openmp"] = vigrad::core::built_with_openmp();
  info["libmvec"] = static_cast<bool>(VIGRAD_LIBMVEC);
#ifdef VIGRAD_NATIVE_BUILD
  info["native"] = true;
#else
  info["native"] = false;
#endif
  m.attr("build_info") = info;
  m.attr("has_openmp") = vigrad::core::built_with_openmp();
  m.def("max_threads", &vigrad::core::max_threads, "Number of processors OpenMP sees (1 without OpenMP).");
}
