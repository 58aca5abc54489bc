"""The benchmark: its cost guards (counted, never timed), engines, speed-target search, output, CLI."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyra_lightning.accounting import count_flops
from pyra_lightning.commands import benchmark
from pyra_lightning.commands.benchmark import build_model, main, run_benchmark
from pyra_lightning.commands.benchmark_table import format_table
from pyra_lightning.commands.engines import search_speed_target
from pyra_lightning.commands.training_speed import measure_training_step
from pyra_lightning.patch import vit_shape
from pyra_lightning.schedules import (
    ViTShape,
    flops_fraction,
    schedule_flops,
    solve_flops_rho,
    solve_flops_schedule,
)
from pyra_lightning.timing import measure_throughput, round_robin, time_interleaved

# vit_tiny at 224 px: 197 tokens, so merging removes real work, as it does in ViT-B/16.
SPEED_MODEL = dict(model_name="vit_tiny_patch16_224", num_classes=10, model_kwargs={"depth": 4})
STRONG = 0.5  # a schedule keeping half of the block FLOPs
# A 4-block, 48-wide ViT on 32 px images for the schema tests: fast, and 64 patches to merge.
TINY_ARGS = dict(
    model_name="vit_tiny_patch16_224",
    img_size=32,
    num_classes=5,
    model_kwargs={"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3},
)


class OperatorCost(TorchDispatchMode):
    """Counts the ATen operators a forward dispatches and the elements they write.

    A load-independent stand-in for time: the merge and the modulation are memory-bound
    operators, whose cost follows the elements they write, while ``count_flops`` covers the
    matmuls. Speed itself is measured by the benchmark and recorded in BENCHMARKS.md.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.elements += tensor.numel()
        return out


def _cost(model: torch.nn.Module, x: torch.Tensor) -> OperatorCost:
    cost = OperatorCost()
    with torch.no_grad(), cost:
        model.eval()(x)
    return cost


def test_pyra_costs_next_to_nothing_over_tome_and_merging_removes_work() -> None:
    """PYRA's modulation (eqs. 4-7) acts on the merge_r merged pairs only, so it adds a few
    operators per layer whose work scales with merge_r x C, not with the token count; merging
    removes matmul FLOPs and elementwise work alike. Counted, not timed, so load cannot fail it
    (the measured speeds are in BENCHMARKS.md)."""
    models = {
        "uncompressed": build_model(merge_r=None, pyra=False, **SPEED_MODEL),
        "tome": build_model(merge_r=STRONG, pyra=False, **SPEED_MODEL),
        "pyra": build_model(merge_r=STRONG, pyra=True, **SPEED_MODEL),
    }
    batch, width = 2, models["pyra"].embed_dim
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    flops = {name: count_flops(model, 224) for name, model in models.items()}
    cost = {name: _cost(model, x) for name, model in models.items()}
    schedule = [block.merge_r for block in models["pyra"].blocks]
    merging_layers = sum(1 for merge_r in schedule if merge_r)

    assert flops["pyra"] / flops["tome"] <= 1.001, "the modulation's matmuls are r x C vectors"
    extra_elements = cost["pyra"].elements - cost["tome"].elements
    # About 14 elementwise passes over the (B, merge_r, C) pairs today; 20 leaves room, while a
    # modulation of every token (B, N, C) would exceed it several times over.
    assert 0 < extra_elements <= 20 * batch * sum(schedule) * width
    assert cost["pyra"].calls - cost["tome"].calls <= 40 * merging_layers  # 31 today
    assert flops["tome"] / flops["uncompressed"] <= 0.6  # a schedule keeping half of the block FLOPs
    assert cost["tome"].elements / cost["uncompressed"].elements <= 0.8, "merging must remove work"


def test_measure_throughput_is_positive_and_restores_training_mode(one_thread: None) -> None:
    model = build_model(merge_r=4, pyra=True, **TINY_ARGS)
    model.train()
    images_per_s = measure_throughput(model, batch_size=2, img_size=32, warmup=0, runs=2)
    assert images_per_s > 0
    assert model.training


def test_run_benchmark_reports_consistent_numbers_and_writes_json(one_thread: None, tmp_path, capsys) -> None:
    output = tmp_path / "out" / "bench.json"
    result = run_benchmark(
        merge_r=[2, 0.6],
        batch_size=2,
        runs=1,
        warmup=0,
        train=True,
        clock="cpu",
        output=str(output),
        **TINY_ARGS,
    )
    assert set(result) == {"args", "environment", "models", "table", "skipped", "pyra_vs_tome", "training"}
    rows = result["models"]
    assert list(rows) == ["uncompressed", "tome/r=2", "pyra/r=2", "tome/flops=0.6", "pyra/flops=0.6"]
    base = rows["uncompressed"]
    assert base["schedule"] == [0, 0, 0, 0] and base["speedup"] == 1.0 and base["efficiency"] == 1.0
    assert rows["pyra/r=2"]["schedule"] == [2, 2, 2, 2]
    for name, row in rows.items():
        assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
        assert row["speedup"] == pytest.approx(row["images_per_s"] / base["images_per_s"])
        flops_reduction = base["gflops"] / row["gflops"]
        assert row["efficiency"] == pytest.approx(row["speedup"] / flops_reduction), name
        if name != "uncompressed":
            assert row["gflops"] < base["gflops"]
    assert rows["pyra/r=2"]["gflops"] == pytest.approx(rows["tome/r=2"]["gflops"], rel=1e-3)
    assert result["pyra_vs_tome"]["r=2"] == pytest.approx(
        rows["pyra/r=2"]["images_per_s"] / rows["tome/r=2"]["images_per_s"]
    )
    env = result["environment"]
    for key in ("torch", "timm", "device_name", "cpu_model", "threads", "date", "loadavg", "loadavg_after"):
        assert key in env
    assert result["args"]["merge_r"] == [2, 0.6] and result["args"]["runs"] == 1
    assert result["args"]["batch_sizes"] == [2] and result["args"]["engine"] == ["eager"]
    assert [(r["engine"], r["batch_size"], r["model"]) for r in result["table"]] == [
        ("eager", 2, name) for name in rows
    ]
    assert result["args"]["clock"] == "cpu" and env["threads"] == 1

    training = result["training"]
    assert set(training) == set(rows)
    assert training["uncompressed"]["peak_memory_mb"] is None  # CPU: no allocator peak
    assert (
        training["pyra/flops=0.6"]["saved_activations_mb"] < training["uncompressed"]["saved_activations_mb"]
    )
    assert training["pyra/r=2"]["trainable_params"] > training["tome/r=2"]["trainable_params"]

    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    captured = capsys.readouterr()
    printed = captured.out
    assert "| pyra/flops=0.6 " in printed and "PYRA / ToMe throughput" in printed
    assert "benchmark:" not in printed, "progress goes to stderr; stdout is the tables alone"
    said = captured.err.splitlines()
    assert said[0].startswith("benchmark: building vit_") and said[0].endswith(", ".join(rows)), said
    assert "benchmark: batch 2: timing 5 model-engine pairs interleaved, 0 warm-up + 1 timed" in said[1]
    assert said[2] == "benchmark: timing the training steps of 5 models at batch 2", said
    widths = {len(line) for line in printed.splitlines() if line.startswith("| ")}
    assert len(widths) == 2, "each table is padded to aligned columns"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"merge_r": ["low", "high"], "precision": "32", "engine": "eager", "output": None}),
        (
            ["--merge_r", "8", "--threads", "1", "--clock", "cpu"],
            {"merge_r": 8, "threads": 1, "clock": "cpu"},
        ),
        (["--merge_r", "0.5"], {"merge_r": 0.5}),
        (["--merge_r", "high"], {"merge_r": "high"}),
        (["--merge_r", "[low, 8, [16, 8]]"], {"merge_r": ["low", 8, [16, 8]]}),
        (
            ["--precision", "bf16", "--engine", "eager,compile", "--batch_size", "2", "--output", "b.json"],
            {"precision": "bf16", "engine": "eager,compile", "batch_size": 2, "output": "b.json"},
        ),
        (["--batch_sizes", "1,8,32", "--compile_mode", "reduce-overhead"], {"batch_sizes": "1,8,32"}),
        (
            ["--target_speedup", "2.5", "--engine", "onnxruntime"],
            {"target_speedup": 2.5, "engine": "onnxruntime"},
        ),
        (["--model_kwargs", "{depth: 4}", "--train", "true"], {"model_kwargs": {"depth": 4}, "train": True}),
    ],
)
def test_main_parses_arguments(monkeypatch, flags: list[str], expected: dict[str, Any]) -> None:
    seen: dict[str, Any] = {}

    @functools.wraps(run_benchmark)
    def fake(**kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(benchmark, "run_benchmark", fake)
    main(flags)
    for key, value in expected.items():
        assert seen[key] == value, key


@pytest.mark.parametrize(
    "flags", [["--precision", "8"], ["--clock", "gpu"], ["--batch_size", "two"], ["--target_speedup", "x"]]
)
def test_main_rejects_bad_values(monkeypatch, flags: list[str]) -> None:
    monkeypatch.setattr(benchmark, "run_benchmark", functools.wraps(run_benchmark)(lambda **kwargs: {}))
    with pytest.raises(SystemExit):
        main(flags)


@pytest.mark.parametrize(("threads", "clock"), [(1, "cpu"), (None, "wall")])
def test_benchmark_clock_auto_records_the_clock_it_resolved_to(
    one_thread: None, threads: int | None, clock: str
) -> None:
    """``--clock auto`` on a CPU: process time with one thread, the wall clock with torch's own
    thread count; the JSON says which, so two files never compare ``auto`` with ``auto`` blindly."""
    result = run_benchmark(
        merge_r=[2], batch_size=1, runs=1, warmup=0, threads=threads, clock="auto", **TINY_ARGS
    )
    assert result["args"]["clock"] == clock


def test_measure_training_step_trains_only_lora_pyra_and_head(one_thread: None) -> None:
    model = build_model(merge_r=4, pyra=True, fold=False, **TINY_ARGS)
    for param in model.parameters():
        param.requires_grad_(True)
    result = measure_training_step(model, batch_size=2, img_size=32, warmup=0, runs=1)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_" in n or ".pyra." in n or n.startswith("head.") for n in trainable)
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["images_per_s"] > 0 and result["saved_activations_mb"] > 0
    assert result["peak_memory_mb"] is None and result["peak_memory_source"] is None


def test_saved_activations_under_autocast_leave_out_autocasts_weight_copies(one_thread: None) -> None:
    """Under bf16 autocast a linear saves the bf16 copy of its weight for backward: a weight, not
    an activation. Few tokens and big weights make the difference plain (0.49 MB of activations
    in fp32, 10.3 MB in bf16 with the copies; measured)."""
    saved = {}
    for precision in ("32", "bf16"):
        torch.manual_seed(0)
        model = build_model(merge_r=None, pyra=False, fold=False, **{**TINY_ARGS, "model_kwargs": None})
        row = measure_training_step(model, batch_size=1, img_size=32, precision=precision, warmup=0, runs=1)
        saved[precision] = row["saved_activations_mb"]
    assert 0 < saved["bf16"] < saved["32"], saved


@pytest.mark.parametrize(("engine", "batch_sizes"), [("tflite", 8), ("eager", "1,x"), ("eager", [0])])
def test_bad_engines_and_batch_sizes_are_refused(engine: str, batch_sizes: Any) -> None:
    with pytest.raises(ValueError, match="expected"):
        run_benchmark(engine=engine, batch_sizes=batch_sizes, **TINY_ARGS)


def test_engines_are_timed_interleaved_at_every_batch_size(one_thread: None, monkeypatch, capsys) -> None:
    """eager and ONNX Runtime side by side at two batch sizes; AOTInductor without a compiler is
    skipped with its reason and the rest still runs."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install '.[onnx]') is not installed")
    monkeypatch.setattr("pyra_lightning.deploy.cxx_compiler", lambda: None)
    args = {**TINY_ARGS, "model_kwargs": {**TINY_ARGS["model_kwargs"], "depth": 2}}
    result = run_benchmark(
        merge_r=[[8, 8]], batch_sizes="1,3", engine="eager,onnxruntime,aoti", runs=2, warmup=1, **args
    )
    table = result["table"]
    assert {(r["engine"], r["batch_size"]) for r in table} == {
        (engine, batch) for engine in ("eager", "onnxruntime") for batch in (1, 3)
    }
    assert len(table) == 2 * 2 * 3  # engines x batch sizes x (uncompressed, tome, pyra)
    assert "C++ compiler" in result["skipped"]["aoti"]
    said = capsys.readouterr().err
    assert "benchmark: aoti skipped: " in said and "benchmark: batch 3, onnxruntime: preparing 3" in said
    assert "batch 3, aoti" not in said, "an engine that cannot run here is not tried again"
    for row in table:
        base = next(
            r
            for r in table
            if (r["engine"], r["batch_size"], r["model"])
            == (row["engine"], row["batch_size"], "uncompressed")
        )
        assert row["speedup"] == pytest.approx(base["median_ms"] / row["median_ms"])
        assert row["efficiency"] == pytest.approx(
            row["speedup"] / result["models"][row["model"]]["flops_reduction"]
        )
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["median_ms"] * 1e3)
    onnx_setup = [r["setup_s"] for r in table if r["engine"] == "onnxruntime"]
    assert min(onnx_setup[:3]) > max(onnx_setup[3:]), "exported once, reused at the second batch size"


class FakeClock:
    """Time that passes only when a fake model runs: each forward costs its block FLOPs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, schedule: list[int], shape: ViTShape, overhead: float = 0.0) -> Callable[[], None]:
        seconds = schedule_flops(schedule, shape) * 1e-9 + overhead * sum(schedule)

        def run() -> None:
            self.now += seconds

        return run


def test_time_interleaved_rotates_the_order_and_times_each_call() -> None:
    clock = FakeClock()
    order: list[str] = []

    def runner(name: str, seconds: float) -> Callable[[], None]:
        def run() -> None:
            order.append(name)
            clock.now += seconds

        return run

    times = time_interleaved({"a": runner("a", 1.0), "b": runner("b", 3.0)}, warmup=1, runs=3, clock=clock)
    assert times == {"a": [1.0] * 3, "b": [3.0] * 3}
    assert order == ["a", "b", *round_robin(["a", "b"], 3)] == ["a", "b", "a", "b", "b", "a", "a", "b"]


# (The tiny model reaches 2.74x at most: halving the tokens in every block leaves its patch
# embedding and head, which schedule_flops counts, untouched.)
@pytest.mark.parametrize("target", [1.5, 2.0, 2.5])
def test_speed_target_search_finds_the_gentlest_schedule_that_reaches_it(target: float) -> None:
    """With time proportional to FLOPs, speed-up S is FLOPs fraction 1/S: the measured search
    must land on the FLOPs solver's schedule for 1/S, over the same one-parameter family."""
    shape = vit_shape(build_model(merge_r=None, pyra=False, **SPEED_MODEL))
    clock = FakeClock()
    found = search_speed_target(
        target,
        shape,
        lambda schedule: clock.runner(schedule, shape),
        warmup=0,
        runs=1,
        iterations=40,
        clock=clock,
    )
    assert found.schedule == solve_flops_schedule(1 / target, shape)
    assert found.speedup >= target and found.flops_fraction == pytest.approx(1 / found.speedup)
    gentler = [t for t in found.trials if t["rho"] < found.rho]
    assert all(t["speedup"] < target for t in gentler), "every gentler candidate measured too slow"
    assert found.trials[0]["rho"] == 1.0


def test_speed_target_search_counts_the_merge_cost_and_refuses_the_unreachable() -> None:
    """A merge that costs time per merged token needs a stronger schedule than FLOPs alone say."""
    shape = vit_shape(build_model(merge_r=None, pyra=False, **SPEED_MODEL))
    clock = FakeClock()
    costly = search_speed_target(
        2.0,
        shape,
        lambda s: clock.runner(s, shape, overhead=2e-4),
        warmup=0,
        runs=1,
        iterations=30,
        clock=clock,
    )
    assert costly.speedup >= 2.0
    assert flops_fraction(costly.schedule, shape) < flops_fraction(solve_flops_schedule(0.5, shape), shape)
    with pytest.raises(ValueError, match="out of reach.*measured"):
        search_speed_target(50.0, shape, lambda s: clock.runner(s, shape), warmup=0, runs=1, clock=clock)
    with pytest.raises(ValueError, match="must be > 1"):
        search_speed_target(0.9, shape, lambda s: clock.runner(s, shape), clock=clock)


def test_the_speed_target_search_waits_for_the_gpu_around_every_timed_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU a runner returns once its work is queued: unsynchronised, the search would time
    the host's launches (a CUDA graph's replay is microseconds), not the forwards."""
    shape = vit_shape(build_model(merge_r=None, pyra=False, **SPEED_MODEL))
    clock, waits = FakeClock(), []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    found = search_speed_target(
        1.5,
        shape,
        lambda s: clock.runner(s, shape),
        warmup=0,
        runs=2,
        iterations=2,
        clock=clock,
        device="cuda",
    )
    timed_calls = 2 * 2 * len({tuple(t["schedule"]) for t in found.trials})  # runs x (baseline, candidate)
    assert len(waits) >= 2 * timed_calls and set(waits) == {torch.device("cuda")}


def test_target_speedup_through_run_benchmark(
    one_thread: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command prints a list ready for model.merging.merge_r, measured on real models (vit_tiny at
    224 px, where halving the tokens in every block roughly halves the time: far above 1.2x), on
    the device it was given."""
    from pyra_lightning.commands import engines

    devices, real_search = [], engines.search_speed_target

    def search(*args: Any, **kwargs: Any) -> Any:
        devices.append(kwargs.get("device"))
        return real_search(*args, **kwargs)

    monkeypatch.setattr(engines, "search_speed_target", search)
    result = run_benchmark(
        target_speedup=1.2, batch_size=2, runs=3, warmup=1, target_iterations=1, clock="cpu", **SPEED_MODEL
    )
    found = result["target"]
    assert len(found["schedule"]) == 4 and found["speedup"] >= 1.2
    assert [t["rho"] for t in found["trials"]] == [1.0, 0.5]
    assert f"model.merging.merge_r: {found['schedule']}" in capsys.readouterr().out
    assert devices == [torch.device("cpu")]


def test_a_custom_schedule_is_labelled_by_its_contents(one_thread: None) -> None:
    # The issue: `--merge_r '[[4, 4, 2, 0]]'` was printed as `pyra/list0`.
    result = run_benchmark(merge_r=[[4, 4, 2, 0], 2], batch_size=1, runs=1, warmup=0, **TINY_ARGS)
    assert list(result["models"]) == ["uncompressed", "tome/4x2,2,0", "pyra/4x2,2,0", "tome/r=2", "pyra/r=2"]
    assert result["models"]["pyra/4x2,2,0"]["schedule"] == [4, 4, 2, 0]
    assert "pyra/4x2,2,0" in format_table(result)


@pytest.mark.parametrize(
    ("model_name", "message"),
    [
        ("resnet18", "ResNet (resnet18) is not a timm VisionTransformer or Eva"),
        (
            "vit_smal_patch16_224",
            "unknown timm model 'vit_smal_patch16_224'; did you mean vit_small_patch16_224?",
        ),
    ],
)
def test_a_model_the_patch_cannot_take_is_one_line(
    model_name: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The issue: `benchmark --model_name resnet18` ended in a 13-frame TypeError traceback.
    from pyra_lightning.__main__ import main as cli_main

    with pytest.raises(SystemExit) as stop:
        cli_main(
            ["benchmark", "--model_name", model_name, "--img_size", "32", "--runs", "1", "--warmup", "0"]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err


def test_speed_target_search_stays_inside_a_given_rho_range() -> None:
    """An elastic range that ends short of both the uncompressed model and half the tokens:
    every candidate built lies inside it, and the answer reaches the target."""
    shape = vit_shape(build_model(merge_r=None, pyra=False, **SPEED_MODEL))
    clock = FakeClock()
    built: list[list[int]] = []

    def runner(schedule: list[int]):  # type: ignore[no-untyped-def]
        built.append(schedule)
        return clock.runner(schedule, shape)

    low, high = solve_flops_rho(0.8, shape), solve_flops_rho(0.4, shape)
    found = search_speed_target(
        1.8, shape, runner, warmup=0, runs=1, iterations=20, clock=clock, min_rho=low, max_rho=high
    )
    assert found.speedup >= 1.8 and low <= found.rho <= high
    assert all(low <= t["rho"] <= high for t in found.trials)
    merged = [s for s in built if any(s)]
    assert all(0.4 - 1e-3 <= flops_fraction(s, shape) <= 0.8 + 1e-3 for s in merged)


def test_the_merge_rule_and_attention_kernel_reach_every_merged_model(one_thread: None, monkeypatch) -> None:
    """``benchmark --matcher triton --merger triton --attention flex``: what is timed is built
    with them (on CPU the Triton rules run their torch fallback, so the figures stay valid)."""
    from pyra_lightning.commands import benchmark as bench
    from pyra_lightning.patch import attention_kernel, merge_rule

    built = []
    original = bench.build_model

    def recording(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = original(*args, **kwargs)
        if hasattr(model.blocks[0], "matcher"):
            built.append((merge_rule(model), attention_kernel(model)))
        return model

    monkeypatch.setattr(bench, "build_model", recording)
    monkeypatch.setattr("warnings.warn", lambda *args, **kwargs: None)  # eager FlexAttention's warning
    result = run_benchmark(
        merge_r=[2],
        batch_size=1,
        runs=1,
        warmup=0,
        matcher="triton",
        merger="triton",
        attention="flex",
        **TINY_ARGS,
    )
    assert result["args"]["merger"] == "triton" and result["args"]["attention"] == "flex"
    assert built and set(built) == {(("triton", "triton"), "flex")}
