"""The VTAB-1k sweep: killed and rerun it recomputes nothing finished; failures stay isolated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICKSTART

from pyra_lightning.commands.sweep import (
    RUN_HEADER,
    Progress,
    TaskRun,
    find_results,
    main,
    run_sweep,
)
from pyra_lightning.data.demo import generate_demo
from pyra_lightning.data.tasks import VTAB_TASKS

# One short epoch of the quickstart ViT per task: the tests are about the sweep, not the model.
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.batch_size=8",
    "--data.cache_images=false",
    "--throughput.runs=1",
    "--throughput.warmup=0",
    "--throughput.batch_size=8",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated ``demo`` task plus ``demo_copy``, a custom task folder with the same files."""
    root = tmp_path_factory.mktemp("vtab")
    shutil.copytree(generate_demo(root), root / "demo_copy")
    return root


def sweep_command(out_dir: Path, data_root: Path, *tasks: str) -> list[str]:
    return [
        sys.executable, "-m", "pyra_lightning.commands.sweep", f"--config={QUICKSTART}", "--tasks", *tasks,
        f"--out_dir={out_dir}", "--name=tiny", "--", *TINY, f"--data.root={data_root}",
    ]  # fmt: skip


def quiet_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: no thread oversubscription


def runs_in_log(log: Path) -> int:
    return log.read_text(errors="replace").count(RUN_HEADER)


@pytest.mark.slow
def test_killed_sweep_reruns_without_recomputing_finished_tasks(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweeps" / "tiny"
    first, second = sweep / "demo", sweep / "demo_copy"
    command = sweep_command(tmp_path / "sweeps", data_root, "demo", "demo_copy")
    with (tmp_path / "first.out").open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=quiet_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        try:  # the second task's log appears once the first task has finished and the second started
            while not (second / "train.log").exists():
                assert process.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first task did not finish in time"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the sweep and its training subprocess
            process.wait()
    [results] = list(first.rglob("results.json"))
    before, checkpoint = results.stat(), (first / "checkpoints" / "last.ckpt").stat()
    assert json.loads((sweep / "sweep.json").read_text())["tasks"]["demo"]["status"] == "done"
    assert not list(second.rglob("results.json")), "killed before the second task finished"

    # The same command again, in this process to save an interpreter start (returns: exit 0).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(command[3:])
    assert "1 done, 1 skipped" in capsys.readouterr().out
    assert list(first.rglob("results.json")) == [results]
    after = results.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "recomputed"
    assert (first / "checkpoints" / "last.ckpt").stat().st_mtime_ns == checkpoint.st_mtime_ns
    assert runs_in_log(first / "train.log") == 1
    assert runs_in_log(second / "train.log") == 2, "killed once, then run to the end"
    tasks = json.loads((sweep / "sweep.json").read_text())["tasks"]
    assert [tasks["demo"]["status"], tasks["demo_copy"]["status"]] == ["skipped", "done"]
    assert tasks["demo"]["results_json"] == str(results)
    assert json.loads(Path(tasks["demo_copy"]["results_json"]).read_text())["task"] == "demo_copy"


@pytest.mark.slow
def test_a_failing_task_is_reported_and_the_others_still_run(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    argv = sweep_command(tmp_path, data_root, "no_such_task", "demo")[3:]
    with pytest.raises(SystemExit) as exit_info:
        main(["--max_parallel=2", *argv])  # both at once: the failure must not disturb its neighbour
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "1 done, 0 skipped (finished before), 1 failed" in out
    assert "no_such_task failed" in out and "does not exist" in out, out  # the CLI's error, from the log
    tasks = json.loads((tmp_path / "tiny" / "sweep.json").read_text())["tasks"]
    assert tasks["no_such_task"]["status"] == "failed" and tasks["no_such_task"]["returncode"] != 0
    assert tasks["demo"]["status"] == "done" and Path(tasks["demo"]["results_json"]).is_file()


def test_slurm_array_job_runs_only_its_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def picked(**kwargs: object) -> list[str]:
        summary = run_sweep([str(QUICKSTART)], out_dir=str(tmp_path), dry_run=True, **kwargs)  # type: ignore[arg-type]
        return [run.task for run in summary.runs]

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert picked() == [task.name for task in VTAB_TASKS]
    with pytest.raises(RuntimeError, match="SLURM_ARRAY_TASK_ID is not set"):
        picked(slurm_array=True)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert picked() == ["dtd"]  # Table 2 order: cifar, caltech101, dtd, ...
    assert picked(tasks=["demo", "textures", "cifar100"]) == ["cifar"]
    assert len(picked(slurm_array=False)) == 19
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "19")
    with pytest.raises(ValueError, match="--array=0-18"):
        picked()
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_command_line_resolves_tasks_and_passes_fit_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyra_lightning.__main__ import main as cli_main

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(SystemExit) as exit_info:  # cifar and pets have no data under data.root
        cli_main(["sweep", f"--config={QUICKSTART}", "--tasks", "cifar100,demo", "pets", "--out_dir",
                  str(tmp_path), "--dry_run=true", "--", "--trainer.max_epochs=2"])  # fmt: skip
    assert exit_info.value.code == 1
    *lines, total = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("  ")]
    assert [line.split(":")[0] for line in lines] == [
        "[pending] cifar",
        "[pending] demo",
        "[pending] oxford_iiit_pet",
    ]
    assert (
        total
        == "dry run: 3 would run (2 would fail on their data, above), 0 finished before; nothing was written"
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert all(line.endswith("--trainer.max_epochs=2") for line in lines)
    assert f"--run_dir={tmp_path / 'quickstart' / 'cifar'}" in lines[0]  # the run folder
    assert "save_dir" not in lines[0] and "dirpath" not in lines[0], (
        "the CLI puts everything in the run folder"
    )


def test_a_dry_run_finds_the_tasks_whose_data_would_fail_their_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dry run checks each pending task's data with the fit's own parser and data module, so a
    missing task folder or test image is found before the sweep, not when that task's turn comes."""
    root = tmp_path / "data"
    generate_demo(root)
    for name in ("ready", "no_test_image"):
        shutil.copytree(root / "demo", root / name)
    test_split = (root / "no_test_image" / "test.txt").read_text().splitlines()
    (root / "no_test_image" / test_split[3].split()[0]).unlink()
    out = tmp_path / "runs"
    tasks = ["ready", "no_test_image", "cifar"]
    summary = run_sweep([str(QUICKSTART)], tasks, str(out), overrides=[f"--data.root={root}"], dry_run=True)
    assert [run.status for run in summary.runs] == ["pending", "failed", "failed"]
    assert not summary.ok and not out.exists(), "a dry run writes nothing"
    printed = capsys.readouterr().out
    assert (
        f"test.txt, line 4: image {root / 'no_test_image' / test_split[3].split()[0]} does not exist"
        in printed
    )
    assert f"no folder for task 'cifar' under {root}" in printed
    assert "dry run: 3 would run (2 would fail on their data, above)" in printed
    assert run_sweep(
        [str(QUICKSTART)], ["ready"], str(out), overrides=[f"--data.root={root}"], dry_run=True
    ).ok


def test_progress_line_counts_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [
        TaskRun(f"t{i}", f"/x/t{i}", status)
        for i, status in enumerate(["done", "skipped", "failed", "running"])
    ]
    runs += [TaskRun("t4", "/x/t4"), TaskRun("t5", "/x/t5")]
    progress = Progress("s", total=6, max_parallel=1)
    progress.durations = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: 1030.0)
    line = progress.line(runs, started={"t3": 1000.0})
    # 2 pending x 100 s + the running task's remaining 70 s
    assert line == "sweep s: 2/6 done, 1 running, 1 failed, 2 remaining, ETA 0:04:30"


def test_parallel_slots_get_their_devices_and_failures_are_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for `fit` that starts in milliseconds: fails on its first attempt at task "b",
    # otherwise writes a results.json; both print the GPU their slot was given.
    script = (
        "import json, os, pathlib, sys; run = pathlib.Path(sys.argv[1]); "
        "print('CUDA', os.environ['CUDA_VISIBLE_DEVICES']); "
        "first = run.name == 'b' and not (run / 'tried').exists(); (run / 'tried').touch(); "
        "sys.exit(3) if first else (run / 'results.json').write_text("
        "json.dumps({'task': run.name, 'method': 'pyra', 'test_acc': 0.5}))"
    )
    monkeypatch.setattr(
        "pyra_lightning.commands.sweep.fit_command",
        lambda config, task, run_dir, *_: [sys.executable, "-c", script, str(run_dir)],
    )
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    summary = run_sweep(
        [str(QUICKSTART)],
        ["a", "b", "c"],
        str(tmp_path),
        "fake",
        max_parallel=2,
        retries=1,
        devices=["0", "1"],
    )
    assert summary.ok and summary.done == ["a", "b", "c"]
    assert [run.attempts for run in summary.runs] == [1, 2, 1]
    logs = {run.task: run.log.read_text() for run in summary.runs}
    assert "CUDA 0" in logs["a"] and "CUDA 1" in logs["b"], "one device per parallel slot"
    assert runs_in_log(summary.runs[1].log) == 2
    assert json.loads((tmp_path / "fake" / "sweep.json").read_text())["counts"] == {"done": 3}


def test_a_task_is_finished_only_when_the_report_accepts_its_results(tmp_path: Path) -> None:
    run_dir = tmp_path / "cifar"
    run_dir.mkdir()
    assert find_results(run_dir) is None
    (run_dir / "results.json").write_text("{truncated")
    assert find_results(run_dir) is None, "a broken file does not finish a task"
    document = {"task": "cifar", "method": "pyra", "test_acc": 67.5, "test_acc_best": None}
    (run_dir / "results.json").write_text(json.dumps(document))
    assert find_results(run_dir) is None, "nor does a percentage"
    document["test_acc"] = 0.675
    (run_dir / "results.json").write_text(json.dumps(document))
    assert find_results(run_dir) == run_dir / "results.json"


def test_a_rerun_with_other_overrides_is_refused_listing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The issue: a rerun under the same --name with changed overrides printed one warning, skipped
    # the finished tasks and trained the others with the new settings: one table, two settings.
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    sweep_dir = tmp_path / "tiny"
    sweep_dir.mkdir()
    recorded = {
        "name": "tiny",
        "config": [str(QUICKSTART)],
        "overrides": ["--trainer.max_epochs=2", "--data.batch_size", "8"],
        "tasks": {"demo": {"task": "demo", "status": "done"}},
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(recorded))
    same = ["--trainer.max_epochs", "2", "--data.batch_size=8"]  # the same settings, spelled otherwise
    assert run_sweep([str(QUICKSTART)], ["demo"], str(tmp_path), "tiny", same, dry_run=True).runs
    changed = ["--trainer.max_epochs=3", "--data.batch_size=8", "--model.lora.rank=4"]
    with pytest.raises(ValueError, match="holds a sweep of other settings") as error:
        run_sweep([str(QUICKSTART)], ["demo"], str(tmp_path), "tiny", changed, dry_run=True)
    message = str(error.value)
    assert '--trainer.max_epochs: "2" in' in message and '"3" in this command' in message
    assert '--model.lora.rank: "(not set)"' in message and "--data.batch_size" not in message
    assert "another --name" in message
    recorded["tasks"]["demo"]["status"] = "pending"  # nothing started: nothing to protect
    (sweep_dir / "sweep.json").write_text(json.dumps(recorded))
    assert run_sweep([str(QUICKSTART)], ["demo"], str(tmp_path), "tiny", changed, dry_run=True).runs


def test_an_fgvc_sweep_runs_fgvc_tasks_with_their_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FGVC's `flowers` (Oxford Flowers, VPT's splits) was resolved to VTAB's oxford_flowers102.
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    summary = run_sweep([str(QUICKSTART)], out_dir=str(tmp_path), dry_run=True, benchmark="fgvc")
    assert [run.task for run in summary.runs] == ["cub", "nabirds", "flowers", "dogs", "cars"]
    assert all("--data.benchmark=fgvc" in run.command for run in summary.runs)
    picked = run_sweep([str(QUICKSTART)], ["flowers"], str(tmp_path), dry_run=True, benchmark="fgvc")
    assert [run.task for run in picked.runs] == ["flowers"]
    vtab = run_sweep([str(QUICKSTART)], ["flowers"], str(tmp_path), dry_run=True)
    assert [run.task for run in vtab.runs] == ["oxford_flowers102"]
    assert not any("--data.benchmark" in arg for arg in vtab.runs[0].command)


def test_sweep_json_is_written_where_the_lock_cannot_be_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file system without locks (NotImplementedError from filelock 3) or a lock left by a holder
    killed on another host (Timeout) must not stop the sweep: sweep.json is written, with a warning."""
    import filelock

    import pyra_lightning.commands.sweep_state as state

    for error in (NotImplementedError("no flock here"), filelock.Timeout(str(tmp_path / ".sweep.lock"))):

        def refuse(
            self: filelock.BaseFileLock, *args: object, error: Exception = error, **kwargs: object
        ) -> None:
            raise error

        monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
        path = state.write_sweep_json(tmp_path, ["demo"], {"name": "s"})
        assert json.loads(path.read_text())["tasks"]["demo"]["status"] == "pending"
        err = capsys.readouterr().err
        assert "sweep: cannot lock" in err and type(error).__name__ in err and "unlocked" in err
