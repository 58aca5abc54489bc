"""Patch timm Vision Transformers with LoRA, token merging and PYRA: the public entry points.

Two families of timm models are supported, each in its own module:

- ``VisionTransformer`` (ViT, DeiT, DINOv2, CLIP, SigLIP with attention pooling): ``patch_vit``;
- ``Eva`` (EVA-02, DINOv3, Perception Encoder, the RoPE ViTs): ``patch_eva``.

Both swap the classes of the model, its blocks and their attention for subclasses whose
``forward`` differs; every submodule is timm's own and is reused as is. The structure is
checked first, so an architecture the patch does not understand fails with a message naming
it and the reason instead of computing something else.

Per-forward state travels through the blocks as an immutable ``TokenState`` argument, not as a
list on the model: a block can run twice (activation checkpointing recomputes it) and still see
the same inputs.
"""

from __future__ import annotations

from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pyra_lightning.lora import LoRAQKV
from pyra_lightning.modulation import PyraModulation, Variant, resolve_variant
from pyra_lightning.patch_eva import (
    MergingEva,
    PyraEvaBlock,
    check_eva,
    eva_shape,
    patch_attention,
    patch_eva,
)
from pyra_lightning.patch_vit import (
    MergingVisionTransformer,
    PyraAttention,
    PyraBlock,
    TokenState,
    check_vit,
    patch_vit,
    vit_shape,
)
from pyra_lightning.schedules import MergeSpec, ViTShape, resolve_schedule

__all__ = [
    "MergingEva",
    "MergingVisionTransformer",
    "PyraAttention",
    "PyraBlock",
    "PyraEvaBlock",
    "TokenState",
    "apply_lora",
    "apply_merging",
    "fold_lora",
    "mark_trainable",
    "merge_schedule",
    "model_shape",
    "vit_shape",
]


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__}" + (f" ({arch})" if arch else "")


def check_model(model: nn.Module) -> None:
    """Assert the structure the patch relies on; raise ``ValueError`` naming the model and the reason."""
    name = _model_name(model)
    if isinstance(model, Eva):
        check_eva(name, model)
    elif isinstance(model, VisionTransformer):
        check_vit(name, model)
    elif any(hasattr(m, "relative_position_bias_table") for m in model.modules()):
        raise ValueError(
            f"{name} uses a relative position bias (BEiT-style), a table indexed by fixed token "
            "positions that merged tokens no longer have; token merging supports timm's "
            "VisionTransformer and Eva models"
        )
    else:
        raise ValueError(
            f"{name} is not a timm VisionTransformer or Eva; pyra-lightning patches timm "
            "ViT/DeiT/DINOv2/CLIP/SigLIP (VisionTransformer) and EVA-02/DINOv3/PE/RoPE-ViT (Eva) models"
        )


def model_shape(model: nn.Module) -> ViTShape:
    """Depth, widths, token counts and per-token costs at the configured input size (for schedules)."""
    return eva_shape(model) if isinstance(model, Eva) else vit_shape(model)


def lora_targets(attn: nn.Module) -> tuple[str, ...]:
    """The projections that get a LoRA: the fused ``qkv``, else ``q_proj``/``k_proj``/``v_proj``."""
    return ("qkv",) if isinstance(getattr(attn, "qkv", None), nn.Linear) else ("q_proj", "k_proj", "v_proj")


def apply_lora(
    model: nn.Module, lora_rank: int, lora_alpha: float | None = None, lora_dropout: float = 0.0
) -> nn.Module:
    """Give every block's attention projections a LoRA update and freeze everything else (eq. 1).

    One LoRA per projection at ``lora_rank``; trainable numbers per block, with D the width,
    A = heads x head_dim and K = kv heads x head_dim (K = A without grouped-query attention):

    - fused ``qkv`` (ViT, DINOv2, CLIP, DINOv3, PE): ``lora_rank * (D + 3A)``; ViT-B/16 at rank 8:
      8 x (768 + 2304) = 24,576 per block, 294,912 in 12 blocks (Table 1);
    - separate ``q_proj``/``k_proj``/``v_proj`` (EVA-02): ``lora_rank * (3D + A + 2K)``; EVA-02-B at
      rank 8: 8 x (3 x 768 + 3 x 768) = 36,864 per block, 442,368 in 12 blocks; with grouped-query
      attention the k and v updates shrink with K.

    Eva's separate ``q_bias``/``v_bias`` stay frozen and keep working: the patched attention
    adds them to the LoRA-adapted projection.

    Args:
        model: A timm ``VisionTransformer`` or ``Eva``; changed in place and returned.
        lora_rank: Rank of the update (the reference trains rank 8 for ViT-B, 12 for ViT-L).
        lora_alpha: Scale numerator; ``None`` keeps the reference's scaling of 1.
        lora_dropout: Dropout on the LoRA branch's input (the paper's recipe uses 0.1).
    """
    check_model(model)
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}")
    for index, block in enumerate(model.blocks):
        for target in lora_targets(block.attn):
            if isinstance(getattr(block.attn, target), LoRAQKV):
                raise ValueError(f"blocks[{index}].attn.{target} already has LoRA; call fold_lora first")
    for param in model.parameters():
        param.requires_grad_(False)
    if isinstance(model, Eva):
        patch_attention(model)  # timm's Eva attention bypasses the qkv module when q_bias exists
    for block in model.blocks:
        for target in lora_targets(block.attn):
            layer = LoRAQKV.from_linear(getattr(block.attn, target), lora_rank, lora_alpha, lora_dropout)
            setattr(block.attn, target, layer)
    return model


def fold_lora(model: nn.Module) -> nn.Module:
    """Fold ``scaling · B A`` into every adapted projection and remove all LoRA modules and parameters.

    The result has timm's own state-dict keys (plus merging, if applied) that costs no extra FLOPs. Folding
    a model without LoRA, for example twice, changes nothing.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRAQKV):
                setattr(module, child_name, child.to_linear())
    return model


def apply_merging(
    model: nn.Module,
    merge_r: MergeSpec,
    pyra: bool | Variant = True,
    prop_attn: bool = True,
    trace_source: bool = False,
) -> nn.Module:
    """Merge tokens in every block (ToMe), with PYRA token modulation unless ``pyra=False``.

    Can be called again on a patched model to change the schedule; PYRA layers whose
    ``merge_r`` and variant are unchanged keep their trained parameters. At ``merge_r=0`` the
    patched model computes what stock timm computes.

    Args:
        model: A timm ``VisionTransformer`` or ``Eva``; changed in place and returned.
        merge_r: Tokens merged per block; see ``pyra_lightning.schedules`` for the accepted forms
            (int, ``(r, inflection)``, per-layer list, ``"low"``/``"high"``, FLOPs fraction).
        pyra: ``True`` for PYRA (eqs. 4-7), ``False`` for plain ToMe, or an ablation variant name.
        prop_attn: Add ``log(size)`` to attention logits so merged tokens keep their weight.
        trace_source: Record which patches each token contains (``TokenState.source``). Models
            with per-layer rotary embeddings (``mixed`` RoPE) always record it.
    """
    check_model(model)
    variant = resolve_variant(pyra)
    schedule = resolve_schedule(merge_r, model_shape(model))
    per_layer_rope = isinstance(model, Eva) and model.rope is not None and model.rope_mixed
    if isinstance(model, Eva):
        patch_eva(model)
    else:
        patch_vit(model)
    for block, block_r in zip(model.blocks, schedule, strict=True):
        old = getattr(block, "pyra", None)
        block.merge_r = block_r
        block.prop_attn = prop_attn
        block.trace_source = trace_source or per_layer_rope
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


def classifier_modules(model: nn.Module) -> list[nn.Module]:
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


def head_parameter_names(model: nn.Module) -> set[str]:
    owned = {id(p) for head in classifier_modules(model) for p in head.parameters()}
    return {name for name, param in model.named_parameters() if id(param) in owned}


def mark_trainable(model: nn.Module, head: bool = True) -> dict[str, list[str]]:
    """Train only LoRA, PYRA and (optionally) the head; return the parameter names per group."""
    head_names = head_parameter_names(model)
    groups: dict[str, list[str]] = {"lora": [], "pyra": [], "head": [], "backbone": []}
    for name, param in model.named_parameters():
        group = parameter_group(name, head_names)
        trainable = group in ("lora", "pyra") or (group == "head" and head)
        param.requires_grad_(trainable)
        groups[group].append(name)
    return groups
