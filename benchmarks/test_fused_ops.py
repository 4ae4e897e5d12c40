"""Per-op benchmarks: e3fast's fused ops on every CPU backend, the e3nn composition they replace,
and torch's nearest plain-CNN counterpart, forward and forward+backward, on S^3 volumes.

* ``assemble_kernel``: the paper U-Net's deepest convolution (bottom block, second conv), versus
  e3nn's ``tp.right`` kernel plus the ``o3.Linear`` self-connection folded into the centre tap.
* ``norm_gate``: ``[1, 36, S^3]`` (the top level's ``8x0e`` scalars, ``6x0e`` gates, ``4x1e+2x2e``),
  versus e3nn ``BatchNorm(instance=True)`` + ``Gate`` on channels-last views, and torch's
  ``InstanceNorm3d`` + ``LeakyReLU``.
* ``norm_max_pool3d``: ``[1, 30, S^3]`` of ``8x0e+4x1e+2x2e``, window 2, versus the reference's
  norm pooling (per sample) and torch's ``max_pool3d``.

Forward runs without autograd; forward+backward asks ``torch.autograd.grad`` for the gradients of
every input given a fixed random output gradient.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import BatchNorm, Gate

import e3fast
from bench_settings import bench_size
from e3fast.nn import VoxelConvolution
from e3fast.ops import NormGateSpec, assemble_kernel, norm_gate, norm_max_pool3d
from e3fast.testing import e3nn_reference

SIZE = bench_size()
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PASSES = ("fwd", "fwd+bwd")


def _implemented(op_module: str) -> tuple[str, ...]:
    return importlib.import_module(f"e3fast.ops.{op_module}").IMPLEMENTED


def _backends(op_module: str) -> list[str]:
    """CPU backends available here that implement the op."""
    return [name for name in e3fast.available_backends("cpu") if name in _implemented(op_module)]


def _timed_pass(fn, inputs, grad_output):
    """``fn(*inputs)`` without autograd, or with ``torch.autograd.grad`` of every input."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        torch.autograd.grad(fn(*inputs), inputs, grad_output)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def _on_backend(fn, backend: str):
    def run(*args):
        with e3fast.use_backend(backend):
            return fn(*args)

    return run


def _random_like_output(fn, inputs):
    with torch.no_grad():
        return torch.randn_like(fn(*inputs))


# ---------------------------------------------------------------- steerable kernel assembly

def deepest_paper_convolution_args(n: int = 2, n_downsample: int = 3, diameter: float = 5.0) -> dict:
    """Arguments of the paper U-Net's largest convolution: the bottom block's second conv.

    At level ``n_downsample`` the block's hidden irreps are ``4m x0e + 2m x1e + m x2e`` with
    ``m = n * 2**n_downsample``; its convs output those plus one gate scalar per gated irrep.
    Kernel diameter and voxel size double per level (5^3 taps at every level).
    """
    m = n * 2 ** n_downsample
    scale = 2 ** n_downsample
    return dict(irreps_in=f"{4 * m}x0e+{2 * m}x1e+{m}x2e", irreps_out=f"{4 * m + 3 * m}x0e+{2 * m}x1e+{m}x2e",
                irreps_sh=o3.Irreps.spherical_harmonics(2), diameter=diameter * scale, num_radial_basis=5,
                steps=(scale,) * 3, cutoff=False)


@pytest.fixture(scope="module")
def deepest_convolutions():
    """The e3fast layer and the e3nn reference layer with the same weights."""
    args = deepest_paper_convolution_args()
    ours = VoxelConvolution(**args)
    reference = e3nn_reference.Convolution(**args)
    with torch.no_grad():
        reference.weight.copy_(ours.weight)
        reference.sc.weight.copy_(ours.sc.weight)
    return ours, reference


def e3nn_kernel(reference: e3nn_reference.Convolution, radial_weight, sc_weight):
    """The reference layer's ``tp.right`` kernel with its ``o3.Linear`` added at the centre tap."""
    weight = reference.emb @ radial_weight / reference.emb.shape[:3].numel()
    kernel = torch.einsum("xyzio->oixyz", reference.tp.right(reference.sh, weight))
    eye = torch.eye(reference.irreps_in.dim, dtype=sc_weight.dtype)
    sc_matrix = reference.sc(eye, weight=sc_weight).T  # [out, in]
    centre = torch.zeros(kernel.shape[2:], dtype=kernel.dtype)
    centre[tuple(k // 2 for k in kernel.shape[2:])] = 1.0
    return kernel + sc_matrix[:, :, None, None, None] * centre


def _kernel_inputs(convolution):
    return (convolution.weight.detach().clone().requires_grad_(),
            convolution.sc.weight.detach().clone().requires_grad_())


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("backend", _backends("kernel_assembly"))
def test_assemble_kernel(measure, deepest_convolutions, backend, which):
    ours, _ = deepest_convolutions
    inputs = _kernel_inputs(ours)
    fn = _on_backend(lambda radial, sc: assemble_kernel(radial, sc, ours.basis), backend)
    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=f"assemble_kernel {which} (deepest conv)", impl="e3fast", label="e3fast assemble_kernel",
            backend=backend, resident=lambda: inputs)


@pytest.mark.parametrize("which", PASSES)
def test_assemble_kernel_e3nn(measure, deepest_convolutions, which):
    _, reference = deepest_convolutions
    inputs = _kernel_inputs(reference)
    fn = lambda radial, sc: e3nn_kernel(reference, radial, sc)  # noqa: E731
    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=f"assemble_kernel {which} (deepest conv)", impl="e3nn", label="e3nn tp.right + o3.Linear",
            baseline="e3nn", resident=lambda: inputs)


# ---------------------------------------------------------------- normalization + gate

GATE_ARGS = ("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")
NORM_GATE_SPEC = NormGateSpec.for_gate(*GATE_ARGS)


def _norm_gate_input(memory_format: str, channels: int):
    x = torch.randn(1, channels, SIZE, SIZE, SIZE).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    return x.requires_grad_()


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("backend", _backends("norm_gate"))
def test_norm_gate(measure, backend, memory_format, which):
    spec = NORM_GATE_SPEC
    inputs = (_norm_gate_input(memory_format, spec.irreps_in.dim),
              torch.ones(spec.num_fields, requires_grad=True), torch.zeros(spec.num_scalars, requires_grad=True))
    fn = _on_backend(lambda x, weight, bias: norm_gate(x, spec, weight, bias), backend)
    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=f"norm_gate {which} [1,{spec.irreps_in.dim},{SIZE}^3]", impl="e3fast",
            label="e3fast norm_gate", backend=backend, memory_format=memory_format, resident=lambda: inputs)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_norm_gate_e3nn(measure, memory_format, which):
    gate = Gate(*GATE_ARGS)
    norm = BatchNorm(gate.irreps_in, instance=True)
    inputs = (_norm_gate_input(memory_format, gate.irreps_in.dim), norm.weight, norm.bias)

    def fn(x, weight, bias):  # weight and bias are norm's own parameters, listed for their gradients
        return e3nn_reference.channels_last_apply(lambda h: gate(norm(h)), x)

    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=f"norm_gate {which} [1,{gate.irreps_in.dim},{SIZE}^3]", impl="e3nn",
            label="e3nn BatchNorm(instance) + Gate", memory_format=memory_format, baseline="e3nn",
            resident=lambda: inputs)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_norm_gate_torch(measure, memory_format, which):
    channels = NORM_GATE_SPEC.irreps_in.dim
    norm = torch.nn.InstanceNorm3d(channels, affine=True)
    inputs = (_norm_gate_input(memory_format, channels), norm.weight, norm.bias)

    def fn(x, weight, bias):
        return F.leaky_relu(norm(x), 0.01)

    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=f"norm_gate {which} [1,{channels},{SIZE}^3]", impl="plain",
            label="torch InstanceNorm3d + LeakyReLU", memory_format=memory_format, baseline="plain",
            resident=lambda: inputs)


# ---------------------------------------------------------------- norm max pooling

POOL_IRREPS = o3.Irreps("8x0e+4x1e+2x2e")
POOL_KERNEL = (2, 2, 2)


def _pool_inputs(memory_format: str):
    return (_norm_gate_input(memory_format, POOL_IRREPS.dim),)


def _pool_group(which: str) -> str:
    return f"norm_max_pool3d {which} [1,{POOL_IRREPS.dim},{SIZE}^3] k2"


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("backend", _backends("norm_max_pool"))
def test_norm_max_pool3d(measure, backend, memory_format, which):
    inputs = _pool_inputs(memory_format)
    fn = _on_backend(lambda x: norm_max_pool3d(x, POOL_IRREPS, POOL_KERNEL), backend)
    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=_pool_group(which), impl="e3fast", label="e3fast norm_max_pool3d", backend=backend,
            memory_format=memory_format, resident=lambda: inputs)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_norm_max_pool3d_e3nn(measure, memory_format, which):
    inputs = _pool_inputs(memory_format)
    fn = lambda x: e3nn_reference.norm_max_pool3d(x, POOL_IRREPS, POOL_KERNEL)  # noqa: E731
    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=_pool_group(which), impl="e3nn", label="e3nn-style norm pooling (reference)",
            memory_format=memory_format, baseline="e3nn", resident=lambda: inputs)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_max_pool3d_torch(measure, memory_format, which):
    inputs = _pool_inputs(memory_format)
    fn = lambda x: F.max_pool3d(x, POOL_KERNEL)  # noqa: E731
    run = _timed_pass(fn, inputs, _random_like_output(fn, inputs))[which]
    measure(run, group=_pool_group(which), impl="plain", label="torch max_pool3d", memory_format=memory_format,
            baseline="plain", resident=lambda: inputs)
