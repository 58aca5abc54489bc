"""Patch timm Vision Transformers with LoRA, token merging and PYRA: the public entry points.

Each backbone family lives in its own module and exports one ``Family`` object
(``patch_common.Family``), registered by model class in ``families.py``:

- ``VisionTransformer`` (ViT, DeiT, DINOv2, CLIP, SigLIP with attention pooling): ``patch_vit``;
- ``Eva`` (EVA-02, DINOv3, Perception Encoder, the RoPE ViTs): ``patch_eva``.

A family swaps the classes of the model, its blocks and their attention for subclasses whose
``forward`` differs; every submodule is timm's own and is reused as is. The structure is
checked first, so an architecture the patch does not understand fails with a message naming
it and the reason instead of computing something else.

The merge rule is a part of each block: a matcher (which tokens merge) and a merger (how they
combine), chosen by name from ``merge_rules``. PEFT layers (LoRA, DoRA) live in ``peft.py``;
``apply_lora``, ``fold_lora`` and ``mark_trainable`` are re-exported here.

Per-forward state travels through the blocks as an immutable ``TokenState`` argument, not as a
list on the model: a block can run twice (activation checkpointing recomputes it) and still see
the same inputs.
"""

from __future__ import annotations

from torch import nn

from pyra_lightning.families import check_model, family_of, model_shape, register_family
from pyra_lightning.kernels.attention import check_attention
from pyra_lightning.merge_rules import build_matcher, build_merger
from pyra_lightning.modulation import PyraModulation, Variant, resolve_variant
from pyra_lightning.patch_common import Family, TokenState
from pyra_lightning.patch_eva import MergingEva, PyraEvaBlock
from pyra_lightning.patch_vit import MergingVisionTransformer, PyraAttention, PyraBlock, vit_shape
from pyra_lightning.peft import apply_lora, fold_lora, mark_trainable
from pyra_lightning.schedules import MergeSpec, resolve_schedule

__all__ = [
    "Family",
    "MergingEva",
    "MergingVisionTransformer",
    "PyraAttention",
    "PyraBlock",
    "PyraEvaBlock",
    "TokenState",
    "apply_lora",
    "apply_merging",
    "check_model",
    "fold_lora",
    "mark_trainable",
    "merge_rule",
    "merge_schedule",
    "model_shape",
    "register_family",
    "vit_shape",
]


def apply_merging(
    model: nn.Module,
    merge_r: MergeSpec,
    pyra: bool | Variant = True,
    prop_attn: bool = True,
    trace_source: bool = False,
    matcher: str = "bipartite",
    merger: str = "wavg",
    attention: str = "sdpa",
) -> nn.Module:
    """Merge tokens in every block (ToMe), with PYRA token modulation unless ``pyra=False``.

    Can be called again on a patched model to change the schedule or the rule; PYRA layers whose
    ``merge_r`` and variant are unchanged keep their trained parameters. At ``merge_r=0`` the
    patched model computes what stock timm computes.

    Args:
        model: A model of a registered family (timm ``VisionTransformer``, ``Eva``); changed in
            place and returned.
        merge_r: Tokens merged per block; see ``pyra_lightning.schedules`` for the accepted forms
            (int, ``(r, inflection)``, per-layer list, ``"low"``/``"high"``, FLOPs fraction).
        pyra: ``True`` for PYRA (eqs. 4-7), ``False`` for plain ToMe, or an ablation variant name.
        prop_attn: Add ``log(size)`` to attention logits so merged tokens keep their weight.
        trace_source: Record which patches each token contains (``TokenState.source``). Models
            with per-layer rotary embeddings (``mixed`` RoPE) always record it.
        matcher: Which tokens merge: a name registered in ``merge_rules.MATCHERS``
            (``"bipartite"``, eqs. 2-3, by default).
        merger: How they combine: a name registered in ``merge_rules.MERGERS`` (``"wavg"``, the
            size-weighted average, by default).
        attention: The kernel that attends with proportional attention: a name registered in
            ``kernels.attention.ATTENTIONS`` (``"sdpa"`` by default, ``"flex"``, ``"triton"``,
            ``"sdpa_channel"``).
    """
    family = family_of(model)
    variant = resolve_variant(pyra)
    schedule = resolve_schedule(merge_r, family.shape(model))
    matcher_rule, merger_rule = build_matcher(matcher), build_merger(merger)
    check_attention(attention)
    family.patch(model)
    always_trace = family.traces_source(model)
    for block, block_r in zip(model.blocks, schedule, strict=True):
        old = getattr(block, "pyra", None)
        block.merge_r = block_r
        block.prop_attn = prop_attn
        block.trace_source = trace_source or always_trace
        block.num_prefix_tokens = model.num_prefix_tokens
        block.matcher = matcher_rule
        block.merger = merger_rule
        _set_attention(block, attention)
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


def set_merge_rule(
    model: nn.Module, matcher: str | None = None, merger: str | None = None, attention: str | None = None
) -> nn.Module:
    """Swap a patched model's matcher, merger or attention kernel by name, in place.

    The schedule and the PYRA layers stay as they are: this is how a trained model is deployed on
    the fused kernels (``matcher="triton", merger="triton"``) or on FlexAttention.

    Args:
        model: A model patched by ``apply_merging``.
        matcher: A name in ``merge_rules.MATCHERS``; ``None`` keeps the model's.
        merger: A name in ``merge_rules.MERGERS``; ``None`` keeps the model's.
        attention: A name in ``kernels.attention.ATTENTIONS``; ``None`` keeps the model's.

    Returns:
        ``model``.

    Raises:
        ValueError: for an unpatched model or a name that is not registered.
    """
    matcher_rule = None if matcher is None else build_matcher(matcher)
    merger_rule = None if merger is None else build_merger(merger)
    if attention is not None:
        check_attention(attention)
    for block in model.blocks:
        if not hasattr(block, "matcher"):
            raise ValueError("set_merge_rule needs a model patched by apply_merging")
        block.matcher = block.matcher if matcher_rule is None else matcher_rule
        block.merger = block.merger if merger_rule is None else merger_rule
        if attention is not None:
            _set_attention(block, attention)
    return model


def _set_attention(block: nn.Module, attention: str) -> None:
    """Point ``block``'s attention at the ``ATTENTIONS`` kernel ``attention``; refuse a registered
    family's attention that reads no table (its own SDPA), which would ignore the setting."""
    if hasattr(type(block.attn), "attention"):
        block.attn.attention = attention
    elif attention != "sdpa":
        raise ValueError(
            f"attention={attention!r}: {type(block.attn).__name__} does not attend through "
            "kernels.attention.ATTENTIONS (give it an `attention` class attribute that its forward reads)"
        )


def attention_kernel(model: nn.Module) -> str:
    """The ``kernels.attention.ATTENTIONS`` name a model's attentions run (``"sdpa"`` unpatched).

    Raises:
        ValueError: if its blocks disagree.
    """
    names = {getattr(block.attn, "attention", "sdpa") for block in model.blocks}
    if len(names) != 1:
        raise ValueError(f"expected one attention kernel in every block, found {sorted(names)}")
    return names.pop()


def merge_rule(model: nn.Module) -> tuple[str, str]:
    """The registered names of a patched model's ``(matcher, merger)``, as the export records them.

    Raises:
        ValueError: for a model that is not patched or whose blocks use different rules.
    """
    rules = {(block.matcher.name, block.merger.name) for block in model.blocks if hasattr(block, "matcher")}
    if len(rules) != 1:
        raise ValueError(f"expected one merge rule in every block of a merging model, found {sorted(rules)}")
    return rules.pop()
