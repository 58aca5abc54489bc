"""Elastic merging: one fit that stays good across a range of merge rates (issue 18).

A plain PYRA run trains one schedule (``model.merging.merge_r``). An elastic run (``model.merging.elastic``)
trains the same LoRA, PYRA and head for every FLOPs fraction in ``[min_fraction, max_fraction]``
of the uncompressed model, so that it can be evaluated and deployed at any point of the
accuracy-speed curve chosen after training.

Training (the sandwich rule of slimmable networks). Each step runs the batch at:

- the fastest schedule of the range (``min_fraction``), when ``sandwich`` is on;
- one schedule drawn uniformly from the range, by ``schedules.draw_fraction`` from the run's seed,
  the global step and the batch index (never the global RNG, so a resumed run is exact);
- the uncompressed model (no merging), with ``include_full``;

and sums the cross-entropy losses before one optimizer step. Every fraction is solved by the
FLOPs solver (``schedules.fraction_schedule``). Cost per step, in forward-backward passes of the
uncompressed model: ``min_fraction + (min_fraction + max_fraction) / 2 (+ 1)``, i.e. about
0.93x of one plain unmerged step for the default range 0.289..1.0 (1.93x with ``include_full``),
against 0.289x for a plain ``high`` fit; the solver itself costs microseconds.

Shared parameters. Each layer's PYRA is built once, for the most pairs it merges anywhere in
the range (``schedules.elastic_capacity``, and the paper's own low/high lists where those fall
in the range), with ``PyraModulation(elastic=True)``: at a lower rate it uses the first rows of
``W_r``. Sources arrive sorted by descending similarity, so row i means "the i-th best pair" at
every rate. LoRA, ``W_D``, the LayerNorm of eq. 4 and the head are shared unchanged.

Changing the schedule is cheap: ``scheduled`` runs the model through shallow copies of its
blocks that carry another ``merge_r`` (no module is rebuilt and no parameter copied). Copies,
not attributes set on the blocks, because activation checkpointing recomputes each block during
the single backward over the summed losses: every recomputation must see its own schedule.

The nominal schedule (``model.merging.merge_r``) is what validation, ``test_acc`` and a checkpoint-alone
export use; it must lie in the range.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pyra_lightning.modulation import PyraModulation, resolve_variant
from pyra_lightning.patch import apply_merging, merge_schedule, model_shape
from pyra_lightning.schedules import (
    PAPER_SCHEDULES,
    MergeSpec,
    ViTShape,
    draw_fraction,
    elastic_capacity,
    flops_fraction,
    fraction_schedule,
    resolve_schedule,
)
from pyra_lightning.training.settings import ElasticRange

# A schedule's fraction may exceed the one it was solved for by rounding; this much is "inside".
FRACTION_TOLERANCE = 1e-3


ELASTIC_KEY, SCHEDULE_KEY = "model.merging.elastic", "model.merging.merge_r"  # in run settings


@dataclass(frozen=True)
class ElasticConfig:
    """A checked ``ElasticRange`` with its defaults filled in."""

    min_fraction: float = 0.289
    max_fraction: float = 1.0
    sandwich: bool = True
    include_full: bool = False
    curve: tuple[float | str, ...] = ()


def resolve_elastic(value: ElasticRange | dict[str, Any] | None) -> ElasticConfig | None:
    """Check ``model.merging.elastic``: ``None`` is a plain run, ``{}`` the default range.

    Raises:
        ValueError: naming the key and what was expected.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"model.merging.elastic: expected a mapping like {{min_fraction: 0.289}}, got {value!r}"
        )
    known = set(ElasticConfig.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"model.merging.elastic: unknown key(s) {unknown}; expected some of {sorted(known)}")
    config = ElasticConfig(**{**value, "curve": tuple(value.get("curve") or ())})
    if not 0.0 < config.min_fraction <= config.max_fraction <= 1.0:
        raise ValueError(
            f"model.merging.elastic: expected 0 < min_fraction <= max_fraction <= 1, got "
            f"min_fraction={config.min_fraction}, max_fraction={config.max_fraction}"
        )
    for point in config.curve:
        if not (point in ("low", "high") or (isinstance(point, float | int) and 0.0 < point <= 1.0)):
            raise ValueError(
                f"model.merging.elastic.curve: {point!r} is not a FLOPs fraction in (0, 1] or low/high"
            )
    return config


@dataclass(frozen=True)
class ElasticPlan:
    """What an elastic model was built for: the range, its shape and each layer's PYRA rows."""

    config: ElasticConfig
    shape: ViTShape
    capacity: tuple[int, ...]  # per layer, the most pairs any in-range schedule merges there

    def describe(self) -> str:
        """The range as deployed: from the fastest schedule's own fraction, which the solver's
        rounding down puts at or below ``min_fraction`` (``high`` at 0.283 for a 0.289 range)."""
        return f"{self.lowest:.3f}..{self.config.max_fraction:.3f} of the uncompressed FLOPs"

    @functools.cached_property
    def lowest(self) -> float:
        """The smallest FLOPs fraction inside the range: ``min_fraction`` or the fastest's, below it."""
        return min(self.config.min_fraction, flops_fraction(self.fastest, self.shape))

    @functools.cached_property
    def fastest(self) -> list[int]:
        """The schedule of ``min_fraction``: the sandwich's lower slice."""
        return fraction_schedule(self.config.min_fraction, self.shape)

    @functools.cached_property
    def bounds(self) -> tuple[float, float]:
        """The FLOPs fractions accepted as inside: from the fastest solved schedule (at most
        ``min_fraction``, by the solver's rounding down) to ``max_fraction``, with a tolerance."""
        return self.lowest - FRACTION_TOLERANCE, self.config.max_fraction + FRACTION_TOLERANCE

    def check(self, schedule: Sequence[int], where: str = "merge_r") -> float:
        """Refuse a schedule outside the trained range; return its FLOPs fraction."""
        fraction = flops_fraction(list(schedule), self.shape)
        low, high = self.bounds
        if not low <= fraction <= high:
            raise ValueError(
                f"{where}={list(schedule)} keeps {fraction:.3f} of the FLOPs, outside this elastic "
                f"model's trained range {self.describe()}"
            )
        over = [i for i, (m, c) in enumerate(zip(schedule, self.capacity, strict=True)) if m > c]
        if over:
            i = over[0]
            raise ValueError(
                f"{where}[{i}] = {schedule[i]}: this elastic model's block {i} was trained for at most "
                f"{self.capacity[i]} merged pairs (range {self.describe()}, per-layer maximum "
                f"{list(self.capacity)})"
            )
        return fraction

    def schedule(self, point: float | str) -> list[int]:
        """A curve point (a FLOPs fraction, ``"low"``/``"high"``) as this model's schedule."""
        return (
            fraction_schedule(point, self.shape)
            if isinstance(point, float | int)
            else resolve_schedule(point, self.shape)
        )

    def step_schedules(self, seed: int, step: int, index: int) -> list[list[int]]:
        """The schedules one training step runs (fastest, drawn, full; see the module docstring)."""
        cfg = self.config
        drawn = draw_fraction(seed, step, index, cfg.min_fraction, cfg.max_fraction)
        schedules = [list(self.fastest)] if cfg.sandwich else []
        schedules.append(fraction_schedule(drawn, self.shape))
        if cfg.include_full:
            schedules.append([0] * self.shape.depth)
        return schedules

    def curve_points(self) -> list[float | str]:
        """The points ``test`` evaluates, in order of decreasing FLOPs, those inside the range."""
        cfg = self.config
        if cfg.curve:
            return list(cfg.curve)
        low, high = (flops_fraction(self.schedule(n), self.shape) for n in ("low", "high"))
        candidates: list[float | str] = [cfg.max_fraction, (cfg.max_fraction + low) / 2, "low"]
        candidates += [(low + high) / 2, "high"]
        inside, (lowest, highest) = [], self.bounds
        for point in candidates:
            fraction = point if isinstance(point, float) else (low if point == "low" else high)
            if lowest <= fraction <= highest:
                inside.append(round(point, 4) if isinstance(point, float) else point)
        return inside


def _paper_lists_in_range(config: ElasticConfig, shape: ViTShape) -> list[list[int]]:
    key = (shape.depth, shape.embed_dim, shape.num_prefix_tokens, shape.num_patches)
    lists = list(PAPER_SCHEDULES[key][1].values()) if key in PAPER_SCHEDULES else []
    fastest = flops_fraction(fraction_schedule(config.min_fraction, shape), shape)
    low = min(config.min_fraction, fastest) - FRACTION_TOLERANCE
    high = config.max_fraction + FRACTION_TOLERANCE
    return [list(s) for s in lists if low <= flops_fraction(list(s), shape) <= high]


def elastic_merging(
    model: nn.Module,
    elastic: ElasticRange | dict[str, Any],
    merge_r: MergeSpec,
    pyra: bool | str = True,
    prop_attn: bool = True,
    matcher: str = "bipartite",
    merger: str = "wavg",
    attention: str = "sdpa",
) -> ElasticPlan:
    """``apply_merging`` for a range: PYRA layers at the range's capacity, blocks at ``merge_r``,
    merging by the named ``matcher`` and ``merger`` (``merge_rules``), attending with ``attention``.

    Raises:
        ValueError: a bad range, or a nominal ``merge_r`` outside it.
    """
    config = resolve_elastic(elastic)
    assert config is not None
    shape = model_shape(model)
    try:
        capacity = elastic_capacity(config.min_fraction, config.max_fraction, shape)
    except ValueError as error:
        raise ValueError(f"model.merging.elastic.min_fraction={config.min_fraction}: {error}") from None
    for listed in _paper_lists_in_range(config, shape):
        capacity = [max(a, b) for a, b in zip(capacity, listed, strict=True)]
    plan = ElasticPlan(config, shape, tuple(capacity))
    low, high = plan.bounds
    if isinstance(merge_r, float) and not low <= merge_r <= high:  # before the solver's own refusal
        raise ValueError(
            f"model.merging.merge_r={merge_r}: outside this elastic model's trained range {plan.describe()}"
        )
    nominal = resolve_schedule(merge_r, shape)
    plan.check(nominal, "model.merging.merge_r")
    variant = resolve_variant(pyra)
    # blocks patched, at merge_r
    rule = {"matcher": matcher, "merger": merger, "attention": attention}
    apply_merging(model, nominal, pyra=False, prop_attn=prop_attn, **rule)
    for block, block_cap in zip(model.blocks, capacity, strict=True):
        if variant is not None and block_cap > 0:  # a capacity list is no valid schedule itself
            ref = block.norm1.weight
            pyra_layer = PyraModulation(block_cap, model.embed_dim, variant, elastic=True)
            block.pyra = pyra_layer.to(device=ref.device, dtype=ref.dtype)
    return plan


@contextlib.contextmanager
def scheduled(model: nn.Module, schedule: Sequence[int]) -> Iterator[nn.Module]:
    """Run ``model`` at ``schedule`` inside the block: its blocks are swapped for shallow copies
    carrying the schedule's ``merge_r`` (parameters and submodules shared), then put back."""
    blocks = model.blocks
    views = []
    for block, block_r in zip(blocks, schedule, strict=True):
        view = copy.copy(block)  # a new __dict__; _modules, _parameters are the same objects
        view.merge_r = int(block_r)
        views.append(view)
    # timm's ViT holds its blocks in an nn.Sequential, Eva in an nn.ModuleList.
    model.blocks = nn.ModuleList(views) if isinstance(blocks, nn.ModuleList) else nn.Sequential(*views)
    try:
        yield model
    finally:
        model.blocks = blocks


def deployable(model: nn.Module, schedule: Sequence[int] | None = None) -> nn.Module:
    """Set ``schedule`` (default: the blocks' own) and cut each elastic PYRA to it, in place.

    The result has the shapes ``apply_merging(model, schedule)`` builds, so export and
    ``load_exported`` treat it as any plain PYRA model.
    """
    schedule = merge_schedule(model) if schedule is None else list(schedule)
    for block, block_r in zip(model.blocks, schedule, strict=True):
        block.merge_r = int(block_r)
        pyra = getattr(block, "pyra", None)
        if isinstance(pyra, PyraModulation) and pyra.elastic:
            block.pyra = pyra.truncated(int(block_r)) if block_r > 0 else None
    return model


def accept_elastic_schedule(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The deployment policy for ``export``: ``now``'s settings, with a changed ``model.merging.merge_r``
    accepted when the checkpoint is elastic and both name the same range (the module was built
    with the new schedule, which ``ElasticPlan.check`` already placed inside the range). A plain
    checkpoint's changed schedule is left for the caller to refuse."""
    if recorded.get(ELASTIC_KEY) is None or recorded.get(ELASTIC_KEY) != now.get(ELASTIC_KEY):
        return now
    return {**now, SCHEDULE_KEY: recorded.get(SCHEDULE_KEY)}


def export_record(plan: ElasticPlan | None, model: nn.Module) -> dict[str, Any] | None:
    """``config.json["elastic"]`` of an export: the trained range and the exported point."""
    if plan is None:
        return None
    schedule = merge_schedule(model)
    return {
        "min_fraction": plan.config.min_fraction,
        "max_fraction": plan.config.max_fraction,
        "merge_r": schedule,
        "flops_fraction": round(flops_fraction(schedule, plan.shape), 6),
    }


def curve_entry(
    point: float | str, schedule: list[int], plan: ElasticPlan, accuracy: float
) -> dict[str, Any]:
    """One entry of ``results.json["curve"]``, before timing adds ``gflops``/``throughput``/``speedup``."""
    fraction = flops_fraction(schedule, plan.shape)
    return {
        "point": point,
        "flops_fraction": round(fraction, 6),
        "merge_r": schedule,
        "gflops": None,
        "throughput": None,
        "speedup": None,
        "test_acc": accuracy if math.isfinite(accuracy) else None,
    }


def elastic_curve(
    module: Any, points: Sequence[tuple[float | str, list[int], nn.Module, Any]]
) -> list[dict[str, Any]]:
    """``results.json["curve"]`` of an elastic ``test``: accuracy, GFLOPs and timing per point.

    Timing is the run's ``InferenceThroughput`` callback's (engine, threads, clock, batch size,
    precision, warm-up, runs; none when it is off or absent): every point and the uncompressed
    model are timed round-robin in one ``time_models`` call, so speed-ups compare forwards taken
    side by side, measured as the nominal figure in ``results.json`` ``benchmark`` says.

    Args:
        module: The ``PyraClassifier`` under test (its trainer, device and hyperparameters).
        points: ``(point, schedule, deployable model, accuracy metric)`` per curve point.
    """
    from pyra_lightning.accounting import count_flops
    from pyra_lightning.timing import images_per_second
    from pyra_lightning.training.callbacks import InferenceThroughput

    plan = module.elastic_plan
    img_size = module.hparams.img_size
    entries = []
    for point, schedule, model, accuracy in points:
        entry = curve_entry(point, schedule, plan, float(accuracy.compute()))
        entry["gflops"] = count_flops(model, img_size) / 1e9
        entries.append(entry)
    trainer = module.trainer
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, InferenceThroughput) and cb.enabled), None)
    if timer is None or not trainer.is_global_zero:
        return entries
    models = {f"point{i}": model for i, (_, _, model, _) in enumerate(points)}
    full = next((name for name, (_, s, _, _) in zip(models, points, strict=True) if not any(s)), None)
    if full is None:
        full = "uncompressed"
        models[full] = deployable(copy.deepcopy(points[0][2]), [0] * plan.shape.depth)
    times, _ = timer.time_models(models, img_size, module.device)  # as the nominal figure was taken
    reference = images_per_second(timer.batch_size, times[full])
    for entry, name in zip(entries, models, strict=False):
        entry["throughput"] = images_per_second(timer.batch_size, times[name])
        entry["speedup"] = entry["throughput"] / reference
    return entries
