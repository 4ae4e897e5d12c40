"""What benchmarks/gpu_check.sh asks Python for: the environment, the extension's state, the
benchmark's case counts, and the final summary (``summary.md`` and ``gpu_check.json``).

    python benchmarks/gpu_check_report.py environment --json ENV.json
    python benchmarks/gpu_check_report.py extension --json EXTENSION.json
    python benchmarks/gpu_check_report.py bench-counts OUT/gpu_bench.json
    python benchmarks/gpu_check_report.py summary --state DIR --out DIR --mode gpu|smoke --seconds N --budget N

Each subcommand reports what it could not find instead of failing: the summary must be written
whatever happened before it.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path[:0] = [str(ROOT), str(BENCHMARKS)]

from gpu_bench_report import GIB, case_rows, format_ms, format_number, format_ratio, speedup, unet_baseline  # noqa: E402

TEST_OUTCOME = re.compile(r"^(\S+::\S+).*? (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


# ====================================================================================== environment

def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 -- any failure: not usable here
        return None
    return str(getattr(module, "__version__", "present"))


def environment() -> dict:
    """Versions of everything the check uses, and the GPU torch sees (``gpu`` is None without one)."""
    found = {name: _module_version(name) for name in
             ("torch", "triton", "e3nn", "numpy", "pytest", "pytest_benchmark", "pybind11", "hypothesis")}
    found["python"] = sys.version.split()[0]
    found["gpu"] = None
    try:
        import torch

        found["torch_cuda"] = torch.version.cuda
        found["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            found["gpu"] = f"{properties.name} (compute capability {properties.major}.{properties.minor})"
            found["gpu_count"] = torch.cuda.device_count()
    except Exception as error:  # noqa: BLE001
        found["torch_error"] = f"{type(error).__name__}: {error}"
    return found


def extension_state() -> dict:
    """Whether e3fast._C loads, whether it has CUDA kernels, and the backends e3fast offers."""
    state = {}
    try:
        import torch

        import e3fast
        from e3fast import native_extension

        state["loads"] = native_extension.native_cpu_available()
        state["load_error"] = native_extension._LOAD_ERROR
        state["cuda_kernels"] = native_extension.native_cuda_available()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state["device"] = device
        state["backends"] = e3fast.available_backends(device)
    except Exception as error:  # noqa: BLE001
        state["error"] = f"{type(error).__name__}: {error}"
    words = {True: "yes", False: "no", None: "?"}
    if "error" in state:
        state["line"] = f"importing e3fast failed: {state['error']}"
    else:
        state["line"] = (f"extension loads: {words[state['loads']]}"
                         + (f" ({state['load_error']})" if state["load_error"] else "")
                         + f"; CUDA kernels: {words[state['cuda_kernels']]}; "
                         f"e3fast backends on {state['device']}: {', '.join(state['backends'])}")
    return state


# ====================================================================================== tests

def tests_from_junit(path: Path) -> dict | None:
    """Counts and failures from pytest's JUnit XML (absent when pytest was killed)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts, failures = collections.Counter(), []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = next((child for child in case if child.tag in ("failure", "error")), None)
        skipped = next((child for child in case if child.tag == "skipped"), None)
        if problem is not None:
            counts["failed" if problem.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (problem.get("message") or "").splitlines()[0][:300]
                             if problem.get("message") else ""})
        elif skipped is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"source": "junit", "counts": dict(counts), "failures": failures}


def tests_from_log(path: Path) -> dict | None:
    """Counts from pytest's ``-v`` lines, for a run cut short before it wrote its XML."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    counts, failures = collections.Counter(), []
    for line in lines:
        match = TEST_OUTCOME.match(line)
        if match:
            counts[match.group(2).lower()] += 1
            if match.group(2) in ("FAILED", "ERROR"):
                failures.append({"test": match.group(1), "message": ""})
    return {"source": "log (pytest did not finish)", "counts": dict(counts), "failures": failures}


# ====================================================================================== benchmark

def bench_counts(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "no results file"
    counts = collections.Counter(result.get("status") for result in data.get("results", {}).values())
    state = "finished" if data.get("finished") else f"stopped: {data.get('stop_reason')}"
    listed = ", ".join(f"{n} {status}" for status, n in counts.most_common())
    return f"{len(data.get('plan', {}))} cases{f' ({listed})' if listed else ''}; {state}"


def op_headlines(rows: list[dict]) -> list[str]:
    """Per op, pass and fast backend: the configuration closest to the bandwidth roofline."""
    best = {}
    for row in rows:
        if row["section"] != "ops" or row.get("status") != "ok" or row["impl"] != "e3fast":
            continue
        key = (row["op"], row["pass"], row["backend"])
        if row.get("gbps") and (key not in best or row["gbps"] > best[key]["gbps"]):
            best[key] = row
    if not best:
        return []
    lines = ["| op | pass | backend | best GB/s | % of peak | at | median |", "|---|---|---|---:|---:|---|---:|"]
    for (op, which, backend), row in best.items():
        lines.append(f"| {op} | {which} | {backend} | {format_number(row['gbps'], 4)} "
                     f"| {format_number(row.get('pct_of_peak_bandwidth'))} | {row['dtype']} {row['memory_format']} "
                     f"| {format_ms(row.get('median_ms'))} |")
    return lines


def unet_headlines(rows: list[dict]) -> list[str]:
    """The training-step rows: time, speed-ups and peak memory."""
    train = [r for r in rows if r["section"] == "unet-train"]
    if not train:
        return []
    lines = ["| precision | model | step | vs e3nn | vs plain | vs plain compiled | peak GiB | status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in train:
        ratios = [format_ratio(speedup(row, unet_baseline(train, row, name))) for name in
                  ("e3nn", "plain", "plain-compiled")]
        peak = row.get("peak_bytes")
        lines.append(f"| {row['precision']} | {row['model']} | {format_ms(row.get('median_ms'))} | {' | '.join(ratios)} "
                     f"| {'-' if peak is None else f'{peak / GIB:.2f}'} | {row.get('status')} |")
    return lines


# ====================================================================================== summary

def read_stages(path: Path) -> list[dict]:
    stages = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return stages
    for line in lines:
        name, status, seconds, detail = (line.split("\t", 3) + ["", "", ""])[:4]
        stages.append({"stage": name, "status": status, "seconds": int(seconds or 0), "detail": detail})
    return stages


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def summary(state: Path, out: Path, mode: str, seconds: int, budget: int) -> None:
    stages = read_stages(state / "stages.tsv")
    tests = tests_from_junit(state / "tests.xml") or tests_from_log(out / "tests.log") or {}
    bench = _read_json(out / "gpu_bench.json")
    rows = case_rows(bench) if bench.get("plan") else []
    report = {"mode": mode, "seconds": seconds, "budget_seconds": budget, "stages": stages,
              "environment": _read_json(state / "env.json"), "extension": _read_json(state / "extension.json"),
              "tests": tests, "bench": {"summary": bench_counts(out / "gpu_bench.json"),
                                        "finished": bench.get("finished"), "stop_reason": bench.get("stop_reason")}}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# e3fast GPU check ({mode})", "",
             f"{seconds} s of a {budget} s budget. Files: env.log, build.log, tests.log, bench.log, "
             "gpu_bench.json, gpu_bench.md (all tables), gpu_check.json.", "",
             "| stage | status | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['detail'].replace('|', '/')} |" for s in stages]
    if tests.get("failures"):
        lines += ["", f"## Test failures ({tests['source']})", ""]
        lines += [f"- `{f['test']}` {f['message']}" for f in tests["failures"][:30]]
    if rows:
        lines += ["", "## Fused ops nearest the roofline", ""] + op_headlines(rows)
        lines += ["", "## U-Net training step", ""] + unet_headlines(rows)
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ====================================================================================== command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("environment", "extension"):
        commands.add_parser(name).add_argument("--json", type=Path, required=True)
    commands.add_parser("bench-counts").add_argument("results", type=Path)
    summary_parser = commands.add_parser("summary")
    summary_parser.add_argument("--state", type=Path, required=True)
    summary_parser.add_argument("--out", type=Path, required=True)
    summary_parser.add_argument("--mode", default="gpu")
    summary_parser.add_argument("--seconds", type=int, default=0)
    summary_parser.add_argument("--budget", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in ("environment", "extension"):
        found = environment() if args.command == "environment" else extension_state()
        args.json.write_text(json.dumps(found, indent=1, default=str))
        print("\n".join(f"{key}: {value}" for key, value in found.items()))
    elif args.command == "bench-counts":
        print(bench_counts(args.results))
    else:
        summary(args.state, args.out, args.mode, args.seconds, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
