"""The merge kernels with the block's next LayerNorm in their epilogue (``merge_kernel``'s ``NORM``).

After the merge a ViT block normalises the merged tokens for its MLP (``norm2``), and under
autocast the MLP's first linear then casts that fp32 norm to bf16: two more kernels per merging
layer, the first reading the merged (B, N - merge_r, C) tokens back and writing them in fp32, the
second reading those and writing bf16. Here ``merge_kernel`` holds whole rows
(``merging.merge_blocks(norm=True)``) and writes, next to the merged tokens (the residual
stream), their LayerNorm straight in the dtype the MLP reads.

The norm is of the merged tokens as stored (rounded to their dtype), in fp32 with the biased
variance, as torch's ``layer_norm``; equal to ``norm2(x)`` up to the order of its sums. It is
fused only where its result is known to be what the block would compute:

- ``norm`` is a plain ``nn.LayerNorm`` (or timm's ``LayerNorm`` without ``fast_norm``, which
  normalises in low precision) over the channels, with an affine weight and bias;
- outside autocast the normalised tokens are in the tokens' dtype, as ``layer_norm`` returns
  them; under autocast only where the caller names the dtype its consumer casts them to
  (``norm_dtype``: a ``timm`` ``Mlp`` whose ``fc1`` is an ``nn.Linear`` casts them to the
  autocast dtype, ``patch_common.mlp_input_dtype``), since ``layer_norm``'s own output dtype
  under autocast differs between devices;
- it has no forward hooks (they would not run) and its weight and bias are contiguous and of a
  dtype ``layer_norm`` accepts with these tokens on this device (``norm_weights_fit``);
- and wherever ``merging.kernel_applies`` (inference, CUDA or the interpreter, no export trace).

Elsewhere it is ``triton_merge_wavg`` and then ``norm`` itself, so the result never depends on
whether the kernel ran beyond rounding. Under ``torch.compile`` the kernels run as the
``pyra_lightning::merge_wavg_norm`` custom operator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pyra_lightning.kernels import compile_traced, merging
from pyra_lightning.kernels.merging import (
    ModulationWeights,
    NormWeights,
    _needs_autograd,
    _unit_stride,
    kernel_applies,
    sum_dtype,
    triton_merge_wavg,
)
from pyra_lightning.merge import Modulate
from pyra_lightning.patch_common import autocasting, has_hooks


def fusable_norm(norm: nn.Module, channels: int) -> bool:
    """Whether ``merge_kernel`` computes ``norm`` exactly as its own forward does (see the module)."""
    if type(norm) is not nn.LayerNorm and not (
        type(norm).__name__ == "LayerNorm" and type(norm).__module__.startswith("timm.")
    ):
        return False
    if getattr(norm, "_fast_norm", False) or norm.weight is None or norm.bias is None:
        return False
    return tuple(norm.normalized_shape) == (channels,) and not has_hooks(norm)


def norm_weights_fit(norm: nn.Module, x: torch.Tensor, merged_dtype: torch.dtype) -> bool:
    """Whether ``norm``'s weight and bias are what ``layer_norm`` takes with the merged tokens, so
    the kernel never returns a result where torch would refuse: on ``x``'s device, unit stride,
    and of a dtype torch accepts there. CUDA autocast runs ``layer_norm`` in fp32 (any 16- or
    32-bit float weight); otherwise the weights must have the tokens' dtype, except that torch's
    CPU kernel (with or without autocast, which leaves it alone) also takes fp32 weights for
    16-bit tokens, while its CUDA kernel reads them in the tokens' dtype and refuses."""
    half = {torch.bfloat16, torch.float16}
    if x.device.type == "cuda" and autocasting(x.device):
        allowed = {torch.float32, *half}
    elif x.device.type == "cpu" and merged_dtype in half:
        allowed = {merged_dtype, torch.float32}
    else:
        allowed = {merged_dtype}
    return all(
        t.device == x.device and t.dtype in allowed and t.stride() == (1,) for t in (norm.weight, norm.bias)
    )


def norm_output_dtype(
    device: torch.device, merged_dtype: torch.dtype, norm_dtype: torch.dtype | None
) -> torch.dtype | None:
    """The dtype the fused norm writes: ``norm_dtype`` where given, else the merged tokens' own
    outside autocast; ``None`` (not fused) under autocast without ``norm_dtype``."""
    if norm_dtype is not None:
        return norm_dtype
    return None if autocasting(device) else merged_dtype


def triton_merge_wavg_norm(
    merge: Any,
    x: torch.Tensor,
    size: torch.Tensor | None,
    modulate: Modulate | None,
    residual: torch.Tensor | None,
    norm: nn.Module,
    norm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``triton_merge_wavg`` and then ``norm`` of its merged tokens, in one kernel where it can.

    Args:
        merge, x, size, modulate, residual: As ``merging.triton_merge_wavg``.
        norm: The LayerNorm the block applies to the merged tokens next (``norm2``).
        norm_dtype: The dtype the normalised tokens' consumer casts them to (the autocast dtype
            for an MLP whose first operator is a linear); ``None``: leave them as ``norm`` returns.

    Returns:
        Merged tokens (B, N - merge_r, C), their sizes (B, N - merge_r, 1), and ``norm`` of the
        merged tokens (B, N - merge_r, C), in ``norm_dtype`` where the kernel wrote it.
    """
    merged_dtype = x.dtype if residual is None else sum_dtype(x.dtype, residual.dtype)
    fused = (
        fusable_norm(norm, x.shape[-1])
        and kernel_applies(merge, x, size, modulate, residual)
        and not _needs_autograd((norm.weight, norm.bias), None)
        and norm_weights_fit(norm, x, merged_dtype)
    )
    out_dtype = norm_output_dtype(x.device, merged_dtype, norm_dtype) if fused else None
    if out_dtype is None:
        merged, merged_size = triton_merge_wavg(merge, x, size, modulate, residual=residual)
        return merged, merged_size, norm(merged)
    if x.shape[1] != merge.num_tokens:
        raise ValueError(f"merge was matched on {merge.num_tokens} tokens but got a tensor of {x.shape[1]}")
    perm = _unit_stride(merge.perm(with_dst=modulate is not None))  # (B, kept + r [+ r])
    dst_out = _unit_stride(merge.dst_out)  # (B, r)
    weights = None
    if modulate is not None:
        mod_norm = modulate.norm
        weights = ModulationWeights(
            mod_norm.weight, mod_norm.bias, modulate.weight_r, modulate.weight_d, mod_norm.eps
        )
    ln = NormWeights(norm.weight, norm.bias, norm.eps, out_dtype)
    if compile_traced():
        pyra = weights if weights is not None else (None, None, None, None, 0.0)  # ToMe: none
        return merge_wavg_norm_op(x, size, perm, dst_out, *pyra, residual, *ln)
    merged, merged_size, normed = merging.launch_merge(x, size, perm, dst_out, weights, residual, ln)
    assert normed is not None  # launch_merge writes it whenever given a norm
    return merged, merged_size, normed


@torch.library.custom_op("pyra_lightning::merge_wavg_norm", mutates_args=())
def merge_wavg_norm_op(
    x: torch.Tensor,
    size: torch.Tensor | None,
    perm: torch.Tensor,
    dst_out: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight_r: torch.Tensor | None,
    weight_d: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    ln_eps: float,
    ln_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merging.merge_wavg_op`` with the LayerNorm ``ln_*`` of the merged tokens as a third
    output, (B, N - merge_r, C) in ``ln_dtype``; the PYRA tensors are all ``None`` for ToMe."""
    weights = None if weight_r is None else ModulationWeights(norm_weight, norm_bias, weight_r, weight_d, eps)
    merged, merged_size, normed = merging.launch_merge(
        x, size, perm, dst_out, weights, residual, NormWeights(ln_weight, ln_bias, ln_eps, ln_dtype)
    )
    assert normed is not None  # launch_merge writes it whenever given a norm
    return merged, merged_size, normed


@merge_wavg_norm_op.register_fake
def _merge_wavg_norm_shapes(
    x: torch.Tensor, size: torch.Tensor | None, perm: torch.Tensor, dst_out: torch.Tensor, *rest: Any
) -> Any:
    """The shapes and dtypes only: the merged tokens' and sizes' as ``merge_wavg_op``'s, the norm in ``ln_dtype``."""
    merged, merged_size = merging._merge_wavg_shapes(x, size, perm, dst_out, *rest[:6])
    return merged, merged_size, torch.empty_like(merged, dtype=rest[9])
