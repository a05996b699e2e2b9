"""Copy a trained run's model folder into the package as the default model, with its validation metrics.

    python tools/ship_model.py RUN_DIR [RUN_DIR ...] [--name NAME] [--dtype float16] [--tta] [--tta-rotations DEG]
        [--correct]

With several run folders (one architecture and data contract), the shipped model is their ensemble: one folder
whose output is the members' mean (``boneage.model.combine_model_folders``).

Predicts the seed split's val images with the fp32 weights and with the stored dtype, scores both with
`boneage.evaluate`, and records both in config.json (``metrics.val``, ``metrics.val_fp32``) so the cost of reduced
precision is visible. With ``--correct``, a per-sex linear correction of the output (``truth ~ slope * prediction +
intercept``) is fit on the model's predictions for its own training images (never val) and stored in config.json;
both backends apply it. The refusal check and the checks for inverted and turned images (``boneage.presentation``)
are fit and measured as in ``tools/fit_presentation.py``. With ``--tta``, the model predicts the average of each image
and its mirror by default (``output.tta_hflip``), and every metric, the correction and the interval are measured that
way; ``--tta-rotations 8`` reads the image turned by +8 and -8 degrees instead of as it is (``output.tta_views``).
The folder gets ``model.onnx`` (``boneage export --attach``) last.

Val is the split the best epoch was selected on: these are selection metrics, not a test
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
from data_paths import DATA, FULLRES, ROOT

from boneage.config import contract_from_description
from boneage.evaluate import evaluate
from boneage.fit_checks import fit_assessability, fit_presentation, write_non_hand_images
from boneage.fit_checks import measure_into_folder as measure_presentation
from boneage.labels import read_labels, read_split
from boneage.metrics import headline
from boneage.model import combine_model_folders, load_model_folder, save_model_folder
from boneage.model_folder import DEFAULT_MODEL
from boneage.predict import predict_paths
from boneage.uncertainty import calibrate_interval, store_interval


def _relative(path: str) -> str:
    parts = Path(path).parts
    return str(Path(*parts[parts.index("data") + 1 :])) if "data" in parts else Path(path).name


def split_part(subset: str) -> pd.DataFrame:
    """The labels (``id,boneage,male,split``) of one part of the seed split, in the labels file's order."""
    split = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str})
    labels = pd.read_csv(DATA / "boneage-training-dataset.csv", dtype={"id": str})
    return labels.merge(split, on="id").query("split == @subset").reset_index(drop=True)


def predict_subset(model_dir: Path, tmp: Path, name: str, subset: str, tta: bool | None = None) -> Path:
    """Predict one part of the seed split (sex from the labels) into ``tmp/<name>.csv``; the folder's TTA default
    unless ``tta`` is given."""
    part = split_part(subset)
    meta = tmp / f"meta_{subset}.csv"
    part[["id", "male"]].to_csv(meta, index=False)
    paths = [DATA / "boneage-training-dataset" / f"{i}.png" for i in part["id"]]
    predict_paths(
        paths, tmp / f"{name}.csv", model_dir=model_dir, metadata=meta, progress=False, backend="torch", tta=tta
    )
    return tmp / f"{name}.csv"


def predict_fullres(model_dir: Path, output: Path, tta: bool | None = None) -> Path:
    """Predict the full-resolution samples (sex from their labels) into ``output``, on PyTorch as every figure here
    (a finished folder's ``model.onnx`` may hold checks older than its config.json until it is attached again)."""
    predict_paths(
        [FULLRES / "images"],
        output,
        model_dir=model_dir,
        metadata=FULLRES / "labels.csv",
        progress=False,
        backend="torch",
        tta=tta,
    )
    return output


def _score(model_dir: Path, tmp: Path, name: str, tta: bool | None = None) -> dict:
    predictions = predict_subset(model_dir, tmp, name, "val", tta)
    return evaluate(predictions, DATA / "boneage-training-dataset.csv", figures=False)


def _fit_correction(model_dir: Path, tmp: Path) -> dict:
    """Per-sex least squares of the true age on the predicted age, over the training images' predictions."""
    import numpy as np

    predictions = pd.read_csv(predict_subset(model_dir, tmp, "train_predictions", "train"), dtype={"id": str})
    labels = pd.read_csv(DATA / "boneage-training-dataset.csv", dtype={"id": str})
    joined = predictions[predictions["status"] == "ok"].merge(labels[["id", "boneage"]], on="id")
    correction: dict = {"fit_on": "the model's predictions for the seed split's train images (not val)"}
    for name, is_male in (("female", False), ("male", True)):
        part = joined[joined["male"].astype(str).str.lower().isin(["true"] if is_male else ["false"])]
        slope, intercept = np.polyfit(part["bone_age_months"], part["boneage"], 1)
        correction[name] = [round(float(slope), 5), round(float(intercept), 4)]
        correction[f"n_{name}"] = len(part)
    return correction


def measure_fullres(model_dir: Path, tmp: Path) -> dict:
    """The full-resolution samples through a finished folder, every refusal check included: the presentation checks'
    figures (``polarity`` / ``orientation`` -> ``fullres_samples``) and ``metrics.fullres_samples``. After the
    checks are fit again (``boneage fit-checks``) or the data contract changes, this brings those figures up to date
    (after a contract change, :func:`boneage.fit_checks.rescore_non_hand` brings the non-hand scores): then attach
    ONNX again."""
    labels = pd.read_csv(FULLRES / "labels.csv")
    paths = [FULLRES / "images" / f"{i}.png" for i in labels["id"]]
    measure_presentation(model_dir, paths, labels["male"], labels["boneage"], "fullres_samples", "torch")
    predictions = predict_fullres(model_dir, tmp / "full.csv")
    full = headline(evaluate(predictions, FULLRES / "labels.csv", figures=False))
    full["n_not_assessable"] = int((pd.read_csv(predictions)["status"] == "not assessable").sum())
    _update(model_dir, "metrics", fullres_samples=full)
    return full


def _update(folder: Path, section: str, **fields) -> None:
    """Set ``fields`` in one section of a model folder's config.json."""
    from boneage.model_folder import update_description

    update_description(folder, lambda description: description[section].update(fields))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--name", default=DEFAULT_MODEL, help="model folder name (default: the shipped model's)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--correct", action="store_true", help="fit and store a per-sex linear output correction")
    parser.add_argument("--tta", action="store_true", help="predict the mean of each image and its mirror by default")
    parser.add_argument(
        "--tta-rotations",
        type=float,
        metavar="DEG",
        help="predict the mean of the image turned by +DEG and -DEG degrees (each with its mirror with --tta; "
        "0: the image as it is)",
    )
    parser.add_argument(
        "--source-antialias",
        choices=("true", "false"),
        help="set the folder's data_contract.source_antialias (the filter of a full-size film's resize to the source "
        "size) instead of the runs' own; runs trained before the field existed record none, which reads as true",
    )
    args = parser.parse_args()
    run_dir = args.run_dirs[0]  # the recipe and history on record are the first run's
    target = ROOT / "src" / "boneage" / "models" / args.name
    building = target.with_name(target.name + ".tmp")  # renamed to target once complete
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = run_dir / "model"
        if len(args.run_dirs) > 1:
            source = tmp / "combined"
            model, description = combine_model_folders([run / "model" for run in args.run_dirs], source)
        else:
            model, description = load_model_folder(source)
        views = {"tta_views": [[args.tta_rotations, 1.0], [-args.tta_rotations, 1.0]]} if args.tta_rotations else {}
        scored = source
        defaults = {**({"tta_hflip": True} if args.tta else {}), **views}  # how the folder reads by default
        if views:  # the fp32 weights read with the same views
            scored = Path(shutil.copytree(source, tmp / "fp32_views"))
            _update(scored, "output", **views)
        fp32 = headline(_score(scored, tmp, "fp32", tta=args.tta or None))
        staged = tmp / "staged"
        contract = contract_from_description(description)
        if args.source_antialias is not None:
            contract.source_antialias = args.source_antialias == "true"
        save_model_folder(
            staged,
            model,
            contract,
            training=description["training"],
            metrics=description["metrics"],
            dtype=getattr(torch, args.dtype),
        )
        if defaults:
            _update(staged, "output", **defaults)
        correction = None
        uncorrected = None
        if args.correct:
            uncorrected = headline(_score(staged, tmp, "uncorrected"))
            correction = _fit_correction(staged, tmp)
            _update(staged, "output", correction=correction)
        stored = headline(_score(staged, tmp, "stored"))
        metrics = {
            **description["metrics"],
            "val": stored,
            "val_fp32": fp32,
            **({"val_uncorrected": uncorrected} if uncorrected else {}),
            "val_note": "seed split val (n=1892): the best epoch was selected on it, so these are selection metrics",
        }
        training = {**description["training"], "run": " + ".join(run.name for run in args.run_dirs)}
        # provenance without this machine's paths: data files relative to the shared data folder
        for key in ("labels", "images", "split"):
            value = training["config"]["data"].get(key)
            if value:
                training["config"]["data"][key] = _relative(value)
        training["config"]["train"]["output"] = f"runs/{run_dir.name}"
        training["data"] = {
            "labels": _relative(training["data"].get("labels") or ""),
            "split": _relative(training["data"].get("split") or ""),
            "description": "RSNA Pediatric Bone Age Challenge 2017 training set, 100x100 px squashed copies; "
            "fit on the seed split's train (8,827), best epoch selected on its val (1,892)",
        }
        if not training.get("history") and (run_dir / "history.json").is_file():
            training["history"] = json.loads((run_dir / "history.json").read_text())
        save_model_folder(
            building,
            model,
            contract,
            training=training,
            metrics=metrics,
            dtype=getattr(torch, args.dtype),
        )
        _update(
            building,
            "output",
            **defaults,
            **({"correction": correction} if correction else {}),
        )
        # a 90% interval: calibrated on one half of val, coverage measured on the other half
        interval = calibrate_interval(tmp / "stored.csv", DATA / "boneage-training-dataset.csv", coverage=0.9)
        interval["calibration"]["source"] = "seed split val, calibration half (stratified by stage x sex, seed 0)"
        interval["evaluation"]["source"] = "seed split val, the other half"
        store_interval(building, interval)
        # refusal of images unlike the training radiographs: fit on train, threshold on one half of val
        table = read_labels(DATA / "boneage-training-dataset.csv", DATA / "boneage-training-dataset")
        table = table.merge(read_split(DATA / "seed-split.csv", table), on="id")
        assessability = fit_assessability(
            building,
            table[table["split"] == "train"],
            table[table["split"] == "val"],
            write_non_hand_images(tmp / "non_hand"),
        )
        # inverted and turned radiographs: statistics fit on train, the whole checks measured on val
        presentation = fit_presentation(
            building, table[table["split"] == "train"], table[table["split"] == "val"], backend="torch"
        )
        full = measure_fullres(building, tmp) if FULLRES.is_dir() else {}
    from boneage.export import attach_onnx

    onnx_report = attach_onnx(building)
    if target.exists():
        shutil.rmtree(target)
    building.rename(target)
    print(
        json.dumps(
            {
                "shipped": str(target),
                "val": stored,
                "val_fp32": fp32,
                "val_uncorrected": uncorrected,
                "correction": correction,
                "fullres_samples": full,
                "onnx": onnx_report,
                "interval": interval,
                "assessability": assessability,
                "presentation": presentation,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
