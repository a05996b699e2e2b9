"""Bone age against chronological age: the difference, a standard deviation score (SDS) and the clinical call.

The SDS divides ``bone age - chronological age`` by the standard deviation of skeletal age of healthy children of the
same sex and chronological age. Those standard deviations are the Brush Foundation Study values printed with the
Greulich-Pyle atlas:

    Greulich WW, Pyle SI. Radiographic Atlas of Skeletal Development of the Hand and Wrist, 2nd edition.
    Stanford University Press, 1959 (standard deviations of skeletal age by chronological age, Brush Foundation
    Study of Human Growth and Development, Cleveland, Ohio).

The table lists boys from 3 to 204 months and girls from 3 to 192 months; between its ages the SD is interpolated
linearly. Outside them there is no reference, so no SDS is given (never an extrapolated one). The call follows the
usual two-SD rule: ``delayed`` below -2, ``advanced`` above +2, ``normal`` otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

REFERENCE = "Greulich & Pyle (1959), Brush Foundation standard deviations"
SDS_LIMIT = 2.0
IMPLAUSIBLE_SDS = 4.0  # beyond this the result is kept but flagged: often an age in years or a wrong sex

# chronological age (months) -> SD of skeletal age (months)
_AGES_MALE = (3, 6, 9, 12, 18, 24, 30, 36, 42, 48, 54, 60, 72, 84, 96, 108, 120, 132, 144, 156, 168, 180, 192, 204)
_SD_MALE = (
    0.69, 1.13, 1.43, 1.97, 3.52, 3.92, 4.52, 5.08, 5.40, 6.66, 8.36, 8.79,
    9.17, 8.91, 9.10, 9.00, 9.79, 10.09, 10.38, 10.44, 10.72, 11.32, 12.86, 13.05,
)  # fmt: skip
_AGES_FEMALE = _AGES_MALE[:-1]
_SD_FEMALE = (
    0.72, 1.16, 1.36, 1.77, 3.49, 4.64, 5.37, 5.97, 7.48, 8.98, 10.73, 11.65,
    10.23, 9.64, 10.23, 10.74, 11.73, 11.94, 10.24, 10.67, 11.30, 9.23, 7.31,
)  # fmt: skip
REFERENCE_SD: dict[bool, tuple[np.ndarray, np.ndarray]] = {
    True: (np.asarray(_AGES_MALE, dtype=float), np.asarray(_SD_MALE, dtype=float)),
    False: (np.asarray(_AGES_FEMALE, dtype=float), np.asarray(_SD_FEMALE, dtype=float)),
}
MAX_CHRONOLOGICAL_AGE_MONTHS = 240.0


def reference_sd(chronological_age_months: float, male: bool) -> float | None:
    """The SD of skeletal age (months) for a child of this age and sex; None outside the reference table."""
    ages, sds = REFERENCE_SD[bool(male)]
    if not ages[0] <= chronological_age_months <= ages[-1]:
        return None
    return float(np.interp(chronological_age_months, ages, sds))


def reference_band(male: bool, limit: float = SDS_LIMIT) -> dict[str, list[float]]:
    """The normal range of bone age for the chart of bone age against age: at each chronological age of the reference
    table (months), bone age = age -/+ ``limit`` SDs. Between the table's ages the band is linear, as the SD is.

    Example:
        >>> band = reference_band(male=True)
        >>> band["ages_months"][-1], band["lower_months"][-1], band["upper_months"][-1]
        (204.0, 177.9, 230.1)
    """
    ages, sds = REFERENCE_SD[bool(male)]
    return {
        "ages_months": ages.tolist(),
        "lower_months": np.round(ages - limit * sds, 2).tolist(),
        "upper_months": np.round(ages + limit * sds, 2).tolist(),
    }


def parse_chronological_age(value: Any, source: str = "chronological age") -> float | None:
    """Months from a number or numeric string; None for empty. Raises ValueError naming ``source`` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        months = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: expected a number of months, got {value!r}") from None
    if not math.isfinite(months) or not 0.0 <= months <= MAX_CHRONOLOGICAL_AGE_MONTHS:
        raise ValueError(f"{source}: expected months between 0 and {MAX_CHRONOLOGICAL_AGE_MONTHS:g}, got {value!r}")
    return months


def _call(sds: float) -> str:
    return "delayed" if sds < -SDS_LIMIT else "advanced" if sds > SDS_LIMIT else "normal"


def compare_ages(
    bone_age_months: float,
    chronological_age_months: float,
    male: bool,
    lower_months: float | None = None,
    upper_months: float | None = None,
) -> dict[str, Any]:
    """``ba_minus_ca_months``, ``sds`` and ``call`` (delayed / normal / advanced) for one child and, given the bone
    age's prediction interval (``lower_months``, ``upper_months``), the SDS at its ends (``sds_lower``,
    ``sds_upper``).

    Outside the reference ages ``sds`` and ``call`` are None and ``clinical_note`` says why; an |SDS| over
    ``IMPLAUSIBLE_SDS`` is kept and ``clinical_note`` asks for the age and sex to be checked; when the interval
    reaches another call than the bone age itself, ``clinical_note`` says the call is uncertain and which call the
    interval reaches.

    Example:
        >>> compare_ages(100.0, 120.0, male=True)["call"]
        'delayed'
        >>> compare_ages(130.0, 120.0, male=True, lower_months=112.0, upper_months=148.0)["clinical_note"]
        'call uncertain: the 90% interval reaches advanced'
    """
    difference = bone_age_months - chronological_age_months
    sd = reference_sd(chronological_age_months, male)
    result: dict[str, Any] = {
        "chronological_age_months": round(chronological_age_months, 2),
        "ba_minus_ca_months": round(difference, 2),
        "reference_sd_months": None,
        "sds": None,
        "sds_lower": None,
        "sds_upper": None,
        "call": None,
        "clinical_note": "",
    }
    if sd is None:
        ages = REFERENCE_SD[bool(male)][0]
        result["clinical_note"] = (
            f"no SDS: chronological age {chronological_age_months:.1f} months is outside the reference "
            f"({ages[0]:g}-{ages[-1]:g} months for {'boys' if male else 'girls'})"
        )
        return result
    sds = difference / sd
    result.update(reference_sd_months=round(sd, 2), sds=round(sds, 2), call=_call(sds))
    notes = []
    if abs(sds) > IMPLAUSIBLE_SDS:
        years, rest = divmod(round(chronological_age_months), 12)
        notes.append(
            f"|SDS| over {IMPLAUSIBLE_SDS:g} is rare: check the chronological age ({chronological_age_months:g} "
            f"months = {years}y {rest}m) and the sex"
        )
    if lower_months is not None and upper_months is not None:
        ends = [(bound - chronological_age_months) / sd for bound in (lower_months, upper_months)]
        result.update(sds_lower=round(ends[0], 2), sds_upper=round(ends[1], 2))
        others = [call for call in ("delayed", "normal", "advanced") if call in map(_call, ends) and call != _call(sds)]
        if others:
            notes.append(f"call uncertain: the 90% interval reaches {' and '.join(others)}")
    result["clinical_note"] = "; ".join(notes)
    return result


def compare_reading(
    bone_age_months: float,
    reading_months: float,
    lower_months: float | None = None,
    upper_months: float | None = None,
) -> dict[str, Any]:
    """A reader's own bone age against the model's: ``reader_bone_age_months``, ``reader_minus_model_months`` and a
    ``reading_note`` when the reading lies outside the model's 90% interval (``lower_months``-``upper_months``), the
    case a second reader exists for.

    Example:
        >>> compare_reading(144.4, 170.0, 126.9, 161.9)["reading_note"]
        "the reader's 170 months is outside the model's 90% interval (127-162 months): worth a second look"
    """
    result: dict[str, Any] = {
        "reader_bone_age_months": round(reading_months, 2),
        "reader_minus_model_months": round(reading_months - bone_age_months, 2),
        "reading_note": "",
    }
    if lower_months is not None and upper_months is not None and not lower_months <= reading_months <= upper_months:
        result["reading_note"] = (
            f"the reader's {reading_months:g} months is outside the model's 90% interval "
            f"({lower_months:.0f}-{upper_months:.0f} months): worth a second look"
        )
    return result
