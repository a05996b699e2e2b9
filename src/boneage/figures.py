"""Figures and an HTML report for an evaluation: predicted vs actual, errors, errors by sex, confusion matrix, training
history."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneage.imageio import STAGE_NAMES
from boneage.metrics import not_scored_note


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (making the folder) and close a matplotlib figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_predicted_vs_actual(joined: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    for is_male, color, name in ((True, "tab:blue", "male"), (False, "tab:orange", "female")):
        part = joined[joined["male"] == is_male]
        ax.scatter(
            part["boneage"], part["bone_age_months"], s=6, alpha=0.45, color=color, label=f"{name} (n={len(part)})"
        )
    low, high = 0, max(240.0, float(joined[["boneage", "bone_age_months"]].max().max()))
    ax.plot([low, high], [low, high], "k--", lw=1, label="identity")
    ax.set(
        xlim=(low, high), ylim=(low, high), xlabel="reference bone age (months)", ylabel="predicted bone age (months)"
    )
    mae = (joined["bone_age_months"] - joined["boneage"]).abs().mean()
    ax.set_title(f"Predicted vs reference bone age (MAE {mae:.2f} months)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_errors(joined: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    error = (joined["bone_age_months"] - joined["boneage"]).to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    left.hist(error, bins=50, color="tab:gray", edgecolor="white")
    left.axvline(0, color="k", lw=1)
    left.axvline(error.mean(), color="tab:red", lw=1.5, label=f"mean {error.mean():+.2f}")
    left.set(xlabel="predicted - reference (months)", ylabel="images", title="Error distribution")
    left.legend()
    right.scatter(joined["boneage"], error, s=5, alpha=0.4, color="tab:gray")
    bins = np.arange(0, 241, 24)
    centers, means, spreads = [], [], []
    for lo, hi in zip(bins[:-1], bins[1:]):
        mask = (joined["boneage"] >= lo) & (joined["boneage"] < hi)
        if mask.sum() >= 5:
            centers.append((lo + hi) / 2)
            means.append(error[mask.to_numpy()].mean())
            spreads.append(np.abs(error[mask.to_numpy()]).mean())
    right.plot(centers, means, "o-", color="tab:red", label="mean error per 2 years")
    right.plot(centers, spreads, "s--", color="tab:blue", label="MAE per 2 years")
    right.axhline(0, color="k", lw=1)
    right.set(xlabel="reference bone age (months)", ylabel="error (months)", title="Error vs age")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_by_sex(joined: pd.DataFrame, metrics: dict[str, Any], path: Path) -> Path:
    """The gender-wise analysis: MAE and mean error per 2 years of reference age for each sex, and MAE per stage."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    bins = np.arange(0, 241, 24)
    for is_male, color, name in ((True, "tab:blue", "male"), (False, "tab:orange", "female")):
        part = joined[joined["male"] == is_male]
        error = (part["bone_age_months"] - part["boneage"]).to_numpy()
        centers, maes, means = [], [], []
        for lo, hi in zip(bins[:-1], bins[1:]):
            mask = ((part["boneage"] >= lo) & (part["boneage"] < hi)).to_numpy()
            if mask.sum() >= 5:
                centers.append((lo + hi) / 2)
                maes.append(np.abs(error[mask]).mean())
                means.append(error[mask].mean())
        left.plot(centers, maes, "s-", color=color, label=f"{name} MAE")
        left.plot(centers, means, "o--", color=color, alpha=0.7, label=f"{name} mean error")
    left.axhline(0, color="k", lw=1)
    left.set(xlabel="reference bone age (months)", ylabel="months", title="Error per 2 years of age, by sex")
    left.legend(fontsize=8)
    stages = metrics.get("by_sex_and_stage", {})
    x = np.arange(len(STAGE_NAMES))
    for k, (name, color) in enumerate((("male", "tab:blue"), ("female", "tab:orange"))):
        cells = stages.get(name, {})
        values = [cells[stage]["mae_months"] if stage in cells else np.nan for stage in STAGE_NAMES]
        bars = right.bar(x + (k - 0.5) * 0.38, values, width=0.38, color=color, label=name)
        for bar, stage in zip(bars, STAGE_NAMES):
            if stage in cells:
                right.annotate(
                    f"n={cells[stage]['n']}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    title = "MAE per reference stage, by sex"
    by_sex = metrics.get("by_sex", {})
    if "mae_gap_months" in by_sex:
        title += f"\ngap {by_sex['mae_gap_months']:.2f} months"
        if "age_matched" in by_sex:
            title += f"; at one age mix {by_sex['age_matched']['mae_gap_months']:.2f}"
    right.set_xticks(x, STAGE_NAMES, rotation=15)
    top = max([c["mae_months"] for cells in stages.values() for c in cells.values()], default=1.0)
    right.set(ylabel="MAE (months)", title=title, ylim=(0, 1.25 * top))
    right.legend(fontsize=8, ncol=2, loc="upper center")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_confusion(matrix: list[list[int]], path: Path, title: str) -> Path:
    plt = pyplot()
    values = np.array(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    image = ax.imshow(values, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(STAGE_NAMES))
    ax.set_xticks(ticks, STAGE_NAMES, rotation=30, ha="right")
    ax.set_yticks(ticks, STAGE_NAMES)
    threshold = values.max() / 2 if values.size else 0
    for i in ticks:
        row_total = max(1, values[i].sum())
        for j in ticks:
            ax.text(
                j,
                i,
                f"{values[i, j]}\n{values[i, j] / row_total:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if values[i, j] > threshold else "black",
            )
    ax.set(xlabel="predicted stage", ylabel="reference stage", title=title)
    return save_figure(fig, path)


def plot_history(history: Path | list[dict[str, Any]], path: Path) -> Path:
    """Loss, MAE (or stage accuracy) and learning rate per epoch, from a run's ``history.json`` or its rows."""
    plt = pyplot()
    rows = pd.DataFrame(json.loads(Path(history).read_text()) if isinstance(history, (str, Path)) else history)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=120)
    axes[0].plot(rows["epoch"], rows["train_loss"], "o-", label="train")
    axes[0].plot(rows["epoch"], rows["val_loss"], "o-", label="val")
    axes[0].set(title="Loss", xlabel="epoch")
    if rows["val_mae"].notna().any():
        axes[1].plot(rows["epoch"], rows["train_mae"], "o-", label="train (augmented)")
        axes[1].plot(rows["epoch"], rows["val_mae"], "o-", label="val")
        axes[1].set(title="MAE (months)", xlabel="epoch")
    else:
        axes[1].plot(rows["epoch"], rows["val_stage_acc"], "o-", label="val")
        axes[1].set(title="Stage accuracy", xlabel="epoch")
    axes[2].plot(rows["epoch"], rows["lr"], "o-", color="tab:green")
    axes[2].set(title="Learning rate (end of epoch)", xlabel="epoch")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_figures(
    joined: pd.DataFrame, metrics: dict[str, Any], output: Path, history: Path | None = None
) -> list[Path]:
    """Every figure that the data allows, as PNGs in ``output``."""
    figures = []
    if "regression" in metrics:
        figures.append(plot_predicted_vs_actual(joined, output / "predicted_vs_actual.png"))
        figures.append(plot_errors(joined, output / "errors.png"))
        if joined["male"].nunique() == 2:
            figures.append(plot_by_sex(joined, metrics, output / "by_sex.png"))
    if "stage" in metrics:
        figures.append(
            plot_confusion(
                metrics["stage"]["confusion_matrix"],
                output / "confusion_matrix.png",
                "Stage confusion matrix\n(classifier)",
            )
        )
    if "stage_from_regression" in metrics:
        figures.append(
            plot_confusion(
                metrics["stage_from_regression"]["confusion_matrix"],
                output / "confusion_matrix_from_regression.png",
                "Stage confusion matrix\n(stage of the predicted bone age)",
            )
        )
    if isinstance(history, list) and history:
        figures.append(plot_history(history, output / "training_history.png"))
    elif isinstance(history, (str, Path)) and Path(history).is_file():
        figures.append(plot_history(Path(history), output / "training_history.png"))
    return figures


def write_html(
    metrics: dict[str, Any], text_report: str, figures: list[Path], output: Path, notes: Sequence[str] = ()
) -> Path:
    """``report.html``: notes, the text report and every figure, readable in a browser without the code."""
    images = "\n".join(
        f'<figure><img src="{html.escape(f.name)}" alt="{html.escape(f.stem)}"><figcaption>{html.escape(f.stem)}'
        "</figcaption></figure>"
        for f in figures
    )
    notes_html = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>boneage evaluation</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
pre{{background:#f6f6f6;padding:1em;overflow-x:auto}} img{{max-width:100%}} figure{{margin:1.5em 0}}</style>
</head><body>
<h1>boneage evaluation</h1>
<p>{metrics.get("n_scored")} images scored, {metrics.get("n_failed")} not scored{not_scored_note(metrics)}.</p>
{notes_html}
<pre>{html.escape(text_report)}</pre>
{images}
</body></html>
"""
    path = output / "report.html"
    path.write_text(page)
    return path
