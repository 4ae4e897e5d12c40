"""Turn a pytest-benchmark JSON of the e3fast benchmarks into a markdown table.

Usage::

    python benchmarks/summarize.py RESULTS.json [-o RESULTS.md]   # default: RESULTS.md beside it
    python benchmarks/summarize.py --stem                         # prints <machine-slug>-<date>

One table per benchmark group, rows in run order. Each row is compared with the group's baseline
rows (``extra_info["baseline"]``: ``"e3nn"`` -- the e3nn reference composition -- and ``"plain"``
-- the plain CNN: the plain U-Net or torch's own op), taking the baseline of the same memory format
where there is one, else the contiguous one. Speed-ups are ``baseline time / time`` (above 1:
faster than the baseline); memory ratios are ``peak / baseline peak`` (below 1: leaner).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench_machine import cpu_model, results_stem, today, usable_cores

MIB = float(1 << 20)
BASELINES = ("e3nn", "plain")


@dataclass
class Row:
    """One benchmark of the JSON, with what the table needs."""

    group: str
    label: str
    backend: str
    memory_format: str
    baseline: str | None
    mean: float
    stddev: float
    rounds: int
    peak_bytes: int | None
    transient_bytes: int | None

    @classmethod
    def from_benchmark(cls, benchmark: dict) -> "Row":
        info, stats = benchmark.get("extra_info", {}), benchmark["stats"]
        return cls(group=benchmark.get("group") or "ungrouped", label=info.get("label", benchmark["name"]),
                   backend=info.get("backend", "-"), memory_format=info.get("memory_format", "-"),
                   baseline=info.get("baseline"), mean=stats["mean"], stddev=stats["stddev"],
                   rounds=stats["rounds"], peak_bytes=info.get("peak_memory_bytes"),
                   transient_bytes=info.get("peak_above_start_bytes"))


def group_rows(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return groups


def find_baseline(rows: list[Row], role: str, memory_format: str) -> Row | None:
    """The group's ``role`` row in ``memory_format``, else in the contiguous format, else any."""
    candidates = [row for row in rows if row.baseline == role]
    for wanted in (memory_format, "contiguous"):
        for row in candidates:
            if row.memory_format == wanted:
                return row
    return candidates[0] if candidates else None


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    value = numerator / denominator
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


TABLE_HEADER = ("| implementation | backend | memory format | mean | stddev | rounds | speed-up vs e3nn "
                "| speed-up vs plain | peak MiB | transient MiB | memory vs e3nn | memory vs plain |\n"
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def table_row(row: Row, group: list[Row]) -> str:
    e3nn, plain = (find_baseline(group, role, row.memory_format) for role in BASELINES)
    cells = [
        row.label, row.backend, row.memory_format, format_time(row.mean),
        format_time(row.stddev) if row.rounds > 1 else "-", str(row.rounds),
        ratio(e3nn.mean, row.mean) if e3nn else "-",
        ratio(plain.mean, row.mean) if plain else "-",
        format_bytes(row.peak_bytes), format_bytes(row.transient_bytes),
        ratio(row.peak_bytes, e3nn.peak_bytes) if e3nn else "-",
        ratio(row.peak_bytes, plain.peak_bytes) if plain else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def machine_lines(data: dict) -> list[str]:
    """Machine and software of the run, from what the benchmark hook recorded (else from here)."""
    info = data.get("machine_info", {}).get("e3fast_bench", {})
    model = info.get("cpu_model") or cpu_model()
    cores = info.get("cores") or usable_cores()
    versions = ", ".join(f"{name} {info[name]}" for name in ("torch", "e3nn", "e3fast", "python") if name in info)
    lines = [f"- Machine: {model}, {cores} cores, torch threads: {info.get('torch_threads', '?')}",
             f"- Software: {versions or 'not recorded'}",
             f"- Date: {info.get('date') or data.get('datetime', today())}"]
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- Commit: {commit['id'][:12]}{' (with uncommitted changes)' if commit.get('dirty') else ''}")
    if "size" in info:
        backends = ", ".join(info.get("backends_cpu", []))
        lines.append(f"- Volume edge: {info['size']} voxels; e3fast CPU backends: {backends} "
                     f"(automatic choice: {info.get('backend_auto_cpu', '?')})")
    return lines


LEGEND = """\
Times are pytest-benchmark means over the rounds shown (warm-up and calibration calls not counted).
Speed-up: baseline mean / this mean (above 1: faster). Memory: this peak / baseline peak (below 1:
leaner). Peak MiB = tensors held across calls (parameters, optimizer state, inputs) + transient
MiB, the peak that torch's CPU allocator reached above that during one call, summed from the
profiler's allocation and free events (`e3fast.testing.memory`); allocations outside torch's
allocator (oneDNN scratch space, Python objects) are not counted. Baselines: e3nn = the e3nn
reference composition, plain = the plain nnU-Net-style CNN (PlainUNet, contiguous) or torch's own
op; the baseline of the row's memory format is used where there is one."""


def summarize(data: dict) -> str:
    rows = [Row.from_benchmark(benchmark) for benchmark in data.get("benchmarks", [])]
    parts = ["# e3fast benchmarks", "", *machine_lines(data), "", LEGEND]
    for name, group in group_rows(rows).items():
        parts += ["", f"## {name}", "", TABLE_HEADER, *(table_row(row, group) for row in group)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, help="pytest-benchmark JSON file")
    parser.add_argument("-o", "--output", type=Path, help="markdown file to write (default: beside the JSON)")
    parser.add_argument("--stem", action="store_true", help="print <machine-slug>-<date> and exit")
    args = parser.parse_args(argv)
    if args.stem:
        print(results_stem())
        return 0
    if args.results is None:
        parser.error("give a pytest-benchmark JSON file (or --stem)")
    data = json.loads(args.results.read_text())
    output = args.output or args.results.with_suffix(".md")
    output.write_text(summarize(data))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
