"""What the data pipeline takes from the backbone: input size and normalization statistics.

A timm backbone declares both in its ``pretrained_cfg`` (``input_size``, ``mean``, ``std``). The
data module uses them unless they are set explicitly, so DINOv2/v3 get ImageNet statistics,
SigLIP and PE 0.5/0.5, CLIP and EVA-02 OpenAI CLIP's, without a config having to know.
"""

from collections.abc import Sequence
from typing import Literal

from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from timm.models import get_pretrained_cfg

from pyra_lightning.backbone import check_model_name

Normalization = Literal["imagenet", "inception", "openai_clip"]

NORMALIZATION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),  # also SigLIP, PE
    "openai_clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),  # CLIP, EVA-02
}
DEFAULT_IMG_SIZE = 224  # without a backbone to ask


def backbone_data_config(backbone: str) -> tuple[int, Normalization]:
    """Default input size and normalization of a timm backbone, from its ``pretrained_cfg``.

    ``backbone`` is a timm name with or without a pretrained tag (``vit_base_patch16_dinov3.lvd1689m``);
    without one, timm's default tag is read. EVA-02 and CLIP declare OpenAI CLIP statistics,
    SigLIP and PE 0.5/0.5 (``inception``), DINOv2/v3 ImageNet's.

    Raises:
        ValueError: for a name timm does not know (naming the closest it knows), or statistics none
            of ``NORMALIZATION_STATS`` match.
    """
    check_model_name(backbone)  # a typo is named as one, before its missing config is
    cfg = get_pretrained_cfg(backbone)
    if cfg is None:
        raise ValueError(
            f"backbone {backbone!r}: timm has no pretrained config for it; set data.normalization"
        )
    for name, (mean, std) in NORMALIZATION_STATS.items():
        if _same(cfg.mean, mean) and _same(cfg.std, std):
            return int(cfg.input_size[-1]), name  # type: ignore[return-value]
    raise ValueError(
        f"backbone {backbone!r} declares mean {cfg.mean} / std {cfg.std}, which none of "
        f"{list(NORMALIZATION_STATS)} match; set data.normalization explicitly"
    )


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))


def resolve_img_size(img_size: int | None, backbone: str | None) -> int:
    """``img_size`` if set, else the backbone's default input size, else 224 (for the CLI's link)."""
    if img_size is not None:
        return img_size
    return backbone_data_config(backbone)[0] if backbone else DEFAULT_IMG_SIZE
