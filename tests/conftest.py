"""Shared fixtures (the helpers they build on are in :mod:`tests.helpers`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import write_rsna_folder


@pytest.fixture
def rsna_folder(tmp_path: Path) -> tuple[Path, Path]:
    return write_rsna_folder(tmp_path / "rsna")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model folder, made once per session: copy it before changing it."""
    from tests.helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model with ``model.onnx`` attached: the session's one ONNX export of it (about a minute on 2 cores).
    Copy it before changing it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from boneage.export import attach_onnx

    folder = shutil.copytree(tiny_model, tmp_path_factory.mktemp("tiny-onnx") / "model")
    attach_onnx(folder)
    return folder
