"""The accuracy-throughput figures of the paper (Figs. 2 and 4) from ``results.json`` files.

``accuracy_throughput_points`` turns results into one point per method and ``merge_r`` schedule,
averaged like the report's table; ``plot_accuracy_throughput`` draws them. ``plot_elastic_curve``
draws the accuracy-speed-up curve of elastic runs (``results.json["curve"]``, mean ± std over
seeds), with separately trained runs of the same task overlaid. ``pyra-lightning report`` writes
both next to its table. ``place_annotations`` puts point labels inside the axes without overlaps;
``annotation_boxes`` returns their boxes, which the tests check.
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
    settings_label,
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
    results: Sequence[Result],
    average: Average = "groups",
    metric: Metric = "test_acc",
    label: Sequence[str] = (),
) -> tuple[list[CurvePoint], str]:
    """The points of Figs. 2/4 and the y-axis label saying what their accuracy averages.

    A point is one method (the family; plus the model name when several models are present, and
    ``key=value`` of each ``label`` setting, as ``report --label`` names its rows) at one
    ``merge_r`` schedule. With all 19 VTAB-1k tasks at every point, accuracy is the Average of
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
        family += f" {settings_label(label, result)}" if label else ""
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


def _overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _inside(box: Any, frame: Any) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


# Offsets (points) tried in turn for a label: right-above first, then around the marker.
_OFFSETS = ((5, 5), (5, -13), (-8, 8), (-8, -16), (8, 16), (8, -24), (-14, 18), (-14, -26))


def place_annotations(ax: Any, labels: Sequence[tuple[str, float, float]], fontsize: float = 8) -> int:
    """Annotate ``(text, x, y)`` points so that every label lies inside the axes and no two labels
    (nor a label and the legend) overlap; returns how many labels found no free place and were left
    out (the caller says so). Labels are aligned away from their marker, tried at a few offsets,
    and the axes' margins grow when a label fits nowhere."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    for attempt in range(4):
        for child in [c for c in ax.texts if getattr(c, "_pyra_label", False)]:
            child.remove()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        frame = ax.get_window_extent(renderer)
        legend = ax.get_legend()
        taken = [legend.get_window_extent(renderer)] if legend is not None else []
        for _, x, y in labels:  # keep labels off the markers themselves
            px, py = ax.transData.transform((x, y))
            taken.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
        missing = 0
        for text, x, y in labels:
            for dx, dy in _OFFSETS:
                note = ax.annotate(
                    text,
                    (x, y),
                    textcoords="offset points",
                    xytext=(dx, dy),
                    ha="left" if dx > 0 else "right",
                    fontsize=fontsize,
                )
                note._pyra_label = True  # type: ignore[attr-defined]
                box = note.get_window_extent(renderer)
                if _inside(box, frame) and not any(_overlaps(box, other) for other in taken):
                    taken.append(box)
                    break
                note.remove()
            else:
                missing += 1
        if not missing or attempt == 3:
            return missing
        ax.margins(x=0.08 * (attempt + 2), y=0.08 * (attempt + 2))
    return missing


def annotation_boxes(ax: Any) -> tuple[Any, list[Any]]:
    """The axes' box and the boxes of its point labels, in display units (for the layout tests)."""
    renderer = ax.figure.canvas.get_renderer()
    notes = [t for t in ax.texts if getattr(t, "_pyra_label", False)]
    return ax.get_window_extent(renderer), [t.get_window_extent(renderer) for t in notes]


def _new_axes(figsize: tuple[float, float] = (6.4, 4.4)) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=150)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_accuracy_throughput(
    results: Sequence[Result],
    path: str | Path,
    average: Average = "groups",
    metric: Metric = "test_acc",
    x: Literal["throughput", "gflops"] = "throughput",
    title: str | None = None,
    label: Sequence[str] = (),
) -> Path:
    """``accuracy_throughput_figure`` written to ``path`` (PNG); returns the path."""
    return _save(accuracy_throughput_figure(results, average, metric, x, title, label), path)


def accuracy_throughput_figure(
    results: Sequence[Result],
    average: Average = "groups",
    metric: Metric = "test_acc",
    x: Literal["throughput", "gflops"] = "throughput",
    title: str | None = None,
    label: Sequence[str] = (),
) -> Any:
    """Draw accuracy against inference throughput, one line per method family (Figs. 2 and 4).

    A family with one point (e.g. PEFT, which merges nothing) is a single marker; points are
    annotated with their measured speedup over the unmerged model where the results carry it
    (the legend's title says what "x" is relative to). ``x="gflops"`` plots against FLOPs per
    image instead, which unlike timings on a shared machine does not vary from run to run, and
    annotates the FLOPs reduction. Drawn on a bare ``Figure`` (Agg), so that calling this from a
    notebook leaves pyplot's backend alone.

    Raises:
        ValueError: as ``accuracy_throughput_points``, or a point lacks its ``x`` value.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    points, ylabel = accuracy_throughput_points(results, average, metric, label)
    missing = [f"{p.family} r={p.schedule}" for p in points if getattr(p, x) is None]
    if missing:
        raise ValueError(f"no {x} in the results of {', '.join(missing)}")
    fig, ax = _new_axes()
    labels: list[tuple[str, float, float]] = []
    for index, family in enumerate(dict.fromkeys(p.family for p in points)):
        mine = sorted((p for p in points if p.family == family), key=lambda p: getattr(p, x))
        ax.plot(
            [getattr(p, x) for p in mine],
            [p.accuracy for p in mine],
            "-" if len(mine) > 1 else "",
            marker="os^Dv<>p"[index % 8],
            markersize=6 if len(mine) > 1 else 9,
            label=family,
        )
        for p in mine:
            factor = p.speedup if x == "throughput" else p.flops_reduction
            if factor is not None and abs(factor - 1.0) > 1e-6:
                labels.append((f"{factor:.2f}x", getattr(p, x), p.accuracy))
    ax.set_xlabel("inference throughput (images/s)" if x == "throughput" else "GFLOPs per image")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    relative = "measured speed-up" if x == "throughput" else "FLOPs reduction"
    ax.legend(title=f"labels: {relative} over the unmerged model", title_fontsize=8, fontsize=8)
    default = "Accuracy vs. inference throughput" if x == "throughput" else "Accuracy vs. FLOPs per image"
    ax.set_title(title or default)
    fig.tight_layout()
    left_out = place_annotations(ax, labels)
    if left_out:
        fig.text(0.01, 0.01, f"{left_out} label(s) left out: no free place", fontsize=7)
    return fig


def _seed_group(result: Result) -> str:
    """Runs that differ only by their seed share this key (they are error bars of one point)."""
    import json

    from pyra_lightning.results import result_settings, seed_free

    return json.dumps(seed_free(result_settings(result)), sort_keys=True, default=str)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    import statistics

    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def elastic_curve_series(
    results: Sequence[Result], task: str, x: Literal["speedup", "flops"] = "speedup"
) -> dict[str, list[tuple[float, float, float, float, int]]]:
    """Per series label, points ``(x mean, x std, accuracy % mean, accuracy % std, seeds)``.

    Elastic runs give one series each (their ``curve``); separately trained runs of ``task``
    give one series per method, a point per schedule. ``x="speedup"`` is the measured speed-up
    over the unmerged model, ``"flops"`` the FLOPs reduction (uncompressed / merged FLOPs).

    Raises:
        ValueError: no elastic run of ``task``, or a point without its ``x`` value.
    """
    mine = [r for r in results if r.get("task") == task]
    elastic = [r for r in mine if r.get("curve")]
    if not elastic:
        raise ValueError(f"no elastic run (results.json with a 'curve') for task {task!r}")

    def x_of(entry: dict[str, Any], unmerged: Any = None) -> float:
        if x == "speedup":
            value = entry.get("speedup")
        elif "flops_fraction" in entry:
            value = 1.0 / entry["flops_fraction"] if entry["flops_fraction"] else None
        else:
            value = _ratio(unmerged, entry.get("gflops"))
        if not _is_number(value):
            raise ValueError(f"a {task} point has no {x} (timing off?); plot against x='flops' instead")
        return float(value)

    series: dict[str, list[tuple[float, float, float, float, int]]] = {}
    groups: dict[tuple[str, str], list[Result]] = {}
    for result in mine:
        kind = "elastic" if result.get("curve") else "separate"
        groups.setdefault((kind, _seed_group(result)), []).append(result)
    for (kind, _), runs in sorted(groups.items(), key=lambda item: item[0][0]):
        method = runs[0]["method"]
        if kind == "elastic":
            label = f"{method} (one fit)"
            by_point: dict[str, list[dict[str, Any]]] = {}
            for run in runs:
                for entry in run["curve"]:
                    by_point.setdefault(str(entry.get("point", entry["flops_fraction"])), []).append(entry)
            entries = list(by_point.values())
            rows = [([x_of(e) for e in es], [100 * e["test_acc"] for e in es]) for es in entries]
        else:
            label = f"{method} (a fit per rate)"
            xs = [x_of(r, r.get("gflops_unmerged")) if x == "flops" else x_of(r) for r in runs]
            rows = [(xs, [100 * r["test_acc"] for r in runs])]
        for xs, accs in rows:
            series.setdefault(label, []).append((*_mean_std(xs), *_mean_std(accs), len(accs)))
    return {label: sorted(points) for label, points in series.items()}


def plot_elastic_curve(
    results: Sequence[Result],
    path: str | Path,
    task: str,
    x: Literal["speedup", "flops"] = "speedup",
    title: str | None = None,
) -> Path:
    """``elastic_curve_figure`` written to ``path`` (PNG); returns the path."""
    return _save(elastic_curve_figure(results, task, x, title), path)


def elastic_curve_figure(
    results: Sequence[Result],
    task: str,
    x: Literal["speedup", "flops"] = "speedup",
    title: str | None = None,
) -> Any:
    """Accuracy against speed-up of elastic runs along their curve, with separate fits overlaid.

    Error bars are ± one standard deviation over seeds (runs whose settings differ only by the
    seed); the legend says how many seeds each series averages and what "x" is relative to.

    Raises:
        ValueError: as ``elastic_curve_series``.
    """
    series = elastic_curve_series(results, task, x)
    fig, ax = _new_axes()
    labels: list[tuple[str, float, float]] = []
    for index, (label, points) in enumerate(series.items()):
        seeds = sorted({p[4] for p in points})
        ax.errorbar(
            [p[0] for p in points],
            [p[2] for p in points],
            xerr=[p[1] for p in points],
            yerr=[p[3] for p in points],
            fmt="-" if "one fit" in label else "--",
            marker="os^Dv<>p"[index % 8],
            markersize=6,
            capsize=3,
            label=f"{label}, {'/'.join(map(str, seeds))} seed(s)",
        )
        if "one fit" in label:
            labels += [(f"{p[0]:.2f}x", p[0], p[2]) for p in points]
    what = "measured speed-up" if x == "speedup" else "FLOPs reduction"
    ax.set_xlabel(f"{what} over the unmerged model (x)")
    ax.set_ylabel(f"{task} test top-1 % (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(title=f"x: {what} relative to the unmerged model", title_fontsize=8, fontsize=8)
    ax.set_title(title or f"Elastic merging on {task}: accuracy along the curve")
    fig.tight_layout()
    left_out = place_annotations(ax, labels)
    if left_out:
        fig.text(0.01, 0.01, f"{left_out} label(s) left out: no free place", fontsize=7)
    return fig


def plot_elastic_curves(results: Sequence[Result], out_dir: str | Path) -> dict[str, Path]:
    """``elastic_curve_<task>.png`` for every task with an elastic run, for ``pyra-lightning report``:
    against the measured speed-up where every point has one, else against the FLOPs reduction."""
    written = {}
    for task in sorted({r["task"] for r in results if r.get("curve")}):
        path = Path(out_dir) / f"elastic_curve_{task}.png"
        try:
            written[f"elastic_{task}"] = plot_elastic_curve(results, path, task, x="speedup")
        except ValueError:
            written[f"elastic_{task}"] = plot_elastic_curve(results, path, task, x="flops")
    return written
