// CPU kernels of e3fast::norm_gate and e3fast::norm_gate_backward: equivariant normalization
// fused with the gated nonlinearity (e3nn's BatchNorm then Gate), see e3fast/ops/norm_gate.py.
//
// x [B, C_in, X, Y, Z], N = X*Y*Z voxels, NCDHW or channels_last_3d (read in place).
// Field f (table `fields`: start, dim d, scalar index s or -1, divisor delta) owns channels
// [start, start + d). A statistics group is (b, f) in instance mode (Ng = N voxels) or f in
// batch mode (Ng = B*N):
//
//   mu_f   = mean of x_f over the group        (even scalars, d = 1; else 0)
//   var_f  = sum_{group, m} (x_{f,m} - mu_f)^2 / (Ng * delta_f)
//   inv_f  = (var_f + eps)^(-1/2),  xhat = (x - mu_f) * inv_f,  z = gamma_f * xhat + beta_s
//   y_c    = a(act_c) act_c(z[source_c]) * (gate_c >= 0 ? a(gact_c) gact_c(z[gate_c]) : 1)
//
// Running mode uses running_mean / running_var as mu / var; mode none uses z = x.
//
// Backward, with g_z = dL/dz (chain rule through the gate table), g = gamma * g_z:
//
//   d gamma_f = sum g_z * xhat (all groups),  d beta_s = sum g_z
//   dx = inv * (g - [scalar] mean_group(g) - xhat * sum_group(g * xhat) / (Ng * delta))
//        (instance, batch);  dx = inv * g (running);  dx = g_z (none)
//
// Passes over memory. Forward: statistics (instance, batch), then normalize + gate + write y.
// Backward: sums of g_z and g_z * xhat per group (instance, batch, running), then grad_x; z and
// g_z are recomputed from x, the statistics and grad_y in each pass.
//
// Work is split into tiles of T voxels of one sample, in contiguous chunks of tiles, one per
// thread. The buffered passes load a tile of every channel into a channel-major buffer
// [C][T] of opmath_t (float for float/bfloat16/half), normalizing on the way, whatever the memory
// layout (channels-last tiles are transposed in 4 x 4 SSE blocks), so that every arithmetic
// loop runs over contiguous rows and vectorises; float activations use exp/tanh polynomials
// written for that. Sums are taken in double, per chunk, and merged after the parallel loop;
// variances use sums of x - shift, shift = one value of the group per channel, so a large
// common offset does not cancel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace e3fast {
namespace {

constexpr int64_t kModeNone = 0;
constexpr int64_t kModeInstance = 1;
constexpr int64_t kModeBatch = 2;
constexpr int64_t kModeRunning = 3;

enum Activation : int64_t { kIdentity = 0, kRelu, kTanh, kSigmoid, kSilu, kAbs, kNumActivations };

// Tiles of voxels: the buffered passes hold about kTileValues values of all channels in one
// [channels][tile] buffer (a multiple of kTileAlign voxels, at most kMaxTile); the statistics
// pass reads kStreamTile voxels of each channel at a time, without buffers.
constexpr int64_t kTileValues = 32768;
constexpr int64_t kTileAlign = 16;
constexpr int64_t kMaxTile = 512;
constexpr int64_t kStreamTile = 4096;
constexpr int64_t kCacheLine = 64;
// Values (voxels times channels) below which a parallel task does not pay for itself.
constexpr int64_t kMinTaskValues = 32768;

// ------------------------------------------------------------------------------------------
// Tables
// ------------------------------------------------------------------------------------------

struct FieldTable {
  std::vector<int64_t> start, dim, scalar_index, divisor;  // per field
  std::vector<int64_t> field_of_channel;                  // per input channel
  int64_t num_scalars = 0;

  int64_t num_fields() const { return static_cast<int64_t>(start.size()); }
  int64_t channels() const { return static_cast<int64_t>(field_of_channel.size()); }
  bool is_scalar(int64_t f) const { return scalar_index[f] >= 0; }
};

struct GateTable {
  std::vector<int64_t> source, act, gate_slot;  // per output channel; gate_slot -1: no gate
  std::vector<int64_t> gate_channel, gate_act;  // per distinct (gate channel, gate act) pair
  std::vector<double> scale;                    // per activation id

  int64_t out_channels() const { return static_cast<int64_t>(source.size()); }
  int64_t num_gates() const { return static_cast<int64_t>(gate_channel.size()); }
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "e3fast::norm_gate (CPU kernel): ", name, " must be a CPU tensor, got ",
              t.device());
}

void check_optional_vector(const std::optional<at::Tensor>& t, const char* name, int64_t size) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "e3fast::norm_gate: ", name,
              " must be a floating point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, "e3fast::norm_gate: ", name, " must have shape [", size,
              "], got ", t->sizes());
}

std::vector<int64_t> int64_rows(const at::Tensor& table, const char* name) {
  check_cpu(table, name);
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(1) == 4,
              "e3fast::norm_gate: ", name, " must be an int64 tensor [rows, 4], got ", table.scalar_type(), " ",
              table.sizes());
  const at::Tensor rows = table.contiguous();
  const int64_t* data = rows.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + rows.numel());
}

FieldTable read_fields(const at::Tensor& fields, int64_t channels) {
  const std::vector<int64_t> rows = int64_rows(fields, "fields");
  FieldTable table;
  int64_t next_channel = 0;
  for (size_t row = 0; row < rows.size(); row += 4) {
    const int64_t f = static_cast<int64_t>(row / 4);
    const int64_t start = rows[row], dim = rows[row + 1], scalar = rows[row + 2], divisor = rows[row + 3];
    TORCH_CHECK(start == next_channel && dim >= 1 && divisor >= 1, "e3fast::norm_gate: fields row ", f,
                " = (", start, ", ", dim, ", ", scalar, ", ", divisor,
                ") must continue the channel tiling at channel ", next_channel, " with dim >= 1 and divisor >= 1");
    TORCH_CHECK(scalar == -1 || (scalar == table.num_scalars && dim == 1), "e3fast::norm_gate: fields row ", f,
                " has scalar index ", scalar, "; expected -1 or ", table.num_scalars, " for a dim-1 field");
    table.start.push_back(start);
    table.dim.push_back(dim);
    table.scalar_index.push_back(scalar);
    table.divisor.push_back(divisor);
    table.field_of_channel.insert(table.field_of_channel.end(), dim, f);
    table.num_scalars += scalar >= 0;
    next_channel += dim;
  }
  TORCH_CHECK(next_channel == channels, "e3fast::norm_gate: fields cover ", next_channel,
              " channels but the input has ", channels);
  return table;
}

GateTable read_gates(const at::Tensor& gates, c10::ArrayRef<double> act_scales, int64_t channels) {
  TORCH_CHECK(static_cast<int64_t>(act_scales.size()) == kNumActivations, "e3fast::norm_gate: act_scales must have ",
              kNumActivations, " entries (one per activation id), got ", act_scales.size());
  const std::vector<int64_t> rows = int64_rows(gates, "gates");
  GateTable table;
  table.scale.assign(act_scales.begin(), act_scales.end());
  std::map<std::pair<int64_t, int64_t>, int64_t> slots;
  for (size_t row = 0; row < rows.size(); row += 4) {
    const int64_t source = rows[row], act = rows[row + 1], gate = rows[row + 2], gate_act = rows[row + 3];
    TORCH_CHECK(source >= 0 && source < channels && gate >= -1 && gate < channels && act >= 0 &&
                    act < kNumActivations && gate_act >= 0 && gate_act < kNumActivations,
                "e3fast::norm_gate: gates row ", row / 4, " = (", source, ", ", act, ", ", gate, ", ", gate_act,
                ") is out of range for ", channels, " input channels and ", kNumActivations, " activations");
    TORCH_CHECK(gate != source, "e3fast::norm_gate: gates row ", row / 4, " gates channel ", source, " by itself");
    table.source.push_back(source);
    table.act.push_back(act);
    int64_t slot = -1;
    if (gate >= 0) {
      auto inserted = slots.emplace(std::make_pair(gate, gate_act), table.num_gates());
      if (inserted.second) {
        table.gate_channel.push_back(gate);
        table.gate_act.push_back(gate_act);
      }
      slot = inserted.first->second;
    }
    table.gate_slot.push_back(slot);
  }
  return table;
}

// ------------------------------------------------------------------------------------------
// Memory layout and tiling
// ------------------------------------------------------------------------------------------

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !t.is_contiguous();
}

// `t` readable as NCDHW or channels_last_3d without a copy, when possible.
at::Tensor dense_voxels(const at::Tensor& t) { return is_channels_last(t) ? t : t.contiguous(); }

at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
}

// A [batch, channels, voxels] tensor in one of the two dense layouts.
template <typename T>
struct Voxels {
  T* data;
  int64_t batch, channels, voxels;
  bool channels_last;

  T* sample(int64_t b) const { return data + b * channels * voxels; }
  T& at(int64_t b, int64_t c, int64_t n) const {
    return sample(b)[channels_last ? n * channels + c : c * voxels + n];
  }
};

// `t` must be dense_voxels(...) already.
template <typename T>
Voxels<T> voxels_of(const at::Tensor& t) {
  const int64_t batch = t.size(0), channels = t.size(1);
  const int64_t voxels = t.size(2) * t.size(3) * t.size(4);
  return {t.data_ptr<std::remove_const_t<T>>(), batch, channels, voxels, is_channels_last(t)};
}

struct Tile {
  int64_t b, n0, len;
};

// Maps applied to each channel while loading a tile: `map.at(c)` is a function of the value.
struct CopyMap {
  CopyMap at(int64_t) const { return *this; }
  template <typename T>
  T operator()(T v) const { return v; }
};

template <typename T>
struct AffineRow {
  T shift, scale, offset;
  T operator()(T v) const { return (v - shift) * scale + offset; }
};

// v -> (v - shift[c]) * scale[c] + offset[c]; no offset when `offset` is null.
template <typename T>
struct AffineMap {
  const T* shift;
  const T* scale;
  const T* offset;
  AffineRow<T> at(int64_t c) const { return {shift[c], scale[c], offset ? offset[c] : T(0)}; }
};

// rows[c * stride + n] = voxels[n * channels + c] for n < len: a channels-last block, channel-major.
template <typename scalar_t, typename opmath_t>
void transpose_to_rows(const scalar_t* voxels, int64_t channels, int64_t len, opmath_t* rows, int64_t stride) {
  for (int64_t n = 0; n < len; ++n)
    for (int64_t c = 0; c < channels; ++c) rows[c * stride + n] = static_cast<opmath_t>(voxels[n * channels + c]);
}

// voxels[n * channels + c] = rows[c * stride + n] for n < len.
template <typename scalar_t, typename opmath_t>
void transpose_from_rows(const opmath_t* rows, int64_t stride, int64_t channels, int64_t len, scalar_t* voxels) {
  for (int64_t n = 0; n < len; ++n)
    for (int64_t c = 0; c < channels; ++c) voxels[n * channels + c] = static_cast<scalar_t>(rows[c * stride + n]);
}

#if defined(__SSE2__)
// float: 4 x 4 blocks through SSE registers (element by element, the loops above compile to
// scalar moves); the channels and voxels beyond a multiple of 4 one at a time.
inline void transpose_to_rows(const float* voxels, int64_t channels, int64_t len, float* rows, int64_t stride) {
  const int64_t len4 = len / 4 * 4, channels4 = channels / 4 * 4;
  for (int64_t n = 0; n < len4; n += 4) {
    const float* block = voxels + n * channels;
    for (int64_t c = 0; c < channels4; c += 4) {
      __m128 v0 = _mm_loadu_ps(block + c), v1 = _mm_loadu_ps(block + channels + c);
      __m128 v2 = _mm_loadu_ps(block + 2 * channels + c), v3 = _mm_loadu_ps(block + 3 * channels + c);
      _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
      _mm_storeu_ps(rows + c * stride + n, v0);
      _mm_storeu_ps(rows + (c + 1) * stride + n, v1);
      _mm_storeu_ps(rows + (c + 2) * stride + n, v2);
      _mm_storeu_ps(rows + (c + 3) * stride + n, v3);
    }
    for (int64_t c = channels4; c < channels; ++c)
      for (int64_t j = 0; j < 4; ++j) rows[c * stride + n + j] = block[j * channels + c];
  }
  for (int64_t n = len4; n < len; ++n)
    for (int64_t c = 0; c < channels; ++c) rows[c * stride + n] = voxels[n * channels + c];
}

inline void transpose_from_rows(const float* rows, int64_t stride, int64_t channels, int64_t len, float* voxels) {
  const int64_t len4 = len / 4 * 4, channels4 = channels / 4 * 4;
  for (int64_t n = 0; n < len4; n += 4) {
    float* block = voxels + n * channels;
    for (int64_t c = 0; c < channels4; c += 4) {
      __m128 v0 = _mm_loadu_ps(rows + c * stride + n), v1 = _mm_loadu_ps(rows + (c + 1) * stride + n);
      __m128 v2 = _mm_loadu_ps(rows + (c + 2) * stride + n), v3 = _mm_loadu_ps(rows + (c + 3) * stride + n);
      _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
      _mm_storeu_ps(block + c, v0);
      _mm_storeu_ps(block + channels + c, v1);
      _mm_storeu_ps(block + 2 * channels + c, v2);
      _mm_storeu_ps(block + 3 * channels + c, v3);
    }
    for (int64_t c = channels4; c < channels; ++c)
      for (int64_t j = 0; j < 4; ++j) block[j * channels + c] = rows[c * stride + n + j];
  }
  for (int64_t n = len4; n < len; ++n)
    for (int64_t c = 0; c < channels; ++c) voxels[n * channels + c] = rows[c * stride + n];
}
#endif

// rows[c] = map.at(c)(rows[c]) (nothing to do for a copy).
template <typename opmath_t, typename Map>
void map_rows(const Map& map, int64_t channels, int64_t len, opmath_t* rows, int64_t stride) {
  for (int64_t c = 0; c < channels; ++c) {
    const auto row_map = map.at(c);
    opmath_t* row = rows + c * stride;
    for (int64_t n = 0; n < len; ++n) row[n] = row_map(row[n]);
  }
}

template <typename opmath_t>
void map_rows(const CopyMap&, int64_t, int64_t, opmath_t*, int64_t) {}

// buffer[c * stride + n] = map.at(c)(x[b, c, n0 + n]) for the tile's voxels, all channels.
template <typename scalar_t, typename opmath_t, typename Map>
void load_tile(const Voxels<const scalar_t>& src, const Tile& tile, const Map& map, opmath_t* buffer,
               int64_t stride) {
  const scalar_t* sample = src.sample(tile.b);
  if (src.channels_last) {
    transpose_to_rows(sample + tile.n0 * src.channels, src.channels, tile.len, buffer, stride);
    map_rows(map, src.channels, tile.len, buffer, stride);
  } else {
    for (int64_t c = 0; c < src.channels; ++c) {
      const auto row_map = map.at(c);
      const scalar_t* row = sample + c * src.voxels + tile.n0;
      opmath_t* out = buffer + c * stride;
      // The next tile's row: the hardware prefetchers do not follow this many short streams.
      for (int64_t n = 0; n < tile.len; n += kCacheLine / sizeof(scalar_t)) __builtin_prefetch(row + tile.len + n);
      for (int64_t n = 0; n < tile.len; ++n) out[n] = row_map(static_cast<opmath_t>(row[n]));
    }
  }
}

// The inverse of load_tile.
template <typename scalar_t, typename opmath_t>
void store_tile(const opmath_t* buffer, int64_t stride, const Voxels<scalar_t>& dst, const Tile& tile) {
  scalar_t* sample = dst.sample(tile.b);
  if (dst.channels_last) {
    transpose_from_rows(buffer, stride, dst.channels, tile.len, sample + tile.n0 * dst.channels);
  } else {
    for (int64_t c = 0; c < dst.channels; ++c) {
      scalar_t* row = sample + c * dst.voxels + tile.n0;
      const opmath_t* in = buffer + c * stride;
      for (int64_t n = 0; n < tile.len; ++n) row[n] = static_cast<scalar_t>(in[n]);
    }
  }
}

// Tiles of `size` voxels of one sample, grouped into contiguous chunks, one chunk per parallel
// task. Each chunk owns its slot of partial sums, so results do not depend on scheduling.
struct Tiling {
  int64_t batch, voxels, size, tiles_per_sample, num_tiles, num_chunks;

  // `channels` values per voxel; small inputs run on the calling thread alone.
  Tiling(int64_t batch_, int64_t voxels_, int64_t channels, int64_t max_size) : batch(batch_), voxels(voxels_) {
    size = std::max<int64_t>(1, std::min(max_size, voxels));
    tiles_per_sample = (voxels + size - 1) / size;
    num_tiles = batch * tiles_per_sample;
    const int64_t worth_a_task = (batch * voxels * channels + kMinTaskValues - 1) / kMinTaskValues;
    num_chunks = std::min({num_tiles, static_cast<int64_t>(at::get_num_threads()), worth_a_task});
  }

  // Tiles whose [channels][size] float buffers stay in cache.
  static Tiling buffered(int64_t batch, int64_t voxels, int64_t widest_channels) {
    const int64_t fit = kTileValues / std::max<int64_t>(1, widest_channels) / kTileAlign * kTileAlign;
    return Tiling(batch, voxels, widest_channels, std::min(std::max(kTileAlign, fit), kMaxTile));
  }

  // Row stride of [channels][size] buffers of `element_size` bytes: an odd number of cache
  // lines, so that the rows do not all map to the same few cache sets.
  int64_t buffer_stride(int64_t element_size) const {
    const int64_t per_line = kCacheLine / element_size, lines = (size + per_line - 1) / per_line;
    return (lines | 1) * per_line;
  }

  int64_t first_tile(int64_t chunk) const { return chunk * num_tiles / num_chunks; }

  Tile tile(int64_t t) const {
    const int64_t b = t / tiles_per_sample, n0 = (t % tiles_per_sample) * size;
    return {b, n0, std::min(size, voxels - n0)};
  }

  // f(chunk, first tile, end tile) for every chunk, in parallel.
  template <typename F>
  void for_each_chunk(const F& f) const {
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) f(chunk, first_tile(chunk), first_tile(chunk + 1));
    });
  }
};

// Element-wise sum of the per-chunk slices of `partial`.
std::vector<double> merge_chunks(const std::vector<double>& partial, int64_t num_chunks, size_t slice) {
  std::vector<double> total(slice, 0.0);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk)
    for (size_t i = 0; i < slice; ++i) total[i] += partial[chunk * slice + i];
  return total;
}

// ------------------------------------------------------------------------------------------
// Activations, one buffer row of `len` values at a time
// ------------------------------------------------------------------------------------------

// exp, expm1 and tanh in float written so that loops over them vectorise (Cephes' expf range
// reduction and polynomial, about 1 ulp); double uses libm. No select may have an arm that
// later arithmetic folds to a constant or that only one arm needs: GCC then branches, and a
// loop with branches around floating point operations stays scalar.

// v = k ln 2 + r with |r| <= ln(2) / 2: two_to_k = 2^k, em1 = e^r - 1.
// The bits of a float as an integer and back (std::bit_cast is C++20; torch < 2.10 builds extensions
// as C++17). memcpy of 4 bytes compiles to a register move.
inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline void exp_reduce(float v, float& two_to_k, float& em1) {
  v = std::copysign(std::min(std::abs(v), 87.0f), v);  // 2^k and e^v stay normal floats
  const float k = (v * 1.44269504089f + 12582912.0f) - 12582912.0f;  // round(v / ln 2)
  const float r = (v - k * 0.693359375f) + k * 2.12194440e-4f;         // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  two_to_k = float_from_bits(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  em1 = p * r * r + r;
}

inline float exp_of(float v) {
  float two_to_k, em1;
  exp_reduce(v, two_to_k, em1);
  return two_to_k * em1 + two_to_k;
}

inline double exp_of(double v) { return std::exp(v); }

// tanh(v) = m / (m + 2) with m = e^(2v) - 1, accurate near 0 as m is.
inline float tanh_of(float v) {
  float two_to_k, em1;
  exp_reduce(2.0f * v, two_to_k, em1);
  const float m = two_to_k * em1 + (two_to_k - 1.0f);
  return m / (m + 2.0f);
}

inline double tanh_of(double v) { return std::tanh(v); }

// 1 where v > 0, else 0; in float a bit mask, as a select of constants would become a branch.
inline float positive_step(float v) {
  return float_from_bits(bits_of(1.0f) & -static_cast<uint32_t>(v > 0.0f));
}

inline double positive_step(double v) { return v > 0.0 ? 1.0 : 0.0; }

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + exp_of(-v));
}

// The activations, element-wise: value(v) and value(v, derivative). Branch-free selects only,
// so that loops over them vectorise.
struct IdentityAct {
  template <typename T>
  static T value(T v) { return v; }
  template <typename T>
  static T value(T v, T& derivative) {
    derivative = T(1);
    return v;
  }
};

struct ReluAct {
  template <typename T>
  static T value(T v) { return v > T(0) ? v : T(0); }
  template <typename T>
  static T value(T v, T& derivative) {
    derivative = positive_step(v);
    return v * derivative;
  }
};

struct TanhAct {
  template <typename T>
  static T value(T v) { return tanh_of(v); }
  template <typename T>
  static T value(T v, T& derivative) {
    const T t = tanh_of(v);
    derivative = T(1) - t * t;
    return t;
  }
};

struct SigmoidAct {
  template <typename T>
  static T value(T v) { return sigmoid(v); }
  template <typename T>
  static T value(T v, T& derivative) {
    const T s = sigmoid(v);
    derivative = s * (T(1) - s);
    return s;
  }
};

struct SiluAct {
  template <typename T>
  static T value(T v) { return v * sigmoid(v); }
  template <typename T>
  static T value(T v, T& derivative) {
    const T s = sigmoid(v);
    derivative = s * (T(1) + v * (T(1) - s));
    return v * s;
  }
};

struct AbsAct {
  template <typename T>
  static T value(T v) { return std::abs(v); }
  template <typename T>
  static T value(T v, T& derivative) {
    derivative = positive_step(v) - positive_step(-v);
    return std::abs(v);
  }
};

// f(Act{}) with the activation struct of id `act`.
template <typename F>
void with_activation(int64_t act, const F& f) {
  switch (act) {
    case kIdentity: return f(IdentityAct{});
    case kRelu: return f(ReluAct{});
    case kTanh: return f(TanhAct{});
    case kSigmoid: return f(SigmoidAct{});
    case kSilu: return f(SiluAct{});
    case kAbs: return f(AbsAct{});
  }
}

// ------------------------------------------------------------------------------------------
// Statistics and per-channel coefficients
// ------------------------------------------------------------------------------------------

int64_t num_groups(int64_t mode, int64_t batch) { return mode == kModeInstance ? batch : 1; }

// Values per statistics group: N in instance mode, B*N in batch mode.
int64_t group_size(int64_t mode, int64_t batch, int64_t voxels) {
  return mode == kModeInstance ? voxels : batch * voxels;
}

// Per statistics group g and input channel c, at [g * C + c]; scale = gamma * inv_std.
template <typename opmath_t>
struct ChannelCoefficients {
  std::vector<opmath_t> mean, inv_std, gamma, beta, scale;

  // x -> z = (x - mean) * scale + beta and x -> xhat = (x - mean) * inv_std, for group g.
  AffineMap<opmath_t> normalize(int64_t g, int64_t channels) const {
    return {mean.data() + g * channels, scale.data() + g * channels, beta.data() + g * channels};
  }
  AffineMap<opmath_t> standardize(int64_t g, int64_t channels) const {
    return {mean.data() + g * channels, inv_std.data() + g * channels, nullptr};
  }
};

std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor values = t.to(at::kDouble).contiguous();
  return std::vector<double>(values.data_ptr<double>(), values.data_ptr<double>() + values.numel());
}

// The identity (mode none) or the affine normalization of the statistics mean [G, S], var [G, F].
template <typename opmath_t>
ChannelCoefficients<opmath_t> channel_coefficients(const FieldTable& fields, int64_t mode, const at::Tensor& mean,
                                                   const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias, double eps) {
  const bool normalized = mode != kModeNone;
  const int64_t channels = fields.channels(), groups = mean.size(0);
  const std::vector<double> means = as_doubles(mean), vars = as_doubles(var);
  const std::vector<double> gamma = weight ? as_doubles(*weight) : std::vector<double>(fields.num_fields(), 1.0);
  const std::vector<double> beta = bias ? as_doubles(*bias) : std::vector<double>(fields.num_scalars, 0.0);
  ChannelCoefficients<opmath_t> out;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t f = fields.field_of_channel[c], s = fields.scalar_index[f];
      const double inv_std = normalized ? 1.0 / std::sqrt(vars[g * fields.num_fields() + f] + eps) : 1.0;
      out.mean.push_back(normalized && s >= 0 ? means[g * fields.num_scalars + s] : 0.0);
      out.inv_std.push_back(inv_std);
      out.gamma.push_back(normalized ? gamma[f] : 1.0);
      out.beta.push_back(normalized && s >= 0 ? beta[s] : 0.0);
      out.scale.push_back(normalized ? inv_std * gamma[f] : 1.0);
    }
  }
  return out;
}

// z[c] = gamma_c * xhat[c] + beta_c for the channels of statistics group g.
template <typename opmath_t>
void affine_rows(const ChannelCoefficients<opmath_t>& k, int64_t g, int64_t channels, int64_t len, int64_t stride,
                 const opmath_t* xhat, opmath_t* z) {
  for (int64_t c = 0; c < channels; ++c) {
    const opmath_t gamma = k.gamma[g * channels + c], beta = k.beta[g * channels + c];
    const opmath_t* in = xhat + c * stride;
    opmath_t* out = z + c * stride;
    for (int64_t n = 0; n < len; ++n) out[n] = gamma * in[n] + beta;
  }
}

// Per (group, channel): the value at the group's first voxel for even scalars, else 0. Sums of
// x - shift and (x - shift)^2 then give the variance without cancellation for large means.
template <typename scalar_t>
std::vector<double> variance_shifts(const Voxels<const scalar_t>& x, const FieldTable& fields, int64_t groups) {
  std::vector<double> shift(groups * x.channels, 0.0);
  if (x.batch == 0 || x.voxels == 0) return shift;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < x.channels; ++c)
      if (fields.is_scalar(fields.field_of_channel[c])) shift[g * x.channels + c] = static_cast<double>(x.at(g, c, 0));
  return shift;
}

// Adds the tile's sum (x - shift) to sums[c] and sum (x - shift)^2 to squares[c], in double.
template <typename scalar_t>
void accumulate_moments(const Voxels<const scalar_t>& x, const Tile& tile, const double* __restrict shift,
                        double* __restrict sums, double* __restrict squares) {
  const scalar_t* sample = x.sample(tile.b);
  if (x.channels_last) {
    for (int64_t n = 0; n < tile.len; ++n) {
      const scalar_t* voxel = sample + (tile.n0 + n) * x.channels;
      for (int64_t c = 0; c < x.channels; ++c) {
        const double d = static_cast<double>(voxel[c]) - shift[c];
        sums[c] += d;
        squares[c] += d * d;
      }
    }
    return;
  }
  for (int64_t c = 0; c < x.channels; ++c) {
    const scalar_t* row = sample + c * x.voxels + tile.n0;
    const double k = shift[c];
    double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t n = 0; n < tile.len; ++n) {
      const double d = static_cast<double>(row[n]) - k;
      s1 += d;
      s2 += d * d;
    }
    sums[c] += s1;
    squares[c] += s2;
  }
}

// Per (group, channel): sum (x - shift) at [(g * 2) * C + c], sum (x - shift)^2 at [(g * 2 + 1) * C + c].
template <typename scalar_t>
std::vector<double> shifted_moments(const Voxels<const scalar_t>& x, int64_t mode, int64_t groups,
                                    const std::vector<double>& shift) {
  const int64_t channels = x.channels;
  const Tiling tiling(x.batch, x.voxels, channels, kStreamTile);
  const size_t slice = groups * 2 * channels;
  std::vector<double> partial(tiling.num_chunks * slice, 0.0);
  tiling.for_each_chunk([&](int64_t chunk, int64_t first, int64_t end) {
    for (int64_t t = first; t < end; ++t) {
      const Tile tile = tiling.tile(t);
      const int64_t g = mode == kModeInstance ? tile.b : 0;
      double* sums = partial.data() + chunk * slice + g * 2 * channels;
      accumulate_moments(x, tile, shift.data() + g * channels, sums, sums + channels);
    }
  });
  return merge_chunks(partial, tiling.num_chunks, slice);
}

// mean [G, S] and var [G, F] of x (instance or batch mode), written in stat_t.
template <typename scalar_t, typename opmath_t>
void compute_statistics(const Voxels<const scalar_t>& x, const FieldTable& fields, int64_t mode, at::Tensor& mean,
                        at::Tensor& var) {
  const int64_t groups = mean.size(0), channels = x.channels;
  const double count = static_cast<double>(group_size(mode, x.batch, x.voxels));
  const std::vector<double> shift = variance_shifts(x, fields, groups);
  const std::vector<double> moments = shifted_moments(x, mode, groups, shift);
  opmath_t* mean_out = mean.data_ptr<opmath_t>();
  opmath_t* var_out = var.data_ptr<opmath_t>();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t f = 0; f < fields.num_fields(); ++f) {
      const double* sums = moments.data() + g * 2 * channels + fields.start[f];
      const double* squares_of = sums + channels;
      const double denominator = count * static_cast<double>(fields.divisor[f]);
      double squares = 0.0;
      for (int64_t m = 0; m < fields.dim[f]; ++m) squares += squares_of[m];
      if (fields.is_scalar(f)) {
        const double offset = sums[0] / count;
        mean_out[g * fields.num_scalars + fields.scalar_index[f]] =
            static_cast<opmath_t>(shift[g * channels + fields.start[f]] + offset);
        squares -= sums[0] * offset;
      }
      var_out[g * fields.num_fields() + f] = static_cast<opmath_t>(std::max(0.0, squares / denominator));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Gate, forward and backward, on a tile of buffer rows [channel][stride]
// ------------------------------------------------------------------------------------------

// Row kernels. Distinct rows never alias (read_gates rejects a channel gating itself).

// out = scale * act(in) [* factor]
template <typename Act, typename T>
void activation_row(T scale, const T* __restrict in, const T* __restrict factor, T* __restrict out, int64_t len) {
  if (factor == nullptr) {
    for (int64_t n = 0; n < len; ++n) out[n] = scale * Act::value(in[n]);
  } else {
    for (int64_t n = 0; n < len; ++n) out[n] = scale * Act::value(in[n]) * factor[n];
  }
}

// value = scale * act(in), derivative = scale * act'(in)
template <typename Act, typename T>
void activation_derivative_row(T scale, const T* __restrict in, T* __restrict value, T* __restrict derivative,
                               int64_t len) {
  for (int64_t n = 0; n < len; ++n) {
    T d;
    value[n] = scale * Act::value(in[n], d);
    derivative[n] = scale * d;
  }
}

// grad_source += grad_y * scale * act'(source)
template <typename Act, typename T>
void ungated_backward_row(T scale, const T* __restrict source, const T* __restrict grad_y,
                          T* __restrict grad_source, int64_t len) {
  for (int64_t n = 0; n < len; ++n) {
    T d;
    Act::value(source[n], d);
    grad_source[n] += grad_y[n] * scale * d;
  }
}

// grad_source += grad_y * scale * act'(source) * gate; grad_gate += grad_y * scale * act(source) * gate'
template <typename Act, typename T>
void gated_backward_row(T scale, const T* __restrict source, const T* __restrict grad_y,
                        const T* __restrict gate_value, const T* __restrict gate_derivative,
                        T* __restrict grad_source, T* __restrict grad_gate, int64_t len) {
  for (int64_t n = 0; n < len; ++n) {
    T d;
    const T g = grad_y[n] * scale, v = Act::value(source[n], d);
    grad_source[n] += g * d * gate_value[n];
    grad_gate[n] += g * v * gate_derivative[n];
  }
}

// y[c] = a act_c(z[source_c]) * (a' gact_c(z[gate_c]) or 1); gate_factor: [num_gates][stride] scratch.
template <typename opmath_t>
void gate_tile(const GateTable& gates, const opmath_t* z, opmath_t* gate_factor, opmath_t* y, int64_t len,
               int64_t stride) {
  for (int64_t k = 0; k < gates.num_gates(); ++k) {
    const int64_t act = gates.gate_act[k];
    with_activation(act, [&](auto a) {
      activation_row<decltype(a), opmath_t>(gates.scale[act], z + gates.gate_channel[k] * stride, nullptr,
                                            gate_factor + k * stride, len);
    });
  }
  for (int64_t c = 0; c < gates.out_channels(); ++c) {
    const int64_t act = gates.act[c], slot = gates.gate_slot[c];
    const opmath_t* factor = slot < 0 ? nullptr : gate_factor + slot * stride;
    with_activation(act, [&](auto a) {
      activation_row<decltype(a), opmath_t>(gates.scale[act], z + gates.source[c] * stride, factor, y + c * stride,
                                            len);
    });
  }
}

// grad_z [C_in][stride] = dL/dz from grad_y [C_out][stride] through the gate table; gate_value
// and gate_derivative: [num_gates][stride] scratch.
template <typename opmath_t>
void gate_backward_tile(const GateTable& gates, int64_t channels, const opmath_t* z, const opmath_t* grad_y,
                        opmath_t* grad_z, opmath_t* gate_value, opmath_t* gate_derivative, int64_t len,
                        int64_t stride) {
  for (int64_t c = 0; c < channels; ++c) std::fill_n(grad_z + c * stride, len, opmath_t(0));
  for (int64_t k = 0; k < gates.num_gates(); ++k) {
    const int64_t act = gates.gate_act[k];
    with_activation(act, [&](auto a) {
      activation_derivative_row<decltype(a), opmath_t>(gates.scale[act], z + gates.gate_channel[k] * stride,
                                                       gate_value + k * stride, gate_derivative + k * stride, len);
    });
  }
  for (int64_t c = 0; c < gates.out_channels(); ++c) {
    const int64_t act = gates.act[c], slot = gates.gate_slot[c];
    const opmath_t* source = z + gates.source[c] * stride;
    opmath_t* grad_source = grad_z + gates.source[c] * stride;
    with_activation(act, [&](auto a) {
      using Act = decltype(a);
      if (slot < 0) {
        ungated_backward_row<Act, opmath_t>(gates.scale[act], source, grad_y + c * stride, grad_source, len);
      } else {
        gated_backward_row<Act, opmath_t>(gates.scale[act], source, grad_y + c * stride, gate_value + slot * stride,
                                          gate_derivative + slot * stride, grad_source,
                                          grad_z + gates.gate_channel[slot] * stride, len);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename scalar_t, typename opmath_t>
void normalize_and_gate(const Voxels<const scalar_t>& x, const GateTable& gates, int64_t mode,
                        const ChannelCoefficients<opmath_t>& k, const Voxels<scalar_t>& y) {
  const int64_t channels = x.channels;
  const Tiling tiling = Tiling::buffered(x.batch, x.voxels, std::max(channels, gates.out_channels()));
  const int64_t stride = tiling.buffer_stride(sizeof(opmath_t));
  tiling.for_each_chunk([&](int64_t, int64_t first, int64_t end) {
    std::vector<opmath_t> z(channels * stride), factor(gates.num_gates() * stride), out(y.channels * stride);
    for (int64_t t = first; t < end; ++t) {
      const Tile tile = tiling.tile(t);
      const int64_t g = mode == kModeInstance ? tile.b : 0;
      load_tile(x, tile, k.normalize(g, channels), z.data(), stride);
      gate_tile(gates, z.data(), factor.data(), out.data(), tile.len, stride);
      store_tile(out.data(), stride, y, tile);
    }
  });
}

void check_input(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(x.dim() == 5, "e3fast::norm_gate: ", name, " must be [batch, channels, x, y, z], got shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "e3fast::norm_gate: ", name,
              " must be float64, float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_mode(int64_t mode) {
  TORCH_CHECK(mode >= kModeNone && mode <= kModeRunning, "e3fast::norm_gate: mode must be 0 (none), 1 (instance), ",
              "2 (batch) or 3 (running statistics), got ", mode);
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_channels) {
  return {x.size(0), out_channels, x.size(2), x.size(3), x.size(4)};
}

// The statistics the op returns: fresh [G, S] and [G, F] tensors, filled unless mode is batch or
// instance (computed from x by the caller).
std::pair<at::Tensor, at::Tensor> allocate_statistics(const at::Tensor& x, const FieldTable& fields, int64_t mode,
                                                      const std::optional<at::Tensor>& running_mean,
                                                      const std::optional<at::Tensor>& running_var) {
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const int64_t groups = num_groups(mode, x.size(0));
  if (mode == kModeNone) return {at::empty({1, 0}, options), at::empty({1, 0}, options)};
  if (mode == kModeRunning) {
    return {running_mean->to(options.dtype(), false, true).reshape({1, fields.num_scalars}),
            running_var->to(options.dtype(), false, true).reshape({1, fields.num_fields()})};
  }
  return {at::empty({groups, fields.num_scalars}, options), at::empty({groups, fields.num_fields()}, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gate_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& fields_table, const at::Tensor& gates_table, c10::ArrayRef<double> act_scales,
    int64_t num_scalars, int64_t mode, double eps) {
  check_input(input, "x");
  check_mode(mode);
  const FieldTable fields = read_fields(fields_table, input.size(1));
  const GateTable gates = read_gates(gates_table, act_scales, input.size(1));
  TORCH_CHECK(num_scalars == fields.num_scalars, "e3fast::norm_gate: num_scalars is ", num_scalars,
              " but the fields table has ", fields.num_scalars, " scalar fields");
  check_optional_vector(weight, "weight", fields.num_fields());
  check_optional_vector(bias, "bias", fields.num_scalars);
  check_optional_vector(running_mean, "running_mean", fields.num_scalars);
  check_optional_vector(running_var, "running_var", fields.num_fields());
  TORCH_CHECK(mode != kModeNone || (!weight && !bias), "e3fast::norm_gate: mode 0 (none) takes no weight or bias");
  TORCH_CHECK(mode != kModeRunning || (running_mean && running_var),
              "e3fast::norm_gate: mode 3 (running statistics) needs running_mean and running_var");

  const at::Tensor x = dense_voxels(input);
  at::Tensor y = at::empty(output_shape(x, gates.out_channels()), x.options().memory_format(memory_format_of(x)));
  auto [mean, var] = allocate_statistics(x, fields, mode, running_mean, running_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_gate", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Voxels<const scalar_t> xv = voxels_of<const scalar_t>(x);
    if (mode == kModeInstance || mode == kModeBatch) compute_statistics<scalar_t, opmath_t>(xv, fields, mode, mean, var);
    const auto k = channel_coefficients<opmath_t>(fields, mode, mean, var, weight, bias, eps);
    normalize_and_gate<scalar_t, opmath_t>(xv, gates, mode, k, voxels_of<scalar_t>(y));
  });
  return {y, mean, var};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// grad_x[c] = k1 * g_z + k2 * xhat + k3 per (group, channel).
template <typename opmath_t>
struct GradientCoefficients {
  std::vector<opmath_t> k1, k2, k3;
};

// Which parts of the backward tile loop run.
struct BackwardPass {
  bool accumulate;  // sum g_z and g_z * xhat per (group, channel)
  bool write;       // write grad_x
};

// One pass over the tiles: recompute xhat, z and g_z; reduce and/or write grad_x. Returns the
// sums [(g * C + c) * 2 + {0: g_z, 1: g_z * xhat}] when accumulating.
template <typename scalar_t, typename opmath_t>
std::vector<double> backward_pass(const Voxels<const scalar_t>& x, const Voxels<const scalar_t>& grad_y,
                                  const GateTable& gates, int64_t mode, const ChannelCoefficients<opmath_t>& k,
                                  const GradientCoefficients<opmath_t>& gk, BackwardPass pass,
                                  const Voxels<scalar_t>& grad_x) {
  const int64_t channels = x.channels, groups = num_groups(mode, x.batch);
  const Tiling tiling = Tiling::buffered(x.batch, x.voxels, std::max(channels, gates.out_channels()));
  const int64_t stride = tiling.buffer_stride(sizeof(opmath_t));
  const size_t slice = pass.accumulate ? groups * channels * 2 : 0;
  std::vector<double> partial(tiling.num_chunks * slice, 0.0);
  tiling.for_each_chunk([&](int64_t chunk, int64_t first, int64_t end) {
    std::vector<opmath_t> xhat(channels * stride), z(channels * stride), gz(channels * stride);
    std::vector<opmath_t> gy(gates.out_channels() * stride);
    std::vector<opmath_t> gate_value(gates.num_gates() * stride), gate_derivative(gates.num_gates() * stride);
    for (int64_t t = first; t < end; ++t) {
      const Tile tile = tiling.tile(t);
      const int64_t g = mode == kModeInstance ? tile.b : 0, len = tile.len;
      load_tile(x, tile, k.standardize(g, channels), xhat.data(), stride);
      affine_rows(k, g, channels, len, stride, xhat.data(), z.data());
      load_tile(grad_y, tile, CopyMap{}, gy.data(), stride);
      gate_backward_tile(gates, channels, z.data(), gy.data(), gz.data(), gate_value.data(), gate_derivative.data(),
                         len, stride);
      for (int64_t c = 0; c < channels && pass.accumulate; ++c) {
        const opmath_t* grad_row = gz.data() + c * stride;
        const opmath_t* xhat_row = xhat.data() + c * stride;
        double sum_grad = 0.0, sum_grad_xhat = 0.0;
#pragma omp simd reduction(+ : sum_grad, sum_grad_xhat)
        for (int64_t n = 0; n < len; ++n) {
          sum_grad += static_cast<double>(grad_row[n]);
          sum_grad_xhat += static_cast<double>(grad_row[n]) * static_cast<double>(xhat_row[n]);
        }
        double* sums = partial.data() + chunk * slice + (g * channels + c) * 2;
        sums[0] += sum_grad;
        sums[1] += sum_grad_xhat;
      }
      if (!pass.write) continue;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = g * channels + c;
        const opmath_t k1 = gk.k1[i], k2 = gk.k2[i], k3 = gk.k3[i];
        opmath_t* grad_row = gz.data() + c * stride;
        const opmath_t* xhat_row = xhat.data() + c * stride;
        for (int64_t n = 0; n < len; ++n) grad_row[n] = k1 * grad_row[n] + k2 * xhat_row[n] + k3;
      }
      store_tile(gz.data(), stride, grad_x, tile);
    }
  });
  return merge_chunks(partial, tiling.num_chunks, slice);
}

// Per (group, field) sums of g_z and g_z * xhat from the per-channel sums.
std::vector<double> field_sums(const std::vector<double>& channel_sums, const FieldTable& fields, int64_t groups) {
  std::vector<double> sums(groups * fields.num_fields() * 2, 0.0);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < fields.channels(); ++c) {
      const int64_t f = fields.field_of_channel[c];
      sums[(g * fields.num_fields() + f) * 2] += channel_sums[(g * fields.channels() + c) * 2];
      sums[(g * fields.num_fields() + f) * 2 + 1] += channel_sums[(g * fields.channels() + c) * 2 + 1];
    }
  return sums;
}

// grad_x = inv * gamma * (g_z - [scalar] sum(g_z) / Ng - xhat * sum(g_z xhat) / (Ng delta)) with
// the batch statistics (instance, batch) or grad_x = inv * gamma * g_z (running, none).
template <typename opmath_t>
GradientCoefficients<opmath_t> gradient_coefficients(const FieldTable& fields, const ChannelCoefficients<opmath_t>& k,
                                                     int64_t mode, int64_t groups, double count,
                                                     const std::vector<double>& sums) {
  const bool batch_statistics = mode == kModeInstance || mode == kModeBatch;
  GradientCoefficients<opmath_t> gk;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < fields.channels(); ++c) {
      const int64_t f = fields.field_of_channel[c], i = g * fields.channels() + c;
      const double k1 = static_cast<double>(k.inv_std[i]) * static_cast<double>(k.gamma[i]);
      double k2 = 0.0, k3 = 0.0;
      if (batch_statistics) {
        const double* field = sums.data() + (g * fields.num_fields() + f) * 2;
        k2 = -k1 * field[1] / (count * static_cast<double>(fields.divisor[f]));
        k3 = fields.is_scalar(f) ? -k1 * field[0] / count : 0.0;
      }
      gk.k1.push_back(static_cast<opmath_t>(k1));
      gk.k2.push_back(static_cast<opmath_t>(k2));
      gk.k3.push_back(static_cast<opmath_t>(k3));
    }
  }
  return gk;
}

// grad_weight [F] = sum over groups of sum(g_z xhat); grad_bias [S] = sum over groups of sum(g_z).
template <typename opmath_t>
void parameter_gradients(const std::vector<double>& sums, const FieldTable& fields, int64_t groups,
                         at::Tensor& grad_weight, at::Tensor& grad_bias) {
  opmath_t* weight_out = grad_weight.data_ptr<opmath_t>();
  opmath_t* bias_out = grad_bias.data_ptr<opmath_t>();
  for (int64_t f = 0; f < fields.num_fields(); ++f) {
    double grad = 0.0, grad_xhat = 0.0;
    for (int64_t g = 0; g < groups; ++g) {
      grad += sums[(g * fields.num_fields() + f) * 2];
      grad_xhat += sums[(g * fields.num_fields() + f) * 2 + 1];
    }
    weight_out[f] = static_cast<opmath_t>(grad_xhat);
    if (fields.is_scalar(f)) bias_out[fields.scalar_index[f]] = static_cast<opmath_t>(grad);
  }
}

template <typename scalar_t, typename opmath_t>
void norm_gate_backward_kernel(const Voxels<const scalar_t>& x, const Voxels<const scalar_t>& grad_y,
                               const FieldTable& fields, const GateTable& gates, int64_t mode,
                               const ChannelCoefficients<opmath_t>& k, const Voxels<scalar_t>& grad_x,
                               at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t groups = num_groups(mode, x.batch);
  const double count = static_cast<double>(group_size(mode, x.batch, x.voxels));
  const GradientCoefficients<opmath_t> none;
  std::vector<double> sums;
  if (mode == kModeInstance || mode == kModeBatch) {
    sums = field_sums(backward_pass(x, grad_y, gates, mode, k, none, {true, false}, grad_x), fields, groups);
    const auto gk = gradient_coefficients(fields, k, mode, groups, count, sums);
    backward_pass(x, grad_y, gates, mode, k, gk, {false, true}, grad_x);
  } else {
    const auto gk = gradient_coefficients(fields, k, mode, groups, count, sums);
    const bool running = mode == kModeRunning;
    sums = field_sums(backward_pass(x, grad_y, gates, mode, k, gk, {running, true}, grad_x), fields,
                      running ? groups : 0);
  }
  if (mode != kModeNone) parameter_gradients<opmath_t>(sums, fields, groups, grad_weight, grad_bias);
}

void check_statistics(const at::Tensor& mean, const at::Tensor& var, const FieldTable& fields, int64_t mode,
                      int64_t batch) {
  check_cpu(mean, "mean");
  check_cpu(var, "var");
  const int64_t groups = num_groups(mode, batch);
  const int64_t scalars = mode == kModeNone ? 0 : fields.num_scalars;
  const int64_t num_fields = mode == kModeNone ? 0 : fields.num_fields();
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == groups && mean.size(1) == scalars && var.dim() == 2 &&
                  var.size(0) == groups && var.size(1) == num_fields,
              "e3fast::norm_gate_backward: mode ", mode, " expects mean [", groups, ", ", scalars, "] and var [",
              groups, ", ", num_fields, "], got ", mean.sizes(), " and ", var.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_gate_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& fields_table, const at::Tensor& gates_table, c10::ArrayRef<double> act_scales, int64_t mode,
    double eps) {
  check_input(input, "x");
  check_input(grad_output, "grad_y");
  check_mode(mode);
  const FieldTable fields = read_fields(fields_table, input.size(1));
  const GateTable gates = read_gates(gates_table, act_scales, input.size(1));
  check_optional_vector(weight, "weight", fields.num_fields());
  check_optional_vector(bias, "bias", fields.num_scalars);
  check_statistics(mean, var, fields, mode, input.size(0));
  TORCH_CHECK(mode != kModeNone || (!weight && !bias), "e3fast::norm_gate_backward: mode 0 (none) takes no weight or bias");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(output_shape(input, gates.out_channels())),
              "e3fast::norm_gate_backward: grad_y must have shape ", at::IntArrayRef(output_shape(input, gates.out_channels())),
              ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "e3fast::norm_gate_backward: grad_y has dtype ",
              grad_output.scalar_type(), " but x has ", input.scalar_type());

  const at::Tensor x = dense_voxels(input), grad_y = dense_voxels(grad_output);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(memory_format_of(x)));
  const auto stats_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor grad_weight = at::zeros({fields.num_fields()}, stats_options);
  at::Tensor grad_bias = at::zeros({mean.size(1)}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "e3fast::norm_gate_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto k = channel_coefficients<opmath_t>(fields, mode, mean, var, weight, bias, eps);
    norm_gate_backward_kernel<scalar_t, opmath_t>(voxels_of<const scalar_t>(x), voxels_of<const scalar_t>(grad_y),
                                                  fields, gates, mode, k, voxels_of<scalar_t>(grad_x), grad_weight,
                                                  grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(e3fast, CPU, m) {
  m.impl("norm_gate", &norm_gate_cpu);
  m.impl("norm_gate_backward", &norm_gate_backward_cpu);
}

}  // namespace e3fast
