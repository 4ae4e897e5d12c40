"""Training checkpoints: written atomically, read back for resuming or for inference.

A checkpoint is one ``torch.save`` dict of plain types and tensors (it loads with
``weights_only=True``): the format tag, the completed ``step``, the ``model`` and ``optimizer``
state, ``best_model`` (the weights of the best validation loss, or None), the early-stopping
state, the elapsed training seconds, torch's RNG states, the ``model_config`` (see
:mod:`e3fast.models.factory`), the ``train_config``, and what inference needs: label names and
values, channel names, spacing, patch size, normalization.

It is written to ``<path>.tmp`` and moved over ``path`` with ``os.replace``, so a run killed while
writing leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from e3fast.models.factory import build_model

CHECKPOINT_FORMAT = "e3fast-train-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its model: how to rebuild it and how to feed it.

    ``step`` is the training step of the weights returned (the best validation step when the run
    validated, else the last step); ``last_step`` the step the run had reached.
    """

    model_config: dict
    label_names: list[str]
    label_values: list[int]
    channel_names: list[str]
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    step: int
    last_step: int
    use_nonzero_mask: bool = True
    weights: str = "last"
    train_config: dict = field(default_factory=dict)


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, flush to disk, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(dict(state, format=CHECKPOINT_FORMAT), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read_checkpoint(path, map_location="cpu") -> dict:
    """The raw checkpoint dict; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an e3fast training checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def load_checkpoint(path, map_location="cpu", weights: str = "best") -> tuple[torch.nn.Module, CheckpointInfo]:
    """The model of a checkpoint in eval mode, and its :class:`CheckpointInfo`.

    ``weights='best'`` gives the weights of the best validation loss when the run validated
    (else the last ones); ``weights='last'`` the last ones.
    """
    if weights not in ("best", "last"):
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    state = read_checkpoint(path, map_location)
    model = build_model(state["model_config"])
    use_best = weights == "best" and state.get("best_model") is not None
    model.load_state_dict(state["best_model"] if use_best else state["model"])
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    info = CheckpointInfo(
        model_config=state["model_config"], label_names=list(state["label_names"]),
        label_values=list(state["label_values"]), channel_names=list(state["channel_names"]),
        spacing=tuple(state["spacing"]), patch_size=tuple(state["patch_size"]),
        step=state["early_stopping"]["best_step"] if use_best else state["step"], last_step=state["step"],
        use_nonzero_mask=state.get("use_nonzero_mask", True), weights="best" if use_best else "last",
        train_config=state.get("train_config", {}))
    return model, info
