"""What a prediction reads besides the pixels: the image files under the paths given, and each one's sex,
chronological age and reader's bone age (a metadata CSV, a flag for all, or the DICOM header), and who and what the
reports are about (patient and study identifiers, from the same places). Torch-free."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from boneage.clinical import MAX_CHRONOLOGICAL_AGE_MONTHS, parse_chronological_age
from boneage.imageio import (
    AGE_HEADERS,
    ID_HEADERS,
    MALE_HEADERS,
    SEX_HEADERS,
    dicom_patient_info,
    is_dicom,
    parse_sex,
    parse_sex_letter,
    pick_column,
    read_csv_text,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom"}
READING_HEADERS = ("reader_bone_age_months", *AGE_HEADERS)  # metadata: a labels CSV's bone age is a reader's reading
# (key, label) of the identification block, in the page's order; metadata CSV columns and API form fields use the keys
IDENTIFICATION_FIELDS = (
    ("patient_name", "Patient name"),
    ("patient_id", "Patient ID"),
    ("birth_date", "Birth date"),
    ("sex", "Sex"),
    ("accession_number", "Accession number"),
    ("study_date", "Study date"),
    ("study_uid", "Study instance UID"),
    ("image", "Image"),
)
_DICOM_FIELDS = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "birth_date": "PatientBirthDate",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "study_uid": "StudyInstanceUID",
    "image": "SOPInstanceUID",
}


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


def header_age(info: dict[str, Any]) -> tuple[float | None, str | None]:
    """The one rule for a DICOM header's chronological age (``boneage predict``, ``serve`` and ``listen`` alike):
    used when it lies in 0-240 months; otherwise dropped, with a note for the row saying why (the bone age is still
    given, without BA - CA, SDS and call). ``info``: :func:`boneage.imageio.dicom_patient_info`'s result."""
    months = info.get("age_months")
    if months is None:
        return None, None
    if not 0.0 <= months <= MAX_CHRONOLOGICAL_AGE_MONTHS:
        source = info.get("age_source") or "PatientAge"
        return None, (
            f"the DICOM header's age ({source}: {months:.1f} months) is outside 0-{MAX_CHRONOLOGICAL_AGE_MONTHS:g} "
            "months and was not used; give the age to compare the bone age with"
        )
    return months, None


def resolve_ages(
    files: Sequence[Path],
    chronological_age: float | str | None = None,
    metadata: str | Path | None = None,
    notes: list[str | None] | None = None,
) -> list[float | None]:
    """Each file's chronological age in months: the metadata CSV's ``chronological_age_months`` for its id, else
    ``chronological_age``, else a DICOM file's PatientAge (or StudyDate - PatientBirthDate) when plausible
    (:func:`header_age`); None where none says. ``notes``: a list that gets one entry per file, the note for its row
    when its header age was dropped (else None).

    Raises:
        ValueError: an age given in the metadata or ``chronological_age`` is not a number of months in [0, 240],
            naming where it came from.
    """
    default_age = parse_chronological_age(chronological_age, "--age")
    table = read_metadata(metadata) if metadata else None
    column = "chronological_age_months"
    ages: list[float | None] = []
    for path in files:
        value, key, note = None, image_id(path), None
        if table is not None and column in table.columns and key in table.index:
            value = parse_chronological_age(table.at[key, column], f"{metadata}: id {key}, {column}")
        if value is None:
            value = default_age
        if value is None:
            value, note = header_age(dicom_patient_info(path))
        ages.append(value)
        if notes is not None:
            notes.append(note)
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


def _text(value: Any) -> str | None:
    """A field's value as text, None when it is missing or blank."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def format_date(value: Any) -> str | None:
    """A DICOM date (``YYYYMMDD``) as ``YYYY-MM-DD``; other text as given."""
    text = _text(value)
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def identification(path: str | Path, male: bool | None, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Who and what a report is about (the PDF's identification block, the FHIR subject, the structured report's
    context): each of :data:`IDENTIFICATION_FIELDS` as text, or None when unknown.

    ``given`` (a metadata CSV's row or the API's form fields, by key) wins over the DICOM header; the sex is the one the
    model was given (``male``); the image is the DICOM SOPInstanceUID, else the file name.
    """
    found: dict[str, Any] = {key: None for key, _ in IDENTIFICATION_FIELDS}
    path = Path(path)
    if path.is_file() and is_dicom(path):
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        for key, tag in _DICOM_FIELDS.items():
            found[key] = _text(header.get(tag))
    if found["image"] is None:
        found["image"] = path.name
    for key, value in (given or {}).items():
        if key in found and _text(value) is not None:
            found[key] = _text(value)
    if found["patient_name"]:  # a DICOM person name, Family^Given^Middle -> "Family, Given Middle"
        family, _, rest = found["patient_name"].partition("^")
        found["patient_name"] = ", ".join(p for p in (family, " ".join(rest.split("^")).strip()) if p)
    found["birth_date"], found["study_date"] = format_date(found["birth_date"]), format_date(found["study_date"])
    if male is not None:
        found["sex"] = "M" if male else "F"
    return found


def patients_from_metadata(metadata: str | Path | None) -> dict[str, dict[str, Any]]:
    """Identification fields by image id from a metadata CSV's columns (``patient_name``, ``patient_id``,
    ``birth_date``, ``accession_number``, ``study_date``, ``study_uid``); empty without a CSV."""
    if not metadata:
        return {}
    table = read_metadata(metadata)
    keys = [key for key, _ in IDENTIFICATION_FIELDS if key in table.columns and key not in ("sex", "image")]
    return {str(i): {key: table.at[i, key] for key in keys} for i in table.index} if keys else {}
