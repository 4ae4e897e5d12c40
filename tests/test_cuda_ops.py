"""The CUDA kernels of the fused ops against the pure-PyTorch references, on a GPU.

Skipped without a CUDA device. The kernels are called through ``torch.ops.e3fast.*`` with CUDA
tensors (the dispatcher picks them by device; autograd is the ops' Python registration), so
these tests do not depend on which backends ``e3fast/ops/*.py`` list; the whole network runs
under ``e3fast.use_backend("cuda")``.

Tolerances: float32 1e-5 and float64 1e-10 relative (``max|a - e| / max|e|``) against the
reference in the same dtype; bfloat16 / float16 at most twice the same-dtype reference's error
against a float32 reference (and never below one unit of the dtype's precision).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from e3nn import o3
from hypothesis import given, settings
from hypothesis import strategies as st

import e3fast
from conftest import LAYOUTS, RTOL, assert_relative, relative_error, to_layout
from e3fast import native_extension
from e3fast.irreps_layout import field_table
from e3fast.ops import NormGateSpec, assemble_kernel_reference, norm_gate_reference, norm_max_pool3d_reference
from e3fast.steerable_basis import voxel_convolution_basis
from strategies import irreps as random_irreps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEVICE = "cuda"
LOW_PRECISION = [torch.bfloat16, torch.float16]
DTYPE_PRECISION = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32 in the references' convolutions and matrix products."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_low_precision(actual, same_dtype, float32, dtype, what):
    """``actual`` (computed from ``dtype`` inputs) within twice the same-dtype reference's error of
    the float32 reference."""
    allowed = max(2 * relative_error(same_dtype, float32), DTYPE_PRECISION[dtype])
    error = relative_error(actual, float32)
    assert error <= allowed, f"{what}: relative error {error:.3g} > {allowed:.3g} (2x the same-dtype reference)"


def test_the_extension_has_the_cuda_kernels():
    assert native_extension.native_cuda_available(), (
        "e3fast._C has no CUDA kernels: rebuild with a CUDA torch and nvcc (E3FAST_CUDA=1 makes it an error)")


def test_public_ops_list_the_cuda_backend():
    for name in ("kernel_assembly", "norm_gate", "norm_max_pool"):
        module = importlib.import_module(f"e3fast.ops.{name}")
        assert "cuda" in module.IMPLEMENTED, f"e3fast/ops/{name}.py does not list 'cuda' in IMPLEMENTED"


# ---------------------------------------------------------------------------------------------
# Norm + gate
# ---------------------------------------------------------------------------------------------

# Every activation id, odd scalars, l = 1 and 2 gated fields.
ALL_ACTIVATIONS = NormGateSpec.for_gate("2x0e+2x0o+1x0e+1x0o", [torch.relu, torch.tanh, "silu", None],
                                        "1x0e+1x0o", [torch.sigmoid, torch.abs], "1x1o+1x2e")
# The U-Net's layer: 36 input channels (two channel tiles of the channels-last reductions).
TYPICAL = NormGateSpec.for_gate("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")
MODES = {"instance": 1, "batch": 2, "running": 3, "none": 0}
EPS = 1e-5


def norm_gate_parameters(spec: NormGateSpec, mode: int) -> dict:
    if mode == 0:
        return {}
    params = {"weight": torch.rand(spec.num_fields, device=DEVICE) + 0.5,
              "bias": torch.randn(spec.num_scalars, device=DEVICE)}
    if mode == 3:
        params["running_mean"] = torch.randn(spec.num_scalars, device=DEVICE)
        params["running_var"] = torch.rand(spec.num_fields, device=DEVICE) + 0.5
    return params


def voxels(spec: NormGateSpec, shape, dtype=torch.float32, layout="channels_first", offset=0.0):
    batch, *spatial = shape
    x = torch.randn(batch, spec.irreps_in.dim, *spatial, device=DEVICE, dtype=torch.float64) * 1.5 + offset
    return to_layout(x.to(dtype), layout)


def norm_gate_results(backend: str, x, spec: NormGateSpec, params: dict, mode: int, grad_y) -> dict:
    """y, mean, var and the gradients of <y, grad_y> on ``backend`` ("cuda" or "reference")."""
    x = x.detach().clone().requires_grad_()
    trainable = {"x": x}
    for name in ("weight", "bias"):
        if name in params:
            trainable[name] = params[name].detach().clone().requires_grad_()
    weight, bias = trainable.get("weight"), trainable.get("bias")
    running_mean, running_var = params.get("running_mean"), params.get("running_var")
    if backend == "cuda":
        fields, gates = spec.tables(x.device)
        y, mean, var = torch.ops.e3fast.norm_gate(x, weight, bias, running_mean, running_var, fields, gates,
                                                  spec.act_scales, spec.num_scalars, mode, EPS)
    else:
        y, mean, var = norm_gate_reference(x, spec, weight, bias, running_mean, running_var, mode, EPS)
    grads = torch.autograd.grad(y, list(trainable.values()), grad_y.to(y.dtype), allow_unused=True,
                                materialize_grads=True)
    return {"y": y, "mean": mean, "var": var, **{f"grad {name}": g for name, g in zip(trainable, grads)}}


def compare_norm_gate(x, spec, mode, rtol, grad_y=None):
    params = norm_gate_parameters(spec, mode)
    if grad_y is None:
        grad_y = torch.randn(x.shape[0], spec.irreps_out.dim, *x.shape[2:], device=DEVICE, dtype=x.dtype)
    cuda = norm_gate_results("cuda", x, spec, params, mode, grad_y)
    reference = norm_gate_results("reference", x, spec, params, mode, grad_y)
    assert cuda["y"].stride() == reference["y"].stride(), "output memory format"
    assert cuda["grad x"].stride() == x.stride(), "input gradient memory format"
    for name, expected in reference.items():
        assert cuda[name].dtype == expected.dtype, name
        assert_relative(cuda[name], expected, rtol, name)
    return cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_norm_gate_matches_reference(mode, layout, dtype):
    compare_norm_gate(voxels(ALL_ACTIVATIONS, (2, 3, 5, 7), dtype, layout, offset=0.3), ALL_ACTIVATIONS, mode,
                      RTOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_norm_gate_many_blocks(mode, layout):
    """Several voxel chunks and channel tiles per reduction, batch statistics across samples."""
    compare_norm_gate(voxels(TYPICAL, (3, 16, 17, 20), layout=layout, offset=0.5), TYPICAL, mode,
                      RTOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", [1, 2], ids=["instance", "batch"])
def test_norm_gate_large_common_offset(mode, layout):
    """x + 100 in float32: float32 kernels against the float64 reference of the same input."""
    spec = TYPICAL
    x = voxels(spec, (2, 9, 10, 11), layout=layout, offset=100.0)
    params = norm_gate_parameters(spec, mode)
    grad_y = torch.randn(2, spec.irreps_out.dim, 9, 10, 11, device=DEVICE)
    cuda = norm_gate_results("cuda", x, spec, params, mode, grad_y)
    exact = norm_gate_results("reference", x.double(), spec, {k: v.double() for k, v in params.items()}, mode,
                              grad_y.double())
    assert relative_error(cuda["y"], exact["y"]) <= 1e-5, "output against float64"
    assert relative_error(cuda["var"], exact["var"]) <= 1e-5, "var against float64"
    for name in ("grad x", "grad weight", "grad bias"):
        assert relative_error(cuda[name], exact[name]) <= 1e-4, f"{name} against float64"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_norm_gate_low_precision(mode, layout, dtype):
    spec = ALL_ACTIVATIONS
    x = voxels(spec, (2, 4, 5, 6), dtype, layout)
    params = norm_gate_parameters(spec, mode)
    grad_y = torch.randn(2, spec.irreps_out.dim, 4, 5, 6, device=DEVICE).to(dtype)
    cuda = norm_gate_results("cuda", x, spec, params, mode, grad_y)
    same_dtype = norm_gate_results("reference", x, spec, params, mode, grad_y)
    float32 = norm_gate_results("reference", x.float(), spec, params, mode, grad_y.float())
    assert cuda["y"].dtype == cuda["grad x"].dtype == dtype
    assert cuda["y"].stride() == same_dtype["y"].stride()
    for name in ("y", "grad x", "grad weight", "grad bias"):
        if name in float32:
            assert_low_precision(cuda[name], same_dtype[name], float32[name], dtype, f"{name} ({dtype})")
    for name in ("mean", "var"):  # computed in float32 from the same values
        assert_relative(cuda[name], float32[name], 1e-5, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_norm_gate_grad_output_in_other_memory_format(layout):
    spec = TYPICAL
    x = voxels(spec, (2, 4, 3, 5), layout=layout)
    other = "channels_first" if layout == "channels_last" else "channels_last"
    grad_y = to_layout(torch.randn(2, spec.irreps_out.dim, 4, 3, 5, device=DEVICE), other)
    compare_norm_gate(x, spec, 1, RTOL[torch.float32], grad_y)


def test_norm_gate_strided_input():
    spec = TYPICAL
    x = voxels(spec, (2, 4, 3, 10))[..., ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    params = norm_gate_parameters(spec, 1)
    fields, gates = spec.tables(x.device)
    y, _, _ = torch.ops.e3fast.norm_gate(x, params["weight"], params["bias"], None, None, fields, gates,
                                         spec.act_scales, spec.num_scalars, 1, EPS)
    expected, _, _ = norm_gate_reference(x, spec, params["weight"], params["bias"], None, None, 1, EPS)
    assert_relative(y, expected, RTOL[torch.float32], "output")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_norm_gate_zero_input_is_finite(mode, layout):
    spec = ALL_ACTIVATIONS
    x = voxels(spec, (2, 2, 3, 2), layout=layout) * 0
    cuda = compare_norm_gate(x, spec, mode, RTOL[torch.float32])
    for name, value in cuda.items():
        assert torch.isfinite(value).all(), name


@pytest.mark.parametrize("shape", [(0, 2, 2, 2), (2, 0, 3, 2)], ids=["no-samples", "no-voxels"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_norm_gate_empty_input(mode, shape):
    spec = TYPICAL
    x = voxels(spec, shape, layout="channels_last")
    grad_y = torch.zeros(shape[0], spec.irreps_out.dim, *shape[1:], device=DEVICE)
    params = norm_gate_parameters(spec, mode)
    cuda = norm_gate_results("cuda", x, spec, params, mode, grad_y)
    reference = norm_gate_results("reference", x, spec, params, mode, grad_y)
    for name, expected in reference.items():
        assert cuda[name].shape == expected.shape, name


@st.composite
def gate_specs(draw) -> NormGateSpec:
    """A norm-only spec of random irreps, or a gate with sigmoid gates on 0e scalars."""
    if draw(st.booleans()):
        irreps = draw(random_irreps(max_mul=4).filter(lambda ir: ir.num_irreps > 0))
        return NormGateSpec.norm_only(irreps, draw(st.sampled_from(["component", "norm"])))
    scalars = draw(st.integers(0, 4))
    gated = draw(st.lists(st.tuples(st.integers(1, 4), st.sampled_from(["1e", "1o", "2e", "3o"])), min_size=1,
                          max_size=3))
    return NormGateSpec.for_gate(f"{scalars}x0e" if scalars else "", ["relu"] if scalars else [],
                                 f"{sum(m for m, _ in gated)}x0e", ["sigmoid"],
                                 "+".join(f"{m}x{ir}" for m, ir in gated))


@settings(max_examples=6, deadline=None)
@given(spec=gate_specs(), mode=st.sampled_from(list(MODES.values())), layout=st.sampled_from(LAYOUTS),
       batch=st.integers(1, 2), spatial=st.tuples(*[st.integers(2, 5)] * 3))
def test_norm_gate_random_irreps(spec, mode, layout, batch, spatial):
    torch.manual_seed(0)
    compare_norm_gate(voxels(spec, (batch, *spatial), layout=layout), spec, mode, RTOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Norm max pooling
# ---------------------------------------------------------------------------------------------

POOL_IRREPS = o3.Irreps("2x0e+1x0o+2x1o+1x2e+1x3o")
GEOMETRIES = {"k2s2": ((2, 2, 2), (2, 2, 2)), "k213s212": ((2, 1, 3), (2, 1, 2)),
              "k3s2-overlap": ((3, 3, 3), (2, 2, 2)), "k776-int32": ((7, 7, 6), (1, 1, 2))}


def pool_results(backend, x, irreps, kernel_size, stride, grad_y):
    """y and the gradient of <y, grad_y> w.r.t. x on ``backend`` ("cuda" or "reference")."""
    x = x.detach().clone().requires_grad_()
    if backend == "cuda":
        y, argmax = torch.ops.e3fast.norm_max_pool3d(x, field_table(irreps).to(x.device), list(kernel_size),
                                                      list(stride))
        window = kernel_size[0] * kernel_size[1] * kernel_size[2]
        assert argmax.dtype == (torch.uint8 if window <= 256 else torch.int32)
    else:
        y = norm_max_pool3d_reference(x, irreps, kernel_size, stride)
    (grad_x,) = torch.autograd.grad(y, x, grad_y.to(y.dtype))
    return y, grad_x


def pool_gradient(x, irreps, kernel_size, stride):
    shape = norm_max_pool3d_reference(x.detach().float(), irreps, kernel_size, stride).shape
    layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last_3d) else "channels_first"
    return to_layout(torch.randn(shape, device=DEVICE), layout)


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pool_matches_reference(dtype, layout, geometry):
    kernel_size, stride = geometry
    x = to_layout(torch.randn(2, POOL_IRREPS.dim, 9, 8, 11, device=DEVICE, dtype=dtype), layout)
    grad_y = pool_gradient(x, POOL_IRREPS, kernel_size, stride).to(dtype)
    y, grad_x = pool_results("cuda", x, POOL_IRREPS, kernel_size, stride, grad_y)
    y_ref, grad_x_ref = pool_results("reference", x, POOL_IRREPS, kernel_size, stride, grad_y)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and grad_x.is_contiguous(memory_format=fmt)
    assert_relative(y, y_ref, RTOL[dtype], "y")
    assert_relative(grad_x, grad_x_ref, RTOL[dtype], "grad x")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_low_precision(dtype, layout):
    kernel_size, stride = GEOMETRIES["k3s2-overlap"]
    x = to_layout(torch.randn(2, POOL_IRREPS.dim, 9, 8, 11, device=DEVICE).to(dtype), layout)
    grad_y = pool_gradient(x, POOL_IRREPS, kernel_size, stride).to(dtype)
    cuda = pool_results("cuda", x, POOL_IRREPS, kernel_size, stride, grad_y)
    same_dtype = pool_results("reference", x, POOL_IRREPS, kernel_size, stride, grad_y)
    float32 = pool_results("reference", x.float(), POOL_IRREPS, kernel_size, stride, grad_y.float())
    for name, actual, same, exact in zip(("y", "grad x"), cuda, same_dtype, float32):
        assert actual.dtype == dtype
        assert_low_precision(actual, same, exact, dtype, f"{name} ({dtype})")


@settings(max_examples=6, deadline=None)
@given(irreps=random_irreps(max_mul=3), size=st.tuples(*[st.integers(3, 7)] * 3),
       kernel_size=st.tuples(*[st.integers(1, 3)] * 3), stride=st.tuples(*[st.integers(1, 3)] * 3),
       batch=st.integers(1, 3), layout=st.sampled_from(LAYOUTS))
def test_pool_random_irreps(irreps, size, kernel_size, stride, batch, layout):
    torch.manual_seed(0)
    x = to_layout(torch.randn(batch, irreps.dim, *size, device=DEVICE), layout)
    grad_y = pool_gradient(x, irreps, kernel_size, stride)
    for actual, expected in zip(pool_results("cuda", x, irreps, kernel_size, stride, grad_y),
                                pool_results("reference", x, irreps, kernel_size, stride, grad_y)):
        assert_relative(actual, expected, RTOL[torch.float32], f"{irreps}, kernel {kernel_size}, stride {stride}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_zero_input(layout):
    x = to_layout(torch.zeros(2, POOL_IRREPS.dim, 4, 4, 4, device=DEVICE), layout).requires_grad_()
    y, argmax = torch.ops.e3fast.norm_max_pool3d(x, field_table(POOL_IRREPS).to(DEVICE), [2, 2, 2], [2, 2, 2])
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert torch.all(y == 0) and torch.all(argmax == 0), "ties go to the first window position"
    expected = torch.zeros_like(grad_x)
    expected[:, :, ::2, ::2, ::2] = grad_y
    assert torch.equal(grad_x, expected)


def test_pool_strided_input_and_uncovered_channels():
    base = torch.randn(2, POOL_IRREPS.dim, 9, 6, 10, device=DEVICE)
    x = base[:, :, ::2, :, 1:]
    grad_y = pool_gradient(x, POOL_IRREPS, (2, 2, 3), (2, 2, 3))
    for actual, expected in zip(pool_results("cuda", x, POOL_IRREPS, (2, 2, 3), (2, 2, 3), grad_y),
                                pool_results("reference", x, POOL_IRREPS, (2, 2, 3), (2, 2, 3), grad_y)):
        assert_relative(actual, expected, RTOL[torch.float32], "strided input")
    fields = field_table(POOL_IRREPS)[1:].to(DEVICE)  # channel 0 in no field
    y, argmax = torch.ops.e3fast.norm_max_pool3d(base, fields, [2, 2, 2], [2, 2, 2])
    assert torch.all(y[:, 0] == 0) and torch.all(y[:, 1:] != 0)
    grad_x = torch.ops.e3fast.norm_max_pool3d_backward(torch.ones_like(y), argmax, fields, [9, 6, 10], [2, 2, 2],
                                                       [2, 2, 2])
    assert torch.all(grad_x[:, 0] == 0) and grad_x[:, 1:].sum() == y[:, 1:].numel()


# ---------------------------------------------------------------------------------------------
# Kernel assembly
# ---------------------------------------------------------------------------------------------

ASSEMBLY_STEPS = (1.0, 0.7, 1.3)  # a 3 x 5 x 3 lattice for diameter 3


def assembly_basis(irreps_in="3x0e+2x1o+1x2e+1x3o", irreps_out="2x0e+1x0o+2x1o+1x2e+1x2o", irreps_sh="0e+1o+2e+3o",
                   steps=ASSEMBLY_STEPS, num_radial=3):
    return voxel_convolution_basis(irreps_in, irreps_out, irreps_sh, 3.0, num_radial, steps, cutoff=True).to(DEVICE)


def assembly_results(backend, radial, sc, basis, grad_kernel):
    """The kernel and the gradients of <kernel, grad_kernel> w.r.t. both weights."""
    radial, sc = radial.detach().clone().requires_grad_(), sc.detach().clone().requires_grad_()
    if backend == "cuda":
        kernel = torch.ops.e3fast.assemble_kernel(radial, sc, basis.basis.to(radial.dtype), basis.paths,
                                                  basis.self_connections, basis.sc_scales, basis.out_dim,
                                                  basis.in_dim, list(basis.kernel_size))
    else:
        kernel = assemble_kernel_reference(radial, sc, basis)
    if not kernel.requires_grad:  # the reference kernel of irreps without paths is constant
        return kernel, torch.zeros_like(radial), torch.zeros_like(sc)
    grads = torch.autograd.grad(kernel, (radial, sc), grad_kernel.to(kernel.dtype), allow_unused=True,
                                materialize_grads=True)
    return (kernel, *grads)


def assembly_inputs(basis, dtype=torch.float32):
    radial = torch.randn(basis.num_radial, basis.radial_numel, device=DEVICE, dtype=dtype)
    sc = torch.randn(basis.sc_numel, device=DEVICE, dtype=dtype)
    grad_kernel = torch.randn(basis.out_dim, basis.in_dim, *basis.kernel_size, device=DEVICE, dtype=dtype)
    return radial, sc, grad_kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_assembly_matches_reference(dtype):
    basis = assembly_basis()
    inputs = assembly_inputs(basis, dtype)
    cuda = assembly_results("cuda", *inputs[:2], basis, inputs[2])
    reference = assembly_results("reference", *inputs[:2], basis, inputs[2])
    assert cuda[0].dtype == dtype and cuda[0].is_contiguous()
    for name, actual, expected in zip(("kernel", "grad radial_weight", "grad sc_weight"), cuda, reference):
        assert expected.abs().max() > 0, name
        assert_relative(actual, expected, RTOL[dtype], name)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_assembly_low_precision(dtype):
    basis = assembly_basis()
    radial, sc, grad_kernel = assembly_inputs(basis)
    radial, sc, grad_kernel = radial.to(dtype), sc.to(dtype), grad_kernel.to(dtype)
    cuda = assembly_results("cuda", radial, sc, basis, grad_kernel)
    same_dtype = assembly_results("reference", radial, sc, basis, grad_kernel)
    float32 = assembly_results("reference", radial.float(), sc.float(), basis, grad_kernel.float())
    for name, actual, same, exact in zip(("kernel", "grad radial_weight", "grad sc_weight"), cuda, same_dtype,
                                         float32):
        assert actual.dtype == dtype
        assert_low_precision(actual, same, exact, dtype, f"{name} ({dtype})")


@settings(max_examples=5, deadline=None)
@given(irreps_in=random_irreps(max_mul=4, max_entries=3), irreps_out=random_irreps(max_mul=4, max_entries=3),
       steps=st.sampled_from([(1.0, 1.0, 1.0), ASSEMBLY_STEPS]), num_radial=st.integers(1, 9))
def test_assembly_random_irreps(irreps_in, irreps_out, steps, num_radial):
    torch.manual_seed(0)
    basis = assembly_basis(irreps_in, irreps_out, "0e+1o+2e", steps, num_radial)
    radial, sc, grad_kernel = assembly_inputs(basis)
    for name, actual, expected in zip(("kernel", "grad radial_weight", "grad sc_weight"),
                                      assembly_results("cuda", radial, sc, basis, grad_kernel),
                                      assembly_results("reference", radial, sc, basis, grad_kernel)):
        assert_relative(actual, expected, RTOL[torch.float32], f"{name} for {irreps_in} -> {irreps_out}")


def test_assembly_backward_details():
    """Unused weight columns get zero gradient; a strided grad_kernel gives the dense result."""
    basis = assembly_basis()
    paths = basis.paths[::2].contiguous()
    grad = torch.randn(basis.in_dim, basis.out_dim, *basis.kernel_size, device=DEVICE).transpose(0, 1)
    args = (basis.basis, paths, basis.self_connections, basis.sc_scales, basis.num_radial, basis.radial_numel,
            basis.sc_numel)
    grad_radial, grad_sc = torch.ops.e3fast.assemble_kernel_backward(grad, *args)
    dense = torch.ops.e3fast.assemble_kernel_backward(grad.contiguous(), *args)
    assert torch.equal(grad_radial, dense[0]) and torch.equal(grad_sc, dense[1])
    covered = torch.zeros(basis.radial_numel, dtype=torch.bool)
    for in_off, mul_in, d1, out_off, mul_out, d3, w_off, stride, b_off in paths.tolist():
        for u in range(mul_in):
            covered[w_off + u * stride:w_off + u * stride + mul_out] = True
    assert torch.all(grad_radial[:, ~covered.to(DEVICE)] == 0)
    assert torch.all(grad_radial[:, covered.to(DEVICE)].abs().sum(0) > 0)


# ---------------------------------------------------------------------------------------------
# opcheck, device mixes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,layout", [(1, "channels_first"), (2, "channels_last"), (0, "channels_last")])
def test_opcheck_norm_gate(mode, layout):
    spec = ALL_ACTIVATIONS
    x = voxels(spec, (2, 3, 2, 3), layout=layout).requires_grad_()
    params = {name: t.requires_grad_() if name in ("weight", "bias") else t
              for name, t in norm_gate_parameters(spec, mode).items()}
    fields, gates = spec.tables(x.device)
    args = (x, params.get("weight"), params.get("bias"), params.get("running_mean"), params.get("running_var"),
            fields, gates, spec.act_scales, spec.num_scalars, mode, EPS)
    torch.library.opcheck(torch.ops.e3fast.norm_gate.default, args)
    if mode == 1:
        with torch.no_grad():
            _, mean, var = torch.ops.e3fast.norm_gate(*args)
        grad_y = torch.randn(2, spec.irreps_out.dim, 3, 2, 3, device=DEVICE)
        torch.library.opcheck(torch.ops.e3fast.norm_gate_backward.default,
                              (grad_y, x.detach(), params["weight"].detach(), params["bias"].detach(), mean, var,
                               fields, gates, spec.act_scales, mode, EPS))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_pool(layout):
    kernel_size, stride = GEOMETRIES["k213s212"]
    x = to_layout(torch.randn(2, 9, 5, 4, 5, device=DEVICE), layout).requires_grad_()
    args = (x, field_table(o3.Irreps("1x0e+1x1o+1x2e")).to(DEVICE), list(kernel_size), list(stride))
    torch.library.opcheck(torch.ops.e3fast.norm_max_pool3d.default, args)
    y, argmax = torch.ops.e3fast.norm_max_pool3d(*args)
    torch.library.opcheck(torch.ops.e3fast.norm_max_pool3d_backward.default,
                          (torch.randn_like(y), argmax, args[1], [5, 4, 5], list(kernel_size), list(stride)))


def test_opcheck_assembly():
    basis = assembly_basis("2x0e+1x1o", "1x0e+1x1o+1x2e", "0e+1o+2e", num_radial=2)
    radial, sc, grad_kernel = assembly_inputs(basis)
    args = (radial.requires_grad_(), sc.requires_grad_(), basis.basis, basis.paths, basis.self_connections,
            basis.sc_scales, basis.out_dim, basis.in_dim, list(basis.kernel_size))
    torch.library.opcheck(torch.ops.e3fast.assemble_kernel.default, args)
    torch.library.opcheck(torch.ops.e3fast.assemble_kernel_backward.default,
                          (grad_kernel, basis.basis, basis.paths, basis.self_connections, basis.sc_scales,
                           basis.num_radial, basis.radial_numel, basis.sc_numel))


def test_cpu_and_cuda_tensors_do_not_mix():
    spec = TYPICAL
    x = voxels(spec, (1, 2, 2, 2))
    fields, gates = spec.tables(x.device)
    weight = torch.ones(spec.num_fields, device=DEVICE)
    norm_gate = torch.ops.e3fast.norm_gate
    with pytest.raises(RuntimeError, match="fields must be on cuda"):
        norm_gate(x, None, None, None, None, fields.cpu(), gates, spec.act_scales, spec.num_scalars, 0, EPS)
    with pytest.raises(RuntimeError, match="weight must be on cuda"):
        norm_gate(x, weight.cpu(), None, None, None, fields, gates, spec.act_scales, spec.num_scalars, 1, EPS)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        norm_gate(x.cpu(), None, None, None, None, fields, gates, spec.act_scales, spec.num_scalars, 0, EPS)

    pool_fields = field_table(POOL_IRREPS)
    pool_x = torch.randn(1, POOL_IRREPS.dim, 4, 4, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match="fields must be on cuda"):
        torch.ops.e3fast.norm_max_pool3d(pool_x, pool_fields, [2, 2, 2], [2, 2, 2])
    y, argmax = torch.ops.e3fast.norm_max_pool3d(pool_x, pool_fields.to(DEVICE), [2, 2, 2], [2, 2, 2])
    with pytest.raises(RuntimeError, match="argmax must be on cuda"):
        torch.ops.e3fast.norm_max_pool3d_backward(y, argmax.cpu(), pool_fields.to(DEVICE), [4, 4, 4], [2, 2, 2],
                                                  [2, 2, 2])

    basis = assembly_basis("1x0e+1x1o", "1x0e+1x1o", "0e+1o")
    radial, sc, _ = assembly_inputs(basis)
    args = [radial, sc, basis.basis, basis.paths, basis.self_connections, basis.sc_scales, basis.out_dim,
            basis.in_dim, list(basis.kernel_size)]
    for position, name in ((2, "basis"), (3, "paths"), (4, "self_connections"), (1, "sc_weight")):
        bad = list(args)
        bad[position] = bad[position].cpu()
        with pytest.raises(RuntimeError, match=f"{name} must be on cuda"):
            torch.ops.e3fast.assemble_kernel(*bad)


# ---------------------------------------------------------------------------------------------
# The whole network
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,batch,size", [
    (dict(steps=(1.0, 1.5, 0.8), n_downsample=2), 2, (16, 11, 16)),
    (dict(steps=(1.0, 1.0, 1.0), n_downsample=2, batch_norm="batch", equivariance="O3"), 2, (10, 12, 7)),
], ids=["SO3-instance", "O3-batch"])
def test_unet_on_cuda_equals_e3nn_composition(options, batch, size):
    from e3fast.models import EquivariantUNet
    from e3fast.testing.e3nn_reference import UNet as E3nnUNet

    options = dict(options)
    steps = options.pop("steps")
    reference = E3nnUNet("1x0e", "3x0e", 5.0, 5, steps, n=1, **options)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
    model = EquivariantUNet("1x0e", "3x0e", 5.0, 5, steps, n=1, **options)
    model.load_state_dict(reference.state_dict())
    model, reference = model.to(DEVICE), reference.to(DEVICE)

    x = torch.randn(batch, 1, *size, device=DEVICE)
    x_ref = x.clone().requires_grad_()
    x = x.clone().requires_grad_()
    with e3fast.use_backend("cuda"):
        out = model(x)
    expected = reference(x_ref)
    assert_relative(out, expected, 1e-4, "U-Net output")
    grad_out = torch.randn_like(expected)
    with e3fast.use_backend("cuda"):
        out.backward(grad_out)
    expected.backward(grad_out)
    assert_relative(x.grad, x_ref.grad, 1e-4, "input gradient")
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert_relative(parameter.grad, reference_parameters[name].grad, 1e-4, f"gradient of {name}")
