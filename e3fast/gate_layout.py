"""The channel bookkeeping of e3nn's ``Gate``, flattened into a per-output-channel table.

e3nn's ``Gate(irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated)`` reads its
input in *sorted* irreps order (scalars, gates and gated concatenated, then ``Irreps.sort``) and
writes ``act(scalars)`` followed by ``gated * act(gates)`` in the order the arguments give.
Activations are rescaled to unit second moment (``e3nn.math.normalize2mom``).

Output channel ``c`` is ``act[c](x[source[c]]) * gate_act[c](x[gate[c]])`` where the second
factor is 1 when ``gate[c] == -1``. The fused ops read exactly this table.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.math import normalize2mom

from e3fast.irreps_layout import parse_irreps

# Activation ids understood by every backend. 0 is the identity (no activation).
ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
    "abs": torch.abs,
}
ACTIVATION_IDS = {name: index for index, name in enumerate(ACTIVATIONS)}

_CALLABLE_NAMES = {
    torch.relu: "relu",
    torch.nn.functional.relu: "relu",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    torch.nn.functional.silu: "silu",
    torch.abs: "abs",
}


def activation_name(act) -> str:
    """The registry name of an activation given as ``None``, a name, a function or a module."""
    if act is None:
        return "identity"
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)}")
        return act
    if isinstance(act, normalize2mom):
        return activation_name(act.f)
    module_names = {torch.nn.ReLU: "relu", torch.nn.Tanh: "tanh", torch.nn.Sigmoid: "sigmoid",
                    torch.nn.SiLU: "silu"}
    for cls, name in module_names.items():
        if isinstance(act, cls):
            return name
    try:
        return _CALLABLE_NAMES[act]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation {act!r} has no fused implementation; supported: {', '.join(ACTIVATIONS)}"
        ) from None


@functools.lru_cache(maxsize=None)
def activation_scale(name: str) -> float:
    """e3nn's second-moment normalization constant of an activation (1.0 when ~identity)."""
    if name == "identity":
        return 1.0
    normalized = normalize2mom(ACTIVATIONS[name])
    return 1.0 if normalized._is_id else float(normalized.cst)


def activation_scales() -> list[float]:
    """The normalization constant of every activation id, in id order."""
    return [activation_scale(name) for name in ACTIVATIONS]


# Parity of each activation: 1 even, -1 odd, 0 neither (e3nn's Activation finds it numerically).
ACTIVATION_PARITY = {"identity": -1, "relu": 0, "tanh": -1, "sigmoid": 0, "silu": 0, "abs": 1}


def _activated_irreps(irreps: o3.Irreps, acts, what: str) -> o3.Irreps:
    """Irreps after scalar activations, with e3nn's parity rule (odd input: the act's parity)."""
    out = []
    for (mul, ir), act in zip(irreps, acts):
        name = activation_name(act)
        parity = ir.p
        if ir.p == -1 and name != "identity":
            parity = ACTIVATION_PARITY[name]
            if parity == 0:
                raise ValueError(f"{what} {irreps}: activation {name!r} is neither even nor odd, so it "
                                 f"cannot act on the odd scalars {mul}x{ir}")
        out.append((mul, (0, parity)))
    return o3.Irreps(out)


def _channel_starts(irreps: o3.Irreps) -> list[int]:
    starts, start = [], 0
    for mul_ir in irreps:
        starts.append(start)
        start += mul_ir.dim
    return starts


@dataclass(frozen=True)
class GateLayout:
    """Channel tables of a gate; see the module docstring."""

    irreps_in: o3.Irreps
    irreps_out: o3.Irreps
    source: tuple[int, ...]
    act: tuple[int, ...]
    gate: tuple[int, ...]
    gate_act: tuple[int, ...]

    def table(self) -> torch.Tensor:
        """``int64 [irreps_out.dim, 4]``: source channel, act id, gate channel (-1), gate act id."""
        rows = list(zip(self.source, self.act, self.gate, self.gate_act))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 4)

    @property
    def is_identity(self) -> bool:
        return self.irreps_in == self.irreps_out and all(
            s == c and a == 0 and g == -1 for c, (s, a, g) in enumerate(zip(self.source, self.act, self.gate))
        )


def identity_layout(irreps) -> GateLayout:
    """A layout that passes every channel through unchanged (normalization without gate)."""
    irreps = parse_irreps(irreps)
    n = irreps.dim
    return GateLayout(irreps, irreps, tuple(range(n)), (0,) * n, (-1,) * n, (0,) * n)


def gate_layout(irreps_scalars, act_scalars, irreps_gates, act_gates, irreps_gated) -> GateLayout:
    """The channel tables of ``e3nn.nn.Gate`` with the same arguments."""
    irreps_scalars = parse_irreps(irreps_scalars, "irreps_scalars")
    irreps_gates = parse_irreps(irreps_gates, "irreps_gates")
    irreps_gated = parse_irreps(irreps_gated, "irreps_gated")
    if any(ir.l > 0 for _, ir in irreps_scalars):
        raise ValueError(f"irreps_scalars must be scalars, got {irreps_scalars}")
    if any(ir.l > 0 for _, ir in irreps_gates):
        raise ValueError(f"irreps_gates must be scalars, got {irreps_gates}")
    if irreps_gates.num_irreps != irreps_gated.num_irreps:
        raise ValueError(
            f"irreps_gated {irreps_gated} has {irreps_gated.num_irreps} irreps but irreps_gates "
            f"{irreps_gates} has {irreps_gates.num_irreps} gate scalars"
        )
    act_scalars, act_gates = list(act_scalars), list(act_gates)
    if len(act_scalars) != len(irreps_scalars) or len(act_gates) != len(irreps_gates):
        raise ValueError(
            f"one activation per irreps entry: {len(act_scalars)} for irreps_scalars {irreps_scalars}, "
            f"{len(act_gates)} for irreps_gates {irreps_gates}"
        )

    # Input order: e3nn's _Sortcut -- concatenate the simplified groups, then sort.
    groups = [irreps_scalars.simplify(), irreps_gates.simplify(), irreps_gated.simplify()]
    concatenated = sum(groups, o3.Irreps([]))
    sorted_irreps, permutation, _ = concatenated.sort()
    sorted_starts = _channel_starts(sorted_irreps)
    group_channels = []  # per group: input channel of each of its channels, in group order
    entry = 0
    for group in groups:
        channels = []
        for mul_ir in group:
            start = sorted_starts[permutation[entry]]
            channels.extend(range(start, start + mul_ir.dim))
            entry += 1
        group_channels.append(channels)
    scalar_channels, gate_channels, gated_channels = group_channels

    def per_channel_acts(irreps, acts):
        ids = []
        for (mul, _), act in zip(irreps, acts):
            ids.extend([ACTIVATION_IDS[activation_name(act)]] * mul)
        return ids

    scalar_acts = per_channel_acts(irreps_scalars, act_scalars)
    gate_acts = per_channel_acts(irreps_gates, act_gates)

    # Scalars first: act(x), no gate.
    source, act = list(scalar_channels), list(scalar_acts)
    gate, gate_act = [-1] * len(source), [0] * len(source)
    # Then every gated copy's components, multiplied by its own gate scalar.
    position = 0
    copy = 0
    for mul, ir in irreps_gated.simplify():
        for _ in range(mul):
            for _ in range(ir.dim):
                source.append(gated_channels[position])
                act.append(0)
                gate.append(gate_channels[copy])
                gate_act.append(gate_acts[copy])
                position += 1
            copy += 1

    scalars_out = _activated_irreps(irreps_scalars, act_scalars, "irreps_scalars")
    gates_out = _activated_irreps(irreps_gates, act_gates, "irreps_gates")
    return GateLayout(
        irreps_in=sorted_irreps.simplify(),
        irreps_out=scalars_out + _gated_irreps(irreps_gated, gates_out) if irreps_gates.dim > 0 else scalars_out,
        source=tuple(source),
        act=tuple(act),
        gate=tuple(gate),
        gate_act=tuple(gate_act),
    )


def _gated_irreps(irreps_gated: o3.Irreps, gates: o3.Irreps) -> o3.Irreps:
    """Output irreps of e3nn's ``ElementwiseTensorProduct(irreps_gated, gates)``: both simplified,
    entries split so that they pair copy by copy, each pair giving ``ir_gated * ir_gate``."""
    left, right = list(irreps_gated.simplify()), list(gates.simplify())
    out = []
    while left and right:
        (mul_a, ir_a), (mul_b, ir_b) = left[0], right[0]
        mul = min(mul_a, mul_b)
        out.append((mul, (ir_a.l, ir_a.p * ir_b.p)))
        left[0], right[0] = (mul_a - mul, ir_a), (mul_b - mul, ir_b)
        left, right = [e for e in left if e[0] > 0], [e for e in right if e[0] > 0]
    return o3.Irreps(out)
