"""Every shipped YAML config parses and instantiates through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pyra_lightning.patch import merge_schedule
from pyra_lightning.training.cli import PyraCLI, build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def instantiate(configs: list[Path], *overrides: str) -> PyraCLI:
    args = [f"--config={c}" for c in configs] + ["--model.pretrained=false", *overrides]
    return build_cli(args, run=False)


def test_every_yaml_is_valid_and_covered() -> None:
    assert len(ALL_YAML) >= 12
    for path in ALL_YAML:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


@pytest.mark.parametrize("model", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_backbone_config_instantiates(model: Path) -> None:
    cli = instantiate(
        [CONFIGS / "trainer/paper.yaml", model, CONFIGS / "method/pyra_low.yaml", CONFIGS / "data/vtab.yaml"]
    )
    assert cli.model.hparams.model_name == yaml.safe_load(model.read_text())["model"]["model_name"]
    assert cli.model.model.num_classes == 100  # cifar, linked from the data module
    assert sum(merge_schedule(cli.model.model)) > 0
    assert cli.trainer.max_epochs == 100


@pytest.mark.parametrize("method", sorted((CONFIGS / "method").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_method_config_instantiates(method: Path) -> None:
    cli = instantiate(
        [CONFIGS / "model/vit_b16_in21k.yaml", method, CONFIGS / "data/vtab.yaml"],
        "--data.task=oxford_iiit_pet",
    )
    expected = {
        "peft": "peft",
        "pyra_low": "pyra",
        "pyra_high": "pyra",
        "tome_low": "tome",
        "tome_high": "tome",
    }
    assert cli.model.method == expected[method.stem]
    assert cli.model.model.num_classes == 37


def test_quickstart_config_instantiates() -> None:
    cli = instantiate([CONFIGS / "quickstart.yaml"])
    assert cli.datamodule.task == "demo" and cli.model.hparams.img_size == 32
    assert merge_schedule(cli.model.model) == [16, 12, 8, 6, 4, 2]


@pytest.mark.parametrize("model", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_reference_recipe_composes_with_each_backbone(model: Path) -> None:
    from pyra_lightning.lora import LoRAQKV
    from pyra_lightning.training.callbacks import ReferenceProtocol

    cli = instantiate(
        [
            CONFIGS / "trainer/paper.yaml",
            model,
            CONFIGS / "method/pyra_low.yaml",
            CONFIGS / "data/vtab.yaml",
            CONFIGS / "recipe/reference.yaml",
        ]
    )
    hp = cli.model.hparams
    assert (hp.scheduler_step, hp.lora_init, hp.distilled_training) == (
        "reference",
        "reference",
        "class_head",
    )
    assert hp.pyra_lr is None and cli.model.method == "pyra"
    assert all(torch.count_nonzero(m.lora_b) > 0 for m in cli.model.model.modules() if isinstance(m, LoRAQKV))
    head_dist = getattr(cli.model.model, "head_dist", None)
    assert head_dist is None or not head_dist.weight.requires_grad
    assert cli.datamodule.drop_last and cli.datamodule.batch_size == 32
    (protocol,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ReferenceProtocol)]
    assert protocol.val_interval == 10 and cli.trainer.max_epochs == 100


def test_reference_recipe_model_section_applies_from_python() -> None:
    from pyra_lightning.training.module import PyraClassifier

    recipe = yaml.safe_load((CONFIGS / "recipe/reference.yaml").read_text())
    module = PyraClassifier(
        model_name="vit_tiny_patch16_224",
        num_classes=3,
        img_size=16,
        model_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2},
        merge_r=None,
        **recipe["model"],
    )
    assert module.hparams.scheduler_step == "reference"
