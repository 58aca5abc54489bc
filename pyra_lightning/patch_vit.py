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
    mlp_input_dtype,
    pool_tokens,
    shape_from_modules,
    size_bias,
    with_metric_rows,
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
       it drops. After ``fold_metric`` it returns the (B, N, head_dim) metric that ``qkv``
       computed instead.
    """

    attention: str = "sdpa"  # set by apply_merging
    metric_channels: int = 0  # > 0: qkv also computes the merge metric (``fold_metric``)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        attn_dim = qkv_width(self)
        head_dim = attn_dim // self.num_heads
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        projected = self.qkv(x)  # (B, N, 3 attn_dim [+ metric_channels])
        metric = None
        if self.metric_channels:  # the folded metric's columns follow q, k and v (one split: views)
            projected, metric = projected.split([3 * attn_dim, self.metric_channels], dim=-1)
        qkv = projected.reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
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
        return dropout(self.proj_drop, self.proj(out)), k if metric is None else metric


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
        normed = None  # norm2(x), where the merger writes it
        if self.merge_r == 0:
            x = x + branch
        else:
            merge, _ = self.matcher(merge_metric(keys), self.merge_r, self.num_prefix_tokens)
            fuses = getattr(self.merger, "fuses_residual", False) and not self.trace_source
            if fuses and getattr(self.merger, "fuses_norm", False):
                # the merge kernel adds the residual as it reads and writes norm2 of what it merged
                x, size, normed = self.merger.merge_and_norm(  # type: ignore[attr-defined]
                    merge, branch, state.size, self.pyra, x, self.norm2, mlp_input_dtype(self.mlp, x)
                )
                source = None
            elif fuses:
                # the merger adds the residual as it reads: x + branch is never written whole
                x, size = self.merger(merge, branch, state.size, modulate=self.pyra, residual=x)
                source = None
            else:
                x = x + branch
                source = merge_source(merge, x, state.source) if self.trace_source else None
                x, size = self.merger(merge, x, state.size, modulate=self.pyra)  # (B, N - merge_r, C)
            state = TokenState(size=size, source=source)
        normed = self.norm2(x) if normed is None else normed
        x = x + self.drop_path2(self.ls2(mlp_forward(self.mlp, normed)))
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
    return shape_from_modules(model, attn_dim=qkv_width(model.blocks[0].attn))


def qkv_width(attn: nn.Module) -> int:
    """Channels of each of q, k and v: a third of ``qkv``'s outputs, past a folded metric's."""
    return (attn.qkv.out_features - getattr(attn, "metric_channels", 0)) // 3


def fold_metric(model: VisionTransformer) -> int:
    """For deployment: each merging block's ``qkv`` projection also computes the merge metric.

    The metric of eq. 3 is the keys' mean over heads, a linear map of the block's input where
    there is no k-norm (``patch_common.with_metric_rows``). Appended to ``qkv`` as ``head_dim``
    more outputs, it comes out of the qkv matrix product, where it cost a separate pass over the
    (B, H, N, head_dim) keys (a kernel per layer, and at batch 256 an 80 MB read). Equal to the
    keys' mean up to rounding (the mean weight is taken in fp64), so a near-tie between two scores
    may match otherwise, as with the Triton matcher. Changes, in place, the blocks that merge,
    whose ``qkv`` is a plain ``nn.Linear`` (PEFT layers folded: ``fold_lora``) and whose
    ``k_norm`` is the identity; the others keep taking the mean. The model's state dict changes
    shape: fold a copy to deploy.

    Returns:
        How many blocks were folded.
    """
    folded = 0
    for block in model.blocks:
        attn = block.attn
        if (
            getattr(block, "merge_r", 0) <= 0
            or type(attn.qkv) is not nn.Linear
            or not isinstance(attn.k_norm, nn.Identity)
            or attn.metric_channels
        ):
            continue
        attn_dim = qkv_width(attn)
        head_dim = attn_dim // attn.num_heads
        wide = with_metric_rows(attn.qkv, attn_dim, attn.num_heads, head_dim)  # k's rows follow q's
        attn.qkv, attn.metric_channels = wide, head_dim
        folded += 1
    return folded


FAMILY = Family(
    name="vit",
    check=check_vit,
    shape=vit_shape,
    patch=patch_vit,
    peft_targets=lambda attn: ("qkv",),
    fold_metric=fold_metric,
)
