"""The self-describing model folder: its file names, ``config.json`` read (format checked) and written (atomically, in
one place), checksums, the shipped default, and what the description asks of every backend (mirror pass, per-sex
correction, refusal checks). Torch-free.

A folder holds ``model.safetensors`` (weights), ``config.json`` (architecture, data contract, recipe, metrics,
checksums) and optionally ``assessability.safetensors`` (the refusal check) and ``model.onnx`` (the same model for
onnxruntime)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from boneage.errors import ModelFolderError, ModelLoadError

DEFAULT_MODEL = "lite0-256-robust-x3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
ASSESSABILITY_FILE = "assessability.safetensors"
METADATA_KEY = "boneage.config"  # an exported .onnx file's copy of config.json, in its metadata
FORMAT_NAME = "boneage-model"
FORMAT_VERSION = 1  # config.json's layout; a folder of a newer format is refused, not misread
PLAIN_VIEW = (0.0, 1.0)  # a test-time view (rotation in degrees, zoom): the image as it is


def default_model_dir() -> Path:
    """The model folder shipped inside the package (no network needed)."""
    folder = Path(str(resources.files("boneage") / "models" / DEFAULT_MODEL))
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"the default model is missing from the installation ({folder}); pass --model DIR")
    return folder


def model_name(model_dir: str | Path) -> str:
    """A model's name for reports: its folder's name (also when it runs from the folder's ``model.onnx``), or a bare
    ``.onnx`` file's stem."""
    path = Path(model_dir)
    if path.name == ONNX_FILE and (path.parent / "config.json").is_file():
        return path.parent.name
    return path.stem if path.suffix == ".onnx" else path.name


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_description(folder: str | Path, description: dict[str, Any]) -> None:
    """Write a folder's ``config.json`` atomically (every writer goes through here)."""
    atomic_write_bytes(Path(folder) / CONFIG_FILE, json.dumps(description, indent=2).encode())


def read_model_description(folder: str | Path) -> dict[str, Any]:
    """A model folder's ``config.json``, checked to be a boneage model folder of a format this version reads.

    Raises:
        ModelFolderError: no config.json, not JSON, another format, or a newer format version.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder}: not a model folder (no {CONFIG_FILE})")
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        found = description.get("format") if isinstance(description, dict) else None
        raise ModelFolderError(f"{path}: format is {found!r}, expected {FORMAT_NAME!r}")
    version = description.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: format_version {version!r} is not one this version of boneage reads (1 to {FORMAT_VERSION}); "
            "upgrade boneage to use this model"
        )
    return description


def update_description(folder: str | Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read a folder's ``config.json``, apply ``change`` to it in place and write it back atomically. Returns it."""
    description = read_model_description(folder)
    change(description)
    write_description(folder, description)
    return description


def tta_default(description: dict[str, Any], source: str | Path = "config.json") -> bool:
    """Whether the model folder asks for flip test-time augmentation by default (``output.tta_hflip``): a model
    whose metrics, correction and interval were measured on the average of the image and its mirror."""
    value = description.get("output", {}).get("tta_hflip", False)
    if not isinstance(value, bool):
        raise ModelLoadError(f"{source}: output.tta_hflip: expected true or false, got {value!r}")
    return value


def tta_views(description: dict[str, Any], source: str | Path = "config.json") -> list[tuple[float, float]]:
    """The test-time views the model folder averages (``output.tta_views``: ``[[degrees, zoom], ...]``, each view
    the image rotated and zoomed about its centre, :func:`boneage.imageio.view_batch`; each with its mirror too when
    ``output.tta_hflip``); a folder without the field reads the image as it is."""
    value = description.get("output", {}).get("tta_views")
    if value is None:
        return [PLAIN_VIEW]
    expected = "expected a non-empty list of [degrees, zoom] pairs (|degrees| <= 45, zoom 0.5-2)"
    if not isinstance(value, list) or not value:
        raise ModelLoadError(f"{source}: output.tta_views: {expected}, got {value!r}")
    views = []
    for view in value:
        if (
            not isinstance(view, list)
            or len(view) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in view)
            or not (abs(view[0]) <= 45 and 0.5 <= view[1] <= 2)
        ):
            raise ModelLoadError(f"{source}: output.tta_views: {expected}, got {view!r}")
        views.append((float(view[0]), float(view[1])))
    return views


def tta_text(views: list[tuple[float, float]], hflip: bool) -> str:
    """How a prediction is averaged over test-time views, in words ("" for one pass of the image as it is)."""
    views = [(float(view[0]), float(view[1])) for view in views]

    def name(view: tuple[float, float]) -> str:
        turned = f"turned {view[0]:+g}\u00b0" if view[0] else ""
        zoomed = f"zoomed {view[1]:g}x" if view[1] != 1 else ""
        return " and ".join(part for part in (turned, zoomed) if part) or "the image"

    if views == [PLAIN_VIEW]:
        return "averaged with the mirrored image" if hflip else ""
    if len(views) == 1 and not hflip:
        return f"read {name(views[0])}"
    passes = len(views) * (2 if hflip else 1)
    return f"the mean of {passes} views: " + ", ".join(map(name, views)) + (", each with its mirror" if hflip else "")


def presentation_checks(description: dict[str, Any]) -> dict[str, Any] | None:
    """The model folder's inverted-image and orientation checks (``config.json``), or None when it has neither."""
    checks = {key: description[key] for key in ("polarity", "orientation") if description.get(key)}
    return checks or None


def correct_months(months: Any, male: Any, description: dict[str, Any]) -> Any:
    """Apply the model folder's per-sex linear correction ``slope * months + intercept`` (fit on the model's own
    training-set predictions, see ``tools/ship_model.py``), if it has one. ``months`` and ``male`` are NumPy arrays or
    torch tensors of shape (B,)."""
    correction = description.get("output", {}).get("correction")
    if not correction:
        return months
    (slope_f, intercept_f), (slope_m, intercept_m) = correction["female"], correction["male"]
    is_male = male * 1.0  # bool/int -> float, NumPy or torch alike
    return months * (slope_f + (slope_m - slope_f) * is_male) + (intercept_f + (intercept_m - intercept_f) * is_male)


def model_identity(model: str | Path) -> dict[str, Any]:
    """A model's name, the boneage version that made it and its weights' SHA-256 (from its folder's ``config.json``;
    ``None`` for what a bare ``.onnx`` file does not say), for the report's method section."""
    path = Path(model)
    folder = path.parent if path.name == ONNX_FILE else path
    try:
        description = read_model_description(folder)
    except ModelFolderError:  # a bare .onnx file: no config.json beside it
        description = {}
    return {
        "name": model_name(path),
        "boneage_version": description.get("boneage_version"),
        "weights_sha256": description.get("weights_sha256"),
    }
