"""Batch prediction without PyTorch: file discovery, per-image sex and age, the result rows, and an onnxruntime
predictor.

A torch-free install (``pip install boneage`` without the ``torch`` extra) predicts from an exported ``.onnx`` file, or
from a model folder that carries ``model.onnx`` (the shipped default model does), through this module alone: images
are decoded and preprocessed with NumPy and Pillow (:mod:`boneage.imageio`) in worker threads while onnxruntime runs
the previous batch. The PyTorch predictor (:class:`boneage.predict.Predictor`) builds its rows with the same
:func:`finish_row`, so both backends give the same CSV.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from boneage.clinical import compare_ages, compare_reading, parse_chronological_age
from boneage.config import BoneAgeError, contract_from_description
from boneage.imageio import (
    AGE_HEADERS,
    ID_HEADERS,
    MALE_HEADERS,
    SEX_HEADERS,
    STAGE_NAMES,
    ImageReadError,
    dicom_patient_info,
    is_dicom,
    parse_sex,
    parse_sex_letter,
    pick_column,
    preprocess_array,
    read_csv_text,
    stage_index,
)
from boneage.presentation import check as check_presentation
from boneage.presentation import inverted_message, turned_message

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "lite0-256-robust-x3"
ONNX_FILE = "model.onnx"
METADATA_KEY = "boneage.config"
# Images per forward pass when predicting files. Small batches are as fast on a CPU (onnxruntime) or faster (PyTorch)
# and hold a fraction of the activations: with the shipped model, batch 4 vs 32 measured 1.07x / 1.50x the images/s at
# 440 / 956 MiB instead of 1,958 / 1,535 MiB peak RSS (onnxruntime / PyTorch; bench/bench_batch.py, BENCHMARKS.md).
PREDICT_BATCH_SIZE = 4
# what a refused image should be instead: the training radiographs' presentation
READABLE = "it reads one hand per film, palm down, fingers up, bone bright"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom"}
READING_HEADERS = ("reader_bone_age_months", *AGE_HEADERS)  # metadata: a labels CSV's bone age is a reader's reading
PREDICTION_COLUMNS = [
    "id",
    "path",
    "male",
    "bone_age_months",
    "lower_months",
    "upper_months",
    "bone_age",
    "stage",
    "chronological_age_months",
    "ba_minus_ca_months",
    "sds",
    "sds_lower",
    "sds_upper",
    "call",
    "reader_bone_age_months",
    "reader_minus_model_months",
    "status",
    "message",
]


class ModelLoadError(BoneAgeError):
    """A model file or folder cannot be used (missing, wrong checksum, or its runtime is not installed)."""


def default_model_dir() -> Path:
    """The model folder shipped inside the package (no network needed)."""
    folder = Path(str(resources.files("boneage") / "models" / DEFAULT_MODEL))
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"the default model is missing from the installation ({folder}); pass --model DIR")
    return folder


def image_id(path: str | Path) -> str:
    """A file's id in the result rows and in a metadata CSV: the name without an image suffix (``1437.png`` -> 1437),
    else the whole name (DICOM exports name files ``IM000001`` or by their UID, ``1.2.840.113619.2.55.3.1``)."""
    path = Path(path)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def _folder_image(path: Path) -> bool:
    """A file in a folder is read when it has an image suffix, or is DICOM by content whatever its name (PACS and
    CD exports often have none); a DICOMDIR (the index of such an export) is not an image."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.name.upper() == "DICOMDIR":
        return False
    try:
        return is_dicom(path)
    except OSError:  # unreadable: not ours to judge here; a named file would become an error row
        return False


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively: PNG, JPEG, TIFF, BMP, WebP and DICOM by suffix, and DICOM files by content
    whatever their name) and CSV lists (a ``path`` column, relative to the CSV's folder) into a de-duplicated list, in
    the order given (a folder's files sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() == ".csv" and path.is_file():
            import pandas as pd

            listed = pd.read_csv(path, dtype=str, keep_default_na=False)
            if "path" not in listed.columns:
                raise ValueError(f"{path}: a list of images needs a 'path' column; found {list(listed.columns)}")
            found += [p if p.is_absolute() else path.parent / p for p in map(Path, listed["path"]) if str(p)]
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and _folder_image(p))
        else:
            found.append(path)  # a missing file becomes an error row, not a crash
    seen: set[Path] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def plain_row(record: dict[str, Any]) -> dict[str, Any]:
    """A prediction row as read back from a frame or file, with its NaN (empty) cells as None."""
    return {key: None if isinstance(value, float) and value != value else value for key, value in record.items()}


def read_metadata(metadata_csv: str | Path) -> Any:
    """``id,male`` (and optionally ``chronological_age_months``) per image id (:func:`image_id`), as a frame by id.

    The RSNA challenge's files are read as given: ``Image ID``/``Case ID`` for ``id``, and a ``Sex`` (or ``gender``)
    column of M/F for ``male``. Sexes, ages and readings each look ids up here: the file is parsed once per version
    (its size and modification time) and each caller gets its own copy.
    """
    path = Path(metadata_csv)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{metadata_csv}: file not found") from None
    return _parse_metadata(str(metadata_csv), stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=4)
def _parse_metadata(metadata_csv: str, mtime_ns: int, size: int) -> Any:
    """:func:`read_metadata`'s parse; ``mtime_ns`` and ``size`` only key the cache, so an edited file is read again."""
    import pandas as pd

    try:
        frame = read_csv_text(metadata_csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{metadata_csv}: not a readable CSV ({err})") from None
    id_col = pick_column(frame.columns, ID_HEADERS)
    if id_col is None:
        raise ValueError(
            f"{metadata_csv}: expected an 'id' column (the image file name without its suffix; also read: "
            f"{', '.join(ID_HEADERS[1:])}); found {list(frame.columns)}"
        )
    frame = frame.rename(columns={id_col: "id"})
    frame["id"] = frame["id"].str.strip()
    male_col = pick_column(frame.columns, MALE_HEADERS)
    if male_col is not None:
        frame = frame.rename(columns={male_col: "male"})
    elif (sex_col := pick_column(frame.columns, SEX_HEADERS)) is not None:
        # anything but M/F (U, O, 1/0) is no sex: that image gets --sex or its DICOM PatientSex, else an error row
        frame["male"] = frame[sex_col].map(lambda v: {True: "true", False: "false"}.get(parse_sex_letter(v), ""))
    if frame["id"].duplicated().any():
        raise ValueError(f"{metadata_csv}: duplicate ids {frame['id'][frame['id'].duplicated()].tolist()[:5]}")
    return frame.set_index("id")


def resolve_sexes(
    files: Sequence[Path], sex: str | None = None, metadata: str | Path | None = None
) -> list[bool | None]:
    """Each file's sex (True = male): the metadata CSV's ``male`` for its id, else ``sex`` (M/F), else a DICOM file's
    PatientSex; None where none of them says (never guessed).

    Raises:
        ValueError: ``sex`` is given but is not M or F.
    """
    default_sex = parse_sex(sex) if sex is not None else None
    if sex is not None and default_sex is None:
        raise ValueError(f"--sex: expected M or F, got {sex!r}")
    table = read_metadata(metadata) if metadata else None
    sexes: list[bool | None] = []
    for path in files:
        value, key = default_sex, image_id(path)
        if table is not None and key in table.index and "male" in table.columns:
            value = parse_sex(table.at[key, "male"])
        if value is None:
            value = dicom_patient_info(path)["male"]
        sexes.append(value)
    return sexes


def resolve_ages(
    files: Sequence[Path], chronological_age: float | str | None = None, metadata: str | Path | None = None
) -> list[float | None]:
    """Each file's chronological age in months: the metadata CSV's ``chronological_age_months`` for its id, else
    ``chronological_age``, else a DICOM file's PatientAge (or StudyDate - PatientBirthDate); None where none says.

    Raises:
        ValueError: an age is not a number of months in [0, 240], naming where it came from.
    """
    default_age = parse_chronological_age(chronological_age, "--age")
    table = read_metadata(metadata) if metadata else None
    column = "chronological_age_months"
    ages: list[float | None] = []
    for path in files:
        value, key = None, image_id(path)
        if table is not None and column in table.columns and key in table.index:
            value = parse_chronological_age(table.at[key, column], f"{metadata}: id {key}, {column}")
        if value is None:
            value = default_age
        if value is None:
            dicom_age = dicom_patient_info(path)["age_months"]
            value = parse_chronological_age(dicom_age, f"{path}: DICOM PatientAge") if dicom_age is not None else None
        ages.append(value)
    return ages


def resolve_readings(
    files: Sequence[Path], reading: float | str | None = None, metadata: str | Path | None = None
) -> list[float | None]:
    """Each file's bone age as a reader read it, in months, to set beside the model's: the metadata CSV's
    ``reader_bone_age_months`` (or a labels CSV's ``boneage``) for its id, else ``reading``; None where neither says.

    Raises:
        ValueError: a reading is not a number of months in [0, 240], naming where it came from.
    """
    default = parse_chronological_age(reading, "--reading")
    table = read_metadata(metadata) if metadata else None
    column = pick_column(table.columns, READING_HEADERS) if table is not None else None
    readings: list[float | None] = []
    for path in files:
        value, key = None, image_id(path)
        if column is not None and key in table.index:
            value = parse_chronological_age(table.at[key, column], f"{metadata}: id {key}, {column}")
        readings.append(value if value is not None else default)
    return readings


def add_reading(row: dict[str, Any], reading: float | None) -> None:
    """Set a reader's bone age beside a predicted row's (:func:`boneage.clinical.compare_reading`); its note, when the
    reading lies outside the interval, joins the row's message."""
    if reading is None:
        return
    row["reader_bone_age_months"] = round(reading, 2)  # kept also when the model gives no age
    if row.get("status") != "ok" or row.get("bone_age_months") is None:
        return
    compared = compare_reading(row["bone_age_months"], reading, row.get("lower_months"), row.get("upper_months"))
    note = row["reading_note"] = compared.pop("reading_note")
    row.update(compared)
    if note:
        row["message"] = "; ".join(part for part in (row.get("message"), note) if part)


def format_age(months: float) -> str:
    """182.4 -> '15y 2m'."""
    total = int(round(months))
    return f"{total // 12}y {total % 12}m"


def correct_months(months: Any, male: Any, description: dict[str, Any]) -> Any:
    """Apply the model folder's per-sex linear correction ``slope * months + intercept`` (fit on the model's own
    training-set predictions, see ``tools/ship_model.py``), if it has one. ``months`` and ``male`` are NumPy arrays or
    torch tensors of shape (B,)."""
    correction = description.get("output", {}).get("correction")
    if not correction:
        return months
    (slope_f, intercept_f), (slope_m, intercept_m) = correction["female"], correction["male"]
    is_male = male * 1.0  # bool/int -> float, NumPy or torch alike
    return months * (slope_f + (slope_m - slope_f) * is_male) + (intercept_f + (intercept_m - intercept_f) * is_male)


def tta_default(description: dict[str, Any], source: str | Path = "config.json") -> bool:
    """Whether the model folder asks for flip test-time augmentation by default (``output.tta_hflip``): a model
    whose metrics, correction and interval were measured on the average of the image and its mirror."""
    value = description.get("output", {}).get("tta_hflip", False)
    if not isinstance(value, bool):
        raise ModelLoadError(f"{source}: output.tta_hflip: expected true or false, got {value!r}")
    return value


def new_row(path: Path, male: bool | None, error: str | None = None) -> dict[str, Any]:
    """A file's row before prediction; an error row when it could not be read (``error``) or its sex is unknown.
    Rows without a ``status`` go on to the model."""
    row: dict[str, Any] = {"id": image_id(path), "path": str(path), "male": male}
    if error is not None:
        row.update(status="error", message=error)
    elif male is None:
        row.update(status="error", message=f"{path}: sex unknown; pass --sex M|F or --metadata CSV")
    return row


def row_checks(result: dict[str, Any], k: int) -> dict[str, Any]:
    """Image ``k``'s refusal score and presentation calls (inverted, quarter turns, the corrected image's score) from
    a ``predict_batch`` result (either backend), as :func:`finish_row` keywords."""

    def value(name: str) -> float | None:
        values = result.get(name)
        return None if values is None or values[k] != values[k] else float(values[k])  # None also for NaN

    return {
        "score": value("score"),
        "inverted": result.get("inverted") is not None and bool(result["inverted"][k]),
        "inverse_score": value("inverse_score"),
        "turns": int(result["turns"][k]) if result.get("turns") is not None else 0,
        "turned_score": value("turned_score"),
    }


def presentation_checks(description: dict[str, Any]) -> dict[str, Any] | None:
    """The model folder's inverted-image and orientation checks (``config.json``), or None when it has neither."""
    checks = {key: description[key] for key in ("polarity", "orientation") if description.get(key)}
    return checks or None


def finish_row(
    row: dict[str, Any],
    months: float,
    stage: int,
    score: float | None = None,
    threshold: float | None = None,
    half_width: float | None = None,
    chronological_age: float | None = None,
    inverted: bool = False,
    inverse_score: float | None = None,
    turns: int = 0,
    turned_score: float | None = None,
) -> None:
    """Fill a predicted row: refusal when the image looks inverted or turned (:mod:`boneage.presentation`) or its
    assessability score is over its threshold, else bone age, interval, stage and, with a chronological age,
    BA - CA, SDS and the call."""
    corrected = inverse_score if inverted else turned_score if turns else None
    if corrected is not None and threshold is not None and corrected > threshold:
        # wrongly presented, but not readable corrected either: saying how to correct it would not help
        how = "inverted" if inverted else "turned back"
        row.update(
            status="not assessable",
            message=f"{row['path']}: does not look like the hand radiographs the model knows "
            f"(score {score:.1f}, {how} {corrected:.1f}; the limit is {threshold:.1f}); {READABLE}",
        )
        return
    if inverted:
        row.update(status="not assessable", message=inverted_message(row["path"], score, inverse_score))
        return
    if turns:
        row.update(status="not assessable", message=turned_message(row["path"], turns, score, turned_score))
        return
    if score is not None and threshold is not None and score > threshold:
        row.update(
            status="not assessable",
            message=f"{row['path']}: does not look like the hand radiographs the model knows "
            f"(score {score:.1f} > {threshold:.1f}); {READABLE}",
        )
        return
    regression = months == months  # not NaN
    if regression and half_width is not None:
        row.update(lower_months=round(max(0.0, months - half_width), 2), upper_months=round(months + half_width, 2))
    row.update(
        bone_age_months=round(months, 2) if regression else None,
        bone_age=format_age(months) if regression else None,
        stage=STAGE_NAMES[stage],
        status="ok",
        message="",
    )
    if regression and chronological_age is not None:
        clinical = compare_ages(
            months, chronological_age, bool(row["male"]), row.get("lower_months"), row.get("upper_months")
        )
        row["message"] = row["clinical_note"] = clinical.pop("clinical_note")
        row.update(clinical)


def model_name(model_dir: str | Path) -> str:
    """A model's name for reports: its folder's name (also when it runs from the folder's ``model.onnx``), or a bare
    ``.onnx`` file's stem."""
    path = Path(model_dir)
    if path.name == ONNX_FILE and (path.parent / "config.json").is_file():
        return path.parent.name
    return path.stem if path.suffix == ".onnx" else path.name


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OnnxPredictor:
    """An exported model on onnxruntime: NumPy preprocessing in threads, batches through one session.

    Args:
        path: an ``.onnx`` file made by ``boneage export``, or a model folder with ``model.onnx`` (its checksum in
            ``config.json`` is verified).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        if not _importable("onnxruntime"):
            raise ModelLoadError("the ONNX backend needs onnxruntime: pip install onnxruntime")
        import onnxruntime as ort

        path = Path(path)
        folder_config = False
        if path.is_dir():
            config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
            folder_config = bool(config)
            expected = config.get("onnx", {}).get("sha256")
            path = path / ONNX_FILE
            if not path.is_file():
                raise ModelLoadError(f"{path}: not found; export one with `boneage export --format onnx`")
            if expected and sha256_file(path) != expected:
                raise ModelLoadError(f"{path}: checksum does not match config.json (corrupt or replaced file)")
        elif not path.is_file():
            raise ModelLoadError(f"{path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise ModelLoadError(f"{path}: not a loadable ONNX model ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelLoadError(f"{path}: no '{METADATA_KEY}' metadata; export it with `boneage export`")
        self.model_dir = path
        # a model folder's config.json is authoritative (its interval, refusal threshold and correction may have
        # been added after export); a bare .onnx file carries its own copy in the metadata
        self.description: dict[str, Any] = config if folder_config else json.loads(meta[METADATA_KEY])
        self.contract = contract_from_description(self.description)
        self.task = self.description["model"]["task"]
        self.output_names = [o.name for o in self.session.get_outputs()]
        info = self.description.get("assessability") or {}
        self.threshold = float(info["threshold"]) if "score" in self.output_names and info else None
        self.presentation = presentation_checks(self.description) if self.threshold is not None else None
        self.tta_hflip = tta_default(self.description, path)  # average with the mirrored image; callers may override

    @property
    def half_width(self) -> float | None:
        """The calibrated prediction-interval half-width (months), if the model carries one."""
        value = self.description.get("uncertainty", {}).get("half_width_months")
        return float(value) if value is not None else None

    def _run(self, images: np.ndarray, male: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(None, {"image": np.ascontiguousarray(images), "male": male.astype(np.int64)})
        named = dict(zip(self.output_names, outputs))
        return named["output"].astype(np.float32), named.get("score")

    def predict_batch(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray | None]:
        """(B, C, S, S) preprocessed images and (B,) sex -> months (NaN for a classifier), stage, score (or None)
        and, with the presentation checks, inverted / turns and the corrected images' scores
        (:func:`boneage.presentation.check`)."""
        output, score = self._run(images, male)
        checks: dict[str, np.ndarray | None] = {"score": score}
        if self.presentation and score is not None:
            checks.update(
                check_presentation(
                    images,
                    score,
                    self.presentation,
                    self.contract,
                    lambda mask, transform: self._run(np.ascontiguousarray(transform(images[mask])), male[mask])[1],
                )
            )
        if self.tta_hflip:
            output = 0.5 * (output + self._run(images[..., ::-1], male)[0])
        if self.task == "regression":
            output = correct_months(output, male, self.description).astype(np.float32)
            return {"months": output, "stage": stage_index(output), **checks}
        return {"months": np.full(len(images), np.nan, np.float32), "stage": output.argmax(axis=1), **checks}

    def _load(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        try:
            return preprocess_array(path, self.contract), None
        except (ImageReadError, ImportError) as err:
            return None, str(err)

    def predict_files(
        self,
        paths: list[Path],
        sexes: list[bool | None],
        batch_size: int = PREDICT_BATCH_SIZE,
        num_workers: int | None = None,
        progress: bool = False,
        ages: list[float | None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield one row per path, in order (same rows as the PyTorch predictor). The next batch is decoded in
        ``num_workers`` threads while this one runs, so at most two batches of images are in memory."""
        from tqdm.auto import tqdm

        workers = num_workers if num_workers is not None else (0 if len(paths) < 16 else 2)
        batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
        pool = ThreadPoolExecutor(workers) if workers > 0 else None

        def submit(batch: list[int]) -> list[Future] | None:
            return [pool.submit(self._load, paths[i]) for i in batch] if pool else None

        pending = submit(batches[0]) if batches else None
        try:
            with tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress or len(paths) < 10) as bar:
                for k, batch in enumerate(batches):
                    loaded = [f.result() for f in pending] if pending else [self._load(paths[i]) for i in batch]
                    pending = submit(batches[k + 1]) if pool and k + 1 < len(batches) else None
                    rows = {i: new_row(paths[i], sexes[i], error) for i, (_, error) in zip(batch, loaded)}
                    ready = [(i, image) for i, (image, _) in zip(batch, loaded) if "status" not in rows[i]]
                    if ready:
                        images = np.stack([image for _, image in ready])
                        male = np.asarray([int(bool(sexes[i])) for i, _ in ready])
                        result = self.predict_batch(images, male)
                        for k2, (i, _) in enumerate(ready):
                            finish_row(
                                rows[i],
                                float(result["months"][k2]),
                                int(result["stage"][k2]),
                                threshold=self.threshold,
                                half_width=self.half_width,
                                chronological_age=ages[i] if ages is not None else None,
                                **row_checks(result, k2),
                            )
                    yield from (rows[i] for i in batch)
                    bar.update(len(batch))
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_available() -> bool:
    """PyTorch and timm are installed (checked without importing them: that takes seconds)."""
    return _importable("torch") and _importable("timm")


def load_predictor(model_dir: str | Path | None = None, backend: str = "auto") -> Any:
    """A predictor for a model folder or ``.onnx`` file.

    ``auto`` takes onnxruntime when the model is an ``.onnx`` file or its folder carries ``model.onnx`` (the shipped
    model does; 2x faster on CPU, same output within 0.05 month), else PyTorch.
    """
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"--backend: expected auto, torch or onnx, got {backend!r}")
    target = Path(model_dir) if model_dir is not None else default_model_dir()
    onnx_ready = _importable("onnxruntime")
    requested = backend
    if backend == "auto":
        has_onnx = target.suffix == ".onnx" or (target / ONNX_FILE).is_file()
        backend = "onnx" if has_onnx and onnx_ready else "torch"
    if backend == "onnx":
        return OnnxPredictor(target)
    if not torch_available():
        if requested == "torch":
            raise ModelLoadError("the PyTorch backend needs PyTorch: pip install 'boneage[torch]' (or --backend onnx)")
        raise ModelLoadError(
            f"{target}: no {ONNX_FILE} to run without PyTorch; install PyTorch (pip install 'boneage[torch]') "
            "or pass --model FILE.onnx made by `boneage export`"
        )
    from boneage.predict import Predictor

    return Predictor.load(target)


_NUMERIC_COLUMNS = {
    "bone_age_months",
    "lower_months",
    "upper_months",
    "chronological_age_months",
    "ba_minus_ca_months",
    "sds",
    "sds_lower",
    "sds_upper",
    "reader_bone_age_months",
    "reader_minus_model_months",
}


def _finished_rows(output: Path, columns: Sequence[str], files: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows an earlier, stopped run of the same command wrote to ``output`` (CSV, or a JSON output's finished
    document or its ``.partial.jsonl`` stream) for ``files``, typed as new rows; error rows are left out, so those
    files are tried again.

    Raises:
        ValueError: the file is not a prediction output with these columns.
    """
    wanted = {str(path) for path in files}
    if output.suffix.lower() == ".json":
        stream = output.with_suffix(".partial.jsonl")
        try:
            if stream.is_file():
                rows = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]
            elif output.is_file():
                rows = json.loads(output.read_text())["predictions"]
            else:
                return []
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{output}: cannot resume: not a boneage predict output ({err})") from None
    else:
        if not output.is_file():
            return []
        with open(output, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != list(columns):
                raise ValueError(
                    f"{output}: cannot resume: its columns {reader.fieldnames} are not this command's {list(columns)}"
                )
            rows = []
            for raw in reader:
                row: dict[str, Any] = {}
                for key, text in raw.items():
                    if key == "male":
                        row[key] = parse_sex(text)
                    elif key in _NUMERIC_COLUMNS:
                        row[key] = float(text) if text else None
                    else:
                        row[key] = text if text or key == "message" else None
                rows.append(row)
    return [row for row in rows if row.get("path") in wanted and row.get("status") in ("ok", "not assessable")]


def predict_paths(
    paths: Sequence[str | Path],
    output: str | Path,
    model_dir: str | Path | None = None,
    metadata: str | Path | None = None,
    sex: str | None = None,
    batch_size: int = PREDICT_BATCH_SIZE,
    num_workers: int | None = None,
    progress: bool = True,
    backend: str = "auto",
    tta: bool | None = None,
    chronological_age: float | str | None = None,
    gradcam_dir: str | Path | None = None,
    resume: bool = False,
    reading: float | str | None = None,
) -> Any:
    """Predict every image under ``paths`` and write ``output`` (CSV) row by row.

    Args:
        paths: image files and/or folders.
        output: the prediction CSV (``PREDICTION_COLUMNS``), or a ``.json`` file: ``{"model": ..., "predictions":
            [...]}`` with the same fields per image.
        model_dir: a model folder or an exported ``.onnx`` file; the packaged default model when None.
        metadata: CSV with ``id,male[,chronological_age_months]`` per image id (:func:`image_id`); overrides ``sex`` and
            ``chronological_age`` for the ids it lists.
        sex: ``M`` or ``F`` for every image without metadata; DICOM files without either use PatientSex.
        backend: ``auto`` (see :func:`load_predictor`), ``torch`` or ``onnx``.
        tta: average each prediction with that of the mirrored image; None: the model folder's default
            (``output.tta_hflip`` in its config.json).
        chronological_age: months, for every image without ``chronological_age_months`` in the metadata; DICOM
            files without either use PatientAge or the birth and study dates. Adds BA - CA, SDS and the call.
        gradcam_dir: write ``<id>_gradcam.png`` (the radiograph beside its Grad-CAM overlay) here for every
            predicted image, and its path in a ``gradcam_path`` column (needs PyTorch).
        reading: a reader's bone age in months, for every image without ``reader_bone_age_months`` (or a labels
            CSV's ``boneage``) in the metadata: set beside the model's, with a note when it lies outside the interval.
        resume: keep the rows that a stopped run of the same command already wrote to ``output`` (predicted or
            refused; error rows are tried again) and predict only the other files; without it ``output`` is
            overwritten.

    Returns:
        The predictions as a pandas frame (also written to ``output``).
    """
    import pandas as pd

    files = collect_images(paths)
    if not files:
        raise ValueError(
            f"no images found in {', '.join(map(str, paths))} "
            "(expected .png/.jpg/.jpeg/.tif/.tiff/.bmp/.webp/.dcm/.dicom files, or DICOM files by content)"
        )
    columns = PREDICTION_COLUMNS + (["gradcam_path"] if gradcam_dir is not None else [])
    output = Path(output)
    rows = _finished_rows(output, columns, files) if resume else []
    if rows:
        done = {row["path"] for row in rows}
        files = [path for path in files if str(path) not in done]
        logger.info("%s: resuming: %d rows kept, %d images to predict", output, len(rows), len(files))
    sexes = resolve_sexes(files, sex, metadata)
    ages = resolve_ages(files, chronological_age, metadata)
    readings = resolve_readings(files, reading, metadata)
    if gradcam_dir is not None:
        if backend == "onnx":
            raise ValueError("--gradcam needs the PyTorch backend (Grad-CAM takes gradients through the model)")
        backend = "torch"
    predictor = load_predictor(model_dir, backend)
    if tta is not None:
        predictor.tta_hflip = tta
    output.parent.mkdir(parents=True, exist_ok=True)
    as_json = output.suffix.lower() == ".json"
    # rows are streamed as they finish (CSV, or JSON Lines beside a .json output) so a stopped batch keeps them
    stream_path = output.with_suffix(".partial.jsonl") if as_json else output
    with open(stream_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if not as_json:
            writer.writeheader()
        for row in rows:  # kept from the stopped run, written again first
            if as_json:
                handle.write(json.dumps({k: row.get(k) for k in columns}) + "\n")
            else:
                writer.writerow(row)
        handle.flush()
        if gradcam_dir is not None:
            from boneage.predict import save_gradcam
        predicted = predictor.predict_files(files, sexes, batch_size, num_workers, progress, ages)
        for row, reading in zip(predicted, readings):
            add_reading(row, reading)
            if gradcam_dir is not None and row["status"] == "ok":
                row["gradcam_path"] = str(save_gradcam(predictor, row["path"], bool(row["male"]), gradcam_dir))
            if as_json:
                handle.write(json.dumps({k: row.get(k) for k in columns}) + "\n")
            else:
                writer.writerow(row)
            handle.flush()
            rows.append(row)
    if as_json:
        document = {
            "model": {
                "path": str(predictor.model_dir),
                "boneage_version": predictor.description.get("boneage_version"),
                "weights_sha256": predictor.description.get("weights_sha256"),
            },
            "predictions": [{k: row.get(k) for k in columns} for row in rows],
        }
        output.write_text(json.dumps(document, indent=2))
        stream_path.unlink()
    return pd.DataFrame(rows, columns=columns)
