"""Bipartite soft matching and size-weighted token merging (ToMe; PYRA paper §3.1, eqs. 2-3).

Everything here is a pure function of its tensors. Matching runs under ``no_grad`` once per
layer and returns ``merge``/``unmerge`` callables that reuse the same indices for every
tensor that must follow the merge (features, token sizes, sources).

Token order after a merge follows the reference implementation exactly, because the next
layer's split (eq. 2) depends on it: prefix tokens first in their original order,
then the unmerged tokens of the first set (sorted by index when prefix tokens exist, else in
descending score order), then the tokens of the second set.

Few operators per layer. On a GPU at small batches the merged model is bound by how fast the
host issues operators (BENCHMARKS.md, "GPU"), so the plan is built to need few of them:

- one gather (``x[batch, perm]``) copies the kept tokens straight into output order together
  with the sources (and, for PYRA, their destinations); one ``index_put_`` with
  ``accumulate=True`` sums the sources into their destinations;
- ``merge_wavg`` moves the features and the token sizes in that one gather and one sum, the
  size riding along as an extra channel ``[x * size, size]`` that is split off at the end;
- the constant index tensors (batch rows, the offsets of set B, the prefix mask) are built once
  per shape and device and cached (``constant``), except while a graph is being traced
  (``torch.compile``, ``torch.export``, ONNX export), where they are built inline and become
  constants of the graph; a CUDA graph capture reads the cached ones (its engine holds them)
  and builds only a missing one inline, uncached;
- the prefix mask is an additive (Na, Nb) matrix of 0/-inf fused into the score matmul
  (``baddbmm``); the order of sources is ``torch.sort(descending=True)``, the very call the
  reference's ``argsort`` makes, so ties resolve as in the reference.

``tools/count_ops.py`` counts the result: BENCHMARKS.md, "Operators per forward".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

# A PYRA modulation (eqs. 4-7): maps (sources, their destinations), both (B, merge_r, C) and
# size-weighted, to modulated sources of the same shape.
Modulate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_CACHE_LIMIT = 1024  # entries; one model at one batch size needs about 4 per merging layer


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


def _tracing(ref: torch.Tensor, plain: tuple[type, ...] = (torch.Tensor,)) -> bool:
    """Whether a graph is being traced (``torch.compile``, ``torch.jit.trace``, exports): then the
    merge takes the layout its exporters and compilers handle, and constants are made inline."""
    # fake and functional tensors (torch.export, ONNX export) are subclasses
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or type(ref) not in plain


def _capturing(ref: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream. The eager plan is captured
    as it is (its kernels are capturable), reading the constants a warm-up cached; only a missing
    constant is built inline and not cached: a tensor made during capture holds nothing until the
    graph is replayed. Asked also for a CPU ``ref`` once CUDA is up: a miss during a capture must
    never clear the cache, whose constants the graph may already read."""
    return (ref.is_cuda or torch.cuda.is_initialized()) and torch.cuda.is_current_stream_capturing()


def cached_constants() -> list[torch.Tensor]:
    """The constant index tensors cached now. A captured CUDA graph reads the ones it used at
    their addresses on every replay, so whoever holds the graph holds these too: the cache may
    drop them later (``_CACHE_LIMIT``), and freed memory would be reused under the graph."""
    return list(_CACHE.values())


def constant(key: tuple[Any, ...], ref: torch.Tensor, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` once per ``key`` and ``ref``'s device; never to be written in place."""
    if _tracing(ref):
        return build()
    key = (*key, ref.device)
    hit = _CACHE.get(key)
    if hit is None and _capturing(ref):
        return build()  # recorded into the graph, replayed with it; not cached
    if hit is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        # Normal tensors even inside inference_mode, so a cached index may be saved for backward.
        with torch.inference_mode(False), torch.no_grad():
            hit = build()
        _CACHE[key] = hit
    return hit


class _ViewCache(dict):
    """``_weight_view``'s store on a module: never copied or pickled with it (a copy has weights of
    its own, and views made under ``no_grad`` must not be deep-copied)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _ViewCache:
        return _ViewCache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_ViewCache, ())


def _weight_view(
    owner: Any, name: str, weight: torch.Tensor, view: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``view(weight)``, a view of the weight (a transpose, an expand), kept on ``owner`` in eager
    inference so that its operators are not dispatched on every forward.

    Only views are kept: they share the weight's storage, so every write into the weight (an
    optimizer step, ``load_state_dict``, ``.data.copy_`` as weight averaging swaps) shows through
    them. A weight that was replaced (another object, storage, dtype or device) is viewed again;
    training (autograd must record the view) and tracing always view it inline.
    """
    if torch.is_grad_enabled() or _tracing(weight, plain=(torch.Tensor, torch.nn.Parameter)):
        return view(weight)
    key = (weight.data_ptr(), weight.dtype, weight.device)
    cache = owner.__dict__.setdefault("_weight_views", _ViewCache())
    hit = cache.get(name)
    if hit is None or hit[0] is not weight or hit[1] != key:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference_mode
            made = view(weight)
        assert made._base is not None or made.data_ptr() == weight.data_ptr(), "only views may be kept"
        hit = cache[name] = (weight, key, made)
    return hit[2]


def _batch_rows(n: int, ref: torch.Tensor) -> torch.Tensor:
    return constant(("rows", n), ref, lambda: torch.arange(n, device=ref.device)[:, None])  # (B, 1)


def _prefix_mask(na: int, nb: int, prefix_a: int, prefix_b: int, ref: torch.Tensor) -> torch.Tensor:
    """Additive (Na, Nb) mask, -inf on rows of A's and columns of B's prefix tokens."""

    def build() -> torch.Tensor:
        rows = torch.arange(na, device=ref.device)[:, None] < prefix_a
        cols = torch.arange(nb, device=ref.device)[None, :] < prefix_b
        return torch.zeros(na, nb, device=ref.device, dtype=ref.dtype).masked_fill(rows | cols, -torch.inf)

    return constant(("mask", na, nb, prefix_a, prefix_b, ref.dtype), ref, build)


def _zeros(n: int, width: int, ref: torch.Tensor) -> torch.Tensor:
    return constant(
        ("zeros", n, width), ref, lambda: torch.zeros(n, width, dtype=torch.long, device=ref.device)
    )


class BipartiteMerge:
    """The plan of one matching: which tokens stay, which merge into which (all (B, k) indices).

    ``perm(with_dst)`` lists, per batch row, the token positions to gather: the N - merge_r
    kept tokens in output order, then the merge_r sources in descending score order, then
    (``with_dst``) their destinations. ``dst_out`` is where each source's destination sits in
    the output. Calling the object is ToMe's ``merge(x, mode, modulate)``. A matcher that
    computes ``perm`` (with destinations) and ``dst_out`` along with the indices (the Triton
    matcher's plan kernel) passes them in, and they are used as they are.
    """

    def __init__(
        self,
        num_tokens: int,
        num_prefix_tokens: int,
        unm: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        perm: torch.Tensor | None = None,
        dst_out: torch.Tensor | None = None,
    ) -> None:
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.unm, self.src, self.dst = unm, src, dst  # (B, Na - r), (B, r), (B, r): indices into A / B
        self.merge_r = src.shape[1]
        self.prefix_a = (num_prefix_tokens + 1) // 2
        self.prefix_b = num_prefix_tokens // 2
        # (B, r): B token j lands at output position unm_len + j
        self.dst_out = dst + unm.shape[1] if dst_out is None else dst_out
        self._planned_perm = perm  # (B, N + r) or None

    def perm(self, with_dst: bool) -> torch.Tensor:
        """(B, N [+ merge_r]) positions: 2 * (A index) + offset, assembled by one cat and one add
        (or the matcher's, given to the constructor)."""
        if self._planned_perm is not None:
            return self._planned_perm if with_dst else self._planned_perm[:, : self.num_tokens]
        n, unm_len, merge_r = self.unm.shape[0], self.unm.shape[1], self.merge_r
        nb, pb = self.num_tokens // 2, self.prefix_b
        parts = ([_zeros(n, pb, self.unm)] if pb else []) + [self.unm, _zeros(n, nb - pb, self.unm), self.src]
        parts += [self.dst] if with_dst else []

        def base() -> torch.Tensor:
            # Output slot s < P holds token s (prefix tokens in their order): slots < prefix_b get
            # s from the offset, the next prefix_a slots get 2 * (A index) + offset with A index
            # s - prefix_b (sorted unm starts with A's prefix tokens 0..prefix_a-1).
            slots = torch.arange(pb + self.prefix_a, device=self.unm.device)
            head = torch.where(slots < pb, slots, 2 * pb - slots)
            rest = unm_len - self.prefix_a
            odd = torch.arange(2 * pb + 1, self.num_tokens, 2, device=self.unm.device)
            zeros = torch.zeros(rest, dtype=torch.long, device=self.unm.device)
            tail = [torch.zeros(merge_r, dtype=torch.long, device=self.unm.device)]
            tail += [torch.ones(merge_r, dtype=torch.long, device=self.unm.device)] if with_dst else []
            return torch.cat([head, zeros, odd, *tail])[None]  # (1, N [+ r])

        key = ("perm", self.num_tokens, self.num_prefix_tokens, merge_r, with_dst)
        return torch.add(constant(key, self.unm, base), torch.cat(parts, dim=1), alpha=2)

    def _gather(self, x: torch.Tensor, with_dst: bool) -> list[torch.Tensor]:
        n, t, _ = x.shape  # (B, N, C)
        if t != self.num_tokens:
            raise ValueError(f"merge was matched on {self.num_tokens} tokens but got a tensor of {t}")
        gathered = x[_batch_rows(n, x), self.perm(with_dst)]  # (B, N [+ r], C)
        sizes = [t - self.merge_r, self.merge_r] + ([self.merge_r] if with_dst else [])
        return list(gathered.split(sizes, dim=1))

    def __call__(self, x: torch.Tensor, mode: str = "mean", modulate: Modulate | None = None) -> torch.Tensor:
        if mode not in ("sum", "mean", "amax"):
            raise ValueError(f"merge mode={mode!r}: expected 'sum', 'mean' or 'amax'")
        parts = self._gather(x, with_dst=modulate is not None)
        out, src = parts[0], parts[1]  # (B, N - r, C), (B, r, C)
        if modulate is not None:
            src = modulate(src, parts[2])
            src = src if src.dtype == out.dtype else src.to(out.dtype)
        rows = _batch_rows(x.shape[0], x)
        if mode == "amax":  # 0/1 source tracking for visualisation; never in a deployed model
            index = self.dst_out[..., None].expand(-1, -1, x.shape[-1])
            return out.scatter_reduce(1, index, src, reduce="amax")
        # ``index_put_(accumulate=True)`` exports to ONNX (ScatterND, reduction "add") and to
        # torch.export; scatter_reduce does not export to ONNX, so the inference path avoids it.
        out = _accumulate(out, (rows, self.dst_out), src)
        if mode == "mean":  # the destination counts as one member, as in ToMe
            count = torch.ones_like(
                out[..., :1]
            ).index_put_(  # (B, N - r, 1)
                (rows, self.dst_out), torch.ones_like(src[..., :1]), accumulate=True
            )
            out = out / count
        return out

    def wavg(
        self, x: torch.Tensor, size: torch.Tensor | None, modulate: Modulate | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``merge_wavg`` in one gather and one sum: size travels as channel C of ``[x * size, size]``."""
        n, t, c = x.shape
        if size is None:
            ones = constant(
                ("ones", n, t, x.dtype), x, lambda: torch.ones(n, t, 1, dtype=x.dtype, device=x.device)
            )
            weighted = torch.cat([x, ones], dim=-1)  # (B, N, C + 1)
        else:
            size = size if size.dtype == x.dtype else size.to(x.dtype)
            weighted = torch.cat([x * size, size], dim=-1)
        parts = self._gather(weighted, with_dst=modulate is not None)
        out, src = parts[0], parts[1]  # (B, N - r, C + 1), (B, r, C + 1)
        if modulate is not None:
            src = _modulate_with_size(modulate, src, parts[2], c)
            src = src if src.dtype == out.dtype else src.to(out.dtype)
        out = _accumulate(out, (_batch_rows(n, x), self.dst_out), src)
        total, size = out.split([c, 1], dim=-1)
        if torch.is_grad_enabled():
            # Sizes are patch counts: no parameter reaches them (the index plan is not
            # differentiable), and the reference computes them outside autograd. Riding in the
            # gather beside the tokens they would carry a graph, and the next layer's log(size)
            # mask would make SDPA's backward compute a (B, H, N, N) mask gradient for nothing.
            size = size.detach()
        # The next layer's SDPA mask is log(size). In eager inference log() writes a fresh dense
        # tensor (stride 1 on the token axis), so the split's view is enough; traced graphs
        # (torch.export's decompositions) and autograd's saved tensors get a contiguous copy.
        if _tracing(size) or torch.is_grad_enabled():
            size = size.contiguous()
        return total / size, size

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        unm_idx, src_idx, dst_idx = self.unm[..., None], self.src[..., None], self.dst[..., None]
        unm_len, npt, merge_r = unm_idx.shape[1], self.num_prefix_tokens, self.merge_r
        n, _, c = x.shape
        if npt <= 1:
            unm, dst = x[:, :unm_len], x[:, unm_len:]
        else:
            head, rest = x[:, :npt], x[:, npt:]
            unm = torch.cat([head[:, 0::2], rest[:, : unm_len - self.prefix_a]], dim=1)
            dst = torch.cat([head[:, 1::2], rest[:, unm_len - self.prefix_a :]], dim=1)
        src = dst.gather(dim=-2, index=dst_idx.expand(n, merge_r, c))
        out = x.new_zeros(n, self.num_tokens, c)
        out[:, 1::2] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, merge_r, c), src=src)
        return out


def _accumulate(
    out: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], src: torch.Tensor
) -> torch.Tensor:
    """``out[index] += src``: in place in eager inference; out of place where autograd records it,
    because ``out`` is one of several views ``split`` returned, which autograd forbids writing in
    place, and while a graph is traced (the ONNX exporter's decompositions mis-track the strides
    of a view written in place; compilers remove the copy)."""
    if _tracing(out) or (torch.is_grad_enabled() and (out.requires_grad or src.requires_grad)):
        return out.index_put(index, src, accumulate=True)
    return out.index_put_(index, src, accumulate=True)


def _modulate_with_size(modulate: Modulate, src: torch.Tensor, dst: torch.Tensor, c: int) -> torch.Tensor:
    """Apply ``modulate`` to channels ``:c`` of (B, r, C + 1) pairs; the size channel passes through."""
    fused = fused_pyra(modulate, src, dst, c)
    if fused is not None:
        return fused
    src_x, src_size = src.split([c, 1], dim=-1)
    return torch.cat([modulate(src_x, dst[..., :c]), src_size], dim=-1)


def fusable_pyra(modulate: Any, rows: int) -> bool:
    """Whether ``modulate`` is PYRA's eqs. 4-7 (``PyraModulation``, variant ``"pyra"``) for ``rows``
    pairs: its own ``merge_r``, or fewer for an elastic layer (the first rows of ``W_r``)."""
    built = getattr(modulate, "merge_r", -1)
    elastic = getattr(modulate, "elastic", False) and 0 < rows < built
    return getattr(modulate, "variant", None) == "pyra" and (rows == built or elastic)


def fused_pyra(modulate: Any, src: torch.Tensor, dst: torch.Tensor, c: int) -> torch.Tensor | None:
    """PYRA's eqs. 4-7 in 10 operators on (B, r, C + 1) pairs whose channel C is the size.

    The same function as ``PyraModulation`` with variant ``"pyra"`` (tests/test_merge.py checks
    it), written to need few operators, with ``2σ(δ_r) - 1 = tanh(δ_r / 2)``:
    ``M_s + 2 (M_s ⊙ σ(δ_D)) ⊙ tanh(δ_r / 2)``, where ``σ(δ_D)`` is padded with a 0 for the
    size channel so that the size passes through unchanged. The transposed weights are views
    kept between eager inference forwards (``_weight_view``), and the halving is the product's
    ``alpha`` (exact in floating point). ``None`` for every other modulation (ablation variants,
    user callables): they run as themselves.
    """
    rows = src.shape[-2]
    if not fusable_pyra(modulate, rows):
        return None
    norm = modulate.norm
    n = src.shape[0]
    weight_r_t = _weight_view(modulate, f"W_r^T[:{rows}]", modulate.weight_r, lambda w: w[:rows].mT)  # (1, r)
    weight_d_t = _weight_view(modulate, f"W_D^T x{n}", modulate.weight_d, lambda w: w.mT.expand(n, -1, -1))
    info = F.layer_norm((src + dst)[..., :c], (c,), norm.weight, norm.bias, norm.eps)  # M_info, eq. 4
    delta_d = weight_r_t @ info  # δ_D = M_info W_r, eq. 5: (B, 1, C)
    zero = constant(("zero", info.dtype), info, lambda: torch.zeros((), dtype=info.dtype, device=info.device))
    # δ_r / 2, δ_r = W_D M_info of eq. 5: (B, r, C) @ (B, C, 1), halved by the product's alpha
    half_delta_r = torch.baddbmm(zero, info, weight_d_t, beta=0, alpha=0.5)
    gate_d = F.pad(torch.sigmoid(delta_d), (0, 1))  # σ(δ_D), 0 on the size channel: (B, 1, C + 1)
    return torch.addcmul(src, src * gate_d, torch.tanh(half_delta_r), value=2)  # eqs. 6-7


def bipartite_soft_matching(
    metric: torch.Tensor,
    merge_r: int,
    num_prefix_tokens: int = 1,
    match_fn: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]] | None = None,
) -> tuple[MergeFn, UnmergeFn]:
    """Match ``merge_r`` token pairs by cosine similarity of ``metric`` (eqs. 2-3).

    Tokens are split alternately into sets A (even positions) and B (odd positions): eq. 2 calls
    the split random, the reference implementation (ToMe's code) alternates, and we follow the
    code, whose outputs and token order tests/test_interop.py checks. Each A token
    proposes its most similar B token; the ``merge_r`` best proposals are merged. Prefix tokens
    (class, distillation, registers) sit at positions ``< num_prefix_tokens``: the even ones can
    never be a source and the odd ones never a destination, so they pass through untouched.

    Ties: sources are ordered by ``torch.sort(descending=True)`` of each A token's best score,
    the call the reference's ``argsort`` makes, and each A token's partner is
    ``max(dim=-1)``'s index; equal scores resolve as they do in the reference on the same device.

    Args:
        metric: Similarity features, (B, N, C'); PYRA/ToMe use the keys averaged over heads.
        merge_r: Number of tokens to remove. Must not exceed ``max_merge_r``.
        num_prefix_tokens: Leading tokens that are never merged.
        match_fn: What computes ``(src, dst, unm)``; ``match`` (torch) by default, the Triton
            kernels for the ``"triton"`` matcher. It must order them exactly as ``match`` does,
            and may return the plan's ``perm`` (with destinations) and ``dst_out`` after them.

    Returns:
        ``merge(x, mode, modulate)`` mapping (B, N, C) to (B, N - merge_r, C) (a
        ``BipartiteMerge``), and ``unmerge`` mapping merged tokens back to (B, N, C) by copying
        each merged token to its members.
    """
    num_tokens = metric.shape[1]
    if merge_r < 0 or merge_r > max_merge_r(num_tokens, num_prefix_tokens):
        raise ValueError(
            f"merge_r={merge_r} is out of range for {num_tokens} tokens with {num_prefix_tokens} "
            f"prefix tokens: expected 0 <= merge_r <= {max_merge_r(num_tokens, num_prefix_tokens)}"
        )
    if merge_r == 0:
        return _identity, _identity_unmerge
    with torch.no_grad():
        src, dst, unm, *planned = (match_fn or match)(metric, merge_r, num_prefix_tokens)
    plan = BipartiteMerge(num_tokens, num_prefix_tokens, unm, src, dst, *planned)
    return plan, plan.unmerge


def node_maxima(metric: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3's best B partner of every A token: (B, Na) cosine maxima and their B indices, prefix
    rows and columns at -inf (the numbers ``match`` ranks)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, C'), (B, Nb, C')
    prefix_a, prefix_b = (num_prefix_tokens + 1) // 2, num_prefix_tokens // 2
    if num_prefix_tokens:
        mask = _prefix_mask(a.shape[1], b.shape[1], prefix_a, prefix_b, a)  # in a's dtype
        scores = torch.baddbmm(mask, a, b.mT)  # (B, Na, Nb), prefix rows/columns -inf
    else:
        scores = a @ b.mT
    return scores.max(dim=-1)  # best B partner of every A token


def match(metric: torch.Tensor, merge_r: int, num_prefix_tokens: int) -> tuple[torch.Tensor, ...]:
    """The torch matcher: ``(src, dst, unm)`` indices, (B, r) into A, (B, r) into B, (B, Na - r) into A.

    ``unm`` is sorted by index when prefix tokens exist (they must stay in front), else in
    descending score order, as in the reference.
    """
    node_max, node_idx = node_maxima(metric, num_prefix_tokens)  # (B, Na) each
    edge_idx = torch.sort(node_max, dim=-1, descending=True).indices  # (B, Na)
    src, unm = edge_idx.split([merge_r, edge_idx.shape[1] - merge_r], dim=1)
    dst = node_idx.gather(1, src)  # (B, r)
    if num_prefix_tokens:
        unm = torch.sort(unm, dim=1).values  # keeps A's prefix tokens in front
    return src, dst, unm


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
    if isinstance(merge, BipartiteMerge) and not _tracing(x):
        # The one-gather plan, in eager only: the ONNX exporter's decomposition pass mis-tracks
        # the layout of the next attention when the sizes come out of the shared gather (a
        # ``view`` of its output fails); a traced graph is fused by its compiler anyway.
        return merge.wavg(x, size, modulate)
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
