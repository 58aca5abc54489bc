"""Shared fixtures: tiny timm ViTs with random weights, fast enough for CPU CI."""

from __future__ import annotations

import timm
import torch
from torch import nn

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)  # 64 patches + prefix


def tiny_vit(name: str = "vit_tiny_patch16_224", num_classes: int = 5, seed: int = 0, **kwargs) -> nn.Module:
    """A 4-block, 48-wide timm ViT on 32x32 images with random weights (and a random head)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **{**TINY, **kwargs})
    for head in (
        model.get_classifier() if isinstance(model.get_classifier(), tuple) else [model.get_classifier()]
    ):
        nn.init.normal_(head.weight, std=0.2)
    return model


def randomize_(module: nn.Module, std: float = 0.2, seed: int = 1) -> nn.Module:
    """Give every parameter that starts at zero (LoRA B, PYRA W_D, ...) a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_b" in name or ".pyra." in name:
                param.add_(torch.randn(param.shape, generator=generator) * std)
    return module
