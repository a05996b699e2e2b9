from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from boneage.config import DataConfig, ModelConfig
from boneage.errors import ModelFolderError, PretrainedWeightsError
from boneage.model import BoneAgeNet, imagenet_state_dict, load_model_folder, load_pretrained, save_model_folder


def _inputs(batch: int = 2, size: int = 64, chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(batch, chans, size, size), torch.tensor([0, 1] * (batch // 2))


@pytest.mark.parametrize(("task", "shape"), [("regression", (2,)), ("classification", (2, 4))])
def test_output_shapes_for_both_heads(task, shape):
    model = BoneAgeNet(ModelConfig(task=task, pretrained="none")).eval()
    image, male = _inputs()
    with torch.no_grad():
        assert model(image, male).shape == shape
        features = model.forward_features(image, male)
    assert features.shape == (2, 1280 + 32) and model.num_features == 1312
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [
        256,
        128,
        shape[-1] if task == "classification" else 1,
    ]
    assert [m.p for m in model.head if isinstance(m, torch.nn.Dropout)] == [0.3, 0.2]


def test_sex_changes_the_prediction():
    model = BoneAgeNet(ModelConfig(pretrained="none")).eval()
    image = torch.randn(1, 3, 64, 64).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model(image, torch.tensor([0, 1]))
    assert out[0] != out[1]


def test_regression_output_is_scaled_to_months():
    cfg = ModelConfig(pretrained="none", target_offset=127.0, target_scale=41.0)
    model = BoneAgeNet(cfg).eval()
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.constant_(model.head[-1].bias, 1.0)
    with torch.no_grad():
        assert model(*_inputs()).tolist() == [168.0, 168.0]


def test_lite0_pretrained_weights_are_real_imagenet_weights():
    """A photo shipped by scikit-learn lands in a plausible ImageNet class with the offline Lite0 weights."""
    import timm
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    net = timm.create_model("tf_efficientnet_lite0")
    net.load_state_dict(imagenet_state_dict("tf_efficientnet_lite0"), strict=True)
    net.eval()
    info = ImageNetInfo()

    def top5(name: str) -> list[str]:
        photo = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1).float()[None] / 255
        photo = torch.nn.functional.interpolate(photo, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            logits = net((photo - 0.5) / 0.5)  # the TF-Lite models' own input scaling
        return [info.index_to_description(int(i)) for i in logits.topk(5).indices[0]]

    assert "daisy" in top5("flower.jpg")
    assert {"bell cote, bell cot", "palace", "monastery", "dome", "church, church building"} & set(
        top5("china.jpg")[:2]
    )
    random_net = timm.create_model("tf_efficientnet_lite0").eval()  # the same check fails without the weights
    with torch.no_grad():
        photo = torch.rand(1, 3, 224, 224)
        assert not torch.allclose(random_net(photo), net(photo))


def test_load_pretrained_into_backbone_one_channel_sums_rgb_filters():
    rgb = BoneAgeNet(ModelConfig())
    load_pretrained(rgb, "auto")
    gray = BoneAgeNet(ModelConfig(), in_chans=1)
    load_pretrained(gray, "auto")
    stem_rgb = rgb.backbone.conv_stem.weight
    assert gray.backbone.conv_stem.weight.shape[1] == 1
    torch.testing.assert_close(gray.backbone.conv_stem.weight[:, 0], stem_rgb.sum(dim=1))
    image = torch.rand(1, 1, 64, 64)
    gray.eval(), rgb.eval()
    with torch.no_grad():  # a grey image in 3 channels == the same image in 1 channel with summed filters
        one = gray.backbone.forward_features(image)
        three = rgb.backbone.forward_features(image.repeat(1, 3, 1, 1))
    torch.testing.assert_close(one, three, atol=1e-3, rtol=1e-3)


def test_b0_offline_without_weights_file_says_how(tmp_path):
    model = BoneAgeNet(ModelConfig(backbone="efficientnet_b0"))
    with pytest.raises(PretrainedWeightsError, match="--pretrained-weights FILE"):
        load_pretrained(model, "auto")
    # a weights file in timm's naming loads (strict, shape-checked); the classifier is dropped
    import timm

    source = timm.create_model("efficientnet_b0")
    torch.save(source.state_dict(), tmp_path / "b0.pth")
    load_pretrained(model, str(tmp_path / "b0.pth"))
    torch.testing.assert_close(model.backbone.conv_stem.weight, source.conv_stem.weight)
    torch.save({k: v for k, v in source.state_dict().items() if "blocks.6" not in k}, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        load_pretrained(model, str(tmp_path / "partial.pth"))


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    from boneage.model import _lite_package_file

    state = torch.load(_lite_package_file("tf_efficientnet_lite0"), weights_only=True)
    state["_blocks.3._expand_conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(PretrainedWeightsError, match=r"_blocks\.3\._expand_conv\.weight.*shape"):
        load_pretrained(BoneAgeNet(ModelConfig()), str(tmp_path / "broken.pth"))


def test_model_folder_roundtrip_gives_identical_predictions(tmp_path):
    cfg = ModelConfig(pretrained="none", target_offset=100.0, target_scale=40.0)
    model = BoneAgeNet(cfg).eval()
    contract = DataConfig(image_size=64)
    save_model_folder(tmp_path / "m", model, contract, metrics={"val_mae": 9.5})
    loaded, description = load_model_folder(tmp_path / "m")
    image, male = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, male), model(image, male), rtol=0, atol=0)
    assert description["data_contract"]["image_size"] == 64
    assert description["metrics"] == {"val_mae": 9.5}
    assert description["model"]["target_offset"] == 100.0
    assert len(description["weights_sha256"]) == 64


def test_data_contract_roundtrip_and_folders_written_before_its_newer_fields():
    from boneage.config import contract_from_description

    contract = DataConfig(
        image_size=96, resize_mode="letterbox", source_size=100, source_antialias=False, standardize=True
    )
    back = contract_from_description({"data_contract": contract.contract()})
    assert (back.image_size, back.resize_mode, back.source_size, back.standardize) == (96, "letterbox", 100, True)
    assert back.source_antialias is False
    older = {
        k: v for k, v in contract.contract().items() if k not in ("source_size", "source_antialias", "standardize")
    }
    back = contract_from_description({"data_contract": older})
    assert back.source_size is None and back.standardize is False
    assert back.source_antialias is True  # written before the field: the antialiased filter, as it always read


def test_model_folder_checksum_and_missing_files(tmp_path):
    model = BoneAgeNet(ModelConfig(pretrained="none"))
    folder = save_model_folder(tmp_path / "m", model, DataConfig())
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="checksum"):
        load_model_folder(folder)
    with pytest.raises(ModelFolderError, match="no config.json"):
        load_model_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ModelFolderError, match="expected 'boneage-model'"):
        load_model_folder(folder)


def test_half_precision_folder_loads_as_float32(tmp_path):
    model = BoneAgeNet(ModelConfig(pretrained="none")).eval()
    folder = save_model_folder(tmp_path / "m", model, DataConfig(), dtype=torch.float16)
    loaded, description = load_model_folder(folder)
    assert description["weights_dtype"] == "float16"
    assert loaded.head[0].weight.dtype == torch.float32
    image, male = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, male), model(image, male), atol=0.05 * 12, rtol=0.01)
