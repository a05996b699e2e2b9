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
from boneage.imageio import BORDER_FRACTION, STAGE_EDGES_MONTHS, STANDARDIZE_EPS, frame_hand, hand_box, read_image


def stage_tensor(age_months: torch.Tensor) -> torch.Tensor:
    """Stage index (0..3) per age in months, for a tensor (:func:`boneage.labels.stage_of` for NumPy)."""
    edges = torch.tensor(STAGE_EDGES_MONTHS, dtype=age_months.dtype, device=age_months.device)
    return torch.bucketize(age_months, edges, right=True)


def resize(image: torch.Tensor, size: int, mode: str = "squash", antialias: bool = True) -> torch.Tensor:
    """Resize a (C, H, W) image to (C, size, size).

    ``squash`` stretches to a square, exactly how the 100-px RSNA copies were made; ``letterbox`` keeps the aspect
    ratio and pads the short side with black (0). ``antialias``: bilinear with antialiasing (Pillow's filter);
    False: plain bilinear interpolation, which keeps a film's fine grain (:func:`boneage.imageio.resize_plain`).
    """
    _, height, width = image.shape
    if mode == "squash":
        return F.interpolate(image[None], (size, size), mode="bilinear", antialias=antialias, align_corners=False)[0]
    if mode != "letterbox":
        raise ValueError(f"resize mode: expected 'squash' or 'letterbox', got {mode!r}")
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    scaled = F.interpolate(image[None], (new_h, new_w), mode="bilinear", antialias=antialias, align_corners=False)[0]
    out = image.new_zeros((image.shape[0], size, size))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[:, top : top + new_h, left : left + new_w] = scaled
    return out


def load_resized(path: str | Path, contract: DataConfig) -> torch.Tensor:
    """Decode and resize one image to the model's square input: (1, S, S) float in [0, 1].

    With a ``hand_fill`` the film is first re-framed around its hand (:func:`boneage.imageio.frame_hand`); with a
    ``source_size`` it then goes to that square, as the training copies were made (plain bilinear when the contract
    says ``source_antialias: false``).
    """
    array = read_image(path)
    if contract.hand_fill is not None:
        array = frame_hand(array, contract.hand_fill, contract.hand_fill_above)
    image = torch.from_numpy(array)[None]  # (1, H, W)
    if contract.source_size is not None:
        image = resize(image, contract.source_size, contract.resize_mode, contract.source_antialias).clamp_(0.0, 1.0)
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


def border_level(images: torch.Tensor) -> torch.Tensor:
    """Each image's background level (B,): the median of its outer ring, as :func:`boneage.imageio.background_level`
    finds it for one NumPy image (lower median here, the mean of the two middle values there)."""
    size_y, size_x = images.shape[-2:]
    ring_y, ring_x = max(1, round(size_y * BORDER_FRACTION)), max(1, round(size_x * BORDER_FRACTION))
    flat = images[:, 0]
    ring = torch.cat(
        [
            flat[:, :ring_y].flatten(1),
            flat[:, -ring_y:].flatten(1),
            flat[:, ring_y:-ring_y, :ring_x].flatten(1),
            flat[:, ring_y:-ring_y, -ring_x:].flatten(1),
        ],
        dim=1,
    )
    return ring.median(dim=1).values


def augment_batch(
    images: torch.Tensor,
    cfg: AugmentConfig,
    hand_boxes: torch.Tensor | None = None,
    source_size: int | None = None,
    source_antialias: bool = True,
) -> torch.Tensor:
    """:func:`build_augment`'s augmentations for a whole batch (B, 1, S, S) in [0, 1], on the batch's device, and
    the clinic ones only this path has (framing, gamma, bright background; :class:`AugmentConfig`).

    Each image draws its own rotation, zoom, brightness and contrast factors and flip. Rotation and zoom are one
    affine resampling about the centre (bilinear, black outside), then brightness (``x * b``), then contrast (blend
    with the image's mean), each clamped to [0, 1] as torchvision does; torchvision applies brightness and contrast in
    a random order, here always in this one. With ``frame_p`` an image drawn for framing is instead resampled from a
    window around its hand (``hand_boxes``: (B, 4) top, bottom, left, right as fractions of the side), rotated
    about the window's centre and padded with its own background level; with ``source_size`` (the data contract's)
    a re-framed image then goes through that size and back, so that a hand made small keeps only the detail a small
    hand keeps when a film goes through ``source_size`` at prediction time (down with the contract's
    ``source_antialias`` filter, back up with the antialiased one, as prediction does). Gamma and the background
    floor follow the resampling.
    """
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(batch, device=device).uniform_(low, high)

    out = images
    framing = cfg.frame_p > 0
    if framing and hand_boxes is None:
        raise ValueError("augment.frame_p needs each image's hand box: build the dataset with hand_boxes=True")
    if cfg.rotation_degrees > 0 or tuple(cfg.zoom) != (1.0, 1.0) or framing:
        angle = torch.deg2rad(uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
        inverse_scale = 1.0 / uniform(*cfg.zoom)
        half_x, half_y = inverse_scale, inverse_scale  # the sampled window's half-size, in [-1, 1] coordinates
        centre_x = centre_y = fill = torch.zeros(batch, device=device)
        if framing:
            assert hand_boxes is not None
            boxes = hand_boxes.to(device=device, dtype=out.dtype)
            framed = torch.rand(batch, device=device) < cfg.frame_p
            box_h, box_w = (boxes[:, 1] - boxes[:, 0]).clamp_min(0.05), (boxes[:, 3] - boxes[:, 2]).clamp_min(0.05)
            half_y = torch.where(framed, box_h / uniform(*cfg.frame_fill_height), half_y)
            half_x = torch.where(framed, box_w / uniform(*cfg.frame_fill_width), half_x)
            centre_y = torch.where(framed, boxes[:, 0] + boxes[:, 1] - 1.0, centre_y)
            centre_x = torch.where(framed, boxes[:, 2] + boxes[:, 3] - 1.0, centre_x)
            fill = torch.where(framed, border_level(out), fill)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([half_x * cos, -half_x * sin, centre_x], 1),
                torch.stack([half_y * sin, half_y * cos, centre_y], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        fill = fill.view(-1, 1, 1, 1).to(out.dtype)
        out = F.grid_sample(out - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        if framing and source_size is not None:
            size = tuple(out.shape[-2:])
            small = F.interpolate(out, size=(source_size, source_size), mode="bilinear", antialias=source_antialias)
            through = F.interpolate(small, size=size, mode="bilinear", antialias=True)
            out = torch.where(framed.view(-1, 1, 1, 1), through, out)
    if tuple(cfg.gamma) != (1.0, 1.0):
        log_low, log_high = float(np.log(cfg.gamma[0])), float(np.log(cfg.gamma[1]))
        out = out.clamp(0.0, 1.0) ** uniform(log_low, log_high).exp().view(-1, 1, 1, 1)
    if cfg.floor_p > 0:  # the level is a share of each image's own range: a dim copy keeps its hand
        floored = (torch.rand(batch, device=device) < cfg.floor_p).view(-1, 1, 1, 1)
        if cfg.floor_mode == "absolute":
            level = uniform(*cfg.floor).view(-1, 1, 1, 1)
        else:
            quantiles = torch.tensor([0.01, 0.99], device=device, dtype=out.dtype)
            low, high = torch.quantile(out.flatten(1), quantiles, dim=1)
            level = (low + uniform(*cfg.floor) * (high - low)).view(-1, 1, 1, 1)
        out = torch.where(floored, torch.maximum(out, level), out)
    if tuple(cfg.brightness) != (1.0, 1.0):
        out = (out * uniform(*cfg.brightness).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if tuple(cfg.contrast) != (1.0, 1.0):
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * uniform(*cfg.contrast).view(-1, 1, 1, 1) + mean).clamp(0.0, 1.0)
    if cfg.hflip_p > 0:
        flip = (torch.rand(batch, device=device) < cfg.hflip_p).view(-1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    return out.clamp(0.0, 1.0)


def raw_batch_images(
    batch: dict[str, torch.Tensor], contract: DataConfig, augment: AugmentConfig | None = None
) -> torch.Tensor:
    """A raw loader batch (``BoneAgeDataset(raw=True)``: uint8 (B, 1, S, S)) -> normalised (B, C, S, S): scaled to
    [0, 1], augmented with ``augment`` when given (:func:`augment_batch`, with the hand boxes the batch carries and
    the contract's source size), then :func:`normalize_batch`. Training and the refusal fit's training views alike."""
    images = batch["image"].float() / 255.0
    if augment is not None:
        boxes = batch.get("hand_box")
        images = augment_batch(images, augment, boxes, contract.source_size, contract.source_antialias)
    return normalize_batch(images, contract)


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
        hand_boxes: also return ``hand_box``, the box around the hand in the resized image (top, bottom, left, right
            as fractions of the side; :func:`boneage.imageio.hand_box`), for the framing augmentation.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        contract: DataConfig,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = False,
        raw: bool = False,
        hand_boxes: bool = False,
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
        self.hand_boxes = hand_boxes
        self._boxes: torch.Tensor | None = None  # (N, 4) float32, filled by fill_cache when hand_boxes

    def __len__(self) -> int:
        return len(self.ids)

    def fill_cache(self, progress: bool = False) -> None:
        """Decode every image once into a shared uint8 tensor (workers forked later read it without copies)."""
        if self._cache is not None:
            return
        from tqdm.auto import tqdm

        size = self.contract.image_size
        images = torch.empty((len(self), size, size), dtype=torch.uint8)
        boxes = torch.empty((len(self), 4), dtype=torch.float32)
        # One image is too small a task for intra-op threads: on a many-core machine, and with several processes,
        # their hand-offs made decoding tens of times slower than one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in tqdm(range(len(self)), desc="decoding images", disable=not progress, leave=False):
                images[i] = self._decode_uint8(i)[0]
                if self.hand_boxes:
                    boxes[i] = self._box(images[i][None])
        finally:
            torch.set_num_threads(threads)
        self._cache = images
        self._boxes = boxes if self.hand_boxes else None

    @staticmethod
    def _box(image: torch.Tensor) -> torch.Tensor:
        """(1, S, S) uint8, or float in [0, 1] -> the hand box as fractions (top, bottom, left, right)."""
        array = image[0].numpy().astype(np.float32)
        if image.dtype == torch.uint8:
            array /= 255.0
        top, bottom, left, right = hand_box(array)
        height, width = array.shape
        return torch.tensor([top / height, bottom / height, left / width, right / width], dtype=torch.float32)

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
        box = self._boxes[index] if self._boxes is not None else None
        if self.raw:
            image = self._uint8(index)
            if self.hand_boxes and box is None:
                box = self._box(image)
        else:
            # uncached images stay float: no rounding to grey levels
            image = (
                self._uint8(index).float() / 255.0
                if self.cache_enabled
                else load_resized(self.paths[index], self.contract)
            )
            if self.hand_boxes and box is None:
                box = self._box(image)
            if self.augment is not None:
                image = self.augment(image)
            image = normalize(image, self.contract)
        age = self.ages[index]
        sample = {
            "image": image,
            "age_months": age,
            "male": self.male[index],
            "stage": stage_tensor(age),
            "id": self.ids[index],
        }
        if self.hand_boxes:
            sample["hand_box"] = box
        return sample
