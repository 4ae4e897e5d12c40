"""The validation split, the validation loss and early stopping on it.

The split is a seeded shuffle of the training cases (at least one case each side, none held out
when there are fewer than two cases or ``fraction == 0``). The validation loss is the mean loss
over a fixed set of patches of the held-out cases (drawn from the sampler's validation stream,
the same at every validation), shared among ranks and summed over them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from e3fast.data.patch_sampler import PatchSampler
from e3fast.training.distributed import ProcessContext, sum_over_ranks


def split_cases(cases: list, fraction: float, seed: int) -> tuple[list, list]:
    """``(training, validation)``: a seeded random ``fraction`` of ``cases`` held out."""
    if fraction <= 0 or len(cases) < 2:
        return list(cases), []
    held_out = min(max(1, math.ceil(fraction * len(cases))), len(cases) - 1)
    order = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(len(cases))
    validation = set(order[:held_out].tolist())
    return ([case for i, case in enumerate(cases) if i not in validation],
            [case for i, case in enumerate(cases) if i in validation])


@dataclass
class EarlyStopping:
    """Best validation loss so far, its step, and how many validations since it improved."""

    patience: int
    best_loss: float = math.inf
    best_step: int = 0
    validations_without_improvement: int = 0

    def update(self, loss: float, step: int) -> bool:
        """Record a validation; True if it improved on the best."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.validations_without_improvement = loss, step, 0
            return True
        self.validations_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.validations_without_improvement >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step,
                "validations_without_improvement": self.validations_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = state["best_loss"]
        self.best_step = state["best_step"]
        self.validations_without_improvement = state["validations_without_improvement"]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, sampler: PatchSampler, num_patches: int, batch_size: int, loss_fn,
                    context: ProcessContext, prepare_input) -> float:
    """Mean loss over patches ``0 .. num_patches - 1`` of ``sampler``, split among the ranks.

    ``prepare_input(images) -> model input`` moves a batch to the device and memory format.
    """
    was_training = model.training
    model.eval()
    mine = list(range(context.rank, num_patches, context.world_size))
    total = 0.0
    for start in range(0, len(mine), batch_size):
        samples = [sampler.sample(index, 0, 0) for index in mine[start:start + batch_size]]
        images = prepare_input(torch.stack([sample[0] for sample in samples]))
        labels = torch.stack([sample[1] for sample in samples]).to(images.device)
        total += float(loss_fn(model(images), labels)) * len(samples)
    model.train(was_training)
    loss_sum, count = sum_over_ranks([total, float(len(mine))], context)
    return loss_sum / count
