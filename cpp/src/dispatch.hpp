// Run-time choice of the kernel table (dispatch.cpp).
#pragma once

#include <string>
#include <vector>

#include "vigrad/kernels.hpp"

namespace vigrad::core {

// The levels compiled into this module, lowest first.
std::vector<std::string> built_levels();
// Those of them this CPU runs.
std::vector<std::string> supported_levels();
// The table for `forced` (a level's name; null, "" or "auto": the best the CPU supports).
// Throws std::runtime_error naming the problem for an unknown level or one the CPU lacks.
const KernelTable& select_table(const char* forced);

}  // namespace vigrad::core
