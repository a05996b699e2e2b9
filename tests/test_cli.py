"""The real command line, end to end on a synthetic RSNA-style folder."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from boneage.cli import main
from boneage.model import load_model_folder


def test_cli_split_validate_train(tmp_path, rsna_folder, capsys):
    labels, images = rsna_folder
    assert (
        main(["split", "--labels", str(labels), "--images", str(images), "--output", str(tmp_path / "split.csv")]) == 0
    )
    split = pd.read_csv(tmp_path / "split.csv")
    assert split["split"].value_counts().to_dict() == {"train": 33, "val": 7, "test": 8}
    assert main(["validate", "--labels", str(labels), "--images", str(images), "--decode"]) == 0
    assert "48 valid rows, 24 male" in capsys.readouterr().out

    code = main(
        [
            "train",
            "--labels",
            str(labels),
            "--images",
            str(images),
            "--split",
            str(tmp_path / "split.csv"),
            "--output",
            str(tmp_path / "run"),
            "--image-size",
            "64",
            "--pretrained",
            "auto",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--warmup-epochs",
            "0",
            "--num-workers",
            "0",
            "--progress-bar",
            "false",
        ]
    )
    assert code == 0
    model, description = load_model_folder(tmp_path / "run" / "model")
    assert description["data_contract"]["image_size"] == 64
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_val"] == 7


def test_cli_reports_bad_data_without_a_traceback(tmp_path, rsna_folder, capsys):
    labels, images = rsna_folder
    frame = pd.read_csv(labels, dtype=str)
    frame.loc[0, "boneage"] = "twelve"
    frame.to_csv(labels, index=False)
    code = main(["train", "--labels", str(labels), "--images", str(images), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "boneage train: error:" in err and "row 2" in err and "'twelve' is not a number" in err
    assert "Traceback" not in err
    assert main(["train", "--output", str(tmp_path / "x")]) == 2
    assert "--labels FILE --images DIR" in capsys.readouterr().err


def test_cli_gradcam_shows_the_answer_predict_gives(tmp_path, monkeypatch):
    from PIL import Image

    import boneage.explain as explain
    from tests.helpers import make_tiny_model, synthetic_radiograph

    folder = make_tiny_model(tmp_path / "model")
    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100)).save(image)
    seen: dict = {}
    real = explain.gradcam_grid

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(explain, "gradcam_grid", spy)
    common = [str(image), "--sex", "F", "--model", str(folder)]
    assert main(["gradcam", *common, "--output", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["predict", *common, "--backend", "torch", "--output", str(tmp_path / "p.csv")]) == 0
    months = pd.read_csv(tmp_path / "p.csv")["bone_age_months"][0]
    assert seen["answers"] == [f"bone age {months:.1f} months"]


@pytest.mark.slow  # fits every refusal check and exports ONNX again (minutes on 2 cores)
def test_cli_fit_checks_gives_a_trained_folder_the_refusals(tmp_path, capsys):
    import numpy as np
    import pytest

    pytest.importorskip("onnxruntime")
    pytest.importorskip("sklearn")
    from boneage.backends.onnx import OnnxPredictor
    from boneage.export import attach_onnx
    from boneage.predict import predict_paths
    from tests.helpers import make_tiny_model, write_rsna_folder

    labels, images = write_rsna_folder(tmp_path / "data", n=48, size=64)
    ids = pd.read_csv(labels, dtype={"id": str})["id"]
    split = tmp_path / "split.csv"
    pd.DataFrame({"id": ids, "split": ["train"] * 36 + ["val"] * 12}).to_csv(split, index=False)
    folder = make_tiny_model(tmp_path / "model", image_size=64, standardize=True)
    attach_onnx(folder)  # an exported folder: without the check its graph has no refusal score
    assert OnnxPredictor(folder).threshold is None
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(blank)
    args = ["--model", str(folder), "--labels", str(labels), "--images", str(images), "--split", str(split)]
    umask = os.umask(0o022)
    try:
        assert main(["fit-checks", *args]) == 0
    finally:
        os.umask(umask)
    # every file of the folder readable by the service account that will load it, as the umask allows
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in folder.iterdir()), folder
    printed = capsys.readouterr().out
    assert (
        "not assessable: learnt the train images as given only; threshold set on val calibration half (n=6)" in printed
    )
    assert "model.onnx exported again" in printed
    stored = json.loads((folder / "config.json").read_text())
    assert {"assessability", "polarity", "orientation"} <= set(stored)
    assert OnnxPredictor(folder).threshold == pytest.approx(stored["assessability"]["threshold"])
    bare = OnnxPredictor(folder / "model.onnx")  # the .onnx file alone carries every check in its metadata
    assert bare.threshold == pytest.approx(stored["assessability"]["threshold"]) and bare.presentation is not None
    for backend in ("onnx", "torch"):  # both backends now refuse what the check refuses
        rows = predict_paths([blank], tmp_path / f"{backend}.csv", model_dir=folder, sex="F", backend=backend)
        assert rows["status"].tolist() == ["not assessable"], backend


def test_cli_fit_checks_names_a_split_too_small(tmp_path, rsna_folder, capsys):
    labels, images = rsna_folder
    split = tmp_path / "split.csv"
    ids = pd.read_csv(labels, dtype={"id": str})["id"]
    pd.DataFrame({"id": ids, "split": ["val"] * len(ids)}).to_csv(split, index=False)
    from tests.helpers import make_tiny_model

    folder = make_tiny_model(tmp_path / "model")
    args = ["--model", str(folder), "--labels", str(labels), "--images", str(images), "--split", str(split)]
    assert main(["fit-checks", *args]) != 0
    assert "fitting the checks needs at least 32 train and 4 val images; found 0 and 48" in capsys.readouterr().err


def test_cli_fit_checks_passes_no_trained_views(tmp_path, monkeypatch, capsys):
    import boneage.fit_checks

    seen = []

    def fake_fit_checks(**kwargs):
        seen.append(kwargs["trained_views"])
        raise ValueError("stopped here")

    monkeypatch.setattr(boneage.fit_checks, "fit_checks", fake_fit_checks)
    args = ["--model", "m", "--labels", "l.csv", "--images", "i", "--split", "s.csv"]
    assert main(["fit-checks", *args]) != 0 and main(["fit-checks", *args, "--no-trained-views"]) != 0
    assert seen == [True, False]


def test_output_piped_into_a_reader_that_stops_is_not_a_crash(tmp_path, monkeypatch):
    """`boneage predict ... | head -1`: the CSV is written whole; the closed pipe ends the run quietly (exit 1)."""
    import sys

    from PIL import Image

    from tests.helpers import make_tiny_model, synthetic_radiograph

    model = make_tiny_model(tmp_path / "model")
    for k in range(3):
        Image.fromarray(synthetic_radiograph(60 + 30 * k, seed=k)).save(tmp_path / f"{k}.png")
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    stdout = os.fdopen(write, "w", buffering=1)  # line-buffered, as a terminal: the first line meets the closed pipe
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "p.csv"
    images = [str(tmp_path / f"{k}.png") for k in range(3)]
    args = ["predict", *images, "--model", str(model), "--sex", "F"]
    assert main([*args, "--quiet", "--output", str(out)]) == 1
    assert len(pd.read_csv(out)) == 3  # every row written before the printing failed
