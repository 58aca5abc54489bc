"""``pyra-lightning report``: the paper's Table 2 (Markdown + CSV), its accuracy-throughput plot, W&B.

The table is built by ``commands.table`` from the ``results.json`` files of the runs
(``pyra_lightning.results``), the plot by ``commands.figures``. Run it as
``pyra-lightning report runs/`` or ``python -m pyra_lightning.commands.report runs/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pyra_lightning.commands.table import (
    METRIC_LABELS,
    Average,
    Metric,
    TableRow,
    build_table,
    collect_results,
    table_records,
    to_csv,
    to_markdown,
)


def push_to_wandb(
    rows: Sequence[TableRow], project: str, run_name: str | None = None, key: str = "vtab_table"
) -> str | None:
    """Log the table to Weights & Biases as a ``wandb.Table`` in a new ``job_type="report"`` run.

    Honours ``WANDB_MODE`` (``offline`` writes under ``WANDB_DIR`` and needs no account). Returns
    the run's URL, ``None`` when offline.
    """
    import wandb  # imported here: it is slow to import and only this function needs it

    columns, data = table_records(rows)
    run = wandb.init(project=project, name=run_name, job_type="report", reinit="create_new")
    try:
        run.log({key: wandb.Table(columns=columns, data=data)})
        for row in rows:
            if row.average is not None:
                run.summary[f"{key}/{row.method}/average"] = row.average
        return run.url
    finally:
        run.finish()


def report(
    results: Sequence[str],
    out_dir: str = "reports",
    average: Average = "groups",
    metric: Metric = "test_acc",
    plot: bool = True,
    wandb_project: str | None = None,
    wandb_run_name: str | None = None,
) -> dict[str, Path]:
    """Collect results, write ``vtab_table.md``/``.csv`` (and the figure) to ``out_dir``, print the table.

    Args:
        results: run folders (searched recursively for results.json), files or glob patterns.
        out_dir: folder for ``vtab_table.md``, ``vtab_table.csv`` and ``accuracy_throughput.png``.
        average: ``groups`` (mean of the 3 group means, the paper's Table 2) or ``tasks`` (of the 19).
        metric: ``test_acc`` (final model), ``test_acc_best`` (best test accuracy during training)
            or ``test_acc_reference_protocol`` (the reference's number; see ``ReferenceProtocol``).
        plot: also draw accuracy against throughput per method and merge schedule (Figs. 2/4),
            and for elastic runs accuracy along their curve per task (``elastic_curve_<task>.png``).
        wandb_project: also log the table to this W&B project (honours WANDB_MODE=offline).
        wandb_run_name: name of that W&B run.
    """
    collected = collect_results(results)
    rows = build_table(collected, average=average, metric=metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows) + f"Accuracy shown: {metric} ({METRIC_LABELS[metric]}).\n"
    written = {"markdown": out / "vtab_table.md", "csv": to_csv(rows, out / "vtab_table.csv")}
    written["markdown"].write_text(markdown, encoding="utf-8")
    if plot:
        from pyra_lightning.commands.figures import plot_accuracy_throughput

        written["plot"] = plot_accuracy_throughput(
            collected, out / "accuracy_throughput.png", average, metric
        )
        if any(r.get("curve") for r in collected):  # elastic runs: accuracy along their curve
            from pyra_lightning.commands.figures import plot_elastic_curves

            written.update(plot_elastic_curves(collected, out))
    if wandb_project:
        push_to_wandb(rows, wandb_project, wandb_run_name)
    print(markdown)
    print(f"{len(collected)} result(s) -> " + ", ".join(str(p) for p in written.values()))
    return written


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning report``: the command-line face of ``report``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="pyra-lightning report",
        description="Tabulate results.json files of VTAB-1k runs like the paper's Table 2.",
    )
    parser.add_argument(
        "results", type=str, nargs="+", help="Run folders (searched recursively), files or globs."
    )
    parser.add_function_arguments(report, skip={"results"}, as_group=False)
    report(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
