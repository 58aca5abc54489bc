"""The benchmark: its speed guards (ratios, not absolute times), output schema and command line."""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pyra_lightning.commands import benchmark
from pyra_lightning.commands.benchmark import (
    build_model,
    main,
    measure_throughput,
    measure_training_step,
    run_benchmark,
    time_forwards,
)

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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, so process CPU time measures the work (see ``time_forwards``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _paired_time_ratios(models: dict[str, torch.nn.Module]) -> tuple[list[float], list[float]]:
    """PYRA / ToMe and ToMe / uncompressed seconds of every round, each from forwards run side by side."""
    times = time_forwards(models, batch_size=4, img_size=224, warmup=2, runs=9, clock=time.process_time)
    pyra_vs_tome = [p / t for p, t in zip(times["pyra"], times["tome"], strict=True)]
    tome_vs_none = [t / u for t, u in zip(times["tome"], times["uncompressed"], strict=True)]
    return pyra_vs_tome, tome_vs_none


def test_pyra_is_as_fast_as_tome_and_merging_is_faster_than_none(one_thread: None) -> None:
    """PYRA's modulation (eqs. 4-7) must cost next to nothing, and merging must pay for itself.

    Forwards are interleaved, compared round by round and timed in process CPU time at one
    thread, which keeps other processes on a shared machine out of the ratios. One round still
    scatters by about ±4%, so the test pools rounds until their median is within bounds, up to
    36 rounds: PYRA at 1.0-1.01x ToMe passes in the first 9; a 10% regression fails every time.
    """
    models = {
        "uncompressed": build_model(merge_r=None, pyra=False, **SPEED_MODEL),
        "tome": build_model(merge_r=STRONG, pyra=False, **SPEED_MODEL),
        "pyra": build_model(merge_r=STRONG, pyra=True, **SPEED_MODEL),
    }
    pyra_vs_tome: list[float] = []
    tome_vs_none: list[float] = []
    for _ in range(4):
        more_pyra, more_tome = _paired_time_ratios(models)
        pyra_vs_tome += more_pyra
        tome_vs_none += more_tome
        pooled = statistics.median(pyra_vs_tome), statistics.median(tome_vs_none)  # about 1.00 and 0.57
        if pooled[0] <= 1.05 and pooled[1] <= 0.85:
            return
    pytest.fail(
        f"median over {len(pyra_vs_tome)} rounds: PYRA / ToMe time {pooled[0]:.3f} (bound 1.05), "
        f"ToMe / uncompressed time {pooled[1]:.3f} (bound 0.85)"
    )


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
    assert set(result) == {"args", "environment", "models", "pyra_vs_tome", "training"}
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
    assert result["args"]["clock"] == "cpu" and env["threads"] == 1

    training = result["training"]
    assert set(training) == set(rows)
    assert training["uncompressed"]["peak_memory_mb"] is None  # CPU: no allocator peak
    assert (
        training["pyra/flops=0.6"]["saved_activations_mb"] < training["uncompressed"]["saved_activations_mb"]
    )
    assert training["pyra/r=2"]["trainable_params"] > training["tome/r=2"]["trainable_params"]

    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert "| pyra/flops=0.6 " in printed and "PYRA / ToMe throughput" in printed
    widths = {len(line) for line in printed.splitlines() if line.startswith("| ")}
    assert len(widths) == 2, "each table is padded to aligned columns"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"merge_r": ["low", "high"], "precision": "32", "compile": False, "output": None}),
        (
            ["--merge_r", "8", "--threads", "1", "--clock", "cpu"],
            {"merge_r": 8, "threads": 1, "clock": "cpu"},
        ),
        (["--merge_r", "0.5"], {"merge_r": 0.5}),
        (["--merge_r", "high"], {"merge_r": "high"}),
        (["--merge_r", "[low, 8, [16, 8]]"], {"merge_r": ["low", 8, [16, 8]]}),
        (
            ["--precision", "bf16", "--compile", "true", "--batch_size", "2", "--output", "b.json"],
            {"precision": "bf16", "compile": True, "batch_size": 2, "output": "b.json"},
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


@pytest.mark.parametrize("flags", [["--precision", "8"], ["--clock", "gpu"], ["--batch_size", "two"]])
def test_main_rejects_bad_values(monkeypatch, flags: list[str]) -> None:
    monkeypatch.setattr(benchmark, "run_benchmark", functools.wraps(run_benchmark)(lambda **kwargs: {}))
    with pytest.raises(SystemExit):
        main(flags)


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
