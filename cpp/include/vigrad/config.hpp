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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
extern "C" {
#pragma omp declare simd notinbranch
double log(double) noexcept;
#pragma omp declare simd notinbranch
double exp(double) noexcept;
#pragma omp declare simd notinbranch
double cos(double) noexcept;
#pragma omp declare simd notinbranch
double log1p(double) noexcept;
#pragma omp declare simd notinbranch
double expm1(double) noexcept;
#pragma omp declare simd notinbranch
float logf(float) noexcept;
#pragma omp declare simd notinbranch
float expf(float) noexcept;
#pragma omp declare simd notinbranch
float cosf(float) noexcept;
#pragma omp declare simd notinbranch
float log1pf(float) noexcept;
#pragma omp declare simd notinbranch
float expm1f(float) noexcept;
}
#define VIGRAD_LIBMVEC 1
#else
#define VIGRAD_LIBMVEC 0
#endif

namespace vigrad::core {

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

}  // namespace vigrad::core
