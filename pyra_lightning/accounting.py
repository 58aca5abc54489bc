"""Parameter and FLOPs accounting, as reported in the paper's Table 1 and results tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from pyra_lightning.merge_rules import build_matcher, build_merger
from pyra_lightning.peft import head_parameter_names, parameter_group


@dataclass(frozen=True)
class ParameterCount:
    """Trainable parameters by group and the model total.

    Groups come from ``peft.parameter_group``: ``lora`` holds every registered PEFT method's
    tensors (by their registered prefix: LoRA's A and B, DoRA's magnitude too), ``pyra`` the
    modulation's, ``head`` the task head(s), ``other_trainable`` anything else left trainable.

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


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _missing_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the CPU attention kernels that ``torch.utils.flop_counter`` leaves out.

    On CPU, ``scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu``,
    which recent torch releases (2.14 included) count as zero FLOPs: ViT-B/16 then counts 33.70
    GFLOPs instead of 35.13, and every merged/unmerged ratio shifts with the installed torch. The
    formulas are torch's own ones for the GPU kernels (two matmuls, ``q kᵀ`` and ``attn v``), given
    only for the operators a torch build has and does not count already.
    """
    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_sdpa_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_sdpa_backward_flops,
    }
    mapping: dict[Any, Any] = {}
    for name, formula in formulas.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and packet not in flop_counter.flop_registry:
            mapping[packet] = formula
    return mapping


def flop_counter_mode() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts attention on CPU, whatever the torch version."""
    return FlopCounterMode(display=False, custom_mapping=_missing_attention_formulas())


def count_flops(model: nn.Module, img_size: int | tuple[int, int] | None = None, in_chans: int = 3) -> int:
    """FLOPs of one image's inference forward, counted by ``torch.utils.flop_counter``.

    Counted on the model's own device and dtype in eval mode, with gradients off; the count is
    of matmul-like operators (attention included, on every device: ``flop_counter_mode``),
    2 FLOPs per multiply-add. ViT-B/16 at 224 px counts 35.13e9 here.
    The paper's Table 1 prints 16.37 "GFLOPs" for it: the reference counts multiply-adds with
    fvcore and divides by 2**30 (17.57e9 / 2**30 = 16.37), the same quantity in other units.
    Ratios (merged / unmerged) are identical under both conventions.

    The parameters stop requiring grad for the count (and are restored after): under ``no_grad``
    a view of a parameter passed into a submodule, as SigLIP's attention pool does with
    ``latent.expand(B, -1, -1)``, still requires grad but has no ``grad_fn``, and the counter's
    module tracker fails on it ("Expected gradient function to be set"). An inference forward
    needs no gradients; training FLOPs (``training.monitoring``) are counted with grad on, where
    such views have their ``grad_fn``. A model attending with another kernel than SDPA
    (``attention="flex"``) is counted as SDPA, which computes the same products, and a merge rule
    that launches its own kernels (the ``triton`` matcher and merger) as the torch rule it names
    in ``counted_as``: the counter sees ATen operators only, and a CUDA model's Triton matcher
    would otherwise drop its (B, Na, Nb) score products from the count.
    """
    if img_size is None:
        img_size = model.patch_embed.img_size  # type: ignore[union-attr]
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, height, width, device=param.device, dtype=param.dtype)
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    # FlexAttention cannot run under the counter; it computes SDPA's products, so count those.
    flex = {
        m: m.attention
        for m in model.modules()
        if isinstance(getattr(m, "attention", None), str) and m.attention != "sdpa"
    }
    # (block, "matcher" | "merger", the rule it holds) for each rule counted as a torch rule
    kernels = [
        (block, part, getattr(block, part))
        for block in model.modules()
        for part in ("matcher", "merger")
        if getattr(getattr(block, part, None), "counted_as", None)
    ]
    model.eval()
    try:
        for p in trainable:
            p.requires_grad_(False)
        for module in flex:
            module.attention = "sdpa"
        for block, part, rule in kernels:
            build = build_matcher if part == "matcher" else build_merger
            setattr(block, part, build(rule.counted_as))
        with torch.no_grad(), flop_counter_mode() as counter:
            model(x)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for module, name in flex.items():
            module.attention = name
        for block, part, rule in kernels:
            setattr(block, part, rule)
        model.train(was_training)
    return int(counter.get_total_flops())
