"""PACS integration: the bone-age report as a DICOM object in the radiograph's own study, and a DICOM node for it.

The report is a DICOM Secondary Capture in the source image's study (:mod:`boneage.secondary_capture`) and, for an
image with a bone age, a Structured Report of the measurements beside it (:mod:`boneage.structured_report`, when
highdicom is installed). ``Listener``
(``boneage listen``) is a DICOM storage node (C-STORE SCP, pynetdicom): every image sent to it is stored, read by
:meth:`predict_files` (the code path of ``boneage predict``; sex and age from the DICOM header), its row appended to
``results.csv`` and its report written beside it and, with a destination, sent on by C-STORE.

A sender is answered as soon as the file is on disk; reading and sending run on one worker thread, in arrival order.
Nothing computed is lost when a send fails: the report stays in ``reports/`` and the row says why. The log holds an
instance counter, status and timings, never a patient detail."""

from __future__ import annotations

import csv
import importlib.util
import logging
import queue
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from boneage.clinical import parse_chronological_age
from boneage.imageio import header_patient_info
from boneage.model_folder import model_name as name_of_model
from boneage.predict import load_predictor
from boneage.render import render_report
from boneage.rows import PREDICTION_COLUMNS
from boneage.secondary_capture import report_dataset
from boneage.structured_report import sr_dataset

logger = logging.getLogger("boneage.pacs")


# lossless compressed transfer syntaxes a sender may use (decoded by GDCM): JPEG Lossless SV1, JPEG-LS, JPEG 2000, RLE
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
)
RESULT_COLUMNS = [*PREDICTION_COLUMNS, "sop_instance_uid", "report", "sent", "structured_report"]


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
        predictor: a loaded predictor (:func:`boneage.predict.load_predictor`).
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
        row["report"], row["sent"], row["structured_report"] = "", "", ""
        if row["status"] in ("ok", "not assessable"):
            picture = render_report(path, row, self.model_name)
            reports = [report_dataset(source, picture, row, self.model_name)]
            if row["status"] == "ok" and self.structured_reports:  # the measurements, for systems that read them
                reports.append(sr_dataset(source, row, self.model))
            for report, column in zip(reports, ("report", "structured_report")):
                target = self.output / "reports" / f"{report.SOPInstanceUID}.dcm"
                report.save_as(target, enforce_file_format=True)
                row[column] = str(target)
            if self.destination is not None:
                try:
                    for report in reports:
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

    destination = parse_destination(send_to) if send_to else None
    if not 0 < len(ae_title) <= 16:
        raise ValueError(f"--ae-title: 1 to 16 characters, got {ae_title!r}")
    listener = Listener(load_predictor(model, backend), output, ae_title, destination)
    listener.start(host, port, block=True)
