"""The table of deployed forms: one ``Format`` row per ``pyra-lightning export --format``.

``pyra-lightning export`` writes and checks the rows a user asks for, and the rows with an
``engine`` are ``pyra-lightning benchmark --engine`` values (``engines()``). Both read the table
when they run, so a form registered with ``register_format`` (a TensorRT engine, a TorchScript
file) appears in both, in ``--help`` too, without a branch in either command. The functions the
rows call (``to_onnx``, ``to_pt2``, ``to_aoti``, the loaders) live in ``deploy``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyra_lightning.deploy import (
    AOTI_FILE,
    DEPLOY_TOLERANCE,
    ONNX_FILE,
    PT2_FILE,
    SAFETENSORS_TOLERANCE,
    WEIGHTS_FILE,
    EngineUnavailable,
    _device_index,
    cxx_compiler,
    export_program,
    load_aoti,
    load_exported,
    load_pt2,
    max_abs_diff,
    onnx_session,
    run_onnx,
    to_aoti,
    to_onnx,
)
from pyra_lightning.inference import GRAPH_ENGINES

# compile_for_inference's engines and torch.compile, which run the model itself, not a file
MODEL_ENGINES: tuple[str, ...] = ("eager", "compile", *GRAPH_ENGINES)

Model = nn.Module | torch.export.ExportedProgram
Loaded = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Format:
    """One deployed form of a folded model: a row of the table that ``export`` and the engines iterate.

    Attributes:
        name: The ``--format`` value.
        file: Its file in an export folder.
        extra: What this machine lacks to write and run it (one line, e.g. the pip extra to
            install), or ``None`` when nothing is missing.
        write: ``write(model_or_program, path, example)``: the file to write from a folded model
            (the benchmark's engines pass the model) or, where ``from_program``, from its
            ``export_program`` (``export`` traces one graph for all such rows); ``example`` is a
            (B >= 2, 3, H, W) batch (``None`` for safetensors, which traces nothing).
        load: ``load(path, device, threads)``: a callable giving the logits of a (B, 3, H, W) batch.
        verify: ``verify(folded, path, img_size)``: max |logit diff| of the written file against
            the folded model; raises ``ValueError`` when it exceeds the format's tolerance.
        engine: The benchmark engine that runs this format (``--engine``), if any.
        from_program: Whether ``export`` hands ``write`` the shared ``ExportedProgram``; a form
            not built on ``torch.export`` (TorchScript, say) sets False and gets the folded model.
    """

    name: str
    file: str
    extra: Callable[[], str | None]
    write: Callable[[Model, Path, torch.Tensor | None], None]
    load: Callable[[Path, torch.device, int | None], Loaded]
    verify: Callable[[nn.Module, Path, int], float]
    engine: str | None = None
    from_program: bool = True


def _nothing_missing() -> str | None:
    return None


def _onnx_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        return f"the onnx extra: pip install 'pyra-lightning[onnx]' ({error})"
    return None


def _compiler_missing() -> str | None:
    return None if cxx_compiler() else "a C++ compiler (g++ or clang++) on PATH, or $CXX; none was found"


def _write_safetensors(model: Model, path: Path, example: torch.Tensor | None) -> None:
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _write_onnx(model: Model, path: Path, example: torch.Tensor | None) -> None:
    if isinstance(model, nn.Module):  # exported on the CPU; the caller's model stays where it is
        model = copy.deepcopy(model).cpu()
    to_onnx(model, path, example.cpu())


def _write_pt2(model: Model, path: Path, example: torch.Tensor | None) -> None:
    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(model, example)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


def _write_aoti(model: Model, path: Path, example: torch.Tensor | None) -> None:
    to_aoti(model, path, example)


def _load_safetensors(path: Path, device: torch.device, threads: int | None) -> Loaded:
    return load_exported(Path(path).parent, map_location=device).model


def _load_onnx(path: Path, device: torch.device, threads: int | None) -> Loaded:
    providers: list[str | tuple[str, dict[str, Any]]] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        # on the input's GPU: the provider's default is GPU 0, whatever the batch's device
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": _device_index(device)}))
    session = onnx_session(path, threads=threads, providers=providers)
    return lambda x: run_onnx(session, x)


def _load_pt2(path: Path, device: torch.device, threads: int | None) -> Loaded:
    return load_pt2(path)


def _load_aoti(path: Path, device: torch.device, threads: int | None) -> Loaded:
    return load_aoti(path)


def _verify_safetensors(folded: nn.Module, path: Path, img_size: int) -> float:
    """The rebuilt model (``load_exported``) against the folded one, at batch 2."""
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    loaded = _load_safetensors(path, torch.device("cpu"), None)
    with torch.no_grad():
        diff = (folded(x) - loaded(x)).abs().max().item()
    if not diff <= SAFETENSORS_TOLERANCE:
        raise ValueError(
            f"the exported model does not reproduce the folded model (max |logit diff| {diff:.3g}); "
            "a timm create argument may be missing from model_kwargs"
        )
    return diff


def example_batches(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The export's example batch (2, 3, H, W) and the check batch (3, 3, H, W), seeded.

    Exported at batch 2, checked at batch 3, so a batch size baked into the graph fails the check.
    """
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, img_size, img_size, generator=generator)
    return example, torch.randn(3, 3, img_size, img_size, generator=generator)


def verify_deployed(name: str) -> Callable[[nn.Module, Path, int], float]:
    """The ``verify`` of a row that ``load`` can run on the CPU: the written file against the folded
    model at batch 3 (exported at batch 2, so a baked-in batch size fails), within
    ``DEPLOY_TOLERANCE``."""

    def verify(folded: nn.Module, path: Path, img_size: int) -> float:
        _, check = example_batches(img_size)
        with torch.no_grad():
            expected = folded(check)
            got = FORMATS[name].load(path, torch.device("cpu"), None)(check)
        diff = max_abs_diff(expected, got)
        if not diff <= DEPLOY_TOLERANCE:
            raise ValueError(
                f"{name} export does not reproduce the folded model: max |logit diff| {diff:.3g} at batch 3 "
                f"(tolerance {DEPLOY_TOLERANCE})"
            )
        return diff

    return verify


FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        Format(
            "safetensors",
            WEIGHTS_FILE,
            _nothing_missing,
            _write_safetensors,
            _load_safetensors,
            _verify_safetensors,
        ),
        Format(
            "onnx", ONNX_FILE, _onnx_missing, _write_onnx, _load_onnx, verify_deployed("onnx"), "onnxruntime"
        ),
        Format("pt2", PT2_FILE, _nothing_missing, _write_pt2, _load_pt2, verify_deployed("pt2")),
        Format(
            "aoti", AOTI_FILE, _compiler_missing, _write_aoti, _load_aoti, verify_deployed("aoti"), "aoti"
        ),
    )
}


def register_format(fmt: Format) -> None:
    """Add (or replace) a row: ``export --format`` and, with ``fmt.engine``, ``benchmark --engine``
    take it from then on."""
    if fmt.engine is not None and fmt.engine in MODEL_ENGINES:
        raise ValueError(f"format {fmt.name!r}: engine {fmt.engine!r} is one of the model engines")
    FORMATS[fmt.name] = fmt


def engines() -> tuple[str, ...]:
    """Every ``benchmark --engine`` value: the model engines, then the registered formats' engines."""
    return (*MODEL_ENGINES, *(fmt.engine for fmt in FORMATS.values() if fmt.engine))


def engine_format(engine: str) -> Format | None:
    """The format an exported engine runs (``onnxruntime`` -> ``onnx``), ``None`` for eager/compile."""
    return next((f for f in FORMATS.values() if f.engine == engine), None)
