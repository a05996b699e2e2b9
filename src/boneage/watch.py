"""``boneage watch``: read the hand radiographs of a DICOMweb archive as they arrive, and store the reports back.

Every poll asks the archive (QIDO-RS) for the series of the chosen modalities (and body part, and study dates), and
for each series not yet done retrieves its instances (WADO-RS) one at a time. Each instance is read exactly as the
DICOM node reads it (:meth:`boneage.pacs.Listener.read`: the same row in ``results.csv``, the same Secondary
Capture and Structured Report, and with ``pdf_paper`` the Encapsulated PDF) and the reports are stored back into the
study (STOW-RS, or wherever ``--send-to`` says).

What is done is remembered, so a restart neither repeats nor skips: an instance with a row in ``results.csv`` is not
read again; a series is marked done in ``watched.json`` (with how many instances the archive listed) only once all
of them have rows, and is looked at again if the archive later lists more. Reports whose send failed are sent again
at the next poll. The log holds counters and timings, never a patient detail."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from boneage.dicomweb import check_url, connect, retrieve, search_instances, search_series
from boneage.pacs import Listener, hold_folder, is_uid, parse_destination, quiet_pydicom
from boneage.predict import load_predictor

logger = logging.getLogger("boneage.watch")


class Watcher:
    """Poll a DICOMweb archive for new radiographs and read them (see the module docstring).

    Args:
        predictor: a loaded predictor (:func:`boneage.predict.load_predictor`).
        output: folder for ``received/``, ``reports/``, ``results.csv`` and ``watched.json`` (created).
        url: the archive's DICOMweb base URL (e.g. ``http://pacs:8042/dicom-web``).
        modalities: series modalities to read (one QIDO-RS query each).
        body_part: only series with this BodyPartExamined (e.g. ``HAND``); None for any.
        since: only studies from this date on (``YYYYMMDD``); None for any.
        send_to: where the reports go: None for back to ``url`` (STOW-RS), ``HOST:PORT[:AE]`` for C-STORE, another
            DICOMweb URL, or ``""`` to keep them on disk only.
        send_attempts: tries per report send, with back-off.
        pdf_paper: ``a4`` or ``letter``: also store the report page as a DICOM Encapsulated PDF.
    """

    def __init__(
        self,
        predictor: Any,
        output: str | Path,
        url: str,
        *,
        modalities: tuple[str, ...] = ("CR", "DX"),
        body_part: str | None = None,
        since: str | None = None,
        send_to: str | None = None,
        send_attempts: int = 3,
        pdf_paper: str | None = None,
    ):
        self.url = check_url(url)
        self.client = connect(self.url)
        self.filters = []
        for modality in modalities:
            query = {"Modality": modality.upper()}
            if body_part:
                query["BodyPartExamined"] = body_part.upper()
            if since:
                query["StudyDate"] = f"{since}-"
            self.filters.append(query)
        destination = self.url if send_to is None else (parse_destination(send_to) if send_to else None)
        self.node = Listener(
            predictor, output, destination=destination, send_attempts=send_attempts, pdf_paper=pdf_paper
        )
        self.state_path = Path(output) / "watched.json"
        self.state: dict[str, int | None] = self._load_state()
        self._stopping = threading.Event()

    def poll(self) -> int:
        """One pass over the archive; returns how many instances were read. A series whose instances could not all
        be retrieved is left for the next poll (what was read of it is kept)."""
        resent = self.node.resend_failed(self._stopping)
        if resent:
            logger.info("%d earlier report send(s) went through", resent)
        done, read = self.node.done(), 0
        for query in self.filters:
            for series in search_series(self.client, query):
                if self._stopping.is_set():
                    return read
                if series["series"] in self.state and self.state[series["series"]] == series["instances"]:
                    continue
                try:
                    uids = search_instances(self.client, series["study"], series["series"])
                except ConnectionError as err:  # one series the archive cannot list: the others still go
                    logger.warning("a series could not be listed (%s); trying again at the next poll", err)
                    continue
                complete = True
                for uid in uids:
                    if uid in done:
                        continue
                    if self._stopping.is_set():
                        complete = False  # a stop leaves the rest for the restart
                        continue
                    if not is_uid(uid):  # it cannot name a file, and no later poll will make it readable
                        logger.warning("an instance with a malformed SOP Instance UID was skipped")
                        continue
                    try:
                        ds = retrieve(self.client, series["study"], series["series"], uid)
                    except ConnectionError as err:
                        logger.warning("an instance could not be retrieved (%s); trying again at the next poll", err)
                        complete = False
                        continue
                    row = self.node.read(self.node.keep(ds, uid))
                    done.add(uid)
                    read += row is not None
                if complete:
                    self.state[series["series"]] = series["instances"]
                    self._save_state()
        return read

    def run(self, interval: float = 60.0, once: bool = False) -> None:
        """Poll every ``interval`` seconds until SIGTERM or Ctrl-C (the instance being read is finished first), or
        once. An archive that cannot be reached is logged and asked again at the next poll."""
        lock = hold_folder(self.node.output, "boneage watch")
        previous = signal.signal(signal.SIGTERM, lambda *_: self._stopping.set()) if not once else None
        try:
            while not self._stopping.is_set():
                try:
                    read = self.poll()
                    logger.info("poll done: %d instance(s) read, %d series done in all", read, len(self.state))
                except ConnectionError as err:
                    if once:
                        raise
                    logger.warning("%s; asking again in %.0f s", err, interval)
                if once:
                    return
                self._stopping.wait(interval)
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if lock is not None:
                lock.close()

    def stop(self) -> None:
        self._stopping.set()

    def _load_state(self) -> dict[str, int | None]:
        """The series done so far. A state file that cannot be read (damaged, or another version's) is kept aside
        and the series are looked at again: no instance is read twice, ``results.csv`` says which are done."""
        if not self.state_path.is_file():
            return {}
        try:
            state = json.loads(self.state_path.read_text())
            return {str(k): v for k, v in state["series"].items()}
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            kept = self.state_path.with_name(f"watched-unreadable-{datetime.now():%Y%m%d-%H%M%S}.json")
            self.state_path.rename(kept)
            logger.warning(
                "%s could not be read (%s): kept as %s; every series is looked at again (instances already read are "
                "not read again)",
                self.state_path,
                type(err).__name__,
                kept.name,
            )
            return {}

    def _save_state(self) -> None:
        partial = self.state_path.with_name(self.state_path.name + ".partial")
        with open(partial, "w") as handle:
            handle.write(json.dumps({"url": self.url, "series": self.state}, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.state_path)


def watch(
    url: str,
    output: str | Path,
    *,
    modalities: list[str] | None = None,
    body_part: str | None = None,
    since: str | None = None,
    send_to: str | None = None,
    interval: float = 60.0,
    once: bool = False,
    model: str | Path | None = None,
    backend: str = "auto",
    send_attempts: int = 3,
    pdf_paper: str | None = None,
) -> None:
    """``boneage watch``: load the model and poll ``url`` (see :class:`Watcher`)."""
    if since is not None and not re.fullmatch(r"\d{8}", since):
        raise ValueError(f"--since: a study date as YYYYMMDD, got {since!r}")
    if interval <= 0:
        raise ValueError(f"--interval: seconds between polls, above 0, got {interval}")
    check_url(url)
    quiet_pydicom()
    watcher = Watcher(
        load_predictor(model, backend),
        output,
        url,
        modalities=tuple(modalities or ("CR", "DX")),
        body_part=body_part,
        since=since,
        send_to=send_to,
        send_attempts=send_attempts,
        pdf_paper=pdf_paper,
    )
    logger.info("watching %s%s", watcher.url, " once" if once else f" every {interval:.0f} s")
    watcher.run(interval, once=once)
