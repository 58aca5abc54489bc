"""pyra-lightning: training-inference efficient task adaptation of Vision Transformers.

LoRA for cheap training, token merging with PYRA token modulation (Xiong et al., ECCV 2024)
for fast inference, on timm ViTs and PyTorch Lightning.
"""

from pyra_lightning.accounting import ParameterCount, count_flops, count_parameters
from pyra_lightning.interop import import_reference
from pyra_lightning.patch import TokenState, apply_lora, apply_merging, fold_lora, mark_trainable

__all__ = [
    "ParameterCount",
    "TokenState",
    "apply_lora",
    "apply_merging",
    "count_flops",
    "count_parameters",
    "fold_lora",
    "import_reference",
    "mark_trainable",
]
__version__ = "0.1.0"
