"""What every DICOM object this package writes shares with the radiograph it reports on: the patient and study
attributes copied from the source (so the object files into the same study), the Type 2 ones present even when
empty, and UIDs that follow from the source instance (so the same film gives the same report instance, which a PACS
replaces instead of filing twice)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from boneage import __version__

# copied from the source image so a report files into the same patient and study
PATIENT_STUDY_TAGS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
# Type 2 in the Patient and General Study modules: present, empty when the source does not have them
TYPE2_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")
TYPE2_TAGS += ("AccessionNumber", "ReferringPhysicianName")


def in_source_study(source: Any) -> Any:
    """A new pydicom Dataset holding ``source``'s patient and study attributes (a new study when the source has no
    StudyInstanceUID, as a bare file may not)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.Dataset()
    for tag in PATIENT_STUDY_TAGS:
        if tag in source:
            setattr(ds, tag, source.data_element(tag).value)
    for tag in TYPE2_TAGS:
        if tag not in ds:
            setattr(ds, tag, "")
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    return ds


def report_in_study(
    source: Any, *, kind: str, model_name: str, sop_class: str, modality: str, series_number: int, description: str
) -> Any:
    """A new report object in ``source``'s patient and study (:func:`in_source_study`), in a series of its own: the
    SOP class, the UIDs derived from the source and ``kind`` (and the model, for the instance), made by software
    (ConversionType WSD), by this package and model, created now. The caller adds what its IOD holds besides."""
    now = datetime.now()
    ds = in_source_study(source)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = derived_uid(source, f"boneage {kind}", model_name)
    ds.Modality = modality
    ds.SeriesInstanceUID = derived_uid(source, f"boneage {kind} series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"  # workstation: made by software
    ds.Manufacturer = "boneage"
    ds.SoftwareVersions = f"{__version__} {model_name}"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    return ds


def source_reference(source: Any) -> Any:
    """A one-item sequence referencing the source instance (for SourceImageSequence, SourceInstanceSequence), or None
    when the source has no SOP Class and Instance UIDs."""
    if "SOPInstanceUID" not in source or "SOPClassUID" not in source:
        return None
    import pydicom
    from pydicom.sequence import Sequence as DicomSequence

    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return DicomSequence([reference])


def derived_uid(source: Any, *what: str) -> str:
    """A UID that follows from the source instance's SOP Instance UID and ``what`` (a new random one when the source
    has none)."""
    from pydicom.uid import generate_uid

    source_uid = str(source.get("SOPInstanceUID", "")) or None
    return generate_uid(entropy_srcs=[source_uid, *what] if source_uid else None)


def file_meta(ds: Any) -> Any:
    """The file meta information for ``ds`` (explicit VR little endian)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta
