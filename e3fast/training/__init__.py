"""Training on segmentation datasets: :func:`train` a :class:`TrainConfig`, then
:func:`load_checkpoint` the result for inference."""
from e3fast.training.checkpoint import CheckpointInfo, load_checkpoint
from e3fast.training.config import TrainConfig
from e3fast.training.trainer import TrainResult, train

__all__ = ["CheckpointInfo", "TrainConfig", "TrainResult", "load_checkpoint", "train"]
