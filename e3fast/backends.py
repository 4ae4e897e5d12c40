"""Which implementation of the fused ops runs: backend names, selection and override.

Backends:

* ``"reference"`` -- pure PyTorch, any device, differentiated by autograd. The ground truth.
* ``"cpu"``       -- C++/OpenMP kernels of the extension ``e3fast._C`` (CPU tensors).
* ``"triton"``    -- Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``"cuda"``      -- CUDA C++ kernels of the extension (CUDA tensors).

By default each call picks the fastest backend available for its tensors' device. An explicit
choice (``use_backend`` / ``set_backend``) is honoured or refused with an error, never silently
replaced.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from e3fast import native_extension

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Automatic choice, fastest first, per device type.
_AUTOMATIC_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# Plain module globals (not a ContextVar) so torch.compile can read them and guard on their values:
# changing the backend recompiles. The choice is process wide, not per thread.
_override: str | None = None
_global_choice: str | None = None


def _triton_usable(device_type: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_kernels_present() -> bool:
    return importlib.util.find_spec("e3fast.triton_kernels") is not None


@torch.compiler.assume_constant_result
def backend_usable(name: str, device_type: str) -> bool:
    """Whether backend ``name`` can run on tensors of ``device_type`` in this process."""
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu" and native_extension.native_cpu_available()
    if name == "cuda":
        return device_type == "cuda" and native_extension.native_cuda_available()
    if name == "triton":
        return _triton_kernels_present() and _triton_usable(device_type)
    return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable here, for ``device`` if given, else for any device present."""
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS if any(backend_usable(name, d) for d in device_types)]


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown e3fast backend {name!r}; choose one of {', '.join(BACKENDS)}")


def set_backend(name: str | None) -> None:
    """Choose a backend for the whole process (``None`` returns to the automatic choice)."""
    global _global_choice
    if name is not None:
        _check_name(name)
    _global_choice = name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the fused ops inside the block on backend ``name`` (``None``: automatic)."""
    global _override
    if name is not None:
        _check_name(name)
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def requested_backend() -> str | None:
    """The explicit choice in force, if any (context manager first, then ``set_backend``)."""
    return _override if _override is not None else _global_choice


@torch.compiler.assume_constant_result
def _has_kernel(backend: str, op_name: str, device_type: str) -> bool:
    """Native backends: whether the extension registered ``e3fast::op_name`` for the device."""
    if backend not in ("cpu", "cuda") or not native_extension.native_cpu_available():
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"e3fast::{op_name}", device_type.upper())


def select_backend(device: torch.device, op_name: str, implemented: tuple[str, ...]) -> str:
    """The backend that runs ``op_name`` on ``device``.

    ``implemented`` lists the backends that have this op. An explicit request that cannot run
    here raises ``ValueError``; the automatic choice falls back to the next usable backend.
    """
    device_type = torch.device(device).type
    implemented = tuple(name for name in implemented if _has_kernel(name, op_name, device_type))
    choice = requested_backend()
    if choice is not None:
        if choice not in implemented:
            raise ValueError(f"e3fast backend {choice!r} has no implementation of {op_name}")
        if not backend_usable(choice, device_type):
            raise ValueError(
                f"e3fast backend {choice!r} cannot run {op_name} on {device_type} tensors here "
                f"(usable: {', '.join(available_backends(device_type))})"
            )
        return choice
    for name in _AUTOMATIC_ORDER.get(device_type, ("reference",)):
        if name in implemented and backend_usable(name, device_type):
            if name == "reference":
                native_extension.warn_once_if_missing()
            return name
    return "reference"
