"""Fitting a model folder's refusals: the "not assessable" check (:mod:`boneage.assessability`) and the checks for
inverted and turned radiographs (:mod:`boneage.presentation`), fit on train images and set and measured on val.
The "not assessable" check learns the train images both as given and as the networks saw them in training (the
folder's recorded augmentation), so a film framed or exposed within what training covered is seldom refused.

``boneage fit-checks`` (:func:`fit_checks`) runs all three and stores them in the folder; the statistics need
scikit-learn, the features PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.assessability import Assessability
from boneage.backends.base import PREDICT_BATCH_SIZE, Predictor
from boneage.backends.torch import TorchPredictor
from boneage.config import AugmentConfig, Config
from boneage.dataset import BoneAgeDataset, preprocess, raw_batch_images
from boneage.errors import ConfigError
from boneage.explain import extract_features
from boneage.export import attach_onnx
from boneage.imageio import preprocess_array
from boneage.labels import make_split, read_labels, read_split
from boneage.model_folder import ONNX_FILE, update_description
from boneage.predict import load_predictor
from boneage.presentation import (
    FEATURES,
    THUMBNAIL,
    _standardised,
    invert_inputs,
    inverted_probability,
    polarity_features,
    rotate_inputs,
    rotation_probabilities,
    thumbnails,
)

logger = logging.getLogger(__name__)


def write_non_hand_images(folder: str | Path, size: int = 512, seed: int = 0) -> list[Path]:
    """Images that are not hand radiographs, for measuring rejection: blank, noise, gradients, two photographs
    shipped with scikit-learn, and synthetic chest films (thorax, lungs, ribs, spine)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images: dict[str, np.ndarray] = {
        "blank_black": np.zeros((size, size)),
        "blank_grey": np.full((size, size), 128.0),
        "noise_uniform": rng.uniform(0, 255, (size, size)),
        "noise_gaussian": np.clip(rng.normal(128, 40, (size, size)), 0, 255),
        "gradient": xx * 255,
    }
    for k in range(3):  # chest films: bright mediastinum and spine, dark lungs crossed by bright rib arcs
        chest = np.full((size, size), 60.0) + rng.normal(0, 5, (size, size))
        thorax = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.45) ** 2 < 1
        chest[thorax] = 170
        for side in (0.3, 0.7):
            lung = ((xx - side) / (0.15 + 0.02 * k)) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
            chest[lung] = 45
            for rib in np.linspace(0.25, 0.8, 9):
                arc = np.abs(yy - rib - 0.08 * ((xx - side) / 0.2) ** 2) < 0.008
                chest[arc & lung] = 150
        chest[(np.abs(xx - 0.5) < 0.03) & (yy > 0.1)] = 210
        images[f"chest_film_{k}"] = chest
    paths = []
    for name, array in images.items():
        path = folder / f"{name}.png"
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    for name in ("china.jpg", "flower.jpg"):
        path = folder / f"photo_{name}"
        Image.fromarray(load_sample_image(name)).save(path)
        paths.append(path)
    return paths


def backbone_features(predictor: Any, table: Any, batch_size: int = 64, num_workers: int = 2) -> np.ndarray:
    """(N, F) pooled backbone features of a labels table's images (no augmentation)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(BoneAgeDataset(table, predictor.contract), batch_size=batch_size, num_workers=num_workers)
    features = extract_features(predictor.model, loader)[0]
    return features[:, : predictor.model.backbone.num_features]


def trained_augmentation(description: dict[str, Any], where: str | Path = "config.json") -> AugmentConfig | None:
    """The augmentation a model folder's networks were trained with (``training.config.augment`` in its
    config.json, named ``where`` in errors), or None for a folder without that record."""
    recorded = ((description.get("training") or {}).get("config") or {}).get("augment")
    if not recorded:
        return None
    if "floor_mode" not in recorded:  # recorded before the floor became a share of each image's range
        recorded = {**recorded, "floor_mode": "absolute"}
    try:
        return Config.from_dict({"augment": recorded}, source=f"{where} training.config").augment
    except ConfigError as err:
        raise ConfigError(
            f"{err}; the refusal check cannot learn the training views from it: fit it on the images as given "
            "(fit_assessability(trained_views=False), boneage fit-checks --no-trained-views)"
        ) from None


def augmented_features(
    predictor: Any, table: Any, augment: AugmentConfig, seed: int = 0, batch_size: int = 64
) -> np.ndarray:
    """(N, F) pooled backbone features of a labels table's images, each augmented once as in training
    (:func:`boneage.dataset.raw_batch_images`, as training does; the random draws follow ``seed``)."""
    from torch.utils.data import DataLoader

    dataset = BoneAgeDataset(table, predictor.contract, raw=True, hand_boxes=augment.frame_p > 0)
    features = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():  # the caller's random state is left as it was
        torch.default_generator.manual_seed(seed)  # the draws are on the CPU: other devices' states are not touched
        for batch in DataLoader(dataset, batch_size=batch_size):
            images = raw_batch_images(batch, predictor.contract, augment).contiguous(memory_format=torch.channels_last)
            pooled = predictor.model.forward_features(images, batch["male"])
            features.append(pooled[:, : predictor.model.backbone.num_features].float().numpy())
    return np.concatenate(features)


def fit_assessability(
    model_dir: str | Path,
    train_table: Any,
    val_table: Any,
    non_hand: list[Path],
    max_train: int = 3000,
    quantile: float = 0.995,
    seed: int = 0,
    n_components: int = 32,
    trained_views: bool = True,
) -> dict[str, Any]:
    """Fit the check on train features, set the threshold on one half of val, measure acceptance on the other half
    and rejection of ``non_hand`` images; store it in the model folder. Returns the summary.

    With ``trained_views`` and a folder that records its training augmentation, the check learns each sampled train
    image twice: as given and augmented once as in training (:func:`augmented_features`). The networks were trained
    on those views, so a film framed, turned slightly or exposed within them is readable: fit on the images as given
    alone, the check refused ordinary clinic films, tightly cropped ones most (MODEL_CARD.md, "Real films")."""

    predictor = TorchPredictor.load(model_dir)
    sample = train_table.sample(n=min(max_train, len(train_table)), random_state=seed).reset_index(drop=True)
    augment = trained_augmentation(predictor.description, Path(model_dir) / "config.json") if trained_views else None
    if trained_views and augment is None:
        logger.warning("%s records no training augmentation: the check learns the images as given only", model_dir)
    fit_on = backbone_features(predictor, sample, num_workers=0 if len(sample) < 256 else 2)
    if augment is not None:
        fit_on = np.concatenate([fit_on, augmented_features(predictor, sample, augment, seed=seed)])
    check = Assessability.fit(fit_on, n_components)
    halves = make_split(val_table, fractions=(0.5, 0.5, 0.0), seed=seed)["split"].to_numpy()
    val_features = backbone_features(predictor, val_table, num_workers=0 if len(val_table) < 256 else 2)
    val_scores = check.score(torch.from_numpy(val_features)).numpy()
    check.threshold = float(np.quantile(val_scores[halves == "train"], quantile))
    non_hand_scores = _non_hand_scores(predictor, check, non_hand)
    summary = {
        "method": "PCA of pooled backbone features of train images"
        + (" as given and augmented once as in training" if augment is not None else "")
        + "; score = whitened in-subspace distance + reconstruction residual (about 1 on train); threshold = the "
        f"{quantile * 100:g}th percentile on one half of val",
        "n_components": int(check.components.shape[0]),
        "n_train": len(sample),
        "n_fit": len(fit_on),  # each train image once as given, and once augmented with trained_views
        **({"trained_views": dataclasses.asdict(augment)} if augment is not None else {}),
        "threshold_set_on": f"val calibration half (n={int((halves == 'train').sum())})",
        "acceptance_heldout_val": float((val_scores[halves == "val"] <= check.threshold).mean()),
        "n_heldout_val": int((halves == "val").sum()),
        "rejection_non_hand": float((non_hand_scores > check.threshold).mean()),
        "non_hand_scores": {p.stem: round(float(s), 2) for p, s in zip(non_hand, non_hand_scores)},
    }
    check.save(model_dir, summary)
    return summary


def _non_hand_scores(predictor: TorchPredictor, check: Assessability, non_hand: list[Path]) -> np.ndarray:
    with torch.inference_mode():
        images = torch.stack([preprocess(p, predictor.contract) for p in non_hand])
        male = torch.zeros(len(images), dtype=torch.long)
        features = predictor.model.forward_features(images, male)[:, : predictor.model.backbone.num_features]
    return check.score(features).numpy()


def rescore_non_hand(model_dir: str | Path, non_hand: list[Path]) -> dict[str, Any]:
    """Score ``non_hand`` images (:func:`write_non_hand_images`) with the folder's stored refusal check, as the folder
    now reads them, and bring ``assessability.non_hand_scores`` / ``rejection_non_hand`` up to date (after a change
    of the data contract, which the check itself does not see). Returns the updated section."""
    predictor = TorchPredictor.load(model_dir)
    check = predictor.assessability
    if check is None:
        raise ValueError(f"{model_dir}: no refusal check to score with; fit one first (boneage fit-checks)")
    scores = _non_hand_scores(predictor, check, non_hand)
    fields = {
        "rejection_non_hand": float((scores > check.threshold).mean()),
        "non_hand_scores": {p.stem: round(float(s), 2) for p, s in zip(non_hand, scores)},
    }
    return update_description(model_dir, lambda description: description["assessability"].update(fields))[
        "assessability"
    ]


def fit_checks(
    model_dir: str | Path,
    labels: str | Path,
    images: str | Path,
    split: str | Path,
    max_train: int = 3000,
    n_components: int = 32,
    seed: int = 0,
    trained_views: bool = True,
) -> dict[str, Any]:
    """Give a trained model folder the shipped model's refusals: the "not assessable" check (:func:`fit_assessability`)
    and the checks for inverted and turned radiographs (:func:`fit_presentation`), fit on the
    split's ``train`` images and set and measured on its ``val``, stored in the folder. A folder that carries
    ``model.onnx`` gets it exported again, so onnxruntime returns the refusal score too. Returns what was fit."""
    import tempfile

    model_dir = Path(model_dir)
    table = read_labels(labels, images)
    table = table.merge(read_split(split, table), on="id")
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    if len(train) < n_components or len(val) < 4:
        raise ValueError(
            f"{split}: fitting the checks needs at least {n_components} train and 4 val images; "
            f"found {len(train)} and {len(val)}"
        )
    n_fit = min(max_train, len(train))
    logger.info("1/3 not assessable: features of %d train and %d val images", n_fit, len(val))
    with tempfile.TemporaryDirectory(prefix="boneage-non-hand-") as folder:
        non_hand = write_non_hand_images(folder, seed=seed)
        assessability = fit_assessability(
            model_dir,
            train,
            val,
            non_hand,
            max_train,
            seed=seed,
            n_components=n_components,
            trained_views=trained_views,
        )
    has_onnx = (model_dir / ONNX_FILE).is_file()
    if has_onnx:  # with the refusal score in the graph, onnxruntime measures the next checks about 4x faster
        attach_onnx(model_dir)
    logger.info(
        "2/3 inverted and turned: statistics of %d train images; then each val image as given, as its negative and "
        "in three turns (the longest step)",
        n_fit,
    )
    backend = "onnx" if has_onnx else "torch"
    presentation = fit_presentation(model_dir, train, val, max_train=max_train, seed=seed, backend=backend)
    result: dict[str, Any] = {"assessability": assessability, **presentation}
    if has_onnx:
        logger.info("3/3 exporting %s again, with every check in its metadata", ONNX_FILE)
        result["onnx"] = attach_onnx(model_dir)
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

    paths = list(paths)
    for start in range(0, len(paths), batch_size):
        yield start, np.stack([preprocess_array(p, contract) for p in paths[start : start + batch_size]])


def _run(predictor: Predictor, images: np.ndarray, male: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(months, refusal score) from either backend's ``predict_batch``."""
    result = predictor.predict_batch(images, male)
    return np.asarray(result["months"]), np.asarray(result["score"], dtype=np.float32)


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

    batch_size = batch_size or PREDICT_BATCH_SIZE
    male = np.asarray(male, dtype=np.int64)
    truth = np.asarray(months, dtype=np.float64)
    threshold = float(predictor.threshold)
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


def fit_presentation(
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
    check (:func:`fit_assessability`) first. Returns what was stored."""

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
    update_description(model_dir, lambda description: description.update(checks))
    return checks


def measure_into_folder(
    model_dir: Any, paths: Any, male: Any, months: Any, name: str, backend: str = "auto"
) -> dict[str, Any]:
    """:func:`measure` the folder's own checks on more images (e.g. full-resolution samples) and store the result in
    its ``config.json`` as ``polarity.<name>`` and ``orientation.<name>``. Returns what was stored."""

    predictor = load_predictor(model_dir, backend)
    missing = [key for key in ("polarity", "orientation") if not predictor.description.get(key)]
    if missing:
        raise ValueError(
            f"{model_dir}: config.json has no {' or '.join(missing)} check; fit them with fit_presentation"
        )
    checks = {key: predictor.description[key] for key in ("polarity", "orientation")}
    measured = measure(predictor, paths, male, months, checks)

    def store(description: dict[str, Any]) -> None:
        for key, value in measured.items():
            description[key][name] = value

    update_description(model_dir, store)
    return measured
