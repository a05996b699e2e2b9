from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from boneage.config import Config
from boneage.errors import ConfigError, DataValidationError
from boneage.model import BoneAgeNet, load_model_folder
from boneage.train import AtomicCheckpointIO, run_training, warmup_cosine


def tiny_config(labels: Path, images: Path, output: Path, **train: object) -> Config:
    config = Config()
    config.data.labels, config.data.images = str(labels), str(images)
    config.data.image_size, config.data.num_workers = 64, 0
    config.model.pretrained = "none"
    config.model.target_offset, config.model.target_scale = 114.0, 60.0
    config.train.output = str(output)
    config.train.batch_size, config.train.lr, config.train.warmup_epochs = 8, 1e-3, 1
    config.train.epochs, config.train.checkpoint_every, config.train.progress_bar = 2, 1, False
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def test_warmup_is_linear_then_cosine():
    values = [warmup_cosine(step, warmup_steps=10, total_steps=110) for step in range(111)]
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.5) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[60] == pytest.approx(0.5) and values[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from tests.helpers import write_rsna_folder

    root = tmp_path_factory.mktemp("train")
    labels, images = write_rsna_folder(root / "data", n=48, size=72)
    return run_training(tiny_config(labels, images, root / "run"))


def test_run_folder_contents(trained_run):
    files = {p.relative_to(trained_run).as_posix() for p in trained_run.rglob("*") if p.is_file()}
    assert {"config.yaml", "split.csv", "history.csv", "history.json", "metrics.json"} <= files
    assert {
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "checkpoints/epoch000.ckpt",
        "checkpoints/epoch001.ckpt",
    } <= files
    assert {"model/model.safetensors", "model/config.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    history = json.loads((trained_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    for row in history:
        assert row["train_loss"] > 0 and row["val_mae"] > 0 and row["lr"] >= 0 and row["seconds"] > 0
    assert history[0]["lr"] > 0
    assert pd.read_csv(trained_run / "history.csv")["epoch"].tolist() == [0, 1]
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 64 and saved["train"]["lr"] == 1e-3
    split = pd.read_csv(trained_run / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"} and len(split) == 48
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] < 48  # the test part is never trained or selected on
    assert metrics["best_val_mae"] == pytest.approx(min(r["val_mae"] for r in history), abs=1e-3)


def test_checkpoint_and_model_folder_give_identical_predictions(trained_run):
    model, description = load_model_folder(trained_run / "model")
    checkpoint = torch.load(trained_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    from_ckpt = BoneAgeNet(model.cfg)
    from_ckpt.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}, strict=True)
    from_ckpt.eval()
    image, male = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(image, male), from_ckpt(image, male), rtol=0, atol=0)
    assert description["metrics"]["best_val_mae"] > 0
    assert description["training"]["config"]["train"]["epochs"] == 2


def test_resume_continues_an_interrupted_run(tmp_path, rsna_folder):
    labels, images = rsna_folder
    first = run_training(tiny_config(labels, images, tmp_path / "run", epochs=1))
    steps_one_epoch = json.loads((first / "history.json").read_text())[-1]["step"]
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(tiny_config(labels, images, tmp_path / "run", epochs=2))
    run_training(tiny_config(labels, images, tmp_path / "run", epochs=2), resume=True)
    history = json.loads((first / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    assert history[1]["step"] == 2 * steps_one_epoch
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        run_training(tiny_config(labels, images, tmp_path / "other"), resume=True)


def test_training_with_augmentation_on_the_device(tmp_path, rsna_folder):
    labels, images = rsna_folder
    config = tiny_config(labels, images, tmp_path / "run", epochs=1)
    config.augment.on_device = True
    run = run_training(config)
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and 0 < history[0]["val_mae"] < 240 and history[0]["train_loss"] > 0
    assert (run / "model" / "model.safetensors").is_file()


def test_fine_tuning_starts_from_a_model_folder_with_clinic_augmentation(tmp_path, rsna_folder):
    labels, images = rsna_folder
    first = run_training(tiny_config(labels, images, tmp_path / "first", epochs=1))
    config = tiny_config(labels, images, tmp_path / "tuned", epochs=1, init=str(first / "model"), lr=1e-9)
    config.train.stage_weight_power = 0.5
    augment = config.augment
    augment.on_device, augment.frame_p, augment.floor_p, augment.gamma = True, 0.5, 0.3, (0.6, 1.6)
    tuned = run_training(config)
    before, _ = load_model_folder(first / "model")
    after, _ = load_model_folder(tuned / "model")
    # at a learning rate of 1e-9 one epoch leaves the started-from weights where they were (not the batch norms' stats)
    for (name, old), new in zip(before.named_parameters(), after.parameters(), strict=True):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=0, msg=name)
    with pytest.raises(ConfigError, match="holds one network, got member 1"):
        run_training(tiny_config(labels, images, tmp_path / "bad", init=str(first / "model"), init_member=1))


def test_stage_weights_lift_the_rare_stages():
    from boneage.train import stage_weights

    ages = [30.0] * 10 + [90.0] * 40 + [150.0] * 40 + [200.0] * 10
    assert stage_weights(ages, 0.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(stage_weights(ages, 0.5), torch.tensor([2.0, 1.0, 1.0, 2.0]))
    assert stage_weights([90.0, 100.0], 1.0).tolist() == [1.0, 1.0, 1.0, 1.0]  # empty stages: weight 1


def test_weighted_loss_is_the_stage_weighted_mean_and_only_in_training():
    from boneage.train import BoneAgeModule

    config = Config()
    config.model.pretrained, config.model.target_scale = "none", 10.0
    config.train.stage_weight_power = 1.0
    module = BoneAgeModule(config)
    module.stage_weights.copy_(torch.tensor([4.0, 1.0, 1.0, 2.0]))
    batch = {"age_months": torch.tensor([30.0, 90.0, 200.0]), "stage": torch.tensor([0, 1, 3])}
    output = torch.tensor([40.0, 95.0, 190.0])  # errors of 1, 0.5 and 1 in units of target_scale
    huber = torch.tensor([0.5, 0.125, 0.5])  # Huber (delta 1) of those errors
    weighted = module._loss(output, batch, weighted=True)
    torch.testing.assert_close(weighted, (huber * torch.tensor([4.0, 1.0, 2.0])).sum() / 7.0)
    torch.testing.assert_close(module._loss(output, batch), huber.mean())


def test_init_takes_an_ensemble_member_and_names_a_mismatched_field(tmp_path):
    from boneage.config import DataConfig, ModelConfig
    from boneage.model import BoneAgeEnsemble, save_model_folder
    from boneage.train import init_state

    model_cfg = ModelConfig(pretrained="none", target_offset=120.0, target_scale=40.0)
    torch.manual_seed(0)
    members = [BoneAgeNet(model_cfg) for _ in range(2)]
    folder = save_model_folder(tmp_path / "pair", BoneAgeEnsemble(members), DataConfig(image_size=64))
    config = Config()
    config.model = ModelConfig(pretrained="none", target_offset=120.0, target_scale=40.0)
    config.data.image_size = 64
    config.train.init, config.train.init_member = str(folder), 1
    state = init_state(config)
    torch.testing.assert_close(state["head.0.weight"], members[1].state_dict()["head.0.weight"])
    config.train.init_member = 2
    with pytest.raises(ConfigError, match="has 2 networks, got 2"):
        init_state(config)
    config.train.init_member, config.model.target_scale = 0, 12.0
    with pytest.raises(ConfigError, match=r"model.target_scale: .* was trained with 40.0, the config has 12.0"):
        init_state(config)
    config.model.target_scale, config.data.standardize = 40.0, True
    with pytest.raises(ConfigError, match="data.standardize"):
        init_state(config)
    config.data.standardize, config.data.source_antialias = False, False  # the folder resizes with antialiasing
    with pytest.raises(ConfigError, match="data.source_antialias: .* reads images with True, the config has False"):
        init_state(config)


def test_training_refuses_invalid_labels(tmp_path, rsna_folder):
    labels, images = rsna_folder
    frame = pd.read_csv(labels, dtype=str)
    frame.loc[3, "male"] = ""
    frame.to_csv(labels, index=False)
    with pytest.raises(DataValidationError, match="row 5"):
        run_training(tiny_config(labels, images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    config = tiny_config(labels, images, tmp_path / "run", epochs=1, limit_train_batches=2)
    config.data.drop_invalid = True
    run_training(config)
    assert len(pd.read_csv(tmp_path / "run" / "split.csv")) == 47


def test_atomic_checkpoint_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, target)

    def failing_save(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}


@pytest.mark.slow  # two training processes
def test_ddp_two_cpu_processes(tmp_path, rsna_folder):
    labels, images = rsna_folder
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "boneage",
        "train",
        "--labels",
        str(labels),
        "--images",
        str(images),
        "--output",
        str(out),
        "--image-size",
        "64",
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--limit-train-batches",
        "3",
        "--num-workers",
        "0",
        "--progress-bar",
        "false",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert json.loads((out / "history.json").read_text())[0]["step"] == 3  # each rank: 3 steps on its shard
    load_model_folder(out / "model")
