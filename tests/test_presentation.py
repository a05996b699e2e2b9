from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.config import DataConfig
from boneage.fit_checks import fit_orientation, fit_weights
from boneage.imageio import preprocess_array
from boneage.presentation import (
    call_inverted,
    call_rotated,
    invert_inputs,
    inverted_probability,
    polarity_features,
    rotate_inputs,
    rotation_probabilities,
)
from boneage.rows import finish_row, new_row
from tests.helpers import FULLRES, synthetic_radiograph


def _inputs(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    contract = DataConfig(image_size=size, standardize=True)
    images = [synthetic_radiograph(60 + 10 * k, size=96, seed=seed + k).astype(np.float32) / 255 for k in range(n)]
    return np.stack([(x - x.mean()) / x.std() for x in images])[:, None].repeat(contract.in_chans, axis=1)


def test_features_change_sign_with_the_image_and_probabilities_are_complementary():
    rng = np.random.default_rng(0)
    images = np.concatenate([_inputs(4), rng.normal(size=(3, 3, 96, 96)).astype(np.float32)])
    features = polarity_features(images)
    assert features.shape == (7, 5)
    assert np.allclose(polarity_features(-images), -features, atol=1e-5)
    info = {"weights": rng.normal(size=5).tolist()}
    assert np.allclose(inverted_probability(images, info) + inverted_probability(-images, info), 1.0, atol=1e-5)


@pytest.mark.parametrize("standardize", [True, False])
def test_inverting_the_input_equals_preprocessing_the_negative_file(tmp_path, standardize):
    contract = DataConfig(image_size=64, standardize=standardize)
    pixels = synthetic_radiograph(100, size=80)
    Image.fromarray(pixels).save(tmp_path / "given.png")
    Image.fromarray(255 - pixels).save(tmp_path / "negative.png")
    given = preprocess_array(tmp_path / "given.png", contract)
    negative = preprocess_array(tmp_path / "negative.png", contract)
    assert np.allclose(invert_inputs(given, contract), negative, atol=1e-4)
    torch = pytest.importorskip("torch")
    assert np.allclose(invert_inputs(torch.from_numpy(given), contract).numpy(), negative, atol=1e-4)


def test_weights_fit_on_radiographs_call_held_out_negatives_inverted():
    weights = fit_weights(polarity_features(_inputs(30)))
    held_out = _inputs(10, seed=100)
    info = {"weights": weights}
    assert (inverted_probability(held_out, info) < 0.5).all()
    assert (inverted_probability(-held_out, info) > 0.5).all()


def test_negatives_are_scored_only_for_suspect_images_and_called_only_when_they_score_lower():
    images = np.concatenate([_inputs(3), -_inputs(3, seed=10)])
    info = {"weights": fit_weights(polarity_features(_inputs(30, seed=50)))}
    asked: list[np.ndarray] = []

    def inverse_scores(mask: np.ndarray) -> np.ndarray:
        asked.append(mask.copy())
        return np.array([0.5, 9.0, 0.5])[: int(mask.sum())]

    called, inverse = call_inverted(images, np.ones(6), info, inverse_scores)
    assert len(asked) == 1 and asked[0].tolist() == [False] * 3 + [True] * 3
    assert called.tolist() == [False, False, False, True, False, True]  # the second negative's negative scored worse
    assert np.isnan(inverse[:3]).all() and inverse[3:].tolist() == [0.5, 9.0, 0.5]

    asked.clear()
    called, _ = call_inverted(_inputs(3), np.ones(3), info, inverse_scores)
    assert not asked and not called.any()  # nothing suspect: no extra pass


def test_orientation_fit_on_upright_images_names_the_turn_of_held_out_images():
    info = fit_orientation(_inputs(30)[:, 0], c=10.0)  # 30 near-identical synthetic hands: little regularisation
    held_out = _inputs(8, seed=100)
    for turns in range(4):
        probabilities = rotation_probabilities(rotate_inputs(held_out, turns), info)
        assert (probabilities.argmax(axis=1) == turns).all(), turns
    assert np.allclose(rotate_inputs(rotate_inputs(held_out, 3), -3), held_out)
    torch = pytest.importorskip("torch")
    assert np.allclose(rotate_inputs(torch.from_numpy(held_out), 1).numpy(), rotate_inputs(held_out, 1))


def test_turned_images_are_scored_turned_back_once_per_turn_and_called_only_when_that_scores_lower():
    info = fit_orientation(_inputs(30)[:, 0], c=10.0)  # 30 near-identical synthetic hands: little regularisation
    upright = _inputs(4, seed=100)
    images = np.concatenate([upright[:1], rotate_inputs(upright[1:2], 1), rotate_inputs(upright[2:], 2)])
    asked: list[tuple[list[bool], int]] = []

    def turned_back_scores(mask: np.ndarray, turns: int) -> np.ndarray:
        asked.append((mask.tolist(), turns))
        return np.array([0.5, 9.0])[: int(mask.sum())]

    turns, back = call_rotated(images, np.ones(4), info, turned_back_scores)
    assert asked == [([False, True, False, False], 1), ([False, False, True, True], 2)]
    assert turns.tolist() == [0, 1, 2, 0]  # the last one turned back scored worse than as given
    assert np.isnan(back[0]) and back[1:].tolist() == [0.5, 0.5, 9.0]


def test_an_inverted_row_is_refused_with_the_reason():
    row = new_row(Path("x.png"), False)
    finish_row(row, 120.0, 2, score=2.0, threshold=3.1, half_width=17.0, inverted=True, inverse_score=0.9)
    assert row["status"] == "not assessable" and row.get("bone_age_months") is None
    assert "looks inverted" in row["message"] and "score 2.0 as given, 0.9 inverted" in row["message"]
    row = new_row(Path("x.png"), True)
    finish_row(row, 120.0, 2, score=2.0, threshold=3.1, half_width=17.0, turns=3, turned_score=0.8)
    assert row["status"] == "not assessable" and "looks turned 90 degrees clockwise" in row["message"]
    row = new_row(Path("x.png"), True)  # turned, but not readable turned back either: no advice to turn it
    finish_row(row, 120.0, 2, score=9.0, threshold=3.1, half_width=17.0, turns=2, turned_score=5.0)
    assert row["status"] == "not assessable" and "looks" not in row["message"]
    assert "does not look like the hand radiographs" in row["message"] and "turned back 5.0" in row["message"]


@pytest.mark.slow  # fits every refusal check and exports ONNX again (minutes on 2 cores)
def test_check_is_fit_stored_and_applied_by_both_backends(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from boneage.export import attach_onnx
    from boneage.fit_checks import (
        fit_assessability,
        fit_presentation,
        measure,
        measure_into_folder,
        write_non_hand_images,
    )
    from boneage.labels import read_labels
    from boneage.predict import predict_paths
    from tests.helpers import make_tiny_model, write_rsna_folder

    labels, images = write_rsna_folder(tmp_path / "data", n=40, size=64)
    table = read_labels(labels, images)
    folder = make_tiny_model(tmp_path / "model", image_size=64, standardize=True)
    fit_assessability(
        folder, table[:24], table[24:], write_non_hand_images(tmp_path / "nonhand", size=64), n_components=8
    )
    checks = fit_presentation(folder, table[:24], table[24:], backend="torch")
    stored = json.loads((folder / "config.json").read_text())
    assert stored["polarity"]["weights"] == checks["polarity"]["weights"] and stored["polarity"]["val"]["n"] == 16
    assert stored["orientation"]["bias"] == checks["orientation"]["bias"] and stored["orientation"]["val"]["n"] == 16
    wrong = []
    for path in map(Path, table["path"][24:30]):
        wrong.append(tmp_path / f"negative_{path.name}")
        Image.open(path).point(lambda v: 255 - v).save(wrong[-1])
    for path in map(Path, table["path"][24:30]):
        wrong.append(tmp_path / f"turned_{path.name}")
        Image.open(path).rotate(90, expand=True).save(wrong[-1])  # PIL: counter-clockwise, as np.rot90
    paths = list(table["path"][24:30]) + wrong
    rows = predict_paths(paths, tmp_path / "t.csv", model_dir=folder, sex="F", progress=False, backend="torch")
    messages = rows["message"].fillna("")
    inverted, turned = messages.str.contains("looks inverted"), messages.str.contains("looks turned 90")
    from boneage.backends.torch import TorchPredictor

    predictor = TorchPredictor.load(folder)
    summary = measure(predictor, table["path"][24:30], [0] * 6, table["boneage"][24:30], stored)
    assert int(inverted[:6].sum()) == summary["polarity"]["as_given_called_inverted"]
    assert int(inverted[6:12].sum()) == summary["polarity"]["negatives_called_inverted"]
    assert inverted[6:12].any(), "no negative was called inverted: the check did not run"
    assert (
        int(messages[:6].str.contains("looks turned|looks upside").sum())
        == summary["orientation"]["as_given_called_turned"]
    )
    assert turned[12:].any(), "no turned image was called turned: the check did not run"
    more = measure_into_folder(folder, table["path"][:4], [1] * 4, table["boneage"][:4], "more", backend="torch")
    stored = json.loads((folder / "config.json").read_text())
    assert stored["polarity"]["more"] == more["polarity"] and stored["orientation"]["more"]["n_turned"] == 12
    attach_onnx(folder)
    on_onnx = predict_paths(paths, tmp_path / "o.csv", model_dir=folder, sex="F", progress=False, backend="onnx")
    assert on_onnx["status"].tolist() == rows["status"].tolist()
    on_messages = on_onnx["message"].fillna("")
    assert on_messages.str.contains("looks inverted").tolist() == inverted.tolist()
    assert on_messages.str.contains("looks turned 90").tolist() == turned.tolist()


@pytest.mark.data
@pytest.mark.parametrize("backend", ["onnx", pytest.param("torch", marks=pytest.mark.slow)])  # torch: the 3 networks
def test_shipped_model_refuses_negative_and_turned_radiographs(tmp_path, backend):
    if not (FULLRES / "labels.csv").is_file():
        pytest.skip(f"needs the full-resolution samples at {FULLRES}")
    if backend == "torch":
        pytest.importorskip("torch")
    from boneage.predict import predict_paths

    labels = pd.read_csv(FULLRES / "labels.csv").head(4)
    paths = [FULLRES / "images" / f"{i}.png" for i in labels["id"]]
    wrong = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("L"))
        wrong.append(tmp_path / f"{path.stem}_negative.png")
        Image.fromarray(255 - pixels).save(wrong[-1])
        wrong.append(tmp_path / f"{path.stem}_turned.png")
        Image.fromarray(np.rot90(pixels, 2)).save(wrong[-1])
    ids = [p.stem for p in paths + wrong]
    sexes = list(labels["male"]) + [m for m in labels["male"] for _ in range(2)]
    pd.DataFrame({"id": ids, "male": sexes}).to_csv(tmp_path / "meta.csv", index=False)
    rows = predict_paths(
        paths + wrong, tmp_path / "p.csv", metadata=tmp_path / "meta.csv", progress=False, backend=backend
    )
    assert (rows["status"][:4] == "ok").all()
    assert (rows["status"][4:] == "not assessable").all()
    assert rows["message"][4::2].str.contains("looks inverted").all()
    assert rows["message"][5::2].str.contains("looks upside down|does not look like").all()
