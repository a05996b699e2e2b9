"""A model folder on PyTorch: the networks' own preprocessing (:func:`boneage.dataset.preprocess`), the refusal check
on the backbone's features (:mod:`boneage.assessability`), and the model itself for Grad-CAM, features and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.assessability import Assessability
from boneage.backends.base import Predictor
from boneage.config import contract_from_description
from boneage.dataset import preprocess, stage_tensor
from boneage.imageio import view_batch
from boneage.model import BoneAgeEnsemble, BoneAgeNet, load_model_folder
from boneage.model_folder import (
    CONFIG_FILE,
    PLAIN_VIEW,
    correct_months,
    default_model_dir,
    presentation_checks,
    tta_default,
    tta_views,
)
from boneage.presentation import check as check_presentation


class TorchPredictor(Predictor):
    """A loaded model and its data contract; :meth:`predict_tensor` for in-process use, :meth:`predict_files` for
    batches."""

    def __init__(self, model: BoneAgeNet | BoneAgeEnsemble, description: dict[str, Any], model_dir: Path):
        self.model = model.eval()
        self.description = description
        self.model_dir = model_dir
        self.contract = contract_from_description(description)
        self.task = description["model"]["task"]
        self.assessability = Assessability.load(model_dir, description)
        self.threshold = self.assessability.threshold if self.assessability is not None else None
        self.presentation = presentation_checks(description) if self.assessability is not None else None
        # average with the mirrored image by default when the folder says so; callers may override
        self.tta_hflip = tta_default(description, Path(model_dir) / CONFIG_FILE)
        self.tta_views = tta_views(description, Path(model_dir) / CONFIG_FILE)

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> TorchPredictor:
        """A model folder (the shipped default model when None): checksums verified, weights loaded strictly."""
        folder = Path(model_dir) if model_dir else default_model_dir()
        model, description = load_model_folder(folder)
        return cls(model, description, folder)

    def preprocess(self, path: str | Path) -> np.ndarray:
        return preprocess(path, self.contract).numpy()

    def forward(self, images: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        """The model's raw output: (B,) months or (B, 4) logits."""
        return self.model(images.contiguous(memory_format=torch.channels_last), male)

    def forward_with_score(self, images: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw output and, with an assessability check, each image's score (one pass through the backbone)."""
        if self.assessability is None:
            return self.forward(images, male), None
        features, output = self.model.features_and_output(images.contiguous(memory_format=torch.channels_last), male)
        return output, self.assessability.score(features[:, : self.model.backbone.num_features])

    @torch.inference_mode()
    def _predict(self, images: torch.Tensor, male: torch.Tensor) -> dict[str, Any]:
        plain: torch.Tensor | None = None  # the images as they are: needed for the refusal score or as a view
        score = None
        if self.assessability is not None or PLAIN_VIEW in self.tta_views:
            plain, score = self.forward_with_score(images, male)
            plain = plain.float()
        checks: dict[str, Any] = {"score": score.float().cpu().numpy() if score is not None else None}
        array = images.float().cpu().numpy()  # (B, C, S, S): the presentation checks and the views resample it
        if self.presentation and score is not None:

            def corrected_scores(mask: np.ndarray, transform: Any) -> np.ndarray:
                index = torch.from_numpy(np.flatnonzero(mask)).to(images.device)
                scored = self.forward_with_score(transform(images[index]), male[index])[1]
                return scored.float().cpu().numpy()  # type: ignore[union-attr]

            checks.update(
                check_presentation(array, checks["score"], self.presentation, self.contract, corrected_scores)
            )

        def view(batch: torch.Tensor, angle: float, zoom: float) -> torch.Tensor:  # batch: the images themselves
            turned = view_batch(array, angle, zoom, bool(self.contract.standardize))
            return torch.from_numpy(turned).to(device=batch.device, dtype=batch.dtype)

        def run(inputs: torch.Tensor) -> torch.Tensor:
            return self.forward(inputs, male).float()

        outputs = self._view_outputs(images, plain, run, view, lambda inputs: inputs.flip(-1))
        output = torch.stack(outputs).mean(dim=0)
        if self.task == "regression":
            output = correct_months(output, male.to(output.device), self.description).float()
            return {"months": output, "stage": stage_tensor(output), **checks}
        return {"months": torch.full((len(images),), float("nan")), "stage": output.argmax(dim=1), **checks}

    def predict_batch(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray | None]:
        result = self._predict(torch.as_tensor(images), torch.as_tensor(male))
        return {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in result.items()}

    def predict_tensor(self, images: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) preprocessed images and (B,) sex -> (bone age months or NaN, stage index), as tensors."""
        result = self._predict(images, male)
        return result["months"], result["stage"]
