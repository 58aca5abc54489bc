"""Elastic runs through the command line: the curve in results.json, export at any point, exact resume."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, SHORT, quickstart_args

from pyra_lightning import load_exported
from pyra_lightning.__main__ import main
from pyra_lightning.commands.export import main as export_main
from pyra_lightning.training.elastic import accept_elastic_schedule

ELASTIC = [f"--config={CONFIGS / 'method/pyra_elastic.yaml'}", "--model.merging.elastic.min_fraction=0.5"]
CURVE_KEYS = {"flops_fraction", "merge_r", "gflops", "throughput", "speedup", "test_acc"}


def fit_args(root: Path, data: Path, *extra: str) -> list[str]:
    quick = [arg for arg in quickstart_args(root, data) if not arg.startswith("--config")]
    return [f"--config={CONFIGS / 'quickstart.yaml'}", *ELASTIC, *quick, *extra]


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("elastic")
    root, data = tmp / "run", tmp / "data"
    main(["fit", *fit_args(root, data, *SHORT, "--trainer.limit_test_batches=2")])
    return root, data


def test_test_writes_the_curve_and_the_run_identity_holds_the_range(elastic_run) -> None:
    root, _ = elastic_run
    result = json.loads((root / "results.json").read_text())
    assert result["method"] == "pyra_elastic"
    assert result["settings"]["model.merging.elastic"]["min_fraction"] == 0.5  # a plain run never resumes it
    curve = result["curve"]
    assert [p["point"] for p in curve] == [1.0, 0.7461, "low"]  # default points inside 0.5..1.0
    assert all(set(p) >= CURVE_KEYS for p in curve)
    assert curve[0]["merge_r"] == [0] * 6 and curve[0]["speedup"] == pytest.approx(1.0)
    fractions = [p["flops_fraction"] for p in curve]
    assert fractions == sorted(fractions, reverse=True) and 0.49 <= fractions[-1] <= 0.5
    gflops = [p["gflops"] for p in curve]
    assert gflops == sorted(gflops, reverse=True) and all(0.0 <= p["test_acc"] <= 1.0 for p in curve)
    assert curve[-1]["merge_r"] == result["config"]["merge_r"]  # nominal "low" is also test_acc's model
    assert curve[-1]["test_acc"] == pytest.approx(result["test_acc"])


def test_export_accepts_any_schedule_in_the_range_and_refuses_outside(elastic_run, tmp_path: Path) -> None:
    root, data = elastic_run
    last = root / "checkpoints" / "last.ckpt"
    common = fit_args(root, data)
    point = "[6,6,5,4,4,3]"  # 0.736 of the FLOPs: no point the run was tested at
    export_main(
        [*common, f"--model.merging.merge_r={point}", f"--ckpt_path={last}", f"--out_dir={tmp_path / 'a'}"]
    )
    exported = load_exported(tmp_path / "a")
    assert exported.schedule == [6, 6, 5, 4, 4, 3]
    assert exported.config["elastic"]["min_fraction"] == 0.5
    assert exported.config["elastic"]["flops_fraction"] == pytest.approx(0.736, abs=1e-3)
    pyra_rows = [b.pyra.merge_r for b in exported.model.blocks]
    assert pyra_rows == [6, 6, 5, 4, 4, 3], "PYRA cut to the exported schedule"
    with pytest.raises(ValueError, match=r"outside this elastic model's trained range 0\.4\d\d\.\.1\.000"):
        export_main(
            [*common, "--model.merging.merge_r=high", f"--ckpt_path={last}", f"--out_dir={tmp_path / 'b'}"]
        )
    assert not (tmp_path / "b").exists()


def test_a_plain_checkpoint_keeps_its_refusal_of_another_schedule() -> None:
    plain = {"model.merging.elastic": None, "model.merging.merge_r": [16, 12, 8, 6, 4, 2]}
    now = {"model.merging.elastic": None, "model.merging.merge_r": [8, 6, 4, 2, 1, 0]}
    assert accept_elastic_schedule(plain, now) == now  # the difference stays, for export to refuse
    elastic = {"model.merging.elastic": {"min_fraction": 0.5}, "model.merging.merge_r": [1, 1, 1, 1, 1, 1]}
    changed_range = {
        "model.merging.elastic": {"min_fraction": 0.4},
        "model.merging.merge_r": [2, 2, 2, 2, 2, 2],
    }
    assert accept_elastic_schedule(elastic, changed_range) == changed_range
    same_range = {**changed_range, "model.merging.elastic": {"min_fraction": 0.5}}
    assert accept_elastic_schedule(elastic, same_range)["model.merging.merge_r"] == [1, 1, 1, 1, 1, 1]


@pytest.mark.slow
def test_a_stopped_and_resumed_elastic_fit_ends_bit_identical(tmp_path: Path) -> None:
    data = tmp_path / "data"
    short = [
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.max_epochs=2",
        "--model.lora.dropout=0.1",  # global-RNG randomness next to the elastic draws
        "--test_after_fit=false",
    ]
    main(["fit", *fit_args(tmp_path / "straight", data, *short)])
    main(["fit", *fit_args(tmp_path / "resumed", data, *short, "--trainer.max_steps=3")])  # after epoch 0
    stopped = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert stopped["global_step"] == 3
    main(["fit", *fit_args(tmp_path / "resumed", data, *short)])  # resumes from last.ckpt
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(".pyra.weight_r" in key for key in a["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


class _ScheduleRunner:
    """Stands in for an engine's runner: remembers the deployed model's schedule and PYRA rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        from pyra_lightning.patch import merge_schedule

        self.schedule = merge_schedule(model)
        self.pyra_rows = [b.pyra.merge_r if b.pyra is not None else 0 for b in model.blocks]

    def run(self) -> list[int]:
        return self.schedule


def test_target_speedup_on_an_elastic_run_searches_inside_its_range(
    elastic_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmark --target_speedup S --ckpt_path <elastic run>`` times the run's own deployable
    model at each candidate and stays inside the trained range. Time is made proportional to
    FLOPs here (a speed figure belongs in BENCHMARKS.md, not in a test), so speed-up S is FLOPs
    fraction 1/S."""
    import pyra_lightning.commands.benchmark as benchmark
    import pyra_lightning.commands.engines as engines
    from pyra_lightning.schedules import flops_fraction

    root, _ = elastic_run
    last = root / "checkpoints" / "last.ckpt"
    built: list[_ScheduleRunner] = []

    def runner(engine: str, model: torch.nn.Module, batch: int, **kwargs) -> _ScheduleRunner:
        built.append(_ScheduleRunner(model))
        return built[-1]

    monkeypatch.setattr(benchmark, "build_runner", runner)
    shape: list = []
    real_search = engines.search_speed_target

    def search(target, model_shape, make_runner, **kwargs):  # type: ignore[no-untyped-def]
        shape.append(model_shape)
        return real_search(target, model_shape, make_runner, **kwargs)

    monkeypatch.setattr(engines, "search_speed_target", search)
    monkeypatch.setattr(
        engines,
        "measured_speedup",
        lambda baseline, candidate, *args, **kwargs: 1 / flops_fraction(candidate(), shape[0]),
    )
    found = benchmark.run_benchmark(target_speedup=1.5, ckpt_path=str(last), target_iterations=6)["target"]
    assert found["speedup"] >= 1.5 and 0.5 <= found["flops_fraction"] <= 1 / 1.5
    assert all(r.pyra_rows == r.schedule for r in built if any(r.schedule)), "PYRA cut to each candidate"
    assert max(t["rho"] for t in found["trials"]) < 1.0, "never past the range's fastest point"
    out = capsys.readouterr().out
    assert "inside the range" in out
    (command,) = [line for line in out.splitlines() if line.strip().startswith("pyra-lightning export")]
    printed = shlex.split(command.replace("<folder>", str(tmp_path / "deployed")))[2:]
    export_main(printed)  # the printed command deploys the run at the schedule found
    assert load_exported(tmp_path / "deployed").schedule == found["schedule"]
    with pytest.raises(
        ValueError, match=r"out of reach: the strongest schedule allowed \(the trained range's"
    ):
        benchmark.run_benchmark(target_speedup=3.0, ckpt_path=str(last), target_iterations=1)


def test_target_speedup_refuses_a_checkpoint_trained_at_one_schedule(tmp_path: Path) -> None:
    from helpers import tiny_module

    import pyra_lightning.commands.benchmark as benchmark

    module = tiny_module()  # seeded 0, as the benchmark rebuilds a random backbone without a record
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="was trained at one schedule, not for a range"):
        benchmark.run_benchmark(target_speedup=1.5, ckpt_path=str(tmp_path / "plain.ckpt"))
    with pytest.raises(ValueError, match="--ckpt_path is an option of --target_speedup"):
        benchmark.run_benchmark(ckpt_path=str(tmp_path / "plain.ckpt"))
    out = tmp_path / "deployed"
    with pytest.raises(
        ValueError, match=r"trained at one schedule \(\[8, 8, 4, 4\], no model.merging.elastic\)"
    ):
        export_main([f"--ckpt_path={tmp_path / 'plain.ckpt'}", "--merge_r=high", f"--out_dir={out}"])
    assert not out.exists()
