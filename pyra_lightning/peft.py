"""PEFT methods behind one interface: a registry of layers, applying, folding, trainable marking
and parameter groups (in the spirit of peft's ``register_peft_method``).

A method is a ``PeftMethod`` record: its name, its layer class (an ``nn.Linear`` subclass
following the contract in ``lora.py``: ``from_linear``, ``forward_with_bias``, ``to_linear``) and
the prefix of its trainable tensors' names. The prefix, not string matching spread over files,
decides a parameter's group; ``ParameterCount`` (``accounting.py``), ``mark_trainable`` and the
optimizer's groups all read it from here. Adding a method is one layer module plus one
``register_peft_method`` line.

Registered: ``lora`` (``lora.LoRALinear``, eq. 1 of the PYRA paper) and ``dora``
(``dora.DoRALinear``, weight-decomposed LoRA); both fold into the weight, so a deployed model
has timm's own structure and costs no extra FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pyra_lightning.dora import DoRALinear
from pyra_lightning.families import family_of
from pyra_lightning.lora import LoRALinear

PYRA_MODULE = "pyra"  # apply_merging puts each block's PYRA modulation at blocks.N.pyra
GROUPS = ("lora", "pyra", "head", "backbone")


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT method.

    Attributes:
        name: What ``apply_lora(..., method=name)`` and ``model.lora.method`` select.
        layer: The layer class; ``layer.from_linear(linear, lora_rank, lora_alpha, lora_dropout)``
            wraps a frozen projection and ``layer.to_linear()`` folds it.
        prefix: Every trainable tensor of the layer is named ``<prefix>...`` (e.g. ``lora_a``).
        group: The parameter group its tensors count in (``ParameterCount`` has ``lora``).
    """

    name: str
    layer: type[nn.Linear]
    prefix: str = "lora_"
    group: str = "lora"


PEFT_METHODS: dict[str, PeftMethod] = {}


def register_peft_method(method: PeftMethod) -> None:
    """Make ``method`` selectable by name; its prefix then groups its parameters."""
    if method.group not in GROUPS:
        raise ValueError(f"PEFT method {method.name!r}: group {method.group!r} is not one of {GROUPS}")
    PEFT_METHODS[method.name] = method


register_peft_method(PeftMethod("lora", LoRALinear))
register_peft_method(PeftMethod("dora", DoRALinear))


def peft_method(name: str) -> PeftMethod:
    """The registered method ``name``; ``ValueError`` naming the registered ones otherwise."""
    if name not in PEFT_METHODS:
        raise ValueError(
            f"peft={name!r} is not registered; expected one of {', '.join(sorted(PEFT_METHODS))}"
        )
    return PEFT_METHODS[name]


def peft_layers() -> tuple[type[nn.Linear], ...]:
    """The layer classes of every registered method (what ``fold_lora`` folds)."""
    return tuple({method.layer: None for method in PEFT_METHODS.values()})


def apply_lora(
    model: nn.Module,
    lora_rank: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    method: str = "lora",
) -> nn.Module:
    """Give every block's attention projections a PEFT layer and freeze everything else (eq. 1).

    One layer per projection at ``lora_rank``; LoRA's trainable numbers per block, with D the
    width, A = heads x head_dim and K = kv heads x head_dim (K = A without grouped-query attention):

    - fused ``qkv`` (ViT, DINOv2, CLIP, DINOv3, PE): ``lora_rank * (D + 3A)``; ViT-B/16 at rank 8:
      8 x (768 + 2304) = 24,576 per block, 294,912 in 12 blocks (Table 1);
    - separate ``q_proj``/``k_proj``/``v_proj`` (EVA-02): ``lora_rank * (3D + A + 2K)``; EVA-02-B at
      rank 8: 8 x (3 x 768 + 3 x 768) = 36,864 per block, 442,368 in 12 blocks; with grouped-query
      attention the k and v updates shrink with K.

    DoRA adds one magnitude per output feature (``3A`` for a fused qkv). Eva's separate
    ``q_bias``/``v_bias`` stay frozen and keep working: the patched attention applies them with
    the layer's ``forward_with_bias``.

    Args:
        model: A model of a registered family (timm ``VisionTransformer``, ``Eva``); changed in
            place and returned.
        lora_rank: Rank of the update (the reference trains rank 8 for ViT-B, 12 for ViT-L).
        lora_alpha: Scale numerator; ``None`` keeps the reference's scaling of 1.
        lora_dropout: Dropout on the update's input (the paper's recipe uses 0.1).
        method: A registered PEFT method: ``"lora"`` or ``"dora"``.
    """
    family = family_of(model)
    layer = peft_method(method).layer
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}")
    for index, block in enumerate(model.blocks):
        for target in family.peft_targets(block.attn):
            if isinstance(getattr(block.attn, target), peft_layers()):
                raise ValueError(f"blocks[{index}].attn.{target} already has LoRA; call fold_lora first")
    for param in model.parameters():
        param.requires_grad_(False)
    family.prepare_peft(model)
    for block in model.blocks:
        for target in family.peft_targets(block.attn):
            adapted = layer.from_linear(getattr(block.attn, target), lora_rank, lora_alpha, lora_dropout)
            setattr(block.attn, target, adapted)
    return model


def fold_lora(model: nn.Module) -> nn.Module:
    """Fold every PEFT layer into a plain ``nn.Linear`` and remove its modules and parameters.

    The result has timm's own state-dict keys (plus merging, if applied) and costs no extra FLOPs.
    Folding a model without PEFT layers, for example twice, changes nothing.
    """
    layers = peft_layers()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, layers):
                setattr(module, child_name, child.to_linear())
    return model


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """The task head(s): ``head``, plus ``head_dist`` for distilled DeiT."""
    heads = model.get_classifier()
    return list(heads) if isinstance(heads, tuple) else [heads]


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to the task head(s)."""
    owned = {id(p) for head in classifier_modules(model) for p in head.parameters()}
    return {name for name, param in model.named_parameters() if id(param) in owned}


def parameter_group(name: str, head_names: set[str]) -> str:
    """Which group a parameter belongs to: a PEFT method's group (by its registered prefix),
    ``pyra`` (inside a block's ``pyra`` module), ``head`` or ``backbone``."""
    path = name.split(".")
    for method in PEFT_METHODS.values():
        if path[-1].startswith(method.prefix):
            return method.group
    if PYRA_MODULE in path[:-1]:
        return "pyra"
    if name in head_names:
        return "head"
    return "backbone"


def mark_trainable(model: nn.Module, head: bool = True) -> dict[str, list[str]]:
    """Train only the PEFT layers, PYRA and (optionally) the head; return the parameter names per group."""
    head_names = head_parameter_names(model)
    groups: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name, param in model.named_parameters():
        group = parameter_group(name, head_names)
        trainable = group in ("lora", "pyra") or (group == "head" and head)
        param.requires_grad_(trainable)
        groups[group].append(name)
    return groups
