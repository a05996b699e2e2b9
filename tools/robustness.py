"""How a model reads films framed the way clinics frame them: the robustness table of MODEL_CARD.md.

    python tools/robustness.py [MODEL_DIR ...] [--limit N] [--out runs/robustness]

Rows (each read through ``boneage predict``'s code path with the labels' sex, all refusal checks on):

- ``val``: the seed split's val images as given (100-px copies);
- ``val hand crop +M%``: each val image cropped to the box around its hand (:func:`boneage.imageio.hand_box`) with
  a margin of M% of the box's size on each side, as a clinic crops a film around the hand;
- ``val small in a large frame``: each val image in the middle of a frame twice its size, filled with its own
  background level (:func:`boneage.imageio.background_level`);
- ``val bright background``: each val image with everything darker than 0.2 raised to 0.2 (air and soft tissue
  flattened to one grey, as on films with a bright background);
- ``dev films``: the 100 real full-resolution validation radiographs (``rsna-val-fullres-dev``), as given.

Printed per model and row: images read (not refused), MAE and bias of the read ones, and the bias per reference stage.
``--limit N`` scores about N val images, a sample stratified by stage and sex (seed 0), for a faster table.
Data paths come from ``tools/data_paths.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from data_paths import DATA, DEV_FILMS
from PIL import Image

from boneage.imageio import STAGE_NAMES, background_level, hand_box, read_image, stage_index
from boneage.labels import make_split, read_labels, read_split
from boneage.model_folder import default_model_dir
from boneage.predict import predict_paths


def hand_crop(margin: float) -> Callable[[np.ndarray], np.ndarray]:
    def crop(image: np.ndarray) -> np.ndarray:
        top, bottom, left, right = hand_box(image)
        pad_y, pad_x = round(margin * (bottom - top)), round(margin * (right - left))
        height, width = image.shape
        rows = slice(max(0, top - pad_y), min(height, bottom + pad_y))
        return image[rows, max(0, left - pad_x) : min(width, right + pad_x)]

    return crop


def small_in_large_frame(image: np.ndarray) -> np.ndarray:
    height, width = image.shape
    out = np.full((2 * height, 2 * width), background_level(image), dtype=np.float32)
    out[height // 2 : height // 2 + height, width // 2 : width // 2 + width] = image
    return out


def bright_background(image: np.ndarray) -> np.ndarray:
    return np.maximum(image, 0.2)


VAL_VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
    "val": None,
    "val hand crop +2%": hand_crop(0.02),
    "val hand crop +10%": hand_crop(0.10),
    "val small in a large frame": small_in_large_frame,
    "val bright background": bright_background,
}


def write_variant(paths: list[Path], transform: Callable[[np.ndarray], np.ndarray], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        image = transform(read_image(path))
        target = folder / path.name
        Image.fromarray((image.clip(0, 1) * 255).round().astype(np.uint8)).save(target)
        out.append(target)
    return out


def score(predictions: Path, labels: pd.DataFrame) -> str:
    table = pd.read_csv(predictions, dtype={"id": str}).merge(labels[["id", "boneage"]], on="id")
    read = table[table["status"] == "ok"]
    error = (read["bone_age_months"] - read["boneage"]).to_numpy(dtype=float)
    stage = stage_index(read["boneage"].to_numpy(dtype=float))
    stages = " / ".join(f"{error[stage == i].mean():+.1f}" if (stage == i).any() else "-" for i in range(4))
    return f"{len(read)} of {len(table)} | {np.abs(error).mean():.2f} | {error.mean():+.2f} | {stages}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model folders (default: the shipped model)")
    parser.add_argument("--limit", type=int, default=None, help="score only this many val images (stratified)")
    parser.add_argument("--out", default="runs/robustness")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"skipped: {DATA} not found")
    labels = read_labels(DATA / "boneage-training-dataset.csv", DATA / "boneage-training-dataset")
    labels["id"] = labels["id"].astype(str)
    val = labels.merge(read_split(DATA / "seed-split.csv", labels), on="id")
    val = val[val["split"] == "val"].reset_index(drop=True)
    if args.limit:
        share = min(1.0, args.limit / len(val))  # a sample stratified by stage x sex, seed 0
        if share < 1.0:
            val = val[make_split(val, fractions=(share, 1.0 - share, 0.0), seed=0)["split"].to_numpy() == "train"]
    out = Path(args.out)
    metadata = out / "labels.csv"
    out.mkdir(parents=True, exist_ok=True)
    rows = [val[["id", "boneage", "male"]]]
    inputs: dict[str, list[Path]] = {}
    for name, transform in VAL_VARIANTS.items():
        paths = [Path(p) for p in val["path"]]
        inputs[name] = paths if transform is None else write_variant(paths, transform, out / name.replace(" ", "_"))
    if DEV_FILMS.is_dir():
        dev = pd.read_csv(DEV_FILMS / "labels.csv", dtype={"id": str})
        rows.append(dev[["id", "boneage", "male"]])
        inputs["dev films"] = sorted((DEV_FILMS / "images").glob("*.png"))
    truth = pd.concat(rows)
    truth.to_csv(metadata, index=False)
    print(f"{len(val)} val images; bias by stage: {' / '.join(STAGE_NAMES)}")
    print("| model | input | read | MAE | bias | bias by stage |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for model in args.models or [default_model_dir()]:
        model_dir = Path(model)
        for name, paths in inputs.items():
            predictions = out / f"{model_dir.name}-{name.replace(' ', '_')}.csv"
            predict_paths(paths, predictions, model_dir=model_dir, metadata=metadata, progress=False)
            print(f"| {model_dir.name} | {name} | {score(predictions, truth)} |", flush=True)


if __name__ == "__main__":
    main()
