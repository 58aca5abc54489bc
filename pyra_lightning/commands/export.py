"""Standalone inference artifacts: LoRA-folded weights as safetensors plus a JSON recipe, and
the same model as ONNX, a ``torch.export`` program or an AOTInductor package.

A training checkpoint holds only what trains (LoRA, PYRA, head) and a fingerprint of the frozen
backbone, so serving it would need the pretrained weights, Lightning and this project's training
code. ``export_model`` instead writes what the tested model *is*: the LoRA-folded timm ViT with
its merging schedule and PYRA layers (the model ``LoRAFolding`` tests), in one folder::

    <out_dir>/config.json         how to rebuild it: timm name + create kwargs, per-layer merge_r,
                                  PYRA variant, prop_attn, the preprocessing (size, mean, std),
                                  and every artifact written with its measured max |logit diff|
    <out_dir>/model.safetensors   full state dict of the folded model (qkv weights include B·A)
    <out_dir>/model.onnx          --format onnx: the graph for ONNX Runtime, dynamic batch
    <out_dir>/model.pt2           --format pt2: a torch.export ExportedProgram, dynamic batch
    <out_dir>/model_aoti.pt2      --format aoti: an AOTInductor package (needs a C++ compiler)

``pyra_lightning.load_exported`` rebuilds the safetensors model with its preprocessing; the other
three load with ONNX Runtime or torch alone (``pyra_lightning.deploy``). This module imports
Lightning only to rebuild a checkpoint's module, so serving code never imports it.

    pyra-lightning export --ckpt_path runs/.../last.ckpt --out_dir model/ --format onnx
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

import torch
import yaml
from torch import nn

import pyra_lightning.deploy as deploy
from pyra_lightning.deploy import (  # noqa: F401  (re-exported: the artifact's names live in deploy)
    AOTI_FILE,
    CONFIG_FILE,
    DEPLOY_TOLERANCE,
    FORMAT,
    FORMAT_VERSION,
    ONNX_FILE,
    PT2_FILE,
    WEIGHTS_FILE,
    ExportedModel,
    load_exported,
)
from pyra_lightning.files import apply_umask, plain_dir_mode
from pyra_lightning.formats import FORMATS, example_batches
from pyra_lightning.modulation import resolve_variant

if TYPE_CHECKING:
    from pyra_lightning.training.module import PyraClassifier


def export_model(
    module_or_checkpoint: PyraClassifier | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    source: str | None = None,
    formats: Sequence[str] = ("safetensors",),
    merge_r: Any = None,
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
        formats: Deployed forms to add to the safetensors artifact (always written, since
            ``config.json`` and ``load_exported`` rest on it): ``onnx``, ``pt2``, ``aoti``. Each is
            checked against the folded model at a batch size other than the export's and its
            max |logit diff| recorded in ``config.json["artifacts"]``.
        merge_r: For a checkpoint of an elastic run: the schedule to deploy at, anywhere inside
            the range it was trained for (``module_from_checkpoint``); ``None`` keeps its own.

    Returns:
        The path of the written folder.

    Raises:
        FileNotFoundError: for a checkpoint path that does not exist.
        FileExistsError: if ``out_dir`` exists and ``overwrite`` is false.
        ValueError: for a checkpoint of another backbone or architecture, unknown normalization,
            or an artifact that does not reproduce the model.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"export format(s) {unknown}: expected some of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export folder {out} already exists; pass overwrite=True (--overwrite)")
    checkpoint: dict[str, Any] | None = None
    if isinstance(module_or_checkpoint, str | os.PathLike):
        source = source or str(module_or_checkpoint)
        checkpoint = read_checkpoint(source)
        module = module_from_checkpoint(checkpoint, seed, merge_r)
        load_trainable(module, checkpoint)
    else:
        module = module_or_checkpoint
    mean, std = _normalization(module, checkpoint, mean, std)

    folded = module.folded_copy().cpu()  # (LoRA folded, eval mode) the model LoRAFolding tests
    config = export_config(module, folded, mean, std, source)
    weights = FORMATS["safetensors"]  # always written: config.json and load_exported rest on it

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(staging, plain_dir_mode())  # mkdtemp makes 0700; the folder is shared like any other
    try:
        weights.write(folded, staging / weights.file, None)
        _write_json(staging / CONFIG_FILE, config)
        _fsync(staging / weights.file)
        if verify:
            weights.verify(folded, staging / weights.file, config["preprocess"]["img_size"])
        config["artifacts"] = {"safetensors": {"file": weights.file}}
        config["artifacts"].update(write_deployed(folded, staging, formats, config["preprocess"]["img_size"]))
        _write_json(staging / CONFIG_FILE, config)
        apply_umask(staging)  # safetensors writes 0600; the export is shared like every other file
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
    import timm

    from pyra_lightning.patch import attention_kernel, merge_rule, merge_schedule
    from pyra_lightning.training.elastic import export_record as elastic_record

    hp = module.hparams
    merging = hasattr(folded, "forward_tokens")  # patched by apply_merging
    create_kwargs: dict[str, Any] = {
        **dict(hp.model_kwargs or {}),
        "num_classes": int(folded.num_classes),
        "img_size": int(hp.img_size),
    }
    pyra = hp["merging"]["pyra"]
    matcher, merger = merge_rule(folded) if merging else (None, None)
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": hp.model_name,
        "create_kwargs": create_kwargs,
        "merge_r": merge_schedule(folded) if merging else None,
        "pyra": (resolve_variant(pyra) or False) if merging else False,
        "prop_attn": bool(hp["merging"]["prop_attn"]),
        "matcher": matcher,
        "merger": merger,
        "attention": attention_kernel(folded) if merging else None,
        "preprocess": {
            "img_size": int(hp.img_size),
            "resize": "bicubic, antialiased, straight to img_size x img_size (no crop)",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "input": "RGB scaled to [0, 1], then (x - mean) / std, shape (B, 3, img_size, img_size)",
        },
        "method": module.method,
        "elastic": elastic_record(getattr(module, "elastic_plan", None), folded),  # range + exported point
        "backbone_fingerprint": module.backbone_fingerprint,
        "source_checkpoint": source,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    try:
        json.dumps(config)
    except TypeError as error:
        raise ValueError(f"model_kwargs must be JSON-serializable to be exported: {error}") from error
    return config


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint of ``PyraClassifier`` on the CPU, tensors and primitives only."""
    from pyra_lightning.training.runs import load_checkpoint  # names a damaged file and the fix

    return load_checkpoint(path)


def load_trainable(module: PyraClassifier, checkpoint: dict[str, Any]) -> None:
    """Load a checkpoint's trainable tensors, after the module's backbone and key checks."""
    module.on_load_checkpoint(checkpoint)  # raises ValueError on another backbone or other keys
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as error:  # same names, other shapes: e.g. another lora_rank
        raise ValueError(
            "checkpoint tensors do not fit this model (was it made with another model.lora.rank / model.merging.merge_r?): "
            f"{error}"
        ) from error


def module_from_checkpoint(
    checkpoint: dict[str, Any], seed: int | None, merge_r: Any = None
) -> PyraClassifier:
    """The module a checkpoint's hyperparameters describe (its trainable weights not yet loaded).

    ``merge_r`` deploys an elastic checkpoint at another schedule of its trained range (the
    module refuses one outside it, naming the range); a checkpoint trained at one schedule
    refuses any ``merge_r``.
    """
    from lightning.pytorch import seed_everything

    from pyra_lightning.training.module import PyraClassifier
    from pyra_lightning.training.settings import refuse_flat

    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if "model_name" not in hparams:
        raise ValueError(
            "checkpoint has no PyraClassifier hyperparameters (no 'hyper_parameters.model_name'); "
            "it was not written by `pyra-lightning fit`. Export it with the fit's arguments instead: "
            "pyra-lightning export --config <fit config> --ckpt_path ... --out_dir ..."
        )
    refuse_flat(hparams, "this checkpoint")
    if merge_r is not None:
        merging = dict(hparams.get("merging") or {})
        if merging.get("elastic") is None:
            raise ValueError(
                f"merge_r={merge_r!r}: this checkpoint was trained at one schedule "
                f"({merging.get('merge_r')!r}, no model.merging.elastic) and deploys only there"
            )
        hparams["merging"] = {**merging, "merge_r": merge_r}
    if seed is not None:
        seed_everything(seed, verbose=False)
    return PyraClassifier(**hparams)


def random_backbone(checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint's frozen backbone was randomly initialised (seeded), not loaded."""
    hparams = checkpoint.get("hyper_parameters", {})
    return not hparams.get("pretrained") and not hparams.get("pretrained_file")


def recorded_seed(checkpoint: dict[str, Any]) -> int | None:
    """The fit's ``seed_everything`` if the checkpoint records one (in its run identity)."""
    from pyra_lightning.training.runs import checkpoint_identity

    settings = (checkpoint_identity(checkpoint) or {}).get("settings", {})
    for holder in (settings, checkpoint, checkpoint.get("hyper_parameters", {})):
        for key in ("seed_everything", "seed"):
            value = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _refuse_other_settings(cli: Any, checkpoint: dict[str, Any], ckpt_path: str) -> None:
    """Export only the model the checkpoint was trained as: any setting that changes what it predicts
    (schedule, PYRA variant, LoRA scale, proportional attention, ...) given differently is refused."""
    from pyra_lightning.training.runs import checkpoint_identity, refusal, run_settings, settings_differences

    identity = checkpoint_identity(checkpoint)
    if identity is None:
        recorded = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        differences = [
            f"model.{key}: {value!r} in {ckpt_path} vs {cli.model.hparams.get(key)!r} now"
            for key, value in recorded.items()
            if key in cli.model.hparams and cli.model.hparams.get(key) != value
        ]
    else:
        from pyra_lightning.training.elastic import accept_elastic_schedule

        # An elastic checkpoint deploys at any schedule of its range (the module refused others).
        now = accept_elastic_schedule(
            identity["settings"], run_settings(cli.trainer, cli.model, cli.datamodule)
        )
        differences = settings_differences(identity["settings"], now, ckpt_path, evaluation=True)
    if differences:
        raise refusal(
            f"export: {ckpt_path} was trained with other settings than these arguments",
            differences,
            "Export from the checkpoint alone (no other arguments), or pass the settings it was trained with.",
        )


def write_deployed(
    folded: nn.Module, folder: Path, formats: Sequence[str], img_size: int
) -> dict[str, dict[str, Any]]:
    """Write the deployed forms of ``folded`` (the rows of ``formats.FORMATS`` after safetensors) and
    check each against it.

    Exported at batch 2, checked at batch 3, so a batch size baked into the graph fails here.

    Raises:
        ValueError: if a form's logits differ from the folded model's by more than its tolerance
            (``DEPLOY_TOLERANCE``), or this machine cannot write it (no onnx extra, no C++ compiler).
    """
    rows = [fmt for name, fmt in FORMATS.items() if name in formats and name != "safetensors"]
    for fmt in rows:  # refuse before anything is exported
        missing = fmt.extra()
        if missing is not None:
            raise ValueError(f"--format {fmt.name} needs {missing}")
    if not rows:
        return {}
    example, _ = example_batches(img_size)
    traced = any(fmt.from_program for fmt in rows)
    program = deploy.export_program(folded, example) if traced else None  # one graph for every form
    written: dict[str, dict[str, Any]] = {}
    for fmt in rows:
        path = folder / fmt.file
        fmt.write(program if fmt.from_program else folded, path, example)
        diff = fmt.verify(folded, path, img_size)
        written[fmt.name] = {"file": path.name, "max_abs_diff": diff, "checked_batch_size": 3}
    return written


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


def _exported(checkpoint: str, out: Path) -> str:
    """What was written, by file: ``model.safetensors`` is always among them, whatever --format says."""
    return f"exported {checkpoint} to {out}: {', '.join(sorted(p.name for p in Path(out).iterdir()))}"


def _formats(value: str) -> list[str]:
    formats = [f.strip() for f in value.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected a comma-separated subset of {', '.join(FORMATS)}"
        )
    return formats


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning export``: rebuild the trained module from its checkpoint and export it.

    The checkpoint alone is enough: it holds the module's hyperparameters, the trainable weights,
    the backbone's fingerprint and the data normalisation. A backbone with random weights (tiny
    test models) is rebuilt from ``--seed`` (default: the seed the checkpoint records, else 0,
    the CLI's ``seed_everything`` default); the fingerprint refuses any other backbone.

    Given other arguments (``--config``, ``--model.*``, ``--data.*``, ``--seed_everything``), the
    module is instead built exactly as ``pyra-lightning fit`` parses them.
    """
    # argparse, unlike the other commands: every argument export does not know is fit's, parsed by
    # fit's own parser below, and jsonargparse refuses parse_known_args (a typo would pass unseen;
    # here fit's parser still rejects it).
    parser = argparse.ArgumentParser(
        prog="pyra-lightning export",
        allow_abbrev=False,
        description="Write the LoRA-folded model of a checkpoint as model.safetensors + config.json "
        "(and model.onnx / model.pt2 / model_aoti.pt2 with --format). The checkpoint alone is enough; "
        "other arguments (--config, --model.*, --data.*) are parsed as `pyra-lightning fit` parses them.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (e.g. last.ckpt).")
    parser.add_argument("--out_dir", required=True, help="Folder to write; must not exist.")
    parser.add_argument(
        "--format",
        type=_formats,
        default=["safetensors"],
        help="Comma-separated, some of: "
        + ", ".join(name + (" (always written)" if name == "safetensors" else "") for name in FORMATS)
        + ".",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="Seed of a random-weight backbone (the fit's seed_everything)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing out_dir.")
    parser.add_argument(
        "--merge_r",
        type=yaml.safe_load,
        default=None,
        help="An elastic checkpoint: the schedule to deploy at, inside its trained range: a per-layer "
        "list '[6,6,5,4,4,3]', low, high or a FLOPs fraction (benchmark --target_speedup --ckpt_path "
        "prints one). A checkpoint trained at one schedule refuses it.",
    )
    args, cli_args = parser.parse_known_args(argv)
    checkpoint = read_checkpoint(args.ckpt_path)  # fail on a bad path before building anything
    source = str(Path(args.ckpt_path).resolve())
    if not cli_args:
        seed = args.seed if args.seed is not None else recorded_seed(checkpoint)
        if seed is None and random_backbone(checkpoint):
            seed = 0
            print("export: the backbone has random weights and the checkpoint records no seed; using 0")
        try:
            out = export_model(
                args.ckpt_path,
                args.out_dir,
                seed=seed,
                overwrite=args.overwrite,
                source=source,
                formats=args.format,
                merge_r=args.merge_r,
            )
        except ValueError as error:
            if "different frozen backbone" in str(error) and random_backbone(checkpoint):
                raise ValueError(
                    f"{error}. This backbone has random weights: pass the fit's --seed"
                ) from error
            raise
        print(_exported(args.ckpt_path, out))
        return
    if args.merge_r is not None:
        raise ValueError(
            "--merge_r is for the checkpoint alone; with fit's arguments, set --model.merging.merge_r"
        )
    from pyra_lightning.training.cli import build_cli  # Lightning only here: load_exported must not need it

    # Exporting logs nothing and starts no W&B run.
    cli = build_cli([*cli_args, "--trainer.logger=false"], run=False)
    _refuse_other_settings(cli, checkpoint, args.ckpt_path)
    load_trainable(cli.model, checkpoint)
    out = export_model(
        cli.model,
        args.out_dir,
        mean=cli.datamodule.mean,
        std=cli.datamodule.std,
        overwrite=args.overwrite,
        source=source,
        formats=args.format,
    )
    print(_exported(args.ckpt_path, out))
