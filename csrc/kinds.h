// The divergences of the route table, shared by the CPU and CUDA kernels (no torch headers: the CUDA
// kernels include this too). Definitions: dopd_kernels/divergences.py.
#pragma once

#include <cstdint>

namespace dopd {

enum class Kind : int32_t {
  rkl = 0,  // KL(student || source)
  fkl = 1,  // KL(source || student)
  jsd = 2,  // beta KL(source || M) + (1 - beta) KL(student || M), M = beta source + (1 - beta) student
};

}  // namespace dopd
