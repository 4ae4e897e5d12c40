"""A DataLoader of training batches indexed by step.

The dataset item ``step`` is the whole batch of that step on this process (see
:mod:`e3fast.data.patch_sampler`: a pure function of ``(seed, step, rank)``), so a loader started
at any step yields exactly what an uninterrupted run would have seen from there on -- the
loader keeps no state to save. Worker processes draw batches ahead of the training loop; pinned
memory speeds their copy to the GPU.
"""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset

from e3fast.data.patch_sampler import PatchSampler


class StepBatches(Dataset):
    """``dataset[step]`` -> ``(images [B, C, *patch], labels [B, *patch])`` of that training step."""

    def __init__(self, sampler: PatchSampler, batch_size: int, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank

    def __getitem__(self, step: int):
        return self.sampler.batch(step, self.batch_size, self.rank)


def step_loader(sampler: PatchSampler, batch_size: int, first_step: int, last_step: int | None = None,
                rank: int = 0, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of steps ``first_step, first_step + 1, ...`` (up to ``last_step`` excluded, or endless)."""
    steps = range(first_step, last_step) if last_step is not None else itertools.count(first_step)
    return DataLoader(StepBatches(sampler, batch_size, rank), batch_size=None, sampler=steps,
                      num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
