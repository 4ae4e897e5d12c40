"""Finding the norm -> gate chains in a module's forward, which one fused op can compute.

e3nn_Unet's ``ConvolutionBlock`` runs ``conv -> BatchNorm -> Gate -> Dropout``, the norm and the
gate on channels-last views: ``gate(norm(x.transpose(1, 4)).transpose(1, 4).transpose(1, 4))``.
When the norm's output goes nowhere but (through transposes that cancel) into the gate, the norm
module can compute ``gate(norm(x))`` itself and the gate module pass its input through, without
touching the parent's code. That is read from the parent's forward traced by ``torch.fx`` with
every child module a leaf: the parent's own code only, never the children's.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx

# Calls that leave a tensor's values where they are (as the gate sees them).
_VALUE_PRESERVING_METHODS = ("contiguous",)


class _ChildrenAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return True


def trace_own_code(parent: torch.nn.Module) -> torch.fx.Graph:
    """The graph of ``parent.forward`` with every submodule call a single node (may raise)."""
    return _ChildrenAsLeaves().trace(parent)


def norm_gate_chains(graph: torch.fx.Graph, norms: set[str], gates: set[str]) -> dict[str, str]:
    """``{norm child: gate child}`` for each norm whose output only feeds that gate.

    Both must be called exactly once in the forward, the chain between them may hold only
    transposes that cancel pairwise (and ``contiguous``), and every value on it only one user.
    """
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    chains = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in norms or calls[node.target] != 1:
            continue
        end = _follow_to_module(node)
        if end is not None and end.target in gates and calls[end.target] == 1:
            chains[node.target] = end.target
    return chains


def _follow_to_module(start: torch.fx.Node) -> torch.fx.Node | None:
    """The module call that ``start``'s value reaches through single-user, cancelling transposes."""
    node, pending = start, []
    while True:
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.op == "call_module":
            return user if not pending and user.args == (node,) and not user.kwargs else None
        swapped = _transposed_axes(user, node)
        if swapped is not None:
            if pending and pending[-1] == swapped:
                pending.pop()
            else:
                pending.append(swapped)
        elif not (user.op == "call_method" and user.target in _VALUE_PRESERVING_METHODS and user.args == (node,)):
            return None
        node = user


def _transposed_axes(user: torch.fx.Node, source: torch.fx.Node) -> frozenset | None:
    """The two axes ``user`` swaps when it is ``source.transpose(a, b)``, else None."""
    is_transpose = (user.op == "call_method" and user.target == "transpose") or (
        user.op == "call_function" and user.target is torch.transpose)
    if not is_transpose or user.kwargs or len(user.args) != 3 or user.args[0] is not source:
        return None
    axes = user.args[1:]
    return frozenset(axes) if all(isinstance(a, int) for a in axes) else None
