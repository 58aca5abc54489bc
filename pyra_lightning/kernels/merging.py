"""The size-weighted merge, PYRA's modulation (eqs. 4-7) and the size update in two Triton kernels.

The torch path (``merge.BipartiteMerge.wavg``) runs about 30 operators per merging layer, each
reading and writing whole (B, N, C) tensors. Here one layer's merge is two launches:

- ``modulate_kernel`` (PYRA only), one program per image: gathers the ``merge_r`` sources and
  their destinations straight from the layer's tokens, weights them by size, and computes
  ``M_info = LN(M_s + M_t)`` (eq. 4), ``δ_D = M_info W_r`` summed over the pairs (eq. 5), then
  in a second sweep ``δ_r = W_D M_info`` (eq. 5) and ``M_s + (2σ(δ_D) ⊙ M_s) ⊙ (2σ(δ_r) - 1)``
  (eqs. 6-7), written as a (B, merge_r, C) fp32 buffer;
- ``merge_kernel``, one program per image, block of kept tokens and block of channels: gathers
  the kept tokens in output order, weights them by size, adds every source whose destination
  falls in the block through a one-hot (tokens x sources) matrix product (``tl.dot``, exact:
  each product is a source times 0 or 1), adds the sources' sizes alike, divides, and writes
  the merged tokens and their sizes.

With ``NORM`` (``kernels.merge_norm``) ``merge_kernel`` also writes the block's next LayerNorm
(``norm2``) of the tokens it merged: a program then walks all channels of its tokens, storing the
merged tiles and combining each tile's mean and squared deviations (Chan et al.'s pairwise
update), and a second sweep reads its stored tiles back and normalises them.

The block's residual add before the merge can be read by the kernels too (``residual``): they
load the residual stream and the attention branch and add them (rounded to their promoted dtype,
as torch rounds ``residual + x``), so the (B, N, C) sum is never written and read back.

Which token goes where is the torch plan's (``BipartiteMerge.perm`` and ``dst_out``), so the
token order is the reference's by construction. Arithmetic is fp32 throughout, whatever the
input dtype; products run in IEEE fp32 (no TF32). Results equal the torch path's up to rounding
(sums are taken in another order; under bf16 autocast the torch path's modulation matmuls run
in bf16, the kernel's in fp32).

Where autograd records the merge (a training step) the kernels run as the custom operator
``pyra_lightning::merge_wavg`` (``merge_wavg_op``), whose backward (``kernels.merge_backward``)
runs as Triton kernels in eager steps (``kernels.merge_grad``) and as torch where a graph is
traced; so they do under ``torch.compile``. The torch path runs while an
export traces the model (``torch.export``, ONNX, ``torch.jit``: their graphs must run without
Triton), for CPU tensors without the interpreter, for fp64 (the kernels compute in fp32), for
modulations other than ``"pyra"`` (the ablations), for sizes that require a gradient, and for
a matcher's merge that is not a ``BipartiteMerge``. Launches go to the GPU
that holds ``x``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from pyra_lightning.kernels import compile_traced, on_device_of, use_triton
from pyra_lightning.merge import BipartiteMerge, Modulate, fusable_pyra, merge_wavg

try:  # ships with torch's CUDA builds; the kernels below are defined only where it imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (every CI install has it)
    triton = None

if triton is not None:  # module level, so the jitted functions find each other by name

    @triton.jit
    def weighted_rows(
        xb, rb, sb, pos, rmask, chans, cmask, stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
        HAS_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr,
    ):  # fmt: skip
        """Tokens ``pos`` times their sizes (fp32) and the sizes: (R, C), (R,); 0 where masked.

        With ``HAS_RESIDUAL`` a token is ``residual + x``, added in fp32 and rounded to
        ``SUM_DTYPE`` (the two dtypes' promotion), exactly as torch's ``residual + x`` rounds."""
        offsets = pos[:, None] * stride_xn + chans[None, :] * stride_xc
        tok = tl.load(xb + offsets, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(
                rb + pos[:, None] * stride_rn + chans[None, :] * stride_rc,
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            tok = (res + tok).to(SUM_DTYPE).to(tl.float32)
        if HAS_SIZE:
            size = tl.load(sb + pos * stride_sn, mask=rmask, other=0.0).to(tl.float32)
        else:
            size = tl.where(rmask, 1.0, 0.0)
        return tok * size[:, None], size

    @triton.jit
    def pair_info(
        xb, rb, sb, pb, num_kept, merge_r, start, chans, cmask, channels, norm_w, norm_b, eps,
        stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
        HAS_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """Pairs ``start ..< start + BLOCK_R``: their indices and mask, size-weighted sources
        ``M_s`` and ``M_info = LN(M_s + M_t)`` (eq. 4)."""
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < merge_r
        src_pos = tl.load(pb + num_kept + rows, mask=rmask, other=0)
        dst_pos = tl.load(pb + num_kept + merge_r + rows, mask=rmask, other=0)
        src, _ = weighted_rows(
            xb, rb, sb, src_pos, rmask, chans, cmask, stride_xn, stride_xc, stride_rn, stride_rc,
            stride_sn, HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE,
        )  # fmt: skip
        dst, _ = weighted_rows(
            xb, rb, sb, dst_pos, rmask, chans, cmask, stride_xn, stride_xc, stride_rn, stride_rc,
            stride_sn, HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE,
        )  # fmt: skip
        both = src + dst  # (R, C), 0 on masked rows and channels
        mean = tl.sum(both, axis=1) / channels
        centred = tl.where(cmask[None, :], both - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / channels + eps)
        return rows, rmask, src, centred * rstd[:, None] * norm_w[None, :] + norm_b[None, :]

    @triton.jit
    def modulate_kernel(
        x, residual, size, perm, norm_w, norm_b, weight_r, weight_d, out,
        num_kept, merge_r, channels, eps,
        stride_xb, stride_xn, stride_xc, stride_rb, stride_rn, stride_rc,
        stride_sb, stride_sn, stride_pb, stride_wr,
        HAS_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        batch = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements at large batches
        chans = tl.arange(0, BLOCK_C)
        cmask = chans < channels
        ln_w = tl.load(norm_w + chans, mask=cmask, other=0.0).to(tl.float32)
        ln_b = tl.load(norm_b + chans, mask=cmask, other=0.0).to(tl.float32)
        w_d = tl.load(weight_d + chans, mask=cmask, other=0.0).to(tl.float32)
        xb, sb, pb = x + batch * stride_xb, size + batch * stride_sb, perm + batch * stride_pb
        rb = residual + batch * stride_rb
        delta_d = tl.zeros((BLOCK_C,), tl.float32)  # δ_D = M_info W_r (eq. 5), over all pairs
        for start in range(0, merge_r, BLOCK_R):
            rows, rmask, _, info = pair_info(
                xb, rb, sb, pb, num_kept, merge_r, start, chans, cmask, channels, ln_w, ln_b, eps,
                stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
                HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE, BLOCK_R,
            )  # fmt: skip
            w_r = tl.load(weight_r + rows * stride_wr, mask=rmask, other=0.0).to(tl.float32)
            delta_d += tl.sum(w_r[:, None] * info, axis=0)
        gate_d = 2.0 * tl.sigmoid(delta_d)  # eq. 6
        for start in range(0, merge_r, BLOCK_R):  # second sweep: modulate with the finished δ_D
            rows, rmask, src, info = pair_info(
                xb, rb, sb, pb, num_kept, merge_r, start, chans, cmask, channels, ln_w, ln_b, eps,
                stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
                HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE, BLOCK_R,
            )  # fmt: skip
            delta_r = tl.sum(info * w_d[None, :], axis=1)  # δ_r = W_D M_info (eq. 5): (R,)
            modulated = src + (src * gate_d[None, :]) * (2.0 * tl.sigmoid(delta_r) - 1.0)[:, None]  # eq. 7
            offsets = (batch * merge_r + rows)[:, None] * channels + chans[None, :]
            tl.store(out + offsets, modulated, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def merged_tile(
        xb, rb, sb, pb, db, sources, batch, toks, tmask, chans, cmask, num_kept, merge_r, channels,
        stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
        HAS_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr,
        MODULATED: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """Merged tokens ``toks`` x channels ``chans`` (T, C) in fp32 and their sizes (T,): the kept
        tokens weighted by size, plus every source whose destination is among them, over the sum
        of the sizes (1 on rows past the last token, which are never stored)."""
        pos = tl.load(pb + toks, mask=tmask, other=0)
        total, count = weighted_rows(
            xb, rb, sb, pos, tmask, chans, cmask, stride_xn, stride_xc, stride_rn, stride_rc,
            stride_sn, HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE,
        )  # fmt: skip
        for start in range(0, merge_r, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            rmask = rows < merge_r
            src_pos = tl.load(pb + num_kept + rows, mask=rmask, other=0)
            if MODULATED:
                offsets = (batch * merge_r + rows)[:, None] * channels + chans[None, :]
                src = tl.load(sources + offsets, mask=rmask[:, None] & cmask[None, :], other=0.0)
                if HAS_SIZE:
                    src_size = tl.load(sb + src_pos * stride_sn, mask=rmask, other=0.0).to(tl.float32)
                else:
                    src_size = tl.where(rmask, 1.0, 0.0)
            else:
                src, src_size = weighted_rows(
                    xb, rb, sb, src_pos, rmask, chans, cmask, stride_xn, stride_xc, stride_rn,
                    stride_rc, stride_sn, HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE,
                )  # fmt: skip
            dst = tl.load(db + rows, mask=rmask, other=-1)  # each source's output position
            onehot = tl.where(toks[:, None] == dst[None, :], 1.0, 0.0)  # (T, R): source j -> token i
            total = tl.dot(onehot, src, total, input_precision="ieee")
            count += tl.sum(onehot * src_size[None, :], axis=1)
        count = tl.where(tmask, count, 1.0)
        return total / count[:, None], count

    @triton.jit
    def merge_kernel(
        x, residual, size, perm, dst_out, sources, out, out_size, norm_w, norm_b, normed,
        num_kept, merge_r, channels, eps,
        stride_xb, stride_xn, stride_xc, stride_rb, stride_rn, stride_rc,
        stride_sb, stride_sn, stride_pb, stride_db,
        HAS_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr,
        MODULATED: tl.constexpr, NORM: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        batch = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements at large batches
        toks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # output positions
        tmask = toks < num_kept
        xb, sb, pb = x + batch * stride_xb, size + batch * stride_sb, perm + batch * stride_pb
        rb, db = residual + batch * stride_rb, dst_out + batch * stride_db
        if NORM:  # one program per block of tokens walks all channels, then normalises the rows
            seen = 0.0
            mean = tl.zeros((BLOCK_T,), tl.float32)
            m2 = tl.zeros((BLOCK_T,), tl.float32)  # sum of squared deviations from the mean
            for c_start in range(0, channels, BLOCK_C):
                chans = c_start + tl.arange(0, BLOCK_C)
                cmask = chans < channels
                merged, count = merged_tile(
                    xb, rb, sb, pb, db, sources, batch, toks, tmask, chans, cmask, num_kept, merge_r,
                    channels, stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
                    HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE, MODULATED, BLOCK_R,
                )  # fmt: skip
                stored = merged.to(out.dtype.element_ty)
                rows_out = batch * num_kept + toks
                offsets = rows_out[:, None] * channels + chans[None, :]
                tl.store(out + offsets, stored, mask=tmask[:, None] & cmask[None, :])
                # the norm is of the tokens as stored; chunk statistics combined as Chan et al.
                stored = stored.to(tl.float32)
                n_chunk = tl.minimum(channels - c_start, BLOCK_C).to(tl.float32)
                chunk_mean = tl.sum(tl.where(cmask[None, :], stored, 0.0), axis=1) / n_chunk
                centred = tl.where(cmask[None, :], stored - chunk_mean[:, None], 0.0)
                delta = chunk_mean - mean
                mean += delta * (n_chunk / (seen + n_chunk))
                m2 += tl.sum(centred * centred, axis=1) + delta * delta * (seen * n_chunk / (seen + n_chunk))
                seen += n_chunk
                if c_start == 0:
                    tl.store(out_size + rows_out, count.to(out_size.dtype.element_ty), mask=tmask)
            rstd = tl.rsqrt(m2 / channels + eps)  # the biased variance, as layer_norm's
            rows_out = batch * num_kept + toks
            tl.debug_barrier()  # the program's stores of `out` are visible to all its threads
            for c_start in range(0, channels, BLOCK_C):
                chans = c_start + tl.arange(0, BLOCK_C)
                cmask = chans < channels
                offsets = rows_out[:, None] * channels + chans[None, :]
                stored = tl.load(out + offsets, mask=tmask[:, None] & cmask[None, :], other=0.0).to(
                    tl.float32
                )
                ln_w = tl.load(norm_w + chans, mask=cmask, other=0.0).to(tl.float32)
                ln_b = tl.load(norm_b + chans, mask=cmask, other=0.0).to(tl.float32)
                result = (stored - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
                tl.store(
                    normed + offsets, result.to(normed.dtype.element_ty), mask=tmask[:, None] & cmask[None, :]
                )
        else:  # one program per block of tokens and block of channels
            chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            merged, count = merged_tile(
                xb, rb, sb, pb, db, sources, batch, toks, tmask, chans, cmask, num_kept, merge_r,
                channels, stride_xn, stride_xc, stride_rn, stride_rc, stride_sn,
                HAS_SIZE, HAS_RESIDUAL, SUM_DTYPE, MODULATED, BLOCK_R,
            )  # fmt: skip
            rows_out = batch * num_kept + toks
            offsets = rows_out[:, None] * channels + chans[None, :]
            tl.store(out + offsets, merged.to(out.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])
            if tl.program_id(2) == 0:
                tl.store(out_size + rows_out, count.to(out_size.dtype.element_ty), mask=tmask)


# fp64 is left to torch: the kernels compute in fp32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _needs_autograd(tensors: tuple[torch.Tensor, ...], modulate: Modulate | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    params = modulate.parameters() if isinstance(modulate, torch.nn.Module) else ()
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in params)


def kernel_applies(
    merge: Any,
    x: torch.Tensor,
    size: torch.Tensor | None,
    modulate: Modulate | None,
    residual: torch.Tensor | None = None,
    differentiable: bool = False,
) -> bool:
    """Whether ``triton_merge_wavg`` runs its kernels for these arguments (else the torch path):
    eager on real tensors where Triton launches, or while ``torch.compile`` traces for the
    devices the kernels launch on (then through the ``pyra_lightning::merge_wavg`` operator).
    Where autograd would record the call, only if ``differentiable`` (the operator's backward,
    ``merge_backward``) and the sizes need no gradient."""
    tokens = (x,) if residual is None else (x, residual)
    if not isinstance(merge, BipartiteMerge) or any(t.dtype not in KERNEL_DTYPES for t in tokens):
        return False
    if residual is not None and residual.shape != x.shape:
        return False  # a broadcast sum: torch's
    if modulate is not None and not fusable_pyra(modulate, merge.merge_r):
        return False
    if not compile_traced() and (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or any(type(t) is not torch.Tensor for t in tokens)
    ):
        return False  # an export (its graph must run without Triton) or a tensor subclass
    tensors = tokens if size is None else (*tokens, size)
    if size is not None and _needs_autograd((size,), None):
        return False  # sizes are never trainable; the backward gives them none
    return use_triton(*tensors) and (differentiable or not _needs_autograd(tensors, modulate))


def _unit_stride(index: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride (a view of the matcher's plan rows) but unit steps along a row."""
    return index if index.stride(-1) == 1 else index.contiguous()


def triton_merge_wavg(
    merge: Any,
    x: torch.Tensor,
    size: torch.Tensor | None = None,
    modulate: Modulate | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge.merge_wavg`` in two Triton kernels where they apply (``kernel_applies``), else itself.

    Args:
        merge: From ``bipartite_soft_matching`` (a ``BipartiteMerge``).
        x: Tokens, (B, N, C).
        size: Patches per token, (B, N, 1); ``None``: all ones.
        modulate: ``None`` (ToMe) or a ``PyraModulation`` of variant ``"pyra"``.
        residual: ``None``, or a (B, N, C) residual stream: the tokens are then ``residual + x``
            (the block's ``x + attention branch``), which the kernels add as they read, so the
            sum of the whole (B, N, C) stream is never written; rounded to the two dtypes'
            promotion as torch rounds it, so the result is that of ``merge_wavg(residual + x)``.

    Returns:
        Merged tokens (B, N - merge_r, C) and their sizes (B, N - merge_r, 1), both in the tokens'
        dtype (``x``'s, or its promotion with ``residual``'s).
    """
    if not kernel_applies(merge, x, size, modulate, residual, differentiable=True):
        tokens = x if residual is None else residual + x
        return merge_wavg(merge, tokens, size, modulate=modulate)
    if x.shape[1] != merge.num_tokens:
        raise ValueError(f"merge was matched on {merge.num_tokens} tokens but got a tensor of {x.shape[1]}")
    perm = _unit_stride(merge.perm(with_dst=modulate is not None))  # (B, kept + r [+ r])
    dst_out = _unit_stride(merge.dst_out)  # (B, r)
    weights = None
    if modulate is not None:
        norm = modulate.norm
        weights = ModulationWeights(norm.weight, norm.bias, modulate.weight_r, modulate.weight_d, norm.eps)
    if compile_traced() or _needs_autograd((x,) if residual is None else (x, residual), modulate):
        pyra_args = weights if weights is not None else (None, None, None, None, 0.0)  # ToMe: none
        return merge_wavg_op(x, size, perm, dst_out, *pyra_args, residual)  # with its backward
    return launch_merge(x, size, perm, dst_out, weights, residual)[:2]


class ModulationWeights(NamedTuple):
    """PYRA's parameters as the modulation kernel reads them (eqs. 4-7): the LayerNorm's affine
    weight and bias and epsilon, ``W_r`` (its first ``merge_r`` rows) and ``W_D``."""

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    weight_r: torch.Tensor
    weight_d: torch.Tensor
    eps: float


def modulate_blocks(channels: int) -> dict[str, int]:
    """``modulate_kernel``'s launch: all channels in one tile (LayerNorm needs the whole row), as
    many pairs as keep a tile at 4096 elements, and 8 warps (16 past 2048 channels). With 4 warps
    Triton 3.6 (the H200 image's) spills registers from 384 channels up and Triton 3.8 at 4096;
    8 spill in neither up to 2048 (``tools/aot_kernels.py`` prints registers and spills)."""
    full_c = triton.next_power_of_2(channels)
    return {
        "BLOCK_R": max(2, min(16, 4096 // full_c)),
        "BLOCK_C": full_c,
        "num_warps": 8 if full_c <= 2048 else 16,
    }


def merge_blocks(channels: int, norm: bool = False) -> dict[str, int]:
    """``merge_kernel``'s block sizes: 32 kept tokens x 128 channels per program (fewer channels
    where C is narrower, at least 16), 16 sources per one-hot ``tl.dot``. With the block's
    LayerNorm (``norm``) a program walks all the channels of its tokens in 128-wide tiles, so it
    takes 16 (``tl.dot``'s least) to keep twice the programs. A whole-row tile (16 x 1024 at
    ViT-B's width) needs 132 KB of shared memory for the ``tl.dot`` and spills without a
    modulation (Triton 3.6, sm_90), so the rows are not held whole."""
    block_c = min(128, max(16, triton.next_power_of_2(channels)))
    if norm:
        return {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_C": block_c, "num_warps": 8}
    return {"BLOCK_T": 32, "BLOCK_R": 16, "BLOCK_C": block_c}


class NormWeights(NamedTuple):
    """The LayerNorm after the merge (the block's ``norm2``) as ``merge_kernel`` applies it: affine
    weight and bias (C,), epsilon, and the dtype of the normalised tokens it writes."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    dtype: torch.dtype


def sum_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` on ``KERNEL_DTYPES`` (a pair of unequal ones promotes to fp32),
    without the dispatched call that would be one more operator per layer."""
    return a if a == b else torch.float32


_TRITON_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def launch_merge(
    x: torch.Tensor,
    size: torch.Tensor | None,
    perm: torch.Tensor,
    dst_out: torch.Tensor,
    weights: ModulationWeights | None,
    residual: torch.Tensor | None = None,
    norm: NormWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the kernels on ``x``'s GPU: ``modulate_kernel`` for PYRA (``weights`` given) into a
    (B, merge_r, C) fp32 buffer, then ``merge_kernel``; the merged tokens, their sizes, and with
    ``norm`` the merged tokens' LayerNorm in ``norm.dtype`` (else ``None``).

    ``perm`` and ``dst_out`` are a ``BipartiteMerge``'s, each with unit stride along a row;
    ``merge_r`` is ``dst_out``'s width. With ``residual`` the tokens are ``residual + x``.
    """
    batch, num_tokens, channels = x.shape
    merge_r = dst_out.shape[1]
    kept = num_tokens - merge_r
    dtype = x.dtype if residual is None else sum_dtype(x.dtype, residual.dtype)
    out = torch.empty(batch, kept, channels, device=x.device, dtype=dtype)
    out_size = torch.empty(batch, kept, 1, device=x.device, dtype=dtype)
    size_arg = x if size is None else size  # a placeholder pointer when there are no sizes
    size_strides = (0, 0) if size is None else (size.stride(0), size.stride(1))
    res_arg = x if residual is None else residual  # a placeholder pointer without a residual
    res_strides = (0, 0, 0) if residual is None else residual.stride()
    tokens = {"HAS_RESIDUAL": residual is not None, "SUM_DTYPE": getattr(tl, _TRITON_DTYPES[dtype])}
    sources = out  # a placeholder pointer for ToMe
    with on_device_of(x):  # Triton launches on the current GPU
        if weights is not None:
            sources = torch.empty(batch, merge_r, channels, device=x.device, dtype=torch.float32)
            modulate_kernel[(batch,)](
                x, res_arg, size_arg, perm, weights.norm_weight, weights.norm_bias, weights.weight_r,
                weights.weight_d, sources, kept, merge_r, channels, weights.eps,
                *x.stride(), *res_strides, *size_strides, perm.stride(0), weights.weight_r.stride(0),
                HAS_SIZE=size is not None, **tokens, **modulate_blocks(channels),
            )  # fmt: skip
        normed = (
            None if norm is None else torch.empty(batch, kept, channels, device=x.device, dtype=norm.dtype)
        )
        ln_args = (out, out, out, 0.0) if norm is None else (norm.weight, norm.bias, normed, norm.eps)
        blocks = merge_blocks(channels, norm=norm is not None)
        channel_blocks = 1 if norm is not None else triton.cdiv(channels, blocks["BLOCK_C"])
        grid = (batch, triton.cdiv(kept, blocks["BLOCK_T"]), channel_blocks)
        merge_kernel[grid](
            x, res_arg, size_arg, perm, dst_out, sources, out, out_size, *ln_args[:3],
            kept, merge_r, channels, ln_args[3],
            *x.stride(), *res_strides, *size_strides, perm.stride(0), dst_out.stride(0),
            HAS_SIZE=size is not None, MODULATED=weights is not None, NORM=norm is not None,
            **tokens, **blocks,
        )  # fmt: skip
    return out, out_size, normed


@torch.library.custom_op("pyra_lightning::merge_wavg", mutates_args=())
def merge_wavg_op(
    x: torch.Tensor,
    size: torch.Tensor | None,
    perm: torch.Tensor,
    dst_out: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight_r: torch.Tensor | None,
    weight_d: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``launch_merge`` as the operator ``torch.compile`` keeps in its graph (``compile_traced``):
    merged tokens (B, N - merge_r, C) and sizes (B, N - merge_r, 1) in the tokens' dtype.
    ``merge_r`` is ``dst_out``'s width; the four PYRA tensors are all ``None`` for ToMe (no
    modulation) or all given (eqs. 4-7); with ``residual`` the tokens are ``residual + x``."""
    weights = None if weight_r is None else ModulationWeights(norm_weight, norm_bias, weight_r, weight_d, eps)
    return launch_merge(x, size, perm, dst_out, weights, residual)[:2]


@merge_wavg_op.register_fake
def _merge_wavg_shapes(
    x: torch.Tensor,
    size: torch.Tensor | None,
    perm: torch.Tensor,
    dst_out: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    weight_r: torch.Tensor | None,
    weight_d: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes and dtype only: the PYRA tensors and epsilon do not change them."""
    batch, num_tokens, channels = x.shape
    kept = num_tokens - dst_out.shape[1]
    dtype = x.dtype if residual is None else sum_dtype(x.dtype, residual.dtype)
    return x.new_empty(batch, kept, channels, dtype=dtype), x.new_empty(batch, kept, 1, dtype=dtype)


from pyra_lightning.kernels import merge_backward  # noqa: E402, F401  (the operator's backward)
