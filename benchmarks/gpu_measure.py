"""Timing and peak memory of one benchmark case, on CUDA (events) or on CPU (wall clock).

Every call is timed on its own: the device is synchronized before it starts, so a call's time
includes the CPU's launch overhead whenever the GPU would wait for it (the time a training loop
sees). The first call is timed on the wall clock and kept apart: it includes Triton's JIT
compilation, cuDNN's algorithm choice and ``torch.compile``. Warm-up calls follow, then as many
timed repetitions as fit in the case's time budget and the global deadline (at least one).

Peak memory is torch's allocator's view: on CUDA the maximum allocated during the timed
repetitions above what was allocated before them; on CPU one more call under the profiler
(:mod:`e3fast.testing.memory`), if there is time for it. Add the bytes of the tensors held across calls for the total.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from e3fast.testing.memory import peak_memory_bytes


@dataclass(frozen=True)
class Budget:
    """Calls a case may make: ``warmup`` untimed calls (the first one included), up to ``reps``
    timed ones, all but the first call within ``seconds`` of wall time (warm-ups and repetitions
    are cut to fit, repetitions not below one)."""

    warmup: int
    reps: int
    seconds: float


@dataclass
class Timing:
    first_call_ms: float
    warmup_ms: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    peak_above_start_bytes: int | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    def as_record(self) -> dict:
        """The measurement's fields; ``status`` is ``incomplete`` when no repetition was timed."""
        status = {"status": "ok"} if self.times_ms else {
            "status": "incomplete", "reason": "no time left for a timed repetition after the first call"}
        return {**status, "first_call_ms": self.first_call_ms, "warmup_ms": self.warmup_ms, "times_ms": self.times_ms,
                "reps": len(self.times_ms), "median_ms": self.median_ms,
                "min_ms": min(self.times_ms) if self.times_ms else None,
                "peak_above_start_bytes": self.peak_above_start_bytes}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call, synchronized before and after, on the wall clock."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def event_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call timed with CUDA events (wall clock on CPU), starting from an idle device."""
    if device.type != "cuda":
        return wall_ms(fn, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _before_deadline(call_ms: float, deadline: float) -> bool:
    """Whether a call of about ``call_ms`` ends before ``deadline`` (20% margin)."""
    return time.monotonic() + 1.2 * call_ms / 1e3 < deadline


def _warm_up(fn, device: torch.device, timing: Timing, budget: Budget, case_end: float, deadline: float) -> float:
    """The warm-up calls after the first one; returns the last call's time. The first of them
    runs whenever the deadline allows (the first call, compiling, says little about the next),
    the others only before ``case_end``."""
    last_ms = timing.first_call_ms
    for index in range(budget.warmup - 1):
        estimate_ms = min(last_ms, budget.seconds * 1e3) if index == 0 else last_ms
        if not _before_deadline(estimate_ms, deadline) or (index and time.monotonic() + last_ms / 1e3 > case_end):
            break
        last_ms = wall_ms(fn, device)
        timing.warmup_ms.append(last_ms)
    return last_ms


def time_calls(fn: Callable[[], object], device: torch.device, budget: Budget, deadline: float) -> Timing:
    """Warm up, then time repetitions of ``fn`` within ``budget`` and before ``deadline``
    (``time.monotonic()`` seconds); records the peak memory of the timed calls. The budget's
    seconds start after the first call, which may compile."""
    timing = Timing(first_call_ms=wall_ms(fn, device))
    case_end = time.monotonic() + budget.seconds
    last_ms = _warm_up(fn, device, timing, budget, case_end, deadline)
    seconds_left = min(case_end, deadline) - time.monotonic()
    fitting = int(seconds_left * 1e3 / max(last_ms, 1e-3))
    reps = max(1, min(budget.reps, fitting)) if _before_deadline(last_ms, deadline) else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated_at_start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    timing.times_ms = [event_ms(fn, device) for _ in range(reps)]
    if device.type == "cuda" and reps:
        timing.peak_above_start_bytes = torch.cuda.max_memory_allocated(device) - allocated_at_start
    elif device.type == "cpu" and reps and _before_deadline(last_ms, deadline):
        timing.peak_above_start_bytes = peak_memory_bytes(fn, device)  # one more call, under the profiler
    return timing
