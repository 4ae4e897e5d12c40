// The tables of e3fast::assemble_kernel as e3fast/steerable_basis.py writes them, shared by the CPU and
// CUDA kernels: paths [P, 9] (one row per tensor-product path) and self-connections [S, 6].
#pragma once

#include <cstdint>

namespace e3fast {

constexpr int64_t kPathColumns = 9;
constexpr int64_t kSelfConnectionColumns = 6;

// One row of the paths table, in its column order.
struct PathRow {
  int64_t in_offset, in_mul, in_dim, out_offset, out_mul, out_dim, weight_offset, weight_u_stride, basis_offset;
};

}  // namespace e3fast
