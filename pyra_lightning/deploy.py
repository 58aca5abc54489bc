"""Deployed forms of a LoRA-folded model: ONNX, ``torch.export`` and AOTInductor, plus serving.

PYRA exists to make the *deployed* model fast (paper §1, §4), so a trained model must leave
PyTorch eager. The merge (eqs. 2-3) is written with operators every target supports:
``index_select`` (ONNX Gather) for the kept tokens, ``index_add_`` (ONNX ScatterND with
reduction ``add``) for the size-weighted sum, ``argsort`` (TopK), and a constant mask instead of
in-place writes; ``scatter_reduce``, which has no ONNX form, is left to source tracking for
visualisation. Token counts are static (they follow from the schedule), the batch axis is dynamic.

- ``to_onnx``: the torch.export-based ONNX exporter (``torch.onnx.export(dynamo=True)``);
  ``onnx_session`` opens it in ONNX Runtime with the session options we measured
  (BENCHMARKS.md, "Deployment").
- ``to_pt2``: a ``torch.export.ExportedProgram`` saved with ``torch.export.save``.
- ``to_aoti``: an AOTInductor package (``torch._inductor.aoti_compile_and_package``), a compiled
  shared library that ``load_aoti`` runs with torch alone; it needs a C++ compiler.
- ``load_exported``: the safetensors artifact of ``pyra-lightning export`` rebuilt as an
  ``ExportedModel``: the model plus the preprocessing it was trained with.

None of these import Lightning; the loaders need neither this package's training code nor timm
(``load_exported`` excepted, which rebuilds the timm model).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime

FORMAT = "pyra-lightning-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
AOTI_FILE = "model_aoti.pt2"
Engine = Literal["eager", "compile", "onnxruntime", "aoti"]
ENGINES: tuple[str, ...] = ("eager", "compile", "onnxruntime", "aoti")
MAX_BATCH = 4096  # the upper bound of the dynamic batch axis
_ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph
_ONNX_EXTRA = "pip install 'pyra-lightning[onnx]' (onnx, onnxruntime, onnxscript)"


def check_folded(model: nn.Module) -> None:
    """Refuse a model that still has LoRA branches: deploy the folded model (``fold_lora``)."""
    from pyra_lightning.lora import LoRAQKV

    unfolded = [name for name, module in model.named_modules() if isinstance(module, LoRAQKV)]
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
    providers: Sequence[str] = ("CPUExecutionProvider",),
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
        providers: ONNX Runtime execution providers, in order of preference.
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
    """Logits of one batch through an ONNX Runtime session."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])


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


# ------------------------------------------------------------------------------------- serving
@dataclass
class ExportedModel:
    """An exported classifier with the preprocessing it was trained with.

    Attributes:
        model: The LoRA-folded timm ViT (with merging and PYRA, if trained so), in eval mode.
        transform: timm's eval transform for one PIL image: bicubic resize straight to
            ``img_size`` x ``img_size`` (no crop), to tensor, normalise with the training mean/std.
        config: The artifact's ``config.json``.
    """

    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    config: dict[str, Any] = field(repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def schedule(self) -> list[int] | None:
        """The per-block ``merge_r`` it was exported at; an elastic checkpoint's trained range and
        chosen point are in ``config["elastic"]``."""
        return self.config.get("merge_r")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an already preprocessed (B, 3, H, W) batch."""
        return self.model(x)

    def preprocess(self, images: Sequence[Any] | Any) -> torch.Tensor:
        """A batch (B, 3, H, W) from PIL images, or from image tensors as the data module yields them.

        Accepted: one PIL image or a list of them; a ``uint8`` (3, H, W) or (B, 3, H, W) tensor
        (resized, scaled to [0, 1] and normalised); a float tensor is taken as already normalised.
        """
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.dim() == 3 else images
            if batch.dtype != torch.uint8:
                return batch.float()
            size = self.config["preprocess"]["img_size"]
            if batch.shape[-2:] != (size, size):
                batch = torch.nn.functional.interpolate(
                    batch.float(), size=(size, size), mode="bicubic", antialias=True
                ).clamp(0, 255)
            mean = torch.tensor(self.config["preprocess"]["mean"]).view(1, 3, 1, 1)
            std = torch.tensor(self.config["preprocess"]["std"]).view(1, 3, 1, 1)
            return (batch.float() / 255 - mean) / std
        if not isinstance(images, list | tuple):
            images = [images]
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    @torch.inference_mode()
    def predict(self, images: Sequence[Any] | Any, top_k: int = 1) -> list[list[tuple[int, float]]]:
        """Top-``k`` (class index, probability) per image, preprocessing included.

        Args:
            images: PIL images or image tensors (see ``preprocess``).
            top_k: How many classes to return per image.
        """
        logits = self.model(self.preprocess(images).to(self.device))
        probs = logits.float().softmax(dim=-1)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [
            [(int(i), float(v)) for i, v in zip(row_i, row_v, strict=True)]
            for row_i, row_v in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def eval_transform(preprocess: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform matching the training data pipeline (``data/vtab.py``).

    ``crop_mode="squash"`` with ``crop_pct=1`` resizes straight to ``img_size`` x ``img_size``
    with PIL's antialiased bicubic filter, as the data module does, so no centre crop is taken.
    """
    from timm.data import create_transform

    size = int(preprocess["img_size"])
    return create_transform(
        input_size=(3, size, size),
        is_training=False,
        interpolation="bicubic",
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        crop_pct=1.0,
        crop_mode="squash",
    )


def read_export_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of an exported folder, checked for format and version."""
    folder = Path(path)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {CONFIG_FILE} is missing")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT or int(config.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format {config.get('format')!r} version {config.get('format_version')!r}; this "
            f"pyra-lightning reads {FORMAT!r} up to version {FORMAT_VERSION}"
        )
    return config


def load_exported(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild an exported model with its preprocessing: ``timm.create_model`` + ``apply_merging`` + a strict load.

    Needs only torch, timm, safetensors and ``pyra_lightning.patch`` (never Lightning)::

        served = load_exported("model/")
        served.predict([Image.open("cat.jpg")])  # [[(class index, probability)]]
        served.model(batch)                      # logits of a preprocessed batch

    Args:
        path: A folder written by ``pyra-lightning export`` (``export_model``).
        map_location: Device to load the weights onto.

    Raises:
        FileNotFoundError: if the folder or one of its two files is missing.
        ValueError: for a folder of another format or a newer format version.
    """
    import timm
    from safetensors.torch import load_file

    from pyra_lightning.patch import apply_merging

    folder = Path(path)
    config = read_export_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {WEIGHTS_FILE} is missing")
    model = timm.create_model(config["model_name"], pretrained=False, **config["create_kwargs"])
    if config["merge_r"] is not None:
        apply_merging(model, list(config["merge_r"]), pyra=config["pyra"], prop_attn=config["prop_attn"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(map_location)), strict=True)
    model = model.to(map_location).eval()
    return ExportedModel(model=model, transform=eval_transform(config["preprocess"]), config=config)
