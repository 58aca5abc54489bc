"""Proportional attention (ToMe §3; PYRA keeps it) through FlexAttention's ``score_mod``.

Proportional attention adds ``log(size_j)`` to every logit over key j, so a merged token weighs
as much as the patches it stands for. Through SDPA it is an additive (B, 1, 1, N) mask
(``patch_vit.size_bias``); flash attention refuses any mask, so on Hopper SDPA runs it on
cuDNN's kernel or the memory-efficient one (which pads the mask's last axis to a multiple of
8/16 and expands it). FlexAttention instead compiles the bias into the kernel as a
``score_mod``: nothing is materialised, the bias is one load per key.

``flex_proportional_attention`` is a drop-in for
``F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size))`` at inference. Eager
FlexAttention runs a reference implementation (fine for tests, slow); wrap the model in
``torch.compile`` (or ``compile_for_inference(..., engine="inductor")``) for the fused kernel.
"""

from __future__ import annotations

import torch


def flex_proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention with ``log(size)`` added over keys: (B, H, N, d) x3, size (B, N, 1) -> (B, H, N, d).

    Args:
        q: Queries, (B, H, N, d).
        k: Keys, (B, H, N, d).
        v: Values, (B, H, N, d).
        size: Patches per token, (B, N, 1) (``TokenState.size``); ``None``: plain attention.
        scale: Logit scale; ``None`` is SDPA's ``d ** -0.5``.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if size is None:
        return flex_attention(q, k, v, scale=scale)
    log_size = size.reshape(size.shape[0], size.shape[1]).log().to(q.dtype)  # (B, N)

    def score_mod(
        score: torch.Tensor,
        batch: torch.Tensor,
        head: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
    ) -> torch.Tensor:
        return score + log_size[batch, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
