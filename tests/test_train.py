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
from boneage.errors import DataValidationError
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
