"""Tables (printed, CSV, markdown) and the Dice-vs-angle plot of a rotation experiment."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from e3fast.evaluation.robustness import RotationScore, class_dice_by_angle, mean_dice_by_angle


def _models_and_angles(scores: Sequence[RotationScore]) -> tuple[list[str], list[float], list[str]]:
    models = list(dict.fromkeys(score.model for score in scores))
    angles = sorted({score.degrees for score in scores})
    axes = list(dict.fromkeys(score.axis for score in scores))
    return models, angles, axes


def write_scores_csv(scores: Sequence[RotationScore], class_names: Sequence[str], path: Path) -> Path:
    """One row per (model, case, axis, angle): the Dice of every class and the mean."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "case", "axis", "degrees", "mean_dice", *class_names])
        for s in scores:
            writer.writerow([s.model, s.case, s.axis, f"{s.degrees:g}", f"{s.mean_dice:.4f}",
                             *(f"{d:.4f}" for d in s.dice)])
    return path


def summary_table(scores: Sequence[RotationScore]) -> list[list[str]]:
    """Rows of angle, then per model the mean Dice over axes and cases and its change from 0 degrees."""
    models, angles, _ = _models_and_angles(scores)
    means = mean_dice_by_angle(scores)
    header = ["degrees"] + [column for model in models for column in (f"{model} Dice", f"{model} change")]
    rows = [header]
    for angle in angles:
        row = [f"{angle:g}"]
        for model in models:
            value, base = means.get((model, angle), float("nan")), means.get((model, 0.0), float("nan"))
            row += [f"{value:.3f}", f"{value - base:+.3f}"]
        rows.append(row)
    return rows


def class_table(scores: Sequence[RotationScore], class_names: Sequence[str]) -> list[list[str]]:
    """Rows of model and angle with the Dice of every foreground class (mean over axes and cases)."""
    per_class = class_dice_by_angle(scores)
    rows = [["model", "degrees", *class_names]]
    for (model, angle), dice in sorted(per_class.items(), key=lambda item: (item[0][0], item[0][1])):
        rows.append([model, f"{angle:g}", *(f"{d:.2f}" for d in dice)])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    """A GitHub markdown table of ``rows`` (the first is the header)."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def text_table(rows: list[list[str]]) -> str:
    """``rows`` aligned in columns for a terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def plot_dice_vs_angle(scores: Sequence[RotationScore], path: Path, title: str = "Dice vs rotation angle") -> Path:
    """Save a PNG: mean Dice against angle per model (thick: mean over axes; thin: each axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, angles, axes = _models_and_angles(scores)
    overall, per_axis = mean_dice_by_angle(scores), mean_dice_by_angle(scores, per_axis=True)
    figure, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    styles = {"x": ":", "y": "--", "z": "-."}
    for index, model in enumerate(models):
        color = f"C{index}"
        ax.plot(angles, [overall.get((model, a), np.nan) for a in angles], color=color, linewidth=2.5, marker="o",
                label=f"{model} (mean over axes)")
        for axis in axes:
            ax.plot(angles, [per_axis.get((model, axis, a), np.nan) for a in angles], color=color, linewidth=1,
                    linestyle=styles.get(axis, "-"), alpha=0.6, label=f"{model}, about {axis}")
    ax.set_xlabel("rotation angle (degrees)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_xticks(angles)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(scores: Sequence[RotationScore], class_names: Sequence[str], folder: Path,
                 title: str = "Dice vs rotation angle") -> dict[str, Path]:
    """Write ``rotation_scores.csv``, ``rotation_summary.md`` (both tables) and ``dice_vs_angle.png``
    into ``folder``; returns their paths by kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = (f"## {title}\n\nMean foreground Dice over test cases and rotation axes:\n\n"
                f"{markdown_table(summary_table(scores))}\n\nDice per class (mean over axes and cases):\n\n"
                f"{markdown_table(class_table(scores, class_names))}\n")
    summary = folder / "rotation_summary.md"
    summary.write_text(markdown)
    return {"csv": write_scores_csv(scores, class_names, folder / "rotation_scores.csv"),
            "markdown": summary, "plot": plot_dice_vs_angle(scores, folder / "dice_vs_angle.png", title)}
