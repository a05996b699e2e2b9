"""The bone age as a FHIR R4 Observation (JSON) that other systems can read: LOINC-coded, in months (UCUM ``mo``),
with the 90% interval, the chronological age, BA - CA and the SDS as components, the normal range for the child's age as
the reference range, the call as a coded interpretation, the model as a contained Device, and the patient, study date
and imaging study where they are known.

Codes (looked up, not guessed):

- LOINC 85151-9 "XR Bone age": the bone age itself, in years and/or months, whatever X-ray method made it (LOINC's
  own note on the term; its method is LOINC 85150-1 "Bone age method", and 37362-1 is the X-ray study that orders it).
- LOINC 30525-0 "Age": the chronological age.
- HL7 v3 ObservationInterpretation (``http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation``):
  L (Low) for a delayed bone age, N (Normal), H (High) for an advanced one.
- UCUM (``http://unitsofmeasure.org``): ``mo`` (month), ``{SDS}`` (a unitless score with an annotation).

Identifiers go into the resource only: nothing here logs them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from boneage import __version__
from boneage.clinical import REFERENCE, SDS_LIMIT, reference_sd
from boneage.inputs import identification
from boneage.rows import plain_row

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
BONE_AGE_CODE = {"system": LOINC, "code": "85151-9", "display": "XR Bone age"}
AGE_CODE = {"system": LOINC, "code": "30525-0", "display": "Age"}
CALL_INTERPRETATIONS = {
    "delayed": {"system": INTERPRETATION, "code": "L", "display": "Low"},
    "normal": {"system": INTERPRETATION, "code": "N", "display": "Normal"},
    "advanced": {"system": INTERPRETATION, "code": "H", "display": "High"},
}
DICOM_UID_SYSTEM = "urn:dicom:uid"  # FHIR's identifier system for a DICOM UID, written urn:oid:<uid>


def _months(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 1), "unit": "mo", "system": UCUM, "code": "mo"}


def _component(text: str, value: dict[str, Any], coding: dict[str, Any] | None = None) -> dict[str, Any]:
    code: dict[str, Any] = {"text": text}
    if coding is not None:
        code["coding"] = [coding]
    return {"code": code, "valueQuantity": value}


def _fhir_date(value: str | None) -> str | None:
    """A ``YYYY-MM-DD`` (or DICOM ``YYYYMMDD``) date as FHIR's date, None for anything else."""
    text = (value or "").strip().replace("-", "")
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return None


def observation(
    row: Mapping[str, Any],
    model: Mapping[str, Any],
    patient: Mapping[str, Any] | None = None,
    analysed_at: datetime | None = None,
) -> dict[str, Any]:
    """One prediction row with a bone age -> a FHIR R4 Observation (a JSON-ready dict).

    Args:
        row: a ``boneage predict`` row with ``status`` ok (its ``path`` gives the DICOM identifiers, when DICOM).
        model: :func:`boneage.model_folder.model_identity` (``name``, ``boneage_version``, ``weights_sha256``).
        patient: identification fields by key (:data:`boneage.inputs.IDENTIFICATION_FIELDS`) that win over the header.
        analysed_at: when the model read the image (``issued``; default now).

    Raises:
        ValueError: the row has no bone age.
    """
    row = plain_row(dict(row))
    if row.get("status") != "ok" or row.get("bone_age_months") is None:
        raise ValueError(f"{row.get('id')}: no bone age to report (status {row.get('status')!r})")
    found = identification(row.get("path") or "", row.get("male"), patient)
    issued = (analysed_at or datetime.now()).astimezone()
    device = {
        "resourceType": "Device",
        "id": "model",
        "manufacturer": "boneage",
        "deviceName": [{"name": f"boneage model {model.get('name') or 'unknown'}", "type": "model-name"}],
        "version": [{"value": f"boneage {__version__}"}],
    }
    if model.get("boneage_version"):
        device["version"].append({"type": {"text": "trained with"}, "value": f"boneage {model['boneage_version']}"})
    if model.get("weights_sha256"):
        device["identifier"] = [{"system": "urn:boneage:weights-sha256", "value": model["weights_sha256"]}]
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "contained": [device],
        # a machine's estimate that a clinician has not yet reviewed
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "code": {"coding": [BONE_AGE_CODE], "text": "Bone age"},
        "issued": issued.isoformat(timespec="seconds"),
        "valueQuantity": _months(row["bone_age_months"]),
        "method": {"text": f"Automated estimate from a hand radiograph by boneage, on the {REFERENCE} scale"},
        "device": {"reference": "#model"},
    }
    if found["patient_id"]:
        subject: dict[str, Any] = {"type": "Patient", "identifier": {"value": found["patient_id"]}}
        if found["patient_name"]:
            subject["display"] = found["patient_name"]
        resource["subject"] = subject
    effective = _fhir_date(found["study_date"])
    if effective:
        resource["effectiveDateTime"] = effective
    if found["study_uid"]:
        study = {
            "type": "ImagingStudy",
            "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{found['study_uid']}"},
        }
        if found["image"] and found["image"] != Path(str(row.get("path") or "")).name:
            study["display"] = f"SOP instance {found['image']}"
        resource["derivedFrom"] = [study]
    if row.get("call") in CALL_INTERPRETATIONS:
        resource["interpretation"] = [
            {"coding": [CALL_INTERPRETATIONS[row["call"]]], "text": f"bone age {row['call']} for age"}
        ]
    components = []
    if row.get("lower_months") is not None and row.get("upper_months") is not None:
        components.append(_component("Bone age, 90% interval lower limit", _months(row["lower_months"])))
        components.append(_component("Bone age, 90% interval upper limit", _months(row["upper_months"])))
    age = row.get("chronological_age_months")
    if age is not None:
        components.append(_component("Chronological age", _months(age), AGE_CODE))
        if row.get("ba_minus_ca_months") is not None:
            components.append(_component("Bone age minus chronological age", _months(row["ba_minus_ca_months"])))
        if row.get("sds") is not None:
            sds = {"value": round(float(row["sds"]), 2), "unit": "SDS", "system": UCUM, "code": "{SDS}"}
            components.append(_component(f"Bone age SDS ({REFERENCE})", sds))
        sd = reference_sd(float(age), bool(row["male"]))
        if sd is not None:  # the normal range of bone age at this age: age -/+ 2 SD
            resource["referenceRange"] = [
                {
                    "low": _months(age - SDS_LIMIT * sd),
                    "high": _months(age + SDS_LIMIT * sd),
                    "text": f"normal for age: -/+ {SDS_LIMIT:g} SD ({REFERENCE})",
                }
            ]
    if components:
        resource["component"] = components
    if row.get("message"):
        resource["note"] = [{"text": str(row["message"])}]
    return resource


def write_observations(
    rows: Any,
    folder: str | Path,
    model: Mapping[str, Any],
    patients: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """``<folder>/<id>.fhir.json``, a FHIR Observation (:func:`observation`), for every row of a ``boneage predict``
    frame with a bone age; rows without one are skipped."""
    folder = Path(folder)
    written = []
    for record in rows.to_dict("records"):
        row = plain_row(record)
        if row.get("status") != "ok":
            continue
        resource = observation(row, model, (patients or {}).get(str(row["id"])))
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{row['id']}.fhir.json"
        target.write_text(json.dumps(resource, indent=2) + "\n")
        written.append(target)
    return written
