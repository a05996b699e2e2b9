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


def _folder_trained_with(tmp_path, augment: dict | None):
    """A tiny untrained folder whose config.json records a training augmentation (as a trained folder does)."""
    from boneage.config import Config

    torch.manual_seed(0)
    model = BoneAgeNet(ModelConfig(pretrained="none", target_offset=120.0, target_scale=40.0)).eval()
    training = None
    if augment is not None:
        config = Config().to_dict()
        config["augment"].update(augment)
        training = {"config": config}
    return save_model_folder(tmp_path / "model", model, DataConfig(image_size=64, standardize=True), training=training)


def test_trained_augmentation_is_read_from_the_folder_and_checked(tmp_path):
    from boneage.config import ConfigError
    from boneage.fit_checks import trained_augmentation

    assert trained_augmentation({"training": {}}) is None and trained_augmentation({}) is None
    folder = _folder_trained_with(tmp_path, {"rotation_degrees": 20.0, "zoom": [0.8, 1.5]})
    augment = trained_augmentation(TorchPredictor.load(folder).description)
    assert augment is not None and augment.rotation_degrees == 20.0 and tuple(augment.zoom) == (0.8, 1.5)
    with pytest.raises(ConfigError, match=r"x/config.json training.config: augment.frame_p.*--no-trained-views"):
        trained_augmentation({"training": {"config": {"augment": {"frame_p": 1.5}}}}, "x/config.json")
    with pytest.raises(ConfigError, match=r"augment.floor_mode: expected one of .*'share', 'absolute'.*got 'level'"):
        trained_augmentation({"training": {"config": {"augment": {"floor_mode": "level"}}}})
    # a folder trained now records its floor's meaning; a record from before floor_mode existed used absolute levels
    assert augment.floor_mode == "share"
    old = trained_augmentation(
        {"training": {"config": {"augment": {"floor": [0.1, 0.3], "floor_p": 0.3, "on_device": True}}}}
    )
    assert old is not None and old.floor_mode == "absolute" and tuple(old.floor) == (0.1, 0.3)


def test_check_fit_with_trained_views_accepts_them_better(tmp_path):
    """Fit on the train images as given and as augmented in training, the check scores augmented held-out images
    closer to the training set than a check fit on the images as given alone."""
    from boneage.dataset import BoneAgeDataset
    from boneage.fit_checks import augmented_features, backbone_features, trained_augmentation

    labels, images = write_rsna_folder(tmp_path / "data", n=64, size=64)
    table = read_labels(labels, images)
    augment = {"rotation_degrees": 25.0, "zoom": [0.7, 1.6], "gamma": [0.6, 1.6], "frame_p": 0.5, "on_device": True}
    folder = _folder_trained_with(tmp_path, augment)
    non_hand = write_non_hand_images(tmp_path / "nonhand", size=64)
    plain = fit_assessability(folder, table[:48], table[48:], non_hand, n_components=8, trained_views=False)
    assert "trained_views" not in plain and "augmented once" not in plain["method"]
    predictor = TorchPredictor.load(folder)
    plain_check = predictor.assessability
    summary = fit_assessability(folder, table[:48], table[48:], non_hand, n_components=8)
    assert summary["trained_views"]["rotation_degrees"] == 25.0 and "augmented once" in summary["method"]
    assert summary["n_train"] == 48 and summary["n_fit"] == 96
    views_check = TorchPredictor.load(folder).assessability
    held_out = table[48:].reset_index(drop=True)
    recipe = trained_augmentation(predictor.description)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    augmented = torch.from_numpy(augmented_features(predictor, held_out, recipe, seed=7))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is left as it was
    assert float(views_check.score(augmented).median()) < float(plain_check.score(augmented).median())
    first = augmented_features(predictor, held_out, recipe, seed=7)
    assert np.array_equal(first, augmented.numpy())  # the draws follow the seed
    as_given = backbone_features(predictor, held_out, num_workers=0)
    assert first.shape == as_given.shape == (len(BoneAgeDataset(held_out, predictor.contract)), 1280)
    assert not np.allclose(first, as_given)  # the views are not the images as given
