"""Bipartite soft matching and size-weighted token merging (ToMe; PYRA paper §3.1, eqs. 2-3).

Everything here is a pure function of its tensors. Matching runs under ``no_grad`` once per
layer and returns ``merge``/``unmerge`` closures that reuse the same indices for every
tensor that must follow the merge (features, token sizes, sources).

Token order after a merge follows the reference implementation exactly, because the next
layer's alternating split (eq. 2) depends on it: prefix tokens first in their original order,
then the unmerged tokens of the first set (sorted by index when prefix tokens exist), then the
tokens of the second set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

# A PYRA modulation (eqs. 4-7): maps (sources, their destinations), both (B, merge_r, C) and
# size-weighted, to modulated sources of the same shape.
Modulate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MergeFn(Protocol):
    def __call__(
        self, x: torch.Tensor, mode: str = "mean", modulate: Modulate | None = None
    ) -> torch.Tensor: ...


class UnmergeFn(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _identity(x: torch.Tensor, mode: str = "mean", modulate: Modulate | None = None) -> torch.Tensor:
    return x


def _identity_unmerge(x: torch.Tensor) -> torch.Tensor:
    return x


def max_merge_r(num_tokens: int, num_prefix_tokens: int) -> int:
    """Most tokens one layer may merge: half of the mergeable (non-prefix) tokens."""
    return (num_tokens - num_prefix_tokens) // 2


def bipartite_soft_matching(
    metric: torch.Tensor, merge_r: int, num_prefix_tokens: int = 1
) -> tuple[MergeFn, UnmergeFn]:
    """Match ``merge_r`` token pairs by cosine similarity of ``metric`` (eqs. 2-3).

    Tokens are split alternately into sets A (even positions) and B (odd positions). Each A token
    proposes its most similar B token; the ``merge_r`` best proposals are merged. Prefix tokens
    (class, distillation, registers) sit at positions ``< num_prefix_tokens``: the even ones can
    never be a source and the odd ones never a destination, so they pass through untouched.

    Args:
        metric: Similarity features, (B, N, C'); PYRA/ToMe use the keys averaged over heads.
        merge_r: Number of tokens to remove. Must not exceed ``max_merge_r``.
        num_prefix_tokens: Leading tokens that are never merged.

    Returns:
        ``merge(x, mode, modulate)`` mapping (B, N, C) to (B, N - merge_r, C), and ``unmerge``
        mapping merged tokens back to (B, N, C) by copying each merged token to its members.
    """
    num_tokens = metric.shape[1]
    if merge_r < 0 or merge_r > max_merge_r(num_tokens, num_prefix_tokens):
        raise ValueError(
            f"merge_r={merge_r} is out of range for {num_tokens} tokens with {num_prefix_tokens} "
            f"prefix tokens: expected 0 <= merge_r <= {max_merge_r(num_tokens, num_prefix_tokens)}"
        )
    if merge_r == 0:
        return _identity, _identity_unmerge

    prefix_a = (num_prefix_tokens + 1) // 2  # prefix tokens in set A (positions 0, 2, ...)
    prefix_b = num_prefix_tokens // 2  # prefix tokens in set B (positions 1, 3, ...)

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        if num_prefix_tokens:
            # A constant (Na, Nb) mask rather than in-place writes: an exported graph gets one
            # ``Where`` instead of a ScatterND per prefix set.
            rows = torch.arange(scores.shape[-2], device=scores.device)[:, None] < prefix_a
            cols = torch.arange(scores.shape[-1], device=scores.device)[None, :] < prefix_b
            scores = scores.masked_fill(rows | cols, -torch.inf)

        node_max, node_idx = scores.max(dim=-1)  # best B partner of every A token
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx = edge_idx[..., merge_r:, :]  # A tokens that stay
        src_idx = edge_idx[..., :merge_r, :]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # their B partners
        if num_prefix_tokens:
            unm_idx = unm_idx.sort(dim=-2)[0]  # keeps A's prefix tokens in front
        device, n, unm_len, out_len = metric.device, metric.shape[0], unm_idx.shape[1], num_tokens - merge_r
        # Everything ``merge`` moves, as row numbers of the batch flattened to (B * N, C): one
        # ``index_select`` copies the kept tokens straight into output order and one
        # ``index_add_`` sums the sources into their destinations, instead of gathering set A,
        # scattering into a copy of set B and concatenating the two (2x faster for ViT-B on CPU).
        row0 = torch.arange(0, n * num_tokens, num_tokens, device=device)[:, None]  # (B, 1)
        if num_prefix_tokens <= 1:
            first = torch.add(row0, unm_idx[..., 0], alpha=2)  # unmerged A tokens, class token first
            odd_start = 1
        else:  # all prefix tokens in their original order, then the other unmerged A tokens
            prefix = torch.arange(num_prefix_tokens, device=device) + row0
            first = torch.cat([prefix, torch.add(row0, unm_idx[:, prefix_a:, 0], alpha=2)], dim=1)
            odd_start = 2 * prefix_b + 1
        odd = torch.arange(odd_start, num_tokens, 2, device=device) + row0  # the rest of set B
        keep_rows = torch.cat([first, odd], dim=1).flatten()  # B * (N - merge_r)
        src_rows = torch.add(row0, src_idx[..., 0], alpha=2).flatten()  # B * merge_r
        # Set B token j lands at output position unm_len + j (prefix B tokens come earlier, but
        # they are never destinations).
        out_row0 = torch.arange(unm_len, n * out_len, out_len, device=device)[:, None]
        dst_out_rows = (out_row0 + dst_idx[..., 0]).flatten()  # B * merge_r

    def merge(x: torch.Tensor, mode: str = "mean", modulate: Modulate | None = None) -> torch.Tensor:
        n, t, c = x.shape  # (B, N, C)
        if t != num_tokens:
            raise ValueError(f"merge was matched on {num_tokens} tokens but got a tensor of {t}")
        rows = x.reshape(n * t, c)
        out = rows.index_select(0, keep_rows)  # (B * (N - merge_r), C)
        src = rows.index_select(0, src_rows)  # (B * merge_r, C)
        if modulate is not None:
            dst = rows.index_select(0, torch.add(row0 + 1, dst_idx[..., 0], alpha=2).flatten())
            src = modulate(src.view(n, merge_r, c), dst.view(n, merge_r, c)).reshape(n * merge_r, c)
        src = src.to(out.dtype)
        if mode == "amax":  # 0/1 source tracking for visualisation; never in a deployed model
            out.scatter_reduce_(0, dst_out_rows[:, None].expand(-1, c), src, reduce="amax")
        elif mode in ("sum", "mean"):
            # ``index_add_`` exports to ONNX (ScatterND, reduction "add") and torch.export;
            # scatter_reduce does not export to ONNX, so the inference path never uses it.
            out.index_add_(0, dst_out_rows, src)
            if mode == "mean":  # the destination counts as one member, as in ToMe
                count = torch.ones_like(out[:, :1]).index_add_(0, dst_out_rows, torch.ones_like(src[:, :1]))
                out = out / count
        else:
            raise ValueError(f"merge mode={mode!r}: expected 'sum', 'mean' or 'amax'")
        return out.view(n, t - merge_r, c)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        n, _, c = x.shape
        if num_prefix_tokens <= 1:
            unm, dst = x[:, :unm_len], x[:, unm_len:]
        else:
            head = x[:, :num_prefix_tokens]
            rest = x[:, num_prefix_tokens:]
            unm = torch.cat([head[:, 0::2], rest[:, : unm_len - prefix_a]], dim=1)
            dst = torch.cat([head[:, 1::2], rest[:, unm_len - prefix_a :]], dim=1)
        src = dst.gather(dim=-2, index=dst_idx.expand(n, merge_r, c))
        out = x.new_zeros(n, num_tokens, c)
        out[:, 1::2] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, merge_r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(
    merge: MergeFn,
    x: torch.Tensor,
    size: torch.Tensor | None = None,
    modulate: Modulate | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by a size-weighted average and return the new token sizes.

    As in the reference implementation, tokens are multiplied by their size before the merge, so
    a PYRA ``modulate`` sees (and modulates) the size-weighted tokens ``x * size`` that the
    weighted average sums; the sum is then divided by the merged size.

    Args:
        merge: From ``bipartite_soft_matching``.
        x: Tokens, (B, N, C).
        size: How many patches each token stands for, (B, N, 1); ``None`` means all ones.
        modulate: Optional PYRA modulation applied to the sources before they are summed.

    Returns:
        Merged tokens (B, N - merge_r, C) and their sizes (B, N - merge_r, 1).
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum", modulate=modulate)
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Track which input patches each merged token contains, for visualisation.

    Args:
        merge: From ``bipartite_soft_matching``.
        x: Tokens, (B, N, C); only their count is used when ``source`` is None.
        source: (B, N, N0) 0/1 membership of the N current tokens over the N0 input tokens.

    Returns:
        Membership after the merge, (B, N - merge_r, N0).
    """
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")


def weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Average tokens weighted by how many patches each stands for: (B, N, C) -> (B, C).

    Plain averaging after merging would over-weight merged regions' neighbours; weighting by size
    makes the pooled feature equal to the unmerged model's mean when merging is exact.
    """
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(dim=1) / size.sum(dim=1)
