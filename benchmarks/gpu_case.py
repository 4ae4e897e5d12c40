"""What a GPU benchmark case is, and the settings the cases are built from.

A :class:`Case` is one measurement (e.g. ``norm_gate`` forward, bf16, channels-last, on the Triton
backend). Cases of one ``group`` share an expensive setup (inputs, reference results, model
templates), made once when the group's first case runs and dropped when the next group starts.
``needs`` names what the case depends on (``"triton:norm_gate"``, ``"cuda:unet"``): after a
fatal device error, a crash or a hang in one case, the cases needing the same thing are skipped.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from e3fast import use_backend
from e3fast.backends import select_backend
from gpu_measure import Budget

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Settings:
    """Shapes, budgets and switches of one benchmark run."""

    device: torch.device
    op_batch: int
    op_size: int
    unet_batch: int
    unet_size: int
    op_budget: Budget
    unet_budget: Budget
    reference_unet_budget: Budget
    unet_min_seconds: float  # do not start an eager U-Net case with less time left
    compile_min_seconds: float  # nor a torch.compile'd one (its first call compiles)
    compile_backend: str
    tf32: bool
    cudnn_benchmark: bool

    @classmethod
    def full(cls, device: torch.device, compile_backend: str = "inductor", tf32: bool = True,
             cudnn_benchmark: bool = False) -> "Settings":
        """The GPU run: ops on [2, C, 128^3], the U-Net step at 2x4x128^3."""
        return cls(device=device, op_batch=2, op_size=128, unet_batch=2, unet_size=128,
                   op_budget=Budget(warmup=3, reps=20, seconds=3.0),
                   unet_budget=Budget(warmup=2, reps=5, seconds=15.0),
                   reference_unet_budget=Budget(warmup=1, reps=3, seconds=20.0),
                   unet_min_seconds=8.0, compile_min_seconds=75.0,
                   compile_backend=compile_backend, tf32=tf32, cudnn_benchmark=cudnn_benchmark)

    @classmethod
    def quick(cls, device: torch.device, compile_backend: str = "aot_eager", tf32: bool = True,
              cudnn_benchmark: bool = False) -> "Settings":
        """A smoke test of the script: tiny shapes, two repetitions."""
        return cls(device=device, op_batch=1, op_size=8, unet_batch=1, unet_size=16,
                   op_budget=Budget(warmup=1, reps=2, seconds=1.0),
                   unet_budget=Budget(warmup=1, reps=1, seconds=3.0),
                   reference_unet_budget=Budget(warmup=1, reps=1, seconds=3.0),
                   unet_min_seconds=1.0, compile_min_seconds=3.0,
                   compile_backend=compile_backend, tf32=tf32, cudnn_benchmark=cudnn_benchmark)

    def as_record(self) -> dict:
        return {"device": str(self.device), "op_shape": f"[{self.op_batch}, C, {self.op_size}^3]",
                "unet_input": f"{self.unet_batch}x4x{self.unet_size}^3", "op_budget": vars(self.op_budget),
                "unet_budget": vars(self.unet_budget), "reference_unet_budget": vars(self.reference_unet_budget),
                "unet_min_seconds": self.unet_min_seconds, "compile_min_seconds": self.compile_min_seconds,
                "compile_backend": self.compile_backend, "tf32": self.tf32, "cudnn_benchmark": self.cudnn_benchmark}


@dataclass
class Case:
    """One measurement. ``run(group_state)`` returns the fields of its record."""

    id: str
    section: str  # "ops", "unet-train" or "unet-infer"
    group: str
    setup: Callable[[], object]
    run: Callable[[object], dict]
    params: dict
    needs: frozenset[str] = field(default_factory=frozenset)
    min_seconds: float = 1.0  # do not start it with less time left in its section
    timeout_seconds: float = 60.0  # the supervisor kills a worker stuck in it longer (setup included)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|`` in float64 (tests/conftest.py's measure)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    return difference / scale if scale > 0 else difference


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max((relative_error(a, e) for a, e in zip(actual, expected)), default=0.0)



# e3fast's fused ops: op name -> the module of e3fast.ops that lists its backends (IMPLEMENTED).
FUSED_OPS = {"assemble_kernel": "kernel_assembly", "norm_gate": "norm_gate", "norm_max_pool3d": "norm_max_pool"}


def unsupported_reason(backend: str, op_name: str, device: torch.device) -> str | None:
    """Why e3fast would refuse ``backend`` for ``op_name`` on ``device`` (None: it would run it)."""
    implemented = importlib.import_module(f"e3fast.ops.{FUSED_OPS[op_name]}").IMPLEMENTED
    try:
        with use_backend(backend):
            select_backend(device, op_name, implemented)
    except ValueError as refusal:
        return str(refusal)
    return None
