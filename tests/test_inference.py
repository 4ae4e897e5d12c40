"""Sliding-window inference, NIfTI in/out and the Segmenter (``e3fast predict``'s pieces)."""
from __future__ import annotations

import math

import nibabel
import numpy as np
import pytest
import torch

from e3fast.inference.nifti_io import find_cases, group_cases, label_dtype, read_image, write_label_map
from e3fast.inference.segmenter import Segmenter
from e3fast.inference.sliding_window import (gaussian_importance, sliding_window_inference, symmetric_padding,
                                             window_starts)
from e3fast.models import EquivariantUNet, PlainUNet


@pytest.mark.parametrize("length,window,overlap", [(8, 8, 0.5), (9, 8, 0.5), (20, 8, 0.5), (23, 8, 0.5),
                                                   (37, 16, 0.5), (56, 32, 0.25), (40, 32, 0.5), (17, 5, 0.0)])
def test_window_starts_are_symmetric_and_cover_the_volume(length, window, overlap):
    starts = window_starts(length, window, overlap)
    span, stride = length - window, max(1, int(window * (1 - overlap)))
    assert starts[0] == 0 and starts[-1] == span
    assert starts == sorted(span - s for s in starts)  # mirror symmetric
    assert all(0 < b - a <= stride + 1 for a, b in zip(starts, starts[1:]))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()
    assert len(starts) <= math.ceil(span / stride) + 2  # no more windows than MONAI's count (+1 mirror)


def test_window_starts_rejects_bad_input():
    with pytest.raises(ValueError, match="pad the volume"):
        window_starts(4, 8)
    with pytest.raises(ValueError, match="overlap"):
        window_starts(16, 8, 1.0)


def test_gaussian_importance_matches_the_formula():
    window = (8, 6, 10)
    weights = gaussian_importance(window, 0.125, dtype=torch.float64)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in window], indexing="ij")
    expected = torch.exp(-0.5 * sum((g / (0.125 * n)) ** 2 for g, n in zip(grids, window)))
    expected = expected / expected.max()
    torch.testing.assert_close(weights, expected.clamp_min(expected[expected > 0].min()))
    assert weights.max() <= 1 and weights.min() > 0
    for axis in range(3):  # symmetric under flips of every axis
        assert torch.equal(weights, weights.flip(axis))
    # one standard deviation from the centre along x: exp(-1/2) relative to the centre row
    odd = gaussian_importance((9, 1, 1), 0.125, dtype=torch.float64)[:, 0, 0]
    assert odd[4] == 1 and abs(odd[4 + 1] - math.exp(-0.5 / (0.125 * 9) ** 2)) < 1e-12


def _brute_force(volume, window, predict, overlap, sigma_scale):
    """Voxel by voxel: the Gaussian-weighted mean of the predictions of every window containing it."""
    _, _, *shape = volume.shape
    pads = symmetric_padding(shape, window)
    padded = torch.nn.functional.pad(volume, [p for pair in reversed(pads) for p in pair])
    padded_shape = padded.shape[2:]
    starts = [window_starts(n, w, overlap) for n, w in zip(padded_shape, window)]
    weights = gaussian_importance(window, sigma_scale, dtype=torch.float64)
    outputs = {}
    for a in starts[0]:
        for b in starts[1]:
            for c in starts[2]:
                outputs[(a, b, c)] = predict(padded[:, :, a:a + window[0], b:b + window[1], c:c + window[2]])
    classes = next(iter(outputs.values())).shape[1]
    result = torch.zeros((volume.shape[0], classes, *padded_shape), dtype=torch.float64)
    for x in range(padded_shape[0]):
        for y in range(padded_shape[1]):
            for z in range(padded_shape[2]):
                numerator, denominator = 0, 0
                for (a, b, c), out in outputs.items():
                    if a <= x < a + window[0] and b <= y < b + window[1] and c <= z < c + window[2]:
                        w = weights[x - a, y - b, z - c]
                        numerator = numerator + w * out[:, :, x - a, y - b, z - c]
                        denominator = denominator + w
                result[:, :, x, y, z] = numerator / denominator
    (x0, x1), (y0, y1), (z0, z1) = pads
    return result[:, :, x0:padded_shape[0] - x1, y0:padded_shape[1] - y1, z0:padded_shape[2] - z1]


@pytest.mark.parametrize("shape,window,overlap,batch_size", [((2, 2, 9, 7, 6), (4, 4, 4), 0.5, 3),
                                                             ((1, 2, 6, 4, 10), (6, 6, 4), 0.25, 1)])
def test_sliding_window_matches_brute_force(shape, window, overlap, batch_size):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1).double()  # zero padding: depends on the window's position

    def predict(x):
        return conv(x.double()) ** 2

    volume = torch.randn(shape, dtype=torch.float64)
    calls = []
    result = sliding_window_inference(volume, window, predict, overlap, 0.125, batch_size,
                                      progress=lambda done, total: calls.append((done, total)))
    expected = _brute_force(volume, window, predict, overlap, 0.125)
    assert result.dtype == torch.float32 and result.shape == (shape[0], 3, *shape[2:])
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
    assert calls[-1][0] == calls[-1][1]


def test_sliding_window_refuses_odd_padding_and_bad_predictions():
    with pytest.raises(ValueError, match="odd number"):
        sliding_window_inference(torch.zeros(1, 1, 7, 8, 8), (8, 8, 8), lambda x: x)
    with pytest.raises(ValueError, match="predict returned"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 8), (8, 8, 8), lambda x: x[..., :4])
    with pytest.raises(ValueError, match="batch, channels"):
        sliding_window_inference(torch.zeros(1, 8, 8, 8), (8, 8, 8), lambda x: x)


@pytest.mark.parametrize("shape,plane", [((12, 12, 10), (0, 1)), ((6, 12, 9), (2, 1)), ((10, 14, 12), (0, 2))])
def test_rotated_volume_gives_the_rotated_prediction(shape, plane):
    """An exactly equivariant network (float64) through symmetric windows: predictions rotate exactly,
    including axes padded up to the window and axes with an odd span."""
    torch.manual_seed(1)
    model = EquivariantUNet("1x0e", "3x0e", diameter=3, num_radial_basis=2, steps=(1, 1, 1), n=1, n_downsample=1,
                            lmax=1, channels_last=False).double().eval()
    window = (8, 8, 8)
    volume = torch.randn(1, 1, *shape, dtype=torch.float64)

    def predict(x):
        return model(x.double()).double()

    with torch.no_grad():
        plain = sliding_window_inference(volume, window, predict)
        rotated = sliding_window_inference(torch.rot90(volume, 1, (2 + plane[0], 2 + plane[1])), window, predict)
    expected = torch.rot90(plain, 1, (2 + plane[0], 2 + plane[1]))
    assert (rotated - expected).abs().max() < 1e-5 * plain.abs().max()  # float32 accumulation of float64 logits


def test_nonequivariant_network_is_not_rotation_exact():
    """The rotation test above can fail: a plain CNN's predictions do not rotate."""
    torch.manual_seed(1)
    model = PlainUNet(1, 3, features=4, n_downsample=1, kernel_size=3).double().eval()
    volume = torch.randn(1, 1, 12, 12, 10, dtype=torch.float64)
    with torch.no_grad():
        plain = sliding_window_inference(volume, (8, 8, 8), model)
        rotated = sliding_window_inference(torch.rot90(volume, 1, (2, 3)), (8, 8, 8), model)
    assert (rotated - torch.rot90(plain, 1, (2, 3))).abs().max() > 1e-3


def _save(array, path, affine, **header_fields):
    image = nibabel.Nifti1Image(array, affine)
    for key, value in header_fields.items():
        image.header[key] = value
    image.set_qform(affine, 1)
    image.set_sform(affine, 4)
    nibabel.save(image, str(path))
    return path


AFFINE = np.array([[0.0, -1.5, 0.1, 20.0], [1.2, 0.0, 0.0, -30.0], [0.0, 0.2, 2.0, 5.5], [0, 0, 0, 1]])


def test_label_map_keeps_the_input_affine_and_header(tmp_path):
    source = _save(np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32) * 100,
                   tmp_path / "case_0000.nii.gz", AFFINE, descrip=b"scanner T1", xyzt_units=10)
    loaded = read_image([source])
    assert loaded.image.shape == (1, 5, 6, 7) and loaded.image.dtype == np.float32
    labels = np.random.default_rng(1).integers(0, 4, size=(5, 6, 7))
    path = write_label_map(labels, loaded.affine, loaded.header, tmp_path / "out" / "case.nii.gz", [0, 1, 2, 3])
    written = nibabel.load(str(path))
    original = nibabel.load(str(source))
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    np.testing.assert_allclose(written.get_qform(), original.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.get_sform(), original.get_sform(), atol=1e-6)
    for key in ("qform_code", "sform_code", "pixdim", "descrip", "xyzt_units", "dim"):
        assert np.array_equal(written.header[key], original.header[key]), key
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), labels)


def test_label_dtype_widens_to_int16_and_refuses_more():
    assert label_dtype([0, 1, 255]) == np.uint8
    assert label_dtype([0, 300]) == np.int16 and label_dtype([-1, 2]) == np.int16
    with pytest.raises(ValueError, match="int16"):
        label_dtype([0, 70000])


def test_cases_are_grouped_by_channel(tmp_path):
    for name in ("a_0000", "a_0001", "b_0000", "b_0001"):
        _save(np.zeros((2, 2, 2), np.float32), tmp_path / f"{name}.nii.gz", np.eye(4))
    cases = find_cases([tmp_path], channels=2)
    assert [c.name for c in cases] == ["a", "b"] and [p.name for p in cases[0].channel_paths] == \
        ["a_0000.nii.gz", "a_0001.nii.gz"]
    with pytest.raises(ValueError, match="channels"):
        find_cases([tmp_path], channels=3)
    with pytest.raises(ValueError, match="CASE_0000"):
        group_cases([tmp_path / "scan.nii.gz"], channels=2)
    assert group_cases([tmp_path / "scan.nii.gz"], channels=1)[0].name == "scan"
    with pytest.raises(ValueError, match="not a NIfTI"):
        group_cases([tmp_path / "notes.txt"], channels=1)


def test_segmenter_maps_classes_to_label_values_and_checks_the_window():
    torch.manual_seed(0)
    model = PlainUNet(1, 3, features=2, n_downsample=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"pooling factors \(4, 4, 4\)"):
        Segmenter(model, (8, 8, 6), [0, 5, 9])
    segmenter = Segmenter(model, (8, 8, 8), [0, 5, 9])
    labels = segmenter.segment(np.random.default_rng(0).normal(size=(1, 10, 8, 12)).astype(np.float32))
    assert labels.shape == (10, 8, 12) and set(np.unique(labels)) <= {0, 5, 9}
    assert segmenter.voxels_per_second > 0
    anisotropic = EquivariantUNet("1x0e", "2x0e", 3, 2, (1.0, 1.0, 2.0), n=1, n_downsample=1, lmax=1)
    assert Segmenter(anisotropic, (8, 8, 6), [0, 1]).patch_size == (8, 8, 6)  # no pooling along z


def test_freeze_is_used_when_this_build_has_it(monkeypatch):
    import e3fast
    from e3fast.inference.segmenter import freeze_if_available

    model = PlainUNet(1, 2, features=2, n_downsample=1, kernel_size=3)
    monkeypatch.delattr(e3fast, "freeze", raising=False)
    assert freeze_if_available(model) is False
    frozen = []
    monkeypatch.setattr(e3fast, "freeze", frozen.append, raising=False)
    assert freeze_if_available(model) is True and frozen == [model]
