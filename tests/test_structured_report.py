"""The DICOM Structured Report (:mod:`boneage.structured_report`) and the Secondary Capture, checked with dciodvfy
(Debian's dicom3tools, which .ci/run installs) against the standard's modules."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import dciodvfy_errors, make_tiny_model, synthetic_radiograph, write_dicom

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from boneage.render import render_report  # noqa: E402
from boneage.secondary_capture import report_dataset  # noqa: E402
from boneage.structured_report import device_uid, sr_dataset  # noqa: E402

MODEL = {"name": "tiny", "boneage_version": "0.1.0", "weights_sha256": "ef" * 32}
ROW = {
    "id": "d",
    "status": "ok",
    "bone_age_months": 131.44,
    "lower_months": 118.0,
    "upper_months": 143.0,
    "bone_age": "10y 11m",
    "stage": "x",
    "male": False,
    "chronological_age_months": 120.0,
    "ba_minus_ca_months": 11.44,
    "sds": 0.912,
    "call": "advanced",
    "message": "",
}


def _source(path: Path, **tags: object) -> Path:
    from pydicom.uid import generate_uid

    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(), "PatientSex": "F"}
    return write_dicom(path, synthetic_radiograph(120, size=96).astype("uint16") * 16, **{**study, **tags})


def _content(report) -> dict[str, tuple[float, str]]:
    """Every numeric content item's concept name -> (value, unit code), anywhere in the tree."""
    found = {}

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                found[item.ConceptNameCodeSequence[0].CodeValue] = (
                    float(value.NumericValue),
                    value.MeasurementUnitsCodeSequence[0].CodeValue,
                )
            walk(getattr(item, "ContentSequence", []))

    walk(report.ContentSequence)
    return found


def test_the_sr_is_in_the_source_study_and_conforms(tmp_path):
    source = _source(tmp_path / "d.dcm", PatientID="MRN-1", PatientName="Doe^Ann", AccessionNumber="A7")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    report = sr_dataset(header, ROW, MODEL)
    assert "StudyID" not in header and "StudyID" in report  # Type 2, empty in the report; the source untouched
    target = tmp_path / "sr.dcm"
    report.save_as(target, enforce_file_format=True)
    assert dciodvfy_errors(target) == []
    again = pydicom.dcmread(target)
    assert again.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert again.StudyInstanceUID == header.StudyInstanceUID and again.PatientID == "MRN-1"
    assert again.SeriesInstanceUID != header.SeriesInstanceUID and again.AccessionNumber == "A7"
    assert again.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert again.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert again.CompletionFlag == "COMPLETE" and again.VerificationFlag == "UNVERIFIED"
    numbers = _content(again)
    assert numbers["85151-9"] == (131.4, "mo")  # LOINC XR Bone age, in months
    assert numbers["BA-L90"] == (118.0, "mo") and numbers["BA-U90"] == (143.0, "mo")
    assert numbers["30525-0"] == (120.0, "mo") and numbers["BA-CA"] == (11.4, "mo")
    assert numbers["121416"][0] == pytest.approx(0.91)  # the SDS
    assert numbers["371885007"][0] == pytest.approx(13.4) and numbers["371886008"][0] == pytest.approx(11.6)
    text = str(again)
    assert "371879000" in text  # the call: Abnormally High (advanced)
    assert header.SOPInstanceUID in text  # the source image referenced
    assert device_uid(MODEL) in text and device_uid(MODEL) == device_uid(dict(MODEL))  # the observer device


def test_without_an_age_only_the_bone_age_and_a_row_without_one_is_refused(tmp_path):
    header = pydicom.dcmread(_source(tmp_path / "d.dcm"), stop_before_pixels=True)
    row = {**ROW, "chronological_age_months": None, "ba_minus_ca_months": None, "sds": None, "call": None}
    assert set(_content(sr_dataset(header, row, MODEL))) == {"85151-9", "BA-L90", "BA-U90", "371885007", "371886008"}
    with pytest.raises(ValueError, match="no bone age"):
        sr_dataset(header, {"id": "x", "status": "not assessable"}, MODEL)
    del header.SOPInstanceUID
    with pytest.raises(ValueError, match="no SOPInstanceUID"):
        sr_dataset(header, ROW, MODEL)


def test_the_secondary_capture_conforms_and_keeps_the_laterality(tmp_path):
    for laterality, tags in (("L", {"Laterality": "L"}), ("R", {"ImageLaterality": "R"}), ("", {})):
        source = _source(tmp_path / "s.dcm", PatientID="P", **tags)
        header = pydicom.dcmread(source, stop_before_pixels=True)
        report = report_dataset(header, render_report(source, {**ROW, "path": str(source)}, "m"), ROW, "m")
        target = tmp_path / "sc.dcm"
        report.save_as(target, enforce_file_format=True)
        assert dciodvfy_errors(target) == [], tags
        assert report.get("Laterality") == laterality


def test_predict_writes_a_structured_report_for_each_dicom_with_a_bone_age(tmp_path, capsys):
    from PIL import Image

    from boneage.cli import main

    model = make_tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    source = _source(tmp_path / "in" / "hand.dcm", PatientAge="010Y")
    Image.fromarray(synthetic_radiograph(90)).save(tmp_path / "in" / "plain.png")
    code = main(
        ["predict", str(tmp_path / "in"), "--model", str(model), "--sex", "F", "--quiet"]
        + ["--output", str(tmp_path / "p.csv"), "--sr-report", str(tmp_path / "sr")]
    )
    assert code == 0 and "wrote 1 DICOM structured report(s)" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "sr").iterdir()] == ["hand_sr.dcm"]  # the PNG has no study
    report = pydicom.dcmread(tmp_path / "sr" / "hand_sr.dcm")
    predicted = pd.read_csv(tmp_path / "p.csv").set_index("id").loc["hand"]
    assert _content(report)["85151-9"][0] == round(predicted["bone_age_months"], 1)
    assert _content(report)["30525-0"][0] == 120.0
    assert report.StudyInstanceUID == pydicom.dcmread(source).StudyInstanceUID
    assert dciodvfy_errors(tmp_path / "sr" / "hand_sr.dcm") == []
