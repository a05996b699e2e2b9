"""The torch-free path: ONNX prediction with PyTorch made unimportable, and NumPy preprocessing equal to torch's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.config import DataConfig
from boneage.dataset import preprocess
from boneage.imageio import preprocess_array
from tests.helpers import make_tiny_model, synthetic_radiograph, write_dicom

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("mode", ["squash", "letterbox"])
def test_numpy_preprocessing_matches_torch(tmp_path, mode):
    image = tmp_path / "wide.png"
    Image.fromarray(synthetic_radiograph(80, size=150)[:, 10:]).save(image)
    dicom = write_dicom(tmp_path / "d.dcm", synthetic_radiograph(50, size=90).astype("uint16") * 16)
    for contract in (
        DataConfig(image_size=64, resize_mode=mode),
        DataConfig(image_size=64, resize_mode=mode, source_size=40, standardize=True),
        DataConfig(image_size=64, resize_mode=mode, source_size=40, standardize=True, hand_fill=(0.89, 0.75)),
        DataConfig(image_size=64, source_size=40, standardize=True, hand_fill=(0.89, 0.75), hand_fill_above=(0.5, 0.5)),
        DataConfig(image_size=64, resize_mode=mode, source_size=40, source_antialias=False, standardize=True),
    ):
        for path in (image, dicom):
            assert np.abs(preprocess_array(path, contract) - preprocess(path, contract).numpy()).max() < 1e-4


@pytest.fixture
def onnx_model(tiny_onnx_model):
    return tiny_onnx_model  # shared by the session: tests copy it before changing it


def test_auto_backend_takes_model_onnx_and_matches_torch(onnx_model, tmp_path):
    from boneage.backends.onnx import OnnxPredictor
    from boneage.predict import load_predictor, predict_paths

    assert isinstance(load_predictor(onnx_model), OnnxPredictor)
    folder = tmp_path / "images"
    folder.mkdir()
    for age in (20, 90, 200):
        Image.fromarray(synthetic_radiograph(age, seed=age)).save(folder / f"{age}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    common = {"sex": "M", "progress": False, "tta": True, "chronological_age": 100}
    onnx_rows = predict_paths([folder], tmp_path / "o.csv", model_dir=onnx_model, num_workers=2, batch_size=2, **common)
    torch_rows = predict_paths([folder], tmp_path / "t.csv", model_dir=onnx_model, backend="torch", **common)
    assert onnx_rows["status"].tolist() == torch_rows["status"].tolist() == ["ok", "ok", "ok", "error"]
    assert np.allclose(onnx_rows["bone_age_months"], torch_rows["bone_age_months"], atol=0.05, equal_nan=True)
    assert onnx_rows["call"].tolist() == torch_rows["call"].tolist()


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_rows_do_not_depend_on_the_batch_size(onnx_model, tmp_path, backend):
    from boneage.backends.base import PREDICT_BATCH_SIZE
    from boneage.predict import predict_paths

    folder = tmp_path / "images"
    folder.mkdir()
    for age in (10, 40, 70, 100, 130, 160, 190):
        Image.fromarray(synthetic_radiograph(age, seed=age)).save(folder / f"{age:03d}.png")
    (folder / "100.png").write_bytes(b"not a png")  # an error row inside a batch
    common = {"sex": "F", "progress": False, "model_dir": onnx_model, "backend": backend, "num_workers": 0}
    tables = [
        predict_paths([folder], tmp_path / f"{size}.csv", batch_size=size, **common)
        for size in sorted({1, 3, PREDICT_BATCH_SIZE, 32})
    ]
    assert tables[0]["status"].tolist() == ["ok", "ok", "ok", "error", "ok", "ok", "ok"]
    for table in tables[1:]:
        assert table["id"].tolist() == tables[0]["id"].tolist()
        assert table["status"].tolist() == tables[0]["status"].tolist()
        assert np.allclose(table["bone_age_months"], tables[0]["bone_age_months"], atol=1e-3, equal_nan=True)


@pytest.mark.slow  # its own ONNX export (a minute on 2 cores)
def test_both_backends_resize_through_the_source_size_and_standardise(tmp_path):
    from boneage.export import attach_onnx
    from boneage.predict import predict_paths

    folder = make_tiny_model(tmp_path / "model", source_size=40, standardize=True)
    attach_onnx(folder)
    image = tmp_path / "big.png"
    Image.fromarray(synthetic_radiograph(150, size=300)).save(image)
    common = {"sex": "F", "progress": False, "model_dir": folder}
    onnx_rows = predict_paths([image], tmp_path / "o.csv", backend="onnx", **common)
    torch_rows = predict_paths([image], tmp_path / "t.csv", backend="torch", **common)
    assert onnx_rows["status"].tolist() == torch_rows["status"].tolist() == ["ok"]
    assert np.allclose(onnx_rows["bone_age_months"], torch_rows["bone_age_months"], atol=0.05)
    config = json.loads((folder / "config.json").read_text())
    config["data_contract"].update(source_size=None, standardize=False)
    (folder / "config.json").write_text(json.dumps(config))
    plain = predict_paths([image], tmp_path / "p.csv", backend="onnx", **common)
    assert abs(plain["bone_age_months"][0] - onnx_rows["bone_age_months"][0]) > 0.01  # the two fields took effect


def test_checksum_of_model_onnx_is_verified(onnx_model, tmp_path):
    import shutil

    from boneage.backends.onnx import OnnxPredictor
    from boneage.errors import ModelLoadError

    copy = shutil.copytree(onnx_model, tmp_path / "copy")
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelLoadError, match="checksum"):
        OnnxPredictor(copy)


def test_predict_runs_with_pytorch_unimportable(onnx_model, tmp_path):
    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100)).save(image)
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "torchvision", "timm", "lightning"):
            sys.modules[name] = None  # any import of them now raises ImportError
        from boneage.cli import main
        code = main(["predict", {str(image)!r}, "--model", {str(onnx_model)!r}, "--sex", "F", "--age", "120",
                     "--output", {str(tmp_path / "p.csv")!r}, "--quiet"])
        assert code == 0, code
        assert not any(m.startswith("torch") for m in sys.modules if sys.modules[m] is not None)
        print("torch-free ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
    assert "torch-free ok" in result.stdout
    text = (tmp_path / "p.csv").read_text()
    assert ",ok," in text and any(call in text for call in (",normal,", ",delayed,", ",advanced,"))


def test_without_model_onnx_and_without_torch_the_error_says_what_to_do(tmp_path):
    folder = make_tiny_model(tmp_path / "model")
    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100)).save(image)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        from boneage.cli import main
        raise SystemExit(main(["predict", {str(image)!r}, "--model", {str(folder)!r}, "--sex", "F", "--quiet"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 2 and "no model.onnx to run without PyTorch" in result.stderr


def test_linear_correction_applies_on_both_backends(onnx_model, tmp_path):
    import json
    import shutil

    from boneage.predict import predict_paths

    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100)).save(image)
    raw = predict_paths([image, image], tmp_path / "raw.csv", model_dir=onnx_model, sex="F", progress=False)
    folder = shutil.copytree(onnx_model, tmp_path / "corrected")
    config = json.loads((folder / "config.json").read_text())
    config["output"]["correction"] = {"female": [1.5, -10.0], "male": [1.0, 0.0]}
    (folder / "config.json").write_text(json.dumps(config))
    expected = 1.5 * raw["bone_age_months"][0] - 10.0
    for backend in ("onnx", "torch"):
        table = predict_paths(
            [image], tmp_path / f"{backend}.csv", model_dir=folder, sex="F", progress=False, backend=backend
        )
        assert table["bone_age_months"][0] == pytest.approx(expected, abs=0.06)
        male = predict_paths([image], tmp_path / "m.csv", model_dir=folder, sex="M", progress=False, backend=backend)
        unchanged = predict_paths([image], tmp_path / "u.csv", model_dir=onnx_model, sex="M", progress=False)
        assert male["bone_age_months"][0] == pytest.approx(unchanged["bone_age_months"][0], abs=0.06)


def test_model_name_is_the_folder_also_when_running_its_onnx_file(tmp_path):
    from boneage.model_folder import model_name

    folder = tmp_path / "lite0-x"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_name(folder) == "lite0-x"
    assert model_name(folder / "model.onnx") == "lite0-x"  # what the onnxruntime predictor holds
    assert model_name(tmp_path / "exported.onnx") == "exported"


def test_torch_free_commands_run_with_pytorch_blocked(onnx_model, tmp_path):
    """``evaluate``, ``split``, ``validate``, ``calibrate`` and ``predict`` (onnx) need no PyTorch: each runs in one
    process where importing torch, torchvision, timm or lightning raises ImportError."""
    import shutil

    from tests.helpers import write_rsna_folder

    labels, images = write_rsna_folder(tmp_path / "rsna", n=48, size=64)
    model = shutil.copytree(onnx_model, tmp_path / "model")
    preds, split = tmp_path / "preds.csv", tmp_path / "split.csv"
    commands = [
        ["validate", "--labels", str(labels), "--images", str(images), "--decode"],
        ["split", "--labels", str(labels), "--images", str(images), "--output", str(split)],
        ["predict", str(images), "--metadata", str(labels), "--model", str(model), "--backend", "onnx"]
        + ["--output", str(preds), "--quiet"],
        ["evaluate", "--predictions", str(preds), "--labels", str(labels), "--output", str(tmp_path / "eval")],
        ["calibrate", "--predictions", str(preds), "--labels", str(labels), "--model", str(model)],
    ]
    script = textwrap.dedent(
        f"""
        import importlib.abc
        import sys

        class Blocked(importlib.abc.MetaPathFinder):  # as if not installed: every import of them raises ImportError
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "timm", "lightning"):
                    raise ImportError(f"No module named {{name!r}} (blocked)")
                return None

        sys.meta_path.insert(0, Blocked())
        from boneage.cli import main
        for command in {commands!r}:
            code = main(command)
            assert code in (0, 3), (command[0], code)  # 3: some rows not predicted (an untrained model's refusals)
            print("ran", command[0])
        assert not any(m.split(".")[0] in ("torch", "timm", "lightning") for m, v in sys.modules.items() if v)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("ran ")] == [
        f"ran {command[0]}" for command in commands
    ]
    assert (tmp_path / "eval" / "metrics.json").is_file() and split.is_file()
    assert "half_width_months" in json.loads((model / "config.json").read_text())["uncertainty"]


@pytest.mark.parametrize("standardize", [True, False])
def test_test_time_views_resample_as_torch_does(standardize):
    """A view is the training augmentation's resampling (affine_grid + grid_sample, black outside) of the [0, 1]
    image, then normalised: made from the normalised image, it must come out the same."""
    import math

    import torch
    import torch.nn.functional as F

    from boneage.dataset import normalize_batch
    from boneage.imageio import view_batch

    contract = DataConfig(image_size=48, standardize=standardize, in_chans=3)
    images = torch.stack([torch.from_numpy(synthetic_radiograph(a, size=48)).float()[None] / 255 for a in (30, 150)])
    images[:, :, :, :4] = 0.0  # reaches black, as a radiograph's background does
    grey = 0.2 + 0.6 * images  # never reaches black: filled with its own darkest value, 0.2
    for batch in (images, grey):
        normalised = normalize_batch(batch, contract).numpy()
        assert view_batch(normalised, 0.0, 1.0, standardize) is normalised  # the image as it is: no resampling
        darkest = batch.amin(dim=(1, 2, 3), keepdim=True)
        for angle, zoom in ((8.0, 1.0), (-8.0, 1.0), (0.0, 1.2), (5.0, 0.9)):
            turn = math.radians(angle)
            rotation = [[math.cos(turn), -math.sin(turn), 0.0], [math.sin(turn), math.cos(turn), 0.0]]
            theta = torch.tensor(rotation) / zoom
            grid = F.affine_grid(theta.expand(2, 2, 3), list(batch.shape), align_corners=False)
            turned = F.grid_sample(batch - darkest, grid, align_corners=False) + darkest
            expected = normalize_batch(turned, contract).numpy()
            got = view_batch(normalised, angle, zoom, standardize)
            assert got.shape == normalised.shape and np.abs(got - expected).max() < 1e-4


def test_a_folder_can_average_turned_views_on_both_backends(onnx_model, tmp_path):
    import shutil

    from boneage.errors import ModelLoadError
    from boneage.imageio import view_batch
    from boneage.model_folder import tta_text
    from boneage.predict import load_predictor, predict_paths

    image = tmp_path / "hand.png"
    Image.fromarray(synthetic_radiograph(100)).save(image)
    folder = shutil.copytree(onnx_model, tmp_path / "views")
    config = json.loads((folder / "config.json").read_text())
    config["output"].update(tta_hflip=True, tta_views=[[8, 1.0], [-8, 1.0]])
    (folder / "config.json").write_text(json.dumps(config))
    common = {"sex": "F", "progress": False}
    plain = predict_paths([image], tmp_path / "p.csv", model_dir=onnx_model, tta=False, **common)["bone_age_months"][0]
    for backend in ("onnx", "torch"):
        predictor = load_predictor(folder, backend)
        assert predictor.tta_views == [(8.0, 1.0), (-8.0, 1.0)] and predictor.tta_hflip
        # the folder's default: the mean of the four single passes (each view and its mirror)
        x, male = predictor.preprocess(image)[None], np.asarray([0])
        predictor.tta_hflip, predictor.tta_views = False, [(0.0, 1.0)]
        singles = [
            predictor.predict_batch(np.ascontiguousarray(v), male)["months"][0]
            for angle in (8.0, -8.0)
            for view in [view_batch(x, angle, 1.0, bool(predictor.contract.standardize))]
            for v in (view, view[..., ::-1])
        ]
        rows = predict_paths([image], tmp_path / f"{backend}.csv", model_dir=folder, backend=backend, **common)
        assert rows["bone_age_months"][0] == pytest.approx(np.mean(singles), abs=0.01)
        assert abs(rows["bone_age_months"][0] - plain) > 1e-3  # the tiny model is not rotation-invariant
        off = predict_paths([image], tmp_path / "off.csv", model_dir=folder, backend=backend, tta=False, **common)
        assert off["bone_age_months"][0] == pytest.approx(plain, abs=0.05)  # --no-tta: one pass of the image as is
    assert (
        tta_text([(8.0, 1.0), (-8.0, 1.0)], True) == "the mean of 4 views: turned +8°, turned -8°, each with its mirror"
    )
    assert tta_text([(0.0, 1.0)], True) == "averaged with the mirrored image" and tta_text([(0.0, 1.0)], False) == ""
    for bad in ([], [[8]], [[90, 1.0]], [[8, "1"]], "8,1"):
        config["output"]["tta_views"] = bad
        (folder / "config.json").write_text(json.dumps(config))
        for backend in ("torch", "onnx"):
            with pytest.raises(ModelLoadError, match=r"config.json: output.tta_views: expected a non-empty list"):
                load_predictor(folder, backend)
