from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from boneage.backends.onnx import OnnxPredictor
from boneage.cli import main
from boneage.errors import ExportError
from boneage.export import export_onnx
from boneage.model_folder import METADATA_KEY
from boneage.predict import predict_paths
from tests.helpers import write_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    return tiny_model, write_images(tmp_path_factory.mktemp("export") / "images", np.linspace(10, 220, 12))


def test_export_roundtrip_parity_and_metadata(tiny_onnx_model):
    # the session's export (attach_onnx -> export_onnx); parity on real images: the next test, row by row
    recorded = json.loads((tiny_onnx_model / "config.json").read_text())["onnx"]
    assert recorded["max_abs_diff_months"] <= 0.05
    proto = onnx.load(str(tiny_onnx_model / "model.onnx"))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert meta["data_contract"]["image_size"] == 64 and meta["onnx"]["int8"] is False
    assert [i.name for i in proto.graph.input] == ["image", "male"]


def test_onnx_backend_gives_the_same_csv_as_pytorch(tiny, tiny_onnx_model, tmp_path):
    model_dir, images = tiny  # the same model as tiny_onnx_model, whose model.onnx is an export_onnx file
    torch_rows = predict_paths([images], tmp_path / "t.csv", model_dir=model_dir, sex="F", progress=False)
    exported = tiny_onnx_model / "model.onnx"
    onnx_rows = predict_paths([images], tmp_path / "o.csv", model_dir=exported, sex="F", progress=False, backend="onnx")
    assert torch_rows["id"].tolist() == onnx_rows["id"].tolist()
    np.testing.assert_allclose(onnx_rows["bone_age_months"], torch_rows["bone_age_months"], atol=0.05)
    assert (onnx_rows["stage"] == torch_rows["stage"]).all()
    command = ["predict", str(images), "--backend", "onnx", "--model", str(exported), "--sex", "M"]
    assert main([*command, "--output", str(tmp_path / "cli.csv"), "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "cli.csv")) == 12


@pytest.mark.slow  # a second export, quantised and calibrated
def test_int8_export_needs_calibration_and_stays_close(tiny, tmp_path):
    model_dir, images = tiny
    with pytest.raises(ExportError, match="--calibration"):
        export_onnx(tmp_path / "q.onnx", model_dir=model_dir, int8=True)
    report = export_onnx(
        tmp_path / "q.onnx", model_dir=model_dir, int8=True, calibration=[images], parity_images=[images]
    )
    assert report["int8"] is True and not (tmp_path / "q.fp32.onnx").exists()
    assert report["max_abs_diff_real"] < 10.0  # months; a random-weight toy, the real-model MAE change is benchmarked
    predictor = OnnxPredictor(tmp_path / "q.onnx")
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    assert predictor.contract.image_size == 64


def test_onnx_file_without_metadata_or_graph_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from boneage.errors import ModelLoadError

    tensor = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["output"])], "plain", [tensor], [output])
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelLoadError, match="no 'boneage.config' metadata"):
        OnnxPredictor(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        OnnxPredictor(tmp_path / "junk.onnx")
