"""Proportional attention (ToMe §3) in one Triton kernel: ``log(size)`` is read per key, never a mask.

SDPA takes proportional attention's bias only as a dense ``attn_mask``. Flash attention refuses
any mask, so a merged layer falls back to the memory-efficient kernel, which pads the (B, 1, 1, N)
mask to a multiple of 8/16 and expands it; on an H200 that attention took 2.6x the unmasked one
at PYRA high's second layer (BENCHMARKS.md, "GPU", 2026-12-04). ``attention_kernel`` is a
flash-attention forward (online softmax over blocks of keys, the (N, N) logits never stored)
whose only addition is one load of ``size`` per block of keys, and ``log2`` of it added to the
base-2 logits. It also takes ``log`` of the sizes itself (one launch fewer per layer) and
writes its output in (B, N, H, d) memory, so the attention's ``transpose(1, 2).reshape`` after
it is a view, not a copy.

Semantics: ``softmax(q kᵀ · d^-1/2 + log(size_j)) v`` over keys j, exactly what
``sdpa_proportional_attention`` computes. Products run on tensor cores in the inputs' dtype for
fp16 and bf16 (fp32 accumulation; the probabilities are cast to v's dtype before the second
product, as flash attention does), in IEEE fp32 for fp32 inputs. ``log(size)`` stays fp32 here,
where the SDPA path rounds its mask to the queries' dtype, so under bf16 the two differ by that
rounding too.

Where the kernel does not apply, ``triton_proportional_attention`` is SDPA with the mask
(``sdpa_proportional_attention``'s function): without sizes (the first block: flash runs
there), with attention dropout or where autograd must record it (the kernel has no backward),
on tensors Triton does not run for, while an export traces the model (its graph must run
without Triton), and past 256 channels a head. Under ``torch.compile`` it runs as the custom
operator ``pyra_lightning::proportional_attention``. Triton's interpreter multiplies bf16 bit
patterns (triton-lang/triton#11584), so the CPU tests check fp32 and fp16; bf16 takes the same
code with another element type.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from pyra_lightning.kernels import compile_traced, on_device_of, use_triton
from pyra_lightning.patch_common import size_bias

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def attention_kernel(
        q, k, v, size, out,
        num_tokens, num_heads, head_dim, scale_log2,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_sb, stride_sn, stride_ob, stride_oh, stride_on,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # scale_log2: the logit scale times log2(e), so exp2 replaces exp (the same softmax)
        # a 1-D grid (its axis has no 65535 limit) in which the query blocks of one (image, head)
        # are neighbours, so its keys and values are read from HBM once and then from L2
        query_blocks = tl.cdiv(num_tokens, BLOCK_M)
        pid = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements at large batches
        batch_head, block = pid // query_blocks, pid % query_blocks
        batch, head = batch_head // num_heads, batch_head % num_heads
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions
        dims = tl.arange(0, BLOCK_D)
        rmask, dmask = rows < num_tokens, dims < head_dim
        qb = q + batch * stride_qb + head * stride_qh
        kb = k + batch * stride_kb + head * stride_kh
        vb = v + batch * stride_vb + head * stride_vh
        sb = size + batch * stride_sb
        queries = tl.load(
            qb + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )  # (M, D)
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(0, num_tokens, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)  # key positions
            cmask = cols < num_tokens
            keys = tl.load(
                kb + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            )  # (N, D)
            if IEEE:
                logits = tl.dot(queries, tl.trans(keys), input_precision="ieee")  # (M, N)
            else:
                logits = tl.dot(queries, tl.trans(keys))  # (M, N)
            key_size = tl.load(sb + cols * stride_sn, mask=cmask, other=1.0).to(tl.float32)
            # proportional attention's + log(size_j), in base 2; keys past the last are -inf
            bias = tl.where(cmask, tl.log2(key_size), float("-inf"))
            logits = logits * scale_log2 + bias[None, :]
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # finite: a block has a key
            rescale = tl.exp2(row_max - new_max)
            probs = tl.exp2(logits - new_max[:, None])  # (M, N)
            row_sum = row_sum * rescale + tl.sum(probs, axis=1)
            values = tl.load(
                vb + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            )  # (N, D)
            acc = acc * rescale[:, None]
            if IEEE:
                acc = tl.dot(probs, values, acc, input_precision="ieee")
            else:
                acc = tl.dot(probs.to(values.dtype), values, acc)
            row_max = new_max
        acc = acc / row_sum[:, None]
        ob = out + batch * stride_ob + head * stride_oh
        tl.store(
            ob + rows[:, None] * stride_on + dims[None, :],
            acc.to(out.dtype.element_ty),
            mask=rmask[:, None] & dmask[None, :],
        )

    return attention_kernel


@functools.cache
def attention_kernel() -> Any:
    """The jitted ``attention_kernel``, defined on first use (Triton is imported only then)."""
    return _kernel()


def attention_blocks(head_dim: int, dtype: torch.dtype) -> dict[str, Any]:
    """Tiles and warps of ``attention_kernel``: 64 queries a program, all of a head's channels in one
    tile; for fp16/bf16 64 keys a step up to 64 channels (ViT-B/16's heads) and 32 past that, on
    4 warps; for fp32 (IEEE products on CUDA cores) 32 keys on 8 warps. Each is the largest tile
    that keeps its registers on sm_90 without spilling (``tools/aot_kernels.py``: bf16 at d 64
    uses 254 of 255); which tile runs fastest is for the GPU check to measure."""
    import triton

    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": block_d, "num_warps": 8}
    return {"BLOCK_M": 64, "BLOCK_N": 64 if block_d <= 64 else 32, "BLOCK_D": block_d, "num_warps": 4}


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor,
    blocks: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run ``attention_kernel`` on ``q``'s GPU: (B, H, N, d), a view of (B, N, H, d) memory.

    Args:
        q: Queries, (B, H, N, d), any strides.
        k: Keys, (B, H, N, d), any strides.
        v: Values, (B, H, N, d), any strides.
        size: Patches per token, (B, N, 1), any strides.
        blocks: Tiles and warps (``attention_blocks``'s keys); ``None``: ``attention_blocks``'
            (the GPU check times others).
    """
    import triton

    batch, heads, num_tokens, head_dim = q.shape
    out = torch.empty(batch, num_tokens, heads, head_dim, device=q.device, dtype=q.dtype)
    blocks = attention_blocks(head_dim, q.dtype) if blocks is None else blocks
    grid = (batch * heads * triton.cdiv(num_tokens, blocks["BLOCK_M"]),)
    with on_device_of(q):
        attention_kernel()[grid](
            q, k, v, size, out,
            num_tokens, heads, head_dim, head_dim**-0.5 * math.log2(math.e),
            *q.stride(), *k.stride(), *v.stride(),
            size.stride(0), size.stride(1), out.stride(0), out.stride(2), out.stride(1),
            IEEE=q.dtype == torch.float32, **blocks,
        )  # fmt: skip
    return out.transpose(1, 2)


@torch.library.custom_op("pyra_lightning::proportional_attention", mutates_args=())
def proportional_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor
) -> torch.Tensor:
    """``launch_attention`` as the operator ``torch.compile`` keeps in its graph (``compile_traced``)."""
    return launch_attention(q, k, v, size)


@proportional_attention_op.register_fake
def _attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    batch, heads, num_tokens, head_dim = q.shape
    return q.new_empty(batch, num_tokens, heads, head_dim).transpose(1, 2)


def kernel_applies(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, dropout_p: float
) -> bool:
    """Whether ``triton_proportional_attention`` launches its kernel for these arguments."""
    if size is None or dropout_p > 0 or q.dtype not in KERNEL_DTYPES or q.shape[-1] > MAX_HEAD_DIM:
        return False
    if not (q.dtype == k.dtype == v.dtype) or k.shape != q.shape or v.shape != q.shape:
        return False
    if not compile_traced() and (
        torch.compiler.is_compiling() or torch.jit.is_tracing() or type(q) is not torch.Tensor
    ):
        return False  # an export (its graph must run without Triton) or a tensor subclass
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, size)):
        return False  # no backward
    return use_triton(q, k, v, size)


def triton_proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Softmax attention with ``log(size)`` added over keys, in one Triton kernel where it applies
    (``kernel_applies``), else SDPA with the mask; the ``"triton"`` entry of ``ATTENTIONS``.

    Args:
        q: Queries, (B, H, N, d).
        k: Keys, (B, H, N, d).
        v: Values, (B, H, N, d).
        size: Patches per token, (B, N, 1) (``TokenState.size``); ``None``: plain attention.
        dropout_p: Attention dropout (training; runs SDPA).

    Returns:
        (B, H, N, d); from the kernel, a view of (B, N, H, d) memory.
    """
    if not kernel_applies(q, k, v, size, dropout_p):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=size_bias(size, q.dtype), dropout_p=dropout_p
        )
    assert size is not None  # kernel_applies
    if compile_traced():  # one node of the compiled graph
        return proportional_attention_op(q, k, v, size)
    return launch_attention(q, k, v, size)
