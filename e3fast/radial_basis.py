"""Radial basis of the steerable kernels: e3nn's ``smooth_finite`` soft one-hot encoding.

For ``N`` basis functions on ``[0, r]`` the centres ``c_i`` are evenly spaced with step ``h`` and

.. math::  y_i(d) = 1.14136\\, e^{2}\\; u\\!\\left(\\tfrac{d - c_i}{h} + 1\\right) u\\!\\left(1 - \\tfrac{d - c_i}{h}\\right),
           \\qquad u(t) = \\theta(t)\\, e^{-1/t}

``cutoff`` places the centres as e3nn_Unet's ``soft_one_hot_linspace`` does: ``False`` -- ``N``
centres from 0 to ``r``; ``True`` -- ``N + 2`` points, ends dropped (every function vanishes at 0
and ``r``); ``"left"`` / ``"right"`` -- ``N + 1`` points, first / last dropped. ``True`` and
``False`` equal ``e3nn.math.soft_one_hot_linspace``.
"""
from __future__ import annotations

import torch
from e3nn.math import soft_unit_step

CUTOFF_MODES = (True, False, "left", "right")


def _centres(start: float, end: float, number: int, cutoff, like: torch.Tensor):
    extra = {False: 0, True: 2, "left": 1, "right": 1}[cutoff]
    values = torch.linspace(start, end, number + extra, dtype=like.dtype, device=like.device)
    step = values[1] - values[0]
    if cutoff is True:
        values = values[1:-1]
    elif cutoff == "left":
        values = values[1:]
    elif cutoff == "right":
        values = values[:-1]
    return values, step


def smooth_finite_embedding(distance: torch.Tensor, start: float, end: float, number: int, cutoff=True) -> torch.Tensor:
    """``[..., number]`` smooth finite radial basis of ``distance`` (see module docstring)."""
    if not any(cutoff is mode or (isinstance(mode, str) and cutoff == mode) for mode in CUTOFF_MODES):
        raise ValueError(f"cutoff must be one of True, False, 'left', 'right'; got {cutoff!r}")
    if number < 1:
        raise ValueError(f"num_radial_basis must be >= 1, got {number}")
    values, step = _centres(start, end, number, cutoff, distance)
    diff = (distance[..., None] - values) / step
    # The constant is computed as e3nn does (exp of a float32 2.0) so the bases agree bit for bit.
    return 1.14136 * torch.exp(torch.tensor(2.0)) * soft_unit_step(diff + 1) * soft_unit_step(1 - diff)
