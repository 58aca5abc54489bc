"""What every backbone family shares: the per-forward state, size-aware pooling, the shape read off
a model for schedules, and the ``Family`` record a ``patch_<family>.py`` module exports.

A family (``patch_vit.FAMILY``, ``patch_eva.FAMILY``) is one object holding the functions
``patch.py`` calls: check the structure, read the shape, patch the classes for merging, prepare
the attention for PEFT layers and name the projections that get them. ``families.py`` maps
model classes to families; nothing in ``patch.py`` asks which family a model is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, Mlp
from torch import nn

from pyra_lightning.merge import weighted_mean
from pyra_lightning.schedules import ViTShape

POOLS = ("token", "avg", "max", "avgmax", "", "map")


@dataclass(frozen=True)
class TokenState:
    """What one forward pass carries from block to block besides the tokens.

    Attributes:
        size: (B, N, 1) number of input patches each token stands for; ``None`` before any merge.
        source: (B, N, N0) 0/1 membership over the N0 input tokens, with ``trace_source`` (and
            always for per-layer rotary embeddings, which are rebuilt from it; see ``patch_eva``).
        rope: (B, N, R) size-weighted mean of the members' rotary embeddings (sin, cos) for
            rotary embeddings shared by all layers; zero rows for prefix tokens. ``None`` before
            any merge or without such embeddings.
    """

    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    rope: torch.Tensor | None = None


@dataclass(frozen=True)
class Family:
    """One backbone family: everything ``apply_lora``/``apply_merging`` need to know about it.

    Attributes:
        name: Shown in messages (``"vit"``, ``"eva"``).
        check: ``check(name, model)`` raises ``ValueError`` naming what differs from the structure
            the patch relies on; ``name`` is the model's class and architecture, for the message.
        shape: The model's ``ViTShape`` at its configured input size (for schedules and FLOPs).
        patch: Swaps the model's, blocks' and attentions' classes for the merging ones; the
            blocks' merge attributes are set by ``apply_merging`` afterwards.
        prepare_peft: Makes the attention call its projections as modules (so a PEFT layer put
            there takes effect); a no-op where timm already does.
        peft_targets: The attention's projection names that get a PEFT layer.
        traces_source: Whether the patched model needs ``TokenState.source`` in every block
            (per-layer rotary embeddings are rebuilt from it).
        fold_metric: For deployment, makes each merging block's projection compute the merge
            metric too (``patch_vit.fold_metric``, ``patch_eva.fold_metric``) and returns how
            many it changed; a no-op (0) where a family has none.
    """

    name: str
    check: Callable[[str, nn.Module], None]
    shape: Callable[[nn.Module], ViTShape]
    patch: Callable[[nn.Module], None]
    peft_targets: Callable[[nn.Module], tuple[str, ...]]
    prepare_peft: Callable[[nn.Module], None] = lambda model: None
    traces_source: Callable[[nn.Module], bool] = lambda model: False
    fold_metric: Callable[[nn.Module], int] = lambda model: 0


def fused_or_separate_qkv(attn: nn.Module) -> tuple[str, ...]:
    """The projections of an attention: the fused ``qkv``, else ``q_proj``/``k_proj``/``v_proj``."""
    return ("qkv",) if isinstance(getattr(attn, "qkv", None), nn.Linear) else ("q_proj", "k_proj", "v_proj")


def linear(layer: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer(x)`` with ``bias`` in place of the layer's own (Eva's separate q/k/v biases).

    timm computes ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``; a PEFT layer (see
    ``peft.py``) provides ``forward_with_bias`` for the same arithmetic plus its update, so the
    attention needs to know nothing about which method, if any, adapts the projection.
    """
    forward_with_bias = getattr(layer, "forward_with_bias", None)
    if forward_with_bias is None:
        return F.linear(x, layer.weight, bias)
    return forward_with_bias(x, bias)


def merge_metric(keys: torch.Tensor) -> torch.Tensor:
    """The similarity metric of eq. 3 from the attention's keys (B, H, N, hd): their mean over
    heads, (B, N, hd), as ToMe and PYRA's code take it. A (B, N, hd) tensor is that metric
    already (a projection computed it: ``patch_vit.fold_metric``)."""
    return keys if keys.dim() == 3 else keys.mean(dim=1)


def with_metric_rows(
    layer: nn.Linear, start: int, heads: int, head_dim: int, bias: torch.Tensor | None = None
) -> nn.Linear:
    """A copy of ``layer`` with ``head_dim`` more outputs: the merge metric, for ``fold_metric``.

    Without a k-norm the keys are linear in the block's input (``x W_h^T + b_h`` for head h), so
    their mean over heads, the metric of eq. 3, is one more linear map with the heads' mean weight
    and bias, taken in fp64 and rounded once. The copy is allocated uninitialised (on the meta
    device, then moved), so folding neither draws from the caller's random generator nor
    initialises a matrix only to overwrite it.

    Args:
        layer: The projection whose outputs ``start ..< start + heads * head_dim`` are the keys.
        start: The first key output (after q's in a fused ``qkv``; 0 for ``k_proj``).
        heads: The key heads averaged (``num_kv_heads`` under grouped-query attention).
        head_dim: Channels per head, and the metric's width.
        bias: The projection's bias where the attention keeps it apart (EVA's ``q_bias``,
            ``k_bias``, ``v_bias``); ``None`` takes ``layer.bias``. The copy holds it.

    Returns:
        A frozen ``nn.Linear`` with ``layer.out_features + head_dim`` outputs, on ``layer``'s
        device and in its dtype.
    """
    weight = layer.weight.detach()  # (out, C)
    bias = layer.bias if bias is None else bias
    rows = slice(start, start + heads * head_dim)
    mean_weight = weight[rows].double().view(heads, head_dim, -1).mean(0)  # (hd, C)
    wide = nn.Linear(
        layer.in_features, layer.out_features + head_dim, bias is not None, device="meta", dtype=weight.dtype
    )
    wide = wide.to_empty(device=weight.device).requires_grad_(False)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([weight, mean_weight.to(weight.dtype)]))  # (out + hd, C)
        if bias is not None:
            bias = bias.detach()
            mean_bias = bias[rows].double().view(heads, head_dim).mean(0)  # (hd,)
            wide.bias.copy_(torch.cat([bias, mean_bias.to(bias.dtype)]))
    return wide


def size_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention: ``log(size)`` over keys as an additive SDPA mask, (B, 1, 1, N)."""
    if size is None:
        return None
    bias = size.log()
    if bias.dtype != dtype:  # a same-dtype .to() is still one dispatched operator per layer
        bias = bias.to(dtype)
    return bias.view(size.shape[0], 1, 1, size.shape[1])


def dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an ``nn.Dropout``, skipped where it is the identity (eval, ``p == 0``).

    An identity dropout still dispatches an operator, and on a GPU every operator costs host time.
    """
    if module.training and getattr(module, "p", 1.0) > 0:
        return module(x)
    return x


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` (fc1 -> act -> drop1 -> norm -> fc2 -> drop2) with identity dropouts skipped.

    The same submodules in timm's order; only dropouts that do nothing (eval, ``p == 0``) are not
    called. Other MLPs (SwiGLU, GluMlp, ...) run as they are.
    """
    if type(mlp) is not Mlp:
        return mlp(x)
    x = dropout(mlp.drop1, mlp.act(mlp.fc1(x)))
    return dropout(mlp.drop2, mlp.fc2(mlp.norm(x)))


def mlp_input_dtype(mlp: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``mlp_forward`` casts its input to before anything else reads it, where that is
    known: under autocast, timm's ``Mlp`` with a plain ``nn.Linear`` fc1 (LoRA folded) reads it
    in the autocast dtype. ``None`` elsewhere. A norm before it may write that dtype directly."""
    if type(mlp) is not Mlp or type(mlp.fc1) is not nn.Linear or not autocasting(x.device):
        return None
    if has_hooks(mlp.fc1):  # a hook would see (or could recast) the input in another dtype
        return None
    return torch.get_autocast_dtype(x.device.type)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs any forward (pre-)hook, its own or a global one: a fused
    kernel that stands in for the call must then let the module run instead."""
    glob = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or glob._global_forward_hooks
        or glob._global_forward_pre_hooks
    )


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (never for a type autocast lacks, as meta)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def mask_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention logits have: the autocast dtype inside autocast, else ``x``'s."""
    if autocasting(x.device):  # a device type autocast lacks (meta) has no autocast dtype
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def pool_tokens(
    model: nn.Module,
    x: torch.Tensor,
    size: torch.Tensor,
    include_prefix_avg: bool = False,
    include_prefix_attn: bool = False,
) -> torch.Tensor:
    """timm's pooling (``model.global_pool`` / ``model.attn_pool``) with token sizes: (B, N, C) -> (B, C).

    - ``token``: the class token, as timm;
    - ``avg``/``avgmax``: the mean is weighted by size, so it equals the unmerged model's mean
      when merging is exact; ``max`` is unchanged;
    - ``map`` (``AttentionPoolLatent``): ``log(size)`` is added to the pool's logits over keys, so
      a merged token weighs as much as its members together (proportional attention).

    Args:
        model: A patched ``VisionTransformer`` or ``Eva``.
        x: Final tokens (after the final norm), (B, N, C).
        size: Their sizes, (B, N, 1).
        include_prefix_avg: Whether prefix tokens take part in avg/max pooling.
        include_prefix_attn: Whether prefix tokens are keys of the attention pool.
    """
    npt = model.num_prefix_tokens
    if model.attn_pool is not None:
        if not include_prefix_attn:
            x, size = x[:, npt:], size[:, npt:]
        return model.attn_pool(x, attn_mask=size_bias(size, mask_dtype(x)))
    pool = model.global_pool
    if pool == "token":
        return x[:, 0]
    if pool in ("avg", "avgmax", "max"):
        if not include_prefix_avg:
            x, size = x[:, npt:], size[:, npt:]
        if pool == "max":
            return x.amax(dim=1)
        pooled = weighted_mean(x, size)  # (B, C)
        return 0.5 * (pooled + x.amax(dim=1)) if pool == "avgmax" else pooled
    return x  # global_pool "": no pooling


def check_pooling(name: str, model: nn.Module) -> None:
    """Pooling the patch supports: a ``POOLS`` global pool, or timm's ``AttentionPoolLatent``
    without its own position table."""
    pool = getattr(model, "attn_pool", None)
    if pool is not None and not isinstance(pool, AttentionPoolLatent):
        raise ValueError(
            f"{name} pools with {type(pool).__name__}; token merging supports attention pooling "
            "through timm's AttentionPoolLatent (global_pool='map') only"
        )
    if pool is not None and pool.pos_embed is not None:
        raise ValueError(
            f"{name}: its AttentionPoolLatent adds a position table (pos_embed='abs') to a fixed "
            "number of tokens, which merged tokens no longer match"
        )
    if model.global_pool not in POOLS:
        raise ValueError(f"{name} uses global_pool={model.global_pool!r}; supported: {POOLS}")


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-adds per token of every ``nn.Linear`` inside ``module`` (0 for ``None``)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def shape_from_modules(model: nn.Module, attn_dim: int) -> ViTShape:
    """Depth, widths, token counts and per-token costs of a ViT-like model at its configured size.

    Per-token costs are read off the modules (every ``nn.Linear`` in each block's attention
    and MLP), so fused or separate q/k/v, grouped-query attention, GluMlp/SwiGLU and gates all
    count what they compute. ``fixed_flops`` is what merging does not change: the patch
    embedding, the attention pool's latent side and the head.

    Args:
        model: A timm model with ``patch_embed``, ``blocks`` (each with ``attn`` and ``mlp``),
            ``embed_dim``, ``num_prefix_tokens`` and ``get_classifier``.
        attn_dim: Width of the attention (heads x head_dim), which the family knows how to read.
    """
    embed = model.patch_embed.proj
    num_patches = model.patch_embed.num_patches
    kernel = embed.kernel_size[0] * embed.kernel_size[1]
    fixed = 2 * num_patches * embed.in_channels * embed.out_channels * kernel
    pool = getattr(model, "attn_pool", None)
    pool_token_flops = 0
    if pool is not None:  # kv projection and q kᵀ, attn v over the tokens that reach the pool
        pool_token_flops = 2 * linear_macs(pool.kv) + 2 * 2 * pool.latent_len * pool.kv.out_features // 2
        fixed += 2 * pool.latent_len * (linear_macs(pool.q) + linear_macs(pool.proj) + linear_macs(pool.mlp))
    head = model.get_classifier()
    fixed += sum(2 * linear_macs(h) for h in (head if isinstance(head, tuple) else (head,)))
    return ViTShape(
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_patches=num_patches,
        num_prefix_tokens=model.num_prefix_tokens,
        attn_dim=attn_dim,
        attn_macs=tuple(linear_macs(block.attn) for block in model.blocks),
        mlp_macs=tuple(linear_macs(block.mlp) for block in model.blocks),
        fixed_flops=fixed,
        pool_token_flops=pool_token_flops,
    )
