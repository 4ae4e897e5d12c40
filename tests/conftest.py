"""Shared test configuration: seeds, tolerances and the list of backends to test."""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in triton's interpreter, which must be on
# before the first kernel is defined (e3fast defines them on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import e3fast  # noqa: E402,F401  (imported before the backends are queried)
from e3fast.backends import backend_usable  # noqa: E402

try:
    import hypothesis  # noqa: F401
except ImportError:  # the GPU machines lack it: its property-based tests skip, the others still run
    import hypothesis_fallback

    hypothesis_fallback.install()

# The fast backends that can run here, per device type. The reference backend is the ground truth.
# The interpreted Triton kernels are too slow for whole networks: on CPU they are tested by
# tests/test_triton_kernels.py alone, on TRITON_DEVICES.
FAST_BACKENDS = [name for name in ("cpu", "cuda") if backend_usable(name, "cpu")]
CUDA_FAST_BACKENDS = [name for name in ("cuda", "triton") if backend_usable(name, "cuda")]
TRITON_DEVICES = [device for device in ("cpu", "cuda") if backend_usable("triton", device)]

# Relative tolerances per dtype for comparisons against a float64 (or same-dtype) reference.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def pytest_report_header(config):
    if getattr(sys.modules.get("hypothesis"), "IS_FALLBACK", False):
        return "hypothesis: not installed, property-based tests are skipped (tests/hypothesis_fallback.py)"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|`` in float64 (0 when both are empty or zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_relative(actual, expected, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.1g}"


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parameter drawn from N(0, 1), also the affine weights and biases, which
    start at 1 / 0."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


def assert_outputs_and_gradients(model, reference, x, rtol: float, backend: str | None = None) -> None:
    """``model`` (run on ``backend``, if given) and ``reference`` give the same output on ``x``, and
    the same gradients of the input and of each parameter (by name) for one random output gradient."""
    x_ref = x.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    with e3fast.use_backend(backend) if backend is not None else contextlib.nullcontext():
        out = model(x)
    expected = reference(x_ref)
    assert_relative(out, expected, rtol, "output")
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_relative(x.grad, x_ref.grad, rtol, "input gradient")
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert_relative(parameter.grad, reference_parameters[name].grad, rtol, f"gradient of {name}")


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``"channels_first"`` (NCDHW contiguous) or ``"channels_last"`` (channels_last_3d)."""
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


LAYOUTS = ["channels_first", "channels_last"]
