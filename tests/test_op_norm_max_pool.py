"""Native CPU norm max pooling (``e3fast::norm_max_pool3d*``) against the pure-PyTorch reference."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3
from hypothesis import given, settings
from hypothesis import strategies as st

import e3fast
from e3fast.backends import backend_usable
from e3fast.irreps_layout import field_table
from e3fast.ops import norm_max_pool3d, norm_max_pool3d_reference

import strategies
from conftest import LAYOUTS, RTOL, assert_relative, to_layout

pytestmark = pytest.mark.skipif(not backend_usable("cpu", "cpu"),
                                reason="the compiled extension e3fast._C (CPU kernels) is not loaded")

IRREP_CHOICES = ("0e", "0o", "1e", "1o", "2e", "2o", "3o")
IRREPS = o3.Irreps("2x0e+1x0o+2x1o+1x2e+1x3o")
# (kernel_size, stride): cubic, anisotropic, overlapping windows.
GEOMETRIES = [((2, 2, 2), (2, 2, 2)), ((2, 1, 3), (2, 1, 2)), ((3, 3, 3), (2, 2, 2))]
GEOMETRY_IDS = ["k2s2", "k213s212", "k3s2-overlap"]
SHAPE = (2, IRREPS.dim, 7, 5, 9)
BF16_RTOL = 2e-2


def random_irreps(max_entries: int = 3):
    return strategies.irreps(IRREP_CHOICES, max_entries=max_entries)


def pool_and_grad(backend, x, irreps, kernel_size, stride, grad_y):
    """Pooled output and the gradient of <y, grad_y> w.r.t. x on ``backend``."""
    x = x.detach().requires_grad_()
    with e3fast.use_backend(backend):
        y = norm_max_pool3d(x, irreps, kernel_size, stride)
    (grad_x,) = torch.autograd.grad(y, x, grad_y.to(y.dtype))
    return y, grad_x


def native_args(x, irreps, kernel_size, stride):
    return x, field_table(o3.Irreps(irreps)), list(kernel_size), list(stride)


def layout_of(x):
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last_3d) else "channels_first"


def check_against_reference(x, irreps, kernel_size, stride, rtol, reference_dtype=None):
    reference_dtype = reference_dtype or x.dtype
    y_ref_shape = norm_max_pool3d_reference(x.to(reference_dtype), irreps, kernel_size, stride).shape
    grad_y = to_layout(torch.randn(y_ref_shape, dtype=reference_dtype), layout_of(x))
    y, grad_x = pool_and_grad("cpu", x, irreps, kernel_size, stride, grad_y)
    y_ref, grad_x_ref = pool_and_grad("reference", x.to(reference_dtype), irreps, kernel_size, stride, grad_y)
    assert y.dtype == x.dtype
    assert_relative(y, y_ref, rtol, f"y ({x.dtype}, kernel {kernel_size}, stride {stride})")
    assert_relative(grad_x, grad_x_ref, rtol, f"grad x ({x.dtype}, kernel {kernel_size}, stride {stride})")
    return y, grad_x


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(dtype, layout, geometry):
    kernel_size, stride = geometry
    x = to_layout(torch.randn(SHAPE, dtype=dtype), layout)
    y, grad_x = check_against_reference(x, IRREPS, kernel_size, stride, RTOL[dtype])
    channels_last = layout == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    assert grad_x.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_close_to_float32_reference(dtype, layout):
    kernel_size, stride = GEOMETRIES[2]
    x = to_layout(torch.randn(SHAPE).to(dtype), layout)
    check_against_reference(x, IRREPS, kernel_size, stride, BF16_RTOL, torch.float32)


@settings(max_examples=15, deadline=None)
@given(irreps=random_irreps(), size=st.tuples(*[st.integers(3, 7)] * 3),
       kernel_size=st.tuples(*[st.integers(1, 3)] * 3), stride=st.tuples(*[st.integers(1, 3)] * 3),
       batch=st.integers(1, 3), layout=st.sampled_from(LAYOUTS))
def test_random_irreps_match_reference(irreps, size, kernel_size, stride, batch, layout):
    torch.manual_seed(0)
    x = to_layout(torch.randn(batch, irreps.dim, *size), layout)
    check_against_reference(x, irreps, kernel_size, stride, RTOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_sample_is_pooled_on_its_own(layout):
    x = to_layout(torch.randn(3, IRREPS.dim, 5, 6, 7), layout)
    with e3fast.use_backend("cpu"):
        y = norm_max_pool3d(x, IRREPS, 2, 2)
    for b in range(3):
        expected = norm_max_pool3d_reference(x[b:b + 1], IRREPS, (2, 2, 2), (2, 2, 2))
        assert_relative(y[b:b + 1], expected, RTOL[torch.float32], f"sample {b}")
        assert not torch.equal(y[b], y[(b + 1) % 3])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_input_gives_finite_values_and_gradients(layout):
    x = to_layout(torch.zeros(2, IRREPS.dim, 4, 4, 4), layout).requires_grad_()
    fields = field_table(IRREPS)
    y, argmax = torch.ops.e3fast.norm_max_pool3d(x, fields, [2, 2, 2], [2, 2, 2])
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert torch.isfinite(y).all() and torch.all(y == 0)
    assert torch.isfinite(grad_x).all()
    assert torch.all(argmax == 0), "ties go to the first window position"
    # The gradient lands on each window's first voxel.
    expected = torch.zeros_like(grad_x)
    expected[:, :, ::2, ::2, ::2] = grad_y
    assert torch.equal(grad_x, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ties_go_to_the_first_window_position(layout):
    # Every vector is a signed permutation of (1, 2, 2) or (0, 0, 3): all norms are exactly 3.
    irreps = o3.Irreps("3x1o")
    patterns = torch.tensor([[1.0, 2.0, 2.0], [2.0, 1.0, 2.0], [2.0, 2.0, 1.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    vectors = patterns[torch.randint(len(patterns), (3, 4, 4, 4))] * torch.randint(0, 2, (3, 4, 4, 4, 3)).mul(2).sub(1)
    x = to_layout(vectors.permute(0, 4, 1, 2, 3).reshape(1, 9, 4, 4, 4), layout)
    with e3fast.use_backend("cpu"):
        y = norm_max_pool3d(x, irreps, 2)
    assert torch.equal(y, x[:, :, ::2, ::2, ::2])
    assert torch.equal(y, norm_max_pool3d_reference(x, irreps, (2, 2, 2), (2, 2, 2)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_wins_like_max_pool(layout):
    x = torch.randn(1, IRREPS.dim, 4, 4, 4)
    x[0, 3, 1, 0, 1] = float("nan")  # a component of the first 1o field
    x[0, 0, 2, 3, 3] = float("nan")  # a scalar
    x = to_layout(x, layout)
    with e3fast.use_backend("cpu"):
        y = norm_max_pool3d(x, IRREPS, 2)
    expected = norm_max_pool3d_reference(x, IRREPS, (2, 2, 2), (2, 2, 2))
    assert torch.isnan(y).sum() == 2
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=0, atol=0)


def values_at_argmax(x, argmax, irreps, kernel_size, stride):
    """y rebuilt from the saved window positions: x at o * stride + (i, j, k) of p = (i ky + j) kz + k."""
    ky, kz = kernel_size[1:]
    y = torch.empty(x.shape[0], x.shape[1], *argmax.shape[2:], dtype=x.dtype)
    fields = field_table(irreps).tolist()
    for b in range(x.shape[0]):
        for f, (start, dim, _, _) in enumerate(fields):
            for ox, oy, oz in torch.cartesian_prod(*[torch.arange(n) for n in argmax.shape[2:]]).tolist():
                p = int(argmax[b, f, ox, oy, oz])
                n = (ox * stride[0] + p // (ky * kz), oy * stride[1] + (p // kz) % ky, oz * stride[2] + p % kz)
                y[b, start:start + dim, ox, oy, oz] = x[b, start:start + dim, n[0], n[1], n[2]]
    return y


@pytest.mark.parametrize("geometry", [((2, 3, 2), (2, 2, 2)), ((7, 7, 6), (1, 1, 1))], ids=["uint8", "int32"])
def test_argmax_dtype_and_positions(geometry):
    kernel_size, stride = geometry
    irreps = o3.Irreps("1x0e+1x1o+1x2e")
    x = torch.randn(1, irreps.dim, 7, 7, 7)
    y, argmax = torch.ops.e3fast.norm_max_pool3d(*native_args(x, irreps, kernel_size, stride))
    window = kernel_size[0] * kernel_size[1] * kernel_size[2]
    assert argmax.dtype == (torch.uint8 if window <= 256 else torch.int32)
    assert argmax.shape == (1, 3, *y.shape[2:]) and argmax.is_contiguous()
    assert argmax.min() >= 0 and argmax.max() < window
    assert torch.equal(y, values_at_argmax(x, argmax, irreps, kernel_size, stride))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_window_int32_argmax_matches_reference(layout):
    x = to_layout(torch.randn(2, IRREPS.dim, 7, 7, 8), layout)
    check_against_reference(x, IRREPS, (7, 7, 6), (1, 1, 2), RTOL[torch.float32])


def test_other_strides_are_supported():
    base = torch.randn(2, IRREPS.dim, 9, 6, 10)
    x = base[:, :, ::2, :, 1:]  # neither NCDHW- nor channels-last-contiguous
    check_against_reference(x, IRREPS, (2, 2, 3), (2, 2, 3), RTOL[torch.float32])


def test_expanded_grad_y():
    # y.sum().backward() hands the backward an expanded (stride 0) gradient.
    x = torch.randn(2, IRREPS.dim, 5, 4, 6, requires_grad=True)
    with e3fast.use_backend("cpu"):
        norm_max_pool3d(x, IRREPS, (3, 2, 3), (2, 2, 2)).sum().backward()
    _, expected = pool_and_grad("reference", x, IRREPS, (3, 2, 3), (2, 2, 2), torch.ones(2, IRREPS.dim, 2, 2, 2))
    assert_relative(x.grad, expected, RTOL[torch.float32], "grad x")


def test_channels_outside_every_field_get_zero():
    fields = field_table(IRREPS)[1:]  # drop the first scalar field (channel 0)
    x = torch.randn(1, IRREPS.dim, 4, 4, 4, requires_grad=True)
    y, argmax = torch.ops.e3fast.norm_max_pool3d(x, fields, [2, 2, 2], [2, 2, 2])
    assert torch.all(y[:, 0] == 0) and torch.all(y[:, 1:] != 0)
    grad_x = torch.ops.e3fast.norm_max_pool3d_backward(torch.ones_like(y), argmax, fields, [4, 4, 4], [2, 2, 2],
                                                       [2, 2, 2])
    assert torch.all(grad_x[:, 0] == 0) and grad_x[:, 1:].sum() == y[:, 1:].numel()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout):
    geometry = GEOMETRIES[2]
    x = to_layout(torch.randn(2, 9, 5, 4, 5, dtype=torch.float64), layout).requires_grad_()

    def native(x):
        return torch.ops.e3fast.norm_max_pool3d(*native_args(x, "1x0e+1x1o+1x2e", *geometry))[0]

    assert torch.autograd.gradcheck(native, (x,), fast_mode=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    kernel_size, stride = GEOMETRIES[1]
    x = to_layout(torch.randn(2, 9, 5, 4, 5), layout).requires_grad_()
    args = native_args(x, "1x0e+1x1o+1x2e", kernel_size, stride)
    torch.library.opcheck(torch.ops.e3fast.norm_max_pool3d.default, args)
    y, argmax = torch.ops.e3fast.norm_max_pool3d(*args)
    torch.library.opcheck(torch.ops.e3fast.norm_max_pool3d_backward.default,
                          (torch.randn_like(y), argmax, args[1], [5, 4, 5], list(kernel_size), list(stride)))


def test_rejects_bad_inputs():
    x = torch.randn(1, IRREPS.dim, 4, 4, 4)
    fields = field_table(IRREPS)
    pool = torch.ops.e3fast.norm_max_pool3d
    with pytest.raises(RuntimeError, match="int64"):
        pool(x, fields.int(), [2, 2, 2], [2, 2, 2])
    with pytest.raises(RuntimeError, match="does not fit"):
        pool(x[:, :-1], fields, [2, 2, 2], [2, 2, 2])
    with pytest.raises(RuntimeError, match="smaller than kernel_size"):
        pool(x, fields, [5, 2, 2], [2, 2, 2])
    with pytest.raises(RuntimeError, match="floating point"):
        pool(x.int(), fields, [2, 2, 2], [2, 2, 2])
    y, argmax = pool(x, fields, [2, 2, 2], [2, 2, 2])
    backward = torch.ops.e3fast.norm_max_pool3d_backward
    with pytest.raises(RuntimeError, match="argmax must have dtype"):
        backward(y, argmax.int(), fields, [4, 4, 4], [2, 2, 2], [2, 2, 2])
    with pytest.raises(RuntimeError, match="spatial size"):
        backward(y, argmax, fields, [6, 4, 4], [2, 2, 2], [2, 2, 2])
