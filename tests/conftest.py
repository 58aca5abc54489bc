"""Shared fixtures. Plain helper functions (tiny ViTs, quickstart arguments) live in helpers.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import tiny_vit
from torch import nn


@pytest.fixture
def make_tiny_vit() -> Callable[..., nn.Module]:
    """A factory of 4-block, 48-wide timm ViTs on 32x32 images with random weights (``helpers.tiny_vit``)."""
    return tiny_vit


@pytest.fixture
def tiny_model() -> nn.Module:
    """One such ViT, seed 0, 5 classes, in eval mode."""
    return tiny_vit().eval()
