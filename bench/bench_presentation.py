"""What the checks for inverted and turned radiographs cost: the shipped model on onnxruntime with the checks and
without, side by side.

Usage (from the repository root; needs ../shared/data):
    python bench/bench_presentation.py [--n 512] [--repeats 2] [--sets given,negatives,turned]

Runs ``predict_files`` (`boneage predict`'s path, decoding included) over the first --n val images, alternating the
two settings --repeats times, and reports images/s and their ratio; then the same for the images' negatives and for
the images turned by 90 degrees, where the checks make an extra pass for each image they suspect.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import DATA  # also puts the repository root on the path
from PIL import Image

from boneage.backends.onnx import OnnxPredictor
from boneage.model_folder import default_model_dir


def rate(predictor: OnnxPredictor, paths: list[Path], checks: dict | None) -> tuple[float, int]:
    predictor.presentation = checks
    start = time.perf_counter()
    rows = list(predictor.predict_files(paths, [True] * len(paths)))
    seconds = time.perf_counter() - start
    return len(paths) / seconds, sum(": looks " in (row.get("message") or "") for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sets", default="given,negatives,turned", help="which of the three image sets to time")
    args = parser.parse_args()
    split = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str})
    ids = split[split["split"] == "val"]["id"].head(args.n)
    given = [DATA / "boneage-training-dataset" / f"{i}.png" for i in ids]
    predictor = OnnxPredictor(default_model_dir())
    checks = predictor.presentation
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        negatives, turned = [], []
        for path in given:
            pixels = np.asarray(Image.open(path).convert("L"))
            negatives.append(Path(tmp) / f"negative_{path.name}")
            Image.fromarray(255 - pixels).save(negatives[-1])
            turned.append(Path(tmp) / f"turned_{path.name}")
            Image.fromarray(np.rot90(pixels)).save(turned[-1])
        rate(predictor, given[:32], None)  # warm-up
        sets = {"given": ("as given", given), "negatives": ("negatives", negatives), "turned": ("turned 90", turned)}
        for name, paths in (sets[key] for key in args.sets.split(",")):
            runs: dict[str, list[float]] = {"without checks": [], "with checks": [], "called wrong": []}
            for _ in range(args.repeats):
                runs["without checks"].append(rate(predictor, paths, None)[0])
                speed, called = rate(predictor, paths, checks)
                runs["with checks"].append(speed)
                runs["called wrong"].append(called)
            results[name] = runs
    for name, runs in results.items():
        ratios = [w / wo for w, wo in zip(runs["with checks"], runs["without checks"])]
        print(
            f"{name}: {args.n} images, without checks "
            + " / ".join(f"{v:.1f}" for v in runs["without checks"])
            + " img/s, with checks "
            + " / ".join(f"{v:.1f}" for v in runs["with checks"])
            + " img/s, ratio "
            + " / ".join(f"{r:.2f}" for r in ratios)
            + f", refused as inverted or turned {int(runs['called wrong'][0])}"
        )
    print(json.dumps({"machine": platform.processor() or platform.machine(), "n": args.n, **results}))


if __name__ == "__main__":
    main()
