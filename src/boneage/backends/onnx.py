"""An exported model on onnxruntime: NumPy and Pillow preprocessing (:mod:`boneage.imageio`), no PyTorch.

A torch-free install (``pip install boneage`` without the ``torch`` extra) predicts through this backend from an
exported ``.onnx`` file, or from a model folder that carries a checked ``model.onnx`` (the shipped default model does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from boneage.backends.base import Predictor, importable
from boneage.config import contract_from_description
from boneage.errors import ModelLoadError
from boneage.imageio import preprocess_array, stage_index, view_batch
from boneage.model_folder import (
    CONFIG_FILE,
    METADATA_KEY,
    ONNX_FILE,
    PLAIN_VIEW,
    correct_months,
    presentation_checks,
    read_model_description,
    sha256_file,
    tta_default,
    tta_views,
)
from boneage.presentation import check as check_presentation


class OnnxPredictor(Predictor):
    """An exported model on onnxruntime: batches through one session.

    Args:
        path: an ``.onnx`` file made by ``boneage export``, or a model folder with ``model.onnx`` whose checksum
            ``config.json`` records (``onnx.sha256``, written by ``boneage export --attach``); a folder's
            ``model.onnx`` without one is refused.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        if not importable("onnxruntime"):
            raise ModelLoadError("the ONNX backend needs onnxruntime: pip install onnxruntime")
        import onnxruntime as ort

        path = Path(path)
        folder_description: dict[str, Any] | None = None
        if path.is_dir():
            onnx_path = path / ONNX_FILE
            if not onnx_path.is_file():
                raise ModelLoadError(f"{onnx_path}: not found; export one with `boneage export --attach {path}`")
            if not (path / CONFIG_FILE).is_file():
                raise ModelLoadError(
                    f"{onnx_path}: its folder has no {CONFIG_FILE} recording the file's checksum; "
                    f"pass the .onnx file itself (--model {onnx_path})"
                )
            folder_description = read_model_description(path)
            expected = folder_description.get("onnx", {}).get("sha256")
            if not expected:
                raise ModelLoadError(
                    f"{onnx_path}: {CONFIG_FILE} records no checksum for it (onnx.sha256), so it was not made or "
                    f"checked by `boneage export --attach`; export it again with `boneage export --attach {path}`, "
                    "or use --backend torch"
                )
            if sha256_file(onnx_path) != expected:
                raise ModelLoadError(f"{onnx_path}: checksum does not match config.json (corrupt or replaced file)")
            path = onnx_path
        elif not path.is_file():
            raise ModelLoadError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise ModelLoadError(f"{path}: not a loadable ONNX model ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelLoadError(f"{path}: no '{METADATA_KEY}' metadata; export it with `boneage export`")
        self.model_dir = path
        # a model folder's config.json is authoritative (its interval, refusal threshold and correction may have
        # been added after export); a bare .onnx file carries its own copy in the metadata
        self.description: dict[str, Any] = folder_description or json.loads(meta[METADATA_KEY])
        self.contract = contract_from_description(self.description)
        self.task = self.description["model"]["task"]
        self.output_names = [o.name for o in self.session.get_outputs()]
        info = self.description.get("assessability") or {}
        self.threshold = float(info["threshold"]) if "score" in self.output_names and info else None
        self.presentation = presentation_checks(self.description) if self.threshold is not None else None
        source = path.with_name(CONFIG_FILE) if folder_description else path  # where the description was read
        self.tta_hflip = tta_default(self.description, source)  # average with the mirrored image; callers may override
        self.tta_views = tta_views(self.description, source)

    def preprocess(self, path: str | Path) -> np.ndarray:
        return preprocess_array(path, self.contract)

    def _run(self, images: np.ndarray, male: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(None, {"image": np.ascontiguousarray(images), "male": male.astype(np.int64)})
        named = dict(zip(self.output_names, outputs))
        return named["output"].astype(np.float32), named.get("score")

    def predict_batch(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray | None]:
        plain, score = None, None  # the images as they are: needed for the refusal score or as a view
        if self.threshold is not None or PLAIN_VIEW in self.tta_views:
            plain, score = self._run(images, male)
        checks: dict[str, np.ndarray | None] = {"score": score}
        if self.presentation and score is not None:
            checks.update(
                check_presentation(
                    images,
                    score,
                    self.presentation,
                    self.contract,
                    lambda mask, transform: self._run(np.ascontiguousarray(transform(images[mask])), male[mask])[1],
                )
            )
        standardize = bool(self.contract.standardize)
        outputs = self._view_outputs(
            images,
            plain,
            lambda inputs: self._run(inputs, male)[0],
            lambda batch, angle, zoom: view_batch(batch, angle, zoom, standardize),
            lambda inputs: inputs[..., ::-1],
        )
        output = np.mean(outputs, axis=0).astype(np.float32)
        if self.task == "regression":
            output = correct_months(output, male, self.description).astype(np.float32)
            return {"months": output, "stage": stage_index(output), **checks}
        return {"months": np.full(len(images), np.nan, np.float32), "stage": output.argmax(axis=1), **checks}
