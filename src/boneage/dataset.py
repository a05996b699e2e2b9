"""Training and PyTorch-inference inputs: resizing, augmentation and normalisation as tensors, and the labelled dataset.

Samples are dicts ``{"image", "age_months", "male", "stage", "id"}``. Images are decoded to float32 grayscale in
[0, 1] (:mod:`boneage.imageio`), resized to the model's square input (``squash`` or ``letterbox``), augmented on the
training side, then normalised and repeated to the model's channel count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from boneage.config import AugmentConfig, DataConfig
from boneage.imageio import STAGE_EDGES_MONTHS, STANDARDIZE_EPS, frame_hand, read_image


def stage_tensor(age_months: torch.Tensor) -> torch.Tensor:
    """Stage index (0..3) per age in months, for a tensor (:func:`boneage.labels.stage_of` for NumPy)."""
    edges = torch.tensor(STAGE_EDGES_MONTHS, dtype=age_months.dtype, device=age_months.device)
    return torch.bucketize(age_months, edges, right=True)


def resize(image: torch.Tensor, size: int, mode: str = "squash") -> torch.Tensor:
    """Resize a (C, H, W) image to (C, size, size).

    ``squash`` stretches to a square, exactly how the 100-px RSNA copies were made; ``letterbox`` keeps the aspect
    ratio and pads the short side with black (0).
    """
    _, height, width = image.shape
    if mode == "squash":
        return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if mode != "letterbox":
        raise ValueError(f"resize mode: expected 'squash' or 'letterbox', got {mode!r}")
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    scaled = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    out = image.new_zeros((image.shape[0], size, size))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[:, top : top + new_h, left : left + new_w] = scaled
    return out


def load_resized(path: str | Path, contract: DataConfig) -> torch.Tensor:
    """Decode and resize one image to the model's square input: (1, S, S) float in [0, 1].

    With a ``hand_fill`` the film is first re-framed around its hand (:func:`boneage.imageio.frame_hand`); with a
    ``source_size`` it then goes to that square, as the training copies were made.
    """
    array = read_image(path)
    if contract.hand_fill is not None:
        array = frame_hand(array, contract.hand_fill, contract.hand_fill_above)
    image = torch.from_numpy(array)[None]  # (1, H, W)
    if contract.source_size is not None:
        image = resize(image, contract.source_size, contract.resize_mode).clamp_(0.0, 1.0)
    return resize(image, contract.image_size, contract.resize_mode).clamp_(0.0, 1.0)


def build_augment(cfg: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The seed's augmentations as a torchvision v2 pipeline on (1, S, S) images in [0, 1].

    Rotation +/-``rotation_degrees``, zoom ``zoom``, brightness and contrast factors, horizontal flip with
    ``hflip_p``. Never a vertical flip: a hand upside down is not a valid radiograph.
    """
    from torchvision.transforms import v2

    steps: list[Any] = []
    if cfg.rotation_degrees > 0 or cfg.zoom != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=cfg.rotation_degrees, scale=tuple(cfg.zoom), interpolation=v2.InterpolationMode.BILINEAR
            )
        )
    if cfg.brightness != (1.0, 1.0) or cfg.contrast != (1.0, 1.0):
        steps.append(
            v2.ColorJitter(
                brightness=tuple(cfg.brightness) if cfg.brightness != (1.0, 1.0) else None,
                contrast=tuple(cfg.contrast) if cfg.contrast != (1.0, 1.0) else None,
            )
        )
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip_p))
    pipeline = v2.Compose(steps)

    def augment(image: torch.Tensor) -> torch.Tensor:
        return pipeline(image).clamp_(0.0, 1.0)

    return augment


def augment_batch(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """:func:`build_augment`'s augmentations for a whole batch (B, 1, S, S) in [0, 1], on the batch's device.

    Each image draws its own rotation, zoom, brightness and contrast factors and flip. Rotation and zoom are one
    affine resampling about the centre (bilinear, black outside), then brightness (``x * b``), then contrast (blend
    with the image's mean), each clamped to [0, 1] as torchvision does; torchvision applies brightness and contrast in
    a random order, here always in this one.
    """
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(batch, device=device).uniform_(low, high)

    out = images
    if cfg.rotation_degrees > 0 or tuple(cfg.zoom) != (1.0, 1.0):
        angle = torch.deg2rad(uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
        inverse_scale = 1.0 / uniform(*cfg.zoom)
        cos, sin = torch.cos(angle) * inverse_scale, torch.sin(angle) * inverse_scale
        zeros = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if tuple(cfg.brightness) != (1.0, 1.0):
        out = (out * uniform(*cfg.brightness).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if tuple(cfg.contrast) != (1.0, 1.0):
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * uniform(*cfg.contrast).view(-1, 1, 1, 1) + mean).clamp(0.0, 1.0)
    if cfg.hflip_p > 0:
        flip = (torch.rand(batch, device=device) < cfg.hflip_p).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    return out.clamp(0.0, 1.0)


def normalize_batch(images: torch.Tensor, contract: DataConfig) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, C, S, S) normalised with the contract's per-channel mean/std, or with each
    image's own mean and SD when the contract says ``standardize``."""
    if contract.standardize:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp_min(STANDARDIZE_EPS)
        return ((images - mean) / std).expand(-1, contract.in_chans, -1, -1)
    images = images.expand(-1, contract.in_chans, -1, -1)
    mean = torch.tensor(contract.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(contract.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def normalize(image: torch.Tensor, contract: DataConfig) -> torch.Tensor:
    """(1, S, S) in [0, 1] -> (C, S, S): :func:`normalize_batch` for one image."""
    return normalize_batch(image[None], contract)[0]


def preprocess(path: str | Path, contract: DataConfig) -> torch.Tensor:
    """File -> model input (C, S, S): decode, resize, normalise. The single inference-time path."""
    return normalize(load_resized(path, contract), contract)


class BoneAgeDataset(Dataset):
    """Labelled radiographs as sample dicts.

    Args:
        table: frame with ``id``, ``path``, ``boneage`` and ``male`` (from :func:`read_labels` with an images dir).
        contract: input size, resize mode, channels and normalisation.
        augment: applied to the resized [0, 1] image before normalisation (training only).
        cache: decode and resize every image up front and keep uint8 copies, instead of decoding every epoch.
        raw: return ``image`` as the (1, S, S) uint8 copy, neither augmented nor normalised (the training device
            does both: :func:`augment_batch`, :func:`normalize_batch`).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        contract: DataConfig,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = False,
        raw: bool = False,
    ):
        if raw and augment is not None:
            raise ValueError("raw samples are augmented on the device: pass augment=None with raw=True")
        self.ids = table["id"].astype(str).tolist()
        self.paths = table["path"].astype(str).tolist()
        self.ages = torch.tensor(table["boneage"].to_numpy(dtype=np.float32))
        self.male = torch.tensor(table["male"].to_numpy(dtype=np.int64))
        self.contract = contract
        self.augment = augment
        self.cache_enabled = cache
        self.raw = raw
        self._cache: torch.Tensor | None = None  # (N, S, S) uint8, filled by fill_cache

    def __len__(self) -> int:
        return len(self.ids)

    def fill_cache(self, progress: bool = False) -> None:
        """Decode every image once into a shared uint8 tensor (workers forked later read it without copies)."""
        if self._cache is not None:
            return
        from tqdm.auto import tqdm

        size = self.contract.image_size
        images = torch.empty((len(self), size, size), dtype=torch.uint8)
        # One image is too small a task for intra-op threads: on a many-core machine, and with several processes,
        # their hand-offs made decoding tens of times slower than one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in tqdm(range(len(self)), desc="decoding images", disable=not progress, leave=False):
                images[i] = self._decode_uint8(i)[0]
        finally:
            torch.set_num_threads(threads)
        self._cache = images

    def _decode_uint8(self, index: int) -> torch.Tensor:
        """(1, S, S) uint8, decoded and resized now: what the cache holds."""
        return (load_resized(self.paths[index], self.contract) * 255.0).round_().to(torch.uint8)

    def _uint8(self, index: int) -> torch.Tensor:
        if self.cache_enabled:
            self.fill_cache()
            assert self._cache is not None
            return self._cache[index][None]
        return self._decode_uint8(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.raw:
            image = self._uint8(index)
        else:
            # uncached images stay float: no rounding to grey levels
            image = (
                self._uint8(index).float() / 255.0
                if self.cache_enabled
                else load_resized(self.paths[index], self.contract)
            )
            if self.augment is not None:
                image = self.augment(image)
            image = normalize(image, self.contract)
        age = self.ages[index]
        return {
            "image": image,
            "age_months": age,
            "male": self.male[index],
            "stage": stage_tensor(age),
            "id": self.ids[index],
        }
