"""pytest-benchmark settings of the e3fast benchmarks (not part of the test suite in tests/).

Environment:

* ``E3FAST_BENCH_SIZE``: edge of the cubic volumes (default 64; a multiple of 8, at least 16, the
  smallest for a smoke test).
* ``E3FAST_BENCH_THREADS``: torch intra-op threads (default: torch's choice).

Every benchmark records in ``extra_info``: ``impl`` (e3fast / e3nn / plain), ``label``,
``backend``, ``memory_format``, ``baseline`` (the role a comparison row plays, if any) and the
peak memory of one call (:func:`measure`).
"""
from __future__ import annotations

import os

import pytest
import torch

import e3fast
from e3fast.testing.memory import peak_memory_bytes, tensor_bytes
from bench_machine import cpu_model, software_versions, today, usable_cores
from bench_settings import automatic_backend, bench_size


def pytest_configure(config):
    threads = os.environ.get("E3FAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["e3fast_bench"] = {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "size": bench_size(),
        "backends_cpu": e3fast.available_backends("cpu"),
        "backend_auto_cpu": automatic_backend("cpu"),
        "date": today(),
        **software_versions(),
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, group=..., impl=..., label=..., resident=callable, slow=False, **info)``.

    Times ``fn`` with pytest-benchmark, then measures the peak memory of one more call
    (:func:`e3fast.testing.memory.peak_memory_bytes`). ``resident()`` lists the tensors held
    across calls (parameters, optimizer state, inputs); their bytes are added to the peak above
    the call's start to give ``peak_memory_bytes``.

    Fast functions are calibrated by pytest-benchmark (its first call is the warm-up; as many
    rounds as fit in ``--benchmark-max-time``). ``slow=True`` (seconds per call) runs one warm-up
    call and exactly ``--benchmark-min-rounds`` timed rounds instead, sparing the calibration
    call and the extra call pytest-benchmark makes afterwards.
    """
    min_rounds = request.config.getoption("benchmark_min_rounds")

    def run(fn, *, group: str, impl: str, label: str, resident=lambda: (), backend: str = "-",
            memory_format: str = "-", baseline: str | None = None, slow: bool = False):
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, label=label, backend=backend, memory_format=memory_format,
                                    baseline=baseline)
        if slow:
            benchmark.pedantic(fn, rounds=min_rounds, warmup_rounds=1, iterations=1)
        else:
            benchmark(fn)
        peak_above_start = peak_memory_bytes(fn, "cpu")
        resident_bytes = tensor_bytes(resident())
        benchmark.extra_info.update(peak_above_start_bytes=peak_above_start, resident_bytes=resident_bytes,
                                    peak_memory_bytes=peak_above_start + resident_bytes)

    return run
