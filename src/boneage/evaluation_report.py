"""``boneage report``: everything for one model on one labelled subset in one folder: predictions, metrics, every
figure (Grad-CAM, t-SNE, training history), the XGBoost blend if asked, and ``report.html`` that gathers them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from boneage.backends.torch import TorchPredictor
from boneage.blend import fit_ensemble
from boneage.evaluate import evaluate
from boneage.explain import gradcam_grid, tsne_figure
from boneage.figures import write_figures, write_html
from boneage.imageio import STAGE_NAMES
from boneage.labels import read_labels, read_split, stage_of
from boneage.metrics import format_report
from boneage.predict import predict_paths


def build_report(
    labels: str | Path,
    images: str | Path,
    output: str | Path,
    model_dir: str | Path | None = None,
    split: str | Path | None = None,
    subset: str = "val",
    classifier_dir: str | Path | None = None,
    ensemble: bool = False,
    gradcam_images: int = 8,
    tsne_images: int = 1000,
) -> dict[str, Any]:
    """Everything for one model on one labelled subset, in ``output``: predictions, metrics, every figure (incl.
    Grad-CAM, t-SNE and the training history stored in the model folder), the XGBoost ensemble if asked, and
    ``report.html`` that gathers them."""

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = read_labels(labels, images)
    if split:
        table = table.merge(read_split(split, table), on="id")
        table = table[table["split"] == subset].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"no labelled images in subset {subset!r}")

    metadata = output / "metadata.csv"
    table[["id", "male"]].to_csv(metadata, index=False)
    paths = table["path"].tolist()
    predict_paths(paths, output / "predictions.csv", model_dir=model_dir, metadata=metadata, progress=False)
    stage_csv = None
    if classifier_dir:
        stage_csv = output / "predictions_stage_classifier.csv"
        predict_paths(paths, stage_csv, model_dir=classifier_dir, metadata=metadata, progress=False)
    predictor = TorchPredictor.load(model_dir)
    history = predictor.description.get("training", {}).get("history") or None
    metrics = evaluate(
        output / "predictions.csv", labels, output, history=history, figures=False, stage_predictions=stage_csv
    )
    joined = pd.read_csv(output / "predictions.csv", dtype={"id": str}).merge(
        table[["id", "boneage", "male"]].rename(columns={"male": "male_true"}), on="id"
    )
    joined = joined[joined["status"] == "ok"].assign(male=lambda f: f["male_true"])
    figures = write_figures(joined, metrics, output, history)

    # Grad-CAM on a spread of cases: for each stage, one female and one male, while images last
    picks = []
    for stage in range(len(STAGE_NAMES)):
        for male in (False, True):
            rows = table[(stage_of(table["boneage"].to_numpy()) == stage) & (table["male"] == male)]
            if len(rows):
                picks.append(rows.iloc[len(rows) // 2])
    picks = picks[:gradcam_images]
    if picks:
        titles = [f"{p['id']}: reference {p['boneage']:g} m" for p in picks]
        figures.append(
            gradcam_grid(
                predictor.model,
                predictor.contract,
                [p["path"] for p in picks],
                [bool(p["male"]) for p in picks],
                output / "gradcam.png",
                titles=titles,
            )
        )
    if tsne_images > 1:
        figures.append(tsne_figure(predictor.model, predictor.contract, table, output / "tsne.png", tsne_images))

    notes = [f"Model: {predictor.model_dir}. Images: the {subset!r} subset of {split or labels} (n={len(table)})."]
    selection = predictor.description.get("metrics", {}).get("selected_on")
    if selection == subset:
        notes.append(
            f"Caution: the model's best epoch was selected on {subset!r}, so these are selection metrics, "
            "not an independent test result."
        )
    text = format_report(metrics)
    if ensemble:
        if not split:
            raise ValueError("the ensemble needs --split (train to fit XGBoost, val halves to blend and score)")

        summary = fit_ensemble(labels, images, split, output / "ensemble", model_dir=model_dir)
        metrics["ensemble"] = summary
        text += "\nXGBoost ensemble (MAE in months on the evaluation half of val)\n"
        text += f"  protocol: {summary['protocol']}\n"
        text += f"  CNN weight fitted on the calibration half: {summary['cnn_weight']:.2f}\n"
        text += "".join(f"  {k:<22} {v:.2f}\n" for k, v in summary["evaluation_mae_months"].items())
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output / "report.txt").write_text(text)
    write_html(metrics, text, figures, output, notes)
    return metrics
