"""Serving an exported model: ``load_exported`` rebuilds the safetensors artifact of
``pyra-lightning export`` as an ``ExportedModel``, the model plus the preprocessing it was trained with.

Needs only torch, timm, safetensors and the method modules (never Lightning). The other deployed
forms (ONNX, ``torch.export``, AOTInductor) are in ``deploy.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "pyra-lightning-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ExportedModel:
    """An exported classifier with the preprocessing it was trained with.

    Attributes:
        model: The LoRA-folded timm ViT (with merging and PYRA, if trained so), in eval mode.
        transform: timm's eval transform for one PIL image: bicubic resize straight to
            ``img_size`` x ``img_size`` (no crop), to tensor, normalise with the training mean/std.
        config: The artifact's ``config.json``.
    """

    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    config: dict[str, Any] = field(repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def schedule(self) -> list[int] | None:
        """The per-block ``merge_r`` it was exported at; an elastic checkpoint's trained range and
        chosen point are in ``config["elastic"]``."""
        return self.config.get("merge_r")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an already preprocessed (B, 3, H, W) batch."""
        return self.model(x)

    def preprocess(self, images: Sequence[Any] | Any) -> torch.Tensor:
        """A batch (B, 3, H, W) from PIL images, or from image tensors as the data module yields them.

        Accepted: one PIL image or a list of them; a ``uint8`` (3, H, W) or (B, 3, H, W) tensor
        (resized, scaled to [0, 1] and normalised); a float tensor is taken as already normalised.
        """
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.dim() == 3 else images
            if batch.dtype != torch.uint8:
                return batch.float()
            size = self.config["preprocess"]["img_size"]
            if batch.shape[-2:] != (size, size):
                batch = torch.nn.functional.interpolate(
                    batch.float(), size=(size, size), mode="bicubic", antialias=True
                ).clamp(0, 255)
            mean = torch.tensor(self.config["preprocess"]["mean"]).view(1, 3, 1, 1)
            std = torch.tensor(self.config["preprocess"]["std"]).view(1, 3, 1, 1)
            return (batch.float() / 255 - mean) / std
        if not isinstance(images, list | tuple):
            images = [images]
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    @torch.inference_mode()
    def predict(self, images: Sequence[Any] | Any, top_k: int = 1) -> list[list[tuple[int, float]]]:
        """Top-``k`` (class index, probability) per image, preprocessing included.

        Args:
            images: PIL images or image tensors (see ``preprocess``).
            top_k: How many classes to return per image.
        """
        logits = self.model(self.preprocess(images).to(self.device))
        probs = logits.float().softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [
            [(int(i), float(v)) for i, v in zip(row_i, row_v, strict=True)]
            for row_i, row_v in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def eval_transform(preprocess: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform matching the training data pipeline (``data/vtab.py``).

    ``crop_mode="squash"`` with ``crop_pct=1`` resizes straight to ``img_size`` x ``img_size``
    with PIL's antialiased bicubic filter, as the data module does, so no centre crop is taken.
    """
    from timm.data import create_transform

    size = int(preprocess["img_size"])
    return create_transform(
        input_size=(3, size, size),
        is_training=False,
        interpolation="bicubic",
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        crop_pct=1.0,
        crop_mode="squash",
    )


def read_export_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of an exported folder, checked for format and version."""
    folder = Path(path)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {CONFIG_FILE} is missing")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT or int(config.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format {config.get('format')!r} version {config.get('format_version')!r}; this "
            f"pyra-lightning reads {FORMAT!r} up to version {FORMAT_VERSION}"
        )
    return config


def load_exported(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild an exported model with its preprocessing: ``timm.create_model`` + ``apply_merging`` + a strict load.

    The merge rule (``config["matcher"]``/``["merger"]``) is looked up by name in
    ``merge_rules``, and the attention kernel (``config["attention"]``) in
    ``kernels.attention``, so a model exported with a registered one needs that registration
    here too.

    Needs only torch, timm, safetensors and ``pyra_lightning.patch`` (never Lightning)::

        served = load_exported("model/")
        served.predict([Image.open("cat.jpg")])  # [[(class index, probability)]]
        served.model(batch)                      # logits of a preprocessed batch

    Args:
        path: A folder written by ``pyra-lightning export`` (``export_model``).
        map_location: Device to load the weights onto.

    Raises:
        FileNotFoundError: if the folder or one of its two files is missing.
        ValueError: for a folder of another format or a newer format version.
    """
    import timm
    from safetensors.torch import load_file

    from pyra_lightning.patch import apply_merging

    folder = Path(path)
    config = read_export_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {WEIGHTS_FILE} is missing")
    model = timm.create_model(config["model_name"], pretrained=False, **config["create_kwargs"])
    if config["merge_r"] is not None:  # artifacts written before the rule was recorded used the defaults
        apply_merging(
            model,
            list(config["merge_r"]),
            pyra=config["pyra"],
            prop_attn=config["prop_attn"],
            matcher=config.get("matcher") or "bipartite",
            merger=config.get("merger") or "wavg",
            attention=config.get("attention") or "sdpa",
        )
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(map_location)), strict=True)
    model = model.to(map_location).eval()
    return ExportedModel(model=model, transform=eval_transform(config["preprocess"]), config=config)
