"""e3fast's fused norm + gate, and dropout, called the way e3nn's modules are: on ``[batch, ..., irreps.dim]``.

e3nn's ``BatchNorm``, ``Gate`` and ``Dropout`` want the irreps on the last axis, so voxel models
such as e3nn_Unet's call them on ``x.transpose(1, 4)`` views of ``[batch, irreps.dim, x, y, z]``
tensors. The modules here take the same tensors, look at them as e3fast voxel tensors
(:func:`as_voxels`: for those transposed views, the original tensor itself, no copy) and give
their output back in e3nn's layout.
"""
from __future__ import annotations

from typing import Callable

import torch
from e3nn import o3

from e3fast.acceleration.recognition import Unsupported
from e3fast.e3nn_checkpoint import KeepsE3nnStateDict
from e3fast.nn import NormGate
from e3fast.ops import NormGateSpec


def _is_dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)


def as_voxels(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A ``[batch, channels, a, b, c]`` voxel view of an e3nn-layout tensor ``[batch, ..., channels]``,
    and the function that puts a voxel tensor computed from it back into e3nn's layout.

    The spatial axes may come out permuted (statistics and gates do not care); the returned
    function undoes exactly what was done.
    """
    if x.dim() < 2:
        raise ValueError(f"expected a tensor [batch, ..., irreps.dim], got shape {tuple(x.shape)}")
    if x.dim() == 5:
        undo_transpose = x.transpose(1, 4)  # the view e3nn_Unet made of a voxel tensor, undone
        if _is_dense(undo_transpose):
            return undo_transpose, lambda y: y.transpose(1, 4)
        channels_last = x.movedim(4, 1)
        return channels_last if _is_dense(channels_last) else channels_last.contiguous(), lambda y: y.movedim(1, 4)
    batch, channels, middle = x.shape[0], x.shape[-1], x.shape[1:-1]
    rows = x.reshape(batch, -1, channels)
    voxels = rows.transpose(1, 2)[:, :, :, None, None]
    return voxels, lambda y: y[:, :, :, 0, 0].transpose(1, 2).reshape(batch, *middle, y.shape[1])


class E3nnLayoutNormGate(KeepsE3nnStateDict, NormGate):
    """e3fast's fused normalization + gate in place of e3nn's ``BatchNorm``, ``Gate``, or a
    ``BatchNorm`` whose output goes to a ``Gate`` (then both in one op), on e3nn-layout tensors.

    Holds the e3nn ``BatchNorm``'s own ``weight``, ``bias`` and running statistics (the same
    tensors, so optimizers and in-place updates keep working on them).
    """

    def __init__(self, spec: NormGateSpec, norm: torch.nn.Module | None = None):
        torch.nn.Module.__init__(self)
        if norm is None:
            self._setup(spec, "none", 1e-5, 0.1, affine=False, include_bias=False)
            return
        self._setup(spec, "instance" if norm.instance else "batch", norm.eps, norm.momentum, norm.affine,
                    getattr(norm, "include_bias", True))
        self._share_state(norm)

    def _share_state(self, norm: torch.nn.Module) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            mine, theirs = getattr(self, name), getattr(norm, name, None)
            if mine is None:
                continue
            if theirs is None or theirs.shape != mine.shape:
                raise Unsupported(f"e3nn BatchNorm's {name} {None if theirs is None else list(theirs.shape)} "
                                 f"does not fit e3fast's {list(mine.shape)}")
            setattr(self, name, theirs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        voxels, to_e3nn_layout = as_voxels(x)
        return to_e3nn_layout(super().forward(voxels))


class GateComputedByNorm(KeepsE3nnStateDict, torch.nn.Module):
    """Stands where an e3nn ``Gate`` was whose gating the fused norm + gate module before it now does:
    passes its input through."""

    def __init__(self, gate: torch.nn.Module, computed_by: str):
        super().__init__()
        self.irreps_in, self.irreps_out = gate.irreps_in, gate.irreps_out
        self.computed_by = computed_by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, computed by {self.computed_by!r}"


class E3nnLayoutDropout(torch.nn.Module):
    """``e3nn.nn.Dropout(irreps, p)``: in training, each sample's irrep copies are kept with probability
    ``1 - p`` and scaled by ``1 / (1 - p)``, the same at every voxel.

    The random draws are e3nn's, one ``bernoulli_`` per irreps entry in order, so a seeded run gives
    the same masks; without anything to drop (``p = 0``, or eval mode) the input passes through,
    where e3nn multiplies it by ones.
    """

    def __init__(self, irreps, p: float):
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.p = p
        self.multiplicities = tuple(mul for mul, _ in self.irreps)
        dims = [ir.dim for mul, ir in self.irreps for _ in range(mul)]
        self.register_buffer("copy_of_channel", torch.repeat_interleave(
            torch.arange(len(dims)), torch.tensor(dims, dtype=torch.long)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        batch = x.shape[0]
        if self.p >= 1:
            keep = x.new_zeros(batch, sum(self.multiplicities))
        else:
            keep = torch.cat([x.new_empty(batch, mul).bernoulli_(1 - self.p) for mul in self.multiplicities], dim=1)
            keep = keep.div_(1 - self.p)
        mask = keep[:, self.copy_of_channel]
        return x * mask.reshape(batch, *([1] * (x.dim() - 2)), mask.shape[1])

    def extra_repr(self) -> str:
        return f"{self.irreps}, p={self.p}"
