"""Model folders that hold several networks whose outputs are averaged (BoneAgeEnsemble)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boneage.backends.torch import TorchPredictor
from boneage.config import DataConfig, ModelConfig
from boneage.errors import ModelFolderError
from boneage.explain import grad_cam
from boneage.model import BoneAgeEnsemble, BoneAgeNet, combine_model_folders, load_model_folder, save_model_folder
from boneage.predict import predict_paths
from tests.helpers import write_images

CONTRACT = DataConfig(image_size=64)


def _net(seed: int, **overrides) -> BoneAgeNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(pretrained="none", target_offset=120.0, target_scale=40.0, **overrides)
    return BoneAgeNet(cfg).eval()


def _inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 64, 64), torch.tensor([0, 1] * (batch // 2))


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("members")
    folders = []
    for seed in (0, 1, 2):
        net = _net(seed)
        with torch.no_grad():  # distinct outputs: random heads alone sit near the offset
            net.head[-1].bias.fill_(0.25 * seed)
        training = {"config": {"train": {"seed": seed}}}
        metrics = {"selected_on": "val", "best_val_mae": 10.0 + seed}
        folders.append(save_model_folder(root / f"run{seed}" / "model", net, CONTRACT, training, metrics))
    return folders, write_images(root / "images", np.linspace(20, 200, 6))


def test_ensemble_output_is_the_members_mean_and_survives_a_folder_roundtrip(members, tmp_path):
    folders, _ = members
    ensemble, description = combine_model_folders(folders, tmp_path / "ens")
    assert description["model"]["members"] == 3
    assert [m["seed"] for m in description["training"]["members"]] == [0, 1, 2]
    assert [m["source"] for m in description["training"]["members"]] == ["run0", "run1", "run2"]
    assert description["metrics"] == {"selected_on": "val"}  # the members' own scores stay under training.members
    assert description["training"]["members"][2]["metrics"]["best_val_mae"] == 12.0
    image, male = _inputs()
    singles = [load_model_folder(folder)[0] for folder in folders]
    loaded, _ = load_model_folder(tmp_path / "ens")
    assert isinstance(loaded, BoneAgeEnsemble) and len(loaded.members) == 3
    with torch.no_grad():
        expected = torch.stack([net(image, male) for net in singles]).mean(dim=0)
        torch.testing.assert_close(loaded(image, male), expected, rtol=0, atol=1e-4)
        assert not torch.allclose(singles[0](image, male), expected, atol=0.1)  # the members do differ
        features, output = loaded.features_and_output(image, male)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(features, singles[0].forward_features(image, male), rtol=0, atol=0)


@pytest.mark.slow  # an ONNX export of a three-network folder
def test_predictor_and_onnx_on_an_ensemble_folder(members, tmp_path):
    pytest.importorskip("onnxruntime")
    from boneage.export import attach_onnx

    folders, images = members
    combine_model_folders(folders[:2], tmp_path / "ens")
    rows = predict_paths([images], tmp_path / "e.csv", model_dir=tmp_path / "ens", sex="F", progress=False, tta=False)
    single = [
        predict_paths([images], tmp_path / f"{i}.csv", model_dir=f, sex="F", progress=False, tta=False)
        for i, f in enumerate(folders[:2])
    ]
    mean = (single[0]["bone_age_months"] + single[1]["bone_age_months"]) / 2
    np.testing.assert_allclose(rows["bone_age_months"], mean, atol=0.06)  # the CSV rounds to 0.1 month
    report = attach_onnx(tmp_path / "ens")
    assert report["max_abs_diff_random"] <= 0.05
    onnx_rows = predict_paths(
        [images], tmp_path / "o.csv", model_dir=tmp_path / "ens", sex="F", progress=False, backend="onnx", tta=False
    )
    np.testing.assert_allclose(onnx_rows["bone_age_months"], rows["bone_age_months"], atol=0.11)
    assert isinstance(TorchPredictor.load(tmp_path / "ens").model, BoneAgeEnsemble)


def test_gradcam_of_an_ensemble_averages_its_members(members):
    folders, _ = members
    ensemble = BoneAgeEnsemble([load_model_folder(f)[0] for f in folders[:2]])
    image, male = _inputs(2)
    heatmaps = grad_cam(ensemble, image, male)
    assert heatmaps.shape == (2, 64, 64) and 0.0 <= heatmaps.min() and heatmaps.max() <= 1.0
    assert heatmaps.std() > 0


def test_combine_command_writes_a_loadable_folder_and_refuses_to_overwrite(members, tmp_path, capsys):
    from boneage.cli import main

    folders, _ = members
    out = tmp_path / "ens"
    assert main(["combine", *map(str, folders[:2]), "--output", str(out), "--dtype", "float16"]) == 0
    assert "mean of 2 networks" in capsys.readouterr().out
    model, description = load_model_folder(out)
    assert isinstance(model, BoneAgeEnsemble) and description["weights_dtype"] == "float16"
    assert main(["combine", *map(str, folders[:2]), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["combine", str(folders[0]), "--output", str(tmp_path / "one")]) == 2
    assert "at least 2 members, got 1" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()


def test_members_must_agree_and_a_damaged_ensemble_folder_is_refused(members, tmp_path):
    folders, _ = members
    other = save_model_folder(tmp_path / "wide", _net(0, hidden_dims=(64,), dropouts=(0.1,)), CONTRACT)
    with pytest.raises(ValueError, match="member 1 differs.*hidden_dims"):
        combine_model_folders([folders[0], other], tmp_path / "x")
    larger = save_model_folder(tmp_path / "big", _net(0), DataConfig(image_size=96))
    with pytest.raises(ValueError, match="data contract differs"):
        combine_model_folders([folders[0], larger], tmp_path / "x")
    with pytest.raises(ValueError, match="at least 2 members"):
        BoneAgeEnsemble([_net(0)])
    combine_model_folders(folders[:2], tmp_path / "ens")
    config = tmp_path / "ens" / "config.json"
    description = json.loads(config.read_text())
    description["model"]["members"] = 3  # the weights hold two networks
    config.write_text(json.dumps(description))
    with pytest.raises(ModelFolderError, match="do not fit the model config.json describes"):
        load_model_folder(tmp_path / "ens")
    description["model"]["members"] = 0
    config.write_text(json.dumps(description))
    with pytest.raises(ModelFolderError, match="positive integer"):
        load_model_folder(tmp_path / "ens")


def test_feature_extraction_reads_the_first_member_and_the_ensemble_output(members, rsna_folder):
    from torch.utils.data import DataLoader

    from boneage.dataset import BoneAgeDataset
    from boneage.explain import extract_features
    from boneage.labels import read_labels

    folders, _ = members
    ensemble = BoneAgeEnsemble([load_model_folder(f)[0] for f in folders[:2]]).eval()
    table = read_labels(*rsna_folder)[:8]
    loader = DataLoader(BoneAgeDataset(table, CONTRACT), batch_size=4)
    features, ages, male, outputs = extract_features(ensemble, loader, with_output=True)
    first_only = extract_features(ensemble.members[0], loader)
    assert features.shape == (8, ensemble.num_features) and len(outputs) == len(ages) == len(male) == 8
    np.testing.assert_allclose(features, first_only[0], atol=1e-5)
    with torch.no_grad():
        images = torch.stack([BoneAgeDataset(table, CONTRACT)[i]["image"] for i in range(8)])
        expected = ensemble(images, torch.as_tensor(table["male"].to_numpy()).long())
    np.testing.assert_allclose(outputs, expected.numpy(), atol=1e-3)
    assert len(extract_features(ensemble, loader)) == 3  # without with_output: features, ages, sex
