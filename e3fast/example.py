"""A one-minute tour: train the paper's U-Net on a synthetic volume and check its equivariance.

The task: a random smooth scalar volume (Gaussian-filtered noise) whose voxels are labelled by
intensity quartile, so the labels are a rotation-equivariant function of the input and the
network visibly learns them in a few steps. After training, the input is rotated by 90 degrees
(``torch.rot90`` on two spatial axes); an equivariant network's output rotates with it.

The check runs in float32 and, with the same weights, in float64. The float32 error of a trained
network can reach ~1e-3 (seen here after 20 steps; the same weights give that error on the
reference backend too): rounding differences between the two passes grow through the trained
layers (norm max pooling, for one, can pick another vector when two norms nearly tie). In float64
the error falls to ~1e-7, the floor set by buffers computed in float32; that is the verdict.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import torch
import torch.nn.functional as F

from e3fast.models import EquivariantUNet

NUM_CLASSES = 4
EQUIVARIANCE_TOLERANCE = 1e-5  # float64 relative error; exact equivariance leaves about 1e-7


@dataclass
class ExampleConfig:
    size: int = 32
    steps: int = 20
    learning_rate: float = 0.01
    seed: int = 0
    device: str = "cpu"


@dataclass
class ExampleResult:
    losses: list[float]
    accuracies: list[float]
    steps_per_second: float
    equivariance_error_float32: float
    equivariance_error_float64: float

    @property
    def is_equivariant(self) -> bool:
        return self.equivariance_error_float64 < EQUIVARIANCE_TOLERANCE


def smooth_random_volume(size: int, generator: torch.Generator, correlation: float = 3.0) -> torch.Tensor:
    """``[size]^3`` Gaussian-filtered white noise (periodic), standardized."""
    noise = torch.randn(size, size, size, generator=generator)
    frequencies = torch.fft.fftfreq(size)
    squared = (frequencies[:, None, None] ** 2 + frequencies[None, :, None] ** 2
               + torch.fft.rfftfreq(size)[None, None, :] ** 2)
    transfer = torch.exp(-2 * (math.pi * correlation) ** 2 * squared)
    volume = torch.fft.irfftn(torch.fft.rfftn(noise) * transfer, s=noise.shape)
    return (volume - volume.mean()) / volume.std()


def quartile_labels(volume: torch.Tensor) -> torch.Tensor:
    """Class 0..3 per voxel: which intensity quartile it falls in."""
    thresholds = torch.quantile(volume.flatten(), torch.tensor([0.25, 0.5, 0.75]))
    return torch.bucketize(volume, thresholds)


def synthetic_task(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ``[1, 1, s, s, s]`` and labels ``[1, s, s, s]``."""
    generator = torch.Generator().manual_seed(seed)
    volume = smooth_random_volume(size, generator)
    return volume[None, None], quartile_labels(volume)[None]


def paper_unet(num_classes: int = NUM_CLASSES) -> EquivariantUNet:
    """The paper's configuration: ``8x0e+4x1e+2x2e`` on top, 3 poolings, 5^3 kernels, 5 radial functions."""
    return EquivariantUNet("1x0e", f"{num_classes}x0e", diameter=5, num_radial_basis=5, steps=(1, 1, 1), n=2,
                           n_downsample=3)


def progress_line(step: int, total: int, loss: float, accuracy: float, width: int = 20) -> str:
    filled = round(width * step / total)
    return f"step {step:>{len(str(total))}}/{total} [{'#' * filled}{'-' * (width - filled)}] " \
           f"loss {loss:.4f}  accuracy {100 * accuracy:5.1f}%"


def train(model, x, labels, config: ExampleConfig, report: Callable[[str], None]) -> tuple[list, list, float]:
    """Adam on cross-entropy; returns per-step losses, accuracies and steps/s."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    losses, accuracies = [], []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append((logits.argmax(1) == labels).float().mean().item())
        report(progress_line(step, config.steps, losses[-1], accuracies[-1]))
    return losses, accuracies, config.steps / (time.perf_counter() - start)


def rotation_equivariance_error(model, x: torch.Tensor, dims=(2, 3)) -> float:
    """``max|f(R x) - R f(x)| / max|f(x)|`` for a 90-degree rotation ``R`` in the plane ``dims``.

    Scalar outputs rotate as plain images; the input edge must be divisible by the pooling factor
    (the network pads at the start of each axis otherwise, which a rotation does not commute with).
    """
    with torch.no_grad():
        output = model(x)
        rotated_output = model(torch.rot90(x, 1, dims))
    expected = torch.rot90(output, 1, dims)
    return ((rotated_output - expected).abs().max() / output.abs().max()).item()


def run_example(config: ExampleConfig, out: TextIO = sys.stdout) -> ExampleResult:
    """Build, train and check the paper's U-Net, printing as it goes."""

    def report(line: str) -> None:
        print(line, file=out, flush=True)

    torch.manual_seed(config.seed)
    x, labels = synthetic_task(config.size, config.seed)
    x, labels = x.to(config.device), labels.to(config.device)
    report("building the paper's equivariant U-Net (8x0e+4x1e+2x2e, 3 poolings, 5^3 kernels) ...")
    model = paper_unet().to(config.device)
    parameters = sum(p.numel() for p in model.parameters())
    report(f"{parameters:,} parameters; task: {config.size}^3 smooth random volume, labels = intensity quartile "
           f"({NUM_CLASSES} classes); device {config.device}, {torch.get_num_threads()} CPU threads")
    losses, accuracies, steps_per_second = train(model.train(), x, labels, config, report)
    report(f"{config.steps} steps, {steps_per_second:.2f} steps/s; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    model.eval()
    error32 = rotation_equivariance_error(model, x)
    error64 = rotation_equivariance_error(copy.deepcopy(model).double(), x.double())
    result = ExampleResult(losses, accuracies, steps_per_second, error32, error64)
    verdict = "equivariant up to rounding" if result.is_equivariant else "NOT equivariant"
    report(f"rotation equivariance (input rotated 90 degrees in the x-y plane): relative error of the output "
           f"{error32:.1e} in float32, {error64:.1e} with the same weights in float64 -> {verdict}")
    return result
