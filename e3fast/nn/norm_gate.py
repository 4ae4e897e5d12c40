"""Equivariant normalization and gated nonlinearity as modules on voxel tensors.

:class:`NormGate` is the fused layer (``e3nn.nn.BatchNorm`` then ``e3nn.nn.Gate`` in one op);
:class:`BatchNorm` and :class:`Gate` are its two halves for models that use them apart. All take
``[batch, irreps.dim, x, y, z]`` tensors (e3nn's modules want channels last, ``[..., irreps.dim]``).
"""
from __future__ import annotations

import torch

from e3fast.ops import NormGateSpec, norm_gate


class NormGate(torch.nn.Module):
    """Normalization (``'instance'``, ``'batch'`` or ``'none'``) fused with e3nn's gate.

    Input irreps are the gate's sorted input, ``self.irreps_in`` (scalars, gates and gated
    concatenated and sorted, as ``e3nn.nn.Gate.irreps_in``); output irreps ``self.irreps_out``.
    Parameters as ``e3nn.nn.BatchNorm(irreps_in)``: ``weight`` (one per irrep copy) and ``bias``
    (one per even scalar); ``running_mean`` / ``running_var`` buffers in batch mode.
    """

    def __init__(self, irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated,
                 normalization: str = "instance", eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, include_bias: bool = True, irrep_normalization: str = "component"):
        super().__init__()
        spec = NormGateSpec.for_gate(irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated,
                                     irrep_normalization)
        self._setup(spec, normalization, eps, momentum, affine, include_bias)

    def _setup(self, spec: NormGateSpec, normalization, eps, momentum, affine, include_bias) -> None:
        if normalization not in ("instance", "batch", "none"):
            raise ValueError(f"normalization must be 'instance', 'batch' or 'none', got {normalization!r}")
        self.spec = spec
        self.irreps_in, self.irreps_out = spec.irreps_in, spec.irreps_out
        self.normalization, self.eps, self.momentum = normalization, eps, momentum
        normalized = normalization != "none"
        self.affine = affine and normalized
        if self.affine:
            self.weight = torch.nn.Parameter(torch.ones(spec.num_fields))
            self.bias = torch.nn.Parameter(torch.zeros(spec.num_scalars)) if include_bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if normalization == "batch":
            self.register_buffer("running_mean", torch.zeros(spec.num_scalars))
            self.register_buffer("running_var", torch.ones(spec.num_fields))
        else:
            self.running_mean = self.running_var = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_gate(x, self.spec, self.weight, self.bias, self.running_mean, self.running_var,
                         normalization=self.normalization, training=self.training, momentum=self.momentum,
                         eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, normalization={self.normalization!r}, eps={self.eps}"


class BatchNorm(NormGate):
    """``e3nn.nn.BatchNorm(irreps, instance=...)`` on voxel tensors (normalization, no gate)."""

    def __init__(self, irreps, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 reduce: str = "mean", instance: bool = False, include_bias: bool = True,
                 normalization: str = "component"):
        torch.nn.Module.__init__(self)
        if reduce != "mean":
            raise ValueError(f"only reduce='mean' is fused, got {reduce!r}")
        spec = NormGateSpec.norm_only(irreps, normalization)
        self._setup(spec, "instance" if instance else "batch", eps, momentum, affine, include_bias)


class Gate(NormGate):
    """``e3nn.nn.Gate`` on voxel tensors (no normalization)."""

    def __init__(self, irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated):
        super().__init__(irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated, normalization="none")
