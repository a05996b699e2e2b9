"""Test helpers: tiny synthetic radiographs, RSNA-style folders, DICOM files and model folders built at test time,
and where the shared RSNA data lies when a machine has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RSNA_100PX = SHARED_DATA / "rsna-bone-age-100px"
FULLRES = SHARED_DATA / "rsna-bone-age-fullres-samples"


def synthetic_radiograph(age_months: float, size: int = 96, seed: int = 0) -> np.ndarray:
    """A uint8 (size, size) 'hand': dark background, a palm and five fingers whose bright bone segments grow and
    whose gaps (growth plates) close with age, plus noise. Enough structure for a network to fit age a little."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 20.0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    maturity = float(np.clip(age_months / 228.0, 0, 1))
    palm = ((xx - 0.5) / 0.22) ** 2 + ((yy - 0.72) / 0.18) ** 2 < 1
    image[palm] = 90
    gap = 0.04 * (1 - maturity)
    for k, x0 in enumerate(np.linspace(0.32, 0.68, 5)):
        top = 0.12 + 0.03 * abs(k - 2)
        for seg in range(3):
            y0 = top + seg * (0.13 + gap)
            bone = (np.abs(xx - x0) < 0.025) & (yy > y0) & (yy < y0 + 0.11 * (0.6 + 0.4 * maturity))
            image[bone] = 150 + 90 * maturity
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, ages: Any, size: int = 80) -> Path:
    """``<i>.png`` synthetic radiographs, one per age (months), in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, age in enumerate(ages):
        Image.fromarray(synthetic_radiograph(age, size=size, seed=i)).save(folder / f"{i}.png")
    return folder


def write_rsna_folder(root: Path, n: int = 48, size: int = 96, seed: int = 0) -> tuple[Path, Path]:
    """Write ``images/<id>.png`` and ``labels.csv`` (id,boneage,male) covering every stage and both sexes."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ages = np.linspace(6, 222, n).round()
    rng.shuffle(ages)
    rows = []
    for i, age in enumerate(ages):
        image_id = str(1000 + i)
        Image.fromarray(synthetic_radiograph(age, size, seed=i)).save(images / f"{image_id}.png")
        rows.append({"id": image_id, "boneage": int(age), "male": bool(i % 2)})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return labels, images


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags: object) -> Path:
    """A minimal valid DICOM file (Explicit VR Little Endian) with uint16 pixels, made at test time."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_tiny_model(folder: Path, image_size: int = 64, **contract: Any) -> Path:
    """A randomly initialised, untrained model folder (no download): fast to load and run in tests; ``contract``:
    other data-contract fields (``standardize=True`` ...)."""
    import torch

    from boneage.config import DataConfig, ModelConfig
    from boneage.model import BoneAgeNet, save_model_folder

    torch.manual_seed(0)
    model = BoneAgeNet(ModelConfig(pretrained="none", target_offset=120.0, target_scale=40.0)).eval()
    return save_model_folder(folder, model, DataConfig(image_size=image_size, **contract))


def compress_dicom(source: Path, target: Path, syntax: str) -> Path:
    """``source`` re-encoded by GDCM in a compressed transfer syntax: ``jpeg-lossless``, ``jpeg-ls`` or ``jpeg2000``."""
    gdcm = pytest.importorskip("gdcm")
    syntaxes = {
        "jpeg-lossless": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        "jpeg-ls": gdcm.TransferSyntax.JPEGLSLossless,
        "jpeg2000": gdcm.TransferSyntax.JPEG2000Lossless,
    }
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), source
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntaxes[syntax]))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), target
    return target


def free_port() -> int:
    """A TCP port free on loopback now, for a service a test starts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (its warnings are kept out); skips when dicom3tools is not installed."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy missing: apt-get install dicom3tools (.ci/run does)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
