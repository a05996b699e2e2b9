"""The DICOM node never loses an instance it answered with success and never files one twice: write-then-rename on
receipt, a re-scan of ``received/`` against ``results.csv`` at start (kill -9), a drain on SIGTERM, one row and one
report per SOP Instance UID (a resend replaces), its own reports skipped, sends retried, calling AE titles checked,
pydicom's quoted header values kept out of the log. The process tests run ``boneage listen`` itself on loopback."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import free_port, synthetic_radiograph, write_dicom

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")

from boneage.pacs import Listener  # noqa: E402
from boneage.predict import load_predictor  # noqa: E402
from boneage.secondary_capture import SECONDARY_CAPTURE  # noqa: E402


def films(folder: Path, n: int, size: int = 96) -> list[Path]:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    return [
        write_dicom(
            folder / f"{k}.dcm",
            synthetic_radiograph(40 + 7 * k, size=size, seed=k).astype("uint16") * 16,
            PatientSex="F" if k % 2 else "M",
            PatientAge="010Y",
            StudyInstanceUID=study,
            SeriesInstanceUID=generate_uid(),
        )
        for k in range(n)
    ]


def send(port: int, paths: list[Path], calling: str = "MODALITY") -> list[int]:
    """C-STORE each file in one association; the status codes the node answered (empty: association refused)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(SECONDARY_CAPTURE, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEAGE")
    if not assoc.is_established:
        return []
    try:
        return [assoc.send_c_store(pydicom.dcmread(path)).Status for path in paths]
    finally:
        assoc.release()


@pytest.fixture
def listener(tiny_model, tmp_path):
    return Listener(load_predictor(tiny_model, backend="torch"), tmp_path / "node", retry_seconds=0.01)


def test_a_resent_instance_replaces_its_row_and_report(listener, tmp_path):
    film = films(tmp_path / "in", 1)[0]
    first = listener.process(film)
    second = listener.process(film)
    rows = pd.read_csv(listener.results, dtype=str)
    assert len(rows) == 1 and rows["sop_instance_uid"][0] == str(pydicom.dcmread(film).SOPInstanceUID)
    assert first["report"] == second["report"]  # the reports' UIDs follow from the source instance
    assert first["structured_report"] == second["structured_report"] != ""
    assert len(list((tmp_path / "node" / "reports").glob("*.dcm"))) == 2  # one picture, one SR; not four


def test_its_own_report_forwarded_back_is_skipped(listener, tmp_path):
    film = films(tmp_path / "in", 1)[0]
    report = Path(listener.process(film)["report"])
    copy = tmp_path / "node" / "received" / f"{pydicom.dcmread(report).SOPInstanceUID}.dcm"
    copy.write_bytes(report.read_bytes())
    assert listener.process(copy) is None and not copy.exists()
    assert len(pd.read_csv(listener.results)) == 1


def test_a_failed_send_is_retried_and_its_final_state_recorded(tiny_model, tmp_path, monkeypatch):
    import boneage.pacs

    calls = []  # the picture report's tries; the SR goes after the picture in the same try

    def flaky(ds, destination, calling_title="BONEAGE"):
        if ds.Modality != "SR":
            calls.append(time.perf_counter())
        if len(calls) < 3:
            raise ConnectionError("no association with PACS@127.0.0.1:1")

    monkeypatch.setattr(boneage.pacs, "send_dataset", flaky)
    node = Listener(load_predictor(tiny_model), tmp_path / "node", destination=("127.0.0.1", 1, "PACS"))
    node.retry_seconds = 0.05
    row = node.process(films(tmp_path / "in", 1)[0])
    assert len(calls) == 3 and row["sent"] == "PACS@127.0.0.1:1"
    assert calls[2] - calls[1] >= 2 * (calls[1] - calls[0]) * 0.8  # back-off doubles


def test_instances_stored_but_not_read_are_read_at_the_next_start(listener, tmp_path):
    received = tmp_path / "node" / "received"
    stored = []
    for film in films(tmp_path / "in", 3):  # as if the node was killed right after answering these three
        uid = str(pydicom.dcmread(film).SOPInstanceUID)
        stored.append(uid)
        (received / f"{uid}.dcm").write_bytes(film.read_bytes())
    listener.process(received / f"{stored[0]}.dcm")  # one was read before the stop
    restarted = Listener(listener.predictor, tmp_path / "node")
    assert restarted.recover() == 2
    restarted._worker.start()
    restarted.stop()  # drains the queue
    rows = pd.read_csv(restarted.results, dtype=str)
    assert sorted(rows["sop_instance_uid"]) == sorted(stored) and (rows["status"] == "ok").all()


def test_only_the_allowed_calling_ae_titles_may_send(tiny_model, tmp_path):
    port = free_port()
    node = Listener(load_predictor(tiny_model), tmp_path / "node", allowed_calling_aets=["MODALITY"])
    node.start("127.0.0.1", port, block=False)
    try:
        film = films(tmp_path / "in", 1)
        assert send(port, film, calling="STRANGER") == []  # association rejected
        assert send(port, film, calling="MODALITY") == [0x0000]
        node.wait()
    finally:
        node.stop()
    assert len(pd.read_csv(node.results)) == 1


def test_pydicom_header_warnings_do_not_reach_the_log(listener, tmp_path, caplog):
    import warnings

    from boneage.pacs import quiet_pydicom

    film = films(tmp_path / "in", 1)[0]
    ds = pydicom.dcmread(film)
    ds["PatientBirthDate"] = pydicom.DataElement(0x00100030, "DA", "2010-03-17")  # wrong DA format, quoted by pydicom
    ds.StudyDate = "20200317"
    del ds.PatientAge  # the age comes from the dates, so the birth date is read
    ds.save_as(film, enforce_file_format=True)
    settings = pydicom.config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode, logging.getLogger("pydicom").level)
    with warnings.catch_warnings(record=True) as caught:  # restores the warning filters afterwards
        warnings.simplefilter("always")
        caplog.clear()
        listener.process(film)  # the report copies the patient's attributes, and pydicom checks each value it is given
        loud = caplog.text + " ".join(str(w.message) for w in caught)
        assert "2010-03-17" in loud  # without the node's setting pydicom quotes the value
        caplog.clear()
        caught.clear()
        try:
            quiet_pydicom()
            listener.process(film)
        finally:
            settings.reading_validation_mode, settings.writing_validation_mode = saved[:2]
            logging.getLogger("pydicom").setLevel(saved[2])
        quiet = caplog.text + " ".join(str(w.message) for w in caught)
    assert "2010-03-17" not in quiet


def _start_node(model: Path, output: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "boneage", "listen", "--output", str(output), "--host", "127.0.0.1"]
    handle = open(log, "a")
    process = subprocess.Popen(
        [*command, "--port", str(port), "--model", str(model), "--backend", "torch"], stdout=handle, stderr=handle
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if "listening as" in log.read_text():
            return process
        if process.poll() is not None:
            pytest.fail(f"boneage listen exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"boneage listen did not start: {log.read_text()[-2000:]}")


def _rows(output: Path) -> pd.DataFrame:
    results = output / "results.csv"
    return pd.read_csv(results, dtype=str) if results.is_file() else pd.DataFrame({"sop_instance_uid": []})


@pytest.mark.slow  # two `boneage listen` starts per stop signal
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_no_instance_answered_with_success_is_lost_when_the_node_is_stopped(tiny_model, tmp_path, stop):
    sent = films(tmp_path / "in", 20, size=256)
    uids = sorted(str(pydicom.dcmread(path).SOPInstanceUID) for path in sent)
    output, log, port = tmp_path / "node", tmp_path / "node.log", free_port()
    node = _start_node(tiny_model, output, port, log)
    try:
        assert send(port, sent) == [0x0000] * 20  # every one answered with success
        node.send_signal(getattr(signal, stop))
        node.wait(timeout=120)
    finally:
        node.kill()
    after_stop = len(_rows(output))
    if stop == "SIGTERM":  # a graceful stop reads what it had received before it exits
        assert after_stop == 20, log.read_text()[-2000:]
    node = _start_node(tiny_model, output, port, log)  # a kill -9 leaves them in received/: read at the next start
    try:
        deadline = time.time() + 180
        while len(_rows(output)) < 20 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
    rows = _rows(output)
    assert sorted(rows["sop_instance_uid"]) == uids, (after_stop, log.read_text()[-2000:])  # each exactly once
    assert (rows["status"] == "ok").all() and len(list((output / "reports").glob("*.dcm"))) == 2 * 20  # picture, SR
    assert not list((output / "received").glob(".*partial"))
    assert np.all([Path(p).is_file() for p in rows["report"]])


def test_reports_that_failed_to_send_go_again_at_the_next_start(tiny_model, tmp_path, monkeypatch):
    import boneage.pacs

    sent, up = [], [False]

    def pacs(ds, destination, calling_title="BONEAGE"):
        if not up[0]:
            raise ConnectionError("no association with PACS@127.0.0.1:1")
        sent.append(str(ds.SOPInstanceUID))

    monkeypatch.setattr(boneage.pacs, "send_dataset", pacs)
    predictor = load_predictor(tiny_model, backend="torch")
    node = Listener(predictor, tmp_path / "node", destination=("127.0.0.1", 1, "PACS"), send_attempts=1)
    assert node.process(films(tmp_path / "in", 1)[0])["sent"].startswith("failed after 1 attempt(s)")
    up[0] = True  # the PACS is back; the node restarts
    restarted = Listener(predictor, tmp_path / "node", destination=("127.0.0.1", 1, "PACS"))
    restarted.start("127.0.0.1", free_port(), block=False)
    try:
        restarted.wait()
    finally:
        restarted.stop()
    assert len(sent) == 2 and pd.read_csv(restarted.results)["sent"].tolist() == ["PACS@127.0.0.1:1"]
