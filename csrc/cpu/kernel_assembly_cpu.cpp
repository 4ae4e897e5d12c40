// CPU kernels of e3fast::assemble_kernel and e3fast::assemble_kernel_backward.
//
// Forward (see e3fast/ops/kernel_assembly.py and e3fast/steerable_basis.py):
//
//   K[o_p + w d3 + m3, i_p + u d1 + m1, t] += sum_r B_p[t, m1, m3, r] W[r, c_p + u s_p + w]
//       for every path row p = (i_p, mul_in, d1, o_p, mul_out, d3, c_p, s_p, b_p), u < mul_in, w < mul_out,
//   K[o + w d + m, i + u d + m, t0] += alpha V[c + u mul_out + w]
//       for every self-connection row (i, mul_in, o, mul_out, d, c) with scale alpha, t0 = taps / 2.
//
// Backward (the transpose):
//
//   dW[r, c_p + u s_p + w] = sum_{m3, m1, t} B_p[t, m1, m3, r] dK[o_p + w d3 + m3, i_p + u d1 + m1, t]
//   dV[c + u mul_out + w]  = alpha sum_m dK[o + w d + m, i + u d + m, t0]
//
// For fixed (p, w, m3) the kernel row o = o_p + w d3 + m3 holds the block (u, m1, t) contiguously
// at column (i_p + u d1) * taps, so with the basis transposed once to Bt_p[m3, r, m1, t] both
// directions reduce to contiguous axpy / dot loops of length d1 * taps:
//
//   K[o, (i_p + u d1) * taps + j] += sum_r W[r, c_p + u s_p + w] Bt_p[m3, r, j],   j = m1 * taps + t.
//
// Forward is parallel over kernel rows o (each thread accumulates one row in opmath precision and
// writes it once); backward is parallel over (p, w), which own distinct weight columns. The tables
// are validated first: every row inside the kernel, the basis and the weights, and no weight column
// claimed twice (which would make the backward race).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "input_checks.h"
#include "kernel_assembly_tables.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace e3fast {
namespace {


struct SelfConnectionRow {
  int64_t in_offset, in_mul, out_offset, out_mul, dim, weight_offset;
  double scale;
};

// The kernel geometry shared by forward and backward.
struct Geometry {
  int64_t out_dim, in_dim, taps, num_radial, radial_numel, sc_numel;
};

void check_table(const at::Tensor& table, int64_t columns, const char* name) {
  TORCH_CHECK(table.device().is_cpu(), "e3fast: ", name, " must be a CPU tensor, got ", table.device());
  TORCH_CHECK(table.scalar_type() == at::kLong, "e3fast: ", name, " must be int64, got ", table.scalar_type());
  TORCH_CHECK(table.dim() == 2 && table.size(1) == columns, "e3fast: ", name, " must have shape [rows, ", columns,
              "], got ", table.sizes());
}

std::vector<PathRow> read_paths(const at::Tensor& paths) {
  check_table(paths, kPathColumns, "paths");
  const auto table = paths.contiguous();
  const int64_t* data = table.data_ptr<int64_t>();
  std::vector<PathRow> rows(table.size(0));
  for (size_t p = 0; p < rows.size(); ++p) {
    const int64_t* r = data + p * kPathColumns;
    rows[p] = PathRow{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]};
  }
  return rows;
}

std::vector<SelfConnectionRow> read_self_connections(const at::Tensor& self_connections,
                                                     at::ArrayRef<double> sc_scales) {
  check_table(self_connections, kSelfConnectionColumns, "self_connections");
  TORCH_CHECK(static_cast<int64_t>(sc_scales.size()) == self_connections.size(0), "e3fast: sc_scales has ",
              sc_scales.size(), " entries but self_connections has ", self_connections.size(0), " rows");
  const auto table = self_connections.contiguous();
  const int64_t* data = table.data_ptr<int64_t>();
  std::vector<SelfConnectionRow> rows(table.size(0));
  for (size_t s = 0; s < rows.size(); ++s) {
    const int64_t* r = data + s * kSelfConnectionColumns;
    rows[s] = SelfConnectionRow{r[0], r[1], r[2], r[3], r[4], r[5], sc_scales[s]};
  }
  return rows;
}

// Marks weight columns [first, first + count) as used, refusing overlaps: backward writes each
// column from one thread only.
void claim_columns(std::vector<char>& used, int64_t first, int64_t count, const char* what) {
  for (int64_t c = first; c < first + count; ++c) {
    TORCH_CHECK(!used[c], "e3fast: weight column ", c, " of ", what, " is used by two table entries");
    used[c] = 1;
  }
}

void check_path_rows(const std::vector<PathRow>& rows, const Geometry& g, int64_t basis_numel) {
  std::vector<char> used(g.radial_numel, 0);
  for (size_t p = 0; p < rows.size(); ++p) {
    const PathRow& r = rows[p];
    TORCH_CHECK(r.in_mul >= 0 && r.out_mul >= 0 && r.in_dim > 0 && r.out_dim > 0 && r.in_offset >= 0 &&
                    r.out_offset >= 0 && r.weight_offset >= 0 && r.weight_u_stride >= r.out_mul && r.basis_offset >= 0,
                "e3fast: paths row ", p, " has invalid entries");
    TORCH_CHECK(r.in_offset + r.in_mul * r.in_dim <= g.in_dim && r.out_offset + r.out_mul * r.out_dim <= g.out_dim,
                "e3fast: paths row ", p, " addresses channels outside the kernel [", g.out_dim, ", ", g.in_dim, "]");
    TORCH_CHECK(r.basis_offset + g.taps * r.in_dim * r.out_dim * g.num_radial <= basis_numel, "e3fast: paths row ", p,
                " needs basis entries up to ", r.basis_offset + g.taps * r.in_dim * r.out_dim * g.num_radial,
                " but the basis has ", basis_numel);
    if (r.in_mul == 0 || r.out_mul == 0) continue;
    TORCH_CHECK(r.weight_offset + (r.in_mul - 1) * r.weight_u_stride + r.out_mul <= g.radial_numel,
                "e3fast: paths row ", p, " addresses radial weight columns beyond ", g.radial_numel);
    for (int64_t u = 0; u < r.in_mul; ++u) {
      claim_columns(used, r.weight_offset + u * r.weight_u_stride, r.out_mul, "radial_weight");
    }
  }
}

void check_self_connection_rows(const std::vector<SelfConnectionRow>& rows, const Geometry& g) {
  std::vector<char> used(g.sc_numel, 0);
  for (size_t s = 0; s < rows.size(); ++s) {
    const SelfConnectionRow& r = rows[s];
    TORCH_CHECK(r.in_mul >= 0 && r.out_mul >= 0 && r.dim > 0 && r.in_offset >= 0 && r.out_offset >= 0 &&
                    r.weight_offset >= 0,
                "e3fast: self_connections row ", s, " has invalid entries");
    TORCH_CHECK(r.in_offset + r.in_mul * r.dim <= g.in_dim && r.out_offset + r.out_mul * r.dim <= g.out_dim,
                "e3fast: self_connections row ", s, " addresses channels outside the kernel [", g.out_dim, ", ",
                g.in_dim, "]");
    TORCH_CHECK(r.weight_offset + r.in_mul * r.out_mul <= g.sc_numel, "e3fast: self_connections row ", s,
                " addresses sc_weight entries beyond ", g.sc_numel);
    claim_columns(used, r.weight_offset, r.in_mul * r.out_mul, "sc_weight");
  }
}

void check_float_input(const at::Tensor& tensor, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), "e3fast: ", name, " must be a CPU tensor, got ", tensor.device());
  check_float_dtype(tensor, name, dtype);
}

// Items per at::parallel_for chunk for about at::internal::GRAIN_SIZE operations per chunk: small
// problems stay on the calling thread instead of waking (and waiting for) the thread pool.
int64_t grain_size(int64_t total_work, int64_t items) {
  const int64_t work_per_item = std::max<int64_t>(1, total_work / std::max<int64_t>(1, items));
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_item);
}

// Multiply-adds of all path rows: sum_p mul_in d1 mul_out d3 taps R.
int64_t path_work(const std::vector<PathRow>& rows, const Geometry& g) {
  int64_t work = 0;
  for (const PathRow& r : rows) work += r.in_mul * r.in_dim * r.out_mul * r.out_dim * g.taps * g.num_radial;
  return work;
}

// Basis blocks [taps, d1, d3, R] rearranged to [d3, R, d1, taps] in opmath precision, one per path row.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<std::vector<acc_t>> transposed_basis(const at::Tensor& basis, const std::vector<PathRow>& rows,
                                                 const Geometry& g) {
  const scalar_t* data = basis.data_ptr<scalar_t>();
  const int64_t R = g.num_radial, taps = g.taps;
  std::vector<std::vector<acc_t>> blocks(rows.size());
  int64_t basis_numel = 0;
  for (const PathRow& row : rows) basis_numel += taps * row.in_dim * row.out_dim * R;
  const int64_t num_rows = rows.size();
  at::parallel_for(0, num_rows, grain_size(basis_numel, num_rows), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const PathRow& row = rows[p];
      const int64_t d1 = row.in_dim, d3 = row.out_dim;
      const scalar_t* block = data + row.basis_offset;
      std::vector<acc_t>& out = blocks[p];
      out.resize(d3 * R * d1 * taps);
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t m1 = 0; m1 < d1; ++m1)
          for (int64_t m3 = 0; m3 < d3; ++m3)
            for (int64_t r = 0; r < R; ++r)
              out[((m3 * R + r) * d1 + m1) * taps + t] = static_cast<acc_t>(block[((t * d1 + m1) * d3 + m3) * R + r]);
    }
  });
  return blocks;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

// target[j] += sum_{q < N} coefficients[q] * sources[q][j]: one pass over the target for N radial functions.
template <int N, typename acc_t>
void axpy_group(acc_t* target, const acc_t* coefficients, const acc_t* const* sources, int64_t length) {
  for (int64_t j = 0; j < length; ++j) {
    acc_t sum = target[j];
    for (int q = 0; q < N; ++q) sum += coefficients[q] * sources[q][j];
    target[j] = sum;
  }
}

// target[j] += sum_r coefficients[r] * source[r * length + j], radial functions in groups of up to 4.
template <typename acc_t>
void axpy_radial(acc_t* target, const acc_t* coefficients, const acc_t* source, int64_t num_radial, int64_t length) {
  for (int64_t r = 0; r < num_radial; r += 4) {
    const acc_t* sources[4] = {source + r * length, source + (r + 1) * length, source + (r + 2) * length,
                               source + (r + 3) * length};
    switch (std::min<int64_t>(4, num_radial - r)) {
      case 4: axpy_group<4>(target, coefficients + r, sources, length); break;
      case 3: axpy_group<3>(target, coefficients + r, sources, length); break;
      case 2: axpy_group<2>(target, coefficients + r, sources, length); break;
      default: axpy_group<1>(target, coefficients + r, sources, length); break;
    }
  }
}

// Adds the contributions of path row `row` to kernel row o = out_offset + w * d3 + m3 (accumulator `acc`).
// `coefficients` is scratch space for num_radial values.
template <typename acc_t>
void add_path_to_row(acc_t* acc, acc_t* coefficients, const PathRow& row, const acc_t* basis_t, const acc_t* weight,
                     int64_t w, int64_t m3, const Geometry& g) {
  const int64_t R = g.num_radial, span = row.in_dim * g.taps;
  const acc_t* basis_m3 = basis_t + m3 * R * span;
  for (int64_t u = 0; u < row.in_mul; ++u) {
    const int64_t column = row.weight_offset + u * row.weight_u_stride + w;
    for (int64_t r = 0; r < R; ++r) coefficients[r] = weight[r * g.radial_numel + column];
    axpy_radial(acc + (row.in_offset + u * row.in_dim) * g.taps, coefficients, basis_m3, R, span);
  }
}

template <typename acc_t>
void add_self_connection_to_row(acc_t* acc, const SelfConnectionRow& row, const acc_t* sc_weight, int64_t w, int64_t m,
                                const Geometry& g) {
  const acc_t scale = static_cast<acc_t>(row.scale);
  const int64_t centre = g.taps / 2;
  for (int64_t u = 0; u < row.in_mul; ++u) {
    acc[(row.in_offset + u * row.dim + m) * g.taps + centre] +=
        scale * sc_weight[row.weight_offset + u * row.out_mul + w];
  }
}

template <typename scalar_t>
void assemble_kernel_impl(at::Tensor& kernel, const at::Tensor& radial_weight, const at::Tensor& sc_weight,
                          const at::Tensor& basis, const std::vector<PathRow>& paths,
                          const std::vector<SelfConnectionRow>& self_connections, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto basis_t = transposed_basis<scalar_t>(basis, paths, g);
  const at::Tensor weight = radial_weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor sc = sc_weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* weight_data = weight.data_ptr<acc_t>();
  const acc_t* sc_data = sc.data_ptr<acc_t>();
  scalar_t* out = kernel.data_ptr<scalar_t>();
  const int64_t row_length = g.in_dim * g.taps;

  const int64_t work = path_work(paths, g) + g.out_dim * row_length;
  at::parallel_for(0, g.out_dim, grain_size(work, g.out_dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(row_length), coefficients(g.num_radial);
    for (int64_t o = begin; o < end; ++o) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (size_t p = 0; p < paths.size(); ++p) {
        const PathRow& row = paths[p];
        const int64_t local = o - row.out_offset;
        if (local < 0 || local >= row.out_mul * row.out_dim) continue;
        add_path_to_row(acc.data(), coefficients.data(), row, basis_t[p].data(), weight_data, local / row.out_dim, local % row.out_dim, g);
      }
      for (const SelfConnectionRow& row : self_connections) {
        const int64_t local = o - row.out_offset;
        if (local < 0 || local >= row.out_mul * row.dim) continue;
        add_self_connection_to_row(acc.data(), row, sc_data, local / row.dim, local % row.dim, g);
      }
      scalar_t* target = out + o * row_length;
      for (int64_t j = 0; j < row_length; ++j) target[j] = static_cast<scalar_t>(acc[j]);
    }
  });
}

at::Tensor assemble_kernel_cpu(const at::Tensor& radial_weight, const at::Tensor& sc_weight, const at::Tensor& basis,
                               const at::Tensor& paths, const at::Tensor& self_connections,
                               at::ArrayRef<double> sc_scales, int64_t out_dim, int64_t in_dim,
                               at::IntArrayRef kernel_size) {
  const auto dtype = radial_weight.scalar_type();
  check_float_input(radial_weight, "radial_weight", dtype);
  check_float_input(sc_weight, "sc_weight", dtype);
  check_float_input(basis, "basis", dtype);
  TORCH_CHECK(radial_weight.dim() == 2, "e3fast: radial_weight must be 2-D [num_radial, radial_numel], got ",
              radial_weight.sizes());
  TORCH_CHECK(sc_weight.dim() == 1, "e3fast: sc_weight must be 1-D, got ", sc_weight.sizes());
  TORCH_CHECK(basis.dim() == 1, "e3fast: basis must be 1-D, got ", basis.sizes());
  TORCH_CHECK(out_dim >= 0 && in_dim >= 0, "e3fast: out_dim and in_dim must be non-negative");
  const Geometry g{out_dim, in_dim, num_taps(kernel_size), radial_weight.size(0), radial_weight.size(1),
                   sc_weight.size(0)};
  const auto path_rows = read_paths(paths);
  const auto sc_rows = read_self_connections(self_connections, sc_scales);
  check_path_rows(path_rows, g, basis.numel());
  check_self_connection_rows(sc_rows, g);

  auto kernel = at::empty({out_dim, in_dim, kernel_size[0], kernel_size[1], kernel_size[2]}, radial_weight.options());
  const auto basis_c = basis.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "e3fast::assemble_kernel", [&] {
    assemble_kernel_impl<scalar_t>(kernel, radial_weight, sc_weight, basis_c, path_rows, sc_rows, g);
  });
  return kernel;
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

// sum_j a[j] * b[j] with independent partial sums, so that the loop vectorizes without reassociation flags.
template <typename scalar_t, typename acc_t>
acc_t dot(const acc_t* a, const scalar_t* b, int64_t length) {
  constexpr int64_t kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * static_cast<acc_t>(b[j + l]);
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; j < length; ++j) sum += a[j] * static_cast<acc_t>(b[j]);
  return sum;
}

// grad_radial[:, column(u, w)] for one path row and one w, summed over m3.
template <typename scalar_t, typename acc_t>
void path_weight_gradient(acc_t* grad, const scalar_t* grad_kernel, const PathRow& row, const acc_t* basis_t,
                          int64_t w, const Geometry& g) {
  const int64_t R = g.num_radial, span = row.in_dim * g.taps, row_length = g.in_dim * g.taps;
  for (int64_t u = 0; u < row.in_mul; ++u) {
    const int64_t column = row.weight_offset + u * row.weight_u_stride + w;
    for (int64_t m3 = 0; m3 < row.out_dim; ++m3) {
      const scalar_t* source =
          grad_kernel + (row.out_offset + w * row.out_dim + m3) * row_length + (row.in_offset + u * row.in_dim) * g.taps;
      for (int64_t r = 0; r < R; ++r) {
        grad[r * g.radial_numel + column] += dot(basis_t + (m3 * R + r) * span, source, span);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void self_connection_gradient(acc_t* grad, const scalar_t* grad_kernel, const SelfConnectionRow& row,
                              const Geometry& g) {
  const int64_t centre = g.taps / 2, row_length = g.in_dim * g.taps;
  for (int64_t u = 0; u < row.in_mul; ++u) {
    for (int64_t w = 0; w < row.out_mul; ++w) {
      acc_t sum = 0;
      for (int64_t m = 0; m < row.dim; ++m) {
        sum += static_cast<acc_t>(
            grad_kernel[(row.out_offset + w * row.dim + m) * row_length + (row.in_offset + u * row.dim + m) * g.taps +
                        centre]);
      }
      grad[row.weight_offset + u * row.out_mul + w] = static_cast<acc_t>(row.scale) * sum;
    }
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> assemble_kernel_backward_impl(const at::Tensor& grad_kernel, const at::Tensor& basis,
                                                                 const std::vector<PathRow>& paths,
                                                                 const std::vector<SelfConnectionRow>& self_connections,
                                                                 const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_options = grad_kernel.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor grad_radial = at::zeros({g.num_radial, g.radial_numel}, acc_options);
  at::Tensor grad_sc = at::zeros({g.sc_numel}, acc_options);
  const auto basis_t = transposed_basis<scalar_t>(basis, paths, g);
  const scalar_t* grad_data = grad_kernel.data_ptr<scalar_t>();

  // Work items (path row, w): each owns the weight columns (u, w) of its row.
  std::vector<std::pair<int64_t, int64_t>> items;
  for (size_t p = 0; p < paths.size(); ++p) {
    if (paths[p].in_mul == 0) continue;
    for (int64_t w = 0; w < paths[p].out_mul; ++w) items.emplace_back(p, w);
  }
  acc_t* radial_data = grad_radial.data_ptr<acc_t>();
  const int64_t num_items = items.size();
  at::parallel_for(0, num_items, grain_size(path_work(paths, g), num_items), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [p, w] = items[i];
      path_weight_gradient(radial_data, grad_data, paths[p], basis_t[p].data(), w, g);
    }
  });
  acc_t* sc_data = grad_sc.data_ptr<acc_t>();
  for (const SelfConnectionRow& row : self_connections) self_connection_gradient(sc_data, grad_data, row, g);
  return {grad_radial.to(grad_kernel.scalar_type()), grad_sc.to(grad_kernel.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> assemble_kernel_backward_cpu(const at::Tensor& grad_kernel, const at::Tensor& basis,
                                                                const at::Tensor& paths,
                                                                const at::Tensor& self_connections,
                                                                at::ArrayRef<double> sc_scales, int64_t num_radial,
                                                                int64_t radial_numel, int64_t sc_numel) {
  const auto dtype = grad_kernel.scalar_type();
  check_float_input(grad_kernel, "grad_kernel", dtype);
  check_float_input(basis, "basis", dtype);
  TORCH_CHECK(grad_kernel.dim() == 5, "e3fast: grad_kernel must be 5-D [out_dim, in_dim, kx, ky, kz], got ",
              grad_kernel.sizes());
  TORCH_CHECK(basis.dim() == 1, "e3fast: basis must be 1-D, got ", basis.sizes());
  TORCH_CHECK(num_radial >= 0 && radial_numel >= 0 && sc_numel >= 0,
              "e3fast: num_radial, radial_numel and sc_numel must be non-negative");
  const Geometry g{grad_kernel.size(0), grad_kernel.size(1), num_taps(grad_kernel.sizes().slice(2)), num_radial,
                   radial_numel, sc_numel};
  const auto path_rows = read_paths(paths);
  const auto sc_rows = read_self_connections(self_connections, sc_scales);
  check_path_rows(path_rows, g, basis.numel());
  check_self_connection_rows(sc_rows, g);

  const auto grad_c = grad_kernel.contiguous();
  const auto basis_c = basis.contiguous();
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "e3fast::assemble_kernel_backward", [&] {
    grads = assemble_kernel_backward_impl<scalar_t>(grad_c, basis_c, path_rows, sc_rows, g);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(e3fast, CPU, m) {
  m.impl("assemble_kernel", &assemble_kernel_cpu);
  m.impl("assemble_kernel_backward", &assemble_kernel_backward_cpu);
}

}  // namespace e3fast
