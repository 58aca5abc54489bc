"""The backbone families, looked up by model class.

A family is one ``patch_common.Family`` object exported by its ``patch_<family>.py``. A model
belongs to the family registered for the nearest class in its MRO, so timm subclasses (and the
``Merging*`` classes the patch creates) find their family without a line of their own. Adding
a family is one module plus one ``register_family`` line here (or in user code)::

    register_family(MyViT, patch_myvit.FAMILY)
"""

from __future__ import annotations

from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pyra_lightning.patch_common import Family
from pyra_lightning.patch_eva import FAMILY as EVA
from pyra_lightning.patch_vit import FAMILY as VIT
from pyra_lightning.schedules import ViTShape

FAMILIES: dict[type[nn.Module], Family] = {}


def register_family(model_class: type[nn.Module], family: Family) -> None:
    """Patch models of ``model_class`` (and its subclasses without their own entry) with ``family``."""
    FAMILIES[model_class] = family


register_family(VisionTransformer, VIT)
register_family(Eva, EVA)


def model_name(model: nn.Module) -> str:
    """The class and, when timm recorded it, the architecture: ``"VisionTransformer (vit_base_...)"``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__}" + (f" ({arch})" if arch else "")


def find_family(model: nn.Module) -> Family | None:
    """The family registered for the nearest class in ``type(model).__mro__``, or ``None``."""
    return next((FAMILIES[cls] for cls in type(model).__mro__ if cls in FAMILIES), None)


def family_of(model: nn.Module) -> Family:
    """The model's family, its structure checked; ``ValueError`` naming the model and the reason."""
    name = model_name(model)
    family = find_family(model)
    if family is not None:
        family.check(name, model)
        return family
    if any(hasattr(m, "relative_position_bias_table") for m in model.modules()):
        raise ValueError(
            f"{name} uses a relative position bias (BEiT-style), a table indexed by fixed token "
            "positions that merged tokens no longer have; token merging supports timm's "
            "VisionTransformer and Eva models"
        )
    known = ", ".join(sorted(cls.__name__ for cls in FAMILIES))
    raise ValueError(
        f"{name} is not a timm VisionTransformer or Eva; pyra-lightning patches timm "
        "ViT/DeiT/DINOv2/CLIP/SigLIP (VisionTransformer) and EVA-02/DINOv3/PE/RoPE-ViT (Eva) models "
        f"(registered families: {known})"
    )


def check_model(model: nn.Module) -> None:
    """Assert the structure the patch relies on; raise ``ValueError`` naming the model and the reason."""
    family_of(model)


def model_shape(model: nn.Module) -> ViTShape:
    """Depth, widths, token counts and per-token costs at the configured input size (for schedules)."""
    family = find_family(model)
    if family is None:
        family = family_of(model)  # raises, naming the model
    return family.shape(model)
