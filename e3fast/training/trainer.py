"""The training loop: :func:`train` runs a :class:`TrainConfig` and returns a :class:`TrainResult`.

One step: the batch of that step (a pure function of ``(seed, step, rank)``, see
:mod:`e3fast.data.patch_sampler`), forward under bf16 autocast where enabled, the loss, backward,
Adam. Every ``validate_every`` steps the validation loss updates early stopping; every
``checkpoint_every`` steps and at the end rank 0 writes ``checkpoint.pt`` atomically. A run
resumed from its checkpoint restores model, optimizer, early stopping, elapsed time and RNG, and
the loader restarts at the checkpoint's step, so it continues exactly as if never stopped.
The run ends at ``steps``, after ``minutes`` of training (rank 0's clock decides for all ranks),
or when early stopping says so.
"""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from e3fast.data import DatasetError, check_dataset, load_dataset
from e3fast.data.loader import step_loader
from e3fast.data.patch_sampler import VALIDATION_STREAM, PatchSampler
from e3fast.data.training_cases import cases_off_spacing, load_training_cases, median_spacing
from e3fast.models.factory import build_model, equivariant_model_config, plain_model_config
from e3fast.training.checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from e3fast.training.config import TrainConfig
from e3fast.training.distributed import (ProcessContext, broadcast_from_main, start_processes, stop_processes,
                                         sum_over_ranks)
from e3fast.training.losses import segmentation_loss
from e3fast.training.metrics_log import MetricsLog
from e3fast.training.validation import EarlyStopping, split_cases, validation_loss

# Options that shape the trajectory: a resumed run must use the same ones to continue it exactly.
TRAJECTORY_OPTIONS = ("batch_size", "patch_size", "lr", "loss", "seed", "rotation_augmentation", "rotation_degrees",
                      "foreground_fraction", "use_nonzero_mask", "validation_fraction", "validate_every",
                      "validation_patches", "bf16")


@dataclass
class TrainResult:
    """How a run ended: its checkpoint, the steps this call trained, and why it stopped
    (``stop_reason``: ``'steps'``, ``'minutes'``, ``'early_stopping'``)."""

    checkpoint_path: Path
    metrics_path: Path
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    stop_reason: str = "steps"
    last_step: int = 0
    rank: int = 0


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says (single process, or every rank of a ``torchrun`` launch)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train expects a TrainConfig, got {type(config).__name__}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    context = start_processes(config.device)
    try:
        return _Run(config, context).train()
    finally:
        stop_processes(context)
        torch.set_num_threads(threads)


def _checked_dataset(config: TrainConfig, context: ProcessContext):
    """The dataset, checked by rank 0 (its error raised on every rank)."""
    error = None
    if config.check and context.is_main:
        try:
            check_dataset(config.dataset)
        except DatasetError as problem:
            error = str(problem)
    error = broadcast_from_main(error, context) if config.check else None
    if error:
        raise DatasetError(error)
    return load_dataset(config.dataset)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, the process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Run:
    """The state of one training run (built from the config, possibly restored from a checkpoint)."""

    def __init__(self, config: TrainConfig, context: ProcessContext):
        self.config, self.context = config, context
        self.device = context.device
        self.output_dir = Path(config.output_dir)
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        self.dataset = _checked_dataset(config, context)
        training, validation = split_cases(self.dataset.training, config.validation_fraction, config.seed)
        num_classes = self.dataset.num_classes
        self.training_cases = load_training_cases(training, num_classes, config.use_nonzero_mask, config.seed)
        self.validation_cases = load_training_cases(validation, num_classes, config.use_nonzero_mask, config.seed)
        all_cases = self.training_cases + self.validation_cases
        self.spacing = median_spacing(case.spacing for case in all_cases)
        off_spacing = cases_off_spacing(all_cases, self.spacing)
        if off_spacing and context.is_main:
            print(f"e3fast train: warning: {len(off_spacing)} case(s) differ by more than 10% from the median "
                  f"spacing {self.spacing} and are not resampled: {', '.join(off_spacing[:5])}", file=sys.stderr)
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        self.channels_last = (config.channels_last if config.channels_last is not None
                              else self.device.type == "cuda" or config.model == "equivariant")
        self._build_samplers()
        self._build_model()
        self.early_stopping = EarlyStopping(config.patience)
        self.start_step, self.elapsed_seconds, self.best_state = 0, 0.0, None
        self.resumed = self._restore()

    def _build_samplers(self) -> None:
        config = self.config
        rotation = config.rotation_augmentation
        self.sampler = PatchSampler(self.training_cases, config.patch_size, config.foreground_fraction, config.seed,
                                    rotation_degrees=config.rotation_degrees if rotation in ("small", "both") else 0.0,
                                    rotate90=rotation in ("rot90", "both"), spacing=self.spacing)
        self.validation_sampler = (PatchSampler(self.validation_cases, config.patch_size, config.foreground_fraction,
                                                config.seed, stream=VALIDATION_STREAM)
                                   if self.validation_cases else None)

    def _build_model(self) -> None:
        config = self.config
        channels, classes = self.dataset.num_channels, self.dataset.num_classes
        if config.model == "equivariant":
            self.model_config = equivariant_model_config(
                channels, classes, self.spacing, width=config.width, n_downsample=config.n_downsample,
                kernel_voxels=config.kernel_voxels, num_radial_basis=config.num_radial_basis, lmax=config.lmax,
                equivariance=config.equivariance, scalar_upsampling=config.scalar_upsampling,
                channels_last=self.channels_last)
        else:
            self.model_config = plain_model_config(channels, classes, features=config.features,
                                                   n_downsample=config.n_downsample, kernel_size=config.kernel_voxels)
        torch.manual_seed(config.seed)
        self.model = build_model(self.model_config).to(self.device)
        if self.channels_last and config.model == "plain":
            self.model.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loss_fn = segmentation_loss(config.loss)

    def _restore(self) -> bool:
        config, path = self.config, self.checkpoint_path
        if not path.is_file():
            if config.resume and self.context.is_main:
                print(f"e3fast train: no checkpoint in {self.output_dir} to resume; starting at step 0", flush=True)
            return False
        if not config.resume:
            raise ValueError(f"{path} already exists: pass --resume (resume=True) to continue that run, "
                             "or choose another output directory")
        state = read_checkpoint(path, map_location="cpu")
        if state["model_config"] != self.model_config:
            raise ValueError(f"{path}: its model {state['model_config']} differs from this run's "
                             f"{self.model_config}; resume with the same model options")
        changed = [key for key in TRAJECTORY_OPTIONS
                   if state["train_config"].get(key) != self.config.to_dict().get(key)]
        if changed:
            raise ValueError(f"{path}: resuming with changed options {changed} would not continue the same run "
                             f"(checkpoint: {[state['train_config'].get(key) for key in changed]})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.start_step, self.elapsed_seconds = state["step"], state["elapsed_seconds"]
        self.best_state = state.get("best_model")
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return True

    def _state(self, step: int) -> dict:
        return {
            "step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "best_model": self.best_state, "early_stopping": self.early_stopping.state_dict(),
            "elapsed_seconds": self.elapsed_seconds, "world_size": self.context.world_size,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "model_config": self.model_config, "train_config": self.config.to_dict(),
            "label_names": self.dataset.label_names, "label_values": self.dataset.label_values,
            "channel_names": self.dataset.channel_names, "spacing": list(self.spacing),
            "patch_size": list(self.config.patch_size), "use_nonzero_mask": self.config.use_nonzero_mask,
        }

    def _prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else images

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _validate(self, step: int) -> float | None:
        config = self.config
        if self.validation_sampler is None or step % config.validate_every:
            return None
        with self._autocast():
            loss = validation_loss(self.model, self.validation_sampler, config.validation_patches, config.batch_size,
                                   self.loss_fn, self.context, self._prepare_input)
        if self.early_stopping.update(loss, step):
            self.best_state = {key: value.detach().to("cpu", copy=True)
                               for key, value in self.model.state_dict().items()}
        return loss

    def _save(self, step: int) -> None:
        if self.context.is_main:
            save_checkpoint(self.checkpoint_path, self._state(step))

    def _network(self) -> torch.nn.Module:
        """The model, wrapped in DistributedDataParallel when there are several processes."""
        if not self.context.is_distributed:
            return self.model
        return DistributedDataParallel(self.model, device_ids=[self.device.index]
                                       if self.device.type == "cuda" else None)

    def _optimize(self, network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One Adam step on a batch; the loss (a tensor, not yet synchronized)."""
        images, labels = self._prepare_input(images), labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = network(images)
        loss = self.loss_fn(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def _stop_reason(self, step: int, out_of_time: bool, validated: bool) -> str | None:
        """Why the run ends after ``step``, or None to go on."""
        if out_of_time:
            return "minutes"
        if validated and self.early_stopping.should_stop:
            return "early_stopping"
        if self.config.steps is not None and step >= self.config.steps:
            return "steps"
        return None

    def train(self) -> TrainResult:
        """Train from ``start_step`` until a stopping rule fires; the final checkpoint is written."""
        config, context = self.config, self.context
        network = self._network()
        network.train()
        log = MetricsLog(self.output_dir, self.start_step if self.resumed else None) if context.is_main else None
        loader = step_loader(self.sampler, config.batch_size, self.start_step, config.steps, context.rank,
                             config.num_workers, pin_memory=self.device.type == "cuda")
        voxels_per_step = config.batch_size * math.prod(config.patch_size) * context.world_size
        bar = tqdm(total=config.steps, initial=self.start_step, unit="step", desc="e3fast train", dynamic_ncols=True,
                   disable=not (config.progress and context.is_main))
        history, step, stop_reason, saved_step = [], self.start_step, "steps", self.start_step
        last = time.perf_counter()
        try:
            for images, labels in loader:
                loss = self._optimize(network, images, labels)
                step += 1
                val_loss = self._validate(step)
                now = time.perf_counter()
                seconds, last = now - last, now
                self.elapsed_seconds += seconds
                out_of_time = context.is_main and config.minutes is not None and \
                    self.elapsed_seconds >= 60 * config.minutes
                loss_sum, stop_votes = sum_over_ranks([loss.item(), float(out_of_time)], context)
                row = {"step": step, "loss": loss_sum / context.world_size, "val_loss": val_loss,
                       "seconds": seconds, "elapsed_seconds": self.elapsed_seconds,
                       "voxels_per_second": voxels_per_step / seconds, "memory_mb": peak_memory_mb(self.device),
                       "lr": config.lr}
                history.append(row)
                if log is not None:
                    log.log(row)
                bar.set_postfix(_progress_fields(row, self.early_stopping), refresh=False)
                bar.update(1)
                reason = self._stop_reason(step, stop_votes > 0, val_loss is not None)
                if step % config.checkpoint_every == 0 or reason is not None:
                    self._save(step)
                    saved_step = step
                if reason is not None:
                    stop_reason = reason
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        if saved_step != step or not self.checkpoint_path.is_file():
            self._save(step)
        return TrainResult(self.checkpoint_path, self.output_dir / "metrics.csv", history,
                           stop_reason == "early_stopping", stop_reason, step, context.rank)


def _progress_fields(row: dict, early_stopping: EarlyStopping) -> dict:
    fields = {"loss": f"{row['loss']:.4f}", "vox/s": f"{row['voxels_per_second']:.3g}",
              "mem": f"{row['memory_mb']:.0f}MB"}
    if math.isfinite(early_stopping.best_loss):
        fields["best_val"] = f"{early_stopping.best_loss:.4f}"
    return fields
