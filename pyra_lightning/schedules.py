"""Per-layer merge schedules: how many tokens (``merge_r``) each block merges.

``resolve_schedule`` accepts every form ``apply_merging`` takes:

- ``int``: the same ``merge_r`` in every layer;
- ``(r, inflection)``: ToMe's linear schedule; inflection -1 decreases, 0 is constant, +1 increases;
- ``list[int]``: one value per layer;
- ``"low"`` / ``"high"``: the paper's schedules for ViT-B/16, DeiT-B (distilled) and ViT-L/16 at
  224 px (Tables 2-5), the ones the reference implementation ships; for every other architecture
  and resolution, the paper's FLOPs fractions (0.500 and 0.289 of the uncompressed FLOPs) solved
  by the FLOPs solver below;
- ``float`` in (0, 1): a target fraction of the uncompressed model's FLOPs, solved for (below).

The FLOPs solver. The paper's schedules merge many tokens early and few late. We parametrise
that shape with one number ``rho`` in [0, 1]: layer l merges ``floor(rho * max_l)`` tokens, where
``max_l`` is half the mergeable tokens entering it. ``rho = 1`` halves the tokens in every layer;
smaller ``rho`` decays the token count geometrically. The FLOPs of a schedule follow from the
token count of every block (``block_flops``, the matmul FLOPs that ``torch.utils.flop_counter``
counts) plus what merging does not change (patch embedding, head), and the fraction is monotone
in ``rho``, so bisection finds the gentlest schedule whose FLOPs are at most the target. This is
how sizes the paper does not cover (ViT-S, ViT-H, DINOv2/v3, EVA-02, SigLIP, PE; patch 14 or 16;
224-512 px) get schedules.

Elastic runs (``training.elastic``) sample from the same family: ``fraction_schedule`` (1.0 is
no merging), ``elastic_capacity`` (the most pairs a layer merges anywhere in a fraction range,
the rows its PYRA is built with) and ``draw_fraction`` (a seeded draw, no global RNG).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass

from pyra_lightning.merge import max_merge_r

MergeSpec = int | float | str | tuple[int, float] | list[int]
# What configs and the command line take. ToMe's (r, inflection) is written "r,inflection" there: a
# two-entry YAML list stays a per-layer list, so it is never silently read as a ToMe schedule.
MergeArg = int | float | str | list[int] | None
ACCEPTED_FORMS = (
    "an int (the same merge_r in every block), 'r,inflection' (ToMe's linear schedule, e.g. '16,-1'), "
    "a list with one int per block, 'low'/'high' (the paper's schedules or FLOPs fractions), "
    "or a float in (0, 1) (a FLOPs fraction)"
)


@dataclass(frozen=True)
class ViTShape:
    """What a schedule depends on: depth, token counts and what each token costs.

    Per-token costs are multiply-adds of the linear layers, read off the model's modules (see
    ``patch_common.shape_from_modules``), so GluMlp/SwiGLU MLPs, separate or grouped-query q/k/v
    projections and attention gates count what they compute.

    Attributes:
        depth: Number of blocks.
        embed_dim: Token width D.
        num_patches: Patch tokens at the configured input size (196 for /16 at 224 px, 256 for
            /14 at 224 px, 1024 for /16 at 512 px).
        num_prefix_tokens: Class, distillation, register and storage tokens (never merged).
        attn_dim: Width of q and k summed over query heads, for ``q kᵀ`` and ``attn v``.
        attn_macs: Per block, multiply-adds per token of the attention's projections.
        mlp_macs: Per block, multiply-adds per token of the MLP.
        fixed_flops: FLOPs merging does not change: patch embedding, attention pool latent, head.
        pool_token_flops: Attention pooling FLOPs per token that reaches the pool (0 without).
        rope_token_flops: FLOPs per patch token of rebuilding a block's rotary embedding from the
            tokens' sources, paid in every block after the first one that merges (per-layer
            ``mixed`` RoPE, ``patch_eva.MergingEva.layer_rope``: ``source @ E_l``); 0 without.
    """

    depth: int
    embed_dim: int
    num_patches: int
    num_prefix_tokens: int
    attn_dim: int
    attn_macs: tuple[int, ...]
    mlp_macs: tuple[int, ...]
    fixed_flops: int = 0
    pool_token_flops: int = 0
    rope_token_flops: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens


# (depth, embed_dim, num_prefix_tokens, num_patches) -> schedules; from the paper / reference.
_VIT_B = (12, 768, 1, 196)
_DEIT_B_DISTILLED = (12, 768, 2, 196)
_VIT_L = (24, 1024, 1, 196)
_HIGH_B = [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3]
PAPER_SCHEDULES: dict[tuple[int, int, int, int], tuple[str, dict[str, list[int]]]] = {
    _VIT_B: ("ViT-B/16 @224", {"low": [16] * 11 + [10], "high": _HIGH_B}),
    _DEIT_B_DISTILLED: ("DeiT-B distilled @224", {"low": [16] * 6 + [10] * 6, "high": _HIGH_B}),
    _VIT_L: (
        "ViT-L/16 @224",
        {
            "low": [8] * 23 + [6],
            "high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
        },
    ),
}
# What "low" and "high" mean where the paper gives no list: its ViT-B/16 schedules' FLOPs fractions.
PAPER_FLOPS_FRACTIONS: dict[str, float] = {"low": 0.500, "high": 0.289}


def tome_schedule(merge_r: int, inflection: float, depth: int) -> list[int]:
    """ToMe's ``(r, inflection)`` schedule: linear from ``r(1 - inflection)`` to ``r(1 + inflection)``."""
    if not -1.0 <= inflection <= 1.0:
        raise ValueError(f"ToMe inflection must lie in [-1, 1], got {inflection}")
    low = int(merge_r * (1.0 - inflection))
    high = 2 * merge_r - low
    step = (high - low) / max(depth - 1, 1)
    return [int(low + step * i) for i in range(depth)]


def token_counts(schedule: list[int], shape: ViTShape) -> list[int]:
    """Tokens entering each block's attention, then the count after the last merge."""
    counts = [shape.num_tokens]
    for merge_r in schedule:
        counts.append(counts[-1] - merge_r)
    return counts


def validate_schedule(schedule: list[int], shape: ViTShape, where: str = "merge_r") -> None:
    """Raise ``ValueError`` naming the layer if a schedule is negative or merges too much."""
    if len(schedule) != shape.depth:
        raise ValueError(
            f"{where}: schedule has {len(schedule)} entries but the model has {shape.depth} blocks; "
            f"merge_r takes {ACCEPTED_FORMS}"
        )
    tokens = shape.num_tokens
    for layer, merge_r in enumerate(schedule):
        if not isinstance(merge_r, int) or isinstance(merge_r, bool):
            raise ValueError(f"{where}[{layer}] = {merge_r!r}: expected an integer")
        limit = max_merge_r(tokens, shape.num_prefix_tokens)
        if merge_r < 0 or merge_r > limit:
            raise ValueError(
                f"{where}[{layer}] = {merge_r} is out of range: block {layer} receives {tokens} tokens "
                f"({shape.num_prefix_tokens} prefix), so it can merge 0..{limit}"
            )
        tokens -= merge_r


def block_flops(attn_tokens: int, mlp_tokens: int, shape: ViTShape, layer: int = 0) -> int:
    """Matmul FLOPs of block ``layer`` (2 per multiply-add, as ``torch.utils.flop_counter`` counts)."""
    n = attn_tokens
    projections = 2 * n * shape.attn_macs[layer]  # q, k, v (fused or not), gate, output projection
    attention = 2 * 2 * n * n * shape.attn_dim  # q kᵀ and attn v, summed over heads
    mlp = 2 * mlp_tokens * shape.mlp_macs[layer]
    return projections + attention + mlp


def schedule_flops(schedule: list[int], shape: ViTShape) -> int:
    """Matmul FLOPs of the whole model; merging sits between each block's attention and its MLP.

    Left out: the merge's own products (bipartite scores, 2 * Na * Nb * C' per merging layer, and
    PYRA's generators, 4 * merge_r * D), 0.04% of ViT-B/16 at 224 px (tests/test_families.py
    counts them exactly), and element-wise operators, which ``torch.utils.flop_counter`` does not
    count either.
    """
    counts = token_counts(schedule, shape)
    blocks = sum(block_flops(counts[i], counts[i + 1], shape, i) for i in range(shape.depth))
    rebuilt = sum(counts[i] - shape.num_prefix_tokens for i in range(shape.depth) if any(schedule[:i]))
    return shape.fixed_flops + blocks + shape.pool_token_flops * counts[-1] + shape.rope_token_flops * rebuilt


def flops_fraction(schedule: list[int], shape: ViTShape) -> float:
    """Model FLOPs of ``schedule`` relative to the same model without merging.

    This is the ratio the paper reports: its ViT-B/16 schedules give 0.499 (low) and 0.289
    (high) of the uncompressed model's FLOPs, counting the patch embedding and head as well.
    """
    return schedule_flops(schedule, shape) / schedule_flops([0] * shape.depth, shape)


def _aligned(merge_r: int, tokens: int, num_prefix_tokens: int, align: int) -> int:
    """The ``merge_r`` nearest below (or, where it must, above) that leaves a multiple of ``align``.

    The token count after the merge is rounded up to a multiple of ``align`` (fewer tokens
    merged); where that would exceed the tokens there are (the first layer, 197 tokens at
    align 8), it is rounded down instead, within the layer's ``max_merge_r``.
    """
    if align == 1:
        return merge_r
    count = tokens - merge_r
    up = -(-count // align) * align
    count = up if up <= tokens else count // align * align
    if tokens - count > max_merge_r(tokens, num_prefix_tokens) or count <= num_prefix_tokens:
        raise ValueError(
            f"align={align}: a block receiving {tokens} tokens ({num_prefix_tokens} prefix) cannot "
            f"keep a multiple of {align} tokens within its max_merge_r of {max_merge_r(tokens, num_prefix_tokens)}"
        )
    return tokens - count


def _proportional(rho: float, shape: ViTShape, align: int = 1) -> list[int]:
    schedule, tokens = [], shape.num_tokens
    for _ in range(shape.depth):
        merge_r = math.floor(rho * max_merge_r(tokens, shape.num_prefix_tokens) + 1e-9)
        merge_r = _aligned(merge_r, tokens, shape.num_prefix_tokens, align)
        schedule.append(merge_r)
        tokens -= merge_r
    return schedule


def _check_align(align: int) -> None:
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive integer (1: no alignment), got {align!r}")


def proportional_schedule(rho: float, shape: ViTShape, align: int = 1) -> list[int]:
    """The solvers' one-parameter family: layer l merges ``floor(rho * max_l)`` tokens, rho in [0, 1].

    Shared by the FLOPs solver (below) and the benchmark's measured speed-target search. With
    ``align`` > 1 each layer's ``merge_r`` is adjusted (``_aligned``) so that every block after
    the first receives a multiple of ``align`` tokens, prefix tokens included: tensor cores and
    fused attention kernels tile the token axis by 8 or 16 (issue 17).
    """
    _check_align(align)
    return _proportional(rho, shape, align)


def solve_flops_schedule(target: float, shape: ViTShape, align: int = 1) -> list[int]:
    """The gentlest proportional schedule whose block FLOPs are at most ``target`` of the original.

    Args:
        target: FLOPs fraction in (0, 1).
        shape: The model's ``ViTShape``.
        align: Keep every token count after a merge a multiple of this (1: no constraint).
    """
    return _proportional(solve_flops_rho(target, shape, align), shape, align)


def solve_flops_rho(target: float, shape: ViTShape, align: int = 1) -> float:
    """The ``rho`` of ``solve_flops_schedule(target, shape, align)`` (the proportional family's parameter)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"a FLOPs target must lie strictly between 0 and 1, got {target}")
    _check_align(align)
    floor = flops_fraction(_proportional(1.0, shape, align), shape)
    if target < floor:
        raise ValueError(
            f"FLOPs target {target:.3f} is unreachable: halving the tokens in every block "
            f"{f'(counts aligned to {align}) ' if align > 1 else ''}already leaves {floor:.3f} of the FLOPs"
        )
    low, high = 0.0, 1.0  # fraction(low) > target >= fraction(high)
    for _ in range(50):
        mid = (low + high) / 2
        if flops_fraction(_proportional(mid, shape, align), shape) <= target:
            high = mid
        else:
            low = mid
    return high


# ------------------------------------------------------------------ elastic runs (sampling helpers)
def fraction_schedule(fraction: float, shape: ViTShape) -> list[int]:
    """A FLOPs fraction in (0, 1] as a schedule: 1.0 merges nothing, below it the FLOPs solver."""
    return [0] * shape.depth if fraction >= 1.0 else solve_flops_schedule(fraction, shape)


def elastic_capacity(min_fraction: float, max_fraction: float, shape: ViTShape) -> list[int]:
    """Per layer, at least as many tokens as any solved schedule in the range merges there.

    Tokens entering layer l do not increase with ``rho`` (one layer maps T to
    ``T - floor(rho * max_merge_r(T))``, nondecreasing in T, nonincreasing in rho). So on an
    interval [a, b] of rho, layer l merges at most ``floor(b * max_merge_r(T_l(a)))``; the maximum
    over ``pieces`` intervals between rho_lo (``max_fraction``) and rho_hi (``min_fraction``) is
    a bound for every schedule in between, tight up to one interval's width.
    """
    rho_lo = 0.0 if max_fraction >= 1.0 else solve_flops_rho(max_fraction, shape)
    rho_hi = 0.0 if min_fraction >= 1.0 else solve_flops_rho(min_fraction, shape)
    pieces = 512
    edges = [rho_lo + (rho_hi - rho_lo) * k / pieces for k in range(pieces + 1)]
    capacity = [0] * shape.depth
    for a, b in itertools.pairwise(edges):
        counts = token_counts(_proportional(a, shape), shape)
        for layer in range(shape.depth):
            bound = math.floor(b * max_merge_r(counts[layer], shape.num_prefix_tokens) + 1e-9)
            capacity[layer] = max(capacity[layer], bound)
    return capacity


def draw_fraction(seed: int, step: int, index: int, low: float, high: float) -> float:
    """A FLOPs fraction uniform in [low, high], a pure function of (seed, step, index).

    Its own generator, never the global RNG, so a resumed run draws what an uninterrupted one
    draws at the same step, and dropout's random stream is left as a plain run has it.
    """
    digest = hashlib.sha256(f"pyra-elastic:{seed}:{step}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).uniform(low, high)


def paper_schedule(name: str, shape: ViTShape) -> list[int]:
    """The ``low``/``high`` schedule for this architecture at this resolution.

    The paper's own lists are used where the paper defines them (same depth, width, prefix tokens
    and patch count). Elsewhere the names mean the paper's FLOPs fractions, solved for this
    architecture and resolution: ``low`` keeps at most 0.500 and ``high`` at most 0.289 of the
    uncompressed model's FLOPs, as the paper's ViT-B/16 schedules do.
    """
    if name not in PAPER_FLOPS_FRACTIONS:
        raise ValueError(f"unknown schedule name {name!r}; expected one of {sorted(PAPER_FLOPS_FRACTIONS)}")
    key = (shape.depth, shape.embed_dim, shape.num_prefix_tokens, shape.num_patches)
    if key in PAPER_SCHEDULES:
        return list(PAPER_SCHEDULES[key][1][name])
    try:
        return solve_flops_schedule(PAPER_FLOPS_FRACTIONS[name], shape)
    except ValueError as error:
        raise ValueError(
            f"schedule {name!r} means {PAPER_FLOPS_FRACTIONS[name]:.3f} of the FLOPs for this architecture "
            f"(depth={shape.depth}, embed_dim={shape.embed_dim}, prefix tokens={shape.num_prefix_tokens}, "
            f"patches={shape.num_patches}): {error}"
        ) from error


def parse_merge_spec(merge_r: MergeSpec) -> MergeSpec:
    """Read ToMe's ``"r,inflection"`` (also ``"(r, inflection)"``) string as the tuple it stands for."""
    if not isinstance(merge_r, str) or "," not in merge_r:
        return merge_r
    parts = merge_r.strip().strip("()").split(",")
    try:
        if len(parts) != 2:
            raise ValueError(merge_r)
        return int(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"merge_r={merge_r!r}: expected {ACCEPTED_FORMS}") from None


def resolve_schedule(merge_r: MergeSpec, shape: ViTShape) -> list[int]:
    """Turn any accepted ``merge_r`` form into a validated per-layer list."""
    merge_r = parse_merge_spec(merge_r)
    if isinstance(merge_r, bool):
        raise ValueError(f"merge_r={merge_r!r}: expected {ACCEPTED_FORMS}")
    if isinstance(merge_r, int):
        schedule = [merge_r] * shape.depth
    elif isinstance(merge_r, float):
        schedule = solve_flops_schedule(merge_r, shape)
    elif isinstance(merge_r, str):
        schedule = paper_schedule(merge_r, shape)
    elif isinstance(merge_r, tuple):
        if len(merge_r) != 2:
            raise ValueError(f"merge_r={merge_r!r}: a tuple must be (r, inflection)")
        schedule = tome_schedule(int(merge_r[0]), float(merge_r[1]), shape.depth)
    elif isinstance(merge_r, list):
        schedule = list(merge_r)
    else:
        raise ValueError(f"merge_r={merge_r!r}: expected {ACCEPTED_FORMS}")
    validate_schedule(schedule, shape)
    return schedule
