// Helpers shared by the CUDA kernels of e3fast: device checks, launch geometry, voxel memory
// layouts, fast index division, warp reductions and small tables passed from the host.
//
// Conventions of every kernel file:
// * all tensors of an op live on the CUDA device of its main input (TORCH_CHECK on the host);
// * kernels run on the current stream under a device guard, each launch followed by
//   C10_CUDA_KERNEL_LAUNCH_CHECK;
// * flat loops are grid-stride loops over `index_t`, 32-bit when the loop fits (divisions by
//   magic numbers) and 64-bit otherwise; memory offsets are always 64-bit;
// * the integer tables (fields, gates, paths, ...) are read on the device and never copied to
//   the host, so no op synchronizes with the host. Their content is checked by a device assert
//   (CUDA_KERNEL_ASSERT: a failure stops the process's CUDA context, as torch's own index checks do).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

namespace e3fast {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;
// Grid-stride loops launch at most this many blocks.
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

// ------------------------------------------------------------------------------------------
// Host side: checks, launch geometry
// ------------------------------------------------------------------------------------------

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline unsigned int grid_blocks(int64_t threads, int block_threads = kBlockThreads) {
  const int64_t blocks = (threads + block_threads - 1) / block_threads;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, kMaxGridBlocks));
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA kernel): ", name, " must be a CUDA tensor, got ", t.device());
}

// `t` must be on `device`, the device of the op's main input.
inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, " (CUDA kernel): ", name, " must be on ", device,
              " like the input, got ", t.device());
}

// An int64 table [rows, columns] on `device` (columns < 0: any number of at least -columns).
inline void check_table(const at::Tensor& table, int64_t columns, const at::Device& device, const char* op,
                        const char* name) {
  check_device(table, device, op, name);
  TORCH_CHECK(table.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", table.scalar_type());
  const bool shape_ok = table.dim() == 2 && (columns >= 0 ? table.size(1) == columns : table.size(1) >= -columns);
  TORCH_CHECK(shape_ok, op, ": ", name, " must have shape [rows, ", columns >= 0 ? "" : "at least ",
              columns >= 0 ? columns : -columns, "], got ", table.sizes());
  TORCH_CHECK(table.size(0) < std::numeric_limits<int32_t>::max(), op, ": ", name, " has too many rows");
}

// f(index_t{}) with index_t = uint32_t when `count` flat indices fit in 31 bits, else uint64_t.
template <typename F>
void with_index_type(int64_t count, const F& f) {
  if (count <= std::numeric_limits<int32_t>::max()) {
    f(uint32_t{});
  } else {
    f(uint64_t{});
  }
}

template <typename index_t>
using Divider = at::cuda::detail::IntDivider<index_t>;

template <typename index_t>
Divider<index_t> divider(int64_t divisor) {
  return Divider<index_t>(static_cast<index_t>(std::max<int64_t>(divisor, 1)));
}

// ------------------------------------------------------------------------------------------
// Voxel tensors [batch, channels, x, y, z]
// ------------------------------------------------------------------------------------------

inline bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// `t` itself when NCDHW- or channels_last_3d-contiguous, else an NCDHW copy.
inline at::Tensor dense_voxels(const at::Tensor& t) { return is_channels_last(t) ? t : t.contiguous(); }

inline at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

// A dense [batch, channels, voxels] tensor: channel planes (NCDHW) or voxel rows (channels-last).
struct VoxelLayout {
  int64_t channels, voxels;
  bool channels_last;

  __host__ __device__ int64_t offset(int64_t b, int64_t c, int64_t n) const {
    return channels_last ? (b * voxels + n) * channels + c : (b * channels + c) * voxels + n;
  }
};

// `t` must be dense_voxels(...) already.
inline VoxelLayout voxel_layout(const at::Tensor& t) {
  return {t.size(1), t.size(2) * t.size(3) * t.size(4), is_channels_last(t)};
}

// Flat index e of a dense voxel tensor (its memory order) -> (sample, channel, voxel).
template <typename index_t>
struct VoxelIndexer {
  Divider<index_t> channels, voxels;
  bool channels_last;

  __device__ void split(index_t e, int64_t& b, int64_t& c, int64_t& n) const {
    if (channels_last) {
      const auto voxel_channel = channels.divmod(e);
      const auto sample_voxel = voxels.divmod(voxel_channel.div);
      b = sample_voxel.div, n = sample_voxel.mod, c = voxel_channel.mod;
    } else {
      const auto plane_voxel = voxels.divmod(e);
      const auto sample_channel = channels.divmod(plane_voxel.div);
      b = sample_channel.div, c = sample_channel.mod, n = plane_voxel.mod;
    }
  }
};

template <typename index_t>
VoxelIndexer<index_t> voxel_indexer(const VoxelLayout& layout) {
  return {divider<index_t>(layout.channels), divider<index_t>(layout.voxels), layout.channels_last};
}

#define E3FAST_GRID_STRIDE_LOOP(index_t, i, count)                                                       \
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (count);              \
       i += static_cast<index_t>(gridDim.x) * blockDim.x)

// ------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T shuffle_down(T value, int offset) {
  return __shfl_down_sync(0xffffffffu, value, offset);
}

// The sum over the warp's lanes, in lane 0 (fixed order: deterministic).
template <typename T>
__device__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += shuffle_down(value, offset);
  return value;
}

// `Partial::merge` over the warp's lanes, in lane 0 (fixed order: deterministic).
template <typename Partial>
__device__ Partial warp_merge(Partial value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value.merge(value.shuffled_down(offset));
  return value;
}

// A floating tensor of any of the four kernel dtypes read as double (null data: absent).
struct DoubleView {
  const void* data;
  at::ScalarType type;

  __device__ double operator[](int64_t i) const {
    switch (type) {
      case at::ScalarType::Double: return static_cast<const double*>(data)[i];
      case at::ScalarType::Float: return static_cast<const float*>(data)[i];
      case at::ScalarType::Half: return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      default: return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
    }
  }
  __device__ bool present() const { return data != nullptr; }
};

// A DoubleView and the tensor it reads (kept alive by the caller until the launch).
struct DoubleViewHolder {
  at::Tensor tensor;
  DoubleView view;
};

inline DoubleViewHolder double_view(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {at::Tensor(), DoubleView{nullptr, at::kDouble}};
  const auto type = t->scalar_type();
  const bool readable = type == at::kDouble || type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
  at::Tensor values = (readable ? *t : t->to(at::kDouble)).contiguous();
  return {values, DoubleView{values.data_ptr(), values.scalar_type()}};
}

// Small lists of doubles (scales) reach the device as kernel arguments, in batches: no copy from
// pageable host memory, so nothing waits for the host and CUDA graphs can capture the op.
struct DoubleBatch {
  static constexpr int kCapacity = 32;
  double values[kCapacity];
  int count;
};

static __global__ void write_doubles_kernel(DoubleBatch batch, double* out) {
  if (static_cast<int>(threadIdx.x) < batch.count) out[threadIdx.x] = batch.values[threadIdx.x];
}

inline at::Tensor device_doubles(at::ArrayRef<double> values, const at::Device& device) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kDouble).device(device));
  for (size_t first = 0; first < values.size(); first += DoubleBatch::kCapacity) {
    DoubleBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(DoubleBatch::kCapacity, values.size() - first));
    std::copy_n(values.begin() + first, batch.count, batch.values);
    write_doubles_kernel<<<1, DoubleBatch::kCapacity, 0, current_stream()>>>(batch, out.data_ptr<double>() + first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace cuda
}  // namespace e3fast
