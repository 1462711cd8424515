// Run-time choice of the kernel table: the best instruction-set level built into this module that
// the CPU (and the operating system, which must save the wider registers) supports, or the one the
// environment variable VIGRAD_ISA names.  Compiled for the baseline, like the bindings.
#include "dispatch.hpp"

#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <immintrin.h>
#include <intrin.h>
#endif

namespace vigrad::core {

const KernelTable* active_table = nullptr;

void invalid_kernel_call(const char* what) { throw std::logic_error(std::string("vigrad internal error: ") + what); }

#ifdef VIGRAD_LEVEL_BASELINE
VIGRAD_DECLARE_TABLE(baseline)
#endif
#ifdef VIGRAD_LEVEL_AVX2
VIGRAD_DECLARE_TABLE(avx2)
#endif
#ifdef VIGRAD_LEVEL_AVX512
VIGRAD_DECLARE_TABLE(avx512)
#endif
#ifdef VIGRAD_LEVEL_NATIVE
VIGRAD_DECLARE_TABLE(native)
#endif

namespace {

struct Level {
  const char* name;
  const KernelTable& (*table)();
  // The CPU features the level's compiler flags assume (x86 names as in /proc/cpuinfo).
  const char* needs;
};

// Lowest first.  A native build has one level: the machine it was built on.
const Level kLevels[] = {
#ifdef VIGRAD_LEVEL_BASELINE
    {"baseline", &kernel_table_baseline, ""},
#endif
#ifdef VIGRAD_LEVEL_AVX2
    {"avx2", &kernel_table_avx2, "avx2 fma"},
#endif
#ifdef VIGRAD_LEVEL_AVX512
    {"avx512", &kernel_table_avx512, "avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl"},
#endif
#ifdef VIGRAD_LEVEL_NATIVE
    {"native", &kernel_table_native, ""},
#endif
};

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#if defined(_MSC_VER) && !defined(__clang__)
// cpuid leaf 1 (ecx) and 7 (ebx) bits, and the register state the OS saves (xgetbv).
bool cpu_has(const std::string& f) {
  int r1[4], r7[4];
  __cpuid(r1, 1);
  __cpuidex(r7, 7, 0);
  const bool osxsave = (r1[2] >> 27) & 1;
  const unsigned long long xcr0 = osxsave ? _xgetbv(0) : 0;
  const bool ymm = (xcr0 & 0x6) == 0x6, zmm = ymm && (xcr0 & 0xe0) == 0xe0;
  auto b7 = [&](int bit) { return ((r7[1] >> bit) & 1) != 0; };
  if (f == "fma") return ymm && ((r1[2] >> 12) & 1);
  if (f == "avx2") return ymm && b7(5);
  if (f == "avx512f") return zmm && b7(16);
  if (f == "avx512dq") return zmm && b7(17);
  if (f == "avx512cd") return zmm && b7(28);
  if (f == "avx512bw") return zmm && b7(30);
  if (f == "avx512vl") return zmm && b7(31);
  return false;
}
#else
// gcc's and clang's cpu model (libgcc / compiler-rt) checks both cpuid and xgetbv.
bool cpu_has(const std::string& f) {
  __builtin_cpu_init();
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512cd") return __builtin_cpu_supports("avx512cd");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  return false;
}
#endif
#else
bool cpu_has(const std::string&) { return false; }
#endif

// The features of `needs` that the CPU lacks, space-separated ("" when it has them all).
std::string missing(const char* needs) {
  std::string out, word;
  const std::string s = std::string(needs) + " ";
  for (char c : s) {
    if (c != ' ') {
      word += c;
      continue;
    }
    if (!word.empty() && !cpu_has(word)) out += (out.empty() ? "" : " ") + word;
    word.clear();
  }
  return out;
}

}  // namespace

std::vector<std::string> built_levels() {
  std::vector<std::string> v;
  for (const Level& l : kLevels) v.emplace_back(l.name);
  return v;
}

std::vector<std::string> supported_levels() {
  std::vector<std::string> v;
  for (const Level& l : kLevels)
    if (missing(l.needs).empty()) v.emplace_back(l.name);
  return v;
}

const KernelTable& select_table(const char* forced) {
  const std::string want = forced ? forced : "";
  if (want.empty() || want == "auto" || want == "best") {
    const Level* best = nullptr;
    for (const Level& l : kLevels)
      if (missing(l.needs).empty()) best = &l;
    if (!best) throw std::runtime_error("vigrad: no kernel level built into this module runs on this CPU");
    return best->table();
  }
  std::string names;
  for (const Level& l : kLevels) {
    names += (names.empty() ? "'" : ", '") + std::string(l.name) + "'";
    if (want != l.name) continue;
    const std::string lacks = missing(l.needs);
    if (!lacks.empty())
      throw std::runtime_error("VIGRAD_ISA='" + want + "', but this CPU lacks " + lacks +
                               "; unset VIGRAD_ISA or choose a level the CPU has");
    return l.table();
  }
  throw std::runtime_error("VIGRAD_ISA must be one of the levels built into vigrad (" + names + ") or 'auto', got '" +
                           want + "'");
}

}  // namespace vigrad::core
