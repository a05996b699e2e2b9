"""How stage QWK follows regression MAE on a given set of bone ages.

    python tools/qwk_vs_mae.py LABELS_CSV [--split SPLIT_CSV --part val] [--predictions PRED_CSV]

The four stages are cut from the regressed age (60/120/180 months), so their quadratic weighted kappa is set by how
many images the regression moves across a cut. This script measures that relation on the true ages of a label file:
(1) Gaussian errors of growing spread, (2) with ``--predictions`` (a ``boneage predict`` CSV), the model's own
residuals scaled by a factor, so the shape of its errors (per-age bias included) is kept. It prints MAE -> QWK,
averaged over ``--repeats`` draws, and the MAE at which QWK first reaches ``--target``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from boneage.labels import read_labels, read_split, stage_of
from boneage.metrics import stage_metrics


def _qwk(true_months: np.ndarray, predicted_months: np.ndarray) -> float:
    """The stage QWK exactly as `boneage evaluate` reports it."""
    return stage_metrics(stage_of(true_months), stage_of(predicted_months))["quadratic_weighted_kappa"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels")
    parser.add_argument("--split", help="id,split CSV; keep only --part")
    parser.add_argument("--part", default="val")
    parser.add_argument("--predictions", help="a `boneage predict` CSV for the same images")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    labels = read_labels(args.labels)
    if args.split:
        split = read_split(args.split, labels)
        labels = labels[labels["id"].isin(split.loc[split["split"] == args.part, "id"])]
    truth = labels.set_index("id")["boneage"].astype(float)
    ages = truth.to_numpy()
    rng = np.random.default_rng(args.seed)
    shares = np.bincount(stage_of(ages), minlength=4) / len(ages)
    print(f"{len(truth)} images; stage shares {np.round(shares, 3)}")

    print("\nGaussian errors:  sd -> MAE, QWK")
    for sd in (4, 5, 6, 7, 8, 9, 10, 11, 12):
        maes, qwks = [], []
        for _ in range(args.repeats):
            error = rng.normal(0.0, sd, len(ages))
            maes.append(np.abs(error).mean())
            qwks.append(_qwk(ages, ages + error))
        print(f"  sd {sd:4.1f}  MAE {np.mean(maes):5.2f}  QWK {np.mean(qwks):.4f}")

    if args.predictions:
        rows = pd.read_csv(args.predictions, dtype={"id": str})
        rows = rows[rows["status"] == "ok"].set_index("id")
        ids = rows.index.intersection(truth.index)
        y = truth.loc[ids].to_numpy()
        residual = rows.loc[ids, "bone_age_months"].to_numpy(dtype=float) - y
        print(f"\nthis model's residuals (n={len(ids)}) scaled:  factor -> MAE, QWK")
        reached = None
        for factor in np.arange(1.0, 0.39, -0.05):
            mae = float(np.abs(factor * residual).mean())
            qwk = _qwk(y, y + factor * residual)
            print(f"  x{factor:4.2f}  MAE {mae:5.2f}  QWK {qwk:.4f}")
            if reached is None and qwk >= args.target:
                reached = mae
        print(f"QWK >= {args.target} first at MAE {reached:.2f}" if reached else f"QWK stays below {args.target}")


if __name__ == "__main__":
    main()
