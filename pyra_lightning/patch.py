"""Patch timm Vision Transformers with LoRA, token merging and PYRA.

The patch swaps the classes of the model, its blocks and their attention for subclasses whose
``forward`` differs; every submodule (norms, ``ls1``/``ls2``, ``drop_path1``/``drop_path2``,
q/k norm, the fused ``qkv``) is timm's own and is reused as is. The structure is checked first,
so an architecture the patch does not understand fails with a message naming it instead of
computing something else.

Per-forward state (token sizes and sources) travels through the blocks as an immutable
``TokenState`` argument, not as a list on the model: a block can run twice (activation
checkpointing recomputes it) and still see the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyra_lightning.lora import LoRAQKV
from pyra_lightning.merge import bipartite_soft_matching, merge_source, merge_wavg, weighted_mean
from pyra_lightning.modulation import VARIANTS, PyraModulation, Variant
from pyra_lightning.schedules import MergeSpec, ViTShape, resolve_schedule

_POOLS = ("token", "avg", "max", "avgmax", "")


@dataclass(frozen=True)
class TokenState:
    """What one forward pass carries from block to block besides the tokens.

    Attributes:
        size: (B, N, 1) number of input patches each token stands for; ``None`` before any merge.
        source: (B, N, N0) 0/1 membership over the N0 input tokens, only with ``trace_source``.
    """

    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


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
        bias = None if size is None else size.log().to(q.dtype).view(B, 1, 1, N)  # over keys
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
     - ``forward_head(x, size=...)`` averages tokens weighted by their size for ``avg`` pooling;
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
        if size is None or self.global_pool not in ("avg", "avgmax"):
            return super().forward_head(x, pre_logits=pre_logits)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        pooled = weighted_mean(x, size)  # (B, C)
        if self.global_pool == "avgmax":
            pooled = 0.5 * (pooled + x.amax(dim=1))
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, state = self.forward_tokens(x)
        return self.forward_head(x, size=state.size)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__}" + (f" ({arch})" if arch else "")


def check_vit(model: nn.Module) -> None:
    """Assert the structure the patch relies on; raise ``ValueError`` naming what differs."""
    name = _model_name(model)
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{name} is not a timm VisionTransformer; pyra-lightning patches timm ViT/DeiT models only"
        )
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(
            f"{name} uses attention pooling (global_pool='map'), which token merging does not support"
        )
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


def vit_shape(model: VisionTransformer) -> ViTShape:
    """Depth, widths and token counts of a timm ViT at its configured input size."""
    return ViTShape(
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        mlp_hidden=model.blocks[0].mlp.fc1.out_features,
        num_patches=model.patch_embed.num_patches,
        num_prefix_tokens=model.num_prefix_tokens,
    )


def apply_lora(
    model: VisionTransformer, lora_rank: int, lora_alpha: float | None = None, lora_dropout: float = 0.0
) -> VisionTransformer:
    """Give every block's ``attn.qkv`` a LoRA update and freeze everything else (eq. 1).

    Args:
        model: A timm ViT; changed in place and returned.
        lora_rank: Rank of the update (the reference trains rank 8 for ViT-B, 12 for ViT-L).
        lora_alpha: Scale numerator; ``None`` keeps the reference's scaling of 1.
        lora_dropout: Dropout on the LoRA branch's input (the paper's recipe uses 0.1).
    """
    check_vit(model)
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}")
    for index, block in enumerate(model.blocks):
        if isinstance(block.attn.qkv, LoRAQKV):
            raise ValueError(f"blocks[{index}].attn.qkv already has LoRA; call fold_lora first")
    for param in model.parameters():
        param.requires_grad_(False)
    for block in model.blocks:
        block.attn.qkv = LoRAQKV.from_linear(block.attn.qkv, lora_rank, lora_alpha, lora_dropout)
    return model


def fold_lora(model: nn.Module) -> nn.Module:
    """Fold ``scaling · B A`` into every qkv weight and remove all LoRA modules and parameters.

    The result is a plain timm ViT (plus merging, if applied) that costs no extra FLOPs. Folding
    a model without LoRA, for example twice, changes nothing.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRAQKV):
                setattr(module, child_name, child.to_linear())
    return model


def apply_merging(
    model: VisionTransformer,
    merge_r: MergeSpec,
    pyra: bool | Variant = True,
    prop_attn: bool = True,
    trace_source: bool = False,
) -> VisionTransformer:
    """Merge tokens in every block (ToMe), with PYRA token modulation unless ``pyra=False``.

    Can be called again on a patched model to change the schedule; PYRA layers whose
    ``merge_r`` and variant are unchanged keep their trained parameters.

    Args:
        model: A timm ViT; changed in place and returned.
        merge_r: Tokens merged per block; see ``pyra_lightning.schedules`` for the accepted forms
            (int, ``(r, inflection)``, per-layer list, ``"low"``/``"high"``, FLOPs fraction).
        pyra: ``True`` for PYRA (eqs. 4-7), ``False`` for plain ToMe, or an ablation variant name.
        prop_attn: Add ``log(size)`` to attention logits so merged tokens keep their weight.
        trace_source: Record which patches each token contains (``TokenState.source``).
    """
    check_vit(model)
    variant: Variant | None
    if pyra is True:
        variant = "pyra"
    elif pyra is False or pyra is None:
        variant = None
    elif pyra in VARIANTS:
        variant = pyra
    else:
        raise ValueError(f"pyra={pyra!r}: expected True, False or a variant name ({', '.join(VARIANTS)})")
    schedule = resolve_schedule(merge_r, vit_shape(model))

    if not isinstance(model, MergingVisionTransformer):
        base = type(model)
        model.__class__ = type(f"Merging{base.__name__}", (MergingVisionTransformer, base), {})
    for block, block_r in zip(model.blocks, schedule, strict=True):
        old = getattr(block, "pyra", None)
        block.__class__ = PyraBlock
        block.attn.__class__ = PyraAttention
        block.merge_r = block_r
        block.prop_attn = prop_attn
        block.trace_source = trace_source
        block.num_prefix_tokens = model.num_prefix_tokens
        if variant is None or block_r == 0:
            block.pyra = None
        elif isinstance(old, PyraModulation) and old.merge_r == block_r and old.variant == variant:
            block.pyra = old
        else:
            ref = block.norm1.weight
            block.pyra = PyraModulation(block_r, model.embed_dim, variant).to(
                device=ref.device, dtype=ref.dtype
            )
    return model


def merge_schedule(model: nn.Module) -> list[int]:
    """The per-block ``merge_r`` of a patched model (zeros for an unpatched one)."""
    return [getattr(block, "merge_r", 0) for block in model.blocks]


def classifier_modules(model: VisionTransformer) -> list[nn.Module]:
    """The task head(s): ``head``, plus ``head_dist`` for distilled DeiT."""
    heads = model.get_classifier()
    return list(heads) if isinstance(heads, tuple) else [heads]


def parameter_group(name: str, head_names: set[str]) -> str:
    """Which trainable group a parameter name belongs to: lora, pyra, head or backbone."""
    if ".lora_" in name:
        return "lora"
    if ".pyra." in name:
        return "pyra"
    if name in head_names:
        return "head"
    return "backbone"


def head_parameter_names(model: VisionTransformer) -> set[str]:
    owned = {id(p) for head in classifier_modules(model) for p in head.parameters()}
    return {name for name, param in model.named_parameters() if id(param) in owned}


def mark_trainable(model: VisionTransformer, head: bool = True) -> dict[str, list[str]]:
    """Train only LoRA, PYRA and (optionally) the head; return the parameter names per group."""
    head_names = head_parameter_names(model)
    groups: dict[str, list[str]] = {"lora": [], "pyra": [], "head": [], "backbone": []}
    for name, param in model.named_parameters():
        group = parameter_group(name, head_names)
        trainable = group in ("lora", "pyra") or (group == "head" and head)
        param.requires_grad_(trainable)
        groups[group].append(name)
    return groups
