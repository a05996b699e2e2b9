"""ONNX export with a parity check, optional int8 (static QDQ) quantisation, and an onnxruntime predictor.

The exported graph takes ``image`` (B, C, S, S) float32 and ``male`` (B,) int64 and returns the model's output
(bone age in months, or stage logits); the batch axis is dynamic. The model folder's ``config.json`` (data contract,
architecture, version, checksum) is stored in the ONNX metadata under ``boneage.config``, so the file alone is
enough to preprocess and predict.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.backends.torch import TorchPredictor
from boneage.config import contract_from_description
from boneage.dataset import preprocess
from boneage.errors import ExportError
from boneage.inputs import collect_images
from boneage.model_folder import METADATA_KEY, ONNX_FILE, sha256_file, update_description

logger = logging.getLogger(__name__)

FP32_TOLERANCE_MONTHS = 0.05


def _require(module: str, extra: str = "onnx") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed here: pip install 'boneage[{extra}]'") from err


def _inputs_from_images(paths: Sequence[Path], description: dict[str, Any], male: int = 0) -> dict[str, np.ndarray]:
    contract = contract_from_description(description)
    images = torch.stack([preprocess(p, contract) for p in paths]).numpy()
    return {"image": images, "male": np.full(len(paths), male, dtype=np.int64)}


def _random_inputs(description: dict[str, Any], batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    contract = description["data_contract"]
    rng = np.random.default_rng(seed)
    shape = (batch, contract["in_chans"], contract["image_size"], contract["image_size"])
    return {"image": rng.standard_normal(shape).astype(np.float32), "male": np.arange(batch, dtype=np.int64) % 2}


class _Exported(torch.nn.Module):
    """What the ONNX graph computes: the model's output and, when the folder has an assessability check, each
    image's score (so onnxruntime refuses unreadable images without PyTorch)."""

    def __init__(self, model: torch.nn.Module, assessability: Any = None):
        super().__init__()
        self.model = model
        self.assessability = assessability

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> Any:
        features, output = self.model.features_and_output(image, male)
        if self.assessability is None:
            return output
        return output, self.assessability.score(features[:, : self.model.backbone.num_features])


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader over preprocessed images, a few at a time."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def export_onnx(
    output: str | Path,
    model_dir: str | Path | None = None,
    int8: bool = False,
    calibration: Sequence[str | Path] = (),
    parity_images: Sequence[str | Path] = (),
    opset: int = 18,
) -> dict[str, Any]:
    """Export a model folder to ONNX and check it against PyTorch.

    Args:
        output: the ``.onnx`` file to write.
        model_dir: model folder; the shipped default model when None.
        int8: quantise weights and activations to int8 (static QDQ), calibrated on ``calibration`` images.
        calibration: image files or folders for int8 calibration (required with ``int8``; use training images).
        parity_images: real images for the parity check, in addition to random inputs.

    Returns:
        A report: maximum |ONNX - PyTorch| on random and on real inputs (months or logits).

    Raises:
        ExportError: an fp32 export differs from PyTorch by more than 0.05 month.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    predictor = TorchPredictor.load(model_dir)
    model, description = predictor.model.eval(), predictor.description
    exported = _Exported(model, predictor.assessability).eval()
    output_names = ["output", "score"] if predictor.assessability is not None else ["output"]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fp32_path = output if not int8 else output.with_name(output.stem + ".fp32.onnx")

    example = _random_inputs(description, batch=2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(
            exported,
            (torch.from_numpy(example["image"]), torch.from_numpy(example["male"])),
            input_names=["image", "male"],
            output_names=output_names,
            dynamic_shapes={"image": {0: batch}, "male": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(fp32_path))

    final_path = fp32_path
    if int8:
        calibration_files = collect_images(calibration)
        if not calibration_files:
            raise ExportError("--int8 needs --calibration images (a folder of training radiographs, ~100-500 files)")
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = output.with_name(output.stem + ".prep.onnx")
        quant_pre_process(str(fp32_path), str(prepared))
        batches = [
            _inputs_from_images(calibration_files[i : i + 16], description, male=(i // 16) % 2)
            for i in range(0, len(calibration_files), 16)
        ]
        quantize_static(
            str(prepared),
            str(output),
            _CalibrationReader(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        prepared.unlink(missing_ok=True)
        final_path = output

    proto = onnx.load(str(final_path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**description, "onnx": {"int8": int8, "opset": opset}})
    proto.producer_name = "boneage"
    onnx.save(proto, str(final_path))

    session = ort.InferenceSession(str(final_path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"output": str(final_path), "int8": int8}
    checks = {"random": _random_inputs(description, batch=4, seed=1)}
    real = collect_images(parity_images)[:16]
    if real:
        checks["real"] = _inputs_from_images(real, description, male=1)
    for name, inputs in checks.items():
        with torch.no_grad():
            expected = model(torch.from_numpy(inputs["image"]), torch.from_numpy(inputs["male"])).numpy()
        actual = session.run(None, inputs)
        report[f"max_abs_diff_{name}"] = float(np.abs(actual[0] - expected).max())
        if len(actual) > 1:
            features = model.forward_features(torch.from_numpy(inputs["image"]), torch.from_numpy(inputs["male"]))
            with torch.no_grad():
                score = predictor.assessability.score(features[:, : model.backbone.num_features]).numpy()
            report[f"score_max_rel_diff_{name}"] = float(
                np.abs(actual[1] - score).max() / max(1.0, np.abs(score).max())
            )
    if not int8:
        worst = max(v for k, v in report.items() if k.startswith("max_abs_diff"))
        if worst > FP32_TOLERANCE_MONTHS:
            raise ExportError(f"{final_path}: ONNX differs from PyTorch by {worst:.4f} > {FP32_TOLERANCE_MONTHS}")
    else:
        fp32_path.unlink(missing_ok=True)
    return report


def attach_onnx(model_dir: str | Path) -> dict[str, Any]:
    """Export a model folder's fp32 ONNX to ``<folder>/model.onnx`` and record its checksum in ``config.json``, so
    the folder also predicts on onnxruntime (and without PyTorch). Returns the export report.

    The graph is written beside the folder's files under another name and takes the name ``model.onnx`` only after
    its parity check passed, so a failed or interrupted export never leaves an unchecked ``model.onnx``.
    """
    folder = Path(model_dir)
    partial = folder / (Path(ONNX_FILE).stem + ".partial.onnx")
    try:
        report = export_onnx(partial, folder)
        partial.replace(folder / ONNX_FILE)
    finally:
        partial.unlink(missing_ok=True)
    report["output"] = str(folder / ONNX_FILE)
    onnx_info = {
        "file": ONNX_FILE,
        "sha256": sha256_file(folder / ONNX_FILE),
        "max_abs_diff_months": max(v for k, v in report.items() if k.startswith("max_abs_diff")),
    }
    update_description(folder, lambda description: description.update(onnx=onnx_info))
    return report
