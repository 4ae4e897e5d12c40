"""Networks built from plain, JSON-friendly dicts (what checkpoints store).

Two kinds, by ``model_config["model"]``:

* ``"equivariant"``: :class:`EquivariantUNet` with scalar inputs and outputs. Keys:
  ``in_channels``, ``num_classes``, ``steps`` (voxel spacing, x y z) and optionally every other
  argument of EquivariantUNet by its own name (``diameter``, ``num_radial_basis``, ``n``,
  ``n_downsample``, ``equivariance``, ``lmax``, ``scale``, ``scalar_upsampling``, ``batch_norm``,
  ``down_op``, ``dropout_prob``, ``cutoff``, ``channels_last``).
* ``"plain"``: :class:`PlainUNet`. Keys: ``in_channels``, ``num_classes`` and optionally
  ``features``, ``n_downsample``, ``kernel_size``.

:func:`equivariant_model_config` and :func:`plain_model_config` write complete dicts, with kernel
and pooling sizes given in voxels of the finest axis (the diameter and pooling scale in physical
units follow from the spacing).
"""
from __future__ import annotations

import torch

from e3fast.models.equivariant_unet import EquivariantUNet
from e3fast.models.plain_unet import PlainUNet

MODEL_KINDS = ("equivariant", "plain")
EQUIVARIANT_OPTIONS = ("diameter", "num_radial_basis", "batch_norm", "n", "n_downsample", "equivariance", "lmax",
                       "down_op", "scale", "is_bias", "scalar_upsampling", "dropout_prob", "cutoff",
                       "channels_last")
PLAIN_OPTIONS = ("features", "n_downsample", "kernel_size")


def equivariant_model_config(in_channels: int, num_classes: int, steps, width: int = 2, n_downsample: int = 3,
                             kernel_voxels: int = 5, num_radial_basis: int = 5, lmax: int = 2,
                             equivariance: str = "SO3", scalar_upsampling: bool = False,
                             channels_last: bool = True) -> dict:
    """The paper's U-Net for ``in_channels`` scalar channels and ``num_classes`` classes.

    ``width`` is EquivariantUNet's ``n`` (top level ``4n x0e + 2n x1e + n x2e``, the paper's 8:4:2
    ratio at n=2); the kernel spans ``kernel_voxels`` voxels along the finest axis and pooling
    halves the finest axes (e3nn_Unet's ``diameter`` and ``scale`` in the units of ``steps``).
    """
    steps = [float(step) for step in steps]
    finest = min(steps)
    return {"model": "equivariant", "in_channels": int(in_channels), "num_classes": int(num_classes),
            "steps": steps, "diameter": float(kernel_voxels) * finest, "scale": 2.0 * finest,
            "num_radial_basis": int(num_radial_basis), "n": int(width), "n_downsample": int(n_downsample),
            "equivariance": equivariance, "lmax": int(lmax), "scalar_upsampling": bool(scalar_upsampling),
            "channels_last": bool(channels_last)}


def plain_model_config(in_channels: int, num_classes: int, features: int = 30, n_downsample: int = 3,
                       kernel_size: int = 5) -> dict:
    """The plain nnU-Net-style baseline of equal width (30 features, 5^3 kernels by default)."""
    return {"model": "plain", "in_channels": int(in_channels), "num_classes": int(num_classes),
            "features": int(features), "n_downsample": int(n_downsample), "kernel_size": int(kernel_size)}


def build_model(model_config: dict) -> torch.nn.Module:
    """The network described by ``model_config`` (see the module docstring), freshly initialized."""
    if not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict, got {type(model_config).__name__}")
    kind = model_config.get("model")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model_config['model'] must be one of {MODEL_KINDS}, got {kind!r}")
    for key in ("in_channels", "num_classes"):
        if not isinstance(model_config.get(key), int) or model_config[key] < 1:
            raise ValueError(f"model_config[{key!r}] must be a positive int, got {model_config.get(key)!r}")
    allowed = {"model", "in_channels", "num_classes"} | set(
        EQUIVARIANT_OPTIONS + ("steps",) if kind == "equivariant" else PLAIN_OPTIONS)
    unknown = sorted(set(model_config) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} model_config keys {unknown}; allowed: {sorted(allowed)}")
    options = {key: value for key, value in model_config.items() if key not in ("model", "in_channels",
                                                                                  "num_classes", "steps")}
    if kind == "plain":
        return PlainUNet(model_config["in_channels"], model_config["num_classes"], **options)
    if "steps" not in model_config:
        raise ValueError("an equivariant model_config needs 'steps' (the voxel spacing along x, y, z)")
    options.setdefault("diameter", 5.0 * min(model_config["steps"]))
    options.setdefault("num_radial_basis", 5)
    return EquivariantUNet(f"{model_config['in_channels']}x0e", f"{model_config['num_classes']}x0e",
                           steps=tuple(model_config["steps"]), **options)
