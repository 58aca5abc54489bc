"""The backward of the Triton merge (``pyra_lightning::merge_wavg``), so a training step keeps the kernels.

Autograd cannot see inside a Triton launch, so until this existed every step that recorded the
merge (training) ran the torch rule: about 30 operators per merging layer forward and as many
nodes backward. Here the forward stays the two kernels of ``kernels.merging`` and the backward is
written out by hand: in eager steps as Triton kernels (``kernels.merge_grad``: 3 launches a
PYRA layer, 1 for ToMe), and where anything traces it (``torch.compile``, whose inductor fuses it)
in torch (``_torch_backward``): gathers of (B, r, C) and (B, 2r, C) rows, the modulation's
backward on the (B, r, C) pairs (``modulation_backward``), and one ``scatter_add_`` of the whole
(B, N, C) gradient. It is registered on the custom operator (``torch.library``), so the
same formula runs eager and is traced into a compiled training step's backward graph.

With ``t = residual + x`` the layer's tokens (rounded as torch rounds the sum: the rounding's
gradient is the identity, as autograd takes it), ``s`` their sizes, ``K``, ``S`` and ``D`` the
kept tokens, the sources and the sources' destinations, and ``Ŝ`` the sizes of the merged tokens,
the forward is (eqs. 4-7 and the size-weighted average of §3.1)::

    M_s = S s_S,  M_t = D s_D,  M_info = LN(M_s + M_t)                      (eq. 4)
    δ_D = Σ_pairs W_r M_info,   δ_r = M_info W_D                             (eq. 5)
    M'_s = M_s + M_s ⊙ 2σ(δ_D) ⊙ (2σ(δ_r) - 1)                              (eqs. 6-7)
    out = (K s_K + Σ_{sources of a token} M'_s) / Ŝ

and ToMe's is the same with ``M'_s = M_s``. The sizes get no gradient: they count patches and are
never trainable. The torch rule detaches the merged sizes too (here ``Ŝ`` is marked
non-differentiable, so nothing downstream, such as proportional attention's ``log(size)``, sends
a gradient back to it); input sizes that require a gradient, which the torch rule would
differentiate through ``x * size``, are refused by ``kernel_applies`` and run the torch rule.
Everything is computed in fp32 and returned in the inputs' dtypes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from pyra_lightning.kernels import merge_grad, merging
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

    The torch formula: what a traced backward records (inductor fuses it), and what runs past
    ``merge_grad.MAX_PAIRS`` pairs, on CPU without the interpreter, or under ``create_graph``.
    Few operators all the same (it was once the eager path): the LayerNorm and its backward are
    one aten call each, the sums over pairs or channels are batched matmuls, and the gates'
    derivatives are aten's ``sigmoid_backward``/``tanh_backward``.

    Args:
        grad, m_s, m_t: (B, r, C) fp32: the gradient, the size-weighted sources and destinations.
        norm_weight, norm_bias: eq. 4's LayerNorm affine (C,), fp32; ``eps`` its epsilon.
        weight_r: ``W_r``'s first r rows, (r,) fp32; ``weight_d``: ``W_D``, (C,) fp32.

    Returns:
        dL/dM_s and dL/dM_t (B, r, C), and dL/d of the LayerNorm's weight and bias, ``W_r``'s
        rows (r,) and ``W_D`` (C,), all fp32.
    """
    channels = m_s.shape[-1]
    both = m_s + m_t  # (B, r, C)
    info, mean, rstd = torch.native_layer_norm(
        both, [channels], norm_weight, norm_bias, eps
    )  # M_info (eq. 4)
    sig_d = torch.sigmoid(torch.matmul(weight_r, info))  # σ(δ_D), δ_D = Σ_pairs W_r M_info: (B, C)
    gate_r = torch.tanh(torch.matmul(info, weight_d / 2))  # 2σ(δ_r) - 1 = tanh(δ_r / 2): (B, r)
    gate = (2 * sig_d)[:, None] * gate_r[..., None]  # 2σ(δ_D)(2σ(δ_r) - 1): (B, r, C)
    grad_m_s = torch.addcmul(grad, grad, gate)  # the direct path of M'_s = M_s (1 + gate)
    grad_ms = grad * m_s
    # d(2σ(δ))/dδ = 2σ(1 - σ) (sigmoid_backward of 2 x the gradient); d tanh(δ/2)/dδ = (1 - tanh²)/2
    grad_delta_d = torch.ops.aten.sigmoid_backward(
        2 * torch.matmul(gate_r[:, None], grad_ms)[:, 0], sig_d
    )  # (B, C)
    grad_delta_r = torch.ops.aten.tanh_backward(
        torch.matmul(grad_ms, sig_d[..., None])[..., 0], gate_r
    )  # (B, r)
    grad_info = torch.addcmul(grad_delta_r[..., None] * weight_d, weight_r[:, None], grad_delta_d[:, None])
    grad_weight_r = (info * grad_delta_d[:, None]).sum((0, 2))  # (r,)
    grad_weight_d = torch.matmul(grad_delta_r.reshape(1, -1), info.reshape(-1, channels))[0]  # (C,)
    grad_both, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
        grad_info, both, [channels], mean, rstd, norm_weight, norm_bias, [True, True, True]
    )
    return grad_m_s + grad_both, grad_both, grad_norm_weight, grad_norm_bias, grad_weight_r, grad_weight_d


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keep what the backward recomputes from: the plans, the sizes, the merged sizes that divide
    the gradient and, for PYRA only, the tokens (its backward re-reads the 2r pairs' rows; ToMe's
    needs only their shape and dtypes, so it keeps no (B, N, C) tensor alive)."""
    x, size, perm, dst_out, norm_weight, norm_bias, weight_r, weight_d, eps, residual = inputs
    ctx.mark_non_differentiable(output[1])  # sizes count patches: no gradient (see the module)
    # and no zeroed (B, kept, 1) gradient for them either: a kernel launch per layer for nothing
    ctx.set_materialize_grads(False)
    tokens = (x, residual) if weight_r is not None else (None, None)
    ctx.save_for_backward(*tokens, size, perm, dst_out, norm_weight, norm_bias, weight_r, weight_d, output[1])
    ctx.eps = eps
    ctx.token_shape, ctx.device_type = x.shape, x.device.type
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)


def _pair_weights(ctx: Any, merge_r: int) -> merge_grad.PairWeights:
    """PYRA's saved parameters in fp32, ``W_r`` cut to this layer's pairs."""
    norm_weight, norm_bias, weight_r, weight_d = ctx.saved_tensors[5:9]
    return merge_grad.PairWeights(
        norm_weight.float(), norm_bias.float(), weight_r[:merge_r, 0].float(), weight_d[0].float(), ctx.eps
    )


def _torch_backward(
    ctx: Any, grad_out: torch.Tensor, merge_r: int, kept: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The tokens' gradient (B, N, C) fp32 and PYRA's weights' (``merge_grad``'s results) in torch."""
    x, residual, size, perm, dst_out, _, _, weight_r, _, merged_size = ctx.saved_tensors
    channels = ctx.token_shape[-1]
    sizes = None if size is None else _rows(size, perm).float()  # (B, kept + r [+ r], 1)
    grad_total = grad_out.float() / merged_size.float()  # dL/d(the size-weighted sums): (B, kept, C)
    grad_sources = _rows(grad_total, dst_out)  # dL/dM'_s: each source's destination row (B, r, C)
    pieces = [grad_total, grad_sources]  # the gradient at perm's positions, before the sizes
    weight_grads: tuple[torch.Tensor, ...] = ()
    if weight_r is not None:  # back through the modulation (eqs. 4-7)
        pairs = _tokens(x, residual, perm[:, kept:])  # the sources, then their destinations (B, 2r, C)
        if sizes is not None:
            pairs = pairs * sizes[:, kept:]
        *weights, eps = _pair_weights(ctx, merge_r)
        grad_m_s, grad_m_t, *weight_grads = modulation_backward(
            grad_sources, pairs[:, :merge_r], pairs[:, merge_r:], *weights, eps
        )
        pieces = [grad_total, grad_m_s, grad_m_t]
    # every token is kept or a source once; a destination also feeds M_info, once per source
    grad_placed = torch.cat(pieces, 1)  # (B, kept + r [+ r], C)
    if sizes is not None:
        grad_placed = grad_placed * sizes  # the sums take s x (K, S, D)
    grad_tokens = grad_placed.new_zeros(ctx.token_shape)
    grad_tokens.scatter_add_(1, perm[..., None].expand(-1, -1, channels), grad_placed)
    return grad_tokens, tuple(weight_grads)


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_size: torch.Tensor | None) -> tuple[Any, ...]:
    """dL/d of ``merge_wavg_op``'s inputs from dL/d(merged tokens) (B, kept, C), in the order of its
    schema; ``None`` for the integer plans, ``eps`` and the sizes (see the module docstring)."""
    x, residual, size, perm, dst_out, norm_weight, norm_bias, weight_r, weight_d, merged_size = (
        ctx.saved_tensors
    )  # x and residual: None for ToMe
    if grad_out is None:  # the merged tokens were not used (gradients are not materialised)
        return (None,) * 10
    x_dtype, residual_dtype = ctx.dtypes
    merge_r = dst_out.shape[1]
    kept = ctx.token_shape[1] - merge_r
    pyra = weight_r is not None
    # perm: the kept tokens, the sources, then (PYRA) each source's destination (B, kept + r [+ r])
    # fp32 whatever autocast is on where backward() is called (meta, for counting, has no autocast)
    device_type = ctx.device_type
    exact = torch.autocast(device_type, enabled=False) if device_type != "meta" else contextlib.nullcontext()
    with exact:
        if merge_grad.applies(grad_out, merge_r, pyra):  # eager: 3 launches for PYRA, 1 for ToMe
            grad_tokens, weight_grads = merge_grad.triton_merge_backward(
                grad_out, merged_size, ctx.token_shape[1], size, perm, dst_out,
                (x, residual) if pyra else None, _pair_weights(ctx, merge_r) if pyra else None,
            )  # fmt: skip
        else:  # traced (torch.compile, AOTAutograd: inductor fuses it), or too many pairs
            grad_tokens, weight_grads = _torch_backward(ctx, grad_out, merge_r, kept)
    grad_x = grad_tokens.to(x_dtype) if ctx.needs_input_grad[0] else None
    grad_residual = None
    if residual_dtype is not None and ctx.needs_input_grad[9]:
        grad_residual = grad_tokens.to(residual_dtype)
    if not pyra:
        return (grad_x, None, None, None, None, None, None, None, None, grad_residual)
    grad_norm_weight, grad_norm_bias, grad_weight_r, grad_weight_d = weight_grads
    # an elastic layer's unused rows of W_r (built for more pairs than merged here) get 0
    if weight_r.shape[0] != merge_r:
        grad_weight_r = F.pad(grad_weight_r, (0, weight_r.shape[0] - merge_r))
    grad_weight_r = grad_weight_r[:, None]  # (built r, 1)
    return (
        grad_x, None, None, None, grad_norm_weight.to(norm_weight.dtype), grad_norm_bias.to(norm_bias.dtype),
        grad_weight_r.to(weight_r.dtype), grad_weight_d.to(weight_d.dtype)[None], None, grad_residual,
    )  # fmt: skip


torch.library.register_autograd(merging.merge_wavg_op, _backward, setup_context=_setup_context)
