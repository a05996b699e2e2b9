"""How the shipped model reads a film framed differently: the full-resolution samples as given, padded, cropped, and
both hands on one film.

    python tools/framing.py [MODEL_DIR] [--out runs/framing]

Each variant of the 35 full-resolution radiographs (``../shared/data/rsna-bone-age-fullres-samples``) is written to
``--out/<variant>/`` as PNG and read by ``boneage predict``'s code path with the labels' sex. Printed per variant:
how many were accepted (not refused as not assessable), and the MAE and mean signed error of those against the
labels. The variants:

- ``as_given``: the files themselves;
- ``padded_square``: black added to the short side, the film in the middle (an export that letterboxes);
- ``cropped_10pct``: a tenth of the width and of the height cut from each side (a tight crop that can clip fingers
  and the distal radius);
- ``both_hands``: the film beside its own mirror image, as a left and a right hand on one film.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from ship_model import FULLRES

from boneage.model_folder import default_model_dir
from boneage.predict import predict_paths


def padded_square(image: np.ndarray) -> np.ndarray:
    height, width = image.shape
    side = max(height, width)
    out = np.zeros((side, side), image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def cropped_10pct(image: np.ndarray) -> np.ndarray:
    height, width = image.shape
    return image[height // 10 : height - height // 10, width // 10 : width - width // 10]


def both_hands(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[:, ::-1], image], axis=1)


VARIANTS = {"as_given": None, "padded_square": padded_square, "cropped_10pct": cropped_10pct, "both_hands": both_hands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--out", default="runs/framing")
    args = parser.parse_args()
    if not FULLRES.is_dir():
        raise SystemExit(f"skipped: {FULLRES} not found")
    model_dir = Path(args.model) if args.model else default_model_dir()
    labels = pd.read_csv(FULLRES / "labels.csv", dtype={"id": str})
    sources = sorted((FULLRES / "images").glob("*.png"))
    print(f"model {model_dir.name}, {len(sources)} full-resolution radiographs")
    print("| framing | accepted | MAE of the accepted | mean signed error |")
    print("| --- | ---: | ---: | ---: |")
    for name, transform in VARIANTS.items():
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for source in sources:
            image = np.asarray(Image.open(source).convert("L"))
            Image.fromarray(image if transform is None else transform(image)).save(folder / source.name)
        table = predict_paths(
            [folder], folder.with_suffix(".csv"), model_dir=model_dir, metadata=FULLRES / "labels.csv", progress=False
        )
        scored = table.merge(labels[["id", "boneage"]], on="id")
        accepted = scored[scored["status"] == "ok"]
        error = accepted["bone_age_months"] - accepted["boneage"]
        mae = f"{error.abs().mean():.2f}" if len(accepted) else "-"
        bias = f"{error.mean():+.2f}" if len(accepted) else "-"
        print(f"| {name} | {len(accepted)} of {len(scored)} | {mae} | {bias} |")


if __name__ == "__main__":
    main()
