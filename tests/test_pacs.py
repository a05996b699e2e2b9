"""PACS integration: the report as a DICOM Secondary Capture in the source study, and the DICOM node end to end."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import compress_dicom, make_tiny_model, synthetic_radiograph, write_dicom

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")

from boneage.pacs import RESULT_COLUMNS, Listener, parse_destination  # noqa: E402
from boneage.render import LIGHT, findings, render_age_chart, render_report  # noqa: E402
from boneage.secondary_capture import SECONDARY_CAPTURE, report_dataset  # noqa: E402

OK_ROW = {
    "status": "ok",
    "male": False,
    "bone_age_months": 131.2,
    "bone_age": "10y 11m",
    "lower_months": 113.7,
    "upper_months": 148.7,
    "stage": "Pre-adolescent",
    "chronological_age_months": 120.0,
    "ba_minus_ca_months": 11.2,
    "sds": 1.03,
    "sds_lower": -0.46,
    "sds_upper": 2.52,
    "call": "normal",
    "message": "call uncertain: the 90% interval reaches advanced",
}


def _source(path: Path, **tags: object) -> Path:
    from pydicom.uid import generate_uid

    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}
    return write_dicom(path, synthetic_radiograph(120, size=96).astype("uint16") * 16, **{**study, **tags})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marker_centre(chart, colour) -> np.ndarray:
    """Mean (x, y) of the pixels in the call's colour: the point and its symmetric interval bar."""
    pixels = np.argwhere((np.asarray(chart) == colour).all(axis=-1))
    assert len(pixels) > 20
    return pixels.mean(axis=0)[::-1]


def test_age_chart_puts_the_child_at_age_and_bone_age():
    from boneage.render import CALL_COLOURS

    months = OK_ROW["bone_age_months"]
    symmetric = {**OK_ROW, "lower_months": months - 15, "upper_months": months + 15}
    base = _marker_centre(render_age_chart(symmetric), CALL_COLOURS["normal"])
    older = _marker_centre(
        render_age_chart({**symmetric, "chronological_age_months": OK_ROW["chronological_age_months"] + 48}),
        CALL_COLOURS["normal"],
    )
    advanced = {**symmetric, "bone_age_months": months + 48, "lower_months": months + 33, "upper_months": months + 63}
    advanced["call"] = "advanced"
    higher = _marker_centre(render_age_chart(advanced), CALL_COLOURS["advanced"])
    step = older[0] - base[0]
    assert step > 40 and abs(older[1] - base[1]) < 1  # 4 years later: to the right, same height
    # 4 years more bone age: up by the same distance (both axes on one scale), not sideways
    assert higher[0] == pytest.approx(base[0], abs=1) and base[1] - higher[1] == pytest.approx(step, abs=2)
    # a reader's bone age 4 years above the model's: a white open circle one step above the point
    read = np.asarray(render_age_chart({**symmetric, "reader_bone_age_months": months + 48}))
    white = np.argwhere((read == 255).all(axis=-1))
    near = white[(np.abs(white[:, 1] - base[0]) < 12) & (np.abs(white[:, 0] - (base[1] - step)) < 12)]
    assert len(near) > 10 and not (np.asarray(render_age_chart(symmetric))[tuple(near.T)] == 255).all()


def test_report_shows_the_chart_only_with_an_age(tmp_path):
    source = _source(tmp_path / "in.dcm")
    without_age = {**OK_ROW, "chronological_age_months": None, "ba_minus_ca_months": None, "sds": None, "call": None}
    assert render_age_chart(without_age) is None and render_age_chart({"status": "not assessable"}) is None
    assert render_report(source, OK_ROW, "m").shape[1] > render_report(source, without_age, "m").shape[1]
    paper = render_report(source, OK_ROW, "m", palette=LIGHT)  # the PDF's colours: white page, dark findings
    assert (paper[5, -5] == 255).all() and (render_report(source, OK_ROW, "m")[5, -5] == 0).all()


@pytest.mark.parametrize("words", [20, 400])
def test_long_findings_shrink_or_are_cut_above_the_footer(tmp_path, words):
    source = _source(tmp_path / "in.dcm")
    row = {**OK_ROW, "reader_bone_age_months": 170.0, "reader_minus_model_months": 38.8}
    row["message"] = " ".join(["note"] * words)
    panel = render_report(source, row, "m")[:, 512:932]  # the findings panel, between radiograph and chart
    footer_top = 512 - 16 - 18 * 3
    assert panel[footer_top - 7 : footer_top].max() == 0  # a clear gap: no finding runs into the footer
    assert panel[footer_top : footer_top + 12].max() > 0 and panel[60:120].max() > 0  # footer and findings drawn


def test_report_files_into_the_source_study_as_a_new_series(tmp_path):
    source_path = _source(tmp_path / "hand.dcm", PatientID="P-1", PatientName="Doe^Jane", PatientSex="F")
    source = pydicom.dcmread(source_path)
    picture = render_report(source_path, OK_ROW, "tiny")
    assert picture.shape[0] == 512 and picture.shape[2] == 3 and picture.dtype == np.uint8
    panel = picture[:, 512:]  # the 96-px square radiograph is 512 wide; the findings panel is beside it
    assert panel.std() > 5  # text was drawn, not a blank panel
    report = report_dataset(source, picture, OK_ROW, "tiny")
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "report.dcm")
    assert back.SOPClassUID == SECONDARY_CAPTURE and back.Modality == "OT"
    assert (back.PatientID, str(back.PatientName), back.StudyInstanceUID) == (
        "P-1",
        "Doe^Jane",
        source.StudyInstanceUID,
    )
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SOPInstanceUID != source.SOPInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(back.pixel_array, picture)
    assert "Bone age 131.2 months (10y 11m)" in back.ImageComments and "SDS +1.03 (normal)" in back.ImageComments
    assert "90% interval SDS -0.46 to +2.52; call uncertain: the 90% interval reaches advanced" in back.ImageComments
    read = findings({**OK_ROW, "reader_bone_age_months": 150.0, "reader_minus_model_months": 18.8, "message": "x"})
    assert read[-2:] == ["Reader 150 months (+18.8)", "x"]
    assert back.BurnedInAnnotation == "NO" and "Doe" not in " ".join(findings(OK_ROW))


def test_a_refused_image_report_says_why():
    def lines(message: str) -> str:
        return " ".join(findings({"status": "not assessable", "message": message}))

    generic = lines("/a/x.dcm: does not look like the hand radiographs (score 9.0 > 3.1)")
    assert "does not look like the hand" in generic and "one hand per film, palm down, fingers up" in generic
    from boneage.presentation import inverted_message, turned_message

    inverted = lines(inverted_message("/a/x.dcm", 2.1, 1.3))
    assert inverted.startswith("NOT ASSESSABLE The image looks inverted;") and "with bone bright" in inverted
    turned = lines(turned_message("/a/x.dcm", 2, 1.6, 0.5))
    assert "looks upside down" in turned and "upright, fingers up" in turned and "score" not in turned
    assert "clockwise;" in lines(turned_message("/a/x.dcm", 3, 1.6, 0.5))


def test_report_of_a_file_without_a_study_gets_its_own_study(tmp_path):
    bare = write_dicom(tmp_path / "bare.dcm", synthetic_radiograph(60).astype("uint16"))
    source = pydicom.dcmread(bare)
    refused = {"status": "not assessable", "male": True, "message": "x"}
    report = report_dataset(source, render_report(bare, refused, "tiny"), refused, "tiny")
    assert report.StudyInstanceUID and report.PatientID == ""  # type 2: present, empty
    assert report.ImageComments.startswith("NOT ASSESSABLE")


@pytest.mark.parametrize(
    "text, expected",
    [("pacs.local:104", ("pacs.local", 104, "ANY-SCP")), ("10.0.0.5:11112:ORTHANC", ("10.0.0.5", 11112, "ORTHANC"))],
)
def test_destination_parsing(text, expected):
    assert parse_destination(text) == expected


@pytest.mark.parametrize("text", ["pacs", "pacs:abc", ":104", "pacs:0", "pacs:104:WAY-TOO-LONG-AE-TITLE"])
def test_bad_destinations_are_named(text):
    with pytest.raises(ValueError, match="--send-to"):
        parse_destination(text)


class _Collector:
    """A stand-in PACS: a storage node keeping what it receives."""

    def __init__(self, port: int):
        from pynetdicom import AE, StoragePresentationContexts, evt

        self.received: list = []
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        self.received.append(event.dataset)
        return 0x0000


def _send(port: int, *paths: Path) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="MODALITY")
    for path in paths:  # each file travels in its own transfer syntax, compressed ones included
        ae.add_requested_context(SECONDARY_CAPTURE, pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        codes = [assoc.send_c_echo().Status]
        codes += [assoc.send_c_store(pydicom.dcmread(path)).Status for path in paths]
    finally:
        assoc.release()
    return codes


def test_listener_reads_what_it_receives_and_sends_the_report_on(tmp_path):
    from boneage.predict import load_predictor

    predictor = load_predictor(make_tiny_model(tmp_path / "model"), backend="torch")
    girl = _source(tmp_path / "plain.dcm", PatientID="P-2", PatientSex="F", PatientAge="010Y")
    girl = compress_dicom(girl, tmp_path / "girl.dcm", "jpeg-lossless")  # as archives often send CR/DX images
    unknown = _source(tmp_path / "unknown.dcm", PatientID="P-3")  # no PatientSex: never guessed
    pacs_port, node_port = _free_port(), _free_port()
    pacs = _Collector(pacs_port)
    listener = Listener(predictor, tmp_path / "node", destination=("127.0.0.1", pacs_port, "PACS"))
    listener.start("127.0.0.1", node_port, block=False)
    try:
        assert _send(node_port, girl, unknown) == [0x0000, 0x0000, 0x0000]  # echo, then both stored
        listener.wait()
    finally:
        listener.stop()
        pacs.server.shutdown()

    results = pd.read_csv(tmp_path / "node" / "results.csv", dtype=str, keep_default_na=False)
    assert len(results) == 2 and len(list((tmp_path / "node" / "received").glob("*.dcm"))) == 2
    by_uid = results.set_index("sop_instance_uid")
    girl_row = by_uid.loc[pydicom.dcmread(girl).SOPInstanceUID]
    assert girl_row["status"] == "ok" and float(girl_row["chronological_age_months"]) == 120.0
    assert girl_row["sds"] != "" and girl_row["sent"] == "PACS@127.0.0.1:" + str(pacs_port)
    report = pydicom.dcmread(girl_row["report"])
    assert report.StudyInstanceUID == pydicom.dcmread(girl).StudyInstanceUID
    unknown_row = by_uid.loc[pydicom.dcmread(unknown).SOPInstanceUID]
    assert unknown_row["status"] == "error" and "sex unknown: no PatientSex" in unknown_row["message"]
    assert "--sex" not in unknown_row["message"]  # listen has no --sex to suggest
    assert unknown_row["report"] == "" and unknown_row["sent"] == "" and unknown_row["structured_report"] == ""
    # the structured report (the measurements) beside the Secondary Capture, in the same study
    structured = pydicom.dcmread(girl_row["structured_report"])
    assert structured.Modality == "SR" and structured.StudyInstanceUID == report.StudyInstanceUID
    assert len(pacs.received) == 2  # only the girl's reports reached the PACS: the picture and the measurements
    assert [r.SOPInstanceUID for r in pacs.received] == [report.SOPInstanceUID, structured.SOPInstanceUID]
    assert {r.StudyInstanceUID for r in pacs.received} == {report.StudyInstanceUID}


def test_a_failed_send_keeps_the_report_and_says_why(tmp_path):
    from boneage.predict import load_predictor

    predictor = load_predictor(make_tiny_model(tmp_path / "model"), backend="torch")
    hand = _source(tmp_path / "hand.dcm", PatientSex="M")
    nobody = _free_port()  # nothing listens there
    listener = Listener(predictor, tmp_path / "node", destination=("127.0.0.1", nobody, "PACS"), retry_seconds=0.01)
    row = listener.process(hand)
    assert row["status"] == "ok" and row["sent"].startswith("failed after 3 attempt(s): no association")
    assert Path(row["report"]).is_file()
    assert pd.read_csv(tmp_path / "node" / "results.csv")["sent"].iloc[0].startswith("failed")


def test_predict_writes_a_dicom_report_for_dicom_inputs_only(tmp_path):
    from PIL import Image

    from boneage.cli import main

    model = make_tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    dicom = _source(tmp_path / "in" / "hand.dcm", PatientSex="F", PatientID="P-4")
    Image.fromarray(synthetic_radiograph(90)).save(tmp_path / "in" / "plain.png")
    code = main(
        ["predict", str(tmp_path / "in"), "--model", str(model), "--sex", "F", "--quiet"]
        + ["--output", str(tmp_path / "p.csv"), "--dicom-report", str(tmp_path / "reports")]
    )
    assert code == 0
    reports = sorted((tmp_path / "reports").iterdir())
    assert [p.name for p in reports] == ["hand_report.dcm"]  # the PNG has no study to file a report into
    report = pydicom.dcmread(reports[0])
    predicted = pd.read_csv(tmp_path / "p.csv").set_index("id").loc["hand", "bone_age_months"]
    assert report.StudyInstanceUID == pydicom.dcmread(dicom).StudyInstanceUID
    assert f"Bone age {predicted:.1f} months" in report.ImageComments
    assert "interval" not in report.ImageComments  # the tiny model has no calibrated interval: no NaN printed


def test_predict_writes_a_pdf_report_for_every_image_read_or_refused(tmp_path, capsys):
    from PIL import Image

    from boneage.cli import main
    from boneage.report_pdf import write_pdf_reports

    model = make_tiny_model(tmp_path / "model")
    (tmp_path / "in").mkdir()
    _source(tmp_path / "in" / "hand.dcm", PatientSex="F")
    Image.fromarray(synthetic_radiograph(90)).save(tmp_path / "in" / "plain.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    code = main(
        ["predict", str(tmp_path / "in"), "--model", str(model), "--sex", "F", "--quiet"]
        + ["--output", str(tmp_path / "p.csv"), "--pdf-report", str(tmp_path / "pages")]
    )
    assert code == 3 and "wrote 2 PDF report(s)" in capsys.readouterr().out  # the broken file has no report
    pages = sorted((tmp_path / "pages").iterdir())
    assert [p.name for p in pages] == ["hand_report.pdf", "plain_report.pdf"]
    assert all(p.read_bytes().startswith(b"%PDF") and p.stat().st_size > 5000 for p in pages)
    table = pd.read_csv(tmp_path / "p.csv", dtype={"id": str})
    (tmp_path / "in" / "plain.png").unlink()  # gone before its report: that one is listed, the others written
    written, problems = write_pdf_reports(table, tmp_path / "again", {"name": "m"})
    assert [p.name for p in written] == ["hand_report.pdf"]
    assert len(problems) == 1 and "plain_report.pdf: not written" in problems[0]


def test_an_instance_that_fails_after_it_was_stored_still_gets_a_row(tmp_path, monkeypatch):
    import boneage.pacs
    from boneage.predict import load_predictor

    predictor = load_predictor(make_tiny_model(tmp_path / "model"), backend="torch")
    listener = Listener(predictor, tmp_path / "node")
    monkeypatch.setattr(boneage.pacs, "render_report", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    listener._worker.start()
    listener._queue.put(_source(tmp_path / "hand.dcm", PatientSex="M"))
    listener.wait()
    listener.stop()
    row = pd.read_csv(tmp_path / "node" / "results.csv").iloc[0]
    assert row["status"] == "error" and "disk full" in row["message"]


def test_a_results_file_with_other_columns_is_kept_apart_not_appended_to(tmp_path, caplog):
    from boneage.predict import load_predictor

    predictor = load_predictor(make_tiny_model(tmp_path / "model"), backend="torch")
    node = tmp_path / "node"
    node.mkdir()
    old = "id,path,male,bone_age_months,status\nh1,x.dcm,False,100.0,ok\n"  # an earlier version's columns
    (node / "results.csv").write_text(old)
    with caplog.at_level("WARNING", logger="boneage.pacs"):
        listener = Listener(predictor, node)
    kept = sorted(node.glob("results-*.csv"))
    assert len(kept) == 1 and kept[0].read_text() == old and not (node / "results.csv").exists()
    assert "has other columns" in caplog.text
    listener._worker.start()
    listener._queue.put(_source(tmp_path / "hand.dcm", PatientSex="M"))
    listener.wait()
    listener.stop()
    assert pd.read_csv(node / "results.csv").columns.tolist() == RESULT_COLUMNS  # a new file, the right header
    Listener(predictor, node)  # its own file is appended to, not moved
    assert len(list(node.glob("results-*.csv"))) == 1


def test_a_port_in_use_is_a_clear_error(tmp_path):
    from boneage.predict import load_predictor

    predictor = load_predictor(make_tiny_model(tmp_path / "model"), backend="torch")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            Listener(predictor, tmp_path / "node").start("127.0.0.1", port, block=False)
