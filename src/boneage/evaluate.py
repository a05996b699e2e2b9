"""Score prediction files against labels (the model is never needed): regression, stage and per-sex metrics.

``evaluate(predictions_csv, labels_csv, output_dir)`` reads a ``boneage predict`` CSV (or any CSV with
``id,bone_age_months`` and optionally ``stage``), joins it to ``id,boneage,male`` labels, and writes
``metrics.json`` and ``report.txt``. PyTorch, ONNX and outside predictions are scored by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from boneage.errors import DataValidationError
from boneage.figures import write_figures, write_html
from boneage.labels import read_labels
from boneage.metrics import BOOTSTRAP_MIN_IMAGES, compute_metrics, format_report, paired_comparison


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A prediction CSV: needs ``id`` and ``bone_age_months`` (or ``stage`` for a classifier); ``status`` optional."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"id": str})
    except FileNotFoundError:
        raise DataValidationError(str(path), ["file not found"]) from None
    if "id" not in frame.columns or not ({"bone_age_months", "stage"} & set(frame.columns)):
        raise DataValidationError(
            str(path), [f"expected columns id and bone_age_months (or stage); found {list(frame.columns)}"]
        )
    if frame["id"].duplicated().any():
        raise DataValidationError(str(path), [f"duplicate ids {frame['id'][frame['id'].duplicated()].tolist()[:10]}"])
    if "status" not in frame.columns:
        frame["status"] = "ok"
    return frame


def evaluate(
    predictions: str | Path,
    labels: str | Path,
    output: str | Path | None = None,
    history: str | Path | None = None,
    figures: bool = True,
    stage_predictions: str | Path | None = None,
    compare: str | Path | None = None,
) -> dict[str, Any]:
    """Join predictions to labels by id and score them.

    With ``output``: writes ``metrics.json``, ``report.txt``, the figures (predicted vs actual, errors, confusion
    matrix, and training history from a run's ``history.json`` when ``history`` is given) and ``report.html``.
    ``stage_predictions``: a stage classifier's prediction CSV (``id,stage``) for the same images; scored as the
    classifier and compared with the stage implied by the regression. ``compare``: another model's prediction CSV;
    both are scored on the images both predicted, with paired bootstrap intervals for the differences
    (:func:`paired_comparison`).

    Raises:
        DataValidationError: missing columns, or prediction ids that are not in the labels.
    """
    preds = read_predictions(predictions)
    truth = read_labels(labels)
    unknown = sorted(set(preds["id"]) - set(truth["id"]))
    if unknown:
        raise DataValidationError(
            str(predictions), [f"{len(unknown)} prediction id(s) not in {labels}, e.g. {unknown[:10]}"]
        )
    failed = preds[preds["status"] != "ok"]
    scored = preds[preds["status"] == "ok"].drop(columns=["male"], errors="ignore")
    joined = scored.merge(truth[["id", "boneage", "male"]], on="id", how="inner")
    if stage_predictions is not None:
        stages = read_predictions(stage_predictions)
        stages = stages[stages["status"] == "ok"]
        if "stage" not in stages.columns:
            raise DataValidationError(str(stage_predictions), ["expected a stage column"])
        missing = sorted(set(joined["id"]) - set(stages["id"]))
        if missing:
            raise DataValidationError(
                str(stage_predictions),
                [f"{len(missing)} id(s) scored here have no stage prediction, e.g. {missing[:10]}"],
            )
        joined = joined.merge(stages[["id", "stage"]].rename(columns={"stage": "classifier_stage"}), on="id")
    if joined.empty:
        raise DataValidationError(str(predictions), ["no successful predictions to score"])
    metrics = {
        "predictions": str(predictions),
        "labels": str(labels),
        "n_scored": int(len(joined)),
        "n_failed": int(len(failed)),
        "n_failed_by_status": {str(k): int(v) for k, v in failed["status"].value_counts().items()},
        "failed_ids": failed["id"].tolist()[:100],
        **compute_metrics(joined),
    }
    if compare is not None:
        other = read_predictions(compare)
        other = other[other["status"] == "ok"][["id", "bone_age_months"]].rename(columns={"bone_age_months": "other"})
        both = joined.merge(other, on="id").dropna(subset=["bone_age_months", "other"])
        if len(both) < 2 * BOOTSTRAP_MIN_IMAGES:
            raise DataValidationError(
                str(compare), [f"only {len(both)} image(s) predicted by both; need {2 * BOOTSTRAP_MIN_IMAGES}"]
            )
        metrics["comparison"] = {
            "other": str(compare),
            **paired_comparison(*(both[k].to_numpy(dtype=float) for k in ("boneage", "bone_age_months", "other"))),
        }
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        text = format_report(metrics)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output / "report.txt").write_text(text)
        if figures:
            made = write_figures(joined, metrics, output, Path(history) if history else None)
            write_html(metrics, text, made, output)
    return metrics
