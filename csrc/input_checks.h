// Host-side input checks shared by the CPU and CUDA kernels of the e3fast ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace e3fast {

// A floating tensor of the op's one floating dtype.
inline void check_float_dtype(const at::Tensor& tensor, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(tensor.scalar_type()), "e3fast: ", name, " must be floating point, got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.scalar_type() == dtype, "e3fast: ", name, " has dtype ", tensor.scalar_type(), ", expected ",
              dtype, " (all floating inputs share one dtype)");
}

// Number of taps of an odd-sized 3-d kernel.
inline int64_t num_taps(at::IntArrayRef kernel_size) {
  TORCH_CHECK(kernel_size.size() == 3, "e3fast: kernel_size must have 3 entries, got ", kernel_size.size());
  for (int64_t k : kernel_size) {
    TORCH_CHECK(k > 0 && k % 2 == 1, "e3fast: kernel_size entries must be positive and odd, got ", kernel_size);
  }
  return kernel_size[0] * kernel_size[1] * kernel_size[2];
}

}  // namespace e3fast
