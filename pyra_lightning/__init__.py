"""pyra-lightning: training-inference efficient task adaptation of Vision Transformers.

LoRA for cheap training, token merging with PYRA token modulation (Xiong et al., ECCV 2024)
for fast inference, on timm ViTs and PyTorch Lightning.

The public names are imported on first use (PEP 562), so ``import pyra_lightning`` and the
command line's ``--help`` stay fast; ``from pyra_lightning import apply_lora`` works as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyra_lightning._lazy import lazy_exports

if TYPE_CHECKING:
    from pyra_lightning.accounting import ParameterCount, count_flops, count_parameters
    from pyra_lightning.deploy import ExportedModel, load_exported, to_onnx
    from pyra_lightning.families import register_family
    from pyra_lightning.inference import InferenceModel, compile_for_inference
    from pyra_lightning.interop import import_reference
    from pyra_lightning.kernels.attention import register_attention
    from pyra_lightning.merge_rules import register_matcher, register_merger
    from pyra_lightning.patch import (
        TokenState,
        apply_lora,
        apply_merging,
        fold_lora,
        mark_trainable,
        set_merge_rule,
    )
    from pyra_lightning.peft import register_peft_method

_EXPORTS: dict[str, str] = {
    "ParameterCount": "pyra_lightning.accounting",
    "count_flops": "pyra_lightning.accounting",
    "count_parameters": "pyra_lightning.accounting",
    "import_reference": "pyra_lightning.interop",
    "InferenceModel": "pyra_lightning.inference",
    "compile_for_inference": "pyra_lightning.inference",
    "ExportedModel": "pyra_lightning.deploy",
    "load_exported": "pyra_lightning.deploy",
    "to_onnx": "pyra_lightning.deploy",
    "TokenState": "pyra_lightning.patch",
    "apply_lora": "pyra_lightning.patch",
    "apply_merging": "pyra_lightning.patch",
    "fold_lora": "pyra_lightning.patch",
    "mark_trainable": "pyra_lightning.patch",
    "set_merge_rule": "pyra_lightning.patch",
    "register_attention": "pyra_lightning.kernels.attention",
    "register_family": "pyra_lightning.families",
    "register_matcher": "pyra_lightning.merge_rules",
    "register_merger": "pyra_lightning.merge_rules",
    "register_peft_method": "pyra_lightning.peft",
}

__all__ = [
    "ExportedModel",
    "InferenceModel",
    "ParameterCount",
    "TokenState",
    "apply_lora",
    "apply_merging",
    "compile_for_inference",
    "count_flops",
    "count_parameters",
    "fold_lora",
    "import_reference",
    "load_exported",
    "mark_trainable",
    "register_attention",
    "register_family",
    "register_matcher",
    "register_merger",
    "register_peft_method",
    "set_merge_rule",
    "to_onnx",
]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
