"""Checks on the real RSNA copies in ../shared/data; every test skips cleanly where that data is absent."""

from __future__ import annotations

import pandas as pd
import pytest

from boneage.data import read_image, read_labels, read_split, stage_of
from tests.conftest import FULLRES, RSNA_100PX

pytestmark = pytest.mark.data

needs_100px = pytest.mark.skipif(not RSNA_100PX.is_dir(), reason=f"RSNA 100-px copies not found at {RSNA_100PX}")
needs_fullres = pytest.mark.skipif(not FULLRES.is_dir(), reason=f"full-resolution samples not found at {FULLRES}")


@needs_100px
def test_rsna_100px_labels_and_seed_split_are_valid():
    labels = read_labels(RSNA_100PX / "boneage-training-dataset.csv", RSNA_100PX / "boneage-training-dataset")
    assert len(labels) == 10719
    split = read_split(RSNA_100PX / "seed-split.csv", labels)
    assert split["split"].value_counts().to_dict() == {"train": 8827, "val": 1892}
    merged = labels.merge(split, on="id")
    stages = pd.crosstab(stage_of(merged["boneage"].to_numpy()), merged["split"], normalize="columns")
    assert (stages["train"] - stages["val"]).abs().max() < 0.02  # the seed's split is stage-stratified


@needs_100px
def test_rsna_100px_images_decode():
    labels = read_labels(RSNA_100PX / "boneage-training-dataset.csv", RSNA_100PX / "boneage-training-dataset")
    for path in labels["path"][:50]:
        image = read_image(path)
        assert image.shape == (100, 100) and 0 <= image.min() < image.max() <= 1


@needs_fullres
def test_fullres_samples_decode_including_palette_files():
    from PIL import Image

    paths = sorted((FULLRES / "images").glob("*.png"))
    assert len(paths) == 35
    modes = set()
    for path in paths:
        with Image.open(path) as img:
            modes.add(img.mode)
        image = read_image(path)
        assert image.ndim == 2 and image.shape[0] > 1000 and image.std() > 0.05
    assert "P" in modes  # the palette-mode files decode like the rest
