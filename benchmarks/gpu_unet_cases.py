"""The whole-network cases: the paper's U-Net training step and inference, side by side.

Models, all with 4 input channels and 4 classes:

* ``e3fast-<backend>``: :class:`e3fast.models.EquivariantUNet` ("4x0e" -> "4x0e", diameter 5,
  5 radial basis functions, n=2, 3 poolings), one row per fast backend on the device (``cuda``,
  ``triton``); it runs channels_last_3d inside (its default);
* ``e3nn``: the same network composed from e3nn modules (:mod:`e3fast.testing.e3nn_reference`),
  with the same weights;
* ``plain`` and ``plain-compiled``: :class:`e3fast.models.PlainUNet` of equal width (30 top
  features, 5^3 kernels, InstanceNorm, LeakyReLU), eager and ``torch.compile``'d. The first call
  of a compiled model compiles it; that time is reported apart and not in the step time.

Precisions: ``fp32`` (TF32 cuDNN convolutions if the run enables them, torch's default;
contiguous input) and ``bf16``
(``torch.autocast`` to bfloat16, channels_last_3d input and plain model). A training step is
forward, cross-entropy against a fixed random label map, backward, an Adam step and releasing the
gradients. Before the timed steps, each e3fast model (and the e3nn model under autocast) is checked
against the e3nn model's float32 output on the same input (TF32 off for that check).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import e3fast
from e3fast.models import EquivariantUNet, PlainUNet
from e3fast.testing import e3nn_reference
from e3fast.testing.memory import module_state_tensors, tensor_bytes
from gpu_case import FUSED_OPS, Case, Settings, relative_error, unsupported_reason
from gpu_measure import time_calls

NUM_CLASSES = 4
UNET_CASE_TIMEOUT_SECONDS = 120  # group setup (model templates, the e3nn output) and timing; x3 compiled
PAPER_UNET = dict(input_irreps="4x0e", output_irreps=f"{NUM_CLASSES}x0e", diameter=5, num_radial_basis=5,
                  steps=(1, 1, 1), n=2, n_downsample=3)
PLAIN_UNET = dict(in_channels=4, out_channels=NUM_CLASSES, features=30, n_downsample=3, kernel_size=5)


@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None
    memory_format: torch.memory_format

    @property
    def memory_format_name(self) -> str:
        return "channels_last_3d" if self.memory_format == torch.channels_last_3d else "contiguous"


PRECISIONS = {"fp32": Precision(None, torch.contiguous_format),
              "bf16": Precision(torch.bfloat16, torch.channels_last_3d)}


@dataclass(frozen=True)
class UNetModel:
    name: str
    label: str
    impl: str  # "e3fast", "e3nn" or "plain"
    backend: str = "-"
    compiled: bool = False


@functools.lru_cache(maxsize=1)
def paper_equivariant_unet() -> EquivariantUNet:
    """The paper's U-Net on e3fast, on the CPU, seeded (a template: copy it before use)."""
    torch.manual_seed(0)
    return EquivariantUNet(**PAPER_UNET)


@functools.lru_cache(maxsize=1)
def e3nn_unet() -> torch.nn.Module:
    torch.manual_seed(1)
    return e3nn_reference.UNet(**PAPER_UNET)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for cuDNN's float32 convolutions inside the block (matmuls keep torch's default).

    The legacy flag sets cuDNN's convolutions and RNNs alike; setting only the convolutions
    through the new ``fp32_precision`` API leaves a mix that torch refuses to report on."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _backend_block(model: UNetModel):
    return e3fast.use_backend(model.backend) if model.impl == "e3fast" else contextlib.nullcontext()


def _autocast(settings: Settings, precision: Precision):
    return torch.autocast(settings.device.type, dtype=precision.autocast or torch.float32,
                          enabled=precision.autocast is not None)


class UNetGroupState:
    """The model templates (CPU, same weights for e3fast and e3nn), the input, the labels, and the
    e3nn model's float32 output (computed when first asked for)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.templates = {"e3nn": e3nn_unet()}
        self.templates["e3fast"] = copy.deepcopy(paper_equivariant_unet())
        self.templates["e3fast"].load_state_dict(self.templates["e3nn"].state_dict())
        torch.manual_seed(2)
        self.templates["plain"] = PlainUNet(**PLAIN_UNET)
        size, device = settings.unet_size, settings.device
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(settings.unet_batch, 4, size, size, size, generator=generator).to(device)
        self.labels = torch.randint(0, NUM_CLASSES, (settings.unet_batch, size, size, size),
                                    generator=generator).to(device)
        self._reference_output: torch.Tensor | None = None

    def input(self, precision: Precision) -> torch.Tensor:
        return self.x.contiguous(memory_format=precision.memory_format)

    def instance(self, model: UNetModel, precision: Precision) -> torch.nn.Module:
        """A fresh copy of the model on the device, in the precision's memory format."""
        module = copy.deepcopy(self.templates[model.impl]).to(self.settings.device)
        if model.impl == "plain":
            module = module.to(memory_format=precision.memory_format)
        return module

    def reference_output(self) -> torch.Tensor:
        if self._reference_output is None:
            model = self.instance(UNetModel("e3nn", "", "e3nn"), PRECISIONS["fp32"])
            with torch.no_grad(), tf32(False):
                self._reference_output = model(self.x).float()
        return self._reference_output


def output_error(state: UNetGroupState, module, model: UNetModel, precision: Precision) -> dict:
    """The model's output against the e3nn model's float32 output, before any training step."""
    try:
        expected = state.reference_output()
    except Exception as error:  # noqa: BLE001 -- e.g. out of memory: the comparison is then missing
        return {"rel_err_vs_e3nn": None, "rel_err_note": f"no e3nn output: {type(error).__name__}: {error}"[:300]}
    with torch.no_grad(), tf32(False), _backend_block(model), _autocast(state.settings, precision):
        actual = module(state.input(precision))
    return {"rel_err_vs_e3nn": relative_error(actual.float(), expected)}


def _needs_check(model: UNetModel, precision: Precision) -> bool:
    return model.impl == "e3fast" or (model.impl == "e3nn" and precision.autocast is not None)


def train_step(forward, optimizer, x, labels, settings: Settings, precision: Precision):
    def step():
        with _autocast(settings, precision):
            loss = F.cross_entropy(forward(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference(forward, x, settings: Settings, precision: Precision):
    def infer():
        with torch.inference_mode(), _autocast(settings, precision):
            forward(x)

    return infer


def _budget(settings: Settings, model: UNetModel):
    return settings.reference_unet_budget if model.impl == "e3nn" else settings.unet_budget


def measure_unet(state: UNetGroupState, model: UNetModel, precision_name: str, mode: str, deadline: float) -> dict:
    """Time training steps (``mode="train"``) or inference passes of one model."""
    settings, precision = state.settings, PRECISIONS[precision_name]
    module = state.instance(model, precision).train(mode == "train")
    record = {"status": "ok"}
    if _needs_check(model, precision):
        record.update(output_error(state, module, model, precision))
    forward = torch.compile(module, backend=settings.compile_backend) if model.compiled else module
    x = state.input(precision)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4) if mode == "train" else None
    call = (train_step(forward, optimizer, x, state.labels, settings, precision) if mode == "train"
            else inference(forward, x, settings, precision))
    with _backend_block(model), tf32(settings.tf32):
        timing = time_calls(call, settings.device, _budget(settings, model), deadline)
    record.update(timing.as_record())
    if model.compiled and timing.median_ms is not None:
        record["compile_ms"] = timing.first_call_ms - timing.median_ms
    record["resident_bytes"] = tensor_bytes([*module_state_tensors(module, optimizer), x, state.labels])
    if timing.peak_above_start_bytes is not None:
        record["peak_bytes"] = timing.peak_above_start_bytes + record["resident_bytes"]
    return record


def unet_models(backends: list[str]) -> list[UNetModel]:
    """e3fast on each fast backend (the reference backend where there is none), e3nn, plain."""
    fast = [b for b in backends if b != "reference"] or ["reference"]
    return ([UNetModel(f"e3fast-{b}", "e3fast EquivariantUNet", "e3fast", b) for b in fast]
            + [UNetModel("plain", "plain U-Net", "plain"), UNetModel("e3nn", "e3nn reference UNet", "e3nn"),
               UNetModel("plain-compiled", "plain U-Net, torch.compile", "plain", compiled=True)])


def _refusal(model: UNetModel, settings: Settings) -> str | None:
    if model.impl != "e3fast":
        return None
    return next((r for op in FUSED_OPS if (r := unsupported_reason(model.backend, op, settings.device))), None)


def _needs(model: UNetModel) -> frozenset[str]:
    if model.impl == "e3fast":
        return frozenset({f"{model.backend}:unet"} | {f"{model.backend}:{op}" for op in FUSED_OPS})
    return frozenset({f"{model.name}:unet"})


def unet_case(model: UNetModel, precision: str, mode: str, settings: Settings, setup, deadline_of) -> Case:
    section = f"unet-{mode}"
    refusal = _refusal(model, settings)
    params = {"model": model.name, "label": model.label, "impl": model.impl, "backend": model.backend,
              "compiled": model.compiled, "mode": mode, "precision": precision,
              "memory_format": PRECISIONS[precision].memory_format_name,
              "input": f"{settings.unet_batch}x4x{settings.unet_size}^3", "tf32": settings.tf32 and precision == "fp32",
              "compile_backend": settings.compile_backend if model.compiled else None}

    def run(state: UNetGroupState) -> dict:
        if refusal:
            return {"status": "unsupported", "reason": refusal}
        return measure_unet(state, model, precision, mode, deadline_of(section))

    minimum = settings.compile_min_seconds if model.compiled else settings.unet_min_seconds
    minimum *= 2 if model.impl == "e3nn" else 1  # the slowest eager model
    timeout = UNET_CASE_TIMEOUT_SECONDS * (3 if model.compiled else 1)
    return Case(id=f"{section}/{precision}/{model.name}", section=section, group="unet", setup=setup, run=run,
                params=params, needs=_needs(model), min_seconds=minimum, timeout_seconds=timeout)


def unet_cases(settings: Settings, backends: list[str], deadline_of) -> list[Case]:
    """In priority order: eager training steps (bf16, then fp32), the compiled plain model's bf16
    step, bf16 inference, the compiled fp32 step, fp32 inference, compiled inference."""
    models = unet_models(backends)
    eager = [m for m in models if not m.compiled]
    compiled = [m for m in models if m.compiled]
    order = ([(m, "bf16", "train") for m in eager] + [(m, "fp32", "train") for m in eager]
             + [(m, "bf16", "train") for m in compiled] + [(m, "bf16", "infer") for m in eager]
             + [(m, "fp32", "train") for m in compiled] + [(m, "fp32", "infer") for m in eager]
             + [(m, p, "infer") for m in compiled for p in ("bf16", "fp32")])
    setup = functools.partial(UNetGroupState, settings)
    return [unet_case(model, precision, mode, settings, setup, deadline_of) for model, precision, mode in order]
