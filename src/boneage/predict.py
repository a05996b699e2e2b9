"""``boneage predict`` as a library call: pick a backend for a model (:func:`load_predictor`), predict every image
under the paths given and write the rows (CSV, or JSON) as they finish, so a stopped batch keeps what it computed and
``resume`` continues it."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boneage.backends.base import PREDICT_BATCH_SIZE, Predictor, importable
from boneage.errors import ModelLoadError
from boneage.inputs import collect_images, image_id, resolve_ages, resolve_readings, resolve_sexes
from boneage.model_folder import ONNX_FILE, PLAIN_VIEW, default_model_dir
from boneage.rows import PREDICTION_COLUMNS, add_note, add_reading, finished_rows

logger = logging.getLogger(__name__)


def torch_available() -> bool:
    """PyTorch and timm are installed (checked without importing them: that takes seconds)."""
    return importable("torch") and importable("timm")


def load_predictor(model_dir: str | Path | None = None, backend: str = "auto") -> Predictor:
    """A predictor for a model folder or ``.onnx`` file.

    ``auto`` takes onnxruntime when the model is an ``.onnx`` file or its folder carries ``model.onnx`` (the shipped
    model does; 2x faster on CPU, same output within 0.05 month), else PyTorch.
    """
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"--backend: expected auto, torch or onnx, got {backend!r}")
    target = Path(model_dir) if model_dir is not None else default_model_dir()
    onnx_ready = importable("onnxruntime")
    requested = backend
    if backend == "auto":
        has_onnx = target.suffix == ".onnx" or (target / ONNX_FILE).is_file()
        backend = "onnx" if has_onnx and onnx_ready else "torch"
    if backend == "onnx":
        from boneage.backends.onnx import OnnxPredictor

        return OnnxPredictor(target)
    if not torch_available():
        if requested == "torch":
            raise ModelLoadError("the PyTorch backend needs PyTorch: pip install 'boneage[torch]' (or --backend onnx)")
        raise ModelLoadError(
            f"{target}: no {ONNX_FILE} to run without PyTorch; install PyTorch (pip install 'boneage[torch]') "
            "or pass --model FILE.onnx made by `boneage export`"
        )
    from boneage.backends.torch import TorchPredictor

    return TorchPredictor.load(target)


def predict_paths(
    paths: Sequence[str | Path],
    output: str | Path,
    model_dir: str | Path | None = None,
    metadata: str | Path | None = None,
    sex: str | None = None,
    batch_size: int = PREDICT_BATCH_SIZE,
    num_workers: int | None = None,
    progress: bool = True,
    backend: str = "auto",
    tta: bool | None = None,
    chronological_age: float | str | None = None,
    gradcam_dir: str | Path | None = None,
    resume: bool = False,
    reading: float | str | None = None,
) -> Any:
    """Predict every image under ``paths`` and write ``output`` (CSV) row by row.

    Args:
        paths: image files and/or folders.
        output: the prediction CSV (``PREDICTION_COLUMNS``), or a ``.json`` file: ``{"model": ..., "predictions":
            [...]}`` with the same fields per image.
        model_dir: a model folder or an exported ``.onnx`` file; the packaged default model when None.
        metadata: CSV with ``id,male[,chronological_age_months]`` per image id (:func:`image_id`); overrides ``sex`` and
            ``chronological_age`` for the ids it lists.
        sex: ``M`` or ``F`` for every image without metadata; DICOM files without either use PatientSex.
        backend: ``auto`` (see :func:`load_predictor`), ``torch`` or ``onnx``.
        tta: average each prediction with that of the mirrored image (and over the folder's other test-time
            views, ``output.tta_views``); False: one pass of the image as it is; None: the model folder's default
            (``output.tta_hflip`` and ``output.tta_views`` in its config.json).
        chronological_age: months, for every image without ``chronological_age_months`` in the metadata; DICOM
            files without either use PatientAge or the birth and study dates. Adds BA - CA, SDS and the call.
        gradcam_dir: write ``<id>_gradcam.png`` (the radiograph beside its Grad-CAM overlay) here for every
            predicted image, and its path in a ``gradcam_path`` column (needs PyTorch).
        reading: a reader's bone age in months, for every image without ``reader_bone_age_months`` (or a labels
            CSV's ``boneage``) in the metadata: set beside the model's, with a note when it lies outside the interval.
        resume: keep the rows that a stopped run of the same command already wrote to ``output`` (predicted or
            refused; error rows are tried again) and predict only the other files; without it ``output`` is
            overwritten.

    Returns:
        The predictions as a pandas frame (also written to ``output``).
    """
    import pandas as pd

    files = collect_images(paths)
    if not files:
        raise ValueError(
            f"no images found in {', '.join(map(str, paths))} "
            "(expected .png/.jpg/.jpeg/.tif/.tiff/.bmp/.webp/.dcm/.dicom files, or DICOM files by content)"
        )
    columns = PREDICTION_COLUMNS + (["gradcam_path"] if gradcam_dir is not None else [])
    output = Path(output)
    rows = finished_rows(output, columns, files) if resume else []
    if rows:
        done = {row["path"] for row in rows}
        files = [path for path in files if str(path) not in done]
        logger.info("%s: resuming: %d rows kept, %d images to predict", output, len(rows), len(files))
    sexes = resolve_sexes(files, sex, metadata)
    age_notes: list[str | None] = []
    ages = resolve_ages(files, chronological_age, metadata, notes=age_notes)
    readings = resolve_readings(files, reading, metadata)
    if gradcam_dir is not None:
        if backend == "onnx":
            raise ValueError("--gradcam needs the PyTorch backend (Grad-CAM takes gradients through the model)")
        backend = "torch"
    predictor = load_predictor(model_dir, backend)
    if tta is not None:
        predictor.tta_hflip = tta
        if not tta:
            predictor.tta_views = [PLAIN_VIEW]
    output.parent.mkdir(parents=True, exist_ok=True)
    as_json = output.suffix.lower() == ".json"
    # rows are streamed as they finish (CSV, or JSON Lines beside a .json output) so a stopped batch keeps them
    stream_path = output.with_suffix(".partial.jsonl") if as_json else output
    with open(stream_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if not as_json:
            writer.writeheader()
        for row in rows:  # kept from the stopped run, written again first
            if as_json:
                handle.write(json.dumps({k: row.get(k) for k in columns}) + "\n")
            else:
                writer.writerow(row)
        handle.flush()
        predicted = predictor.predict_files(files, sexes, batch_size, num_workers, progress, ages)
        for row, reading, age_note in zip(predicted, readings, age_notes):
            add_note(row, age_note)
            add_reading(row, reading)
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


def save_gradcam(predictor: Any, path: str | Path, male: bool, folder: str | Path) -> Path:
    """``<folder>/<id>_gradcam.png``: the radiograph and its Grad-CAM overlay side by side (a
    :class:`boneage.backends.torch.TorchPredictor`)."""
    import numpy as np
    from PIL import Image

    from boneage.explain import gradcam_overlay

    image, heat = gradcam_overlay(predictor.model, predictor.contract, path, male)
    gap = np.full((image.shape[0], 8, 3), 255, dtype=np.uint8)
    target = Path(folder) / f"{image_id(path)}_gradcam.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([image, gap, heat], axis=1)).save(target)
    return target
