"""Token merging and PYRA inside timm's ``VisionTransformer`` (ViT, DeiT, DINOv2, CLIP, SigLIP).

The patch swaps the classes of the model, its blocks and their attention for subclasses whose
``forward`` differs; every submodule (norms, ``ls1``/``ls2``, ``drop_path1``/``drop_path2``,
q/k norm, the fused ``qkv``, the attention pool) is timm's own and is reused as is.

Per-forward state (token sizes, sources, merged rotary embeddings) travels through the blocks as
an immutable ``TokenState`` argument, not as a list on the model: a block can run twice
(activation checkpointing recomputes it) and still see the same inputs.

This module also holds what the Eva family (``patch_eva``) shares with the ViT path: the state,
size-aware pooling (average and attention pooling) and the shape read off a model for schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyra_lightning.merge import bipartite_soft_matching, merge_source, merge_wavg, weighted_mean
from pyra_lightning.modulation import PyraModulation
from pyra_lightning.schedules import ViTShape

_POOLS = ("token", "avg", "max", "avgmax", "", "map")


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


def size_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention: ``log(size)`` over keys as an additive SDPA mask, (B, 1, 1, N)."""
    if size is None:
        return None
    return size.log().to(dtype).view(size.shape[0], 1, 1, size.shape[1])


def _mask_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention logits have: the autocast dtype inside autocast, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
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
        return model.attn_pool(x, attn_mask=size_bias(size, _mask_dtype(x)))
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


def check_attn_pool(name: str, model: nn.Module) -> None:
    """Attention pooling is supported for timm's ``AttentionPoolLatent`` without its own position table."""
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return
    if not isinstance(pool, AttentionPoolLatent):
        raise ValueError(
            f"{name} pools with {type(pool).__name__}; token merging supports attention pooling "
            "through timm's AttentionPoolLatent (global_pool='map') only"
        )
    if pool.pos_embed is not None:
        raise ValueError(
            f"{name}: its AttentionPoolLatent adds a position table (pos_embed='abs') to a fixed "
            "number of tokens, which merged tokens no longer match"
        )


class PyraAttention(Attention):
    """timm ``Attention`` that also returns the merge metric.

    Modifications relative to timm:
     - ``forward(x, size)`` adds ``log(size)`` to the attention logits (proportional attention)
       as an additive mask through ``scaled_dot_product_attention``;
     - returns ``(out, k.mean(heads))``: the keys after LoRA and k-norm, averaged over heads,
       are the similarity metric of eq. 3.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        attn_dim = self.qkv.out_features // 3
        head_dim = attn_dim // self.num_heads
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        bias = size_bias(size, q.dtype)  # over keys
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, N, attn_dim)
        out = self.norm(out) if hasattr(self, "norm") else out
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), k.mean(dim=1)


class PyraBlock(Block):
    """timm ``Block`` that merges tokens between attention and MLP, as ToMe and PYRA do.

    Modifications relative to timm:
     - ``forward(x, state) -> (x, state)`` carries token sizes (and sources) explicitly;
     - after ``x + drop_path1(ls1(attn))``, merges ``merge_r`` tokens by a size-weighted average
       (eqs. 2-3), modulating the sources with ``self.pyra`` (eqs. 4-7) when present;
     - holds ``merge_r``, ``prop_attn``, ``trace_source``, ``num_prefix_tokens`` and ``pyra``.
    """

    merge_r: int
    prop_attn: bool
    trace_source: bool
    num_prefix_tokens: int
    pyra: PyraModulation | None

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: TokenState | None = None
    ) -> tuple[torch.Tensor, TokenState]:
        state = TokenState() if state is None else state
        x_attn, metric = self.attn(self.norm1(x), size=state.size if self.prop_attn else None)
        x = x + self.drop_path1(self.ls1(x_attn))  # (B, N, C)
        if self.merge_r > 0:
            merge, _ = bipartite_soft_matching(metric, self.merge_r, self.num_prefix_tokens)
            source = merge_source(merge, x, state.source) if self.trace_source else None
            x, size = merge_wavg(merge, x, state.size, modulate=self.pyra)  # (B, N - merge_r, C)
            state = TokenState(size=size, source=source)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state


class MergingVisionTransformer(VisionTransformer):
    """Mixin placed in front of the model's own class (``VisionTransformer`` or a subclass).

    Modifications relative to timm:
     - ``forward_tokens(x) -> (tokens, TokenState)`` runs the blocks with explicit state;
       ``forward_features`` returns its tokens, so timm's API keeps working;
     - ``forward_head(x, size=...)`` pools with token sizes (``pool_tokens``): size-weighted
       ``avg``, proportional attention inside ``map`` pooling;
     - activation checkpointing (``set_grad_checkpointing``) checkpoints each block with its state.
    """

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenState]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)  # (B, N, C)
        state = TokenState()
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, state = checkpoint(block, x, state, use_reentrant=False)
            else:
                x, state = block(x, state)
        return self.norm(x), state

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_tokens(x)[0]

    def forward_head(  # type: ignore[override]
        self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None
    ) -> torch.Tensor:
        if size is None or (self.attn_pool is None and self.global_pool not in ("avg", "avgmax")):
            return super().forward_head(x, pre_logits=pre_logits)  # token/max pooling: sizes change nothing
        include = self.pool_include_prefix
        pooled = pool_tokens(self, x, size, include_prefix_avg=include, include_prefix_attn=include)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, state = self.forward_tokens(x)
        return self.forward_head(x, size=state.size)


def check_vit(name: str, model: VisionTransformer) -> None:
    """Assert the structure the ViT patch relies on; raise ``ValueError`` naming what differs."""
    check_attn_pool(name, model)
    if model.global_pool not in _POOLS:
        raise ValueError(f"{name} uses global_pool={model.global_pool!r}; supported: {_POOLS}")
    for index, block in enumerate(model.blocks):
        if not isinstance(block, Block):
            raise ValueError(
                f"{name}: blocks[{index}] is {type(block).__name__}, expected timm's pre-norm Block "
                "(norm1 -> attn -> ls1 -> drop_path1, norm2 -> mlp -> ls2 -> drop_path2)"
            )
        if not isinstance(block.attn, Attention):
            raise ValueError(
                f"{name}: blocks[{index}].attn is {type(block.attn).__name__}, expected timm's Attention "
                "with a fused qkv projection"
            )
        if not isinstance(block.attn.qkv, nn.Linear):
            raise ValueError(
                f"{name}: blocks[{index}].attn.qkv is {type(block.attn.qkv).__name__}, expected nn.Linear"
            )


def patch_vit(model: VisionTransformer) -> None:
    """Swap the model's, blocks' and attentions' classes; ``apply_merging`` sets the block attributes."""
    if not isinstance(model, MergingVisionTransformer):
        base = type(model)
        model.__class__ = type(f"Merging{base.__name__}", (MergingVisionTransformer, base), {})
    for block in model.blocks:
        block.__class__ = PyraBlock
        block.attn.__class__ = PyraAttention


def _macs(module: nn.Module | None) -> int:
    """Multiply-adds per token of every ``nn.Linear`` inside ``module`` (0 for ``None``)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def model_shape(model: nn.Module, attn_dim: int) -> ViTShape:
    """Depth, widths, token counts and per-token costs of a ViT or Eva at its configured size.

    Per-token costs are read off the modules (every ``nn.Linear`` in each block's attention
    and MLP), so fused or separate q/k/v, grouped-query attention, GluMlp/SwiGLU and gates all
    count what they compute. ``fixed_flops`` is what merging does not change: the patch
    embedding, the attention pool's latent side and the head.
    """
    embed = model.patch_embed.proj
    num_patches = model.patch_embed.num_patches
    fixed = (
        2 * num_patches * embed.in_channels * embed.out_channels * embed.kernel_size[0] * embed.kernel_size[1]
    )
    pool = getattr(model, "attn_pool", None)
    pool_token_flops = 0
    if pool is not None:  # kv projection and q kᵀ, attn v over the tokens that reach the pool
        pool_token_flops = 2 * _macs(pool.kv) + 2 * 2 * pool.latent_len * pool.kv.out_features // 2
        fixed += 2 * pool.latent_len * (_macs(pool.q) + _macs(pool.proj) + _macs(pool.mlp))
    head = model.get_classifier()
    fixed += sum(2 * _macs(h) for h in (head if isinstance(head, tuple) else (head,)))
    return ViTShape(
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_patches=num_patches,
        num_prefix_tokens=model.num_prefix_tokens,
        attn_dim=attn_dim,
        attn_macs=tuple(_macs(block.attn) for block in model.blocks),
        mlp_macs=tuple(_macs(block.mlp) for block in model.blocks),
        fixed_flops=fixed,
        pool_token_flops=pool_token_flops,
    )


def vit_shape(model: VisionTransformer) -> ViTShape:
    """``model_shape`` of a timm ViT."""
    return model_shape(model, attn_dim=model.blocks[0].attn.qkv.out_features // 3)
