"""End to end through the ``pyra-lightning`` command: fit, test, results.json, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quickstart_args, resumable_fit

from pyra_lightning.__main__ import main

RESULT_KEYS = {
    "task", "group", "protocol", "method", "test_acc", "test_acc_best", "throughput", "throughput_unmerged",
    "speedup", "gflops", "gflops_unmerged", "params", "config", "benchmark", "settings", "fingerprint",
    "throughput_engine",
}  # fmt: skip


@pytest.mark.slow
def test_quickstart_fit_then_test_beats_chance_and_writes_results(tmp_path: Path) -> None:
    main(["fit", *quickstart_args(tmp_path / "runs", tmp_path / "data")])
    results_files = sorted((tmp_path / "runs").rglob("results.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    assert set(results) >= RESULT_KEYS
    assert results["task"] == "demo" and results["method"] == "pyra" and results["protocol"] == "final"
    assert results["test_acc"] > 0.45, "4 balanced classes: chance is 0.25"
    assert results["gflops"] < results["gflops_unmerged"]
    assert results["throughput"] > 0 and results["speedup"] == pytest.approx(
        results["throughput"] / results["throughput_unmerged"]
    )
    assert results["params"]["trainable"] == sum(results["params"][k] for k in ("lora", "pyra", "head"))
    assert results["config"]["merge_r"] == [16, 12, 8, 6, 4, 2]

    # `test` from the saved checkpoint evaluates the same (folded) model: same accuracy.
    last = sorted((tmp_path / "runs").rglob("last.ckpt"))
    assert len(last) == 1
    checkpoint = torch.load(last[0], weights_only=True)
    assert all(
        ".lora_" in k or ".pyra." in k or k.startswith("model.head.") for k in checkpoint["state_dict"]
    )
    main(["test", *quickstart_args(tmp_path / "again", tmp_path / "data"), f"--ckpt_path={last[0]}"])
    assert not (tmp_path / "again" / "results.json").exists(), "a test is not the run's fit result"
    again = json.loads((tmp_path / "again" / "test" / "results.json").read_text())
    assert again["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    assert again["fingerprint"] == results["fingerprint"], "the same run's settings"


def test_missing_data_root_is_named_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", *quickstart_args(tmp_path / "run", tmp_path / "nowhere"), "--data.task=cifar"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="nowhere"):  # --traceback: the exception itself
        main([*args, "--traceback"])


def test_tools_are_dispatched(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    assert "batch_size" in capsys.readouterr().out


@pytest.mark.parametrize("tool", ["report", "sweep", "export", "benchmark"])
def test_tool_help_imports_neither_lightning_nor_timm(tool: str) -> None:
    # The issue: `report --help` took 9-10 s importing Lightning, timm and torchvision first.
    code = (
        "import sys\nfrom pyra_lightning.__main__ import main\ntry:\n"
        f"    main([{tool!r}, '--help'])\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
        "print(sorted(m for m in ('lightning', 'timm', 'torchvision', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = done.stdout.splitlines()[-1]
    # export and benchmark build tensors, so torch itself may load; never Lightning, timm or torchvision.
    allowed = "['torch']" if tool in ("export", "benchmark") else "[]"
    assert loaded in ("[]", allowed), loaded
    assert f"usage: pyra-lightning {tool}" in done.stdout, "the usage line names the tool"


def test_a_model_name_typo_is_named_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The issue: a typo was reported as "timm has no pretrained config for it; set data.normalization".
    args = [
        "fit",
        *quickstart_args(tmp_path / "run", tmp_path / "data"),
        "--model.model_name=vit_smal_patch16_224",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "unknown timm model 'vit_smal_patch16_224'; did you mean vit_small_patch16_224?" in err
    assert "normalization" not in err


def test_a_config_typo_is_one_line_naming_the_file_and_the_key_it_meant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: jsonargparse printed ~140 lines of usage, then "does not accept option", no file.
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *quickstart_args(tmp_path / "run", tmp_path / "data"), f"--config={typo}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" not in err and len(err.strip().splitlines()) == 1, err
    assert "'trainer.max_epoch'" in err and str(typo) in err and "did you mean trainer.max_epochs?" in err
    with pytest.raises(SystemExit):  # the short form names the file too
        main(["fit", *quickstart_args(tmp_path / "run", tmp_path / "data"), "-c", str(typo)])
    assert str(typo) in capsys.readouterr().err

    with pytest.raises(SystemExit):  # a flag: no file to name, the key it meant
        main(["fit", *quickstart_args(tmp_path / "run", tmp_path / "data"), "--model.lora.rnk", "4"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did you mean model.lora.rank?" in err, err
    assert "set in --config" not in err, "the flag was not set in a config file"

    with pytest.raises(SystemExit):  # a value of the wrong type: the key, the value, on one line
        main(["fit", *quickstart_args(tmp_path / "run", tmp_path / "data"), "--data.batch_size=thirty"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and '"data.batch_size"' in err and "thirty" in err, err

    with pytest.raises(SystemExit):  # a flag cut short: refused, not taken for trainer.max_epochs
        main(["fit", *quickstart_args(tmp_path / "run", tmp_path / "data"), "--trainer.max_epoch=1"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did you mean trainer.max_epochs?" in err, err


def test_a_value_refused_while_the_model_is_built_prints_one_line_and_no_seed(tmp_path: Path) -> None:
    # The issue: Lightning's "Seed set to 0" (logged as the CLI seeds, before it builds the model)
    # came before every refusal the model or data raise, so a refusal was two lines.
    args = quickstart_args(tmp_path / "run", tmp_path / "data", "--model.merging.merge_r=[99, 12]")
    done = subprocess.run(
        [sys.executable, "-m", "pyra_lightning", "fit", *args], capture_output=True, text=True, timeout=300
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "merge_r: schedule has 2 entries but the model has 6 blocks" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["benchmark", "--model_nam", "vit_tiny_patch16_224"],
        ["data", "verify", "--tas", "demo"],
        ["report", "results.json", "--out_di", "x"],
        ["sweep", "--config", "configs/quickstart.yaml", "--dry_run=true", "--task", "demo"],
    ],
    ids=lambda argv: argv[0],
)
def test_no_command_takes_a_cut_short_option_for_the_one_it_starts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"unrecognized arguments: {argv[-2]}" in err, err


def test_a_test_of_a_trained_run_writes_its_own_results(tmp_path: Path) -> None:
    # The issue: `test` overwrote the fit's results.json with its own.
    from pyra_lightning.training.callbacks import ResultsJSON

    callback = ResultsJSON()
    callback.dirpath = tmp_path / "run"
    assert callback.target(None) == tmp_path / "run" / "test" / "results.json"  # type: ignore[arg-type]
    callback.on_fit_start(None, None)  # type: ignore[arg-type]
    assert callback.target(None) == tmp_path / "run" / "results.json"  # type: ignore[arg-type]


def test_fit_help_shows_our_options_and_puts_the_trainer_behind_help_all(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: `fit --help` took seconds and opened on Lightning's ~60 --trainer.* flags.
    from pyra_lightning.training import cli
    from pyra_lightning.training.cli_help import BriefHelp

    assert issubclass(cli.PyraCLI, BriefHelp)
    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", "--help"])
    brief = capsys.readouterr().out
    assert stop.value.code == 0 and "--model.lora.rank" in brief and "--throughput.clock" in brief
    options = brief.split("\noptions:", 1)[1]
    assert "--trainer." not in options.split("Lightning's Trainer flags")[0], "no Trainer flag listed"
    assert "are listed by `pyra-lightning fit --help_all`" in brief
    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", "--help_all"])
    full = capsys.readouterr().out.split("\noptions:", 1)[1]
    assert stop.value.code == 0 and "  --trainer.max_epochs" in full
    assert (
        full.index("  --model.lora.rank") < full.index("  --data.task") < full.index("  --trainer.max_epochs")
    )


def test_the_help_is_cached_per_code_and_package_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pyra_lightning.training import help_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(help_cache.CACHE_ENV, raising=False)
    built: list[list[str]] = []

    def build(argv: list[str]) -> None:
        built.append(argv)
        print(f"usage: {' '.join(argv)}")
        raise SystemExit(0)

    for _ in range(2):
        with pytest.raises(SystemExit):
            help_cache.cached_help(["fit", "--help"], build)
        assert capsys.readouterr().out == "usage: fit --help\n"
    assert built == [["fit", "--help"]], "the second help came from the cache"
    assert help_cache.help_key(["fit", "--config", "x.yaml", "--help"]) is None, "defaults may differ"
    assert help_cache.help_key(["fit", "--trainer.max_epochs=1"]) is None
    key = help_cache.help_key(["fit", "--help"])
    module = Path(help_cache.__file__)
    times = (module.stat().st_atime_ns, module.stat().st_mtime_ns)
    try:
        os.utime(module, ns=(times[0], times[1] + 1))  # the code changed: the help is built again
        assert help_cache.help_key(["fit", "--help"]) != key
    finally:
        os.utime(module, ns=times)


def test_lightnings_advert_and_its_own_deprecation_are_left_out_and_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    import logging

    from pyra_lightning.training.cli_notices import RANK_ZERO_LOGGER

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        main(resumable_fit(tmp_path / "run", tmp_path / "data", 1))  # builds a Trainer, validates
    said = caplog.text
    assert "litlogger" not in said, said
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)], "torch's warning about Lightning"
    assert "GPU available:" in said and "max_epochs=1` reached" in said, "the others still show"
    assert not logging.getLogger(RANK_ZERO_LOGGER).filters, "the filter lasts for the command only"
