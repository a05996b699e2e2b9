"""Batch prediction: image files or folders in, a prediction CSV out (one row per file, errors included).

Decoding and preprocessing run in DataLoader workers while the model predicts; rows are written to the CSV as each
batch finishes, so a long batch keeps everything already computed even if it is stopped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from boneage.config import DataConfig
from boneage.data import ImageReadError, preprocess, stage_of
from boneage.model import CONFIG_FILE, BoneAgeEnsemble, BoneAgeNet, contract_from_description, load_model_folder
from boneage.presentation import check as check_presentation
from boneage.runtime import (  # noqa: F401 - re-exported: the torch-free parts of prediction live in runtime
    DEFAULT_MODEL,
    IMAGE_SUFFIXES,
    PREDICT_BATCH_SIZE,
    PREDICTION_COLUMNS,
    collect_images,
    correct_months,
    default_model_dir,
    finish_row,
    format_age,
    image_id,
    new_row,
    predict_paths,
    presentation_checks,
    read_metadata,
    resolve_ages,
    resolve_sexes,
    row_checks,
    tta_default,
)

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    index: int
    image: torch.Tensor | None
    error: str | None


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], contract: DataConfig):
        self.paths = paths
        self.contract = contract

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Item:
        try:
            return _Item(index, preprocess(self.paths[index], self.contract), None)
        except (ImageReadError, ImportError) as err:
            return _Item(index, None, str(err))


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def _num_workers(requested: int | None, n_files: int) -> int:
    if requested is not None:
        return requested
    return 0 if n_files < 16 else min(2, os.cpu_count() or 1)


class Predictor:
    """A loaded model and its data contract; ``predict_tensor`` for in-process use, ``predict_files`` for batches."""

    def __init__(self, model: BoneAgeNet | BoneAgeEnsemble, description: dict[str, Any], model_dir: Path):
        self.model = model.eval()
        self.description = description
        self.model_dir = model_dir
        self.contract = contract_from_description(description)
        self.task = description["model"]["task"]
        from boneage.quality import Assessability

        self.assessability = Assessability.load(model_dir, description)
        self.presentation = presentation_checks(description) if self.assessability is not None else None
        # average with the mirrored image by default when the folder says so; callers may override
        self.tta_hflip = tta_default(description, Path(model_dir) / CONFIG_FILE)

    @classmethod
    def load(cls, model_dir: str | Path | None = None, backend: str = "torch") -> Predictor:
        """A model folder on PyTorch (``backend="torch"``), or an exported ``.onnx`` file (``backend="onnx"``)."""
        if backend == "onnx":
            from boneage.runtime import OnnxPredictor

            return OnnxPredictor(model_dir if model_dir is not None else default_model_dir())
        if backend != "torch":
            raise ValueError(f"--backend: expected torch or onnx, got {backend!r}")
        folder = Path(model_dir) if model_dir else default_model_dir()
        model, description = load_model_folder(folder)
        return cls(model, description, folder)

    @property
    def half_width(self) -> float | None:
        """The calibrated prediction-interval half-width (months), if the model folder carries one."""
        value = self.description.get("uncertainty", {}).get("half_width_months")
        return float(value) if value is not None else None

    def forward(self, images: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        """The model's raw output: (B,) months or (B, 4) logits."""
        return self.model(images.contiguous(memory_format=torch.channels_last), male)

    assessability: Any = None  # a boneage.quality.Assessability, when the model folder carries one

    def forward_with_score(self, images: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw output and, with an assessability check, each image's score (one pass through the backbone)."""
        if self.assessability is None:
            return self.forward(images, male), None
        features, output = self.model.features_and_output(images.contiguous(memory_format=torch.channels_last), male)
        return output, self.assessability.score(features[:, : self.model.backbone.num_features])

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """(B, C, S, S) preprocessed images and (B,) sex -> months (NaN for a classifier), stage, score (or None)
        and, with the presentation checks, inverted / turns and the corrected images' scores
        (:func:`boneage.presentation.check`)."""
        output, score = self.forward_with_score(images, male)
        output = output.float()
        checks: dict[str, Any] = {"score": score}
        if self.presentation and score is not None:

            def corrected_scores(mask: np.ndarray, transform: Any) -> np.ndarray:
                index = torch.from_numpy(np.flatnonzero(mask)).to(images.device)
                scored = self.forward_with_score(transform(images[index]), male[index])[1]
                return scored.float().cpu().numpy()  # type: ignore[union-attr]

            checks.update(
                check_presentation(
                    images.float().cpu().numpy(),
                    score.float().cpu().numpy(),
                    self.presentation,
                    self.contract,
                    corrected_scores,
                )
            )
        if self.tta_hflip:
            output = 0.5 * (output + self.forward(images.flip(-1), male).float())
        if self.task == "regression":
            output = correct_months(output, male.to(output.device), self.description).float()
            return {"months": output, "stage": stage_of(output), **checks}
        return {"months": torch.full((len(images),), float("nan")), "stage": output.argmax(dim=1), **checks}

    def predict_tensor(self, images: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) preprocessed images and (B,) sex -> (bone age months or NaN, stage index)."""
        result = self.predict_batch(images, male)
        return result["months"], result["stage"]  # type: ignore[return-value]

    def predict_files(
        self,
        paths: list[Path],
        sexes: list[bool | None],
        batch_size: int = PREDICT_BATCH_SIZE,
        num_workers: int | None = None,
        progress: bool = False,
        ages: list[float | None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield one result row per path, in order; unreadable files and unknown sex give an error row.

        With a chronological age for a file (``ages``), its row also carries BA - CA, the SDS and the call
        (:func:`boneage.clinical.compare_ages`).
        """
        from tqdm.auto import tqdm

        workers = _num_workers(num_workers, len(paths))
        loader = DataLoader(
            _ImageFiles(paths, self.contract), batch_size=batch_size, num_workers=workers, collate_fn=_collate
        )
        with tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress or len(paths) < 10) as bar:
            for items in loader:
                rows = {item.index: new_row(paths[item.index], sexes[item.index], item.error) for item in items}
                ready = [item for item in items if "status" not in rows[item.index]]
                if ready:
                    images = torch.stack([item.image for item in ready])  # type: ignore[misc]
                    male = torch.tensor([int(bool(sexes[item.index])) for item in ready])
                    result = self.predict_batch(images, male)
                    threshold = self.assessability.threshold if self.assessability is not None else None
                    for k, (item, age, stage) in enumerate(
                        zip(ready, result["months"].tolist(), result["stage"].tolist())
                    ):
                        finish_row(
                            rows[item.index],
                            age,
                            stage,
                            threshold=threshold,
                            half_width=self.half_width,
                            chronological_age=ages[item.index] if ages is not None else None,
                            **row_checks(result, k),
                        )
                for index in sorted(rows):
                    yield rows[index]
                bar.update(len(items))


def save_gradcam(predictor: Predictor, path: str | Path, male: bool, folder: str | Path) -> Path:
    """``<folder>/<id>_gradcam.png``: the radiograph and its Grad-CAM overlay side by side."""
    import numpy as np
    from PIL import Image

    from boneage.explain import gradcam_overlay

    image, heat = gradcam_overlay(predictor.model, predictor.contract, path, male)
    gap = np.full((image.shape[0], 8, 3), 255, dtype=np.uint8)
    target = Path(folder) / f"{image_id(path)}_gradcam.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([image, gap, heat], axis=1)).save(target)
    return target
