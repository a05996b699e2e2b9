"""Copy a trained run's model folder into the package as the default model, with its validation metrics.

    python tools/ship_model.py RUN_DIR [--name lite0-128] [--dtype float16]

Predicts the seed split's val images with the fp32 weights and with the stored dtype, scores both with
`boneage.evaluate`, and records both in config.json (``metrics.val``, ``metrics.val_fp32``) so the cost of reduced
precision is visible. Val is the split the best epoch was selected on: these are selection metrics, not a test
result (the seed's holdout, withheld from this project, scores the shipped model independently).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch

from boneage.data import read_labels, read_split
from boneage.evaluate import evaluate
from boneage.model import contract_from_description, load_model_folder, save_model_folder
from boneage.predict import predict_paths
from boneage.quality import fit_for_model, write_non_hand_images
from boneage.uncertainty import calibrate_interval, store_interval

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rsna-bone-age-100px"
FULLRES = ROOT.parent / "shared" / "data" / "rsna-bone-age-fullres-samples"


def _relative(path: str) -> str:
    parts = Path(path).parts
    return str(Path(*parts[parts.index("data") + 1 :])) if "data" in parts else Path(path).name


def _score(model_dir: Path, tmp: Path, name: str) -> dict:
    split = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str})
    labels = pd.read_csv(DATA / "boneage-training-dataset.csv", dtype={"id": str})
    val = labels.merge(split, on="id").query("split == 'val'")
    meta = tmp / "meta.csv"
    val[["id", "male"]].to_csv(meta, index=False)
    paths = [DATA / "boneage-training-dataset" / f"{i}.png" for i in val["id"]]
    predict_paths(paths, tmp / f"{name}.csv", model_dir=model_dir, metadata=meta, progress=False)
    return evaluate(tmp / f"{name}.csv", DATA / "boneage-training-dataset.csv", figures=False)


def _summary(metrics: dict) -> dict:
    reg, sex = metrics["regression"], metrics["by_sex"]
    return {
        "n": reg["n"],
        "mae_months": round(reg["mae_months"], 3),
        "rmse_months": round(reg["rmse_months"], 3),
        "r2": round(reg["r2"], 4),
        "mean_signed_error_months": round(reg["mean_signed_error_months"], 3),
        "mae_male_months": round(sex["male"]["mae_months"], 3),
        "mae_female_months": round(sex["female"]["mae_months"], 3),
        "stage_qwk": round(metrics["stage_from_regression"]["quadratic_weighted_kappa"], 4),
        "stage_accuracy": round(metrics["stage_from_regression"]["accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", default="lite0-128")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = parser.parse_args()
    model, description = load_model_folder(args.run_dir / "model")
    target = ROOT / "src" / "boneage" / "models" / args.name
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp32 = _summary(_score(args.run_dir / "model", tmp, "fp32"))
        staged = tmp / "staged"
        save_model_folder(
            staged,
            model,
            contract_from_description(description),
            training=description["training"],
            metrics=description["metrics"],
            dtype=getattr(torch, args.dtype),
        )
        stored = _summary(_score(staged, tmp, "stored"))
        full = {}
        if FULLRES.is_dir():
            predict_paths(
                [FULLRES / "images"],
                tmp / "full.csv",
                model_dir=staged,
                metadata=FULLRES / "labels.csv",
                progress=False,
            )
            full = _summary(evaluate(tmp / "full.csv", FULLRES / "labels.csv", figures=False))
        metrics = {
            **description["metrics"],
            "val": stored,
            "val_fp32": fp32,
            "val_note": "seed split val (n=1892): the best epoch was selected on it, so these are selection metrics",
            "fullres_samples": full,
        }
        training = {**description["training"], "run": str(args.run_dir.name)}
        # provenance without this machine's paths: data files relative to the shared data folder
        for key in ("labels", "images", "split"):
            value = training["config"]["data"].get(key)
            if value:
                training["config"]["data"][key] = _relative(value)
        training["config"]["train"]["output"] = f"runs/{args.run_dir.name}"
        training["data"] = {
            "labels": _relative(training["data"].get("labels") or ""),
            "split": _relative(training["data"].get("split") or ""),
            "description": "RSNA Pediatric Bone Age Challenge 2017 training set, 100x100 px squashed copies; "
            "fit on the seed split's train (8,827), best epoch selected on its val (1,892)",
        }
        if not training.get("history") and (args.run_dir / "history.json").is_file():
            training["history"] = json.loads((args.run_dir / "history.json").read_text())
        save_model_folder(
            target.with_name(target.name + ".tmp"),
            model,
            contract_from_description(description),
            training=training,
            metrics=metrics,
            dtype=getattr(torch, args.dtype),
        )
        # a 90% interval: calibrated on one half of val, coverage measured on the other half
        interval = calibrate_interval(tmp / "stored.csv", DATA / "boneage-training-dataset.csv", coverage=0.9)
        interval["calibration"]["source"] = "seed split val, calibration half (stratified by stage x sex, seed 0)"
        interval["evaluation"]["source"] = "seed split val, the other half"
        store_interval(target.with_name(target.name + ".tmp"), interval)
        # refusal of images unlike the training radiographs: fit on train, threshold on one half of val
        table = read_labels(DATA / "boneage-training-dataset.csv", DATA / "boneage-training-dataset")
        table = table.merge(read_split(DATA / "seed-split.csv", table), on="id")
        assessability = fit_for_model(
            target.with_name(target.name + ".tmp"),
            table[table["split"] == "train"],
            table[table["split"] == "val"],
            write_non_hand_images(tmp / "non_hand"),
        )
    if target.exists():
        shutil.rmtree(target)
    target.with_name(target.name + ".tmp").rename(target)
    print(
        json.dumps(
            {
                "shipped": str(target),
                "val": stored,
                "val_fp32": fp32,
                "fullres_samples": full,
                "interval": interval,
                "assessability": assessability,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
