"""What machine and software a benchmark ran on, and the file name its results get."""
from __future__ import annotations

import datetime
import os
import platform
import re


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def today() -> str:
    return datetime.date.today().isoformat()


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_slug(model: str | None = None, cores: int | None = None) -> str:
    """e.g. ``amd-epyc-2cores``."""
    model = cpu_model() if model is None else model
    cores = usable_cores() if cores is None else cores
    return f"{slugify(model)}-{cores}cores"


def results_stem(date: str | None = None) -> str:
    """``<machine-slug>-<date>``, the name (without suffix) of a results file."""
    return f"{machine_slug()}-{date or today()}"


def software_versions() -> dict[str, str]:
    import e3nn
    import torch

    import e3fast

    return {"python": platform.python_version(), "torch": torch.__version__, "e3nn": e3nn.__version__,
            "e3fast": e3fast.__version__}
