"""``benchmark --train``: training steps timed per model, compiled ones included
(``commands.training_speed``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_benchmark import TINY_ARGS

from pyra_lightning.commands.benchmark import build_model, run_benchmark
from pyra_lightning.commands.benchmark_table import format_table


def test_compiled_training_steps_go_through_one_full_static_graph_per_model(
    one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmark --train --train_compile``: every model's training forward goes through
    ``torch.compile(fullgraph=True, dynamic=False)``, compiled in the warm-up, and no saved-activation
    figure is claimed for a graph (recorded here instead of compiled: that a compiled merged
    training step gives the eager loss and gradients is checked in
    ``test_module.py::test_compile_model_compiles_the_backbone_once_in_place_with_the_eager_numbers``)."""
    from pyra_lightning.commands.training_speed import time_training_steps

    compiled: list[tuple[torch.nn.Module, dict[str, Any]]] = []

    def record(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        compiled.append((model, kwargs))
        return model

    monkeypatch.setattr(torch, "compile", record)
    kwargs = {**TINY_ARGS["model_kwargs"], "depth": 1}
    models = {
        name: build_model(TINY_ARGS["model_name"], spec, True, 4, 5, 32, fold=False, model_kwargs=kwargs)
        for name, spec in (("uncompressed", None), ("pyra", [8]))
    }
    results = time_training_steps(models, 2, 32, warmup=1, runs=1, compiled=True)
    assert [model for model, _ in compiled] == list(models.values())
    assert all(options == {"fullgraph": True, "dynamic": False, "mode": None} for _, options in compiled)
    assert all(row["saved_activations_mb"] is None and row["images_per_s"] > 0 for row in results.values())
    # CUDA graphs (--compile_mode reduce-overhead): each step first tells torch a new iteration
    # begins, so a replay may overwrite the last step's graph outputs without an error
    compiled.clear()
    steps: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    time_training_steps(models, 2, 32, warmup=1, runs=2, compiled=True, compile_mode="reduce-overhead")
    assert all(options["mode"] == "reduce-overhead" for _, options in compiled) and len(compiled) == 2
    assert len(steps) == 2 * (1 + 2)  # every warm-up and timed step of both models
    with pytest.raises(
        ValueError, match="--train_compile compiles the training steps of --train; add --train"
    ):
        run_benchmark(train_compile=True, **TINY_ARGS)


def test_the_table_prints_compiled_training_steps_without_saved_activations(one_thread: None) -> None:
    """A compiled step has no ``saved_activations_mb`` (the graph decides what it saves): the
    printed table shows "-" there instead of failing after everything was measured."""
    result = run_benchmark(merge_r=[2], batch_size=1, runs=1, warmup=0, train=True, **TINY_ARGS)
    for row in result["training"].values():
        row["saved_activations_mb"] = None  # as time_training_steps(compiled=True) reports it
    lines = [line for line in format_table(result).splitlines() if line.startswith("| pyra/r=2")]
    assert lines and lines[-1].rstrip(" |").endswith("-")
