"""e3fast.data: nnU-Net v2 and MSD layouts, the dataset check's errors, normalization, reproducible
patch sampling and the step-indexed loader (tiny synthetic volumes written with nibabel)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from e3fast.data import DatasetError, check_dataset, load_dataset, normalize_channels, read_case
from e3fast.data.loader import step_loader
from e3fast.data.patch_sampler import (VALIDATION_STREAM, PatchSampler, TrainingCase, rotate_patch,
                                      rotation90_planes, rotation_crop_size)
from e3fast.data.training_cases import cases_off_spacing, load_training_cases, median_spacing
from e3fast.models import build_model, equivariant_model_config, plain_model_config
from e3fast.testing.synthetic_datasets import affine_for, write_msd_dataset, write_nnunet_dataset


@pytest.fixture
def nnunet_root(tmp_path):
    return write_nnunet_dataset(tmp_path / "Dataset001_Synthetic", num_cases=2, shape=(8, 9, 10),
                                spacing=(1.0, 1.5, 2.0))


@pytest.fixture
def msd_root(tmp_path):
    return write_msd_dataset(tmp_path / "Task01_Synthetic", num_cases=2, shape=(8, 9, 10), spacing=(0.5, 1.0, 2.0))


def test_nnunet_layout_is_listed_and_read_as_stored(nnunet_root):
    dataset = load_dataset(nnunet_root)
    assert dataset.layout == "nnunet"
    assert dataset.channel_names == ["modality0", "modality1"]
    assert dataset.labels == {"background": 0, "class1": 1, "class2": 2}
    assert [case.name for case in dataset.training] == ["case_000", "case_001"]
    assert [case.name for case in dataset.test] == ["case_002"] and dataset.test[0].label_path is None
    assert [path.name for path in dataset.training[1].image_paths] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    volume = read_case(dataset.training[0])
    assert volume.image.dtype == np.float32 and volume.image.shape == (2, 8, 9, 10)
    assert volume.label.dtype == np.int64 and volume.label.shape == (8, 9, 10)
    assert volume.spacing == (1.0, 1.5, 2.0)
    np.testing.assert_array_equal(volume.affine, affine_for((1.0, 1.5, 2.0)))
    stored = np.asarray(nib.load(str(dataset.training[0].image_paths[1])).dataobj)
    np.testing.assert_array_equal(volume.image[1], stored)
    assert read_case(dataset.test[0]).label is None


def test_msd_layout_splits_4d_images_into_channels(msd_root):
    dataset = load_dataset(msd_root)
    assert dataset.layout == "msd" and dataset.num_channels == 2 and dataset.num_classes == 3
    assert dataset.label_names == ["background", "class1", "class2"] and len(dataset.test) == 1
    volume = read_case(dataset.training[1])
    stored = np.asarray(nib.load(str(dataset.training[1].image_paths[0])).dataobj)
    assert stored.shape == (8, 9, 10, 2) and volume.image.shape == (2, 8, 9, 10)
    np.testing.assert_array_equal(volume.image[1], stored[..., 1])
    assert volume.spacing == (0.5, 1.0, 2.0)
    assert set(np.unique(volume.label)) <= {0, 1, 2}


def test_check_passes_and_summarizes(nnunet_root, msd_root):
    for root in (nnunet_root, msd_root):
        report = check_dataset(root)
        assert len(report.shapes) == 3 and sum(report.label_counts.values()) == 2 * 8 * 9 * 10
        assert "labels: 0=background" in report.summary()


def _rewrite(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))


def test_check_names_a_missing_channel_file(nnunet_root):
    (nnunet_root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_001_0001.nii.gz: file not found"):
        check_dataset(nnunet_root)


def test_check_names_a_channel_file_dataset_json_does_not_declare(nnunet_root):
    _rewrite(nnunet_root / "imagesTr" / "case_000_0002.nii.gz", np.zeros((8, 9, 10), np.float32),
             affine_for((1, 1.5, 2)))
    with pytest.raises(DatasetError, match="case_000_0002.nii.gz: channel file not declared"):
        check_dataset(nnunet_root)


def test_check_names_a_channel_of_another_shape(nnunet_root):
    _rewrite(nnunet_root / "imagesTr" / "case_000_0001.nii.gz", np.zeros((8, 9, 11), np.float32),
             affine_for((1, 1.5, 2)))
    with pytest.raises(DatasetError, match=r"case_000_0001.nii.gz: shape \(8, 9, 11\) differs"):
        check_dataset(nnunet_root)


def test_check_names_a_label_of_another_shape_or_affine(nnunet_root, msd_root):
    _rewrite(nnunet_root / "labelsTr" / "case_001.nii.gz", np.zeros((8, 9, 10), np.uint8), affine_for((1, 1, 1)))
    with pytest.raises(DatasetError, match="labelsTr/case_001.nii.gz: affine differs"):
        check_dataset(nnunet_root)
    _rewrite(msd_root / "labelsTr" / "case_000.nii.gz", np.zeros((8, 9, 9), np.uint8), affine_for((0.5, 1, 2)))
    with pytest.raises(DatasetError, match=r"labelsTr/case_000.nii.gz: label shape \(8, 9, 9\)"):
        check_dataset(msd_root)


def test_check_names_a_label_with_undeclared_values(nnunet_root):
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2, 2, 2] = 7
    _rewrite(nnunet_root / "labelsTr" / "case_000.nii.gz", labels, affine_for((1, 1.5, 2)))
    with pytest.raises(DatasetError, match=r"case_000.nii.gz: label values \[7\] are not declared"):
        check_dataset(nnunet_root)


def test_check_names_an_unreadable_file(nnunet_root, msd_root):
    (nnunet_root / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DatasetError, match="case_001_0000.nii.gz: unreadable image"):
        check_dataset(nnunet_root)
    (msd_root / "labelsTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="labelsTr/case_001.nii.gz: unreadable"):
        check_dataset(msd_root)


def test_check_names_an_msd_image_with_the_wrong_channel_count(msd_root):
    _rewrite(msd_root / "imagesTr" / "case_001.nii.gz", np.zeros((8, 9, 10, 3), np.float32), affine_for((0.5, 1, 2)))
    with pytest.raises(DatasetError, match=r"case_001.nii.gz: shape \(8, 9, 10, 3\) does not hold the 2 channel"):
        check_dataset(msd_root)


def test_bad_descriptions_are_named(tmp_path, nnunet_root):
    with pytest.raises(DatasetError, match="dataset.json: missing"):
        load_dataset(tmp_path)
    description = json.loads((nnunet_root / "dataset.json").read_text())
    description["labels"] = {"background": 0, "tumour": 2}
    (nnunet_root / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError, match=r"dataset.json: label values must be 0..1"):
        load_dataset(nnunet_root)
    (nnunet_root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json: unreadable JSON"):
        load_dataset(nnunet_root)


def test_normalize_channels_standardizes_over_the_nonzero_mask():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 6, 6, 6), np.float32)
    image[:, 1:5, 1:5, 1:5] = rng.normal([[[[3.0]]], [[[-7.0]]]], [[[[2.0]]], [[[0.5]]]], size=(2, 4, 4, 4))
    out = normalize_channels(image)
    inside = np.zeros((6, 6, 6), bool)
    inside[1:5, 1:5, 1:5] = True
    np.testing.assert_allclose(out[:, inside].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, inside].std(1), 1, atol=1e-5)
    assert (out[:, ~inside] == 0).all()
    everywhere = normalize_channels(image, use_nonzero_mask=False)
    np.testing.assert_allclose(everywhere.reshape(2, -1).mean(1), 0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[channels, x, y, z\]"):
        normalize_channels(image[0])


def _toy_case(shape=(10, 10, 10)) -> TrainingCase:
    labels = np.zeros(shape, np.uint8)
    labels[7:9, 1:3, 4:6] = 1
    image = np.random.default_rng(1).normal(size=(1,) + shape).astype(np.float32)
    return TrainingCase("toy", image, labels, {1: np.argwhere(labels == 1).astype(np.int32)})


def test_batches_are_a_pure_function_of_seed_step_and_rank():
    sampler = PatchSampler([_toy_case()], (6, 6, 6), seed=3, rotation_degrees=20, rotate90=True)
    images, labels = sampler.batch(5, 2)
    again = PatchSampler([_toy_case()], (6, 6, 6), seed=3, rotation_degrees=20, rotate90=True).batch(5, 2)
    assert images.shape == (2, 1, 6, 6, 6) and labels.shape == (2, 6, 6, 6) and labels.dtype == torch.int64
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(images, sampler.batch(6, 2)[0])
    assert not torch.equal(images, sampler.batch(5, 2, rank=1)[0])
    validation = PatchSampler([_toy_case()], (6, 6, 6), seed=3, rotation_degrees=20, rotate90=True,
                              stream=VALIDATION_STREAM)
    assert not torch.equal(images, validation.batch(5, 2)[0])


def test_foreground_oversampling_centres_patches_on_foreground():
    always = PatchSampler([_toy_case()], (3, 3, 3), foreground_fraction=1.0)
    never = PatchSampler([_toy_case()], (3, 3, 3), foreground_fraction=0.0)
    assert all(always.sample(step)[1][1, 1, 1] == 1 for step in range(20))
    assert sum(int(never.sample(step)[1][1, 1, 1]) for step in range(40)) < 10


def test_rotation90_planes_need_equal_sizes_and_spacing():
    assert rotation90_planes((8, 8, 8), (1, 1, 1)) == [(0, 1), (0, 2), (1, 2)]
    assert rotation90_planes((8, 8, 4), (1, 1, 1)) == [(0, 1)]
    assert rotation90_planes((8, 8, 8), (1, 1, 3)) == [(0, 1)]


def test_unrotated_small_rotation_is_the_plain_patch():
    case = _toy_case((12, 12, 12))
    plain = PatchSampler([case], (6, 6, 6), seed=0)
    rotating = PatchSampler([case], (6, 6, 6), seed=0, rotation_degrees=1e-9)
    # Same draws up to the rotation (which takes two more random numbers after the centre).
    image, labels = plain.sample(0)
    rotated_image, rotated_labels = rotating.sample(0)
    torch.testing.assert_close(rotated_image, image, atol=1e-5, rtol=0)
    assert torch.equal(rotated_labels, labels)


def test_loader_restarted_at_a_step_yields_that_steps_batches():
    sampler = PatchSampler([_toy_case()], (4, 4, 4), seed=1)
    batches = list(step_loader(sampler, batch_size=2, first_step=3, last_step=6))
    assert len(batches) == 3
    for step, (images, labels) in zip(range(3, 6), batches):
        expected = sampler.batch(step, 2)
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])


def test_training_cases_hold_normalized_images_and_class_locations(nnunet_root):
    dataset = load_dataset(nnunet_root)
    case = load_training_cases(dataset.training[:1], dataset.num_classes)[0]
    assert case.labels.dtype == np.uint8 and case.spacing == (1.0, 1.5, 2.0)
    for label, locations in case.class_locations.items():
        assert (case.labels[tuple(locations.T)] == label).all()
    assert abs(float(case.image[0][case.image[0] != 0].mean())) < 1e-4


def test_build_model_from_plain_dicts():
    equivariant = build_model(equivariant_model_config(2, 3, (1.0, 1.0, 2.0), width=1, n_downsample=1))
    plain = build_model(plain_model_config(2, 3, features=4, n_downsample=1, kernel_size=3))
    x = torch.randn(1, 2, 6, 6, 4)
    assert equivariant(x).shape == plain(x).shape == (1, 3, 6, 6, 4)
    with pytest.raises(ValueError, match="model_config\\['model'\\]"):
        build_model({"model": "resnet", "in_channels": 1, "num_classes": 2})
    with pytest.raises(ValueError, match="unknown plain model_config keys \\['width'\\]"):
        build_model({"model": "plain", "in_channels": 1, "num_classes": 2, "width": 3})
    with pytest.raises(TypeError, match="must be a dict"):
        build_model(["plain"])


def test_cases_off_the_median_spacing_are_named():
    cases = [TrainingCase(name, np.zeros((1, 2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), spacing=spacing)
             for name, spacing in (("a", (1.0, 1.0, 2.0)), ("b", (1.0, 1.05, 2.0)), ("c", (1.0, 1.0, 3.0)))]
    spacing = median_spacing(case.spacing for case in cases)
    assert spacing == (1.0, 1.0, 2.0)
    assert cases_off_spacing(cases, spacing) == ["c"]


def test_rotation_crops_cover_rotated_patches_of_any_shape():
    patch = (4, 12, 6)
    for axis in range(3):
        plane_size = max(n for a, n in enumerate(patch) if a != axis)
        crop = [n if a == axis else rotation_crop_size(n, plane_size) for a, n in enumerate(patch)]
        assert all((c - n) % 2 == 0 for c, n in zip(crop, patch))
        for degrees in (-45.0, 30.0, 45.0):
            image, labels = rotate_patch(torch.ones(1, *crop), torch.ones(crop, dtype=torch.int64), axis, degrees,
                                         patch)
            assert image.shape == (1, *patch) and labels.all(), (axis, degrees)
            torch.testing.assert_close(image, torch.ones(1, *patch))
