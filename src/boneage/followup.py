"""One child's bone ages over several visits: the course on the chart of bone age against age, and how far bone age
moved between visits against how far the child aged (``boneage chart``).

A bone age that advances faster than the calendar (a ratio of bone-age change to age change over 1) is what, for
example, the follow-up of precocious puberty watches. Each bone age here carries the model's 90% interval, so a
change is only called faster or slower than age when it differs from the age change by more than the two visits'
half-widths combined as independent errors (``sqrt(h1^2 + h2^2)``; with the shipped model about 25 months). Errors
of one model on two films of one child are rarely independent, so this is a cautious threshold, not a calibrated one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from boneage.imageio import parse_sex
from boneage.rows import format_age, plain_row

FOLLOW_UP_COLUMNS = [
    "id",
    "chronological_age_months",
    "bone_age_months",
    "lower_months",
    "upper_months",
    "sds",
    "call",
    "age_change_months",
    "bone_age_change_months",
    "change_ratio",
    "change_error_months",
    "change_call",
]


def follow_up(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One child's visits (prediction rows), in order of age, each with the change since the previous visit.

    Rows that were not predicted or have no chronological age are left out and listed in the second return value.

    Returns:
        (visits, skipped): ``visits`` as dicts with :data:`FOLLOW_UP_COLUMNS` (the first visit has no change);
        ``skipped`` the ids left out, each with why.

    Raises:
        ValueError: the rows do not belong to one sex (so not to one child), or no row has a bone age and an age.
    """
    visits, skipped = [], []
    for row in rows:
        row = plain_row(row)
        row["male"] = parse_sex(row.get("male"))  # True/False, or M/F in a file edited by hand
        if row.get("status") != "ok" or row.get("bone_age_months") is None:
            skipped.append(f"{row.get('id')}: no bone age ({row.get('status')})")
        elif row.get("chronological_age_months") is None:
            skipped.append(f"{row.get('id')}: no chronological age")
        elif row["male"] is None:
            skipped.append(f"{row.get('id')}: no sex")
        else:
            visits.append(row)
    if not visits:
        raise ValueError("no row has both a bone age and a chronological age: " + "; ".join(skipped))
    sexes = {bool(visit["male"]) for visit in visits}
    if len(sexes) > 1:
        listed = ", ".join(f"{v['id']} ({'M' if v['male'] else 'F'})" for v in visits)
        raise ValueError(f"the rows are not one child's: they have both sexes ({listed})")
    visits.sort(key=lambda visit: float(visit["chronological_age_months"]))
    course: list[dict[str, Any]] = []
    for k, visit in enumerate(visits):
        out = {key: visit.get(key) for key in FOLLOW_UP_COLUMNS}
        out["male"] = visit["male"]
        out["status"] = "ok"
        out["reader_bone_age_months"] = visit.get("reader_bone_age_months")
        if k:
            out.update(_change(visits[k - 1], visit))
        course.append(out)
    return course, skipped


def overall_change(course: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The change from the first visit to the last (as :func:`follow_up`'s per-visit changes); None for one visit."""
    return _change(course[0], course[-1]) if len(course) > 1 else None


def change_text(change: dict[str, Any]) -> str:
    """A change between two visits (:func:`overall_change`, or a visit's change since the one before) in words: the
    age and bone-age changes in months, their ratio and combined error when known, and the call."""
    ratio = f", ratio {change['change_ratio']:.2f}" if change["change_ratio"] is not None else ""
    error = f", error +/-{change['change_error_months']:.0f}" if change["change_error_months"] is not None else ""
    return (
        f"{change['age_change_months']:+.1f} months of age, {change['bone_age_change_months']:+.1f} of bone age"
        f"{ratio}{error}: {change['change_call']}"
    )


def visit_line(visit: dict[str, Any]) -> str:
    """One visit of :func:`follow_up`'s course in one line, as ``boneage chart`` prints it: age, bone age and its
    interval, SDS and the call, and the change since the visit before (:func:`change_text`)."""
    age = format_age(visit["chronological_age_months"])
    line = f"{visit['id']}: age {age}, bone age {visit['bone_age_months']:.1f}"
    if visit["lower_months"] is not None:
        line += f" ({visit['lower_months']:.0f}-{visit['upper_months']:.0f})"
    if visit["sds"] is not None:
        line += f", SDS {visit['sds']:+.2f}, {visit['call']}"
    if visit.get("age_change_months") is not None:
        line += f"; since the visit before: {change_text(visit)}"
    return line


def _half_width(visit: dict[str, Any]) -> float | None:
    lower, upper = visit.get("lower_months"), visit.get("upper_months")
    if lower is None or upper is None:
        return None
    return max(float(upper) - float(visit["bone_age_months"]), float(visit["bone_age_months"]) - float(lower))


def _change(previous: dict[str, Any], visit: dict[str, Any]) -> dict[str, Any]:
    """Age change, bone-age change, their ratio and whether bone age moved faster or slower than age."""
    age_change = float(visit["chronological_age_months"]) - float(previous["chronological_age_months"])
    bone_change = float(visit["bone_age_months"]) - float(previous["bone_age_months"])
    widths = [_half_width(previous), _half_width(visit)]
    error = math.hypot(*widths) if None not in widths else None
    result: dict[str, Any] = {
        "age_change_months": round(age_change, 2),
        "bone_age_change_months": round(bone_change, 2),
        "change_ratio": round(bone_change / age_change, 2) if age_change > 0 else None,
        "change_error_months": round(error, 2) if error is not None else None,
    }
    if age_change <= 0:
        result["change_call"] = "same age: no change to judge"
    elif error is None:
        result["change_call"] = "no interval: not judged"
    elif bone_change - age_change > error:
        result["change_call"] = "faster than age"
    elif age_change - bone_change > error:
        result["change_call"] = "slower than age"
    else:
        result["change_call"] = "not distinguishable from age"
    return result


def is_prediction_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``boneage predict`` output (a CSV with a ``bone_age_months`` column, or its JSON) rather
    than images or a CSV listing images."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".csv", ".json"):
        return False
    if path.suffix.lower() == ".json":
        return True
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        return "bone_age_months" in handle.readline().split(",")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``boneage predict`` CSV or JSON output."""
    import json

    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix.lower() == ".json":
        try:
            return list(json.loads(path.read_text())["predictions"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a boneage predict JSON output ({err})") from None
    try:
        table = pd.read_csv(path, dtype={"id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None
    missing = {"id", "male", "bone_age_months", "chronological_age_months", "status"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a boneage predict output: no column {', '.join(sorted(missing))}")
    return table.to_dict("records")
