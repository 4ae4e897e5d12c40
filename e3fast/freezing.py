"""Freezing a trained model for inference, and back.

:func:`freeze` assembles every e3fast kernel (steerable convolutions, per-voxel linear maps) once
into a plain ``conv3d`` weight (:class:`~e3fast.nn.assembled_kernel.AssembledKernelModule`) and
puts the model in eval mode; the fused norm + gate and pooling ops stay. The frozen model runs
under ``torch.export.export`` and ``torch.jit.trace``. Its parameters stay where they were, so
:func:`unfreeze` (or loading a state_dict, which re-assembles the frozen kernels) needs nothing
saved elsewhere. For an e3nn model, call :func:`e3fast.accelerate` first: e3nn's own modules are
not frozen.
"""
from __future__ import annotations

import torch

from e3fast.nn.assembled_kernel import AssembledKernelModule


def _kernel_modules(model: torch.nn.Module) -> list[AssembledKernelModule]:
    return [module for module in model.modules() if isinstance(module, AssembledKernelModule)]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with every e3fast kernel assembled once; returns the model.

    A frozen module refuses to run in training mode; call :func:`unfreeze` to train again.
    Freezing again re-assembles the kernels from the current weights.
    """
    model.eval()
    for module in _kernel_modules(model):
        module.freeze_kernel()
    return model


def unfreeze(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the frozen kernels (assembled from the weights at every call again) and put ``model``
    in training mode; returns the model."""
    for module in _kernel_modules(model):
        module.unfreeze_kernel()
    return model.train()


def is_frozen(model: torch.nn.Module) -> bool:
    """Whether ``model`` has e3fast kernels and all of them are frozen."""
    modules = _kernel_modules(model)
    return bool(modules) and all(module.is_frozen for module in modules)
