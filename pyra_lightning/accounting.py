"""Parameter and FLOPs accounting, as reported in the paper's Table 1 and results tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pyra_lightning.patch import head_parameter_names, parameter_group


@dataclass(frozen=True)
class ParameterCount:
    """Trainable parameters by group and the model total.

    ``trainable_pct`` is the trainable share of all parameters in percent, the "# params" column
    of Tables 2-5 (e.g. 0.29M LoRA parameters are 0.34% of ViT-B/16's 86M).
    """

    lora: int
    pyra: int
    head: int
    other_trainable: int
    trainable: int
    total: int

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "trainable_pct": self.trainable_pct}


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable parameters per group (by name), plus the total of all parameters."""
    head_names = head_parameter_names(model) if hasattr(model, "get_classifier") else set()
    counts = {"lora": 0, "pyra": 0, "head": 0, "backbone": 0}
    total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            counts[parameter_group(name, head_names)] += param.numel()
    trainable = sum(counts.values())
    return ParameterCount(
        lora=counts["lora"],
        pyra=counts["pyra"],
        head=counts["head"],
        other_trainable=counts["backbone"],
        trainable=trainable,
        total=total,
    )


def count_flops(model: nn.Module, img_size: int | tuple[int, int] | None = None, in_chans: int = 3) -> int:
    """FLOPs of one image's inference forward, counted by ``torch.utils.flop_counter``.

    Counted on the model's own device and dtype in eval mode, with gradients off; the count is
    of matmul-like operators, 2 FLOPs per multiply-add. ViT-B/16 at 224 px counts 35.13e9 here.
    The paper's Table 1 prints 16.37 "GFLOPs" for it: the reference counts multiply-adds with
    fvcore and divides by 2**30 (17.57e9 / 2**30 = 16.37), the same quantity in other units.
    Ratios (merged / unmerged) are identical under both conventions.
    """
    if img_size is None:
        img_size = model.patch_embed.img_size  # type: ignore[union-attr]
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, height, width, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
