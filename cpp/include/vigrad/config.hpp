// vigrad core configuration: vector math declarations, build facts.
//
// gcc vectorises calls to log/exp/cos/log1p through glibc's libmvec only when the
// functions carry an `omp declare simd` declaration and the build uses
// -fno-math-errno (never -ffast-math).  glibc's own <math.h> declares them only
// under __FAST_MATH__, so we add the declarations here; with -fopenmp-simd they
// cost nothing at run time and work without the OpenMP runtime.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.hpp"

// Every kernel header puts its code in an inline namespace named after the instruction-set
// level its translation unit is compiled for (VIGRAD_ISA_NS, set by CMake per kernel object;
// `baseline` elsewhere).  So the same inline function compiled for AVX-512 and for SSE2 has two
// different symbols, and the linker can never hand an AVX-512 copy to baseline code (the
// classic failure of per-file -m flags in C++: one merged COMDAT copy, SIGILL on older CPUs).
// CMake checks the kernel objects for weak symbols outside their own namespace after linking.
#ifndef VIGRAD_ISA_NS
#define VIGRAD_ISA_NS baseline
#endif
#define VIGRAD_ISA_BEGIN inline namespace VIGRAD_ISA_NS {
#define VIGRAD_ISA_END }

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(VIGRAD_NO_LIBMVEC)
extern "C" {
#pragma omp declare simd notinbranch
double log(double) noexcept;
#pragma omp declare simd notinbranch
double exp(double) noexcept;
#pragma omp declare simd notinbranch
double cos(double) noexcept;
#pragma omp declare simd notinbranch
float logf(float) noexcept;
#pragma omp declare simd notinbranch
float expf(float) noexcept;
#pragma omp declare simd notinbranch
float cosf(float) noexcept;
// log1p and expm1 have vector variants from glibc 2.35 on (log, exp, cos from 2.22): a wheel
// built against an older glibc (manylinux_2_28) must not call symbols its users' libmvec lacks.
#if __GLIBC_PREREQ(2, 35)
#pragma omp declare simd notinbranch
double log1p(double) noexcept;
#pragma omp declare simd notinbranch
double expm1(double) noexcept;
#pragma omp declare simd notinbranch
float log1pf(float) noexcept;
#pragma omp declare simd notinbranch
float expm1f(float) noexcept;
#endif
}
#define VIGRAD_LIBMVEC 1
#elif defined(VIGRAD_CLANG_VECLIB)
// clang reaches libmvec through -fveclib=libmvec (set by CMake where it is available)
#define VIGRAD_LIBMVEC 1
#else
#define VIGRAD_LIBMVEC 0
#endif

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// The widest x86 vector instruction set this translation unit was compiled for.
inline const char* instruction_set() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__SSE2__)
  return "sse2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "generic";
#endif
}

inline bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

VIGRAD_ISA_END
}  // namespace vigrad::core
