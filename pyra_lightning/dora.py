"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024), a variant of ``LoRALinear``.

DoRA splits the adapted weight into a direction and a magnitude (DoRA paper, eq. 5)::

    W' = m ⊙ (W0 + s·B A) / ||W0 + s·B A||_c

with ``||·||_c`` the norm of each output feature's weight vector (the paper's column-wise norm:
it writes W as d x k with one column per output; timm's ``nn.Linear`` stores it as (out, in),
so here it is the norm over ``in`` of each row), ``s = lora_alpha / lora_rank`` and the
magnitude ``m`` (out_features,) trained beside A and B. ``m`` starts at ``||W0 + s·B A||_c``,
which is ``||W0||_c`` with B = 0, so the adapted layer starts as the pretrained one.

As in the paper (§4.3) and peft, the norm is treated as a constant in the backward pass
(``detach``), which saves memory and changes no forward output. Since ``W'`` is a plain matrix,
``to_linear`` folds it into an ``nn.Linear`` exactly as LoRA folds (up to rounding).

Worked numbers for ViT-B/16 at rank 8 (fused qkv): LoRA's 24,576 per block plus the magnitude's
2,304, 322,560 in 12 blocks. The magnitude is named ``lora_magnitude`` so that it shares LoRA's
registered prefix and parameter group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pyra_lightning.lora import LoRAInit, LoRALinear


class DoRALinear(LoRALinear):
    """``y = m / ||W0 + s·B A||_c ⊙ (x W0ᵀ + s · dropout(x) Aᵀ Bᵀ) + b`` (DoRA paper, eq. 5).

    Args: as ``LoRALinear``; the magnitude ``lora_magnitude`` has ``out_features`` entries.
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
        super().__init__(
            in_features, out_features, bias, lora_rank, lora_alpha, lora_dropout, device=device, dtype=dtype
        )
        self.lora_magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_magnitude()

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s·B A||_c``: one norm per output feature, (out_features,)."""
        return self.folded_lora_weight().norm(p=2, dim=1)

    def folded_lora_weight(self) -> torch.Tensor:
        """``W0 + s·B A`` in float32: the direction DoRA normalises."""
        return super().folded_weight()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ||W0 + s·B A||_c``, so that the layer computes ``W0 + s·B A`` (``W0`` when B = 0)."""
        self.lora_magnitude.copy_(self.weight_norm().to(self.lora_magnitude.dtype))

    def base_weight_changed(self) -> None:
        self.reset_magnitude()

    @torch.no_grad()
    def reset_lora_parameters(self, init: LoRAInit = "kaiming") -> None:
        """LoRA's initialisation of A and B (see ``LoRALinear``), then the magnitude from the result."""
        super().reset_lora_parameters(init)
        if hasattr(self, "lora_magnitude"):  # not yet during LoRALinear.__init__
            self.reset_magnitude()

    def forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = self.lora_magnitude / self.weight_norm().detach().to(self.lora_magnitude.dtype)  # (out,)
        out = F.linear(x, self.weight) + self.lora_update(x)  # (B, N, out_features)
        out = out * scale.to(out.dtype)
        return out if bias is None else out + bias

    def folded_weight(self) -> torch.Tensor:
        """``m ⊙ (W0 + s·B A) / ||W0 + s·B A||_c`` in float32, the weight ``to_linear`` writes."""
        direction = self.folded_lora_weight()  # (out, in)
        norm = direction.norm(p=2, dim=1, keepdim=True)
        return self.lora_magnitude.to(torch.float32)[:, None] * direction / norm
