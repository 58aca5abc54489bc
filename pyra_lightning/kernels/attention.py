"""Proportional attention (ToMe §3; PYRA keeps it) on a choice of kernels: the ``ATTENTIONS`` table.

Proportional attention adds ``log(size_j)`` to every logit over key j, so a merged token weighs
as much as the patches it stands for. The patched attentions (``patch_vit``, ``patch_eva``) call
``ATTENTIONS[self.attention](q, k, v, size, dropout_p)``; the name is set by
``apply_merging(..., attention=...)`` (``model.merging.attention`` in a config):

- ``"sdpa"`` (the default): ``F.scaled_dot_product_attention`` with the additive (B, 1, 1, N)
  mask ``patch_common.size_bias``. Flash attention refuses any mask, so with one SDPA runs on
  cuDNN's kernel or the memory-efficient one (which pads the mask's last axis to a multiple of
  8/16 and expands it); without sizes (the first block, ``prop_attn=False``) it may use flash.
- ``"flex"``: FlexAttention with the bias as a ``score_mod``: nothing is materialised, the bias
  is one load per key. Eager FlexAttention runs an unfused reference implementation (fine for
  tests, slow); under ``torch.compile`` (``compile_for_inference(..., engine="inductor")``) it
  is one generated kernel. It has no attention dropout, and ONNX has no operator for it.
- ``"triton"``: a flash-attention forward in Triton that reads ``size`` per block of keys
  (``kernels.proportional``); inference on CUDA only, SDPA with the mask everywhere else
  (training, exports, CPU), so it trains, exports and runs anywhere ``"sdpa"`` does.
- ``"sdpa_channel"``: SDPA with no mask at all: ``log(size)`` rides in one more channel of the
  keys, against a channel of ones in the queries (``channel_proportional_attention``). Without a
  mask SDPA may pick flash attention, forward and backward, so this is the fast candidate for
  training steps, where the Triton kernel (forward only) hands over to the masked SDPA.

Which is faster on a given GPU is measured, not assumed (``scripts/gpu_check.sh``'s ``speed``
part times both); both compute the same function. Another kernel is one function and one
``register_attention`` line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pyra_lightning.kernels.proportional import triton_proportional_attention
from pyra_lightning.merge import constant
from pyra_lightning.patch_common import size_bias

# (q, k, v) (B, H, N, d) each, size (B, N, 1) or None, dropout probability -> (B, H, N, d)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


def flex_proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with ``log(size)`` added over keys, on FlexAttention (a ``score_mod``).

    A drop-in for ``F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size))``; the
    ``"flex"`` entry of ``ATTENTIONS``.

    Args:
        q: Queries, (B, H, N, d).
        k: Keys, (B, H, N, d).
        v: Values, (B, H, N, d).
        size: Patches per token, (B, N, 1) (``TokenState.size``); ``None``: plain attention.
        dropout_p: Attention dropout; FlexAttention has none, so anything above 0 is refused.
        scale: Logit scale; ``None`` is SDPA's ``d ** -0.5``.

    Returns:
        (B, H, N, d).

    Raises:
        ValueError: for ``dropout_p > 0``, and where autograd must record it on a CPU
            (FlexAttention has no backward there).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if dropout_p > 0:
        raise ValueError(
            f"attention='flex' has no attention dropout (attn_drop_rate {dropout_p} in training); "
            "train with attention='sdpa' (the same function) or attn_drop_rate=0"
        )
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and q.device.type == "cpu":
        raise ValueError(
            "attention='flex' cannot train on a CPU: FlexAttention has no backward there; train with "
            "attention='sdpa' (the same function) and deploy with 'flex' on a GPU (for inference, "
            "call the model under torch.no_grad() or torch.inference_mode(): its trainable "
            "parameters make autograd record it otherwise)"
        )
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


def sdpa_proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """SDPA with the ``log(size)`` mask over keys (``size_bias``); the ``"sdpa"`` entry of ``ATTENTIONS``.

    Args:
        q: Queries, (B, H, N, d).
        k: Keys, (B, H, N, d).
        v: Values, (B, H, N, d).
        size: Patches per token, (B, N, 1); ``None``: timm's own unmasked call.
        dropout_p: Attention dropout (training).

    Returns:
        (B, H, N, d).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size, q.dtype), dropout_p=dropout_p)


# Channels the widened heads of ``channel_proportional_attention`` are rounded up to: flash
# attention and the memory-efficient kernel take head widths that are multiples of 8.
CHANNEL_ALIGN = 8


def channel_proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Proportional attention as SDPA with no mask: ``log(size)`` as one more channel of the keys.

    With the scale ``s = d^-1/2`` the logit of query i and key j is ``s q_i·k_j + log(size_j)``.
    Widening each head to ``q' = [q, 1]`` and ``k' = [k, log(size_j) / s]`` gives
    ``s q'_i·k'_j`` = the same logit, so SDPA computes proportional attention unmasked, and
    unmasked it may run flash attention, forward and backward; the masked call cannot
    (``sdpa_proportional_attention``). The width is rounded up to ``CHANNEL_ALIGN``: the spare
    channels hold ``[1, 0, ..., 0]`` in the queries and ``[log(size_j) / s, 0, ..., 0]`` in the
    keys, so they add the bias exactly (and a size of 0 masks its key, as the mask's ``-inf``
    does). Flash attention wants one width for q, k and v, so v gets spare channels too; their
    outputs are sliced off and their gradients dropped. The widening is ``torch.cat``, whose
    backward is views; the cost is three copies of q, k and v forward, the output slice's
    backward, and the spare channels' arithmetic (72 instead of 64 for ViT-B/16's heads).

    Rounding: ``log(size) / s`` is computed in fp32 (fp64 for fp64 sizes) and rounded once to
    k's dtype; the mask rounds ``log(size)`` to q's. For a power-of-4 ``d`` (64: ``/ s`` is
    ``* 8``) the two biases are the same numbers.

    Args:
        q: Queries, (B, H, N, d).
        k: Keys, (B, H, N, d).
        v: Values, (B, H, N, d).
        size: Patches per token, (B, N, 1); ``None``: timm's own unmasked call.
        dropout_p: Attention dropout (training; flash attention has it too).

    Returns:
        (B, H, N, d).
    """
    if size is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    batch, heads, num_tokens, head_dim = q.shape
    scale = head_dim**-0.5
    spare = CHANNEL_ALIGN - head_dim % CHANNEL_ALIGN  # 1..CHANNEL_ALIGN: at least the bias channel
    wide = (batch, heads, num_tokens, spare)

    def first(dtype: torch.dtype) -> torch.Tensor:  # (spare,): [1, 0, ..., 0]
        key = ("channel_attention", spare, dtype)
        return constant(key, q, lambda: F.pad(torch.ones(1, dtype=dtype, device=q.device), (0, spare - 1)))

    # log(size_j) / s in one fp32 (or fp64) operator, rounded once to k's dtype: (B, 1, N, 1)
    sizes = size.float() if size.dtype in (torch.float16, torch.bfloat16) else size  # a model held in bf16
    bias = torch.special.xlogy(1.0 / scale, sizes.reshape(size.shape[0], 1, num_tokens, 1))
    bias = bias if bias.dtype == k.dtype else bias.to(k.dtype)
    wide_q = torch.cat([q, first(q.dtype).expand(wide)], dim=-1)  # (B, H, N, d + spare)
    # [k, bias, 0, ..., 0] in one cat, the zeros being the tail of [1, 0, ..., 0]
    keys = [k, bias.expand(batch, heads, num_tokens, 1)]
    if spare > 1:
        keys.append(first(k.dtype)[1:].expand(batch, heads, num_tokens, spare - 1))
    wide_k = torch.cat(keys, dim=-1)
    # v's dtype of its own (under autocast a q/k norm leaves q and k fp32 and v bf16); any
    # values do, as their outputs are sliced off
    wide_v = torch.cat([v, first(v.dtype).expand(wide)], dim=-1)
    out = F.scaled_dot_product_attention(wide_q, wide_k, wide_v, dropout_p=dropout_p, scale=scale)
    return out[..., :head_dim]


ATTENTIONS: dict[str, Attention] = {
    "sdpa": sdpa_proportional_attention,
    "flex": flex_proportional_attention,
    "triton": triton_proportional_attention,
    "sdpa_channel": channel_proportional_attention,
}


def register_attention(name: str, fn: Attention) -> None:
    """Make ``apply_merging(..., attention=name)`` attend with ``fn``.

    Args:
        name: What configs call it (``model.merging.attention``).
        fn: ``fn(q, k, v, size, dropout_p)`` with the semantics of ``sdpa_proportional_attention``.
    """
    ATTENTIONS[name] = fn


def check_attention(name: str) -> str:
    """``name``, if it is registered.

    Raises:
        ValueError: naming the registered kernels, for any other name.
    """
    if name not in ATTENTIONS:
        raise ValueError(
            f"attention={name!r} is not registered; expected one of {', '.join(sorted(ATTENTIONS))}"
        )
    return name
