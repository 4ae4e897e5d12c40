// CPU kernels of e3fast::norm_max_pool3d and e3fast::norm_max_pool3d_backward.
//
// For every sample b, field f = (start, d) of the field table and output voxel o with window
// W(o) = {o * s + (i, j, k) : i < kx, j < ky, k < kz} (window position p = (i ky + j) kz + k):
//
//   score(n) = x[b, start, n]                               if d == 1 (plain max)
//            = sqrt(sum_{m < d} x[b, start + m, n]^2)       otherwise (opmath, m in order)
//   p*(o)    = first p in raster order with the largest score (strict >; a NaN score wins, as
//              in torch's max pooling)
//   y[b, start + m, o] = x[b, start + m, o * s + p*(o)],    argmax[b, f, o] = p*(o)
//
// Backward is a gather, so every input gradient is written once, race free, summed in opmath:
//
//   dx[b, start + m, n] = sum_{o : n in W(o), p*(o) = n - o * s} dy[b, start + m, o]
//
// Both passes read and write in place in NCDHW or channels_last_3d layout with one loop order
// per layout: NCDHW is parallel over (b, field, output x) and walks voxels of one channel plane,
// channels-last is parallel over (b, voxel) and walks the contiguous channels of each voxel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace e3fast {
namespace {

using Triple = std::array<int64_t, 3>;

struct Field {
  int64_t start, dim;
};

// Pooling geometry: input and output spatial sizes, window and stride per axis.
struct PoolGeometry {
  Triple in, out, kernel, stride;
  int64_t in_voxels() const { return in[0] * in[1] * in[2]; }
  int64_t out_voxels() const { return out[0] * out[1] * out[2]; }
  int64_t window() const { return kernel[0] * kernel[1] * kernel[2]; }
};

Triple to_triple(at::IntArrayRef values, const char* name) {
  TORCH_CHECK(values.size() == 3, "e3fast: ", name, " must have 3 entries, got ", values.size());
  return {values[0], values[1], values[2]};
}

PoolGeometry make_geometry(at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  PoolGeometry g{to_triple(input_size, "input_size"), {}, to_triple(kernel_size, "kernel_size"),
                 to_triple(stride, "stride")};
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(g.kernel[a] > 0 && g.stride[a] > 0, "e3fast: kernel_size and stride must be positive, got ",
                kernel_size, " and ", stride);
    TORCH_CHECK(g.in[a] >= g.kernel[a], "e3fast: input spatial size ", input_size, " is smaller than kernel_size ",
                kernel_size);
    g.out[a] = (g.in[a] - g.kernel[a]) / g.stride[a] + 1;
  }
  return g;
}

at::ScalarType argmax_dtype(const PoolGeometry& g) { return g.window() <= 256 ? at::kByte : at::kInt; }

std::vector<Field> read_fields(const at::Tensor& fields, int64_t channels) {
  TORCH_CHECK(fields.device().is_cpu(), "e3fast: fields must be a CPU tensor, got ", fields.device());
  TORCH_CHECK(fields.scalar_type() == at::kLong, "e3fast: fields must be int64, got ", fields.scalar_type());
  TORCH_CHECK(fields.dim() == 2 && fields.size(1) >= 2, "e3fast: fields must have shape [num_fields, 4], got ",
              fields.sizes());
  const auto table = fields.contiguous();
  const int64_t* data = table.data_ptr<int64_t>();
  std::vector<Field> result(table.size(0));
  std::vector<char> claimed(channels, 0);
  for (size_t f = 0; f < result.size(); ++f) {
    const int64_t* row = data + f * table.size(1);
    result[f] = Field{row[0], row[1]};
    TORCH_CHECK(row[0] >= 0 && row[1] > 0 && row[0] + row[1] <= channels, "e3fast: fields row ", f, " (start ", row[0],
                ", dim ", row[1], ") does not fit in ", channels, " channels");
    for (int64_t c = row[0]; c < row[0] + row[1]; ++c) {
      TORCH_CHECK(!claimed[c], "e3fast: channel ", c, " belongs to two rows of fields");
      claimed[c] = 1;
    }
  }
  return result;
}

// Whether the (non-overlapping) fields cover every channel.
bool covers_all_channels(const std::vector<Field>& fields, int64_t channels) {
  int64_t covered = 0;
  for (const Field& f : fields) covered += f.dim;
  return covered == channels;
}

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// x itself when NCDHW- or channels_last_3d-contiguous, else an NCDHW copy.
at::Tensor in_supported_layout(const at::Tensor& t) {
  return is_channels_last(t) ? t : t.contiguous();
}

void check_voxel_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "e3fast: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "e3fast: ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 5, "e3fast: ", name, " must be 5-D [batch, channels, x, y, z], got ", t.sizes());
}

// Element strides of a 5-D tensor: batch, channel, and one per spatial axis.
struct Strides {
  int64_t batch, channel;
  Triple spatial;
  explicit Strides(const at::Tensor& t)
      : batch(t.stride(0)), channel(t.stride(1)), spatial{t.stride(2), t.stride(3), t.stride(4)} {}
  int64_t voxel(int64_t x, int64_t y, int64_t z) const { return x * spatial[0] + y * spatial[1] + z * spatial[2]; }
};

// Offsets (relative to the window's corner) of the window positions p, in raster order.
std::vector<int64_t> window_offsets(const PoolGeometry& g, const Strides& s) {
  std::vector<int64_t> offsets;
  offsets.reserve(g.window());
  for (int64_t i = 0; i < g.kernel[0]; ++i)
    for (int64_t j = 0; j < g.kernel[1]; ++j)
      for (int64_t k = 0; k < g.kernel[2]; ++k) offsets.push_back(s.voxel(i, j, k));
  return offsets;
}

// Score of one field at one voxel; `values` points at channel `start`, components `channel_stride` apart.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t field_score(const scalar_t* values, int64_t dim, int64_t channel_stride) {
  if (dim == 1) return static_cast<acc_t>(values[0]);
  acc_t sum = 0;
  for (int64_t m = 0; m < dim; ++m) {
    const acc_t v = static_cast<acc_t>(values[m * channel_stride]);
    sum += v * v;
  }
  return std::sqrt(sum);
}

template <typename acc_t>
inline bool replaces_maximum(acc_t score, acc_t best) {
  return score > best || std::isnan(score);
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
void pool_channels_first(const at::Tensor& x, at::Tensor& y, at::Tensor& argmax, const std::vector<Field>& fields,
                         const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides xs(x), ys(y);
  const auto offsets = window_offsets(g, xs);
  const int64_t num_fields = fields.size();
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  index_t* argmax_data = argmax.data_ptr<index_t>();
  const int64_t rows = x.size(0) * num_fields * g.out[0];

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t ox = row % g.out[0], bf = row / g.out[0];
      const int64_t f = bf % num_fields, b = bf / num_fields;
      const Field field = fields[f];
      const scalar_t* x_field = x_data + b * xs.batch + field.start * xs.channel;
      scalar_t* y_field = y_data + b * ys.batch + field.start * ys.channel;
      index_t* argmax_row = argmax_data + (bf * g.out[0] + ox) * g.out[1] * g.out[2];
      for (int64_t oy = 0; oy < g.out[1]; ++oy) {
        for (int64_t oz = 0; oz < g.out[2]; ++oz) {
          const scalar_t* corner = x_field + xs.voxel(ox * g.stride[0], oy * g.stride[1], oz * g.stride[2]);
          acc_t best = -std::numeric_limits<acc_t>::infinity();
          int64_t best_p = 0;
          for (int64_t p = 0; p < g.window(); ++p) {
            const acc_t score = field_score<scalar_t>(corner + offsets[p], field.dim, xs.channel);
            if (replaces_maximum(score, best)) {
              best = score;
              best_p = p;
            }
          }
          const scalar_t* source = corner + offsets[best_p];
          scalar_t* target = y_field + ys.voxel(ox, oy, oz);
          for (int64_t m = 0; m < field.dim; ++m) target[m * ys.channel] = source[m * xs.channel];
          argmax_row[oy * g.out[2] + oz] = static_cast<index_t>(best_p);
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void pool_channels_last(const at::Tensor& x, at::Tensor& y, at::Tensor& argmax, const std::vector<Field>& fields,
                        const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides xs(x), ys(y);
  const auto offsets = window_offsets(g, xs);
  const int64_t num_fields = fields.size(), out_voxels = g.out_voxels();
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  index_t* argmax_data = argmax.data_ptr<index_t>();

  at::parallel_for(0, x.size(0) * out_voxels, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(num_fields);
    std::vector<int64_t> best_p(num_fields);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / out_voxels, o = item % out_voxels;
      const int64_t oz = o % g.out[2], oy = (o / g.out[2]) % g.out[1], ox = o / (g.out[1] * g.out[2]);
      const scalar_t* corner =
          x_data + b * xs.batch + xs.voxel(ox * g.stride[0], oy * g.stride[1], oz * g.stride[2]);
      std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(best_p.begin(), best_p.end(), 0);
      for (int64_t p = 0; p < g.window(); ++p) {
        const scalar_t* voxel = corner + offsets[p];
        for (int64_t f = 0; f < num_fields; ++f) {
          const acc_t score = field_score<scalar_t>(voxel + fields[f].start, fields[f].dim, 1);
          if (replaces_maximum(score, best[f])) {
            best[f] = score;
            best_p[f] = p;
          }
        }
      }
      scalar_t* target = y_data + b * ys.batch + ys.voxel(ox, oy, oz);
      for (int64_t f = 0; f < num_fields; ++f) {
        const scalar_t* source = corner + offsets[best_p[f]] + fields[f].start;
        for (int64_t m = 0; m < fields[f].dim; ++m) target[fields[f].start + m] = source[m];
        argmax_data[(b * num_fields + f) * out_voxels + o] = static_cast<index_t>(best_p[f]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> norm_max_pool3d_cpu(const at::Tensor& x_in, const at::Tensor& fields_table,
                                                       at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  check_voxel_tensor(x_in, "x");
  const auto x = in_supported_layout(x_in);
  const auto fields = read_fields(fields_table, x.size(1));
  const PoolGeometry g = make_geometry(x.sizes().slice(2), kernel_size, stride);
  const bool channels_last = is_channels_last(x);
  auto y = at::empty({x.size(0), x.size(1), g.out[0], g.out[1], g.out[2]},
                     x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast3d
                                                             : at::MemoryFormat::Contiguous));
  if (!covers_all_channels(fields, x.size(1))) y.zero_();  // channels outside every field are not pooled
  auto argmax = at::empty({x.size(0), static_cast<int64_t>(fields.size()), g.out[0], g.out[1], g.out[2]},
                          x.options().dtype(argmax_dtype(g)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_max_pool3d", [&] {
    if (argmax.scalar_type() == at::kByte) {
      channels_last ? pool_channels_last<scalar_t, uint8_t>(x, y, argmax, fields, g)
                    : pool_channels_first<scalar_t, uint8_t>(x, y, argmax, fields, g);
    } else {
      channels_last ? pool_channels_last<scalar_t, int32_t>(x, y, argmax, fields, g)
                    : pool_channels_first<scalar_t, int32_t>(x, y, argmax, fields, g);
    }
  });
  return {y, argmax};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

// Output voxels along one axis whose window contains input coordinate n: [first, last).
struct WindowRange {
  int64_t first, last;
};

inline WindowRange windows_containing(int64_t n, int64_t kernel, int64_t stride, int64_t out) {
  // o * stride <= n < o * stride + kernel  <=>  (n - kernel) / stride < o <= n / stride
  const int64_t low = n - kernel + 1;
  const int64_t first = low <= 0 ? 0 : (low + stride - 1) / stride;
  const int64_t last = std::min(n / stride + 1, out);
  return {first, std::max(first, last)};
}

// Output voxels o whose window covers input voxel (nx, ny, nz), with the position p of the voxel
// in each window; `visit(o, p)` is called for each.
template <typename Visit>
inline void for_each_covering_window(const PoolGeometry& g, int64_t nx, int64_t ny, int64_t nz, Visit&& visit) {
  const WindowRange rx = windows_containing(nx, g.kernel[0], g.stride[0], g.out[0]);
  const WindowRange ry = windows_containing(ny, g.kernel[1], g.stride[1], g.out[1]);
  const WindowRange rz = windows_containing(nz, g.kernel[2], g.stride[2], g.out[2]);
  for (int64_t ox = rx.first; ox < rx.last; ++ox)
    for (int64_t oy = ry.first; oy < ry.last; ++oy)
      for (int64_t oz = rz.first; oz < rz.last; ++oz) {
        const int64_t p = ((nx - ox * g.stride[0]) * g.kernel[1] + (ny - oy * g.stride[1])) * g.kernel[2] +
                          (nz - oz * g.stride[2]);
        visit((ox * g.out[1] + oy) * g.out[2] + oz, p);
      }
}

template <typename scalar_t, typename index_t>
void unpool_channels_first(const at::Tensor& grad_y, const at::Tensor& argmax, at::Tensor& grad_x,
                           const std::vector<Field>& fields, const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides gys(grad_y), gxs(grad_x);
  const int64_t num_fields = fields.size(), out_voxels = g.out_voxels();
  const scalar_t* gy_data = grad_y.data_ptr<scalar_t>();
  const index_t* argmax_data = argmax.data_ptr<index_t>();
  scalar_t* gx_data = grad_x.data_ptr<scalar_t>();
  const int64_t rows = grad_x.size(0) * num_fields * g.in[0];

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t nx = row % g.in[0], bf = row / g.in[0];
      const int64_t f = bf % num_fields, b = bf / num_fields;
      const Field field = fields[f];
      const index_t* argmax_field = argmax_data + bf * out_voxels;
      const scalar_t* gy_field = gy_data + b * gys.batch + field.start * gys.channel;
      scalar_t* gx_field = gx_data + b * gxs.batch + field.start * gxs.channel;
      sum.resize(field.dim);
      for (int64_t ny = 0; ny < g.in[1]; ++ny) {
        for (int64_t nz = 0; nz < g.in[2]; ++nz) {
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for_each_covering_window(g, nx, ny, nz, [&](int64_t o, int64_t p) {
            if (static_cast<int64_t>(argmax_field[o]) != p) return;
            const scalar_t* source = gy_field + gys.voxel(o / (g.out[1] * g.out[2]), (o / g.out[2]) % g.out[1],
                                                          o % g.out[2]);
            for (int64_t m = 0; m < field.dim; ++m) sum[m] += static_cast<acc_t>(source[m * gys.channel]);
          });
          scalar_t* target = gx_field + gxs.voxel(nx, ny, nz);
          for (int64_t m = 0; m < field.dim; ++m) target[m * gxs.channel] = static_cast<scalar_t>(sum[m]);
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void unpool_channels_last(const at::Tensor& grad_y, const at::Tensor& argmax, at::Tensor& grad_x,
                          const std::vector<Field>& fields, const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides gys(grad_y), gxs(grad_x);
  const int64_t num_fields = fields.size(), out_voxels = g.out_voxels(), in_voxels = g.in_voxels();
  const int64_t channels = grad_x.size(1);
  const scalar_t* gy_data = grad_y.data_ptr<scalar_t>();
  const index_t* argmax_data = argmax.data_ptr<index_t>();
  scalar_t* gx_data = grad_x.data_ptr<scalar_t>();

  at::parallel_for(0, grad_x.size(0) * in_voxels, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(channels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / in_voxels, n = item % in_voxels;
      const int64_t nz = n % g.in[2], ny = (n / g.in[2]) % g.in[1], nx = n / (g.in[1] * g.in[2]);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      const index_t* argmax_sample = argmax_data + b * num_fields * out_voxels;
      const scalar_t* gy_sample = gy_data + b * gys.batch;
      for_each_covering_window(g, nx, ny, nz, [&](int64_t o, int64_t p) {
        const scalar_t* source =
            gy_sample + gys.voxel(o / (g.out[1] * g.out[2]), (o / g.out[2]) % g.out[1], o % g.out[2]);
        for (int64_t f = 0; f < num_fields; ++f) {
          if (static_cast<int64_t>(argmax_sample[f * out_voxels + o]) != p) continue;
          for (int64_t m = fields[f].start; m < fields[f].start + fields[f].dim; ++m) {
            sum[m] += static_cast<acc_t>(source[m]);
          }
        }
      });
      scalar_t* target = gx_data + b * gxs.batch + gxs.voxel(nx, ny, nz);
      for (int64_t c = 0; c < channels; ++c) target[c] = static_cast<scalar_t>(sum[c]);
    }
  });
}

at::Tensor norm_max_pool3d_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& argmax_in,
                                        const at::Tensor& fields_table, at::IntArrayRef input_size,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  check_voxel_tensor(grad_y_in, "grad_y");
  const auto grad_y = in_supported_layout(grad_y_in);
  const auto fields = read_fields(fields_table, grad_y.size(1));
  const PoolGeometry g = make_geometry(input_size, kernel_size, stride);
  TORCH_CHECK(grad_y.size(2) == g.out[0] && grad_y.size(3) == g.out[1] && grad_y.size(4) == g.out[2],
              "e3fast: grad_y has spatial size ", grad_y.sizes().slice(2), " but pooling ", input_size, " with kernel ",
              kernel_size, " and stride ", stride, " gives ", at::IntArrayRef(g.out.data(), 3));
  TORCH_CHECK(argmax_in.device().is_cpu(), "e3fast: argmax must be a CPU tensor, got ", argmax_in.device());
  TORCH_CHECK(argmax_in.scalar_type() == argmax_dtype(g), "e3fast: argmax must have dtype ", argmax_dtype(g),
              " for a window of ", g.window(), " voxels, got ", argmax_in.scalar_type());
  const std::vector<int64_t> argmax_shape{grad_y.size(0), static_cast<int64_t>(fields.size()), g.out[0], g.out[1],
                                          g.out[2]};
  TORCH_CHECK(argmax_in.sizes() == at::IntArrayRef(argmax_shape), "e3fast: argmax must have shape ",
              at::IntArrayRef(argmax_shape), ", got ", argmax_in.sizes());
  const auto argmax = argmax_in.contiguous();
  const bool channels_last = is_channels_last(grad_y);
  auto grad_x = at::empty({grad_y.size(0), grad_y.size(1), g.in[0], g.in[1], g.in[2]},
                          grad_y.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast3d
                                                                       : at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "e3fast::norm_max_pool3d_backward",
                                  [&] {
    if (channels_last) {
      // Writes every channel of every voxel (zero where no field or window reaches).
      argmax.scalar_type() == at::kByte ? unpool_channels_last<scalar_t, uint8_t>(grad_y, argmax, grad_x, fields, g)
                                        : unpool_channels_last<scalar_t, int32_t>(grad_y, argmax, grad_x, fields, g);
    } else {
      if (!covers_all_channels(fields, grad_x.size(1))) grad_x.zero_();  // channels outside every field get zero
      argmax.scalar_type() == at::kByte ? unpool_channels_first<scalar_t, uint8_t>(grad_y, argmax, grad_x, fields, g)
                                        : unpool_channels_first<scalar_t, int32_t>(grad_y, argmax, grad_x, fields, g);
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(e3fast, CPU, m) {
  m.impl("norm_max_pool3d", &norm_max_pool3d_cpu);
  m.impl("norm_max_pool3d_backward", &norm_max_pool3d_backward_cpu);
}

}  // namespace e3fast
