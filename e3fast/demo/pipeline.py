"""The demo from start to end: template, cohort, two trainings, the rotation experiment, report.

1. The labelled MNI152 template at the demo's voxel size (cached as ``.npz`` in the output
   folder's ``cache/``: reading and labelling the 1 mm files takes several seconds).
2. The synthetic cohort as an nnU-Net dataset (``dataset/``; reused when its digest matches).
3. The equivariant and the plain U-Net trained on it with the same budget and no rotation
   augmentation (``models/equivariant``, ``models/plain``: checkpoint and metrics).
4. Both evaluated on the held-out subjects rotated about x, y and z (``results/``: CSV, markdown,
   PNG), with the table and the throughputs printed. A turned subject is synthesised again in
   its new pose (:class:`SubjectRotation`), as a scanner would image a turned head.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from e3fast.demo.cohort import IMAGE_SCALE, CohortSpec, cohort_is_cached, synthesize_subject, write_cohort
from e3fast.demo.mni_template import Template, build_template
from e3fast.demo.settings import DemoSettings

TEMPLATE_CACHE_VERSION = 1
MODEL_NAMES = ("equivariant", "plain")


def cached_template(voxel_mm: int, cache_dir: Path) -> Template:
    """:func:`build_template` at ``voxel_mm``, read from / written to ``cache_dir``."""
    path = Path(cache_dir) / f"mni152-template-{voxel_mm}mm-v{TEMPLATE_CACHE_VERSION}.npz"
    if path.is_file():
        stored = np.load(path)
        return Template(torch.from_numpy(stored["t1"]), torch.from_numpy(stored["class_fractions"]), voxel_mm)
    template = build_template(voxel_mm)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez_compressed(partial, t1=template.t1.numpy(), class_fractions=template.class_fractions.numpy())
    partial.replace(path)
    return template


def cohort_spec(settings: DemoSettings) -> CohortSpec:
    """The cohort the demo ``settings`` ask for."""
    return CohortSpec(settings.train_subjects, settings.test_subjects, settings.voxel_mm, settings.cohort_seed,
                      settings.grouping)


def prepare_cohort(settings: DemoSettings, output: Path, progress: bool = True) -> Path:
    """The demo's nnU-Net dataset folder under ``output`` (built unless already there)."""
    from tqdm import tqdm

    spec = cohort_spec(settings)
    folder = Path(output) / "dataset"
    if cohort_is_cached(folder, spec):
        print(f"cohort: reusing {folder}")
        return folder
    for stale in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):  # subjects of an earlier, other cohort
        shutil.rmtree(folder / stale, ignore_errors=True)
    template = cached_template(settings.voxel_mm, Path(output) / "cache")
    with tqdm(total=spec.train_subjects + spec.test_subjects, desc="cohort", unit="subject",
              disable=not progress) as bar:
        write_cohort(folder, template, spec, progress=lambda done, total: bar.update(done - bar.n))
    return folder


def train_config(settings: DemoSettings, dataset: Path, output: Path, model: str, device: str, progress: bool):
    """The :class:`~e3fast.training.TrainConfig` of one demo network."""
    from e3fast.training import TrainConfig

    return TrainConfig(
        dataset=str(dataset), output_dir=str(output), model=model, steps=settings.steps,
        minutes=settings.minutes_per_model, batch_size=settings.batch_size, patch_size=(settings.patch_size,) * 3,
        lr=settings.lr, loss=settings.loss, width=settings.equivariant_width, features=settings.plain_features,
        n_downsample=settings.n_downsample, kernel_voxels=5 if model == "equivariant" else settings.plain_kernel,
        scalar_upsampling=settings.scalar_upsampling, rotation_augmentation="none",
        foreground_fraction=settings.foreground_fraction, seed=settings.seed, device=device,
        validation_fraction=0.0, checkpoint_every=10 ** 6, num_workers=0, progress=progress, check=False)


@dataclass
class TrainedModel:
    """A demo network after training: its checkpoint, steps and training speed."""

    name: str
    checkpoint: Path
    steps: int
    seconds: float
    parameters: int
    train_voxels_per_second: float


def train_model(settings: DemoSettings, dataset: Path, output: Path, model: str, device: str,
                progress: bool) -> TrainedModel:
    """Train one demo network from scratch in ``output/models/<model>``."""
    from e3fast.training import load_checkpoint, train

    folder = Path(output) / "models" / model
    if folder.exists():
        shutil.rmtree(folder)
    print(f"training the {model} U-Net ({'%g minutes' % settings.minutes_per_model if settings.steps is None else '%d steps' % settings.steps}, "
          "no rotation augmentation)", flush=True)
    result = train(train_config(settings, dataset, folder, model, device, progress))
    seconds = sum(row["seconds"] for row in result.history)
    network, _ = load_checkpoint(result.checkpoint_path, weights="last")
    voxels = settings.batch_size * settings.patch_size ** 3 * len(result.history)
    return TrainedModel(model, result.checkpoint_path, result.last_step, seconds,
                        sum(p.numel() for p in network.parameters()), voxels / seconds if seconds else 0.0)


@dataclass
class DemoResult:
    """What a demo run produced."""

    models: list[TrainedModel]
    scores: list = field(default_factory=list)
    inference_voxels_per_second: dict[str, float] = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


class SubjectRotation:
    """Turns a demo test subject by synthesising it again in the new pose (see
    :func:`~e3fast.demo.cohort.synthesize_subject`): the turned brain is imaged as the training
    subjects were, so the experiment measures the networks, not a second resampling of a 2-4 mm
    image and label map. Quarter turns give exactly ``np.rot90`` of the stored subject."""

    def __init__(self, settings: DemoSettings, template: Template):
        self.settings, self.template = settings, template

    def __call__(self, case, axis: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
        """Image (stored precision) and labels of test subject ``case`` turned about ``axis``."""
        index = int(case.name.rsplit("_", 1)[1])
        spec = cohort_spec(self.settings)
        image, labels = synthesize_subject(self.template, spec.seed, index, spec.variation, spec.grouping,
                                           pose=(axis, degrees))
        if image.shape != case.labels.shape:
            raise ValueError(f"re-synthesised {case.name} has shape {image.shape}, the stored one {case.labels.shape}")
        stored = np.round(image * IMAGE_SCALE).astype(np.float32)
        return stored[None], labels.astype(np.int64)


def evaluate_models(settings: DemoSettings, dataset: Path, models: list[TrainedModel], device: str,
                    progress: bool) -> tuple[list, dict[str, float], list[str]]:
    """Rotation experiment of the trained ``models`` on the test subjects of ``dataset``."""
    from tqdm import tqdm

    from e3fast.evaluation.command import load_test_cases
    from e3fast.evaluation.robustness import rotation_experiment, rotation_jobs
    from e3fast.inference.segmenter import segmenter_from_checkpoint

    segmenters, info = {}, None
    for model in models:
        segmenters[model.name], info = segmenter_from_checkpoint(
            model.checkpoint, device=device, weights="last", overlap=settings.eval_overlap,
            batch_size=settings.eval_batch_size, window=(settings.eval_window or settings.patch_size,) * 3)
    cases = load_test_cases(Path(dataset) / "imagesTs", Path(dataset) / "labelsTs", len(info.channel_names))
    total = len(cases) * len(rotation_jobs(settings.axes, settings.angles)) * len(segmenters)
    rotate = SubjectRotation(settings, cached_template(settings.voxel_mm, Path(dataset).parent / "cache"))
    with tqdm(total=total, desc="rotated test predictions", unit="pred", disable=not progress) as bar:
        scores = rotation_experiment(segmenters, cases, info.label_values[1:], settings.axes, settings.angles,
                                     progress=lambda text: bar.update(), rotate=rotate)
    speeds = {name: segmenter.voxels_per_second for name, segmenter in segmenters.items()}
    return scores, speeds, list(info.label_names[1:])


def run_demo(settings: DemoSettings, output: Path, device: str = "cpu", progress: bool = True,
             print_fn: Callable[[str], None] = print) -> DemoResult:
    """Run the whole demo into ``output`` and print its tables (see the module docstring)."""
    from e3fast.evaluation.report import class_table, summary_table, text_table, write_report

    start = time.perf_counter()
    output = Path(output)
    dataset = prepare_cohort(settings, output, progress)
    models = [train_model(settings, dataset, output, name, device, progress) for name in MODEL_NAMES]
    scores, speeds, class_names = evaluate_models(settings, dataset, models, device, progress)
    title = (f"MNI152 demo, {settings.voxel_mm} mm, {settings.test_subjects} test subjects, "
             f"{settings.minutes_per_model or settings.steps} {'min' if settings.steps is None else 'steps'} per model")
    report = write_report(scores, class_names, output / "results", title)
    print_fn("\nMean foreground Dice on the rotated test subjects (mean over x, y, z axes):")
    print_fn(text_table(summary_table(scores)))
    print_fn("\nDice per class:")
    print_fn(text_table(class_table(scores, class_names)))
    print_fn("\nTraining and inference speed:")
    for model in models:
        print_fn(f"  {model.name:12s} {model.parameters:>9,d} parameters, {model.steps} steps in {model.seconds:.0f} s, "
                 f"training {model.train_voxels_per_second:,.0f} voxels/s, "
                 f"inference {speeds[model.name]:,.0f} voxels/s (sliding window)")
    print_fn("results: " + ", ".join(str(path) for path in report.values()))
    return DemoResult(models, scores, speeds, report, time.perf_counter() - start)
