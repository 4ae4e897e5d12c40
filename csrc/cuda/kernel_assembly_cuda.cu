// CUDA kernels of e3fast::assemble_kernel and e3fast::assemble_kernel_backward. Same semantics
// as csrc/cpu/kernel_assembly_cpu.cpp; the math is documented in e3fast/ops/kernel_assembly.py
// and e3fast/steerable_basis.py.
//
// Forward:
//
//   K[o_p + w d3 + m3, i_p + u d1 + m1, t] += sum_r B_p[t, m1, m3, r] W[r, c_p + u s_p + w]
//       for every path row p = (i_p, mul_in, d1, o_p, mul_out, d3, c_p, s_p, b_p), u < mul_in, w < mul_out,
//   K[o + w d + m, i + u d + m, t0] += alpha V[c + u mul_out + w]
//       for every self-connection row (i, mul_in, o, mul_out, d, c) with scale alpha, t0 = taps / 2.
//
// Backward (the transpose):
//
//   dW[r, col] = sum_{p, u, w: c_p + u s_p + w = col} sum_{m3, m1, t} B_p[t, m1, m3, r] dK[o_p + w d3 + m3, i_p + u d1 + m1, t]
//   dV[col]    = sum_{rows, u, w: c + u mul_out + w = col} alpha sum_m dK[o + w d + m, i + u d + m, t0]
//
// Kernels:
//   check_tables       one block, a thread per row: every row inside the kernel, the basis and the
//                      weights (device asserts, the CPU kernel's rules).
//   assemble           one thread per kernel element (o, i, t): sums the path rows whose blocks
//                      hold it, in table order, then the self-connections (opmath precision,
//                      deterministic, each element written once).
//   radial_gradient    one warp per radial weight column: finds the path rows using the column
//                      and reduces over their (m3, m1, t) entries for all R radial functions at
//                      once (R in chunks of kRadialChunk); lanes read dK rows contiguously.
//   sc_gradient        one thread per self-connection weight.
// Columns used by no row get a zero gradient. A column used by two rows (which the CPU kernel
// refuses) gets the sum of both contributions, the exact transpose.
#include "cuda_common.cuh"
#include "input_checks.h"
#include "kernel_assembly_tables.h"

#include <tuple>

namespace e3fast {
namespace {

using namespace e3fast::cuda;

constexpr const char* kForwardOp = "e3fast::assemble_kernel";
constexpr const char* kBackwardOp = "e3fast::assemble_kernel_backward";
constexpr int kCheckThreads = 256;
constexpr int kRadialChunk = 8;

struct SelfConnectionRow {
  int64_t in_offset, in_mul, out_offset, out_mul, dim, weight_offset;
};

__device__ PathRow read_path(const int64_t* paths, int64_t p) {
  const int64_t* r = paths + p * kPathColumns;
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]};
}

__device__ SelfConnectionRow read_self_connection(const int64_t* rows, int64_t s) {
  const int64_t* r = rows + s * kSelfConnectionColumns;
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// The kernel geometry shared by forward and backward.
struct Geometry {
  int64_t out_dim, in_dim, taps, num_radial, radial_numel, sc_numel;

  __host__ __device__ int64_t centre() const { return taps / 2; }
};

// The tables as the kernels read them (device pointers).
struct Tables {
  const int64_t* paths;
  int64_t num_paths;
  const int64_t* self_connections;
  const double* sc_scales;
  int64_t num_self_connections;
};

// ------------------------------------------------------------------------------------------
// Table checks
// ------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kCheckThreads)
    check_tables_kernel(Tables tables, Geometry g, int64_t basis_numel) {
  for (int64_t p = threadIdx.x; p < tables.num_paths; p += blockDim.x) {
    const PathRow r = read_path(tables.paths, p);
    const bool entries = r.in_mul >= 0 && r.out_mul >= 0 && r.in_dim > 0 && r.out_dim > 0 && r.in_offset >= 0 &&
                         r.out_offset >= 0 && r.weight_offset >= 0 && r.weight_u_stride >= r.out_mul &&
                         r.basis_offset >= 0;
    CUDA_KERNEL_ASSERT(entries && "e3fast::assemble_kernel: a paths row has invalid entries");
    CUDA_KERNEL_ASSERT(r.in_offset + r.in_mul * r.in_dim <= g.in_dim && r.out_offset + r.out_mul * r.out_dim <= g.out_dim &&
                       "e3fast::assemble_kernel: a paths row addresses channels outside the kernel");
    CUDA_KERNEL_ASSERT(r.basis_offset + g.taps * r.in_dim * r.out_dim * g.num_radial <= basis_numel &&
                       "e3fast::assemble_kernel: a paths row needs more basis entries than the basis has");
    CUDA_KERNEL_ASSERT((r.in_mul == 0 || r.out_mul == 0 ||
                        r.weight_offset + (r.in_mul - 1) * r.weight_u_stride + r.out_mul <= g.radial_numel) &&
                       "e3fast::assemble_kernel: a paths row addresses radial weight columns beyond radial_numel");
  }
  for (int64_t s = threadIdx.x; s < tables.num_self_connections; s += blockDim.x) {
    const SelfConnectionRow r = read_self_connection(tables.self_connections, s);
    const bool entries = r.in_mul >= 0 && r.out_mul >= 0 && r.dim > 0 && r.in_offset >= 0 && r.out_offset >= 0 &&
                         r.weight_offset >= 0;
    CUDA_KERNEL_ASSERT(entries && "e3fast::assemble_kernel: a self_connections row has invalid entries");
    CUDA_KERNEL_ASSERT(r.in_offset + r.in_mul * r.dim <= g.in_dim && r.out_offset + r.out_mul * r.dim <= g.out_dim &&
                       "e3fast::assemble_kernel: a self_connections row addresses channels outside the kernel");
    CUDA_KERNEL_ASSERT(r.weight_offset + r.in_mul * r.out_mul <= g.sc_numel &&
                       "e3fast::assemble_kernel: a self_connections row addresses sc_weight entries beyond sc_numel");
  }
}

// ------------------------------------------------------------------------------------------
// Host side: checks and table upload
// ------------------------------------------------------------------------------------------

void check_float_input(const at::Tensor& tensor, const char* op, const char* name, at::ScalarType dtype,
                       const at::Device& device) {
  check_device(tensor, device, op, name);
  check_float_dtype(tensor, name, dtype);
}

// The tables (contiguous, on the device, checked by check_tables_kernel) and their scales.
struct DeviceTables {
  at::Tensor paths, self_connections, sc_scales;
  Tables tables;
};

DeviceTables device_tables(const at::Tensor& paths, const at::Tensor& self_connections,
                           at::ArrayRef<double> sc_scales, const Geometry& g, int64_t basis_numel,
                           const at::Device& device, const char* op) {
  check_table(paths, kPathColumns, device, op, "paths");
  check_table(self_connections, kSelfConnectionColumns, device, op, "self_connections");
  TORCH_CHECK(static_cast<int64_t>(sc_scales.size()) == self_connections.size(0), "e3fast: sc_scales has ",
              sc_scales.size(), " entries but self_connections has ", self_connections.size(0), " rows");
  DeviceTables out;
  out.paths = paths.contiguous();
  out.self_connections = self_connections.contiguous();
  out.sc_scales = device_doubles(sc_scales, device);
  out.tables = Tables{out.paths.data_ptr<int64_t>(), out.paths.size(0), out.self_connections.data_ptr<int64_t>(),
                      out.sc_scales.data_ptr<double>(), out.self_connections.size(0)};
  if (out.tables.num_paths + out.tables.num_self_connections > 0) {
    check_tables_kernel<<<1, kCheckThreads, 0, current_stream()>>>(out.tables, g, basis_numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t>
__global__ void assemble_kernel(const scalar_t* __restrict__ radial, const scalar_t* __restrict__ sc,
                                const scalar_t* __restrict__ basis, Tables tables, Geometry g,
                                Divider<index_t> taps_divider, Divider<index_t> in_divider, index_t total,
                                scalar_t* __restrict__ kernel) {
  using acc_t = at::opmath_type<scalar_t>;
  E3FAST_GRID_STRIDE_LOOP(index_t, e, total) {
    const auto row_tap = taps_divider.divmod(e);
    const auto out_in = in_divider.divmod(row_tap.div);
    const int64_t o = out_in.div, i = out_in.mod, t = row_tap.mod;
    acc_t acc = 0;
    for (int64_t p = 0; p < tables.num_paths; ++p) {
      const PathRow r = read_path(tables.paths, p);
      const int64_t out_local = o - r.out_offset, in_local = i - r.in_offset;
      if (out_local < 0 || out_local >= r.out_mul * r.out_dim || in_local < 0 || in_local >= r.in_mul * r.in_dim) {
        continue;
      }
      const int64_t w = out_local / r.out_dim, m3 = out_local % r.out_dim;
      const int64_t u = in_local / r.in_dim, m1 = in_local % r.in_dim;
      const scalar_t* weights = radial + r.weight_offset + u * r.weight_u_stride + w;
      const scalar_t* coefficients = basis + r.basis_offset + ((t * r.in_dim + m1) * r.out_dim + m3) * g.num_radial;
      for (int64_t q = 0; q < g.num_radial; ++q) {
        acc += static_cast<acc_t>(weights[q * g.radial_numel]) * static_cast<acc_t>(coefficients[q]);
      }
    }
    for (int64_t s = 0; s < tables.num_self_connections && t == g.centre(); ++s) {
      const SelfConnectionRow r = read_self_connection(tables.self_connections, s);
      const int64_t out_local = o - r.out_offset, in_local = i - r.in_offset;
      if (out_local < 0 || out_local >= r.out_mul * r.dim || in_local < 0 || in_local >= r.in_mul * r.dim ||
          out_local % r.dim != in_local % r.dim) {
        continue;
      }
      const int64_t w = out_local / r.dim, u = in_local / r.dim;
      acc += static_cast<acc_t>(tables.sc_scales[s]) * static_cast<acc_t>(sc[r.weight_offset + u * r.out_mul + w]);
    }
    kernel[e] = static_cast<scalar_t>(acc);
  }
}

at::Tensor assemble_kernel_cuda(const at::Tensor& radial_weight, const at::Tensor& sc_weight, const at::Tensor& basis,
                                const at::Tensor& paths, const at::Tensor& self_connections,
                                at::ArrayRef<double> sc_scales, int64_t out_dim, int64_t in_dim,
                                at::IntArrayRef kernel_size) {
  check_cuda(radial_weight, kForwardOp, "radial_weight");
  const at::Device device = radial_weight.device();
  c10::cuda::CUDAGuard guard(device);
  const auto dtype = radial_weight.scalar_type();
  check_float_input(radial_weight, kForwardOp, "radial_weight", dtype, device);
  check_float_input(sc_weight, kForwardOp, "sc_weight", dtype, device);
  check_float_input(basis, kForwardOp, "basis", dtype, device);
  TORCH_CHECK(radial_weight.dim() == 2, "e3fast: radial_weight must be 2-D [num_radial, radial_numel], got ",
              radial_weight.sizes());
  TORCH_CHECK(sc_weight.dim() == 1, "e3fast: sc_weight must be 1-D, got ", sc_weight.sizes());
  TORCH_CHECK(basis.dim() == 1, "e3fast: basis must be 1-D, got ", basis.sizes());
  TORCH_CHECK(out_dim >= 0 && in_dim >= 0, "e3fast: out_dim and in_dim must be non-negative");
  const Geometry g{out_dim, in_dim, num_taps(kernel_size), radial_weight.size(0), radial_weight.size(1),
                   sc_weight.size(0)};
  const DeviceTables tables = device_tables(paths, self_connections, sc_scales, g, basis.numel(), device, kForwardOp);

  at::Tensor kernel = at::empty({out_dim, in_dim, kernel_size[0], kernel_size[1], kernel_size[2]},
                                radial_weight.options());
  const int64_t total = kernel.numel();
  if (total == 0) return kernel;
  const at::Tensor radial = radial_weight.contiguous(), sc = sc_weight.contiguous(), basis_c = basis.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "e3fast::assemble_kernel_cuda", [&] {
    with_index_type(total, [&](auto index_tag) {
      using index_t = decltype(index_tag);
      assemble_kernel<scalar_t, index_t><<<grid_blocks(total), kBlockThreads, 0, current_stream()>>>(
          radial.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), basis_c.data_ptr<scalar_t>(), tables.tables, g,
          divider<index_t>(g.taps), divider<index_t>(in_dim), static_cast<index_t>(total),
          kernel.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return kernel;
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// (u, w) of weight column `column` in path row r; false when the row does not use the column.
__device__ bool path_uses_column(const PathRow& r, int64_t column, int64_t& u, int64_t& w) {
  const int64_t local = column - r.weight_offset;
  if (local < 0 || r.out_mul == 0) return false;
  u = local / r.weight_u_stride;
  w = local % r.weight_u_stride;
  return u < r.in_mul && w < r.out_mul;
}

// grad_radial[r, column] for r in [r0, r0 + kRadialChunk), one warp per column.
template <typename scalar_t>
__global__ void radial_gradient_kernel(const scalar_t* __restrict__ grad_kernel, const scalar_t* __restrict__ basis,
                                       Tables tables, Geometry g, scalar_t* __restrict__ grad_radial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t column = first_warp; column < g.radial_numel; column += warps) {
    for (int64_t r0 = 0; r0 < g.num_radial; r0 += kRadialChunk) {
      acc_t sums[kRadialChunk] = {};
      const int64_t chunk = g.num_radial - r0 < kRadialChunk ? g.num_radial - r0 : kRadialChunk;
      for (int64_t p = 0; p < tables.num_paths; ++p) {
        const PathRow r = read_path(tables.paths, p);
        int64_t u, w;
        if (!path_uses_column(r, column, u, w)) continue;
        const int64_t span = r.in_dim * g.taps;  // (m1, t) of one kernel row, contiguous
        for (int64_t m3 = 0; m3 < r.out_dim; ++m3) {
          const scalar_t* grad_row =
              grad_kernel + (r.out_offset + w * r.out_dim + m3) * g.in_dim * g.taps + (r.in_offset + u * r.in_dim) * g.taps;
          for (int64_t j = lane; j < span; j += kWarpSize) {
            const int64_t m1 = j / g.taps, t = j % g.taps;
            const acc_t grad = static_cast<acc_t>(grad_row[j]);
            const scalar_t* coefficients = basis + r.basis_offset + ((t * r.in_dim + m1) * r.out_dim + m3) * g.num_radial + r0;
#pragma unroll
            for (int q = 0; q < kRadialChunk; ++q) {
              if (q < chunk) sums[q] += static_cast<acc_t>(coefficients[q]) * grad;
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kRadialChunk; ++q) {
        const acc_t total = warp_sum(sums[q]);
        if (lane == 0 && q < chunk) grad_radial[(r0 + q) * g.radial_numel + column] = static_cast<scalar_t>(total);
      }
    }
  }
}

// grad_sc[column]: one thread per self-connection weight.
template <typename scalar_t>
__global__ void sc_gradient_kernel(const scalar_t* __restrict__ grad_kernel, Tables tables, Geometry g,
                                   scalar_t* __restrict__ grad_sc) {
  using acc_t = at::opmath_type<scalar_t>;
  E3FAST_GRID_STRIDE_LOOP(int64_t, column, g.sc_numel) {
    acc_t acc = 0;
    for (int64_t s = 0; s < tables.num_self_connections; ++s) {
      const SelfConnectionRow r = read_self_connection(tables.self_connections, s);
      const int64_t local = column - r.weight_offset;
      if (local < 0 || local >= r.in_mul * r.out_mul) continue;
      const int64_t u = local / r.out_mul, w = local % r.out_mul;
      acc_t diagonal = 0;
      for (int64_t m = 0; m < r.dim; ++m) {
        const int64_t o = r.out_offset + w * r.dim + m, i = r.in_offset + u * r.dim + m;
        diagonal += static_cast<acc_t>(grad_kernel[(o * g.in_dim + i) * g.taps + g.centre()]);
      }
      acc += static_cast<acc_t>(tables.sc_scales[s]) * diagonal;
    }
    grad_sc[column] = static_cast<scalar_t>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor> assemble_kernel_backward_cuda(const at::Tensor& grad_kernel, const at::Tensor& basis,
                                                                 const at::Tensor& paths,
                                                                 const at::Tensor& self_connections,
                                                                 at::ArrayRef<double> sc_scales, int64_t num_radial,
                                                                 int64_t radial_numel, int64_t sc_numel) {
  check_cuda(grad_kernel, kBackwardOp, "grad_kernel");
  const at::Device device = grad_kernel.device();
  c10::cuda::CUDAGuard guard(device);
  const auto dtype = grad_kernel.scalar_type();
  check_float_input(grad_kernel, kBackwardOp, "grad_kernel", dtype, device);
  check_float_input(basis, kBackwardOp, "basis", dtype, device);
  TORCH_CHECK(grad_kernel.dim() == 5, "e3fast: grad_kernel must be 5-D [out_dim, in_dim, kx, ky, kz], got ",
              grad_kernel.sizes());
  TORCH_CHECK(basis.dim() == 1, "e3fast: basis must be 1-D, got ", basis.sizes());
  TORCH_CHECK(num_radial >= 0 && radial_numel >= 0 && sc_numel >= 0,
              "e3fast: num_radial, radial_numel and sc_numel must be non-negative");
  const Geometry g{grad_kernel.size(0), grad_kernel.size(1), num_taps(grad_kernel.sizes().slice(2)), num_radial,
                   radial_numel, sc_numel};
  const DeviceTables tables = device_tables(paths, self_connections, sc_scales, g, basis.numel(), device, kBackwardOp);

  const at::Tensor grad = grad_kernel.contiguous(), basis_c = basis.contiguous();
  at::Tensor grad_radial = at::empty({num_radial, radial_numel}, grad_kernel.options());
  at::Tensor grad_sc = at::empty({sc_numel}, grad_kernel.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "e3fast::assemble_kernel_backward_cuda", [&] {
    if (num_radial > 0 && radial_numel > 0) {
      radial_gradient_kernel<scalar_t><<<grid_blocks(radial_numel * kWarpSize), kBlockThreads, 0, current_stream()>>>(
          grad.data_ptr<scalar_t>(), basis_c.data_ptr<scalar_t>(), tables.tables, g, grad_radial.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sc_numel > 0) {
      sc_gradient_kernel<scalar_t><<<grid_blocks(sc_numel), kBlockThreads, 0, current_stream()>>>(
          grad.data_ptr<scalar_t>(), tables.tables, g, grad_sc.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_radial, grad_sc};
}

}  // namespace

TORCH_LIBRARY_IMPL(e3fast, CUDA, m) {
  m.impl("assemble_kernel", &assemble_kernel_cuda);
  m.impl("assemble_kernel_backward", &assemble_kernel_backward_cuda);
}

}  // namespace e3fast
