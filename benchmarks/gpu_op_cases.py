"""The fused-op cases: every e3fast backend, pass, dtype and memory format, torch's nearest plain op
beside them, each with the bytes an ideal implementation must move.

* ``norm_gate`` on ``[B, 36, S^3]`` (the top level's ``8x0e`` scalars, ``6x0e`` sigmoid gates,
  ``4x1e+2x2e`` gated; 30 output channels), instance mode, against torch's
  ``InstanceNorm3d(36, affine) + LeakyReLU`` on the same input;
* ``norm_max_pool3d`` on ``[B, 30, S^3]`` of ``8x0e+4x1e+2x2e``, window 2, against ``max_pool3d``;
* ``assemble_kernel`` of the paper U-Net's deepest convolution (the bottom block's second conv,
  ``64x0e+32x1e+16x2e -> 112x0e+32x1e+16x2e``, 5^3 taps), float32 only: under autocast the
  weights stay float32 and only the assembled kernel is cast.

Forward runs without autograd; forward+backward asks ``torch.autograd.grad`` for the gradients of
every input given a fixed random output gradient. Each e3fast backend's outputs (or gradients) are
compared with the ``reference`` backend's on the same inputs.

The bytes each op must move at least (its byte model, for the GB/s) are in :mod:`gpu_op_bytes`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from e3nn import o3

import e3fast
from e3fast.ops import NormGateSpec, assemble_kernel, norm_gate, norm_max_pool3d
from e3fast.testing.memory import tensor_bytes
from gpu_case import (DTYPES, MEMORY_FORMATS, PASSES, Case, Settings, max_relative_error, relative_error,
                      unsupported_reason)
from gpu_measure import time_calls
from gpu_op_bytes import assembly_bytes, normalization_bytes, plain_pooling_bytes, pooling_bytes
from gpu_unet_cases import paper_equivariant_unet

GATE_ARGS = ("8x0e", [torch.relu], "6x0e", [torch.sigmoid], "4x1e+2x2e")
POOL_IRREPS = o3.Irreps("8x0e+4x1e+2x2e")
POOL_KERNEL = (2, 2, 2)


@dataclass
class Variant:
    """One implementation of an op: ``fn(*inputs)`` on the group's input set ``inputs``."""

    label: str
    impl: str  # "e3fast" or "torch"
    backend: str  # the e3fast backend, "-" for torch
    inputs: str
    fn: Callable[..., torch.Tensor]
    bytes_moved: Callable[[str, tuple, torch.Tensor], int]


class OpGroupState:
    """Inputs, outputs and output gradients shared by the cases of one (op, dtype, memory format),
    and the reference backend's results, computed when first asked for."""

    def __init__(self, bench: "OpBench", inputs: dict[str, tuple[torch.Tensor, ...]]):
        self.inputs = inputs
        self.outputs: dict[str, torch.Tensor] = {}
        self.grad_outputs: dict[str, torch.Tensor] = {}
        self._reference_variant = next((v for v in bench.variants(["reference"]) if v.impl == "e3fast"), None)
        self._reference: dict[str, list[torch.Tensor]] = {}
        for variant in bench.variants(["reference"]):
            if variant.inputs not in self.outputs:
                with torch.no_grad():
                    self.outputs[variant.inputs] = _on_backend(variant.fn, variant.backend)(*inputs[variant.inputs])
                self.grad_outputs[variant.inputs] = torch.randn_like(self.outputs[variant.inputs])

    def reference(self, which: str) -> list[torch.Tensor]:
        """The reference backend's output (``fwd``) or input gradients (``fwd+bwd``)."""
        if which not in self._reference:
            variant = self._reference_variant
            run = pass_function(_on_backend(variant.fn, "reference"), self.inputs[variant.inputs],
                                self.grad_outputs[variant.inputs], which)
            self._reference[which] = [t.detach() for t in run()]
        return self._reference[which]


def _on_backend(fn, backend: str):
    if backend == "-":
        return fn

    def run(*args):
        with e3fast.use_backend(backend):
            return fn(*args)

    return run


def pass_function(fn, inputs: tuple, grad_output: torch.Tensor, which: str) -> Callable[[], list[torch.Tensor]]:
    """The timed call: the output without autograd, or the gradients of every input."""
    if which == "fwd":
        def forward():
            with torch.no_grad():
                return [fn(*inputs)]

        return forward

    def forward_backward():
        return list(torch.autograd.grad(fn(*inputs), inputs, grad_output))

    return forward_backward


def _volume(settings: Settings, channels: int, dtype: str, memory_format: str) -> torch.Tensor:
    size = settings.op_size
    x = torch.randn(settings.op_batch, channels, size, size, size, device=settings.device, dtype=DTYPES[dtype])
    return x.contiguous(memory_format=MEMORY_FORMATS[memory_format]).requires_grad_()


# ------------------------------------------------------------------------------------ byte models

def normalization_model(which: str, inputs: tuple, output: torch.Tensor) -> int:
    return normalization_bytes(which, inputs[0].nbytes, output.nbytes)


def pooling_model(fields: int, plain: bool = False) -> Callable[[str, tuple, torch.Tensor], int]:
    """``fields`` argmax bytes per output voxel and sample."""
    model = plain_pooling_bytes if plain else pooling_bytes

    def bytes_moved(which: str, inputs: tuple, output: torch.Tensor) -> int:
        argmax = output.shape[0] * fields * output.shape[2:].numel()
        return model(which, inputs[0].nbytes, output.nbytes, argmax)

    return bytes_moved


# ------------------------------------------------------------------------------------ the three ops

# (dtype, memory format) in the order they are measured: what training runs (bf16 autocast,
# channels-last), what the tests hold to 1e-5 (fp32, contiguous), then the other two.
CONFIGS = (("bf16", "channels_last_3d"), ("fp32", "contiguous"), ("fp32", "channels_last_3d"), ("bf16", "contiguous"))


class OpBench:
    """One fused op: its inputs, implementations and shapes. Subclasses fill in the details."""

    op: str
    configs: tuple[tuple[str, str], ...] = CONFIGS

    def title(self, settings: Settings) -> str:
        raise NotImplementedError

    def make_inputs(self, settings: Settings, dtype: str, memory_format: str) -> dict[str, tuple]:
        raise NotImplementedError

    def variants(self, backends: list[str]) -> list[Variant]:
        raise NotImplementedError


class NormGateBench(OpBench):
    op = "norm_gate"

    def __init__(self):
        self.spec = NormGateSpec.for_gate(*GATE_ARGS)

    def title(self, settings: Settings) -> str:
        return (f"norm_gate [{settings.op_batch},{self.spec.channels_in.dim},{settings.op_size}^3] "
                f"instance, 8x0e relu + 6x0e sigmoid gates + 4x1e+2x2e")

    def make_inputs(self, settings, dtype, memory_format):
        spec, device, channels = self.spec, settings.device, self.spec.channels_in.dim
        x = _volume(settings, channels, dtype, memory_format)
        e3fast_inputs = (x, (torch.rand(spec.num_fields, device=device) + 0.5).requires_grad_(),
                         torch.randn(spec.num_scalars, device=device, requires_grad=True))
        torch_inputs = (x, (torch.rand(channels, device=device) + 0.5).requires_grad_(),
                        torch.randn(channels, device=device, requires_grad=True))
        return {"e3fast": e3fast_inputs, "torch": torch_inputs}

    def variants(self, backends):
        spec = self.spec

        def fused(x, weight, bias):
            return norm_gate(x, spec, weight, bias)

        def plain(x, weight, bias):
            return F.leaky_relu(F.instance_norm(x, weight=weight, bias=bias), 0.01)

        return [Variant("e3fast norm_gate", "e3fast", b, "e3fast", fused, normalization_model) for b in backends] + [
            Variant("torch InstanceNorm3d + LeakyReLU", "torch", "-", "torch", plain, normalization_model)]


class NormMaxPoolBench(OpBench):
    op = "norm_max_pool3d"

    def title(self, settings: Settings) -> str:
        return f"norm_max_pool3d [{settings.op_batch},{POOL_IRREPS.dim},{settings.op_size}^3] {POOL_IRREPS} k2"

    def make_inputs(self, settings, dtype, memory_format):
        x = _volume(settings, POOL_IRREPS.dim, dtype, memory_format)
        return {"e3fast": (x,), "torch": (x,)}

    def variants(self, backends):
        def fused(x):
            return norm_max_pool3d(x, POOL_IRREPS, POOL_KERNEL)

        def plain(x):
            return F.max_pool3d(x, POOL_KERNEL)

        fused_model, plain_model = pooling_model(POOL_IRREPS.num_irreps), pooling_model(POOL_IRREPS.dim, plain=True)
        return [Variant("e3fast norm_max_pool3d", "e3fast", b, "e3fast", fused, fused_model) for b in backends] + [
            Variant("torch max_pool3d", "torch", "-", "torch", plain, plain_model)]


class AssembleKernelBench(OpBench):
    op = "assemble_kernel"
    configs = (("fp32", "-"),)

    def __init__(self):
        self._convolution = None

    def deepest_convolution(self, device: torch.device):
        """A copy of the paper U-Net's bottom block's second convolution, on ``device``."""
        if self._convolution is None:
            template = paper_equivariant_unet()  # shared with the U-Net cases: copy, do not move
            self._convolution = copy.deepcopy(template.down.down_blocks[-1].conv2)
        return self._convolution.to(device)

    def title(self, settings: Settings) -> str:
        return "assemble_kernel, paper U-Net's deepest conv (64x0e+32x1e+16x2e -> 112x0e+32x1e+16x2e, 5^3)"

    def make_inputs(self, settings, dtype, memory_format):
        convolution = self.deepest_convolution(settings.device)
        inputs = (convolution.weight.detach().clone().requires_grad_(),
                  convolution.sc.weight.detach().clone().requires_grad_())
        return {"e3fast": inputs}

    def variants(self, backends):
        def fused(radial_weight, sc_weight):
            return assemble_kernel(radial_weight, sc_weight, self._convolution.basis)

        def bytes_moved(which, inputs, output):
            weights = sum(t.nbytes for t in inputs)
            return assembly_bytes(which, self._convolution.basis.basis.nbytes, weights, output.nbytes)

        return [Variant("e3fast assemble_kernel", "e3fast", b, "e3fast", fused, bytes_moved) for b in backends]


# ------------------------------------------------------------------------------------ cases

def _group_setup(bench: OpBench, settings: Settings, dtype: str, memory_format: str) -> Callable[[], OpGroupState]:
    def setup() -> OpGroupState:
        torch.manual_seed(0)
        return OpGroupState(bench, bench.make_inputs(settings, dtype, memory_format))

    return setup


def measure_op(state: OpGroupState, variant: Variant, which: str, settings: Settings, peak_gbps: float | None,
               deadline: float) -> dict:
    """Time one variant and pass; its bandwidth from the byte model; its error against the reference."""
    inputs = state.inputs[variant.inputs]
    run = pass_function(_on_backend(variant.fn, variant.backend), inputs, state.grad_outputs[variant.inputs], which)
    timing = time_calls(run, settings.device, settings.op_budget, deadline)
    record = timing.as_record()
    held = list(inputs) + ([state.grad_outputs[variant.inputs]] if which != "fwd" else [])
    record["resident_bytes"] = tensor_bytes(held)
    if timing.peak_above_start_bytes is not None:
        record["peak_bytes"] = timing.peak_above_start_bytes + record["resident_bytes"]
    bytes_moved = variant.bytes_moved(which, inputs, state.outputs[variant.inputs])
    record["bytes_moved"] = bytes_moved
    if timing.median_ms:
        record["gbps"] = bytes_moved / (timing.median_ms * 1e-3) / 1e9
        if peak_gbps:
            record["pct_of_peak_bandwidth"] = 100 * record["gbps"] / peak_gbps
    if variant.impl == "e3fast" and variant.backend != "reference":
        actual, expected = run(), state.reference(which)
        record["max_rel_err_vs_reference"] = max_relative_error(actual, expected)
        record["rel_err_per_tensor"] = [relative_error(a, e) for a, e in zip(actual, expected)]
    return record


def _case_params(bench: OpBench, settings: Settings, variant: Variant, which: str, dtype: str,
                 memory_format: str) -> dict:
    return {"op": bench.op, "title": bench.title(settings), "pass": which, "dtype": dtype,
            "memory_format": memory_format, "impl": variant.impl, "label": variant.label, "backend": variant.backend}


def op_cases(settings: Settings, backends: list[str], peak_gbps: float | None, deadline_of) -> list[Case]:
    """All op cases, grouped by (op, dtype, memory format): the kernel assembly first (it is quick),
    then norm + gate and pooling config by config in :data:`CONFIGS` order, so that a run short of
    time has the most telling configurations of both. ``deadline_of(section)`` gives the
    ``time.monotonic()`` deadline a case must respect."""
    benches = [AssembleKernelBench(), NormGateBench(), NormMaxPoolBench()]
    priority = {config: rank for rank, config in enumerate(CONFIGS)}
    groups = sorted(((bench, dtype, memory_format) for bench in benches for dtype, memory_format in bench.configs),
                    key=lambda group: priority.get(group[1:], -1))
    cases = []
    for bench, dtype, memory_format in groups:
        group = f"ops/{bench.op}/{dtype}/{memory_format}"
        setup = _group_setup(bench, settings, dtype, memory_format)
        for variant in bench.variants(backends):
            for which in PASSES:
                cases.append(_op_case(bench, settings, variant, which, dtype, memory_format, group, setup,
                                      peak_gbps, deadline_of))
    return cases


def _op_case(bench, settings, variant, which, dtype, memory_format, group, setup, peak_gbps, deadline_of) -> Case:
    params = _case_params(bench, settings, variant, which, dtype, memory_format)
    case_id = f"ops/{bench.op}/{which}/{dtype}/{memory_format}/{variant.impl}-{variant.backend}"
    refusal = None
    if variant.impl == "e3fast":
        refusal = unsupported_reason(variant.backend, bench.op, settings.device)

    def run(state: OpGroupState) -> dict:
        if refusal:
            return {"status": "unsupported", "reason": refusal}
        return measure_op(state, variant, which, settings, peak_gbps, deadline_of("ops"))

    needs = frozenset({f"{variant.backend}:{bench.op}"}) if variant.impl == "e3fast" else frozenset()
    return Case(id=case_id, section="ops", group=group, setup=setup, run=run, params=params, needs=needs)
