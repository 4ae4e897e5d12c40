"""The fast GPU backends at the benchmark's sizes ([2, C, 128^3]), forward and backward, against the
reference computed in float64 on the same device.

Small shapes (the other test files) run one program or a few per reduction; at these sizes the
reductions span thousands of programs and the autotuner picks the launch configurations, as in
real use. The errors of the float32 reference are reported beside the backend's, so that a
failure says whether the backend or float32 itself is off. CUDA only: under Triton's interpreter
these sizes would take hours.
"""
from __future__ import annotations

import sys

import pytest
import torch
from e3nn import o3

import e3fast
from conftest import relative_error
from e3fast.ops import NormGateSpec, norm_gate, norm_max_pool3d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SIZE = 128
BATCH = 2
GATE_SPEC_ARGS = ("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")  # the GPU benchmark's
POOL_IRREPS = o3.Irreps("8x0e+4x1e+2x2e")
TOLERANCE = 1e-4  # max |a - e| / max |e| in float32
LAYOUTS = {"channels_first": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def fast_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in e3fast.available_backends(torch.device("cuda")) if b != "reference"]


def outputs_and_gradients(fn, inputs: list[torch.Tensor], grad_output: torch.Tensor, backend: str,
                          dtype: torch.dtype) -> list[torch.Tensor]:
    """The output and the gradients of every input, computed in ``dtype`` on ``backend``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    with e3fast.use_backend(backend):
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, grad_output.to(dtype))
    return [y.detach(), *grads]


def compare(fn, inputs, grad_output, backend, names):
    truth = outputs_and_gradients(fn, inputs, grad_output, "reference", torch.float64)
    fp32_reference = outputs_and_gradients(fn, inputs, grad_output, "reference", torch.float32)
    fast = outputs_and_gradients(fn, inputs, grad_output, backend, torch.float32)
    errors = {name: (relative_error(f.double(), t), relative_error(r.double(), t))
              for name, f, r, t in zip(names, fast, fp32_reference, truth)}
    report = ", ".join(f"{name}: {backend} {e:.1e} (float32 reference {r:.1e})" for name, (e, r) in errors.items())
    if any(e > TOLERANCE for e, _ in errors.values()):
        # at once, past pytest's capture: a GPU check that runs out of time never prints its summary
        print(f"\nFAILED {backend}: {report}", file=sys.__stderr__, flush=True)
    assert all(e <= TOLERANCE for e, _ in errors.values()), report


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalization", ["instance", "batch"])
@pytest.mark.parametrize("backend", fast_backends())
def test_norm_gate_at_benchmark_size(backend, normalization, layout):
    spec = NormGateSpec.for_gate(*GATE_SPEC_ARGS)
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, spec.channels_in.dim, SIZE, SIZE, SIZE, device="cuda", generator=generator)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    weight = torch.rand(spec.num_fields, device="cuda", generator=generator) + 0.5
    bias = torch.randn(spec.num_scalars, device="cuda", generator=generator)
    grad_y = torch.randn(BATCH, spec.irreps_out.dim, SIZE, SIZE, SIZE, device="cuda", generator=generator)
    grad_y = grad_y.contiguous(memory_format=LAYOUTS[layout])

    def fused(x, weight, bias):
        return norm_gate(x, spec, weight, bias, normalization=normalization)

    compare(fused, [x, weight, bias], grad_y, backend, ["y", "grad x", "grad weight", "grad bias"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", fast_backends())
def test_norm_max_pool_at_benchmark_size(backend, layout):
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(BATCH, POOL_IRREPS.dim, SIZE, SIZE, SIZE, device="cuda", generator=generator)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    grad_y = torch.randn(BATCH, POOL_IRREPS.dim, SIZE // 2, SIZE // 2, SIZE // 2, device="cuda", generator=generator)

    def pool(x):
        return norm_max_pool3d(x, POOL_IRREPS, 2)

    compare(pool, [x], grad_y.contiguous(memory_format=LAYOUTS[layout]), backend, ["y", "grad x"])
