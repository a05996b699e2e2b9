"""PACS integration: the bone-age report as a DICOM object in the radiograph's own study, and a DICOM node for it.

``report_dataset`` turns a prediction row into a DICOM Secondary Capture (RGB): the radiograph beside the findings (and,
with an age, the chart of bone age against age: :func:`render_age_chart`), in the source image's study (patient and
study attributes copied, a new series), so any PACS viewer shows it next to the film. ``Listener`` (``boneage listen``)
is a DICOM storage node (C-STORE SCP, pynetdicom): every image sent to it is stored, read by :meth:`predict_files` (the
code path of ``boneage predict``; sex and age from the DICOM header), its row appended to ``results.csv`` and its report
written beside it and, with a destination, sent on by C-STORE.

A sender is answered as soon as the file is on disk; reading and sending run on one worker thread, in arrival order.
Nothing computed is lost when a send fails: the report stays in ``reports/`` and the row says why. The log holds an
instance counter, status and timings, never a patient detail.
"""

from __future__ import annotations

import csv
import logging
import queue
import re
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from boneage import __version__
from boneage.clinical import SDS_LIMIT, reference_band
from boneage.imageio import header_patient_info, read_image
from boneage.runtime import PREDICTION_COLUMNS, READABLE, plain_row
from boneage.runtime import model_name as name_of_model

logger = logging.getLogger("boneage.pacs")

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
REPORT_SERIES_NUMBER = 9901
# lossless compressed transfer syntaxes a sender may use (decoded by GDCM): JPEG Lossless SV1, JPEG-LS, JPEG 2000, RLE
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
)
RESULT_COLUMNS = [*PREDICTION_COLUMNS, "sop_instance_uid", "report", "sent"]
# copied from the source image so the report files into the same patient and study
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
TYPE2_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")
TYPE2_TAGS += ("AccessionNumber", "ReferringPhysicianName")


def findings(row: dict[str, Any]) -> list[str]:
    """The report's findings for one prediction row (no patient identifiers), a line each: the rendered report
    wraps the long ones, ImageComments joins them."""
    if row.get("status") == "not assessable":
        presented = re.search(r": looks ([^;(:]+)", str(row.get("message", "")))  # inverted or turned
        if presented:
            how = presented.group(1).strip()
            fix = "with bone bright" if how.startswith("inverted") else "upright, fingers up"
            reason = f"The image looks {how}; no bone age is given. Send it again {fix}."
            return ["NOT ASSESSABLE", reason]
        reason = f"The image does not look like the hand radiographs the model knows; no bone age is given: {READABLE}."
        return ["NOT ASSESSABLE", reason]
    if row.get("status") != "ok":
        return ["NO RESULT", str(row.get("message", ""))[:200]]
    lines = [f"Bone age {row['bone_age_months']:.1f} months ({row['bone_age']})"]
    if row.get("lower_months") is not None and row.get("upper_months") is not None:
        lines.append(f"90% interval {row['lower_months']:.0f}-{row['upper_months']:.0f} months")
    lines.append(f"Stage {row['stage']}")
    lines.append(f"Sex {'M' if row['male'] else 'F'}")
    if row.get("chronological_age_months") is not None:
        lines.append(f"Chronological age {row['chronological_age_months']:.1f} months")
        if row.get("ba_minus_ca_months") is not None:
            lines.append(f"BA - CA {row['ba_minus_ca_months']:+.1f} months")
        if row.get("sds") is not None:
            lines.append(f"SDS {row['sds']:+.2f} ({row['call']})")
            if row.get("sds_lower") is not None and row.get("sds_upper") is not None:
                lines.append(f"90% interval SDS {row['sds_lower']:+.2f} to {row['sds_upper']:+.2f}")
    if row.get("reader_bone_age_months") is not None and row.get("reader_minus_model_months") is not None:
        lines.append(f"Reader {row['reader_bone_age_months']:g} months ({row['reader_minus_model_months']:+.1f})")
    if row.get("message"):  # why there is no SDS, a check the SDS asks for, a reading outside the interval
        lines.append(str(row["message"]))
    return lines


CHART_MAX_MONTHS = 240.0  # both axes of the chart run from birth to 20 years
# the report's colours: dark for PACS viewers (the DICOM report), light for paper and screens (PDF, boneage chart)
DARK = {
    "background": (0, 0, 0),
    "text": (255, 255, 255),
    "heading": (255, 230, 120),
    "muted": (170, 170, 170),
    "band": (62, 66, 74),
    "diagonal": (140, 140, 140),
    "course": (200, 200, 200),
}
LIGHT = {
    "background": (255, 255, 255),
    "text": (20, 24, 31),
    "heading": (150, 90, 0),
    "muted": (90, 98, 110),
    "band": (223, 230, 239),
    "diagonal": (138, 148, 163),
    "course": (70, 100, 150),
}
CALL_COLOURS = {
    "normal": (102, 187, 106),
    "delayed": (255, 138, 101),
    "advanced": (255, 138, 101),
}  # no call (an age outside the reference): the palette's text colour


def render_age_chart(
    row: dict[str, Any] | list[dict[str, Any]], size: int = 420, palette: dict[str, Any] = DARK
) -> Any:
    """The chart of bone age against chronological age (a ``size`` x ``size`` PIL image): the normal range (the
    reference age -/+ 2 SD, :func:`boneage.clinical.reference_band`), the line bone age = age, and this child at
    (age, bone age) with the 90% interval as a bar, coloured by the call, and a reader's own bone age, when given, as
    an open circle. ``row`` may be a list of one child's visits (one sex): they are joined in order of age.
    ``palette``: :data:`DARK` (PACS viewers) or :data:`LIGHT` (paper). None without a bone age and an age."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [row] if isinstance(row, dict) else list(row)
    visits = [r for r in rows if r.get("status") == "ok" and r.get("chronological_age_months") is not None]
    if not visits:
        return None
    visits.sort(key=lambda r: float(r["chronological_age_months"]))
    male = bool(visits[0]["male"])
    left, top, side = round(size * 0.12), round(size * 0.08), round(size * 0.81)
    font = ImageFont.load_default(size=max(10, size // 32))

    def xy(age: float, bone_age: float) -> tuple[float, float]:
        clip = lambda m: min(max(float(m), 0.0), CHART_MAX_MONTHS)  # noqa: E731
        return left + side * clip(age) / CHART_MAX_MONTHS, top + side * (1 - clip(bone_age) / CHART_MAX_MONTHS)

    chart = Image.new("RGB", (size, size), palette["background"])
    draw = ImageDraw.Draw(chart)
    band = reference_band(male)
    outline = [xy(a, b) for a, b in zip(band["ages_months"], band["lower_months"])]
    outline += [xy(a, b) for a, b in reversed(list(zip(band["ages_months"], band["upper_months"])))]
    draw.polygon(outline, fill=palette["band"])
    for year in range(0, 21, 2):
        x, y = xy(12 * year, 12 * year)
        draw.line([(x, top + side), (x, top + side + 5)], fill=palette["muted"])
        draw.line([(left - 5, y), (left, y)], fill=palette["muted"])
        draw.text((x, top + side + 8), str(year), fill=palette["muted"], font=font, anchor="mt")
        draw.text((left - 8, y), str(year), fill=palette["muted"], font=font, anchor="rm")
    draw.rectangle([left, top, left + side, top + side], outline=palette["muted"])
    for start in range(0, int(CHART_MAX_MONTHS), 8):  # the line bone age = age, dashed
        draw.line([xy(start, start), xy(start + 4, start + 4)], fill=palette["diagonal"], width=1)
    sex = "boys" if male else "girls"
    draw.text((left, top - 8), f"bone age (y) against age (y), {sex}", fill=palette["text"], font=font, anchor="lb")
    draw.text(
        (left + side, top + side + 10 + font.size),
        f"shaded: +/-{SDS_LIMIT:g} SD (Greulich & Pyle)",
        fill=palette["muted"],
        font=font,
        anchor="rt",
    )
    if len(visits) > 1:  # one child's course
        draw.line([xy(r["chronological_age_months"], r["bone_age_months"]) for r in visits], fill=palette["course"])
    radius = max(4, size // 70)
    for visit in visits:
        colour = CALL_COLOURS.get(visit.get("call")) or palette["text"]
        age, bone_age = visit["chronological_age_months"], visit["bone_age_months"]
        if visit.get("lower_months") is not None and visit.get("upper_months") is not None:
            (x, low), (_, high) = xy(age, visit["lower_months"]), xy(age, visit["upper_months"])
            draw.line([(x, low), (x, high)], fill=colour, width=3)
            draw.line([(x - 6, low), (x + 6, low)], fill=colour, width=2)
            draw.line([(x - 6, high), (x + 6, high)], fill=colour, width=2)
        x, y = xy(age, bone_age)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        if visit.get("reader_bone_age_months") is not None:  # the reader's own bone age: an open circle
            x, y = xy(age, visit["reader_bone_age_months"])
            box = [x - radius - 1, y - radius - 1, x + radius + 1, y + radius + 1]
            draw.ellipse(box, outline=palette["text"], width=2)
            if len(visits) == 1:
                draw.text((x + radius + 4, y), "reader", fill=palette["text"], font=font, anchor="lm")
    return chart


def render_report(
    image_path: str | Path, row: dict[str, Any], model_name: str, height: int = 512, palette: dict[str, Any] = DARK
) -> np.ndarray:
    """(H, W, 3) uint8: the radiograph (``height`` px tall) beside a panel with :func:`findings` and, given an age,
    the chart of bone age against age (:func:`render_age_chart`)."""
    from PIL import Image, ImageDraw, ImageFont

    gray = read_image(image_path)
    width = max(1, round(gray.shape[1] * height / gray.shape[0]))
    shown = np.asarray(Image.fromarray(gray, mode="F").resize((width, height), Image.BILINEAR)).clip(0, 1)
    panel_width = 420
    chart = render_age_chart(row, size=min(420, height), palette=palette)
    chart_width = chart.width + 16 if chart is not None else 0
    canvas = Image.new("RGB", (width + panel_width + chart_width, height), palette["background"])
    canvas.paste(Image.fromarray((shown * 255).round().astype(np.uint8)).convert("RGB"), (0, 0))
    if chart is not None:
        canvas.paste(chart, (width + panel_width, (height - chart.height) // 2))
    draw = ImageDraw.Draw(canvas)
    title, small = ImageFont.load_default(size=22), ImageFont.load_default(size=13)
    x, y = width + 16, 16
    draw.text((x, y), "Bone age (automated)", fill=palette["text"], font=title)
    y += 40
    footer = [
        f"boneage {__version__}, model {model_name}",
        "Research and decision support, not a medical",
        "device: a clinician reads the film.",
    ]
    room = height - 16 - 18 * len(footer) - 8 - y  # between the title and the footer
    # the largest type whose wrapped findings fit (a long note and a reading take more lines), else cut with "..."
    found = findings(row)

    def wrapped(columns: int) -> list[tuple[str, bool]]:
        return [(line, finding.isupper()) for finding in found for line in textwrap.wrap(finding, columns)[:6]]

    types = [(19, 28, 38), (16, 23, 45), (14, 20, 52)]  # font size, line spacing, characters per line
    size, spacing, columns = next((t for t in types if len(wrapped(t[2])) * t[1] <= room), types[-1])
    lines, body, fits = wrapped(columns), ImageFont.load_default(size=size), room // spacing
    if len(lines) > fits:
        lines = lines[: fits - 1] + [("...", False)]
    for line, heading in lines:
        draw.text((x, y), line, fill=palette["heading"] if heading else palette["text"], font=body)
        y += spacing
    for k, line in enumerate(footer):
        draw.text((x, height - 16 - 18 * (len(footer) - k)), line, fill=palette["muted"], font=small)
    return np.asarray(canvas)


def report_dataset(source: Any, picture: np.ndarray, row: dict[str, Any], model_name: str) -> Any:
    """A DICOM Secondary Capture (RGB) of ``picture`` in ``source``'s patient and study, in a new series.

    ``source``: the radiograph's pydicom Dataset. Without a StudyInstanceUID (a bare file) the report gets a new study.
    The findings are also in ImageComments, as text a PACS can show or search.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    now = datetime.now()
    ds = pydicom.Dataset()
    for tag in PATIENT_STUDY_TAGS:
        if tag in source:
            setattr(ds, tag, source.data_element(tag).value)
    for tag in TYPE2_TAGS:
        if tag not in ds:
            setattr(ds, tag, "")
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = REPORT_SERIES_NUMBER
    ds.SeriesDescription = "Bone age report (boneage)"
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"  # workstation: made by software
    ds.Manufacturer = "boneage"
    ds.SoftwareVersions = f"{__version__} {model_name}"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"  # the picture's text holds no patient identifiers
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "Bone age estimated from the source radiograph by boneage"
    ds.ImageComments = "; ".join(findings(row))[:10240]
    if "SOPInstanceUID" in source and "SOPClassUID" in source:
        reference = pydicom.Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        ds.SourceImageSequence = DicomSequence([reference])
    rows, columns = picture.shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(picture, dtype=np.uint8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _reportable(rows: Any) -> Any:
    """The rows of a ``boneage predict`` frame that get a report: a bone age, or a refusal the report explains."""
    return (row for row in map(plain_row, rows.to_dict("records")) if row.get("status") in ("ok", "not assessable"))


def write_reports(rows: Any, folder: str | Path, model_name: str) -> list[Path]:
    """A report (:func:`report_dataset`) for every DICOM input among prediction rows (a ``boneage predict`` frame)
    that has a bone age or was refused as not assessable: ``<folder>/<source id>_report.dcm``. Other files and rows
    are skipped."""
    import pydicom

    from boneage.imageio import is_dicom

    folder = Path(folder)
    written = []
    for row in _reportable(rows):
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


def write_pdf_reports(rows: Any, folder: str | Path, model_name: str) -> tuple[list[Path], list[str]]:
    """The report's page (:func:`render_report`: the radiograph, the findings and the chart) as a PDF for every input
    among prediction rows that has a bone age or was refused as not assessable, any image format:
    ``<folder>/<id>_report.pdf``, for a clinic that prints or files reports without a PACS.

    Returns:
        (written, problems): the PDFs, and one line per report that could not be made (the batch goes on).
    """
    from PIL import Image

    folder = Path(folder)
    written, problems = [], []
    for row in _reportable(rows):
        target = folder / f"{row['id']}_report.pdf"
        try:
            page = Image.fromarray(render_report(row["path"], row, model_name, palette=LIGHT))
            folder.mkdir(parents=True, exist_ok=True)
            page.save(target, "PDF", resolution=100.0, title=f"Bone age report: {row['id']}")
        except (OSError, ValueError) as err:
            problems.append(f"{target}: not written ({err})")
            continue
        written.append(target)
    return written, problems


def parse_destination(text: str) -> tuple[str, int, str]:
    """``HOST:PORT`` or ``HOST:PORT:AE_TITLE`` -> (host, port, AE title; ``ANY-SCP`` when not given)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
        raise ValueError(f"--send-to: expected HOST:PORT or HOST:PORT:AE_TITLE, got {text!r}")
    title = parts[2] if len(parts) == 3 else "ANY-SCP"
    if not 0 < len(title) <= 16:
        raise ValueError(f"--send-to: an AE title has 1 to 16 characters, got {title!r}")
    return parts[0], int(parts[1]), title


def send_dataset(ds: Any, destination: tuple[str, int, str], calling_title: str = "BONEAGE") -> None:
    """C-STORE one dataset to ``(host, port, AE title)``. Raises ConnectionError with the reason when it fails."""
    from pynetdicom import AE

    host, port, title = destination
    ae = AE(ae_title=calling_title)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=title)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {title}@{host}:{port} (refused, aborted or not listening)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None) if status else None
    if code != 0x0000:
        raise ConnectionError(f"{title}@{host}:{port} answered the C-STORE with status {code!r}")


class Listener:
    """A DICOM storage node that reads every radiograph sent to it (see the module docstring).

    Args:
        predictor: a loaded predictor (:func:`boneage.runtime.load_predictor`).
        output: folder for ``received/``, ``reports/`` and ``results.csv`` (created).
        ae_title: this node's AE title.
        destination: where reports are sent, ``(host, port, AE title)``, or None to keep them on disk only.
    """

    def __init__(
        self,
        predictor: Any,
        output: str | Path,
        ae_title: str = "BONEAGE",
        destination: tuple[str, int, str] | None = None,
    ):
        self.predictor = predictor
        self.output = Path(output)
        self.ae_title = ae_title
        self.destination = destination
        self.model_name = name_of_model(predictor.model_dir)
        for name in ("received", "reports"):
            (self.output / name).mkdir(parents=True, exist_ok=True)
        self.results = self.output / "results.csv"
        self._keep_other_results()
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="boneage-listener", daemon=True)
        self._count = 0
        self._lock = threading.Lock()
        self._server: Any = None

    # ------------------------------------------------------------------------------------------------- DICOM side
    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: write the instance to ``received/`` and queue it; 0x0000 once it is on disk."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid = str(ds.SOPInstanceUID)
            if not uid.replace(".", "").isdigit():
                logger.warning("rejected an instance with a malformed SOP Instance UID")
                return 0xA900  # dataset does not match SOP class
            path = self.output / "received" / f"{uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
        except Exception as err:  # any failure to decode or store is answered, never raised into pynetdicom
            logger.warning("could not store a received instance: %s", type(err).__name__)
            return 0xC000  # cannot understand
        with self._lock:  # associations run on their own threads
            self._count += 1
            logger.info("instance %d stored", self._count)
        self._queue.put(path)
        return 0x0000

    def start(self, host: str = "0.0.0.0", port: int = 11112, block: bool = True) -> None:
        """Listen on ``host:port``. ``block=False`` returns once listening (stop with :meth:`stop`)."""
        from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:  # uncompressed, and the compressed syntaxes we can decode
            ae.add_supported_context(context.abstract_syntax, [*DEFAULT_TRANSFER_SYNTAXES, *COMPRESSED_SYNTAXES])
        ae.add_supported_context(Verification)  # C-ECHO, the PACS's "test connection"
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        self._worker.start()
        logger.info("listening as %s on %s:%d", self.ae_title, host, port)
        if block:
            try:
                threading.Event().wait()  # until interrupted (Ctrl-C)
            except KeyboardInterrupt:
                logger.info("stopping")
            finally:
                self.stop()

    def wait(self) -> None:
        """Block until every instance received so far has been read and reported."""
        self._queue.join()

    def stop(self) -> None:
        """Stop listening, finish what was received, stop the worker."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()

    # ----------------------------------------------------------------------------------------------- worker side
    def _work(self) -> None:
        while True:
            path = self._queue.get()
            try:
                if path is None:
                    return
                self.process(path)
            except Exception as err:  # one bad instance must not stop the node; its row says what happened
                logger.error("instance failed: %s", type(err).__name__)
                self._append({"id": path.stem, "path": str(path), "status": "error", "message": f"{path}: {err}"})
            finally:
                self._queue.task_done()

    def process(self, path: Path) -> dict[str, Any]:
        """Read one stored instance, write its report, send it on, append its row to ``results.csv``."""
        import pydicom

        started = time.perf_counter()
        source = pydicom.dcmread(path, stop_before_pixels=True)  # the header, read once: sex, age, study
        header = header_patient_info(source)
        row = next(self.predictor.predict_files([path], [header["male"]], ages=[_plausible_age(header)]))
        row["sop_instance_uid"] = str(source.SOPInstanceUID)
        row["report"], row["sent"] = "", ""
        if row["status"] in ("ok", "not assessable"):
            picture = render_report(path, row, self.model_name)
            report = report_dataset(source, picture, row, self.model_name)
            target = self.output / "reports" / f"{report.SOPInstanceUID}.dcm"
            report.save_as(target, enforce_file_format=True)
            row["report"] = str(target)
            if self.destination is not None:
                try:
                    send_dataset(report, self.destination, self.ae_title)
                    row["sent"] = "{2}@{0}:{1}".format(*self.destination)
                except (ConnectionError, OSError, RuntimeError) as err:
                    row["sent"] = f"failed: {err}"
        self._append(row)
        logger.info(
            "instance read: %s in %.2f s%s",
            row["status"],
            time.perf_counter() - started,
            f", sent {'no' if row['sent'].startswith('failed') else 'yes'}" if self.destination else "",
        )
        return row

    def _keep_other_results(self) -> None:
        """A ``results.csv`` with other columns (an earlier version's) is renamed, not appended to: rows under the
        wrong header would be read as the wrong fields."""
        if not self.results.is_file():
            return
        with self.results.open(newline="") as handle:
            header = next(csv.reader(handle), None)
        if header not in (None, RESULT_COLUMNS):
            kept = self.results.with_name(f"results-{datetime.now():%Y%m%d-%H%M%S}.csv")
            self.results.rename(kept)
            logger.warning("%s has other columns (an earlier version's): kept as %s", self.results, kept.name)

    def _append(self, row: dict[str, Any]) -> None:
        new = not self.results.is_file()
        with self.results.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k) for k in RESULT_COLUMNS})


def _plausible_age(header: dict[str, Any]) -> float | None:
    """The header's chronological age when it is a plausible one, else None (the report then has no SDS)."""
    from boneage.clinical import parse_chronological_age

    try:
        return parse_chronological_age(header["age_months"], "DICOM PatientAge")
    except ValueError:
        return None


def listen(
    output: str | Path,
    host: str = "0.0.0.0",
    port: int = 11112,
    ae_title: str = "BONEAGE",
    send_to: str | None = None,
    model: str | Path | None = None,
    backend: str = "auto",
) -> None:
    """``boneage listen``: load the model and serve until interrupted."""
    from boneage.runtime import load_predictor

    destination = parse_destination(send_to) if send_to else None
    if not 0 < len(ae_title) <= 16:
        raise ValueError(f"--ae-title: 1 to 16 characters, got {ae_title!r}")
    listener = Listener(load_predictor(model, backend), output, ae_title, destination)
    listener.start(host, port, block=True)
