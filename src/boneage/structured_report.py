"""The bone age as a DICOM Structured Report other systems can read: a Comprehensive SR holding a TID 1500 Measurement
Report, in the radiograph's own patient and study (a new series) and referencing it, built with highdicom.

What it holds, and the codes (looked up in DICOM PS3.16 through pydicom's code dictionary, and LOINC):

- document title DCM 126000 "Imaging Measurement Report" (CID 7021); procedure reported LOINC 37362-1 "Bones X-ray
  bone age" (the X-ray study for bone age);
- the observer: a device (DCM 121007 "Device"), the model, with its name and a UID made from its weights' SHA-256;
  the algorithm (TID 4019) names the model and its version;
- one measurement group (TID 1501) on the hand (SCT 85562004 "Hand"), its source image the radiograph, with:
  bone age, LOINC 85151-9 "XR Bone age", in months (UCUM ``mo``), the 90% interval as its lower and upper measurement
  uncertainty (TID 310: SCT 371885007 / 371886008, months below and above it), and the call as its normality (CID
  222: SCT 17621005 "Normal", 371880002 "Abnormally Low" for delayed, 371879000 "Abnormally High" for advanced);
  the interval's limits also as measurements in months; with an age, the chronological age (LOINC 30525-0 "Age",
  months), BA - CA (months) and the SDS (DCM 121416 "Z-Score of measurement", no units). The interval's limits and
  BA - CA have no standard code: they use a private scheme, ``99BONEAGE``, declared in the Coding Scheme
  Identification Sequence.

The report is not final or verified: a clinician reads the film. Identifiers come from the source image only and are
never logged.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from boneage import __version__
from boneage.imageio import is_dicom
from boneage.rows import plain_row

SR_SERIES_NUMBER = 9902  # beside the Secondary Capture's 9901
PRIVATE_SCHEME = "99BONEAGE"
# patient and study attributes of Type 2 (present, may be empty), the SR's and the Secondary Capture's
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
TYPE2_PATIENT_STUDY += ("StudyID", "AccessionNumber", "ReferringPhysicianName")


def _codes() -> dict[str, Any]:
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    return {
        "title": codes.DCM.ImagingMeasurementReport,  # DCM 126000
        "procedure": CodedConcept("37362-1", "LN", "Bones X-ray bone age"),
        "bone_age": CodedConcept("85151-9", "LN", "XR Bone age"),
        "age": CodedConcept("30525-0", "LN", "Age"),
        "lower": CodedConcept("BA-L90", PRIVATE_SCHEME, "Bone age 90% interval lower limit"),
        "upper": CodedConcept("BA-U90", PRIVATE_SCHEME, "Bone age 90% interval upper limit"),
        "ba_minus_ca": CodedConcept("BA-CA", PRIVATE_SCHEME, "Bone age minus chronological age"),
        "sds": codes.DCM.ZScoreOfMeasurement,  # DCM 121416
        "months": CodedConcept("mo", "UCUM", "month"),
        "no_units": CodedConcept("1", "UCUM", "no units"),
        "hand": codes.SCT.Hand,  # SCT 85562004
        "normality": {
            "normal": codes.SCT.Normal,  # SCT 17621005
            "delayed": codes.SCT.AbnormallyLow,  # SCT 371880002
            "advanced": codes.SCT.AbnormallyHigh,  # SCT 371879000
        },
    }


def device_uid(model: Mapping[str, Any]) -> str:
    """The model's Device Observer UID: the same for the same weights (made from their SHA-256, else the name)."""
    from pydicom.uid import generate_uid

    seed = str(model.get("weights_sha256") or model.get("name") or "boneage")
    return generate_uid(entropy_srcs=["boneage device", hashlib.sha256(seed.encode()).hexdigest()])


def sr_dataset(source: Any, row: Mapping[str, Any], model: Mapping[str, Any]) -> Any:
    """A Comprehensive SR (TID 1500) of one prediction row with a bone age, in ``source``'s patient and study.

    Args:
        source: the radiograph's pydicom Dataset (its header is enough; it needs SOP class and instance, study and
            series UIDs).
        row: the ``boneage predict`` row (status ok).
        model: :func:`boneage.model_folder.model_identity` (``name``, ``boneage_version``, ``weights_sha256``).

    Raises:
        ValueError: the row has no bone age, or the source lacks the UIDs a reference needs.
    """
    try:
        import highdicom as hd
    except ImportError as err:
        raise ImportError("the DICOM structured report needs highdicom: pip install 'boneage[sr]'") from err
    import pydicom
    from pydicom.sr.codedict import codes as dicom_codes
    from pydicom.uid import generate_uid

    row = plain_row(dict(row))
    if row.get("status") != "ok" or row.get("bone_age_months") is None:
        raise ValueError(f"{row.get('id')}: no bone age to report (status {row.get('status')!r})")
    missing = [t for t in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if t not in source]
    if missing:
        raise ValueError(f"{row.get('id')}: the source image has no {', '.join(missing)} to reference")
    # the SR copies patient and study from its evidence: a copy (the caller's header stays as it was) with empty
    # Type 2 values where the source has none
    evidence = copy.deepcopy(source)
    for tag in TYPE2_PATIENT_STUDY:
        if tag not in evidence:
            setattr(evidence, tag, "")
    code = _codes()
    name = str(model.get("name") or "unknown")
    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,  # DCM 121007
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model),
            name=f"boneage {name}"[:64],
            manufacturer_name="boneage",
            model_name=name[:64],
        ),
    )
    bone_age = float(row["bone_age_months"])
    properties = None
    normality = code["normality"].get(row.get("call"))
    lower, upper = row.get("lower_months"), row.get("upper_months")
    if normality is not None or (lower is not None and upper is not None):
        properties = hd.sr.MeasurementProperties(
            normality=normality,
            lower_measurement_uncertainty=None if lower is None else round(bone_age - float(lower), 1),
            upper_measurement_uncertainty=None if upper is None else round(float(upper) - bone_age, 1),
        )
    algorithm = hd.sr.AlgorithmIdentification(name=f"boneage {name}"[:64], version=__version__)
    measurements = [
        hd.sr.Measurement(
            name=code["bone_age"],
            value=round(bone_age, 1),
            unit=code["months"],
            algorithm_id=algorithm,
            properties=properties,
        )
    ]
    if lower is not None and upper is not None:  # the interval's limits in months too (the uncertainties have no unit)
        for key, value in (("lower", lower), ("upper", upper)):
            measurements.append(
                hd.sr.Measurement(
                    name=code[key], value=round(float(value), 1), unit=code["months"], algorithm_id=algorithm
                )
            )
    if row.get("chronological_age_months") is not None:
        measurements.append(
            hd.sr.Measurement(
                name=code["age"], value=round(float(row["chronological_age_months"]), 1), unit=code["months"]
            )
        )
        if row.get("ba_minus_ca_months") is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=code["ba_minus_ca"],
                    value=round(float(row["ba_minus_ca_months"]), 1),
                    unit=code["months"],
                    algorithm_id=algorithm,
                )
            )
        if row.get("sds") is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=code["sds"], value=round(float(row["sds"]), 2), unit=code["no_units"], algorithm_id=algorithm
                )
            )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "boneage sr tracking"]), identifier="bone age"
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=code["hand"])],
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=code["procedure"],
        imaging_measurements=[group],
        title=code["title"],
    )
    report = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=content[0],
        # derived from the source instance and the model, as the Secondary Capture's: the same film sent twice gives
        # the same report instance, which a PACS replaces instead of filing twice
        series_instance_uid=generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "boneage sr series"]),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "boneage sr", device_uid(model)]),
        instance_number=1,
        manufacturer="boneage",
        is_complete=True,
        is_final=False,  # a clinician has not verified it
        is_verified=False,
    )
    scheme = pydicom.Dataset()  # the private codes' scheme, declared
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "boneage measurements without a standard code"
    scheme.CodingSchemeResponsibleOrganization = "boneage"
    report.CodingSchemeIdentificationSequence = [scheme]
    report.SeriesDescription = "Bone age measurements (boneage)"
    report.SoftwareVersions = f"{__version__} {name}"[:64]
    return report


def write_sr_reports(rows: Any, folder: str | Path, model: Mapping[str, Any]) -> list[Path]:
    """A structured report (:func:`sr_dataset`) for every DICOM input with a bone age among the rows of a
    ``boneage predict`` frame: ``<folder>/<id>_sr.dcm``. Other files and rows are skipped."""
    import pydicom

    folder = Path(folder)
    written = []
    for record in rows.to_dict("records"):
        row = plain_row(record)
        path = Path(str(row.get("path", "")))
        if row.get("status") != "ok" or not path.is_file() or not is_dicom(path):
            continue
        report = sr_dataset(pydicom.dcmread(path, stop_before_pixels=True), row, model)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{row['id']}_sr.dcm"
        report.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
