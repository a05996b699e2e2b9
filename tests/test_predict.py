from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from boneage.backends.torch import TorchPredictor
from boneage.cli import main
from boneage.errors import ModelLoadError
from boneage.inputs import collect_images
from boneage.predict import predict_paths
from boneage.rows import PREDICTION_COLUMNS, format_age
from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_tiny_model(tmp_path / "model")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    Image.fromarray(synthetic_radiograph(30)).save(folder / "a.png")
    Image.fromarray(synthetic_radiograph(150)).save(folder / "nested" / "b.jpg")
    write_dicom(folder / "c.dcm", synthetic_radiograph(90).astype("uint16") * 16)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_sex_from_the_dicom_header(model_dir, tmp_path):
    path = write_dicom(tmp_path / "h.dcm", synthetic_radiograph(90).astype("uint16") * 16, PatientSex="F")
    table = predict_paths([path], tmp_path / "p.csv", model_dir=model_dir, progress=False)
    assert table["status"][0] == "ok" and table["male"].tolist() == [False]
    male = predict_paths([path], tmp_path / "m.csv", model_dir=model_dir, sex="M", progress=False)
    assert male["male"].tolist() == [True]  # the --sex flag wins over the header


def test_format_age():
    assert format_age(182.4) == "15y 2m" and format_age(11.6) == "1y 0m" and format_age(0) == "0y 0m"


def test_collect_images_recurses_and_keeps_missing_files(image_folder, tmp_path):
    found = collect_images([image_folder, image_folder / "a.png", tmp_path / "missing.png"])
    names = [p.name for p in found]
    assert names == ["a.png", "broken.png", "c.dcm", "b.jpg", "missing.png"]


def test_scanned_films_in_tiff_bmp_and_webp_are_read_like_png(model_dir, tmp_path):
    pixels = synthetic_radiograph(90)
    pixels[0, 0], pixels[0, 1] = 0, 255  # full range: a 16-bit copy, min-max scaled, then reads as x / 255 too
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(pixels).save(scans / "a.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(scans / "b.tiff")  # 16-bit, as film digitisers write
    Image.fromarray(pixels).save(scans / "c.bmp")
    Image.fromarray(pixels).save(scans / "d.webp", lossless=True)
    assert [p.name for p in collect_images([scans])] == ["a.png", "b.tiff", "c.bmp", "d.webp"]
    table = predict_paths([scans], tmp_path / "p.csv", model_dir=model_dir, sex="F", progress=False)
    assert table["id"].tolist() == ["a", "b", "c", "d"] and (table["status"] == "ok").all()
    assert np.ptp(table["bone_age_months"].to_numpy()) < 1e-3  # the same pixels give the same age in every format


def test_a_dicom_export_is_read_whatever_its_file_names(model_dir, tmp_path):
    export = tmp_path / "export" / "DICOM" / "ST000001"
    export.mkdir(parents=True)
    pixels = synthetic_radiograph(90).astype("uint16") * 16
    write_dicom(export / "IM000001", pixels, PatientSex="F")
    write_dicom(export / "1.2.826.0.1.3680043.8.498.11", pixels, PatientSex="M")  # named by its UID
    write_dicom(export / "1.2.826.0.1.3680043.8.498.12", pixels, PatientSex="M")  # same stem as the one above
    write_dicom(tmp_path / "export" / "DICOMDIR", pixels)  # the export's index: not an image
    (export / "VERSION").write_text("not DICOM")
    found = collect_images([tmp_path / "export"])
    assert [p.name for p in found] == ["1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12", "IM000001"]
    metadata = tmp_path / "meta.csv"
    pd.DataFrame({"id": ["1.2.826.0.1.3680043.8.498.12"], "chronological_age_months": [100]}).to_csv(
        metadata, index=False
    )
    table = predict_paths([tmp_path / "export"], tmp_path / "p.csv", model_dir=model_dir, metadata=metadata)
    assert table["id"].tolist() == [p.name for p in found]  # distinct ids, the metadata matched by the whole name
    assert table["status"].tolist() == ["ok"] * 3 and table["male"].tolist() == [True, True, False]
    assert table["chronological_age_months"].isna().tolist() == [True, False, True]


def test_predict_batch_goes_on_past_bad_files(image_folder, model_dir, tmp_path):
    out = tmp_path / "preds.csv"
    metadata = tmp_path / "meta.csv"
    pd.DataFrame({"id": ["a", "b"], "male": ["M", "F"]}).to_csv(metadata, index=False)
    table = predict_paths([image_folder], out, model_dir=model_dir, metadata=metadata, progress=False)
    written = pd.read_csv(out, dtype={"id": str})
    assert list(written.columns) == PREDICTION_COLUMNS
    assert written["id"].tolist() == ["a", "broken", "c", "b"]
    by_id = written.set_index("id")
    assert by_id.loc["a", "status"] == "ok" and by_id.loc["b", "status"] == "ok"
    assert "broken.png: cannot decode" in by_id.loc["broken", "message"]
    assert by_id.loc["c", "status"] == "error" and "sex unknown" in by_id.loc["c", "message"]  # no PatientSex
    assert by_id.loc["a", "stage"] in {"Infant/Toddler", "Child", "Pre-adolescent", "Adolescent"}
    assert 0 < by_id.loc["a", "bone_age_months"] < 400
    assert len(table) == 4


def test_predictions_match_the_model_and_sex_matters(image_folder, model_dir, tmp_path):
    predictor = TorchPredictor.load(model_dir)
    female = predict_paths([image_folder / "a.png"], tmp_path / "f.csv", model_dir=model_dir, sex="F", progress=False)
    male = predict_paths([image_folder / "a.png"], tmp_path / "m.csv", model_dir=model_dir, sex="M", progress=False)
    from boneage.dataset import preprocess

    image = preprocess(image_folder / "a.png", predictor.contract)[None]
    expected, _ = predictor.predict_tensor(image, torch.tensor([0]))
    assert female["bone_age_months"][0] == pytest.approx(float(expected[0]), abs=0.01)
    assert female["bone_age_months"][0] != male["bone_age_months"][0]


def test_cli_predict_exit_codes(image_folder, model_dir, tmp_path, capsys):
    good = main(
        [
            "predict",
            str(image_folder / "a.png"),
            "--model",
            str(model_dir),
            "--sex",
            "F",
            "--output",
            str(tmp_path / "one.csv"),
            "--quiet",
        ]
    )
    assert good == 0 and "a: bone age" in capsys.readouterr().out
    partial = main(
        [
            "predict",
            str(image_folder),
            "--model",
            str(model_dir),
            "--sex",
            "M",
            "--output",
            str(tmp_path / "all.csv"),
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert partial == 3 and "3 predicted; not predicted: 1 error" in captured.out and "broken.png" in captured.err
    assert main(["predict", str(image_folder / "a.png"), "--model", str(model_dir), "--sex", "X"]) == 2
    assert "--sex: expected M or F" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "empty_dir_absent"), "--model", str(tmp_path / "nope")]) == 2


def test_tta_averages_the_image_and_its_mirror(image_folder, model_dir, tmp_path):
    from boneage.dataset import preprocess

    predictor = TorchPredictor.load(model_dir)
    image = preprocess(image_folder / "a.png", predictor.contract)[None]
    male = torch.tensor([1])
    plain, _ = predictor.predict_tensor(image, male)
    mirrored, _ = predictor.predict_tensor(image.flip(-1), male)
    predictor.tta_hflip = True
    averaged, _ = predictor.predict_tensor(image, male)
    assert float(averaged[0]) == pytest.approx((float(plain[0]) + float(mirrored[0])) / 2, abs=1e-4)
    table = predict_paths(
        [image_folder / "a.png"], tmp_path / "t.csv", model_dir=model_dir, sex="M", tta=True, progress=False
    )
    assert table["bone_age_months"][0] == pytest.approx(float(averaged[0]), abs=0.01)


def test_a_model_folder_can_ask_for_tta_by_default_and_the_user_can_turn_it_off(image_folder, model_dir, tmp_path):
    import json

    one = [image_folder / "a.png"]
    common = {"model_dir": model_dir, "sex": "M", "progress": False}
    plain = predict_paths(one, tmp_path / "plain.csv", **common)["bone_age_months"][0]
    averaged = predict_paths(one, tmp_path / "tta.csv", tta=True, **common)["bone_age_months"][0]
    assert abs(plain - averaged) > 1e-3  # the tiny model is not mirror-symmetric, so the test can tell them apart
    config = json.loads((model_dir / "config.json").read_text())
    config["output"]["tta_hflip"] = True
    (model_dir / "config.json").write_text(json.dumps(config))
    assert TorchPredictor.load(model_dir).tta_hflip
    assert predict_paths(one, tmp_path / "d.csv", **common)["bone_age_months"][0] == pytest.approx(averaged, abs=1e-3)
    off = predict_paths(one, tmp_path / "off.csv", tta=False, **common)["bone_age_months"][0]
    assert off == pytest.approx(plain, abs=1e-3)
    argv = ["predict", str(one[0]), "--model", str(model_dir), "--sex", "M", "--quiet", "--output"]
    assert main([*argv, str(tmp_path / "cli.csv"), "--no-tta"]) == 0
    assert pd.read_csv(tmp_path / "cli.csv")["bone_age_months"][0] == pytest.approx(plain, abs=0.01)
    config["output"]["tta_hflip"] = "yes"  # not a boolean: refused, naming the file and the field
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config.json: output.tta_hflip: expected true or false"):
        TorchPredictor.load(model_dir)


def test_json_output_has_the_same_rows(image_folder, model_dir, tmp_path):
    import json

    table = predict_paths([image_folder], tmp_path / "p.json", model_dir=model_dir, sex="F", progress=False)
    document = json.loads((tmp_path / "p.json").read_text())
    assert document["model"]["weights_sha256"] and len(document["predictions"]) == len(table) == 4
    first = document["predictions"][0]
    assert set(first) == set(PREDICTION_COLUMNS) and first["id"] == "a" and first["status"] == "ok"
    assert first["bone_age_months"] == pytest.approx(table["bone_age_months"][0])
    assert not (tmp_path / "p.partial.jsonl").exists()


def test_resume_keeps_what_a_stopped_run_wrote_and_predicts_the_rest(image_folder, model_dir, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    args = ["predict", str(image_folder), "--model", str(model_dir), "--sex", "F", "--quiet", "--output", str(out)]
    assert main(args) == 3  # broken.png is an error row
    full = pd.read_csv(out, dtype={"id": str}).set_index("id")
    lines = out.read_text().splitlines()  # header, a, broken, c, b
    stopped = [lines[0], lines[1].replace(f"{full.at['a', 'bone_age_months']}", "999.0", 1), lines[2], lines[3][:20]]
    out.write_text("\n".join(stopped))  # a kept (marked), broken to retry, c cut off mid-line, b never reached
    assert main([*args, "--resume"]) == 3
    resumed = pd.read_csv(out, dtype={"id": str})
    assert sorted(resumed["id"]) == ["a", "b", "broken", "c"]  # each file once
    resumed = resumed.set_index("id")
    assert resumed.at["a", "bone_age_months"] == 999.0  # kept, not predicted again
    for image in ("b", "c"):
        assert resumed.at[image, "bone_age_months"] == pytest.approx(full.at[image, "bone_age_months"])
    assert resumed.at["broken", "status"] == "error"  # tried again
    assert "a: bone age 999.0 months" in capsys.readouterr().out  # the summary counts the kept rows
    assert main(args) == 3 and pd.read_csv(out, dtype={"id": str}).set_index("id").at["a", "bone_age_months"] != 999.0

    as_json = tmp_path / "preds.json"
    table = predict_paths([image_folder], as_json, model_dir=model_dir, sex="M", progress=False)
    stream = as_json.with_suffix(".partial.jsonl")
    stream.write_text("\n".join(json.dumps(row) for row in json.loads(as_json.read_text())["predictions"][:2]))
    again = predict_paths([image_folder], as_json, model_dir=model_dir, sex="M", progress=False, resume=True)
    assert again["id"].tolist()[:2] == table["id"].tolist()[:2] and sorted(again["id"]) == sorted(table["id"])
    assert not stream.exists() and len(json.loads(as_json.read_text())["predictions"]) == len(table)

    other = tmp_path / "other.csv"
    other.write_text("id,boneage,male\n1,2,M\n")
    with pytest.raises(ValueError, match="cannot resume: its columns"):
        predict_paths([image_folder], other, model_dir=model_dir, sex="M", progress=False, resume=True)


def test_a_readers_bone_age_is_set_beside_the_models(image_folder, model_dir, tmp_path):
    from boneage.uncertainty import store_interval

    store_interval(model_dir, {"half_width_months": 10.0, "coverage_nominal": 0.9})
    out = tmp_path / "preds.csv"
    first = predict_paths([image_folder], out, model_dir=model_dir, sex="F", progress=False).set_index("id")
    model = first.at["a", "bone_age_months"]
    labels = tmp_path / "labels.csv"  # a labels CSV as metadata: its boneage is a reader's reading
    labels.write_text(f"id,boneage,male\na,{model + 3:.2f},F\nc,{model + 40:.2f},M\nbroken,100,F\n")
    from boneage.inputs import _parse_metadata

    parsed = _parse_metadata.cache_info().misses
    table = predict_paths([image_folder], out, model_dir=model_dir, metadata=labels, progress=False).set_index("id")
    assert _parse_metadata.cache_info().misses == parsed + 1  # sexes, ages and readings: the file parsed once
    assert table.at["a", "reader_minus_model_months"] == pytest.approx(3.0, abs=0.01)
    assert table.at["a", "message"] == ""  # inside the interval
    assert table.at["c", "message"].startswith(f"the reader's {model + 40:.2f} months is outside the model's 90%")
    assert table.at["broken", "reader_bone_age_months"] == 100.0 and table.at["broken", "status"] == "error"
    assert pd.isna(table.at["b", "reader_bone_age_months"])  # not in the labels: no reading
    written = pd.read_csv(out, dtype={"id": str}).set_index("id")
    assert written.at["c", "reader_bone_age_months"] == pytest.approx(model + 40, abs=0.01)
    single = predict_paths([image_folder / "a.png"], out, model_dir=model_dir, sex="F", reading=60, progress=False)
    assert single.at[0, "reader_bone_age_months"] == 60.0
    labels.write_text("id,boneage,male\na,old,F\n")
    with pytest.raises(ValueError, match="id a, boneage: expected a number of months"):
        predict_paths([image_folder], out, model_dir=model_dir, metadata=labels, progress=False)


def test_resolve_sexes_precedence_and_gradcam_refuses_unknown_sex(image_folder, model_dir, tmp_path, capsys):
    from boneage.inputs import resolve_sexes

    dicom = write_dicom(tmp_path / "d.dcm", synthetic_radiograph(90).astype("uint16") * 16, PatientSex="M")
    plain = image_folder / "a.png"
    metadata = tmp_path / "meta.csv"
    pd.DataFrame({"id": ["a"], "male": ["F"]}).to_csv(metadata, index=False)
    assert resolve_sexes([plain, dicom]) == [None, True]
    assert resolve_sexes([plain, dicom], sex="F") == [False, False]
    assert resolve_sexes([plain, dicom], sex="M", metadata=metadata) == [False, True]
    with pytest.raises(ValueError, match="--sex: expected M or F"):
        resolve_sexes([plain], sex="unknown")
    rsna_test = tmp_path / "boneage-test-dataset.csv"  # the RSNA challenge's own file: Case ID, Sex
    rsna_test.write_text("Case ID,Sex\na,F\nd, U\n")
    assert resolve_sexes([plain, dicom], metadata=rsna_test) == [False, True]
    assert resolve_sexes([dicom.with_name("a.dcm"), tmp_path / "d.png"], metadata=rsna_test) == [False, None]
    rsna_test.write_text("Case ID;Sex\na;M\n")  # saved by a spreadsheet that separates with semicolons
    assert resolve_sexes([plain], metadata=rsna_test) == [True]
    assert main(["gradcam", str(plain), "--model", str(model_dir), "--output", str(tmp_path / "g.png")]) == 2
    assert "sex unknown for" in capsys.readouterr().err and not (tmp_path / "g.png").exists()


def test_a_csv_lists_images_relative_to_itself(image_folder, tmp_path):
    listing = image_folder / "list.csv"
    listing.write_text("path\na.png\nnested/b.jpg\nmissing.png\n")
    assert collect_images([listing]) == [
        image_folder / "a.png",
        image_folder / "nested" / "b.jpg",
        image_folder / "missing.png",
    ]
    (tmp_path / "bad.csv").write_text("file\na.png\n")
    with pytest.raises(ValueError, match="'path' column"):
        collect_images([tmp_path / "bad.csv"])
