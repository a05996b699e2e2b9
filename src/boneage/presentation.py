"""Catching radiographs presented wrongly: saved with inverted grey levels (bone dark, background bright), or turned
by 90 or 180 degrees.

Such an image still looks enough like a hand for the feature-space refusal check (:mod:`boneage.quality`) to let a
share of them through, and the networks then misread it: negatives are over-aged by about two years, turned images
are off by about 15 months (MODEL_CARD.md). Each check has two tests, both needed to call an image wrong:

1. *Cheap statistics* of the standardised model input, on every image. Polarity: its skewness, the mean of its outer
   frame and of its centre, its median and the energy above minus below the mean; each changes sign when the image
   is inverted, so a logistic regression without intercept (fit on training images and their negatives) gives
   ``P(inverted | x) = 1 - P(inverted | -x)``. Orientation: a multinomial logistic regression on an 8 x 8 thumbnail,
   fit on training images turned by 0, 90, 180 and 270 degrees.
2. Only for an image the statistics suspect: one more pass through the model with the image corrected (its negative,
   or turned back). The image is called wrong when the corrected one looks more like the training radiographs than it
   does (a lower refusal score).

Called images are refused with the reason, never corrected silently. NumPy only, so the onnxruntime install runs it;
fitting (:func:`fit_for_model`) needs scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

FEATURES = ("skewness", "frame_mean", "centre_mean", "median", "signed_energy")
THUMBNAIL = 8  # orientation: the standardised input averaged to THUMBNAIL x THUMBNAIL
TURNS = {
    1: "turned 90 degrees counter-clockwise",
    2: "upside down (turned 180 degrees)",
    3: "turned 90 degrees clockwise",
}


def _standardised(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    x = x[:, 0] if x.ndim == 4 else x
    x = x - x.mean(axis=(1, 2), keepdims=True)
    return x / np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6)


def polarity_features(images: np.ndarray) -> np.ndarray:
    """(B, C, S, S) or (B, S, S) model inputs (any normalisation) -> (B, 5) features, each odd under inversion."""
    x = _standardised(images)
    size = x.shape[-1]
    edge, quarter = max(1, size // 10), size // 4
    frame = np.ones(x.shape[1:], dtype=bool)
    frame[edge:-edge, edge:-edge] = False
    positive, negative = np.clip(x, 0, None), np.clip(-x, 0, None)
    return np.stack(
        [
            (x * x * x).mean(axis=(1, 2)),
            x[:, frame].mean(axis=1),
            x[:, quarter:-quarter, quarter:-quarter].mean(axis=(1, 2)),
            np.median(x.reshape(len(x), -1), axis=1),
            (positive * positive).mean(axis=(1, 2)) - (negative * negative).mean(axis=(1, 2)),
        ],
        axis=1,
    ).astype(np.float32)


def inverted_probability(images: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """(B,) probability from the grey-level statistics alone that each model input is a negative."""
    weights = np.asarray(info["weights"], dtype=np.float32)
    logits = polarity_features(images) @ weights
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))


def invert_inputs(images: Any, contract: Any) -> Any:
    """Model inputs of the inverted images (pixel ``v`` -> ``1 - v``), for a NumPy array or a torch tensor.

    Standardised inputs just change sign; fixed mean/std inputs are mapped back to pixels and forward again.
    """
    if contract.standardize:
        return -images
    mean = np.asarray(contract.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(contract.std, dtype=np.float32)[:, None, None]
    if not isinstance(images, np.ndarray):  # a torch tensor; torch is only imported by its callers
        mean, std = images.new_tensor(mean), images.new_tensor(std)
    return (1.0 - 2.0 * mean) / std - images


def call_inverted(
    images: np.ndarray, scores: np.ndarray, info: dict[str, Any], inverse_scores: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Which images are inverted: the statistics suspect it and the negative scores lower than the image.

    Args:
        images: (B, C, S, S) model inputs.
        scores: (B,) their refusal-check scores.
        info: ``config.json`` -> ``polarity``.
        inverse_scores: called with a (B,) boolean mask, returns the scores of those images' negatives; it runs only
            when some image is suspect.

    Returns:
        (B,) bool, and (B,) the negatives' scores (NaN where not computed).
    """
    suspect = inverted_probability(images, info) > 0.5
    inverse = np.full(len(suspect), np.nan, dtype=np.float32)
    if suspect.any():
        inverse[suspect] = np.asarray(inverse_scores(suspect), dtype=np.float32)
    return suspect & (inverse < np.asarray(scores, dtype=np.float32)), inverse


def thumbnails(images: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """(B, C, S, S) or (B, S, S) model inputs -> (B, size**2): the standardised image averaged to size x size."""
    x = _standardised(images)
    side = x.shape[-1] - x.shape[-1] % size
    x = x[:, :side, :side].reshape(len(x), size, side // size, size, side // size)
    return x.mean(axis=(2, 4)).reshape(len(x), -1)


def rotation_probabilities(images: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """(B, 4) probabilities from the thumbnail alone that each input is upright or turned by 1, 2, 3 quarter turns
    counter-clockwise (``np.rot90`` of an upright image)."""
    weights = np.asarray(info["weights"], dtype=np.float32)
    logits = thumbnails(images, int(info.get("thumbnail", THUMBNAIL))) @ weights.T + np.asarray(info["bias"])
    logits = logits - logits.max(axis=1, keepdims=True)
    odds = np.exp(logits)
    return odds / odds.sum(axis=1, keepdims=True)


def rotate_inputs(images: Any, turns: int) -> Any:
    """``turns`` quarter turns counter-clockwise of (..., S, S) model inputs (a NumPy array or a torch tensor)."""
    if isinstance(images, np.ndarray):
        return np.ascontiguousarray(np.rot90(images, turns, axes=(-2, -1)))
    return images.rot90(turns, dims=(-2, -1)).contiguous()


def call_rotated(
    images: np.ndarray, scores: np.ndarray, info: dict[str, Any], turned_back_scores: Callable[[np.ndarray, int], Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Which images are turned: the thumbnail suspects k quarter turns and the image turned back scores lower.

    Args:
        images: (B, C, S, S) model inputs.
        scores: (B,) their refusal-check scores.
        info: ``config.json`` -> ``orientation``.
        turned_back_scores: called with a (B,) boolean mask and k, returns the scores of those images turned back by
            k quarter turns; it runs once per suspected k, only when some image is suspect.

    Returns:
        (B,) quarter turns found (0: upright or not called), and (B,) the turned-back scores (NaN where not computed).
    """
    probabilities = rotation_probabilities(images, info)
    suspected = np.where(probabilities.max(axis=1) > 0.5, probabilities.argmax(axis=1), 0)
    back = np.full(len(suspected), np.nan, dtype=np.float32)
    for turns in (1, 2, 3):
        mask = suspected == turns
        if mask.any():
            back[mask] = np.asarray(turned_back_scores(mask, turns), dtype=np.float32)
    called = (suspected > 0) & (back < np.asarray(scores, dtype=np.float32))
    return np.where(called, suspected, 0), back


def check(
    images: np.ndarray,
    scores: np.ndarray,
    checks: dict[str, Any],
    contract: Any,
    corrected_scores: Callable[[np.ndarray, Callable[[Any], Any]], Any],
) -> dict[str, np.ndarray | None]:
    """Both checks on a batch, as ``predict_batch`` returns them.

    Args:
        images: (B, C, S, S) model inputs as NumPy (for the statistics).
        scores: (B,) their refusal-check scores.
        checks: ``{"polarity": ..., "orientation": ...}`` from ``config.json`` (either may be missing).
        contract: the model's data contract.
        corrected_scores: ``(mask, transform) -> scores`` of ``transform(inputs[mask])``, with the backend's own
            inputs (a NumPy array or a torch tensor).
    """
    result: dict[str, np.ndarray | None] = dict.fromkeys(("inverted", "inverse_score", "turns", "turned_score"))
    if checks.get("polarity"):
        result["inverted"], result["inverse_score"] = call_inverted(
            images,
            scores,
            checks["polarity"],
            lambda mask: corrected_scores(mask, lambda x: invert_inputs(x, contract)),
        )
    if checks.get("orientation"):
        result["turns"], result["turned_score"] = call_rotated(
            images,
            scores,
            checks["orientation"],
            lambda mask, turns: corrected_scores(mask, lambda x: rotate_inputs(x, -turns)),
        )
    return result


def fit_weights(features: np.ndarray, c: float = 10.0) -> list[float]:
    """Logistic-regression weights (no intercept) separating (B, 5) :func:`polarity_features` of correctly exported
    radiographs from their negatives (the same features with the sign changed)."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([features, -features])
    y = np.r_[np.zeros(len(features)), np.ones(len(features))]
    clf = LogisticRegression(fit_intercept=False, C=c, max_iter=1000).fit(x, y)
    return [round(float(w), 6) for w in clf.coef_[0]]


def fit_orientation(upright: np.ndarray, c: float = 0.1) -> dict[str, Any]:
    """Multinomial logistic regression on (B, S, S) standardised upright inputs turned by 0-3 quarter turns."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([thumbnails(np.rot90(upright, k, axes=(1, 2))) for k in range(4)])
    y = np.repeat(np.arange(4), len(upright))
    clf = LogisticRegression(C=c, max_iter=3000).fit(x, y)
    return {
        "thumbnail": THUMBNAIL,
        "weights": np.round(clf.coef_, 6).tolist(),
        "bias": np.round(clf.intercept_, 6).tolist(),
    }


def _inputs(paths: Any, contract: Any, batch_size: int) -> Any:
    from boneage.imageio import preprocess_array

    paths = list(paths)
    for start in range(0, len(paths), batch_size):
        yield start, np.stack([preprocess_array(p, contract) for p in paths[start : start + batch_size]])


def _run(predictor: Any, images: np.ndarray, male: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(months, refusal score) from either backend's ``predict_batch``, as NumPy."""
    from boneage.runtime import OnnxPredictor

    if isinstance(predictor, OnnxPredictor):
        result = predictor.predict_batch(images, male)
        return np.asarray(result["months"]), np.asarray(result["score"])
    import torch

    result = predictor.predict_batch(torch.from_numpy(images), torch.from_numpy(male))
    return result["months"].cpu().numpy(), result["score"].float().cpu().numpy()


def _errors(months: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    if not len(months):
        return {"mae": None, "bias": None}
    error = months - truth
    return {"mae": round(float(np.abs(error).mean()), 2), "bias": round(float(error.mean()), 2)}


def measure(
    predictor: Any, paths: Any, male: Any, months: Any, checks: dict[str, Any], batch_size: int | None = None
) -> dict[str, Any]:
    """Each image as given, as its negative and turned by 90, 180 and 270 degrees through ``predictor``: how often
    the checks call each wrong, how many wrong ones got an age without and with the checks, and their error against
    ``months`` (reference ages). ``batch_size``: default ``boneage predict``'s."""
    from boneage.runtime import PREDICT_BATCH_SIZE  # runtime imports this module: not at the top

    batch_size = batch_size or PREDICT_BATCH_SIZE
    male = np.asarray(male, dtype=np.int64)
    truth = np.asarray(months, dtype=np.float64)
    threshold = float(predictor.threshold if hasattr(predictor, "threshold") else predictor.assessability.threshold)
    keys = ("prob", "score", "inverse_score", "inverse_months", "turn_prob", "turn_score", "turn_months")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    predictor.presentation, stored = None, predictor.presentation  # the parts are measured separately
    try:
        for start, images in _inputs(paths, predictor.contract, batch_size):
            sex = male[start : start + len(images)]
            parts["prob"].append(inverted_probability(images, checks["polarity"]))
            inverse_months, inverse_score = _run(predictor, invert_inputs(images, predictor.contract), sex)
            parts["inverse_score"].append(inverse_score)
            parts["inverse_months"].append(inverse_months)
            turned = [rotate_inputs(images, k) for k in range(4)]
            runs = [_run(predictor, x, sex) for x in turned]
            parts["score"].append(runs[0][1])
            parts["turn_prob"].append(np.stack([rotation_probabilities(x, checks["orientation"]) for x in turned], 1))
            parts["turn_score"].append(np.stack([r[1] for r in runs], 1))  # (B, 4): as given and turned 1-3 times
            parts["turn_months"].append(np.stack([r[0] for r in runs], 1))
    finally:
        predictor.presentation = stored
    prob, score, inverse_score, inverse_months, turn_prob, turn_score, turn_months = (
        np.concatenate(parts[k]) for k in keys
    )
    n = len(prob)
    # polarity: suspect when prob > 0.5, called when the negative also scores lower; a negative swaps the two
    called = (prob > 0.5) & (inverse_score < score)
    called_negative = (prob < 0.5) & (score < inverse_score)
    before = inverse_score <= threshold
    after = before & ~called_negative
    polarity = {
        "n": n,
        "as_given_called_inverted": int(called.sum()),
        "as_given_suspect_by_statistics": int((prob > 0.5).sum()),
        "negatives_called_inverted": int(called_negative.sum()),
        "negatives_suspect_by_statistics": int((prob < 0.5).sum()),
        "negatives_given_an_age_without_check": int(before.sum()),
        "negatives_given_an_age_without_check_error": _errors(inverse_months[before], truth[before]),
        "negatives_given_an_age_with_check": int(after.sum()),
        "negatives_given_an_age_with_check_error": _errors(inverse_months[after], truth[after]),
    }
    # orientation: image turned r times, thumbnail suspects k turns, turned back it is the image turned r - k times
    suspected = np.where(turn_prob.max(axis=2) > 0.5, turn_prob.argmax(axis=2), 0)  # (n, 4)
    rows = np.arange(n)[:, None]
    back_score = turn_score[rows, (np.arange(4)[None, :] - suspected) % 4]
    turned_called = (suspected > 0) & (back_score < turn_score)
    turned_truth = np.repeat(truth[:, None], 3, axis=1)
    before = turn_score[:, 1:] <= threshold
    after = before & ~turned_called[:, 1:]
    orientation = {
        "n": n,
        "as_given_called_turned": int(turned_called[:, 0].sum()),
        "as_given_suspect_by_thumbnail": int((suspected[:, 0] > 0).sum()),
        "n_turned": 3 * n,
        "turned_called_turned": int(turned_called[:, 1:].sum()),
        "turned_called_with_the_right_turn": int((turned_called & (suspected == np.arange(4)))[:, 1:].sum()),
        "turned_given_an_age_without_check": int(before.sum()),
        "turned_given_an_age_without_check_error": _errors(turn_months[:, 1:][before], turned_truth[before]),
        "turned_given_an_age_with_check": int(after.sum()),
        "turned_given_an_age_with_check_error": _errors(turn_months[:, 1:][after], turned_truth[after]),
    }
    return {"polarity": polarity, "orientation": orientation}


def fit_for_model(
    model_dir: Any,
    train_table: Any,
    val_table: Any,
    max_train: int = 3000,
    seed: int = 0,
    backend: str = "auto",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Fit the statistics on train images (with their negatives and turned copies), measure both checks on val and
    store them in the model folder's ``config.json`` (``polarity``, ``orientation``). The folder needs its refusal
    check (:func:`boneage.quality.fit_for_model`) first. Returns what was stored."""
    from boneage.runtime import load_predictor

    predictor = load_predictor(model_dir, backend)
    sample = train_table.sample(n=min(max_train, len(train_table)), random_state=seed)
    features, upright = [], []
    for _, x in _inputs(sample["path"], predictor.contract, 64):
        features.append(polarity_features(x))
        upright.append(_standardised(x))
    polarity: dict[str, Any] = {
        "features": list(FEATURES),
        "weights": fit_weights(np.concatenate(features)),
        "method": "logistic regression without intercept on grey-level statistics of the model input (odd under "
        "inversion), fit on train images and their negatives; an image is called inverted when P > 0.5 and its "
        "negative's refusal score is lower than its own",
        "n_train": len(sample),
    }
    orientation: dict[str, Any] = {
        **fit_orientation(np.concatenate(upright)),
        "method": "multinomial logistic regression on an 8 x 8 thumbnail of the standardised input, fit on train "
        "images turned by 0, 1, 2, 3 quarter turns; an image is called turned when P(k turns) > 0.5 for k > 0 and, "
        "turned back, its refusal score is lower than its own",
        "n_train": len(sample),
    }
    del upright
    checks = {"polarity": polarity, "orientation": orientation}
    measured = measure(predictor, val_table["path"], val_table["male"], val_table["boneage"], checks, batch_size)
    polarity["val"], orientation["val"] = measured["polarity"], measured["orientation"]
    _update_config(model_dir, lambda description: description.update(checks))
    return checks


def measure_into_folder(
    model_dir: Any, paths: Any, male: Any, months: Any, name: str, backend: str = "auto"
) -> dict[str, Any]:
    """:func:`measure` the folder's own checks on more images (e.g. full-resolution samples) and store the result in
    its ``config.json`` as ``polarity.<name>`` and ``orientation.<name>``. Returns what was stored."""
    from boneage.runtime import load_predictor

    predictor = load_predictor(model_dir, backend)
    missing = [key for key in ("polarity", "orientation") if not predictor.description.get(key)]
    if missing:
        raise ValueError(f"{model_dir}: config.json has no {' or '.join(missing)} check; fit them with fit_for_model")
    checks = {key: predictor.description[key] for key in ("polarity", "orientation")}
    measured = measure(predictor, paths, male, months, checks)

    def store(description: dict[str, Any]) -> None:
        for key, value in measured.items():
            description[key][name] = value

    _update_config(model_dir, store)
    return measured


def _update_config(model_dir: Any, change: Callable[[dict[str, Any]], None]) -> None:
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    description = json.loads(config.read_text())
    change(description)
    config.write_text(json.dumps(description, indent=2))


def inverted_message(path: Any, score: float | None, inverse_score: float | None) -> str:
    """The row message for an image called inverted."""
    scores = (
        f"; refusal score {score:.1f} as given, {inverse_score:.1f} inverted"
        if score is not None and inverse_score is not None
        else ""
    )
    return (
        f"{path}: looks inverted (bone darker than soft tissue{scores}): save it with bone bright "
        "(a DICOM file: pixel data that matches its PhotometricInterpretation)"
    )


def turned_message(path: Any, turns: int, score: float | None, turned_score: float | None) -> str:
    """The row message for an image called turned by ``turns`` quarter turns counter-clockwise."""
    scores = (
        f"; refusal score {score:.1f} as given, {turned_score:.1f} turned back"
        if score is not None and turned_score is not None
        else ""
    )
    return f"{path}: looks {TURNS[turns]}{scores}: turn it upright, fingers up, and read it again"
