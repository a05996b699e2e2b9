"""Checks on the real RSNA copies in ../shared/data; every test skips cleanly where that data is absent."""

from __future__ import annotations

import pandas as pd
import pytest

from boneage.imageio import read_image
from boneage.labels import read_labels, read_split, stage_of
from tests.helpers import FULLRES, RSNA_100PX

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


@needs_fullres
def test_the_rsna_challenge_key_format_scores_the_samples_as_the_plain_labels(tmp_path):
    """The shipped model on the 35 full-resolution samples, with sex from an RSNA-style `Case ID,Sex` file and
    scored against an RSNA-style test key: the same rows and MAE as with the plain labels, and the labels given as
    readings come back beside each bone age."""
    from boneage.evaluate import evaluate
    from boneage.predict import predict_paths

    labels = pd.read_csv(FULLRES / "labels.csv", dtype={"id": str})
    sex = labels["male"].map({True: "M", False: "F"})
    key = tmp_path / "key.csv"
    pd.DataFrame({"Case ID": labels["id"], "Sex": sex, "Ground truth bone age (months)": labels["boneage"]}).to_csv(
        key, index=False
    )
    table = predict_paths([FULLRES / "images"], tmp_path / "p.csv", metadata=key, progress=False)
    assert (table["status"] == "ok").all() and table["male"].tolist() == labels.set_index("id").loc[
        table["id"], "male"
    ].tolist()
    reading = table.set_index("id")["reader_bone_age_months"]
    assert (reading == labels.set_index("id").loc[reading.index, "boneage"]).all()
    plain = evaluate(tmp_path / "p.csv", FULLRES / "labels.csv")
    rsna = evaluate(tmp_path / "p.csv", key)
    assert rsna["regression"]["mae_months"] == pytest.approx(plain["regression"]["mae_months"])
    assert rsna["n_scored"] == 35
