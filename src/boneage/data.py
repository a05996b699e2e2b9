"""Reading, validating and splitting RSNA-style data; image decoding; preprocessing and augmentation.

Samples are dicts ``{"image", "age_months", "male", "stage", "id"}``. Images are decoded to float32 grayscale in
[0, 1], resized to the model's square input (``squash`` or ``letterbox``), augmented on the training side, then
normalised and repeated to the model's channel count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from boneage.config import AugmentConfig, DataConfig
from boneage.imageio import (  # noqa: F401 - re-exported: data is where readers look for them
    AGE_HEADERS,
    ID_HEADERS,
    MALE_HEADERS,
    MAX_IMAGE_PIXELS,
    SEX_HEADERS,
    STAGE_EDGES_MONTHS,
    STAGE_NAMES,
    STANDARDIZE_EPS,
    ImageReadError,
    dicom_patient_info,
    parse_sex,
    parse_sex_letter,
    pick_column,
    read_csv_text,
    read_image,
)

logger = logging.getLogger(__name__)

AGE_RANGE_MONTHS = (0.0, 240.0)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom", "")


class DataValidationError(ValueError):
    """The labels, split or image folder are not usable; ``problems`` lists every one found."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{shown}{more}")


def stage_of(age_months: float | np.ndarray | torch.Tensor) -> Any:
    """Stage index (0..3) for an age in months; works on scalars, arrays and tensors."""
    if isinstance(age_months, torch.Tensor):
        edges = torch.tensor(STAGE_EDGES_MONTHS, dtype=age_months.dtype, device=age_months.device)
        return torch.bucketize(age_months, edges, right=True)
    stages = np.searchsorted(np.asarray(STAGE_EDGES_MONTHS), np.asarray(age_months, dtype=float), side="right")
    return int(stages) if np.ndim(stages) == 0 else stages


# --------------------------------------------------------------------------------------------------- labels


def read_labels(
    labels_csv: str | Path,
    images_dir: str | Path | None = None,
    drop_invalid: bool = False,
) -> pd.DataFrame:
    """Read and validate a labels CSV: ``id,boneage,male``, or the RSNA challenge's validation and test files as
    given (``Image ID``/``Case ID``, ``Bone Age (months)``/``Ground truth bone age (months)``, ``Sex`` M/F; every
    accepted header is in :data:`boneage.imageio.ID_HEADERS` and its neighbours).

    Checks duplicate ids, non-numeric or out-of-range ages (outside 0-240 months), missing or unknown sex and, with
    ``images_dir``, missing image files. Every problem names the CSV row and id.

    Returns:
        A frame with columns ``id`` (str), ``boneage`` (float months), ``male`` (bool) and, with ``images_dir``,
        ``path``.

    Raises:
        DataValidationError: listing every problem, unless ``drop_invalid`` (then invalid rows are logged and dropped).
    """
    labels_csv = Path(labels_csv)
    try:
        raw = read_csv_text(labels_csv)
    except FileNotFoundError:
        raise DataValidationError(str(labels_csv), ["file not found"]) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataValidationError(str(labels_csv), [f"not a readable CSV ({err})"]) from None
    id_col = pick_column(raw.columns, ID_HEADERS)
    age_col = pick_column(raw.columns, AGE_HEADERS)
    sex_col = pick_column(raw.columns, MALE_HEADERS)
    read_sex, expected_sex = parse_sex, "True/False, M/F, 1/0"
    if sex_col is None and (sex_col := pick_column(raw.columns, SEX_HEADERS)) is not None:
        read_sex, expected_sex = parse_sex_letter, "M or F"
    missing = [
        f"missing column {name!r} (accepted headers: {', '.join(aliases)}); found {list(raw.columns)}"
        for name, col, aliases in (
            ("id", id_col, ID_HEADERS),
            ("boneage", age_col, AGE_HEADERS),
            ("male", sex_col, MALE_HEADERS + tuple(f"{h} (M/F)" for h in SEX_HEADERS)),
        )
        if col is None
    ]
    if missing:
        raise DataValidationError(str(labels_csv), missing)

    problems: dict[int, list[str]] = {}
    ids = raw[id_col].str.strip()
    duplicated = ids.duplicated(keep=False)
    ages = pd.to_numeric(raw[age_col].str.strip(), errors="coerce")
    sexes = [read_sex(v) for v in raw[sex_col]]
    low, high = AGE_RANGE_MONTHS
    images_dir = Path(images_dir) if images_dir is not None else None
    paths: list[Path | None] = []
    for i, image_id in enumerate(ids):
        row = i + 2  # 1-based, after the header line
        issues = problems.setdefault(row, [])
        if not image_id:
            issues.append("empty id")
        elif duplicated.iloc[i]:
            issues.append(f"duplicate id {image_id!r}")
        age_text = raw[age_col].iloc[i]
        if np.isnan(ages.iloc[i]):
            issues.append(f"{age_col}={age_text!r} is not a number (expected months, {low:g}-{high:g})")
        elif not low <= ages.iloc[i] <= high:
            issues.append(f"{age_col}={age_text} is outside {low:g}-{high:g} months")
        if sexes[i] is None:
            issues.append(f"{sex_col}={raw[sex_col].iloc[i]!r} is not a known sex (expected {expected_sex})")
        path = None
        if images_dir is not None and image_id:
            path = find_image(images_dir, image_id)
            if path is None:
                issues.append(f"no image file {images_dir / (image_id + '.png')} (or .jpg/.dcm)")
        paths.append(path)

    invalid = {row: issues for row, issues in problems.items() if issues}
    messages = [f"row {row} (id={ids.iloc[row - 2]!r}): {'; '.join(issues)}" for row, issues in invalid.items()]
    if messages and not drop_invalid:
        raise DataValidationError(str(labels_csv), messages)
    for message in messages:
        logger.warning("%s: dropped %s", labels_csv, message)

    table = pd.DataFrame({"id": ids, "boneage": ages, "male": [bool(s) if s is not None else False for s in sexes]})
    if images_dir is not None:
        table["path"] = [str(p) if p is not None else "" for p in paths]
    table = table.drop(index=[row - 2 for row in invalid]).reset_index(drop=True)
    if table.empty:
        raise DataValidationError(str(labels_csv), ["no valid rows"])
    return table


def find_image(images_dir: str | Path, image_id: str) -> Path | None:
    """The image file for an id: ``<id>.png`` first, then .jpg/.jpeg/.dcm/.dicom, then a bare ``<id>``."""
    images_dir = Path(images_dir)
    for ext in IMAGE_EXTENSIONS:
        candidate = images_dir / f"{image_id}{ext}"
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------------- splits

SPLITS = ("train", "val", "test")


def make_split(
    labels: pd.DataFrame,
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 42,
) -> pd.DataFrame:
    """Stratified train/val/test split by age stage x sex, reproducible for a seed.

    Returns:
        A frame ``id,split`` in the order of ``labels``.
    """
    from sklearn.model_selection import train_test_split

    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    stages = stage_of(labels["boneage"].to_numpy())
    candidates = [
        ("stage x sex", stages * 2 + labels["male"].to_numpy().astype(int)),
        ("stage", stages),
        ("none", None),
    ]
    index = np.arange(len(labels))
    train_frac, val_frac, test_frac = fractions

    def divide(subset: np.ndarray, first_share: float) -> tuple[np.ndarray, np.ndarray]:
        # Finest stratification that every stratum can satisfy (tiny sets may not have 2 of each stage x sex).
        for name, strata in candidates:
            try:
                first, second = train_test_split(
                    subset,
                    train_size=first_share,
                    random_state=seed,
                    stratify=None if strata is None else strata[subset],
                )
            except ValueError:
                continue
            if name != "stage x sex":
                logger.warning("split: too few images per stage x sex; stratified by %s instead", name)
            return first, second
        raise ValueError(f"cannot split {len(subset)} images with fractions {fractions}")

    train_idx, rest_idx = divide(index, train_frac)
    if test_frac == 0:
        val_idx, test_idx = rest_idx, np.array([], dtype=int)
    else:
        val_idx, test_idx = divide(rest_idx, val_frac / (val_frac + test_frac))
    split = np.empty(len(labels), dtype=object)
    split[train_idx], split[val_idx], split[test_idx] = "train", "val", "test"
    return pd.DataFrame({"id": labels["id"].to_numpy(), "split": split})


def read_split(split_csv: str | Path, labels: pd.DataFrame) -> pd.DataFrame:
    """Read an ``id,split`` CSV (e.g. the seed's ``seed-split.csv``) and check it against the labels.

    Ids in the split but not in the labels, duplicate ids and unknown split names are errors; labelled ids that the
    split does not mention are left out of every split (and logged).
    """
    split_csv = Path(split_csv)
    try:
        split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataValidationError(str(split_csv), ["file not found"]) from None
    if not {"id", "split"} <= set(split.columns):
        raise DataValidationError(str(split_csv), [f"expected columns id,split; found {list(split.columns)}"])
    split["id"] = split["id"].str.strip()
    split["split"] = split["split"].str.strip().str.lower()
    problems = []
    for i, (image_id, name) in enumerate(zip(split["id"], split["split"]), start=2):
        if name not in SPLITS:
            problems.append(f"row {i} (id={image_id!r}): split={name!r}, expected one of {SPLITS}")
    duplicates = split["id"][split["id"].duplicated()].tolist()
    if duplicates:
        problems.append(f"duplicate ids: {duplicates[:10]}")
    unknown = sorted(set(split["id"]) - set(labels["id"]))
    if unknown:
        problems.append(f"{len(unknown)} id(s) not in the labels, e.g. {unknown[:10]}")
    if problems:
        raise DataValidationError(str(split_csv), problems)
    unassigned = len(set(labels["id"]) - set(split["id"]))
    if unassigned:
        logger.info("%s: %d labelled id(s) are in no split and are not used", split_csv, unassigned)
    return split[["id", "split"]]


# --------------------------------------------------------------------------------------------------- images


# --------------------------------------------------------------------------------------------------- transforms


def resize(image: torch.Tensor, size: int, mode: str = "squash") -> torch.Tensor:
    """Resize a (C, H, W) image to (C, size, size).

    ``squash`` stretches to a square, exactly how the 100-px RSNA copies were made; ``letterbox`` keeps the aspect
    ratio and pads the short side with black (0).
    """
    _, height, width = image.shape
    if mode == "squash":
        return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if mode != "letterbox":
        raise ValueError(f"resize mode: expected 'squash' or 'letterbox', got {mode!r}")
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    scaled = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    out = image.new_zeros((image.shape[0], size, size))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[:, top : top + new_h, left : left + new_w] = scaled
    return out


def load_resized(path: str | Path, contract: DataConfig) -> torch.Tensor:
    """Decode and resize one image to the model's square input: (1, S, S) float in [0, 1].

    With a ``source_size`` the image first goes to that square, as the training copies were made.
    """
    image = torch.from_numpy(read_image(path))[None]  # (1, H, W)
    if contract.source_size is not None:
        image = resize(image, contract.source_size, contract.resize_mode).clamp_(0.0, 1.0)
    return resize(image, contract.image_size, contract.resize_mode).clamp_(0.0, 1.0)


def build_augment(cfg: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The seed's augmentations as a torchvision v2 pipeline on (1, S, S) images in [0, 1].

    Rotation +/-``rotation_degrees``, zoom ``zoom``, brightness and contrast factors, horizontal flip with
    ``hflip_p``. Never a vertical flip: a hand upside down is not a valid radiograph.
    """
    from torchvision.transforms import v2

    steps: list[Any] = []
    if cfg.rotation_degrees > 0 or cfg.zoom != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=cfg.rotation_degrees, scale=tuple(cfg.zoom), interpolation=v2.InterpolationMode.BILINEAR
            )
        )
    if cfg.brightness != (1.0, 1.0) or cfg.contrast != (1.0, 1.0):
        steps.append(
            v2.ColorJitter(
                brightness=tuple(cfg.brightness) if cfg.brightness != (1.0, 1.0) else None,
                contrast=tuple(cfg.contrast) if cfg.contrast != (1.0, 1.0) else None,
            )
        )
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip_p))
    pipeline = v2.Compose(steps)

    def augment(image: torch.Tensor) -> torch.Tensor:
        return pipeline(image).clamp_(0.0, 1.0)

    return augment


def augment_batch(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """:func:`build_augment`'s augmentations for a whole batch (B, 1, S, S) in [0, 1], on the batch's device.

    Each image draws its own rotation, zoom, brightness and contrast factors and flip. Rotation and zoom are one
    affine resampling about the centre (bilinear, black outside), then brightness (``x * b``), then contrast (blend
    with the image's mean), each clamped to [0, 1] as torchvision does; torchvision applies brightness and contrast in
    a random order, here always in this one.
    """
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(batch, device=device).uniform_(low, high)

    out = images
    if cfg.rotation_degrees > 0 or tuple(cfg.zoom) != (1.0, 1.0):
        angle = torch.deg2rad(uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
        inverse_scale = 1.0 / uniform(*cfg.zoom)
        cos, sin = torch.cos(angle) * inverse_scale, torch.sin(angle) * inverse_scale
        zeros = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if tuple(cfg.brightness) != (1.0, 1.0):
        out = (out * uniform(*cfg.brightness).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if tuple(cfg.contrast) != (1.0, 1.0):
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * uniform(*cfg.contrast).view(-1, 1, 1, 1) + mean).clamp(0.0, 1.0)
    if cfg.hflip_p > 0:
        flip = (torch.rand(batch, device=device) < cfg.hflip_p).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    return out.clamp(0.0, 1.0)


def normalize_batch(images: torch.Tensor, contract: DataConfig) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, C, S, S) normalised with the contract's per-channel mean/std, or with each
    image's own mean and SD when the contract says ``standardize``."""
    if contract.standardize:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp_min(STANDARDIZE_EPS)
        return ((images - mean) / std).expand(-1, contract.in_chans, -1, -1)
    images = images.expand(-1, contract.in_chans, -1, -1)
    mean = torch.tensor(contract.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(contract.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def normalize(image: torch.Tensor, contract: DataConfig) -> torch.Tensor:
    """(1, S, S) in [0, 1] -> (C, S, S): :func:`normalize_batch` for one image."""
    return normalize_batch(image[None], contract)[0]


def preprocess(path: str | Path, contract: DataConfig) -> torch.Tensor:
    """File -> model input (C, S, S): decode, resize, normalise. The single inference-time path."""
    return normalize(load_resized(path, contract), contract)


# --------------------------------------------------------------------------------------------------- dataset


class BoneAgeDataset(Dataset):
    """Labelled radiographs as sample dicts.

    Args:
        table: frame with ``id``, ``path``, ``boneage`` and ``male`` (from :func:`read_labels` with an images dir).
        contract: input size, resize mode, channels and normalisation.
        augment: applied to the resized [0, 1] image before normalisation (training only).
        cache: decode and resize every image up front and keep uint8 copies, instead of decoding every epoch.
        raw: return ``image`` as the (1, S, S) uint8 copy, neither augmented nor normalised (the training device
            does both: :func:`augment_batch`, :func:`normalize_batch`).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        contract: DataConfig,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = False,
        raw: bool = False,
    ):
        if raw and augment is not None:
            raise ValueError("raw samples are augmented on the device: pass augment=None with raw=True")
        self.ids = table["id"].astype(str).tolist()
        self.paths = table["path"].astype(str).tolist()
        self.ages = torch.tensor(table["boneage"].to_numpy(dtype=np.float32))
        self.male = torch.tensor(table["male"].to_numpy(dtype=np.int64))
        self.contract = contract
        self.augment = augment
        self.cache_enabled = cache
        self.raw = raw
        self._cache: torch.Tensor | None = None  # (N, S, S) uint8, filled by fill_cache

    def __len__(self) -> int:
        return len(self.ids)

    def fill_cache(self, progress: bool = False) -> None:
        """Decode every image once into a shared uint8 tensor (workers forked later read it without copies)."""
        if self._cache is not None:
            return
        from tqdm.auto import tqdm

        size = self.contract.image_size
        images = torch.empty((len(self), size, size), dtype=torch.uint8)
        # One image is too small a task for intra-op threads: on a many-core machine, and with several processes,
        # their hand-offs made decoding tens of times slower than one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in tqdm(range(len(self)), desc="decoding images", disable=not progress, leave=False):
                images[i] = self._decode_uint8(i)[0]
        finally:
            torch.set_num_threads(threads)
        self._cache = images

    def _decode_uint8(self, index: int) -> torch.Tensor:
        """(1, S, S) uint8, decoded and resized now: what the cache holds."""
        return (load_resized(self.paths[index], self.contract) * 255.0).round_().to(torch.uint8)

    def _uint8(self, index: int) -> torch.Tensor:
        if self.cache_enabled:
            self.fill_cache()
            assert self._cache is not None
            return self._cache[index][None]
        return self._decode_uint8(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.raw:
            image = self._uint8(index)
        else:
            # uncached images stay float: no rounding to grey levels
            image = (
                self._uint8(index).float() / 255.0
                if self.cache_enabled
                else load_resized(self.paths[index], self.contract)
            )
            if self.augment is not None:
                image = self.augment(image)
            image = normalize(image, self.contract)
        age = self.ages[index]
        return {
            "image": image,
            "age_months": age,
            "male": self.male[index],
            "stage": stage_of(age),
            "id": self.ids[index],
        }
