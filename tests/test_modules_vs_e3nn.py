"""Each e3fast module against its composition from e3nn modules, forward and gradients.

Every fast backend available here and the reference backend are compared with e3nn itself:
``o3.Linear`` + ``conv3d`` of ``tp.right`` kernels for the convolution, ``e3nn.nn.BatchNorm``
then ``e3nn.nn.Gate`` (on channels-last views) for the fused norm+gate, a per-sample norm max
pooling written here for the pooling.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import BatchNorm as E3nnBatchNorm
from e3nn.nn import Gate as E3nnGate
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import e3fast
from conftest import FAST_BACKENDS, LAYOUTS, assert_relative, to_layout
from e3fast.testing.e3nn_reference import Convolution as E3nnConvolution
from strategies import irreps as random_irreps

BACKENDS = ["reference"] + FAST_BACKENDS
HYPOTHESIS = settings(max_examples=12, deadline=None)


def _grads(outputs: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(outputs, inputs, grad_out, allow_unused=True)


def _compare(e3fast_out, e3nn_out, e3fast_inputs, e3nn_inputs, names, rtol=1e-5):
    assert_relative(e3fast_out, e3nn_out, rtol, "output")
    grad_out = torch.randn_like(e3nn_out)
    for name, actual, expected in zip(names, _grads(e3fast_out, e3fast_inputs, grad_out),
                                      _grads(e3nn_out, e3nn_inputs, grad_out)):
        if expected is None:
            assert actual is None or actual.numel() == 0 or actual.abs().max() == 0, name
            continue
        assert_relative(actual, expected, rtol, f"gradient of {name}")


# ---------------------------------------------------------------- convolution


def _conv_pair(irreps_in, irreps_out, irreps_sh, diameter, steps, cutoff, num_radial=3):
    ours = e3fast.nn.VoxelConvolution(irreps_in, irreps_out, irreps_sh, diameter, num_radial, steps, cutoff=cutoff)
    theirs = E3nnConvolution(irreps_in, irreps_out, irreps_sh, diameter, num_radial, steps, cutoff=cutoff)
    ours.load_state_dict(theirs.state_dict())  # e3nn's buffers are checked and dropped
    return ours, theirs


def _check_conv(ours, theirs, shape, layout, rtol=1e-5):
    x = to_layout(torch.randn(shape), layout).requires_grad_()
    x_ref = x.detach().clone().contiguous().requires_grad_()
    _compare(ours(x), theirs(x_ref), [x, ours.weight, ours.sc.weight], [x_ref, theirs.weight, theirs.sc.weight],
             ["x", "weight", "sc.weight"], rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_convolution_paper_layer(backend, layout):
    ours, theirs = _conv_pair("8x0e+4x1e+2x2e", "14x0e+4x1e+2x2e", o3.Irreps.spherical_harmonics(2), 5.0,
                              (1.0, 1.0, 1.0), cutoff=False, num_radial=5)
    with e3fast.use_backend(backend):
        _check_conv(ours, theirs, (2, 30, 7, 6, 9), layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cutoff", [True, False, "left", "right"])
def test_convolution_anisotropic_steps_and_cutoffs(backend, cutoff):
    ours, theirs = _conv_pair("2x0e+1x1o", "3x0e+2x1o+1x2e", o3.Irreps.spherical_harmonics(2, -1), 4.0,
                              (1.0, 1.5, 0.8), cutoff)
    assert ours.kernel_size == (5, 3, 5)
    with e3fast.use_backend(backend):
        _check_conv(ours, theirs, (1, 5, 6, 5, 7), "channels_first")


@pytest.mark.parametrize("backend", BACKENDS)
@given(irreps_in=random_irreps(), irreps_out=random_irreps(), lmax=st.integers(0, 3), parity=st.sampled_from([1, -1]),
       diameter=st.sampled_from([2.0, 3.0, 4.5]))
@HYPOTHESIS
def test_convolution_random_irreps(backend, irreps_in, irreps_out, lmax, parity, diameter):
    irreps_sh = o3.Irreps.spherical_harmonics(lmax, parity)
    # e3nn's own modules fail on empty weights (no path); e3fast's are tested there in test_kernel_basis.
    assume(o3.Linear(irreps_in, irreps_out).weight_numel > 0)
    assume(o3.FullyConnectedTensorProduct(irreps_in, irreps_sh, irreps_out).weight_numel > 0)
    ours, theirs = _conv_pair(irreps_in, irreps_out, irreps_sh, diameter, (1.0, 1.0, 1.0), cutoff=True)
    with e3fast.use_backend(backend):
        _check_conv(ours, theirs, (2, irreps_in.dim, 4, 3, 5), "channels_last")


@pytest.mark.parametrize("backend", BACKENDS)
@given(irreps_in=random_irreps(), irreps_out=random_irreps())
@HYPOTHESIS
def test_linear_random_irreps(backend, irreps_in, irreps_out):
    assume(o3.Linear(irreps_in, irreps_out).weight_numel > 0)  # e3nn fails without weights
    ours = e3fast.nn.Linear(irreps_in, irreps_out)
    theirs = o3.Linear(irreps_in, irreps_out)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, irreps_in.dim, 3, 4, 2, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with e3fast.use_backend(backend):
        out = ours(x)
    expected = theirs(x_ref.movedim(1, -1)).movedim(-1, 1)
    _compare(out, expected, [x, ours.weight], [x_ref, theirs.weight], ["x", "weight"])


# ---------------------------------------------------------------- norm + gate


def _gate_arguments(draw_scalars: o3.Irreps, gated: o3.Irreps, odd_gates: bool):
    acts = [torch.relu if ir.p == 1 else torch.tanh for _, ir in draw_scalars]
    if gated.num_irreps == 0:
        return draw_scalars, acts, o3.Irreps(""), [], gated
    if odd_gates:
        gates = o3.Irreps(f"{gated.num_irreps}x0o")
        return draw_scalars, acts, gates, [torch.tanh], gated
    return draw_scalars, acts, o3.Irreps(f"{gated.num_irreps}x0e"), [torch.sigmoid], gated


def _e3nn_norm_gate(args, normalization, **norm_options):
    gate = E3nnGate(*args)
    if normalization == "none":
        return gate, None
    return gate, E3nnBatchNorm(gate.irreps_in, instance=normalization == "instance", **norm_options)


def _e3nn_apply(gate, norm, x):
    x = x.movedim(1, -1)
    if norm is not None:
        x = norm(x)
    return gate(x).movedim(-1, 1)


def _randomize(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()


def _check_norm_gate(args, normalization, backend, layout, shape, training=True):
    gate, norm = _e3nn_norm_gate(args, normalization)
    ours = e3fast.nn.NormGate(*args, normalization=normalization)
    assert ours.irreps_in == gate.irreps_in and ours.irreps_out == gate.irreps_out
    if norm is not None:
        _randomize(norm)
        ours.load_state_dict(norm.state_dict())
        norm.train(training), ours.train(training)
    x = (torch.randn(shape[0], gate.irreps_in.dim, *shape[1:]) + 0.5)
    x = to_layout(x, layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with e3fast.use_backend(backend):
        out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d if layout == "channels_last"
                             else torch.contiguous_format)
    params = [x] + ([ours.weight, ours.bias] if norm is not None else [])
    ref_params = [x_ref] + ([norm.weight, norm.bias] if norm is not None else [])
    _compare(out, _e3nn_apply(gate, norm, x_ref), params, ref_params, ["x", "weight", "bias"])
    return ours, norm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization", ["instance", "batch", "none"])
def test_norm_gate_paper_layer(backend, layout, normalization):
    args = ("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")
    _check_norm_gate(args, normalization, backend, layout, (2, 5, 4, 7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_gate_o3_layer(backend):
    args = ("8x0e+8x0o", [torch.relu, torch.tanh], "12x0e", [torch.sigmoid], "4x1e+4x1o+2x2e+2x2o")
    _check_norm_gate(args, "instance", backend, "channels_last", (1, 3, 5, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_running_statistics_match_e3nn(backend):
    args = ("3x0e", [torch.relu], "2x0e", [torch.sigmoid], "1x1o+1x2e")
    ours, norm = _check_norm_gate(args, "batch", backend, "channels_first", (3, 4, 3, 5), training=True)
    torch.testing.assert_close(ours.running_mean, norm.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, norm.running_var, rtol=1e-5, atol=1e-6)
    # eval mode uses them
    gate = E3nnGate(*args)
    ours.eval(), norm.eval()
    x = torch.randn(2, gate.irreps_in.dim, 3, 3, 3)
    with e3fast.use_backend(backend):
        assert_relative(ours(x), _e3nn_apply(gate, norm, x), 1e-5, "eval output")


@pytest.mark.parametrize("backend", BACKENDS)
@given(scalars=random_irreps(("0e", "0o"), min_dim=0, max_entries=2),
       gated=random_irreps(("1e", "1o", "2e", "2o", "3o"), min_dim=0, max_entries=3),
       odd_gates=st.booleans(), normalization=st.sampled_from(["instance", "batch", "none"]),
       layout=st.sampled_from(LAYOUTS))
@HYPOTHESIS
def test_norm_gate_random_irreps(backend, scalars, gated, odd_gates, normalization, layout):
    if scalars.dim + gated.dim == 0:
        return
    # e3nn's Gate rejects zero-multiplicity scalar entries; simplify() drops them.
    _check_norm_gate(_gate_arguments(scalars.simplify(), gated, odd_gates), normalization, backend, layout, (2, 3, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@given(irreps=random_irreps(), instance=st.booleans())
@HYPOTHESIS
def test_batch_norm_alone_random_irreps(backend, irreps, instance):
    irreps = irreps.simplify()  # e3nn's BatchNorm fails on zero-multiplicity entries
    theirs = E3nnBatchNorm(irreps, instance=instance)
    _randomize(theirs)
    ours = e3fast.nn.BatchNorm(irreps, instance=instance)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, irreps.dim, 3, 2, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with e3fast.use_backend(backend):
        out = ours(x)
    _compare(out, theirs(x_ref.movedim(1, -1)).movedim(-1, 1), [x, ours.weight, ours.bias],
             [x_ref, theirs.weight, theirs.bias], ["x", "weight", "bias"])


# ---------------------------------------------------------------- pooling


def per_sample_norm_max_pool(x: torch.Tensor, irreps: o3.Irreps, kernel_size, stride) -> torch.Tensor:
    """Norm max pooling written out one sample and one irrep copy at a time."""
    samples = []
    for sample in x:
        channels = []
        start = 0
        for mul, ir in irreps:
            for _ in range(mul):
                field = sample[start:start + ir.dim]  # [d, X, Y, Z]
                score = field[0] if ir.dim == 1 else field.norm(dim=0)
                _, index = F.max_pool3d(score[None], kernel_size, stride, return_indices=True)
                picked = field.flatten(1)[:, index.flatten()]
                channels.append(picked.reshape(ir.dim, *index.shape[1:]))
                start += ir.dim
        samples.append(torch.cat(channels))
    return torch.stack(samples)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel_size,stride", [(2, None), ((2, 1, 3), (2, 1, 2)), (3, 2)])
def test_norm_max_pool_per_sample(backend, layout, kernel_size, stride):
    irreps = o3.Irreps("3x0e+2x1o+1x2e+1x0o")
    pool = e3fast.nn.NormMaxPool3d(irreps, kernel_size, stride)
    x = to_layout(torch.randn(3, irreps.dim, 7, 6, 9), layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with e3fast.use_backend(backend):
        out = pool(x)
    expected = per_sample_norm_max_pool(x_ref, irreps, pool.kernel_size, pool.stride)
    _compare(out, expected, [x], [x_ref], ["x"], rtol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(irreps=random_irreps(), batch=st.integers(1, 3))
@HYPOTHESIS
def test_norm_max_pool_random_irreps(backend, irreps, batch):
    x = torch.randn(batch, irreps.dim, 5, 4, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with e3fast.use_backend(backend):
        out = e3fast.ops.norm_max_pool3d(x, irreps, 2)
    _compare(out, per_sample_norm_max_pool(x_ref, irreps, (2, 2, 2), (2, 2, 2)), [x], [x_ref], ["x"], rtol=0.0)
