// vigrad._core: the compiled kernels.  One binding file per topic.
#include <cstdlib>

#include "dispatch.hpp"
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
  // The kernel table first: no binding may run before it is set.  A bad VIGRAD_ISA fails the
  // import with the reason (ImportError from pybind11's module init).
  const vigrad::core::KernelTable& table = vigrad::core::select_table(std::getenv("VIGRAD_ISA"));
  vigrad::core::active_table = &table;
  vigrad::bind::bind_rng(m);
  vigrad::bind::bind_distributions(m);
  vigrad::bind::bind_gradients(m);
  vigrad::bind::bind_families(m);
  vigrad::bind::bind_bbb(m);
  vigrad::bind::bind_blas(m);

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
  // "isa": the level the kernels run on; "isa_available": the levels built in, lowest first;
  // "isa_supported": those this CPU runs; "instruction_set": what the running level was compiled for.
  info["isa"] = table.level;
  info["isa_available"] = vigrad::core::built_levels();
  info["isa_supported"] = vigrad::core::supported_levels();
  info["instruction_set"] = table.compiled_for;
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
