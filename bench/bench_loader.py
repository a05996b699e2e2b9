"""Training input pipeline throughput, side by side: augmenting each image in the loader workers (the default) vs
sending uint8 images and augmenting whole batches on the training device (``augment.on_device``).

Both read the same synthetic uint8 cache (no data needed), run the shipped recipe's augmentation ranges and end with
a normalised (B, 3, S, S) float batch on the device, which is what the model sees; no model runs.

Usage: python bench/bench_loader.py [--image-size 256] [--workers 2] [--batches 40] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pandas as pd
import torch
from torch.utils.data import DataLoader

from boneage.config import AugmentConfig, DataConfig
from boneage.dataset import BoneAgeDataset, augment_batch, build_augment, normalize_batch

STRONG = AugmentConfig(rotation_degrees=20.0, zoom=(0.8, 1.2), brightness=(0.7, 1.3), contrast=(0.6, 1.6))


def synthetic_dataset(n: int, size: int, on_device: bool) -> BoneAgeDataset:
    table = pd.DataFrame({"id": [str(i) for i in range(n)], "path": "", "boneage": 120.0, "male": True})
    contract = DataConfig(image_size=size)
    dataset = BoneAgeDataset(
        table, contract, augment=None if on_device else build_augment(STRONG), cache=True, raw=on_device
    )
    generator = torch.Generator().manual_seed(0)
    dataset._cache = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=generator)
    return dataset


def images_per_second(on_device: bool, size: int, workers: int, batches: int, batch: int, device: str) -> float:
    dataset = synthetic_dataset(batches * batch, size, on_device)
    loader = DataLoader(
        dataset, batch_size=batch, num_workers=workers, pin_memory=device == "cuda", persistent_workers=False
    )
    contract = dataset.contract
    iterator = iter(loader)
    first = next(iterator)  # worker start-up is not timed
    del first
    start = time.perf_counter()
    seen = 0
    for sample in iterator:
        images = sample["image"].to(device, non_blocking=True)
        if on_device:
            images = normalize_batch(augment_batch(images.float() / 255.0, STRONG), contract)
        seen += len(images)
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    rows = {}
    for name, on_device in (("per image, in the loader workers", False), ("per batch, on the device", True)):
        rows[name] = images_per_second(
            on_device, args.image_size, args.workers, args.batches, args.batch_size, args.device
        )
    base = rows["per image, in the loader workers"]
    print(f"{args.image_size} px, batch {args.batch_size}, {args.workers} workers, device {args.device}")
    print("| augmentation | images/s | vs per image |\n| --- | ---: | ---: |")
    for name, value in rows.items():
        print(f"| {name} | {value:.0f} | {value / base:.2f}× |")
    print(json.dumps({k: round(v, 1) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
