"""Bad input gets a clear error naming what is wrong; zero vectors never give NaN."""
from __future__ import annotations

import pytest
import torch

import e3fast
from conftest import FAST_BACKENDS
from e3fast.models import EquivariantUNet

BACKENDS = ["reference"] + FAST_BACKENDS
PAPER_GATE = ("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")


@pytest.fixture(scope="module")
def conv():
    return e3fast.nn.VoxelConvolution("2x0e+1x1e", "3x0e+1x1e", "0e+1e+2e", 3.0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_count_must_match_irreps(conv, backend):
    with e3fast.use_backend(backend):
        with pytest.raises(ValueError, match=r"4 channels but irreps 2x0e\+1x1e need 5"):
            conv(torch.randn(1, 4, 5, 5, 5))
        with pytest.raises(ValueError, match="irreps"):
            e3fast.nn.NormGate(*PAPER_GATE)(torch.randn(1, 30, 3, 3, 3))  # 30 is the output width, 36 the input
        with pytest.raises(ValueError, match="channels"):
            e3fast.nn.NormMaxPool3d("2x1o", 2)(torch.randn(1, 5, 4, 4, 4))


@pytest.mark.parametrize("shape", [(5, 5, 5, 5), (1, 5, 5, 5, 5, 1), (5,)])
def test_voxel_tensors_need_five_dimensions(conv, shape):
    with pytest.raises(ValueError, match="5 dimensions"):
        conv(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_inputs_are_rejected(conv, dtype):
    with pytest.raises(TypeError, match="floating point"):
        conv(torch.zeros(1, 5, 4, 4, 4, dtype=dtype))
    with pytest.raises(TypeError, match="floating point"):
        e3fast.ops.norm_max_pool3d(torch.zeros(1, 3, 4, 4, 4, dtype=dtype), "1x1o", 2)


def test_mixed_devices_are_rejected():
    conv = e3fast.nn.VoxelConvolution("1x0e", "1x0e", "0e", 3.0, 2).to("meta")
    with pytest.raises(ValueError, match="one device.*input on cpu.*weight on meta"):
        conv(torch.randn(1, 1, 4, 4, 4))
    layer = e3fast.nn.NormGate(*PAPER_GATE).to("meta")
    with pytest.raises(ValueError, match="one device"):
        layer(torch.randn(1, 36, 3, 3, 3))


@pytest.mark.parametrize("bad", ["2x1q", "1x", "x0e", "3xe0"])
def test_bad_irreps_strings_name_the_argument(bad):
    with pytest.raises(ValueError, match=f"irreps_in={bad!r} is not a valid irreps"):
        e3fast.nn.VoxelConvolution(bad, "1x0e", "0e", 3.0, 2)
    with pytest.raises(ValueError, match="irreps_out"):
        e3fast.nn.Linear("1x0e", bad)
    with pytest.raises(ValueError, match="input_irreps"):
        EquivariantUNet(bad, "2x0e", 5.0, 3, (1.0, 1.0, 1.0))


def test_irreps_of_the_wrong_type_are_a_type_error():
    with pytest.raises(TypeError, match="irreps_in must be"):
        e3fast.nn.VoxelConvolution(5, "1x0e", "0e", 3.0, 2)


def test_gate_arguments_are_checked():
    with pytest.raises(ValueError, match="irreps_gated 4x1e has 4 irreps but irreps_gates 3x0e has 3"):
        e3fast.nn.NormGate("2x0e", [torch.relu], "3x0e", [torch.sigmoid], "4x1e")
    with pytest.raises(ValueError, match="neither even nor odd"):
        e3fast.nn.NormGate("2x0o", [torch.relu], "", [], "")
    with pytest.raises(ValueError, match="no fused implementation"):
        e3fast.nn.NormGate("2x0e", [torch.nn.functional.gelu], "", [], "")
    with pytest.raises(ValueError, match="irreps_scalars must be scalars"):
        e3fast.nn.NormGate("1x1e", [None], "", [], "")


def test_parameter_shapes_are_checked():
    spec = e3fast.ops.NormGateSpec.for_gate(*PAPER_GATE)
    x = torch.randn(1, 36, 3, 3, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \[20\]"):
        e3fast.ops.norm_gate(x, spec, torch.ones(19), torch.zeros(14))
    conv = e3fast.nn.VoxelConvolution("1x0e", "1x0e+1x1e", "0e+1e", 3.0, 2)
    with pytest.raises(ValueError, match="radial_weight must have shape"):
        e3fast.ops.assemble_kernel(torch.randn(3, 2), conv.sc.weight, conv.basis)
    with pytest.raises(TypeError, match="share one dtype"):
        e3fast.ops.assemble_kernel(conv.weight.double(), conv.sc.weight, conv.basis)


def test_pooling_geometry_is_checked():
    x = torch.randn(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        e3fast.ops.norm_max_pool3d(x, "1x1o", (5, 2, 2))
    with pytest.raises(TypeError, match="kernel_size must be an int or 3 ints"):
        e3fast.nn.NormMaxPool3d("1x1o", 2.5)
    with pytest.raises(ValueError, match="stride must be positive"):
        e3fast.nn.NormMaxPool3d("1x1o", 2, stride=0)


def test_unet_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_norm"):
        EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), batch_norm="layer")
    with pytest.raises(ValueError, match="down_op"):
        EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), down_op="lowpass")
    with pytest.raises(ValueError, match="equivariance"):
        EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), equivariance="SE3")
    model = EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1)
    with pytest.raises(ValueError, match="2 channels but irreps 1x0e need 1"):
        model(torch.randn(1, 2, 8, 8, 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["instance", "batch", "none"])
def test_zero_vectors_give_finite_values_and_gradients(backend, normalization):
    layer = e3fast.nn.NormGate(*PAPER_GATE, normalization=normalization)
    pool = e3fast.nn.NormMaxPool3d(layer.irreps_out, 2)
    x = torch.zeros(2, 36, 4, 4, 4)
    x[1, :, :2] = torch.randn(36, 2, 4, 4)  # sample 1: some zero vectors next to non-zero ones
    x.requires_grad_()
    with e3fast.use_backend(backend):
        out = pool(layer(x))
        out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    for parameter in layer.parameters():
        assert torch.isfinite(parameter.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unset_backend_names_are_rejected(backend):
    with pytest.raises(ValueError, match="unknown e3fast backend 'fastest'"):
        with e3fast.use_backend("fastest"):
            pass
