"""CPU training throughput of the shipped recipe's model (EfficientNet-Lite0 + head, batch 32, AdamW), side by side:
fp32 vs bf16 autocast, each with contiguous (NCHW) and channels-last memory format, in one run; with ``--compile``
also fp32 channels-last under ``torch.compile`` (inductor; its compile time is printed and left out of the rate).

Usage: python bench/bench_train.py [--image-size 128] [--steps 8] [--compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from boneage.config import ModelConfig
from boneage.model import BoneAgeNet


def images_per_second(
    size: int, steps: int, channels_last: bool, bf16: bool, batch: int = 32, compile_model: bool = False
) -> float:
    torch.manual_seed(0)
    model = BoneAgeNet(ModelConfig(pretrained="none")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image = torch.randn(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    male, age = torch.randint(0, 2, (batch,)), torch.rand(batch) * 228
    forward = torch.compile(model) if compile_model else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = forward(image, male)
        loss = F.huber_loss(output.float() / 41.3, age / 41.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()  # warm-up (and compilation)
    step()
    if compile_model:
        print(f"torch.compile: first two steps {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also fp32 channels-last under torch.compile")
    args = parser.parse_args()
    rates = {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            name = f"{'bf16' if bf16 else 'fp32'}_{'channels_last' if channels_last else 'contiguous'}"
            rates[name] = images_per_second(args.image_size, args.steps, channels_last, bf16)
            print(f"{name:<24} {rates[name]:6.1f} img/s", flush=True)
    if args.compile:
        name = "fp32_channels_last_compiled"
        rates[name] = images_per_second(args.image_size, args.steps, True, False, compile_model=True)
        print(f"{name:<24} {rates[name]:6.1f} img/s", flush=True)
    base = rates["fp32_contiguous"]
    print(
        json.dumps(
            {
                "image_size": args.image_size,
                "threads": torch.get_num_threads(),
                "images_per_second": rates,
                "ratio_vs_fp32_contiguous": {k: round(v / base, 2) for k, v in rates.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
