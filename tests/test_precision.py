"""Lightning's true precisions (``bf16-true``, ``16-true``): a fit in them, and timing in them.

``--trainer.precision bf16-true`` crashed in the sanity check: Lightning casts a batch to bf16
before it reaches the device, where VTAB images are still ``uint8``, and the datamodule then
normalised them to fp32 for a bf16 model. The timing (``benchmark``, ``results.json``) knew only
fp32 and autocast, so after such a fit the throughput callback fed fp32 images to it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import quickstart_args
from test_benchmark import TINY_ARGS

from pyra_lightning.commands.benchmark import build_model, run_benchmark
from pyra_lightning.timing import PRECISIONS, autocast, held, input_dtype, time_forwards
from pyra_lightning.training.callbacks import InferenceThroughput
from pyra_lightning.training.cli import main


def test_held_converts_a_copy_and_leaves_a_model_in_the_dtype_alone() -> None:
    model = build_model(merge_r=2, pyra=True, **TINY_ARGS)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert held(model, "32") is model and held(model, "bf16") is model, "autocast runs fp32 weights"
    copy = held(model, "bf16-true")
    assert copy is not model
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), f"the caller's {name} changed"
    assert held(copy, "bf16-true") is copy
    assert {p.dtype for p in held(copy, "32").parameters()} == {torch.float32}
    assert {p.dtype for p in held(model, "16-true").parameters()} == {torch.float16}


@pytest.mark.parametrize("bad", ["bf16-mixed", "fp32", "64-true"])
def test_an_unknown_precision_is_one_line_naming_the_ones_there_are(bad: str) -> None:
    expected = f"precision='{bad}': expected one of '32', 'bf16', '16', 'bf16-true', '16-true'"
    assert PRECISIONS == ("32", "bf16", "16", "bf16-true", "16-true")
    with pytest.raises(ValueError, match=expected):
        input_dtype(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=expected), autocast(torch.device("cpu"), bad):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match=expected):
        InferenceThroughput(precision=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("precision", "images", "logits"),
    [
        ("32", torch.float32, torch.float32),
        ("bf16", torch.float32, torch.bfloat16),  # autocast: fp32 images and weights, bf16 matmuls
        ("bf16-true", torch.bfloat16, torch.bfloat16),
    ],
)
def test_time_forwards_feeds_each_precision_its_dtype(
    one_thread: None, precision: str, images: torch.dtype, logits: torch.dtype
) -> None:
    model = build_model(merge_r=2, pyra=True, **TINY_ARGS)
    seen: set[tuple[torch.dtype, torch.dtype, torch.dtype]] = set()

    def record(module: torch.nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
        weight = next(module.parameters()).dtype
        seen.add((args[0].dtype, weight, out.dtype))  # a deep copy carries the hook

    model.register_forward_hook(record)
    times = time_forwards({"pyra": model}, 2, 32, precision=precision, warmup=0, runs=2)  # type: ignore[arg-type]
    assert len(times["pyra"]) == 2 and all(t > 0 for t in times["pyra"])
    held_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert seen == {(images, held_dtype, logits)}
    assert next(model.parameters()).dtype == torch.float32, "the caller's model is not converted"


def test_benchmark_times_bf16_true_on_torch_engines_and_says_why_not_on_exports(one_thread: None) -> None:
    result = run_benchmark(
        merge_r=[2],
        batch_size=2,
        runs=1,
        warmup=0,
        precision="bf16-true",
        engine="eager,onnxruntime",
        train=True,
        **TINY_ARGS,
    )
    assert result["skipped"] == {
        "onnxruntime": "EngineUnavailable: onnxruntime runs the exported fp32 graph only, not precision 'bf16-true'"
    }
    assert {row["model"] for row in result["table"]} == {"uncompressed", "tome/r=2", "pyra/r=2"}
    assert all(row["engine"] == "eager" and row["images_per_s"] > 0 for row in result["table"])
    assert all(step["images_per_s"] > 0 for step in result["training"].values())
    assert result["models"]["pyra/r=2"]["gflops"] < result["models"]["uncompressed"]["gflops"]


@pytest.mark.parametrize(
    ("configured", "trainer", "timed"),
    [
        ("auto", "32-true", "32"),
        ("auto", "bf16-mixed", "32"),  # autocast trains fp32 weights: timed in fp32, as before
        ("auto", "bf16-true", "bf16-true"),  # the only dtype the fit's model is held in
        ("auto", "16-true", "16-true"),
        ("32", "bf16-true", "32"),  # asked for: an fp32 copy of the bf16 model is timed
        ("bf16-true", "32-true", "bf16-true"),
    ],
)
def test_the_throughput_callback_resolves_auto_to_the_trainers_true_precision(
    configured: str, trainer: str, timed: str
) -> None:
    fake = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision=trainer)
    callback = InferenceThroughput(precision=configured)  # type: ignore[arg-type]
    callback.setup(fake, None, "fit")  # type: ignore[arg-type]
    assert callback.timing_precision == timed and callback.precision == configured


@pytest.mark.slow
def test_a_bf16_true_fit_trains_its_model_in_bf16_and_times_it_so(tmp_path: Path) -> None:
    """The user's path: ``fit --trainer.precision bf16-true`` trains, tests, times and checkpoints."""
    run = tmp_path / "run"
    main(
        [
            "fit",
            *quickstart_args(
                run,
                tmp_path / "data",
                "--trainer.precision=bf16-true",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
                "--trainer.limit_val_batches=1",
                "--trainer.limit_test_batches=2",
            ),
        ]
    )
    result = json.loads((run / "results.json").read_text())
    assert result["benchmark"]["precision"] == "bf16-true"
    assert result["throughput"] > 0 and result["throughput_unmerged"] > 0
    assert 0.0 <= result["test_acc"] <= 1.0
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    assert floating == {torch.bfloat16}, "Lightning held the model in bf16"
    assert any(name.endswith("lora_a") or ".lora_" in name for name in state)
