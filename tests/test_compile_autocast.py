"""torch.compile (full graph) and autocast through the fused ops and the U-Net."""
from __future__ import annotations

import pytest
import torch

import e3fast
from conftest import FAST_BACKENDS, assert_relative
from e3fast.models import EquivariantUNet
from e3fast.testing.e3nn_reference import UNet as E3nnUNet

BACKENDS = ["reference"] + FAST_BACKENDS


def _modules():
    gate = e3fast.nn.NormGate("4x0e", [torch.relu], "3x0e", [torch.sigmoid], "2x1e+1x2e", normalization="batch")
    conv = e3fast.nn.VoxelConvolution("2x0e+1x1e", gate.irreps_in, "0e+1e+2e", 3.0, 3)
    pool = e3fast.nn.NormMaxPool3d(gate.irreps_out, 2)
    return torch.nn.Sequential(conv, gate, pool), 5


def _run(model, x):
    out = model(x)
    grads = torch.autograd.grad(out, [x] + list(model.parameters()), torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_modules_compile_with_full_graph(backend):
    model, channels = _modules()
    x = torch.randn(2, channels, 6, 4, 6, requires_grad=True)
    with e3fast.use_backend(backend):
        expected, expected_grads = _run(model, x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out, grads = _run(compiled, x)
    assert_relative(out, expected, 1e-6, "compiled output")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_relative(grad, expected_grad, 1e-6, "compiled gradient")


@pytest.mark.parametrize("backend", FAST_BACKENDS[:1] or ["reference"])
def test_unet_compiles_with_full_graph(backend):
    model = EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2)
    x = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    with e3fast.use_backend(backend):
        expected, expected_grads = _run(model, x)
        out, grads = _run(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    assert_relative(out, expected, 1e-4, "compiled U-Net output")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_relative(grad, expected_grad, 1e-4, "compiled U-Net gradient")


def _frobenius_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_under_bf16_autocast(backend):
    """bf16 error at most twice that of the e3nn composition under the same autocast (flash-attention's
    rule). Average pooling: with max pooling, bf16 noise flips window choices and the error of both
    networks is dominated by which voxels flip, not by the arithmetic."""
    options = dict(n=1, n_downsample=1, down_op="average")
    reference = E3nnUNet("1x0e", "3x0e", 5.0, 3, (1.0, 1.0, 1.0), **options)
    model = EquivariantUNet("1x0e", "3x0e", 5.0, 3, (1.0, 1.0, 1.0), **options)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, 12, 12, 12)
    expected = reference(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_bf16 = reference(x)
    with e3fast.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    error, reference_error = _frobenius_error(out, expected), _frobenius_error(reference_bf16, expected)
    assert 0 < error <= 2 * reference_error, f"bf16 error {error:.3g} vs e3nn's {reference_error:.3g}"
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in model.parameters())


def test_norm_gate_compiles_with_inductor():
    """Inductor lowers the graph around the opaque custom op (compiling C++ takes a while on CPU)."""
    layer = e3fast.nn.NormGate("4x0e", [torch.relu], "3x0e", [torch.sigmoid], "2x1e+1x2e")
    x = torch.randn(2, 18, 4, 4, 4, requires_grad=True)
    expected, expected_grads = _run(layer, x)
    out, grads = _run(torch.compile(layer, fullgraph=True), x)
    assert_relative(out, expected, 1e-5, "inductor output")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_relative(grad, expected_grad, 1e-5, "inductor gradient")


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_convolution_of_volumes_smaller_than_the_kernel_has_finite_gradients(autocast):
    """oneDNN's bf16 conv3d backward gives non-finite weight gradients, at random, for volumes
    smaller than the kernel (about 1 call in 10 at this shape); e3fast computes those in float32."""
    conv = e3fast.nn.VoxelConvolution("8x0e+4x1e+2x2e", "14x0e+4x1e+2x2e", "0e+1e+2e", 5.0, 3)
    for seed in range(60):
        torch.manual_seed(seed)
        x = torch.randn(2, 30, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
        x = (x if autocast else x.bfloat16()).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out, [x, conv.weight, conv.sc.weight], torch.randn_like(out))
        assert all(torch.isfinite(g).all() for g in grads), f"non-finite gradient at seed {seed}"
