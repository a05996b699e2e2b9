"""The numbers a model is judged by, from arrays of reference and predicted ages: MAE, RMSE, R², bias, per sex
(age-matched), per stage, stage accuracy/F1/QWK, bootstrap intervals and paired comparisons; their text summary.
Torch-free; :mod:`boneage.evaluate` applies them to prediction files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from boneage.errors import DataValidationError
from boneage.imageio import STAGE_NAMES
from boneage.labels import stage_of

PERCENTILES = (25, 50, 75, 90, 95, 99)
WITHIN_MONTHS = (6, 12, 18)
AGE_BAND_MONTHS = 24  # width of the reference-age bands that the age-matched per-sex comparison stratifies on
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_MIN_IMAGES = 10  # per sex for the sex difference's interval; twice that for any interval


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """MAE/RMSE (months and years), R^2, median absolute error, bias, |error| percentiles, share within +/-k."""
    from sklearn.metrics import mean_absolute_error, median_absolute_error, r2_score, root_mean_squared_error

    error = predicted - truth
    absolute = np.abs(error)
    mae = float(mean_absolute_error(truth, predicted))
    rmse = float(root_mean_squared_error(truth, predicted))
    return {
        "n": int(len(truth)),
        "mae_months": mae,
        "mae_years": mae / 12,
        "rmse_months": rmse,
        "rmse_years": rmse / 12,
        "r2": float(r2_score(truth, predicted)) if len(truth) > 1 else float("nan"),
        "median_ae_months": float(median_absolute_error(truth, predicted)),
        "mean_signed_error_months": float(error.mean()),
        "abs_error_percentiles_months": {str(p): float(np.percentile(absolute, p)) for p in PERCENTILES},
        "within_months": {str(k): float((absolute <= k).mean()) for k in WITHIN_MONTHS},
    }


def age_matched_by_sex(
    truth: np.ndarray, predicted: np.ndarray, male: np.ndarray, band_months: float = AGE_BAND_MONTHS
) -> dict[str, Any] | None:
    """Each sex's MAE at the same age mix: direct standardisation over bands of the reference bone age.

    The two sexes of a data set rarely share an age distribution (in RSNA the boys are older), and error depends on
    age, so the plain per-sex MAE gap mixes a difference between the sexes with a difference in case mix. Here each
    sex's MAE in a band is weighted by the band's share of both sexes together. Bands holding only one sex are left
    out (``n`` counts the images in the bands kept). None when no band holds both sexes.
    """
    band = np.floor(truth / band_months).astype(int)
    absolute = np.abs(predicted - truth)
    shared = [b for b in np.unique(band) if (male[band == b]).any() and (~male[band == b]).any()]
    if not shared:
        return None
    weight = np.array([(band == b).sum() for b in shared], dtype=float)
    weight /= weight.sum()
    mae = {
        name: float(sum(w * absolute[(band == b) & (male == is_male)].mean() for w, b in zip(weight, shared)))
        for name, is_male in (("male", True), ("female", False))
    }
    return {
        "band_months": band_months,
        "n": int(np.isin(band, shared).sum()),
        "mae_male_months": mae["male"],
        "mae_female_months": mae["female"],
        "mae_gap_months": abs(mae["male"] - mae["female"]),
    }


def quadratic_weighted_kappa(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Cohen's kappa with quadratic weights over the last axis of integer class arrays (any leading batch axes), so a
    thousand bootstrap resamples are one call; equal to ``sklearn.metrics.cohen_kappa_score(..., weights="quadratic")``
    on one sample (tested)."""
    cells = np.asarray(true) * n_classes + np.asarray(predicted)
    observed = np.stack([(cells == c).sum(axis=-1) for c in range(n_classes * n_classes)], axis=-1)
    observed = observed.reshape(*observed.shape[:-1], n_classes, n_classes).astype(float)
    expected = (
        observed.sum(axis=-1, keepdims=True)
        * observed.sum(axis=-2, keepdims=True)
        / observed.sum(axis=(-2, -1), keepdims=True)
    )
    grid = np.arange(n_classes)
    weights = (grid[:, None] - grid[None, :]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):  # one class only: kappa is undefined (NaN), as in sklearn
        return 1.0 - (weights * observed).sum(axis=(-2, -1)) / (weights * expected).sum(axis=(-2, -1))


def _percentile_interval(
    data: tuple[np.ndarray, ...], statistic: Any, n_resamples: int, confidence: float, seed: int
) -> list[float]:
    """Paired percentile-bootstrap interval of a vectorised ``statistic(*data, axis=-1)`` (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    result = bootstrap(
        data,
        statistic,
        n_resamples=n_resamples,
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def bootstrap_intervals(
    truth: np.ndarray,
    predicted: np.ndarray,
    male: np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals (images resampled with replacement, ``scipy.stats.bootstrap``) for
    the MAE, the mean signed error overall, per sex and per true stage (``mean_signed_error_by_stage_months``, stages
    with at least twice :data:`BOOTSTRAP_MIN_IMAGES` images: the pull towards the mean age shows there), the
    female-minus-male MAE difference and the stage QWK: how
    far each figure could move on another sample of the same size, so two models or two sexes are not told apart by
    noise.
    """
    absolute, error = np.abs(predicted - truth), predicted - truth
    male = np.asarray(male, dtype=bool)
    true_stage, predicted_stage = stage_of(truth), stage_of(predicted)
    labels = list(range(len(STAGE_NAMES)))

    def interval(data: tuple[np.ndarray, ...], statistic: Any) -> list[float]:
        return _percentile_interval(data, statistic, n_resamples, confidence, seed)

    def sex_difference(values: np.ndarray, is_male: np.ndarray, axis: int = -1) -> np.ndarray:
        female = np.sum(values * ~is_male, axis=axis) / np.sum(~is_male, axis=axis)
        return female - np.sum(values * is_male, axis=axis) / np.sum(is_male, axis=axis)

    def qwk(true: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
        return quadratic_weighted_kappa(true, pred, len(labels))

    out: dict[str, Any] = {
        "method": f"percentile bootstrap over images, {n_resamples} resamples, seed {seed}",
        "confidence": confidence,
        "mae_months": interval((absolute,), lambda a, axis=-1: np.mean(a, axis=axis)),
        "mean_signed_error_months": interval((error,), lambda e, axis=-1: np.mean(e, axis=axis)),
        "quadratic_weighted_kappa": interval((true_stage, predicted_stage), qwk),
    }
    if min(male.sum(), (~male).sum()) >= BOOTSTRAP_MIN_IMAGES:  # fewer: resamples lacking a sex leave no difference
        out["mae_female_minus_male_months"] = interval((absolute, male), sex_difference)
        for name, mask in (("male", male), ("female", ~male)):  # each sex's bias, its images resampled
            out[f"mean_signed_error_{name}_months"] = interval((error[mask],), lambda e, axis=-1: np.mean(e, axis=axis))
    by_stage = {
        stage_name: interval((error[true_stage == index],), lambda e, axis=-1: np.mean(e, axis=axis))
        for index, stage_name in enumerate(STAGE_NAMES)
        if np.sum(true_stage == index) >= 2 * BOOTSTRAP_MIN_IMAGES
    }
    if by_stage:
        out["mean_signed_error_by_stage_months"] = by_stage
    return out


def paired_comparison(
    truth: np.ndarray,
    predicted: np.ndarray,
    other: np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Two sets of predictions for the same images: each MAE and stage QWK, and the differences (this minus other)
    with paired percentile-bootstrap intervals (the same images resampled for both), which tell a real difference
    from the noise of one validation set."""
    true_stage = stage_of(truth)
    this_stage, other_stage = stage_of(predicted), stage_of(other)
    n_classes = len(STAGE_NAMES)

    def mae_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(a, axis=axis) - np.mean(b, axis=axis)

    def qwk_difference(true: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return quadratic_weighted_kappa(true, a, n_classes) - quadratic_weighted_kappa(true, b, n_classes)

    def interval(data: tuple[np.ndarray, ...], statistic: Any) -> list[float]:
        return _percentile_interval(data, statistic, n_resamples, confidence, seed)

    this_error, other_error = np.abs(predicted - truth), np.abs(other - truth)
    return {
        "n": int(len(truth)),
        "confidence": confidence,
        "mae_months": float(this_error.mean()),
        "other_mae_months": float(other_error.mean()),
        "mae_difference_months": float(this_error.mean() - other_error.mean()),
        "mae_difference_interval": interval((this_error, other_error), mae_difference),
        "quadratic_weighted_kappa": float(quadratic_weighted_kappa(true_stage, this_stage, n_classes)),
        "other_quadratic_weighted_kappa": float(quadratic_weighted_kappa(true_stage, other_stage, n_classes)),
        "qwk_difference_interval": interval((true_stage, this_stage, other_stage), qwk_difference),
    }


def stage_metrics(true_stage: np.ndarray, predicted_stage: np.ndarray) -> dict[str, Any]:
    """Accuracy, weighted/macro precision/recall/F1, Cohen's and quadratic weighted kappa, confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    labels = list(range(len(STAGE_NAMES)))
    out: dict[str, Any] = {"n": int(len(true_stage)), "accuracy": float(accuracy_score(true_stage, predicted_stage))}
    for average in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(
            true_stage, predicted_stage, labels=labels, average=average, zero_division=0
        )
        out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = float(p), float(r), float(f)
    out["cohen_kappa"] = float(cohen_kappa_score(true_stage, predicted_stage, labels=labels))
    out["quadratic_weighted_kappa"] = float(
        cohen_kappa_score(true_stage, predicted_stage, labels=labels, weights="quadratic")
    )
    out["confusion_matrix"] = confusion_matrix(true_stage, predicted_stage, labels=labels).tolist()
    p, r, f, support = precision_recall_fscore_support(
        true_stage, predicted_stage, labels=labels, average=None, zero_division=0
    )
    out["per_stage"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i, name in enumerate(STAGE_NAMES)
    }
    return out


def _stage_index(values: pd.Series) -> np.ndarray:
    lookup = {name.lower(): i for i, name in enumerate(STAGE_NAMES)}
    indices = []
    for value in values:
        text = str(value).strip().lower()
        if text in lookup:
            indices.append(lookup[text])
        elif text.isdigit() and int(text) < len(STAGE_NAMES):
            indices.append(int(text))
        else:
            raise DataValidationError("stage", [f"unknown stage {value!r}; expected one of {STAGE_NAMES} or 0-3"])
    return np.array(indices)


def _errors_by_stage(error: np.ndarray, true_stage: np.ndarray) -> dict[str, dict[str, Any]]:
    """n, MAE and mean signed error of ``error`` (predicted - reference) for each reference stage present."""
    return {
        name: {
            "n": int((true_stage == i).sum()),
            "mae_months": float(np.abs(error[true_stage == i]).mean()),
            "mean_signed_error_months": float(error[true_stage == i].mean()),
        }
        for i, name in enumerate(STAGE_NAMES)
        if (true_stage == i).any()
    }


def compute_metrics(joined: pd.DataFrame) -> dict[str, Any]:
    """Metrics for a frame with ``boneage``, ``male`` and ``bone_age_months`` and/or ``stage`` (predicted)."""
    metrics: dict[str, Any] = {}
    truth = joined["boneage"].to_numpy(dtype=float)
    true_stage = stage_of(truth)
    has_age = "bone_age_months" in joined.columns and joined["bone_age_months"].notna().all()
    if has_age:
        predicted = joined["bone_age_months"].to_numpy(dtype=float)
        metrics["regression"] = regression_metrics(truth, predicted)
        metrics["stage_from_regression"] = stage_metrics(true_stage, stage_of(predicted))
        by_sex = {}
        for sex_name, is_male in (("male", True), ("female", False)):
            mask = joined["male"].to_numpy(dtype=bool) == is_male
            if mask.any():
                part = regression_metrics(truth[mask], predicted[mask])
                by_sex[sex_name] = {
                    k: part[k] for k in ("n", "mae_months", "rmse_months", "r2", "mean_signed_error_months")
                }
        if len(by_sex) == 2:
            by_sex["mae_gap_months"] = abs(by_sex["male"]["mae_months"] - by_sex["female"]["mae_months"])
            matched = age_matched_by_sex(truth, predicted, joined["male"].to_numpy(dtype=bool))
            if matched is not None:
                by_sex["age_matched"] = matched
        metrics["by_sex"] = by_sex
        error, male = predicted - truth, joined["male"].to_numpy(dtype=bool)
        if len(truth) >= 2 * BOOTSTRAP_MIN_IMAGES:  # fewer images give no useful interval
            metrics["confidence_intervals"] = bootstrap_intervals(truth, predicted, male)
        metrics["by_stage"] = _errors_by_stage(error, true_stage)
        metrics["by_sex_and_stage"] = {
            sex_name: _errors_by_stage(error[male == is_male], true_stage[male == is_male])
            for sex_name, is_male in (("male", True), ("female", False))
        }
    # The classifier's stages: a separate column (from --stage-predictions), or the file's own `stage` column
    # when the file holds no bone ages (a classifier's prediction file). A regressor's `stage` column is only its
    # bone age binned, already scored above as stage_from_regression.
    classifier = None
    if "classifier_stage" in joined.columns:
        classifier = joined["classifier_stage"]
    elif not has_age and "stage" in joined.columns and joined["stage"].notna().all():
        classifier = joined["stage"]
    if classifier is not None:
        predicted_stage = _stage_index(classifier)
        metrics["stage"] = stage_metrics(true_stage, predicted_stage)
        if has_age:
            regression_stage = stage_of(joined["bone_age_months"].to_numpy(dtype=float))
            metrics["stage"]["agreement_with_regression"] = float((predicted_stage == regression_stage).mean())
    return metrics


def headline(metrics: dict[str, Any], digits: int = 3) -> dict[str, Any]:
    """The few numbers a model is judged by, flat and rounded: n, MAE, RMSE, R², bias, per-sex MAE and bias, QWK."""
    reg, sex, stage = metrics["regression"], metrics["by_sex"], metrics["stage_from_regression"]
    row = {"n": reg["n"]}
    for key in ("mae_months", "rmse_months", "r2", "mean_signed_error_months"):
        row[key] = round(reg[key], digits)
    for name in ("male", "female"):
        row[f"mae_{name}_months"] = round(sex[name]["mae_months"], digits)
        row[f"bias_{name}_months"] = round(sex[name]["mean_signed_error_months"], digits)
    row["stage_qwk"] = round(stage["quadratic_weighted_kappa"], 4)
    row["stage_accuracy"] = round(stage["accuracy"], 4)
    return row


def not_scored_note(metrics: dict[str, Any]) -> str:
    """`` (16 not assessable, 2 error)``: why the predictions that were not scored failed; empty when none did."""
    counts = metrics.get("n_failed_by_status") or {}
    return f" ({', '.join(f'{n} {status}' for status, n in counts.items())})" if counts else ""


def format_report(metrics: dict[str, Any]) -> str:
    """A readable text report of :func:`evaluate`'s metrics."""
    lines = [
        f"Predictions: {metrics['predictions']}",
        f"Labels: {metrics['labels']}",
        f"Scored: {metrics['n_scored']}  not scored: {metrics['n_failed']}{not_scored_note(metrics)}",
        "",
    ]
    reg = metrics.get("regression")
    versus = metrics.get("comparison")
    if versus:
        (mae_low, mae_high), (qwk_low, qwk_high) = versus["mae_difference_interval"], versus["qwk_difference_interval"]
        lines += [
            f"Against {versus['other']} (the {versus['n']} images both predicted; this minus that, "
            f"{versus['confidence']:.0%} paired bootstrap interval)",
            f"  MAE {versus['mae_months']:.2f} vs {versus['other_mae_months']:.2f}: "
            f"{versus['mae_difference_months']:+.2f} ({mae_low:+.2f} to {mae_high:+.2f})",
            f"  stage QWK {versus['quadratic_weighted_kappa']:.3f} vs {versus['other_quadratic_weighted_kappa']:.3f}: "
            f"{versus['quadratic_weighted_kappa'] - versus['other_quadratic_weighted_kappa']:+.3f} "
            f"({qwk_low:+.3f} to {qwk_high:+.3f})",
            "",
        ]
    if reg:
        lines += [
            "Regression (months)",
            f"  MAE {reg['mae_months']:.2f} ({reg['mae_years']:.3f} y)   RMSE {reg['rmse_months']:.2f} "
            f"({reg['rmse_years']:.3f} y)   R2 {reg['r2']:.4f}",
            f"  median AE {reg['median_ae_months']:.2f}   mean signed error {reg['mean_signed_error_months']:+.2f}",
            "  |error| percentiles: "
            + "  ".join(f"P{k} {v:.1f}" for k, v in reg["abs_error_percentiles_months"].items()),
            "  within: " + "  ".join(f"+/-{k} m {v:.1%}" for k, v in reg["within_months"].items()),
        ]
        ci = metrics.get("confidence_intervals")
        if ci:
            shown = [("MAE", "mae_months", ".2f"), ("bias", "mean_signed_error_months", "+.2f")]
            shown += [("bias male", "mean_signed_error_male_months", "+.2f")]
            shown += [("bias female", "mean_signed_error_female_months", "+.2f")]
            shown += [("MAE female - male", "mae_female_minus_male_months", "+.2f")]
            shown += [("stage QWK", "quadratic_weighted_kappa", ".3f")]
            lines.append(
                f"  {ci['confidence']:.0%} bootstrap intervals: "
                + "   ".join(
                    f"{name} {ci[key][0]:{form}} to {ci[key][1]:{form}}" for name, key, form in shown if key in ci
                )
            )
        lines += ["", "By sex"]
        for sex in ("male", "female"):
            if sex in metrics["by_sex"]:
                s = metrics["by_sex"][sex]
                lines.append(
                    f"  {sex:<7} n={s['n']:<5} MAE {s['mae_months']:.2f}  RMSE {s['rmse_months']:.2f}  "
                    f"R2 {s['r2']:.4f}  bias {s['mean_signed_error_months']:+.2f}"
                )
        if "mae_gap_months" in metrics["by_sex"]:
            lines.append(f"  MAE gap {metrics['by_sex']['mae_gap_months']:.2f} months")
        matched = metrics["by_sex"].get("age_matched")
        if matched:
            lines.append(
                f"  at the same age mix ({matched['band_months']:g}-month bands of both sexes, n={matched['n']}): "
                f"MAE male {matched['mae_male_months']:.2f}  female {matched['mae_female_months']:.2f}  "
                f"gap {matched['mae_gap_months']:.2f}"
            )
        lines += ["", "By true stage"]
        stage_intervals = (ci or {}).get("mean_signed_error_by_stage_months", {})
        for name, s in metrics["by_stage"].items():
            bias_interval = (
                f" ({stage_intervals[name][0]:+.2f} to {stage_intervals[name][1]:+.2f})"
                if name in stage_intervals
                else ""
            )
            lines.append(
                f"  {name:<15} n={s['n']:<5} MAE {s['mae_months']:.2f}  bias {s['mean_signed_error_months']:+.2f}"
                + bias_interval
            )
        for sex, stages in metrics.get("by_sex_and_stage", {}).items():
            lines.append(
                f"  {sex:<7} "
                + "  ".join(
                    f"{name} {s['mae_months']:.2f} ({s['mean_signed_error_months']:+.2f}, n={s['n']})"
                    for name, s in stages.items()
                )
            )
        lines.append("")
    for key, title in (
        ("stage", "Stage (predicted column)"),
        ("stage_from_regression", "Stage implied by the bone age"),
    ):
        st = metrics.get(key)
        if not st:
            continue
        lines += [
            title,
            f"  accuracy {st['accuracy']:.4f}  F1 weighted {st['f1_weighted']:.4f}  F1 macro {st['f1_macro']:.4f}  "
            f"kappa {st['cohen_kappa']:.4f}  QWK {st['quadratic_weighted_kappa']:.4f}",
            "  confusion matrix (rows: true, columns: predicted; " + ", ".join(STAGE_NAMES) + ")",
        ]
        lines += ["    " + " ".join(f"{v:6d}" for v in row) for row in st["confusion_matrix"]]
        for name, s in st["per_stage"].items():
            lines.append(
                f"  {name:<15} P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}  n={s['support']}"
            )
        if "agreement_with_regression" in st:
            lines.append(f"  agreement with the regression's stage: {st['agreement_with_regression']:.1%}")
        lines.append("")
    return "\n".join(lines)
