"""Every shipped YAML config parses and instantiates through the CLI."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pyra_lightning.patch import merge_schedule
from pyra_lightning.training.cli import PyraCLI, build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def instantiate(configs: list[Path], *overrides: str) -> PyraCLI:
    # A fresh root per CLI: its run folder (<root>/<task>/<method>) is locked while the CLI lives,
    # and the two pytest workers may build CLIs of the same task at once.
    root = tempfile.mkdtemp(prefix="pyra-configs-")
    args = [f"--config={c}" for c in configs]
    args += ["--model.pretrained=false", f"--trainer.default_root_dir={root}", *overrides]
    return build_cli(args, run=False)


QUICKSTART = CONFIGS / "quickstart.yaml"
MODEL_PIECES = sorted((CONFIGS / "model").glob("*.yaml"))  # test_each_backbone_config_instantiates
# Every other YAML composes with the quickstart (test_each_piece_composes_with_the_quickstart).
OTHER_PIECES = [p for p in ALL_YAML if p not in MODEL_PIECES and p != QUICKSTART]


def test_every_yaml_is_valid_and_covered() -> None:
    assert len(ALL_YAML) >= 12
    for path in ALL_YAML:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    covered = {QUICKSTART, *MODEL_PIECES, *OTHER_PIECES}
    assert covered == set(ALL_YAML), f"not instantiated by any test: {sorted(set(ALL_YAML) - covered)}"


@pytest.mark.parametrize("piece", OTHER_PIECES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_piece_composes_with_the_quickstart(piece: Path, tmp_path: Path) -> None:
    """A config piece a user adds to the quickstart parses and instantiates the model and data."""
    document = yaml.safe_load(piece.read_text())
    # A piece naming its own data folder (your images) gets an existing one here.
    data = document.get("data") or {}
    root = [f"--data.root={tmp_path}"] if "root" in data else []
    if "task" in data and "root" in data:  # a small folder in that layout: two classes
        from PIL import Image

        for split in ("train", "val", "test"):
            for name in ("cat", "dog"):
                folder = tmp_path / str(data["task"]) / split / name
                folder.mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(folder / "0.png")
    cli = instantiate([QUICKSTART, piece], *root)
    assert cli.model.model is not None and cli.datamodule is not None and cli.trainer is not None
    flat = {}
    for key, value in (document.get("model") or {}).items():
        grouped = isinstance(value, dict) and isinstance(cli.model.hparams.get(key), dict)
        flat.update({(key, f): v for f, v in value.items()} if grouped else {(key,): value})
    for path, value in flat.items():
        if isinstance(value, int | float | str | bool):
            found = cli.model.hparams[path[0]] if len(path) == 1 else cli.model.hparams[path[0]][path[1]]
            assert found == value, f"{piece.name}: model.{'.'.join(path)}"


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
        "pyra_elastic": "pyra_elastic",
        "tome_low": "tome",
        "tome_high": "tome",
    }
    assert cli.model.method == expected[method.stem]
    assert cli.model.model.num_classes == 37


def test_quickstart_config_instantiates() -> None:
    cli = instantiate([CONFIGS / "quickstart.yaml"])
    assert cli.datamodule.task == "demo" and cli.model.hparams.img_size == 32
    assert merge_schedule(cli.model.model) == [16, 12, 8, 6, 4, 2]


# The recipe reproduces the paper: its backbones, plus EVA-02 for LoRA on separate q/k/v projections.
@pytest.mark.parametrize(
    "piece", ["vit_b16_in21k", "vit_l16_in21k", "deit_b_distilled", "vit_l16_mae", "eva02_b14"]
)
def test_reference_recipe_composes_with_each_backbone(piece: str) -> None:
    model = CONFIGS / f"model/{piece}.yaml"
    from pyra_lightning.lora import LoRALinear
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
    hp = cli.model.recipe
    assert (hp.scheduler_step, hp.lora_init, hp.distilled_training) == (
        "reference",
        "reference",
        "class_head",
    )
    assert cli.model.optim.pyra_lr is None and cli.model.method == "pyra"
    assert all(
        torch.count_nonzero(m.lora_b) > 0 for m in cli.model.model.modules() if isinstance(m, LoRALinear)
    )
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
        **recipe["model"],
        merging={"merge_r": None},
    )
    assert (
        module.recipe.scheduler_step == "reference" and module.hparams["recipe"]["lora_init"] == "reference"
    )


PAPER_PIECES = ("vit_b16_in21k", "vit_l16_in21k", "deit_b_distilled", "vit_l16_mae")
# Today's backbones: each names a timm hub tag; input size and normalization follow the backbone.
BACKBONE_PIECES = {
    "dinov2_b14_reg4": ("vit_base_patch14_reg4_dinov2.lvd142m", 224, "imagenet", 5),
    "dinov3_b16": ("vit_base_patch16_dinov3.lvd1689m", 224, "imagenet", 5),
    "eva02_b14": ("eva02_base_patch14_224.mim_in22k", 224, "openai_clip", 1),
    "siglip2_b16": ("vit_base_patch16_siglip_224.v2_webli", 224, "inception", 0),
    "pe_core_b16": ("vit_pe_core_base_patch16_224.fb", 224, "inception", 1),
    "clip_b16": ("vit_base_patch16_clip_224.openai", 224, "openai_clip", 1),
}


@pytest.mark.parametrize("piece", PAPER_PIECES)
def test_paper_pieces_stay_pinned_to_imagenet_statistics(piece: str) -> None:
    # timm's orig_in21k tag declares 0.5/0.5; the reference trained with ImageNet mean/std.
    one_block = '--model.model_kwargs={"depth": 1}'  # only the data side matters here; keep it fast
    cli = instantiate(
        [CONFIGS / f"model/{piece}.yaml", CONFIGS / "data/vtab.yaml"],
        "--model.merging.merge_r=null",
        one_block,
    )
    assert cli.datamodule.normalization == "imagenet"
    assert cli.datamodule.mean == tuple(IMAGENET_DEFAULT_MEAN) and cli.datamodule.std == tuple(
        IMAGENET_DEFAULT_STD
    )
    assert cli.datamodule.img_size == cli.model.hparams.img_size == 224


@pytest.mark.parametrize("piece", sorted(BACKBONE_PIECES))
def test_backbone_pieces_name_a_hub_tag_and_data_follows_the_backbone(piece: str) -> None:
    model_name, img_size, normalization, num_prefix = BACKBONE_PIECES[piece]
    config = yaml.safe_load((CONFIGS / f"model/{piece}.yaml").read_text())
    assert config["model"]["model_name"] == model_name and config["model"]["pretrained"] is True
    assert "pretrained_file" in (CONFIGS / f"model/{piece}.yaml").read_text()  # the local-file option
    cli = instantiate(
        [CONFIGS / f"model/{piece}.yaml", CONFIGS / "data/vtab.yaml"], "--model.merging.merge_r=high"
    )
    assert cli.datamodule.normalization == normalization == cli.datamodule.hparams.normalization
    assert cli.datamodule.img_size == cli.model.hparams.img_size == img_size
    assert cli.model.model.patch_embed.img_size == (img_size, img_size)
    assert cli.model.model.num_prefix_tokens == num_prefix
    assert sum(merge_schedule(cli.model.model)) > 0
