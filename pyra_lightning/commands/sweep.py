"""``pyra-lightning sweep``: one config over the VTAB-1k tasks, restartable, one subprocess per task.

A Table 2 row needs 19 trainings (Zhai et al., 2019; PYRA, Xiong et al., 2024). Each task runs as
``python -m pyra_lightning fit`` in its own folder ``<out_dir>/<name>/<task>/``, so one task's
crash or bad data folder cannot take the others down, and the folder alone says how far it got: with
a valid ``results.json`` it is finished and a rerun skips it; otherwise it runs again and the CLI's
auto-resume continues from its ``last.ckpt`` (or SLURM's ``hpc_ckpt_N.ckpt``). So rerunning the
same command after a crash, ``kill -9`` or requeue picks up where it stopped, with no flag.

Each task keeps its state in ``<task>/sweep_task.json``; ``<out_dir>/<name>/sweep.json`` gathers
them (status, duration, ``results.json`` path), rewritten atomically at every change.
``pyra-lightning report <out_dir>/<name>`` then tabulates the results.

In a SLURM job array (``SLURM_ARRAY_TASK_ID`` set, or ``--slurm_array true``) an invocation runs
only task number ``SLURM_ARRAY_TASK_ID`` of the list: see ``scripts/slurm/sweep_array.sbatch``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pyra_lightning.commands.sweep_progress import Progress, format_duration
from pyra_lightning.commands.sweep_state import (
    RUN_HEADER,
    SWEEP_FILE,
    SweepSummary,
    TaskRun,
    find_results,
    log_tail,
    now_utc,
    read_task_state,
    save_task_state,
    write_sweep_json,
)
from pyra_lightning.data.tasks import BENCHMARK_TASKS, check_benchmark, resolve_task
from pyra_lightning.results import RESULTS_FILENAME, describe_differences

_POLL_S = 0.5
_TERMINATE_GRACE_S = 15.0


class _Terminated(Exception):
    """Raised in the main loop by SIGTERM, so running tasks are stopped and recorded."""


# ------------------------------------------------------------------------------------ task list
def _check_component(value: str, what: str) -> str:
    if not value or value in (".", "..") or "/" in value or os.sep in value:
        raise ValueError(f"{what} {value!r} must be a plain folder name (no '/', not '.' or '..')")
    return value


def resolve_tasks(tasks: Sequence[str] | None, benchmark: str = "vtab") -> list[str]:
    """Task folder names in the order given (all 19 in Table 2 order for ``None``), duplicates dropped.

    Known names and aliases become the registry's name (``cifar100`` -> ``cifar``), so a task has
    one folder whatever it is called; anything else is a custom data folder, kept as given.
    """
    if tasks is None:
        return [task.name for task in BENCHMARK_TASKS[check_benchmark(benchmark)]]
    names: list[str] = []
    for raw in tasks:
        try:
            name = resolve_task(raw, benchmark).name
        except ValueError:
            name = _check_component(raw.strip(), "task")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("the sweep has no tasks")
    return names


def slurm_array_index(slurm_array: bool | None, num_tasks: int) -> int | None:
    """The task index this array job runs, or ``None`` outside array mode.

    ``slurm_array=None`` follows ``SLURM_ARRAY_TASK_ID``; ``True`` requires it; ``False`` ignores it.
    """
    raw = os.environ.get("SLURM_ARRAY_TASK_ID")
    if slurm_array is False or (slurm_array is None and raw is None):
        return None
    if raw is None:
        raise RuntimeError("slurm_array=True but SLURM_ARRAY_TASK_ID is not set (submit with sbatch --array)")
    index = int(raw)
    if not 0 <= index < num_tasks:
        raise ValueError(
            f"SLURM_ARRAY_TASK_ID={index}, but the sweep has {num_tasks} tasks: use --array=0-{num_tasks - 1}"
        )
    return index


# ------------------------------------------------------------------------------- one task's run
FIT_PREFIX = (sys.executable, "-m", "pyra_lightning", "fit")
"""What every task's command starts with; its ``fit`` arguments follow."""


def fit_command(
    config: Sequence[str], task: str, run_dir: Path, overrides: Sequence[str], benchmark: str = "vtab"
) -> list[str]:
    """The ``fit`` command of one task. ``overrides`` come last, so they win over the sweep's own.

    ``run_dir`` is the run folder: checkpoints, logs and ``results.json`` all go there, so tasks
    can neither resume nor overwrite each other.
    """
    command = [*FIT_PREFIX]
    command += [f"--config={path}" for path in config]
    command += [f"--data.task={task}", f"--run_dir={run_dir}"]
    command += [] if benchmark == "vtab" else [f"--data.benchmark={benchmark}"]
    return command + list(overrides)


# ---------------------------------------------------------------------------------------- sweep
def run_sweep(
    config: list[str],
    tasks: list[str] | None = None,
    out_dir: str = "runs/sweep",
    name: str | None = None,
    overrides: list[str] | None = None,
    max_parallel: int = 1,
    retries: int = 0,
    devices: list[str] | None = None,
    slurm_array: bool | None = None,
    dry_run: bool = False,
    benchmark: str = "vtab",
) -> SweepSummary:
    """Train ``config`` on every task, each in ``<out_dir>/<name>/<task>/``, skipping finished ones.

    Args:
        config: ``--config`` files of ``pyra-lightning fit``, in order (later ones override).
        tasks: task names or aliases, or custom data folders under ``data.root``; ``None``: the
            19 VTAB-1k tasks in Table 2 order.
        out_dir: parent folder of the sweep.
        name: the sweep's folder under ``out_dir``; default: the config files' stems joined by ``+``.
        overrides: extra ``fit`` arguments for every task, e.g. ``["--trainer.max_epochs=2"]``.
        max_parallel: tasks run at the same time (e.g. one per GPU with ``devices``).
        retries: extra attempts for a failed task (each resumes from its ``last.ckpt``).
        devices: ``CUDA_VISIBLE_DEVICES`` of each parallel slot, round-robin (``["0", "1"]``, or
            ``["0,1", "2,3"]`` for two GPUs per task); ``None`` leaves the variable alone.
        slurm_array: run only task ``SLURM_ARRAY_TASK_ID`` of the list; ``None``: whenever that
            variable is set.
        dry_run: print what would run and what is skipped, and check each pending task's data as
            its fit would (a task that would fail is marked failed); run and write nothing.
        benchmark: ``vtab`` (VTAB-1k) or ``fgvc`` (FGVC-5: cub, nabirds, flowers, dogs, cars): whose
            tasks ``tasks`` names (FGVC's ``flowers`` is not VTAB's ``oxford_flowers102``) and the
            default task list.

    Returns:
        The summary of this invocation's tasks; ``summary.ok`` is False if any failed.
    """
    if not config:
        raise ValueError("run_sweep needs at least one --config file")
    missing = [path for path in config if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"config file(s) not found: {', '.join(missing)}")
    if max_parallel < 1 or retries < 0:
        raise ValueError(f"need max_parallel >= 1 and retries >= 0, got {max_parallel} and {retries}")
    overrides = list(overrides or [])
    all_tasks = resolve_tasks(tasks, benchmark)
    name = _check_component(name or "+".join(Path(path).stem for path in config), "sweep name")
    sweep_dir = Path(out_dir).absolute() / name
    index = slurm_array_index(slurm_array, len(all_tasks))
    selected = all_tasks if index is None else [all_tasks[index]]
    meta = {"name": name, "config": list(config), "overrides": overrides, "out_dir": str(Path(out_dir))}
    if benchmark != "vtab":
        meta["benchmark"] = benchmark

    runs = [TaskRun(task, str(sweep_dir / task)) for task in selected]
    for run in runs:
        run.command = fit_command(config, run.task, Path(run.run_dir), overrides, benchmark)
        results = find_results(Path(run.run_dir))
        if results is not None:
            previous = read_task_state(Path(run.run_dir)) or {}
            run.status, run.results_json = "skipped", str(results)
            run.duration_s, run.finished = previous.get("duration_s"), previous.get("finished")
    summary = SweepSummary(name, sweep_dir, runs, dry_run)
    refuse_if_changed(sweep_dir, meta)
    if dry_run:
        from pyra_lightning.commands.sweep_data import check_sweep_data  # loads the CLI: dry runs only

        pending = [run for run in runs if run.status != "skipped"]
        # one parse of the fit arguments for all tasks (only --data.task differs), data checked per task
        problems = (
            check_sweep_data(pending[0].command[len(FIT_PREFIX) :], [run.task for run in pending])
            if pending
            else {}
        )
        for run in runs:
            print(f"[{run.status}] {run.task}: " + (run.results_json or " ".join(run.command)))
            if run.task in problems:
                run.status, run.log_tail = "failed", problems[run.task]
                print(f"  its fit would fail on its data: {problems[run.task]}")
        print(
            f"dry run: {len(pending)} would run ({len(problems)} would fail on their data, above), "
            f"{len(summary.skipped)} finished before; nothing was written"
        )
        return summary

    sweep_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        Path(run.run_dir).mkdir(exist_ok=True)
        save_task_state(run)
    write_sweep_json(sweep_dir, all_tasks, meta)
    _execute(runs, all_tasks, sweep_dir, meta, max_parallel, retries, devices)
    return summary


def override_settings(overrides: Sequence[str]) -> dict[str, str]:
    """``fit`` overrides as ``{flag: value}``: ``--a=1`` and ``--a 1`` both give ``{"--a": "1"}``.

    A later flag wins, as it does on ``fit``'s command line; a token that follows no flag is kept
    under its position so that no difference can hide.
    """
    settings: dict[str, str] = {}
    flag: str | None = None
    for index, token in enumerate(overrides):
        if token.startswith("--"):
            key, sep, value = token.partition("=")
            settings[key] = value if sep else "true"  # a bare flag until a value follows it
            flag = None if sep else key
        elif flag is not None:
            settings[flag], flag = token, None
        else:
            settings[f"argument {index}"] = token
    return settings


def refuse_if_changed(sweep_dir: Path, meta: dict[str, Any]) -> None:
    """Refuse to continue a sweep whose ``sweep.json`` records other configs or overrides.

    Its finished tasks would be skipped and its unfinished ones trained with the new settings, so
    one table would silently mix two settings; ``fit`` refuses a run folder of other settings for
    the same reason. A sweep none of whose tasks has started yet holds nothing and may change.

    Raises:
        ValueError: listing every differing config file and override, and how to proceed.
    """
    try:
        before = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(before, dict):
        return
    tasks = before.get("tasks") if isinstance(before.get("tasks"), dict) else {}
    if all(isinstance(t, dict) and t.get("status") == "pending" for t in tasks.values()):
        return
    recorded = {"config": before.get("config"), **override_settings(before.get("overrides") or [])}
    asked = {"config": meta["config"], **override_settings(meta["overrides"])}
    differences = describe_differences(recorded, asked, str(sweep_dir / SWEEP_FILE), "in this command")
    if differences:
        listed = "\n".join(f"  {line}" for line in differences)
        raise ValueError(
            f"sweep {meta['name']}: {sweep_dir} holds a sweep of other settings; these settings differ:\n"
            f"{listed}\nRerun it with the same --config files and overrides to continue it, or start a new "
            f"sweep with another --name (or delete {sweep_dir})."
        )


def _execute(
    runs: list[TaskRun],
    all_tasks: list[str],
    sweep_dir: Path,
    meta: dict[str, Any],
    max_parallel: int,
    retries: int,
    devices: list[str] | None,
) -> None:
    """Run the pending tasks, ``max_parallel`` at a time, recording every change of state."""
    queue = [run for run in runs if run.status == "pending"]
    active: dict[int, tuple[TaskRun, subprocess.Popen[bytes]]] = {}  # slot -> (run, process)
    started: dict[str, float] = {}
    progress = Progress(meta["name"], len(runs), max_parallel)

    def record(run: TaskRun) -> None:
        save_task_state(run)
        write_sweep_json(sweep_dir, all_tasks, meta)

    terminating: list[bool] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        if not terminating:  # a second SIGTERM must not interrupt the cleanup below
            terminating.append(True)
            raise _Terminated

    # SLURM sends the requeue signal (SIGUSR1) to the whole job step; Lightning's handler in the
    # training process saves and requeues, and the sweep itself must only survive it (a handler
    # that only takes note: printing from inside a signal handler can hit a reentrant write).
    requeue_signals: list[int] = []
    handlers: dict[int, Any] = {signal.SIGTERM: on_sigterm}
    if hasattr(signal, "SIGUSR1"):
        handlers[signal.SIGUSR1] = lambda signum, frame: requeue_signals.append(signum)
    previous = {}
    with contextlib.suppress(ValueError):  # signal.signal works only in the main thread
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        while queue or active:
            for slot in range(max_parallel):
                if slot not in active and queue:
                    run = queue.pop(0)
                    device = devices[slot % len(devices)] if devices else None
                    active[slot] = (run, _start(run, device))
                    started[run.task] = time.monotonic()
                    record(run)
            progress.show(runs, started)
            time.sleep(_POLL_S)
            if requeue_signals:
                requeue_signals.clear()
                progress.message("sweep: SIGUSR1 (SLURM's requeue signal); the training run handles it")
            for slot, (run, process) in list(active.items()):
                if process.poll() is None:
                    continue
                del active[slot]
                _finish(run, process.returncode, time.monotonic() - started[run.task])
                if run.status == "done":
                    progress.durations.append(run.duration_s or 0.0)
                    exit_note = f" (then exit {run.returncode})" if run.returncode else ""
                    progress.message(f"{run.task}: done in {format_duration(run.duration_s or 0)}{exit_note}")
                elif run.attempts <= retries:
                    progress.message(f"{run.task}: failed (exit {run.returncode}), retrying")
                    run.status = "pending"
                    queue.append(run)
                else:
                    progress.message(f"{run.task}: FAILED (exit {run.returncode}), log: {run.log}")
                record(run)
        progress.show(runs, started)
    except (KeyboardInterrupt, _Terminated):
        for run, process in active.values():
            _stop(process)
            _finish(run, process.returncode, time.monotonic() - started[run.task])
            run.status = "done" if run.status == "done" else "interrupted"
            record(run)
        raise
    finally:
        progress.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(run: TaskRun, device: str | None) -> subprocess.Popen[bytes]:
    """Start one attempt; its output is appended to ``train.log`` after a header naming the run."""
    run.status, run.attempts, run.started, run.device = "running", run.attempts + 1, now_utc(), device
    run.returncode = run.duration_s = run.finished = run.log_tail = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with run.log.open("ab") as log:
        header = f"\n{RUN_HEADER} {run.started}, attempt {run.attempts}, device {device}\n"
        log.write(header.encode() + (" ".join(run.command) + "\n").encode())
        log.flush()
        # same process group as the sweep: Ctrl-C and SLURM's signals reach the training too
        return subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _finish(run: TaskRun, returncode: int | None, duration: float) -> None:
    """Record an attempt's end: done means a valid ``results.json``, whatever the exit status.

    The same rule as for skipping: a run that crashed after writing its result is not retried.
    """
    run.returncode, run.duration_s, run.finished = returncode, round(duration, 2), now_utc()
    results = find_results(Path(run.run_dir))
    if results is not None:
        run.status, run.results_json = "done", str(results)
        return
    run.status, run.log_tail = "failed", log_tail(run.log)
    if returncode == 0:
        run.log_tail += (
            f"\n(exit 0 but no valid {RESULTS_FILENAME} under {run.run_dir}: was test_after_fit off, or did "
            "--trainer.max_steps/max_time stop the fit before its last epoch?)"
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period (Lightning under SLURM ignores SIGTERM)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------ CLI
def _as_list(values: Sequence[str] | None, split_commas: bool) -> list[str] | None:
    """``a b`` and ``[a, b]`` (and ``a,b`` with ``split_commas``) all mean ``["a", "b"]``."""
    if values is None:
        return None
    items: list[str] = []
    for value in values:
        if value.lstrip().startswith("["):
            items += [str(item) for item in yaml.safe_load(value)]
        else:
            items += [item for item in (value.split(",") if split_commas else [value]) if item]
    return items


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning sweep``: ``run_sweep``'s arguments, then ``fit``'s after ``--``; exit 1 if a task failed."""
    from jsonargparse import ArgumentParser

    args = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in args:
        at = args.index("--")
        args, passthrough = args[:at], args[at + 1 :]
    parser = ArgumentParser(
        prog="pyra-lightning sweep",
        allow_abbrev=False,
        description="Run `pyra-lightning fit` on VTAB-1k tasks, one folder per task, skipping finished "
        "ones. Arguments after `--` go to every fit, e.g. `-- --trainer.max_epochs=2`.",
    )
    parser.add_argument("--config", action="append", required=True, help="fit config file (repeatable).")
    parser.add_argument("--tasks", nargs="+", help="`a b`, `a,b` or `[a, b]`; default: all 19")
    parser.add_argument("--devices", nargs="+", help="CUDA_VISIBLE_DEVICES per slot: `0 1` or `0,1 2,3`.")
    parser.add_function_arguments(run_sweep, skip={"config", "tasks", "devices"}, as_group=False)
    kwargs = vars(parser.parse_args(args))
    kwargs["tasks"] = _as_list(kwargs["tasks"], split_commas=True)
    kwargs["devices"] = _as_list(kwargs["devices"], split_commas=False)
    kwargs["overrides"] = [*(kwargs["overrides"] or []), *passthrough]
    try:
        summary = run_sweep(**kwargs)
    except (KeyboardInterrupt, _Terminated) as stop:
        print("sweep stopped; rerun the same command to continue", file=sys.stderr)
        sys.exit(130 if isinstance(stop, KeyboardInterrupt) else 143)
    if not summary.dry_run:
        print(summary.format())
    if not summary.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
