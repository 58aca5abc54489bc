"""Token merging and PYRA inside timm's ``VisionTransformer`` (ViT, DeiT, DINOv2, CLIP, SigLIP).

The patch swaps the classes of the model, its blocks and their attention for subclasses whose
``forward`` differs; every submodule (norms, ``ls1``/``ls2``, ``drop_path1``/``drop_path2``,
q/k norm, the fused ``qkv``, the attention pool) is timm's own and is reused as is.

Per-forward state (token sizes, sources, merged rotary embeddings) travels through the blocks as
an immutable ``TokenState`` argument, not as a list on the model: a block can run twice
(activation checkpointing recomputes it) and still see the same inputs.

``FAMILY`` is what ``families.py`` registers for ``VisionTransformer`` and its subclasses; what
the families share lives in ``patch_common``.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyra_lightning.kernels.attention import ATTENTIONS
from pyra_lightning.merge import merge_source
from pyra_lightning.merge_rules import Matcher, Merger
from pyra_lightning.modulation import PyraModulation
from pyra_lightning.patch_common import (
    Family,
    TokenState,
    check_pooling,
    dropout,
    merge_metric,
    mlp_forward,
    pool_tokens,
    shape_from_modules,
    size_bias,
)
from pyra_lightning.schedules import ViTShape


class PyraAttention(Attention):
    """timm ``Attention`` that also returns the merge metric.

    Modifications relative to timm:
     - ``forward(x, size)`` adds ``log(size)`` to the attention logits (proportional attention)
       on the kernel named by ``attention`` (``kernels.attention.ATTENTIONS``: SDPA with an
       additive mask by default, FlexAttention's ``score_mod``);
     - returns ``(out, k)``: the keys (B, H, N, head_dim) after LoRA and k-norm, whose mean over
       heads is the similarity metric of eq. 3. The block takes that mean only where it merges
       (``patch_common.merge_metric``): a layer with ``merge_r`` 0 launches no kernel for a metric
       it drops.
    """

    attention: str = "sdpa"  # set by apply_merging

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
        if self.fused_attn or self.attention != "sdpa":  # log(size) over keys, on the chosen kernel
            out = ATTENTIONS[self.attention](q, k, v, size, self.attn_drop.p if self.training else 0.0)
        else:  # timm's explicit path (fused_attn off)
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            bias = size_bias(size, q.dtype)  # over keys
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, N, attn_dim)
        out = self.norm(out) if hasattr(self, "norm") else out
        if gate is not None:
            out = out * gate
        return dropout(self.proj_drop, self.proj(out)), k


class PyraBlock(Block):
    """timm ``Block`` that merges tokens between attention and MLP, as ToMe's and PYRA's code do.

    The paper's Fig. 3 draws PYRA before the attention; the reference implementation modulates
    and merges after it, with the attention keys as the matching metric, and we follow the code.

    Modifications relative to timm:
     - ``forward(x, state) -> (x, state)`` carries token sizes (and sources) explicitly;
     - after ``x + drop_path1(ls1(attn))``, merges ``merge_r`` tokens: ``self.matcher`` picks
       them (bipartite soft matching, eqs. 2-3, by default) and ``self.merger`` combines them
       (the size-weighted average), modulating the sources with ``self.pyra`` (eqs. 4-7); a
       merger that ``fuses_residual`` gets ``x`` and the branch apart and adds them itself;
     - holds ``merge_r``, ``prop_attn``, ``trace_source``, ``num_prefix_tokens``, ``matcher``,
       ``merger`` and ``pyra``.
    """

    matcher: Matcher
    merger: Merger
    merge_r: int
    prop_attn: bool
    trace_source: bool
    num_prefix_tokens: int
    pyra: PyraModulation | None

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: TokenState | None = None
    ) -> tuple[torch.Tensor, TokenState]:
        state = TokenState() if state is None else state
        x_attn, keys = self.attn(self.norm1(x), size=state.size if self.prop_attn else None)
        branch = self.drop_path1(self.ls1(x_attn))  # (B, N, C)
        if self.merge_r == 0:
            x = x + branch
        else:
            merge, _ = self.matcher(merge_metric(keys), self.merge_r, self.num_prefix_tokens)
            if getattr(self.merger, "fuses_residual", False) and not self.trace_source:
                # the merger adds the residual as it reads: x + branch is never written whole
                x, size = self.merger(merge, branch, state.size, modulate=self.pyra, residual=x)
                source = None
            else:
                x = x + branch
                source = merge_source(merge, x, state.source) if self.trace_source else None
                x, size = self.merger(merge, x, state.size, modulate=self.pyra)  # (B, N - merge_r, C)
            state = TokenState(size=size, source=source)
        x = x + self.drop_path2(self.ls2(mlp_forward(self.mlp, self.norm2(x))))
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
    check_pooling(name, model)
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


def vit_shape(model: VisionTransformer) -> ViTShape:
    """``model_shape`` of a timm ViT."""
    return shape_from_modules(model, attn_dim=model.blocks[0].attn.qkv.out_features // 3)


FAMILY = Family(
    name="vit",
    check=check_vit,
    shape=vit_shape,
    patch=patch_vit,
    peft_targets=lambda attn: ("qkv",),
)
