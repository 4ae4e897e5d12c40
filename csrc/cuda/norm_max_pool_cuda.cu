// CUDA kernels of e3fast::norm_max_pool3d and e3fast::norm_max_pool3d_backward. Same semantics
// as csrc/cpu/norm_max_pool_cpu.cpp; the math is documented in e3fast/ops/norm_max_pool.py.
//
// For every sample b, field f = (start, d) of the field table and output voxel o with window
// W(o) = {o * s + (i, j, k) : i < kx, j < ky, k < kz} (window position p = (i ky + j) kz + k):
//
//   score(n) = x[b, start, n]                               if d == 1 (plain max)
//            = sqrt(sum_{m < d} x[b, start + m, n]^2)       otherwise (opmath, m in order)
//   p*(o)    = first p in raster order with the largest score (strict >; a NaN score wins, as
//              in torch's max pooling)
//   y[b, start + m, o] = x[b, start + m, o * s + p*(o)],    argmax[b, f, o] = p*(o)
//   y[b, c, o] = 0 for channels c outside every field
//
// Backward (windows overlap when stride < kernel):
//
//   dx[b, c, n] = sum_{o : n in W(o), p*(o) = n - o * s} dy[b, c, o]     (0 outside every field)
//
// Kernels:
//   map_channels   one block: checks the field rows (inside the channels, no channel in two rows;
//                  device asserts) and writes the field of every channel (-1: none).
//   pool           one thread per (sample, field, output voxel), fields innermost for
//                  channels-last input so that a warp reads neighbouring channels; scores in
//                  opmath precision (float; double for float64). y starts zeroed.
//   unpool         one thread per element of dx in memory order: gathers dy from the (at most
//                  ceil(k / s) per axis) windows that contain its voxel and picked it, in window
//                  order. Every element is written once: no atomics, no zero fill, deterministic.
//
// x, y, dy and dx are read and written in place in NCDHW or channels_last_3d layout (other
// strides are copied to NCDHW first); argmax is a contiguous [B, F, ox, oy, oz] tensor.
#include "cuda_common.cuh"

#include <array>
#include <tuple>
#include <vector>

namespace e3fast {
namespace {

using namespace e3fast::cuda;

constexpr const char* kForwardOp = "e3fast::norm_max_pool3d";
constexpr const char* kBackwardOp = "e3fast::norm_max_pool3d_backward";
constexpr int kMapThreads = 512;

using Triple = std::array<int64_t, 3>;

// Pooling geometry: input and output spatial sizes, window and stride per axis.
struct PoolGeometry {
  int64_t in[3], out[3], kernel[3], stride[3];

  __host__ __device__ int64_t window() const { return kernel[0] * kernel[1] * kernel[2]; }
  __host__ __device__ int64_t out_voxels() const { return out[0] * out[1] * out[2]; }
  __host__ __device__ int64_t in_voxels() const { return in[0] * in[1] * in[2]; }
};

Triple to_triple(at::IntArrayRef values, const char* name) {
  TORCH_CHECK(values.size() == 3, "e3fast: ", name, " must have 3 entries, got ", values.size());
  return {values[0], values[1], values[2]};
}

PoolGeometry make_geometry(at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  const Triple in = to_triple(input_size, "input_size"), kernel = to_triple(kernel_size, "kernel_size"),
               step = to_triple(stride, "stride");
  PoolGeometry g{};
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(kernel[a] > 0 && step[a] > 0, "e3fast: kernel_size and stride must be positive, got ", kernel_size,
                " and ", stride);
    TORCH_CHECK(in[a] >= kernel[a], "e3fast: input spatial size ", input_size, " is smaller than kernel_size ",
                kernel_size);
    TORCH_CHECK(in[a] < std::numeric_limits<int32_t>::max(), "e3fast: input spatial size ", input_size,
                " is too large");
    g.in[a] = in[a];
    g.kernel[a] = kernel[a];
    g.stride[a] = step[a];
    g.out[a] = (in[a] - kernel[a]) / step[a] + 1;
  }
  return g;
}

at::ScalarType argmax_dtype(const PoolGeometry& g) { return g.window() <= 256 ? at::kByte : at::kInt; }

// Element strides of a 5-D tensor: sample, channel, and one per spatial axis.
struct Strides {
  int64_t batch, channel, x, y, z;

  __device__ int64_t voxel(int64_t i, int64_t j, int64_t k) const { return i * x + j * y + k * z; }
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)}; }

// (i, j, k) of spatial index n of a grid [.., size_y, size_z].
template <typename index_t>
struct GridIndexer {
  Divider<index_t> size_y, size_z;

  __device__ void split(int64_t n, int64_t& i, int64_t& j, int64_t& k) const {
    const auto xy_z = size_z.divmod(static_cast<index_t>(n));
    const auto x_y = size_y.divmod(xy_z.div);
    i = x_y.div, j = x_y.mod, k = xy_z.mod;
  }
};

template <typename index_t>
GridIndexer<index_t> grid_indexer(const int64_t* size) {
  return {divider<index_t>(size[1]), divider<index_t>(size[2])};
}

// ------------------------------------------------------------------------------------------
// Field table
// ------------------------------------------------------------------------------------------

// channel_field[c] = the row of `fields` holding channel c, -1 when none.
__global__ void __launch_bounds__(kMapThreads)
    map_channels_kernel(const int64_t* fields, int64_t columns, int num_fields, int channels, int* channel_field) {
  for (int c = threadIdx.x; c < channels; c += blockDim.x) channel_field[c] = -1;
  __syncthreads();
  for (int f = threadIdx.x; f < num_fields; f += blockDim.x) {
    const int64_t start = fields[f * columns], dim = fields[f * columns + 1];
    const bool fits = start >= 0 && dim > 0 && start + dim <= channels;
    CUDA_KERNEL_ASSERT(fits && "e3fast: a fields row (start, dim) does not fit in the channels");
    for (int64_t c = start; fits && c < start + dim; ++c) {
      const int previous = atomicCAS(channel_field + c, -1, f);
      CUDA_KERNEL_ASSERT(previous == -1 && "e3fast: a channel belongs to two rows of fields");
    }
  }
}

// The field of every channel, after the table's checks.
at::Tensor map_channels(const at::Tensor& fields, int64_t channels) {
  at::Tensor channel_field = at::empty({std::max<int64_t>(channels, 1)}, fields.options().dtype(at::kInt));
  const at::Tensor table = fields.contiguous();
  map_channels_kernel<<<1, kMapThreads, 0, current_stream()>>>(table.data_ptr<int64_t>(), table.size(1),
                                                               static_cast<int>(table.size(0)),
                                                               static_cast<int>(channels),
                                                               channel_field.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return channel_field;
}

void check_fields(const at::Tensor& fields, const at::Device& device, int64_t channels, const char* op) {
  check_table(fields, -2, device, op, "fields");
  TORCH_CHECK(channels < std::numeric_limits<int32_t>::max(), op, ": too many channels (", channels, ")");
}

void check_voxel_tensor(const at::Tensor& t, const char* op, const char* name) {
  check_cuda(t, op, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "e3fast: ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 5, "e3fast: ", name, " must be 5-D [batch, channels, x, y, z], got ", t.sizes());
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

// Flat thread index -> (sample, field, output voxel); fields innermost or outermost.
template <typename index_t>
struct FieldVoxelIndexer {
  Divider<index_t> fields, voxels;
  bool fields_inner;

  __device__ void split(index_t e, int64_t& b, int64_t& f, int64_t& o) const {
    if (fields_inner) {
      const auto voxel_field = fields.divmod(e);
      const auto sample_voxel = voxels.divmod(voxel_field.div);
      b = sample_voxel.div, o = sample_voxel.mod, f = voxel_field.mod;
    } else {
      const auto field_voxel = voxels.divmod(e);
      const auto sample_field = fields.divmod(field_voxel.div);
      b = sample_field.div, f = sample_field.mod, o = field_voxel.mod;
    }
  }
};

// The value (d == 1) or the l2 norm of the field's d components at `values`.
template <typename acc_t, typename scalar_t>
__device__ acc_t window_score(const scalar_t* values, int64_t dim, int64_t channel_stride) {
  const acc_t first = static_cast<acc_t>(values[0]);
  if (dim == 1) return first;
  acc_t squares = first * first;
  for (int64_t m = 1; m < dim; ++m) {
    const acc_t v = static_cast<acc_t>(values[m * channel_stride]);
    squares += v * v;
  }
  return sqrt(squares);
}

template <typename scalar_t, typename position_t, typename index_t>
__global__ void pool_kernel(const scalar_t* __restrict__ x, Strides xs, scalar_t* __restrict__ y, Strides ys,
                            position_t* __restrict__ argmax, const int64_t* __restrict__ fields, int64_t columns,
                            int64_t num_fields, PoolGeometry g, FieldVoxelIndexer<index_t> indexer,
                            GridIndexer<index_t> out_grid, index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  E3FAST_GRID_STRIDE_LOOP(index_t, e, total) {
    int64_t b, f, o, ox, oy, oz;
    indexer.split(e, b, f, o);
    out_grid.split(o, ox, oy, oz);
    const int64_t start = fields[f * columns], dim = fields[f * columns + 1];
    const scalar_t* corner =
        x + b * xs.batch + start * xs.channel + xs.voxel(ox * g.stride[0], oy * g.stride[1], oz * g.stride[2]);
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int best_position = 0, position = 0;
    for (int64_t i = 0; i < g.kernel[0]; ++i) {
      for (int64_t j = 0; j < g.kernel[1]; ++j) {
        for (int64_t k = 0; k < g.kernel[2]; ++k, ++position) {
          const acc_t score = window_score<acc_t>(corner + xs.voxel(i, j, k), dim, xs.channel);
          if (score > best || score != score) {  // strict: the first maximum wins; NaN wins
            best = score;
            best_position = position;
          }
        }
      }
    }
    const int64_t window_yz = g.kernel[1] * g.kernel[2];
    const scalar_t* source = corner + xs.voxel(best_position / window_yz, (best_position / g.kernel[2]) % g.kernel[1],
                                               best_position % g.kernel[2]);
    scalar_t* target = y + b * ys.batch + start * ys.channel + ys.voxel(ox, oy, oz);
    for (int64_t m = 0; m < dim; ++m) target[m * ys.channel] = source[m * xs.channel];
    argmax[(b * num_fields + f) * g.out_voxels() + o] = static_cast<position_t>(best_position);
  }
}

template <typename scalar_t, typename position_t>
void pool(const at::Tensor& x, const at::Tensor& fields, const PoolGeometry& g, bool channels_last, at::Tensor& y,
          at::Tensor& argmax) {
  const int64_t num_fields = fields.size(0), total = x.size(0) * num_fields * g.out_voxels();
  if (total == 0) return;
  with_index_type(total, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const FieldVoxelIndexer<index_t> indexer{divider<index_t>(num_fields), divider<index_t>(g.out_voxels()),
                                             channels_last};
    pool_kernel<scalar_t, position_t, index_t><<<grid_blocks(total), kBlockThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), strides_of(x), y.data_ptr<scalar_t>(), strides_of(y), argmax.data_ptr<position_t>(),
        fields.data_ptr<int64_t>(), fields.size(1), num_fields, g, indexer, grid_indexer<index_t>(g.out),
        static_cast<index_t>(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> norm_max_pool3d_cuda(const at::Tensor& x_in, const at::Tensor& fields_table,
                                                        at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  check_voxel_tensor(x_in, kForwardOp, "x");
  const at::Device device = x_in.device();
  c10::cuda::CUDAGuard guard(device);
  check_fields(fields_table, device, x_in.size(1), kForwardOp);
  const at::Tensor x = dense_voxels(x_in), fields = fields_table.contiguous();
  const PoolGeometry g = make_geometry(x.sizes().slice(2), kernel_size, stride);
  const bool channels_last = is_channels_last(x);
  map_channels(fields, x.size(1));  // checks the table
  // Zeroed: channels outside every field are not pooled (at::zeros would drop the memory format).
  at::Tensor y = at::empty({x.size(0), x.size(1), g.out[0], g.out[1], g.out[2]},
                           x.options().memory_format(memory_format_of(x)))
                     .zero_();
  at::Tensor argmax = at::empty({x.size(0), fields.size(0), g.out[0], g.out[1], g.out[2]},
                                x.options().dtype(argmax_dtype(g)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_max_pool3d_cuda", [&] {
    if (argmax.scalar_type() == at::kByte) {
      pool<scalar_t, uint8_t>(x, fields, g, channels_last, y, argmax);
    } else {
      pool<scalar_t, int32_t>(x, fields, g, channels_last, y, argmax);
    }
  });
  return {y, argmax};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// The output coordinates [first, last) along one axis whose windows contain input coordinate n:
// o * stride <= n < o * stride + kernel.
__device__ void windows_containing(int64_t n, int64_t kernel, int64_t out, const Divider<uint32_t>& stride,
                                   int64_t& first, int64_t& last) {
  last = min(static_cast<int64_t>(stride.div(static_cast<uint32_t>(n))) + 1, out);
  first = last;
  while (first > 0 && (first - 1) * static_cast<int64_t>(stride.divisor) + kernel > n) --first;
}

struct StrideDividers {
  Divider<uint32_t> x, y, z;
};

template <typename scalar_t, typename position_t, typename index_t>
__global__ void unpool_kernel(const scalar_t* __restrict__ grad_y, Strides gys, const position_t* __restrict__ argmax,
                              const int* __restrict__ channel_field, int64_t num_fields, PoolGeometry g,
                              StrideDividers stride, VoxelIndexer<index_t> indexer, GridIndexer<index_t> in_grid,
                              index_t total, scalar_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  E3FAST_GRID_STRIDE_LOOP(index_t, e, total) {
    int64_t b, c, n, nx, ny, nz;
    indexer.split(e, b, c, n);
    in_grid.split(n, nx, ny, nz);
    const int64_t f = channel_field[c];
    acc_t sum = 0;
    if (f >= 0) {
      int64_t x_first, x_last, y_first, y_last, z_first, z_last;
      windows_containing(nx, g.kernel[0], g.out[0], stride.x, x_first, x_last);
      windows_containing(ny, g.kernel[1], g.out[1], stride.y, y_first, y_last);
      windows_containing(nz, g.kernel[2], g.out[2], stride.z, z_first, z_last);
      const position_t* field_argmax = argmax + (b * num_fields + f) * g.out_voxels();
      const scalar_t* grad_channel = grad_y + b * gys.batch + c * gys.channel;
      for (int64_t ox = x_first; ox < x_last; ++ox) {
        for (int64_t oy = y_first; oy < y_last; ++oy) {
          const int64_t ij = (nx - ox * g.stride[0]) * g.kernel[1] + (ny - oy * g.stride[1]);
          for (int64_t oz = z_first; oz < z_last; ++oz) {
            const int64_t position = ij * g.kernel[2] + (nz - oz * g.stride[2]);
            if (static_cast<int64_t>(field_argmax[(ox * g.out[1] + oy) * g.out[2] + oz]) == position) {
              sum += static_cast<acc_t>(grad_channel[gys.voxel(ox, oy, oz)]);
            }
          }
        }
      }
    }
    grad_x[e] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename position_t>
void unpool(const at::Tensor& grad_y, const at::Tensor& argmax, const at::Tensor& channel_field, const PoolGeometry& g,
            bool channels_last, at::Tensor& grad_x) {
  const int64_t total = grad_x.numel();
  if (total == 0) return;
  const StrideDividers stride{divider<uint32_t>(g.stride[0]), divider<uint32_t>(g.stride[1]),
                              divider<uint32_t>(g.stride[2])};
  const VoxelLayout layout{grad_x.size(1), g.in_voxels(), channels_last};
  with_index_type(total, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    unpool_kernel<scalar_t, position_t, index_t><<<grid_blocks(total), kBlockThreads, 0, current_stream()>>>(
        grad_y.data_ptr<scalar_t>(), strides_of(grad_y), argmax.data_ptr<position_t>(), channel_field.data_ptr<int>(),
        argmax.size(1), g, stride, voxel_indexer<index_t>(layout), grid_indexer<index_t>(g.in),
        static_cast<index_t>(total), grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor norm_max_pool3d_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& argmax_in,
                                         const at::Tensor& fields_table, at::IntArrayRef input_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  check_voxel_tensor(grad_y_in, kBackwardOp, "grad_y");
  const at::Device device = grad_y_in.device();
  c10::cuda::CUDAGuard guard(device);
  check_fields(fields_table, device, grad_y_in.size(1), kBackwardOp);
  const at::Tensor grad_y = dense_voxels(grad_y_in), fields = fields_table.contiguous();
  const PoolGeometry g = make_geometry(input_size, kernel_size, stride);
  TORCH_CHECK(grad_y.size(2) == g.out[0] && grad_y.size(3) == g.out[1] && grad_y.size(4) == g.out[2],
              "e3fast: grad_y has spatial size ", grad_y.sizes().slice(2), " but pooling ", input_size,
              " with kernel ", kernel_size, " and stride ", stride, " gives ", at::IntArrayRef(g.out, 3));
  check_device(argmax_in, device, kBackwardOp, "argmax");
  TORCH_CHECK(argmax_in.scalar_type() == argmax_dtype(g), "e3fast: argmax must have dtype ", argmax_dtype(g),
              " for a window of ", g.window(), " voxels, got ", argmax_in.scalar_type());
  const std::vector<int64_t> argmax_shape{grad_y.size(0), fields.size(0), g.out[0], g.out[1], g.out[2]};
  TORCH_CHECK(argmax_in.sizes() == at::IntArrayRef(argmax_shape), "e3fast: argmax must have shape ",
              at::IntArrayRef(argmax_shape), ", got ", argmax_in.sizes());
  const at::Tensor argmax = argmax_in.contiguous();
  const bool channels_last = is_channels_last(grad_y);
  const at::Tensor channel_field = map_channels(fields, grad_y.size(1));
  at::Tensor grad_x = at::empty({grad_y.size(0), grad_y.size(1), g.in[0], g.in[1], g.in[2]},
                                grad_y.options().memory_format(memory_format_of(grad_y)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(),
                                  "e3fast::norm_max_pool3d_backward_cuda", [&] {
    if (argmax.scalar_type() == at::kByte) {
      unpool<scalar_t, uint8_t>(grad_y, argmax, channel_field, g, channels_last, grad_x);
    } else {
      unpool<scalar_t, int32_t>(grad_y, argmax, channel_field, g, channels_last, grad_x);
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(e3fast, CUDA, m) {
  m.impl("norm_max_pool3d", &norm_max_pool3d_cuda);
  m.impl("norm_max_pool3d_backward", &norm_max_pool3d_backward_cuda);
}

}  // namespace e3fast
