"""The merge's backward (``merge_backward``) as Triton kernels, for eager training steps.

In torch, the backward of one merging layer is about 14 operators for ToMe-plus-PYRA's
bookkeeping (gathers of the sizes, the sources' gradients and the pairs' tokens, the products
with the sizes, a ``cat``, a zeroed (B, N, C) buffer and a ``scatter_add_``) and about 20 more
for PYRA's modulation (eqs. 4-7): each a kernel launch that an eager step's host issues. Here:

- ``pair_grad_kernel`` (PYRA only), one program per image: it gathers the image's pairs ``M_s``
  and ``M_t`` (``residual + x`` rounded as the forward rounds it, times the sizes) and their
  upstream gradient into a scratch, then walks the channels in six sweeps (the LayerNorm's mean
  and variance, ``M_info`` with δ_r and δ_D, the gates' gradients, the weights' gradients with
  the LayerNorm backward's two row sums, and the inputs' gradients), keeping the per-pair values
  in registers. It writes the sources' token gradients in place, dL/dM_t into a (B, r, C)
  scratch, and per-image partial weight gradients, which one ``sum`` adds over the batch (no
  atomics, so the order of the sums is fixed);
- ``place_kernel``: every kept token's gradient (the upstream gradient over the merged size, plus
  for PYRA dL/dM_t of each pair whose destination it is, summed with a one-hot ``tl.dot``), and for
  ToMe every source's (its destination's), times its size. ``perm``'s first ``N`` entries name
  each token exactly once (kept tokens, then sources), so every row of the (B, N, C) gradient is
  written once and nothing is zeroed first.

So a merging layer's backward is 3 launches for PYRA (1 for ToMe), besides the casts to the
inputs' dtypes. It runs where ``applies`` says so: the eager backward on CUDA (or the interpreter),
and for PYRA at most ``MAX_PAIRS`` pairs a layer, since a program holds a vector per pair. While
anything traces the backward (``torch.compile``, AOTAutograd, ``make_fx``) the torch formula runs
and is recorded in the graph, which inductor fuses itself. The gate is ``2σ(δ_r) - 1`` as in the
forward kernel (``merging.modulate_kernel``), equal to the torch formula's ``tanh(δ_r / 2)`` up to
rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from pyra_lightning.kernels import on_device_of, use_triton

try:  # ships with torch's CUDA builds
    import triton
    import triton.language as tl

    from pyra_lightning.kernels.merging import _TRITON_DTYPES, sum_dtype, weighted_rows
except ImportError:  # pragma: no cover (every CI install has it)
    triton = None

# a program holds per-pair vectors of next_power_of_2(merge_r) lanes; beyond this, the torch formula
# (at 512 lanes every configuration tried spills registers on sm_90: tools/aot_kernels.py)
MAX_PAIRS = 256
# elements of one (pairs, channels) tile, on 8 warps: the channel block shrinks as the pairs grow.
# 4096 on 4 warps spilled at 16 or more pairs; this spills nothing up to 256 pairs (sm_90, C 384-1536)
_TILE = 2048

if triton is not None:

    @triton.jit
    def _upstream(gb, mb, out_rows, rmask, chans, cmask, stride_gn, stride_gc, stride_mn):
        """dL/d(the size-weighted sum) of merged rows ``out_rows``: the upstream gradient over the
        merged size, fp32, (R, C); 0 where masked."""
        mask = rmask[:, None] & cmask[None, :]
        grad = tl.load(gb + out_rows[:, None] * stride_gn + chans[None, :] * stride_gc, mask=mask, other=0.0)
        merged_size = tl.load(mb + out_rows * stride_mn, mask=rmask, other=1.0).to(tl.float32)
        return grad.to(tl.float32) / merged_size[:, None]

    @triton.jit
    def _scratch_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels):
        """The (R, C) tiles of ``M_s``, ``M_t`` and dL/dM'_s from the scratch; 0 where masked."""
        mask = rmask[:, None] & cmask[None, :]
        base = batch * 2 * merge_r * channels
        at = rows[:, None] * channels + chans[None, :]
        m_s = tl.load(pairs + base + at, mask=mask, other=0.0)
        m_t = tl.load(pairs + base + merge_r * channels + at, mask=mask, other=0.0)
        g = tl.load(grad + batch * merge_r * channels + at, mask=mask, other=0.0)
        return m_s, m_t, g, mask

    @triton.jit
    def _normed_info(
        pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels, mean, rstd, norm_w, norm_b
    ):  # fmt: skip
        """One channel tile of eq. 4's LayerNorm of ``M_s + M_t`` from the scratch: the normalised
        tile and ``M_info`` (R, C), with dL/dM'_s, the norm's weight and the mask; 0 where
        masked. Sweeps 3, 5 and 6 recompute it rather than keep (B, r, C) more scratch."""
        m_s, m_t, g, mask = _scratch_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels)
        ln_w = tl.load(norm_w + chans, mask=cmask, other=0.0)
        ln_b = tl.load(norm_b + chans, mask=cmask, other=0.0)
        normed = tl.where(mask, (m_s + m_t - mean[:, None]) * rstd[:, None], 0.0)
        info = tl.where(mask, normed * ln_w[None, :] + ln_b[None, :], 0.0)
        return g, normed, info, ln_w, mask

    @triton.jit
    def pair_grad_kernel(
        x, residual, size, perm, dst_out, grad_out, merged_size,
        norm_w, norm_b, weight_r, weight_d,
        grad_tokens, grad_m_t, pairs, grad, partial, scratch,
        num_kept, merge_r, channels, eps,
        stride_xb, stride_xn, stride_xc, stride_rb, stride_rn, stride_rc, stride_sb, stride_sn,
        stride_pb, stride_db, stride_gb, stride_gn, stride_gc, stride_mb, stride_mn,
        HAS_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """One image's pairs (see the module): writes the sources' rows of ``grad_tokens``
        (B, N, C), dL/dM_t into ``grad_m_t`` (B, r, C), and in ``partial`` (B, 3C + r) dL/d of
        the norm's weight, its bias, ``W_D`` and ``W_r``'s rows; ``pairs`` (B, 2r, C), ``grad``
        (B, r, C) and ``scratch`` (B, 2C) are the program's own fp32 scratch."""
        batch = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < merge_r
        xb, rb, sb = x + batch * stride_xb, residual + batch * stride_rb, size + batch * stride_sb
        pb, db = perm + batch * stride_pb, dst_out + batch * stride_db
        gb, mb = grad_out + batch * stride_gb, merged_size + batch * stride_mb
        src_pos = tl.load(pb + num_kept + rows, mask=rmask, other=0)
        dst_pos = tl.load(pb + num_kept + merge_r + rows, mask=rmask, other=0)
        out_rows = tl.load(db + rows, mask=rmask, other=0)  # each source's merged row
        w_r = tl.load(weight_r + rows, mask=rmask, other=0.0)
        part = partial + batch * (3 * channels + merge_r)  # [weight | bias | W_D | W_r]
        sig_at = scratch + batch * 2 * channels  # σ(δ_D), then dL/dδ_D
        # sweep 1: gather M_s = S s_S, M_t = D s_D and dL/dM'_s into the scratch; the LayerNorm's mean
        total = tl.zeros((BLOCK_R,), tl.float32)
        src_size = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            mask = rmask[:, None] & cmask[None, :]
            m_s, src_size = weighted_rows(
                xb, rb, sb, src_pos, rmask, chans, cmask, stride_xn, stride_xc, stride_rn, stride_rc,
                stride_sn, HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE,
            )  # fmt: skip
            m_t, _ = weighted_rows(
                xb, rb, sb, dst_pos, rmask, chans, cmask, stride_xn, stride_xc, stride_rn, stride_rc,
                stride_sn, HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE,
            )  # fmt: skip
            at = rows[:, None] * channels + chans[None, :]
            tl.store(pairs + batch * 2 * merge_r * channels + at, m_s, mask=mask)
            tl.store(pairs + (batch * 2 + 1) * merge_r * channels + at, m_t, mask=mask)
            upstream = _upstream(gb, mb, out_rows, rmask, chans, cmask, stride_gn, stride_gc, stride_mn)
            tl.store(grad + batch * merge_r * channels + at, upstream, mask=mask)
            total += tl.sum(m_s + m_t, axis=1)
        mean = total / channels
        tl.debug_barrier()  # the scratch's stores are visible to all the program's threads
        # sweep 2: the variance (eq. 4's LayerNorm), per pair
        total = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            m_s, m_t, _, mask = _scratch_rows(
                pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels
            )
            centred = tl.where(mask, m_s + m_t - mean[:, None], 0.0)
            total += tl.sum(centred * centred, axis=1)
        rstd = tl.rsqrt(total / channels + eps)
        # sweep 3: M_info, δ_r = M_info W_D (per pair) and σ(δ_D), δ_D = Σ_pairs W_r M_info (eq. 5)
        delta_r = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            _, _, info, _, _ = _normed_info(
                pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels, mean, rstd, norm_w, norm_b
            )  # fmt: skip
            delta_r += tl.sum(info * tl.load(weight_d + chans, mask=cmask, other=0.0)[None, :], axis=1)
            tl.store(sig_at + chans, tl.sigmoid(tl.sum(w_r[:, None] * info, axis=0)), mask=cmask)
        gate_r = 2.0 * tl.sigmoid(delta_r) - 1.0  # eq. 7's 2σ(δ_r) - 1
        tl.debug_barrier()
        # sweep 4: dL/dδ_D per channel and dL/dδ_r per pair, from M'_s = M_s (1 + 2σ(δ_D) gate_r)
        through_r = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            m_s, _, g, mask = _scratch_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels)
            sig = tl.load(sig_at + chans, mask=cmask, other=0.0)
            g_ms = g * m_s
            grad_d = 2.0 * tl.sum(gate_r[:, None] * g_ms, axis=0) * sig * (1.0 - sig)
            tl.store(sig_at + channels + chans, grad_d, mask=cmask)
            through_r += tl.sum(g_ms * sig[None, :], axis=1)
        # d(2σ(δ) - 1)/dδ = (1 - gate²) / 2, times the 2 of 2σ(δ_D)
        grad_r = through_r * (1.0 - gate_r * gate_r)
        tl.debug_barrier()
        # sweep 5: the weights' gradients, and the LayerNorm backward's two sums per pair
        grad_wr = tl.zeros((BLOCK_R,), tl.float32)
        sum_g = tl.zeros((BLOCK_R,), tl.float32)
        sum_gx = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            _, normed, info, ln_w, _ = _normed_info(
                pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels, mean, rstd, norm_w, norm_b
            )  # fmt: skip
            grad_d = tl.load(sig_at + channels + chans, mask=cmask, other=0.0)
            w_d = tl.load(weight_d + chans, mask=cmask, other=0.0)
            grad_info = grad_r[:, None] * w_d[None, :] + w_r[:, None] * grad_d[None, :]  # 0 where masked
            grad_wr += tl.sum(info * grad_d[None, :], axis=1)
            tl.store(part + 2 * channels + chans, tl.sum(grad_r[:, None] * info, axis=0), mask=cmask)
            tl.store(part + chans, tl.sum(grad_info * normed, axis=0), mask=cmask)
            tl.store(part + channels + chans, tl.sum(grad_info, axis=0), mask=cmask)
            grad_normed = grad_info * ln_w[None, :]
            sum_g += tl.sum(grad_normed, axis=1)
            sum_gx += tl.sum(grad_normed * normed, axis=1)
        tl.store(part + 3 * channels + rows, grad_wr, mask=rmask)
        # sweep 6: dL/d(M_s + M_t) through the LayerNorm, and dL/dM_s's direct path; the sources'
        # token gradients (times their sizes, as M_s = S s_S) in place, dL/dM_t for place_kernel
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            g, normed, _, ln_w, mask = _normed_info(
                pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels, mean, rstd, norm_w, norm_b
            )  # fmt: skip
            grad_d = tl.load(sig_at + channels + chans, mask=cmask, other=0.0)
            w_d = tl.load(weight_d + chans, mask=cmask, other=0.0)
            grad_normed = (grad_r[:, None] * w_d[None, :] + w_r[:, None] * grad_d[None, :]) * ln_w[None, :]
            both = rstd[:, None] * (
                grad_normed - sum_g[:, None] / channels - normed * (sum_gx[:, None] / channels)
            )
            sig = tl.load(sig_at + chans, mask=cmask, other=0.0)
            direct = g + g * (2.0 * sig[None, :] * gate_r[:, None])
            token_at = (batch * (num_kept + merge_r) + src_pos)[:, None] * channels + chans[None, :]
            tl.store(grad_tokens + token_at, (direct + both) * src_size[:, None], mask=mask)
            at = batch * merge_r * channels + rows[:, None] * channels + chans[None, :]
            tl.store(grad_m_t + at, both, mask=mask)

    @triton.jit
    def place_kernel(
        size, perm, dst_out, grad_out, merged_size, grad_m_t, grad_tokens,
        num_kept, merge_r, channels, num_rows,
        stride_sb, stride_sn, stride_pb, stride_db, stride_gb, stride_gn, stride_gc, stride_mb, stride_mn,
        HAS_SIZE: tl.constexpr, MODULATED: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Rows ``perm[toks]`` of ``grad_tokens`` for ``toks`` < ``num_rows`` (see the module):
        kept tokens (``toks`` < ``num_kept``) and, for ToMe, the sources after them."""
        batch = tl.program_id(0).to(tl.int64)
        toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = toks < num_rows
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = chans < channels
        db = dst_out + batch * stride_db
        source = toks >= num_kept  # ToMe only: a source takes its destination's gradient
        out_rows = tl.where(source, tl.load(db + toks - num_kept, mask=tmask & source, other=0), toks)
        gb, mb = grad_out + batch * stride_gb, merged_size + batch * stride_mb
        total = _upstream(gb, mb, out_rows, tmask, chans, cmask, stride_gn, stride_gc, stride_mn)
        if MODULATED:  # + dL/dM_t of every pair whose destination a kept token is
            for start in range(0, merge_r, BLOCK_R):
                rows = start + tl.arange(0, BLOCK_R)
                rmask = rows < merge_r
                dst = tl.load(db + rows, mask=rmask, other=-1)
                at = (batch * merge_r + rows)[:, None] * channels + chans[None, :]
                pair = tl.load(grad_m_t + at, mask=rmask[:, None] & cmask[None, :], other=0.0)
                onehot = tl.where(toks[:, None] == dst[None, :], 1.0, 0.0)  # (T, R): pair j -> token i
                total = tl.dot(onehot, pair, total, input_precision="ieee")
        pos = tl.load(perm + batch * stride_pb + toks, mask=tmask, other=0)
        if HAS_SIZE:
            total = (
                total
                * tl.load(size + batch * stride_sb + pos * stride_sn, mask=tmask, other=0.0).to(tl.float32)[
                    :, None
                ]
            )
        at = (batch * (num_kept + merge_r) + pos)[:, None] * channels + chans[None, :]
        tl.store(grad_tokens + at, total, mask=tmask[:, None] & cmask[None, :])


class PairWeights(NamedTuple):
    """PYRA's parameters in fp32 as the backward reads them (eqs. 4-7), each with unit stride."""

    norm_weight: torch.Tensor  # (C,)
    norm_bias: torch.Tensor  # (C,)
    weight_r: torch.Tensor  # (r,): W_r's first merge_r rows
    weight_d: torch.Tensor  # (C,)
    eps: float


def pair_blocks(merge_r: int, channels: int) -> dict[str, int]:
    """``pair_grad_kernel``'s blocks: every pair in one block (its per-pair vectors), channel
    blocks of at most ``_TILE`` elements per (pairs, channels) tile and at least 8 wide, 8 warps."""
    block_r = triton.next_power_of_2(merge_r)
    block_c = max(8, min(triton.next_power_of_2(channels), _TILE // block_r))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8}


# place_kernel's tiles: 32 tokens x 64 channels, the pairs 16 at a time (tl.dot needs 16)
PLACE_BLOCKS = {"BLOCK_T": 32, "BLOCK_R": 16, "BLOCK_C": 64}


def _traced(grad: torch.Tensor) -> bool:
    """Whether the backward is being traced rather than run: by ``torch.compile`` or AOTAutograd
    (fake or functional tensors) or ``make_fx`` (a proxy mode). A Triton launch made from Python
    would not be recorded in such a graph, so there the torch formula runs and is traced."""
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        return True
    return get_proxy_mode() is not None


def applies(grad_out: torch.Tensor, merge_r: int, pyra: bool) -> bool:
    """Whether the backward runs the kernels: Triton launches for ``grad_out`` (CUDA or the
    interpreter), nothing traces it, a layer that merges (for PYRA, at most ``MAX_PAIRS``), and
    grad mode is off, as ``backward()`` runs it. With ``create_graph=True`` it is on and the
    gradient must itself be differentiable (a gradient penalty), which a Triton launch is not."""
    if merge_r <= 0 or (pyra and merge_r > MAX_PAIRS) or torch.is_grad_enabled():
        return False
    return not _traced(grad_out) and use_triton(grad_out)


def triton_merge_backward(
    grad_out: torch.Tensor,
    merged_size: torch.Tensor,
    num_tokens: int,
    size: torch.Tensor | None,
    perm: torch.Tensor,
    dst_out: torch.Tensor,
    tokens: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    weights: PairWeights | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """dL/d(tokens) (B, N, C) fp32 of the size-weighted merge, and for PYRA its weights' gradients.

    Args:
        grad_out: dL/d(merged tokens), (B, N - r, C); ``merged_size`` their sizes (B, N - r, 1).
        num_tokens: N, the tokens before the merge.
        size, perm, dst_out: the forward's sizes (``None``: ones) and ``BipartiteMerge`` plan
            (``perm`` with each source's destination after the sources for PYRA), unit stride
            along a row.
        tokens: PYRA's ``(x, residual)`` (``residual`` may be ``None``): the tokens are
            ``residual + x``; ``None`` for ToMe.
        weights: PYRA's parameters (``None`` for ToMe).

    Returns:
        The tokens' gradient in fp32, and for PYRA dL/d of the LayerNorm's weight and bias,
        ``W_r``'s first ``merge_r`` rows (r,) and ``W_D`` (C,) in fp32 (``()`` for ToMe).
    """
    batch, kept, channels = grad_out.shape
    merge_r = dst_out.shape[1]
    plain = weights is None or all(t.dtype == torch.float32 and t.stride() == (1,) for t in weights[:4])
    if perm.stride(-1) != 1 or dst_out.stride(-1) != 1 or not plain:  # what the kernels index by
        raise ValueError(
            "merge_grad: perm and dst_out need unit stride along a row, the weights fp32 and unit stride"
        )
    grad_tokens = grad_out.new_empty(batch, num_tokens, channels, dtype=torch.float32)  # every row written
    size_arg = grad_tokens if size is None else size  # a placeholder pointer when there are no sizes
    size_strides = (0, 0) if size is None else (size.stride(0), size.stride(1))
    plan_strides = (perm.stride(0), dst_out.stride(0))
    upstream_strides = (*grad_out.stride(), merged_size.stride(0), merged_size.stride(1))
    grad_m_t, weight_grads = grad_tokens, ()  # a placeholder pointer for ToMe
    with on_device_of(grad_out):
        if weights is not None and tokens is not None:
            x, residual = tokens
            dtype = x.dtype if residual is None else sum_dtype(x.dtype, residual.dtype)
            res_arg = x if residual is None else residual
            res_strides = (0, 0, 0) if residual is None else residual.stride()
            grad_m_t = grad_out.new_empty(batch, merge_r, channels, dtype=torch.float32)
            pairs = grad_out.new_empty(batch, 2 * merge_r, channels, dtype=torch.float32)
            grad = grad_out.new_empty(batch, merge_r, channels, dtype=torch.float32)
            partial = grad_out.new_empty(batch, 3 * channels + merge_r, dtype=torch.float32)
            scratch = grad_out.new_empty(batch, 2 * channels, dtype=torch.float32)
            pair_grad_kernel[(batch,)](
                x, res_arg, size_arg, perm, dst_out, grad_out, merged_size,
                weights.norm_weight, weights.norm_bias, weights.weight_r, weights.weight_d,
                grad_tokens, grad_m_t, pairs, grad, partial, scratch,
                kept, merge_r, channels, weights.eps,
                *x.stride(), *res_strides, *size_strides, *plan_strides, *upstream_strides,
                HAS_SIZE=size is not None, HAS_RESIDUAL=residual is not None,
                SUM_DTYPE=getattr(tl, _TRITON_DTYPES[dtype]), **pair_blocks(merge_r, channels),
            )  # fmt: skip
            sums = partial.sum(0).split([channels, channels, channels, merge_r])
            grad_weight, grad_bias, grad_wd, grad_wr = sums
            weight_grads = (grad_weight, grad_bias, grad_wr, grad_wd)
        num_rows = kept if weights is not None else kept + merge_r  # PYRA's sources: written above
        blocks = PLACE_BLOCKS
        grid = (batch, triton.cdiv(num_rows, blocks["BLOCK_T"]), triton.cdiv(channels, blocks["BLOCK_C"]))
        place_kernel[grid](
            size_arg, perm, dst_out, grad_out, merged_size, grad_m_t, grad_tokens,
            kept, merge_r, channels, num_rows,
            *size_strides, *plan_strides, *upstream_strides,
            HAS_SIZE=size is not None, MODULATED=weights is not None, **blocks,
        )  # fmt: skip
    return grad_tokens, weight_grads
