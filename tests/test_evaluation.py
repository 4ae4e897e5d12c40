"""Dice, rotations of test cases, the rotation experiment and its report, and a tiny end-to-end run
(``e3fast train`` -> ``e3fast predict`` -> ``e3fast evaluate``)."""
from __future__ import annotations

import csv
import math

import nibabel
import numpy as np
import pytest

from e3fast import cli
from e3fast.evaluation.dice import dice_per_class, mean_foreground_dice
from e3fast.evaluation.report import summary_table, write_report
from e3fast.evaluation.robustness import (RotationScore, HeldOutCase, mean_dice_by_angle, parse_angles, parse_axes,
                                          rotation_experiment, rotation_jobs)
from e3fast.evaluation.rotation import ROTATION_PLANES, cube_edge, pad_to_cube, rotate_case, rotate_volume


def test_dice_on_hand_made_label_maps():
    reference = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    prediction = np.array([[0, 1, 2, 2], [1, 1, 2, 2]])
    dice = dice_per_class(prediction, reference, [1, 2, 3])
    # class 1: |P|=3, |R|=3, overlap 2 -> 4/6; class 2: |P|=4, |R|=3, overlap 3 -> 6/7; class 3 absent: NaN
    assert dice[0] == pytest.approx(2 / 3) and dice[1] == pytest.approx(6 / 7) and math.isnan(dice[2])
    assert mean_foreground_dice(dice) == pytest.approx((2 / 3 + 6 / 7) / 2)
    assert dice_per_class(reference, reference, [1, 2]).tolist() == [1.0, 1.0]
    assert dice_per_class(np.zeros((2, 2)), np.ones((2, 2)), [1]).tolist() == [0.0]
    assert math.isnan(mean_foreground_dice(np.array([np.nan])))
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(np.zeros((2, 2)), np.zeros((2, 3)), [1])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_label_rotation_by_90_degrees_is_rot90(axis):
    labels = np.random.default_rng(axis).integers(0, 5, size=(9, 9, 9)).astype(np.uint8)
    plane = ROTATION_PLANES[axis]
    assert np.array_equal(rotate_volume(labels, axis, 90, order=0), np.rot90(labels, 1, plane))
    assert np.array_equal(rotate_volume(labels, axis, -90, order=0), np.rot90(labels, -1, plane))
    assert np.array_equal(rotate_volume(labels, axis, 180, order=0), np.rot90(labels, 2, plane))
    # The resampling path (any other angle) turns the same way: just short of 90 it equals rot90
    # (inside: the outermost voxels of the plane land a hair outside the canvas and become 0).
    inside = tuple(slice(1, -1) if a in plane else slice(None) for a in range(3))
    assert np.array_equal(rotate_volume(labels, axis, 89.999, order=0)[inside], np.rot90(labels, 1, plane)[inside])


def test_rotate_volume_needs_a_square_plane():
    with pytest.raises(ValueError, match="not square"):
        rotate_volume(np.zeros((4, 5, 5)), 2, 45, order=0)
    with pytest.raises(ValueError, match="axis"):
        rotate_volume(np.zeros((4, 4, 4)), 3, 45, order=0)


def test_rotate_case_keeps_the_background_zero_and_labels_integer():
    grid = np.stack(np.meshgrid(*[np.arange(15) - 7] * 3, indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    labels = (radius < 6).astype(np.uint8) + (np.abs(grid[0]) < 2) * (radius < 6)
    image = np.stack([np.where(labels > 0, 1.0 + labels + 0.1 * grid[1], 0.0)]).astype(np.float32)
    rotated, rotated_labels = rotate_case(image, labels, axis=2, degrees=45)
    assert rotated.shape == image.shape and rotated_labels.dtype == labels.dtype
    assert set(np.unique(rotated_labels)) <= {0, 1, 2}
    assert np.all(rotated[0][rotated_labels == 0][radius[rotated_labels == 0] > 7] == 0)
    assert abs(int((rotated_labels > 0).sum()) - int((labels > 0).sum())) < 0.05 * (labels > 0).sum()


def test_cube_canvas():
    assert cube_edge((10, 12, 7)) == 12
    assert cube_edge((10, 11, 7), window=(16, 16, 16)) == 12  # 16 - 11 is odd
    volume = np.ones((2, 3, 5, 4))
    cube = pad_to_cube(volume, 5)
    assert cube.shape == (2, 5, 5, 5) and cube.sum() == volume.sum() and cube[:, 1:4, :, 0:4].sum() == volume.sum()


def test_rotation_jobs_and_argument_parsing():
    assert rotation_jobs(["x", "y"], [0, 45, 360]) == [("-", 0.0), ("x", 45.0), ("y", 45.0)]
    assert parse_angles("0, 22.5,90") == [0.0, 22.5, 90.0]
    assert parse_axes("z,x") == ["z", "x"]
    with pytest.raises(ValueError, match="numbers"):
        parse_angles("0,ninety")
    with pytest.raises(ValueError, match="x,y,z"):
        parse_axes("x,w")


class IntensitySegmenter:
    """Labels by intensity thresholds: rotation invariant, so every angle scores like 0 degrees."""

    patch_size = (8, 8, 8)

    def segment(self, image):
        return np.digitize(image[0], [0.5, 1.5]).astype(np.int64)


class FixedSegmenter:
    """Always the same map (the unrotated labels): it fails as soon as the case turns."""

    patch_size = (8, 8, 8)

    def __init__(self, labels):
        self.labels = labels

    def segment(self, image):
        return self.labels


def test_rotation_experiment_and_report(tmp_path):
    labels = np.zeros((10, 10, 10), np.int64)
    labels[2:8, 3:9, 1:5] = 1
    labels[3:5, 3:9, 5:9] = 2
    image = labels[None].astype(np.float32)
    cases = [HeldOutCase("case", image, labels)]
    segmenters = {"invariant": IntensitySegmenter(), "fixed": FixedSegmenter(labels)}
    scores = rotation_experiment(segmenters, cases, [1, 2], axes=["x", "z"], angles=[0, 90])
    assert len(scores) == 2 * 2 * 2  # models x axes x angles (0 degrees shared by the axes)
    means = mean_dice_by_angle(scores)
    assert means[("invariant", 0.0)] == 1 and means[("invariant", 90.0)] == 1
    assert means[("fixed", 0.0)] == 1 and means[("fixed", 90.0)] < 0.5
    table = summary_table(scores)
    assert table[0] == ["degrees", "invariant Dice", "invariant change", "fixed Dice", "fixed change"]
    assert table[2][0] == "90" and table[2][2] == "+0.000"
    paths = write_report(scores, ["one", "two"], tmp_path / "report")
    assert paths["plot"].stat().st_size > 5000 and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "| degrees | invariant Dice" in paths["markdown"].read_text()
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 8 and set(rows[0]) == {"model", "case", "axis", "degrees", "mean_dice", "one", "two"}


def test_scores_keep_the_case_and_axis():
    score = RotationScore("m", "c", "x", 45.0, np.array([0.5]), 0.5)
    assert (score.model, score.case, score.axis, score.degrees) == ("m", "c", "x", 45.0)


def test_train_predict_evaluate_end_to_end(tmp_path, capsys):
    from e3fast.testing.synthetic_datasets import write_nnunet_dataset
    from e3fast.training import TrainConfig, train

    dataset = write_nnunet_dataset(tmp_path / "data", num_cases=3, shape=(12, 12, 12), num_channels=1,
                                   num_classes=3, num_test=1)
    result = train(TrainConfig(dataset=str(dataset), output_dir=str(tmp_path / "model"), model="equivariant",
                               steps=3, batch_size=1, patch_size=(8, 8, 8), width=1, n_downsample=1, lmax=1,
                               num_radial_basis=2, kernel_voxels=3, validation_fraction=0.0, num_workers=0,
                               progress=False, loss="dice_ce"))
    predictions = tmp_path / "predictions"
    assert cli.main(["predict", str(dataset / "imagesTr"), "-c", str(result.checkpoint_path), "-o", str(predictions),
                     "--quiet", "--overlap", "0.5"]) == 0
    written = sorted(p.name for p in predictions.iterdir())
    assert written == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    prediction = nibabel.load(str(predictions / "case_000.nii.gz"))
    source = nibabel.load(str(dataset / "imagesTr" / "case_000_0000.nii.gz"))
    assert prediction.shape == source.shape and np.allclose(prediction.affine, source.affine)
    assert prediction.get_data_dtype() == np.uint8 and set(np.unique(prediction.dataobj)) <= {0, 1, 2}

    assert cli.main(["evaluate", "--predictions", str(predictions), "--labels", str(dataset / "labelsTr"),
                     "--dataset-json", str(dataset / "dataset.json"), "-o", str(tmp_path / "dice")]) == 0
    assert "class1" in capsys.readouterr().out
    rows = list(csv.reader(open(tmp_path / "dice" / "dice.csv")))
    assert rows[0] == ["case", "mean", "class1", "class2"] and len(rows) == 5
    assert all(0 <= float(value) <= 1 for row in rows[1:] for value in row[1:])

    report = tmp_path / "rotations"
    assert cli.main(["evaluate", "--rotations", "-c", str(result.checkpoint_path), "--name", "eq",
                     "--images", str(dataset / "imagesTr"), "--labels", str(dataset / "labelsTr"),
                     "--angles", "0,90", "--axes", "z", "--max-cases", "1", "-o", str(report), "--quiet"]) == 0
    scores = list(csv.DictReader(open(report / "rotation_scores.csv")))
    assert [(row["axis"], row["degrees"]) for row in scores] == [("z", "0"), ("z", "90")]
    # An equivariant network: the 90-degree Dice equals the 0-degree Dice.
    assert abs(float(scores[0]["mean_dice"]) - float(scores[1]["mean_dice"])) < 1e-3
    assert (report / "dice_vs_angle.png").is_file() and (report / "rotation_summary.md").is_file()


def test_evaluate_command_errors(tmp_path):
    with pytest.raises(SystemExit, match="--predictions"):
        cli.main(["evaluate"])
    with pytest.raises(SystemExit, match="--checkpoint"):
        cli.main(["evaluate", "--rotations", "--dataset", str(tmp_path)])
