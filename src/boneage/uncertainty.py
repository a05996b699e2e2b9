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
from boneage.model_folder import correct_months, update_description


def conformal_half_width(residuals: np.ndarray, coverage: float = 0.9) -> float:
    """The split-conformal quantile of |residuals| for the given coverage (finite-sample corrected)."""
    absolute = np.sort(np.abs(np.asarray(residuals, dtype=float)))
    n = len(absolute)
    if n == 0:
        raise ValueError("conformal calibration needs at least one residual")
    rank = min(n, math.ceil((n + 1) * coverage))
    return float(absolute[rank - 1])


def calibrate_interval(
    predictions: str | Path,
    labels: str | Path,
    coverage: float = 0.9,
    seed: int = 0,
    correction: dict[str, Any] | None = None,
    variants: list[str | Path] | tuple[str | Path, ...] = (),
) -> dict[str, Any]:
    """Calibrate on one half of the scored images and measure coverage and width on the other half.

    ``correction``: an ``output.correction`` (e.g. :func:`fit_stretch_correction`'s) the model folder will apply to
    its output; the interval is then calibrated around the corrected predictions, as the folder will report them.

    ``variants``: predictions for altered copies of the same images (the same ids; e.g. each cropped tightly to its
    hand, as a clinic frames a film), so that the interval also holds for films framed or rendered that way. Each
    copy goes to its image's half: the quantile is taken over the calibration half's images and their copies
    together, and the coverage on the other half is reported for the images (``evaluation``) and for each variant's
    copies (``evaluation.variants``). Copies of images not scored here (refused, or absent from ``predictions``) are
    left out and counted (``calibration.variants``).
    """
    joined, halves = _scored_halves(predictions, labels, seed)

    def residuals(rows: Any) -> np.ndarray:
        predicted = rows["bone_age_months"].to_numpy(dtype=float)
        if correction is not None:
            predicted = correct_months(
                predicted, rows["male"].to_numpy(dtype=bool), {"output": {"correction": correction}}
            )
        return predicted - rows["boneage"].to_numpy(dtype=float)

    residual = residuals(joined)
    half_of = dict(zip(joined["id"], halves))
    copies = {}  # variant -> (residuals, halves, copies left out: of images refused or not listed)
    for variant in variants:
        rows = read_predictions(variant)
        rows = rows[rows["status"] == "ok"].drop(columns=["male"], errors="ignore")
        scored = rows["id"].isin(half_of)
        rows = rows[scored].merge(joined[["id", "boneage", "male"]], on="id")
        if rows.empty:
            raise ValueError(f"{variant}: no accepted copy of an image scored in {predictions} (the ids must match)")
        copies[str(variant)] = (residuals(rows), rows["id"].map(half_of).to_numpy(), int((~scored).sum()))
    calibration = [residual[halves == "train"]] + [r[h == "train"] for r, h, _ in copies.values()]
    q = conformal_half_width(np.concatenate(calibration), coverage)
    held = residual[halves == "val"]
    male = joined["male"].to_numpy(dtype=bool)[halves == "val"]
    covered = np.abs(held) <= q
    stage = stage_of(joined["boneage"].to_numpy(dtype=float)[halves == "val"])
    by_stage = {
        name: {"n": int((stage == i).sum()), "coverage": float(covered[stage == i].mean())}
        for i, name in enumerate(STAGE_NAMES)
        if (stage == i).any()
    }
    interval = {
        "method": "split conformal on absolute residuals; interval = prediction +/- half_width_months",
        "coverage_nominal": coverage,
        "half_width_months": q,
        "calibration": {
            "source": str(predictions),
            "n": int((halves == "train").sum()),
            **({"around": "the predictions with the folder's output.correction applied"} if correction else {}),
        },
        "evaluation": {
            "n": int(len(held)),
            "coverage": float(covered.mean()),
            "coverage_male": float(covered[male].mean()),
            "coverage_female": float(covered[~male].mean()),
            "coverage_by_reference_stage": by_stage,
            "mean_width_months": 2 * q,
        },
    }
    if copies:
        interval["calibration"]["variants"] = {
            name: {"n": int((h == "train").sum()), "left_out": left} for name, (_, h, left) in copies.items()
        }
        interval["evaluation"]["variants"] = {
            name: {
                "n": int((h == "val").sum()),
                "coverage": float((np.abs(r[h == "val"]) <= q).mean()) if (h == "val").any() else None,
            }
            for name, (r, h, _) in copies.items()
        }
    return interval


def store_interval(model_dir: str | Path, interval: dict[str, Any]) -> None:
    """Write the calibrated interval into a model folder's config.json (the weights and their checksum stay)."""
    update_description(model_dir, lambda description: description.update(uncertainty=interval))


def store_correction(model_dir: str | Path, correction: dict[str, Any]) -> None:
    """Write an output correction (:func:`fit_stretch_correction`) into a model folder's config.json: both backends
    apply it to every prediction from then on (:func:`boneage.model_folder.correct_months`)."""
    update_description(model_dir, lambda description: description["output"].update(correction=correction))


def _scored_halves(predictions: str | Path, labels: str | Path, seed: int) -> tuple[Any, np.ndarray]:
    """The accepted predictions joined to their labels, and each row's half (``train`` calibrates, ``val`` measures):
    :func:`calibrate_interval` and :func:`fit_stretch_correction` both draw theirs here, so with one file and seed they
    fit on the same half."""
    preds = read_predictions(predictions)
    preds = preds[preds["status"] == "ok"].drop(columns=["male"], errors="ignore")
    joined = preds.merge(read_labels(labels)[["id", "boneage", "male"]], on="id")
    if len(joined) < 20:
        raise ValueError(f"{predictions}: {len(joined)} scored images; a calibration needs at least 20")
    return joined, make_split(joined, fractions=(0.5, 0.5, 0.0), seed=seed)["split"].to_numpy()


def fit_stretch_correction(
    predictions: str | Path, labels: str | Path, seed: int = 0, strength: float = 1.0
) -> dict[str, Any]:
    """A linear correction that undoes the model's pull towards the mean age, fit on one half of labelled
    predictions (e.g. val) and measured on the other.

    A regression network shrinks towards the mean: on average it reads ``a + b * reference`` with ``b < 1``, so the
    youngest are read too old and the oldest too young. Fitting that line (least squares of the prediction on the
    reference) and inverting it, ``corrected = (prediction - a) / b``, removes the bias *at each reference age*
    (what the per-stage bias measures), where regressing the reference on the prediction would lower the MAE but
    deepen the per-stage bias. The correction is monotone (``b > 0``) and the same for both sexes; it is returned in
    the model folder's ``output.correction`` form (``[slope, intercept]`` per sex, read by
    :func:`boneage.model_folder.correct_months`).

    ``strength`` (0 to 1) moves the prediction that share of the way to the full inverse: ``prediction + strength *
    (corrected - prediction)``, still one line. The full inverse removes the bias at every reference age but widens
    the errors (it multiplies the noise by ``1 / b``); part of it trades some of the bias for less of that.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"stretch strength: expected a share in (0, 1], got {strength}")
    joined, halves = _scored_halves(predictions, labels, seed)
    predicted = joined["bone_age_months"].to_numpy(dtype=float)
    reference = joined["boneage"].to_numpy(dtype=float)
    fit = halves == "train"
    b, a = np.polyfit(reference[fit], predicted[fit], 1)
    if b <= 0:
        raise ValueError(f"{predictions}: predictions do not rise with the reference age (slope {b:.3f})")
    slope, intercept = 1.0 + strength * (1.0 / b - 1.0), -strength * a / b
    held = halves == "val"
    corrected = slope * predicted[held] + intercept
    stage = stage_of(reference[held])

    def by_stage(values: np.ndarray) -> dict[str, float]:
        error = values - reference[held]
        return {
            name: round(float(error[stage == i].mean()), 3) for i, name in enumerate(STAGE_NAMES) if (stage == i).any()
        }

    return {
        "method": "prediction ~ a + b * reference by least squares, inverted: (prediction - a) / b, both sexes; "
        "applied at a strength s: prediction + s * ((prediction - a) / b - prediction)",
        "strength": strength,
        "female": [round(slope, 5), round(intercept, 4)],
        "male": [round(slope, 5), round(intercept, 4)],
        "fit_on": {"source": str(predictions), "n": int(fit.sum()), "a": round(float(a), 4), "b": round(float(b), 5)},
        "evaluation": {
            "source": "the other half",
            "n": int(held.sum()),
            "mae_months": round(float(np.abs(corrected - reference[held]).mean()), 3),
            "mae_uncorrected_months": round(float(np.abs(predicted[held] - reference[held]).mean()), 3),
            "bias_by_reference_stage": by_stage(corrected),
            "bias_by_reference_stage_uncorrected": by_stage(predicted[held]),
        },
    }
