// Bindings: matrix products on vigrad's own threads, through the BLAS NumPy already loaded.
//
// Why: a Bayes-by-Backprop step alternates BLAS products with vigrad's fused elementwise
// passes.  With NumPy's matmul the products run on OpenBLAS's thread pool, whose threads keep
// spinning after each product, and an OpenMP team on the same cores then waits for a core at
// every barrier (measured on 2 cores: 5.4 ms per step with one vigrad thread, 34 ms with two).
// Here the products run on the same OpenMP team as the elementwise passes, each thread calling
// the single-threaded BLAS (openblas_set_num_threads_local(1)) on fixed row chunks of the
// output, so one pool does everything.
//
// Python finds the functions in the loaded OpenBLAS (vigrad/_blas.py) and registers their
// addresses; nothing is linked at build time.  The row chunks do not depend on the number of
// threads, so the result is bit-identical whatever `workers` is.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "pybind.hpp"
#include "vigrad/parallel.hpp"

namespace vigrad::bind {

namespace {

// CBLAS row-major / no-transpose / transpose codes
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

template <class Int, class Real>
using cblas_gemm_t = void (*)(int, int, int, Int, Int, Int, Real, const Real*, Int, const Real*, Int, Real, Real*,
                              Int);
using set_local_t = int (*)(int);

struct Blas {
  void* sgemm = nullptr;
  void* dgemm = nullptr;
  bool ilp64 = false;
  set_local_t set_threads_local = nullptr;
  std::string name;
};

Blas& blas() {
  static Blas b;
  return b;
}

// Output rows per BLAS call: a function of M only, so which rows go together never depends on
// the thread count (and so neither do the bits).  Each call packs all of op(B) again, so chunks
// must not be small: at most 4 per product, and at least 64 rows (784-400-400-10 at batch 128,
// 2 cores: 3.9 ms per step with 64-row chunks, 4.9 ms with 32, 5.3 ms with one chunk).
inline std::int64_t gemm_chunk_rows(std::int64_t M) {
  const std::int64_t quarter = ((M + 3) / 4 + 15) / 16 * 16;
  return quarter > 64 ? quarter : 64;
}

template <class Int, class Real>
void gemm_rows(void* fn, bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, const Real* A,
               const Real* B, Real beta, Real* C, int workers, set_local_t set_local) {
  auto f = reinterpret_cast<cblas_gemm_t<Int, Real>>(fn);
  const Int lda = static_cast<Int>(ta ? M : K), ldb = static_cast<Int>(tb ? K : N), ldc = static_cast<Int>(N);
  const std::int64_t rows = gemm_chunk_rows(M), nchunks = core::num_blocks(M, rows);
  // each thread runs BLAS single-threaded for the duration, then restores its own setting
  auto chunk = [=](std::int64_t c) {
    const std::int64_t r0 = c * rows, m = std::min(M - r0, rows);
    const Real* a = ta ? A + r0 : A + r0 * K;
    f(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<Int>(m), static_cast<Int>(N),
      static_cast<Int>(K), Real(1), a, lda, B, ldb, beta, C + r0 * N, ldc);
  };
#ifdef _OPENMP
  const int nt = static_cast<int>(std::min<std::int64_t>(workers, nchunks));
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int saved = set_local(1);
#pragma omp for schedule(dynamic)
      for (std::int64_t c = 0; c < nchunks; ++c) chunk(c);
      set_local(saved);
    }
    return;
  }
#else
  (void)workers;
#endif
  const int saved = set_local(1);
  for (std::int64_t c = 0; c < nchunks; ++c) chunk(c);
  set_local(saved);
}

template <class Real>
void def_gemm(py::module_& m) {
  m.def(
      "gemm",
      [](bool trans_a, bool trans_b, carray<Real> A, carray<Real> B, carray<Real> C, double beta, int workers) {
        check_workers(workers);
        const Blas& b = blas();
        void* fn = std::is_same_v<Real, float> ? b.sgemm : b.dgemm;
        if (!fn) throw py::value_error("no BLAS registered with vigrad._core (see vigrad._blas)");
        require_ndim(A, 2, "A");
        require_ndim(B, 2, "B");
        require_ndim(C, 2, "C");
        const std::int64_t M = trans_a ? A.shape(1) : A.shape(0), K = trans_a ? A.shape(0) : A.shape(1);
        const std::int64_t KB = trans_b ? B.shape(1) : B.shape(0), N = trans_b ? B.shape(0) : B.shape(1);
        if (KB != K)
          throw py::value_error("op(A) is " + std::to_string(M) + " x " + std::to_string(K) + " but op(B) is " +
                                std::to_string(KB) + " x " + std::to_string(N));
        require_shape(C, {M, N}, "C", "(M, N) = (" + std::to_string(M) + ", " + std::to_string(N) + ")");
        if (beta != 0.0 && beta != 1.0) throw py::value_error("beta must be 0 or 1, got " + std::to_string(beta));
        if (!C.writeable()) throw py::value_error("C must be writeable");
        if (overlaps(C, A) || overlaps(C, B)) throw py::value_error("C must not overlap A or B");
        const Real *a = A.data(), *bp = B.data();
        Real* c = C.mutable_data();
        if (M == 0 || N == 0) return;
        if (K == 0) {
          if (beta == 0.0) std::fill(c, c + M * N, Real(0));
          return;
        }
        constexpr std::int64_t int_max = 2147483647;
        if (!b.ilp64 && (M > int_max || N > int_max || K > int_max))
          throw py::value_error("the registered BLAS takes 32-bit sizes; a dimension is larger than 2^31 - 1");
        py::gil_scoped_release release;
        if (b.ilp64)
          gemm_rows<std::int64_t, Real>(fn, trans_a, trans_b, M, N, K, a, bp, Real(beta), c, workers,
                                        b.set_threads_local);
        else
          gemm_rows<int, Real>(fn, trans_a, trans_b, M, N, K, a, bp, Real(beta), c, workers, b.set_threads_local);
      },
      py::arg("trans_a"), py::arg("trans_b"), py::arg("A").noconvert(), py::arg("B").noconvert(),
      py::arg("C").noconvert(), py::arg("beta"), py::arg("workers"),
      "C = op(A) op(B) + beta C (beta 0 or 1) with the registered BLAS: up to 4 chunks of rows of C (a\n"
      "function of M only) spread over `workers` OpenMP threads, each running the BLAS single-threaded.");
}

}  // namespace

void bind_blas(py::module_& m) {
  m.def(
      "_register_blas",
      [](std::uintptr_t sgemm, std::uintptr_t dgemm, bool ilp64, std::uintptr_t set_threads_local,
         const std::string& name) {
        if (!sgemm || !dgemm || !set_threads_local)
          throw py::value_error("_register_blas needs three non-null addresses");
        Blas& b = blas();
        b.sgemm = reinterpret_cast<void*>(sgemm);
        b.dgemm = reinterpret_cast<void*>(dgemm);
        b.ilp64 = ilp64;
        b.set_threads_local = reinterpret_cast<set_local_t>(set_threads_local);
        b.name = name;
      },
      py::arg("sgemm"), py::arg("dgemm"), py::arg("ilp64"), py::arg("set_threads_local"), py::arg("name"),
      "Register cblas_sgemm / cblas_dgemm and openblas_set_num_threads_local (addresses) for gemm.");
  m.def("_blas_name", []() { return blas().name; }, "The registered BLAS ('' when none).");
  def_gemm<double>(m);
  def_gemm<float>(m);
}

}  // namespace vigrad::bind
