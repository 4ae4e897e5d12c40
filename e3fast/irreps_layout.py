"""How irreps lie along the channel axis of a voxel tensor ``[batch, irreps.dim, x, y, z]``.

Channel order is e3nn's: irreps entries one after another, each ``mul x (2l+1)`` channels with
the copy index outer and the ``m`` component inner (``channel = start + u * (2l+1) + m``).
A *field* is one irrep copy: the ``2l+1`` channels that rotate together. Norms, statistics,
gates and pooling act per field.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from e3nn import o3


def parse_irreps(irreps, name: str = "irreps") -> o3.Irreps:
    """``o3.Irreps(irreps)`` with an error that names the argument and the bad value."""
    if isinstance(irreps, o3.Irreps):
        return irreps
    if not isinstance(irreps, (str, o3.Irrep, list, tuple)):
        raise TypeError(f"{name} must be an irreps string, o3.Irreps or list, got {type(irreps).__name__}")
    try:
        return o3.Irreps(irreps)
    except (ValueError, TypeError, AssertionError) as error:
        raise ValueError(f"{name}={irreps!r} is not a valid irreps specification ({error})") from None


@dataclass(frozen=True)
class Field:
    """One irrep copy: channels ``[start, start + dim)``."""

    start: int
    dim: int
    is_scalar: bool  # e3nn's ``Irrep.is_scalar``: l == 0 and even parity
    scalar_index: int  # index among the scalar fields, -1 for the others


def irrep_fields(irreps: o3.Irreps) -> list[Field]:
    """The fields of ``irreps`` in channel order."""
    fields = []
    start = 0
    scalar_count = 0
    for mul, ir in irreps:
        for _ in range(mul):
            scalar_index = scalar_count if ir.is_scalar() else -1
            scalar_count += ir.is_scalar()
            fields.append(Field(start, ir.dim, ir.is_scalar(), scalar_index))
            start += ir.dim
    return fields


FIELD_COLUMNS = ("start", "dim", "scalar_index", "norm_divisor")


def field_table(irreps: o3.Irreps, irrep_normalization: str = "component") -> torch.Tensor:
    """``int64 [num_fields, 4]``: start channel, dim, scalar index (-1: none), norm divisor.

    The norm divisor turns a sum of squares over a field's components into e3nn's field norm:
    ``dim`` for ``"component"`` normalization (mean over components), 1 for ``"norm"``.
    """
    if irrep_normalization not in ("component", "norm"):
        raise ValueError(f"irrep_normalization must be 'component' or 'norm', got {irrep_normalization!r}")
    rows = [
        (f.start, f.dim, f.scalar_index, f.dim if irrep_normalization == "component" else 1)
        for f in irrep_fields(irreps)
    ]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(FIELD_COLUMNS))


@dataclass(frozen=True)
class IrrepsChannels:
    """What forward passes need to know about irreps, as plain Python values.

    ``e3nn.o3.Irreps`` objects are tuple subclasses that ``torch.compile`` cannot guard on, so
    modules keep one of these for use at run time.
    """

    text: str
    dim: int
    num_irreps: int
    entries: tuple[tuple[int, int, bool], ...]  # (multiplicity, 2l+1, is an even scalar) per entry

    def __str__(self) -> str:
        return self.text


def irreps_channels(irreps) -> IrrepsChannels:
    """The :class:`IrrepsChannels` of an irreps specification."""
    irreps = parse_irreps(irreps)
    return IrrepsChannels(str(irreps), irreps.dim, irreps.num_irreps,
                          tuple((mul, ir.dim, ir.is_scalar()) for mul, ir in irreps))


def check_voxel_input(x: torch.Tensor, irreps: IrrepsChannels, name: str = "input") -> None:
    """Raise a clear error unless ``x`` is a floating ``[batch, irreps.dim, x, y, z]`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(
            f"{name} must have 5 dimensions [batch, {irreps.dim} channels for irreps {irreps}, x, y, z], "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if x.shape[1] != irreps.dim:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but irreps {irreps} need {irreps.dim} (shape {tuple(x.shape)})"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when the given tensors are not all on one device."""
    present = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in present.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    """Raise ``TypeError`` when the given floating tensors do not share one dtype."""
    present = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} is {dtype}" for name, dtype in present.items())
        raise TypeError(f"tensors must share one dtype: {listing}")
