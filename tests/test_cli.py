"""The command line: argument handling, the example's pieces, and a tiny end-to-end example run."""
import io

import pytest
import torch

from e3fast import cli
from e3fast.example import ExampleConfig, progress_line, quartile_labels, run_example, synthetic_task


def test_synthetic_task_has_balanced_quartile_labels():
    x, labels = synthetic_task(16, seed=1)
    assert x.shape == (1, 1, 16, 16, 16) and labels.shape == (1, 16, 16, 16)
    counts = torch.bincount(labels.flatten(), minlength=4)
    assert counts.tolist() == [16 ** 3 // 4] * 4
    assert torch.equal(quartile_labels(x[0, 0])[None], labels)


def test_progress_line_shows_step_bar_and_loss():
    assert progress_line(5, 20, 1.23456, 0.5) == "step  5/20 [#####---------------] loss 1.2346  accuracy  50.0%"


def test_example_trains_and_is_equivariant():
    out = io.StringIO()
    result = run_example(ExampleConfig(size=8, steps=3), out=out)
    assert len(result.losses) == 3 and result.losses[-1] < result.losses[0]
    assert result.equivariance_error_float64 < 1e-5 and result.is_equivariant
    text = out.getvalue()
    assert "step 3/3" in text and "steps/s" in text and "relative error" in text


def test_example_refuses_sizes_the_poolings_cannot_divide():
    with pytest.raises(SystemExit, match="multiple of 8"):
        cli.main(["example", "--size", "12"])


def test_bench_outside_a_source_checkout_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "missing.sh")
    with pytest.raises(SystemExit, match="source checkout"):
        cli.main(["bench"])


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "required: COMMAND" in capsys.readouterr().err


def test_bench_passes_unknown_arguments_to_pytest(monkeypatch, tmp_path):
    script = tmp_path / "run_cpu.sh"
    script.write_text("#!/usr/bin/env bash\necho \"$E3FAST_BENCH_SIZE $*\" > \"$(dirname \"$0\")/called\"\n")
    monkeypatch.setattr(cli, "BENCH_SCRIPT", script)
    assert cli.main(["bench", "--size", "16", "-k", "unet"]) == 0
    assert (tmp_path / "called").read_text() == "16 -k unet\n"


def test_other_commands_refuse_unknown_arguments():
    with pytest.raises(SystemExit):
        cli.main(["example", "--no-such-flag"])
