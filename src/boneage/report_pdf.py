"""The bone-age report as a page a clinic can file: a one-page PDF (A4 or Letter) with real, searchable text, drawn
with reportlab. The page holds who and what was read (patient name, ID, birth date, sex, accession number, study
date, study and image identifiers: from the DICOM header, a metadata CSV or the API's form), when and with which
model (name, version, weights checksum), the method (Greulich & Pyle reference, Brush Foundation SDs), the findings
(:func:`boneage.render.findings`), the chart of bone age against age (vector, with axis titles and a legend), the
radiograph, the limits in one sentence and a line for the reviewer's name and date. For a PACS, the same page as a
DICOM Encapsulated PDF in the radiograph's study (:func:`pdf_dataset`).

Identifiers go onto the page only: nothing here logs them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from boneage import __version__
from boneage.clinical import REFERENCE, SDS_LIMIT, reference_band
from boneage.dicom_study import file_meta, report_in_study, source_reference
from boneage.imageio import read_image
from boneage.inputs import IDENTIFICATION_FIELDS, identification
from boneage.render import CALL_COLOURS, CHART_MAX_MONTHS, LIGHT, findings
from boneage.rows import reportable_rows

PAPERS = {"a4": (595.2756, 841.8898), "letter": (612.0, 792.0)}  # points (1/72 inch): 210 x 297 mm, 8.5 x 11 in
NOT_GIVEN = "not given"
LIMITS = (
    "Limits: an automated estimate for research and decision support, not a medical device; it assumes a left-hand "
    "radiograph of a child aged 0-19 years, its 90% interval holds the reference reading about 9 times in 10, and a "
    "clinician reads the film and signs this report."
)


@functools.lru_cache(maxsize=1)
def _fonts() -> dict[str, str]:
    """The page's fonts: DejaVu Sans (Latin, Greek and Cyrillic names print as written; matplotlib ships it) when it
    can be found, else the PDF's built-in Helvetica (Latin-1 only: other letters print as boxes)."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    try:
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        files = {"regular": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "italic": "DejaVuSans-Oblique.ttf"}
        names = {}
        for style, file in files.items():
            name = f"boneage-{file[:-4]}"
            pdfmetrics.registerFont(TTFont(name, str(folder / file)))
            names[style] = name
        return names
    except Exception:  # no matplotlib, or a missing or broken file (reportlab raises its own TTFError)
        return {"regular": "Helvetica", "bold": "Helvetica-Bold", "italic": "Helvetica-Oblique"}


def _font(style: str) -> str:
    return _fonts()[style]


def _rgb(colour: tuple[int, int, int]) -> Any:
    from reportlab.lib.colors import Color

    return Color(*(c / 255 for c in colour))


def _draw_chart(canvas: Any, x: float, y: float, width: float, row: Mapping[str, Any]) -> None:
    """The chart of bone age against age as vector graphics, its lower-left corner at (x, y), ``width`` wide and
    tall: the normal range shaded, the line bone age = age, this child with the 90% interval, a reader's reading;
    axis titles and a legend. Without a bone age and an age, a line saying why there is no chart."""
    palette = LIGHT
    if row.get("status") != "ok" or row.get("chronological_age_months") is None:
        canvas.setFont(_font("italic"), 9)
        canvas.setFillColor(_rgb(palette["muted"]))
        canvas.drawString(x, y + width - 12, "No chart: it needs a bone age and a chronological age.")
        return
    left, bottom, side = x + 36, y + 30, width - 44
    months = lambda m: min(max(float(m), 0.0), CHART_MAX_MONTHS) * side / CHART_MAX_MONTHS  # noqa: E731
    px = lambda age: left + months(age)  # noqa: E731
    py = lambda bone_age: bottom + months(bone_age)  # noqa: E731
    male = bool(row["male"])
    band = reference_band(male)
    canvas.saveState()
    canvas.setFillColor(_rgb(palette["band"]))
    canvas.setStrokeColor(_rgb(palette["band"]))
    outline = canvas.beginPath()
    points = [(px(a), py(b)) for a, b in zip(band["ages_months"], band["lower_months"])]
    points += [(px(a), py(b)) for a, b in reversed(list(zip(band["ages_months"], band["upper_months"])))]
    outline.moveTo(*points[0])
    for point in points[1:]:
        outline.lineTo(*point)
    outline.close()
    canvas.drawPath(outline, stroke=0, fill=1)
    muted = _rgb(palette["muted"])
    canvas.setStrokeColor(muted)
    canvas.setFillColor(muted)
    canvas.setLineWidth(0.6)
    canvas.rect(left, bottom, side, side, stroke=1, fill=0)
    canvas.setFont(_font("regular"), 7)
    for year in range(0, 21, 2):
        canvas.line(px(12 * year), bottom, px(12 * year), bottom - 3)
        canvas.line(left, py(12 * year), left - 3, py(12 * year))
        canvas.drawCentredString(px(12 * year), bottom - 11, str(year))
        canvas.drawRightString(left - 5, py(12 * year) - 2.5, str(year))
    text = _rgb(palette["text"])
    canvas.setFillColor(text)
    canvas.setFont(_font("regular"), 8)
    canvas.drawCentredString(left + side / 2, bottom - 24, "Chronological age (years)")
    canvas.saveState()
    canvas.translate(left - 22, bottom + side / 2)
    canvas.rotate(90)
    canvas.drawCentredString(0, 0, "Bone age (years)")
    canvas.restoreState()
    canvas.setStrokeColor(_rgb(palette["diagonal"]))
    canvas.setDash(3, 3)
    canvas.line(px(0), py(0), px(CHART_MAX_MONTHS), py(CHART_MAX_MONTHS))
    canvas.setDash()
    colour = _rgb(CALL_COLOURS.get(row.get("call")) or palette["text"])
    age, bone_age = float(row["chronological_age_months"]), float(row["bone_age_months"])
    canvas.setStrokeColor(colour)
    canvas.setFillColor(colour)
    if row.get("lower_months") is not None and row.get("upper_months") is not None:
        low, high = py(row["lower_months"]), py(row["upper_months"])
        canvas.setLineWidth(1.5)
        canvas.line(px(age), low, px(age), high)
        canvas.line(px(age) - 3, low, px(age) + 3, low)
        canvas.line(px(age) - 3, high, px(age) + 3, high)
    canvas.circle(px(age), py(bone_age), 3, stroke=0, fill=1)
    reader = row.get("reader_bone_age_months")
    if reader is not None:
        canvas.setStrokeColor(text)
        canvas.setLineWidth(1)
        canvas.circle(px(age), py(reader), 3.5, stroke=1, fill=0)
    # the legend, in the top-left corner (the normal range runs along the diagonal, away from it)
    legend_x, legend_y = left + 6, bottom + side - 10
    canvas.setFont(_font("regular"), 7)
    entries = [
        ("band", f"normal range: age -/+ {SDS_LIMIT:g} SD ({'boys' if male else 'girls'}, Greulich & Pyle)"),
        ("dash", "bone age = age"),
        ("child", "this child: bone age, 90% interval bar"),
    ]
    if reader is not None:
        entries.append(("reader", "reader's bone age"))
    for kind, label in entries:
        if kind == "band":
            canvas.setFillColor(_rgb(palette["band"]))
            canvas.rect(legend_x, legend_y - 1, 10, 6, stroke=0, fill=1)
        elif kind == "dash":
            canvas.setStrokeColor(_rgb(palette["diagonal"]))
            canvas.setLineWidth(0.6)
            canvas.setDash(3, 3)
            canvas.line(legend_x, legend_y + 2, legend_x + 10, legend_y + 2)
            canvas.setDash()
        elif kind == "child":
            canvas.setFillColor(colour)
            canvas.circle(legend_x + 5, legend_y + 2, 2.5, stroke=0, fill=1)
        else:
            canvas.setStrokeColor(text)
            canvas.setLineWidth(1)
            canvas.circle(legend_x + 5, legend_y + 2, 3, stroke=1, fill=0)
        canvas.setFillColor(text)
        canvas.drawString(legend_x + 14, legend_y, label)
        legend_y -= 10
    canvas.restoreState()


def _radiograph_jpeg(image_path: str | Path, max_side: int = 900) -> tuple[bytes, int, int]:
    """The radiograph as an 8-bit grayscale JPEG (longest side ``max_side`` px) and its size in pixels."""
    import numpy as np
    from PIL import Image

    gray = read_image(image_path)
    scale = min(1.0, max_side / max(gray.shape))
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    shown = np.asarray(Image.fromarray(gray, mode="F").resize(size, Image.BILINEAR)).clip(0, 1)
    buffer = io.BytesIO()
    Image.fromarray((shown * 255).round().astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), size[0], size[1]


def build_pdf(
    image_path: str | Path,
    row: Mapping[str, Any],
    model: Mapping[str, Any],
    patient: Mapping[str, Any] | None = None,
    paper: str = "a4",
    analysed_at: datetime | None = None,
) -> bytes:
    """The report page for one prediction row as PDF bytes.

    Args:
        image_path: the radiograph (shown on the page; a DICOM file also gives the identification).
        row: the prediction row (``boneage predict``'s columns).
        model: :func:`boneage.model_folder.model_identity` (``name``, ``boneage_version``, ``weights_sha256``).
        patient: identification fields by key (:data:`IDENTIFICATION_FIELDS`) that win over the DICOM header.
        paper: ``a4`` or ``letter``.
        analysed_at: the analysis time (default: now, local time zone).
    """
    try:
        from reportlab.lib.utils import ImageReader, simpleSplit
        from reportlab.pdfgen.canvas import Canvas
    except ImportError as err:
        raise ImportError("the PDF report needs reportlab: pip install 'boneage[report]'") from err
    if paper not in PAPERS:
        raise ValueError(f"paper: expected one of {', '.join(PAPERS)}, got {paper!r}")
    width, height = PAPERS[paper]
    analysed_at = (analysed_at or datetime.now()).astimezone()
    fields = identification(image_path, row.get("male"), patient)
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=(width, height), pageCompression=1)
    canvas.setTitle("Bone age report")
    canvas.setAuthor(f"boneage {__version__}")
    canvas.setSubject("Automated bone age estimate from a hand radiograph")
    margin = 42.0
    content = width - 2 * margin
    text, muted, heading = _rgb(LIGHT["text"]), _rgb(LIGHT["muted"]), _rgb(LIGHT["heading"])

    def section(title: str, x: float, y: float) -> float:
        canvas.setFillColor(heading)
        canvas.setFont(_font("bold"), 10)
        canvas.drawString(x, y, title)
        return y - 14

    def paragraph(words: str, x: float, y: float, column: float, font: str = "", size: float = 8.5) -> float:
        font = font or _font("regular")
        canvas.setFont(font, size)
        for line in simpleSplit(words, font, size, column):
            canvas.drawString(x, y, line)
            y -= size + 2.5
        return y

    y = height - margin - 4
    canvas.setFillColor(text)
    canvas.setFont(_font("bold"), 16)
    canvas.drawString(margin, y, "Bone age report (automated)")
    canvas.setFont(_font("regular"), 8.5)
    canvas.setFillColor(muted)
    canvas.drawRightString(width - margin, y + 6, f"Analysed {analysed_at:%Y-%m-%d %H:%M %Z}".strip())
    canvas.drawRightString(width - margin, y - 5, f"boneage {__version__}")
    y -= 10
    canvas.setStrokeColor(muted)
    canvas.setLineWidth(0.5)
    canvas.line(margin, y, width - margin, y)

    # identification: two columns of label / value, the long identifiers across the page below them
    y = section("Patient and study", margin, y - 16)
    short = [f for f in IDENTIFICATION_FIELDS if f[0] not in ("study_uid", "image")]
    half = (len(short) + 1) // 2
    for k, (key, label) in enumerate(short):
        column_x = margin if k < half else margin + content / 2
        line_y = y - 12 * (k % half)
        canvas.setFont(_font("regular"), 8.5)
        canvas.setFillColor(muted)
        canvas.drawString(column_x, line_y, label)
        value = fields[key]
        canvas.setFont(_font("bold") if value else _font("italic"), 9)
        canvas.setFillColor(text if value else muted)
        canvas.drawString(column_x + 96, line_y, value or NOT_GIVEN)
    y -= 12 * half
    for key, label in (("study_uid", "Study instance UID"), ("image", "Image")):
        canvas.setFont(_font("regular"), 8.5)
        canvas.setFillColor(muted)
        canvas.drawString(margin, y, label)
        canvas.setFont(_font("regular") if fields[key] else _font("italic"), 8.5)
        canvas.setFillColor(text if fields[key] else muted)
        canvas.drawString(margin + 96, y, (fields[key] or NOT_GIVEN)[:100])
        y -= 12
    canvas.setFont(_font("regular"), 8.5)
    canvas.setFillColor(muted)
    canvas.drawString(margin, y, "Analysis date")
    canvas.setFillColor(text)
    canvas.drawString(margin + 96, y, f"{analysed_at:%Y-%m-%d}  time {analysed_at:%H:%M:%S %Z}".strip())
    y -= 8
    canvas.line(margin, y, width - margin, y)

    # the radiograph (left) beside the findings (right)
    top = y - 12
    picture_box = (content * 0.42, 250.0)
    jpeg, pixels_wide, pixels_tall = _radiograph_jpeg(row["path"] if "path" in row else image_path)
    scale = min(picture_box[0] / pixels_wide, picture_box[1] / pixels_tall)
    shown_w, shown_h = pixels_wide * scale, pixels_tall * scale
    canvas.drawImage(ImageReader(io.BytesIO(jpeg)), margin, top - shown_h, shown_w, shown_h)
    right = margin + picture_box[0] + 18
    column = width - margin - right
    line_y = section("Findings", right, top - 8)
    for k, finding in enumerate(findings(dict(row))):
        canvas.setFillColor(heading if finding.isupper() else text)
        line_y = paragraph(
            finding, right, line_y, column, _font("bold") if k == 0 else _font("regular"), 10 if k == 0 else 9
        )
        line_y -= 1.5
    y = min(top - picture_box[1], line_y) - 14

    # the chart (left) beside the method and limits (right)
    chart_side = min(content * 0.5, y - margin - 70)
    _draw_chart(canvas, margin, y - chart_side, chart_side, row)
    right = margin + chart_side + 18
    column = width - margin - right
    line_y = section("Method", right, y - 8)
    canvas.setFillColor(text)
    version = model.get("boneage_version") or "unknown"
    line_y = paragraph(
        f"Model {model.get('name') or 'unknown'} (trained with boneage {version}), read by boneage {__version__}: "
        "a convolutional network estimates bone age from the radiograph and the sex; the 90% interval is a "
        "conformal interval calibrated on held-out radiographs.",
        right,
        line_y,
        column,
    )
    checksum = str(model.get("weights_sha256") or "not recorded")
    # a 64-digit checksum is one word to a line breaker: two halves of 32
    for part in (f"Weights SHA-256: {checksum[:32]}", f"{' ' * 17}{checksum[32:]}"):
        line_y = paragraph(part, right, line_y, column, "Courier", 7) if part.strip() else line_y
    line_y = paragraph(
        f"Reference: {REFERENCE}. BA - CA is bone age minus chronological age; SDS is BA - CA over the reference SD "
        f"at that age; delayed or advanced beyond -/+ {SDS_LIMIT:g} SD, else normal.",
        right,
        line_y - 3,
        column,
    )
    canvas.setFillColor(muted)
    line_y = paragraph(LIMITS, right, line_y - 6, column, _font("italic"), 8)
    y = min(y - chart_side, line_y) - 26

    # the reviewer signs on paper
    canvas.setFillColor(text)
    canvas.setFont(_font("regular"), 9.5)
    canvas.drawString(margin, y, "Reviewed by:")
    canvas.line(
        margin + canvas.stringWidth("Reviewed by:  ", _font("regular"), 9.5), y - 2, margin + content * 0.6, y - 2
    )
    canvas.drawString(margin + content * 0.64, y, "Date:")
    date_x = margin + content * 0.64 + canvas.stringWidth("Date:  ", _font("regular"), 9.5)
    canvas.line(date_x, y - 2, width - margin, y - 2)
    canvas.setFont(_font("regular"), 7)
    canvas.setFillColor(muted)
    canvas.drawString(
        margin,
        margin - 14,
        f"Page 1 of 1. Made by boneage {__version__}; the identifiers above "
        "come from the image header or the request and were not checked by the software.",
    )
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def write_pdf_reports(
    rows: Any,
    folder: str | Path,
    model: Mapping[str, Any],
    paper: str = "a4",
    patients: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[Path], list[str]]:
    """The report page (:func:`build_pdf`) for every row of a ``boneage predict`` frame that has a bone age or was
    refused as not assessable, any image format: ``<folder>/<id>_report.pdf``, for a clinic that prints or files
    reports without a PACS.

    Args:
        patients: identification fields by image id (a metadata CSV's ``patient_name``, ``patient_id``, ...).

    Returns:
        (written, problems): the PDFs, and one line per report that could not be made (the batch goes on).
    """
    folder = Path(folder)
    written, problems = [], []
    for row in reportable_rows(rows):
        target = folder / f"{row['id']}_report.pdf"
        try:
            content = build_pdf(row["path"], row, model, (patients or {}).get(str(row["id"])), paper)
            folder.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        except (OSError, ValueError) as err:
            problems.append(f"{target}: not written ({err})")
            continue
        written.append(target)
    return written, problems


ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_SERIES_NUMBER = 9903


def pdf_dataset(source: Any, pdf: bytes, model_name: str) -> Any:
    """The report page (``pdf``, from :func:`build_pdf`) as a DICOM Encapsulated PDF in ``source``'s patient and
    study, a new series, referencing the source instance; its UIDs follow from the source's, as the Secondary
    Capture's do. Document title LOINC 18748-4 "Diagnostic imaging study". BurnedInAnnotation is YES: the page names
    the patient."""
    import pydicom
    from pydicom.sequence import Sequence as DicomSequence

    ds = report_in_study(
        source,
        kind="pdf report",
        model_name=model_name,
        sop_class=ENCAPSULATED_PDF,
        modality="DOC",
        series_number=PDF_SERIES_NUMBER,
        description="Bone age report, PDF (boneage)",
    )
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Bone age report"
    title = pydicom.Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic imaging study"
    ds.ConceptNameCodeSequence = DicomSequence([title])
    if (reference := source_reference(source)) is not None:
        ds.SourceInstanceSequence = reference
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")  # an even length, as every DICOM value
    ds.file_meta = file_meta(ds)
    return ds
