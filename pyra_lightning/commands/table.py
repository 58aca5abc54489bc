"""The Table 2 layout of VTAB-1k results: rows per method, group means and the paper's Average.

Every ``pyra-lightning test`` (and ``fit``, which tests afterwards) writes a ``results.json`` into
its run folder (``pyra_lightning.results``). ``collect_results`` reads them, ``build_table`` lays
them out like the paper's Table 2 (one row per method, the 19 tasks in Table 2 order, group means
and the overall Average), and ``commands.figures`` draws the accuracy-vs-throughput curves of
Figs. 2 and 4.

Which "Average" the paper reports. Table 2's Average is the mean of the three *group* means
(Natural, Specialized, Structured), not the mean of the 19 tasks. For its ViT-B/16 PEFT row the
group means are 79.44, 84.45 and 60.41, whose mean is 74.77 (printed 74.76: the per-task values
are themselves rounded), while the mean of the 19 tasks is 72.48. ToMe gives 74.10 (19-task mean
71.81) and PYRA 74.70 (printed 74.69; 19-task mean 72.43). Table 6 prints the group means next to
the Average and confirms it: (72.87 + 80.78 + 57.64) / 3 = 70.43. So ``average="groups"`` is the
default; ``average="tasks"`` gives the other definition, and every table names the one it uses.

A mean that would need a missing task is never taken over fewer tasks: it is shown as
``n/a (k/N)``. Several results of one method on one task are averaged (mean ± std, and their
count shown) only when their settings differ by the seed alone; results that differ otherwise,
or two results of one run (same settings and seed), are refused with a message naming the files.

``commands.report`` is the command (``pyra-lightning report logs/``) that writes these tables.
"""

from __future__ import annotations

import glob
import itertools
import json
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyra_lightning.data.tasks import FGVC_TASKS, GROUPS, VTAB_TASKS
from pyra_lightning.results import (
    RESULTS_FILENAME,
    SEED_KEYS,
    describe_differences,
    read_result,
    result_settings,
    seed_free,
)
from pyra_lightning.results import is_number as _is_number

Average = Literal["tasks", "groups"]
Metric = Literal["test_acc", "test_acc_best", "test_acc_reference_protocol"]
# What each metric is, printed under the table (the reference protocol looks at the test split).
METRIC_LABELS: dict[str, str] = {
    "test_acc": "the final-epoch model",
    "test_acc_best": "best test accuracy over the epochs evaluated during training",
    "test_acc_reference_protocol": "reference protocol: max over test evaluations every 10 epochs and at the last",
}
Result = dict[str, Any]

MISSING = "—"
VTAB_NAMES: tuple[str, ...] = tuple(task.name for task in VTAB_TASKS)
FGVC_NAMES: tuple[str, ...] = tuple(task.name for task in FGVC_TASKS)  # cub nabirds flowers dogs cars
# Column names as printed in Table 2, in its order.
_HEADERS = "Cifar100 Caltech101 DTD Flowers102 Pets SVHN Sun397 Camelyon EuroSAT Resisc45 Retinopathy "
_HEADERS += "Clevr-Count Clevr-Dist DMLab KITTI-Dist dSpr-Loc dSpr-Ori sNORB-Azim sNORB-Ele"
TASK_HEADERS: dict[str, str] = dict(zip(VTAB_NAMES, _HEADERS.split(), strict=True))
GROUP_TASKS: dict[str, tuple[str, ...]] = {
    group: tuple(task.name for task in VTAB_TASKS if task.group == group) for group in GROUPS
}
_METHOD_RANK = {"peft": 0, "tome": 2, "pyra": 3}
# How to get a metric that a result lacks (``null`` in its results.json).
METRIC_HINTS: dict[str, str] = {
    "test_acc_best": "the run did not evaluate the test split during training: fit it with "
    "--data.track_test true, or report --metric test_acc",
    "test_acc_reference_protocol": "the run had no ReferenceProtocol callback: fit it with "
    "--config configs/recipe/reference.yaml, or report --metric test_acc",
}
# Config entries that make two runs different models rather than repeats (seeds) of one.
_IDENTITY_KEYS = ("model_name", "merge_r", "img_size")


# ----------------------------------------------------------------------------------------- reading
def _expand(item: str | Path, filename: str) -> list[Path]:
    """The results files an argument names: itself, a folder's (recursively), or a glob's.

    In a folder, a run's re-test (``<run>/test/results.json``, written by ``pyra-lightning test``)
    is left out where the run has its own ``results.json``: both are results of one run. Name the
    re-test's file (or a glob matching it) to report it instead.
    """
    path = Path(item)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.rglob(filename))
        own = set(found)
        return [f for f in found if not (f.parent.name == "test" and f.parent.parent / filename in own)]
    found: list[Path] = []
    for match in sorted(glob.glob(str(item), recursive=True)):
        found.extend(_expand(match, filename))
    return found


def collect_results(
    paths_or_globs: str | Path | Iterable[str | Path], filename: str = RESULTS_FILENAME
) -> list[Result]:
    """Read every results file named by files, directories (searched recursively) or glob patterns.

    Each returned dict is the file's content, checked by ``validate_result``, plus
    ``"results_file"``: the path it came from, which later error messages name.

    Raises:
        FileNotFoundError: an argument matches no results file (a typo should not shrink a table).
        ValueError: a file is not valid JSON or not a valid result; the message names the file.
    """
    items = [paths_or_globs] if isinstance(paths_or_globs, str | Path) else list(paths_or_globs)
    seen: set[Path] = set()
    results: list[Result] = []
    for item in items:
        files = _expand(item, filename)
        if not files:
            raise FileNotFoundError(
                f"{item}: no {filename} found (not a file, a folder holding one, or a glob)"
            )
        for file in files:
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            results.append({**read_result(file), "results_file": str(file)})
    return results


# ---------------------------------------------------------------------------------------- the table
def describe_schedule(merge_r: Any) -> str:
    """A short name for a per-layer ``merge_r`` list: ``[16]*11 + [10]`` -> ``"16x11,10"``."""
    if not isinstance(merge_r, list | tuple):
        return "none" if merge_r is None else str(merge_r)
    runs = [(value, len(list(group))) for value, group in itertools.groupby(merge_r)]
    return ",".join(f"{v}x{n}" if n > 1 else f"{v}" for v, n in runs) if any(merge_r) else "none"


def schedule_label(result: Result) -> str:
    """Row label ``"<method> r=<schedule>"``, for tables of sweeps over merge rates."""
    merge_r = (result.get("config") or {}).get("merge_r")
    return f"{result['method']} r={describe_schedule(merge_r)}"


@dataclass(frozen=True)
class Cell:
    """One method on one task: mean top-1 accuracy in percent over ``runs`` seeds, and their std."""

    acc: float
    runs: int
    std: float | None = None  # sample standard deviation over the seeds, in percent points


@dataclass(frozen=True)
class TableRow:
    """One row of the Table 2 layout.

    Attributes:
        method: the row label.
        columns: the task columns of the whole table (the 19 of VTAB-1k, then any others).
        tasks: the cells of this row's tasks that have runs, by canonical task name.
        groups: Natural/Specialized/Structured means in percent; ``None`` if a task is missing.
        average: overall Average in percent, ``None`` unless all 19 tasks are present.
        average_kind: ``"groups"`` (mean of the 3 group means, as in the paper) or ``"tasks"``.
        trainable_pct: trainable share of all parameters in percent, mean over tasks.
        throughput: inference images/s of the merged model, mean over tasks.
        runs: number of results files in the row.
        metric: the results field the accuracies come from.
        fgvc: the FGVC-5 average (mean of its five tasks) in percent, ``None`` unless all are present.
    """

    method: str
    columns: tuple[str, ...]
    tasks: dict[str, Cell]
    groups: dict[str, float | None]
    average: float | None
    average_kind: Average
    trainable_pct: float | None
    throughput: float | None
    runs: int
    metric: Metric = "test_acc"
    fgvc: float | None = None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mean_over_tasks(by_task: dict[str, list[Result]], value: Callable[[Result], Any]) -> float | None:
    """Mean over tasks of the per-task mean of ``value``, over the runs that report it."""
    per_task = [[v for v in map(value, runs) if _is_number(v)] for runs in by_task.values()]
    means = [_mean(values) for values in per_task if values]
    return _mean(means) if means else None


def _identity(result: Result) -> tuple[str, ...]:
    config = result.get("config") or {}
    return tuple(json.dumps(config.get(key)) for key in _IDENTITY_KEYS)


def default_label(results: Sequence[Result]) -> Callable[[Result], str]:
    """Label rows by ``method``; where one method has runs of several models or schedules, add them."""
    identities: dict[str, set[tuple[str, ...]]] = {}
    for result in results:
        identities.setdefault(result["method"], set()).add(_identity(result))
    models = {(result.get("config") or {}).get("model_name") for result in results}

    def label(result: Result) -> str:
        if len(identities[result["method"]]) == 1:
            return result["method"]
        model = (result.get("config") or {}).get("model_name")
        return schedule_label(result) + (f" [{model}]" if len(models) > 1 else "")

    return label


def setting_value(result: Result, key: str) -> Any:
    """``key`` of a result: a setting (``model.lora.rank``), else a results field or config entry."""
    settings = result_settings(result)
    if key in settings:
        return settings[key]
    if key in result:
        return result[key]
    return (result.get("config") or {}).get(key, MISSING)


def label_by(keys: Sequence[str], results: Sequence[Result]) -> Callable[[Result], str]:
    """``default_label`` plus ``key=value`` of every key (``report --label model.lora.rank``).

    Lets results that differ in a setting (not only the seed) sit in rows of their own.

    Raises:
        ValueError: a key that no result has, naming the settings they do have.
    """
    base = default_label(results)
    for key in keys:
        if all(setting_value(result, key) is MISSING for result in results):
            known = sorted(set().union(*(result_settings(result) for result in results)))
            raise ValueError(f"--label {key}: no result has this setting; they have: {', '.join(known)}")

    def label(result: Result) -> str:
        return f"{base(result)} {settings_label(keys, result)}"

    return label


def settings_label(keys: Sequence[str], result: Result) -> str:
    """``key=value`` of every key, as ``label_by`` appends them (``model.lora.rank=16``)."""
    values = [setting_value(result, key) for key in keys]
    shown = [value if isinstance(value, str) else json.dumps(value) for value in values]
    return " ".join(f"{key}={value}" for key, value in zip(keys, shown, strict=True))


def _check_same_model(label: str, runs: list[Result]) -> None:
    identities = {_identity(run): run for run in runs if run.get("config")}
    if len(identities) > 1:
        first, second = list(identities.values())[:2]
        raise ValueError(
            f"row {label!r} mixes different models ({', '.join(_IDENTITY_KEYS)} differ: "
            f"{first.get('results_file', '?')} vs {second.get('results_file', '?')}); put them in rows of their "
            "own with report --label model.model_name model.merging.merge_r, or use the default label"
        )


def _check_seeds(label: str, task: str, runs: list[Result]) -> None:
    """Several results in one cell must be seeds of one setting, each seed counted once.

    Their settings (``results.json`` ``settings``, or ``config`` in older files) may differ in
    the seed alone; two results of the same settings and seed are one run tested twice (or a
    copy), which would count twice in the mean.

    Raises:
        ValueError: naming the files and the settings that differ, or the two files of one run.
    """
    first = runs[0]
    base = seed_free(result_settings(first))
    known = [(run["results_file"], d) for run in runs if (d := (run.get("data") or {}).get("digest"))]
    other = next(((file, d) for file, d in known if d != known[0][1]), None)
    if other is not None:  # runs on unverified data (no digest) are not compared
        raise ValueError(
            f"{label} on {task}: {known[0][0]} and {other[0]} were trained on different data (manifest digests "
            f"{known[0][1][:12]} vs {other[1][:12]}; 'pyra-lightning data verify --against' shows how); "
            "give them different row labels"
        )
    seen: dict[str, str] = {}
    for run in runs:
        differences = describe_differences(
            base, seed_free(result_settings(run)), first["results_file"], f"in {run['results_file']}"
        )
        if differences:
            keys = [line.split(": ", 1)[0] for line in differences]
            raise ValueError(
                f"{label} on {task}: results that differ by more than the seed are not seeds of one run:\n  "
                + "\n  ".join(differences)
                + f"\nreport them in rows of their own: report --label {' '.join(keys)}"
            )
        settings = result_settings(run)
        seed = json.dumps({key: settings.get(key) for key in SEED_KEYS}, sort_keys=True)
        if seed in seen:
            raise ValueError(
                f"{label} on {task}: {seen[seed]} and {run['results_file']} are results of the same settings "
                "and seed (one run tested twice, or a copy); keep one of them"
            )
        seen[seed] = run["results_file"]


def _row_order(result: Result) -> tuple[int, str, int]:
    """Baselines first, ToMe, then PYRA (Table 2's order); within a method, by tokens merged."""
    merge_r = (result.get("config") or {}).get("merge_r")
    merged = sum(merge_r) if isinstance(merge_r, list) else 0
    return _METHOD_RANK.get(result["method"], 1), result["method"], merged


def build_table(
    results: Sequence[Result],
    methods: Sequence[str] | None = None,
    average: Average = "groups",
    metric: Metric = "test_acc",
    label: Callable[[Result], str] | None = None,
    protocol: str | None = "final",
) -> list[TableRow]:
    """Lay results out like Table 2: one row per method, tasks in Table 2 order, group means, Average.

    Args:
        results: from ``collect_results`` (or dicts in the same schema).
        methods: the row labels to show, in this order; ``None`` shows all, baselines first.
        average: ``"groups"`` (default, the paper's: mean of the 3 group means, e.g. 74.76 for the
            ViT-B PEFT row) or ``"tasks"`` (mean of the 19 tasks, 72.48 for that row).
        metric: ``"test_acc"`` (the final model), ``"test_acc_best"`` (best test accuracy seen
            during training) or ``"test_acc_reference_protocol"`` (the reference's reported number).
        label: maps a result to its row label; by default ``default_label``: the ``method`` field,
            plus the schedule (and model) where one method has runs of several.
        protocol: keep only results of this protocol (``"tune"`` runs test on val200, whose
            numbers must not enter a test table); ``None`` keeps all.

    Raises:
        ValueError: no results are left, ``methods`` names a row that has none, a row mixes
            different models (``model_name``/``merge_r``/``img_size``), or ``metric`` is missing.
    """
    if average not in ("groups", "tasks"):
        raise ValueError(f"average must be 'groups' or 'tasks', got {average!r}")
    kept = [r for r in results if protocol is None or r.get("protocol", protocol) == protocol]
    if len(kept) < len(results):
        warnings.warn(
            f"left out {len(results) - len(kept)} result(s) whose protocol is not {protocol!r}", stacklevel=2
        )
    if not kept:
        raise ValueError(f"no results to tabulate (protocol={protocol!r}, {len(results)} given)")
    label = label or default_label(kept)
    by_row: dict[str, list[Result]] = {}
    for result in kept:
        by_row.setdefault(label(result), []).append(result)
    if methods is None:
        methods = sorted(by_row, key=lambda name: (*_row_order(by_row[name][0]), name))
    unknown = [name for name in methods if name not in by_row]
    if unknown:
        raise ValueError(f"no results for method(s) {unknown}; available: {sorted(by_row)}")
    others = sorted({r["task"] for r in kept} - set(VTAB_NAMES) - set(FGVC_NAMES))
    vtab = any(r["task"] in VTAB_NAMES for r in kept)
    fgvc = any(r["task"] in FGVC_NAMES for r in kept)
    columns = (VTAB_NAMES if vtab else ()) + (FGVC_NAMES if fgvc else ()) + tuple(others)
    return [_build_row(name, by_row[name], columns, average, metric) for name in methods]


def _build_row(
    name: str, runs: list[Result], columns: tuple[str, ...], average: Average, metric: Metric
) -> TableRow:
    _check_same_model(name, runs)
    by_task: dict[str, list[Result]] = {}
    for run in runs:
        if run.get(metric) is None:
            hint = METRIC_HINTS.get(metric)
            raise ValueError(
                f"{run.get('results_file', name)}: {metric!r} is null" + (f"; {hint}" if hint else "")
            )
        by_task.setdefault(run["task"], []).append(run)
    tasks = {}
    for task, task_runs in by_task.items():
        _check_seeds(name, task, task_runs)
        accs = [100.0 * run[metric] for run in task_runs]
        tasks[task] = Cell(_mean(accs), len(accs), statistics.stdev(accs) if len(accs) > 1 else None)
    groups: dict[str, float | None] = {}
    for group, names in GROUP_TASKS.items():
        complete = all(task in tasks for task in names)
        groups[group] = _mean([tasks[task].acc for task in names]) if complete else None
    overall: float | None = None
    if all(value is not None for value in groups.values()):
        values = [groups[g] for g in GROUPS] if average == "groups" else [tasks[t].acc for t in VTAB_NAMES]
        overall = _mean(values)  # type: ignore[arg-type]
    trainable_pct = _mean_over_tasks(by_task, lambda run: (run.get("params") or {}).get("trainable_pct"))
    throughput = _mean_over_tasks(by_task, lambda run: run.get("throughput"))
    fgvc = _mean([tasks[t].acc for t in FGVC_NAMES]) if all(t in tasks for t in FGVC_NAMES) else None
    return TableRow(
        name, columns, tasks, groups, overall, average, trainable_pct, throughput, len(runs), metric, fgvc
    )


# ------------------------------------------------------------------------------------------ writing


def average_header(kind: Average) -> str:
    return "Average (mean of 3 group means)" if kind == "groups" else "Average (mean of 19 tasks)"
