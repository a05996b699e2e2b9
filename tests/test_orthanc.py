"""Against a real PACS: Orthanc (Debian's ``orthanc``, installed by .ci/run) started here on loopback ports with its
own configuration and storage, and stopped here. Orthanc sends a study to ``boneage listen``; the node's reports (the
Secondary Capture and the Structured Report) come back into the same study; a resend files nothing twice; and a node
killed with SIGKILL right after it accepted a batch reads all of it after a restart, every report reaching Orthanc.
With Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb``), ``boneage watch`` finds a new study by QIDO-RS,
reads it, stores its reports back by STOW-RS (the picture, the SR and the PDF), and a restart reads nothing twice."""

from __future__ import annotations

import io
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


DICOMWEB_PLUGIN = next(
    (
        path
        for path in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
        if Path(path).is_file()
    ),
    None,
)


@pytest.fixture
def orthanc(tmp_path):
    yield from start_orthanc(tmp_path, plugins=[])


@pytest.fixture
def orthanc_dicomweb(tmp_path):
    if DICOMWEB_PLUGIN is None:
        pytest.skip("needs Orthanc's DICOMweb plugin (apt-get install orthanc-dicomweb; .ci/run installs it)")
    yield from start_orthanc(tmp_path, plugins=[DICOMWEB_PLUGIN])


def start_orthanc(tmp_path: Path, plugins: list[str]):
    """An Orthanc of its own: REST and DICOM on free loopback ports, storage in tmp_path, only the given plugins."""
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
        "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
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


def upload_study(url: str, folder: Path, n: int, **tags) -> tuple[str, list[str]]:
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
            **{"Modality": "CR", **tags},
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


def sr_numbers(report) -> dict[str, float]:
    """Every numeric content item of an SR: concept code -> value (the bone age is LOINC 85151-9)."""
    found = {}

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                found[item.ConceptNameCodeSequence[0].CodeValue] = float(item.MeasuredValueSequence[0].NumericValue)
            walk(getattr(item, "ContentSequence", []))

    walk(report.ContentSequence)
    return found


def watch_once(model: Path, output: Path, url: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "boneage", "watch", "--dicomweb", f"{url}/dicom-web", "--output", str(output)]
    command += ["--once", "--body-part", "HAND", "--pdf", "--model", str(model), "--backend", "torch"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_watch_reads_a_dicomweb_archive_and_a_restart_repeats_nothing(orthanc_dicomweb, tiny_model, tmp_path):
    import csv

    url, output = orthanc_dicomweb["url"], tmp_path / "watch"
    study, _ = upload_study(url, tmp_path / "hands", 2, BodyPartExamined="HAND")
    other, _ = upload_study(url, tmp_path / "chest", 1, BodyPartExamined="CHEST")  # not a hand: left alone
    first = watch_once(tiny_model, output, url)
    assert first.returncode == 0, first.stderr

    tags = study_instances(url, study)
    films = {t["SOPInstanceUID"] for t in tags if t.get("Manufacturer") != "boneage"}
    pictures = [t for t in tags if t.get("Manufacturer") == "boneage" and t.get("Modality") == "OT"]
    pdfs = [t for t in tags if t.get("Modality") == "DOC"]
    assert len(films) == 2 and len(pictures) == 2 and len(pdfs) == 2  # a picture, an SR and a PDF per film
    assert len(tags) == 8 and all(t["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.104.1" for t in pdfs)
    assert all(t["PatientID"] == "BA-TEST-1" for t in tags) and len(study_instances(url, other)) == 1
    table = {row["sop_instance_uid"]: row for row in csv.DictReader((output / "results.csv").open())}
    assert set(table) == films and all(row["sent"] == f"{url}/dicom-web" for row in table.values())

    # the SR in the archive carries the CSV's bone age (its numeric content read back over WADO-RS)
    for sr in (t for t in tags if t.get("Modality") == "SR"):
        instance = httpx.post(f"{url}/tools/lookup", content=sr["SOPInstanceUID"], timeout=30).json()[0]["ID"]
        ds = pydicom.dcmread(io.BytesIO(httpx.get(f"{url}/instances/{instance}/file", timeout=30).content))
        source = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        film = source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert sr_numbers(ds)["85151-9"] == pytest.approx(float(table[film]["bone_age_months"]), abs=0.05)

    second = watch_once(tiny_model, output, url)  # a restart: nothing read or stored again
    assert second.returncode == 0, second.stderr
    assert "0 instance(s) read" in second.stderr
    assert len(study_instances(url, study)) == 8 and len(list(csv.DictReader((output / "results.csv").open()))) == 2
