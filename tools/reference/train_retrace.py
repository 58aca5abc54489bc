#!/usr/bin/env python
"""Retrace the reference implementation's training with ``configs/recipe/reference.yaml``.

Two phases, in two environments, because the reference needs timm 0.5.4 and we need timm 1.x:

1. ``reference``: with the authors' ``model/`` (github.com/THU-MIG/PYRA, commit 3587ee6) and timm
   0.5.4 on ``PYTHONPATH``, build a tiny reference model (ViT or distilled DeiT, LoRA + ToMe + PYRA),
   give its frozen weights random values, and train it for a few short epochs the way its
   ``train.py`` / ``engine.py`` do: its own ``create_optimizer`` (``--separate_lr_for_pyra
   --pyra_lr 1e-4`` as its scripts pass), timm 0.5.4's ``create_scheduler`` stepped with
   ``lr_scheduler.step(epoch)`` after each epoch, ``CrossEntropyLoss`` on the class head's output
   (DeiT: the first of the two outputs), ``drop_last=True`` batches, and a test evaluation after
   epochs ``e % val_interval == 0`` and the last, whose maximum it reports. Everything is float64
   with dropout and drop-path off. The initial state (float32 values, so float64 is exact on both
   sides), the data (uint8), the batch order, every step's loss, every epoch's lr, the test
   evaluations and the final trainable tensors go into one fixture file.
2. ``ours``: with this repository on ``PYTHONPATH``, build ``PyraClassifier`` with the ``model:``
   section of the recipe (plus the tiny architecture and the harness's hyperparameters), copy the
   reference's initial state in, train it with a Lightning ``Trainer`` (``precision="64-true"``) on
   the same batches (``drop_last`` from the recipe's ``data:`` section, ``ReferenceProtocol`` from
   its ``trainer:`` section), and report the per-step loss relative difference, the per-epoch lr,
   the test evaluations and the largest difference of any final trainable tensor.

    cd /tmp/pyra_ref && git clone https://github.com/THU-MIG/PYRA src && (cd src && git checkout 3587ee6)
    pip install --no-deps --target /tmp/pyra_ref/site timm==0.5.4
    PYTHONPATH=/tmp/pyra_ref/site:/tmp/pyra_ref/src python tools/reference/train_retrace.py reference \\
        --model deit --out tests/data/reference/retrace_deit.pt
    PYTHONPATH=$PWD python tools/reference/train_retrace.py ours --fixture tests/data/reference/retrace_deit.pt

``ours --recipe default`` runs our default recipe on the same start instead, to show how far it
departs. ``tests/test_recipe.py`` replays the stored fixtures with ``replay`` below.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "recipe" / "reference.yaml"

# The tiny task: 16 px images in 4 px patches (16 tokens + prefix), 3 blocks of width 24.
ARCH = dict(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2, mlp_ratio=2.0)
LORA_RANK = 4
MERGE_R = [2, 2, 1]
NUM_CLASSES = 5
NUM_TRAIN, NUM_TEST = 36, 20
BATCH_SIZE = 8  # 36 images -> 4 full batches, the last 4 images dropped
# Short epochs with a visible warm-up, a cosine and weight decay; larger rates than VTAB's so that
# six epochs move the weights far enough for any difference in the recipe to show.
HPARAMS = dict(lr=5e-3, weight_decay=1e-2, warmup_epochs=2, warmup_lr=1e-4, min_lr=1e-5)
EPOCHS = 6
VAL_INTERVAL = 2  # test evaluations after epochs 0, 2, 4 and 5
SEED = 0


def images_from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """The float64 inputs both sides train on, computed the same way from the stored bytes."""
    return (pixels.to(torch.float64) / 255.0 - 0.5) / 0.25  # (N, 3, 16, 16)


# ------------------------------------------------------------------------------------- reference
def run_reference(model_kind: str) -> dict[str, Any]:
    """Train the reference model as its train.py does; needs its ``model/`` and timm 0.5.4."""
    import timm
    from timm.scheduler import create_scheduler

    if not timm.__version__.startswith("0.5"):
        raise SystemExit(f"the reference phase needs timm 0.5.4 on PYTHONPATH, found {timm.__version__}")
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints every module it builds
        from model.optim_factory import create_optimizer
        from model.tome import apply_tome
        from model.vision_transformer_timm import VisionTransformer

    distilled = model_kind == "deit"
    torch.manual_seed(SEED)
    with contextlib.redirect_stdout(io.StringIO()):
        model = VisionTransformer(
            in_chans=3,
            num_classes=1000,  # the pretrained head's size; train.py then resets it
            qkv_bias=True,
            distilled=distilled,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            prompt_tuning_dim=0,
            LoRA_dim=LORA_RANK,
            adapter_dim=0,
            prefix_dim=0,
            drop_rate_LoRA=0.0,
            drop_rate_prompt=0.0,
            drop_rate_adapter=0.0,
            pyra_r=list(MERGE_R),
            **ARCH,
        )
        # "Pretrained" frozen weights: random values, so that no frozen term is trivially zero.
        generator = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    continue  # LoRA, PYRA and heads keep the reference's own init
                noise = torch.randn(param.shape, generator=generator)
                if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                    param.copy_(1.0 + 0.1 * noise)
                else:
                    param.copy_(noise * (0.05 if param.ndim == 1 else 0.15))
        model.reset_classifier(NUM_CLASSES)  # train.py, after loading a checkpoint of another head size
    apply_tome(model)
    model.r = list(MERGE_R)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}  # float32 values
    model = model.double()

    data = torch.Generator().manual_seed(SEED + 2)
    pixels = torch.randint(
        0, 256, (NUM_TRAIN + NUM_TEST, 3, ARCH["img_size"], ARCH["img_size"]), generator=data
    )
    pixels = pixels.to(torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (NUM_TRAIN + NUM_TEST,), generator=data)
    images = images_from_uint8(pixels)
    train_x, train_y, test_x, test_y = (
        images[:NUM_TRAIN],
        labels[:NUM_TRAIN],
        images[NUM_TRAIN:],
        labels[NUM_TRAIN:],
    )
    order = torch.stack(
        [
            torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(SEED * 100_003 + e))
            for e in range(EPOCHS)
        ]
    )

    args = argparse.Namespace(
        opt="adamw",
        lr=HPARAMS["lr"],
        weight_decay=HPARAMS["weight_decay"],
        momentum=0.9,
        opt_eps=1e-8,
        opt_betas=None,
        separate_lr_for_pyra=True,
        pyra_lr=1e-4,  # as the reference's scripts pass it; it reaches no parameter
        sched="cosine",
        epochs=EPOCHS,
        min_lr=HPARAMS["min_lr"],
        warmup_lr=HPARAMS["warmup_lr"],
        warmup_epochs=HPARAMS["warmup_epochs"],
        cooldown_epochs=10,
        decay_rate=0.1,
        lr_noise=None,
        seed=SEED,
    )
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    criterion = torch.nn.CrossEntropyLoss()

    losses, lrs, evaluations = [], [], {}
    for epoch in range(EPOCHS):
        model.train()
        lrs.append(optimizer.param_groups[0]["lr"])
        for step in range(NUM_TRAIN // BATCH_SIZE):  # drop_last=True
            index = order[epoch, step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            outputs = model(train_x[index])
            if distilled:
                outputs = outputs[0]  # engine.py: outputs, _ = model(samples)
            loss = criterion(outputs, train_y[index])
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        lr_scheduler.step(epoch)
        if epoch % VAL_INTERVAL == 0 or epoch == EPOCHS - 1:
            model.eval()
            with torch.no_grad():
                evaluations[epoch] = (model(test_x).argmax(-1) == test_y).double().mean().item()
    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {
        "model": model_kind,
        "reference_commit": "3587ee6",
        "timm": timm.__version__,
        "arch": ARCH,
        "hparams": HPARAMS,
        "initial": initial,
        "pixels": pixels,
        "labels": labels,
        "order": order,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "lrs": torch.tensor(lrs, dtype=torch.float64),
        "evaluations": evaluations,
        "reported": max(evaluations.values()),
        "final": final,
    }


# ------------------------------------------------------------------------------------------ ours
def replay(
    fixture: dict[str, Any], recipe: str = "reference", overrides: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train ``PyraClassifier`` on the fixture's start and batches; return what it measured.

    ``overrides`` change single recipe entries (``scheduler_step``, ``lora_init``,
    ``distilled_training``, ``drop_last``), to see what each difference alone does.
    """
    import lightning.pytorch as pl
    import yaml
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    from pyra_lightning.interop import reference_key_to_ours
    from pyra_lightning.training.callbacks import ReferenceProtocol
    from pyra_lightning.training.module import PyraClassifier

    config = yaml.safe_load(RECIPE.read_text())
    model_args = dict(config["model"]) if recipe == "reference" else {}
    recipe_args = dict(model_args.pop("recipe", {}))  # model.recipe of configs/recipe/reference.yaml
    drop_last = bool(config["data"]["drop_last"]) if recipe == "reference" else False
    for key, value in (overrides or {}).items():
        if key == "drop_last":
            drop_last = value.lower() == "true"
        else:
            recipe_args[key] = value
    # The fixture's hyperparameters are the optimiser's (lr, weight decay, warm-up, cosine floor).
    optim = {**model_args.pop("optim", {}), **fixture["hparams"]}
    lora = {**model_args.pop("lora", {}), "rank": LORA_RANK, "dropout": 0.0}
    model_args["drop_path_rate"] = 0.0
    name = "deit_tiny_distilled_patch16_224" if fixture["model"] == "deit" else "vit_tiny_patch16_224"
    arch = dict(fixture["arch"])
    module = PyraClassifier(
        model_name=name,
        num_classes=NUM_CLASSES,
        img_size=arch.pop("img_size"),
        model_kwargs=arch,
        **model_args,
        lora=lora,
        merging={"merge_r": list(MERGE_R), "pyra": True},
        optim=optim,
        recipe=recipe_args,
    )
    module.model.load_state_dict(
        {reference_key_to_ours(k): v for k, v in fixture["initial"].items()}, strict=True
    )

    images = images_from_uint8(fixture["pixels"])
    labels = fixture["labels"]
    order = fixture["order"]

    class FixtureOrder(Sampler[int]):
        """The reference run's batch order, epoch by epoch."""

        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:  # Lightning calls it before every epoch
            self.epoch = epoch

        def __len__(self) -> int:
            return NUM_TRAIN

        def __iter__(self) -> Iterator[int]:
            return iter(order[self.epoch].tolist())

    class FixtureData(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            dataset = TensorDataset(images[:NUM_TRAIN], labels[:NUM_TRAIN])
            return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=FixtureOrder(), drop_last=drop_last)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(images[NUM_TRAIN:], labels[NUM_TRAIN:]), batch_size=BATCH_SIZE)

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.lrs: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.losses.append(float(outputs["loss"]))

    record = Record()
    callbacks: list[pl.Callback] = [record]
    if recipe == "reference":
        (spec,) = config["trainer"]["callbacks"]
        assert spec["class_path"].endswith("ReferenceProtocol")
        callbacks.append(ReferenceProtocol(val_interval=VAL_INTERVAL))
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        precision="64-true",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=FixtureData())
    final = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    protocol = callbacks[-1] if recipe == "reference" else None
    return {
        "losses": torch.tensor(record.losses, dtype=torch.float64),
        "lrs": torch.tensor(record.lrs, dtype=torch.float64),
        "evaluations": dict(protocol.evaluations) if protocol else {},
        "reported": protocol.best if protocol else None,
        "final": final,
        "head_dist": getattr(module.model, "head_dist", None),
    }


def compare(fixture: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Per-step loss relative difference and final-tensor differences, ours vs the reference."""
    from pyra_lightning.interop import reference_key_to_ours

    ref_losses, our_losses = fixture["losses"], ours["losses"]
    steps = min(len(ref_losses), len(our_losses))
    rel = ((our_losses[:steps] - ref_losses[:steps]).abs() / ref_losses[:steps].abs()).tolist()
    first_off = next((i for i, value in enumerate(rel) if value > 1e-4), None)
    ref_final = {reference_key_to_ours(k): v for k, v in fixture["final"].items()}
    tensor_diff = {}
    for key, value in ref_final.items():
        if key in ours["final"]:
            tensor_diff[key] = (ours["final"][key] - value).abs().max().item()
        elif ours.get("head_dist") is not None and key.startswith("head_dist."):
            param = getattr(ours["head_dist"], key.split(".")[-1])
            tensor_diff[key] = (param.detach() - value).abs().max().item()
    missing = sorted(set(ref_final) - set(tensor_diff))
    return {
        "steps": [len(ref_losses), len(our_losses)],
        "loss_rel_diff_max": max(rel),
        "first_step_over_1e-4": first_off,
        "loss_rel_diff_at_first": rel[first_off] if first_off is not None else None,
        "final_tensor_max_abs_diff": max(tensor_diff.values()),
        "final_tensor_worst": max(tensor_diff, key=tensor_diff.get),
        "tensors_compared": len(tensor_diff),
        "tensors_missing": missing,
        "lrs_reference": fixture["lrs"].tolist(),
        "lrs_ours": ours["lrs"].tolist(),
        "evaluations_reference": fixture["evaluations"],
        "evaluations_ours": ours["evaluations"],
        "reported_reference": fixture["reported"],
        "reported_ours": ours["reported"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="phase", required=True)
    ref = sub.add_parser("reference", help="train the reference model and write the fixture")
    ref.add_argument("--model", choices=["vit", "deit"], default="deit")
    ref.add_argument("--out", type=Path, required=True)
    ours = sub.add_parser("ours", help="replay a fixture with PyraClassifier and compare")
    ours.add_argument("--fixture", type=Path, required=True)
    ours.add_argument("--recipe", choices=["reference", "default"], default="reference")
    ours.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. scheduler_step=paper")
    args = parser.parse_args()
    torch.set_num_threads(1)  # same reduction order, run to run
    if args.phase == "reference":
        fixture = run_reference(args.model)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(fixture, args.out)
        print(f"wrote {args.out}: {len(fixture['losses'])} steps, reported {fixture['reported']:.3f}")
    else:
        fixture = torch.load(args.fixture, weights_only=True)
        overrides = dict(item.split("=", 1) for item in args.set)
        result = compare(fixture, replay(fixture, args.recipe, overrides))
        print(
            json.dumps(
                result,
                indent=2,
                default=lambda v: v if not isinstance(v, float) or math.isfinite(v) else str(v),
            )
        )


if __name__ == "__main__":
    main()
