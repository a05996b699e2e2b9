from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.cli import main
from boneage.followup import follow_up, overall_change
from boneage.render import LIGHT
from boneage.rows import PREDICTION_COLUMNS


def visit(image_id: str, age: float, bone_age: float, half_width: float | None = 10.0, **extra) -> dict:
    row = {key: None for key in PREDICTION_COLUMNS}
    row.update(id=image_id, male=False, status="ok", chronological_age_months=age, bone_age_months=bone_age)
    if half_width is not None:
        row.update(lower_months=bone_age - half_width, upper_months=bone_age + half_width)
    row.update(extra)
    return row


def test_visits_in_age_order_with_the_change_since_the_one_before():
    rows = [visit("c", 120, 150), visit("a", 96, 100), visit("b", 108, 112)]
    course, skipped = follow_up(rows)
    assert [v["id"] for v in course] == ["a", "b", "c"] and skipped == []
    assert course[0]["age_change_months"] is None  # the first visit has nothing before it
    b, c = course[1], course[2]
    assert (b["age_change_months"], b["bone_age_change_months"], b["change_ratio"]) == (12.0, 12.0, 1.0)
    assert b["change_error_months"] == pytest.approx(math.hypot(10, 10), abs=0.01)
    assert b["change_call"] == "not distinguishable from age"
    assert c["bone_age_change_months"] == 38.0 and c["change_call"] == "faster than age"  # 26 months past 14.1
    overall = overall_change(course)
    assert (overall["age_change_months"], overall["bone_age_change_months"]) == (24.0, 50.0)


def test_a_change_is_called_only_beyond_both_intervals_combined():
    def call(bone_age_change: float, half_width: float | None = 10.0) -> str:
        course, _ = follow_up([visit("a", 100, 100, half_width), visit("b", 124, 100 + bone_age_change, half_width)])
        return course[1]["change_call"]

    threshold = math.hypot(10, 10)  # 14.14 months
    assert call(24 + threshold + 0.1) == "faster than age" and call(24 + threshold - 0.1) != "faster than age"
    assert call(24 - threshold - 0.1) == "slower than age" and call(24 - threshold + 0.1) != "slower than age"
    assert call(60, half_width=None) == "no interval: not judged"
    same_day, _ = follow_up([visit("a", 100, 100), visit("b", 100, 110)])
    assert same_day[1]["change_ratio"] is None and same_day[1]["change_call"] == "same age: no change to judge"


def test_rows_without_an_age_or_a_bone_age_are_left_out_and_mixed_sexes_refused():
    rows = [
        visit("a", 96, 100),
        visit("b", None, 110),
        {**visit("c", 100, 100), "status": "not assessable", "bone_age_months": None},
        visit("d", 120, 130),
    ]
    course, skipped = follow_up(rows)
    assert [v["id"] for v in course] == ["a", "d"]
    assert skipped == ["b: no chronological age", "c: no bone age (not assessable)"]
    with pytest.raises(ValueError, match=r"not one child's: they have both sexes \(a \(F\), e \(M\)\)"):
        follow_up([visit("a", 96, 100), visit("e", 108, 112, male=True)])
    edited = follow_up([visit("a", 96, 100, male="F"), visit("b", 108, 112, male="False")])[0]  # M/F by hand
    assert [v["male"] for v in edited] == [False, False]
    with pytest.raises(ValueError, match="no row has both a bone age and a chronological age"):
        follow_up([visit("b", None, 110)])


def test_boneage_chart_draws_the_course_and_writes_the_table(tmp_path, capsys):
    predictions = tmp_path / "child.csv"
    rows = [visit("v1", 96, 100), visit("v2", 108, 125), visit("v3", 114, 150), visit("v4", None, 150)]
    pd.DataFrame(rows, columns=PREDICTION_COLUMNS).to_csv(predictions, index=False)  # as boneage predict writes it
    chart, table = tmp_path / "course.png", tmp_path / "course.csv"
    assert main(["chart", str(predictions), "--output", str(chart), "--table", str(table), "--size", "400"]) == 0
    out, err = capsys.readouterr()
    assert "v3: age 9y 6m, bone age 150.0 (140-160)" in out and "first to last visit: +18.0 months of age" in out
    assert "left out: v4: no chronological age" in err
    image = np.asarray(Image.open(chart))
    course_colour = (image == LIGHT["course"]).all(axis=-1).sum()  # the line joining the visits, on a light chart
    assert image.shape == (400, 400, 3) and course_colour > 20 and (image[0, 0] == LIGHT["background"]).all()
    written = pd.read_csv(table, dtype={"id": str})
    assert written["id"].tolist() == ["v1", "v2", "v3"] and written["change_call"].tolist()[1:] == [
        "not distinguishable from age",
        "faster than age",
    ]
    as_json = tmp_path / "child.json"  # the JSON output reads the same
    as_json.write_text(json.dumps({"model": {}, "predictions": rows}))
    assert main(["chart", str(as_json), "--output", str(chart), "--table", str(table)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(table, dtype={"id": str}), written, check_dtype=False)
    assert main(["chart", str(tmp_path / "absent.csv"), "--output", str(chart)]) == 2
    assert "absent.csv: file not found" in capsys.readouterr().err


def test_boneage_chart_reads_a_childs_studies_straight_from_dicom(tmp_path, capsys):
    from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom

    export = tmp_path / "cd"  # one child's studies at 6, 7 and 8 years, ages from the birth and study dates
    export.mkdir()
    for k, (age, study) in enumerate(((72, "20160301"), (96, "20180301"), (84, "20170301"))):
        pixels = synthetic_radiograph(age, seed=k).astype("uint16") * 16
        write_dicom(export / f"IM{k:06d}", pixels, PatientSex="M", PatientBirthDate="20100301", StudyDate=study)
    rows, chart = tmp_path / "rows.csv", tmp_path / "course.png"
    model = make_tiny_model(tmp_path / "model")
    args = ["chart", str(export), "--model", str(model), "--predictions-out", str(rows), "--output", str(chart)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {rows}: 3 of 3 predicted" in out and "wrote" in out and chart.is_file()
    ages = [line.split(": age ")[1].split(",")[0] for line in out.splitlines() if ": age " in line]
    assert ages == ["6y 0m", "7y 0m", "8y 0m"]  # in order of age, not of file name
    assert main(["chart", str(rows), "--output", str(chart)]) == 0  # the rows it wrote chart the same
    assert [line for line in capsys.readouterr().out.splitlines() if ": age " in line] == [
        line for line in out.splitlines() if ": age " in line
    ]
