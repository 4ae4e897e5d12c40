"""Which modules of a model e3fast can stand in for, and with what settings.

Two kinds of recognition:

* by class, for e3nn's own modules whose forward is known: ``e3nn.nn.BatchNorm``, ``Gate``,
  ``Dropout`` and the voxel convolutions of ``e3nn.nn.models.v2103`` / ``v2104`` (a subclass
  that overrides ``forward`` does not count as the class);
* by structure, for modules written like SCAN-NRAD/e3nn_Unet's (not on PyPI, so not importable):
  a steerable voxel convolution has ``sc`` (``o3.Linear``), ``tp`` (the tensor product),
  ``weight``, the buffers ``emb`` and ``sh`` and the conv3d options ``kwargs``, plus either a
  ``lattice`` buffer (physical units: e3nn_Unet's ``Convolution``, e3nn's v2104) or a ``size``
  (voxel units: e3nn_Unet's ``ConvolutionVoxel``, e3nn's v2103); a norm pooling module has
  ``mode``, ``kernel_size`` and ``irreps`` and no state (e3nn_Unet's ``DynamicPool3d``). Those
  are checked on their own outputs before they are replaced (:mod:`e3fast.acceleration.verification`).

A recognised module that e3fast cannot reproduce raises :class:`Unsupported` with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.nn import BatchNorm, Dropout, Gate
from e3nn.nn.models.v2103 import voxel_convolution as v2103
from e3nn.nn.models.v2104 import voxel_convolution as v2104

from e3fast.gate_layout import activation_name
from e3fast.ops import NormGateSpec
from e3fast.steerable_basis import kernel_tensor_product, self_connection_linear


class Unsupported(Exception):
    """A recognised module that e3fast leaves as it is; the message says why."""


def _runs_forward_of(module: torch.nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


# ---------------------------------------------------------------- convolutions

E3NN_CONVOLUTIONS = (v2103.Convolution, v2104.Convolution)
CONVOLUTION_ATTRIBUTES = ("sc", "tp", "weight", "emb", "sh", "kwargs", "irreps_in", "irreps_out", "irreps_sh")
PHYSICAL_UNITS, VOXEL_UNITS = "physical units", "voxel units"


@dataclass(frozen=True)
class ConvolutionRecipe:
    """How an e3nn voxel convolution builds its kernel, in e3fast's terms.

    Physical units: ``tp.right(sh, emb @ weight / taps)``; voxel units (v2103, ``ConvolutionVoxel``):
    ``0.1 * tp.right(sh, emb @ weight / size**1.5)``, i.e. ``conv_scale = 0.1 * taps / size**1.5``
    (the self-connection is not scaled in either).
    """

    units: str
    conv_scale: float
    padding: tuple[int, int, int]
    forward_known: bool  # an e3nn class: no need to check it on its outputs


def is_voxel_convolution(module: torch.nn.Module) -> bool:
    if not all(hasattr(module, name) for name in CONVOLUTION_ATTRIBUTES):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if "emb" not in buffers or "sh" not in buffers or not isinstance(module.weight, torch.nn.Parameter):
        return False
    return ("lattice" in buffers) != hasattr(module, "size")


def convolution_recipe(conv: torch.nn.Module) -> ConvolutionRecipe:
    irreps_in, irreps_out, irreps_sh = (o3.Irreps(conv.irreps_in), o3.Irreps(conv.irreps_out),
                                        o3.Irreps(conv.irreps_sh))
    kernel_size = tuple(conv.sh.shape[:3])
    taps = math.prod(kernel_size)
    _check_self_connection(conv.sc, irreps_in, irreps_out)
    _check_tensor_product(conv.tp, irreps_in, irreps_sh, irreps_out)
    if conv.sh.dim() != 4 or conv.sh.shape[-1] != irreps_sh.dim:
        raise Unsupported(f"its sh buffer has shape {list(conv.sh.shape)}, not [kx, ky, kz, {irreps_sh.dim}]")
    if any(k % 2 == 0 for k in kernel_size):
        raise Unsupported(f"its kernel size {kernel_size} is even: no centre tap for the self-connection")
    if conv.weight.dim() != 2 or conv.weight.shape[1] != conv.tp.weight_numel:
        raise Unsupported(f"its weight has shape {list(conv.weight.shape)}, not [R, {conv.tp.weight_numel}]")
    if tuple(conv.emb.shape) != (*kernel_size, conv.weight.shape[0]):
        raise Unsupported(f"its emb buffer has shape {list(conv.emb.shape)}, not {[*kernel_size, conv.weight.shape[0]]}")
    padding = _centred_padding(conv.kwargs, kernel_size)
    if hasattr(conv, "size"):
        units, conv_scale = VOXEL_UNITS, 0.1 * taps / conv.size ** 1.5
    else:
        if tuple(conv.lattice.shape[:3]) != kernel_size:
            raise Unsupported(f"its lattice {list(conv.lattice.shape)} and sh {list(conv.sh.shape)} disagree")
        units, conv_scale = PHYSICAL_UNITS, 1.0
    return ConvolutionRecipe(units, conv_scale, padding, forward_known=_is_e3nn_convolution(conv))


def _is_e3nn_convolution(conv: torch.nn.Module) -> bool:
    """An e3nn voxel convolution whose forward (and kernel method) are e3nn's own."""
    return any(_runs_forward_of(conv, cls) and getattr(type(conv), "kernel", None) is getattr(cls, "kernel", None)
               for cls in E3NN_CONVOLUTIONS)


def _check_self_connection(sc, irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> None:
    if not isinstance(sc, o3.Linear) or sc.irreps_in != irreps_in or sc.irreps_out != irreps_out:
        raise Unsupported(f"its self-connection sc is not o3.Linear({irreps_in}, {irreps_out})")
    if sc.bias_numel != 0 or not sc.internal_weights:
        raise Unsupported("its self-connection sc has biases or external weights")
    if list(sc.instructions) != list(self_connection_linear(irreps_in, irreps_out).instructions):
        raise Unsupported("its self-connection sc has other paths or normalization than o3.Linear's defaults")


def _check_tensor_product(tp, irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_out: o3.Irreps) -> None:
    if not isinstance(tp, o3.TensorProduct) or (tp.irreps_in1, tp.irreps_in2, tp.irreps_out) != (
            irreps_in, irreps_sh, irreps_out):
        raise Unsupported(f"its tp is not a tensor product {irreps_in} x {irreps_sh} -> {irreps_out}")
    if list(tp.instructions) != list(kernel_tensor_product(irreps_in, irreps_sh, irreps_out).instructions):
        raise Unsupported("its tp has other paths or normalization than FullyConnectedTensorProduct's defaults")


def _centred_padding(kwargs: dict, kernel_size: tuple[int, ...]) -> tuple[int, int, int]:
    """The conv3d padding, when the options keep the output on the input's grid (the self-connection
    is added voxel by voxel); else :class:`Unsupported`."""
    centred = tuple(k // 2 for k in kernel_size)
    options = dict(kwargs)
    padding = options.pop("padding", 0)
    for name in ("stride", "dilation"):
        if _triple(options.pop(name, 1)) != (1, 1, 1):
            raise Unsupported(f"its conv3d option {name}={kwargs[name]!r} is not 1")
    if options.pop("groups", 1) != 1 or options:
        raise Unsupported(f"its conv3d options {kwargs!r} are not supported (padding only)")
    if padding != "same" and _triple(padding) != centred:
        raise Unsupported(f"its conv3d padding {padding!r} does not centre the {kernel_size} kernel")
    return centred


def _triple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


# ---------------------------------------------------------------- normalization, gate, dropout


def is_e3nn_batchnorm(module: torch.nn.Module) -> bool:
    return _runs_forward_of(module, BatchNorm)


def is_e3nn_gate(module: torch.nn.Module) -> bool:
    return _runs_forward_of(module, Gate)


def is_e3nn_dropout(module: torch.nn.Module) -> bool:
    return _runs_forward_of(module, Dropout)


def batchnorm_spec(norm: BatchNorm) -> NormGateSpec:
    """The spec of e3fast's norm op for an e3nn ``BatchNorm`` alone."""
    _check_batchnorm(norm)
    return NormGateSpec.norm_only(norm.irreps, norm.normalization)


def gate_spec(gate: Gate, irrep_normalization: str = "component") -> NormGateSpec:
    """The spec of e3fast's fused op for an e3nn ``Gate`` (after a norm of that ``irrep_normalization``)."""
    acts_scalars, acts_gates = list(gate.act_scalars.acts), list(gate.act_gates.acts)
    for act in acts_scalars + acts_gates:
        try:
            activation_name(act)
        except ValueError as error:
            raise Unsupported(str(error)) from None
    spec = NormGateSpec.for_gate(gate.act_scalars.irreps_in, acts_scalars, gate.act_gates.irreps_in, acts_gates,
                                 gate.irreps_gated, irrep_normalization)
    if spec.irreps_in != gate.irreps_in or spec.irreps_out != gate.irreps_out:
        raise Unsupported(f"e3fast's gate layout gives {spec.irreps_in} -> {spec.irreps_out}, e3nn's Gate "
                          f"{gate.irreps_in} -> {gate.irreps_out}")
    return spec


def norm_gate_spec(norm: BatchNorm, gate: Gate) -> NormGateSpec:
    """The spec of e3fast's fused op for an e3nn ``BatchNorm`` followed by a ``Gate``."""
    _check_batchnorm(norm)
    if o3.Irreps(norm.irreps).simplify() != gate.irreps_in.simplify():
        raise Unsupported(f"the norm's irreps {norm.irreps} are not the gate's input {gate.irreps_in}")
    return gate_spec(gate, norm.normalization)


def _check_batchnorm(norm: BatchNorm) -> None:
    if norm.reduce != "mean":
        raise Unsupported(f"reduce={norm.reduce!r}: e3fast's fused norm reduces by the mean only")


# ---------------------------------------------------------------- pooling

POOLING_ATTRIBUTES = ("mode", "kernel_size", "irreps")


def is_norm_pooling(module: torch.nn.Module) -> bool:
    """Structured like e3nn_Unet's ``DynamicPool3d``: ``mode``, ``kernel_size``, ``irreps``, no state."""
    has_state = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
    return all(hasattr(module, name) for name in POOLING_ATTRIBUTES) and not has_state and not module._modules


def check_norm_pooling(pool: torch.nn.Module) -> None:
    if pool.mode != "maxpool3d":
        raise Unsupported(f"mode={pool.mode!r}: only 'maxpool3d' (norm max pooling) is replaced; "
                          "average pooling is a plain torch op already")
    kernel_size = _triple(pool.kernel_size)
    if len(kernel_size) != 3 or not all(isinstance(k, int) and k >= 1 for k in kernel_size):
        raise Unsupported(f"kernel_size {pool.kernel_size!r} is not 3 positive ints")
    try:
        o3.Irreps(pool.irreps)
    except (ValueError, TypeError, AssertionError):
        raise Unsupported(f"irreps {pool.irreps!r} are not irreps") from None
