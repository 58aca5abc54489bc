"""Bipartite soft matching (eq. 3) in one Triton kernel: the (B, Na, Nb) scores never exist.

Each program takes ``BLOCK_A`` tokens of set A (even positions) of one image, normalises them,
and walks set B (odd positions) in blocks of ``BLOCK_B``: cosine scores of the block by one
``tl.dot``, divided by both norms, with prefix rows/columns and the padding past Nb at -inf,
then a running row max and argmax. Only (B, Na) maxima and indices are written; the ordering
of sources (a sort over Na values) stays in torch, so ``triton_match`` returns exactly what
``pyra_lightning.merge.match`` returns.

Tie rule: among equal scores in a row the lowest B index wins (the first block that reaches
the maximum keeps it; inside a block ``tl.argmax`` takes the first). torch's ``max(dim=-1)``
makes the same choice on CPU; on CUDA it does not promise one. The tests draw random data, on
which exact ties do not occur.

Precision: every input is upcast to fp32 and multiplied in IEEE fp32 (``input_precision="ieee"``,
no TF32), so bf16 and fp16 metrics are matched on exact products with fp32 sums, as the torch
matcher matches ``metric.float()``. Tensor cores would buy nothing here (a ViT-B/16 layer at
batch 256 is about 0.3 GFLOP of scores), and Triton's interpreter, which the tests run, cannot
multiply bf16 (it multiplies the bit patterns: triton-lang/triton#11584), so a bf16 ``tl.dot``
would be code no CPU test checks. Scores are ``(a · b) / (|a| |b|)`` rather than the torch path's
``(a / |a|) · (b / |b|)``: equal up to rounding, so an argmax may differ only where two scores
are within rounding of each other. The torch matcher on bf16 rounds its scores to bf16, so on
bf16 metrics the two pick other partners where scores tie in bf16.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pyra_lightning.kernels import compile_traced, on_device_of, use_triton


def _kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def match_kernel(
        metric,
        node_max,
        node_idx,
        num_tokens,
        channels,
        stride_b,
        stride_n,
        stride_c,
        prefix_a,
        prefix_b,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        batch = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements at large batches
        na = (num_tokens + 1) // 2
        nb = num_tokens // 2
        rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)  # A indices
        chans = tl.arange(0, BLOCK_C)
        base = metric + batch * stride_b
        a = tl.load(
            base + (2 * rows)[:, None] * stride_n + chans[None, :] * stride_c,
            mask=(rows[:, None] < na) & (chans[None, :] < channels),
            other=0.0,
        ).to(tl.float32)  # (BLOCK_A, BLOCK_C)
        # padding rows and columns get norm 1, not 0: their scores are -inf below, never 0 / 0
        a_norm = tl.where(rows < na, tl.sqrt(tl.sum(a * a, axis=1)), 1.0)
        best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_A,), tl.int32)
        for start in range(0, nb, BLOCK_B):
            cols = start + tl.arange(0, BLOCK_B)  # B indices
            b = tl.load(
                base + (2 * cols + 1)[:, None] * stride_n + chans[None, :] * stride_c,
                mask=(cols[:, None] < nb) & (chans[None, :] < channels),
                other=0.0,
            ).to(tl.float32)  # (BLOCK_B, BLOCK_C)
            b_norm = tl.where(cols < nb, tl.sqrt(tl.sum(b * b, axis=1)), 1.0)
            dots = tl.dot(a, tl.trans(b), input_precision="ieee")  # (BLOCK_A, BLOCK_B)
            scores = dots / (a_norm[:, None] * b_norm[None, :])  # (BLOCK_A, BLOCK_B)
            invalid = (cols[None, :] >= nb) | (cols[None, :] < prefix_b)
            invalid = invalid | (rows[:, None] < prefix_a) | (rows[:, None] >= na)
            scores = tl.where(invalid, float("-inf"), scores)
            block_best = tl.max(scores, axis=1)
            block_idx = tl.argmax(scores, axis=1).to(tl.int32) + start
            better = block_best > best
            best_idx = tl.where(better, block_idx, best_idx)
            best = tl.where(better, block_best, best)
        out = batch * na + rows
        tl.store(node_max + out, best, mask=rows < na)
        tl.store(node_idx + out, best_idx.to(tl.int64), mask=rows < na)

    return match_kernel


@functools.cache
def match_kernel() -> Any:
    """The jitted ``match_kernel``, defined on first use (Triton is imported only then)."""
    return _kernel()


def triton_node_max(metric: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B partner of every A token: (B, Na) cosine maxima (fp32) and their B indices (int64)."""
    import triton

    batch, num_tokens, channels = metric.shape
    na = (num_tokens + 1) // 2
    node_max = torch.empty(batch, na, device=metric.device, dtype=torch.float32)
    node_idx = torch.empty(batch, na, device=metric.device, dtype=torch.int64)
    grid = (batch, triton.cdiv(na, match_blocks(channels)["BLOCK_A"]))
    with on_device_of(metric):  # metric's GPU
        _launch_match(metric, node_max, node_idx, num_prefix_tokens, grid)
    return node_max, node_idx


@torch.library.custom_op("pyra_lightning::node_max", mutates_args=())
def node_max_op(metric: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_node_max`` as the operator ``torch.compile`` keeps in its graph (``compile_traced``)."""
    return triton_node_max(metric, num_prefix_tokens)


@node_max_op.register_fake
def _node_max_shapes(metric: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_tokens = metric.shape[:2]
    na = (num_tokens + 1) // 2
    return metric.new_empty(batch, na, dtype=torch.float32), metric.new_empty(batch, na, dtype=torch.int64)


def match_blocks(channels: int) -> dict[str, int]:
    """``match_kernel``'s block sizes: 16 A x 16 B tokens a step (``tl.dot``'s smallest tile) and
    the metric's whole channel width (a head's width, 64 on ViT-B/16) in one tile."""
    import triton

    return {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_C": max(16, triton.next_power_of_2(channels))}


def _launch_match(
    metric: torch.Tensor,
    node_max: torch.Tensor,
    node_idx: torch.Tensor,
    num_prefix_tokens: int,
    grid: tuple[int, int],
) -> None:
    batch, num_tokens, channels = metric.shape
    match_kernel()[grid](
        metric,
        node_max,
        node_idx,
        num_tokens,
        channels,
        metric.stride(0),
        metric.stride(1),
        metric.stride(2),
        (num_prefix_tokens + 1) // 2,
        num_prefix_tokens // 2,
        **match_blocks(channels),
    )


def triton_match(metric: torch.Tensor, merge_r: int, num_prefix_tokens: int) -> tuple[torch.Tensor, ...]:
    """``pyra_lightning.merge.match`` with the scores and their row max in one Triton kernel.

    Returns ``(src, dst, unm)`` as the torch matcher does; on tensors Triton does not run for
    (CPU without the interpreter, no Triton) it is the torch matcher.
    """
    from pyra_lightning.merge import match

    if not use_triton(metric):
        return match(metric, merge_r, num_prefix_tokens)
    if compile_traced():  # one node of the compiled graph
        node_max, node_idx = node_max_op(metric, num_prefix_tokens)
    else:
        node_max, node_idx = triton_node_max(metric, num_prefix_tokens)
    edge_idx = torch.sort(node_max, dim=-1, descending=True).indices  # (B, Na), as the torch path
    src, unm = edge_idx.split([merge_r, edge_idx.shape[1] - merge_r], dim=1)
    dst = node_idx.gather(1, src)
    if num_prefix_tokens:
        unm = torch.sort(unm, dim=1).values
    return src, dst, unm
