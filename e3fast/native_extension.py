"""Loading of the compiled extension ``e3fast._C`` (C++ CPU and, when built, CUDA kernels).

Importing ``e3fast._C`` registers the ``torch.ops.e3fast.*`` operators. When it is missing (a
pure-Python install, or a build made for another torch), e3fast keeps working on the
pure-PyTorch reference backend and says so once.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

_LOAD_ERROR: str | None = None

try:
    from e3fast import _C  # noqa: F401  (registers torch.ops.e3fast)
except ImportError as error:  # pragma: no cover - depends on the install
    _LOAD_ERROR = "it was not built" if importlib.util.find_spec("e3fast._C") is None else str(error)

_WARNED = False


def native_cpu_available() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return _LOAD_ERROR is None


def native_cuda_available() -> bool:
    """True when the extension was built with the CUDA kernels and a GPU is visible."""
    if _LOAD_ERROR is not None or not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("e3fast::norm_gate", "CUDA")


def warn_once_if_missing() -> None:
    """Say once that the extension is missing and the reference backend is used."""
    global _WARNED
    if _LOAD_ERROR is not None and not _WARNED:
        _WARNED = True
        warnings.warn(
            f"e3fast: the compiled extension e3fast._C is not available ({_LOAD_ERROR}); using the pure-PyTorch reference backend. "
            "Reinstall with `pip install --no-build-isolation -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
