"""The model folder's contract: checked format, atomic config.json writes, and no unchecked model.onnx."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from boneage.errors import ModelFolderError, ModelLoadError
from boneage.model_folder import (
    CONFIG_FILE,
    FORMAT_VERSION,
    ONNX_FILE,
    read_model_description,
    update_description,
    write_description,
)


@pytest.fixture
def tiny_folder(tiny_model):
    return tiny_model  # shared by the session: copied before any change


def test_a_newer_or_missing_format_version_is_refused(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    description = read_model_description(folder)
    assert description["format_version"] == FORMAT_VERSION
    for version in (FORMAT_VERSION + 1, None, "1", True):
        write_description(folder, {**description, "format_version": version})
        with pytest.raises(ModelFolderError, match="format_version"):
            read_model_description(folder)


def test_config_writes_are_atomic(tiny_folder, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    before = (folder / CONFIG_FILE).read_bytes()

    def interrupted(change):
        def apply(description):
            change(description)
            raise KeyboardInterrupt  # stopped while the new description was being made

        return apply

    with pytest.raises(KeyboardInterrupt):
        update_description(folder, interrupted(lambda d: d.update(uncertainty={"half_width_months": 1.0})))
    assert (folder / CONFIG_FILE).read_bytes() == before

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        update_description(folder, lambda d: d.update(uncertainty={"half_width_months": 1.0}))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / CONFIG_FILE).read_bytes() == before  # the old file whole, never half a new one
    update_description(folder, lambda d: d.update(uncertainty={"half_width_months": 1.0}))
    assert read_model_description(folder)["uncertainty"] == {"half_width_months": 1.0}


def test_model_onnx_without_a_recorded_checksum_is_refused(tiny_folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from boneage.backends.onnx import OnnxPredictor
    from boneage.predict import load_predictor

    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    (folder / ONNX_FILE).write_bytes(b"left by a failed export")
    for load in (OnnxPredictor, lambda f: load_predictor(f, "auto"), lambda f: load_predictor(f, "onnx")):
        with pytest.raises(ModelLoadError, match="records no checksum"):
            load(folder)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / ONNX_FILE, bare / ONNX_FILE)
    with pytest.raises(ModelLoadError, match=f"no {CONFIG_FILE}"):
        OnnxPredictor(bare)


def test_a_failed_attach_leaves_no_model_onnx(tiny_folder, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from boneage import export
    from boneage.errors import ExportError

    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    before = (folder / CONFIG_FILE).read_bytes()

    def failing_export(output, model_dir=None, **kwargs):
        output.write_bytes(b"a graph that failed its parity check")
        raise ExportError(f"{output}: ONNX differs from PyTorch by 9.9 > 0.05")

    monkeypatch.setattr(export, "export_onnx", failing_export)
    with pytest.raises(ExportError):
        export.attach_onnx(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_folder.iterdir())
    assert (folder / CONFIG_FILE).read_bytes() == before


def test_attach_records_the_checksum_of_what_it_wrote(tiny_onnx_model):
    from boneage.backends.onnx import OnnxPredictor
    from boneage.model_folder import sha256_file

    folder = tiny_onnx_model  # made by attach_onnx (conftest)
    assert not list(folder.glob("*.partial.onnx"))
    recorded = json.loads((folder / CONFIG_FILE).read_text())["onnx"]
    assert recorded["sha256"] == sha256_file(folder / ONNX_FILE)
    assert OnnxPredictor(folder).model_dir == folder / ONNX_FILE
