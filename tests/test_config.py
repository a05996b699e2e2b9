from __future__ import annotations

from pathlib import Path

import pytest

from boneage.cli import build_config, build_parser
from boneage.config import Config
from boneage.errors import ConfigError


def test_defaults_are_the_seeds_recipe():
    config = Config()
    assert (config.data.image_size, config.data.resize_mode, config.data.mean) == (384, "squash", (0.485, 0.456, 0.406))
    assert (config.model.sex_embedding_dim, config.model.hidden_dims, config.model.dropouts) == (
        32,
        (256, 128),
        (0.3, 0.2),
    )
    train = config.train
    assert (train.batch_size, train.lr, train.warmup_epochs, train.patience, train.min_delta, train.grad_clip) == (
        16,
        1e-5,
        5.0,
        10,
        0.001,
        1.0,
    )
    assert train.resolved_epochs("regression") == 50 and train.resolved_epochs("classification") == 40
    assert train.checkpoint_every == 5


def test_yaml_roundtrip(tmp_path):
    config = Config()
    config.data.image_size, config.augment.zoom, config.train.epochs = 128, (0.8, 1.2), 3
    config.save(tmp_path / "c.yaml")
    loaded = Config.load(tmp_path / "c.yaml")
    assert loaded == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  image_size: big\n", "data.image_size: expected int, got 'big'"),
        ("model:\n  task: segmentation\n", "model.task: expected one of"),
        ("train:\n  optimiser: sgd\n", "train.optimiser: unknown field"),
        ("trainer:\n  lr: 1\n", "unknown section(s) ['trainer']"),
        ("augment:\n  zoom: [1.2, 0.9]\n", "augment.zoom: expected 0 < low <= high"),
        ("data:\n  source_size: 4\n", "data.source_size: expected >= 8 pixels or none, got 4"),
        ("data:\n  source_antialias: false\n", "data.source_antialias: false chooses the filter of the resize to"),
        ("augment:\n  frame_p: 1.5\n", "augment.frame_p: expected a probability in [0, 1], got 1.5"),
        ("augment:\n  gamma: [0.05, 2]\n", "augment.gamma: expected 0.1 <= low <= high <= 10.0"),
        ("augment:\n  frame_fill_width: [0.1, 1]\n", "augment.frame_fill_width: expected 0.2 <= low"),
        ("augment:\n  floor_p: 0.3\n", "batch augmentations: set augment.on_device: true"),
        ("train:\n  stage_weight_power: -1\n", "train.stage_weight_power: expected >= 0, got -1"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Config.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_cli_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 128\ntrain:\n  lr: 0.001\n  epochs: 7\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(path),
            "--lr",
            "3e-4",
            "--zoom",
            "0.95,1.05",
            "--drop-invalid",
            "--channels-last",
            "false",
            "--pretrained-weights",
            "w.pth",
        ]
    )
    config = build_config(args)
    assert config.data.image_size == 128 and config.train.epochs == 7
    assert config.train.lr == 3e-4 and config.augment.zoom == (0.95, 1.05)
    assert config.data.drop_invalid is True and config.train.channels_last is False
    assert config.model.pretrained == "w.pth"
    with pytest.raises(ConfigError, match="--batch-size: expected int"):
        build_config(build_parser().parse_args(["train", "--batch-size", "many"]))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_checked_in_recipes_load(path):
    config = Config.load(path)
    config.validate()
    assert config.model.task in ("regression", "classification") and config.train.epochs
