"""Add the checks for inverted and turned radiographs (:mod:`boneage.presentation`) to a model folder that has a
refusal check, and measure them.

    python tools/fit_presentation.py [MODEL_DIR] [--data DIR] [--fullres DIR] [--backend auto|torch|onnx]

Fits the statistics on 3,000 train images of the seed split (with their negatives and their copies turned by 90, 180
and 270 degrees), then runs val (1,892) and the full-resolution samples through the model as given, inverted and
turned: how many of each the checks call wrong, and how many wrong ones got an age without and with the checks (with
their error). Writes ``config.json`` -> ``polarity`` and ``orientation`` (``ship_model.py`` does the same for a new
model folder).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from data_paths import DATA, FULLRES

from boneage.fit_checks import fit_presentation, measure_into_folder
from boneage.labels import read_labels, read_split
from boneage.model_folder import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--data", type=Path, default=DATA, help="the 100-px RSNA folder (labels, images, split)")
    parser.add_argument("--fullres", type=Path, default=FULLRES, help="full-resolution samples (skipped if absent)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()

    start = time.perf_counter()
    table = read_labels(args.data / "boneage-training-dataset.csv", args.data / "boneage-training-dataset")
    table = table.merge(read_split(args.data / "seed-split.csv", table), on="id")
    checks = fit_presentation(
        model_dir, table[table["split"] == "train"], table[table["split"] == "val"], backend=args.backend
    )
    if (args.fullres / "labels.csv").is_file():
        labels = pd.read_csv(args.fullres / "labels.csv")
        paths = [args.fullres / "images" / f"{i}.png" for i in labels["id"]]
        measured = measure_into_folder(
            model_dir, paths, labels["male"], labels["boneage"], "fullres_samples", args.backend
        )
        for key, value in measured.items():
            checks[key]["fullres_samples"] = value
    print(
        json.dumps(
            {k: {f: v for f, v in c.items() if f not in ("weights", "bias")} for k, c in checks.items()}, indent=2
        )
    )
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
