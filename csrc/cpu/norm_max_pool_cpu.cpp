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
// Backward (windows overlap when stride < kernel):
//
//   dx[b, start + m, n] = sum_{o : n in W(o), p*(o) = n - o * s} dy[b, start + m, o]
//
// Both passes work on z-lines of one field: forward on the output line (b, f, ox, oy, :), each
// window position p for the whole line at once (branch free, it vectorizes along z); backward on
// the input line (b, f, nx, ny, :), whose gradient one thread sums in opmath and writes once, so
// there are no races. x, y, dy and dx are read and written in place, in NCDHW or channels_last_3d
// layout; only the order of the lines differs: field-major for NCDHW (a line walks one channel
// plane), field-minor for channels-last (the fields of a line share the same voxels in cache).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

int64_t covered_channels(const std::vector<Field>& fields) {
  int64_t covered = 0;
  for (const Field& f : fields) covered += f.dim;
  return covered;
}

// Whether the (non-overlapping) fields cover every channel.
bool covers_all_channels(const std::vector<Field>& fields, int64_t channels) {
  return covered_channels(fields) == channels;
}

// Items per at::parallel_for chunk for about at::internal::GRAIN_SIZE operations per chunk: small
// problems stay on the calling thread instead of waking (and waiting for) the thread pool.
int64_t grain_size(int64_t total_work, int64_t items) {
  const int64_t work_per_item = std::max<int64_t>(1, total_work / std::max<int64_t>(1, items));
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_item);
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

// One z-line of one field: line index -> (b, field, x, y) with fields outermost (NCDHW) or
// innermost (channels-last), matching the memory order.
struct LineIndex {
  int64_t b, f, x, y;
};

LineIndex decompose_line(int64_t line, int64_t num_fields, int64_t size_x, int64_t size_y, bool channels_last) {
  if (channels_last) {
    const int64_t f = line % num_fields, rest = line / num_fields;
    return {rest / (size_x * size_y), f, (rest / size_y) % size_x, rest % size_y};
  }
  const int64_t y = line % size_y, x = (line / size_y) % size_x, bf = line / (size_x * size_y);
  return {bf / num_fields, bf % num_fields, x, y};
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

// Per-thread buffers of one output line: the key (value or squared norm) at window position p and
// the running maximum score and its position.
template <typename acc_t>
struct LineArgmax {
  std::vector<acc_t> key, best;
  std::vector<int32_t> position;
  explicit LineArgmax(int64_t length) : key(length), best(length), position(length) {}

  void reset() {
    std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
    std::fill(position.begin(), position.end(), 0);
  }

  // key[oz] for window position p; `values` points at the field's first channel at p for oz = 0.
  template <typename scalar_t>
  void load_keys(const scalar_t* values, int64_t dim, int64_t channel_stride, int64_t z_step) {
    const int64_t length = key.size();
    if (dim == 1) {
      for (int64_t oz = 0; oz < length; ++oz) key[oz] = static_cast<acc_t>(values[oz * z_step]);
      return;
    }
    std::fill(key.begin(), key.end(), acc_t(0));
    for (int64_t m = 0; m < dim; ++m) {
      const scalar_t* component = values + m * channel_stride;
      for (int64_t oz = 0; oz < length; ++oz) {
        const acc_t v = static_cast<acc_t>(component[oz * z_step]);
        key[oz] += v * v;
      }
    }
  }

  void update(int64_t dim, int32_t p) {
    const int64_t length = key.size();
    for (int64_t oz = 0; oz < length; ++oz) {
      const acc_t score = dim == 1 ? key[oz] : std::sqrt(key[oz]);
      const bool wins = score > best[oz] || score != score;  // strict: the first maximum wins; NaN wins
      best[oz] = wins ? score : best[oz];
      position[oz] = wins ? p : position[oz];
    }
  }
};

template <typename scalar_t, typename index_t>
void pool(const at::Tensor& x, at::Tensor& y, at::Tensor& argmax, const std::vector<Field>& fields,
          const PoolGeometry& g, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides xs(x), ys(y);
  const auto offsets = window_offsets(g, xs);
  const int64_t num_fields = fields.size(), length = g.out[2], z_step = g.stride[2] * xs.spatial[2];
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  index_t* argmax_data = argmax.data_ptr<index_t>();
  const int64_t lines = x.size(0) * num_fields * g.out[0] * g.out[1];
  const int64_t work = x.size(0) * covered_channels(fields) * g.out_voxels() * g.window();

  at::parallel_for(0, lines, grain_size(work, lines), [&](int64_t begin, int64_t end) {
    LineArgmax<acc_t> line_argmax(length);
    for (int64_t line = begin; line < end; ++line) {
      const LineIndex l = decompose_line(line, num_fields, g.out[0], g.out[1], channels_last);
      const Field field = fields[l.f];
      const scalar_t* corner = x_data + l.b * xs.batch + field.start * xs.channel +
                               xs.voxel(l.x * g.stride[0], l.y * g.stride[1], 0);
      line_argmax.reset();
      for (int64_t p = 0; p < g.window(); ++p) {
        line_argmax.load_keys(corner + offsets[p], field.dim, xs.channel, z_step);
        line_argmax.update(field.dim, static_cast<int32_t>(p));
      }
      scalar_t* y_line = y_data + l.b * ys.batch + field.start * ys.channel + ys.voxel(l.x, l.y, 0);
      index_t* argmax_line = argmax_data + (l.b * num_fields + l.f) * g.out_voxels() + (l.x * g.out[1] + l.y) * length;
      for (int64_t oz = 0; oz < length; ++oz) {
        const int32_t p = line_argmax.position[oz];
        const scalar_t* source = corner + offsets[p] + oz * z_step;
        for (int64_t m = 0; m < field.dim; ++m) y_line[m * ys.channel + oz * ys.spatial[2]] = source[m * xs.channel];
        argmax_line[oz] = static_cast<index_t>(p);
      }
    }
  });
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor> norm_max_pool3d_cpu(const at::Tensor& x_in, const at::Tensor& fields_table,
                                                       at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  check_voxel_tensor(x_in, "x");
  const auto x = in_supported_layout(x_in);
  const auto fields = read_fields(fields_table, x.size(1));
  const PoolGeometry g = make_geometry(x.sizes().slice(2), kernel_size, stride);
  const bool channels_last = is_channels_last(x);
  auto y = at::empty({x.size(0), x.size(1), g.out[0], g.out[1], g.out[2]},
                     x.options().memory_format(memory_format(channels_last)));
  if (!covers_all_channels(fields, x.size(1))) y.zero_();  // channels outside every field are not pooled
  auto argmax = at::empty({x.size(0), static_cast<int64_t>(fields.size()), g.out[0], g.out[1], g.out[2]},
                          x.options().dtype(argmax_dtype(g)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_max_pool3d", [&] {
    if (argmax.scalar_type() == at::kByte) {
      pool<scalar_t, uint8_t>(x, y, argmax, fields, g, channels_last);
    } else {
      pool<scalar_t, int32_t>(x, y, argmax, fields, g, channels_last);
    }
  });
  return {y, argmax};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

// Output coordinates along one axis whose window contains input coordinate n: [first, last).
struct WindowRange {
  int64_t first, last;
};

WindowRange windows_containing(int64_t n, int64_t kernel, int64_t stride, int64_t out) {
  // o * stride <= n < o * stride + kernel  <=>  (n - kernel) / stride < o <= n / stride
  const int64_t low = n - kernel + 1;
  const int64_t first = low <= 0 ? 0 : (low + stride - 1) / stride;
  const int64_t last = std::min(n / stride + 1, out);
  return {first, std::max(first, last)};
}

// Window position p decoded into its offsets (i, j, k) along x, y, z.
struct WindowPositions {
  std::vector<int64_t> i, j, k;
  explicit WindowPositions(const PoolGeometry& g) {
    for (int64_t p = 0; p < g.window(); ++p) {
      i.push_back(p / (g.kernel[1] * g.kernel[2]));
      j.push_back((p / g.kernel[2]) % g.kernel[1]);
      k.push_back(p % g.kernel[2]);
    }
  }
  int64_t size() const { return static_cast<int64_t>(i.size()); }
};

template <typename scalar_t, typename index_t>
void unpool(const at::Tensor& grad_y, const at::Tensor& argmax, at::Tensor& grad_x, const std::vector<Field>& fields,
            const PoolGeometry& g, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides gys(grad_y), gxs(grad_x);
  const WindowPositions positions(g);
  const int64_t num_fields = fields.size(), length = g.in[2];
  const scalar_t* gy_data = grad_y.data_ptr<scalar_t>();
  const index_t* argmax_data = argmax.data_ptr<index_t>();
  scalar_t* gx_data = grad_x.data_ptr<scalar_t>();
  const int64_t lines = grad_x.size(0) * num_fields * g.in[0] * g.in[1];
  const int64_t work = grad_x.size(0) * (covered_channels(fields) * g.in[0] * g.in[1] * length +
                                         num_fields * g.out_voxels() * g.window());

  at::parallel_for(0, lines, grain_size(work, lines), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum;  // [m, nz]
    for (int64_t line = begin; line < end; ++line) {
      const LineIndex l = decompose_line(line, num_fields, g.in[0], g.in[1], channels_last);
      const Field field = fields[l.f];
      const scalar_t* gy_field = gy_data + l.b * gys.batch + field.start * gys.channel;
      const index_t* argmax_field = argmax_data + (l.b * num_fields + l.f) * g.out_voxels();
      sum.assign(field.dim * length, acc_t(0));
      const WindowRange rx = windows_containing(l.x, g.kernel[0], g.stride[0], g.out[0]);
      const WindowRange ry = windows_containing(l.y, g.kernel[1], g.stride[1], g.out[1]);
      for (int64_t ox = rx.first; ox < rx.last; ++ox) {
        for (int64_t oy = ry.first; oy < ry.last; ++oy) {
          const int64_t i = l.x - ox * g.stride[0], j = l.y - oy * g.stride[1];
          const index_t* argmax_line = argmax_field + (ox * g.out[1] + oy) * g.out[2];
          for (int64_t oz = 0; oz < g.out[2]; ++oz) {
            const int64_t p = argmax_line[oz];
            if (p >= positions.size() || positions.i[p] != i || positions.j[p] != j) continue;
            const int64_t nz = oz * g.stride[2] + positions.k[p];
            const scalar_t* source = gy_field + gys.voxel(ox, oy, oz);
            for (int64_t m = 0; m < field.dim; ++m) sum[m * length + nz] += static_cast<acc_t>(source[m * gys.channel]);
          }
        }
      }
      scalar_t* target = gx_data + l.b * gxs.batch + field.start * gxs.channel + gxs.voxel(l.x, l.y, 0);
      for (int64_t m = 0; m < field.dim; ++m)
        for (int64_t nz = 0; nz < length; ++nz)
          target[m * gxs.channel + nz * gxs.spatial[2]] = static_cast<scalar_t>(sum[m * length + nz]);
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
                          grad_y.options().memory_format(memory_format(channels_last)));
  if (!covers_all_channels(fields, grad_x.size(1))) grad_x.zero_();  // channels outside every field get zero
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "e3fast::norm_max_pool3d_backward",
                                  [&] {
    if (argmax.scalar_type() == at::kByte) {
      unpool<scalar_t, uint8_t>(grad_y, argmax, grad_x, fields, g, channels_last);
    } else {
      unpool<scalar_t, int32_t>(grad_y, argmax, grad_x, fields, g, channels_last);
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
