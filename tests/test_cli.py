"""End to end through the ``pyra-lightning`` command: fit, test, results.json, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyra_lightning.__main__ import main

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
RESULT_KEYS = {
    "task", "group", "protocol", "method", "test_acc", "test_acc_best", "throughput", "throughput_unmerged",
    "speedup", "gflops", "gflops_unmerged", "params", "config", "benchmark",
}  # fmt: skip


def quickstart_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"--config={QUICKSTART}",
        f"--data.root={tmp_path / 'data'}",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
        "--throughput.runs=2",
        "--throughput.warmup=1",
        *extra,
    ]


@pytest.mark.slow
def test_quickstart_fit_then_test_beats_chance_and_writes_results(tmp_path: Path) -> None:
    main(["fit", *quickstart_args(tmp_path)])
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
    main(["test", *quickstart_args(tmp_path / "again"), f"--ckpt_path={last[0]}"])
    again = json.loads(next((tmp_path / "again" / "runs").rglob("results.json")).read_text())
    assert again["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)


def test_missing_data_root_is_named_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "validate",
        *quickstart_args(tmp_path),
        f"--data.root={tmp_path / 'nowhere'}",
        "--data.task=cifar",
    ]
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
