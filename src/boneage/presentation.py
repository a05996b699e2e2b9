"""Catching radiographs presented wrongly: saved with inverted grey levels (bone dark, background bright), or turned
by 90 or 180 degrees.

Such an image still looks enough like a hand for the feature-space refusal check (:mod:`boneage.assessability`) to let a
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
fitting (:func:`boneage.fit_checks.fit_presentation`) needs scikit-learn.
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
