"""Does the ensemble's own disagreement make a better prediction interval than one width for everyone?

    python tools/interval_spread.py [MODEL_DIR] [--out runs/interval-spread]

For an ensemble model folder: each network's output for each val image and its mirror (PyTorch), then on the two
halves of val that the shipped interval uses (stratified by stage x sex, seed 0; calibrate on one, measure on the
other) three split-conformal intervals at 90%: the shipped constant ``prediction +/- q``; a normalised one,
``prediction +/- q * (spread + beta)`` with ``spread`` the SD of the outputs and ``beta`` their median spread on the
calibration half (and twice it); and one ``q`` per predicted stage. Prints coverage overall, per sex, per reference
stage and per spread tercile, and the mean width. Outputs stay in ``--out`` (``members_val.npz``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from ship_model import DATA, split_part

from boneage.config import contract_from_description
from boneage.dataset import preprocess
from boneage.labels import make_split, stage_of
from boneage.model import BoneAgeEnsemble, load_model_folder
from boneage.model_folder import default_model_dir


def member_outputs(model_dir: Path, val: pd.DataFrame, batch: int = 32) -> np.ndarray:
    """(2 * members, images): each network's output for each image, then for its mirror."""
    model, description = load_model_folder(model_dir)
    if not isinstance(model, BoneAgeEnsemble):
        raise SystemExit(f"{model_dir}: not an ensemble (model.members in config.json)")
    contract = contract_from_description(description)
    out = np.zeros((2 * len(model.members), len(val)), np.float32)
    with torch.inference_mode():
        for i in range(0, len(val), batch):
            ids = val["id"].iloc[i : i + batch]
            x = torch.stack([preprocess(DATA / "boneage-training-dataset" / f"{j}.png", contract) for j in ids])
            x = x.contiguous(memory_format=torch.channels_last)
            male = torch.tensor(val["male"].iloc[i : i + batch].astype(int).to_numpy())
            for k, net in enumerate(model.members.eval()):
                out[2 * k, i : i + batch] = net(x, male).float().numpy()
                out[2 * k + 1, i : i + batch] = net(x.flip(-1), male).float().numpy()
    return out


def conformal_quantile(scores: np.ndarray, coverage: float = 0.9) -> float:
    ordered = np.sort(scores)
    return float(ordered[min(len(ordered), math.ceil((len(ordered) + 1) * coverage)) - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/interval-spread"))
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs the RSNA 100-px data at {DATA}")
    args.out.mkdir(parents=True, exist_ok=True)
    val = split_part("val")
    cache = args.out / "members_val.npz"
    if cache.is_file():
        outputs = np.load(cache)["out"]
    else:
        outputs = member_outputs(args.model or default_model_dir(), val)
        np.savez(cache, out=outputs, id=val["id"].to_numpy())

    truth, male = val["boneage"].to_numpy(dtype=float), val["male"].to_numpy(dtype=bool)
    prediction = outputs.mean(axis=0)
    error = np.abs(prediction - truth)
    spread = outputs.std(axis=0)
    halves = make_split(val, fractions=(0.5, 0.5, 0.0), seed=0)["split"].to_numpy()
    cal, held = halves == "train", halves == "val"
    rank = pd.Series(error).corr(pd.Series(spread), method="spearman")
    print(f"val MAE {error.mean():.3f}; Spearman correlation of |error| with the spread {rank:.3f}")

    stage, tercile = stage_of(truth[held]), pd.qcut(spread[held], 3, labels=False)
    beta = float(np.median(spread[cal]))
    predicted_stage = stage_of(prediction)
    per_stage = np.zeros_like(prediction)
    for k in np.unique(predicted_stage):
        per_stage[predicted_stage == k] = conformal_quantile(error[cal & (predicted_stage == k)])
    intervals = {
        "one width (shipped)": np.full_like(prediction, conformal_quantile(error[cal])),
        f"spread + {beta:.2f}": conformal_quantile(error[cal] / (spread[cal] + beta)) * (spread + beta),
        f"spread + {2 * beta:.2f}": conformal_quantile(error[cal] / (spread[cal] + 2 * beta)) * (spread + 2 * beta),
        "one width per predicted stage": per_stage,
    }
    print("| interval | coverage | male | female | per reference stage | per spread tercile (low..high) | width |")
    print("| --- | ---: | ---: | ---: | --- | --- | ---: |")
    for name, half in intervals.items():
        covered = error[held] <= half[held]
        stages = " / ".join(f"{covered[stage == k].mean():.3f}" for k in range(4) if (stage == k).any())
        terciles = " / ".join(f"{covered[tercile == k].mean():.3f}" for k in range(3))
        print(
            f"| {name} | {covered.mean():.3f} | {covered[male[held]].mean():.3f} | {covered[~male[held]].mean():.3f} "
            f"| {stages} | {terciles} | {2 * half[held].mean():.1f} |"
        )


if __name__ == "__main__":
    main()
