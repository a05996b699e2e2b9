from __future__ import annotations

import numpy as np
import pytest
import torch

from boneage.assessability import Assessability
from boneage.backends.torch import TorchPredictor
from boneage.config import DataConfig, ModelConfig
from boneage.errors import ModelFolderError
from boneage.fit_checks import fit_assessability, write_non_hand_images
from boneage.labels import read_labels
from boneage.model import BoneAgeNet, load_pretrained, save_model_folder
from boneage.model_folder import ASSESSABILITY_FILE
from boneage.predict import predict_paths
from tests.helpers import write_rsna_folder


def test_score_is_about_one_in_distribution_and_large_far_away():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 64))
    train = rng.normal(size=(500, 8)) @ basis + 0.05 * rng.normal(size=(500, 64))
    check = Assessability.fit(train, n_components=8)
    inside = check.score(torch.from_numpy(rng.normal(size=(200, 8)) @ basis + 0.05 * rng.normal(size=(200, 64))))
    assert 0.7 < float(inside.mean()) < 1.3
    off_subspace = check.score(torch.from_numpy(rng.normal(size=(50, 64))))  # unlike anything seen
    far_along = check.score(torch.from_numpy(10 * rng.normal(size=(50, 8)) @ basis))
    assert float(off_subspace.min()) > 10 and float(far_along.median()) > 10


def test_non_hand_images_are_written():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_non_hand_images(tmp, size=64)
        assert len(paths) == 10 and all(p.stat().st_size > 0 for p in paths)
        assert {"blank_black", "chest_film_0", "photo_china"} <= {p.stem for p in paths}


@pytest.mark.slow  # fits every refusal check and exports ONNX again (minutes on 2 cores)
def test_fit_store_and_refuse_non_hand_images(tmp_path):
    labels, images = write_rsna_folder(tmp_path / "data", n=40, size=64)
    table = read_labels(labels, images)
    torch.manual_seed(0)
    model = BoneAgeNet(ModelConfig(target_offset=110, target_scale=60))
    load_pretrained(model, "auto")
    folder = save_model_folder(tmp_path / "model", model.eval(), DataConfig(image_size=64))
    non_hand = write_non_hand_images(tmp_path / "nonhand", size=96)
    summary = fit_assessability(folder, table[:24], table[24:], non_hand, n_components=8)
    assert summary["n_heldout_val"] == 8 and 0 <= summary["acceptance_heldout_val"] <= 1
    assert summary["rejection_non_hand"] >= 0.5  # noise, blanks and photos are far from synthetic hands
    predictor = TorchPredictor.load(folder)
    assert predictor.assessability is not None and predictor.assessability.threshold > 0
    rows = predict_paths(
        [non_hand[0], table["path"][30]], tmp_path / "p.csv", model_dir=folder, sex="F", progress=False
    )
    blank = rows.set_index("id").loc["blank_black"]
    assert blank["status"] == "not assessable" and "does not look like" in blank["message"]
    assert blank["message"].endswith("it reads one hand per film, palm down, fingers up, bone bright")  # what to send
    assert np.isnan(blank["bone_age_months"])

    pytest.importorskip("onnxruntime")
    from boneage.export import attach_onnx

    report = attach_onnx(folder)  # the score becomes a second ONNX output: refusal without PyTorch
    assert report["score_max_rel_diff_random"] < 1e-3
    on_onnx = predict_paths(
        [non_hand[0], table["path"][30]], tmp_path / "o.csv", model_dir=folder, sex="F", progress=False, backend="onnx"
    )
    assert on_onnx["status"].tolist() == rows["status"].tolist()
    assert np.allclose(on_onnx["bone_age_months"], rows["bone_age_months"], atol=0.05, equal_nan=True)

    (folder / ASSESSABILITY_FILE).write_bytes(b"tampered")
    with pytest.raises(ModelFolderError, match="checksum"):
        TorchPredictor.load(folder)
