"""Writers for ``commands.table``'s rows: GitHub Markdown with its footnotes, and CSV / W&B records."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyra_lightning.commands.table import (
    FGVC_NAMES,
    GROUP_TASKS,
    METRIC_LABELS,
    MISSING,
    TASK_HEADERS,
    VTAB_NAMES,
    TableRow,
    average_header,
)
from pyra_lightning.data.tasks import GROUPS


def _has_vtab(rows: Sequence[TableRow]) -> bool:
    return bool(rows) and rows[0].columns[: len(VTAB_NAMES)] == VTAB_NAMES


def _has_fgvc(rows: Sequence[TableRow]) -> bool:
    return bool(rows) and all(name in rows[0].columns for name in FGVC_NAMES)


def _coverage(row: TableRow, names: Sequence[str]) -> str:
    return f"n/a ({sum(name in row.tasks for name in names)}/{len(names)})"


def to_markdown(rows: Sequence[TableRow], throughput_note: str | None = None) -> str:
    """The table as GitHub markdown, with footnotes saying how means and missing tasks are shown.

    ``throughput_note`` (``commands.measure``: how the throughputs were measured, or that they are
    not comparable) marks the throughput column with ``*`` and is printed as its footnote.
    """
    if not rows:
        raise ValueError("no rows to write")
    vtab = _has_vtab(rows)
    header = ["Method", "# params", "Throughput (img/s)" + ("*" if throughput_note else "")]
    header += [TASK_HEADERS.get(task, task) for task in rows[0].columns]
    if vtab:
        header += [group.capitalize() for group in GROUPS] + [average_header(rows[0].average_kind)]
    fgvc = _has_fgvc(rows)
    if fgvc:
        header.append("FGVC-5 average")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [
            row.method,
            MISSING if row.trainable_pct is None else f"{row.trainable_pct:.2f}%",
            MISSING if row.throughput is None else f"{row.throughput:.0f}",
        ]
        for task in row.columns:
            cell = row.tasks.get(task)
            if cell is None:
                cells.append(MISSING)
            else:
                spread = f" ± {cell.std:.1f} (n={cell.runs})" if cell.std is not None else ""
                cells.append(f"{cell.acc:.1f}{spread}")
        if vtab:
            for group in GROUPS:
                value = row.groups[group]
                cells.append(_coverage(row, GROUP_TASKS[group]) if value is None else f"{value:.2f}")
            cells.append(_coverage(row, VTAB_NAMES) if row.average is None else f"{row.average:.2f}")
        if fgvc:
            cells.append(_coverage(row, FGVC_NAMES) if row.fgvc is None else f"{row.fgvc:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Top-1 accuracy in %. a ± s (n=k): mean and standard deviation of k seeds of one setting."]
    if rows[0].metric != "test_acc":
        notes.append(f"Accuracy: {METRIC_LABELS[rows[0].metric]} (results field {rows[0].metric}).")
    if vtab:
        notes.append(
            "Average is the mean of the three group means (Natural, Specialized, Structured), as in the "
            "paper's Table 2."
            if rows[0].average_kind == "groups"
            else "Average is the mean of the 19 tasks (the paper's Table 2 uses the mean of the group means)."
        )
        notes.append(f"{MISSING}: no run for the task; n/a (k/N): a mean that would need missing tasks.")
        extra = [task for task in rows[0].columns if task not in VTAB_NAMES and task not in FGVC_NAMES]
        if extra:
            notes.append(f"Tasks outside VTAB-1k ({', '.join(extra)}) count in no mean.")
    if fgvc:
        notes.append(
            "FGVC-5 average: the mean of CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs and "
            "Stanford Cars (VPT's splits)."
        )
    notes.append("# params: trainable share of all parameters; both it and throughput are means over tasks.")
    if throughput_note:
        notes.append(f"* Throughput: {throughput_note}")
    return "\n".join(lines + notes) + "\n"


def table_records(rows: Sequence[TableRow]) -> tuple[list[str], list[list[Any]]]:
    """Column names and numeric values (``None`` where missing), for CSV files and W&B tables."""
    if not rows:
        raise ValueError("no rows to write")
    vtab = _has_vtab(rows)
    columns = ["method", "trainable_pct", "throughput", *rows[0].columns]
    if vtab:
        columns += [*GROUPS, "average", "average_kind", "vtab_tasks_present"]
    fgvc = _has_fgvc(rows)
    if fgvc:
        columns.append("fgvc_average")
    columns.append("runs")
    data = []
    for row in rows:
        values: list[Any] = [row.method, row.trainable_pct, row.throughput]
        values += [row.tasks[task].acc if task in row.tasks else None for task in row.columns]
        if vtab:
            values += [row.groups[g] for g in GROUPS] + [
                row.average,
                row.average_kind,
                sum(t in row.tasks for t in VTAB_NAMES),
            ]
        if fgvc:
            values.append(row.fgvc)
        values.append(row.runs)
        data.append([round(v, 4) if isinstance(v, float) else v for v in values])
    return columns, data


def to_csv(rows: Sequence[TableRow], path: str | Path) -> Path:
    """Write the table as CSV (accuracies in %, empty cells where missing) and return the path."""
    columns, data = table_records(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if value is None else value for value in values] for values in data])
    return path
