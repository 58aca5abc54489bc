"""Bipartite soft matching (eq. 3) in one Triton kernel: the (B, Na, Nb) scores never exist.

Each program takes ``BLOCK_A`` tokens of set A (even positions) of one image, normalises them,
and walks set B (odd positions) in blocks of ``BLOCK_B``: cosine scores of the block by one
``tl.dot``, divided by both norms, with prefix rows/columns and the padding past Nb at -inf,
then a running row max and argmax. Only (B, Na) maxima and indices are written.

A second kernel, ``plan_kernel`` (one program per image), turns them into the whole merge plan
in one launch, where torch needs two sorts, a gather, a cat and two adds per layer (each a
kernel, and at batch 1 each kernel costs more than the work it does): every A token's rank in
the descending order of maxima (pairwise comparisons, (Na, Na) tiles), then the sources in rank
order with their destinations, the unmerged A tokens (by index where prefix tokens exist, else
in rank order) and the gather positions ``perm`` and ``dst_out`` of ``merge.BipartiteMerge``,
all in one int64 row per image (``plan_columns``). ``triton_match`` returns exactly what
``pyra_lightning.merge.match`` returns, plus that ``perm`` and ``dst_out``.

Tie rules: among equal scores in a row the lowest B index wins (the first block that reaches
the maximum keeps it; inside a block ``tl.argmax`` takes the first). torch's ``max(dim=-1)``
makes the same choice on CPU; on CUDA it does not promise one. Among equal maxima the lower A
index ranks first, as a stable descending sort orders them (``torch.sort`` on CPU; on CUDA it
promises no order for ties); NaN ranks before every number, as ``torch.sort`` puts it, so the
ranks are always a permutation and every slot of the plan is written. The tests draw random
data, on which exact ties do not occur, and check the ranks on ties and NaN apart.

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
import itertools
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


def _plan_kernel():  # type: ignore[no-untyped-def]
    import triton
    import triton.language as tl

    @triton.jit
    def plan_kernel(
        node_max, node_idx, plan,
        na, merge_r, num_tokens, prefix_a, prefix_b, stride_mb, stride_pb,
        dst_out_at, src_at, dst_at, unm_at, rank_at,
        SORT_UNMERGED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # the *_at arguments: where each part of a plan row starts (plan_columns; perm at 0)
        batch = tl.program_id(0).to(tl.int64)
        scores, partners = node_max + batch * stride_mb, node_idx + batch * stride_mb
        row = plan + batch * stride_pb
        unm_len, kept = na - merge_r, num_tokens - merge_r
        for start in range(0, na, BLOCK):  # each A token's rank among all maxima
            i = start + tl.arange(0, BLOCK)
            vi = tl.load(scores + i, mask=i < na, other=0.0)
            rank = tl.zeros((BLOCK,), tl.int32)  # A tokens before i: stable descending, NaN first
            for jstart in range(0, na, BLOCK):
                j = jstart + tl.arange(0, BLOCK)
                vj = tl.load(scores + j, mask=j < na, other=0.0)
                nan_i, nan_j = vi != vi, vj != vj
                greater = (vj[None, :] > vi[:, None]) | (nan_j[None, :] & ~nan_i[:, None])
                equal = (vj[None, :] == vi[:, None]) | (nan_j[None, :] & nan_i[:, None])
                before = (greater | (equal & (j[None, :] < i[:, None]))) & (j[None, :] < na)
                rank += tl.sum(before.to(tl.int32), axis=1)
            tl.store(row + rank_at + i, rank.to(tl.int64), mask=i < na)
        tl.debug_barrier()  # the ranks of every A token, written by all threads, are read below
        for start in range(0, na, BLOCK):
            i = start + tl.arange(0, BLOCK)
            imask = i < na
            rank = tl.load(row + rank_at + i, mask=imask, other=0)
            partner = tl.load(partners + i, mask=imask, other=0)
            pos = 2 * i.to(tl.int64)  # A token i sits at position 2i
            is_src = imask & (rank < merge_r)  # the merge_r best maxima merge, in rank order
            tl.store(row + src_at + rank, i.to(tl.int64), mask=is_src)
            tl.store(row + dst_at + rank, partner, mask=is_src)
            tl.store(row + dst_out_at + rank, unm_len + partner, mask=is_src)
            tl.store(row + kept + rank, pos, mask=is_src)
            tl.store(row + kept + merge_r + rank, 2 * partner + 1, mask=is_src)
            is_unm = imask & (rank >= merge_r)
            if SORT_UNMERGED:  # prefix tokens: unmerged A tokens by index, so A's prefix leads
                slot = tl.zeros((BLOCK,), tl.int32)
                for jstart in range(0, start + BLOCK, BLOCK):  # unmerged A tokens before i
                    j = jstart + tl.arange(0, BLOCK)
                    rank_j = tl.load(row + rank_at + j, mask=j < na, other=0)
                    earlier = (j[None, :] < i[:, None]) & (rank_j[None, :] >= merge_r)
                    slot += tl.sum(earlier.to(tl.int32), axis=1)
                slot = slot.to(tl.int64)
            else:  # in descending order of maxima, after the sources
                slot = rank - merge_r
            tl.store(row + unm_at + slot, i.to(tl.int64), mask=is_unm)
            # output slot: a prefix token keeps its position, the others follow B's prefix
            out = tl.where(i < prefix_a, pos, prefix_b + slot)
            tl.store(row + out, pos, mask=is_unm)
        nb = num_tokens // 2
        for start in range(0, nb, BLOCK):  # set B in order: token j at position 2j + 1
            j = start + tl.arange(0, BLOCK).to(tl.int64)
            out = tl.where(j < prefix_b, 2 * j + 1, unm_len + j)
            tl.store(row + out, 2 * j + 1, mask=j < nb)

    return plan_kernel


@functools.cache
def match_kernel() -> Any:
    """The jitted ``match_kernel``, defined on first use (Triton is imported only then)."""
    return _kernel()


@functools.cache
def plan_kernel() -> Any:
    """The jitted ``plan_kernel``, defined on first use."""
    return _plan_kernel()


def plan_columns(num_tokens: int, merge_r: int) -> list[int]:
    """Widths of the parts of one image's plan row, in order: ``perm`` with destinations
    (N + r), ``dst_out`` (r), ``src`` (r), ``dst`` (r), ``unm`` (Na - r), and the ranks (Na),
    which the kernel keeps between its two passes."""
    na = (num_tokens + 1) // 2
    return [num_tokens + merge_r, merge_r, merge_r, merge_r, na - merge_r, na]


def plan_blocks(na: int) -> dict[str, int]:
    """``plan_kernel``'s tile: up to 64 A tokens against 64 (at least 16, ``tl.arange``'s floor)."""
    import triton

    return {"BLOCK": min(64, max(16, triton.next_power_of_2(na)))}


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


def triton_plan(
    node_max: torch.Tensor, node_idx: torch.Tensor, num_tokens: int, merge_r: int, num_prefix_tokens: int
) -> torch.Tensor:
    """``plan_kernel``: (B, sum(plan_columns)) int64 plan rows from each A token's best score
    ``node_max`` and partner ``node_idx`` (both (B, Na), contiguous) for ``merge_r`` merges."""
    batch, na = node_max.shape
    columns = plan_columns(num_tokens, merge_r)
    starts = list(itertools.accumulate(columns[:-1]))  # dst_out, src, dst, unm, ranks
    plan = torch.empty(batch, sum(columns), device=node_max.device, dtype=torch.int64)
    with on_device_of(node_max):
        plan_kernel()[(batch,)](
            node_max, node_idx, plan,
            na, merge_r, num_tokens, (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2,
            node_max.stride(0), plan.stride(0), *starts,
            SORT_UNMERGED=num_prefix_tokens > 0, **plan_blocks(na),
        )  # fmt: skip
    return plan


def triton_match_plan(metric: torch.Tensor, merge_r: int, num_prefix_tokens: int) -> torch.Tensor:
    """Both kernels: (B, sum(plan_columns)) int64 plan rows for ``merge_r`` merges of ``metric``."""
    node_max, node_idx = triton_node_max(metric, num_prefix_tokens)  # (B, Na) each
    return triton_plan(node_max, node_idx, metric.shape[1], merge_r, num_prefix_tokens)


@torch.library.custom_op("pyra_lightning::match_plan", mutates_args=())
def match_plan_op(metric: torch.Tensor, merge_r: int, num_prefix_tokens: int) -> torch.Tensor:
    """``triton_match_plan`` as the operator ``torch.compile`` keeps in its graph (``compile_traced``)."""
    return triton_match_plan(metric, merge_r, num_prefix_tokens)


@match_plan_op.register_fake
def _match_plan_shape(metric: torch.Tensor, merge_r: int, num_prefix_tokens: int) -> torch.Tensor:
    batch, num_tokens = metric.shape[:2]
    return metric.new_empty(batch, sum(plan_columns(num_tokens, merge_r)), dtype=torch.int64)


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
    """``pyra_lightning.merge.match`` in two Triton kernels, the scores and the plan.

    Returns ``(src, dst, unm)`` as the torch matcher does, then the plan's ``perm`` (with
    destinations) and ``dst_out`` (``merge.BipartiteMerge`` takes all five, so it builds no index
    of its own), all views of one (B, W) int64 tensor. On tensors Triton does not run for (CPU
    without the interpreter, no Triton) it is the torch matcher's three.
    """
    from pyra_lightning.merge import match

    if not use_triton(metric):
        return match(metric, merge_r, num_prefix_tokens)
    if compile_traced():  # one node of the compiled graph
        plan = match_plan_op(metric, merge_r, num_prefix_tokens)
    else:
        plan = triton_match_plan(metric, merge_r, num_prefix_tokens)
    perm, dst_out, src, dst, unm, _ = plan.split(plan_columns(metric.shape[1], merge_r), dim=1)
    return src, dst, unm, perm, dst_out
