"""The whole EquivariantUNet against the U-Net composed from e3nn modules, with the same weights."""
from __future__ import annotations

import pytest
import torch

from conftest import FAST_BACKENDS, assert_outputs_and_gradients, assert_relative, randomized
from e3fast.models import EquivariantUNet
from e3fast.testing.e3nn_reference import UNet as E3nnUNet

BACKENDS = ["reference"] + FAST_BACKENDS


def _pair(*args, **kwargs):
    reference = randomized(E3nnUNet(*args, **kwargs))
    model = EquivariantUNet(*args, **kwargs)
    model.load_state_dict(reference.state_dict())
    return model, reference


CONFIGURATIONS = [
    # equivariance, n_downsample, batch, steps, spatial size (not all multiples of the pooling factor)
    ("SO3", 2, 1, (1.0, 1.0, 1.0), (12, 9, 10)),
    ("SO3", 3, 2, (1.0, 1.5, 0.8), (16, 11, 16)),
    ("O3", 2, 2, (0.9, 1.0, 1.3), (10, 12, 7)),
    ("O3", 3, 1, (1.0, 1.0, 1.0), (16, 16, 13)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("equivariance,n_downsample,batch,steps,size", CONFIGURATIONS)
def test_unet_equals_e3nn_composition(backend, equivariance, n_downsample, batch, steps, size):
    model, reference = _pair("1x0e", "3x0e", 5.0, 5, steps, n=1, n_downsample=n_downsample,
                             equivariance=equivariance)
    assert_outputs_and_gradients(model, reference, torch.randn(batch, 1, *size), 1e-4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(batch_norm="batch"),
    dict(batch_norm="None", is_bias=False),
    dict(scalar_upsampling=True, cutoff=True),
    dict(down_op="average", lmax=3),
])
def test_unet_options_equal_e3nn_composition(backend, options):
    model, reference = _pair("2x0e+1x1o", "2x0e+1x1o", 4.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2, **options)
    assert_outputs_and_gradients(model, reference, torch.randn(2, 5, 8, 9, 8), 1e-4, backend)


def test_unet_batch_norm_running_statistics_and_eval_mode():
    model, reference = _pair("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2, batch_norm="batch")
    x = torch.randn(2, 1, 8, 8, 8)
    model(x), reference(x)  # training step updates the running statistics
    running = {k: v for k, v in reference.state_dict().items() if "running" in k}
    assert running, "the batch-norm configuration should have running statistics"
    for key, value in model.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(value, running[key], rtol=1e-4, atol=1e-5)
    model.eval(), reference.eval()
    assert_relative(model(x), reference(x), 1e-4, "eval-mode output")


def test_paper_configuration_parameter_count():
    model = EquivariantUNet("1x0e", "4x0e", 5, 5, (1, 1, 1), n_downsample=3)
    assert sum(p.numel() for p in model.parameters()) == 383_978
    first = model.down.down_blocks[0]
    assert str(first.conv1.irreps_out) == "14x0e+4x1e+2x2e"
    assert str(first.irreps_out) == "8x0e+4x1e+2x2e"
    assert all(block.conv1.kernel_size == (5, 5, 5) for block in model.down.down_blocks)


def test_state_dict_is_clean_and_loads_e3nn_checkpoints_strictly():
    model, reference = _pair("1x0e", "4x0e", 5.0, 5, (1.0, 1.0, 1.0), n=1, n_downsample=2)
    own_keys = set(model.state_dict())
    parameter_keys = {name for name, _ in reference.named_parameters()}
    assert own_keys == parameter_keys  # instance norm: parameters only, no e3nn constants
    e3nn_only = set(reference.state_dict()) - own_keys
    assert any(key.endswith(".sh") for key in e3nn_only) and any("_w3j" in key for key in e3nn_only)
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The model's own state_dict round-trips.
    clone = EquivariantUNet("1x0e", "4x0e", 5.0, 5, (1.0, 1.0, 1.0), n=1, n_downsample=2)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(clone(x), model(x))


def test_checkpoint_from_another_configuration_is_rejected():
    reference = E3nnUNet("1x0e", "4x0e", 5.0, 5, (1.0, 1.0, 1.0), n=1, n_downsample=2)
    other_steps = EquivariantUNet("1x0e", "4x0e", 5.0, 5, (1.0, 1.2, 1.0), n=1, n_downsample=2)
    with pytest.raises((ValueError, RuntimeError), match="lattice"):
        other_steps.load_state_dict(reference.state_dict())
    other_width = EquivariantUNet("1x0e", "4x0e", 5.0, 5, (1.0, 1.0, 1.0), n=2, n_downsample=2)
    with pytest.raises((ValueError, RuntimeError), match="another configuration|size mismatch"):
        other_width.load_state_dict(reference.state_dict())


def test_e3nn_pooling_bug_is_not_reproduced():
    """For batch > 1 e3nn_Unet gathers vectors from sample 0; e3fast pools each sample on its own."""
    model, reference = _pair("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2)
    buggy = E3nnUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2, per_sample_pooling=False)
    buggy.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, 8, 8, 8)
    batched = model(x)
    one_at_a_time = torch.cat([model(x[:1]), model(x[1:])])
    assert_relative(batched, one_at_a_time, 1e-5, "per-sample pooling")
    assert_relative(buggy(x[:1]), batched[:1], 1e-4, "sample 0 is unaffected by the bug")
    assert (buggy(x)[1] - batched[1]).abs().max() > 1e-3, "the reference bug should show on sample 1"


def test_unet_channels_last_input_gives_same_output_in_same_format():
    model = EquivariantUNet("2x0e", "3x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2)
    x = torch.randn(2, 2, 8, 12, 8)  # two channels: with one, both memory formats are the same
    out = model(x)
    out_cl = model(x.contiguous(memory_format=torch.channels_last_3d))
    assert out.is_contiguous() and out_cl.is_contiguous(memory_format=torch.channels_last_3d)
    assert_relative(out_cl, out, 1e-5, "channels-last input")
    slow = EquivariantUNet("2x0e", "3x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=2, channels_last=False)
    slow.load_state_dict(model.state_dict())
    assert_relative(slow(x), out, 1e-5, "channels-first network")
