"""The PDF report to file (:mod:`boneage.report_pdf`): paper size, searchable text, identification, the chart."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pandas as pd
import pytest
from PIL import Image

from tests.helpers import dciodvfy_errors, make_tiny_model, synthetic_radiograph, write_dicom

pytest.importorskip("reportlab")
pypdf = pytest.importorskip("pypdf")

from boneage.inputs import identification  # noqa: E402
from boneage.model_folder import model_identity  # noqa: E402
from boneage.report_pdf import NOT_GIVEN, PAPERS, build_pdf  # noqa: E402

MODEL = {"name": "tiny", "boneage_version": "0.1.0", "weights_sha256": "ab" * 32}
ROW = {
    "id": "hand",
    "status": "ok",
    "bone_age_months": 131.4,
    "lower_months": 118.0,
    "upper_months": 143.0,
    "bone_age": "10 y 11 m",
    "stage": "late childhood",
    "male": False,
    "chronological_age_months": 120.0,
    "ba_minus_ca_months": 11.4,
    "sds": 0.9,
    "call": "normal",
    "message": "",
}


def _pages(content: bytes) -> list:
    return pypdf.PdfReader(io.BytesIO(content)).pages


def _text(content: bytes) -> str:
    return " ".join(" ".join(page.extract_text().split()) for page in _pages(content))


@pytest.mark.parametrize("paper", ["a4", "letter"])
def test_one_page_of_the_paper_asked_for_with_searchable_text(tmp_path, paper):
    path = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(120, size=200)).save(path)
    at = datetime(2026, 3, 4, 10, 30, tzinfo=timezone.utc)
    content = build_pdf(path, {**ROW, "path": str(path)}, MODEL, {"patient_id": "P-123"}, paper, analysed_at=at)
    pages = _pages(content)
    assert len(pages) == 1
    box = pages[0].mediabox
    assert (float(box.width), float(box.height)) == pytest.approx(PAPERS[paper], abs=0.5)
    assert (round(float(box.width)), round(float(box.height))) == {"a4": (595, 842), "letter": (612, 792)}[paper]
    text = _text(content)
    for expected in ("P-123", "2026-03-04", "Bone age 131.4 months", "90% interval 118-143 months", "SDS +0.90"):
        assert expected in text
    assert "Greulich & Pyle (1959), Brush Foundation" in text  # the method, cited
    assert "tiny" in text and "abababababababab" in text  # the model and its weights' checksum
    assert "Chronological age (years)" in text and "Bone age (years)" in text  # the chart's axis titles
    assert "normal range" in text and "this child" in text  # and its legend
    assert "Reviewed by:" in text and "Date:" in text and "not a medical device" in text
    assert text.count(NOT_GIVEN) >= 4  # name, birth date, accession number, study date, study UID: not vanished
    assert "hand.png" in text  # the image, by file name when it is not DICOM


def test_identification_from_the_dicom_header_and_the_given_fields_win(tmp_path):
    path = write_dicom(
        tmp_path / "d.dcm",
        synthetic_radiograph(100, size=64).astype("uint16") * 16,
        PatientName="Doe^Jane^Q",
        PatientID="MRN-77",
        PatientBirthDate="20150102",
        PatientSex="F",
        AccessionNumber="ACC-9",
        StudyDate="20250607",
        StudyInstanceUID="1.2.3.4",
    )
    found = identification(path, False)
    assert found["patient_name"] == "Doe, Jane Q" and found["patient_id"] == "MRN-77"
    assert found["birth_date"] == "2015-01-02" and found["study_date"] == "2025-06-07" and found["sex"] == "F"
    assert found["accession_number"] == "ACC-9" and found["study_uid"] == "1.2.3.4"
    assert found["image"] == pydicom_sop(path)
    assert identification(path, False, {"patient_id": "OTHER", "birth_date": ""})["patient_id"] == "OTHER"
    bare = identification(tmp_path / "x.png", True)
    assert bare["patient_id"] is None and bare["image"] == "x.png" and bare["sex"] == "M"


def pydicom_sop(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_names_beyond_latin_1_print_as_written(tmp_path):
    pytest.importorskip("matplotlib")  # its DejaVu Sans; the built-in Helvetica has Latin-1 only
    path = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(120, size=80)).save(path)
    text = _text(
        build_pdf(path, {**ROW, "path": str(path)}, MODEL, {"patient_name": "Żółć^Łukasz", "patient_id": "Ж-1"})
    )
    assert "Żółć, Łukasz" in text and "Ж-1" in text


def test_a_refused_image_gets_a_page_without_a_chart(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(synthetic_radiograph(120, size=80)).save(path)
    row = {"id": "flat", "path": str(path), "status": "not assessable", "male": True, "message": "x: unlike a hand"}
    text = _text(build_pdf(path, row, MODEL))
    assert "NOT ASSESSABLE" in text and "No chart" in text and "not given" in text


def test_bad_paper_is_refused(tmp_path):
    with pytest.raises(ValueError, match="paper: expected one of a4, letter"):
        build_pdf(tmp_path / "x.png", ROW, MODEL, paper="a3")


def test_model_identity_reads_the_folder(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    identity = model_identity(folder)
    assert identity["name"] == "m" and len(identity["weights_sha256"]) == 64
    assert model_identity(tmp_path / "bare.onnx") == {"name": "bare", "boneage_version": None, "weights_sha256": None}


def test_predict_pdf_report_takes_identification_from_metadata(tmp_path, capsys):
    from boneage.cli import main

    model = make_tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_radiograph(90)).save(tmp_path / "in" / "plain.png")
    metadata = tmp_path / "meta.csv"
    pd.DataFrame(
        [{"id": "plain", "male": "F", "chronological_age_months": 96, "patient_id": "CSV-42", "study_date": "20250101"}]
    ).to_csv(metadata, index=False)
    code = main(
        ["predict", str(tmp_path / "in"), "--model", str(model), "--metadata", str(metadata), "--quiet"]
        + ["--output", str(tmp_path / "p.csv"), "--pdf-report", str(tmp_path / "pages"), "--paper", "letter"]
    )
    assert code == 0 and "wrote 1 PDF report(s)" in capsys.readouterr().out
    content = (tmp_path / "pages" / "plain_report.pdf").read_bytes()
    predicted = pd.read_csv(tmp_path / "p.csv").loc[0, "bone_age_months"]
    text = _text(content)
    assert "CSV-42" in text and "2025-01-01" in text and f"Bone age {predicted:.1f} months" in text
    assert round(float(_pages(content)[0].mediabox.height)) == 792


def test_the_page_as_an_encapsulated_pdf_files_into_the_study_and_conforms(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    from boneage.report_pdf import ENCAPSULATED_PDF, pdf_dataset

    study = generate_uid()
    path = write_dicom(
        tmp_path / "d.dcm",
        synthetic_radiograph(100, size=64).astype("uint16") * 16,
        PatientID="MRN-77",
        PatientSex="F",
        StudyInstanceUID=study,
        SeriesInstanceUID=generate_uid(),
    )
    header = pydicom.dcmread(path, stop_before_pixels=True)
    page = build_pdf(path, {**ROW, "path": str(path)}, MODEL)
    report = pdf_dataset(header, page, "tiny")
    assert report.SOPClassUID == ENCAPSULATED_PDF and report.StudyInstanceUID == study and report.PatientID == "MRN-77"
    assert report.SourceInstanceSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert report.SOPInstanceUID == pdf_dataset(header, page, "tiny").SOPInstanceUID  # the same film, the same UID
    target = tmp_path / "pdf.dcm"
    report.save_as(target, enforce_file_format=True)
    again = pydicom.dcmread(target)
    assert "MRN-77" in _text(bytes(again.EncapsulatedDocument)[: again.EncapsulatedDocumentLength])
    assert dciodvfy_errors(target) == []
