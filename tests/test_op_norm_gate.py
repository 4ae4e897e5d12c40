"""The native CPU kernels of ``e3fast::norm_gate`` against the pure-PyTorch reference.

Forward, gradients (input, weight, bias) and running statistics of the public
``e3fast.ops.norm_gate`` under ``use_backend("cpu")`` and ``use_backend("reference")``, for every
normalization mode, both memory formats, float64/float32/bfloat16/float16, random irreps;
plus gradcheck and opcheck of the native op and its numerical corner cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import e3fast
from conftest import LAYOUTS, RTOL, assert_relative, relative_error, to_layout
from e3fast.backends import backend_usable
from e3fast.ops import NormGateSpec, norm_gate, norm_gate_reference

pytestmark = pytest.mark.skipif(not backend_usable("cpu", "cpu"),
                                reason="the compiled extension e3fast._C (C++ CPU kernels) is not available")

# Every activation id: identity (None), relu, tanh, silu on scalars; sigmoid and abs as gates.
# O3-valid: relu/silu on even scalars, tanh/identity on odd ones, abs of an odd gate is even.
ALL_ACTIVATIONS = NormGateSpec.for_gate("2x0e+2x0o+1x0e+1x0o", [torch.relu, torch.tanh, "silu", None],
                                        "1x0e+1x0o", [torch.sigmoid, torch.abs], "1x1o+1x2e")
# The typical layer of the U-Net: 8 relu scalars, 6 sigmoid gates, 4x1e + 2x2e gated.
TYPICAL = NormGateSpec.for_gate("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")

# (normalization, training) of the four modes of the op: instance, batch, running statistics, none.
MODES = [("instance", True), ("batch", True), ("batch", False), ("none", True)]
MODE_IDS = ["instance", "batch-train", "batch-eval", "none"]


@dataclass
class Result:
    y: torch.Tensor
    grads: dict[str, torch.Tensor]
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


def make_parameters(spec: NormGateSpec, normalization: str, seed: int = 1) -> dict:
    """Random weight, bias and running statistics (float32) for a normalization mode."""
    if normalization == "none":
        return {}
    generator = torch.Generator().manual_seed(seed)
    params = {"weight": torch.rand(spec.num_fields, generator=generator) + 0.5,
              "bias": torch.randn(spec.num_scalars, generator=generator)}
    if normalization == "batch":
        params["running_mean"] = torch.randn(spec.num_scalars, generator=generator)
        params["running_var"] = torch.rand(spec.num_fields, generator=generator) + 0.5
    return params


def run(backend: str, x: torch.Tensor, spec: NormGateSpec, params: dict, normalization: str, training: bool,
        grad_y: torch.Tensor | None = None, momentum: float = 0.1) -> Result:
    """Output, gradients and updated running statistics of one backend (inputs are copied)."""
    x = x.detach().clone().requires_grad_()  # clone keeps the memory format
    trainable = {"x": x}
    for name in ("weight", "bias"):
        if name in params:
            trainable[name] = params[name].detach().clone().requires_grad_()
    running = {name: params[name].clone() if name in params else None for name in ("running_mean", "running_var")}
    with e3fast.use_backend(backend):
        y = norm_gate(x, spec, trainable.get("weight"), trainable.get("bias"), running["running_mean"],
                      running["running_var"], normalization=normalization, training=training, momentum=momentum)
        if grad_y is None:
            grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
        grads = torch.autograd.grad(y, list(trainable.values()), grad_y, allow_unused=True)
    grads = {name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(trainable.items(), grads)}
    return Result(y, grads, running["running_mean"], running["running_var"])


def compare(native: Result, reference: Result, rtol: float) -> None:
    assert native.y.dtype == reference.y.dtype
    assert native.y.stride() == reference.y.stride(), "output memory format"
    assert_relative(native.y, reference.y, rtol, "output")
    assert native.grads.keys() == reference.grads.keys()
    for name, expected in reference.grads.items():
        assert native.grads[name].dtype == expected.dtype, name
        assert_relative(native.grads[name], expected, rtol, f"gradient of {name}")
    for name in ("running_mean", "running_var"):
        expected = getattr(reference, name)
        if expected is not None:
            assert_relative(getattr(native, name), expected, rtol, name)


def voxel_input(spec: NormGateSpec, shape=(2, 3, 5, 7), dtype=torch.float32, layout="channels_first",
                offset: float = 0.0) -> torch.Tensor:
    batch, *spatial = shape
    x = torch.randn(batch, spec.irreps_in.dim, *spatial, dtype=torch.float64) * 1.5 + offset
    return to_layout(x.to(dtype), layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_matches_reference(normalization, training, layout, dtype):
    spec = ALL_ACTIVATIONS
    x = voxel_input(spec, (2, 3, 5, 7), dtype, layout, offset=0.3)
    params = make_parameters(spec, normalization)
    native = run("cpu", x, spec, params, normalization, training)
    reference = run("reference", x, spec, params, normalization, training)
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    assert native.y.is_contiguous(memory_format=fmt)
    assert native.grads["x"].is_contiguous(memory_format=fmt)
    compare(native, reference, RTOL[dtype])


@pytest.fixture
def threads(request):
    """Run the test with ``request.param`` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_parallel_chunks(normalization, training, layout, threads):
    """An input large enough for one task per thread; chunks of tiles cross sample boundaries."""
    spec = TYPICAL
    x = voxel_input(spec, (3, 12, 10, 9), layout=layout, offset=0.5)
    params = make_parameters(spec, normalization)
    compare(run("cpu", x, spec, params, normalization, training),
            run("reference", x, spec, params, normalization, training), RTOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_grad_output_in_other_memory_format(normalization, training, layout):
    spec = TYPICAL
    x = voxel_input(spec, (2, 4, 3, 5), layout=layout)
    params = make_parameters(spec, normalization)
    other = "channels_first" if layout == "channels_last" else "channels_last"
    grad_y = to_layout(torch.randn(2, spec.irreps_out.dim, 4, 3, 5), other)
    native = run("cpu", x, spec, params, normalization, training, grad_y)
    reference = run("reference", x, spec, params, normalization, training, grad_y.contiguous())
    assert native.grads["x"].stride() == x.stride()
    compare(native, reference, RTOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_low_precision_against_float32_reference(normalization, training, layout, dtype):
    spec = ALL_ACTIVATIONS
    x = voxel_input(spec, (2, 4, 3, 5), dtype, layout)
    params = make_parameters(spec, normalization)
    grad_y = torch.randn(2, spec.irreps_out.dim, 4, 3, 5).to(dtype)
    native = run("cpu", x, spec, params, normalization, training, grad_y)
    reference = run("reference", x.float(), spec, params, normalization, training, grad_y.float())
    assert native.y.dtype == dtype and native.grads["x"].dtype == dtype
    assert native.y.stride() == reference.y.stride()
    assert_relative(native.y, reference.y, RTOL[torch.bfloat16], "output")
    for name, expected in reference.grads.items():
        assert_relative(native.grads[name], expected, RTOL[torch.bfloat16], f"gradient of {name}")
    if normalization == "batch" and training:
        assert_relative(native.running_mean, reference.running_mean, 1e-5, "running_mean")
        assert_relative(native.running_var, reference.running_var, 1e-5, "running_var")


def test_running_statistics_updated_like_reference():
    spec = TYPICAL
    params = make_parameters(spec, "batch")
    native_stats = {name: params[name].clone() for name in ("running_mean", "running_var")}
    reference_stats = {name: params[name].clone() for name in ("running_mean", "running_var")}
    for step in range(3):
        x = voxel_input(spec, (3, 2, 3, 4), offset=step - 1.0)
        for backend, stats in (("cpu", native_stats), ("reference", reference_stats)):
            with e3fast.use_backend(backend):
                norm_gate(x, spec, params["weight"], params["bias"], stats["running_mean"], stats["running_var"],
                          normalization="batch", training=True, momentum=0.3)
    for name in native_stats:
        assert not torch.equal(native_stats[name], params[name]), f"{name} was not updated"
        assert_relative(native_stats[name], reference_stats[name], 1e-6, name)


SCALAR_ACTIVATIONS = {"0e": ("relu", "silu"), "0o": ("tanh", "abs")}


@st.composite
def random_specs(draw) -> NormGateSpec:
    """A norm-only spec of any irreps, or an O3-valid gate with sigmoid gates on 0e scalars."""
    entry = st.tuples(st.integers(0, 5), st.sampled_from(["0e", "0o", "1e", "1o", "2e", "2o", "3o"]))
    if draw(st.booleans()):
        entries = draw(st.lists(entry, min_size=1, max_size=4).filter(lambda e: sum(m for m, _ in e) > 0))
        return NormGateSpec.norm_only("+".join(f"{mul}x{ir}" for mul, ir in entries),
                                      draw(st.sampled_from(["component", "norm"])))
    scalar_entry = st.tuples(st.integers(1, 5), st.sampled_from(["0e", "0o"]))
    scalars = draw(st.lists(scalar_entry, min_size=0, max_size=3))
    acts = [draw(st.sampled_from(SCALAR_ACTIVATIONS[ir])) for _, ir in scalars]
    gated = draw(st.lists(st.tuples(st.integers(1, 5), st.sampled_from(["0o", "1e", "1o", "2e", "2o", "3o"])),
                          min_size=0 if scalars else 1, max_size=3))
    num_gates = sum(mul for mul, _ in gated)
    return NormGateSpec.for_gate("+".join(f"{mul}x{ir}" for mul, ir in scalars), acts,
                                 f"{num_gates}x0e" if gated else "", ["sigmoid"] if gated else [],
                                 "+".join(f"{mul}x{ir}" for mul, ir in gated))


@settings(max_examples=15, deadline=None)
@given(spec=random_specs(), mode=st.sampled_from(MODES), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64]), batch=st.integers(1, 2),
       spatial=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))
def test_random_irreps_match_reference(spec, mode, layout, dtype, batch, spatial):
    normalization, training = mode
    group_size = (1 if normalization == "instance" else batch) * spatial[0] * spatial[1] * spatial[2]
    # Groups of two even scalars (or one odd scalar) normalize to +-1 whatever the input: their
    # input gradient is ~eps/var times the output gradient, float32 rounding noise in both backends.
    assume(dtype == torch.float64 or group_size >= 3)
    torch.manual_seed(0)
    x = voxel_input(spec, (batch, *spatial), dtype, layout)
    params = make_parameters(spec, normalization)
    compare(run("cpu", x, spec, params, normalization, training),
            run("reference", x, spec, params, normalization, training), RTOL[dtype])


@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_gradcheck(normalization, training):
    spec = ALL_ACTIVATIONS
    x = voxel_input(spec, (2, 1, 2, 2), torch.float64, "channels_last").requires_grad_()
    params = {name: t.double() for name, t in make_parameters(spec, normalization).items()}
    weight = params["weight"].requires_grad_() if "weight" in params else None
    bias = params["bias"].requires_grad_() if "bias" in params else None
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def function(x, weight=None, bias=None):
        return norm_gate(x, spec, weight, bias, params.get("running_mean"), params.get("running_var"),
                         normalization=normalization, training=training)

    with e3fast.use_backend("cpu"):
        assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def op_arguments(spec: NormGateSpec, x: torch.Tensor, params: dict, mode: int, eps: float = 1e-5) -> tuple:
    fields, gates = spec.tables(x.device)
    return (x, params.get("weight"), params.get("bias"), params.get("running_mean"), params.get("running_var"),
            fields, gates, spec.act_scales, spec.num_scalars, mode, eps)


OP_SAMPLES = [("instance", 1, "channels_first"), ("batch", 2, "channels_last"), ("batch", 3, "channels_first"),
              ("none", 0, "channels_last"), ("instance", 1, "strided")]


@pytest.mark.parametrize("normalization,mode,layout", OP_SAMPLES)
def test_opcheck(normalization, mode, layout):
    spec = ALL_ACTIVATIONS
    if layout == "strided":  # neither layout: the kernel copies it first
        x = voxel_input(spec, (2, 3, 2, 6))[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        x = voxel_input(spec, (2, 3, 2, 3), layout=layout)
    params = {name: t.requires_grad_() if name in ("weight", "bias") else t
              for name, t in make_parameters(spec, normalization).items()}
    torch.library.opcheck(torch.ops.e3fast.norm_gate.default, op_arguments(spec, x.requires_grad_(), params, mode))


@pytest.mark.parametrize("sliced", [False, True], ids=["dense", "sliced"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_backward(layout, sliced):
    spec = TYPICAL
    x = voxel_input(spec, (2, 3, 2, 6), layout=layout)
    x = x[..., ::2] if sliced else x
    params = make_parameters(spec, "instance")
    _, mean, var = torch.ops.e3fast.norm_gate(*op_arguments(spec, x, params, 1))
    fields, gates = spec.tables(x.device)
    grad_y = to_layout(torch.randn(x.shape[0], spec.irreps_out.dim, *x.shape[2:]), "channels_last")
    torch.library.opcheck(torch.ops.e3fast.norm_gate_backward.default,
                          (grad_y, x, params["weight"], params["bias"], mean, var, fields, gates, spec.act_scales,
                           1, 1e-5))


@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_statistics_outputs(normalization, training):
    spec = ALL_ACTIVATIONS
    x = voxel_input(spec, (3, 2, 2, 3), torch.float64)
    params = {name: t.double() for name, t in make_parameters(spec, normalization).items()}
    mode = {"instance": 1, "batch": 2 if training else 3, "none": 0}[normalization]
    args = op_arguments(spec, x, params, mode)
    _, mean, var = torch.ops.e3fast.norm_gate(*args)
    _, expected_mean, expected_var = norm_gate_reference(x, spec, *args[1:5], mode, 1e-5)
    assert mean.dtype == var.dtype == torch.float64
    assert_relative(mean, expected_mean, 1e-12, "mean")
    assert_relative(var, expected_var, 1e-12, "var")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_zero_input_and_zero_vectors_are_finite(normalization, training, layout):
    spec = ALL_ACTIVATIONS
    params = make_parameters(spec, normalization)
    zero = voxel_input(spec, (2, 2, 3, 2), layout=layout) * 0
    zero_vectors = voxel_input(spec, (2, 2, 3, 2), layout=layout)
    scalar_channels = sum(mul for mul, ir in spec.irreps_in if ir.l == 0)
    zero_vectors[:, scalar_channels:] = 0
    for x in (zero, zero_vectors):
        native = run("cpu", x, spec, params, normalization, training)
        reference = run("reference", x, spec, params, normalization, training)
        assert torch.isfinite(native.y).all()
        for name, grad in native.grads.items():
            assert torch.isfinite(grad).all(), name
        compare(native, reference, RTOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization", ["instance", "batch"])
def test_large_common_offset(normalization, layout):
    spec = ALL_ACTIVATIONS
    x = voxel_input(spec, (2, 3, 5, 7), layout=layout, offset=1000.0)
    params = make_parameters(spec, normalization)
    native = run("cpu", x, spec, params, normalization, True)
    reference = run("reference", x, spec, params, normalization, True)
    exact = run("reference", x.double(), spec, params, normalization, True)
    assert_relative(native.y, reference.y, 1e-4, "output")
    assert relative_error(native.y, exact.y) <= 1e-5, "output against float64"
    for name in native.grads:
        assert_relative(native.grads[name], reference.grads[name], 1e-4, f"gradient of {name}")


BAD_TABLES = {
    "fields cover": lambda fields, gates: (fields[:-1], gates),
    "continue the channel tiling": lambda fields, gates: (fields.flip(0), gates),
    "out of range": lambda fields, gates: (fields, gates + 100),
    "int64 tensor": lambda fields, gates: (fields.int(), gates),
}


@pytest.mark.parametrize("message", BAD_TABLES)
def test_bad_tables_raise(message):
    spec = TYPICAL
    x = voxel_input(spec, (1, 2, 2, 2))
    args = list(op_arguments(spec, x, {}, 0))
    args[5], args[6] = BAD_TABLES[message](*spec.tables(x.device))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.e3fast.norm_gate(*args)


def test_bad_arguments_raise():
    spec = TYPICAL
    x = voxel_input(spec, (1, 2, 2, 2))
    args = op_arguments(spec, x, {}, 1)
    with pytest.raises(RuntimeError, match="num_scalars"):
        torch.ops.e3fast.norm_gate(*args[:8], spec.num_scalars + 1, *args[9:])
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.e3fast.norm_gate(*args[:9], 7, args[10])
    with pytest.raises(RuntimeError, match="running_mean and running_var"):
        torch.ops.e3fast.norm_gate(*args[:9], 3, args[10])
    with pytest.raises(RuntimeError, match="must be float64, float32"):
        torch.ops.e3fast.norm_gate(x.int(), *args[1:])


@pytest.mark.parametrize("shape", [(0, 2, 2, 2), (2, 0, 3, 2)], ids=["no-samples", "no-voxels"])
@pytest.mark.parametrize("normalization,training", MODES, ids=MODE_IDS)
def test_empty_input(normalization, training, shape):
    spec = TYPICAL
    x = voxel_input(spec, shape, layout="channels_last")
    params = make_parameters(spec, normalization)
    native = run("cpu", x, spec, params, normalization, training)
    reference = run("reference", x, spec, params, normalization, training)
    assert native.y.shape == reference.y.shape == (shape[0], spec.irreps_out.dim, *shape[1:])
    for name, grad in reference.grads.items():
        assert native.grads[name].shape == grad.shape, name
