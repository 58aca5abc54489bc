"""Bipartite soft matching in ToMe's plain gather / scatter / cat form: the readable reference.

``merge.bipartite_soft_matching`` computes the same thing faster: it turns the match into row
numbers of the flattened batch so that one ``index_select`` and one ``index_add_`` do the work.
This module spells the algorithm out as ToMe (Bolya et al. 2023) writes it, extended from a
class token and a distillation token to any number of prefix tokens, and a test checks that the
two agree exactly, token order included. It is registered as the matcher ``"bipartite_reference"``.

The algorithm (PYRA paper §3.1, eqs. 2-3):

1. split the tokens alternately into A (even positions) and B (odd positions);
2. every A token proposes its most similar B token (cosine similarity of the metric);
3. the ``merge_r`` A tokens with the best proposals are merged into their B partners;
4. output order: prefix tokens in their original order, the remaining A tokens (sorted by
   position when there are prefix tokens), then the B tokens.
"""

from __future__ import annotations

import torch

from pyra_lightning.merge import MergeFn, Modulate, UnmergeFn, max_merge_r


def _prefix_first(unm: torch.Tensor, dst: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Concatenate the kept A tokens ``unm`` and B tokens ``dst``, prefix tokens in their original order."""
    source = (unm, dst)  # position i is A token i // 2 when i is even, B token i // 2 when odd
    prefix = [source[i % 2][:, i // 2 : i // 2 + 1] for i in range(num_prefix_tokens)]
    prefix_a, prefix_b = (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2
    return torch.cat([*prefix, unm[:, prefix_a:], dst[:, prefix_b:]], dim=1)


def bipartite_soft_matching_reference(
    metric: torch.Tensor, merge_r: int, num_prefix_tokens: int = 1
) -> tuple[MergeFn, UnmergeFn]:
    """Match ``merge_r`` token pairs by cosine similarity; same contract as ``merge.bipartite_soft_matching``.

    Args:
        metric: Similarity features, (B, N, C').
        merge_r: Number of tokens to remove, at most ``max_merge_r(N, num_prefix_tokens)``.
        num_prefix_tokens: Leading tokens that are never merged.
    """
    num_tokens = metric.shape[1]
    if merge_r < 0 or merge_r > max_merge_r(num_tokens, num_prefix_tokens):
        raise ValueError(f"merge_r={merge_r} is out of range for {num_tokens} tokens")
    if merge_r == 0:
        return (lambda x, mode="mean", modulate=None: x), (lambda x: x)
    prefix_a, prefix_b = (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        scores[..., :prefix_a, :] = -torch.inf  # prefix A tokens are never sources
        scores[..., :, :prefix_b] = -torch.inf  # prefix B tokens are never destinations
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx = edge_idx[..., merge_r:, :]
        src_idx = edge_idx[..., :merge_r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if num_prefix_tokens:
            unm_idx = unm_idx.sort(dim=-2)[0]

    def merge(x: torch.Tensor, mode: str = "mean", modulate: Modulate | None = None) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]  # (B, Na, C), (B, Nb, C)
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - merge_r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, merge_r, c))
        if modulate is not None:
            src = modulate(src, dst.gather(dim=-2, index=dst_idx.expand(n, merge_r, c)))
        if mode not in ("sum", "mean", "amax"):
            raise ValueError(f"merge mode={mode!r}: expected 'sum', 'mean' or 'amax'")
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, merge_r, c), src.to(dst.dtype), reduce=mode)
        return _prefix_first(unm, dst, num_prefix_tokens)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        n, _, c = x.shape
        head, rest = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        unm = torch.cat([head[:, 0::2], rest[:, : unm_len - prefix_a]], dim=1)
        dst = torch.cat([head[:, 1::2], rest[:, unm_len - prefix_a :]], dim=1)
        src = dst.gather(dim=-2, index=dst_idx.expand(n, merge_r, c))
        out = x.new_zeros(n, num_tokens, c)
        out[:, 1::2] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, merge_r, c), src=src)
        return out

    return merge, unmerge
