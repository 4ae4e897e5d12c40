"""Peak memory of one call, as torch's allocators saw it (CPU and CUDA).

On CUDA the caching allocator's own counters are used (``torch.cuda.max_memory_allocated``).
On CPU there is no such counter, so the call runs under ``torch.profiler`` with
``profile_memory=True``: every allocation and free made through torch's CPU allocator is recorded
as a ``[memory]`` event with a signed byte count, and the peak is the maximum of their running
sum in time order. Memory allocated outside torch's allocator (e.g. oneDNN's internal scratch
buffers, Python objects) is not seen on either device.

Both report the peak *above* what was allocated when the call started; add the bytes already
held (parameters, optimizer state, inputs; see :func:`tensor_bytes`) for the total.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

MEMORY_EVENT_NAME = "[memory]"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above the amount allocated at its start."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    raise ValueError(f"peak memory is measured on cpu or cuda devices, not {device.type}")


def _cuda_peak_bytes(fn, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _cpu_peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return peak_of_running_sum(cpu_memory_events(prof))


def cpu_memory_events(prof: profile) -> list[tuple[int, int]]:
    """``(time_ns, signed bytes)`` of every CPU allocation (+) and free (-) the profiler recorded."""
    events = prof.profiler.kineto_results.events()
    return [(event.start_ns(), event.nbytes()) for event in events
            if event.name() == MEMORY_EVENT_NAME and event.device_type() == torch.autograd.DeviceType.CPU]


def peak_of_running_sum(events: Iterable[tuple[int, int]]) -> int:
    """Largest running total of signed byte counts, taken in time order (0 if it never rises)."""
    total = peak = 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):
        total += nbytes
        peak = max(peak, total)
    return peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def module_state_tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Parameters, buffers and (if given) optimizer state tensors of a model."""
    yield from module.parameters()
    yield from module.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (value for value in state.values() if isinstance(value, torch.Tensor))
