"""The report's throughput column: how each figure was measured, and ``report --measure``.

A throughput (and a speed-up) depends on where and how it was timed as much as on the model: in
one sweep on a shared 2-core CPU the same tiny model and schedule gave speed-ups from 0.22x to
2.2x. So the report treats speed like this:

- **without** ``--measure`` the figures of ``results.json`` are shown only with the conditions
  they were taken under (``benchmark``, written by ``InferenceThroughput``: engine, device,
  threads, clock, precision, batch size; ``results.COMPARABLE_CONDITIONS``). When the rows'
  conditions differ, the column is *marked*, with a footnote naming what differs and pointing to
  ``--measure``, rather than refused: the accuracies in the table are right whatever the timing,
  and the footnote makes sure no one reads the speeds as comparable;
- **with** ``--measure`` every row's model is rebuilt from its settings (random weights: speed
  does not depend on them), and all of them, plus the unmerged backbone each speed-up is relative
  to, are timed side by side in one interleaved benchmark (``timing.time_interleaved``, the
  protocol of ``pyra-lightning benchmark``) on this machine, now. These figures replace the
  files' in the table and the figure, and the table says so.

torch and timm are imported only when ``--measure`` runs, so ``report --help`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from pyra_lightning.commands.table import Result
from pyra_lightning.results import COMPARABLE_CONDITIONS

UNRECORDED = "not recorded"
MEASURE_HINT = "`report --measure` times every row side by side on this machine"


def recorded_conditions(result: Result) -> dict[str, Any]:
    """The ``COMPARABLE_CONDITIONS`` of a result's throughput (``"not recorded"`` where missing)."""
    benchmark = result.get("benchmark") or {}
    recorded = {key: benchmark.get(key, UNRECORDED) for key in COMPARABLE_CONDITIONS}
    if recorded["engine"] == UNRECORDED and result.get("throughput_engine"):
        recorded["engine"] = result["throughput_engine"]
    return recorded


def describe_conditions(conditions: dict[str, Any]) -> str:
    """``eager on cpu (AMD EPYC 7B13), 1 thread(s), wall clock, precision 32, batch 64``."""
    return (
        f"{conditions.get('engine')} on {conditions.get('device')} ({conditions.get('device_name')}), "
        f"{conditions.get('threads')} thread(s), {conditions.get('clock')} clock, "
        f"precision {conditions.get('precision')}, batch {conditions.get('batch_size')}"
    )


def _load_range(results: Sequence[Result]) -> str:
    loads = [
        load[0]
        for result in results
        for key in ("loadavg_before", "loadavg_after")
        if isinstance(load := (result.get("benchmark") or {}).get(key), list) and load
    ]
    return f"; 1-minute load average {min(loads):g} to {max(loads):g}" if loads else ""


def throughput_note(results: Sequence[Result]) -> tuple[str | None, bool]:
    """The footnote of the throughput column and whether its figures are comparable.

    Returns:
        ``(None, True)`` without any throughput; else the note (the shared conditions, or which
        conditions differ between the rows and how to get comparable figures) and ``False``
        when the conditions differ or were not recorded.
    """
    timed = [result for result in results if result.get("throughput") is not None]
    if not timed:
        return None, True
    values: dict[str, set[str]] = {key: set() for key in COMPARABLE_CONDITIONS}
    for result in timed:
        for key, value in recorded_conditions(result).items():
            values[key].add(value if isinstance(value, str) else json.dumps(value))
    differing = [key for key, seen in values.items() if len(seen) > 1]
    if differing:
        listed = "; ".join(f"{key}: {' vs '.join(sorted(values[key]))}" for key in differing)
        return (
            "NOT COMPARABLE: the throughputs (and speed-ups) of this column were measured under different "
            f"conditions ({listed}){_load_range(timed)}. {MEASURE_HINT}.",
            False,
        )
    shared = recorded_conditions(timed[0])
    if UNRECORDED in shared.values():
        return (
            f"throughput from results.json, whose conditions were not recorded (files written before "
            f"pyra-lightning recorded them), so they cannot be compared; {MEASURE_HINT}.",
            False,
        )
    return f"throughput from results.json, every figure taken alike: {describe_conditions(shared)}" + (
        _load_range(timed) + "."
    ), True


# ------------------------------------------------------------------------------------ --measure
def model_spec(result: Result) -> dict[str, Any]:
    """What rebuilds a result's deployed model: backbone, schedule, modulation, input size.

    Read from ``settings`` (the run's flags), with ``config`` for what it resolved (the schedule
    as a per-layer list, the input size) and for files written before ``settings`` existed.

    Raises:
        ValueError: naming the file when it does not say which model it is.
    """
    settings, config = result.get("settings") or {}, result.get("config") or {}
    model_name = settings.get("model.model_name") or config.get("model_name")
    if not model_name:
        raise ValueError(
            f"{result.get('results_file', '?')}: no model_name in its settings or config, so report "
            "--measure cannot rebuild its model"
        )
    merge_r = config.get("merge_r", settings.get("model.merging.merge_r"))
    pyra = settings.get("model.merging.pyra", config.get("pyra", result["method"] != "tome"))
    return {
        "model_name": model_name,
        "merge_r": merge_r if isinstance(merge_r, list) and any(merge_r) else None,
        "pyra": False if result["method"] == "tome" else pyra,
        "prop_attn": bool(settings.get("model.merging.prop_attn", config.get("prop_attn", True))),
        "img_size": int(config.get("img_size") or settings.get("model.img_size") or 224),
        "num_classes": int(settings.get("model.num_classes") or 100),
        "model_kwargs": settings.get("model.model_kwargs") or {},
        # the kernels the run was measured with (results.json's config; older files: the defaults)
        "rule": {
            key: config.get(key) or settings.get(f"model.merging.{key}") or default
            for key, default in (("matcher", "bipartite"), ("merger", "wavg"), ("attention", "sdpa"))
        },
    }


def _backbone_key(spec: dict[str, Any]) -> str:
    keys = ("model_name", "img_size", "num_classes", "model_kwargs")
    return "uncompressed " + json.dumps({key: spec[key] for key in keys}, sort_keys=True)


def measure_rows(
    results: Sequence[Result],
    label: Callable[[Result], str],
    batch_size: int = 8,
    device: str = "cpu",
    precision: str = "32",
    threads: int | None = None,
    clock: str = "wall",
    warmup: int = 3,
    runs: int = 10,
) -> tuple[list[Result], str]:
    """Time every row's model side by side now; the results with these figures, and the table note.

    One model per row label (its first result's ``model_spec``), LoRA-folded as deployed, plus
    the unmerged backbone of each distinct model, all timed in one interleaved run. Every result
    of a row gets the row's ``throughput``, ``throughput_unmerged``, ``speedup`` and these
    ``benchmark`` conditions; its accuracy is untouched.
    """
    import torch

    from pyra_lightning.commands.benchmark import build_model
    from pyra_lightning.patch import apply_merging
    from pyra_lightning.timing import (
        autocast,
        clock_function,
        conditions,
        images_per_second,
        load_average,
        num_threads,
        random_images,
        resolve_clock,
        time_interleaved,
    )

    specs: dict[str, dict[str, Any]] = {}
    for result in results:
        specs.setdefault(label(result), model_spec(result))
    # A row that merges nothing is its backbone's unmerged model: timed once, speed-up exactly 1.
    timed_as = {
        name: _backbone_key(spec) if spec["merge_r"] is None else name for name, spec in specs.items()
    }
    to_build = {timed_as[name]: spec for name, spec in specs.items()}
    to_build.update({_backbone_key(spec): {**spec, "merge_r": None} for spec in specs.values()})
    dev = torch.device(device)
    clock = resolve_clock(clock, dev, threads)
    with num_threads(threads):
        measured = conditions(dev, clock, precision, batch_size, warmup, runs)
        models, inputs = {}, {}
        for name, spec in to_build.items():
            model = build_model(
                spec["model_name"], None, False, 1, spec["num_classes"], spec["img_size"], True, dev,
                spec["model_kwargs"],
            )  # fmt: skip
            if spec["merge_r"] is not None:
                merging = {"pyra": spec["pyra"], "prop_attn": spec["prop_attn"], **spec["rule"]}
                apply_merging(model, spec["merge_r"], **merging)
            models[name] = model.eval()
            inputs[name] = random_images(batch_size, spec["img_size"], dev)
        fns = {name: (lambda model=model, x=inputs[name]: model(x)) for name, model in models.items()}
        with torch.inference_mode(), autocast(dev, precision):  # type: ignore[arg-type]
            times = time_interleaved(fns, warmup, runs, dev, clock_function(clock))
    measured["loadavg_after"] = load_average()
    measured["measured_by"] = "pyra-lightning report --measure"
    ips = {name: images_per_second(batch_size, seconds) for name, seconds in times.items()}
    rewritten = []
    for result in results:
        name = label(result)
        own, base = ips[timed_as[name]], ips[_backbone_key(specs[name])]
        rewritten.append(
            {
                **result,
                "throughput": own,
                "throughput_unmerged": base,
                "speedup": own / base,
                "benchmark": measured,
                "throughput_engine": measured["engine"],
            }
        )
    before, after = measured["loadavg_before"], measured["loadavg_after"]
    note = (
        f"throughput measured now by `report --measure`, every row side by side in one interleaved "
        f"benchmark on this machine: {describe_conditions(measured)}, median of {runs} runs after "
        f"{warmup} warm-up; load average {before} -> {after}. The figures in results.json are not used."
    )
    return rewritten, note
