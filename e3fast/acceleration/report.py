"""What :func:`e3fast.accelerate` did to a model: modules replaced, fused and left as they were."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Replaced:
    path: str  # the module's name in the model ('' for the model itself)
    original: str  # class names
    replacement: str
    detail: str = ""


@dataclass(frozen=True)
class Kept:
    path: str
    module: str
    reason: str


@dataclass
class AccelerationReport:
    """``replaced`` and ``kept`` modules by name; ``fused``: (norm, gate) pairs computed by one op;
    ``notes``: why norm and gate modules that could have been fused were not."""

    replaced: list[Replaced] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    fused: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def replaced_classes(self) -> Counter:
        """How many modules of each original class were replaced."""
        return Counter(entry.original for entry in self.replaced)

    def summary(self) -> str:
        classes = ", ".join(f"{count} {name}" for name, count in sorted(self.replaced_classes().items()))
        return (f"e3fast.accelerate: replaced {len(self.replaced)} modules ({classes or 'none'}), "
                f"fused {len(self.fused)} norm + gate pairs, kept {len(self.kept)} modules as they were")

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.replaced:
            lines.append("replaced:")
            lines += [f"  {_name(e.path)}: {e.original} -> {e.replacement}" + (f" ({e.detail})" if e.detail else "")
                      for e in self.replaced]
        if self.kept:
            lines.append("kept:")
            lines += [f"  {_name(e.path)}: {e.module}: {e.reason}" for e in self.kept]
        if self.notes:
            lines.append("notes:")
            lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _name(path: str) -> str:
    return path or "(the model)"
