from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from boneage.config import DataConfig, ModelConfig
from boneage.dataset import BoneAgeDataset
from boneage.explain import extract_features, grad_cam, gradcam_grid, overlay, plot_tsne
from boneage.labels import read_labels
from boneage.model import BoneAgeNet, load_pretrained


@pytest.fixture(scope="module")
def model() -> BoneAgeNet:
    torch.manual_seed(0)
    net = BoneAgeNet(ModelConfig())
    load_pretrained(net, "auto")  # ImageNet filters respond to a bright structure; random ones barely do
    return net.eval()


def _one_bright_blob(size: int = 96) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[:, :, 60:80, 15:35] = 1.0
    return (image - 0.45) / 0.226


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_gradcam_has_the_image_shape_and_is_not_constant(model, task):
    net = model
    if task == "classification":
        net = BoneAgeNet(ModelConfig(task="classification"))
        net.backbone.load_state_dict(model.backbone.state_dict())
    heatmap = grad_cam(net, _one_bright_blob(), torch.tensor([1]))
    assert heatmap.shape == (1, 96, 96)
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0
    assert heatmap.std() > 0.05  # not constant
    rgb = overlay(np.zeros((96, 96), dtype=np.float32), heatmap[0])
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8


def test_gradcam_grid_and_tsne_figures(model, rsna_folder, tmp_path):
    labels, images = rsna_folder
    table = read_labels(labels, images)
    contract = DataConfig(image_size=64)
    grid = gradcam_grid(model, contract, table["path"][:3].tolist(), table["male"][:3].tolist(), tmp_path / "g.png")
    with Image.open(grid) as picture:
        assert picture.size[1] > 600 and np.asarray(picture.convert("L")).std() > 10

    loader = DataLoader(BoneAgeDataset(table, contract), batch_size=16)
    features, ages, male = extract_features(model, loader)
    assert features.shape == (48, 1312) and ages.shape == (48,) and male.sum() == 24
    path = plot_tsne(features, ages, male, tmp_path / "tsne.png")
    with Image.open(path) as picture:
        assert np.asarray(picture.convert("L")).std() > 10
