"""``pyra-lightning report``: the paper's Table 2 (Markdown + CSV), its accuracy-throughput plot, W&B.

The table is built by ``commands.table`` from the ``results.json`` files of the runs
(``pyra_lightning.results``), the plot by ``commands.figures``. Run it as
``pyra-lightning report runs/`` or ``python -m pyra_lightning.commands.report runs/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pyra_lightning.commands.table import (
    METRIC_LABELS,
    Average,
    Metric,
    TableRow,
    build_table,
    collect_results,
    default_label,
    label_by,
)
from pyra_lightning.commands.table_format import table_records, to_csv, to_markdown


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
    label: list[str] | None = None,
    plot: bool = True,
    measure: bool = False,
    measure_batch_size: int = 8,
    measure_device: str = "cpu",
    # timing.Precision and timing.ClockName spelled out: importing timing would load torch, which
    # a report that only reads tables never needs. Keep the two in step.
    measure_precision: Literal["32", "bf16", "16", "bf16-true", "16-true"] = "32",
    measure_threads: int | None = None,
    measure_clock: Literal["wall", "cpu", "auto"] = "wall",
    measure_warmup: int = 3,
    measure_runs: int = 10,
    wandb_project: str | None = None,
    wandb_run_name: str | None = None,
) -> dict[str, Path]:
    """Collect results, write ``vtab_table.md``/``.csv`` (and the figure) to ``out_dir``, print the table.

    Speeds (``commands.measure``): without ``measure`` the throughputs of the files are shown with
    the conditions they were taken under, and a column mixing conditions is marked NOT COMPARABLE
    in its footnote (and the figure's title); with ``measure`` every row's model is rebuilt from
    its settings and all are timed side by side now, and the table and the figure use those.

    Args:
        results: run folders (searched recursively for results.json), files or glob patterns.
        out_dir: folder for ``vtab_table.md``, ``vtab_table.csv`` and ``accuracy_throughput.png``.
        average: ``groups`` (mean of the 3 group means, the paper's Table 2) or ``tasks`` (of the 19).
        metric: ``test_acc`` (final model), ``test_acc_best`` (best test accuracy during training)
            or ``test_acc_reference_protocol`` (the reference's number; see ``ReferenceProtocol``).
        label: settings that also name the rows, e.g. ``model.lora.rank`` (``report --label
            model.lora.rank``): results that differ in them get rows of their own instead of being
            refused as "not seeds of one run". Keys are ``results.json`` ``settings`` keys (the
            CLI's flags), results fields or ``config`` entries.
        plot: also draw accuracy against throughput per method and merge schedule (Figs. 2/4),
            and for elastic runs accuracy along their curve per task (``elastic_curve_<task>.png``).
        measure: time every row's model (rebuilt from its settings, random weights) side by side in
            one interleaved benchmark on this machine, now, and use those throughputs and speed-ups.
        measure_batch_size, measure_device, measure_precision, measure_threads, measure_clock,
            measure_warmup, measure_runs: how ``measure`` times, as ``pyra-lightning benchmark``'s
            ``--batch_size``, ``--device``, ``--precision``, ``--threads``, ``--clock``,
            ``--warmup`` and ``--runs`` (on a shared CPU: ``--measure_threads 1 --measure_clock cpu``).
        wandb_project: also log the table to this W&B project (honours WANDB_MODE=offline).
        wandb_run_name: name of that W&B run.
    """
    from pyra_lightning.commands.measure import measure_rows, throughput_note

    collected = collect_results(results)
    final = [r for r in collected if r.get("protocol", "final") == "final"] or collected
    row_label = label_by(label, final) if label else default_label(final)
    if measure:
        collected, note = measure_rows(
            collected,
            row_label,
            batch_size=measure_batch_size,
            device=measure_device,
            precision=measure_precision,
            threads=measure_threads,
            clock=measure_clock,
            warmup=measure_warmup,
            runs=measure_runs,
        )
        title: str | None = "throughput measured now by report --measure, all rows side by side"
    else:
        note, comparable = throughput_note(final)
        title = None if comparable else "throughput from results.json: NOT comparable (see the table)"
    rows = build_table(collected, average=average, metric=metric, label=row_label)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, note) + f"Accuracy shown: {metric} ({METRIC_LABELS[metric]}).\n"
    written = {"markdown": out / "vtab_table.md", "csv": to_csv(rows, out / "vtab_table.csv")}
    written["markdown"].write_text(markdown, encoding="utf-8")
    if plot:
        from pyra_lightning.commands.figures import plot_accuracy_throughput

        written["plot"] = plot_accuracy_throughput(
            collected, out / "accuracy_throughput.png", average, metric, title=title, label=label or ()
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
        allow_abbrev=False,
        description="Tabulate results.json files of VTAB-1k runs like the paper's Table 2.",
    )
    parser.add_argument(
        "results", type=str, nargs="+", help="Run folders (searched recursively), files or globs."
    )
    parser.add_argument(
        "--label",
        type=str,
        nargs="+",
        help="Settings that also name the rows (e.g. model.lora.rank trainer.max_epochs): results that "
        "differ in them get rows of their own.",
    )
    parser.add_function_arguments(report, skip={"results", "label"}, as_group=False)
    report(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
