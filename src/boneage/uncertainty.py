"""Prediction intervals by split conformal prediction on absolute residuals.

Half of a labelled set (stratified by stage x sex) calibrates the interval half-width q: the
``ceil((n + 1) * coverage) / n`` empirical quantile of |prediction - reference|. The other half measures the coverage
and width that the interval ``prediction +/- q`` actually reaches, so the stored coverage is not the calibration's own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from boneage.evaluate import read_predictions
from boneage.imageio import STAGE_NAMES
from boneage.labels import make_split, read_labels, stage_of
from boneage.model_folder import update_description


def conformal_half_width(residuals: np.ndarray, coverage: float = 0.9) -> float:
    """The split-conformal quantile of |residuals| for the given coverage (finite-sample corrected)."""
    absolute = np.sort(np.abs(np.asarray(residuals, dtype=float)))
    n = len(absolute)
    if n == 0:
        raise ValueError("conformal calibration needs at least one residual")
    rank = min(n, math.ceil((n + 1) * coverage))
    return float(absolute[rank - 1])


def calibrate_interval(
    predictions: str | Path, labels: str | Path, coverage: float = 0.9, seed: int = 0
) -> dict[str, Any]:
    """Calibrate on one half of the scored images and measure coverage and width on the other half."""
    preds = read_predictions(predictions)
    preds = preds[preds["status"] == "ok"].drop(columns=["male"], errors="ignore")
    joined = preds.merge(read_labels(labels)[["id", "boneage", "male"]], on="id")
    if len(joined) < 20:
        raise ValueError(f"{predictions}: {len(joined)} scored images; calibrating an interval needs at least 20")
    halves = make_split(joined, fractions=(0.5, 0.5, 0.0), seed=seed)["split"].to_numpy()
    residual = (joined["bone_age_months"] - joined["boneage"]).to_numpy(dtype=float)
    q = conformal_half_width(residual[halves == "train"], coverage)
    held = residual[halves == "val"]
    male = joined["male"].to_numpy(dtype=bool)[halves == "val"]
    covered = np.abs(held) <= q
    stage = stage_of(joined["boneage"].to_numpy(dtype=float)[halves == "val"])
    by_stage = {
        name: {"n": int((stage == i).sum()), "coverage": float(covered[stage == i].mean())}
        for i, name in enumerate(STAGE_NAMES)
        if (stage == i).any()
    }
    return {
        "method": "split conformal on absolute residuals; interval = prediction +/- half_width_months",
        "coverage_nominal": coverage,
        "half_width_months": q,
        "calibration": {"source": str(predictions), "n": int((halves == "train").sum())},
        "evaluation": {
            "n": int(len(held)),
            "coverage": float(covered.mean()),
            "coverage_male": float(covered[male].mean()),
            "coverage_female": float(covered[~male].mean()),
            "coverage_by_reference_stage": by_stage,
            "mean_width_months": 2 * q,
        },
    }


def store_interval(model_dir: str | Path, interval: dict[str, Any]) -> None:
    """Write the calibrated interval into a model folder's config.json (the weights and their checksum stay)."""
    update_description(model_dir, lambda description: description.update(uncertainty=interval))
