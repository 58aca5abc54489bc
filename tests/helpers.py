"""Shared helpers of the command-line tests: the shipped configs and quick quickstart arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
# A few training batches and a short timing: the command-line tests are about runs, not the model.
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
]


def resumable_fit(root: Path, data: Path, max_epochs: int, *extra: str) -> list[str]:
    """A short ``fit`` for the resume tests: 4 steps an epoch, no test after it, and LoRA dropout,
    randomness that a resume must reproduce; ``extra`` comes last, so it wins."""
    return [
        "fit",
        *quickstart_args(
            root,
            data,
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.max_epochs={max_epochs}",
            "--model.lora.dropout=0.1",
            "--test_after_fit=false",
            *extra,
        ),
    ]


def quickstart_args(root: Path | None, data: Path, *extra: str) -> list[str]:
    """Arguments of a quickstart command: ``root`` is the run folder (``None``: the default layout).

    The progress bar is off and the throughput measurement short; ``extra`` arguments come last,
    so they win.
    """
    args = [
        f"--config={QUICKSTART}",
        f"--data.root={data}",
        "--trainer.enable_progress_bar=false",
        "--throughput.runs=2",
        "--throughput.warmup=1",
    ]
    if root is not None:
        args.append(f"--run_dir={root}")
    return [*args, *extra]


# ------------------------------------------------ tiny timm ViTs with random weights
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)  # 64 patches + prefix


def tiny_vit(name: str = "vit_tiny_patch16_224", num_classes: int = 5, seed: int = 0, **kwargs) -> nn.Module:
    """A 4-block, 48-wide timm ViT on 32x32 images with random weights (and a random head)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **{**TINY, **kwargs})
    for head in (
        model.get_classifier() if isinstance(model.get_classifier(), tuple) else [model.get_classifier()]
    ):
        nn.init.normal_(head.weight, std=0.2)
    return model


def randomize_(module: nn.Module, std: float = 0.2, seed: int = 1) -> nn.Module:
    """Give every parameter that starts at zero (LoRA B, PYRA W_D, ...) a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_b" in name or ".pyra." in name:
                param.add_(torch.randn(param.shape, generator=generator) * std)
    return module


def tiny_module(**overrides: Any) -> Any:
    """A ``PyraClassifier`` on a 4-block, 48-wide ViT (32x32 images, 5 classes, LoRA rank 4, merging
    ``[8, 8, 4, 4]``), seeded; ``overrides`` replace any argument (see ``with_settings``)."""
    from pyra_lightning.training.module import PyraClassifier

    torch.manual_seed(0)
    kwargs: dict[str, Any] = dict(
        model_name="vit_tiny_patch16_224",
        num_classes=5,
        img_size=32,
        model_kwargs={"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3},
        drop_path_rate=0.0,
        lora={"rank": 4, "dropout": 0.0},
        merging={"merge_r": [8, 8, 4, 4]},
        optim={"warmup_epochs": 0},
    )
    return PyraClassifier(**with_settings(kwargs, overrides))


def exported_round_trip(out: Path, attention: str) -> tuple[Any, Any, torch.Tensor]:
    """A ``tiny_module`` trained with ``model.merging.attention: attention``, exported to ``out`` and
    reloaded: (module, served, x), after checking that the module's blocks, the export's recipe and
    the reloaded model all name ``attention`` and that the reloaded model gives the module's logits."""
    from pyra_lightning.commands.export import export_model, load_exported
    from pyra_lightning.patch import attention_kernel

    module = tiny_module(merging={"attention": attention}).eval()
    assert attention_kernel(module.model) == attention
    served = load_exported(export_model(module, out, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert served.config["attention"] == attention and attention_kernel(served.model) == attention
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(served.model(x), module.model(x))
    return module, served, x


def with_settings(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``PyraClassifier`` arguments: ``overrides`` replace ``defaults``, and a setting group's dict
    (``lora``, ``merging``, ``optim``, ``recipe``) updates the default group key by key, as a second
    config file does on the command line."""
    from pyra_lightning.training.settings import GROUPS

    merged = dict(defaults)
    for key, value in overrides.items():
        grouped = key in GROUPS and isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if grouped else value
    return merged
