"""Deployed forms of a LoRA-folded model: ONNX, ``torch.export`` and AOTInductor, plus serving.

PYRA exists to make the *deployed* model fast (paper §1, §4), so a trained model must leave
PyTorch eager. The merge (eqs. 2-3) is written with operators every target supports: one
advanced-index gather (ONNX Gather) for the kept tokens, ``index_put`` with ``accumulate=True``
(ONNX ScatterND with reduction ``add``) for the size-weighted sum, ``sort`` (TopK), and a
constant mask instead of in-place writes while a graph is traced. Token counts are static (they
follow from the schedule), the batch axis is dynamic.

- ``to_onnx``: the torch.export-based ONNX exporter (``torch.onnx.export(dynamo=True)``);
  ``onnx_session`` opens it in ONNX Runtime with the session options we measured
  (BENCHMARKS.md, "Deployment").
- ``to_pt2``: a ``torch.export.ExportedProgram`` saved with ``torch.export.save``.
- ``to_aoti``: an AOTInductor package (``torch._inductor.aoti_compile_and_package``), a compiled
  shared library that ``load_aoti`` runs with torch alone; it needs a C++ compiler.
- ``load_exported`` (``serving.py``): the safetensors artifact of ``pyra-lightning export``
  rebuilt as an ``ExportedModel``: the model plus the preprocessing it was trained with.
- ``pyra_lightning.formats``: the table of these forms, one ``Format`` row each, which
  ``pyra-lightning export`` and the benchmark's engines iterate.

None of these import Lightning; the loaders need neither this package's training code nor timm
(``load_exported`` excepted, which rebuilds the timm model).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pyra_lightning.serving import (  # noqa: F401  (the artifact's names; deploy is where users find them)
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ExportedModel,
    load_exported,
    read_export_config,
)

if TYPE_CHECKING:
    import onnxruntime

ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
AOTI_FILE = "model_aoti.pt2"
MAX_BATCH = 4096  # the upper bound of the dynamic batch axis
_ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph
_ONNX_EXTRA = "pip install 'pyra-lightning[onnx]' (onnx, onnxruntime, onnxscript)"
# Largest |logit difference| accepted between a deployed form and eager PyTorch. Measured on
# random-weight ViT-B/16 fp32: ONNX Runtime 2.5e-6, torch.export 0 (BENCHMARKS.md, "Deployment").
DEPLOY_TOLERANCE = 1e-3
SAFETENSORS_TOLERANCE = 1e-4  # the rebuilt safetensors model runs the same PyTorch code


class EngineUnavailable(RuntimeError):
    """A format or engine cannot run here (package missing, no compiler, unsupported precision)."""


def check_folded(model: nn.Module) -> None:
    """Refuse a model that still has PEFT layers (LoRA, DoRA): deploy the folded model (``fold_lora``)."""
    from pyra_lightning.peft import peft_layers

    layers = peft_layers()
    unfolded = [name for name, module in model.named_modules() if isinstance(module, layers)]
    if unfolded:
        raise ValueError(
            f"{len(unfolded)} LoRA layers are not folded (first: {unfolded[0]}); call "
            "pyra_lightning.fold_lora(model) first, so the deployed model costs no LoRA FLOPs"
        )


def _batch_dim(example_input: torch.Tensor) -> dict[int, Any]:
    if example_input.dim() != 4:
        raise ValueError(
            f"example_input must be a (B, 3, H, W) batch, got shape {tuple(example_input.shape)}"
        )
    if example_input.shape[0] < 2:
        # torch.export specialises a size of 1; an example of 2 keeps the batch axis symbolic.
        raise ValueError("example_input needs a batch of at least 2 so the exported batch axis stays dynamic")
    return {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}


def export_program(model: nn.Module, example_input: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a folded model in eval mode, with a dynamic batch axis."""
    check_folded(model)
    model.eval()
    with torch.no_grad():
        return torch.export.export(model, (example_input,), dynamic_shapes=(_batch_dim(example_input),))


def to_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    opset_version: int | None = None,
) -> Path:
    """Export a LoRA-folded model, merged or not, to ONNX with a dynamic batch axis.

    The graph comes from ``torch.export`` (the dynamo exporter) and is optimised by onnxscript's
    rewriter (constant folding, dead code). Input ``x`` (B, 3, H, W) float32, output ``logits``.
    Models over ~1.8 GB keep their weights in ``<path>.data`` beside the graph (protobuf's limit).

    Args:
        model: A timm ViT after ``fold_lora`` (and ``apply_merging``, if merged), or its
            ``export_program`` (saves exporting twice when ``to_pt2`` wrote it too).
        path: The ``.onnx`` file to write.
        example_input: A (B >= 2, 3, H, W) batch at the model's resolution; B is not fixed.
        opset_version: ONNX opset; ``None`` takes the exporter's default.

    Returns:
        ``path``.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as error:
        raise ImportError(f"ONNX export needs onnxscript: {_ONNX_EXTRA}") from error
    program = (
        model if isinstance(model, torch.export.ExportedProgram) else export_program(model, example_input)
    )
    if any("flex_attention" in str(node.target) for node in program.graph.nodes):
        raise ValueError(
            "ONNX has no operator for FlexAttention: export a model patched with attention='sdpa' "
            "(model.merging.attention; the same function) to ONNX, or use the pt2/aoti formats"
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    big = sum(t.numel() * t.element_size() for t in program.state_dict.values()) > _ONNX_SINGLE_FILE_BYTES
    torch.onnx.export(
        program,
        (example_input,),
        str(out),
        dynamo=True,
        input_names=["x"],
        output_names=["logits"],
        opset_version=opset_version,
        optimize=True,
        external_data=big,
        verbose=False,
    )
    return out


def onnx_session(
    path: str | os.PathLike[str],
    threads: int | None = None,
    providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",),
    spinning: bool = True,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session with the options we measured (BENCHMARKS.md, "Deployment").

    All graph optimisations (``ORT_ENABLE_ALL``: constant folding, MatMul+Add and GELU fusions,
    LayerNorm fusions), sequential execution (a ViT is one chain, so parallel branches buy
    nothing), and ``threads`` intra-op threads, like ``torch.set_num_threads``.

    Args:
        path: An ``.onnx`` file from ``to_onnx``.
        threads: Intra-op threads; ``None`` uses ``torch.get_num_threads()`` so both engines get
            the same cores in a comparison.
        providers: ONNX Runtime execution providers, in order of preference: names, or
            ``(name, options)`` pairs such as ``("CUDAExecutionProvider", {"device_id": 1})``.
        spinning: Let idle pool threads spin; on a CPU shared with other jobs, ``False`` gives
            the cores back between operators.
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(f"running ONNX needs onnxruntime: {_ONNX_EXTRA}") from error
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def run_onnx(session: onnxruntime.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    """Logits of one batch through an ONNX Runtime session, on ``x``'s device.

    A CUDA batch is handed to the session where it lies (``run_bound``): through numpy it would
    cross to host memory and back on every call, and a benchmark would time those copies
    (about 150 MB each way for a ViT-B batch of 256) beside torch engines that make none.
    """
    if x.is_cuda:
        return run_bound(session, x)
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])


def run_bound(session: onnxruntime.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    """``run_onnx`` through ONNX Runtime's I/O binding: the session reads ``x`` and writes the
    logits in place on ``x``'s device (CPU or CUDA), with no copy through numpy.

    The logits are a torch tensor allocated here, (B, *the model's output shape*); torch's
    queued work on ``x`` is waited for first, since the session runs on its own CUDA stream
    (its ``run`` returns once that stream is done).
    """
    import numpy as np

    x = x.detach().float().contiguous()
    output = session.get_outputs()[0]
    tail = output.shape[1:]
    if not all(isinstance(d, int) for d in tail):
        raise ValueError(
            f"run_bound needs the model's output shape after the batch; the ONNX file has {tail}"
        )
    out = torch.empty((x.shape[0], *tail), device=x.device, dtype=torch.float32)
    kind, index = x.device.type, _device_index(x.device)
    binding = session.io_binding()
    binding.bind_input(session.get_inputs()[0].name, kind, index, np.float32, list(x.shape), x.data_ptr())
    binding.bind_output(output.name, kind, index, np.float32, list(out.shape), out.data_ptr())
    if x.is_cuda:
        torch.cuda.current_stream(x.device).synchronize()
    session.run_with_iobinding(binding)
    return out


def _device_index(device: torch.device) -> int:
    """ONNX Runtime's device id for ``device``: its index, else the current GPU (0 on a CPU)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def to_pt2(
    model: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor
) -> torch.export.ExportedProgram:
    """Save a folded model as a ``torch.export.ExportedProgram`` (dynamic batch); return the program.

    The file holds the graph of ATen operators and the weights; ``load_pt2`` runs it with torch
    alone, and ``torch._inductor.aoti_compile_and_package`` or other backends can compile it.
    """
    program = export_program(model, example_input)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return program


def load_pt2(path: str | os.PathLike[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable module of a saved ``ExportedProgram`` (needs torch only)."""
    return torch.export.load(str(path)).module()


def cxx_compiler() -> str | None:
    """The C++ compiler AOTInductor would use (``$CXX``, else ``c++``/``g++``/``clang++``), or None."""
    candidates = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return next((found for name in candidates if name and (found := shutil.which(name))), None)


def to_aoti(
    model_or_program: nn.Module | torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    quick: bool = False,
) -> Path:
    """Compile a folded model ahead of time with AOTInductor into a ``.pt2`` package.

    The package holds a compiled shared library and the weights; ``load_aoti`` runs it with
    torch alone (no Python model code, no timm, no pyra_lightning). Compiling needs a C++
    compiler and takes about a minute for tiny models on two cores, minutes for ViT-B.

    Args:
        model_or_program: A folded model, or its ``export_program``.
        path: The ``.pt2`` package to write.
        example_input: A (B >= 2, 3, H, W) batch; B is not fixed.
        quick: Build the C++ without optimisation (``-O0``): about 2x faster to compile, slower
            to run; for checks of correctness, not for serving.
    """
    if cxx_compiler() is None:
        raise RuntimeError("AOTInductor needs a C++ compiler (g++ or clang++) on PATH, or $CXX")
    program = (
        model_or_program
        if isinstance(model_or_program, torch.export.ExportedProgram)
        else export_program(model_or_program, example_input)
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    options = {"aot_inductor.debug_compile": True} if quick else None
    return Path(
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)
    )


def load_aoti(path: str | os.PathLike[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running an AOTInductor package (needs torch only)."""
    return torch._inductor.aoti_load_package(str(path))


def max_abs_diff(expected: torch.Tensor, got: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Largest |difference| of two outputs (an AOTInductor package returns a list)."""
    if isinstance(got, list | tuple):
        (got,) = got
    return float((expected.detach().float() - torch.as_tensor(got).detach().float()).abs().max())
