"""Which patches token merging joins: per-layer overlays of merged groups on the input image.

ToMe (Bolya et al., ICLR 2023) shows its merging by painting every merged token's patches in one
colour with the groups' borders drawn on top; the same picture tells whether PYRA's modulation
(eqs. 4-7) changes what gets merged. The pieces:

- ``layer_sources`` runs a model patched with ``apply_merging(..., trace_source=True)`` once and
  collects each block's ``TokenState.source`` through forward hooks on the blocks (which return
  ``(x, state)``), so one forward gives every layer and nothing is re-run per layer;
- ``patch_groups`` turns a (N_tokens, N_input) membership into a patch-grid map of token indices;
- ``merge_overlay`` paints that map on an image and returns a ``uint8`` array (for PIL, matplotlib
  or ``wandb.Image``); ``plot_merge_layers`` lays out one panel per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Colors = Literal["mean", "random"]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


@torch.no_grad()
def layer_sources(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Token membership after every block, from one forward pass.

    The pass runs in eval mode (the model's mode is restored afterwards), so that dropout and
    patch dropout do not change the matching when this is called in the middle of training.

    Args:
        model: A timm ViT patched by ``apply_merging(..., trace_source=True)``.
        x: Normalized input images (B, 3, H, W), e.g. (2, 3, 32, 32).

    Returns:
        One (B, N_l, N0) 0/1 tensor per block, N0 counting prefix tokens and patches: row ``t`` marks
        the input tokens that token ``t`` stands for after that block. Blocks before the first merge
        give the identity.
    """
    if not hasattr(model, "forward_tokens"):
        raise ValueError("layer_sources needs a model patched by apply_merging(..., trace_source=True)")
    untraced = [i for i, block in enumerate(model.blocks) if not getattr(block, "trace_source", False)]
    if untraced:
        raise ValueError(
            f"blocks {untraced} do not trace sources; patch the model with apply_merging(..., trace_source=True)"
        )
    captured: list[torch.Tensor | None] = []

    def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, Any]) -> None:
        captured.append(output[1].source)

    handles = [block.register_forward_hook(hook) for block in model.blocks]
    was_training = model.training
    try:
        model.eval()
        model.forward_tokens(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    num_input = model.patch_embed.num_patches + model.num_prefix_tokens
    identity = torch.eye(num_input, device=x.device)[None].expand(x.shape[0], num_input, num_input)
    return [identity if source is None else source for source in captured]


def patch_groups(
    source: torch.Tensor, grid_size: int | Sequence[int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Which token each patch belongs to, on the patch grid.

    Args:
        source: (N_tokens, N_input) 0/1 membership of one image, e.g. (33, 65) for 64 patches + cls.
        grid_size: Patches per side, ``(rows, cols)`` or one int, e.g. 8.
        num_prefix_tokens: Leading input tokens that are not patches (cls, distillation, registers).

    Returns:
        (rows, cols) long tensor of token indices, e.g. (8, 8).
    """
    rows, cols = _pair(grid_size)
    if source.dim() != 2 or source.shape[1] != num_prefix_tokens + rows * cols:
        raise ValueError(
            f"source has shape {tuple(source.shape)}; expected (N_tokens, {num_prefix_tokens + rows * cols}) "
            f"for {num_prefix_tokens} prefix token(s) and a {rows}x{cols} patch grid"
        )
    patches = source[:, num_prefix_tokens:]  # (N_tokens, rows * cols)
    if not torch.all(patches.sum(dim=0) > 0):
        raise ValueError("some patches belong to no token; is this a source from trace_source=True?")
    return patches.argmax(dim=0).view(rows, cols)


def _to_hwc(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image.detach().float().cpu().clamp(0.0, 1.0).permute(1, 2, 0)  # (H, W, 3)


def merge_overlay(
    image: torch.Tensor,
    source: torch.Tensor,
    patch_size: int | Sequence[int],
    num_prefix_tokens: int = 1,
    colors: Colors = "mean",
    border: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    scale: int = 1,
    alpha: float = 0.6,
    seed: int = 0,
) -> np.ndarray:
    """Paint every merged group of patches in one colour and outline the groups, as ToMe does.

    Args:
        image: (3, H, W) image in [0, 1] (or ``uint8``), H and W multiples of the patch size.
        source: (N_tokens, N_input) membership of this image, e.g. from ``layer_sources(...)[k][i]``.
        patch_size: Pixels per patch side, e.g. 16 (or ``(rows, cols)``).
        num_prefix_tokens: Leading input tokens that are not patches.
        colors: ``"mean"``: each group takes the mean colour of its pixels (what the merged token
            "sees"); ``"random"``: a random colour per group blended with the image by ``alpha``.
        border: RGB colour in [0, 1] of the lines between groups; ``None`` draws none.
        scale: Nearest-neighbour upscaling first, so 1-pixel borders stay thin on small images.
        alpha: Weight of the random colours over the image.
        seed: Seed of the random colours.

    Returns:
        (H * scale, W * scale, 3) ``uint8`` array.
    """
    pixels = _to_hwc(image)
    patch_h, patch_w = _pair(patch_size)
    height, width = pixels.shape[:2]
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}"
        )
    groups = patch_groups(source.detach().cpu(), (height // patch_h, width // patch_w), num_prefix_tokens)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        patch_h, patch_w = patch_h * scale, patch_w * scale
    pixel_groups = groups.repeat_interleave(patch_h, 0).repeat_interleave(patch_w, 1)  # (H', W')
    num_tokens = source.shape[0]
    flat = pixel_groups.reshape(-1)
    if colors == "mean":
        sums = torch.zeros(num_tokens, 3).index_add_(0, flat, pixels.reshape(-1, 3))
        counts = torch.bincount(flat, minlength=num_tokens).clamp_min(1).unsqueeze(1)
        out = (sums / counts)[pixel_groups]  # (H', W', 3)
    elif colors == "random":
        palette = torch.rand(num_tokens, 3, generator=torch.Generator().manual_seed(seed))
        out = alpha * palette[pixel_groups] + (1.0 - alpha) * pixels
    else:
        raise ValueError(f"colors must be 'mean' or 'random', got {colors!r}")
    if border is not None:
        edge = torch.zeros_like(pixel_groups, dtype=torch.bool)
        edge[:, 1:] |= pixel_groups[:, 1:] != pixel_groups[:, :-1]
        edge[1:, :] |= pixel_groups[1:, :] != pixel_groups[:-1, :]
        out[edge] = torch.tensor(border)
    return (out.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()


def plot_merge_layers(
    image: torch.Tensor,
    sources: Sequence[torch.Tensor],
    patch_size: int | Sequence[int],
    num_prefix_tokens: int = 1,
    colors: Colors = "mean",
    scale: int = 4,
    columns: int = 5,
    layers: Sequence[int] | None = None,
    title: str | None = None,
) -> Any:
    """One panel per layer: the image, then its merged groups after each block.

    Args:
        image: (3, H, W) image in [0, 1] (or ``uint8``).
        sources: Per-block (N_l, N_input) memberships of this image, e.g.
            ``[s[0] for s in layer_sources(model, x)]``.
        patch_size: Pixels per patch side.
        num_prefix_tokens: Leading input tokens that are not patches.
        colors: See ``merge_overlay``.
        scale: See ``merge_overlay``.
        columns: Panels per row of the figure.
        layers: Which blocks to show (default: all).
        title: Figure title above the panels.

    Returns:
        A matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    layers = list(range(len(sources))) if layers is None else list(layers)
    panels = 1 + len(layers)
    rows = -(-panels // columns)
    cols = min(columns, panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    original = (_to_hwc(image).repeat_interleave(scale, 0).repeat_interleave(scale, 1) * 255).byte()
    axes[0][0].imshow(original.numpy())
    axes[0][0].set_title(f"input ({sources[0].shape[1] - num_prefix_tokens} patches)", fontsize=8)
    for panel, layer in enumerate(layers, start=1):
        ax = axes[panel // cols][panel % cols]
        overlay = merge_overlay(image, sources[layer], patch_size, num_prefix_tokens, colors, scale=scale)
        ax.imshow(overlay)
        ax.set_title(f"block {layer}: {sources[layer].shape[0]} tokens", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
