"""PYRA's modulation backward (eqs. 4-7) as one Triton kernel, for eager training steps.

``merge_backward.modulation_backward`` writes the same gradient as about 20 torch operators on the
(B, r, C) pairs, each a kernel launch that an eager step's host must issue, in every merging
layer. Here one program per image walks the pairs' channels in six sweeps (the LayerNorm's mean,
its variance, ``M_info`` with δ_r and δ_D, the gates' gradients, the weights' gradients with the
LayerNorm backward's two row sums, and the inputs' gradients), keeping the per-pair values
(mean, rstd, δ_r, ...) in registers and the per-channel ones (σ(δ_D) and dL/dδ_D) in a (B, 2C)
scratch. The weights' gradients are per-image partial sums, added over the batch by one ``sum``,
so the result does not depend on the order in which programs finish (no atomics).

It runs where ``applies`` says so: the eager backward on CUDA (or the interpreter), at most
``MAX_PAIRS`` pairs a layer, since a program holds a vector per pair. While anything traces the
backward (``torch.compile``, AOTAutograd, ``make_fx``) it keeps the torch formula, which is then
recorded in the graph, and which inductor fuses into few kernels itself.
The gate is ``2σ(δ_r) - 1`` as in the forward kernel (``merging.modulate_kernel``), equal to the
torch formula's ``tanh(δ_r / 2)`` up to rounding.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from pyra_lightning.kernels import on_device_of, use_triton

try:  # ships with torch's CUDA builds
    import triton
    import triton.language as tl
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
    def _pair_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels):
        """The (R, C) tiles of ``M_s``, ``M_t`` and dL/dM'_s at ``rows`` x ``chans``; 0 where masked."""
        mask = rmask[:, None] & cmask[None, :]
        base = batch * 2 * merge_r * channels
        at = rows[:, None] * channels + chans[None, :]
        m_s = tl.load(pairs + base + at, mask=mask, other=0.0)
        m_t = tl.load(pairs + base + merge_r * channels + at, mask=mask, other=0.0)
        g = tl.load(grad + batch * merge_r * channels + at, mask=mask, other=0.0)
        return m_s, m_t, g, mask

    @triton.jit
    def modulation_backward_kernel(
        pairs, grad, norm_w, norm_b, weight_r, weight_d,
        grad_m_s, grad_both, partial, scratch,
        merge_r, channels, eps,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """One image's pairs: ``pairs`` (B, 2r, C) holds ``M_s`` then ``M_t``, ``grad`` (B, r, C)
        dL/dM'_s; writes dL/dM_s, dL/dM_t (= dL/d(M_s + M_t)), and per image in ``partial``
        (B, 3C + r) dL/d of the norm's weight, its bias, ``W_D`` and ``W_r``'s rows."""
        batch = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, BLOCK_R)
        rmask = rows < merge_r
        w_r = tl.load(weight_r + rows, mask=rmask, other=0.0)
        part = partial + batch * (3 * channels + merge_r)  # [weight | bias | W_D | W_r]
        sig_at = scratch + batch * 2 * channels  # σ(δ_D), then dL/dδ_D
        # sweeps 1-2: the LayerNorm's statistics of M_s + M_t (eq. 4), per pair
        total = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            m_s, m_t, _, mask = _pair_rows(
                pairs, grad, batch, rows, chans, rmask, chans < channels, merge_r, channels
            )
            total += tl.sum(m_s + m_t, axis=1)
        mean = total / channels
        total = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            m_s, m_t, _, mask = _pair_rows(
                pairs, grad, batch, rows, chans, rmask, chans < channels, merge_r, channels
            )
            centred = tl.where(mask, m_s + m_t - mean[:, None], 0.0)
            total += tl.sum(centred * centred, axis=1)
        rstd = tl.rsqrt(total / channels + eps)
        # sweep 3: M_info, δ_r = M_info W_D (per pair) and σ(δ_D), δ_D = Σ_pairs W_r M_info (eq. 5)
        delta_r = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            m_s, m_t, _, mask = _pair_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels)
            ln_w = tl.load(norm_w + chans, mask=cmask, other=0.0)
            ln_b = tl.load(norm_b + chans, mask=cmask, other=0.0)
            info = tl.where(
                mask, (m_s + m_t - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :], 0.0
            )
            delta_r += tl.sum(info * tl.load(weight_d + chans, mask=cmask, other=0.0)[None, :], axis=1)
            tl.store(sig_at + chans, tl.sigmoid(tl.sum(w_r[:, None] * info, axis=0)), mask=cmask)
        gate_r = 2.0 * tl.sigmoid(delta_r) - 1.0  # eq. 7's 2σ(δ_r) - 1
        # sweep 4: dL/dδ_D per channel and dL/dδ_r per pair, from M'_s = M_s (1 + 2σ(δ_D) gate_r)
        through_r = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            m_s, _, g, mask = _pair_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels)
            sig = tl.load(sig_at + chans, mask=cmask, other=0.0)
            g_ms = g * m_s
            grad_d = 2.0 * tl.sum(gate_r[:, None] * g_ms, axis=0) * sig * (1.0 - sig)
            tl.store(sig_at + channels + chans, grad_d, mask=cmask)
            through_r += tl.sum(g_ms * sig[None, :], axis=1)
        grad_r = through_r * (1.0 - gate_r * gate_r)  # d(2σ(δ) - 1)/dδ = (1 - gate²) / 2, times 2σ(δ_D)'s 2
        # sweep 5: the weights' gradients, and the LayerNorm backward's two sums per pair
        grad_wr = tl.zeros((BLOCK_R,), tl.float32)
        sum_g = tl.zeros((BLOCK_R,), tl.float32)
        sum_gx = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            m_s, m_t, _, mask = _pair_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels)
            ln_w = tl.load(norm_w + chans, mask=cmask, other=0.0)
            ln_b = tl.load(norm_b + chans, mask=cmask, other=0.0)
            normed = tl.where(mask, (m_s + m_t - mean[:, None]) * rstd[:, None], 0.0)
            info = tl.where(mask, normed * ln_w[None, :] + ln_b[None, :], 0.0)
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
        # sweep 6: dL/d(M_s + M_t) through the LayerNorm, and dL/dM_s's direct path
        for start in range(0, channels, BLOCK_C):
            chans = start + tl.arange(0, BLOCK_C)
            cmask = chans < channels
            m_s, m_t, g, mask = _pair_rows(pairs, grad, batch, rows, chans, rmask, cmask, merge_r, channels)
            ln_w = tl.load(norm_w + chans, mask=cmask, other=0.0)
            normed = tl.where(mask, (m_s + m_t - mean[:, None]) * rstd[:, None], 0.0)
            grad_d = tl.load(sig_at + channels + chans, mask=cmask, other=0.0)
            w_d = tl.load(weight_d + chans, mask=cmask, other=0.0)
            grad_normed = (grad_r[:, None] * w_d[None, :] + w_r[:, None] * grad_d[None, :]) * ln_w[None, :]
            both = rstd[:, None] * (
                grad_normed - sum_g[:, None] / channels - normed * (sum_gx[:, None] / channels)
            )
            sig = tl.load(sig_at + chans, mask=cmask, other=0.0)
            direct = g + g * (2.0 * sig[None, :] * gate_r[:, None])
            at = batch * merge_r * channels + rows[:, None] * channels + chans[None, :]
            tl.store(grad_m_s + at, direct + both, mask=mask)
            tl.store(grad_both + at, both, mask=mask)


def backward_blocks(merge_r: int, channels: int) -> dict[str, int]:
    """The kernel's blocks: every pair in one block (its per-pair vectors), channel blocks of at
    most ``_TILE`` elements per (pairs, channels) tile and at least 8 wide, and 8 warps."""
    block_r = triton.next_power_of_2(merge_r)
    block_c = max(8, min(triton.next_power_of_2(channels), _TILE // block_r))
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": 8}


def _traced(grad: torch.Tensor) -> bool:
    """Whether the backward is being traced rather than run: by ``torch.compile`` or AOTAutograd
    (fake or functional tensors) or ``make_fx`` (a proxy mode). A Triton launch made from Python
    would not be recorded in such a graph, so there the torch formula runs and is traced."""
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        return True
    return get_proxy_mode() is not None


def applies(grad: torch.Tensor, merge_r: int) -> bool:
    """Whether the backward runs the kernel: Triton launches for ``grad`` (CUDA or the
    interpreter), nothing traces it (inductor fuses the torch formula itself), and a layer of 1 to
    ``MAX_PAIRS`` pairs."""
    return 0 < merge_r <= MAX_PAIRS and not _traced(grad) and use_triton(grad)


def triton_modulation_backward(
    grad: torch.Tensor,
    pairs: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight_r: torch.Tensor,
    weight_d: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """``merge_backward.modulation_backward`` in one kernel launch and one ``sum``.

    Args:
        grad: dL/dM'_s, (B, r, C) fp32.
        pairs: ``M_s`` then ``M_t``, the size-weighted sources and destinations, (B, 2r, C) fp32.
        norm_weight, norm_bias: eq. 4's LayerNorm affine (C,), fp32; ``eps`` its epsilon.
        weight_r: ``W_r``'s first r rows, (r,) fp32; ``weight_d``: ``W_D``, (C,) fp32.

    Returns:
        dL/dM_s and dL/dM_t (B, r, C), and dL/d of the LayerNorm's weight and bias, ``W_r``'s
        rows (r,) and ``W_D`` (C,), all fp32 (``modulation_backward``'s order).
    """
    batch, merge_r, channels = grad.shape
    grad, pairs = grad.contiguous(), pairs.contiguous()
    weights = [t.contiguous() for t in (norm_weight, norm_bias, weight_r, weight_d)]
    grad_m_s, grad_both = grad.new_empty(grad.shape), grad.new_empty(grad.shape)
    partial = grad.new_empty(batch, 3 * channels + merge_r)  # per image; summed below
    scratch = grad.new_empty(batch, 2 * channels)
    with on_device_of(grad):
        modulation_backward_kernel[(batch,)](
            pairs, grad, *weights, grad_m_s, grad_both, partial, scratch, merge_r, channels, eps,
            **backward_blocks(merge_r, channels),
        )  # fmt: skip
    grad_weight, grad_bias, grad_wd, grad_wr = partial.sum(0).split([channels, channels, channels, merge_r])
    return grad_m_s, grad_both, grad_weight, grad_bias, grad_wr, grad_wd
