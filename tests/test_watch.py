"""``boneage watch`` without an archive: a stand-in for the DICOMweb calls checks what is read, what is remembered and
what is retried. The real round trip through Orthanc's DICOMweb plugin is in test_orthanc.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import synthetic_radiograph, write_dicom

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client")

import boneage.watch  # noqa: E402
from boneage.cli import main  # noqa: E402
from boneage.pacs import parse_destination  # noqa: E402
from boneage.predict import load_predictor  # noqa: E402
from boneage.watch import Watcher  # noqa: E402

URL = "http://127.0.0.1:9/dicom-web"


class Archive:
    """What the watcher asks of a DICOMweb server, from files: one study, one series per film."""

    def __init__(self, folder: Path, n: int):
        from pydicom.uid import generate_uid

        folder.mkdir(parents=True, exist_ok=True)
        self.study, self.films, self.stored, self.down = generate_uid(), {}, [], False
        self.unreadable: set[str] = set()
        for k in range(n):
            path = write_dicom(
                folder / f"{k}.dcm",
                synthetic_radiograph(60 + 10 * k, size=96, seed=k).astype("uint16") * 16,
                PatientSex="F",
                StudyInstanceUID=self.study,
                SeriesInstanceUID=generate_uid(),
            )
            ds = pydicom.dcmread(path)
            self.films[str(ds.SOPInstanceUID)] = ds

    def install(self, monkeypatch) -> None:
        def series(client, query):
            if self.down:
                raise ConnectionError("QIDO-RS at the archive: cannot connect")
            found = [str(ds.SeriesInstanceUID) for ds in self.films.values()]
            return [{"study": self.study, "series": uid, "instances": 1} for uid in found]

        def instances(client, study, series_uid):
            return [uid for uid, ds in self.films.items() if str(ds.SeriesInstanceUID) == series_uid]

        def retrieve(client, study, series_uid, uid):
            if uid in self.unreadable:
                raise ConnectionError("WADO-RS from the archive: HTTP 503 Service Unavailable")
            return self.films[uid]

        monkeypatch.setattr(boneage.watch, "search_series", series)
        monkeypatch.setattr(boneage.watch, "search_instances", instances)
        monkeypatch.setattr(boneage.watch, "retrieve", retrieve)


@pytest.fixture
def archive(tmp_path, monkeypatch):
    archive = Archive(tmp_path / "archive", 3)
    archive.install(monkeypatch)
    return archive


def test_send_to_takes_a_dicomweb_url_or_a_dicom_node():
    assert parse_destination("https://pacs.example/dicom-web/") == "https://pacs.example/dicom-web"
    assert parse_destination("pacs:104:ARCHIVE") == ("pacs", 104, "ARCHIVE")
    for bad in ("http://", "https://pacs/dicom-web?x=1", "pacs", "pacs:port"):
        with pytest.raises(ValueError, match="--send-to"):
            parse_destination(bad)


def test_a_restart_reads_nothing_twice_and_an_instance_that_failed_is_tried_again(archive, tiny_model, tmp_path):
    predictor = load_predictor(tiny_model, backend="torch")
    missing = next(iter(archive.films))
    archive.unreadable.add(missing)
    watcher = Watcher(predictor, tmp_path / "out", URL, send_to="")
    assert watcher.poll() == 2  # the third could not be retrieved: its series is not marked done
    assert str(archive.films[missing].SeriesInstanceUID) not in watcher.state and len(watcher.state) == 2

    archive.unreadable.clear()
    restarted = Watcher(predictor, tmp_path / "out", URL, send_to="")  # a restart: what is done is remembered
    assert restarted.poll() == 1 and restarted.poll() == 0
    rows = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str)
    assert sorted(rows["sop_instance_uid"]) == sorted(archive.films) and (rows["status"] == "ok").all()


def test_reports_that_could_not_be_stored_go_at_the_next_poll(archive, tiny_model, tmp_path, monkeypatch):
    import boneage.pacs

    stored, archive_up = [], [False]

    def stow(client, datasets):
        if not archive_up[0]:
            raise ConnectionError("STOW-RS to the archive: HTTP 503 Service Unavailable")
        stored.extend(str(ds.SOPInstanceUID) for ds in datasets)

    monkeypatch.setattr(boneage.pacs, "store", stow)
    monkeypatch.setattr(boneage.pacs, "connect", lambda url: object())
    watcher = Watcher(load_predictor(tiny_model, backend="torch"), tmp_path / "out", URL, send_attempts=1)
    assert watcher.poll() == 3 and stored == []
    rows = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str)
    assert rows["sent"].str.startswith("failed after 1 attempt(s): STOW-RS").all()

    archive_up[0] = True
    assert watcher.poll() == 0  # nothing read again; the three rows' reports (picture and SR each) sent
    rows = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str)
    assert (rows["sent"] == URL).all() and len(stored) == 6 and len(set(stored)) == 6


@pytest.fixture
def pydicom_settings_restored(monkeypatch):
    """The command quiets pydicom for the whole process (pacs.quiet_pydicom): put its settings back afterwards."""
    import logging
    import warnings

    settings = pydicom.config.settings
    for name in ("reading_validation_mode", "writing_validation_mode"):
        monkeypatch.setattr(settings, name, getattr(settings, name))
    monkeypatch.setattr(logging.getLogger("pydicom"), "level", logging.getLogger("pydicom").level)
    with warnings.catch_warnings():
        yield


def test_an_unreachable_archive_and_bad_options_are_one_line_errors(
    archive, tiny_model, tmp_path, capsys, pydicom_settings_restored
):
    archive.down = True
    command = ["watch", "--dicomweb", URL, "--output", str(tmp_path / "out"), "--model", str(tiny_model)]
    assert main([*command, "--once", "--backend", "torch"]) == 2
    assert "cannot connect" in capsys.readouterr().err
    assert main([*command, "--since", "2026-01-01"]) == 2
    assert "--since: a study date as YYYYMMDD" in capsys.readouterr().err
    assert main([*command, "--once", "--backend", "torch", "--send-attempts", "0"]) == 2
    assert "--send-attempts: at least 1 try per report, got 0" in capsys.readouterr().err
    from boneage.pacs import hold_folder

    held = hold_folder(tmp_path / "out", "boneage watch")  # as if another watcher had this folder
    archive.down = False
    assert main([*command, "--once", "--backend", "torch"]) == 2
    assert "in use by boneage watch (pid" in capsys.readouterr().err
    held.close()
    assert main([*command, "--once", "--backend", "torch"]) == 0
    (tmp_path / "out" / "watched.json").write_text("[]")  # damaged: kept aside, nothing read twice
    assert main([*command, "--once", "--backend", "torch"]) == 0
    assert "could not be read (TypeError)" in capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("watched-unreadable-*.json"))) == 1
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 3
    for bad in ("http://127.0.0.1:99999/dicom-web", "http://[::1/dicom-web"):
        assert main(["watch", "--dicomweb", bad, "--output", str(tmp_path / "x"), "--once"]) == 2
        assert "--dicomweb: expected a DICOMweb base URL" in capsys.readouterr().err


def test_qido_is_read_a_page_at_a_time_and_a_wrong_root_is_named(monkeypatch):
    from boneage import dicomweb

    monkeypatch.setattr(dicomweb, "PAGE", 2)
    uids = [f"1.2.{k}" for k in range(5)]

    class Client:
        base_url = URL
        answer = "archive"

        def search_for_instances(self, limit, offset, **query):
            if self.answer == "ids":  # a server's own REST listing, not DICOM JSON
                return ["ca43a9e9-4aa4c716", "26110a8a-2129c97c"]
            start = 0 if self.answer == "offset ignored" else offset
            return [{"00080018": {"vr": "UI", "Value": [uid]}} for uid in uids[start : start + limit]]

    client = Client()
    assert dicomweb.search_instances(client, "1.2", "1.2.3") == uids  # three pages: 2, 2, 1
    client.answer = "offset ignored"
    with pytest.raises(ConnectionError, match="every page alike"):
        dicomweb.search_instances(client, "1.2", "1.2.3")
    client.answer = "ids"
    with pytest.raises(ConnectionError, match="not DICOM JSON; is this the archive's DICOMweb root"):
        dicomweb.search_instances(client, "1.2", "1.2.3")
