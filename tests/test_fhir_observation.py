"""The bone age as a FHIR R4 Observation (:mod:`boneage.fhir_observation`), validated against the spec's models."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import pytest
from PIL import Image

from boneage.fhir_observation import observation
from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom

MODEL = {"name": "tiny", "boneage_version": "0.1.0", "weights_sha256": "cd" * 32}
ROW = {
    "id": "d",
    "status": "ok",
    "bone_age_months": 131.44,
    "lower_months": 118.0,
    "upper_months": 143.0,
    "male": False,
    "chronological_age_months": 120.0,
    "ba_minus_ca_months": 11.44,
    "sds": 0.912,
    "call": "normal",
    "message": "",
}


def validate(resource: dict) -> None:
    """Parse with the spec's models (fhir.resources: R4B, whose Observation and Device carry R4's elements)."""
    pytest.importorskip("fhir.resources")
    from fhir.resources.R4B.observation import Observation

    parsed = json.loads(Observation.model_validate(resource).model_dump_json())
    assert parsed["resourceType"] == "Observation" and parsed["valueQuantity"]["code"] == "mo"


def test_the_validator_catches_what_the_spec_forbids():
    pytest.importorskip("fhir.resources")
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        validate({**observation({**ROW, "path": ""}, MODEL), "boneAge": 131})  # not an Observation element
    with pytest.raises(ValidationError):
        validate({**observation({**ROW, "path": ""}, MODEL), "valueQuantity": {"value": "ten"}})


def test_a_dicom_reading_as_an_observation(tmp_path):
    path = write_dicom(
        tmp_path / "d.dcm",
        synthetic_radiograph(100, size=64).astype("uint16") * 16,
        PatientID="MRN-5",
        PatientName="Doe^Ann",
        StudyDate="20250607",
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
    )
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    resource = observation({**ROW, "path": str(path)}, MODEL, analysed_at=at)
    validate(resource)
    assert resource["code"]["coding"][0] == {"system": "http://loinc.org", "code": "85151-9", "display": "XR Bone age"}
    assert resource["valueQuantity"] == {
        "value": 131.4,
        "unit": "mo",
        "system": "http://unitsofmeasure.org",
        "code": "mo",
    }
    assert resource["status"] == "preliminary" and resource["issued"] == "2026-01-02T03:04:05+00:00"
    assert resource["subject"] == {"type": "Patient", "identifier": {"value": "MRN-5"}, "display": "Doe, Ann"}
    assert resource["effectiveDateTime"] == "2025-06-07"
    assert resource["derivedFrom"][0]["identifier"]["value"] == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    assert resource["interpretation"][0]["coding"][0]["code"] == "N"
    components = {c["code"]["text"]: c["valueQuantity"]["value"] for c in resource["component"]}
    assert components["Bone age, 90% interval lower limit"] == 118.0
    assert components["Bone age, 90% interval upper limit"] == 143.0
    assert components["Chronological age"] == 120.0 and components["Bone age minus chronological age"] == 11.4
    low, high = resource["referenceRange"][0]["low"]["value"], resource["referenceRange"][0]["high"]["value"]
    assert low < 120 < high and high - 120 == pytest.approx(120 - low, abs=0.1)
    device = resource["contained"][0]
    assert resource["device"] == {"reference": "#model"} and device["identifier"][0]["value"] == "cd" * 32


@pytest.mark.parametrize(("call", "code"), [("delayed", "L"), ("advanced", "H"), (None, None)])
def test_the_call_is_a_coded_interpretation_and_unknowns_are_left_out(call, code):
    row = {**ROW, "call": call, "path": ""}
    if call is None:  # no age: no age components, no reference range, no interpretation, no subject
        row.update(chronological_age_months=None, ba_minus_ca_months=None, sds=None)
    resource = observation(row, {"name": "bare"})
    validate(resource)
    if code is None:
        assert "interpretation" not in resource and "referenceRange" not in resource
        assert "subject" not in resource and "effectiveDateTime" not in resource and "derivedFrom" not in resource
        assert [c["code"]["text"] for c in resource["component"]][-1] == "Bone age, 90% interval upper limit"
    else:
        assert resource["interpretation"][0]["coding"][0]["code"] == code


def test_a_row_without_a_bone_age_is_refused():
    with pytest.raises(ValueError, match="no bone age"):
        observation({"id": "x", "status": "not assessable"}, MODEL)


def test_predict_writes_one_observation_per_predicted_row(tmp_path, capsys):
    from boneage.cli import main

    model = make_tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_radiograph(90)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    metadata = tmp_path / "m.csv"
    pd.DataFrame([{"id": "a", "male": "M", "chronological_age_months": 100, "patient_id": "P9"}]).to_csv(metadata)
    code = main(
        ["predict", str(tmp_path / "in"), "--model", str(model), "--metadata", str(metadata), "--quiet"]
        + ["--output", str(tmp_path / "p.csv"), "--fhir", str(tmp_path / "fhir")]
    )
    assert code == 3 and "wrote 1 FHIR Observation(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fhir").iterdir()) == ["a.fhir.json"]
    resource = json.loads((tmp_path / "fhir" / "a.fhir.json").read_text())
    validate(resource)
    predicted = pd.read_csv(tmp_path / "p.csv", dtype={"id": str}).set_index("id").loc["a", "bone_age_months"]
    assert (
        resource["valueQuantity"]["value"] == round(predicted, 1) and resource["subject"]["identifier"]["value"] == "P9"
    )
    assert resource["contained"][0]["deviceName"][0]["name"] == "boneage model model"
