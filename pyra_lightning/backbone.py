"""Build the frozen timm backbone, from timm's hub or a local weights file.

Local files go through timm's own pretrained-loading path (``pretrained_cfg_overlay={"file": ...}``),
so Google's ``.npz`` checkpoints (as the paper used), ``.pth``/``.bin`` state dicts and
``.safetensors`` get timm's key conversion, position-embedding resizing and head removal.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")


def check_model_name(model_name: str) -> None:
    """Refuse a name timm does not know, suggesting the closest one it does (a typo, mostly).

    Checked before anything asks timm about the model (its pretrained config, its default input
    size), so that a typo is reported as a typo and not as a missing normalization.

    Raises:
        ValueError: ``unknown timm model 'vit_smal_patch16_224'; did you mean vit_small_patch16_224?``
    """
    base_name = model_name.split(".")[0]
    if timm.is_model(base_name):
        return
    close = difflib.get_close_matches(base_name, timm.list_models(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see timm.list_models('vit_*')"
    raise ValueError(f"unknown timm model {model_name!r}; {hint}")


def create_backbone(
    model_name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create ``model_name`` with a fresh ``num_classes`` head and optionally pretrained weights.

    Args:
        model_name: A timm name, with a pretrained tag if wanted (e.g. ``vit_base_patch16_224.orig_in21k``,
            the ViT-B/16 weights of the PEFT literature).
        num_classes: Size of the new task head.
        pretrained: Download from timm's hub (needs network access or a warm cache).
        pretrained_file: A local ``.npz``/``.pth``/``.bin``/``.safetensors`` file instead of the hub.
        img_size: Input resolution, if different from the model's default.
        drop_path_rate: Stochastic depth (the paper's recipe uses 0.1).
        model_kwargs: Other ``timm.create_model`` arguments (e.g. ``depth`` for tiny test models).

    Raises:
        FileNotFoundError: if ``pretrained_file`` does not exist.
        ValueError: for an unknown model name or weights that do not fit the architecture.
    """
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    check_model_name(model_name)
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist")
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise ValueError(f"pretrained_file {str(path)!r}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        return timm.create_model(
            model_name,
            pretrained=pretrained,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    except (RuntimeError, KeyError, ValueError) as error:
        source = f"file {pretrained_file!r}" if pretrained_file else "timm's hub"
        raise ValueError(
            f"pretrained weights from {source} do not fit {model_name!r} {kwargs or ''}: {error}"
        ) from error


def fingerprint(module: nn.Module, skip: set[str] | None = None) -> str:
    """A short SHA-256 of the frozen weights, to recognise the backbone a checkpoint belongs to.

    Only parameters and buffers that do not train are hashed (names plus exact bytes), so the
    fingerprint does not change during training and a checkpoint cannot be resumed onto other
    pretrained weights by accident.
    """
    digest = hashlib.sha256()
    trainable = {name for name, p in module.named_parameters() if p.requires_grad} | (skip or set())
    for name, tensor in sorted(module.state_dict().items()):
        if name in trainable:
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
