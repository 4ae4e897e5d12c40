"""``e3fast.accelerate``: e3fast's modules in place of the e3nn voxel modules of any model."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable

import torch

from e3fast.acceleration import recognition as recognise
from e3fast.acceleration.convolution import AcceleratedConvolution
from e3fast.acceleration.e3nn_layout import E3nnLayoutDropout, E3nnLayoutNormGate, GateComputedByNorm
from e3fast.acceleration.fusion import norm_gate_chains, trace_own_code
from e3fast.acceleration.pooling import AcceleratedNormMaxPool3d
from e3fast.acceleration.recognition import Unsupported
from e3fast.acceleration.report import AccelerationReport, Kept, Replaced
from e3fast.acceleration.verification import check_same_outputs, convolution_example, pooling_example
from e3fast.e3nn_checkpoint import KeepsE3nnStateDict


def accelerate(model: torch.nn.Module, *, inplace: bool = True,
               verify: bool = True) -> tuple[torch.nn.Module, AccelerationReport]:
    """Replace the e3nn voxel modules of ``model`` by e3fast's; returns ``(model, report)``.

    Replaced, wherever they are in the module tree:

    * steerable voxel convolutions -- e3nn's v2103 and v2104 ``Convolution`` and modules built like
      e3nn_Unet's ``Convolution`` / ``ConvolutionVoxel`` -- by :class:`AcceleratedConvolution`
      (one kernel-assembly op, self-connection in the centre tap, one ``conv3d``);
    * ``e3nn.nn.BatchNorm`` and ``e3nn.nn.Gate`` by e3fast's fused norm + gate op on the same
      channels-last tensors; where the parent's forward sends a norm's output straight into a gate
      (e3nn_Unet's ``ConvolutionBlock``), both are computed by one op in the norm's place;
    * ``e3nn.nn.Dropout`` (a pass-through when ``p = 0``, where e3nn multiplies by ones);
    * e3nn_Unet-style norm max pooling (``DynamicPool3d``, ``mode='maxpool3d'``), now correct per
      sample for batch > 1.

    The replacements hold the originals' parameters and running statistics themselves (same
    tensor objects: optimizers made before the swap keep working) and take the same inputs; their
    ``state_dict`` has the same keys and values as before, so checkpoints load both ways. Outputs
    and gradients equal the originals' up to float rounding, except for the pooling fix.

    Modules recognised by structure rather than class are replaced only after the replacement gave
    their output on a random input (``verify=False`` skips that check). Everything else -- unknown
    modules, and recognised ones e3fast cannot reproduce -- is left as it was and named in the
    report with the reason. With ``inplace=False`` a deep copy is accelerated and the original model
    is untouched (the copy has its own parameters); models that ``copy.deepcopy`` cannot copy (e3nn's
    v2104 ``Convolution``, whose tensor product is built with ``compile_left_right=False``) raise a
    ``TypeError`` then. Use the returned model: it is a new object
    when ``model`` itself was replaced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"accelerate takes a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _deep_copy(model)
    swapper = _Swapper(model, verify)
    return swapper.visit(model, ""), swapper.report


def _deep_copy(model: torch.nn.Module) -> torch.nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:  # e.g. e3nn's v2104 Convolution: its tensor product cannot be unpickled
        raise TypeError(f"accelerate(inplace=False) needs a deep copy of the {type(model).__name__}, which failed "
                        f"({type(error).__name__}: {error}); accelerate it in place instead") from error


def _child_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


# e3fast's own modules (e3fast.testing holds e3nn compositions, which are to be accelerated).
E3FAST_MODULE_PACKAGES = ("e3fast.nn", "e3fast.models", "e3fast.acceleration", "e3fast.steerable_basis")


def _is_e3fast_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith(E3FAST_MODULE_PACKAGES)


def _is_e3nn_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "e3nn"


class _Swapper:
    """One walk over a model's module tree, replacing what it recognises and reporting everything."""

    def __init__(self, model: torch.nn.Module, verify: bool):
        self.verify = verify
        self.device = _device_of(model)
        self.report = AccelerationReport()
        self.uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
        self.visited: dict[int, torch.nn.Module] = {}  # a module met twice gets the same replacement
        self.rules: list[tuple[Callable, Callable]] = [
            (recognise.is_voxel_convolution, self._convolution),
            (recognise.is_e3nn_batchnorm, self._batchnorm),
            (recognise.is_e3nn_gate, self._gate),
            (recognise.is_e3nn_dropout, self._dropout),
            (recognise.is_norm_pooling, self._pooling),
        ]

    def visit(self, module: torch.nn.Module, path: str) -> torch.nn.Module:
        if id(module) not in self.visited:
            self.visited[id(module)] = self._replacement_or_same(module, path)
        return self.visited[id(module)]

    def _replacement_or_same(self, module: torch.nn.Module, path: str) -> torch.nn.Module:
        name = type(module).__name__
        for matches, build in self.rules:
            if matches(module):
                return self._replace(module, path, build)
        if _is_e3fast_module(module):
            self.report.kept.append(Kept(path, name, "already an e3fast module"))
        elif _is_e3nn_module(module):
            self.report.kept.append(Kept(path, name, "e3fast has no replacement for this e3nn module"))
        elif module._modules:
            self._visit_children(module, path)
        else:
            self.report.kept.append(Kept(path, name, "not an e3nn voxel module"))
        return module

    def _replace(self, module: torch.nn.Module, path: str, build: Callable) -> torch.nn.Module:
        try:
            replacement, detail = build(module)
        except Unsupported as reason:
            self.report.kept.append(Kept(path, type(module).__name__, str(reason)))
            return module
        self._adopt(module, replacement, path, detail)
        return replacement

    def _adopt(self, original: torch.nn.Module, replacement: torch.nn.Module, path: str, detail: str) -> None:
        """Give ``replacement`` the original's mode (and e3nn constants) and report the swap."""
        replacement.train(original.training)
        if isinstance(replacement, KeepsE3nnStateDict):
            replacement.keep_e3nn_constants(original)
        self.report.replaced.append(Replaced(path, type(original).__name__, type(replacement).__name__, detail))

    def _visit_children(self, parent: torch.nn.Module, path: str) -> None:
        fused = self._fuse_norms_and_gates(parent, path)
        for name, child in list(parent.named_children()):
            if name not in fused:
                replacement = self.visit(child, _child_path(path, name))
                if replacement is not child:
                    setattr(parent, name, replacement)

    # ---------------------------------------------------------------- builders: (replacement, detail)

    def _convolution(self, conv):
        recipe = recognise.convolution_recipe(conv)
        replacement = AcceleratedConvolution(conv, recipe)
        if self.verify and not recipe.forward_known:
            check_same_outputs(conv, replacement, convolution_example(conv))
            return replacement, f"{recipe.units}, checked on a test input"
        return replacement, recipe.units

    def _batchnorm(self, norm):
        return E3nnLayoutNormGate(recognise.batchnorm_spec(norm), norm), "not fused"

    def _gate(self, gate):
        return E3nnLayoutNormGate(recognise.gate_spec(gate)).to(self.device), "not fused"

    def _dropout(self, dropout):
        return E3nnLayoutDropout(dropout.irreps, dropout.p).to(self.device), f"p={dropout.p}"

    def _pooling(self, pool):
        recognise.check_norm_pooling(pool)
        replacement = AcceleratedNormMaxPool3d(pool)
        if self.verify:
            check_same_outputs(pool, replacement, pooling_example(pool, replacement.channels.dim))
        return replacement.to(self.device), "per sample"

    # ---------------------------------------------------------------- fusion

    def _fuse_norms_and_gates(self, parent: torch.nn.Module, path: str) -> set[str]:
        """Replace the (norm, gate) children whose chain ``parent.forward`` runs by one fused op;
        returns their names."""
        children = dict(parent.named_children())
        norms = {name for name, child in children.items() if recognise.is_e3nn_batchnorm(child)}
        gates = {name for name, child in children.items() if recognise.is_e3nn_gate(child)}
        if not norms or not gates:
            return set()
        try:
            graph = trace_own_code(parent)
        except Exception as error:  # any failure to trace only means no fusion
            self.report.notes.append(f"{path or '(the model)'}: norms and gates not fused, its forward could not "
                                     f"be traced by torch.fx ({type(error).__name__}: {error})")
            return set()
        fused = set()
        for norm_name, gate_name in norm_gate_chains(graph, norms, gates).items():
            if self._fuse(parent, path, norm_name, gate_name):
                fused |= {norm_name, gate_name}
        return fused

    def _fuse(self, parent: torch.nn.Module, path: str, norm_name: str, gate_name: str) -> bool:
        norm, gate = parent._modules[norm_name], parent._modules[gate_name]
        norm_path, gate_path = _child_path(path, norm_name), _child_path(path, gate_name)
        if self.uses[id(norm)] > 1 or self.uses[id(gate)] > 1:
            self.report.notes.append(f"{norm_path} + {gate_path} not fused: used elsewhere in the model too")
            return False
        try:
            fused = E3nnLayoutNormGate(recognise.norm_gate_spec(norm, gate), norm)
        except Unsupported as reason:
            self.report.notes.append(f"{norm_path} + {gate_path} not fused: {reason}")
            return False
        passthrough = GateComputedByNorm(gate, norm_name)
        for name, original, replacement, detail in ((norm_name, norm, fused, f"fused with {gate_name}"),
                                                     (gate_name, gate, passthrough, f"computed by {norm_name}")):
            self._adopt(original, replacement, _child_path(path, name), detail)
            setattr(parent, name, replacement)
            self.visited[id(original)] = replacement
        self.report.fused.append((norm_path, gate_path))
        return True
