"""Refusing images the model cannot read: a distance from the training images in the backbone's feature space.

The pooled backbone features (the image part of ``forward_features``, without the sex embedding) of training images
are summarised by a PCA. An image's score is its whitened distance inside the principal subspace plus its
reconstruction residual, each scaled to about 1 for training images. The threshold is a high percentile (99.5th
by default) of the scores of one half of val; acceptance is measured on the other half, and rejection on non-hand
images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ASSESSABILITY_FILE = "assessability.safetensors"


class Assessability:
    """Scores (B, F) backbone features; ``score > threshold`` means "not assessable"."""

    def __init__(
        self,
        mean: torch.Tensor,
        components: torch.Tensor,
        variances: torch.Tensor,
        residual_scale: float,
        threshold: float,
    ):
        self.mean = mean  # (F,)
        self.components = components  # (K, F), orthonormal rows
        self.variances = variances  # (K,)
        self.residual_scale = residual_scale
        self.threshold = threshold

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int = 32) -> Assessability:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(n_components, len(features) - 1, features.shape[1]), random_state=0).fit(features)
        model = cls(
            torch.from_numpy(pca.mean_).float(),
            torch.from_numpy(np.ascontiguousarray(pca.components_)).float().contiguous(),
            torch.from_numpy(pca.explained_variance_).float().clamp_min(1e-8),
            1.0,
            float("inf"),
        )
        residual = model._parts(torch.from_numpy(features).float())[1]
        model.residual_scale = float(residual.mean().clamp_min(1e-8))
        return model

    def _parts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = features.float() - self.mean
        z = centred @ self.components.T  # (B, K)
        inside = (z**2 / self.variances).mean(dim=1)
        residual = ((centred - z @ self.components) ** 2).sum(dim=1)
        return inside, residual

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) scores, about 1 for images like the training set."""
        inside, residual = self._parts(features)
        return 0.5 * (inside + residual / self.residual_scale)

    def save(self, folder: str | Path, summary: dict[str, Any]) -> None:
        """Write the arrays next to the model's weights and the summary into its config.json."""
        from safetensors.torch import save

        from boneage.model import CONFIG_FILE, read_model_description, sha256_file

        folder = Path(folder)
        # as bytes, like the weights: safetensors' save_file creates owner-only (0600) files
        arrays = {"mean": self.mean, "components": self.components, "variances": self.variances}
        (folder / ASSESSABILITY_FILE).write_bytes(save(arrays))
        description = read_model_description(folder)
        description["assessability"] = {
            **summary,
            "threshold": self.threshold,
            "residual_scale": self.residual_scale,
            "sha256": sha256_file(folder / ASSESSABILITY_FILE),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(description, indent=2))

    @classmethod
    def load(cls, folder: str | Path, description: dict[str, Any]) -> Assessability | None:
        """The folder's assessability check, or None when the model has none."""
        from safetensors.torch import load_file

        from boneage.model import ModelFolderError, sha256_file

        info = description.get("assessability")
        if not info:
            return None
        path = Path(folder) / ASSESSABILITY_FILE
        if not path.is_file() or sha256_file(path) != info.get("sha256"):
            raise ModelFolderError(f"{path}: missing or its checksum does not match config.json")
        arrays = load_file(path)
        return cls(
            arrays["mean"],
            arrays["components"],
            arrays["variances"],
            float(info["residual_scale"]),
            float(info["threshold"]),
        )


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

    from boneage.data import BoneAgeDataset
    from boneage.explain import extract_features

    loader = DataLoader(BoneAgeDataset(table, predictor.contract), batch_size=batch_size, num_workers=num_workers)
    features = extract_features(predictor.model, loader)[0]
    return features[:, : predictor.model.backbone.num_features]


def fit_for_model(
    model_dir: str | Path,
    train_table: Any,
    val_table: Any,
    non_hand: list[Path],
    max_train: int = 3000,
    quantile: float = 0.995,
    seed: int = 0,
    n_components: int = 32,
) -> dict[str, Any]:
    """Fit the check on train features, set the threshold on one half of val, measure acceptance on the other half
    and rejection of ``non_hand`` images; store it in the model folder. Returns the summary."""
    from boneage.data import make_split, preprocess
    from boneage.predict import Predictor

    predictor = Predictor.load(model_dir)
    sample = train_table.sample(n=min(max_train, len(train_table)), random_state=seed).reset_index(drop=True)
    check = Assessability.fit(
        backbone_features(predictor, sample, num_workers=0 if len(sample) < 256 else 2), n_components
    )
    halves = make_split(val_table, fractions=(0.5, 0.5, 0.0), seed=seed)["split"].to_numpy()
    val_features = backbone_features(predictor, val_table, num_workers=0 if len(val_table) < 256 else 2)
    val_scores = check.score(torch.from_numpy(val_features)).numpy()
    check.threshold = float(np.quantile(val_scores[halves == "train"], quantile))
    with torch.inference_mode():
        images = torch.stack([preprocess(p, predictor.contract) for p in non_hand])
        male = torch.zeros(len(images), dtype=torch.long)
        non_hand_features = predictor.model.forward_features(images, male)[:, : predictor.model.backbone.num_features]
    non_hand_scores = check.score(non_hand_features).numpy()
    summary = {
        "method": "PCA of pooled backbone features of train images; score = whitened in-subspace distance + "
        "reconstruction residual (about 1 on train); threshold = the 99.5th percentile on one half of val",
        "n_components": int(check.components.shape[0]),
        "n_train": len(sample),
        "threshold_set_on": f"val calibration half (n={int((halves == 'train').sum())})",
        "acceptance_heldout_val": float((val_scores[halves == "val"] <= check.threshold).mean()),
        "n_heldout_val": int((halves == "val").sum()),
        "rejection_non_hand": float((non_hand_scores > check.threshold).mean()),
        "non_hand_scores": {p.stem: round(float(s), 2) for p, s in zip(non_hand, non_hand_scores)},
    }
    check.save(model_dir, summary)
    return summary


def fit_checks(
    model_dir: str | Path,
    labels: str | Path,
    images: str | Path,
    split: str | Path,
    max_train: int = 3000,
    n_components: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Give a trained model folder the shipped model's refusals: the "not assessable" check (:func:`fit_for_model`)
    and the checks for inverted and turned radiographs (:func:`boneage.presentation.fit_for_model`), fit on the
    split's ``train`` images and set and measured on its ``val``, stored in the folder. A folder that carries
    ``model.onnx`` gets it exported again, so onnxruntime returns the refusal score too. Returns what was fit."""
    import tempfile

    from boneage.data import read_labels, read_split
    from boneage.presentation import fit_for_model as fit_presentation
    from boneage.runtime import ONNX_FILE

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
        assessability = fit_for_model(model_dir, train, val, non_hand, max_train, seed=seed, n_components=n_components)
    has_onnx = (model_dir / ONNX_FILE).is_file()
    if has_onnx:  # with the refusal score in the graph, onnxruntime measures the next checks about 4x faster
        from boneage.export import attach_onnx

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
