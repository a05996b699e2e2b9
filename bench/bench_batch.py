"""Batch size of `boneage predict`: throughput and peak memory, side by side in one run, on both backends.

Usage (from the repository root; needs ../shared/data):
    python bench/bench_batch.py [--sizes 1 4 8 16 32] [--n 256] [--rounds 2] [--backends onnx torch]

Each (backend, batch size) predicts the same ``--n`` val images with the shipped model (image + mirror, presentation
checks on, decoding included) in a fresh process, so its peak RSS is its own. The rounds alternate the order of the
sizes (ascending, then descending ...) so a slow drift of the machine does not favour one size. Reported per size:
median images/s, its ratio to the largest size, peak RSS, and the largest difference of its predictions from the
largest size's (batching must not change a result).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import DATA  # also puts the repository root on the path


def val_paths(n: int) -> list[Path]:
    import pandas as pd

    split = pd.read_csv(DATA / "seed-split.csv", dtype={"id": str})
    return [DATA / "boneage-training-dataset" / f"{i}.png" for i in split.query("split == 'val'")["id"].head(n)]


def child(backend: str, batch_size: int, n: int) -> None:
    """Predict n val images at one batch size; print one JSON line: images/s, peak RSS (MiB), predictions."""
    from boneage.predict import load_predictor

    files = val_paths(n)
    predictor = load_predictor(None, backend)
    start = time.perf_counter()
    rows = list(predictor.predict_files(files, [True] * len(files), batch_size=batch_size))
    seconds = time.perf_counter() - start
    result = {
        "images_per_s": len(files) / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "months": [row.get("bone_age_months") for row in rows],
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--n", type=int, default=256, help="val images per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"])
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "BATCH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if not DATA.is_dir():
        raise SystemExit(f"skipped: {DATA} not found")

    runs: dict[tuple[str, int], list[dict]] = {}
    for backend in args.backends:
        for r in range(args.rounds):
            for size in args.sizes if r % 2 == 0 else reversed(args.sizes):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", backend, str(size), str(args.n)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.setdefault((backend, size), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{backend} batch {size} round {r + 1}: {runs[backend, size][-1]['images_per_s']:.1f} img/s")

    reference_size = max(args.sizes)
    table = []
    for backend in args.backends:
        reference = runs[backend, reference_size]
        reference_speed = statistics.median(run["images_per_s"] for run in reference)
        for size in args.sizes:
            speed = statistics.median(run["images_per_s"] for run in runs[backend, size])
            drift = max(
                abs(a - b)
                for run in runs[backend, size]
                for a, b in zip(run["months"], reference[0]["months"])
                if a is not None and b is not None
            )
            table.append(
                {
                    "backend": backend,
                    "batch_size": size,
                    "images_per_s": round(speed, 2),
                    "ratio_to_largest": round(speed / reference_speed, 3),
                    "peak_rss_mib": round(max(run["peak_rss_mib"] for run in runs[backend, size])),
                    "max_abs_diff_months": drift,
                }
            )
    print(json.dumps({"machine": platform.processor() or platform.machine(), "n": args.n, "table": table}, indent=2))


if __name__ == "__main__":
    main()
