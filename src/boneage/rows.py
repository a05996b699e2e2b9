"""One result row per input image, the same from every backend and app: its columns, an error row, a predicted
or refused row, a reader's reading beside it, and the rows a stopped run already wrote (``--resume``). Torch-free."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boneage.clinical import compare_ages, compare_reading
from boneage.imageio import STAGE_NAMES, parse_sex
from boneage.inputs import image_id
from boneage.presentation import inverted_message, turned_message

# what a refused image should be instead: the training radiographs' presentation
READABLE = "it reads one hand per film, palm down, fingers up, bone bright"
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


def plain_row(record: dict[str, Any]) -> dict[str, Any]:
    """A prediction row as read back from a frame or file, with its NaN (empty) cells as None."""
    return {key: None if isinstance(value, float) and value != value else value for key, value in record.items()}


def format_age(months: float) -> str:
    """182.4 -> '15y 2m'."""
    total = int(round(months))
    return f"{total // 12}y {total % 12}m"


def summary_line(row: dict[str, Any]) -> str:
    """A prediction row in one line, as ``boneage predict`` prints it: bone age, interval, stage and sex, then the
    comparison with the chronological age (BA - CA, SDS and its interval, the call), a reader's reading and the
    row's message; for a row not predicted, its status and message. ``row``: a plain row (:func:`plain_row`, None
    for empty cells)."""
    if row["status"] != "ok":
        return f"{row['id']}: {row['status']}: {row['message']}"
    sex = "male" if row["male"] else "female"
    if row.get("bone_age_months") is None:  # a stage classifier: a stage, no age to compare
        answer = f"{row['stage']} [{sex}]"
    else:
        interval = ""
        if row.get("upper_months") is not None:
            interval = f", interval {row['lower_months']:.0f}-{row['upper_months']:.0f}"
        answer = f"bone age {row['bone_age_months']:.1f} months ({row['bone_age']}){interval}, {row['stage']} [{sex}]"
    clinical = ""
    if row.get("chronological_age_months") is not None:
        clinical = f"; age {row['chronological_age_months']:.0f} months, BA-CA {row['ba_minus_ca_months']:+.1f}"
        if row.get("sds") is not None:
            spread = ""
            if row.get("sds_lower") is not None:
                spread = f" ({row['sds_lower']:+.2f} to {row['sds_upper']:+.2f})"
            clinical += f", SDS {row['sds']:+.2f}{spread}, {row['call']}"
    if row.get("reader_bone_age_months") is not None:
        difference = row.get("reader_minus_model_months")
        clinical += f"; reader {row['reader_bone_age_months']:g} months"
        clinical += f" ({difference:+.1f})" if difference is not None else ""
    clinical += f"; {row['message']}" if row.get("message") else ""
    return f"{row['id']}: {answer}{clinical}"


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


def score_over_limit(score: float, threshold: float) -> str:
    """``"3.01 > 2.98"``: a refusal score over its limit, with as many decimals (1 to 6) as it takes for the two to
    read differently, so a score just over the limit does not read "3.0 > 3.0"; closer than that, "just over"."""
    for decimals in range(1, 7):
        shown_score, shown_limit = f"{score:.{decimals}f}", f"{threshold:.{decimals}f}"
        if shown_score != shown_limit:
            return f"{shown_score} > {shown_limit}"
    return f"{shown_score}, just over {shown_limit}"


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
            f"(score {score:.1f}, {how} {score_over_limit(corrected, threshold)}); {READABLE}",
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
            f"(score {score_over_limit(score, threshold)}); {READABLE}",
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


def add_note(row: dict[str, Any], note: str | None) -> None:
    """Join a note (e.g. why the header's age was not used) to a predicted or refused row's message."""
    if note and row.get("status") != "error":
        row["message"] = "; ".join(part for part in (row.get("message"), note) if part)


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


def finished_rows(output: Path, columns: Sequence[str], files: Sequence[Path]) -> list[dict[str, Any]]:
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


def reportable_rows(rows: Any) -> Any:
    """The rows of a ``boneage predict`` frame that get a report: a bone age, or a refusal the report explains."""
    return (row for row in map(plain_row, rows.to_dict("records")) if row.get("status") in ("ok", "not assessable"))
