"""The per-step metrics log: ``metrics.csv`` (always) and TensorBoard events (when importable).

Losses are written with ``repr`` so a resumed run's log can be compared digit for digit with an
uninterrupted one. Resuming at step ``s`` first drops the rows after ``s`` (a run killed after its
last checkpoint may have logged steps that are about to be trained again) and any torn last line.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

METRICS_NAME = "metrics.csv"
COLUMNS = ("step", "loss", "val_loss", "seconds", "elapsed_seconds", "voxels_per_second", "memory_mb", "lr")


def _format(value) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


class MetricsLog:
    """Appends one row per step to ``output_dir/metrics.csv`` and mirrors it to TensorBoard."""

    def __init__(self, output_dir, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(output_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        else:
            self.path.write_text(",".join(COLUMNS) + "\n")
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        self._tensorboard = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        kept = [",".join(COLUMNS)]
        lines = self.path.read_text().splitlines()
        for line in lines[1:]:
            fields = line.split(",")
            if len(fields) != len(COLUMNS) or not fields[0].isdigit():
                break  # a torn line: the run was killed while writing it
            if int(fields[0]) > step:
                break
            kept.append(line)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("\n".join(kept) + "\n")
        os.replace(temporary, self.path)

    def log(self, row: dict) -> None:
        """Write one step's metrics (keys of :data:`COLUMNS`; missing ones are left empty)."""
        self._writer.writerow([_format(row.get(column)) for column in COLUMNS])
        self._file.flush()
        if self._tensorboard is not None:
            for column in COLUMNS[1:]:
                if row.get(column) is not None:
                    self._tensorboard.add_scalar(column, row[column], row["step"])

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))
