"""boneage: skeletal (bone) age from a child's hand radiograph.

The public API is importable from the package itself; each name loads its module on first use, so ``import boneage``
stays light and only what needs PyTorch imports it::

    from boneage import load_predictor

    predictor = load_predictor()  # the shipped model, on onnxruntime when it carries model.onnx
    rows = predictor.predict_files([path], sexes=[False], ages=[132.0])

Where each concern lives (layers import only downward): ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (names that are also module names, such as ``evaluate``, are left to
# their modules: ``from boneage.evaluate import evaluate``)
_API = {
    "load_predictor": "boneage.predict",
    "predict_paths": "boneage.predict",
    "Predictor": "boneage.backends.base",
    "default_model_dir": "boneage.model_folder",
    "read_model_description": "boneage.model_folder",
    "collect_images": "boneage.inputs",
    "read_image": "boneage.imageio",
    "read_labels": "boneage.labels",
    "read_split": "boneage.labels",
    "make_split": "boneage.labels",
    "compare_ages": "boneage.clinical",
    "calibrate_interval": "boneage.uncertainty",
    "Config": "boneage.config",
    "run_training": "boneage.train",
    "export_onnx": "boneage.export",
    "attach_onnx": "boneage.export",
    "BoneAgeError": "boneage.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'boneage' has no attribute {name!r}")
