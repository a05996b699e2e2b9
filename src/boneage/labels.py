"""Labels and splits: reading and validating RSNA-style label CSVs, stratified train/val/test splits, age stages.

Torch-free: ``boneage evaluate``, ``split``, ``validate`` and ``calibrate`` read their data through this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneage.errors import DataValidationError
from boneage.imageio import (
    AGE_HEADERS,
    ID_HEADERS,
    MALE_HEADERS,
    SEX_HEADERS,
    STAGE_EDGES_MONTHS,
    parse_sex,
    parse_sex_letter,
    pick_column,
    read_csv_text,
)

logger = logging.getLogger(__name__)


AGE_RANGE_MONTHS = (0.0, 240.0)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom", "")


def stage_of(age_months: float | np.ndarray) -> Any:
    """Stage index (0..3) for an age in months: an int for a scalar, an array for an array (tensors:
    :func:`boneage.dataset.stage_tensor`)."""
    stages = np.searchsorted(np.asarray(STAGE_EDGES_MONTHS), np.asarray(age_months, dtype=float), side="right")
    return int(stages) if np.ndim(stages) == 0 else stages


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
