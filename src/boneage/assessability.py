"""Refusing images the model cannot read: a distance from the training images in the backbone's feature space.

The pooled backbone features (the image part of ``forward_features``, without the sex embedding) of training images
are summarised by a PCA. An image's score is its whitened distance inside the principal subspace plus its
reconstruction residual, each scaled to about 1 for training images. The threshold is a high percentile (99.5th
by default) of the scores of one half of val; acceptance is measured on the other half, and rejection on non-hand
images (fitting: :mod:`boneage.fit_checks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.errors import ModelFolderError
from boneage.model_folder import ASSESSABILITY_FILE, atomic_write_bytes, sha256_file, update_description


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

        folder = Path(folder)
        # as bytes, like the weights: safetensors' save_file creates owner-only (0600) files
        arrays = {"mean": self.mean, "components": self.components, "variances": self.variances}
        atomic_write_bytes(folder / ASSESSABILITY_FILE, save(arrays))
        info = {
            **summary,
            "threshold": self.threshold,
            "residual_scale": self.residual_scale,
            "sha256": sha256_file(folder / ASSESSABILITY_FILE),
        }
        update_description(folder, lambda description: description.update(assessability=info))

    @classmethod
    def load(cls, folder: str | Path, description: dict[str, Any]) -> Assessability | None:
        """The folder's assessability check, or None when the model has none."""
        from safetensors.torch import load_file

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
