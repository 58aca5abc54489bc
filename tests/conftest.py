"""Shared fixtures. Plain helper functions (tiny ViTs, quickstart arguments) live in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from helpers import tiny_vit
from torch import nn

# One intra-op thread per pytest worker, and for the fits and exports they start as subprocesses
# (which inherit the variable): the suite runs two workers on two cores, and two workers of two
# spinning OpenMP threads each slowed CPU-bound tests several times over. Tests that time or
# compare thread counts set their own (test_benchmark).
if not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, so the tests leave the other core to the other xdist worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def make_tiny_vit() -> Callable[..., nn.Module]:
    """A factory of 4-block, 48-wide timm ViTs on 32x32 images with random weights (``helpers.tiny_vit``)."""
    return tiny_vit


@pytest.fixture
def tiny_model() -> nn.Module:
    """One such ViT, seed 0, 5 classes, in eval mode."""
    return tiny_vit().eval()
