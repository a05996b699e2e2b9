"""Single-image latency (cold whole-process CLI, warm in-process p50/p95) and peak memory over long batches.

Usage (from the repository root; needs ../shared/data):
    python bench/bench_latency.py [--cold-runs 3] [--warm-runs 50] [--rss-sizes 1000 10000]

Peak RSS is measured in a fresh process per batch size, predicting the val images repeated to 1,000 and 10,000
files with the shipped model, on each backend (onnx: the default path; torch), rows streamed to a CSV as in
`boneage predict`.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, FULLRES  # also puts the repository root on the path


def val_paths() -> list[Path]:
    import pandas as pd

    split = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str})
    return [DATA / "boneage-training-dataset" / f"{i}.png" for i in split.query("split == 'val'")["id"]]


def rss_child(n: int, backend: str) -> None:
    """Predict n files (val repeated) and print the peak RSS in MiB as the last line."""
    from boneage.predict import load_predictor

    paths = val_paths()
    files = [paths[i % len(paths)] for i in range(n)]
    predictor = load_predictor(None, backend)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "p.csv", "w", newline="") as handle:
        writer = None
        for row in predictor.predict_files(files, [True] * n):  # the default batch size, as `boneage predict`
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--warm-runs", type=int, default=50)
    parser.add_argument(
        "--rss-sizes", type=int, nargs="*", default=[1000, 10000], help="batch sizes for peak RSS (none: skip)"
    )
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="onnx", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.backend)
        return
    if not DATA.is_dir():
        raise SystemExit(f"skipped: {DATA} not found")
    image = sorted((FULLRES / "images").glob("*.png"))[0] if (FULLRES / "images").is_dir() else val_paths()[0]
    results: dict[str, object] = {"image": image.name}

    import numpy as np
    import torch

    from boneage.dataset import preprocess
    from boneage.imageio import preprocess_array
    from boneage.predict import load_predictor

    for backend in ("onnx", "torch"):  # onnx: the default path (the shipped folder's model.onnx)
        cold = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.cold_runs):
                start = time.perf_counter()
                subprocess.run(
                    [
                        "boneage",
                        "predict",
                        str(image),
                        "--sex",
                        "F",
                        "--quiet",
                        "--backend",
                        backend,
                        "--output",
                        f"{tmp}/p.csv",
                    ],
                    check=True,
                    capture_output=True,
                )
                cold.append(time.perf_counter() - start)
        results[f"{backend}_cold_cli_seconds_median"] = statistics.median(cold)

        predictor = load_predictor(None, backend)
        timings = []
        for i in range(args.warm_runs + 3):
            start = time.perf_counter()
            if backend == "torch":
                predictor.predict_batch(preprocess(image, predictor.contract)[None], torch.tensor([0]))
            else:
                predictor.predict_batch(preprocess_array(image, predictor.contract)[None], np.array([0]))
            if i >= 3:  # the first calls warm the allocator and kernels
                timings.append((time.perf_counter() - start) * 1000)
        timings.sort()
        results[f"{backend}_warm_ms_p50"] = timings[len(timings) // 2]
        results[f"{backend}_warm_ms_p95"] = timings[int(len(timings) * 0.95) - 1]

        for n in args.rss_sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), "--backend", backend],
                check=True,
                capture_output=True,
                text=True,
            )
            results[f"{backend}_peak_rss_mib_{n}"] = float(out.stdout.strip().splitlines()[-1])
        if len(args.rss_sizes) > 1:
            small, large = min(args.rss_sizes), max(args.rss_sizes)
            results[f"{backend}_rss_ratio_{large}_vs_{small}"] = (
                results[f"{backend}_peak_rss_mib_{large}"] / results[f"{backend}_peak_rss_mib_{small}"]
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
