"""Test-time augmentation beyond the mirror: score sets of fixed views (mirror, zoom, small rotations) on val.

    python tools/tta_views.py [MODEL_DIR] [--out runs/tta-views] [--no-fullres]

Every image of the seed split's val (and the full-resolution samples) is predicted once per view by the model
folder's ``model.onnx``; a view is a mirror, a rotation and a zoom about the centre applied to the resized image
before normalisation, with black outside, as the training augmentation makes them (``boneage.dataset.augment_batch``).
Each named set of views is the mean of its views' outputs, scored with ``boneage.evaluate`` (one markdown row each)
and on the two halves of val that the shipped interval uses (stratified by stage x sex, seed 0: ``mae_half_a`` the
calibration half, ``mae_half_b`` the evaluation half), so a set that only
helps on one half shows it. Per-view predictions stay in ``--out`` (``views_val.csv``, ``views_fullres.csv``).

Val is the split the shipped networks were selected on, and the views and sets are chosen by looking at it: these
are selection metrics, not test results.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ship_model import DATA, FULLRES, split_part

from boneage.backends.onnx import OnnxPredictor
from boneage.dataset import load_resized, normalize_batch
from boneage.evaluate import evaluate
from boneage.labels import make_split
from boneage.metrics import headline
from boneage.model_folder import PLAIN_VIEW, default_model_dir

# (mirror, rotation in degrees, zoom): zoom > 1 enlarges the hand (crops the edges), < 1 shrinks it onto black
VIEWS = [
    (flip, angle, zoom)
    for angle, zoom in ((0, 1.0), (0, 1.1), (0, 0.9), (8, 1.0), (-8, 1.0), (0, 1.2))
    for flip in (False, True)
]
SETS = {
    "as is (one pass)": [0],
    "+ mirror (the shipped default)": [0, 1],
    "zoom 1.1 + its mirror": [2, 3],
    "zoom 1.2 + its mirror": [10, 11],
    "as is, zoom 1.1, mirrors (4)": [0, 1, 2, 3],
    "zoom 1.1, zoom 1.2, mirrors (4)": [2, 3, 10, 11],
    "rotation +8 and -8, mirrors (4)": [6, 7, 8, 9],
    "as is, rotations +-8, mirrors (6)": [0, 1, 6, 7, 8, 9],
    "as is, zoom 1.1 and 1.2, mirrors (6)": [0, 1, 2, 3, 10, 11],
    "as is, zoom 1.1, rotations +-8, mirrors (8)": [0, 1, 2, 3, 6, 7, 8, 9],
    "all 12 views": list(range(12)),
}


def apply_view(images: torch.Tensor, flip: bool, angle: float, zoom: float) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> the same images rotated by ``angle`` degrees and zoomed by ``zoom``, then mirrored."""
    if angle or zoom != 1.0:
        t = math.radians(angle)
        cos, sin = math.cos(t) / zoom, math.sin(t) / zoom
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
    return images.flip(-1) if flip else images


def predict_views(predictor: OnnxPredictor, table: pd.DataFrame, paths: list[Path], batch: int = 64) -> np.ndarray:
    """(views, images) bone ages, one row per view in ``VIEWS``."""
    predictor.tta_hflip, predictor.tta_views = False, [PLAIN_VIEW]  # one pass per view, whatever the folder says
    images = torch.stack([load_resized(path, predictor.contract) for path in paths])
    male = table["male"].astype(bool).to_numpy().astype(np.int64)
    out = np.zeros((len(VIEWS), len(table)), np.float32)
    for v, view in enumerate(VIEWS):
        for i in range(0, len(table), batch):
            x = normalize_batch(apply_view(images[i : i + batch], *view), predictor.contract).numpy()
            out[v, i : i + batch] = predictor.predict_batch(x, male[i : i + batch])["months"]
        print(f"  view {v} {view}: MAE {np.abs(out[v] - table['boneage'].to_numpy()).mean():.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None, help="model folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("runs/tta-views"))
    parser.add_argument("--no-fullres", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs the RSNA 100-px data at {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    predictor = OnnxPredictor(args.model or default_model_dir())

    labels_csv = DATA / "boneage-training-dataset.csv"
    val = split_part("val")
    parts = {"val": (val, [DATA / "boneage-training-dataset" / f"{i}.png" for i in val["id"]], labels_csv)}
    if not args.no_fullres and FULLRES.is_dir():
        full = pd.read_csv(FULLRES / "labels.csv", dtype={"id": str})
        parts["fullres"] = (full, [FULLRES / "images" / f"{i}.png" for i in full["id"]], FULLRES / "labels.csv")

    halves = make_split(val, fractions=(0.5, 0.5, 0.0), seed=0).set_index("id").loc[val["id"], "split"].to_numpy()
    columns = ["mae_months", "mean_signed_error_months", "mae_male_months", "mae_female_months"]
    columns += ["bias_male_months", "bias_female_months", "stage_qwk"]
    rows = []
    for name, (table, paths, labels_file) in parts.items():
        print(f"{name}: {len(table)} images x {len(VIEWS)} views", flush=True)
        out = predict_views(predictor, table, paths)
        frame = pd.DataFrame(out.T, columns=[str(view) for view in VIEWS])
        frame.insert(0, "id", table["id"])
        frame.to_csv(args.out / f"views_{name}.csv", index=False)
        for set_name, views in SETS.items():
            mean = out[views].mean(axis=0)
            file = args.out / f"{name}_{'-'.join(map(str, views))}.csv"
            pd.DataFrame({"id": table["id"], "bone_age_months": mean, "status": "ok"}).to_csv(file, index=False)
            row = {"set": set_name, "part": name, "views": len(views)}
            row.update({k: headline(evaluate(file, labels_file, figures=False))[k] for k in columns})
            if name == "val":
                error = np.abs(mean - table["boneage"].to_numpy())
                row["mae_half_a"], row["mae_half_b"] = error[halves == "train"].mean(), error[halves == "val"].mean()
            rows.append(row)
    result = pd.DataFrame(rows)
    result.to_csv(args.out / "sets.csv", index=False)
    print("| " + " | ".join(result.columns) + " |\n|" + " --- |" * len(result.columns))
    for row in result.itertuples(index=False):
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
