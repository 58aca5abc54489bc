"""Deployed forms of merged models: ONNX Runtime, torch.export and AOTInductor agree with eager."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import randomize_, tiny_vit
from torch import nn

from pyra_lightning import to_onnx
from pyra_lightning.deploy import (
    check_folded,
    cxx_compiler,
    export_program,
    load_pt2,
    max_abs_diff,
    onnx_session,
    run_bound,
    run_onnx,
    to_aoti,
    to_pt2,
)
from pyra_lightning.patch import apply_lora, apply_merging, fold_lora

REGISTERS = 4  # prefix tokens: class token + 4 registers, the case where token order is subtle
EXPORT_BATCH, CHECK_BATCHES = 2, (1, 5)  # checked at batch sizes the export never saw
TOLERANCE = 1e-4  # max |logit diff| for tiny models (issue 12)


def merged_model(method: str, depth: int = 4) -> nn.Module:
    """A tiny ViT with registers, LoRA trained to random values, merged (or not), folded."""
    model = tiny_vit(reg_tokens=REGISTERS, depth=depth)
    apply_lora(model, 4)
    if method != "none":
        apply_merging(model, [8, 8, 4, 4][:depth], pyra=method == "pyra")
    randomize_(model)
    return fold_lora(model).eval()


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["pyra", "tome", "none"])
def test_onnx_and_pt2_match_eager_at_batch_sizes_other_than_the_exports(method: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install '.[onnx]') is not installed")
    model = merged_model(method)
    program = export_program(model, images(EXPORT_BATCH, 0))
    graph = str(program.graph)
    assert "scatter_reduce" not in graph, "scatter_reduce has no ONNX form"
    onnx_path = to_onnx(program, tmp_path / "model.onnx", images(EXPORT_BATCH, 0))
    to_pt2(model, tmp_path / "model.pt2", images(EXPORT_BATCH, 0))
    session, exported = onnx_session(onnx_path, threads=1), load_pt2(tmp_path / "model.pt2")
    batch_axis = session.get_inputs()[0].shape[0]  # a name, not a number, when it is dynamic
    assert isinstance(batch_axis, str) and batch_axis, "the batch axis must be symbolic"
    for seed, batch in enumerate(CHECK_BATCHES, start=1):
        x = images(batch, seed)
        with torch.no_grad():
            expected = model(x)
            from_pt2 = exported(x)
        from_onnx = run_onnx(session, x)
        assert torch.equal(run_bound(session, x), from_onnx), "I/O binding (a CUDA batch's path)"
        assert from_onnx.shape == expected.shape == (batch, 5)
        assert max_abs_diff(expected, from_onnx) <= TOLERANCE, (method, batch)
        assert max_abs_diff(expected, from_pt2) <= TOLERANCE, (method, batch)
    if method != "none":  # the merge really is in the graph: index_add_ lowers to ScatterND(add)
        import onnx

        ops = {
            (node.op_type, tuple(a.s for a in node.attribute if a.name == "reduction"))
            for node in onnx.load(onnx_path).graph.node
        }
        assert ("ScatterND", (b"add",)) in ops
        assert not any(
            op == "ScatterElements" and reduction in ((b"max",), (b"min",)) for op, reduction in ops
        )


def test_unfolded_models_and_fixed_batches_are_refused(tmp_path: Path) -> None:
    model = tiny_vit()
    apply_lora(model, 4)
    with pytest.raises(ValueError, match="fold_lora"):
        check_folded(model)
    with pytest.raises(ValueError, match="fold_lora"):
        to_pt2(model, tmp_path / "a.pt2", images(2, 0))
    with pytest.raises(ValueError, match="batch of at least 2"):
        to_pt2(fold_lora(model), tmp_path / "b.pt2", images(1, 0))


def _run_alone(code: str, tmp_path: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it must not import pyra_lightning, timm or Lightning."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        leaked = sorted({m.split(".")[0] for m in sys.modules} & {"pyra_lightning", "timm", "lightning"})
        print(json.dumps({"leaked": leaked, "diff": diff}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pt2_runs_with_torch_alone(tmp_path: Path) -> None:
    model = merged_model("pyra")
    to_pt2(model, tmp_path / "model.pt2", images(EXPORT_BATCH, 0))
    x = images(3, 1)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    result = _run_alone(
        """
        import torch
        module = torch.export.load("model.pt2").module()
        with torch.no_grad():
            diff = float((module(torch.load("x.pt")) - torch.load("y.pt")).abs().max())
        """,
        tmp_path,
    )
    assert result["leaked"] == [] and result["diff"] <= TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(cxx_compiler() is None, reason="AOTInductor needs a C++ compiler (g++/clang++) on PATH")
def test_aoti_package_runs_with_torch_alone(tmp_path: Path) -> None:
    """Compiled at -O0 (``quick``) on a 1-block model: the package logic, not its speed, is tested."""
    model = merged_model("pyra", depth=1)
    to_aoti(model, tmp_path / "model_aoti.pt2", images(EXPORT_BATCH, 0), quick=True)
    for batch in CHECK_BATCHES:
        x = images(batch, batch)
        torch.save(x, tmp_path / f"x{batch}.pt")
        with torch.no_grad():
            torch.save(model(x), tmp_path / f"y{batch}.pt")
    result = _run_alone(
        f"""
        import torch
        run = torch._inductor.aoti_load_package("model_aoti.pt2")
        diff = 0.0
        with torch.inference_mode():
            for batch in {CHECK_BATCHES!r}:
                out = run(torch.load(f"x{{batch}}.pt"))
                out = out[0] if isinstance(out, (list, tuple)) else out
                diff = max(diff, float((out - torch.load(f"y{{batch}}.pt")).abs().max()))
        """,
        tmp_path,
    )
    assert result["leaked"] == [] and result["diff"] <= TOLERANCE
