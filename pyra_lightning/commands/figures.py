"""The accuracy-throughput figures of the paper (Figs. 2 and 4) from ``results.json`` files.

``accuracy_throughput_points`` turns results into one point per method and ``merge_r`` schedule,
averaged like the report's table; ``plot_accuracy_throughput`` draws them. ``pyra-lightning
report`` writes the figure next to its table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyra_lightning.commands.table import (
    Average,
    Metric,
    Result,
    _is_number,
    _mean,
    _mean_over_tasks,
    _row_order,
    average_header,
    build_table,
    describe_schedule,
)


@dataclass(frozen=True)
class CurvePoint:
    """One method at one ``merge_r`` schedule in an accuracy-throughput figure."""

    family: str
    schedule: str
    accuracy: float
    throughput: float | None
    gflops: float | None
    speedup: float | None
    flops_reduction: float | None


def _ratio(numerator: Any, denominator: Any) -> float | None:
    ok = _is_number(numerator) and _is_number(denominator) and denominator > 0
    return numerator / denominator if ok else None


def accuracy_throughput_points(
    results: Sequence[Result], average: Average = "groups", metric: Metric = "test_acc"
) -> tuple[list[CurvePoint], str]:
    """The points of Figs. 2/4 and the y-axis label saying what their accuracy averages.

    A point is one method (the family; plus the model name when several models are present) at
    one ``merge_r`` schedule. With all 19 VTAB-1k tasks at every point, accuracy is the Average of
    ``build_table``; otherwise it is the plain mean over the tasks that *every* point has, and the
    label says how many, so that no point is averaged over an easier subset than another.

    Raises:
        ValueError: no final-protocol results, or the points share no task.
    """
    results = [r for r in results if r.get("protocol", "final") == "final"]
    if not results:
        raise ValueError("no results with protocol 'final' to plot")
    models = {(r.get("config") or {}).get("model_name") for r in results}
    groups: dict[tuple[str, str], list[Result]] = {}
    for result in sorted(results, key=_row_order):
        config = result.get("config") or {}
        family = result["method"] + (f" ({config.get('model_name')})" if len(models) > 1 else "")
        groups.setdefault((family, describe_schedule(config.get("merge_r"))), []).append(result)
    tables = {
        key: build_table(runs, average=average, metric=metric, label=lambda _, k=key: k[0])[0]
        for key, runs in groups.items()
    }
    complete = all(row.average is not None for row in tables.values())
    common = sorted(set.intersection(*(set(row.tasks) for row in tables.values())))
    if not complete and not common:
        raise ValueError("the points share no task, so their accuracies cannot be compared")
    if complete:
        ylabel = f"VTAB-1k {average_header(average).lower()}, top-1 %"
    else:
        shown = ", ".join(common) if len(common) <= 4 else f"{len(common)} tasks"
        ylabel = f"mean top-1 % over {len(common)} common task(s) ({shown})"
    points = []
    for (family, schedule), row in tables.items():
        by_task: dict[str, list[Result]] = {}
        for run in groups[(family, schedule)]:
            by_task.setdefault(run["task"], []).append(run)
        accuracy = row.average if complete else _mean([row.tasks[t].acc for t in common])
        gflops = _mean_over_tasks(by_task, lambda run: run.get("gflops"))
        speedup = _mean_over_tasks(by_task, lambda run: run.get("speedup"))
        reduction = _mean_over_tasks(
            by_task, lambda run: _ratio(run.get("gflops_unmerged"), run.get("gflops"))
        )
        points.append(CurvePoint(family, schedule, accuracy, row.throughput, gflops, speedup, reduction))  # type: ignore[arg-type]
    return points, ylabel


def plot_accuracy_throughput(
    results: Sequence[Result],
    path: str | Path,
    average: Average = "groups",
    metric: Metric = "test_acc",
    x: Literal["throughput", "gflops"] = "throughput",
    title: str | None = None,
) -> Path:
    """Draw accuracy against inference throughput, one line per method family (Figs. 2 and 4).

    A family with one point (e.g. PEFT, which merges nothing) is a single marker; points are
    annotated with their measured speedup over the unmerged model where the results carry it.
    ``x="gflops"`` plots against FLOPs per image instead, which unlike timings on a shared
    machine does not vary from run to run, and annotates the FLOPs reduction. Drawn on a bare
    ``Figure`` (Agg), so that calling this from a notebook leaves pyplot's backend alone.

    Raises:
        ValueError: as ``accuracy_throughput_points``, or a point lacks its ``x`` value.
    """
    from matplotlib.figure import Figure

    points, ylabel = accuracy_throughput_points(results, average, metric)
    missing = [f"{p.family} r={p.schedule}" for p in points if getattr(p, x) is None]
    if missing:
        raise ValueError(f"no {x} in the results of {', '.join(missing)}")
    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    ax = fig.subplots()
    for index, family in enumerate(dict.fromkeys(p.family for p in points)):
        mine = sorted((p for p in points if p.family == family), key=lambda p: getattr(p, x))
        ax.plot(
            [getattr(p, x) for p in mine],
            [p.accuracy for p in mine],
            "-" if len(mine) > 1 else "",
            marker="os^Dv<>p"[index % 8],
            markersize=7 if len(mine) > 1 else 10,
            label=family,
        )
        for p in mine:
            factor = p.speedup if x == "throughput" else p.flops_reduction
            if factor is not None and abs(factor - 1.0) > 1e-6:
                ax.annotate(
                    f"{factor:.2f}x",
                    (getattr(p, x), p.accuracy),
                    textcoords="offset points",
                    xytext=(4, 4),
                )
    ax.set_xlabel("throughput (images/s)" if x == "throughput" else "GFLOPs per image")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
