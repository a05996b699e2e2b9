"""Batch prediction: image files or folders in, a prediction CSV out (one row per file, errors included).

Decoding and preprocessing run in DataLoader workers while the model predicts; rows are written to the CSV as each
batch finishes, so a long batch keeps everything already computed even if it is stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from boneage.clinical import compare_ages, parse_chronological_age
from boneage.config import DataConfig
from boneage.data import STAGE_NAMES, ImageReadError, dicom_patient_info, parse_sex, preprocess, stage_of
from boneage.model import BoneAgeNet, ModelFolderError, contract_from_description, load_model_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "lite0-128"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
PREDICTION_COLUMNS = [
    "id",
    "path",
    "male",
    "bone_age_months",
    "lower_months",
    "upper_months",
    "bone_age",
    "stage",
    "chronological_age_months",
    "ba_minus_ca_months",
    "sds",
    "call",
    "status",
    "message",
]


def default_model_dir() -> Path:
    """The model folder shipped inside the package (no network needed)."""
    folder = Path(str(resources.files("boneage") / "models" / DEFAULT_MODEL))
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"the default model is missing from the installation ({folder}); pass --model DIR")
    return folder


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively: .png/.jpg/.jpeg/.dcm/.dicom) into a sorted, de-duplicated list."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)  # a missing file becomes an error row, not a crash
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def read_metadata(metadata_csv: str | Path) -> pd.DataFrame:
    """``id,male`` (and optionally ``chronological_age_months``) per image id (the file stem)."""
    frame = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False)
    if "id" not in frame.columns:
        raise ValueError(f"{metadata_csv}: expected an 'id' column (the image file stem); found {list(frame.columns)}")
    if frame["id"].duplicated().any():
        raise ValueError(f"{metadata_csv}: duplicate ids {frame['id'][frame['id'].duplicated()].tolist()[:5]}")
    return frame.set_index("id")


def resolve_sexes(
    files: Sequence[Path], sex: str | None = None, metadata: str | Path | None = None
) -> list[bool | None]:
    """Each file's sex (True = male): the metadata CSV's ``male`` for its id, else ``sex`` (M/F), else a DICOM file's
    PatientSex; None where none of them says (never guessed).

    Raises:
        ValueError: ``sex`` is given but is not M or F.
    """
    default_sex = parse_sex(sex) if sex is not None else None
    if sex is not None and default_sex is None:
        raise ValueError(f"--sex: expected M or F, got {sex!r}")
    table = read_metadata(metadata) if metadata else None
    sexes: list[bool | None] = []
    for path in files:
        value = default_sex
        if table is not None and path.stem in table.index and "male" in table.columns:
            value = parse_sex(table.at[path.stem, "male"])
        if value is None:
            value = dicom_patient_info(path)["male"]
        sexes.append(value)
    return sexes


def resolve_ages(
    files: Sequence[Path], chronological_age: float | str | None = None, metadata: str | Path | None = None
) -> list[float | None]:
    """Each file's chronological age in months: the metadata CSV's ``chronological_age_months`` for its id, else
    ``chronological_age``, else a DICOM file's PatientAge (or StudyDate - PatientBirthDate); None where none says.

    Raises:
        ValueError: an age is not a number of months in [0, 240], naming where it came from.
    """
    default_age = parse_chronological_age(chronological_age, "--age")
    table = read_metadata(metadata) if metadata else None
    column = "chronological_age_months"
    ages: list[float | None] = []
    for path in files:
        value = None
        if table is not None and column in table.columns and path.stem in table.index:
            value = parse_chronological_age(table.at[path.stem, column], f"{metadata}: id {path.stem}, {column}")
        if value is None:
            value = default_age
        if value is None:
            dicom_age = dicom_patient_info(path)["age_months"]
            value = parse_chronological_age(dicom_age, f"{path}: DICOM PatientAge") if dicom_age is not None else None
        ages.append(value)
    return ages


def format_age(months: float) -> str:
    """182.4 -> '15y 2m'."""
    total = int(round(months))
    return f"{total // 12}y {total % 12}m"


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

    def __init__(self, model: BoneAgeNet, description: dict[str, Any], model_dir: Path):
        self.model = model.eval()
        self.description = description
        self.model_dir = model_dir
        self.contract = contract_from_description(description)
        self.task = description["model"]["task"]
        from boneage.quality import Assessability

        self.assessability = Assessability.load(model_dir, description)

    @classmethod
    def load(cls, model_dir: str | Path | None = None, backend: str = "torch") -> Predictor:
        """A model folder on PyTorch (``backend="torch"``), or an exported ``.onnx`` file (``backend="onnx"``)."""
        if backend == "onnx":
            from boneage.export import OnnxPredictor

            if model_dir is None:
                raise ValueError("--backend onnx needs --model FILE.onnx (made by `boneage export`)")
            return OnnxPredictor(model_dir)
        if backend != "torch":
            raise ValueError(f"--backend: expected torch or onnx, got {backend!r}")
        folder = Path(model_dir) if model_dir else default_model_dir()
        model, description = load_model_folder(folder)
        return cls(model, description, folder)

    tta_hflip: bool = False  # average the output over the image and its mirror (test-time augmentation)

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
        features = self.model.forward_features(images.contiguous(memory_format=torch.channels_last), male)
        image_features = features[:, : self.model.backbone.num_features]
        return self.model.forward_head(features), self.assessability.score(image_features)

    @torch.inference_mode()
    def predict_batch(self, images: torch.Tensor, male: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """(B, C, S, S) preprocessed images and (B,) sex -> months (NaN for a classifier), stage, score (or None)."""
        output, score = self.forward_with_score(images, male)
        output = output.float()
        if self.tta_hflip:
            output = 0.5 * (output + self.forward(images.flip(-1), male).float())
        if self.task == "regression":
            return {"months": output, "stage": stage_of(output), "score": score}
        return {"months": torch.full((len(images),), float("nan")), "stage": output.argmax(dim=1), "score": score}

    def predict_tensor(self, images: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) preprocessed images and (B,) sex -> (bone age months or NaN, stage index)."""
        result = self.predict_batch(images, male)
        return result["months"], result["stage"]  # type: ignore[return-value]

    def predict_files(
        self,
        paths: list[Path],
        sexes: list[bool | None],
        batch_size: int = 32,
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
                rows: dict[int, dict[str, Any]] = {}
                ready = []
                for item in items:
                    path = paths[item.index]
                    row = {"id": path.stem, "path": str(path), "male": sexes[item.index]}
                    if item.error is not None:
                        row.update(status="error", message=item.error)
                    elif sexes[item.index] is None:
                        row.update(status="error", message=f"{path}: sex unknown; pass --sex M|F or --metadata CSV")
                    else:
                        ready.append(item)
                    rows[item.index] = row
                if ready:
                    images = torch.stack([item.image for item in ready])  # type: ignore[misc]
                    male = torch.tensor([int(bool(sexes[item.index])) for item in ready])
                    result = self.predict_batch(images, male)
                    months, stages, scores = result["months"], result["stage"], result["score"]
                    for k, (item, age, stage) in enumerate(zip(ready, months.tolist(), stages.tolist())):
                        if scores is not None and float(scores[k]) > self.assessability.threshold:
                            rows[item.index].update(
                                status="not assessable",
                                message=f"{paths[item.index]}: does not look like the hand radiographs the model "
                                f"knows (score {float(scores[k]):.1f} > {self.assessability.threshold:.1f})",
                            )
                            continue
                        regression = age == age  # not NaN
                        if regression and self.half_width is not None:
                            rows[item.index].update(
                                lower_months=round(max(0.0, age - self.half_width), 2),
                                upper_months=round(age + self.half_width, 2),
                            )
                        rows[item.index].update(
                            bone_age_months=round(age, 2) if regression else None,
                            bone_age=format_age(age) if regression else None,
                            stage=STAGE_NAMES[stage],
                            status="ok",
                            message="",
                        )
                        chronological = ages[item.index] if ages is not None else None
                        if regression and chronological is not None:
                            clinical = compare_ages(age, chronological, bool(sexes[item.index]))
                            rows[item.index]["message"] = clinical.pop("clinical_note")
                            rows[item.index].update(clinical)
                for index in sorted(rows):
                    yield rows[index]
                bar.update(len(items))


def predict_paths(
    paths: Sequence[str | Path],
    output: str | Path,
    model_dir: str | Path | None = None,
    metadata: str | Path | None = None,
    sex: str | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    backend: str = "torch",
    tta: bool = False,
    chronological_age: float | str | None = None,
    gradcam_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Predict every image under ``paths`` and write ``output`` (CSV) row by row.

    Args:
        paths: image files and/or folders.
        output: the prediction CSV (``PREDICTION_COLUMNS``), or a ``.json`` file: ``{"model": ..., "predictions":
            [...]}`` with the same fields per image.
        model_dir: a model folder; the packaged default model when None.
        metadata: CSV with ``id,male`` per image id (file stem); overrides ``sex`` for the ids it lists.
        sex: ``M`` or ``F`` for every image without metadata; DICOM files without either use PatientSex.
        backend: ``torch`` (a model folder) or ``onnx`` (``model_dir`` is an exported ``.onnx`` file).
        tta: average each prediction with that of the mirrored image.
        chronological_age: months, for every image without ``chronological_age_months`` in the metadata; DICOM
            files without either use PatientAge or the birth and study dates. Adds BA - CA, SDS and the call.
        gradcam_dir: write ``<id>_gradcam.png`` (the radiograph beside its Grad-CAM overlay) here for every
            predicted image, and its path in a ``gradcam_path`` column (PyTorch backend only).

    Returns:
        The predictions as a frame (also written to ``output``).
    """
    files = collect_images(paths)
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, paths))} (expected .png/.jpg/.jpeg/.dcm files)")
    sexes = resolve_sexes(files, sex, metadata)
    ages = resolve_ages(files, chronological_age, metadata)
    if gradcam_dir is not None and backend != "torch":
        raise ValueError("--gradcam needs the PyTorch backend (Grad-CAM takes gradients through the model)")
    predictor = Predictor.load(model_dir, backend)
    predictor.tta_hflip = tta
    columns = PREDICTION_COLUMNS + (["gradcam_path"] if gradcam_dir is not None else [])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    as_json = output.suffix.lower() == ".json"
    # rows are streamed as they finish (CSV, or JSON Lines beside a .json output) so a stopped batch keeps them
    stream_path = output.with_suffix(".partial.jsonl") if as_json else output
    with open(stream_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if not as_json:
            writer.writeheader()
        for row in predictor.predict_files(files, sexes, batch_size, num_workers, progress, ages):
            if gradcam_dir is not None and row["status"] == "ok":
                row["gradcam_path"] = str(save_gradcam(predictor, row["path"], bool(row["male"]), gradcam_dir))
            if as_json:
                handle.write(json.dumps({k: row.get(k) for k in columns}) + "\n")
            else:
                writer.writerow(row)
            handle.flush()
            rows.append(row)
    if as_json:
        document = {
            "model": {
                "path": str(predictor.model_dir),
                "boneage_version": predictor.description.get("boneage_version"),
                "weights_sha256": predictor.description.get("weights_sha256"),
            },
            "predictions": [{k: row.get(k) for k in columns} for row in rows],
        }
        output.write_text(json.dumps(document, indent=2))
        stream_path.unlink()
    return pd.DataFrame(rows, columns=columns)


def save_gradcam(predictor: Predictor, path: str | Path, male: bool, folder: str | Path) -> Path:
    """``<folder>/<id>_gradcam.png``: the radiograph and its Grad-CAM overlay side by side."""
    import numpy as np
    from PIL import Image

    from boneage.explain import gradcam_overlay

    image, heat = gradcam_overlay(predictor.model, predictor.contract, path, male)
    gap = np.full((image.shape[0], 8, 3), 255, dtype=np.uint8)
    target = Path(folder) / f"{Path(path).stem}_gradcam.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([image, gap, heat], axis=1)).save(target)
    return target
