"""Load checkpoints written by the reference implementation (github.com/THU-MIG/PYRA).

Its ``train.py`` saves ``{'model': state_dict, 'optimizer': ..., 'args': Namespace, ...}``. The
state dict holds timm's ViT keys plus, per block:

====================================  ==============  ==================================
reference key                         shape           here
====================================  ==============  ==================================
``blocks.N.attn.LoRA_a.weight``       (rank, D)       ``blocks.N.attn.qkv.lora_a``
``blocks.N.attn.LoRA_b.weight``       (3D, rank)      ``blocks.N.attn.qkv.lora_b``
``blocks.N.pyra_a``                   (merge_r, 1)    ``blocks.N.pyra.weight_r`` (W_r)
``blocks.N.pyra_b``                   (1, D)          ``blocks.N.pyra.weight_d`` (W_D)
``blocks.N.pyra_norm.weight``/bias    (D,)            ``blocks.N.pyra.norm.weight``/bias
====================================  ==============  ==================================

The reference scales LoRA by 1, uses proportional attention, and averages DeiT's two heads at
inference; the model returned here does the same.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch

from pyra_lightning.modulation import Variant
from pyra_lightning.patch import apply_lora, apply_merging
from pyra_lightning.schedules import MergeSpec

# Reference model names -> the timm architecture with the same layers and keys.
REFERENCE_MODELS: dict[str, str] = {
    "vit_base_patch16_224_in21k": "vit_base_patch16_224",
    "vit_large_patch16_224_in21k": "vit_large_patch16_224",
    "vit_small_patch16_224_in21k": "vit_small_patch16_224",
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224",
}

_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(blocks\.\d+)\.attn\.LoRA_a\.weight$"), r"\1.attn.qkv.lora_a"),
    (re.compile(r"^(blocks\.\d+)\.attn\.LoRA_b\.weight$"), r"\1.attn.qkv.lora_b"),
    (re.compile(r"^(blocks\.\d+)\.pyra_a$"), r"\1.pyra.weight_r"),
    (re.compile(r"^(blocks\.\d+)\.pyra_b$"), r"\1.pyra.weight_d"),
    (re.compile(r"^(blocks\.\d+)\.pyra_norm\.(weight|bias)$"), r"\1.pyra.norm.\2"),
)


def reference_key_to_ours(key: str) -> str:
    """Map one reference state-dict key to this package's name (timm keys map to themselves)."""
    key = key.removeprefix("module.")
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def _load(checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(checkpoint, Mapping):
        blob, where = checkpoint, "<in-memory checkpoint>"
    else:
        where = os.fspath(checkpoint)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"reference checkpoint {where!r} does not exist")
        # train.py pickles its argparse Namespace beside the weights; allow exactly that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                blob = torch.load(where, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - re-raised with the file named
                raise ValueError(f"{where}: cannot be read as a reference checkpoint ({error})") from error
    if not isinstance(blob, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(blob).__name__}")
    state = blob.get("model", blob.get("state_dict", blob))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected the key 'model' to hold a state dict of tensors")
    return {reference_key_to_ours(k): v for k, v in state.items()}, where


def import_reference(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    model_name: str,
    merge_r: MergeSpec,
    pyra: bool | Variant = True,
    model_kwargs: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Build the timm model a reference checkpoint was trained as, and load its weights.

    Args:
        checkpoint: Path to ``checkpoint.pth`` from the reference ``train.py``, or its loaded dict.
        model_name: The reference's model name (see ``REFERENCE_MODELS``); any timm ViT name is
            accepted too, for models the reference builds the same way.
        merge_r: The merge schedule it was trained with (``"low"``, ``"high"`` or any form
            ``apply_merging`` takes); PYRA weight shapes are checked against it.
        pyra: Whether it was trained with PYRA (``False`` for the ToMe baseline).
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``img_size``).

    Returns:
        The model in eval mode, LoRA not folded (call ``fold_lora`` for deployment).

    Raises:
        ValueError: for a checkpoint with missing, unexpected or misshaped keys.
    """
    state, where = _load(checkpoint)
    timm_name = REFERENCE_MODELS.get(model_name, model_name)
    if "head.weight" not in state:
        raise ValueError(f"{where}: missing key 'head.weight', needed to size the task head")
    lora_key = "blocks.0.attn.qkv.lora_a"
    if lora_key not in state:
        raise ValueError(f"{where}: missing key 'blocks.0.attn.LoRA_a.weight'; was it trained with LoRA?")
    num_classes = state["head.weight"].shape[0]
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
    apply_lora(model, lora_rank=state[lora_key].shape[0])
    apply_merging(model, merge_r, pyra=pyra, prop_attn=True)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("misshaped", misshaped),
        ):
            if items:
                shown = ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
                problems.append(f"{label}: {shown}")
        raise ValueError(
            f"{where} does not fit {model_name} (timm {timm_name}) with merge_r={merge_r!r}, "
            f"pyra={pyra!r}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
