"""Markdown tables of a GPU benchmark results file (``gpu_bench.json``, see gpu_bench_results).

Speed-ups are ``baseline median / median`` (above 1: faster than the baseline), memory ratios
``peak / baseline peak`` (below 1: leaner), always against the baseline row of the same pass,
dtype or precision and memory format. Every planned case appears, measured or not; the ones
that were not measured are listed again at the end with the reason.
"""
from __future__ import annotations

from gpu_op_bytes import BYTE_MODEL_TEXT

MIB = float(1 << 20)
GIB = float(1 << 30)

TIMING_NOTE = (
    "Times: median of the timed repetitions (CUDA events; the device is idle when each call starts, "
    "so launch overhead counts where the GPU waits for it). First call: the first call's wall time "
    "(Triton JIT, cuDNN algorithm choice, torch.compile), not in the median; compile = first call - "
    "median. Peak: torch's allocator peak during the timed repetitions above the start, plus the "
    "tensors held across calls (inputs, output gradients; parameters and Adam state for the U-Net). "
    "GB/s: the op's byte model (below) / median time, 10^9 bytes per second.")


def format_ms(value) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1e3:.3g} µs"
    if value < 1e3:
        return f"{value:.3g} ms"
    return f"{value / 1e3:.3g} s"


def format_ratio(value) -> str:
    return "-" if value is None else f"{value:.3g}x"


def format_number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def format_size(value, unit: float) -> str:
    return "-" if value is None else f"{value / unit:.1f}" if unit == MIB else f"{value / unit:.2f}"


def speedup(row: dict, baseline: dict | None) -> float | None:
    mine, theirs = row.get("median_ms"), (baseline or {}).get("median_ms")
    return theirs / mine if mine and theirs and baseline is not row else None


def memory_ratio(row: dict, baseline: dict | None) -> float | None:
    mine, theirs = row.get("peak_bytes"), (baseline or {}).get("peak_bytes")
    return mine / theirs if mine and theirs and baseline is not row else None


def _status(row: dict) -> str:
    status = row.get("status", "pending")
    return status if status == "ok" else f"**{status}**"


def case_rows(data: dict) -> list[dict]:
    """Plan entries in run order, each merged with its result (``status: pending`` if none yet)."""
    rows = []
    for case_id, entry in data.get("plan", {}).items():
        result = data.get("results", {}).get(case_id)
        if result is None:
            result = {"status": "running" if data.get("in_progress") == case_id else "pending"}
        rows.append({"id": case_id, "section": entry["section"], **entry["params"], **result})
    return rows


# ------------------------------------------------------------------------------------ header

def machine_lines(data: dict) -> list[str]:
    machine, settings = data.get("machine", {}), data.get("settings", {})
    gpu = machine.get("gpu")
    lines = []
    if gpu:
        lines.append(f"- GPU: {gpu['name']} (compute capability {gpu['compute_capability']}, "
                     f"{gpu['multiprocessors']} SMs, {gpu['total_memory_bytes'] / GIB:.1f} GiB); driver "
                     f"{gpu.get('driver') or '?'}, CUDA runtime {gpu.get('cuda_runtime')}, cuDNN {gpu.get('cudnn')}")
        peak = gpu.get("peak_bandwidth_gbps")
        lines.append(f"- Peak DRAM bandwidth: {format_number(peak, 4)} GB/s ({gpu.get('peak_bandwidth_source')})")
    elif machine:
        lines.append(f"- Device: {machine.get('device')} ({machine.get('cpu')}, {machine.get('cpu_cores')} cores)")
    if machine:
        lines.append(f"- Software: torch {machine.get('torch')}, triton {machine.get('triton')}, "
                     f"e3nn {machine.get('e3nn')}, e3fast {machine.get('e3fast')}, python {machine.get('python')}")
        dirty = " (uncommitted changes)" if machine.get("git_dirty") else ""
        lines.append(f"- Source: commit {machine.get('git_commit') or 'unknown'}{dirty}, "
                     f"source digest {machine.get('source_digest')}; date {machine.get('date')}")
    if "backends" in data:
        lines.append(f"- e3fast backends usable on the device: {', '.join(data['backends'])}")
    if settings:
        lines.append(f"- Settings: ops on {settings.get('op_shape')}, U-Net input {settings.get('unet_input')}; "
                     f"TF32 for float32 convolutions: {'on' if settings.get('tf32') else 'off'}; "
                     f"cudnn.benchmark: {'on' if settings.get('cudnn_benchmark') else 'off'}; "
                     f"torch.compile backend: {settings.get('compile_backend')}")
    attempts = data.get("attempts", [])
    state = "finished" if data.get("finished") else f"stopped: {data.get('stop_reason') or 'still running'}"
    lines.append(f"- Run: {state}; worker processes: {len(attempts) or 1}"
                 + (f" (exit codes {', '.join(str(a['exit_code']) for a in attempts)})" if attempts else ""))
    return lines


# ------------------------------------------------------------------------------------ fused ops

def op_baseline(rows: list[dict], row: dict, impl: str, backend: str) -> dict | None:
    return next((r for r in rows if r["op"] == row["op"] and r["pass"] == row["pass"] and r["dtype"] == row["dtype"]
                 and r["memory_format"] == row["memory_format"] and r["impl"] == impl and r["backend"] == backend
                 and r.get("status") == "ok"), None)


def op_tables(rows: list[dict]) -> list[str]:
    op_rows = [r for r in rows if r["section"] == "ops"]
    lines = []
    for title, which in dict.fromkeys((r["title"], r["pass"]) for r in op_rows):
        lines += ["", f"### {title} -- {which}", "",
                  "| dtype | memory format | implementation | backend | median | min | reps | first call | GB/s "
                  "| % of peak | speed-up vs reference | speed-up vs torch | peak MiB | max rel. error vs reference "
                  "| status |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in (r for r in op_rows if (r["title"], r["pass"]) == (title, which)):
            reference = op_baseline(op_rows, row, "e3fast", "reference")
            plain = op_baseline(op_rows, row, "torch", "-")
            lines.append(
                f"| {row['dtype']} | {row['memory_format']} | {row['label']} | {row['backend']} "
                f"| {format_ms(row.get('median_ms'))} | {format_ms(row.get('min_ms'))} | {row.get('reps', '-')} "
                f"| {format_ms(row.get('first_call_ms'))} | {format_number(row.get('gbps'), 4)} "
                f"| {format_number(row.get('pct_of_peak_bandwidth'))} | {format_ratio(speedup(row, reference))} "
                f"| {format_ratio(speedup(row, plain))} | {format_size(row.get('peak_bytes'), MIB)} "
                f"| {format_number(row.get('max_rel_err_vs_reference'), 2)} | {_status(row)} |")
    return lines


# ------------------------------------------------------------------------------------ U-Net

UNET_BASELINES = ("e3nn", "plain", "plain-compiled")


def unet_baseline(rows: list[dict], row: dict, model: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["mode"] == row["mode"]
                 and r["precision"] == row["precision"] and r.get("status") == "ok"), None)


def unet_tables(rows: list[dict]) -> list[str]:
    unet_rows = [r for r in rows if r["section"].startswith("unet")]
    lines = []
    for mode, precision in dict.fromkeys((r["mode"], r["precision"]) for r in unet_rows):
        group = [r for r in unet_rows if (r["mode"], r["precision"]) == (mode, precision)]
        what = "training step (forward, cross-entropy, backward, Adam)" if mode == "train" else "inference"
        lines += ["", f"### U-Net {what}, {precision}, input {group[0]['input']}", "",
                  "| model | backend | memory format | median | min | reps | first call | compile "
                  "| speed-up vs e3nn | vs plain | vs plain compiled | peak GiB | memory vs e3nn | vs plain "
                  "| vs plain compiled | rel. error vs e3nn fp32 | status |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in group:
            baselines = [unet_baseline(unet_rows, row, name) for name in UNET_BASELINES]
            lines.append(
                f"| {row['model']} | {row['backend']} | {row['memory_format']} | {format_ms(row.get('median_ms'))} "
                f"| {format_ms(row.get('min_ms'))} | {row.get('reps', '-')} | {format_ms(row.get('first_call_ms'))} "
                f"| {format_ms(row.get('compile_ms'))} | "
                + " | ".join(format_ratio(speedup(row, b)) for b in baselines)
                + f" | {format_size(row.get('peak_bytes'), GIB)} | "
                + " | ".join(format_ratio(memory_ratio(row, b)) for b in baselines)
                + f" | {format_number(row.get('rel_err_vs_e3nn'), 2)} | {_status(row)} |")
    return lines


# ------------------------------------------------------------------------------------ the rest

def not_measured(rows: list[dict]) -> list[str]:
    missing = [r for r in rows if r.get("status") != "ok"]
    if not missing:
        return []
    lines = ["", "## Not measured", "", "| case | status | reason |", "|---|---|---|"]
    for row in missing:
        reason = str(row.get("reason") or row.get("error") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['id']} | {row['status']} | {reason[:300]} |")
    return lines


def render_markdown(data: dict) -> str:
    rows = case_rows(data)
    lines = ["# e3fast GPU benchmark", ""] + machine_lines(data) + ["", TIMING_NOTE]
    if any(r["section"] == "ops" for r in rows):
        lines += ["", "## Fused ops"] + op_tables(rows)
    if any(r["section"].startswith("unet") for r in rows):
        lines += ["", "## U-Net"] + unet_tables(rows)
    lines += not_measured(rows)
    lines += ["", "## Byte models", "", BYTE_MODEL_TEXT]
    return "\n".join(lines) + "\n"
