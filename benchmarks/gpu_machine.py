"""What device the GPU benchmark ran on: names, versions, the source tree, and the peak bandwidth.

The peak DRAM bandwidth is looked up from the device name for the cards these benchmarks are
meant for (datasheet numbers), else computed from the memory clock and bus width that torch
reports (``2 * clock * width``, double data rate), else unknown. The source says which.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch

from bench_machine import cpu_model, usable_cores

SOURCE_PATTERNS = ("e3fast/**/*.py", "csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh",
                   "benchmarks/*.py", "benchmarks/*.sh", "setup.py")


def datasheet_bandwidth_gbps(name: str) -> tuple[float, str] | None:
    """Peak DRAM bandwidth of the NVIDIA Hopper cards by name, in GB/s (10^9 bytes per second)."""
    upper = name.upper()
    if "H200" in upper and "GH200" not in upper:
        return 4800.0, "datasheet, H200: 4.8 TB/s"
    if "H100" in upper and "GH100" not in upper:
        if "PCIE" in upper:
            return 2000.0, "datasheet, H100 PCIe: 2.0 TB/s"
        if "NVL" in upper:
            return 3900.0, "datasheet, H100 NVL: 3.9 TB/s"
        return 3350.0, "datasheet, H100 SXM: 3.35 TB/s"
    return None


def reported_bandwidth_gbps(properties) -> tuple[float, str] | None:
    """``2 * memory clock * bus width`` from torch's device properties, where torch reports them."""
    clock_khz = getattr(properties, "memory_clock_rate", None)
    bus_bits = getattr(properties, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return gbps, f"computed: 2 x {clock_khz / 1e6:.3f} GHz memory clock x {bus_bits}-bit bus"


def peak_bandwidth_gbps(device: torch.device) -> tuple[float | None, str]:
    """``(GB/s, where the number comes from)`` for a CUDA device; ``(None, reason)`` otherwise."""
    if device.type != "cuda":
        return None, "not measured against a peak on CPU"
    properties = torch.cuda.get_device_properties(device)
    found = datasheet_bandwidth_gbps(properties.name) or reported_bandwidth_gbps(properties)
    return found if found else (None, f"unknown for {properties.name}")


def _command_output(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(root: Path) -> str | None:
    """The checked-out commit (``E3FAST_GIT_COMMIT`` where the tree came without ``.git``)."""
    return _command_output(["git", "rev-parse", "HEAD"], cwd=root) or os.environ.get("E3FAST_GIT_COMMIT")


def git_is_dirty(root: Path) -> bool | None:
    status = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return None if status is None else bool(status)


def source_digest(root: Path) -> str:
    """SHA-256 (first 16 hex digits) of the Python, C++ and CUDA sources: which tree ran."""
    digest = hashlib.sha256()
    paths = sorted({path for pattern in SOURCE_PATTERNS for path in root.glob(pattern) if path.is_file()})
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _gpu_description(device: torch.device) -> dict:
    properties = torch.cuda.get_device_properties(device)
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              f"--id={device.index or 0}"])
    bandwidth, bandwidth_source = peak_bandwidth_gbps(device)
    return {
        "name": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "total_memory_bytes": properties.total_memory,
        "multiprocessors": properties.multi_processor_count,
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "peak_bandwidth_gbps": bandwidth,
        "peak_bandwidth_source": bandwidth_source,
    }


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # noqa: BLE001 -- any import failure means "not usable here"
        return None
    return getattr(module, "__version__", "unknown")


def machine_info(device: torch.device, root: Path) -> dict:
    """Everything the results need to say where and with what they were measured."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_cores": usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "e3nn": _version("e3nn"),
        "e3fast": _version("e3fast"),
        "git_commit": git_commit(root),
        "git_dirty": git_is_dirty(root),
        "source_digest": source_digest(root),
    }
    if device.type == "cuda":
        info["gpu"] = _gpu_description(device)
    return info
