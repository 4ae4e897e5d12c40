// CUDA kernels of e3fast::norm_gate and e3fast::norm_gate_backward: equivariant normalization
// fused with the gated nonlinearity (e3nn's BatchNorm then Gate). Same semantics as
// csrc/cpu/norm_gate_cpu.cpp; the math is documented in e3fast/ops/norm_gate.py.
//
// x [B, C, X, Y, Z], N = X*Y*Z voxels, NCDHW or channels_last_3d (read in place). Field f
// (table `fields`: start, dim d, scalar index s or -1, divisor delta) owns channels
// [start, start + d). A statistics group is (b, f) in instance mode (Ng = N) or f in batch
// mode (Ng = B*N):
//
//   mu_f   = mean of x_f over the group        (even scalars, d = 1; else 0)
//   var_f  = sum_{group, m} (x_{f,m} - mu_f)^2 / (Ng * delta_f)
//   inv_f  = (var_f + eps)^(-1/2),  xhat = (x - mu_f) * inv_f,  z = gamma_f * xhat + beta_s
//   y_c    = a(act_c) act_c(z[source_c]) * (gate_c >= 0 ? a(gact_c) gact_c(z[gate_c]) : 1)
//
// Running mode uses running_mean / running_var as mu / var; mode none uses z = x.
//
// Backward, with g_z = dL/dz (chain rule through the gate table):
//
//   d gamma_f = sum g_z * xhat,  d beta_s = sum g_z                        (all groups)
//   dx = k1 g_z + k2 xhat + k3,  k1 = gamma_f inv_f,
//        k2 = -k1 sum_group(g_z xhat) / (Ng delta_f),  k3 = -[scalar] k1 sum_group(g_z) / Ng
//   (instance, batch); k2 = k3 = 0 with running statistics; dx = g_z in mode none.
//
// Kernels, in launch order:
//   prepare_tables      one block: checks the tables (device asserts with the CPU kernel's
//                       rules), writes the gate rows as int4, the field of every input channel
//                       and, for backward, the uses of every input channel (the output channels
//                       that read it as source or gate, in output order, as a CSR list).
//   reduce_channels     partials per (sample, chunk of voxels, channel): Welford (count, mean,
//                       M2) of x in forward, sums of g_z and g_z * xhat in backward. Blocks of
//                       32 x 8 threads read a chunk of one channel plane (NCDHW) or a tile of 32
//                       channels of a chunk of voxel rows (channels-last), coalesced either way;
//                       threads accumulate in opmath precision (float; double for float64).
//   finish_*            one warp per (group, field): combines the partials in double.
//   *_coefficients      one thread per (group, channel): mean, inv, gamma, beta and k1..k3 in
//                       double, stored in opmath precision.
//   gate_outputs,       one thread per output / input element in memory order (grid stride),
//   input_gradients     recomputing z and g_z from x, grad_y and the coefficients (nothing else
//                       is stored between forward and backward).
//
// Welford partials keep a large common offset (x + 1000) from cancelling in the variance. All
// reductions run in a fixed order: results do not depend on scheduling.
#include "cuda_common.cuh"

#include <tuple>
#include <vector>

namespace e3fast {
namespace {

using namespace e3fast::cuda;

constexpr const char* kForwardOp = "e3fast::norm_gate";
constexpr const char* kBackwardOp = "e3fast::norm_gate_backward";

constexpr int64_t kModeNone = 0;
constexpr int64_t kModeInstance = 1;
constexpr int64_t kModeBatch = 2;
constexpr int64_t kModeRunning = 3;

enum Activation : int { kIdentity = 0, kRelu, kTanh, kSigmoid, kSilu, kAbs, kNumActivations };

bool has_batch_statistics(int64_t mode) { return mode == kModeInstance || mode == kModeBatch; }

int64_t num_groups(int64_t mode, int64_t batch) { return mode == kModeInstance ? batch : 1; }

// Values per channel and statistics group: N in instance mode, B*N otherwise.
int64_t group_size(int64_t mode, int64_t batch, int64_t voxels) {
  return mode == kModeInstance ? voxels : batch * voxels;
}

// ------------------------------------------------------------------------------------------
// Activations
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float tanh_of(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_of(double v) { return tanh(v); }
__device__ __forceinline__ float abs_of(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_of(double v) { return fabs(v); }

// act(v) for activation id `act` (see e3fast/gate_layout.py) and act'(v) in `derivative`.
template <typename T>
__device__ T activation(int act, T v, T& derivative) {
  switch (act) {
    case kRelu:
      derivative = v > T(0) ? T(1) : T(0);
      return v > T(0) ? v : T(0);
    case kTanh: {
      const T t = tanh_of(v);
      derivative = T(1) - t * t;
      return t;
    }
    case kSigmoid: {
      const T s = T(1) / (T(1) + exp_of(-v));
      derivative = s * (T(1) - s);
      return s;
    }
    case kSilu: {
      const T s = T(1) / (T(1) + exp_of(-v));
      derivative = s * (T(1) + v * (T(1) - s));
      return v * s;
    }
    case kAbs:
      derivative = T(v > T(0)) - T(v < T(0));
      return abs_of(v);
    default:
      derivative = T(1);
      return v;
  }
}

template <typename T>
__device__ T activation(int act, T v) {
  T unused;
  return activation(act, v, unused);
}

// e3nn's second-moment normalization constant of every activation id.
template <typename T>
struct ActivationScales {
  T values[kNumActivations];

  // values[act] by selects: a dynamic index would copy the kernel argument to local memory.
  __device__ T operator[](int act) const {
    T scale = values[0];
#pragma unroll
    for (int i = 1; i < kNumActivations; ++i) scale = act == i ? values[i] : scale;
    return scale;
  }
};

template <typename T>
ActivationScales<T> activation_scales(c10::ArrayRef<double> act_scales) {
  ActivationScales<T> scales;
  for (int i = 0; i < kNumActivations; ++i) scales.values[i] = static_cast<T>(act_scales[i]);
  return scales;
}

// ------------------------------------------------------------------------------------------
// Tables
// ------------------------------------------------------------------------------------------

constexpr int kPrepareThreads = 512;

struct FieldRow {
  int64_t start, dim, scalar, divisor;
};

__device__ FieldRow read_field(const int64_t* fields, int64_t f) {
  const int64_t* row = fields + 4 * f;
  return {row[0], row[1], row[2], row[3]};
}

// The tables as the kernels read them. A gate row is (source, act, gate or -1, gate act); a use
// is 2 * output channel + (1 when the input channel is the output's gate, 0 when its source).
struct GateTables {
  const int4* gate_rows;     // [out channels]
  const int* channel_field;  // [channels]
  const int* use_begin;      // [channels + 1] (backward)
  const int* uses;           // [2 * out channels] at most (backward)
};

// Running sums over the rows of the field table: channels covered, scalar fields seen.
struct FieldCounts {
  int64_t dims, scalars;
};

__device__ FieldCounts operator+(FieldCounts a, FieldCounts b) { return {a.dims + b.dims, a.scalars + b.scalars}; }
__device__ FieldCounts operator-(FieldCounts a, FieldCounts b) { return {a.dims - b.dims, a.scalars - b.scalars}; }

// Exclusive prefix sums of `value` over the block's threads (Hillis-Steele in `buffer`, one
// slot per thread); `total` receives the sum over the block.
template <typename T>
__device__ T block_exclusive_scan(T value, T* buffer, T& total) {
  buffer[threadIdx.x] = value;
  __syncthreads();
  for (unsigned int offset = 1; offset < blockDim.x; offset *= 2) {
    const T before = threadIdx.x >= offset ? buffer[threadIdx.x - offset] : T{};
    __syncthreads();
    buffer[threadIdx.x] = buffer[threadIdx.x] + before;
    __syncthreads();
  }
  const T inclusive = buffer[threadIdx.x];
  total = buffer[blockDim.x - 1];
  __syncthreads();
  return inclusive - value;
}

// Checks the field rows (they tile the channels in order; scalar indices count the dim-1 scalar
// fields) and writes the field of every channel.
__device__ void prepare_fields(const int64_t* fields, int num_fields, int channels, int num_scalars,
                               int* channel_field) {
  __shared__ FieldCounts buffer[kPrepareThreads];
  FieldCounts done{0, 0};
  for (int base = 0; base < num_fields; base += blockDim.x) {
    const int f = base + threadIdx.x;
    const FieldRow row = f < num_fields ? read_field(fields, f) : FieldRow{0, 0, -1, 1};
    FieldCounts chunk;
    const FieldCounts before = done + block_exclusive_scan(FieldCounts{row.dim, row.scalar >= 0 ? 1 : 0}, buffer, chunk);
    if (f < num_fields) {
      const bool valid = row.start == before.dims && row.dim >= 1 && row.divisor >= 1 &&
                         row.start + row.dim <= channels &&
                         (row.scalar == -1 || (row.scalar == before.scalars && row.dim == 1));
      CUDA_KERNEL_ASSERT(valid && "e3fast::norm_gate: every fields row must continue the channel tiling, with "
                                  "dim >= 1, divisor >= 1 and scalar index -1 or the next one (dim-1 fields)");
      if (valid) {
        for (int64_t c = row.start; c < row.start + row.dim; ++c) channel_field[c] = f;
      }
    }
    done = done + chunk;
  }
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT(done.dims == channels && "e3fast::norm_gate: the fields cover more or fewer channels than the input has");
    CUDA_KERNEL_ASSERT((num_scalars < 0 || done.scalars == num_scalars) &&
                       "e3fast::norm_gate: num_scalars must equal the number of scalar fields");
  }
}

// Checks the gate rows (channels and activation ids in range, no channel gating itself).
__device__ void prepare_gates(const int64_t* gates, int out_channels, int channels, int4* gate_rows) {
  for (int r = threadIdx.x; r < out_channels; r += blockDim.x) {
    const int64_t* row = gates + 4 * static_cast<int64_t>(r);
    const int64_t source = row[0], act = row[1], gate = row[2], gate_act = row[3];
    const bool valid = source >= 0 && source < channels && gate >= -1 && gate < channels && act >= 0 &&
                       act < kNumActivations && gate_act >= 0 && gate_act < kNumActivations && gate != source;
    CUDA_KERNEL_ASSERT(valid && "e3fast::norm_gate: a gates row is out of range (source and gate channels, gate -1: "
                                "none, activation ids) or gates a channel by itself");
    gate_rows[r] = valid ? make_int4(static_cast<int>(source), static_cast<int>(act), static_cast<int>(gate),
                                     static_cast<int>(gate_act))
                         : make_int4(0, kIdentity, -1, kIdentity);
  }
}

__device__ int count_uses(const int4* gate_rows, int out_channels, int c) {
  int count = 0;
#pragma unroll 8
  for (int r = 0; r < out_channels; ++r) {
    const int4 row = gate_rows[r];
    count += (row.x == c) + (row.z == c);
  }
  return count;
}

// The CSR list of the uses of every channel, in output channel order (deterministic backward).
__device__ void prepare_uses(const int4* gate_rows, int out_channels, int channels, int* use_begin, int* uses) {
  __shared__ int64_t buffer[kPrepareThreads];
  int64_t done = 0;
  for (int base = 0; base < channels; base += blockDim.x) {
    const int c = base + threadIdx.x;
    const int count = c < channels ? count_uses(gate_rows, out_channels, c) : 0;
    int64_t chunk;
    int64_t position = done + block_exclusive_scan<int64_t>(count, buffer, chunk);
    if (c < channels) {
      use_begin[c] = static_cast<int>(position);
      for (int r = 0; r < out_channels; ++r) {
        const int4 row = gate_rows[r];
        if (row.x == c) uses[position++] = 2 * r;
        if (row.z == c) uses[position++] = 2 * r + 1;
      }
    }
    done += chunk;
  }
  if (threadIdx.x == 0) use_begin[channels] = static_cast<int>(done);
}

// num_scalars < 0: not checked (backward in mode none).
__global__ void __launch_bounds__(kPrepareThreads)
    prepare_tables_kernel(const int64_t* fields, int num_fields, const int64_t* gates, int out_channels,
                          int channels, int num_scalars, bool with_uses, int4* gate_rows, int* channel_field,
                          int* use_begin, int* uses) {
  prepare_fields(fields, num_fields, channels, num_scalars, channel_field);
  prepare_gates(gates, out_channels, channels, gate_rows);
  if (!with_uses) return;
  __syncthreads();  // the gate rows are read back by every thread
  prepare_uses(gate_rows, out_channels, channels, use_begin, uses);
}

// The kernels' tables and the device memory holding them.
struct PreparedTables {
  at::Tensor storage;
  GateTables tables;
};

PreparedTables prepare_tables(const at::Tensor& fields, const at::Tensor& gates, int64_t channels, int64_t num_scalars,
                              bool with_uses) {
  const int64_t out_channels = gates.size(0);
  const int64_t size = 4 * out_channels + channels + (with_uses ? channels + 1 + 2 * out_channels : 0);
  at::Tensor storage = at::empty({std::max<int64_t>(size, 1)}, gates.options().dtype(at::kInt));
  int* base = storage.data_ptr<int>();  // 16-byte aligned: the int4 rows come first
  int4* gate_rows = reinterpret_cast<int4*>(base);
  int* channel_field = base + 4 * out_channels;
  int* use_begin = channel_field + channels;
  int* uses = use_begin + channels + 1;
  const at::Tensor fields_c = fields.contiguous(), gates_c = gates.contiguous();
  prepare_tables_kernel<<<1, kPrepareThreads, 0, current_stream()>>>(
      fields_c.data_ptr<int64_t>(), static_cast<int>(fields.size(0)), gates_c.data_ptr<int64_t>(),
      static_cast<int>(out_channels), static_cast<int>(channels), static_cast<int>(num_scalars), with_uses, gate_rows,
      channel_field, use_begin, uses);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {storage, GateTables{gate_rows, channel_field, use_begin, uses}};
}

// ------------------------------------------------------------------------------------------
// Per-(group, channel) coefficients
// ------------------------------------------------------------------------------------------

// z = (x - mean) * scale + beta (forward); xhat = (x - mean) * inv_std, z = gamma * xhat + beta
// (backward, as the CPU kernel); scale = gamma * inv_std.
template <typename acc_t>
struct Coefficients {
  acc_t mean, inv_std, gamma, beta, scale;
};

// dx = k1 * g_z + k2 * xhat + k3.
template <typename acc_t>
struct GradientCoefficients {
  acc_t k1, k2, k3;
};

struct StatisticsShape {
  int64_t groups, channels, num_fields, num_scalars;
};

template <typename acc_t>
__global__ void channel_coefficients_kernel(GateTables tables, const int64_t* fields, StatisticsShape shape,
                                            bool normalized, DoubleView mean, DoubleView var, DoubleView weight,
                                            DoubleView bias, double eps, Coefficients<acc_t>* out) {
  E3FAST_GRID_STRIDE_LOOP(int64_t, i, shape.groups * shape.channels) {
    if (!normalized) {
      out[i] = {acc_t(0), acc_t(1), acc_t(1), acc_t(0), acc_t(1)};
      continue;
    }
    const int64_t g = i / shape.channels, c = i % shape.channels;
    const int64_t f = tables.channel_field[c];
    const int64_t s = read_field(fields, f).scalar;
    const double inv_std = 1.0 / sqrt(var[g * shape.num_fields + f] + eps);
    const double gamma = weight.present() ? weight[f] : 1.0;
    const double mu = s >= 0 ? mean[g * shape.num_scalars + s] : 0.0;
    const double beta = s >= 0 && bias.present() ? bias[s] : 0.0;
    out[i] = {static_cast<acc_t>(mu), static_cast<acc_t>(inv_std), static_cast<acc_t>(gamma),
              static_cast<acc_t>(beta), static_cast<acc_t>(inv_std * gamma)};
  }
}

template <typename acc_t>
at::Tensor channel_coefficients(const GateTables& tables, const at::Tensor& fields, const at::Tensor& mean,
                                const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, int64_t mode, double eps, int64_t channels) {
  const StatisticsShape shape{mean.size(0), channels, fields.size(0), mean.size(1)};
  at::Tensor out = at::empty({std::max<int64_t>(shape.groups * channels * 5, 1)},
                             mean.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (shape.groups * channels == 0) return out;
  const auto mean_view = double_view(mean), var_view = double_view(var);
  const auto weight_view = double_view(weight), bias_view = double_view(bias);
  const at::Tensor fields_c = fields.contiguous();
  channel_coefficients_kernel<acc_t><<<grid_blocks(shape.groups * channels), kBlockThreads, 0, current_stream()>>>(
      tables, fields_c.data_ptr<int64_t>(), shape, mode != kModeNone, mean_view.view, var_view.view, weight_view.view,
      bias_view.view, eps, reinterpret_cast<Coefficients<acc_t>*>(out.data_ptr<acc_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------
// Per-channel reductions
// ------------------------------------------------------------------------------------------

constexpr int kReduceLanes = 32;  // threadIdx.x
constexpr int kReduceRows = 8;    // threadIdx.y
// Voxels per block: 16 per thread along a channel plane, 64 per thread down a channel of voxel
// rows (fewer, larger chunks: the finishing warps combine chunks * samples partials each).
constexpr int64_t kPlaneChunkVoxels = 16 * kReduceLanes * kReduceRows;
constexpr int64_t kRowChunkVoxels = 64 * kReduceRows;

// Blocks of a per-channel reduction: (sample, chunk of voxels, tile), tile = one channel (NCDHW)
// or 32 consecutive channels (channels-last). Partials are stored at [(b * chunks + chunk) * C + c].
struct ReduceGrid {
  int64_t batch, channels, voxels, chunk_voxels, chunks, tiles;
  bool channels_last;

  __host__ __device__ int64_t blocks() const { return batch * chunks * tiles; }
  int64_t partials() const { return batch * chunks * channels; }
};

ReduceGrid reduce_grid(const VoxelLayout& layout, int64_t batch) {
  ReduceGrid grid{};
  grid.batch = batch;
  grid.channels = layout.channels;
  grid.voxels = layout.voxels;
  grid.channels_last = layout.channels_last;
  grid.chunk_voxels = layout.channels_last ? kRowChunkVoxels : kPlaneChunkVoxels;
  grid.chunks = (layout.voxels + grid.chunk_voxels - 1) / grid.chunk_voxels;
  grid.tiles = layout.channels_last ? (layout.channels + kReduceLanes - 1) / kReduceLanes : layout.channels;
  return grid;
}

// Count, mean and sum of squared deviations (Welford; Chan et al. to merge).
template <typename T>
struct Welford {
  T count, mean, m2;

  __device__ void add(T value) {
    count += T(1);
    const T delta = value - mean;
    mean += delta / count;
    m2 += delta * (value - mean);
  }

  __device__ void merge(const Welford& other) {
    if (other.count == T(0)) return;
    if (count == T(0)) {
      *this = other;
      return;
    }
    const T total = count + other.count, delta = other.mean - mean, weight = other.count / total;
    mean += delta * weight;
    m2 += other.m2 + delta * delta * count * weight;
    count = total;
  }

  __device__ Welford shuffled_down(int offset) const {
    return {shuffle_down(count, offset), shuffle_down(mean, offset), shuffle_down(m2, offset)};
  }
};

// Sums of g_z and g_z * xhat.
template <typename T>
struct GradientSums {
  T grad, grad_xhat;

  __device__ void add(const GradientSums& other) { merge(other); }
  __device__ void merge(const GradientSums& other) {
    grad += other.grad;
    grad_xhat += other.grad_xhat;
  }
  __device__ GradientSums shuffled_down(int offset) const {
    return {shuffle_down(grad, offset), shuffle_down(grad_xhat, offset)};
  }
};

// partials[(b * chunks + chunk) * C + c] = Op::Partial of op.value(b, c, n) over the chunk's voxels.
template <typename Op>
__global__ void __launch_bounds__(kReduceLanes* kReduceRows)
    reduce_channels_kernel(Op op, ReduceGrid grid, typename Op::Partial* partials) {
  using Partial = typename Op::Partial;
  __shared__ Partial rows[kReduceRows][kReduceLanes];
  const int lane = threadIdx.x, row = threadIdx.y;
  for (int64_t block = blockIdx.x; block < grid.blocks(); block += gridDim.x) {
    const int64_t tile = block % grid.tiles, sample_chunk = block / grid.tiles;
    const int64_t b = sample_chunk / grid.chunks, chunk = sample_chunk % grid.chunks;
    const int64_t first = chunk * grid.chunk_voxels, end = min(first + grid.chunk_voxels, grid.voxels);
    const int64_t c = grid.channels_last ? tile * kReduceLanes + lane : tile;
    Partial acc{};
    if (grid.channels_last) {
      if (c < grid.channels) {
        for (int64_t n = first + row; n < end; n += kReduceRows) acc.add(op.value(b, c, n));
      }
    } else {
      for (int64_t n = first + row * kReduceLanes + lane; n < end; n += kReduceRows * kReduceLanes) {
        acc.add(op.value(b, c, n));
      }
    }
    rows[row][lane] = acc;
    __syncthreads();
    if (row == 0) {
      for (int r = 1; r < kReduceRows; ++r) acc.merge(rows[r][lane]);
      if (!grid.channels_last) acc = warp_merge(acc);
      if (grid.channels_last ? c < grid.channels : lane == 0) {
        partials[(b * grid.chunks + chunk) * grid.channels + c] = acc;
      }
    }
    __syncthreads();  // `rows` is reused by the block's next item
  }
}

// The partials of `op` (Op::Partial structs) in device memory on `options`' device.
template <typename Op>
at::Tensor reduce_channels(const Op& op, const ReduceGrid& grid, const at::TensorOptions& options) {
  const int64_t bytes = grid.partials() * static_cast<int64_t>(sizeof(typename Op::Partial));
  at::Tensor partials = at::empty({std::max<int64_t>(bytes, 1)}, options.dtype(at::kByte));
  if (grid.blocks() == 0) return partials;
  reduce_channels_kernel<Op><<<grid_blocks(grid.blocks(), 1), dim3(kReduceLanes, kReduceRows), 0, current_stream()>>>(
      op, grid, reinterpret_cast<typename Op::Partial*>(partials.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// Index of partial k (k < samples * chunks) of channel c for a group starting at sample b0.
__device__ __forceinline__ int64_t partial_index(const ReduceGrid& grid, int64_t b0, int64_t k, int64_t c) {
  return (b0 * grid.chunks + k) * grid.channels + c;
}

// mean [G, S] and var [G, F] from the Welford partials; one warp per (group, field).
template <typename acc_t>
__global__ void finish_statistics_kernel(const Welford<acc_t>* partials, const int64_t* fields, ReduceGrid grid,
                                         StatisticsShape shape, bool instance, acc_t* mean, acc_t* var) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= shape.groups * shape.num_fields) return;
  const int64_t g = warp / shape.num_fields, f = warp % shape.num_fields;
  const FieldRow field = read_field(fields, f);
  const int64_t first_sample = instance ? g : 0, samples = instance ? 1 : grid.batch;
  const double count = static_cast<double>(samples * grid.voxels);
  double squares = 0.0;
  Welford<double> first_channel{};
  for (int64_t m = 0; m < field.dim; ++m) {
    Welford<double> moments{};
    for (int64_t k = lane; k < samples * grid.chunks; k += kWarpSize) {
      const Welford<acc_t> p = partials[partial_index(grid, first_sample, k, field.start + m)];
      moments.merge({static_cast<double>(p.count), static_cast<double>(p.mean), static_cast<double>(p.m2)});
    }
    moments = warp_merge(moments);
    squares += moments.m2 + moments.count * moments.mean * moments.mean;  // sum of x^2
    if (m == 0) first_channel = moments;
  }
  if (lane != 0) return;
  if (field.scalar >= 0) {  // a centred dim-1 field
    squares = first_channel.m2;
    mean[g * shape.num_scalars + field.scalar] = static_cast<acc_t>(count > 0 ? first_channel.mean : nan(""));
  }
  const double variance = count > 0 ? fmax(0.0, squares / (count * static_cast<double>(field.divisor))) : 0.0;
  var[g * shape.num_fields + f] = static_cast<acc_t>(variance);
}

template <typename scalar_t, typename acc_t>
struct MomentsOp {
  using Partial = Welford<acc_t>;
  const scalar_t* x;
  VoxelLayout layout;

  __device__ acc_t value(int64_t b, int64_t c, int64_t n) const { return static_cast<acc_t>(x[layout.offset(b, c, n)]); }
};

// Fills mean [G, S] and var [G, F] (opmath dtype) with the statistics of x (instance or batch mode).
template <typename scalar_t>
void compute_statistics(const at::Tensor& x, const at::Tensor& fields, int64_t mode, at::Tensor& mean,
                        at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const VoxelLayout layout = voxel_layout(x);
  const ReduceGrid grid = reduce_grid(layout, x.size(0));
  const at::Tensor partials =
      reduce_channels(MomentsOp<scalar_t, acc_t>{x.data_ptr<scalar_t>(), layout}, grid, mean.options());
  const StatisticsShape shape{mean.size(0), layout.channels, fields.size(0), mean.size(1)};
  const int64_t warps = shape.groups * shape.num_fields;
  if (warps == 0) return;
  const at::Tensor fields_c = fields.contiguous();
  finish_statistics_kernel<acc_t><<<grid_blocks(warps * kWarpSize), kBlockThreads, 0, current_stream()>>>(
      reinterpret_cast<const Welford<acc_t>*>(partials.data_ptr()), fields_c.data_ptr<int64_t>(), grid, shape,
      mode == kModeInstance, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void gate_outputs_kernel(const scalar_t* __restrict__ x, VoxelLayout x_layout, GateTables tables,
                                    const Coefficients<acc_t>* __restrict__ coefficients, ActivationScales<acc_t> scales,
                                    bool instance, VoxelIndexer<index_t> y_indexer, index_t total,
                                    scalar_t* __restrict__ y) {
  E3FAST_GRID_STRIDE_LOOP(index_t, e, total) {
    int64_t b, c, n;
    y_indexer.split(e, b, c, n);
    const Coefficients<acc_t>* k = coefficients + (instance ? b : 0) * x_layout.channels;
    const auto z = [&](int channel) {
      const Coefficients<acc_t> kc = k[channel];
      return (static_cast<acc_t>(x[x_layout.offset(b, channel, n)]) - kc.mean) * kc.scale + kc.beta;
    };
    const int4 row = tables.gate_rows[c];  // source, act, gate, gate act
    acc_t value = scales[row.y] * activation(row.y, z(row.x));
    if (row.z >= 0) value = value * (scales[row.w] * activation(row.w, z(row.z)));
    y[e] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t>
void gate_outputs(const at::Tensor& x, const GateTables& tables, const at::Tensor& coefficients,
                  c10::ArrayRef<double> act_scales, int64_t mode, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = y.numel();
  if (total == 0) return;
  with_index_type(total, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    gate_outputs_kernel<scalar_t, acc_t, index_t><<<grid_blocks(total), kBlockThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), voxel_layout(x), tables,
        reinterpret_cast<const Coefficients<acc_t>*>(coefficients.data_ptr<acc_t>()),
        activation_scales<acc_t>(act_scales), mode == kModeInstance, voxel_indexer<index_t>(voxel_layout(y)),
        static_cast<index_t>(total), y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------

void check_input(const at::Tensor& x, const char* op, const char* name) {
  check_cuda(x, op, name);
  TORCH_CHECK(x.dim() == 5, op, ": ", name, " must be [batch, channels, x, y, z], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name,
              " must be float64, float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_optional_vector(const std::optional<at::Tensor>& t, const at::Device& device, const char* op,
                           const char* name, int64_t size) {
  if (!t.has_value()) return;
  check_device(*t, device, op, name);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be a floating point tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, op, ": ", name, " must have shape [", size, "], got ", t->sizes());
}

void check_mode(int64_t mode, const char* op) {
  TORCH_CHECK(mode >= kModeNone && mode <= kModeRunning, op, ": mode must be 0 (none), 1 (instance), ",
              "2 (batch) or 3 (running statistics), got ", mode);
}

// The tables' devices, dtypes and shapes, act_scales' length (their content: prepare_tables).
void check_tables(const at::Tensor& fields, const at::Tensor& gates, c10::ArrayRef<double> act_scales,
                  const at::Device& device, int64_t channels, const char* op) {
  check_table(fields, 4, device, op, "fields");
  check_table(gates, 4, device, op, "gates");
  TORCH_CHECK(static_cast<int64_t>(act_scales.size()) == kNumActivations, op, ": act_scales must have ",
              kNumActivations, " entries (one per activation id), got ", act_scales.size());
  TORCH_CHECK(channels < std::numeric_limits<int32_t>::max(), op, ": too many channels (", channels, ")");
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_channels) {
  return {x.size(0), out_channels, x.size(2), x.size(3), x.size(4)};
}

// The statistics the op returns: fresh [G, S] and [G, F] tensors, filled unless mode is batch or
// instance (computed from x by the caller).
std::pair<at::Tensor, at::Tensor> allocate_statistics(const at::Tensor& x, int64_t num_fields, int64_t num_scalars,
                                                      int64_t mode, const std::optional<at::Tensor>& running_mean,
                                                      const std::optional<at::Tensor>& running_var) {
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  if (mode == kModeNone) return {at::empty({1, 0}, options), at::empty({1, 0}, options)};
  if (mode == kModeRunning) {
    return {running_mean->to(options.dtype(), false, true).reshape({1, num_scalars}),
            running_var->to(options.dtype(), false, true).reshape({1, num_fields})};
  }
  const int64_t groups = num_groups(mode, x.size(0));
  return {at::empty({groups, num_scalars}, options), at::empty({groups, num_fields}, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gate_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& fields, const at::Tensor& gates, c10::ArrayRef<double> act_scales, int64_t num_scalars,
    int64_t mode, double eps) {
  check_input(input, kForwardOp, "x");
  const at::Device device = input.device();
  c10::cuda::CUDAGuard guard(device);
  check_mode(mode, kForwardOp);
  const int64_t channels = input.size(1), num_fields = fields.size(0);
  check_tables(fields, gates, act_scales, device, channels, kForwardOp);
  TORCH_CHECK(num_scalars >= 0 && num_scalars <= num_fields, kForwardOp, ": num_scalars is ", num_scalars,
              " but the fields table has ", num_fields, " fields");
  check_optional_vector(weight, device, kForwardOp, "weight", num_fields);
  check_optional_vector(bias, device, kForwardOp, "bias", num_scalars);
  check_optional_vector(running_mean, device, kForwardOp, "running_mean", num_scalars);
  check_optional_vector(running_var, device, kForwardOp, "running_var", num_fields);
  TORCH_CHECK(mode != kModeNone || (!weight && !bias), kForwardOp, ": mode 0 (none) takes no weight or bias");
  TORCH_CHECK(mode != kModeRunning || (running_mean && running_var), kForwardOp,
              ": mode 3 (running statistics) needs running_mean and running_var");

  const at::Tensor x = dense_voxels(input);
  at::Tensor y = at::empty(output_shape(x, gates.size(0)), x.options().memory_format(memory_format_of(x)));
  at::Tensor mean, var;
  std::tie(mean, var) = allocate_statistics(x, num_fields, num_scalars, mode, running_mean, running_var);
  const PreparedTables prepared = prepare_tables(fields, gates, channels, num_scalars, /*with_uses=*/false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (has_batch_statistics(mode)) compute_statistics<scalar_t>(x, fields, mode, mean, var);
    const at::Tensor coefficients =
        channel_coefficients<acc_t>(prepared.tables, fields, mean, var, weight, bias, mode, eps, channels);
    gate_outputs<scalar_t>(x, prepared.tables, coefficients, act_scales, mode, y);
  });
  return {y, mean, var};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// Recomputes xhat, z and g_z = dL/dz of input elements from x, grad_y and the coefficients.
template <typename scalar_t, typename acc_t>
struct GateBackward {
  const scalar_t* x;
  VoxelLayout x_layout;
  const scalar_t* grad_y;
  VoxelLayout grad_layout;
  GateTables tables;
  const Coefficients<acc_t>* coefficients;  // [G, C]
  ActivationScales<acc_t> scales;
  bool instance;

  __device__ int64_t group(int64_t b) const { return instance ? b : 0; }

  // xhat of channel c at (b, n); its z in `z`.
  __device__ acc_t standardized(int64_t b, int64_t c, int64_t n, acc_t& z) const {
    const Coefficients<acc_t> k = coefficients[group(b) * x_layout.channels + c];
    const acc_t xhat = (static_cast<acc_t>(x[x_layout.offset(b, c, n)]) - k.mean) * k.inv_std;
    z = k.gamma * xhat + k.beta;
    return xhat;
  }

  __device__ acc_t z_of(int64_t b, int64_t c, int64_t n) const {
    acc_t z;
    standardized(b, c, n, z);
    return z;
  }

  // dL/dz of channel c at (b, n), whose z is z_c: the sum over its uses, in output order.
  __device__ acc_t grad_z(int64_t b, int64_t c, int64_t n, acc_t z_c) const {
    acc_t sum = 0;
    for (int k = tables.use_begin[c]; k < tables.use_begin[c + 1]; ++k) {
      const int use = tables.uses[k], out = use >> 1;
      const int4 row = tables.gate_rows[out];  // source, act, gate, gate act
      const acc_t g = static_cast<acc_t>(grad_y[grad_layout.offset(b, out, n)]) * scales[row.y];
      if ((use & 1) == 0) {  // c is the output's source
        acc_t derivative;
        activation(row.y, z_c, derivative);
        if (row.z < 0) {
          sum += g * derivative;
        } else {
          sum += g * derivative * (scales[row.w] * activation(row.w, z_of(b, row.z, n)));
        }
      } else {  // c is the output's gate
        acc_t gate_derivative;
        activation(row.w, z_c, gate_derivative);
        sum += g * activation(row.y, z_of(b, row.x, n)) * (scales[row.w] * gate_derivative);
      }
    }
    return sum;
  }
};

template <typename scalar_t, typename acc_t>
struct GradientSumsOp {
  using Partial = GradientSums<acc_t>;
  GateBackward<scalar_t, acc_t> gate;

  __device__ Partial value(int64_t b, int64_t c, int64_t n) const {
    acc_t z;
    const acc_t xhat = gate.standardized(b, c, n, z);
    const acc_t g = gate.grad_z(b, c, n, z);
    return {g, g * xhat};
  }
};

// field_sums [G, F, 2] (double): sums of g_z and g_z * xhat per group and field; one warp each.
template <typename acc_t>
__global__ void finish_gradient_sums_kernel(const GradientSums<acc_t>* partials, const int64_t* fields,
                                            ReduceGrid grid, StatisticsShape shape, bool instance,
                                            double* field_sums) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (warp >= shape.groups * shape.num_fields) return;
  const int64_t g = warp / shape.num_fields, f = warp % shape.num_fields;
  const FieldRow field = read_field(fields, f);
  const int64_t first_sample = instance ? g : 0, samples = instance ? 1 : grid.batch;
  double grad = 0.0, grad_xhat = 0.0;
  for (int64_t m = 0; m < field.dim; ++m) {
    for (int64_t k = lane; k < samples * grid.chunks; k += kWarpSize) {
      const GradientSums<acc_t> p = partials[partial_index(grid, first_sample, k, field.start + m)];
      grad += static_cast<double>(p.grad);
      grad_xhat += static_cast<double>(p.grad_xhat);
    }
  }
  grad = warp_sum(grad);
  grad_xhat = warp_sum(grad_xhat);
  if (lane == 0) {
    field_sums[warp * 2] = grad;
    field_sums[warp * 2 + 1] = grad_xhat;
  }
}

// grad_weight [F] = sum over groups of sum(g_z xhat); grad_bias [S] = sum over groups of sum(g_z).
template <typename acc_t>
__global__ void parameter_gradients_kernel(const double* field_sums, const int64_t* fields, StatisticsShape shape,
                                           acc_t* grad_weight, acc_t* grad_bias) {
  E3FAST_GRID_STRIDE_LOOP(int64_t, f, shape.num_fields) {
    double grad = 0.0, grad_xhat = 0.0;
    for (int64_t g = 0; g < shape.groups; ++g) {
      grad += field_sums[(g * shape.num_fields + f) * 2];
      grad_xhat += field_sums[(g * shape.num_fields + f) * 2 + 1];
    }
    grad_weight[f] = static_cast<acc_t>(grad_xhat);
    const int64_t s = read_field(fields, f).scalar;
    if (s >= 0) grad_bias[s] = static_cast<acc_t>(grad);
  }
}

// k1, k2, k3 per (group, channel); field_sums null: k2 = k3 = 0 (running statistics, mode none).
template <typename acc_t>
__global__ void gradient_coefficients_kernel(GateTables tables, const int64_t* fields, StatisticsShape shape,
                                             const Coefficients<acc_t>* coefficients, const double* field_sums,
                                             double count, GradientCoefficients<acc_t>* out) {
  E3FAST_GRID_STRIDE_LOOP(int64_t, i, shape.groups * shape.channels) {
    const int64_t g = i / shape.channels, c = i % shape.channels;
    const int64_t f = tables.channel_field[c];
    const double k1 = static_cast<double>(coefficients[i].inv_std) * static_cast<double>(coefficients[i].gamma);
    double k2 = 0.0, k3 = 0.0;
    if (field_sums != nullptr) {
      const FieldRow field = read_field(fields, f);
      const double* sums = field_sums + (g * shape.num_fields + f) * 2;
      k2 = -k1 * sums[1] / (count * static_cast<double>(field.divisor));
      k3 = field.scalar >= 0 ? -k1 * sums[0] / count : 0.0;
    }
    out[i] = {static_cast<acc_t>(k1), static_cast<acc_t>(k2), static_cast<acc_t>(k3)};
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void input_gradients_kernel(GateBackward<scalar_t, acc_t> gate,
                                       const GradientCoefficients<acc_t>* __restrict__ k,
                                       VoxelIndexer<index_t> x_indexer, index_t total, scalar_t* __restrict__ grad_x) {
  E3FAST_GRID_STRIDE_LOOP(index_t, e, total) {
    int64_t b, c, n;
    x_indexer.split(e, b, c, n);
    acc_t z;
    const acc_t xhat = gate.standardized(b, c, n, z);
    const acc_t g = gate.grad_z(b, c, n, z);
    const GradientCoefficients<acc_t> kc = k[gate.group(b) * gate.x_layout.channels + c];
    grad_x[e] = static_cast<scalar_t>(kc.k1 * g + kc.k2 * xhat + kc.k3);
  }
}

template <typename scalar_t>
void norm_gate_backward_kernels(const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& fields,
                                const PreparedTables& prepared, const at::Tensor& mean, const at::Tensor& var,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                c10::ArrayRef<double> act_scales, int64_t mode, double eps, at::Tensor& grad_x,
                                at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const VoxelLayout x_layout = voxel_layout(x);
  const StatisticsShape shape{mean.size(0), x_layout.channels, fields.size(0), mean.size(1)};
  const at::Tensor fields_c = fields.contiguous();
  const at::Tensor coefficients =
      channel_coefficients<acc_t>(prepared.tables, fields, mean, var, weight, bias, mode, eps, x_layout.channels);
  const GateBackward<scalar_t, acc_t> gate{x.data_ptr<scalar_t>(),
                                           x_layout,
                                           grad_y.data_ptr<scalar_t>(),
                                           voxel_layout(grad_y),
                                           prepared.tables,
                                           reinterpret_cast<const Coefficients<acc_t>*>(coefficients.data_ptr<acc_t>()),
                                           activation_scales<acc_t>(act_scales),
                                           mode == kModeInstance};
  at::Tensor field_sums;
  if (mode != kModeNone) {
    const ReduceGrid grid = reduce_grid(x_layout, x.size(0));
    const at::Tensor partials = reduce_channels(GradientSumsOp<scalar_t, acc_t>{gate}, grid, grad_weight.options());
    field_sums = at::empty({std::max<int64_t>(shape.groups * shape.num_fields * 2, 1)}, mean.options().dtype(at::kDouble));
    const int64_t warps = shape.groups * shape.num_fields;
    if (warps > 0) {
      finish_gradient_sums_kernel<acc_t><<<grid_blocks(warps * kWarpSize), kBlockThreads, 0, current_stream()>>>(
          reinterpret_cast<const GradientSums<acc_t>*>(partials.data_ptr()), fields_c.data_ptr<int64_t>(), grid,
          shape, mode == kModeInstance, field_sums.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      parameter_gradients_kernel<acc_t><<<grid_blocks(shape.num_fields), kBlockThreads, 0, current_stream()>>>(
          field_sums.data_ptr<double>(), fields_c.data_ptr<int64_t>(), shape, grad_weight.data_ptr<acc_t>(),
          grad_bias.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  const int64_t total = x.numel();
  if (total == 0) return;
  at::Tensor k = at::empty({shape.groups * shape.channels * 3}, coefficients.options());
  const double count = static_cast<double>(group_size(mode, x.size(0), x_layout.voxels));
  gradient_coefficients_kernel<acc_t><<<grid_blocks(shape.groups * shape.channels), kBlockThreads, 0,
                                        current_stream()>>>(
      prepared.tables, fields_c.data_ptr<int64_t>(), shape, gate.coefficients,
      has_batch_statistics(mode) ? field_sums.data_ptr<double>() : nullptr, count,
      reinterpret_cast<GradientCoefficients<acc_t>*>(k.data_ptr<acc_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  with_index_type(total, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    input_gradients_kernel<scalar_t, acc_t, index_t><<<grid_blocks(total), kBlockThreads, 0, current_stream()>>>(
        gate, reinterpret_cast<const GradientCoefficients<acc_t>*>(k.data_ptr<acc_t>()),
        voxel_indexer<index_t>(x_layout), static_cast<index_t>(total), grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_statistics(const at::Tensor& mean, const at::Tensor& var, const at::Device& device, int64_t num_fields,
                      int64_t mode, int64_t batch) {
  check_device(mean, device, kBackwardOp, "mean");
  check_device(var, device, kBackwardOp, "var");
  const int64_t groups = num_groups(mode, batch);
  const bool normalized = mode != kModeNone;
  const int64_t expected_fields = normalized ? num_fields : 0;
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == groups && (normalized || mean.size(1) == 0) && var.dim() == 2 &&
                  var.size(0) == groups && var.size(1) == expected_fields,
              kBackwardOp, ": mode ", mode, " expects mean [", groups, ", ", normalized ? "num_scalars" : "0",
              "] and var [", groups, ", ", expected_fields, "], got ", mean.sizes(), " and ", var.sizes());
  TORCH_CHECK(at::isFloatingType(mean.scalar_type()) && at::isFloatingType(var.scalar_type()), kBackwardOp,
              ": mean and var must be floating point, got ", mean.scalar_type(), " and ", var.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gate_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& fields,
    const at::Tensor& gates, c10::ArrayRef<double> act_scales, int64_t mode, double eps) {
  check_input(input, kBackwardOp, "x");
  const at::Device device = input.device();
  c10::cuda::CUDAGuard guard(device);
  check_input(grad_output, kBackwardOp, "grad_y");
  check_device(grad_output, device, kBackwardOp, "grad_y");
  check_mode(mode, kBackwardOp);
  const int64_t channels = input.size(1), num_fields = fields.size(0);
  check_tables(fields, gates, act_scales, device, channels, kBackwardOp);
  check_statistics(mean, var, device, num_fields, mode, input.size(0));
  check_optional_vector(weight, device, kBackwardOp, "weight", num_fields);
  check_optional_vector(bias, device, kBackwardOp, "bias", mean.size(1));
  TORCH_CHECK(mode != kModeNone || (!weight && !bias), kBackwardOp, ": mode 0 (none) takes no weight or bias");
  const auto expected_shape = output_shape(input, gates.size(0));
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected_shape), kBackwardOp, ": grad_y must have shape ",
              at::IntArrayRef(expected_shape), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), kBackwardOp, ": grad_y has dtype ",
              grad_output.scalar_type(), " but x has ", input.scalar_type());

  const at::Tensor x = dense_voxels(input), grad_y = dense_voxels(grad_output);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(memory_format_of(x)));
  const auto stats_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor grad_weight = at::zeros({num_fields}, stats_options);
  at::Tensor grad_bias = at::zeros({mean.size(1)}, stats_options);
  const int64_t checked_scalars = mode == kModeNone ? -1 : mean.size(1);
  const PreparedTables prepared = prepare_tables(fields, gates, channels, checked_scalars, /*with_uses=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_gate_backward_cuda", [&] {
    norm_gate_backward_kernels<scalar_t>(x, grad_y, fields, prepared, mean, var, weight, bias, act_scales, mode, eps,
                                         grad_x, grad_weight, grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(e3fast, CUDA, m) {
  m.impl("norm_gate", &norm_gate_cuda);
  m.impl("norm_gate_backward", &norm_gate_backward_cuda);
}

}  // namespace e3fast
