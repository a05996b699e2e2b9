"""Batch-prediction throughput, side by side in one run, end to end (decoding included).

  (a) the seed's pipeline shape: timm efficientnet_b0 at 384x384, eager fp32, batch 16 (random weights: speed only)
  (b) the shipped model in PyTorch (`boneage predict --backend torch`)
  (c) the same on onnxruntime fp32: the shipped folder's model.onnx, `boneage predict`'s default path
  (d) the same quantised to int8 (static QDQ, calibrated on train images), on onnxruntime
  (e) (c) reading each image once, without the mirror image the shipped folder averages in (`boneage predict --no-tta`)
  (f) (c) reading the image as it is and its mirror only, without the turned views the shipped folder also averages
      (``output.tta_views`` removed from a copy of the folder: the default before it had them)

Usage (from the repository root; needs ../shared/data and `pip install -e ".[dev]"`):
    python bench/bench_predict.py [--n 1892] [--seed-n 320]

(a) is slow on a 2-core CPU, so it runs on the first --seed-n images and is reported in images/s like the rest.
Also reports the val MAE of every row so the cost of int8 and of skipping the mirror pass are visible.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from common import DATA, ROOT  # also puts the repository root on the path


def val_images(n: int) -> tuple[list[Path], pd.DataFrame]:
    labels = pd.read_csv(DATA / "boneage-training-dataset.csv", dtype={"id": str})
    split = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str})
    val = labels.merge(split, on="id")
    val = val[val["split"] == "val"].head(n)
    return [DATA / "boneage-training-dataset" / f"{i}.png" for i in val["id"]], val


def seed_pipeline(paths: list[Path]) -> float:
    """EfficientNet-B0, 384 px, eager fp32, batch 16, decoding in the loop as a plain script would."""
    import timm

    from boneage.config import DataConfig
    from boneage.dataset import preprocess

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=1).eval()
    contract = DataConfig(image_size=384)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            batch = torch.stack([preprocess(p, contract) for p in paths[i : i + 16]])
            model(batch)
    return len(paths) / (time.perf_counter() - start)


def timed_predict(paths: list[Path], out: Path, **kwargs: object) -> tuple[float, pd.DataFrame]:
    from boneage.predict import predict_paths

    start = time.perf_counter()
    table = predict_paths(paths, out, sex="F", progress=False, **kwargs)
    return len(paths) / (time.perf_counter() - start), table


def mae(table: pd.DataFrame, truth: pd.DataFrame) -> float:
    joined = table.merge(truth[["id", "boneage"]], on="id")
    return float((joined["bone_age_months"] - joined["boneage"]).abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1892)
    parser.add_argument("--seed-n", type=int, default=320)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results_predict.json"))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"skipped: {DATA} not found")
    from boneage.export import export_onnx
    from boneage.model_folder import default_model_dir

    paths, truth = val_images(args.n)
    meta = pd.DataFrame({"id": truth["id"], "male": truth["male"]})
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "n_images": len(paths),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        meta_csv = tmp_path / "meta.csv"
        meta.to_csv(meta_csv, index=False)
        train_ids = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str}).query("split == 'train'")["id"][:256]
        calibration = [DATA / "boneage-training-dataset" / f"{i}.png" for i in train_ids]
        export_onnx(tmp_path / "int8.onnx", int8=True, calibration=calibration)
        mirror_only = Path(shutil.copytree(default_model_dir(), tmp_path / "mirror_only"))
        config = json.loads((mirror_only / "config.json").read_text())
        config["output"].pop("tta_views", None)
        (mirror_only / "config.json").write_text(json.dumps(config))

        rates = {"a_seed_b0_384_eager": seed_pipeline(paths[: args.seed_n])}
        for name, kwargs in (
            ("b_default_torch", {"model_dir": default_model_dir(), "backend": "torch"}),
            ("c_default_onnx_fp32", {}),  # no model, no backend: what `boneage predict` does by default
            ("d_default_onnx_int8", {"model_dir": tmp_path / "int8.onnx", "backend": "onnx"}),
            ("e_default_onnx_fp32_one_pass", {"tta": False}),
            ("f_default_onnx_fp32_mirror_only", {"model_dir": mirror_only}),
        ):
            rate, table = timed_predict(paths, tmp_path / f"{name}.csv", metadata=meta_csv, **kwargs)
            rates[name] = rate
            results[f"val_mae_{name}"] = mae(table, truth)
    results["images_per_second"] = rates
    base = rates["a_seed_b0_384_eager"]
    results["ratio_vs_seed"] = {k: v / base for k, v in rates.items()}
    results["ratio_onnx_fp32_vs_torch"] = rates["c_default_onnx_fp32"] / rates["b_default_torch"]
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
