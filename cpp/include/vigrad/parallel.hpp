// Deterministic parallel helpers.
//
// Work is cut into blocks whose boundaries depend only on the problem size, never
// on the thread count; reductions are summed per block with a fixed lane structure
// and combined in block order.  So every result is bit-identical for any number of
// workers (STYLE.md: never `reduction(+:)`).
#pragma once

#include <cstdint>

#include "config.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace vigrad::core {
VIGRAD_ISA_BEGIN

// Elements per block.  Small enough that a block's scratch arrays live on the
// stack and in L1/L2, large enough that scheduling costs nothing.
inline constexpr std::int64_t kBlock = 1024;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_num_procs();
#else
  return 1;
#endif
}

// Run f(b) for b in [0, nblocks).  Threads only decide who runs a block, never
// what a block computes.
template <class F>
inline void parallel_for_blocks(std::int64_t nblocks, int workers, F&& f) {
#ifdef _OPENMP
  if (workers > 1 && nblocks > 1) {
    const int nt = static_cast<int>(workers < nblocks ? workers : nblocks);
    // dynamic: a thread that gets the CPU takes the blocks of one that does not
#pragma omp parallel for num_threads(nt) schedule(dynamic)
    for (std::int64_t b = 0; b < nblocks; ++b) f(b);
    return;
  }
#else
  (void)workers;
#endif
  for (std::int64_t b = 0; b < nblocks; ++b) f(b);
}

// Below this much work (roughly, flops; ~1 ms on one core) a call runs on one thread:
// starting an OpenMP team costs microseconds on an idle machine, but when another
// process holds a core the team waits at its barrier for a thread the OS has not
// scheduled, up to a time slice.  Measured: a 64-128-10 Bayes-by-Backprop step took
// 10 ms with 2-thread teams on a loaded 2-core machine, 0.74 ms on one thread.
// The result does not change: blocks, not threads, decide what is computed.
inline constexpr std::int64_t kMinParallelWork = std::int64_t(1) << 21;

inline int workers_for(std::int64_t work, int workers) { return work < kMinParallelWork ? 1 : workers; }

inline std::int64_t num_blocks(std::int64_t n, std::int64_t block = kBlock) {
  return (n + block - 1) / block;
}

// Sum of v[0..n) in double, in a fixed order: eight lane accumulators, then a
// pairwise combination.  The order depends on n only.
template <class T>
inline double lane_sum(const T* v, std::int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(v[j + l]);
  for (int l = 0; j < n; ++j, ++l) acc[l] += static_cast<double>(v[j]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// True when every x[0..n) is finite.  x - x is 0 for finite x and NaN otherwise;
// counting the NaNs vectorises, unlike std::isfinite in a short-circuit chain.
template <class T>
inline bool all_finite(const T* x, std::int64_t n) {
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < n; ++i) bad += !(x[i] - x[i] == T(0));
  return bad == 0;
}

VIGRAD_ISA_END
}  // namespace vigrad::core
