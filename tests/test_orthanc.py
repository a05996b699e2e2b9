"""Against a real PACS: Orthanc (Debian's ``orthanc``, installed by .ci/run) started here on loopback ports with its
own configuration and storage, and stopped here. Orthanc sends a study to ``boneage listen``; the node's reports (the
Secondary Capture and the Structured Report) come back into the same study; a resend files nothing twice; and a node
killed with SIGKILL right after it accepted a batch reads all of it after a restart, every report reaching Orthanc."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, synthetic_radiograph, write_dicom

ORTHANC = shutil.which("Orthanc")
pytestmark = [
    pytest.mark.slow,  # about a minute: two node starts, a real PACS, a kill and a restart
    pytest.mark.skipif(ORTHANC is None, reason="needs Orthanc (apt-get install orthanc; .ci/run installs it)"),
]
httpx = pytest.importorskip("httpx")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def orthanc(tmp_path):
    """An Orthanc of its own: REST and DICOM on free loopback ports, storage in tmp_path, no plugins."""
    http_port, dicom_port, node_port = free_port(), free_port(), free_port()
    config = {
        "Name": "boneage-test",
        "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {"boneage": ["BONEAGE", "127.0.0.1", node_port]},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "w")
    process = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/system", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "Orthanc to start")
        yield {"url": url, "dicom_port": dicom_port, "node_port": node_port}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def start_node(model: Path, output: Path, orthanc: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "boneage", "listen", "--output", str(output), "--host", "127.0.0.1"]
    command += ["--port", str(orthanc["node_port"]), "--model", str(model), "--backend", "torch"]
    command += ["--send-to", f"127.0.0.1:{orthanc['dicom_port']}:ORTHANC", "--allowed-calling-ae", "ORTHANC"]
    log = output.parent / "node.log"
    before = log.stat().st_size if log.is_file() else 0  # the log of an earlier start is kept: look past it
    process = subprocess.Popen(command, stdout=open(log, "a"), stderr=subprocess.STDOUT)
    wait_for(lambda: "listening as" in log.read_text()[before:], 120, "boneage listen to start")
    return process


def upload_study(url: str, folder: Path, n: int) -> tuple[str, list[str]]:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, ids = generate_uid(), []
    for k in range(n):
        path = write_dicom(
            folder / f"{k}.dcm",
            synthetic_radiograph(50 + 20 * k, size=192, seed=k).astype("uint16") * 16,
            PatientSex="F",
            PatientID="BA-TEST-1",
            PatientAge="009Y",
            StudyInstanceUID=study,
            SeriesInstanceUID=generate_uid(),
            Modality="CR",
        )
        answer = httpx.post(url + "/instances", content=path.read_bytes(), timeout=30).json()
        ids.append(answer["ID"])
    return answer["ParentStudy"], ids


def study_instances(url: str, study: str) -> list[dict]:
    instances = httpx.get(f"{url}/studies/{study}/instances", timeout=30).json()
    return [httpx.get(f"{url}/instances/{i['ID']}/simplified-tags", timeout=30).json() for i in instances]


def rows(output: Path) -> list[str]:
    results = output / "results.csv"
    import csv

    return [row["sop_instance_uid"] for row in csv.DictReader(results.open())] if results.is_file() else []


def test_orthanc_round_trip_resend_and_kill(orthanc, tiny_model, tmp_path):
    url, output = orthanc["url"], tmp_path / "node"
    node = start_node(tiny_model, output, orthanc)
    try:
        study, ids = upload_study(url, tmp_path / "films", 1)
        store = {"Resources": ids, "Synchronous": True}
        assert httpx.post(f"{url}/modalities/boneage/store", json=store, timeout=120).status_code == 200
        wait_for(lambda: len(study_instances(url, study)) == 3, 120, "the reports to reach Orthanc")
        tags = study_instances(url, study)
        report = next(t for t in tags if t.get("Manufacturer") == "boneage" and t.get("Modality") != "SR")
        structured = next(t for t in tags if t.get("Modality") == "SR")
        film = next(t for t in tags if t.get("Manufacturer") != "boneage")
        assert structured["StudyInstanceUID"] == film["StudyInstanceUID"]  # the measurements beside the picture
        assert report["StudyInstanceUID"] == film["StudyInstanceUID"] and report["PatientID"] == "BA-TEST-1"
        assert report["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7" and "Bone age" in report["ImageComments"]

        # a resend (the PACS's retry, or a user clicking twice): still one row and one of each report in the study
        assert httpx.post(f"{url}/modalities/boneage/store", json=store, timeout=120).status_code == 200
        time.sleep(3)
        assert rows(output) == [film["SOPInstanceUID"]] and len(study_instances(url, study)) == 3
    finally:
        node.terminate()
        node.wait(timeout=60)

    # a batch the node accepted, then SIGKILL: after a restart every instance has its row and its report in Orthanc
    node = start_node(tiny_model, output, orthanc)
    study, ids = upload_study(url, tmp_path / "batch", 6)
    try:
        store = {"Resources": ids, "Synchronous": True}
        assert httpx.post(f"{url}/modalities/boneage/store", json=store, timeout=120).status_code == 200
        node.send_signal(signal.SIGKILL)  # every instance was answered with success; few, if any, were read yet
        node.wait(timeout=30)
        node = start_node(tiny_model, output, orthanc)
        wait_for(lambda: len(study_instances(url, study)) == 18, 240, "12 reports to reach Orthanc after a restart")
        films = {t["SOPInstanceUID"] for t in study_instances(url, study) if t.get("Manufacturer") != "boneage"}
        assert films <= set(rows(output)) and len(rows(output)) == 7  # the first film's row and these six, once each
    finally:
        node.terminate()
        node.wait(timeout=60)
