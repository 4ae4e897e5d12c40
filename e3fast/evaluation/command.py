"""``e3fast evaluate``: Dice of label maps, and the rotation-robustness experiment.

* ``e3fast evaluate --predictions P --labels L``: Dice per class and the mean over foreground
  classes of every case of ``P`` against the label map of the same name in ``L``.
* ``e3fast evaluate --rotations -c eq.pt -c plain.pt --dataset D``: the paper's experiment. The
  test cases (``D/imagesTs`` + ``D/labelsTs``, or ``--images`` + ``--labels``) are rotated about
  x, y and z through ``--angles`` and segmented by every checkpoint; a table is printed and
  ``rotation_scores.csv``, ``rotation_summary.md`` and ``dice_vs_angle.png`` go to ``--output``.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def _read_labels(path: Path) -> np.ndarray:
    import nibabel

    image = nibabel.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data.shape}")
    if not np.all(np.equal(np.mod(data, 1), 0)):
        raise ValueError(f"{path}: label maps must hold whole numbers")
    return data.astype(np.int64)


def _label_map_in(folder: Path, name: str) -> Path | None:
    """``folder/name.nii.gz`` or ``folder/name.nii``, whichever exists (None if neither)."""
    from e3fast.inference.nifti_io import NIFTI_SUFFIXES

    return next((path for path in (Path(folder) / (name + suffix) for suffix in NIFTI_SUFFIXES) if path.is_file()),
                None)


def _label_names(dataset_json: Path | None, values) -> dict[int, str]:
    if dataset_json is None:
        return {int(v): str(int(v)) for v in values}
    labels = json.loads(Path(dataset_json).read_text())["labels"]
    pairs = labels.items() if isinstance(next(iter(labels.values())), int) else ((v, k) for k, v in labels.items())
    return {int(value): str(name) for name, value in pairs}


def evaluate_folders(predictions: Path, references: Path, dataset_json: Path | None = None,
                     output: Path | None = None) -> dict[str, np.ndarray]:
    """Dice per foreground class of every prediction in ``predictions`` against ``references``;
    prints a table, writes ``dice.csv`` to ``output`` if given; returns case -> Dice array."""
    from e3fast.evaluation.dice import dice_per_class, mean_foreground_dice
    from e3fast.evaluation.report import text_table
    from e3fast.inference.nifti_io import NIFTI_SUFFIXES, nifti_stem

    files = sorted(p for p in Path(predictions).iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise ValueError(f"{predictions} holds no NIfTI label maps")
    pairs = []
    for path in files:
        reference = _label_map_in(references, nifti_stem(path))
        if reference is None:
            raise ValueError(f"no reference label map for {path.name} in {references}")
        pairs.append((nifti_stem(path), _read_labels(path), _read_labels(reference)))
    values = sorted(set().union(*(np.unique(r).tolist() for _, _, r in pairs)) - {0})
    names = _label_names(dataset_json, values)
    if dataset_json is not None:
        values = sorted(v for v in names if v != 0)
    columns = [names.get(v, str(v)) for v in values]
    results, rows = {}, [["case", "mean", *columns]]
    for case, prediction, reference in pairs:
        dice = dice_per_class(prediction, reference, values)
        results[case] = dice
        rows.append([case, f"{mean_foreground_dice(dice):.4f}", *(f"{d:.4f}" for d in dice)])
    mean_per_class = np.nanmean(np.stack(list(results.values())), axis=0)
    rows.append(["mean", f"{np.nanmean([mean_foreground_dice(d) for d in results.values()]):.4f}",
                 *(f"{d:.4f}" for d in mean_per_class)])
    print(text_table(rows))
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        with open(Path(output) / "dice.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return results


def load_test_cases(images: Path, labels: Path, channels: int, max_cases: int | None = None) -> list:
    """Test cases of ``images`` (CASE_XXXX files) with their label maps ``labels/CASE.nii.gz``."""
    from e3fast.evaluation.robustness import HeldOutCase
    from e3fast.inference.nifti_io import find_cases, read_image

    cases = []
    for case in find_cases([images], channels)[:max_cases]:
        label_path = _label_map_in(labels, case.name)
        if label_path is None:
            raise ValueError(f"no label map for case {case.name} in {labels}")
        loaded = read_image(case.channel_paths)
        label_map = _read_labels(label_path)
        if label_map.shape != loaded.image.shape[1:]:
            raise ValueError(f"{label_path}: shape {label_map.shape} differs from its image's {loaded.image.shape[1:]}")
        cases.append(HeldOutCase(case.name, loaded.image, label_map))
    return cases


def run_rotation_evaluation(args: argparse.Namespace) -> int:
    """Load the checkpoints and test cases of ``args``, run the rotation experiment, report it."""
    from tqdm import tqdm

    from e3fast.evaluation.report import summary_table, text_table, write_report
    from e3fast.evaluation.robustness import parse_angles, parse_axes, rotation_experiment, rotation_jobs
    from e3fast.inference.segmenter import segmenter_from_checkpoint

    angles, axes = parse_angles(args.angles), parse_axes(args.axes)
    names = args.name or [Path(c).parent.name or Path(c).stem for c in args.checkpoint]
    if len(names) != len(args.checkpoint) or len(set(names)) != len(names):
        raise ValueError(f"give one distinct --name per --checkpoint, got names {names}")
    segmenters, info = {}, None
    for name, checkpoint in zip(names, args.checkpoint):
        segmenters[name], this = segmenter_from_checkpoint(checkpoint, device=args.device, freeze=not args.no_freeze,
                                                           overlap=args.overlap, batch_size=args.batch_size)
        if info is not None and list(this.label_values) != list(info.label_values):
            raise ValueError(f"{checkpoint}: label values {this.label_values} differ from {info.label_values}")
        info = info or this
    images = args.images or Path(args.dataset) / "imagesTs"
    labels = args.labels or Path(args.dataset) / "labelsTs"
    cases = load_test_cases(images, labels, len(info.channel_names), args.max_cases)
    total = len(cases) * len(rotation_jobs(axes, angles)) * len(segmenters)
    with tqdm(total=total, desc="rotated predictions", unit="pred", disable=args.quiet) as bar:
        scores = rotation_experiment(segmenters, cases, info.label_values[1:], axes, angles,
                                     progress=lambda text: (bar.set_postfix_str(text[-40:]), bar.update()))
    print(text_table(summary_table(scores)))
    paths = write_report(scores, info.label_names[1:], args.output)
    for name, segmenter in segmenters.items():
        print(f"{name}: {segmenter.voxels_per_second:,.0f} voxels/s (sliding window)")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_evaluate_command(args: argparse.Namespace) -> int:
    """Dispatch ``e3fast evaluate`` to the folder Dice or the rotation experiment."""
    if args.rotations:
        if not args.checkpoint:
            raise SystemExit("e3fast evaluate --rotations needs at least one --checkpoint")
        if args.dataset is None and (args.images is None or args.labels is None):
            raise SystemExit("e3fast evaluate --rotations needs --dataset, or --images and --labels")
        return run_rotation_evaluation(args)
    if args.predictions is None or args.labels is None:
        raise SystemExit("e3fast evaluate needs --predictions and --labels (or --rotations)")
    evaluate_folders(args.predictions, args.labels, args.dataset_json, args.output)
    return 0


def add_evaluate_command(commands) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``e3fast`` subcommand parser ``commands``."""
    parser = commands.add_parser("evaluate", help="Dice of label maps; Dice vs rotation angle (--rotations)",
                                 description=__doc__.split("\n\n", 1)[1].replace("``", ""), formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--predictions", type=Path, help="folder of predicted label maps (CASE.nii.gz)")
    parser.add_argument("--labels", type=Path, help="folder of reference label maps (CASE.nii.gz)")
    parser.add_argument("--dataset-json", type=Path, help="dataset.json naming the labels (optional)")
    parser.add_argument("--rotations", action="store_true", help="run the rotation-robustness experiment")
    parser.add_argument("--checkpoint", "-c", type=Path, action="append", help="checkpoint (repeat for several models)")
    parser.add_argument("--name", action="append", help="display name per --checkpoint (default: its folder)")
    parser.add_argument("--dataset", type=Path, help="nnU-Net dataset folder (imagesTs, labelsTs)")
    parser.add_argument("--images", type=Path, help="folder of test images (CASE_0000.nii.gz ...)")
    parser.add_argument("--angles", default="0,45,90,135,180", help="degrees, comma-separated (0,45,90,135,180)")
    parser.add_argument("--axes", default="x,y,z", help="rotation axes, comma-separated (x,y,z)")
    parser.add_argument("--max-cases", type=int, help="evaluate the first N test cases only")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (0.5)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per network call (1)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--no-freeze", action="store_true", help="do not freeze the kernels before predicting")
    parser.add_argument("--output", "-o", type=Path, default=Path("evaluation"),
                        help="folder for the CSV, markdown and plot (./evaluation)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_evaluate_command)
    return parser
