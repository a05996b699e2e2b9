from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from boneage.cli import main
from boneage.config import DataConfig, ModelConfig
from boneage.model import BoneAgeNet, load_model_folder, save_model_folder
from boneage.model_folder import correct_months
from boneage.predict import predict_paths
from boneage.uncertainty import (
    _scored_halves,
    calibrate_interval,
    conformal_half_width,
    fit_stretch_correction,
    store_interval,
)
from tests.helpers import write_rsna_folder


def test_conformal_half_width_by_hand():
    residuals = np.arange(1, 11, dtype=float)  # |r| = 1..10, n = 10
    assert conformal_half_width(residuals, 0.9) == 10.0  # rank ceil(11 * 0.9) = 10
    assert conformal_half_width(residuals, 0.5) == 6.0  # rank ceil(5.5) = 6
    assert conformal_half_width(-residuals, 0.5) == 6.0
    with pytest.raises(ValueError):
        conformal_half_width(np.array([]), 0.9)


def test_calibration_reaches_nominal_coverage_on_the_other_half(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    truth = rng.uniform(1, 228, n).round()
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": [str(i) for i in range(n)], "boneage": truth, "male": rng.random(n) < 0.5}).to_csv(
        labels, index=False
    )
    preds = tmp_path / "preds.csv"
    pd.DataFrame({"id": [str(i) for i in range(n)], "bone_age_months": truth + rng.normal(0, 10, n)}).to_csv(
        preds, index=False
    )
    interval = calibrate_interval(preds, labels, coverage=0.9)
    assert interval["half_width_months"] == pytest.approx(16.45, abs=1.5)  # 1.645 sigma for a normal error
    assert interval["calibration"]["n"] + interval["evaluation"]["n"] == n
    assert 0.87 <= interval["evaluation"]["coverage"] <= 0.93
    by_stage = interval["evaluation"]["coverage_by_reference_stage"]
    assert sum(part["n"] for part in by_stage.values()) == interval["evaluation"]["n"]
    assert all(0.8 <= part["coverage"] <= 1.0 for part in by_stage.values())  # errors here do not depend on age


def test_variants_widen_the_interval_and_keep_each_copy_in_its_images_half(tmp_path, capsys):
    """Copies of the images read worse (as tightly framed films are): calibrated with them, the interval holds for
    both; a copy never lands in the other half from its image, and ids the main file lacks are left out."""
    rng = np.random.default_rng(1)
    n = 2000
    ids = [str(i) for i in range(n)]
    truth = rng.uniform(1, 228, n).round()
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"id": ids, "boneage": truth, "male": rng.random(n) < 0.5}).to_csv(labels, index=False)
    preds, copies = tmp_path / "preds.csv", tmp_path / "copies.csv"
    pd.DataFrame({"id": ids, "bone_age_months": truth + rng.normal(0, 10, n), "status": "ok"}).to_csv(
        preds, index=False
    )
    status = np.where(np.arange(n) < 100, "not assessable", "ok")  # refused copies are not scored
    copy = pd.DataFrame({"id": ids, "bone_age_months": truth + rng.normal(0, 14, n), "status": status})
    pd.concat([copy, pd.DataFrame({"id": ["x"], "bone_age_months": [5.0], "status": ["ok"]})]).to_csv(
        copies, index=False
    )
    alone = calibrate_interval(preds, labels)
    both = calibrate_interval(preds, labels, variants=[copies])
    fit, held = both["calibration"]["variants"][str(copies)], both["evaluation"]["variants"][str(copies)]
    joined, halves = _scored_halves(preds, labels, 0)
    calibration_ids = set(joined["id"][halves == "train"])
    accepted = set(copy["id"][copy["status"] == "ok"])
    assert fit["n"] == len(accepted & calibration_ids)  # each copy in its image's half, never the other
    assert held["n"] == len(accepted - calibration_ids) and fit["left_out"] == 1  # "x": no such image scored
    # one quantile over sigma 10 and sigma 14: between the two normal 90% half-widths
    assert 16.45 + 1 < both["half_width_months"] < 1.645 * 14 - 1
    assert both["evaluation"]["coverage"] > alone["evaluation"]["coverage"] + 0.02
    assert 0.84 <= held["coverage"] <= 0.9  # closer to 90% for the copies than the images' own interval gets
    argv = ["calibrate", "--predictions", str(preds), "--labels", str(labels), "--variant", str(copies)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{copies}: {fit['n']} copies calibrated with them; coverage {held['coverage']:.1%}" in printed
    assert "(1 copies of images not scored here left out)" in printed
    pd.DataFrame({"id": ["y"], "bone_age_months": [5.0], "status": ["ok"]}).to_csv(copies, index=False)
    with pytest.raises(ValueError, match=r"copies.csv: no accepted copy of an image scored in .*preds.csv"):
        calibrate_interval(preds, labels, variants=[copies])


def test_stored_interval_reaches_the_prediction_csv(tmp_path):
    labels, images = write_rsna_folder(tmp_path / "data", n=24, size=64)
    model = BoneAgeNet(ModelConfig(pretrained="none", target_offset=110, target_scale=60)).eval()
    folder = save_model_folder(tmp_path / "model", model, DataConfig(image_size=64))
    store_interval(folder, {"half_width_months": 12.5, "coverage_nominal": 0.9})
    load_model_folder(folder)  # the weights' checksum still holds
    table = predict_paths([images], tmp_path / "p.csv", model_dir=folder, sex="F", progress=False)
    assert np.allclose(table["upper_months"] - table["bone_age_months"], 12.5, atol=0.011)
    assert (table["lower_months"] >= 0).all()

    predict_paths([images], tmp_path / "val.csv", model_dir=folder, sex="F", progress=False)
    assert (
        main(["calibrate", "--predictions", str(tmp_path / "val.csv"), "--labels", str(labels), "--model", str(folder)])
        == 0
    )
    assert load_model_folder(folder)[1]["uncertainty"]["evaluation"]["n"] == 12


def test_stretch_correction_undoes_the_pull_towards_the_mean_on_the_other_half(tmp_path):
    rng = np.random.default_rng(3)
    n = 800
    truth = rng.uniform(6, 222, n)
    predicted = 127.0 + 0.8 * (truth - 127.0) + rng.normal(0, 6, n)  # the young read old, the old read young
    ids = [str(i) for i in range(n)]
    labels, preds = tmp_path / "labels.csv", tmp_path / "preds.csv"
    pd.DataFrame({"id": ids, "boneage": truth, "male": rng.random(n) < 0.5}).to_csv(labels, index=False)
    pd.DataFrame({"id": ids, "bone_age_months": predicted, "status": "ok"}).to_csv(preds, index=False)
    correction = fit_stretch_correction(preds, labels)
    slope, intercept = correction["male"]
    assert correction["female"] == correction["male"]
    assert slope == pytest.approx(1 / 0.8, rel=0.05) and intercept == pytest.approx(127.0 - 127.0 / 0.8, abs=3)
    held = correction["evaluation"]
    assert held["n"] + correction["fit_on"]["n"] == n  # fit on one half, measured on the other
    assert held["bias_by_reference_stage_uncorrected"]["Infant/Toddler"] > 10
    assert held["bias_by_reference_stage_uncorrected"]["Adolescent"] < -10
    assert all(abs(bias) < 2 for bias in held["bias_by_reference_stage"].values())
    # in the model folder's form, applied by correct_months at prediction time
    corrected = correct_months(predicted, np.ones(n, bool), {"output": {"correction": correction}})
    assert np.abs(corrected - truth).mean() < np.abs(predicted - truth).mean()
    flat = pd.DataFrame({"id": ids, "bone_age_months": 100 - 0.1 * truth, "status": "ok"})
    flat.to_csv(preds, index=False)
    with pytest.raises(ValueError, match="do not rise with the reference age"):
        fit_stretch_correction(preds, labels)


def _pulled_towards_the_mean(tmp_path, n=800, seed=3):
    rng = np.random.default_rng(seed)
    truth = rng.uniform(6, 222, n)
    predicted = 127.0 + 0.8 * (truth - 127.0) + rng.normal(0, 6, n)
    ids = [str(i) for i in range(n)]
    labels, preds = tmp_path / "labels.csv", tmp_path / "preds.csv"
    pd.DataFrame({"id": ids, "boneage": truth, "male": rng.random(n) < 0.5}).to_csv(labels, index=False)
    pd.DataFrame({"id": ids, "bone_age_months": predicted, "status": "ok"}).to_csv(preds, index=False)
    return labels, preds, truth, predicted


def test_stretch_strength_moves_that_share_of_the_way_to_the_full_inverse(tmp_path):
    labels, preds, truth, predicted = _pulled_towards_the_mean(tmp_path)
    full, half = fit_stretch_correction(preds, labels), fit_stretch_correction(preds, labels, strength=0.5)
    assert half["strength"] == 0.5 and half["fit_on"] == full["fit_on"]  # the same line, fit on the same half
    corrected = {
        name: correct_months(predicted, np.ones(len(predicted), bool), {"output": {"correction": c}})
        for name, c in (("full", full), ("half", half))
    }
    np.testing.assert_allclose(corrected["half"], predicted + 0.5 * (corrected["full"] - predicted), atol=0.01)
    young = half["evaluation"]["bias_by_reference_stage"]["Infant/Toddler"]
    before = half["evaluation"]["bias_by_reference_stage_uncorrected"]["Infant/Toddler"]
    assert 0.3 * before < young < 0.7 * before  # about half the youngest's bias left
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="stretch strength"):
            fit_stretch_correction(preds, labels, strength=strength)


def test_calibrate_stretch_stores_the_correction_and_an_interval_around_the_corrected_output(tmp_path, capsys):
    labels, preds, truth, predicted = _pulled_towards_the_mean(tmp_path)
    model = BoneAgeNet(ModelConfig(pretrained="none")).eval()
    folder = save_model_folder(tmp_path / "model", model, DataConfig(image_size=32))
    args = ["calibrate", "--predictions", str(preds), "--labels", str(labels), "--model", str(folder)]
    assert main([*args, "--stretch", "0.5"]) == 0
    assert "stretch correction at strength 0.5" in capsys.readouterr().out
    description = load_model_folder(folder)[1]  # the weights' checksum still holds
    correction = description["output"]["correction"]
    assert correction == fit_stretch_correction(preds, labels, strength=0.5)
    expected = calibrate_interval(preds, labels, correction=correction)
    assert description["uncertainty"]["half_width_months"] == expected["half_width_months"]
    assert expected["half_width_months"] != calibrate_interval(preds, labels)["half_width_months"]
    # a folder that already corrects its output would correct twice: refused, naming the field
    assert main([*args, "--stretch", "0.5"]) == 2
    assert "already applies an output.correction" in capsys.readouterr().err
