from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from boneage.cli import main
from boneage.errors import DataValidationError
from boneage.evaluate import evaluate
from boneage.imageio import STAGE_NAMES
from boneage.labels import stage_of
from boneage.metrics import bootstrap_intervals, headline, quadratic_weighted_kappa, regression_metrics, stage_metrics


def test_regression_metrics_by_hand():
    truth = np.array([10.0, 20.0, 30.0, 40.0])
    predicted = np.array([12.0, 18.0, 36.0, 40.0])  # errors +2, -2, +6, 0
    m = regression_metrics(truth, predicted)
    assert m["mae_months"] == pytest.approx(2.5) and m["mae_years"] == pytest.approx(2.5 / 12)
    assert m["rmse_months"] == pytest.approx(np.sqrt((4 + 4 + 36 + 0) / 4))
    assert m["r2"] == pytest.approx(1 - 44 / 500)  # SS_res 44, SS_tot 500
    assert m["median_ae_months"] == pytest.approx(2.0)
    assert m["mean_signed_error_months"] == pytest.approx(1.5)
    assert m["within_months"] == {"6": 1.0, "12": 1.0, "18": 1.0}
    assert m["abs_error_percentiles_months"]["50"] == pytest.approx(2.0)


def test_stage_metrics_and_qwk_by_hand():
    true = np.array([0, 1, 2, 3])
    predicted = np.array([0, 1, 3, 3])
    m = stage_metrics(true, predicted)
    assert m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    # QWK = 1 - sum(w*O)/sum(w*E), w_ij=(i-j)^2/9; O has one (2,3) cell; E = outer(row, col)/n
    observed = np.array(m["confusion_matrix"], dtype=float)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = np.subtract.outer(np.arange(4), np.arange(4)) ** 2 / 9
    assert m["quadratic_weighted_kappa"] == pytest.approx(1 - (weights * observed).sum() / (weights * expected).sum())
    assert m["quadratic_weighted_kappa"] == pytest.approx(1 - (1 / 9) / (12 / 9))  # = 11/12
    assert m["per_stage"]["Adolescent"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}


@pytest.fixture
def files(tmp_path):
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"id": ["1", "2", "3", "4", "5"], "boneage": [30, 90, 150, 200, 100], "male": [True, True, False, False, True]}
    ).to_csv(labels, index=False)
    preds = tmp_path / "preds.csv"
    pd.DataFrame(
        {
            "id": ["1", "2", "3", "4", "5"],
            "bone_age_months": [36.0, 84.0, 150.0, 190.0, None],
            "stage": ["Infant/Toddler", "Child", "Pre-adolescent", "Adolescent", None],
            "status": ["ok", "ok", "ok", "ok", "error"],
        }
    ).to_csv(preds, index=False)
    return preds, labels


def test_evaluate_per_sex_and_failed_rows(files, tmp_path):
    preds, labels = files
    metrics = evaluate(preds, labels, tmp_path / "out")
    assert metrics["n_scored"] == 4 and metrics["n_failed"] == 1 and metrics["failed_ids"] == ["5"]
    assert metrics["n_failed_by_status"] == {"error": 1}
    assert "Scored: 4  not scored: 1 (1 error)" in (tmp_path / "out" / "report.txt").read_text()
    assert metrics["regression"]["mae_months"] == pytest.approx((6 + 6 + 0 + 10) / 4)
    male, female = metrics["by_sex"]["male"], metrics["by_sex"]["female"]
    assert (male["n"], male["mae_months"], male["mean_signed_error_months"]) == (2, 6.0, 0.0)
    assert (female["n"], female["mae_months"], female["mean_signed_error_months"]) == (2, 5.0, -5.0)
    assert metrics["by_sex"]["mae_gap_months"] == pytest.approx(1.0)
    assert "age_matched" not in metrics["by_sex"]  # no 2-year band of bone age holds both sexes here
    assert metrics["by_sex_and_stage"]["female"]["Adolescent"]["mean_signed_error_months"] == -10.0
    assert "stage" not in metrics  # a regressor's stage column is its bone age binned, not a second model
    assert metrics["stage_from_regression"]["accuracy"] == 1.0
    assert metrics["by_stage"]["Adolescent"] == {"n": 1, "mae_months": 10.0, "mean_signed_error_months": -10.0}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_scored"] == 4
    assert "MAE 5.50" in (tmp_path / "out" / "report.txt").read_text()
    assert "confidence_intervals" not in metrics  # 4 images: no useful interval
    row = headline(metrics, digits=1)  # the flat summary the shipping and comparison tools record
    assert row["n"] == 4 and row["mae_months"] == 5.5 and row["mean_signed_error_months"] == -2.5
    assert (row["bias_male_months"], row["bias_female_months"], row["mae_female_months"]) == (0.0, -5.0, 5.0)
    assert row["stage_qwk"] == 1.0 and row["stage_accuracy"] == 1.0


def test_vectorised_qwk_equals_sklearn_for_one_sample_and_a_batch():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(3)
    true = rng.integers(0, 4, size=(5, 200))
    predicted = np.clip(true + rng.integers(-1, 2, size=true.shape), 0, 3)
    batch = quadratic_weighted_kappa(true, predicted, 4)
    for k in range(5):
        expected = cohen_kappa_score(true[k], predicted[k], labels=[0, 1, 2, 3], weights="quadratic")
        assert batch[k] == pytest.approx(expected, abs=1e-12)
        assert quadratic_weighted_kappa(true[k], predicted[k], 4) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_images(tmp_path):
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        truth = rng.uniform(0, 228, n)
        male = rng.random(n) < 0.5
        return truth, truth + rng.normal(0, 10, n) + np.where(male, 0, 3), male  # girls a little worse

    truth, predicted, male = sample(200)
    ci = bootstrap_intervals(truth, predicted, male)
    assert ci == bootstrap_intervals(truth, predicted, male)  # seeded: the same numbers every run
    mae = np.abs(predicted - truth).mean()
    assert ci["mae_months"][0] < mae < ci["mae_months"][1]
    assert ci["mean_signed_error_months"][0] < (predicted - truth).mean() < ci["mean_signed_error_months"][1]
    low, high = ci["quadratic_weighted_kappa"]
    assert low < stage_metrics(*(stage_of(x) for x in (truth, predicted)))["quadratic_weighted_kappa"] < high
    for name, mask in (("male", male), ("female", ~male)):  # each sex's bias holds its own estimate
        low, high = ci[f"mean_signed_error_{name}_months"]
        assert low < (predicted - truth)[mask].mean() < high
    big = bootstrap_intervals(*sample(3200))
    width = lambda c, key: c[key][1] - c[key][0]  # noqa: E731
    assert width(big, "mae_months") < 0.4 * width(ci, "mae_months")  # 16x the images: about 1/4 the width
    assert big["mae_female_minus_male_months"][0] > 0  # with enough images the girls' extra error is resolved
    only_girls = bootstrap_intervals(truth, predicted, np.zeros_like(male))
    assert "mae_female_minus_male_months" not in only_girls
    labels, preds = tmp_path / "labels.csv", tmp_path / "preds.csv"  # evaluate reports them
    ids = [str(i) for i in range(len(truth))]
    pd.DataFrame({"id": ids, "boneage": truth.clip(0, 240), "male": male}).to_csv(labels, index=False)
    pd.DataFrame({"id": ids, "bone_age_months": predicted}).to_csv(preds, index=False)
    metrics = evaluate(preds, labels, tmp_path / "out", figures=False)
    low, high = metrics["confidence_intervals"]["mae_female_minus_male_months"]
    assert f"MAE female - male {low:+.2f} to {high:+.2f}" in (tmp_path / "out" / "report.txt").read_text()


def test_compare_scores_two_models_on_the_images_both_predicted(tmp_path):
    rng = np.random.default_rng(1)
    n = 400
    truth = rng.uniform(0, 228, n)
    better, worse = truth + rng.normal(0, 8, n), truth + rng.normal(0, 12, n)
    ids = [str(i) for i in range(n)]
    labels, a, b = tmp_path / "labels.csv", tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame({"id": ids, "boneage": truth, "male": rng.random(n) < 0.5}).to_csv(labels, index=False)
    pd.DataFrame({"id": ids, "bone_age_months": better}).to_csv(a, index=False)
    status = ["ok"] * (n - 50) + ["not assessable"] * 50  # the other model refused 50: compared on the rest
    pd.DataFrame({"id": ids, "bone_age_months": worse, "status": status}).to_csv(b, index=False)
    metrics = evaluate(a, labels, tmp_path / "out", figures=False, compare=b)
    versus = metrics["comparison"]
    assert versus["n"] == n - 50 and metrics["n_scored"] == n
    kept = slice(0, n - 50)
    expected = np.abs(better - truth)[kept].mean() - np.abs(worse - truth)[kept].mean()
    assert versus["mae_difference_months"] == pytest.approx(expected)
    low, high = versus["mae_difference_interval"]
    assert low < expected < high < 0  # clearly better, and the interval says so
    assert "Against" in (tmp_path / "out" / "report.txt").read_text()
    same = evaluate(a, labels, compare=a)["comparison"]
    assert same["mae_difference_interval"] == [0.0, 0.0] and same["qwk_difference_interval"] == [0.0, 0.0]
    pd.DataFrame({"id": ids[:5], "bone_age_months": better[:5]}).to_csv(b, index=False)
    with pytest.raises(DataValidationError, match="only 5 image"):
        evaluate(a, labels, compare=b)


def test_age_matched_sex_gap_removes_a_difference_in_age_mix(tmp_path):
    # errors depend on age only (2 months under 48, 10 months from 48), never on sex; the boys are mostly the
    # younger, easier ages and the girls mostly the older ones, so the plain gap is large and the matched one zero
    ages = [12, 12, 12, 36, 60, 12, 60, 60, 60, 84]
    males = [True, True, True, True, True, False, False, False, False, False]
    labels, preds = tmp_path / "labels.csv", tmp_path / "preds.csv"
    ids = [str(i) for i in range(len(ages))]
    pd.DataFrame({"id": ids, "boneage": ages, "male": males}).to_csv(labels, index=False)
    predicted = [a + (2 if a < 48 else -10) for a in ages]
    pd.DataFrame({"id": ids, "bone_age_months": predicted}).to_csv(preds, index=False)
    metrics = evaluate(preds, labels, tmp_path / "out")
    by_sex = metrics["by_sex"]
    assert by_sex["male"]["mae_months"] == pytest.approx(3.6) and by_sex["female"]["mae_months"] == pytest.approx(8.4)
    matched = by_sex["age_matched"]
    # bands 0-24 (4 images) and 48-72 (4) hold both sexes; 24-48 (a boy) and 72-96 (a girl) are left out
    assert matched["n"] == 8
    assert matched["mae_male_months"] == pytest.approx(6.0) and matched["mae_female_months"] == pytest.approx(6.0)
    assert matched["mae_gap_months"] == pytest.approx(0.0)
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "at the same age mix" in report
    assert "confidence_intervals" not in metrics and "bootstrap" not in report  # 10 images: too few for intervals


def test_evaluate_writes_non_empty_figures_and_html(files, tmp_path):
    preds, labels = files
    history = tmp_path / "history.json"
    rows = [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.2 / (e + 1),
            "train_mae": 20 - e,
            "val_mae": 22 - e,
            "val_stage_acc": 0.5,
            "lr": 1e-3 * (3 - e) / 3,
            "seconds": 1.0,
            "step": 10 * e,
        }
        for e in range(3)
    ]
    history.write_text(json.dumps(rows))
    evaluate(preds, labels, tmp_path / "out", history=history)
    from PIL import Image

    for name in ("predicted_vs_actual", "errors", "by_sex", "confusion_matrix_from_regression", "training_history"):
        path = tmp_path / "out" / f"{name}.png"
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        assert pixels.shape[0] > 300 and pixels.std() > 10, name  # drawn, not blank
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'src="errors.png"' in page and "QWK" in page


def test_classifier_stages_and_agreement_with_the_regressor(files, tmp_path):
    preds, labels = files
    classifier = tmp_path / "cls.csv"
    pd.DataFrame({"id": ["1", "2", "3", "4"], "stage": ["Child", "Child", "Pre-adolescent", "Pre-adolescent"]}).to_csv(
        classifier, index=False
    )
    metrics = evaluate(preds, labels, stage_predictions=classifier)
    assert metrics["stage"]["accuracy"] == 0.5  # true stages 0, 1, 2, 3
    assert metrics["stage"]["agreement_with_regression"] == 0.5  # regression stages 0, 1, 2, 3
    assert metrics["stage"]["confusion_matrix"][0] == [0, 1, 0, 0]
    pd.DataFrame({"id": ["1"], "stage": ["Child"]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataValidationError, match="3 id"):
        evaluate(preds, labels, stage_predictions=tmp_path / "short.csv")


def test_evaluate_rejects_mismatched_ids_and_missing_columns(files, tmp_path):
    preds, labels = files
    frame = pd.read_csv(preds, dtype={"id": str})
    frame.loc[0, "id"] = "999"
    frame.to_csv(tmp_path / "bad_ids.csv", index=False)
    with pytest.raises(DataValidationError, match=r"1 prediction id\(s\) not in .*'999'"):
        evaluate(tmp_path / "bad_ids.csv", labels)
    frame[["id"]].to_csv(tmp_path / "no_age.csv", index=False)
    with pytest.raises(DataValidationError, match="expected columns id and bone_age_months"):
        evaluate(tmp_path / "no_age.csv", labels)
    assert main(["evaluate", "--predictions", str(tmp_path / "no_age.csv"), "--labels", str(labels)]) == 2


def test_blend_weight_is_fit_by_mae():
    from boneage.blend import fit_blend_weight

    truth = np.array([10.0, 20.0, 30.0])
    assert fit_blend_weight(truth, truth, truth + 50) == 1.0
    assert fit_blend_weight(truth, truth + 50, truth) == 0.0
    assert fit_blend_weight(truth, truth + 10, truth - 10) == pytest.approx(0.5)


def test_ensemble_protocol_keeps_the_evaluation_half_apart(tmp_path):
    from boneage.blend import fit_ensemble
    from boneage.config import DataConfig, ModelConfig
    from boneage.model import BoneAgeNet, save_model_folder
    from tests.helpers import write_rsna_folder

    labels, images = write_rsna_folder(tmp_path / "data", n=40, size=64)
    frame = pd.read_csv(labels, dtype=str)
    split = tmp_path / "split.csv"
    pd.DataFrame({"id": frame["id"], "split": ["train"] * 24 + ["val"] * 16}).to_csv(split, index=False)
    model = BoneAgeNet(ModelConfig(pretrained="none", target_offset=110, target_scale=60)).eval()
    model_dir = save_model_folder(tmp_path / "model", model, DataConfig(image_size=64))
    summary = fit_ensemble(
        labels, images, split, tmp_path / "ens", model_dir=model_dir, num_workers=0, xgb_params={"n_estimators": 20}
    )
    assert (summary["n_train"], summary["n_calibration"], summary["n_evaluation"]) == (24, 8, 8)
    assert 0.0 <= summary["cnn_weight"] <= 1.0
    assert set(summary["evaluation_mae_months"]) >= {"cnn", "xgboost", "blend_seed_w0.70"}
    assert "calibration" in summary["protocol"] and (tmp_path / "ens" / "xgboost.json").is_file()
    held_out = pd.read_csv(tmp_path / "ens" / "evaluation_half_predictions.csv")
    assert len(held_out) == 8
    assert summary["evaluation_mae_months"]["cnn"] == pytest.approx((held_out["cnn"] - held_out["y"]).abs().mean())


def test_report_command_gathers_every_figure(tmp_path):
    from boneage.config import DataConfig, ModelConfig
    from boneage.model import BoneAgeNet, save_model_folder
    from tests.helpers import write_rsna_folder

    labels, images = write_rsna_folder(tmp_path / "data", n=24, size=64)
    torch_model = BoneAgeNet(ModelConfig(pretrained="none", target_offset=110, target_scale=60)).eval()
    history = [
        {
            "epoch": 0,
            "train_loss": 1.0,
            "val_loss": 1.1,
            "train_mae": 30.0,
            "val_mae": 31.0,
            "val_stage_acc": 0.3,
            "lr": 1e-3,
            "seconds": 1.0,
            "step": 3,
        }
    ]
    model_dir = save_model_folder(
        tmp_path / "model",
        torch_model,
        DataConfig(image_size=64),
        training={"history": history},
        metrics={"selected_on": "val"},
    )
    classifier_dir = save_model_folder(
        tmp_path / "cls", BoneAgeNet(ModelConfig(task="classification", pretrained="none")), DataConfig(image_size=64)
    )
    split = tmp_path / "split.csv"
    pd.DataFrame({"id": pd.read_csv(labels, dtype=str)["id"], "split": ["train"] * 12 + ["val"] * 12}).to_csv(
        split, index=False
    )
    code = main(
        [
            "report",
            "--labels",
            str(labels),
            "--images",
            str(images),
            "--split",
            str(split),
            "--model",
            str(model_dir),
            "--classifier",
            str(classifier_dir),
            "--tsne-images",
            "12",
            "--gradcam-images",
            "2",
            "--output",
            str(tmp_path / "report"),
        ]
    )
    assert code == 0
    out = tmp_path / "report"
    page = (out / "report.html").read_text()
    for name in (
        "predicted_vs_actual",
        "errors",
        "confusion_matrix",
        "confusion_matrix_from_regression",
        "training_history",
        "gradcam",
        "tsne",
    ):
        assert (out / f"{name}.png").stat().st_size > 10_000 and f'src="{name}.png"' in page
    assert "selection metrics" in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_scored"] == 12 and "agreement_with_regression" in metrics["stage"]


def test_per_stage_bias_intervals_show_the_pull_towards_the_mean(tmp_path):
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 228, 400)
    predicted = 127.0 + 0.85 * (truth - 127.0) + rng.normal(0, 6, truth.size)  # shrunk towards the mean age
    male = rng.random(truth.size) < 0.5
    by_stage = bootstrap_intervals(truth, predicted, male)["mean_signed_error_by_stage_months"]
    assert set(by_stage) == set(STAGE_NAMES)  # every stage has at least 20 images here
    assert by_stage["Infant/Toddler"][0] > 0 and by_stage["Adolescent"][1] < 0  # the young over-, the old under-read
    for index, name in enumerate(STAGE_NAMES):
        mask = stage_of(truth) == index
        assert by_stage[name][0] < (predicted - truth)[mask].mean() < by_stage[name][1]
    few = bootstrap_intervals(truth[:30], predicted[:30], male[:30])  # fewer than 20 in a stage: no interval
    assert all(
        np.sum(stage_of(truth[:30]) == STAGE_NAMES.index(name)) >= 20
        for name in few.get("mean_signed_error_by_stage_months", {})
    )
    labels, preds = tmp_path / "labels.csv", tmp_path / "preds.csv"
    ids = [str(i) for i in range(truth.size)]
    pd.DataFrame({"id": ids, "boneage": truth, "male": male}).to_csv(labels, index=False)
    pd.DataFrame({"id": ids, "bone_age_months": predicted}).to_csv(preds, index=False)
    evaluate(preds, labels, tmp_path / "out", figures=False)
    low, high = by_stage["Adolescent"]
    assert (
        f"bias {(predicted - truth)[stage_of(truth) == 3].mean():+.2f} ({low:+.2f} to {high:+.2f})"
        in (tmp_path / "out" / "report.txt").read_text()
    )
