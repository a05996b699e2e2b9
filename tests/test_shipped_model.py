"""The model shipped inside the package: loads offline, checks its checksum, and has not drifted."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from boneage.backends.torch import TorchPredictor
from boneage.dataset import normalize, resize
from boneage.errors import ModelFolderError
from boneage.model import BoneAgeEnsemble, load_model_folder
from boneage.model_folder import DEFAULT_MODEL, default_model_dir, sha256_file
from tests.helpers import synthetic_radiograph

# Bone age (months) of synthetic_radiograph(120, size=100, seed=0) for a female and a male, recorded when the model
# was shipped, as the model folder says to predict it: the mean of its three networks' outputs for the image turned
# +8 and -8 degrees, each with its mirror. A change here means the weights, the averaging, the test-time views or
# the preprocessing (per-image standardisation included) or the output correction changed: re-record only on
# purpose. (The image and its mirror alone, with the previous correction: 25.2051, 33.4688; before any correction:
# 29.2008, 37.1446.)
RECORDED_MONTHS = (26.5582, 35.0012)
# The same for synthetic_radiograph(120, size=400, seed=0) read from a PNG: a full-size film, which goes through the
# 100-px source size by the contract's filter (plain bilinear).
RECORDED_FILM_MONTHS = (23.9223, 32.0740)


def test_default_model_loads_offline_with_its_contract(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = default_model_dir()
    assert folder.name == DEFAULT_MODEL
    predictor = TorchPredictor.load()
    description = predictor.description
    assert description["data_contract"]["image_size"] == 256 and description["data_contract"]["resize_mode"] == "squash"
    contract = description["data_contract"]
    assert contract["source_size"] == 100 and contract["standardize"] is True
    assert contract["source_antialias"] is False  # a full-size film goes to 100 px by plain bilinear
    assert predictor.contract.source_antialias is False
    assert predictor.tta_hflip is True  # each view and its mirror by default; `--no-tta` runs one pass
    assert predictor.tta_views == [(8.0, 1.0), (-8.0, 1.0)]  # the image turned +8 and -8 degrees
    assert isinstance(predictor.model, BoneAgeEnsemble) and description["model"]["members"] == 3
    assert [m["seed"] for m in description["training"]["members"]] == [42, 43, 44]
    correction = description["output"]["correction"]  # half-way against the pull towards the mean, fit on val
    assert correction["strength"] == 0.5 and correction["male"] == correction["female"]
    assert 1.0 < correction["male"][0] < 1.1 and correction["evaluation"]["source"] == "the other half"
    assert description["output"]["unit"] == "months"
    assert description["weights_sha256"] == sha256_file(folder / "model.safetensors")
    assert description["metrics"]["selected_on"] == "val" and description["metrics"]["val"]["n"] == 1892


def test_default_model_prediction_has_not_drifted(tmp_path):
    predictor = TorchPredictor.load()
    image = torch.from_numpy(synthetic_radiograph(120, size=100, seed=0)).float()[None] / 255  # (1, 100, 100)
    size = predictor.contract.image_size
    batch = normalize(resize(image, size, "squash"), predictor.contract)[None].repeat(2, 1, 1, 1)
    months, _ = predictor.predict_tensor(batch, torch.tensor([0, 1]))
    assert months.tolist() == pytest.approx(RECORDED_MONTHS, abs=0.01)
    film = tmp_path / "film.png"
    Image.fromarray(synthetic_radiograph(120, size=400, seed=0)).save(film)
    images = torch.from_numpy(np.asarray(predictor.preprocess(film)))[None].repeat(2, 1, 1, 1)
    months, _ = predictor.predict_tensor(images, torch.tensor([0, 1]))
    assert months.tolist() == pytest.approx(RECORDED_FILM_MONTHS, abs=0.01)


def test_a_corrupted_copy_of_the_default_model_is_refused(tmp_path):
    copy = shutil.copytree(default_model_dir(), tmp_path / "copy")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="checksum"):
        load_model_folder(copy)


def test_default_model_onnx_matches_the_recording_and_its_checksum(tmp_path):
    pytest.importorskip("onnxruntime")
    from boneage.backends.onnx import OnnxPredictor

    folder = default_model_dir()
    assert TorchPredictor.load().description["weights_sha256"] == OnnxPredictor(folder).description["weights_sha256"]
    image = torch.from_numpy(synthetic_radiograph(120, size=100, seed=0)).float()[None] / 255
    contract = TorchPredictor.load().contract
    batch = normalize(resize(image, contract.image_size, "squash"), contract)[None].repeat(2, 1, 1, 1).numpy()
    onnx = OnnxPredictor(folder)
    assert onnx.tta_hflip is True and onnx.tta_views == [(8.0, 1.0), (-8.0, 1.0)]  # the same default on onnxruntime
    result = onnx.predict_batch(batch, np.array([0, 1]))
    assert result["months"].tolist() == pytest.approx(RECORDED_MONTHS, abs=0.05)
    film = tmp_path / "film.png"  # a full-size film: NumPy preprocessing, the contract's source filter
    Image.fromarray(synthetic_radiograph(120, size=400, seed=0)).save(film)
    films = np.repeat(onnx.preprocess(film)[None], 2, axis=0)
    assert onnx.predict_batch(films, np.array([0, 1]))["months"].tolist() == pytest.approx(
        RECORDED_FILM_MONTHS, abs=0.05
    )
    assert result["score"] is not None  # the refusal check runs on onnxruntime too
