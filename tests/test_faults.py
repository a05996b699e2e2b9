"""One bad file never stops a batch: each fault below once ended a whole ``boneage predict`` run (or got a 500 from
the API, or three different answers from predict, serve and listen); now it is that file's error row, a 4xx, or a
note, and the rest goes on. RELIABILITY.md lists them."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.cli import main
from boneage.errors import ImageReadError, ImageTooLargeError
from boneage.imageio import read_image
from tests.helpers import synthetic_radiograph, write_dicom


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(synthetic_radiograph(120)).save(path)
    return path


def predict_rows(paths: list[Path], output: Path, model: Path, *extra: str) -> tuple[int, pd.DataFrame]:
    code = main(["predict", *map(str, paths), "--model", str(model), "--output", str(output), "--quiet", *extra])
    return code, pd.read_csv(output, dtype={"id": str}, keep_default_na=False)


def test_a_pixel_bomb_is_its_own_error_row_and_a_413(tmp_path, good, tiny_model):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        read_image(bomb)
    code, rows = predict_rows([bomb, good], tmp_path / "p.csv", tiny_model, "--sex", "F")
    assert code == 3 and rows["status"].tolist() == ["error", "ok"]
    assert "exceeds the limit" in rows["message"][0] and "DecompressionBomb" not in rows["message"][0]

    from fastapi.testclient import TestClient

    from boneage.serve import create_app

    client = TestClient(create_app(tiny_model), raise_server_exceptions=False)
    for route in ("/api/v1/predict", "/api/v1/report.pdf"):
        response = client.post(route, files={"file": ("b.png", bomb.read_bytes(), "image/png")}, data={"sex": "F"})
        assert response.status_code == 413, (route, response.text)
        assert "exceeds the limit" in response.json()["detail"]


def test_a_file_that_cannot_be_opened_is_its_own_error_row(tmp_path, good, tiny_model, monkeypatch):
    locked = write_dicom(tmp_path / "locked.dcm", synthetic_radiograph(90).astype("uint16"), PatientSex="F")
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root reads any file: make opening this one fail as it does for everyone else
        import boneage.imageio

        sniff = boneage.imageio.is_dicom

        def is_dicom(path: Path) -> bool:
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return sniff(path)

        monkeypatch.setattr(boneage.imageio, "is_dicom", is_dicom)
    try:
        code, rows = predict_rows([locked, good], tmp_path / "p.csv", tiny_model, "--sex", "F")
    finally:
        os.chmod(locked, 0o644)
    assert code == 3 and rows["status"].tolist() == ["error", "ok"]
    assert rows["message"][0] == f"{locked}: cannot be read (Permission denied)"


@pytest.mark.parametrize(
    ("tags", "source"),
    [
        ({"PatientAge": "025Y"}, "PatientAge: 300.0 months"),
        ({"PatientBirthDate": "20200317", "StudyDate": "20190101"}, "StudyDate - PatientBirthDate: -14.5 months"),
    ],
)
def test_an_implausible_header_age_is_dropped_with_a_note_in_predict_serve_and_listen(
    tmp_path, good, tiny_model, tags, source
):
    pixels = synthetic_radiograph(100).astype("uint16") * 16
    film = write_dicom(tmp_path / "film.dcm", pixels, PatientSex="M", **tags)
    note = f"the DICOM header's age ({source}) is outside 0-240 months and was not used"
    code, rows = predict_rows([film, good], tmp_path / "p.csv", tiny_model, "--sex", "F")
    assert rows["status"].tolist() == ["ok", "ok"]
    assert note in rows["message"][0] and rows["chronological_age_months"][0] == "" and rows["bone_age_months"][0]

    from fastapi.testclient import TestClient

    from boneage.serve import create_app

    client = TestClient(create_app(tiny_model), raise_server_exceptions=False)
    report = client.post("/api/v1/predict", files={"file": ("f.dcm", film.read_bytes(), "application/dicom")})
    assert report.status_code == 200 and note in report.json()["message"]
    assert report.json()["chronological_age_months"] is None and report.json()["age_source"] is None

    pytest.importorskip("pynetdicom")
    from boneage.pacs import Listener
    from boneage.predict import load_predictor

    listener = Listener(load_predictor(tiny_model), tmp_path / "node")
    row = listener.process(film)
    assert row["status"] == "ok" and note in row["message"] and row.get("chronological_age_months") is None


def multi_frame_dicom(path: Path, frames: int, size: int = 64) -> Path:
    pixels = np.stack([synthetic_radiograph(60 + 20 * k, size=size).astype("uint16") * 16 for k in range(frames)])
    flat = write_dicom(path, pixels[0], PatientSex="F")
    import pydicom

    ds = pydicom.dcmread(flat)
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_frames_times_rows_times_columns_is_checked_before_decoding(tmp_path, monkeypatch):
    import pydicom.pixels

    film = multi_frame_dicom(tmp_path / "frames.dcm", frames=4)
    first = read_image(film)  # within the limit: the first frame only is decoded
    single = read_image(write_dicom(tmp_path / "one.dcm", synthetic_radiograph(60, size=64).astype("uint16") * 16))
    assert first.shape == (64, 64) and np.allclose(first, single)

    def never(*args, **kwargs):
        raise AssertionError("pixel data decoded despite the limit")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", never)
    with pytest.raises(ImageTooLargeError, match=r"4 frames of 64x64x1 = 16,384 values: exceeds the limit of 10,000"):
        read_image(film, max_pixels=10_000)  # each frame (4,096) is under it, all four are not


def test_messages_name_the_file_and_what_was_expected_not_python_internals(tmp_path, tiny_model):
    import pydicom

    no_image = write_dicom(tmp_path / "no_image.dcm", synthetic_radiograph(60).astype("uint16"), PatientSex="F")
    ds = pydicom.dcmread(no_image)
    del ds.Rows, ds.PixelData
    ds.save_as(no_image, enforce_file_format=True)
    with pytest.raises(ImageReadError) as caught:
        read_image(no_image)
    assert str(caught.value) == f"{no_image}: a DICOM file without an image (no Rows, PixelData); expected a radiograph"

    ragged = tmp_path / "meta.csv"
    ragged.write_text("id,male\n10000,true,extra,fields\n10001,false\n")
    image = tmp_path / "10001.png"
    Image.fromarray(synthetic_radiograph(100)).save(image)
    code = main(["predict", str(image), "--model", str(tiny_model), "--metadata", str(ragged), "--quiet"])
    assert code == 2  # refused, not silently misread


def test_a_ragged_csv_row_is_named(tmp_path, capsys):
    ragged = tmp_path / "meta.csv"
    ragged.write_text("id,male\n10000,true,extra,fields\n10001,false\n")
    from boneage.inputs import read_metadata

    with pytest.raises(ValueError, match=r"meta.csv: not a readable CSV \(line 2 has 4 fields but the header has 2"):
        read_metadata(ragged)


def test_a_colour_dicom_radiograph_is_read_as_grey(tmp_path):
    import pydicom

    grey = synthetic_radiograph(100, size=64)
    film = write_dicom(tmp_path / "rgb.dcm", grey.astype("uint16"), PatientSex="F")
    ds = pydicom.dcmread(film)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8).tobytes()
    ds.save_as(film, enforce_file_format=True)
    image = read_image(film)
    assert image.shape == (64, 64)
    expected = (grey.astype(np.float32) - grey.min()) / (grey.max() - grey.min())
    assert np.abs(image - expected).max() < 0.01


def test_an_unexpected_decoder_failure_is_one_files_error_row(tmp_path, good, tiny_model, monkeypatch):
    import boneage.backends.torch as torch_backend

    real = torch_backend.preprocess

    def flaky(path, contract):
        if Path(path).name == "odd.png":
            raise MemoryError("decoder ran out of memory")
        return real(path, contract)

    monkeypatch.setattr(torch_backend, "preprocess", flaky)
    odd = tmp_path / "odd.png"
    odd.write_bytes(good.read_bytes())
    code, rows = predict_rows([odd, good], tmp_path / "p.csv", tiny_model, "--sex", "F", "--backend", "torch")
    assert rows["status"].tolist() == ["error", "ok"]
    assert rows["message"][0] == f"{odd}: cannot be read as an image (decoder ran out of memory)"
