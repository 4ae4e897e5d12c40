"""e3fast.training and ``e3fast train``: a few steps on tiny synthetic datasets through the API and
the CLI, exact resumption after ``kill -9``, a 2-process torchrun (gloo) run, the stopping rules and
the checkpoint round trip. Tiny models (width 1, one pooling level, 12^3 patches), one thread."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from e3fast.data import DatasetError
from e3fast.models import EquivariantUNet, PlainUNet
from e3fast.training import TrainConfig, load_checkpoint, train
from e3fast.training.losses import segmentation_loss, soft_dice
from e3fast.testing.synthetic_datasets import write_msd_dataset, write_nnunet_dataset

REPOSITORY = Path(__file__).resolve().parent.parent
TINY = dict(batch_size=1, patch_size=(12, 12, 12), width=1, features=4, n_downsample=1, kernel_voxels=3,
            num_workers=0, threads=1, progress=False, validate_every=2, validation_patches=2)
TINY_ARGS = ["--batch-size", "1", "--patch-size", "12", "--width", "1", "--features", "4", "--n-downsample", "1",
             "--kernel-voxels", "3", "--num-workers", "0", "--threads", "1", "--validate-every", "2",
             "--validation-patches", "2"]


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory):
    return write_nnunet_dataset(tmp_path_factory.mktemp("data") / "nnunet", num_cases=3, shape=(12, 12, 12),
                                spacing=(1.0, 1.0, 1.5))


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    return write_msd_dataset(tmp_path_factory.mktemp("data") / "msd", num_cases=3, shape=(12, 14, 12))


def _environment() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(proxy, None)
    return env


def _run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e3fast", "train", *map(str, args)], capture_output=True, text=True,
                          env=_environment(), timeout=timeout, cwd=REPOSITORY)


def _losses(metrics: Path) -> list[tuple[str, str, str]]:
    with open(metrics, newline="") as handle:
        return [(row["step"], row["loss"], row["val_loss"]) for row in csv.DictReader(handle)]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a non-local connection fails the test."""
    connect = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def test_api_trains_and_the_checkpoint_gives_a_working_model(nnunet_root, tmp_path, no_network):
    result = train(TrainConfig(nnunet_root, tmp_path / "run", steps=4, checkpoint_every=3, **TINY))
    assert result.stop_reason == "steps" and not result.stopped_early and result.last_step == 4
    assert [row["step"] for row in result.history] == [1, 2, 3, 4]
    for row in result.history:
        assert row["loss"] > 0 and row["seconds"] > 0 and row["voxels_per_second"] > 0
    assert result.history[1]["val_loss"] is not None and result.history[0]["val_loss"] is None
    assert _losses(result.metrics_path)[-1][:2] == ("4", repr(result.history[-1]["loss"]))
    assert sorted(path.name for path in result.checkpoint_path.parent.iterdir()) == ["checkpoint.pt", "metrics.csv"]

    model, info = load_checkpoint(result.checkpoint_path)
    assert isinstance(model, EquivariantUNet) and not model.training
    assert info.label_names == ["background", "class1", "class2"] and info.label_values == [0, 1, 2]
    assert info.channel_names == ["modality0", "modality1"] and info.spacing == (1.0, 1.0, 1.5)
    assert info.patch_size == (12, 12, 12) and info.last_step == 4 and info.weights == "best"
    assert info.step in (2, 4) and info.model_config["steps"] == [1.0, 1.0, 1.5]
    last, last_info = load_checkpoint(result.checkpoint_path, weights="last")
    assert last_info.step == 4
    with torch.no_grad():
        assert model(torch.randn(1, 2, 12, 12, 12)).shape == (1, 3, 12, 12, 12)


def test_cli_trains_a_plain_unet_on_an_msd_dataset_with_a_progress_bar(msd_root, tmp_path):
    checked = _run_cli(msd_root, "--check-only")
    assert checked.returncode == 0 and "msd layout, 3 training" in checked.stdout and "dataset OK" in checked.stdout
    run = _run_cli(msd_root, "-o", tmp_path / "run", "--model", "plain", "--steps", "3", "--loss", "dice_ce",
                   "--rotation-augmentation", "both", *TINY_ARGS)
    assert run.returncode == 0, run.stderr
    assert "stopped at step 3 (steps)" in run.stdout
    assert "e3fast train" in run.stderr and "vox/s=" in run.stderr and "mem=" in run.stderr  # the progress bar
    model, info = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(model, PlainUNet) and info.train_config["loss"] == "dice_ce"
    with torch.no_grad():
        assert model(torch.randn(1, 2, 12, 14, 12)).shape == (1, 3, 12, 14, 12)


def test_kill_9_then_resume_reproduces_the_uninterrupted_run_exactly(nnunet_root, tmp_path):
    arguments = [nnunet_root, "--steps", "10", "--checkpoint-every", "3", "--no-progress", *TINY_ARGS]
    reference = _run_cli(*arguments, "-o", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    output = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "e3fast", "train", *map(str, arguments), "-o", str(output)],
                               env=_environment(), cwd=REPOSITORY, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(_losses(output / "metrics.csv")) < 10

    resumed = _run_cli(*arguments, "-o", output, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected = _losses(tmp_path / "reference" / "metrics.csv")
    assert len(expected) == 10 and _losses(output / "metrics.csv") == expected


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_torchrun_trains_and_writes_one_checkpoint(nnunet_root, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "e3fast", "train", str(nnunet_root), "-o", str(output),
               "--steps", "3", "--checkpoint-every", "2", "--no-progress", *TINY_ARGS]
    run = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=150, cwd=REPOSITORY)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("stopped at step 3") == 1  # rank 0 alone reports
    assert sorted(path.name for path in output.iterdir()) == ["checkpoint.pt", "metrics.csv"]
    assert [row[0] for row in _losses(output / "metrics.csv")] == ["1", "2", "3"]
    state = torch.load(output / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3


def test_minutes_budget_and_early_stopping_end_the_run(nnunet_root, tmp_path):
    timed = train(TrainConfig(nnunet_root, tmp_path / "timed", steps=50, minutes=1e-6, **TINY))
    assert timed.stop_reason == "minutes" and timed.last_step == 1
    # A learning rate too small to move float32 weights: the validation loss never improves.
    patient = train(TrainConfig(nnunet_root, tmp_path / "patient", model="plain", steps=50, lr=1e-20, patience=2,
                                **dict(TINY, validate_every=1)))
    assert patient.stopped_early and patient.stop_reason == "early_stopping" and patient.last_step == 3
    _, info = load_checkpoint(patient.checkpoint_path)
    assert info.step == 1 and info.last_step == 3


def test_existing_checkpoints_are_not_overwritten_and_resumes_must_match(nnunet_root, tmp_path):
    train(TrainConfig(nnunet_root, tmp_path / "run", model="plain", steps=1, **TINY))
    with pytest.raises(ValueError, match="checkpoint.pt already exists: pass --resume"):
        train(TrainConfig(nnunet_root, tmp_path / "run", model="plain", steps=2, **TINY))
    with pytest.raises(ValueError, match=r"changed options \['lr'\]"):
        train(TrainConfig(nnunet_root, tmp_path / "run", model="plain", steps=2, lr=0.1, resume=True, **TINY))
    with pytest.raises(ValueError, match="its model .* differs"):
        train(TrainConfig(nnunet_root, tmp_path / "run", model="plain", steps=2, resume=True,
                          **dict(TINY, features=6)))
    resumed = train(TrainConfig(nnunet_root, tmp_path / "run", model="plain", steps=2, resume=True, **TINY))
    assert [row["step"] for row in resumed.history] == [2]


def test_training_checks_the_dataset_first(nnunet_root, tmp_path):
    broken = write_nnunet_dataset(tmp_path / "broken", num_cases=2, shape=(6, 6, 6))
    (broken / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="labelsTr/case_001.nii.gz: file not found"):
        train(TrainConfig(broken, tmp_path / "run", steps=1, **TINY))
    failed = _run_cli(broken, "-o", tmp_path / "cli")
    assert failed.returncode == 2 and "labelsTr/case_001.nii.gz: file not found" in failed.stderr
    assert not (tmp_path / "run").exists()


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="patch_size must be 3 positive sizes"):
        TrainConfig(tmp_path, tmp_path, patch_size=(8, 8))
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(tmp_path, tmp_path, loss="focal")
    with pytest.raises(ValueError, match="rotation_augmentation must be one of"):
        TrainConfig(tmp_path, tmp_path, rotation_augmentation="yes")
    with pytest.raises(ValueError, match="give steps or minutes"):
        TrainConfig(tmp_path, tmp_path, steps=None)
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"dataset": str(tmp_path)})


def test_losses():
    labels = torch.tensor([[[[0, 1], [2, 1]]]])
    perfect = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 50
    assert float(soft_dice(perfect, labels)) == pytest.approx(1.0, abs=1e-6)
    assert float(segmentation_loss("dice_ce")(perfect, labels)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(1, 3, 1, 2, 2)
    assert float(segmentation_loss("ce")(uniform, labels)) == pytest.approx(torch.log(torch.tensor(3.0)).item())
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss("focal")
