from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from boneage.clinical import compare_ages
from boneage.predict import predict_paths
from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from boneage.serve import create_app  # noqa: E402


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def client(tiny_model):
    return TestClient(create_app(tiny_model, max_upload_bytes=200_000), raise_server_exceptions=False)


HAND = png_bytes(synthetic_radiograph(100, size=96))


def test_health_names_the_model(client):
    body = client.get("/api/v1/health").json()
    assert body["status"] == "ok" and body["model"]["name"] == "model" and len(body["model"]["weights_sha256"]) == 64
    assert body["model"]["tta_views"] == [[0.0, 1.0]] and body["model"]["tta"] == ""  # one pass of the image as it is


def test_predict_report_matches_the_cli_path(client, model_dir, tmp_path):
    response = client.post(
        "/api/v1/predict",
        files={"file": ("hand.png", HAND, "image/png")},
        data={"sex": "M", "chronological_age_months": "96"},
    )
    assert response.status_code == 200
    report = response.json()
    path = tmp_path / "hand.png"
    path.write_bytes(HAND)
    cli = predict_paths([path], tmp_path / "p.csv", model_dir=model_dir, sex="M", progress=False).iloc[0]
    assert report["bone_age_months"] == pytest.approx(cli["bone_age_months"])
    assert report["stage"] == cli["stage"] and report["status"] == "ok"
    expected = compare_ages(report["bone_age_months"], 96.0, male=True)
    assert report["sds"] == pytest.approx(expected["sds"], abs=0.01) and report["call"] == expected["call"]
    assert report["chronological_age_months"] == 96.0 and report["sex"] == "M" and report["sex_source"] == "form"
    for key in ("lower_months", "upper_months", "bone_age", "model"):
        assert key in report
    assert "path" not in report and "image_png" not in report  # no Grad-CAM unless asked
    band = report["reference_band"]  # the chart's normal range, for the sex given
    assert band["ages_months"][-1] == 204 and band["upper_months"][-1] == pytest.approx(204 + 2 * 13.05)
    no_age = client.post("/api/v1/predict", files={"file": ("hand.png", HAND, "image/png")}, data={"sex": "F"})
    assert no_age.status_code == 200 and no_age.json()["reference_band"] is None


def test_a_tiff_upload_reads_like_the_same_png(client):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(HAND)).save(buffer, format="TIFF")  # scanned films often come as TIFF
    ages = [
        client.post("/api/v1/predict", files={"file": (name, data, kind)}, data={"sex": "F"}).json()
        for name, data, kind in (("h.png", HAND, "image/png"), ("h.tif", buffer.getvalue(), "image/tiff"))
    ]
    assert ages[1]["status"] == "ok" and ages[1]["bone_age_months"] == pytest.approx(ages[0]["bone_age_months"])


def test_the_readers_bone_age_comes_back_beside_the_models(tmp_path):
    from boneage.uncertainty import store_interval

    model_dir = make_tiny_model(tmp_path / "calibrated")
    store_interval(model_dir, {"half_width_months": 10.0, "coverage_nominal": 0.9})
    calibrated = TestClient(create_app(model_dir), raise_server_exceptions=False)

    def post(reading: str) -> dict:
        response = calibrated.post(
            "/api/v1/predict",
            files={"file": ("h.png", HAND, "image/png")},
            data={"sex": "F", "chronological_age_months": "96", "reader_bone_age_months": reading},
        )
        return {"status_code": response.status_code, **response.json()}

    model = post("")["bone_age_months"]
    near, far = post(f"{model + 2:.2f}"), post(f"{model + 30:.2f}")
    assert near["reader_minus_model_months"] == pytest.approx(2.0, abs=0.01) and near["reading_note"] == ""
    assert far["reader_minus_model_months"] == pytest.approx(30.0, abs=0.01)
    assert far["reading_note"].startswith(f"the reader's {model + 30:.2f} months is outside the model's 90% interval")
    assert far["message"] == "; ".join(note for note in (far["clinical_note"], far["reading_note"]) if note)
    assert far["sds"] == near["sds"]  # the SDS is the model's bone age against the age, whatever the reading
    bad = post("twelve")
    assert bad["status_code"] == 422 and "reader_bone_age_months" in bad["detail"]


def test_gradcam_images_are_returned_as_png(client):
    response = client.post(
        "/api/v1/predict", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "F", "gradcam": "true"}
    )
    assert response.status_code == 200
    import base64

    for key in ("image_png", "gradcam_png"):
        image = Image.open(io.BytesIO(base64.b64decode(response.json()[key])))
        assert image.size == (96, 96) and image.mode == "RGB"


def test_dicom_tags_give_sex_and_age(client, tmp_path):
    path = write_dicom(
        tmp_path / "d.dcm", synthetic_radiograph(90).astype("uint16") * 16, PatientSex="F", PatientAge="008Y"
    )
    report = client.post("/api/v1/predict", files={"file": ("d.dcm", path.read_bytes(), "application/dicom")}).json()
    assert report["sex"] == "F" and report["sex_source"] == "dicom"
    assert report["chronological_age_months"] == 96.0 and report["age_source"] == "dicom" and report["sds"] is not None
    override = client.post(
        "/api/v1/predict", files={"file": ("d.dcm", path.read_bytes(), "application/dicom")}, data={"sex": "M"}
    ).json()
    assert override["sex"] == "M" and override["sex_source"] == "form"


def test_a_pdf_report_for_any_upload(client):
    response = client.post(
        "/api/v1/report.pdf",
        files={"file": ("h.png", HAND, "image/png")},
        data={"sex": "F", "chronological_age_months": "96"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"
    assert response.content.startswith(b"%PDF-") and len(response.content) > 5000
    assert "bone-age-report.pdf" in response.headers["content-disposition"]
    pypdf = pytest.importorskip("pypdf")
    page = pypdf.PdfReader(io.BytesIO(response.content)).pages[0]
    assert (round(float(page.mediabox.width)), round(float(page.mediabox.height))) == (595, 842)  # A4
    text = " ".join(page.extract_text().split())
    assert "h.png" in text and "Bone age" in text and "not given" in text
    letter = client.post(
        "/api/v1/report.pdf",
        files={"file": ("h.png", HAND, "image/png")},
        data={"sex": "F", "paper": "letter", "patient_id": "FORM-7", "accession_number": "A-1"},
    )
    page = pypdf.PdfReader(io.BytesIO(letter.content)).pages[0]
    assert round(float(page.mediabox.height)) == 792
    assert "FORM-7" in page.extract_text() and "A-1" in page.extract_text()
    bad = client.post(
        "/api/v1/report.pdf", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "F", "paper": "a3"}
    )
    assert bad.status_code == 422 and "paper" in bad.json()["detail"]
    no_sex = client.post("/api/v1/report.pdf", files={"file": ("h.png", HAND, "image/png")})
    assert no_sex.status_code == 422 and "sex unknown" in no_sex.json()["detail"]


def test_predict_as_a_fhir_observation(client):
    response = client.post(
        "/api/v1/predict?format=fhir",
        files={"file": ("h.png", HAND, "image/png")},
        data={"sex": "F", "chronological_age_months": "96", "patient_id": "FORM-3"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/fhir+json"
    resource = response.json()
    assert resource["resourceType"] == "Observation" and resource["code"]["coding"][0]["code"] == "85151-9"
    assert resource["subject"]["identifier"]["value"] == "FORM-3"
    plain = client.post(
        "/api/v1/predict",
        files={"file": ("h.png", HAND, "image/png")},
        data={"sex": "F", "chronological_age_months": "96"},
    ).json()
    assert resource["valueQuantity"]["value"] == round(plain["bone_age_months"], 1)
    fhir = pytest.importorskip("fhir.resources.R4B.observation")
    fhir.Observation.model_validate(resource)
    bad = client.post("/api/v1/predict?format=xml", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "F"})
    assert bad.status_code == 422 and "format" in bad.json()["detail"]


def test_a_structured_report_of_a_dicom_upload(client, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    pixels = synthetic_radiograph(90).astype("uint16") * 16
    bare = write_dicom(tmp_path / "bare.dcm", pixels, PatientSex="F", PatientAge="008Y")
    refused = client.post("/api/v1/report.sr.dcm", files={"file": ("d.dcm", bare.read_bytes(), "application/dicom")})
    assert refused.status_code == 422 and "no StudyInstanceUID, SeriesInstanceUID" in refused.json()["detail"]
    uids = {"StudyInstanceUID": "1.2.3.4", "SeriesInstanceUID": "1.2.3.4.5"}
    path = write_dicom(tmp_path / "d.dcm", pixels, PatientSex="F", PatientAge="008Y", **uids)
    response = client.post("/api/v1/report.sr.dcm", files={"file": ("d.dcm", path.read_bytes(), "application/dicom")})
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    report = pydicom.dcmread(io.BytesIO(response.content))
    assert report.Modality == "SR" and report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert report.StudyInstanceUID == "1.2.3.4"
    png = client.post("/api/v1/report.sr.dcm", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "F"})
    assert png.status_code == 415 and "DICOM upload" in png.json()["detail"]


def test_dicom_report_files_into_the_upload_study(client, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    study = generate_uid()
    path = write_dicom(
        tmp_path / "d.dcm",
        synthetic_radiograph(90).astype("uint16") * 16,
        PatientSex="F",
        PatientAge="008Y",
        PatientID="P-9",
        StudyInstanceUID=study,
    )
    upload = {"file": ("d.dcm", path.read_bytes(), "application/dicom")}
    response = client.post("/api/v1/report.dcm", files=upload)
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    report = pydicom.dcmread(io.BytesIO(response.content))
    predicted = client.post("/api/v1/predict", files=upload).json()
    assert report.StudyInstanceUID == study and report.PatientID == "P-9" and report.Modality == "OT"
    assert f"Bone age {predicted['bone_age_months']:.1f} months" in report.ImageComments
    assert f"SDS {predicted['sds']:+.2f}" in report.ImageComments
    png = client.post("/api/v1/report.dcm", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "M"})
    assert png.status_code == 415 and "DICOM upload" in png.json()["detail"]
    unknown = write_dicom(tmp_path / "u.dcm", synthetic_radiograph(90).astype("uint16"))
    no_sex = client.post("/api/v1/report.dcm", files={"file": ("u.dcm", unknown.read_bytes(), "application/dicom")})
    assert no_sex.status_code == 422 and "sex unknown" in no_sex.json()["detail"]


def big_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")  # 1-bit: a small file with very many pixels
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("files", "data", "status", "message"),
    [
        ({"file": ("x.txt", b"just some text, not an image", "text/plain")}, {"sex": "F"}, 415, "unsupported file"),
        ({"file": ("x.png", HAND[:300], "image/png")}, {"sex": "F"}, 400, "cannot decode"),
        ({"file": ("x.png", b"", "image/png")}, {"sex": "F"}, 400, "empty upload"),
        ({"file": ("x.png", HAND, "image/png")}, {"sex": "X"}, 422, "sex: expected M or F"),
        ({"file": ("x.png", HAND, "image/png")}, {}, 422, "sex unknown"),
        ({"file": ("x.png", HAND, "image/png")}, {"sex": "F", "chronological_age_months": "ten"}, 422, "a number"),
        ({"file": ("x.png", HAND, "image/png")}, {"sex": "F", "chronological_age_months": "300"}, 422, "between 0"),
        ({"file": ("x.png", b"\x89PNG" + bytes(300_000), "image/png")}, {"sex": "F"}, 413, "too large"),
        ({"file": ("x.png", big_png(8000, 7000), "image/png")}, {"sex": "F"}, 413, "exceeds the limit"),
        ({}, {"sex": "F"}, 422, "file"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(client, files, data, status, message):
    response = client.post("/api/v1/predict", files=files, data=data)
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"]) and "Traceback" not in response.text
    assert client.get("/api/v1/health").status_code == 200


def test_unexpected_failure_is_a_500_without_a_stack_trace(model_dir, monkeypatch):
    app = create_app(model_dir)
    client = TestClient(app, raise_server_exceptions=False)

    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.service, "predict", explode)
    response = client.post("/api/v1/predict", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "F"})
    assert response.status_code == 500 and "secret" not in response.text and "Traceback" not in response.text
    assert client.get("/api/v1/health").status_code == 200


def test_logs_hold_no_patient_identifiers(client, tmp_path, caplog):
    path = write_dicom(
        tmp_path / "Jane_Doe.dcm",
        synthetic_radiograph(90).astype("uint16") * 16,
        PatientName="Doe^Jane",
        PatientID="MRN123456",
        PatientSex="F",
    )
    with caplog.at_level(logging.DEBUG):
        client.post("/api/v1/predict", files={"file": ("Jane_Doe.dcm", path.read_bytes(), "application/dicom")})
        client.post("/api/v1/predict", files={"file": ("Jane_Doe.png", HAND[:200], "image/png")}, data={"sex": "F"})
    assert "request" in caplog.text  # the requests were logged ...
    for identifier in ("Jane", "Doe", "MRN123456"):
        assert identifier not in caplog.text  # ... without who they were about


def test_non_hand_upload_is_not_assessable_with_the_shipped_model():
    client = TestClient(create_app(), raise_server_exceptions=False)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    response = client.post(
        "/api/v1/predict", files={"file": ("n.png", png_bytes(noise), "image/png")}, data={"sex": "M"}
    )
    assert response.status_code == 422 and "not assessable" in response.json()["detail"]


def test_dashboard_page_and_openapi_schema(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "/api/v1/predict" in page.text
    schema = client.get("/openapi.json").json()
    assert "/api/v1/predict" in schema["paths"] and "/api/v1/health" in schema["paths"]


def test_onnx_backend_serves_without_gradcam_but_shows_the_radiograph(tiny_onnx_model):
    client = TestClient(create_app(tiny_onnx_model, backend="onnx"), raise_server_exceptions=False)
    assert client.get("/api/v1/health").json()["model"]["backend"] == "onnx"
    report = client.post(
        "/api/v1/predict", files={"file": ("h.png", HAND, "image/png")}, data={"sex": "F", "gradcam": "true"}
    ).json()
    assert report["status"] == "ok" and "image_png" in report and "gradcam_png" not in report
    assert "PyTorch" in report["gradcam_note"]
