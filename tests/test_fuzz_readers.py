"""Property-based fuzzing of the readers (hypothesis): whatever bytes a file holds, reading it gives a radiograph in
[0, 1] or the reader's own error naming the file, never another exception. A bounded number of examples here;
``python tools/fuzz_readers.py --examples N`` runs longer."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from boneage.errors import DataValidationError, ImageReadError
from boneage.imageio import read_image
from boneage.labels import read_labels
from tests.helpers import synthetic_radiograph, write_dicom

# 40 per property in the default run; tools/fuzz_readers.py sets more through the environment
EXAMPLES = settings(
    max_examples=int(os.environ.get("BONEAGE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_radiograph(100, size=48)).save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_dicom(Path(folder) / "d.dcm", synthetic_radiograph(100, size=48).astype("uint16")).read_bytes()


SEEDS = {"png": _png(), "dicom": _dicom()}


def _read(data: bytes, suffix: str) -> np.ndarray | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            image = read_image(path, max_pixels=4_000_000)
        except ImageReadError as err:
            assert str(path) in str(err)  # the message names the file
            return None
    assert image.dtype == np.float32 and image.ndim == 2
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    return image


@EXAMPLES
@given(st.binary(max_size=4096), st.sampled_from([".png", ".jpg", ".dcm", ".tif", ""]))
def test_random_bytes_are_read_or_refused_by_name(data, suffix):
    _read(data, suffix)


@EXAMPLES
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_damaged_images_are_read_or_refused_by_name(kind, data):
    """A real PNG or DICOM with bytes overwritten, cut short or inserted: what a broken transfer leaves."""
    original = bytearray(SEEDS[kind])
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, len(original) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            original[where] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del original[where:]
            if len(original) < 8:
                break
        else:
            original[where:where] = data.draw(st.binary(min_size=1, max_size=64))
    _read(bytes(original), ".dcm" if kind == "dicom" else ".png")


@EXAMPLES
@given(st.text(alphabet=st.sampled_from(list('id,male;boneage\n"01TtFf. -x\r')), max_size=300))
def test_label_csvs_are_read_or_refused_with_their_problems(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.csv"
        path.write_text(text)
        try:
            table = read_labels(path)
        except DataValidationError as err:
            assert str(path) in str(err) and err.problems
            return
    assert list(table.columns[:3]) == ["id", "boneage", "male"] and len(table) > 0
    assert table["boneage"].between(0, 240).all()


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_the_seeds_themselves_read(kind):
    assert _read(SEEDS[kind], ".dcm" if kind == "dicom" else ".png") is not None
