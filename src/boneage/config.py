"""Typed configuration. YAML is only how it is stored; defaults are the seed report's recipe.

A :class:`Config` has four sections. Field names are unique across sections, so the CLI can expose every field as a
flat flag (``--image-size``, ``--backbone``, ``--lr`` ...) while the YAML file keeps the nested layout.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from boneage.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TASKS = ("regression", "classification")
RESIZE_MODES = ("squash", "letterbox")
FLOOR_MODES = ("share", "absolute")


@dataclass
class DataConfig:
    """Where the data is and how an image becomes a tensor (the model's data contract)."""

    labels: str | None = None  # CSV with id,boneage,male
    images: str | None = None  # folder of <id>.png
    split: str | None = None  # CSV with id,split; made (70/15/15 stratified) when absent
    image_size: int = 384
    resize_mode: str = "squash"  # squash: plain resize to a square (the seed's); letterbox: keep aspect, pad
    in_chans: int = 3  # 3: grayscale repeated; 1: first convolution summed over its RGB inputs
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Resize every image to this square first, as the training copies were made (RSNA 100-px set: 100), then to
    # image_size: a full-size radiograph then loses the same detail the training images lost. None: one resize.
    source_size: int | None = None
    # How a larger film goes to source_size: True, Pillow's antialiased bilinear filter (folders written before this
    # field read so); False, plain bilinear interpolation between the four nearest pixels, no antialiasing, which keeps
    # a film's fine grain: real films through the antialiased filter are smoother than 98% of the RSNA 100-px copies
    # the networks learnt from, through the plain one they lie within the copies' range (tools/source_sharpness.py;
    # MODEL_CARD.md, "Real films").
    source_antialias: bool = True
    # Per-image intensity standardisation (zero mean, unit SD over the whole image) instead of the fixed mean/std:
    # the model then sees the same input whatever the film's brightness and contrast.
    standardize: bool = False
    # Re-frame every film around its hand before any resize so that the box around the hand fills this (fraction of
    # the height, fraction of the width) of the frame, as it does in the training copies: a film cropped tightly or
    # loosely then reads the same (:func:`boneage.imageio.frame_hand`). None: the film as given.
    hand_fill: tuple[float, float] | None = None
    # With hand_fill: re-frame only a film whose hand box fills more than this (height, width) of its frame on either
    # axis (a tight crop), leaving films framed like the training copies as they are. None: re-frame every film.
    hand_fill_above: tuple[float, float] | None = None
    split_seed: int = 42
    drop_invalid: bool = False  # skip invalid label rows (listed) instead of refusing to train
    cache_images: bool = True  # decode + resize every image once, keep uint8 copies in memory
    num_workers: int = -1  # DataLoader workers; -1: min(4, cpu count)

    def contract(self) -> dict[str, Any]:
        """The part of the data config a trained model needs at inference time."""
        return {
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "source_size": self.source_size,
            "source_antialias": self.source_antialias,
            "standardize": self.standardize,
            **({"hand_fill": list(self.hand_fill)} if self.hand_fill is not None else {}),
            **({"hand_fill_above": list(self.hand_fill_above)} if self.hand_fill_above is not None else {}),
            "color": "grayscale",
            "value_range": [0.0, 1.0],
        }


@dataclass
class AugmentConfig:
    """The seed's augmentations; set a range to its identity (0, 1.0, 1.0 ...) to switch one off."""

    rotation_degrees: float = 15.0
    zoom: tuple[float, float] = (0.9, 1.1)
    brightness: tuple[float, float] = (0.85, 1.15)
    contrast: tuple[float, float] = (0.85, 1.15)
    hflip_p: float = 0.5
    # A clinic's rendering: gamma (x ** g, g drawn log-uniformly in this range) and, with probability floor_p, a
    # bright background (x -> max(x, level): dark soft tissue and air flattened to one grey level), the level a share
    # f of the way from the image's 1st to its 99th percentile, f drawn in ``floor``: a dim copy keeps its hand.
    # floor_mode "absolute" reads ``floor`` as levels of the [0, 1] scale instead: the meaning before floor_mode was
    # recorded, kept so that an older folder's recorded augmentation is read as it was trained.
    # Per-image standardisation removes any linear change of brightness or contrast, not these.
    gamma: tuple[float, float] = (1.0, 1.0)
    floor: tuple[float, float] = (0.0, 0.0)
    floor_p: float = 0.0
    floor_mode: str = "share"
    # A clinic's framing: with probability frame_p the image is re-framed around its hand (the box of
    # :func:`boneage.imageio.hand_box`) so that the box fills a fraction of the frame's height drawn in
    # frame_fill_height and of its width in frame_fill_width: near 1 a tight crop, near 0.4 a small hand in a large
    # frame (padded with the image's background level). Such images are not zoomed.
    frame_p: float = 0.0
    frame_fill_height: tuple[float, float] = (0.45, 1.0)
    frame_fill_width: tuple[float, float] = (0.35, 1.0)
    # Augment whole batches on the training device (after the copy) instead of each image in the loader workers;
    # the loader then sends uint8 single-channel images. Same kinds and ranges, plus gamma, floor and framing, which
    # only this path has; for GPU runs, whose loaders are slow.
    on_device: bool = False


@dataclass
class ModelConfig:
    """Backbone + sex embedding + head (the seed's architecture)."""

    task: str = "regression"  # regression (bone age, Huber) or classification (4 stages, cross-entropy)
    backbone: str = "tf_efficientnet_lite0"  # any timm model name
    pretrained: str = "auto"  # auto | none | timm (download, online only) | path to a weights file
    sex_embedding_dim: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    dropouts: tuple[float, ...] = (0.3, 0.2)
    # Regression output is head * target_scale + target_offset (months); the loss sees (pred - y) / target_scale.
    # The seed regressed years: scale 12, offset 0. Normalised targets: offset = mean age, scale = its std.
    target_offset: float = 0.0
    target_scale: float = 12.0
    huber_delta: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation and the Lightning trainer."""

    output: str = "runs/boneage"
    epochs: int | None = None  # None: 50 for regression, 40 for classification (the seed's)
    batch_size: int = 16
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    # Fine-tuning: a model folder whose network (member init_member of an ensemble) starts the run instead of the
    # pretrained backbone; it must match the model section (task, backbone, head, target scale) and the data
    # contract (image_size, resize_mode, in_chans, source_size, source_antialias, standardize, hand_fill), checked
    # before decoding.
    init: str | None = None
    init_member: int = 0
    # Weight each training image's loss by (share of the commonest stage / share of its stage) ** this: 0 = plain
    # loss; 0.5 lifts the rare youngest and oldest against the pull towards the mean age.
    stage_weight_power: float = 0.0
    patience: int = 10
    min_delta: float = 0.001
    grad_clip: float = 1.0
    checkpoint_every: int = 5
    seed: int = 42
    accelerator: str = "auto"  # auto | cpu | cuda | mps
    devices: str = "auto"  # auto, a count, or a list such as "0,1"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    precision: str = "auto"  # auto: bf16-mixed on CPU/recent CUDA, 32 elsewhere; or any Lightning precision
    channels_last: bool = True
    max_steps: int = -1  # stop after this many optimizer steps (smoke tests); -1: no limit
    limit_train_batches: float = 1.0  # a fraction of the epoch, or a batch count when > 1 (smoke tests)
    limit_val_batches: float = 1.0
    progress_bar: bool = True

    def resolved_epochs(self, task: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return 50 if task == "regression" else 40


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.model.task not in TASKS:
            raise ConfigError(f"model.task: expected one of {TASKS}, got {self.model.task!r}")
        if self.data.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"data.resize_mode: expected one of {RESIZE_MODES}, got {self.data.resize_mode!r}")
        if self.data.in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans: expected 1 or 3, got {self.data.in_chans}")
        if len(self.data.mean) != self.data.in_chans or len(self.data.std) != self.data.in_chans:
            raise ConfigError(
                f"data.mean/std: expected {self.data.in_chans} values each (one per input channel), "
                f"got {len(self.data.mean)} and {len(self.data.std)}"
            )
        if self.data.image_size < 32:
            raise ConfigError(f"data.image_size: expected >= 32 pixels, got {self.data.image_size}")
        if self.data.source_size is not None and self.data.source_size < 8:
            raise ConfigError(f"data.source_size: expected >= 8 pixels or none, got {self.data.source_size}")
        if not self.data.source_antialias and self.data.source_size is None:
            raise ConfigError(
                "data.source_antialias: false chooses the filter of the resize to source_size; set source_size"
            )
        if self.data.hand_fill is not None and (
            len(self.data.hand_fill) != 2 or not all(0.2 <= fill <= 1 for fill in self.data.hand_fill)
        ):
            raise ConfigError(
                f"data.hand_fill: expected two fractions in [0.2, 1] (height, width) or none, got {self.data.hand_fill}"
            )
        if self.data.hand_fill_above is not None and len(self.data.hand_fill_above) != 2:
            raise ConfigError(
                f"data.hand_fill_above: expected two fractions (height, width) or none, got {self.data.hand_fill_above}"
            )
        if len(self.model.hidden_dims) != len(self.model.dropouts):
            raise ConfigError("model.hidden_dims and model.dropouts must have the same length")
        if self.model.target_scale <= 0:
            raise ConfigError(f"model.target_scale: expected > 0, got {self.model.target_scale}")
        for name in ("zoom", "brightness", "contrast", "gamma", "floor", "frame_fill_height", "frame_fill_width"):
            if len(getattr(self.augment, name)) != 2:
                raise ConfigError(f"augment.{name}: expected two values (low, high), got {getattr(self.augment, name)}")
        for name in ("zoom", "brightness", "contrast"):
            low, high = getattr(self.augment, name)
            if not 0 < low <= high:
                raise ConfigError(f"augment.{name}: expected 0 < low <= high, got ({low}, {high})")
        for name in ("hflip_p", "floor_p", "frame_p"):
            value = getattr(self.augment, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"augment.{name}: expected a probability in [0, 1], got {value}")
        for name, (low_limit, high_limit) in {
            "gamma": (0.1, 10.0),
            "floor": (0.0, 0.9),
            "frame_fill_height": (0.2, 1.0),
            "frame_fill_width": (0.2, 1.0),
        }.items():
            low, high = getattr(self.augment, name)
            if not low_limit <= low <= high <= high_limit:
                raise ConfigError(
                    f"augment.{name}: expected {low_limit} <= low <= high <= {high_limit}, got ({low}, {high})"
                )
        if self.augment.floor_mode not in FLOOR_MODES:
            raise ConfigError(f"augment.floor_mode: expected one of {FLOOR_MODES}, got {self.augment.floor_mode!r}")
        uses_batch_only = (
            tuple(self.augment.gamma) != (1.0, 1.0) or self.augment.floor_p > 0 or self.augment.frame_p > 0
        )
        if uses_batch_only and not self.augment.on_device:
            raise ConfigError("augment.gamma/floor_p/frame_p are batch augmentations: set augment.on_device: true")
        if self.train.stage_weight_power < 0:
            raise ConfigError(f"train.stage_weight_power: expected >= 0, got {self.train.stage_weight_power}")
        if self.train.init is not None and not str(self.train.init).strip():
            raise ConfigError("train.init: expected a model folder or none, got an empty path")
        if self.train.init_member < 0:
            raise ConfigError(f"train.init_member: expected >= 0, got {self.train.init_member}")
        if self.train.batch_size < 1 or self.train.lr <= 0:
            raise ConfigError("train.batch_size must be >= 1 and train.lr > 0")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, a plain YAML/JSON-able tree

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, tree: dict[str, Any], source: str = "config") -> Config:
        config = cls()
        unknown_sections = set(tree) - {f.name for f in fields(cls)}
        if unknown_sections:
            raise ConfigError(
                f"{source}: unknown section(s) {sorted(unknown_sections)}; expected data/augment/model/train"
            )
        for section_name, values in tree.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {section_name!r} must be a mapping")
            section = getattr(config, section_name)
            for key, value in values.items():
                set_field(section, key, value, f"{source}: {section_name}.{key}")
        try:
            config.validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return config

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        return cls.from_dict(tree, source=str(path))

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _field_type(section: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(section))
    return hints[name]


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or raise a ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return coerce(value, non_none[0], where)
    try:
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            item_type = args[0]
            return tuple(coerce(item, item_type, where) for item in items)
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}") from None
    return value


def set_field(section: Any, name: str, value: Any, where: str) -> None:
    if name not in {f.name for f in fields(section)}:
        raise ConfigError(f"{where}: unknown field; expected one of {[f.name for f in fields(section)]}")
    setattr(section, name, coerce(value, _field_type(section, name), where))


def flat_fields(config: Config | None = None) -> dict[str, tuple[str, dataclasses.Field]]:
    """Map every field name to (section name, field); names are unique across sections."""
    config = config or Config()
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section_name, section in config.sections().items():
        for f in fields(section):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section_name, f)
    return out


def contract_from_description(description: dict[str, Any]) -> DataConfig:
    """The data contract stored in a model folder's config.json (or an ONNX file's metadata)."""
    contract = description["data_contract"]
    return DataConfig(
        image_size=int(contract["image_size"]),
        resize_mode=contract["resize_mode"],
        in_chans=int(contract["in_chans"]),
        mean=tuple(contract["mean"]),
        std=tuple(contract["std"]),
        source_size=contract.get("source_size"),  # absent in folders written before these two fields existed
        # absent in folders written before it existed: those go to source_size through the antialiased filter
        source_antialias=bool(contract.get("source_antialias", True)),
        standardize=bool(contract.get("standardize", False)),
        # absent in folders written before it existed: those read the film as given, as they always did
        hand_fill=tuple(contract["hand_fill"]) if contract.get("hand_fill") is not None else None,
        hand_fill_above=tuple(contract["hand_fill_above"]) if contract.get("hand_fill_above") is not None else None,
    )
