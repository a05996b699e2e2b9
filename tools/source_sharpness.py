"""How sharp an image is at the 100-px source size: the training copies against full-size films sent there by each
filter. The evidence for the data contract's ``source_antialias`` (MODEL_CARD.md, "Real films").

    python tools/source_sharpness.py [--copies N]

Sharpness is the mean absolute Laplacian of the image standardised on its own (zero mean, unit SD) at 100 x 100;
printed as the median and quartiles over the images of each set: the train-split copies (all, or a random sample of
N, seed 0), the 100 dev films and the 35 processed samples, each film squashed to 100 px by Pillow's antialiased
bilinear filter (the contract's ``source_antialias: true``) and by plain bilinear interpolation (``false``), with the
share of training copies less sharp than the set's median. For the samples (RSNA training ids) the copies of the same
ids are printed too. No model and no labels are read.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from data_paths import DATA, DEV_FILMS, FULLRES
from scipy.ndimage import laplace

from boneage.imageio import read_image, resize_array

SOURCE_SIZE = 100


def sharpness(image: np.ndarray) -> float:
    standardised = (image - image.mean()) / max(float(image.std()), 1e-6)
    return float(np.abs(laplace(standardised)).mean())


def summary(values: list[float]) -> str:
    low, mid, high = np.percentile(values, [25, 50, 75])
    return f"{mid:.3f} ({low:.3f}-{high:.3f}, n={len(values)})"


def films(folder, copies: np.ndarray) -> dict[str, str]:
    paths = sorted((folder / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"{folder}/images: no PNG films found (set BONEAGE_DATA to the shared data folder)")
    rows = {}
    for name, antialias in (("antialiased bilinear", True), ("plain bilinear", False)):
        values = [sharpness(resize_array(read_image(p), SOURCE_SIZE, "squash", antialias)) for p in paths]
        below = float((copies < np.median(values)).mean())
        rows[name] = f"{summary(values)}; {below:.1%} of the copies less sharp"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=None, help="sample this many train-split copies (default: all)")
    args = parser.parse_args()
    split = pd.read_csv(DATA / "seed-split.csv")
    ids = split.loc[split["split"] == "train", "id"]
    if args.copies:
        ids = ids.sample(n=args.copies, random_state=0)
    copies = np.array([sharpness(read_image(DATA / "boneage-training-dataset" / f"{i}.png")) for i in ids])
    print("sharpness at 100 px: median (P25-P75) of the mean |Laplacian| of each standardised image")
    print(f"  {'training copies (train split)':42s} {summary(list(copies))}")
    for label, folder in (("dev films", DEV_FILMS), ("processed samples", FULLRES)):
        for name, value in films(folder, copies).items():
            print(f"  {label + ', ' + name:42s} {value}")
    sample_ids = pd.read_csv(FULLRES / "labels.csv")["id"]
    same = [sharpness(read_image(DATA / "boneage-training-dataset" / f"{i}.png")) for i in sample_ids]
    print(f"  {'copies of the processed samples':42s} {summary(same)}")


if __name__ == "__main__":
    main()
