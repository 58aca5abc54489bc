"""compile_for_inference: one input shape, one engine, the eager model's outputs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import randomize_, tiny_vit

import pyra_lightning
from pyra_lightning import apply_merging
from pyra_lightning.lora import LoRALinear
from pyra_lightning.timing import time_forwards


def _model() -> torch.nn.Module:
    model = tiny_vit()
    pyra_lightning.apply_lora(model, lora_rank=4)
    pyra_lightning.apply_merging(model, 8, pyra=True)
    return randomize_(model)


def test_eager_engine_folds_a_copy_and_matches_the_model() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    compiled = pyra_lightning.compile_for_inference(model, x, engine="auto")
    assert compiled.engine == "eager", "auto on CPU is eager"
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, LoRALinear) for m in model.modules()), "the caller's model keeps its LoRA"
    assert not any(isinstance(m, LoRALinear) for m in compiled.model.modules())


def test_another_shape_dtype_or_device_is_refused() -> None:
    x = torch.randn(2, 3, 32, 32)
    compiled = pyra_lightning.compile_for_inference(_model(), x, engine="eager")
    with pytest.raises(
        ValueError, match=r"built for input \(2, 3, 32, 32\) torch.float32 on cpu, got \(3, 3, 32, 32\)"
    ):
        compiled(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="got \\(2, 3, 32, 32\\) torch.float64"):
        compiled(x.double())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("engine", ["cudagraph", "inductor-cudagraph"])
def test_graph_engines_refuse_a_cpu_input(engine: str) -> None:
    with pytest.raises(
        ValueError,
        match=f"engine '{engine}' captures a CUDA graph and needs a CUDA input; example_input is on cpu",
    ):
        pyra_lightning.compile_for_inference(_model(), torch.randn(1, 3, 32, 32), engine=engine)


def test_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match="engine='tensorrt': expected one of auto, eager, inductor"):
        pyra_lightning.compile_for_inference(_model(), torch.randn(1, 3, 32, 32), engine="tensorrt")


def test_inductor_engine_matches_eager_and_never_recompiles() -> None:
    model = tiny_vit(depth=2)
    pyra_lightning.apply_merging(model, 8, pyra=False)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    compiled = pyra_lightning.compile_for_inference(model, x, engine="inductor")
    y = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
    # Callers time it under inference_mode (timing.time_forwards, the throughput callback) or
    # none: neither changes the graph's guards, so neither is a recompile (which would raise)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-4)
    seconds = time_forwards({"inductor": compiled}, 1, 32, "cpu", "32", warmup=1, runs=2)["inductor"]
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    # each batch size is a compile of its own, asked for: dynamo's per-code limit (a guard against
    # recompile storms, 8 compiles of the class's forward across all its models) does not stop it
    with torch._dynamo.config.patch(recompile_limit=1):
        other = pyra_lightning.compile_for_inference(model, torch.randn(2, 3, 32, 32), engine="inductor")
        assert other(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    # past the limit on all compiles, one clear line
    with (
        torch._dynamo.config.patch(accumulated_recompile_limit=1),
        pytest.raises(
            ValueError, match=r"one more compile of MergingVisionTransformer's forward .*limit \(1\)"
        ),
    ):
        pyra_lightning.compile_for_inference(model, torch.randn(3, 3, 32, 32), engine="inductor")
    with pytest.raises(ValueError, match="built for input"):
        compiled(torch.randn(2, 3, 32, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["auto", "cudagraph", "inductor-cudagraph"])
def test_graph_engines_match_eager_on_cuda(engine: str) -> None:
    model = _model().cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = pyra_lightning.fold_lora(copy.deepcopy(model))(x)
    compiled = pyra_lightning.compile_for_inference(model, x, engine=engine)
    first = compiled(x)
    second = compiled(torch.randn_like(x))
    torch.testing.assert_close(first, expected, rtol=1e-3, atol=1e-3)
    assert not torch.equal(first, second), "a later call does not overwrite an earlier result"
    if engine == "auto":
        assert compiled.engine in ("eager", "cudagraph") and set(compiled.timings_ms) == {
            "eager",
            "cudagraph",
        }


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("engine", ["auto", "cudagraph"])
def test_a_graph_is_captured_on_the_gpu_of_its_input_when_another_is_current(engine: str) -> None:
    """``torch.cuda.graph`` captures on one process-wide stream unless told otherwise: made on
    cuda:0 here, it would capture nothing of a forward on cuda:1 and replay the example's logits."""
    torch.cuda.set_device(0)
    torch.cuda.graph.default_capture_stream = None  # made afresh on the current device, cuda:0
    model = _model().to("cuda:1").eval()
    x = torch.randn(4, 3, 32, 32, device="cuda:1")
    compiled = pyra_lightning.compile_for_inference(model, x, engine=engine)
    other = torch.randn_like(x)
    with torch.no_grad():
        expected = pyra_lightning.fold_lora(copy.deepcopy(model))(other)
    torch.testing.assert_close(compiled(other), expected, rtol=1e-3, atol=1e-3)
    assert torch.cuda.current_device() == 0


def test_the_compile_engine_binds_a_static_graph_per_batch_size_and_refuses_past_dynamos_limit() -> None:
    """``benchmark --engine compile`` (plain ``torch.compile``, graph breaks allowed) compiles each
    batch size it times as its own static graph: left to dynamo, the second size would mark the batch
    dimension dynamic and every later size would reuse that graph, so a size's figure would depend
    on the order the sizes were timed in. Past dynamo's limit on compiles it would run the model
    eager, silently, and time that as "compile"; it refuses instead."""
    from torch._dynamo.utils import counters

    from pyra_lightning.commands.engines import build_runner

    model = pyra_lightning.apply_merging(tiny_vit(depth=1), 4, pyra=True).eval()
    frames = counters["frames"]["ok"]
    build_runner("compile", model, 1, 32, "cpu").run()
    per_size = counters["frames"]["ok"] - frames
    build_runner("compile", model, 2, 32, "cpu").run()
    assert per_size >= 1 and counters["frames"]["ok"] - frames == 2 * per_size  # batch 2 compiled anew
    # A dynamic graph from batch 2 would serve batch 3 without a compile, and so without a refusal.
    with (
        torch._dynamo.config.patch(accumulated_recompile_limit=2),
        pytest.raises(ValueError, match="torch.compile refused one more compile"),
    ):
        build_runner("compile", model, 3, 32, "cpu")


def test_benchmark_runs_the_inference_engines_and_skips_cuda_graphs_on_cpu() -> None:
    """The benchmark's runners reach compile_for_inference's engines; on CPU a CUDA-graph engine is
    refused as unavailable (the benchmark skips it with that reason) instead of failing."""
    from pyra_lightning.commands.engines import build_runner
    from pyra_lightning.deploy import EngineUnavailable

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    apply_merging(model, [4, 2], pyra=True)
    built = build_runner("eager", model, 2, 32)
    assert built.run().shape == (2, 1000)
    with pytest.raises(EngineUnavailable, match="needs a CUDA input"):
        build_runner("cudagraph", model, 2, 32)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_on_cpu_either_compiles_to_the_sdpa_logits_or_refuses_in_one_line() -> None:
    """Inductor's CPU FlexAttention template needs CPU features some machines lack (this CI's
    among them): then the refusal names the attention kernel and the way out, never a stack of
    lowering errors; where it compiles, the logits are SDPA's."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    model = apply_merging(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw), 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    apply_merging(model, 4, attention="flex")
    torch._dynamo.reset()
    try:
        run = pyra_lightning.compile_for_inference(model, x, engine="inductor")
    except ValueError as error:
        message = str(error)
        assert message.startswith("attention='flex' did not compile on this CPU (") and "\n" not in message
        assert "use attention='sdpa' here" in message
    else:
        torch.testing.assert_close(run(x), expected, rtol=1e-5, atol=1e-5)
