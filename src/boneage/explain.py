"""Explainability: Grad-CAM heatmaps (pytorch-grad-cam) for the bone-age output, and t-SNE of the learned features."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from boneage.dataset import BoneAgeDataset, load_resized, normalize
from boneage.figures import pyplot, save_figure
from boneage.imageio import STAGE_NAMES, read_image
from boneage.model import BoneAgeEnsemble, BoneAgeNet


class _FixedSex(nn.Module):
    """``image -> output`` with the sex bound, as Grad-CAM libraries call ``model(image)``; regression -> (B, 1)."""

    def __init__(self, model: BoneAgeNet, male: torch.Tensor):
        super().__init__()
        self.model = model
        self.male = male

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image, self.male)
        return out[:, None] if out.ndim == 1 else out


def gradcam_layer(model: BoneAgeNet) -> nn.Module:
    """The last convolutional feature map: EfficientNet's ``bn2`` (after ``conv_head``), else timm's last stage."""
    backbone = model.backbone
    if hasattr(backbone, "conv_head") and hasattr(backbone, "bn2"):
        return backbone.bn2
    return backbone.get_submodule(backbone.feature_info[-1]["module"])


def gradcam_layers(model: BoneAgeNet | BoneAgeEnsemble) -> list[nn.Module]:
    """:func:`gradcam_layer` of a network, or of every member of an ensemble (their maps are averaged)."""
    if isinstance(model, BoneAgeEnsemble):
        return [gradcam_layer(member) for member in model.members]
    return [gradcam_layer(model)]


def grad_cam(
    model: BoneAgeNet | BoneAgeEnsemble, images: torch.Tensor, male: torch.Tensor, stage: int | None = None
) -> np.ndarray:
    """Grad-CAM heatmaps (B, S, S) in [0, 1] for normalised images (B, C, S, S).

    The target is the predicted bone age for a regression model (regions that push the age up), or the logit of
    ``stage`` (default: the predicted stage) for a classifier. For an ensemble, the target is the ensemble's output
    and the heatmap is the mean of the members' maps, each scaled to [0, 1] first (pytorch-grad-cam's multi-layer
    aggregation).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wrapped = _FixedSex(model.eval(), male.long())
    if model.num_outputs == 1:
        targets = [ClassifierOutputTarget(0)] * len(images)
    else:
        with torch.no_grad():
            predicted = wrapped(images).argmax(dim=1).tolist()
        targets = [ClassifierOutputTarget(stage if stage is not None else p) for p in predicted]
    with GradCAM(model=wrapped, target_layers=gradcam_layers(model)) as cam:
        heatmaps = cam(input_tensor=images, targets=targets)  # (B, S, S), upsampled to the input size
    return np.asarray(heatmaps, dtype=np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """A grayscale image (S, S) in [0, 1] with its heatmap in the jet colormap: (S, S, 3) uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=image_weight)


def gradcam_overlay(
    model: BoneAgeNet, contract: Any, path: str | Path, male: bool, max_side: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """The radiograph at display size and its Grad-CAM overlay, both (H, W, 3) uint8 RGB, longest side
    ``max_side``. The heatmap is mapped back onto the whole image the way the model's resize mapped the image."""
    from PIL import Image

    gray = read_image(path)  # (H, W) in [0, 1]
    height, width = gray.shape
    scale = min(1.0, max_side / max(height, width))
    shown_h, shown_w = max(1, round(height * scale)), max(1, round(width * scale))
    shown = np.asarray(Image.fromarray(gray).resize((shown_w, shown_h), Image.BILINEAR), dtype=np.float32)
    image = normalize(load_resized(path, contract), contract)[None]  # (1, C, S, S)
    heatmap = grad_cam(model, image, torch.tensor([int(male)]))[0]  # (S, S)
    if contract.resize_mode == "letterbox":  # keep only the part of the square that holds the image
        size = contract.image_size
        inner_h, inner_w = (
            max(1, round(height * size / max(height, width))),
            max(1, round(width * size / max(height, width))),
        )
        top, left = (size - inner_h) // 2, (size - inner_w) // 2
        heatmap = heatmap[top : top + inner_h, left : left + inner_w]
    heatmap = np.asarray(Image.fromarray(heatmap).resize((shown_w, shown_h), Image.BILINEAR), dtype=np.float32)
    rgb = (np.repeat(shown.clip(0, 1)[..., None], 3, axis=2) * 255).round().astype(np.uint8)
    return rgb, overlay(shown.clip(0, 1), heatmap.clip(0, 1))


def gradcam_grid(
    model: BoneAgeNet,
    contract: Any,
    paths: Sequence[str | Path],
    male: Sequence[bool],
    output: str | Path,
    titles: Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
) -> Path:
    """A figure with one row per image: the radiograph, its Grad-CAM heatmap and the overlay.

    ``answers``: what the tool answered for each image (``boneage predict``'s bone age, after the average over the
    folder's test-time views and the correction, or why it refused), shown over the overlay; without it the title
    shows the network's own one-pass output, labelled as such.
    """
    plt = pyplot()
    raw = torch.stack([load_resized(p, contract) for p in paths])  # (B, 1, S, S) in [0, 1]
    images = torch.stack([normalize(r, contract) for r in raw])
    sex = torch.tensor([int(m) for m in male])
    heatmaps = grad_cam(model, images, sex)
    if answers is None:
        with torch.no_grad():
            outputs = model.eval()(images, sex)
        answers = [
            f"network output {float(out):.1f} months" if outputs.ndim == 1 else STAGE_NAMES[int(out.argmax())]
            for out in outputs
        ]
    fig, axes = plt.subplots(len(paths), 3, figsize=(9, 3.1 * len(paths)), dpi=110, squeeze=False)
    for i, path in enumerate(paths):
        gray = raw[i, 0].numpy()
        title = titles[i] if titles else Path(path).stem
        axes[i, 0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"{title} ({'M' if male[i] else 'F'})", fontsize=9)
        axes[i, 1].imshow(heatmaps[i], cmap="jet", vmin=0, vmax=1)
        axes[i, 1].set_title("Grad-CAM", fontsize=9)
        axes[i, 2].imshow(overlay(gray, heatmaps[i]))
        axes[i, 2].set_title(answers[i], fontsize=9)
        for ax in axes[i]:
            ax.axis("off")
    return save_figure(fig, output)


@torch.inference_mode()
def extract_features(
    model: BoneAgeNet | BoneAgeEnsemble, loader: Any, with_output: bool = False
) -> tuple[np.ndarray, ...]:
    """``forward_features`` for every batch of a sample-dict loader: (features (N, F), ages (N,), male (N,)), and
    with ``with_output`` the model's output (N,) from the same pass as a fourth array."""
    model.eval()
    features, ages, male, outputs = [], [], [], []
    for batch in loader:
        images = batch["image"].contiguous(memory_format=torch.channels_last)
        if with_output:
            batch_features, output = model.features_and_output(images, batch["male"])
            outputs.append(output.float().numpy())
        else:  # an ensemble's other members need not run
            batch_features = model.forward_features(images, batch["male"])
        features.append(batch_features.float().numpy())
        ages.append(batch["age_months"].numpy())
        male.append(batch["male"].numpy())
    arrays = (np.concatenate(features), np.concatenate(ages), np.concatenate(male).astype(bool))
    return (*arrays, np.concatenate(outputs)) if with_output else arrays


def plot_tsne(features: np.ndarray, ages: np.ndarray, male: np.ndarray, output: str | Path, seed: int = 0) -> Path:
    """t-SNE of the penultimate features, side by side coloured by bone age and by sex."""
    from sklearn.manifold import TSNE

    plt = pyplot()
    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    points = left.scatter(embedded[:, 0], embedded[:, 1], c=ages, cmap="viridis", s=6)
    fig.colorbar(points, ax=left, label="bone age (months)")
    left.set_title(f"t-SNE of the learned features (n={len(features)}), by bone age")
    for is_male, color, name in ((True, "tab:blue", "male"), (False, "tab:orange", "female")):
        mask = male == is_male
        right.scatter(embedded[mask, 0], embedded[mask, 1], s=6, color=color, alpha=0.6, label=name)
    right.set_title("by sex (the features include the 32-d sex embedding)")
    right.legend()
    for ax in (left, right):
        ax.set_xticks([]), ax.set_yticks([])
    return save_figure(fig, output)


def tsne_figure(model: BoneAgeNet, contract: Any, table: Any, output: str | Path, max_images: int = 1000) -> Path:
    """t-SNE figure for up to ``max_images`` rows (a fixed random sample) of a labels table with paths."""
    from torch.utils.data import DataLoader

    sample = table.sample(n=min(max_images, len(table)), random_state=0).reset_index(drop=True)
    loader = DataLoader(BoneAgeDataset(sample, contract), batch_size=64, num_workers=2 if len(sample) > 256 else 0)
    return plot_tsne(*extract_features(model, loader), output)
