"""e3fast.accelerate on models built from e3nn modules: same outputs, gradients, parameters and
checkpoints as before the swap, unknown modules left alone and reported."""
from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import BatchNorm, Dropout, Gate
from e3nn.nn.models.v2103.voxel_convolution import Convolution as ConvolutionV2103
from e3nn.nn.models.v2104.voxel_convolution import Convolution as ConvolutionV2104

import e3fast
import e3fast.nn.convolution as convolution_module
import e3fast.nn.linear as linear_module
from conftest import assert_outputs_and_gradients, assert_relative, randomized
from e3fast.acceleration.convolution import AcceleratedConvolution
from e3fast.acceleration.e3nn_layout import E3nnLayoutDropout, E3nnLayoutNormGate, GateComputedByNorm
from e3fast.acceleration.pooling import AcceleratedNormMaxPool3d
from e3fast.models import EquivariantUNet
from e3fast.testing import e3nn_reference

RTOL = 1e-5
SH = o3.Irreps.spherical_harmonics(2)

# The whole-network comparisons run in float64: there the swap must agree to rounding (~1e-13).
# In float32 the outputs agree to ~1e-5, but the gradients of a deep U-Net through norm *max*
# pooling do not: a window whose two largest norms differ by rounding picks another voxel, which
# moves that voxel's gradient wholesale (up to ~1e-2 relative here; ~1e-5 with average pooling).
# For the same reason the 3-level U-Nets get sizes without much zero padding: next to a wide padded
# region, mirror-image voxels hold vectors of exactly equal norm, and which of them a pooling
# window takes depends on the rounding of the norms (both answers are right).


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _twins(build, dtype=torch.float32):
    """Two independent models with the same weights: one to accelerate, one to compare with."""
    with _default_dtype(dtype):
        original = randomized(build())
        twin = build()
    twin.load_state_dict(original.state_dict())
    return original, twin


@functools.lru_cache(maxsize=None)
def _pristine_e3nn_unet(equivariance, n_downsample, options=()):
    """A float64 e3nn_Unet-structured U-Net with random weights, built once per configuration
    (building the e3nn modules takes seconds); use :func:`_unet_twins` for copies."""
    torch.manual_seed(0)
    with _default_dtype(torch.float64):
        return randomized(_e3nn_unet(equivariance, n_downsample, **dict(options)))


def _unet(equivariance="SO3", n_downsample=2, **options):
    """A float64 copy of the U-Net of that configuration."""
    return copy.deepcopy(_pristine_e3nn_unet(equivariance, n_downsample, tuple(sorted(options.items()))))


def _unet_twins(equivariance="SO3", n_downsample=2, **options):
    """Two float64 U-Nets with the same weights: a copy to accelerate, and the cached original to
    compare with, gradients cleared (tests that change the original's state use :func:`_unet`)."""
    original = _pristine_e3nn_unet(equivariance, n_downsample, tuple(sorted(options.items())))
    original.zero_grad(set_to_none=True)
    return _unet(equivariance, n_downsample, **options), original


def _e3nn_unet(equivariance="SO3", n_downsample=2, **options):
    # per_sample_pooling=False: e3nn_Unet's own pooling, sample 0's vectors for every sample.
    # 3^3 kernels in the 3-level nets (5^3 in the others): e3nn's float64 kernels take their time.
    diameter = 3.0 if n_downsample > 2 else 5.0
    return e3nn_reference.UNet("1x0e", "3x0e", diameter, 3, (1.0, 1.0, 1.0), n=1, n_downsample=n_downsample,
                               equivariance=equivariance, per_sample_pooling=False, **options)


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ---------------------------------------------------------------- e3nn_Unet-structured U-Nets
# verify=False: e3nn_reference's modules are e3nn_Unet's by construction; the check that
# accelerate runs on modules recognised by structure is tested on the convolution stacks below.


@pytest.mark.parametrize("equivariance,n_downsample,size", [
    ("SO3", 2, (8, 9, 7)), ("SO3", 3, (8, 8, 8)), ("O3", 2, (7, 8, 8)), ("O3", 3, (8, 8, 8))])
def test_unet_outputs_and_gradients_equal_the_original(equivariance, n_downsample, size):
    model, original = _unet_twins(equivariance, n_downsample)
    keys = set(model.state_dict())
    parameters = {name: p for name, p in model.named_parameters()}
    accelerated, report = e3fast.accelerate(model, verify=False)
    assert accelerated is model
    blocks = 2 * n_downsample + 1
    assert len(report.fused) == 2 * blocks
    assert report.replaced_classes() == {"Convolution": 2 * blocks, "BatchNorm": 2 * blocks, "Gate": 2 * blocks,
                                         "Dropout": 2 * blocks, "Pool": n_downsample}
    assert {entry.path for entry in report.kept} == {"out", *(f"up.upsample_ops.{i}" for i in range(n_downsample))}
    assert not any(isinstance(m, (BatchNorm, Gate, Dropout, e3nn_reference.Convolution, e3nn_reference.Pool))
                   for m in model.modules())
    # The same parameter objects, under the same names; the same state_dict keys.
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert set(model.state_dict()) == keys
    assert_outputs_and_gradients(model, original, _x(1, 1, *size), RTOL)


def test_unet_on_the_reference_backend():
    model, original = _unet_twins("SO3", 2)
    e3fast.accelerate(model, verify=False)
    x = _x(1, 1, 4, 5, 4)
    with e3fast.use_backend("reference"):  # forward only: the reference kernel assembly's backward is slow
        assert_relative(model(x), original(x), RTOL, "output")


def _pool_per_sample(model: torch.nn.Module) -> torch.nn.Module:
    """The e3nn model with e3nn_Unet's batch > 1 pooling bug fixed."""
    for module in model.modules():
        if isinstance(module, e3nn_reference.Pool):
            module.per_sample = True
    return model


@pytest.mark.parametrize("equivariance", ["SO3", "O3"])
def test_batch_equals_per_sample_runs_of_the_original(equivariance):
    """The swap fixes e3nn_Unet's pooling: every sample pooled on its own."""
    model, original = _unet_twins(equivariance, 2)
    e3fast.accelerate(model, verify=False)
    x = _x(2, 1, 8, 4, 4)
    per_sample = torch.cat([original(sample[None]) for sample in x])
    assert_relative(model(x), per_sample, RTOL, "batch of 3")
    assert (original(x)[1:] - per_sample[1:]).abs().max() > 1e-3, "the original's pooling bug should show"


@pytest.mark.parametrize("options", [dict(batch_norm="None", is_bias=False), dict(down_op="average")])
def test_unet_options(options):
    model, original = _unet_twins("SO3", 2, **options)
    _, report = e3fast.accelerate(model, verify=False)
    if options.get("batch_norm") == "None":  # e3nn_Unet's Identity sits between conv and gate: no fusion
        assert not report.fused and report.replaced_classes()["Gate"] == 10
    if options.get("down_op") == "average":
        assert sum("average pooling" in entry.reason for entry in report.kept) == 2
    assert_outputs_and_gradients(model, original, _x(1, 1, 8, 8, 7), RTOL)


def test_training_step_through_an_optimizer_made_before_the_swap():
    options = dict(batch_norm="batch", scalar_upsampling=True, cutoff=True)
    model, original = _unet("SO3", 2, **options), _unet("SO3", 2, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    original_optimizer = torch.optim.Adam(original.parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    running = {name: buffer for name, buffer in model.named_buffers() if "running" in name}
    assert running
    e3fast.accelerate(model, verify=False)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert all(buffer is running[name] for name, buffer in model.named_buffers() if "running" in name)
    _pool_per_sample(original)
    x, labels = _x(2, 1, 8, 4, 8), torch.randint(0, 3, (2, 8, 4, 8))
    for net, opt in ((model, optimizer), (original, original_optimizer)):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(x), labels).backward()
            opt.step()
    stepped = dict(original.named_parameters())
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, before[name]), f"{name} was not updated"
        assert_relative(parameter, stepped[name], RTOL, f"{name} after two Adam steps")
    # The training forwards updated the original running statistics tensors in place.
    expected = dict(original.named_buffers())
    for name, buffer in running.items():
        assert_relative(buffer, expected[name], RTOL, f"running statistics {name}")
    model.eval(), original.eval()
    assert not any(module.training for module in model.modules())
    assert_relative(model(x), original(x), RTOL, "eval-mode output")


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_load_both_ways():
    model, original = _unet_twins("SO3", 2)
    e3fast.accelerate(model, verify=False)
    fresh_e3nn, fresh_accelerated = randomized(_unet("SO3", 2)), randomized(_unet("SO3", 2))  # other weights
    e3fast.accelerate(fresh_accelerated, verify=False)
    result = fresh_e3nn.load_state_dict(model.state_dict(), strict=True)  # accelerated -> e3nn
    assert not result.missing_keys and not result.unexpected_keys
    fresh_accelerated.load_state_dict(original.state_dict(), strict=True)  # e3nn -> accelerated
    x = _x(1, 1, 8, 8, 8)
    assert_relative(fresh_e3nn(x), original(x), RTOL, "e3nn model from the accelerated checkpoint")
    assert_relative(fresh_accelerated(x), original(x), RTOL, "accelerated model from the e3nn checkpoint")


def test_checkpoint_of_another_configuration_is_rejected():
    model = _unet("SO3", 2)
    e3fast.accelerate(model, verify=False)
    state = model.state_dict()
    key = "down.down_blocks.0.conv1.lattice"
    state[key] = state[key] * 1.2  # as saved by a model with other voxel steps
    with pytest.raises((ValueError, RuntimeError), match="another configuration"):
        model.load_state_dict(state)


# ---------------------------------------------------------------- convolution stacks


def _stack(*convs):
    return torch.nn.Sequential(*convs)


CONVOLUTION_STACKS = {
    "v2104": lambda: _stack(ConvolutionV2104("2x0e+1x1o", "4x0e+2x1o+1x2e", SH, 5.0, 4),
                            ConvolutionV2104("4x0e+2x1o+1x2e", "3x0e+1x1e", SH, 3.0, 3, steps=(1.0, 1.4, 0.7))),
    "v2103": lambda: _stack(ConvolutionV2103("2x0e+1x1o", "4x0e+2x1o+1x2e", SH, 5),
                            ConvolutionV2103("4x0e+2x1o+1x2e", "3x0e+1x1e", SH, 5, steps=(1, 1, 2),
                                             padding=(2, 2, 1))),
    "e3nn_Unet Convolution": lambda: _stack(
        e3nn_reference.Convolution("2x0e+1x1o", "4x0e+2x1o+1x2e", SH, 5.0, 4, cutoff=False),
        e3nn_reference.Convolution("4x0e+2x1o+1x2e", "3x0e+1x1e", SH, 4.0, 3, steps=(1.0, 1.5, 0.8), cutoff="left")),
    "e3nn_Unet ConvolutionVoxel": lambda: _stack(
        e3nn_reference.ConvolutionVoxel("2x0e+1x1o", "4x0e+2x1o+1x2e", SH, 3),
        e3nn_reference.ConvolutionVoxel("4x0e+2x1o+1x2e", "3x0e+1x1e", SH, 5, cutoff=False)),
}


@pytest.mark.parametrize("name", CONVOLUTION_STACKS)
def test_convolution_stacks(name):
    model, original = _twins(CONVOLUTION_STACKS[name])
    _, report = e3fast.accelerate(model)
    assert [type(m) for m in model] == [AcceleratedConvolution] * 2
    checked = "checked on a test input" in report.replaced[0].detail
    assert checked == name.startswith("e3nn_Unet"), "only modules recognised by structure are checked"
    assert_outputs_and_gradients(model, original, torch.randn(2, 5, 7, 6, 8), RTOL)


def test_convolution_as_the_model_itself_and_in_float64():
    # Built in float64 (e3nn's constants too: converting a float32-built e3nn module keeps their
    # float32 rounding, ~1e-9 here).
    conv, original = _twins(lambda: ConvolutionV2104("1x0e+1x1e", "2x0e+1x1e", SH, 3.0, 3), torch.float64)
    accelerated, report = e3fast.accelerate(conv)
    assert isinstance(accelerated, AcceleratedConvolution) and report.replaced[0].path == ""
    assert accelerated.weight is conv.weight and accelerated.basis.basis.dtype == torch.float64
    x = torch.randn(1, 4, 5, 5, 5, dtype=torch.float64)
    assert_relative(accelerated(x), original(x), 1e-12, "float64 output")


# ---------------------------------------------------------------- e3nn layout modules


@pytest.mark.parametrize("shape", [(3, 24), (2, 7, 24), (2, 4, 3, 5, 24), (2, 3, 2, 2, 3, 24)])
@pytest.mark.parametrize("instance", [True, False])
def test_norm_and_gate_on_e3nn_layout_tensors_of_any_rank(shape, instance):
    # float64: an instance norm of a [batch, channels] tensor normalizes single values (variance 0,
    # all eps), whose gradients lose most digits in float32.
    def build():
        gate = Gate("4x0e+2x0o", [torch.relu, torch.tanh], "6x0e", [torch.sigmoid], "2x1e+2x1o+1x2e+1x2o")
        return _NormThenGate(BatchNorm(gate.irreps_in, instance=instance), gate)

    parent, twin = _twins(build, torch.float64)
    _, report = e3fast.accelerate(parent)
    assert report.fused == [("norm", "gate")]
    x = _x(*shape[:-1], twin.gate.irreps_in.dim) + 0.3
    assert_outputs_and_gradients(parent, twin, x, RTOL)


class _NormThenGate(torch.nn.Module):
    def __init__(self, norm, gate):
        super().__init__()
        self.norm, self.gate = norm, gate

    def forward(self, x):
        return self.gate(self.norm(x))


class _NormUsedTwice(_NormThenGate):
    def forward(self, x):
        y = self.norm(x)
        return self.gate(y) + y[..., :self.gate.irreps_out.dim]


class _Untraceable(_NormThenGate):
    def forward(self, x):
        if x.shape[1] > 2:  # shape-dependent control flow: torch.fx cannot trace it
            return self.gate(self.norm(x))
        return self.gate(self.norm(x)) * 2


@pytest.mark.parametrize("parent", [_NormUsedTwice, _Untraceable])
def test_norm_and_gate_that_cannot_be_fused_are_replaced_one_by_one(parent):
    gate = Gate("4x0e", [torch.relu], "2x0e", [torch.sigmoid], "2x1o")
    build = lambda: parent(randomized(BatchNorm(gate.irreps_in, instance=True)), gate)  # noqa: E731
    model, original = _twins(build)
    _, report = e3fast.accelerate(model)
    assert not report.fused
    assert isinstance(model.norm, E3nnLayoutNormGate) and isinstance(model.gate, E3nnLayoutNormGate)
    if parent is _Untraceable:
        assert "could not be traced" in report.notes[0]
    x = (torch.randn(2, gate.irreps_in.dim, 4, 5, 3) + 0.2).transpose(1, 4)  # a channels-last view, as e3nn_Unet passes
    assert_outputs_and_gradients(model, original, x, RTOL)


def test_channels_last_views_are_not_copied():
    norm = BatchNorm("3x0e+2x1o", instance=True)
    model, _ = e3fast.accelerate(torch.nn.ModuleList([norm]))
    x = torch.randn(2, 9, 4, 5, 6)
    with torch.autograd.profiler.profile(record_shapes=True) as profile:
        model[0](x.transpose(1, 4))
    copies = [event for event in profile.function_events
              if event.name in ("aten::clone", "aten::contiguous", "aten::copy_", "aten::_to_copy")]
    assert any(event.name == "e3fast::norm_gate" for event in profile.function_events)
    # Only the per-sample statistics ([batch, irreps]) may be copied, never the voxels.
    assert all(math.prod(shape) < x.numel() for event in copies for shape in event.input_shapes if shape)


def test_dropout_draws_what_e3nn_draws():
    irreps = o3.Irreps("3x0e+2x1o+1x2e")
    x = torch.randn(4, 5, 6, irreps.dim)
    for p in (0.0, 0.3, 1.0):
        ours = e3fast.accelerate(Dropout(irreps, p))[0]
        assert isinstance(ours, E3nnLayoutDropout)
        torch.manual_seed(1)
        expected = Dropout(irreps, p)(x)
        torch.manual_seed(1)
        assert torch.equal(ours(x), expected), f"p={p}"
        if p == 0:
            assert ours(x) is x, "nothing to drop: no multiplication by ones"
        assert ours.eval()(x) is x


def test_gate_alone_and_fused_gate_passthrough():
    gate = Gate("2x0e", [torch.relu], "1x0e", [torch.sigmoid], "1x1e")
    accelerated, _ = e3fast.accelerate(gate)
    x = torch.randn(5, 3, gate.irreps_in.dim)
    assert_relative(accelerated(x), gate(x), RTOL, "gate alone")
    passthrough = GateComputedByNorm(gate, "norm")
    assert passthrough(x) is x and passthrough.irreps_out == gate.irreps_out


# ---------------------------------------------------------------- pooling


def test_pooling_alone_is_fixed_per_sample():
    irreps = o3.Irreps("2x0e+2x1o+1x2e")
    pool = e3nn_reference.Pool(2.0, (1.0, 1.0, 0.7), "maxpool3d", irreps, per_sample=False)
    accelerated, report = e3fast.accelerate(pool)
    assert isinstance(accelerated, AcceleratedNormMaxPool3d) and accelerated.kernel_size == (2, 2, 2)
    assert (accelerated.scale, accelerated.steps, accelerated.mode) == (2.0, (1.0, 1.0, 0.7), "maxpool3d")
    x = torch.randn(3, irreps.dim, 6, 4, 8)
    per_sample = torch.cat([pool(sample[None]) for sample in x])
    torch.testing.assert_close(accelerated(x), per_sample, rtol=0, atol=0)


# ---------------------------------------------------------------- what is left alone


def test_a_model_without_e3nn_modules_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU())
    accelerated, report = e3fast.accelerate(model)
    assert accelerated is model and not report.replaced and not report.fused
    assert [(entry.path, entry.module) for entry in report.kept] == [("0", "Conv3d"), ("1", "ReLU")]
    assert "replaced 0 modules" in str(report)


def test_e3fast_models_are_left_alone():
    model = EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=1)
    _, report = e3fast.accelerate(model)
    assert not report.replaced and report.kept[0].reason == "already an e3fast module"


def test_unsupported_e3nn_modules_are_kept_with_the_reason():
    gelu_gate = Gate("2x0e", [F.gelu], "1x0e", [torch.sigmoid], "1x1e")
    max_norm = BatchNorm("2x0e+1x1e", reduce="max")
    strided = e3nn_reference.Convolution("1x0e", "2x0e", SH, 3.0, 2)
    strided.kwargs["stride"] = 2
    model = torch.nn.ModuleDict(dict(gate=gelu_gate, norm=max_norm, conv=strided))
    _, report = e3fast.accelerate(model)
    assert not report.replaced
    reasons = {entry.path: entry.reason for entry in report.kept}
    assert "gelu" in reasons["gate"] and "reduce='max'" in reasons["norm"] and "stride" in reasons["conv"]
    assert model["gate"] is gelu_gate and model["norm"] is max_norm and model["conv"] is strided


class _DoubledConvolution(e3nn_reference.Convolution):
    """Looks like e3nn_Unet's Convolution but computes something else."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_look_alike_that_computes_something_else_is_kept():
    conv = _DoubledConvolution("1x0e+1x1e", "2x0e", SH, 3.0, 2)
    accelerated, report = e3fast.accelerate(conv)
    assert accelerated is conv and "something else" in report.kept[0].reason
    unchecked, report = e3fast.accelerate(_DoubledConvolution("1x0e+1x1e", "2x0e", SH, 3.0, 2), verify=False)
    assert isinstance(unchecked, AcceleratedConvolution), "verify=False trusts the structure"


def test_not_inplace_leaves_the_original_alone_and_eval_mode_is_kept():
    model = _unet("SO3", 2).eval()
    accelerated, report = e3fast.accelerate(model, inplace=False, verify=False)
    assert accelerated is not model and report.replaced
    assert any(isinstance(m, Gate) for m in model.modules())
    assert not any(p is q for p in accelerated.parameters() for q in model.parameters())
    assert not any(module.training for module in accelerated.modules())


# ---------------------------------------------------------------- freeze


def _accelerated_unet():
    model = _unet("SO3", 2)
    e3fast.accelerate(model, verify=False)
    return model


def _equivariant_unet():
    with _default_dtype(torch.float64):
        return randomized(EquivariantUNet("1x0e", "2x0e", 5.0, 3, (1.0, 1.0, 1.0), n=1, n_downsample=1))


FROZEN_MODELS = {"accelerated e3nn_Unet": _accelerated_unet, "e3fast EquivariantUNet": _equivariant_unet}


@pytest.mark.parametrize("name", FROZEN_MODELS)
def test_freeze_gives_the_same_outputs_and_exports(name, monkeypatch):
    model = FROZEN_MODELS[name]().eval()
    x = _x(1, 1, 8, 6, 8)
    with torch.no_grad():
        expected = model(x)
    assert e3fast.freeze(model) is model and e3fast.is_frozen(model) and not model.training
    # Frozen kernels are not assembled again at run time.
    for module in (convolution_module, linear_module):
        monkeypatch.setattr(module, "assemble_kernel", _must_not_be_called)
    with torch.no_grad():
        assert_relative(model(x), expected, RTOL, "frozen output")
    exported = torch.export.export(model, (x,))
    assert not any("assemble_kernel" in str(node.target) for node in exported.graph.nodes)
    assert_relative(exported.module()(x), expected, RTOL, "exported program")
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert_relative(traced(x), expected, RTOL, "TorchScript trace")


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("a frozen model assembled a kernel")


def test_frozen_model_refuses_to_train_and_unfreeze_goes_back():
    model = _accelerated_unet()
    reference = copy.deepcopy(model)
    e3fast.freeze(model)
    model.train()
    with pytest.raises(RuntimeError, match="unfreeze"):
        model(_x(1, 1, 4, 4, 4))
    assert e3fast.unfreeze(model) is model and model.training and not e3fast.is_frozen(model)
    x = _x(1, 1, 4, 4, 4)
    assert_outputs_and_gradients(model, reference, x, RTOL)  # trains again, every weight gets its gradient


def test_loading_weights_into_a_frozen_model_refreezes_its_kernels():
    model = e3fast.freeze(_equivariant_unet())
    other = randomized(copy.deepcopy(model))  # other weights; its frozen kernels are stale now
    other.load_state_dict(other.state_dict())  # reassembles them
    model.load_state_dict(other.state_dict())
    x = _x(1, 1, 4, 4, 4)
    with torch.no_grad():
        expected = e3fast.unfreeze(copy.deepcopy(other)).eval()(x)
        assert_relative(model(x), expected, RTOL, "after load_state_dict")


def test_freeze_without_kernels_changes_nothing_but_the_mode():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3))
    assert e3fast.freeze(model) is model and not model.training and not e3fast.is_frozen(model)
    assert e3fast.unfreeze(model).training


def test_not_inplace_on_a_model_that_cannot_be_copied_says_so():
    conv = ConvolutionV2104("1x0e", "1x0e", SH, 3.0, 2)  # e3nn cannot deep-copy its tensor product
    with pytest.raises(TypeError, match="in place instead"):
        e3fast.accelerate(conv, inplace=False)
    assert isinstance(e3fast.accelerate(conv)[0], AcceleratedConvolution)
