"""PACS integration: the bone-age report as a DICOM object in the radiograph's own study, and a DICOM node for it.

The report is a DICOM Secondary Capture in the source image's study (:mod:`boneage.secondary_capture`), for an
image with a bone age a Structured Report of the measurements beside it (:mod:`boneage.structured_report`, when
highdicom is installed) and, when asked, the report page as an Encapsulated PDF (:mod:`boneage.report_pdf`).
``Listener``
(``boneage listen``) is a DICOM storage node (C-STORE SCP, pynetdicom): every image sent to it is stored, read by
:meth:`predict_files` (the code path of ``boneage predict``; sex and age from the DICOM header), its row appended to
``results.csv`` and its reports written beside it and, with a destination, sent on by C-STORE or STOW-RS.

A sender is answered as soon as the file is on disk; reading and sending run on one worker thread, in arrival order.
Nothing computed is lost when a send fails: the report stays in ``reports/`` and the row says why. The log holds an
instance counter, status and timings, never a patient detail."""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import queue
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from boneage.dicomweb import check_url, connect, is_dicomweb_url, store
from boneage.imageio import header_patient_info
from boneage.inputs import header_age
from boneage.model_folder import model_name as name_of_model
from boneage.predict import load_predictor
from boneage.render import render_report
from boneage.report_pdf import ENCAPSULATED_PDF, PAPERS, build_pdf, pdf_dataset
from boneage.rows import PREDICTION_COLUMNS, add_note
from boneage.secondary_capture import SECONDARY_CAPTURE, report_dataset
from boneage.structured_report import sr_dataset

logger = logging.getLogger("boneage.pacs")

SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the DICOM Structured Report storage SOP classes


# lossless compressed transfer syntaxes a sender may use (decoded by GDCM): JPEG Lossless SV1, JPEG-LS, JPEG 2000, RLE
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
)
RESEND = "resend"  # queued at start: the worker sends again what failed to send before a stop
RESULT_COLUMNS = [*PREDICTION_COLUMNS, "sop_instance_uid", "report", "sent", "structured_report", "pdf_report"]
REPORT_COLUMNS = ("report", "structured_report", "pdf_report")  # the DICOM objects sent for one instance


def parse_destination(text: str) -> tuple[str, int, str] | str:
    """``HOST:PORT`` or ``HOST:PORT:AE_TITLE`` -> (host, port, AE title; ``ANY-SCP`` when not given), for C-STORE;
    a DICOMweb base URL (``http(s)://...``) -> the URL, for STOW-RS."""
    if is_dicomweb_url(text):
        return check_url(text, "--send-to")
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].isdigit() or not 0 < int(parts[1]) < 65536:
        raise ValueError(f"--send-to: expected HOST:PORT[:AE_TITLE] or a DICOMweb URL (http://...), got {text!r}")
    title = parts[2] if len(parts) == 3 else "ANY-SCP"
    if not 0 < len(title) <= 16:
        raise ValueError(f"--send-to: an AE title has 1 to 16 characters, got {title!r}")
    return parts[0], int(parts[1]), title


def is_uid(text: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (safe as a file name)."""
    return 0 < len(text) <= 64 and text.replace(".", "").isdigit() and not text.startswith(".")


def describe_destination(destination: tuple[str, int, str] | str) -> str:
    """How a row's ``sent`` names where the reports went: ``AE@host:port`` or the DICOMweb URL."""
    return destination if isinstance(destination, str) else "{2}@{0}:{1}".format(*destination)


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


def hold_folder(output: Path, who: str) -> Any:
    """Lock ``OUTPUT/.lock`` for this process for as long as the returned handle stays open (close it to release):
    two nodes or watchers writing one ``results.csv`` would read instances twice and interleave rows. ValueError,
    naming the holder, when another process has it. A lock left by a killed process is released by the kernel."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return None
    handle = open(output / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{output}: in use by {holder}; give each node or watcher its own --output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{who} (pid {os.getpid()})")
    handle.flush()
    return handle


class Listener:
    """A DICOM storage node that reads every radiograph sent to it (see the module docstring).

    Args:
        predictor: a loaded predictor (:func:`boneage.predict.load_predictor`).
        output: folder for ``received/``, ``reports/`` and ``results.csv`` (created).
        ae_title: this node's AE title.
        destination: where reports are sent: ``(host, port, AE title)`` for C-STORE, a DICOMweb base URL for
            STOW-RS, or None to keep them on disk only.
        pdf_paper: ``a4`` or ``letter`` to add the report page (:func:`boneage.report_pdf.build_pdf`) as a DICOM
            Encapsulated PDF beside the other reports; None for no PDF.
    """

    def __init__(
        self,
        predictor: Any,
        output: str | Path,
        ae_title: str = "BONEAGE",
        destination: tuple[str, int, str] | str | None = None,
        *,
        allowed_calling_aets: list[str] | None = None,
        send_attempts: int = 3,
        retry_seconds: float = 2.0,
        tls: Any = None,
        pdf_paper: str | None = None,
    ):
        self.predictor = predictor
        self.output = Path(output)
        self.ae_title = ae_title
        self.destination = destination
        self.allowed_calling_aets = list(allowed_calling_aets or [])
        if send_attempts < 1:
            raise ValueError(f"--send-attempts: at least 1 try per report, got {send_attempts}")
        self.send_attempts = send_attempts
        self.retry_seconds = retry_seconds
        self.tls = tls  # an ssl.SSLContext for the server side, or None
        if pdf_paper is not None:
            if pdf_paper not in PAPERS:
                raise ValueError(f"--paper: one of {', '.join(PAPERS)}, got {pdf_paper!r}")
            if importlib.util.find_spec("reportlab") is None:
                raise ImportError("the PDF report needs reportlab: pip install 'boneage[report]'")
        self.pdf_paper = pdf_paper  # a4 or letter: also send the report page as an Encapsulated PDF; None: not
        self.model_name = name_of_model(predictor.model_dir)
        description = getattr(predictor, "description", {}) or {}
        self.model = {
            "name": self.model_name,
            "boneage_version": description.get("boneage_version"),
            "weights_sha256": description.get("weights_sha256"),
        }
        # the structured report beside the Secondary Capture needs highdicom (pip install 'boneage[sr]')
        self.structured_reports = importlib.util.find_spec("highdicom") is not None
        for name in ("received", "reports"):
            (self.output / name).mkdir(parents=True, exist_ok=True)
        self.results = self.output / "results.csv"
        self._keep_other_results()
        self._queue: queue.Queue[Path | str | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="boneage-listener", daemon=True)
        self._count = 0
        self._lock = threading.Lock()
        self._results_lock = threading.Lock()
        self._server: Any = None
        self._stow: Any = None  # the DICOMweb client, made at the first STOW-RS
        self._folder_lock: Any = None  # held while listening (hold_folder)
        self._stopping = threading.Event()

    # ------------------------------------------------------------------------------------------------- DICOM side
    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: write the instance to ``received/`` and queue it; 0x0000 once it is on disk."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid = str(ds.SOPInstanceUID)
            if not is_uid(uid):
                logger.warning("rejected an instance with a malformed SOP Instance UID")
                return 0xA900  # dataset does not match SOP class
            path = self.keep(ds, uid)
        except Exception as err:  # any failure to decode or store is answered, never raised into pynetdicom
            logger.warning("could not store a received instance: %s", type(err).__name__)
            return 0xC000  # cannot understand
        with self._lock:  # associations run on their own threads
            self._count += 1
            logger.info("instance %d stored", self._count)
        self._queue.put(path)
        return 0x0000

    def keep(self, ds: Any, uid: str) -> Path:
        """Write a received instance to ``received/UID.dcm``, whole or not at all: a stop mid-write leaves no half
        file under the instance's name, and an instance answered with success is on disk (a resend replaces it)."""
        if not is_uid(uid):  # it names a file: digits and dots only, never a path
            raise ValueError("a malformed SOP Instance UID (digits and dots expected)")
        path = self.output / "received" / f"{uid}.dcm"
        partial = path.with_name(f".{uid}.{threading.get_ident()}.partial")
        with open(partial, "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        return path

    def start(self, host: str = "0.0.0.0", port: int = 11112, block: bool = True) -> None:
        """Listen on ``host:port``. ``block=False`` returns once listening (stop with :meth:`stop`)."""
        from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self._folder_lock = hold_folder(self.output, "boneage listen")
        ae = AE(ae_title=self.ae_title)
        if self.allowed_calling_aets:  # an association from any other calling AE title is rejected
            ae.require_calling_aet = self.allowed_calling_aets
        for context in AllStoragePresentationContexts:  # uncompressed, and the compressed syntaxes we can decode
            ae.add_supported_context(context.abstract_syntax, [*DEFAULT_TRANSFER_SYNTAXES, *COMPRESSED_SYNTAXES])
        ae.add_supported_context(Verification)  # C-ECHO, the PACS's "test connection"
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=self.tls)
        except OSError as err:
            self._release_folder()
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        self._worker.start()
        recovered = self.recover()
        if self.destination is not None:  # reports whose send failed before the stop go again, after those
            self._queue.put(RESEND)
        logger.info(
            "listening as %s on %s:%d%s%s",
            self.ae_title,
            host,
            port,
            " (TLS)" if self.tls is not None else "",
            f"; {recovered} instance(s) received before a stop queued again" if recovered else "",
        )
        if block:
            previous = signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())  # how systemd and Docker stop
            try:
                while not self._stopping.wait(0.5):  # until SIGTERM or Ctrl-C
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                logger.info("stopping: finishing %d queued instance(s)", self._queue.qsize())
                self.stop()
                signal.signal(signal.SIGTERM, previous)

    def recover(self) -> int:
        """Queue every instance in ``received/`` that has no row in ``results.csv`` (stored, answered with success,
        then the node stopped before reading it: killed, or the machine went down). Returns how many."""
        done = self._rows_by_uid().keys()
        pending = [path for path in sorted((self.output / "received").glob("*.dcm")) if path.stem not in done]
        for path in pending:
            self._queue.put(path)
        return len(pending)

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
        self._release_folder()

    def _release_folder(self) -> None:
        if self._folder_lock is not None:
            self._folder_lock.close()
            self._folder_lock = None

    # ----------------------------------------------------------------------------------------------- worker side
    def _work(self) -> None:
        while True:
            path = self._queue.get()
            try:
                if path is None:
                    return
                if path == RESEND:
                    self.resend_failed(self._stopping)
                else:
                    self.read(path)
            except Exception as err:  # resending is retried at the next start; never let it stop the worker
                logger.error("resending failed: %s", type(err).__name__)
            finally:
                self._queue.task_done()

    def read(self, path: Path) -> dict[str, Any] | None:
        """:meth:`process`, where any failure becomes the instance's error row: one bad instance never stops the
        node or the watcher."""
        try:
            return self.process(path)
        except Exception as err:
            logger.error("instance failed: %s", type(err).__name__)
            row = {"id": path.stem, "path": str(path), "sop_instance_uid": path.stem, "status": "error"}
            self._record({**row, "message": f"{path}: {err}"})
            return row

    def process(self, path: Path) -> dict[str, Any] | None:
        """Read one stored instance, write its report, send it on, and record its row in ``results.csv`` (replacing
        the row of an earlier copy of the same instance). The node's own reports, when a PACS forwards a study back,
        are recognised and left alone: returns None for them."""
        import pydicom

        started = time.perf_counter()
        source = pydicom.dcmread(path, stop_before_pixels=True)  # the header, read once: sex, age, study
        if _is_own_report(source):
            path.unlink(missing_ok=True)
            logger.info("instance skipped: a boneage report")
            return None
        header = header_patient_info(source)
        age, age_note = header_age(header)  # an implausible header age is dropped with a note, as predict and serve do
        row = next(self.predictor.predict_files([path], [header["male"]], ages=[age]))
        if header["male"] is None and row["status"] == "error":  # the node has no --sex: say what the sender must fix
            row["message"] = f"{path}: sex unknown: no PatientSex (M or F) in the DICOM header, where the node reads it"
        add_note(row, age_note)
        row["sop_instance_uid"] = str(source.SOPInstanceUID)
        row.update(report="", sent="", structured_report="", pdf_report="")
        if row["status"] in ("ok", "not assessable"):
            picture = render_report(path, row, self.model_name)
            reports = [("report", report_dataset(source, picture, row, self.model_name))]
            if row["status"] == "ok" and self.structured_reports:  # the measurements, for systems that read them
                try:
                    reports.append(("structured_report", sr_dataset(source, row, self.model)))
                except ValueError as err:  # e.g. a film without the UIDs a reference needs: the picture still goes
                    add_note(row, f"no structured report ({err})")
            if self.pdf_paper:  # the page to file, as the CLI and the API make it, as an Encapsulated PDF
                try:
                    page = build_pdf(path, row, self.model, paper=self.pdf_paper)
                    reports.append(("pdf_report", pdf_dataset(source, page, self.model_name)))
                except (OSError, ValueError) as err:
                    add_note(row, f"no PDF report ({err})")
            for column, report in reports:
                target = self.output / "reports" / f"{report.SOPInstanceUID}.dcm"
                report.save_as(target, enforce_file_format=True)
                row[column] = str(target)
            reports = [report for _, report in reports]
            if self.destination is not None:
                row["sent"] = self._send(reports)
        self._record(row)
        logger.info(
            "instance read: %s in %.2f s%s",
            row["status"],
            time.perf_counter() - started,
            f", sent {'no' if row['sent'].startswith('failed') else 'yes'}" if row["sent"] else "",
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

    def _send(self, reports: list[Any]) -> str:
        """Send the reports (C-STORE, or STOW-RS to a DICOMweb URL), retried with back-off (a report already stored
        is stored again under its same UID, which the receiver replaces); the row's ``sent``: where they went, or
        why they did not."""
        for attempt in range(1, self.send_attempts + 1):
            try:
                if isinstance(self.destination, str):
                    self._stow = self._stow or connect(self.destination)
                    store(self._stow, reports)
                else:
                    for report in reports:
                        send_dataset(report, self.destination, self.ae_title)  # type: ignore[arg-type]
                return describe_destination(self.destination)  # type: ignore[arg-type]
            except (ConnectionError, OSError, RuntimeError) as err:
                if attempt == self.send_attempts:
                    return f"failed after {attempt} attempt(s): {err}"
                logger.warning("report send failed (attempt %d of %d); retrying", attempt, self.send_attempts)
                time.sleep(self.retry_seconds * 2 ** (attempt - 1))
        return "failed"

    def resend_failed(self, stopping: threading.Event | None = None) -> int:
        """Send again the reports of every row whose send failed (the destination was down), from ``reports/``,
        until ``stopping`` is set; returns how many rows now say sent."""
        if self.destination is None:
            return 0
        import pydicom

        sent = 0
        for row in list(self._rows_by_uid().values()):
            if stopping is not None and stopping.is_set():
                break
            if not row.get("sent", "").startswith("failed"):
                continue
            files = [Path(row[column]) for column in REPORT_COLUMNS if row.get(column)]
            if not files or not all(path.is_file() for path in files):
                continue
            row["sent"] = self._send([pydicom.dcmread(path) for path in files])
            self._record(row)
            sent += not row["sent"].startswith("failed")
        return sent

    def done(self) -> set[str]:
        """The SOP Instance UIDs that have a row in ``results.csv``."""
        return set(self._rows_by_uid())

    def _rows_by_uid(self) -> dict[str, dict[str, str]]:
        if not self.results.is_file():
            return {}
        with self.results.open(newline="") as handle:
            return {row["sop_instance_uid"] or row["path"]: row for row in csv.DictReader(handle)}

    def _record(self, row: dict[str, Any]) -> None:
        """Append the row, or replace the row of the same SOP Instance UID (a resend): one row per instance."""
        key = row.get("sop_instance_uid") or row.get("path")
        with self._results_lock:
            rows = self._rows_by_uid()
            if key in rows:
                rows[key] = {k: row.get(k) for k in RESULT_COLUMNS}
                partial = self.results.with_name(self.results.name + ".partial")
                with partial.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows.values())
                os.replace(partial, self.results)
                return
            new = not self.results.is_file()
            with self.results.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({k: row.get(k) for k in RESULT_COLUMNS})
                handle.flush()
                os.fsync(handle.fileno())


def _is_own_report(header: Any) -> bool:
    """Whether an instance is a report this package wrote, its Secondary Capture, Structured Report or Encapsulated
    PDF (a PACS may forward the whole study back)."""
    sop_class = str(header.get("SOPClassUID", ""))
    is_report = sop_class in (SECONDARY_CAPTURE, ENCAPSULATED_PDF) or sop_class.startswith(SR_STORAGE_PREFIX)
    return str(header.get("Manufacturer", "")) == "boneage" and is_report


def listen(
    output: str | Path,
    host: str = "0.0.0.0",
    port: int = 11112,
    ae_title: str = "BONEAGE",
    send_to: str | None = None,
    model: str | Path | None = None,
    backend: str = "auto",
    *,
    allowed_calling_aets: list[str] | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_ca: str | Path | None = None,
    send_attempts: int = 3,
    pdf_paper: str | None = None,
) -> None:
    """``boneage listen``: load the model and serve until interrupted (Ctrl-C) or stopped (SIGTERM); what was
    received and not yet read is read first, and what a hard stop left unread is read at the next start.

    Args:
        allowed_calling_aets: accept associations only from these calling AE titles (default: any).
        tls_cert, tls_key: serve DICOM over TLS with this certificate and key; ``tls_ca``: also require client
            certificates signed by this CA.
        send_attempts: tries per report send, with back-off between them.
        pdf_paper: ``a4`` or ``letter``: also send the report page as a DICOM Encapsulated PDF.
    """
    destination = parse_destination(send_to) if send_to else None
    if not 0 < len(ae_title) <= 16:
        raise ValueError(f"--ae-title: 1 to 16 characters, got {ae_title!r}")
    for title in allowed_calling_aets or []:
        if not 0 < len(title) <= 16:
            raise ValueError(f"--allowed-calling-ae: 1 to 16 characters, got {title!r}")
    tls = None
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        import ssl

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(str(tls_cert), str(tls_key))
        if tls_ca:
            tls.load_verify_locations(str(tls_ca))
            tls.verify_mode = ssl.CERT_REQUIRED
    quiet_pydicom()
    listener = Listener(
        load_predictor(model, backend),
        output,
        ae_title,
        destination,
        allowed_calling_aets=allowed_calling_aets,
        send_attempts=send_attempts,
        tls=tls,
        pdf_paper=pdf_paper,
    )
    listener.start(host, port, block=True)


def quiet_pydicom() -> None:
    """Keep pydicom's messages about malformed header values out of the node's log: they quote the values (a birth
    date, a name). The node reads what it can and says in the row what it could not."""
    import warnings

    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
