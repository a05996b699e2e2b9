"""The bone-age report as a DICOM Secondary Capture (RGB) in the radiograph's own study: the report page
(:func:`boneage.render.render_report`) with the patient and study attributes copied and a new series, so any PACS viewer
shows it next to the film."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from boneage.dicom_study import file_meta, report_in_study, source_reference
from boneage.imageio import is_dicom
from boneage.render import findings, render_report
from boneage.rows import reportable_rows

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
REPORT_SERIES_NUMBER = 9901


def report_dataset(source: Any, picture: np.ndarray, row: dict[str, Any], model_name: str) -> Any:
    """A DICOM Secondary Capture (RGB) of ``picture`` in ``source``'s patient and study, in a new series; its UIDs
    follow from the source instance's (and the model's), so the same film gives the same report instance.

    ``source``: the radiograph's pydicom Dataset. Without a StudyInstanceUID (a bare file) the report gets a new study.
    The findings are also in ImageComments, as text a PACS can show or search.
    """
    # the UIDs follow from the source instance and the model: the report of a film sent twice is the same instance,
    # which a PACS replaces instead of filing twice
    ds = report_in_study(
        source,
        kind="report",
        model_name=model_name,
        sop_class=SECONDARY_CAPTURE,
        modality="OT",
        series_number=REPORT_SERIES_NUMBER,
        description="Bone age report (boneage)",
    )
    ds.PatientOrientation = ""
    # General Series Laterality is Type 2C (a paired body part such as the hand, the series having no Image
    # Laterality): the source's, else its image's, else present and empty (unknown)
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    ds.Laterality = laterality if laterality in ("L", "R") else ""
    ds.BurnedInAnnotation = "NO"  # the picture's text holds no patient identifiers
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "Bone age estimated from the source radiograph by boneage"
    ds.ImageComments = "; ".join(findings(row))[:10240]
    if (reference := source_reference(source)) is not None:
        ds.SourceImageSequence = reference
    rows, columns = picture.shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(picture, dtype=np.uint8).tobytes()
    ds.file_meta = file_meta(ds)
    return ds


def write_reports(rows: Any, folder: str | Path, model_name: str) -> list[Path]:
    """A report (:func:`report_dataset`) for every DICOM input among prediction rows (a ``boneage predict`` frame)
    that has a bone age or was refused as not assessable: ``<folder>/<source id>_report.dcm``. Other files and rows
    are skipped."""
    import pydicom

    folder = Path(folder)
    written = []
    for row in reportable_rows(rows):
        path = Path(str(row.get("path", "")))
        if not path.is_file() or not is_dicom(path):
            continue
        source = pydicom.dcmread(path, stop_before_pixels=True)
        report = report_dataset(source, render_report(path, row, model_name), row, model_name)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{row['id']}_report.dcm"
        report.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
