"""Training with PyTorch Lightning: the seed's recipe (AdamW, linear warm-up then cosine, early stopping, clipping,
checkpoints every 5 epochs plus the best), mixed precision, resume, and DDP across GPUs/nodes or CPU processes."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from boneage.config import Config, contract_from_description
from boneage.dataset import BoneAgeDataset, build_augment, raw_batch_images, stage_tensor
from boneage.errors import ConfigError
from boneage.imageio import STAGE_EDGES_MONTHS, stage_index
from boneage.labels import make_split, read_labels, read_split
from boneage.model import BoneAgeEnsemble, BoneAgeNet, load_model_folder, load_pretrained, save_model_folder

logger = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BoneAgeModule(pl.LightningModule):
    """Lightning wrapper: loss, metrics and the optimiser around a :class:`BoneAgeNet`."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = BoneAgeNet(config.model, in_chans=config.data.in_chans)
        self.save_hyperparameters({"config": config.to_dict()})
        # per-stage loss weights (train.stage_weight_power), set by run_training from the training table
        self.register_buffer("stage_weights", torch.ones(len(STAGE_EDGES_MONTHS) + 1), persistent=False)

    @property
    def is_regression(self) -> bool:
        return self.config.model.task == "regression"

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        return self.model(image, male)

    def _loss(self, output: torch.Tensor, batch: dict[str, Any], weighted: bool = False) -> torch.Tensor:
        """The batch's loss; ``weighted``: each image's weighted by its stage (``train.stage_weight_power``)."""
        reduction = "none" if weighted else "mean"
        if self.is_regression:
            scale = self.config.model.target_scale
            losses = F.huber_loss(
                output.float() / scale,
                batch["age_months"] / scale,
                delta=self.config.model.huber_delta,
                reduction=reduction,
            )
        else:
            losses = F.cross_entropy(output.float(), batch["stage"], reduction=reduction)
        if not weighted:
            return losses
        weights = self.stage_weights[batch["stage"]]
        return (losses * weights).sum() / weights.sum()

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # raw uint8 batches (augment.on_device): augment while training, then normalise, on the training device
        if batch["image"].dtype == torch.uint8:
            batch["image"] = raw_batch_images(batch, self.config.data, self.config.augment if self.training else None)
        return batch

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.config.train.channels_last:
            return batch["image"].contiguous(memory_format=torch.channels_last)
        return batch["image"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        output = self(self._images(batch), batch["male"])
        loss = self._loss(output, batch, weighted=self.config.train.stage_weight_power > 0)
        size = len(batch["male"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        if self.is_regression:
            mae = (output.detach().float() - batch["age_months"]).abs().mean()
            self.log("train_mae", mae, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        output = self(self._images(batch), batch["male"])
        size = len(batch["male"])
        self.log("val_loss", self._loss(output, batch), on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        if self.is_regression:
            mae = (output.float() - batch["age_months"]).abs().mean()
            stage_acc = (stage_tensor(output.float()) == batch["stage"]).float().mean()
        else:
            # expected age from the stage probabilities is not defined; report accuracy and leave MAE out
            mae = None
            stage_acc = (output.argmax(dim=1) == batch["stage"]).float().mean()
        if mae is not None:
            self.log("val_mae", mae, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val_stage_acc", stage_acc, on_epoch=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self) -> Any:
        cfg = self.config.train
        optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        steps_per_epoch = max(1, total_steps // epochs)
        warmup_steps = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file and rename it into place, so a killed run never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class HistoryWriter(Callback):
    """Per-epoch history (loss, MAE, accuracy, lr, seconds) written as history.csv and history.json in the run."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        history = self.run_dir / "history.json"
        if not self.rows and history.is_file():  # resumed run: keep the epochs before the interruption
            self.rows = [r for r in json.loads(history.read_text()) if r["epoch"] < trainer.current_epoch]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self._epoch_start, 2),
            **{k: metrics.get(k) for k in ("train_loss", "train_mae", "val_loss", "val_mae", "val_stage_acc")},
        }
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        tmp = history.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, indent=2))
        os.replace(tmp, history)
        with open(self.run_dir / "history.csv.tmp", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.run_dir / "history.csv.tmp", self.run_dir / "history.csv")


class ProgressLog(Callback):
    """Plain log lines (step, loss, images/s) for runs without a progress bar, e.g. in the background."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self._last_time = time.perf_counter()
        self._images = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch["male"])
        if trainer.is_global_zero and (batch_idx + 1) % self.every_n_steps == 0:
            elapsed = time.perf_counter() - self._last_time
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float("nan")
            logger.info(
                "epoch %d step %d/%d loss %.4f  %.1f img/s",
                trainer.current_epoch,
                batch_idx + 1,
                trainer.num_training_batches,
                loss,
                self._images * trainer.world_size / max(elapsed, 1e-9),
            )
            self._last_time, self._images = time.perf_counter(), 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            logger.info("epoch %d done: %s", trainer.current_epoch, metrics)
        self._last_time, self._images = time.perf_counter(), 0


def stage_weights(ages_months: np.ndarray, power: float) -> torch.Tensor:
    """Per-stage loss weights: (share of the commonest stage / share of each stage) ** power, 1 for an empty stage."""
    counts = np.bincount(stage_index(np.asarray(ages_months, dtype=float)), minlength=len(STAGE_EDGES_MONTHS) + 1)
    ratio = np.where(counts > 0, counts.max() / np.maximum(counts, 1), 1.0)
    return torch.tensor(ratio**power, dtype=torch.float32)


INIT_MODEL_FIELDS = ("task", "backbone", "sex_embedding_dim", "hidden_dims", "target_offset", "target_scale")
INIT_DATA_FIELDS = (
    "image_size",
    "resize_mode",
    "in_chans",
    "source_size",
    "source_antialias",
    "standardize",
    "hand_fill",
)


def _plain(value: Any) -> Any:
    """A list and a tuple of the same values compare equal (config.json stores tuples as lists)."""
    return tuple(value) if isinstance(value, list | tuple) else value


def init_state(config: Config) -> dict[str, torch.Tensor]:
    """The weights ``train.init`` names (member ``train.init_member`` of an ensemble), checked against the config:
    the same network (model section) reading the same input (data contract), or an error naming the first field
    that differs."""
    folder, member = config.train.init, config.train.init_member
    trained, description = load_model_folder(str(folder))
    if isinstance(trained, BoneAgeEnsemble):
        if member >= len(trained.members):
            raise ConfigError(f"train.init_member: {folder} has {len(trained.members)} networks, got {member}")
        trained = trained.members[member]
    elif member != 0:
        raise ConfigError(f"train.init_member: {folder} holds one network, got member {member}")
    theirs_model = trained.cfg
    checks = (
        ("model", config.model, theirs_model, "was trained with", INIT_MODEL_FIELDS),
        ("data", config.data, contract_from_description(description), "reads images with", INIT_DATA_FIELDS),
    )
    for section, ours_cfg, theirs_cfg, verb, names in checks:
        for name in names:
            ours, theirs = getattr(ours_cfg, name), getattr(theirs_cfg, name)
            if _plain(ours) != _plain(theirs):
                raise ConfigError(f"{section}.{name}: {folder} {verb} {theirs!r}, the config has {ours!r}")
    return {k: v.float() if v.is_floating_point() else v for k, v in trained.state_dict().items()}


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on CUDA devices that support it, 32-bit elsewhere.

    On CPU, bf16 autocast was measured slower than fp32 with channels-last for EfficientNet-Lite0 (see
    BENCHMARKS.md), so ``auto`` keeps fp32 there; ``--precision bf16-mixed`` still selects it.
    """
    if precision != "auto":
        return precision
    if _uses_cuda(accelerator) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()


def _parse_devices(devices: str) -> Any:
    if devices == "auto":
        return "auto"
    if "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return int(devices)


def prepare_tables(config: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Validated labels and the split: (train, val, split table). Refuses invalid data unless drop_invalid."""
    data = config.data
    if not data.labels or not data.images:
        raise ValueError("training needs data.labels (CSV) and data.images (folder): --labels FILE --images DIR")
    labels = read_labels(data.labels, data.images, drop_invalid=data.drop_invalid)
    if data.split:
        split = read_split(data.split, labels)
    else:
        split = make_split(labels, seed=data.split_seed)
    table = labels.merge(split, on="id", how="inner")
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    if train.empty or val.empty:
        raise ValueError(f"the split has {len(train)} train and {len(val)} val images; both must be non-empty")
    return train.reset_index(drop=True), val.reset_index(drop=True), split


def _batch_limit(value: float) -> float | int:
    """Lightning reads a float as a fraction of the epoch and an int as a batch count."""
    return int(value) if value > 1 else float(value)


def _num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return min(4, os.cpu_count() or 1)


def run_training(config: Config, resume: bool = False) -> Path:
    """Train a model as configured; returns the run folder.

    The run folder holds ``config.yaml`` (the resolved config), ``split.csv``, ``history.csv/json``,
    ``checkpoints/`` (``best.ckpt``, ``last.ckpt``, one every ``checkpoint_every`` epochs) and ``model/``, the best
    weights as a self-describing model folder.
    """
    config.validate()
    cfg = config.train
    run_dir = Path(cfg.output)
    initial = init_state(config) if cfg.init and not resume else None  # checked before minutes of decoding
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    train_table, val_table, split = prepare_tables(config)

    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last_ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_ckpt}")
    if not resume and last_ckpt.is_file():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")

    rank_zero = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        split.to_csv(run_dir / "split.csv", index=False)

    on_device = config.augment.on_device
    train_ds = BoneAgeDataset(
        train_table,
        config.data,
        augment=None if on_device else build_augment(config.augment),
        cache=config.data.cache_images,
        raw=on_device,
        hand_boxes=config.augment.frame_p > 0,
    )
    val_ds = BoneAgeDataset(val_table, config.data, cache=config.data.cache_images, raw=on_device)
    if config.data.cache_images:
        started = time.perf_counter()
        for ds in (train_ds, val_ds):
            ds.fill_cache(progress=cfg.progress_bar and rank_zero)
        logger.info("decoded %d images in %.1f s", len(train_ds) + len(val_ds), time.perf_counter() - started)
    workers = _num_workers(config.data.num_workers)
    loader_kwargs: dict[str, Any] = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": _uses_cuda(cfg.accelerator),
    }
    train_loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size, **loader_kwargs
    )
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, **loader_kwargs)

    module = BoneAgeModule(config)
    module.stage_weights.copy_(stage_weights(train_table["boneage"].to_numpy(), cfg.stage_weight_power))
    if not resume:
        if initial is not None:
            module.model.load_state_dict(initial, strict=True)
        else:
            load_pretrained(module.model, config.model.pretrained)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)

    regression = config.model.task == "regression"
    monitor = "val_mae" if regression else "val_loss"
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="min", save_last=True
    )
    periodic = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        every_n_epochs=cfg.checkpoint_every,
        save_top_k=-1,
    )
    callbacks: list[Callback] = [
        best,
        periodic,
        EarlyStopping(
            monitor=monitor, mode="min", patience=cfg.patience, min_delta=cfg.min_delta, check_on_train_epoch_end=False
        ),
        LearningRateMonitor(logging_interval="epoch"),
        HistoryWriter(run_dir),
    ]
    if not cfg.progress_bar:
        callbacks.append(ProgressLog())
    trainer = pl.Trainer(
        default_root_dir=run_dir,
        max_epochs=cfg.resolved_epochs(config.model.task),
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=_parse_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, cfg.accelerator),  # type: ignore[arg-type]
        gradient_clip_val=cfg.grad_clip or None,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=pl.loggers.CSVLogger(run_dir, name="logs"),
        limit_train_batches=_batch_limit(cfg.limit_train_batches),
        limit_val_batches=_batch_limit(cfg.limit_val_batches),
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        deterministic=False,
        benchmark=True,  # cuDNN picks the fastest convolution algorithms (CUDA only; the input size is fixed)
        log_every_n_steps=10,
    )
    started = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last_ckpt) if resume else None)
    seconds = time.perf_counter() - started

    if trainer.is_global_zero:
        best_path = best.best_model_path or (str(last_ckpt) if last_ckpt.is_file() else "")
        model = BoneAgeNet(config.model, in_chans=config.data.in_chans)
        if best_path:
            checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
            model.load_state_dict(state, strict=True)
        else:  # stopped (max_steps) before any validation: the weights as they are
            model.load_state_dict(module.model.state_dict(), strict=True)
            best_path = "(final weights, never validated)"
        best_score = best.best_model_score
        metrics = {
            "selected_on": "val",
            f"best_{monitor}": float(best_score) if best_score is not None else None,
            "best_checkpoint": Path(best_path).name,
            "epochs_run": trainer.current_epoch,
            "train_seconds": round(seconds, 1),
            "world_size": trainer.world_size,
            "n_train": len(train_ds),
            "n_val": len(val_ds),
        }
        history_file = run_dir / "history.json"
        training = {
            "config": config.to_dict(),
            "data": {"labels": config.data.labels, "split": config.data.split},
            "history": json.loads(history_file.read_text()) if history_file.is_file() else [],
        }
        save_model_folder(run_dir / "model", model, config.data, training=training, metrics=metrics)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info("best %s = %s; model folder %s", monitor, metrics[f"best_{monitor}"], run_dir / "model")
    return run_dir
