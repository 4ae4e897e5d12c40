"""The Triton kernels (``e3fast::*_triton``) against the pure-PyTorch reference.

On a machine with a GPU every test runs on CUDA tensors (compiled kernels); without one, on CPU
tensors in triton's interpreter (``TRITON_INTERPRET=1``, set by conftest), with small shapes and
few hypothesis examples so that the file stays within a few minutes on two cores.
Low precision follows flash-attention's rule: the error against the float32 reference (on the
same rounded inputs) is at most twice that of the reference computed in the low precision, plus
float32 rounding.
"""
from __future__ import annotations

import pytest
import torch
from e3nn import o3
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import e3fast
from conftest import LAYOUTS, RTOL, TRITON_DEVICES, assert_relative, relative_error, to_layout
from e3fast import native_extension
from e3fast.irreps_layout import field_table
from e3fast.ops import NormGateSpec, assemble_kernel, norm_gate, norm_max_pool3d, norm_max_pool3d_reference
from e3fast.steerable_basis import SteerableKernelBasis, voxel_convolution_basis
from test_op_norm_gate import ALL_ACTIVATIONS, MODE_IDS, MODES, TYPICAL, make_parameters, random_specs

DEVICES = [pytest.param(device, marks=pytest.mark.skipif(device not in TRITON_DEVICES,
                                                         reason=f"Triton kernels cannot run on {device} here"))
           for device in ("cpu", "cuda")]
LOW_PRECISION = [torch.bfloat16, torch.float16]
FEW_EXAMPLES = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TRITON_OPS = ["assemble_kernel", "assemble_kernel_backward", "norm_gate", "norm_gate_backward", "norm_max_pool3d",
              "norm_max_pool3d_backward"]
MODE_NUMBERS = {"instance": 1, "batch": 2, "none": 0}


def op_mode(normalization: str, training: bool) -> int:
    return 3 if normalization == "batch" and not training else MODE_NUMBERS[normalization]


def check_low_precision(actual, same_dtype, exact, what: str) -> None:
    """Flash-attention's rule: the error of ``actual`` at most twice that of the same-dtype reference
    (rounded to ``actual``'s dtype: the reference kernel assembly returns float32 for half inputs)."""
    allowed = 2 * relative_error(same_dtype.to(actual.dtype), exact) + RTOL[torch.float32]
    assert_relative(actual.float(), exact.float(), allowed, what)


@pytest.mark.parametrize("name", TRITON_OPS)
def test_schemas_match_the_native_ops(name):
    triton_schema = getattr(torch.ops.e3fast, f"{name}_triton").default._schema
    assert triton_schema.name == f"e3fast::{name}_triton"
    if native_extension.native_cpu_available():
        native = getattr(torch.ops.e3fast, name).default._schema
        assert str(triton_schema).replace(f"{name}_triton(", f"{name}(") == str(native)


def test_table_digests_are_read_once_per_table():
    from e3fast.triton_kernels import tables

    builds = []

    def build(host):
        builds.append(host)
        return len(builds)

    table = torch.arange(6).reshape(3, 2)
    assert tables.digest((table,), ("test",), build) == 1
    assert tables.digest((table,), ("test",), build) == 1, "cached while the table is unchanged"
    assert tables.digest((table,), ("other key",), build) == 2
    table[0, 0] = 7
    assert tables.digest((table,), ("test",), build) == 3, "read again after an in-place change"
    assert tables.digest((table.clone(),), ("test",), build) == 4, "another tensor is another table"
    assert torch.equal(builds[-1], table)


# ---------------------------------------------------------------------------------------------
# Normalization + gate
# ---------------------------------------------------------------------------------------------


def gate_inputs(spec: NormGateSpec, normalization: str, device, dtype=torch.float32, layout="channels_first",
                shape=(2, 3, 4, 5), offset: float = 0.3):
    """Input, output gradient and parameters on ``device``."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape[0], spec.irreps_in.dim, *shape[1:], generator=generator, dtype=torch.float64) * 1.5 + offset
    grad_y = torch.randn(shape[0], spec.irreps_out.dim, *shape[1:], generator=generator, dtype=torch.float64)
    params = {name: t.to(device) for name, t in make_parameters(spec, normalization).items()}
    return to_layout(x.to(device, dtype), layout), to_layout(grad_y.to(device, dtype), layout), params


def gate_run(backend, x, grad_y, spec, params, normalization, training):
    """Output, gradients (x, weight, bias) and running statistics after one call on ``backend``."""
    x = x.detach().clone().requires_grad_()
    trainable = {"x": x}
    for name in ("weight", "bias"):
        if name in params:
            trainable[name] = params[name].detach().clone().requires_grad_()
    running = {name: params[name].clone() if name in params else None for name in ("running_mean", "running_var")}
    with e3fast.use_backend(backend):
        y = norm_gate(x, spec, trainable.get("weight"), trainable.get("bias"), running["running_mean"],
                      running["running_var"], normalization=normalization, training=training)
        grads = torch.autograd.grad(y, list(trainable.values()), grad_y.to(y.dtype), allow_unused=True)
    results = {"y": y}
    results.update({f"grad {name}": torch.zeros_like(t) if g is None else g
                    for (name, t), g in zip(trainable.items(), grads)})
    results.update({name: t for name, t in running.items() if t is not None})
    return results


def compare_results(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, wanted in expected.items():
        assert actual[name].dtype == wanted.dtype, name
        assert_relative(actual[name], wanted, rtol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_matches_reference(device, normalization, training, layout, dtype):
    spec = ALL_ACTIVATIONS
    x, grad_y, params = gate_inputs(spec, normalization, device, dtype, layout)
    triton = gate_run("triton", x, grad_y, spec, params, normalization, training)
    reference = gate_run("reference", x, grad_y, spec, params, normalization, training)
    assert triton["y"].stride() == reference["y"].stride() and triton["grad x"].stride() == x.stride()
    compare_results(triton, reference, RTOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization", ["instance", "batch"])
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_large_common_offset(device, normalization, layout):
    """float32 statistics of x + 100 within 1e-5 of the float64 reference (shifted sums)."""
    spec = TYPICAL
    x, grad_y, params = gate_inputs(spec, normalization, device, layout=layout, offset=100.0)
    triton = gate_run("triton", x, grad_y, spec, params, normalization, True)
    exact = gate_run("reference", x.double(), grad_y.double(), spec, params, normalization, True)
    for name, wanted in exact.items():
        assert_relative(triton[name], wanted, RTOL[torch.float32], f"{name} against float64")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_low_precision(device, normalization, training, layout, dtype):
    spec = ALL_ACTIVATIONS
    x, grad_y, params = gate_inputs(spec, normalization, device, dtype, layout)
    triton = gate_run("triton", x, grad_y, spec, params, normalization, training)
    same_dtype = gate_run("reference", x, grad_y, spec, params, normalization, training)
    exact = gate_run("reference", x.float(), grad_y.float(), spec, params, normalization, training)
    assert triton["y"].dtype == triton["grad x"].dtype == dtype
    assert triton["y"].stride() == exact["y"].stride()
    for name, wanted in exact.items():
        check_low_precision(triton[name], same_dtype[name], wanted, f"{name} ({dtype})")


@FEW_EXAMPLES
@given(spec=random_specs(), mode=st.sampled_from(MODES), layout=st.sampled_from(LAYOUTS),
       batch=st.integers(1, 2), spatial=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(2, 4)))
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_random_irreps(device, spec, mode, layout, batch, spatial):
    normalization, training = mode
    group_size = (1 if normalization == "instance" else batch) * spatial[0] * spatial[1] * spatial[2]
    assume(group_size >= 3)  # two-value groups normalize to +-1: their gradient is rounding noise
    x, grad_y, params = gate_inputs(spec, normalization, device, layout=layout, shape=(batch, *spatial))
    compare_results(gate_run("triton", x, grad_y, spec, params, normalization, training),
                    gate_run("reference", x, grad_y, spec, params, normalization, training), RTOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_zero_input_is_finite(device, normalization, training, layout):
    spec = ALL_ACTIVATIONS
    x, grad_y, params = gate_inputs(spec, normalization, device, layout=layout, shape=(2, 2, 3, 2))
    triton = gate_run("triton", x * 0, grad_y, spec, params, normalization, training)
    reference = gate_run("reference", x * 0, grad_y, spec, params, normalization, training)
    assert all(torch.isfinite(t).all() for t in triton.values())
    compare_results(triton, reference, RTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_strided_input_and_mixed_layouts(device):
    """An input in neither layout is copied; a gradient in the other layout is read in place."""
    spec = TYPICAL
    x, _, params = gate_inputs(spec, "instance", device, shape=(2, 3, 4, 10))
    x = x[..., ::2]
    _, grad_y, _ = gate_inputs(spec, "instance", device, layout="channels_last", shape=(2, 3, 4, 5))
    triton = gate_run("triton", x, grad_y, spec, params, "instance", True)
    reference = gate_run("reference", x, grad_y.contiguous(), spec, params, "instance", True)
    compare_results(triton, reference, RTOL[torch.float32])


@pytest.mark.parametrize("shape", [(0, 2, 2, 2), (2, 0, 3, 2)], ids=["no-samples", "no-voxels"])
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_empty_input(device, normalization, training, shape):
    spec = TYPICAL
    x, grad_y, params = gate_inputs(spec, normalization, device, shape=shape)
    triton = gate_run("triton", x, grad_y, spec, params, normalization, training)
    reference = gate_run("reference", x, grad_y, spec, params, normalization, training)
    for name, wanted in reference.items():
        assert triton[name].shape == wanted.shape, name


@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_is_deterministic(device):
    spec = TYPICAL
    x, grad_y, params = gate_inputs(spec, "batch", device, layout="channels_last")
    first = gate_run("triton", x, grad_y, spec, params, "batch", True)
    second = gate_run("triton", x, grad_y, spec, params, "batch", True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


SMALL_GATE = NormGateSpec.for_gate("1x0e+1x0o", [torch.relu, torch.tanh], "1x0e", ["silu"], "1x1o")


@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_gradcheck_float64(device, normalization, training):
    spec = SMALL_GATE
    x, _, params = gate_inputs(spec, normalization, device, torch.float64, "channels_last", shape=(2, 1, 2, 3))
    params = {name: t.double() for name, t in params.items()}
    trainable = [t.requires_grad_() for name, t in params.items() if name in ("weight", "bias")]

    def function(x, *weight_bias):
        named = dict(zip([name for name in ("weight", "bias") if name in params], weight_bias))
        with e3fast.use_backend("triton"):
            return norm_gate(x, spec, named.get("weight"), named.get("bias"), params.get("running_mean"),
                             params.get("running_var"), normalization=normalization, training=training)

    assert torch.autograd.gradcheck(function, (x.requires_grad_(), *trainable), fast_mode=True)


def gate_op_arguments(spec, x, params, mode):
    fields, gates = spec.tables(x.device)
    return (x, params.get("weight"), params.get("bias"), params.get("running_mean"), params.get("running_var"),
            fields, gates, spec.act_scales, spec.num_scalars, mode, 1e-5)


@pytest.mark.parametrize("normalization,training", [MODES[0], MODES[2]], ids=[MODE_IDS[0], MODE_IDS[2]])
@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_opcheck(device, normalization, training):
    spec = TYPICAL
    layout = "channels_last" if training else "channels_first"
    x, grad_y, params = gate_inputs(spec, normalization, device, layout=layout, shape=(2, 2, 2, 3))
    params = {name: t.requires_grad_() if name in ("weight", "bias") else t for name, t in params.items()}
    mode = op_mode(normalization, training)
    args = gate_op_arguments(spec, x.requires_grad_(), params, mode)
    torch.library.opcheck(torch.ops.e3fast.norm_gate_triton.default, args)
    _, mean, var = (t.detach() for t in torch.ops.e3fast.norm_gate_triton(*args))
    weight, bias = (params[name].detach() if name in params else None for name in ("weight", "bias"))
    torch.library.opcheck(torch.ops.e3fast.norm_gate_backward_triton.default,
                          (grad_y, x.detach(), weight, bias, mean, var, *args[5:8], mode, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_norm_gate_rejects_bad_tables(device):
    spec = TYPICAL
    x, _, _ = gate_inputs(spec, "none", device, shape=(1, 2, 2, 2))
    args = list(gate_op_arguments(spec, x, {}, 0))
    fields, gates = spec.tables(x.device)
    for message, bad in {"fields cover": (fields[:-1], gates), "out of range": (fields, gates + 100),
                         "int64 tensor": (fields.int(), gates)}.items():
        args[5], args[6] = bad
        with pytest.raises(RuntimeError, match=message):
            torch.ops.e3fast.norm_gate_triton(*args)


# ---------------------------------------------------------------------------------------------
# Norm max pooling
# ---------------------------------------------------------------------------------------------

POOL_IRREPS = o3.Irreps("2x0e+1x0o+2x1o+1x2e+1x3o")
# (kernel_size, stride): cubic, anisotropic, overlapping windows.
GEOMETRIES = [((2, 2, 2), (2, 2, 2)), ((2, 1, 3), (2, 1, 2)), ((3, 3, 3), (2, 2, 2))]
GEOMETRY_IDS = ["k2s2", "k213s212", "k3s2-overlap"]


def pool_run(backend, x, irreps, kernel_size, stride, grad_y):
    x = x.detach().requires_grad_()
    with e3fast.use_backend(backend):
        y = norm_max_pool3d(x, irreps, kernel_size, stride)
    (grad_x,) = torch.autograd.grad(y, x, grad_y.to(y.dtype))
    return y, grad_x


def pool_inputs(device, dtype, layout, irreps=POOL_IRREPS, shape=(2, 4, 5, 6), kernel_size=(2, 2, 2),
                stride=(2, 2, 2)):
    x = torch.randn(shape[0], irreps.dim, *shape[1:])
    out = [(n - k) // s + 1 for n, k, s in zip(shape[1:], kernel_size, stride)]
    grad_y = torch.randn(shape[0], irreps.dim, *out)
    return to_layout(x.to(device, dtype), layout), to_layout(grad_y.to(device, dtype), layout)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_pool_matches_reference(device, dtype, layout, geometry):
    kernel_size, stride = geometry
    x, grad_y = pool_inputs(device, dtype, layout, kernel_size=kernel_size, stride=stride)
    y, grad_x = pool_run("triton", x, POOL_IRREPS, kernel_size, stride, grad_y)
    y_ref, grad_x_ref = pool_run("reference", x, POOL_IRREPS, kernel_size, stride, grad_y)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt) and grad_x.is_contiguous(memory_format=fmt)
    assert torch.equal(y, y_ref), "pooling copies values"
    assert_relative(grad_x, grad_x_ref, RTOL[dtype], "grad x")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_pool_low_precision(device, dtype, layout):
    kernel_size, stride = GEOMETRIES[2]
    x, grad_y = pool_inputs(device, dtype, layout, kernel_size=kernel_size, stride=stride)
    y, grad_x = pool_run("triton", x, POOL_IRREPS, kernel_size, stride, grad_y)
    same_dtype = pool_run("reference", x, POOL_IRREPS, kernel_size, stride, grad_y)
    exact = pool_run("reference", x.float(), POOL_IRREPS, kernel_size, stride, grad_y.float())
    assert y.dtype == grad_x.dtype == dtype
    check_low_precision(y, same_dtype[0], exact[0], f"y ({dtype})")
    check_low_precision(grad_x, same_dtype[1], exact[1], f"grad x ({dtype})")


def random_irreps(max_entries: int = 3):
    entry = st.tuples(st.integers(0, 4), st.sampled_from(["0e", "0o", "1e", "1o", "2e", "2o", "3o"]))
    return (st.lists(entry, min_size=1, max_size=max_entries)
            .map(lambda entries: o3.Irreps([(mul, ir) for mul, ir in entries]))
            .filter(lambda irreps: irreps.dim >= 1))


@FEW_EXAMPLES
@given(irreps=random_irreps(), size=st.tuples(*[st.integers(3, 5)] * 3),
       kernel_size=st.tuples(*[st.integers(1, 3)] * 3), stride=st.tuples(*[st.integers(1, 3)] * 3),
       layout=st.sampled_from(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_pool_random_irreps(device, irreps, size, kernel_size, stride, layout):
    x, grad_y = pool_inputs(device, torch.float32, layout, irreps, (2, *size), kernel_size, stride)
    y, grad_x = pool_run("triton", x, irreps, kernel_size, stride, grad_y)
    y_ref, grad_x_ref = pool_run("reference", x, irreps, kernel_size, stride, grad_y)
    assert torch.equal(y, y_ref)
    assert_relative(grad_x, grad_x_ref, RTOL[torch.float32], "grad x")


@pytest.mark.parametrize("device", DEVICES)
def test_pool_each_sample_on_its_own(device):
    x, _ = pool_inputs(device, torch.float32, "channels_last", shape=(3, 4, 4, 4))
    with e3fast.use_backend("triton"):
        y = norm_max_pool3d(x, POOL_IRREPS, 2)
    for b in range(3):
        assert torch.equal(y[b:b + 1], norm_max_pool3d_reference(x[b:b + 1], POOL_IRREPS, (2, 2, 2), (2, 2, 2)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_pool_zero_input_ties_go_to_the_first_position(device, layout):
    x = to_layout(torch.zeros(2, POOL_IRREPS.dim, 4, 4, 4, device=device), layout).requires_grad_()
    y, argmax = torch.ops.e3fast.norm_max_pool3d_triton(x, field_table(POOL_IRREPS).to(device), [2, 2, 2], [2, 2, 2])
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert argmax.dtype == torch.uint8 and torch.all(argmax == 0)
    assert torch.all(y == 0)
    expected = torch.zeros_like(grad_x)
    expected[:, :, ::2, ::2, ::2] = grad_y
    assert torch.equal(grad_x, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_nan_wins(device):
    x = torch.randn(1, POOL_IRREPS.dim, 4, 4, 4)
    x[0, 3, 1, 0, 1] = float("nan")  # a component of the first 1o field
    x[0, 0, 2, 3, 3] = float("nan")  # a scalar
    x = x.to(device)
    with e3fast.use_backend("triton"):
        y = norm_max_pool3d(x, POOL_IRREPS, 2)
    torch.testing.assert_close(y, norm_max_pool3d_reference(x, POOL_IRREPS, (2, 2, 2), (2, 2, 2)), equal_nan=True,
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_pool_large_window_int32_argmax(device):
    irreps = o3.Irreps("1x0e+1x1o")
    geometry = (8, 8, 5), (8, 8, 5)  # 320 window positions
    x, grad_y = pool_inputs(device, torch.float32, "channels_last", irreps, (1, 8, 8, 5), *geometry)
    y, argmax = torch.ops.e3fast.norm_max_pool3d_triton(x, field_table(irreps).to(device), *map(list, geometry))
    assert argmax.dtype == torch.int32 and argmax.shape == (1, 2, 1, 1, 1)
    y_ref, grad_x_ref = pool_run("reference", x, irreps, *geometry, grad_y)
    assert torch.equal(y, y_ref)
    assert_relative(pool_run("triton", x, irreps, *geometry, grad_y)[1], grad_x_ref, 0.0, "grad x")


@pytest.mark.parametrize("device", DEVICES)
def test_pool_strided_input_and_uncovered_channels(device):
    x, _ = pool_inputs(device, torch.float32, "channels_first", shape=(1, 4, 4, 8))
    x = x[..., ::2]
    fields = field_table(POOL_IRREPS)[1:].to(device)  # channel 0 belongs to no field
    y, argmax = torch.ops.e3fast.norm_max_pool3d_triton(x, fields, [2, 2, 2], [2, 2, 2])
    expected, _ = torch.ops.e3fast.norm_max_pool3d_triton(x.contiguous(), fields, [2, 2, 2], [2, 2, 2])
    assert torch.equal(y, expected) and torch.all(y[:, 0] == 0)
    grad_x = torch.ops.e3fast.norm_max_pool3d_backward_triton(torch.ones_like(y), argmax, fields, [4, 4, 4],
                                                              [2, 2, 2], [2, 2, 2])
    assert torch.all(grad_x[:, 0] == 0) and grad_x[:, 1:].sum() == y[:, 1:].numel()


@pytest.mark.parametrize("device", DEVICES)
def test_pool_gradcheck_float64(device):
    irreps = "1x0e+1x1o+1x2e"
    x, _ = pool_inputs(device, torch.float64, "channels_last", o3.Irreps(irreps), (2, 5, 4, 5))

    def function(x):
        with e3fast.use_backend("triton"):
            return norm_max_pool3d(x, irreps, (3, 3, 3), (2, 2, 2))

    assert torch.autograd.gradcheck(function, (x.requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_pool_opcheck(device, layout):
    kernel_size, stride = GEOMETRIES[1]
    irreps = o3.Irreps("1x0e+1x1o+1x2e")
    x, _ = pool_inputs(device, torch.float32, layout, irreps, (2, 5, 4, 5))
    args = (x.requires_grad_(), field_table(irreps).to(device), list(kernel_size), list(stride))
    torch.library.opcheck(torch.ops.e3fast.norm_max_pool3d_triton.default, args)
    y, argmax = torch.ops.e3fast.norm_max_pool3d_triton(*args)
    torch.library.opcheck(torch.ops.e3fast.norm_max_pool3d_backward_triton.default,
                          (torch.randn_like(y), argmax, args[1], [5, 4, 5], list(kernel_size), list(stride)))


# ---------------------------------------------------------------------------------------------
# Kernel assembly
# ---------------------------------------------------------------------------------------------

ASSEMBLY_IRREPS = ("3x0e+2x1o+1x2e+1x3o", "2x0e+1x0o+2x1o+1x2e+1x2o")
ANISOTROPIC_STEPS = (1.0, 0.7, 1.3)  # lattice 3 x 5 x 3 for diameter 3


def make_basis(irreps_in=ASSEMBLY_IRREPS[0], irreps_out=ASSEMBLY_IRREPS[1], steps=(1.0, 1.0, 1.0),
               irreps_sh="0e+1o+2e+3o", num_radial=3, device="cpu"):
    basis = voxel_convolution_basis(irreps_in, irreps_out, irreps_sh, 3.0, num_radial, steps, cutoff=True)
    return basis.to(device)


def assembly_run(backend, radial, sc, basis, grad_kernel):
    radial, sc = radial.detach().requires_grad_(), sc.detach().requires_grad_()
    with e3fast.use_backend(backend):
        kernel = assemble_kernel(radial, sc, basis)
    if kernel.requires_grad:
        grads = torch.autograd.grad(kernel, (radial, sc), grad_kernel.to(kernel.dtype), allow_unused=True,
                                    materialize_grads=True)
    else:  # the reference kernel of irreps without any path or self-connection is a constant zero
        grads = torch.zeros_like(radial), torch.zeros_like(sc)
    return {"kernel": kernel, "grad radial_weight": grads[0], "grad sc_weight": grads[1]}


def assembly_inputs(basis, device, dtype):
    generator = torch.Generator().manual_seed(5)
    radial = torch.randn(basis.num_radial, basis.radial_numel, generator=generator)
    sc = torch.randn(basis.sc_numel, generator=generator)
    grad_kernel = torch.randn(basis.out_dim, basis.in_dim, *basis.kernel_size, generator=generator)
    return radial.to(device, dtype), sc.to(device, dtype), grad_kernel.to(device, dtype)


@pytest.mark.parametrize("steps", [(1.0, 1.0, 1.0), ANISOTROPIC_STEPS], ids=["cubic", "anisotropic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_assembly_matches_reference(device, dtype, steps):
    basis = make_basis(steps=steps, device=device)
    radial, sc, grad_kernel = assembly_inputs(basis, device, dtype)
    triton = assembly_run("triton", radial, sc, basis, grad_kernel)
    reference = assembly_run("reference", radial, sc, basis, grad_kernel)
    assert triton["kernel"].is_contiguous()
    compare_results(triton, reference, RTOL[dtype])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_assembly_low_precision(device, dtype):
    basis = make_basis(steps=ANISOTROPIC_STEPS, device=device)
    radial, sc, grad_kernel = assembly_inputs(basis, device, dtype)
    triton = assembly_run("triton", radial, sc, basis, grad_kernel)
    same_dtype = assembly_run("reference", radial, sc, basis, grad_kernel)
    exact = assembly_run("reference", radial.float(), sc.float(), basis, grad_kernel.float())
    for name, wanted in exact.items():
        assert triton[name].dtype == dtype
        check_low_precision(triton[name], same_dtype[name], wanted, f"{name} ({dtype})")


@FEW_EXAMPLES
@given(irreps_in=random_irreps(), irreps_out=random_irreps(), steps=st.sampled_from([(1.0, 1.0, 1.0),
                                                                                    ANISOTROPIC_STEPS]),
       num_radial=st.integers(1, 4))
@pytest.mark.parametrize("device", DEVICES)
def test_assembly_random_irreps(device, irreps_in, irreps_out, steps, num_radial):
    basis = make_basis(irreps_in, irreps_out, steps, irreps_sh="0e+1o+2e", num_radial=num_radial, device=device)
    radial, sc, grad_kernel = assembly_inputs(basis, device, torch.float32)
    compare_results(assembly_run("triton", radial, sc, basis, grad_kernel),
                    assembly_run("reference", radial, sc, basis, grad_kernel), RTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_assembly_without_lattice(device):
    basis = SteerableKernelBasis("4x0e+2x1o+1x2e", "3x0e+3x1o+2x2e").to(device)
    radial = torch.zeros(0, 0, device=device)
    sc = torch.randn(basis.sc_numel, device=device)
    grad_kernel = torch.randn(basis.out_dim, basis.in_dim, 1, 1, 1, device=device)
    triton = assembly_run("triton", radial, sc, basis, grad_kernel)
    reference = assembly_run("reference", radial, sc, basis, grad_kernel)
    compare_results(triton, reference, RTOL[torch.float32])


def assembly_op_arguments(basis, radial, sc):
    return (radial, sc, basis.basis.to(radial.dtype), basis.paths, basis.self_connections, basis.sc_scales,
            basis.out_dim, basis.in_dim, list(basis.kernel_size))


@pytest.mark.parametrize("device", DEVICES)
def test_assembly_gradcheck_float64(device):
    basis = make_basis("2x0e+1x1o", "1x0e+1x1o+1x2e", ANISOTROPIC_STEPS, "0e+1o+2e", num_radial=2, device=device)
    radial, sc, _ = assembly_inputs(basis, device, torch.float64)

    def function(radial, sc):
        return torch.ops.e3fast.assemble_kernel_triton(*assembly_op_arguments(basis, radial, sc))

    assert torch.autograd.gradcheck(function, (radial.requires_grad_(), sc.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_assembly_opcheck(device):
    basis = make_basis("2x0e+1x1o", "1x0e+1x1o+1x2e", ANISOTROPIC_STEPS, "0e+1o+2e", num_radial=2, device=device)
    radial, sc, grad_kernel = assembly_inputs(basis, device, torch.float32)
    args = assembly_op_arguments(basis, radial.requires_grad_(), sc.requires_grad_())
    torch.library.opcheck(torch.ops.e3fast.assemble_kernel_triton.default, args)
    torch.library.opcheck(torch.ops.e3fast.assemble_kernel_backward_triton.default,
                          (grad_kernel, basis.basis, basis.paths, basis.self_connections, basis.sc_scales,
                           basis.num_radial, basis.radial_numel, basis.sc_numel))


@pytest.mark.parametrize("device", DEVICES)
def test_assembly_rejects_bad_tables(device):
    basis = make_basis("1x0e+1x1o", "1x0e+1x1o", irreps_sh="0e+1o", device=device)
    radial, sc, _ = assembly_inputs(basis, device, torch.float32)
    good = list(assembly_op_arguments(basis, radial, sc))
    cases = {"int64": (3, basis.paths.int()), "basis has": (2, basis.basis[:-1]),
             "sc_scales has": (5, basis.sc_scales[:-1]), "used by two": (3, torch.cat([basis.paths, basis.paths[:1]])),
             "kernel_size": (8, [3, 3])}
    for message, (position, value) in cases.items():
        args = list(good)
        args[position] = value
        with pytest.raises(RuntimeError, match=message):
            torch.ops.e3fast.assemble_kernel_triton(*args)


# ---------------------------------------------------------------------------------------------
# Through modules and torch.compile
# ---------------------------------------------------------------------------------------------


def _conv_gate_pool():
    gate = e3fast.nn.NormGate("4x0e", [torch.relu], "3x0e", [torch.sigmoid], "2x1e+1x2e", normalization="batch")
    conv = e3fast.nn.VoxelConvolution("2x0e+1x1e", gate.irreps_in, "0e+1e+2e", 3.0, 3)
    pool = e3fast.nn.NormMaxPool3d(gate.irreps_out, 2)
    return torch.nn.Sequential(conv, gate, pool)


def _output_and_grads(model, x):
    out = model(x)
    grads = torch.autograd.grad(out, [x] + list(model.parameters()), torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
def test_modules_compile_with_full_graph(device):
    model = _conv_gate_pool().to(device)
    x = torch.randn(2, 5, 4, 4, 4, device=device, requires_grad=True)
    with e3fast.use_backend("reference"):
        expected, expected_grads = _output_and_grads(model, x)
    with e3fast.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out, grads = _output_and_grads(compiled, x)
    assert_relative(out, expected, 1e-5, "compiled output")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_relative(grad, expected_grad, 1e-5, "compiled gradient")
