"""Runs you can trust (issue 9): one folder per run, resume and evaluate only what matches.

Each test reproduces one bug a new user hit right after the quickstart, and checks it is gone. One
short quickstart fit in the default layout (``runs/demo/pyra`` under a temporary working folder)
is shared by the module's tests; the refusals cost no training.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, SHORT, quickstart_args

from pyra_lightning.__main__ import main
from pyra_lightning.data.demo import DEMO_CLASSES
from pyra_lightning.training.lock import LOCK_FILE


def run_main(args: list[str]) -> None:
    main(args)


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must be refused; its one-line error (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "size mismatch" not in err
    return err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working folder holding ``data/`` and one finished quickstart run, ``runs/demo/pyra``,
    fitted under umask 022 (so its files must be mode 0644)."""
    root = tmp_path_factory.mktemp("work")
    previous_dir, previous_mask = Path.cwd(), os.umask(0o022)
    os.chdir(root)
    try:
        main(["fit", *quickstart_args(None, root / "data", *SHORT)])
    finally:
        os.chdir(previous_dir)
        os.umask(previous_mask)
    yield root


def args_in(workdir: Path, *extra: str) -> list[str]:
    return quickstart_args(None, workdir / "data", *SHORT, *extra)


@pytest.mark.slow
def test_a_run_is_one_folder_whose_files_honour_the_umask(workdir: Path) -> None:
    run = workdir / "runs" / "demo" / "pyra"
    for name in ("run.json", "config.yaml", "metrics.csv", "results.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "merging").glob("*.png")), "merge images go to the run folder too"
    everything = [p.relative_to(workdir) for p in workdir.rglob("*")]
    assert not [p for p in everything if p.name.startswith("version_")], "no version_N folders"
    assert sorted({p.parts[0] for p in everything}) == ["data", "runs"], "nothing outside the run folder"
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["demo"]
    for name in ("results.json", "run.json", "checkpoints/last.ckpt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, f"{name}: umask 022 gives 0644"
    result = json.loads((run / "results.json").read_text())
    record = json.loads((run / "run.json").read_text())
    assert result["fingerprint"] == record["fingerprint"] and record["status"] == "finished"
    assert result["settings"]["data.task"] == "demo" and result["settings"]["model.lora.rank"] == 16
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["pyra_run"]["fingerprint"] == record["fingerprint"]


@pytest.mark.slow
def test_rerunning_a_finished_fit_neither_trains_nor_tests(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workdir)
    run = workdir / "runs" / "demo" / "pyra"
    before = {name: (run / name).stat().st_mtime_ns for name in ("results.json", "checkpoints/last.ckpt")}
    main(["fit", *args_in(workdir)])
    assert f"results: {Path('runs/demo/pyra/results.json')}" in capsys.readouterr().out
    assert {name: (run / name).stat().st_mtime_ns for name in before} == before


@pytest.mark.slow
def test_another_task_in_the_same_root_trains_from_scratch_in_its_own_folder(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: `--data.task mytask` "continued" runs/quickstart/checkpoints/last.ckpt of the demo,
    # trained nothing and wrote the demo's accuracy as mytask's result.
    monkeypatch.chdir(workdir)
    shutil.copytree(workdir / "data" / "demo", workdir / "data" / "mytask", dirs_exist_ok=True)
    demo_run, mine = workdir / "runs" / "demo" / "pyra", workdir / "runs" / "mytask" / "pyra"
    demo_checkpoint = (demo_run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    main(["fit", *args_in(workdir, "--data.task=mytask")])
    result = json.loads((mine / "results.json").read_text())
    assert result["task"] == "mytask" and result["settings"]["data.task"] == "mytask"
    with open(mine / "metrics.csv") as handle:
        assert any(row.get("val/acc") for row in csv.DictReader(handle)), "it trained, in its own folder"
    assert torch.load(mine / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert json.loads((demo_run / "results.json").read_text())["task"] == "demo"
    assert (demo_run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == demo_checkpoint

    # Forcing the second task into the first task's folder is refused, naming the tasks.
    err = refused(["fit", *args_in(workdir, "--data.task=mytask", f"--run_dir={demo_run}")], capsys)
    assert f'data.task: "demo" in {demo_run / "run.json"} vs "mytask" now' in err
    assert "--run_dir" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ("--model.lora.rank=8", "model.lora.rank: 16 in"),
        ("--model.merging.merge_r=[8,8,8,8,8,8]", "model.merging.merge_r: [16, 12, 8, 6, 4, 2] in"),
    ],
)
def test_changed_settings_are_refused_listing_them(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: str,
    listed: str,
) -> None:
    # The issue: auto-resume crashed with a raw 12-line `size mismatch` RuntimeError.
    monkeypatch.chdir(workdir)
    err = refused(["fit", *args_in(workdir, change)], capsys)
    assert listed in err and "runs/demo/pyra holds another run" in err
    assert "delete runs/demo/pyra" in err
    suggested = err.split("--run_dir ", 1)[1].split(";")[0]
    assert suggested.startswith("runs/demo/pyra-") and change.split("=")[0].split(".")[-1] in suggested


@pytest.mark.slow
def test_default_root_dir_is_a_root_and_ckpt_path_last_is_the_runs_own(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(workdir)
    root = workdir / "elsewhere"
    main(["fit", *args_in(workdir, f"--trainer.default_root_dir={root}")])
    assert (root / "demo" / "pyra" / "results.json").is_file(), "ROOT/<task>/<method>, as in Lightning"
    caplog.clear()
    with caplog.at_level("INFO"):
        main(["test", *args_in(workdir, f"--trainer.default_root_dir={root}", "--ckpt_path=last")])
    assert f"--ckpt_path last: {root / 'demo' / 'pyra' / 'checkpoints' / 'last.ckpt'}" in caplog.text
    err = refused(["test", *args_in(workdir, "--ckpt_path=hpc")], capsys)
    assert "--ckpt_path hpc: runs/demo/pyra has no hpc_ckpt_N.ckpt" in err


def test_ckpt_path_with_a_conflicting_command_line_is_refused(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: `fit --ckpt_path FILE --model.lora.rank 8` trained and reported rank 16, silently.
    last = workdir / "runs" / "demo" / "pyra" / "checkpoints" / "last.ckpt"
    for command in ("fit", "test"):
        args = quickstart_args(
            tmp_path / command, workdir / "data", f"--ckpt_path={last}", "--model.lora.rank=8"
        )
        err = refused([command, *args], capsys)
        assert f"model.lora.rank: 16 in {last} vs 8 now" in err
    assert not any(tmp_path.iterdir()), "refused before anything was written"


def test_evaluating_without_a_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: `test` with no checkpoint tested random weights (accuracy 0.2475) and wrote results.json.
    for command in ("test", "validate", "predict"):
        err = refused([command, *quickstart_args(tmp_path / "fresh", tmp_path / "data")], capsys)
        assert f"pyra-lightning {command}: error: no checkpoint in {tmp_path / 'fresh'}" in err
        last_line = err.strip().splitlines()[-1]  # the refusal and its hint are one line
        assert last_line.startswith(f"pyra-lightning {command}: error: no checkpoint"), err
        assert last_line.endswith("(--traceback shows where it was raised)"), err
    assert not (tmp_path / "fresh").exists(), "a refusal leaves no run folder behind"


@pytest.mark.slow
def test_test_and_predict_use_the_runs_checkpoint_and_write_into_its_folder(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `test` and `predict` without --ckpt_path evaluate the run's last.ckpt; predict writes a CSV.
    run = tmp_path / "run"
    shutil.copytree(workdir / "runs" / "demo" / "pyra", run)
    fitted = json.loads((run / "results.json").read_text())
    main(["test", *quickstart_args(run, workdir / "data", *SHORT)])
    assert json.loads((run / "results.json").read_text()) == fitted, "the fit's result is left alone"
    tested = json.loads((run / "test" / "results.json").read_text())
    assert tested["test_acc"] == pytest.approx(fitted["test_acc"], abs=1e-6)
    assert tested["fingerprint"] == fitted["fingerprint"] and tested["checkpoint"].endswith("last.ckpt")
    assert (run / "test" / "metrics.csv").is_file() and (run / "metrics.csv").is_file(), "fit's logs kept"

    main(["predict", *quickstart_args(run, workdir / "data", *SHORT)])
    with open(run / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 400 and set(rows[0]) == {"image", "label", "predicted", "class_name"}
    assert Path(rows[0]["image"]).is_file() and "demo" in Path(rows[0]["image"]).parts
    assert all(row["class_name"] == DEMO_CLASSES[int(row["predicted"])] for row in rows)
    accuracy = sum(row["label"] == row["predicted"] for row in rows) / len(rows)
    assert accuracy == pytest.approx(fitted["test_acc"], abs=1e-6), "the same folded model as the test"


def test_a_truncated_checkpoint_is_named_with_the_fix(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: a truncated last.ckpt crashed auto-resume with "failed finding central directory".
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(workdir / "runs" / "demo" / "pyra" / "run.json", run / "run.json")
    data = (workdir / "runs" / "demo" / "pyra" / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(data[: len(data) // 2])
    for command in ("fit", "test"):
        err = refused([command, *quickstart_args(run, workdir / "data", *SHORT)], capsys)
        assert (
            f"checkpoint {run / 'checkpoints' / 'last.ckpt'} cannot be read: it is truncated or corrupt"
            in err
        )
        assert "central directory" not in err and "Delete it" in err


def test_auto_resume_false_never_shares_a_folder(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workdir)
    err = refused(["fit", *args_in(workdir, "--auto_resume=false")], capsys)
    assert "--auto_resume false, but runs/demo/pyra holds this run already" in err


def test_evaluating_into_another_runs_folder_is_refused(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A test of one run's checkpoint must not overwrite the results.json of the run whose folder it names.
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "run.json").write_text(
        json.dumps({"status": "finished", "fingerprint": "0" * 16, "settings": {}})
    )
    last = workdir / "runs" / "demo" / "pyra" / "checkpoints" / "last.ckpt"
    err = refused(["test", *quickstart_args(other, workdir / "data", f"--ckpt_path={last}")], capsys)
    assert f"is not the run in {other}" in err and "--run_dir" in err
    assert sorted(p.name for p in other.iterdir() if p.name != LOCK_FILE) == ["run.json"], (
        "nothing written into the other run"
    )


def test_export_refuses_arguments_that_change_the_model_and_an_existing_folder(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = workdir / "runs" / "demo" / "pyra" / "checkpoints" / "last.ckpt"
    out = tmp_path / "model"
    args = ["export", f"--ckpt_path={last}", f"--out_dir={out}"]
    err = refused(
        [
            *args,
            f"--config={QUICKSTART}",
            f"--data.root={workdir / 'data'}",
            "--model.merging.prop_attn=false",
        ],
        capsys,
    )
    assert "model.merging.prop_attn: true in" in err and "false now" in err
    assert not out.exists()
    out.mkdir()
    err = refused(args, capsys)
    assert "already exists" in err and "--overwrite" in err


@pytest.mark.slow
def test_predict_on_your_own_images_writes_beside_them(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(workdir / "runs" / "demo" / "pyra", run)
    main(["predict", *quickstart_args(run, workdir / "data", *SHORT)])
    with open(run / "predictions.csv") as handle:
        of_split = {Path(row["image"]).name: row for row in csv.DictReader(handle)}
    photos = tmp_path / "photos"
    photos.mkdir()
    test_images = sorted((workdir / "data" / "demo" / "images" / "test").glob("*.png"))[:5]
    for image in test_images:
        shutil.copy(image, photos / image.name)
    before = (run / "predictions.csv").read_bytes()
    main(["predict", *quickstart_args(run, workdir / "data", *SHORT), f"--images={photos}"])
    with open(photos / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["image"]).name for row in rows] == [image.name for image in test_images]
    for row in rows:
        assert row["label"] == "", "your own images have no known label"
        assert row["predicted"] == of_split[Path(row["image"]).name]["predicted"], row["image"]
        assert row["class_name"] == DEMO_CLASSES[int(row["predicted"])]
    assert (run / "predictions.csv").read_bytes() == before, "the run's own file is untouched"

    err = refused(
        [
            "predict",
            *quickstart_args(run, workdir / "data", *SHORT),
            f"--images={photos}/*.png",
            f"--out={run / 'predictions.csv'}",
        ],
        capsys,
    )
    assert "the run's own predictions of its test split" in err
    err = refused(
        ["predict", *quickstart_args(run, workdir / "data"), f"--images={tmp_path}/none/*.jpg"], capsys
    )
    assert "no images found" in err
    err = refused(["fit", *quickstart_args(run, workdir / "data"), f"--images={photos}"], capsys)
    assert "--images is an option of `predict`" in err


def test_predict_help_says_what_it_predicts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "Predict the class of every image of the run's test split" in out and "--images" in out


def test_an_elastic_run_has_a_default_folder_of_its_own(tmp_path: Path) -> None:
    """A plain PYRA run and an elastic one on the same task train side by side (runs/demo/pyra and
    runs/demo/pyra_elastic) instead of the second being refused in the first's folder."""
    from helpers import CONFIGS

    from pyra_lightning.training.cli import build_cli
    from pyra_lightning.training.runs import default_run_dir

    assert default_run_dir("demo", "low", True, "runs") == Path("runs/demo/pyra")
    assert default_run_dir("demo", "low", True, "runs", {"min_fraction": 0.5}) == Path(
        "runs/demo/pyra_elastic"
    )
    assert default_run_dir("demo", "low", False, "runs", {}) == Path("runs/demo/tome_elastic")
    root = f"--trainer.default_root_dir={tmp_path / 'runs'}"
    elastic = build_cli(
        [f"--config={QUICKSTART}", f"--config={CONFIGS / 'method/pyra_elastic.yaml'}", root], run=False
    )
    assert elastic.run_dir == tmp_path / "runs" / "demo" / "pyra_elastic"
    assert elastic.model.method == "pyra_elastic"


def test_explicit_settings_are_named_field_by_field_whatever_way_a_group_is_given(tmp_path: Path) -> None:
    """A ``--ckpt_path`` run compares what the user set with the checkpoint: one field
    (``--model.lora.rank``), a whole group on the command line or in a file, or a group in a
    config file all name fields, so that equal values never conflict and one changed field does."""
    from jsonargparse import Namespace

    from pyra_lightning.training.runs import conflicting_hparams, explicit_keys

    config = tmp_path / "run.yaml"
    config.write_text("model:\n  lora:\n    rank: 16\n  merging: merging.yaml\n  model_name: vit\n")
    keys = explicit_keys([f"--config={config}", "--model.optim.lr=0.1", "--model.recipe={}"], "model")
    assert {"lora.rank", "model_name", "optim.lr", "merging.merge_r", "merging.elastic"} <= keys
    assert (
        {"recipe.scheduler_step", "recipe.lora_init"} <= keys
        and "lora" not in keys
        and "lora.dropout" not in keys
    )
    hparams = {"lora": {"rank": 16, "dropout": 0.1}, "optim": {"lr": 0.1}, "model_name": "vit"}
    same = Namespace(lora=Namespace(rank=16, dropout=0.0), optim=Namespace(lr=0.1), model_name="vit")
    assert conflicting_hparams(hparams, same, keys, "last.ckpt") == []
    other = Namespace(lora=Namespace(rank=8, dropout=0.1), optim=Namespace(lr=0.1), model_name="vit")
    assert conflicting_hparams(hparams, other, keys, "last.ckpt") == [
        "model.lora.rank: 16 in last.ckpt vs 8 now"
    ]


def test_a_checkpoint_with_the_old_flat_settings_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import tiny_module

    from pyra_lightning.commands.export import main as export_main

    module = tiny_module()
    flat = {k: v for k, v in dict(module.hparams).items() if k not in ("lora", "merging", "optim", "recipe")}
    checkpoint = {"state_dict": {}, "hyper_parameters": {**flat, "lora_rank": 4, "merge_r": [8, 8, 4, 4]}}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    expected = r"flat model settings \(lora_rank -> model.lora.rank, merge_r -> model.merging.merge_r\)"
    with pytest.raises(ValueError, match=expected):
        export_main([f"--ckpt_path={tmp_path / 'old.ckpt'}", f"--out_dir={tmp_path / 'out'}"])
    old = f"--ckpt_path={tmp_path / 'old.ckpt'}"
    with pytest.raises(SystemExit) as stopped:
        main(["test", *quickstart_args(tmp_path / "run", tmp_path / "data"), old])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and re.search(expected, err) and "Traceback" not in err


def test_the_kernels_are_no_part_of_a_runs_identity() -> None:
    """``model.merging.merger``/``attention`` choose how the same numbers are computed: they stay out
    of the settings a resume or an evaluation compares, and a command may change them over a
    checkpoint; ``matcher`` and every other setting still count."""
    from types import SimpleNamespace

    from helpers import tiny_module
    from jsonargparse import Namespace

    from pyra_lightning.training.runs import conflicting_hparams, run_settings

    trainer = SimpleNamespace(precision="32-true")
    kernels = tiny_module(merging={"merger": "triton", "attention": "flex"}, compile_model=True)
    settings = run_settings(trainer, kernels, None)
    assert not {"model.merging.merger", "model.merging.attention", "model.compile_model"} & set(settings)
    assert settings == run_settings(trainer, tiny_module(), None)
    assert settings["model.merging.matcher"] == "bipartite"
    hparams = {"merging": {"merger": "wavg", "attention": "sdpa", "pyra": True}}
    config = Namespace(merging=Namespace(merger="triton", attention="flex", pyra=False))
    keys = {"merging.merger", "merging.attention", "merging.pyra"}
    assert conflicting_hparams(hparams, config, keys, "x.ckpt") == [
        "model.merging.pyra: true in x.ckpt vs false now"
    ]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:throughput.engine=eager times FlexAttention")
def test_a_kernel_given_with_ckpt_path_is_the_one_that_runs(workdir: Path, tmp_path: Path) -> None:
    """``test --ckpt_path X --model.merging.attention flex``: LightningCLI merges the checkpoint's
    hyperparameters over the command line; a kernel choice given explicitly survives that merge."""
    last = workdir / "runs" / "demo" / "pyra" / "checkpoints" / "last.ckpt"
    out = tmp_path / "flex"
    main(
        [
            "test",
            *quickstart_args(out, workdir / "data", f"--ckpt_path={last}", "--model.merging.attention=flex"),
        ]
    )
    result = json.loads((out / "test" / "results.json").read_text())  # a test of a trained run
    assert result["config"]["attention"] == "flex" and result["config"]["merger"] == "wavg"
