"""LoRA on the attention's projections (Hu et al. 2021; PYRA paper eq. 1).

``LoRALinear`` subclasses ``nn.Linear`` so that the frozen weight and bias keep timm's checkpoint
keys (``blocks.N.attn.qkv.weight``); the low-rank factors sit beside them as
``blocks.N.attn.qkv.lora_a`` / ``lora_b``. The same layer adapts each of the separate
``q_proj``/``k_proj``/``v_proj`` projections of EVA-02-style attention, grouped-query attention
included (the k and v projections are then narrower, and so are their ``lora_b``).

Worked shapes for ViT-B/16 at rank 8 (fused qkv): ``weight`` (2304, 768), ``lora_a`` (8, 768),
``lora_b`` (2304, 8): 24,576 trainable numbers per block, 294,912 (0.29M) in 12 blocks (Table 1).
EVA-02-B at rank 8 (separate q/k/v): three ``lora_a`` (8, 768) and three ``lora_b`` (768, 8):
36,864 per block, 442,368 in 12 blocks. ``fold_lora`` folds each into its own weight.

The layer contract every PEFT method of ``peft.py`` follows (DoRA in ``dora.py`` is a variant of
this layer): an ``nn.Linear`` subclass with ``from_linear`` (wrap a frozen projection, sharing its
tensors), ``forward_with_bias`` (the same output with another bias, for Eva's q/k/v biases),
``to_linear`` (fold into a plain ``nn.Linear``) and trainable tensors whose names start with the
method's registered prefix (``lora_``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

LoRAInit = Literal["kaiming", "reference"]


class LoRALinear(nn.Linear):
    """``y = x W0ᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`` with ``scaling = lora_alpha / lora_rank``.

    ``B`` starts at zero so the adapted layer starts as the pretrained one. ``A`` uses
    nn.Linear's kaiming-uniform init. ``reset_lora_parameters("reference")`` starts both as the
    reference implementation's training does instead. With ``lora_alpha=None`` the scaling is 1,
    which is what the reference implementation trains with.

    Args:
        in_features: Input width D.
        out_features: Output width (3 x attention width for a fused qkv).
        bias: Whether the frozen projection has a bias.
        lora_rank: Rank of the update.
        lora_alpha: Scale numerator; ``None`` means scaling = 1.
        lora_dropout: Dropout on the LoRA branch's input only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if lora_rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer, got {lora_rank}")
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.scaling = 1.0 if lora_alpha is None else lora_alpha / lora_rank
        self.lora_a = nn.Parameter(torch.empty(lora_rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, lora_rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters("kaiming")

    @torch.no_grad()
    def reset_lora_parameters(self, init: LoRAInit = "kaiming") -> None:
        """Initialise ``lora_a`` and ``lora_b``.

        Args:
            init: ``"kaiming"``: A kaiming-uniform (nn.Linear's init), B = 0, so B·A = 0 and the
                adapted layer starts as the pretrained one (Hu et al. 2021). ``"reference"``: A and B
                both ``trunc_normal(std=0.02)``, which is where the reference implementation's
                training starts: it builds ``LoRA_b`` at zero, but its ViT's ``init_weights`` then
                re-initialises every ``nn.Linear``, ``LoRA_a`` and ``LoRA_b`` included, so B·A != 0
                at step 0.
        """
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b)
        elif init == "reference":
            trunc_normal_(self.lora_a, std=0.02)
            trunc_normal_(self.lora_b, std=0.02)
        else:
            raise ValueError(f"lora_init must be 'kaiming' or 'reference', got {init!r}")

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, lora_rank: int, lora_alpha: float | None = None, lora_dropout: float = 0.0
    ) -> LoRALinear:
        """Wrap an existing projection, sharing (not copying) its weight and bias tensors."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.base_weight_changed()
        return layer

    def base_weight_changed(self) -> None:
        """Called once the frozen weight is the wrapped projection's; variants derive state from it."""

    def delta_weight(self) -> torch.Tensor:
        """The folded update ``scaling · B A``, (out_features, in_features)."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank branch alone, ``scaling · dropout(x) Aᵀ Bᵀ`` (for callers that apply W0 themselves)."""
        update = (self.lora_dropout(x) @ self.lora_a.transpose(0, 1)) @ self.lora_b.transpose(0, 1)
        return update * self.scaling

    def forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W0ᵀ + bias`` plus the update: the layer with another bias (Eva's ``q_bias``/``v_bias``)."""
        out = F.linear(x, self.weight, bias)  # (B, N, out_features)
        return out + self.lora_update(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_bias(x, self.bias)

    def folded_weight(self) -> torch.Tensor:
        """``W0 + scaling · B A`` in float32, the weight ``to_linear`` writes."""
        return self.weight.to(torch.float32) + self.delta_weight().to(torch.float32)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``folded_weight()`` (exact up to rounding)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.folded_weight().to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_rank}, scaling={self.scaling:g}"


def init_lora_(model: nn.Module, init: LoRAInit) -> int:
    """Re-initialise every LoRA layer of ``model`` (any module with ``reset_lora_parameters``).

    Returns the number of layers initialised, so a caller can tell a model without LoRA.
    """
    layers = [module for module in model.modules() if hasattr(module, "reset_lora_parameters")]
    for layer in layers:
        layer.reset_lora_parameters(init)
    return len(layers)
