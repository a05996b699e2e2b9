"""The lines ``boneage predict`` and ``boneage chart`` print per row: :func:`boneage.rows.summary_line`,
:func:`boneage.followup.visit_line` and :func:`boneage.followup.change_text`."""

from __future__ import annotations

from typing import Any

from boneage.followup import change_text, visit_line
from boneage.rows import finish_row, score_over_limit, summary_line


def _ok(**fields: Any) -> dict[str, Any]:
    row = {
        "id": "1437",
        "path": "/x/1437.png",
        "male": True,
        "bone_age_months": 165.23,
        "lower_months": None,
        "upper_months": None,
        "bone_age": "13y 9m",
        "stage": "Pre-adolescent",
        "chronological_age_months": None,
        "ba_minus_ca_months": None,
        "sds": None,
        "sds_lower": None,
        "sds_upper": None,
        "call": None,
        "reader_bone_age_months": None,
        "reader_minus_model_months": None,
        "status": "ok",
        "message": "",
    }
    row.update(fields)
    return row


def test_summary_line_of_predicted_and_failed_rows():
    assert summary_line(_ok(male=False)) == "1437: bone age 165.2 months (13y 9m), Pre-adolescent [female]"
    full = _ok(
        lower_months=147.73,
        upper_months=182.73,
        chronological_age_months=130.0,
        ba_minus_ca_months=35.23,
        sds=3.5,
        sds_lower=1.75,
        sds_upper=5.25,
        call="advanced",
        reader_bone_age_months=120.0,
        reader_minus_model_months=-45.23,
        message="call uncertain: the 90% interval reaches normal",
    )
    assert summary_line(full) == (
        "1437: bone age 165.2 months (13y 9m), interval 148-183, Pre-adolescent [male]; age 130 months, BA-CA +35.2, "
        "SDS +3.50 (+1.75 to +5.25), advanced; reader 120 months (-45.2); call uncertain: the 90% interval reaches "
        "normal"
    )
    no_interval = _ok(chronological_age_months=100.0, ba_minus_ca_months=65.23, sds=2.4, call="advanced")
    assert summary_line(no_interval) == (
        "1437: bone age 165.2 months (13y 9m), Pre-adolescent [male]; age 100 months, BA-CA +65.2, SDS +2.40, advanced"
    )
    classifier = _ok(bone_age_months=None, bone_age=None, reader_bone_age_months=100.0)  # a stage, no age
    assert summary_line(classifier) == "1437: Pre-adolescent [male]; reader 100 months"
    error = {"id": "broken", "male": None, "status": "error", "message": "/x/broken.png: not a recognised image"}
    assert summary_line(error) == "broken: error: /x/broken.png: not a recognised image"
    refused = {"id": "noise", "male": True, "status": "not assessable", "message": "/x/noise.png: score 19.3 > 3.1"}
    assert summary_line(refused) == "noise: not assessable: /x/noise.png: score 19.3 > 3.1"


def _visit(**fields: Any) -> dict[str, Any]:
    visit = {
        "id": "1516",
        "chronological_age_months": 124.0,
        "bone_age_months": 98.84,
        "lower_months": 81.34,
        "upper_months": 116.34,
        "sds": -2.13,
        "call": "delayed",
        "age_change_months": None,
    }
    visit.update(fields)
    return visit


def test_visit_line_and_change_text():
    change = {
        "age_change_months": 24.0,
        "bone_age_change_months": -45.53,
        "change_ratio": -1.9,
        "change_error_months": 24.75,
        "change_call": "slower than age",
    }
    assert change_text(change) == ("+24.0 months of age, -45.5 of bone age, ratio -1.90, error +/-25: slower than age")
    same_age = {**change, "age_change_months": 0.0, "change_ratio": None, "change_call": "same age: no change to judge"}
    assert change_text(same_age) == "+0.0 months of age, -45.5 of bone age, error +/-25: same age: no change to judge"
    assert visit_line(_visit()) == "1516: age 10y 4m, bone age 98.8 (81-116), SDS -2.13, delayed"
    assert visit_line(_visit(lower_months=None, upper_months=None, sds=None, call=None)) == (
        "1516: age 10y 4m, bone age 98.8"
    )
    assert visit_line(_visit(**change)) == (
        "1516: age 10y 4m, bone age 98.8 (81-116), SDS -2.13, delayed; since the visit before: +24.0 months of age, "
        "-45.5 of bone age, ratio -1.90, error +/-25: slower than age"
    )


def test_a_score_just_over_its_limit_reads_over_it():
    assert score_over_limit(19.34, 3.1) == "19.3 > 3.1"
    assert score_over_limit(3.004, 2.986) == "3.00 > 2.99" and score_over_limit(3.0004, 2.9996) == "3.0004 > 2.9996"
    assert score_over_limit(2.9848991, 2.98489906) == "2.984899, just over 2.984899"
    row = {"path": "/x/1397.png"}
    finish_row(row, 30.0, 0, score=3.004, threshold=2.986)
    assert row["status"] == "not assessable" and "(score 3.00 > 2.99)" in row["message"]
    row = {"path": "/x/n.png"}  # inverted, but not readable inverted either
    finish_row(row, 30.0, 0, score=8.0, threshold=2.986, inverted=True, inverse_score=3.004)
    assert "(score 8.0, inverted 3.00 > 2.99)" in row["message"]
