"""Standalone inference artifacts: LoRA-folded weights as safetensors plus a JSON recipe.

A training checkpoint holds only what trains (LoRA, PYRA, head) and a fingerprint of the frozen
backbone, so serving it would need the pretrained weights, Lightning and this project's training
code. ``export_model`` instead writes what the tested model *is*: the LoRA-folded timm ViT with
its merging schedule and PYRA layers (the model ``LoRAFolding`` tests), in one folder::

    <out_dir>/model.safetensors   full state dict of the folded model (qkv weights include B·A)
    <out_dir>/config.json         how to rebuild it: timm name + create kwargs, per-layer merge_r,
                                  PYRA variant, prop_attn, and the preprocessing (size, mean, std)

``load_exported`` rebuilds it with ``timm.create_model`` + ``apply_merging`` and a strict load; this
module imports Lightning only inside ``export_model``/``main``, so serving code that calls
``load_exported`` never imports it.

    pyra-lightning export --config configs/quickstart.yaml --ckpt_path runs/.../last.ckpt --out_dir model/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pyra_lightning.files import plain_dir_mode
from pyra_lightning.patch import apply_merging, merge_schedule

if TYPE_CHECKING:
    from pyra_lightning.training.module import PyraClassifier

FORMAT = "pyra-lightning-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export_model(
    module_or_checkpoint: PyraClassifier | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    source: str | None = None,
) -> Path:
    """Write the LoRA-folded model of a ``PyraClassifier`` as a standalone inference artifact.

    Args:
        module_or_checkpoint: A ``PyraClassifier`` (its weights as they are now), or the path of
            one of its Lightning checkpoints, rebuilt from the checkpoint's hyperparameters. The
            frozen backbone is not in a checkpoint: it comes from ``pretrained``/``pretrained_file``,
            or, for randomly initialised test models, from ``seed`` (the run's ``seed_everything``);
            the checkpoint's backbone fingerprint refuses any other backbone.
        out_dir: Folder to create; it must not exist unless ``overwrite``.
        mean: Per-channel normalization mean of the inputs the model was trained on. Defaults to
            the attached data module's (``module.trainer.datamodule.mean``) or, for a checkpoint,
            the normalization recorded in its data-module hyperparameters.
        std: Per-channel standard deviation; resolved like ``mean``.
        seed: Seed to set before rebuilding a checkpoint's module (ignored for a module).
        overwrite: Replace an existing ``out_dir`` (swapped in by rename, never half-written).
        verify: Load the written artifact back and check that it predicts what the folded model
            predicts, so that a timm argument lost on the way fails here rather than in serving.
        source: Where the weights came from, recorded in ``config.json`` (defaults to the
            checkpoint path when one is given).

    Returns:
        The path of the written folder.

    Raises:
        FileNotFoundError: for a checkpoint path that does not exist.
        FileExistsError: if ``out_dir`` exists and ``overwrite`` is false.
        ValueError: for a checkpoint of another backbone or architecture, unknown normalization,
            or an artifact that does not reproduce the model.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export folder {out} already exists; pass overwrite=True (--overwrite)")
    checkpoint: dict[str, Any] | None = None
    if isinstance(module_or_checkpoint, str | os.PathLike):
        source = source or str(module_or_checkpoint)
        checkpoint = read_checkpoint(source)
        module = _module_from_checkpoint(checkpoint, seed)
        load_trainable(module, checkpoint)
    else:
        module = module_or_checkpoint
    mean, std = _normalization(module, checkpoint, mean, std)

    folded = module.folded_copy().cpu()  # (LoRA folded, eval mode) the model LoRAFolding tests
    config = export_config(module, folded, mean, std, source)
    state = {name: tensor.detach().contiguous() for name, tensor in folded.state_dict().items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(staging, plain_dir_mode())  # mkdtemp makes 0700; the folder is shared like any other
    try:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(staging / CONFIG_FILE, config)
        _fsync(staging / WEIGHTS_FILE)
        if verify:
            _verify(folded, load_exported(staging), config["preprocess"]["img_size"])
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_config(
    module: PyraClassifier,
    folded: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    source: str | None = None,
) -> dict[str, Any]:
    """The JSON recipe that ``load_exported`` rebuilds ``folded`` from (see the module docstring)."""
    hp = module.hparams
    merging = hasattr(folded, "forward_tokens")  # patched by apply_merging
    create_kwargs: dict[str, Any] = {
        **dict(hp.model_kwargs or {}),
        "num_classes": int(folded.num_classes),
        "img_size": int(hp.img_size),
    }
    pyra = hp.pyra
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": hp.model_name,
        "create_kwargs": create_kwargs,
        "merge_r": merge_schedule(folded) if merging else None,
        "pyra": ("pyra" if pyra is True else pyra) if merging and pyra else False,
        "prop_attn": bool(hp.prop_attn),
        "preprocess": {
            "img_size": int(hp.img_size),
            "resize": "bicubic, antialiased, straight to img_size x img_size (no crop)",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "input": "RGB scaled to [0, 1], then (x - mean) / std, shape (B, 3, img_size, img_size)",
        },
        "method": module.method,
        "backbone_fingerprint": module.backbone_fingerprint,
        "source_checkpoint": source,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    try:
        json.dumps(config)
    except TypeError as error:
        raise ValueError(f"model_kwargs must be JSON-serializable to be exported: {error}") from error
    return config


def load_exported(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model: ``timm.create_model`` + ``apply_merging`` + a strict load, in eval mode.

    Needs only torch, timm, safetensors and ``pyra_lightning.patch`` (never Lightning).

    Args:
        path: A folder written by ``export_model``.
        map_location: Device to load the weights onto.

    Raises:
        FileNotFoundError: if the folder or one of its two files is missing.
        ValueError: for a folder of another format or a newer format version.
    """
    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an exported model: {name} is missing")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or int(config.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE}: format {config.get('format')!r} version "
            f"{config.get('format_version')!r}; this pyra-lightning reads {FORMAT!r} "
            f"up to version {FORMAT_VERSION}"
        )
    model = timm.create_model(config["model_name"], pretrained=False, **config["create_kwargs"])
    if config["merge_r"] is not None:
        apply_merging(model, list(config["merge_r"]), pyra=config["pyra"], prop_attn=config["prop_attn"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(map_location)), strict=True)
    return model.to(map_location).eval()


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint of ``PyraClassifier`` on the CPU, tensors and primitives only."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(file)!r} does not exist")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{file} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def load_trainable(module: PyraClassifier, checkpoint: dict[str, Any]) -> None:
    """Load a checkpoint's trainable tensors, after the module's backbone and key checks."""
    module.on_load_checkpoint(checkpoint)  # raises ValueError on another backbone or other keys
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as error:  # same names, other shapes: e.g. another lora_rank
        raise ValueError(
            "checkpoint tensors do not fit this model (was it made with another lora_rank / merge_r?): "
            f"{error}"
        ) from error


def _module_from_checkpoint(checkpoint: dict[str, Any], seed: int | None) -> PyraClassifier:
    from lightning.pytorch import seed_everything

    from pyra_lightning.training.module import PyraClassifier

    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if "model_name" not in hparams:
        raise ValueError("checkpoint has no PyraClassifier hyperparameters; export it through the CLI")
    if seed is not None:
        seed_everything(seed, verbose=False)
    return PyraClassifier(**hparams)


def _normalization(
    module: PyraClassifier,
    checkpoint: dict[str, Any] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[Sequence[float], Sequence[float]]:
    """Explicit values, else the attached data module's, else the checkpoint's data hyperparameters."""
    if mean is not None and std is not None:
        return mean, std
    try:
        datamodule = module.trainer.datamodule
    except RuntimeError:  # not attached to a trainer
        datamodule = None
    if datamodule is not None and hasattr(datamodule, "mean") and hasattr(datamodule, "std"):
        return mean or datamodule.mean, std or datamodule.std
    name = (checkpoint or {}).get("datamodule_hyper_parameters", {}).get("normalization")
    if name is not None:
        from pyra_lightning.data.vtab import NORMALIZATION_STATS

        if name not in NORMALIZATION_STATS:
            raise ValueError(f"checkpoint's data normalization {name!r} is unknown; pass mean and std")
        stats = NORMALIZATION_STATS[name]
        return mean or stats[0], std or stats[1]
    raise ValueError(
        "cannot tell the input normalization: pass mean and std, or a module attached to a trainer "
        "with a data module that has them"
    )


@torch.no_grad()
def _verify(folded: nn.Module, loaded: nn.Module, img_size: int, tolerance: float = 1e-4) -> None:
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    expected, got = folded(x), loaded(x)
    diff = (expected - got).abs().max().item()
    if not diff <= tolerance:
        raise ValueError(
            f"the exported model does not reproduce the folded model (max |logit diff| {diff:.3g}); "
            "a timm create argument may be missing from model_kwargs"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _swap_in(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an old one is moved aside first and then deleted."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning export``: rebuild the module from the fit's config, load a checkpoint, export.

    Every argument other than the three below (``--config``, ``--model.*``, ``--data.*``,
    ``--seed_everything``) is parsed exactly as ``pyra-lightning fit`` parses it, so the module
    (and, for random-weight test models, its seeded backbone) is the one that was trained.
    """
    parser = argparse.ArgumentParser(
        prog="pyra-lightning export",
        allow_abbrev=False,
        description="Write the LoRA-folded model of a checkpoint as model.safetensors + config.json. "
        "Other arguments (--config, --model.*, --data.*) are those of `pyra-lightning fit`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (e.g. last.ckpt).")
    parser.add_argument("--out_dir", required=True, help="Folder to write; must not exist.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing out_dir.")
    args, cli_args = parser.parse_known_args(argv)
    from pyra_lightning.training.cli import build_cli  # Lightning only here: load_exported must not need it

    checkpoint = read_checkpoint(args.ckpt_path)  # fail on a bad path before building anything
    # Exporting logs nothing and starts no W&B run.
    cli = build_cli([*cli_args, "--trainer.logger=false"], run=False)
    load_trainable(cli.model, checkpoint)
    out = export_model(
        cli.model,
        args.out_dir,
        mean=cli.datamodule.mean,
        std=cli.datamodule.std,
        overwrite=args.overwrite,
        source=str(Path(args.ckpt_path).resolve()),
    )
    print(f"exported {args.ckpt_path} to {out}")
