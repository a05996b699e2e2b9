"""Score trained runs side by side the same way: the lever table of MODEL_CARD.md.

    python tools/compare_runs.py RUN_OR_MODEL_DIR [RUN_OR_MODEL_DIR ...] [--out DIR] [--no-fullres]

For every run folder (its ``model/``) or model folder: the seed split's val images without and with flip TTA (a
shipped model folder also applies its correction and refuses what its assessability check refuses; a run folder has
neither), and the full-resolution samples with flip TTA. With more than
one folder, also the average of their flip-TTA predictions (an ensemble). Prints one markdown row per line: n, MAE,
bias, per-sex MAE and bias, stage QWK. Prediction CSVs stay in ``--out``.

Val is the split each run's best epoch was selected on: these are selection metrics, not test results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from ship_model import DATA, FULLRES, predict_fullres, predict_subset

from boneage.evaluate import evaluate
from boneage.metrics import headline


def _model_dir(path: Path) -> Path:
    return path / "model" if (path / "model" / "config.json").is_file() else path


def _row(name: str, predictions: Path, labels: Path) -> dict:
    return {"name": name, **headline(evaluate(predictions, labels, figures=False))}


def _average(files: list[Path], output: Path) -> Path:
    frames = [pd.read_csv(f, dtype={"id": str}).set_index("id") for f in files]
    ok = frames[0]["status"] == "ok"
    for frame in frames[1:]:
        ok &= frame["status"] == "ok"
    merged = frames[0].loc[ok].copy()
    merged["bone_age_months"] = sum(f.loc[ok, "bone_age_months"] for f in frames) / len(frames)
    merged[["lower_months", "upper_months"]] = float("nan")  # the members' intervals do not carry over
    merged.reset_index().to_csv(output, index=False)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--no-fullres", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs the RSNA 100-px data at {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)

    labels_csv = DATA / "boneage-training-dataset.csv"
    fullres = not args.no_fullres and FULLRES.is_dir()

    rows, val_tta, full_tta = [], [], []
    for run in args.runs:
        model_dir = _model_dir(run)
        name = run.name
        for tta in (False, True):
            out = predict_subset(model_dir, args.out, f"{name}_val_{'tta' if tta else 'plain'}", "val", tta)
            rows.append(_row(f"{name} val{' + flip TTA' if tta else ''}", out, labels_csv))
        val_tta.append(out)
        if fullres:
            full_tta.append(predict_fullres(model_dir, args.out / f"{name}_fullres_tta.csv", tta=True))
            rows.append(_row(f"{name} full-resolution + flip TTA", full_tta[-1], FULLRES / "labels.csv"))
        print(json.dumps(rows[-1]), flush=True)
    if len(args.runs) > 1:
        names = " + ".join(run.name for run in args.runs)
        rows.append(_row(f"average of {names}, val", _average(val_tta, args.out / "average_val.csv"), labels_csv))
        if fullres:
            out = _average(full_tta, args.out / "average_fullres.csv")
            rows.append(_row(f"average of {names}, full-resolution", out, FULLRES / "labels.csv"))

    keys = ["n", "mae_months", "mean_signed_error_months", "mae_male_months", "mae_female_months"]
    keys += ["bias_male_months", "bias_female_months", "stage_qwk"]
    print("| run | " + " | ".join(keys) + " |\n| --- |" + " ---: |" * len(keys))
    for row in rows:
        print(f"| {row['name']} | " + " | ".join(str(row[k]) for k in keys) + " |")
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
