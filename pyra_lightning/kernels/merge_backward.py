"""The backward of the Triton merge (``pyra_lightning::merge_wavg``), so a training step keeps the kernels.

Autograd cannot see inside a Triton launch, so until this existed every step that recorded the
merge (training) ran the torch rule: about 30 operators per merging layer forward and as many
nodes backward. Here the forward stays the two kernels of ``kernels.merging`` and the backward is
written out by hand in torch, on (B, merge_r, C) pairs plus two gathers and two scatters of the
whole (B, N, C) gradient. It is registered on the custom operator (``torch.library``), so the
same formula runs eager and is traced into a compiled training step's backward graph.

With ``t = residual + x`` the layer's tokens (rounded as torch rounds the sum: the rounding's
gradient is the identity, as autograd takes it), ``s`` their sizes, ``K``, ``S`` and ``D`` the
kept tokens, the sources and the sources' destinations, and ``Ŝ`` the sizes of the merged tokens,
the forward is (eqs. 4-7 and the size-weighted average of §3.1)::

    M_s = S s_S,  M_t = D s_D,  M_info = LN(M_s + M_t)                      (eq. 4)
    δ_D = Σ_pairs W_r M_info,   δ_r = M_info W_D                             (eq. 5)
    M'_s = M_s + M_s ⊙ 2σ(δ_D) ⊙ (2σ(δ_r) - 1)                              (eqs. 6-7)
    out = (K s_K + Σ_{sources of a token} M'_s) / Ŝ

and ToMe's is the same with ``M'_s = M_s``. The sizes get no gradient: they count patches, are
never trainable, and the torch rule does not differentiate them either (``Ŝ`` is marked
non-differentiable, so nothing downstream, such as proportional attention's ``log(size)``,
sends a gradient back to it). Everything is computed in fp32 and returned in the inputs' dtypes.
"""

from __future__ import annotations

from typing import Any

import torch

from pyra_lightning.kernels import merging
from pyra_lightning.kernels.merging import sum_dtype


def _rows(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``tensor``'s (B, N, W) rows at ``positions`` (B, R): (B, R, W)."""
    return tensor.gather(1, positions[..., None].expand(-1, -1, tensor.shape[-1]))


def _tokens(x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """The layer's tokens ``residual + x`` at ``positions``, rounded as the forward rounds them, in fp32."""
    rows = _rows(x, positions)
    if residual is not None:
        rows = (_rows(residual, positions) + rows).to(sum_dtype(x.dtype, residual.dtype))
    return rows.float()


def modulation_backward(
    grad: torch.Tensor,
    m_s: torch.Tensor,
    m_t: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight_r: torch.Tensor,
    weight_d: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, ...]:
    """Gradients of PYRA's modulated sources ``M'_s`` (eqs. 4-7) from ``grad`` = dL/dM'_s.

    Args:
        grad, m_s, m_t: (B, r, C) fp32: the gradient, the size-weighted sources and destinations.
        norm_weight, norm_bias: eq. 4's LayerNorm affine (C,), fp32; ``eps`` its epsilon.
        weight_r: ``W_r``'s first r rows, (r,) fp32; ``weight_d``: ``W_D``, (C,) fp32.

    Returns:
        dL/dM_s and dL/dM_t (B, r, C), and dL/d of the LayerNorm's weight and bias, ``W_r``'s
        rows (r,) and ``W_D`` (C,), all fp32.
    """
    both = m_s + m_t  # (B, r, C)
    mean = both.mean(-1, keepdim=True)
    centred = both - mean
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)  # (B, r, 1), biased as layer_norm
    normed = centred * rstd
    info = normed * norm_weight + norm_bias  # M_info (eq. 4)
    gate_d = 2 * torch.sigmoid(torch.einsum("brc,r->bc", info, weight_r))[:, None]  # 2σ(δ_D): (B, 1, C)
    gate_r = torch.tanh((info @ weight_d)[..., None] / 2)  # 2σ(δ_r) - 1: (B, r, 1)
    grad_m_s = grad * (1 + gate_d * gate_r)  # the direct path of M'_s = M_s (1 + gate_d gate_r)
    grad_ms = grad * m_s
    # through the gates: d(2σ(δ))/dδ = 2σ(1 - σ), i.e. gate_d (1 - gate_d / 2) and (1 - gate_r²) / 2
    grad_delta_d = (grad_ms * gate_r).sum(1, keepdim=True) * gate_d * (1 - gate_d / 2)  # (B, 1, C)
    grad_delta_r = (grad_ms * gate_d).sum(-1, keepdim=True) * (1 - gate_r.square()) / 2  # (B, r, 1)
    grad_info = weight_r[:, None] * grad_delta_d + grad_delta_r * weight_d  # (B, r, C)
    grad_weight_r = (info * grad_delta_d).sum((0, 2))  # (r,)
    grad_weight_d = (grad_delta_r * info).sum((0, 1))  # (C,)
    grad_norm_weight = (grad_info * normed).sum((0, 1))
    grad_norm_bias = grad_info.sum((0, 1))
    grad_normed = grad_info * norm_weight  # LayerNorm's backward over the channels
    grad_both = rstd * (
        grad_normed
        - grad_normed.mean(-1, keepdim=True)
        - normed * (grad_normed * normed).mean(-1, keepdim=True)
    )
    return grad_m_s + grad_both, grad_both, grad_norm_weight, grad_norm_bias, grad_weight_r, grad_weight_d


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keep what the backward recomputes from: the inputs (not the (B, r, C) intermediates, which
    cost less to recompute than to hold) and the merged sizes that divide the gradient."""
    x, size, perm, dst_out, norm_weight, norm_bias, weight_r, weight_d, eps, residual = inputs
    ctx.mark_non_differentiable(output[1])  # sizes count patches: no gradient (see the module)
    ctx.save_for_backward(
        x, size, perm, dst_out, norm_weight, norm_bias, weight_r, weight_d, residual, output[1]
    )
    ctx.eps = eps


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_size: torch.Tensor | None) -> tuple[Any, ...]:
    """dL/d of ``merge_wavg_op``'s inputs from dL/d(merged tokens) (B, kept, C), in the order of its
    schema; ``None`` for the integer plans, ``eps`` and the sizes (see the module docstring)."""
    x, size, perm, dst_out, norm_weight, norm_bias, weight_r, weight_d, residual, merged_size = (
        ctx.saved_tensors
    )
    batch, num_tokens, channels = x.shape
    merge_r = dst_out.shape[1]
    kept = num_tokens - merge_r
    with torch.autocast(x.device.type, enabled=False):
        grad_total = grad_out.float() / merged_size.float()  # dL/d(the size-weighted sums): (B, kept, C)
        grad_kept = grad_total if size is None else grad_total * _rows(size, perm[:, :kept]).float()
        grad_sources = _rows(grad_total, dst_out)  # dL/dM'_s: each source's destination row (B, r, C)
        size_s = 1.0 if size is None else _rows(size, perm[:, kept : kept + merge_r]).float()
        weight_grads: tuple[torch.Tensor | None, ...] = (None,) * 4
        grad_dst = None
        if weight_r is not None:  # PYRA: back through the modulation (eqs. 4-7)
            dst_pos = perm[:, kept + merge_r :]  # (B, r): each source's destination in the tokens
            size_d = 1.0 if size is None else _rows(size, dst_pos).float()
            m_s = _tokens(x, residual, perm[:, kept : kept + merge_r]) * size_s
            m_t = _tokens(x, residual, dst_pos) * size_d
            grad_m_s, grad_m_t, *weight_grads = modulation_backward(
                grad_sources, m_s, m_t, norm_weight.float(), norm_bias.float(),
                weight_r[:merge_r, 0].float(), weight_d[0].float(), ctx.eps,
            )  # fmt: skip
            grad_sources, grad_dst = grad_m_s, grad_m_t * size_d
        grad_sources = grad_sources * size_s  # M_s = S s_S (ToMe sums M_s itself)
        # the kept tokens and the sources are every token once: one scatter places them all
        grad_tokens = x.new_zeros(batch, num_tokens, channels, dtype=torch.float32)
        placed = perm[:, : kept + merge_r, None].expand(-1, -1, channels)
        grad_tokens.scatter_(1, placed, torch.cat([grad_kept, grad_sources], 1))
        if grad_dst is not None:  # destinations also feed M_info, several sources per destination
            grad_tokens.scatter_add_(1, dst_pos[..., None].expand(-1, -1, channels), grad_dst)
    grad_x = grad_tokens.to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_residual = None
    if residual is not None and ctx.needs_input_grad[9]:
        grad_residual = grad_tokens.to(residual.dtype)
    if weight_r is not None:
        full_r = weight_r.new_zeros(weight_r.shape, dtype=torch.float32)  # an elastic layer's unused rows: 0
        full_r[:merge_r, 0] = weight_grads[2]
        weight_grads = (
            weight_grads[0].to(norm_weight.dtype),
            weight_grads[1].to(norm_bias.dtype),
            full_r.to(weight_r.dtype),
            weight_grads[3].to(weight_d.dtype)[None],
        )
    return (grad_x, None, None, None, *weight_grads, None, grad_residual)


torch.library.register_autograd(merging.merge_wavg_op, _backward, setup_context=_setup_context)
