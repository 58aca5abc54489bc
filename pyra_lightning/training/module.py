"""The LightningModule: a frozen timm ViT adapted with LoRA, merged with ToMe/PYRA, plus a new head."""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from pyra_lightning.accounting import ParameterCount, count_parameters
from pyra_lightning.backbone import create_backbone, fingerprint
from pyra_lightning.lora import init_lora_
from pyra_lightning.modulation import method_name
from pyra_lightning.patch import apply_lora, apply_merging, fold_lora, mark_trainable, merge_schedule
from pyra_lightning.peft import parameter_group, peft_method
from pyra_lightning.training import elastic as elastic_merge
from pyra_lightning.training.elastic import ElasticPlan, elastic_curve
from pyra_lightning.training.settings import (
    LoRASettings,
    MergingSettings,
    OptimSettings,
    RecipeSettings,
    as_dict,
    coerce,
)


def schedule_epochs(trainer: pl.Trainer | None) -> int:
    """The cosine schedule's length in epochs: ``trainer.max_epochs`` (the paper's 100 without one).

    The recipe's schedule and warm-up count epochs, so a run needs a number of them. Lightning's
    step-bounded or endless training (``max_epochs`` -1, as ``max_steps`` or ``max_time`` without
    ``max_epochs`` gives) would have decayed over a length the run never had; it is refused. Here
    ``max_steps`` and ``max_time`` are the limits of one job, and the rerun continues the run.

    Raises:
        ValueError: ``trainer.max_epochs`` is not a positive number of epochs.
    """
    if trainer is None:  # configured outside a Trainer (the export, the tests)
        return 100
    if trainer.max_epochs is None or trainer.max_epochs <= 0:
        raise ValueError(
            f"trainer.max_epochs is {trainer.max_epochs}: the recipe's cosine schedule and warm-up are "
            "in epochs, so a run needs --trainer.max_epochs N (the paper: 100); --trainer.max_steps "
            "and --trainer.max_time limit one job, and rerunning the command continues the run"
        )
    return int(trainer.max_epochs)


class PyraClassifier(pl.LightningModule):
    """Adapt a frozen ViT to a task with LoRA and compress it with token merging + PYRA.

    The default recipe is the paper's: AdamW at lr 1e-3 with weight decay 1e-4 (none on norms
    and biases), 10 warm-up epochs then cosine to 1e-5, drop-path 0.1 and LoRA dropout 0.1.
    ``model.recipe`` retraces the reference implementation's ``train.py`` instead
    (``configs/recipe/reference.yaml``; the README tabulates the differences).

    Args:
        model_name: timm model, with pretrained tag (``vit_base_patch16_224.orig_in21k`` is the
            ImageNet-21k ViT-B/16 of the PEFT literature; ``.augreg_in21k`` is a different one).
        num_classes: Task classes; linked from the data module by the CLI.
        pretrained: Load timm hub weights (needs network or a warm cache).
        pretrained_file: Local weights instead (``.npz`` as the paper used, ``.pth``/``.bin``,
            ``.safetensors``).
        img_size: Input resolution; linked from the data module by the CLI.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``depth`` for tiny test models.
        drop_path_rate: Stochastic depth of the frozen backbone.
        lora: ``model.lora`` (``LoRASettings``): rank, alpha, dropout, method.
        merging: ``model.merging`` (``MergingSettings``): merge_r, pyra, prop_attn, matcher, merger, attention,
            elastic.
        optim: ``model.optim`` (``OptimSettings``): lr, pyra_lr, weight_decay, the warm-up and
            cosine schedule, label smoothing.
        recipe: ``model.recipe`` (``RecipeSettings``): where the paper's recipe and the
            reference's ``train.py`` differ (scheduler step, LoRA init, distilled training).
        compile_model: Compile the backbone's forward and backward with ``torch.compile``
            (``nn.Module.compile``, so checkpoints keep their keys) when a trainer sets the module
            up (training and validation; test and predict run the folded copy, eager): the merged
            model's many small operators become a few fused kernels, which is what a GPU step at
            moderate batch sizes needs (``benchmark --train --train_compile`` measures a close
            relative: one full graph at static shapes; here torch's defaults apply). The same
            function, so not part of a run's identity; bitwise equal to eager only without
            dropout and drop-path, whose masks inductor draws from its own random stream.
            Refused for elastic runs, whose every drawn schedule would be another graph.

    Each group is a dataclass of ``training.settings``, or a dict of its fields (a checkpoint's
    ``hyper_parameters`` hold dicts); ``hparams`` holds the dicts.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224.orig_in21k",
        num_classes: int = 100,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        img_size: int = 224,
        model_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        lora: LoRASettings = LoRASettings(),
        merging: MergingSettings = MergingSettings(),
        optim: OptimSettings = OptimSettings(),
        recipe: RecipeSettings = RecipeSettings(),
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        self.lora = coerce(LoRASettings, lora, "lora")
        self.merging = coerce(MergingSettings, merging, "merging")
        self.optim = coerce(OptimSettings, optim, "optim")
        self.recipe = coerce(RecipeSettings, recipe, "recipe")
        peft_method(self.lora.method)  # an unregistered name fails here, naming the registered ones
        # save_hyperparameters records these locals: plain dicts, so that hparams.yaml, the loggers,
        # checkpoints and the run identity hold plain data.
        lora, merging = as_dict(self.lora), as_dict(self.merging)
        optim, recipe = as_dict(self.optim), as_dict(self.recipe)
        self.save_hyperparameters()
        lora, merging, recipe = self.lora, self.merging, self.recipe  # the typed groups from here on
        self.model = create_backbone(
            model_name, num_classes, pretrained, pretrained_file, img_size, drop_path_rate, model_kwargs
        )
        for param in self.model.parameters():
            param.requires_grad_(False)
        if lora.rank:
            apply_lora(self.model, lora.rank, lora.alpha, lora.dropout, method=lora.method)
            init_lora_(self.model, recipe.lora_init)
        self.elastic_plan: ElasticPlan | None = None
        merge_r, pyra, prop_attn = merging.merge_r, merging.pyra, merging.prop_attn
        if compile_model and merging.elastic is not None:
            raise ValueError(
                "model.compile_model with model.merging.elastic: every schedule an elastic step draws "
                "is another graph to compile; train elastic runs without model.compile_model"
            )
        if merging.elastic is not None and merge_r is None:
            raise ValueError(
                "model.merging.elastic needs merging: set model.merging.merge_r (the nominal schedule) too"
            )
        rule = {"matcher": merging.matcher, "merger": merging.merger, "attention": merging.attention}
        if merging.elastic is not None:
            self.elastic_plan = elastic_merge.elastic_merging(
                self.model, merging.elastic, merge_r, pyra, prop_attn, **rule
            )
        elif merge_r is not None:
            apply_merging(self.model, merge_r, pyra=pyra, prop_attn=prop_attn, **rule)
        mark_trainable(self.model, head=True)
        # Saved like trainable tensors although it never trains (distilled_training="class_head").
        self._untrained_saved: set[str] = set()
        head_dist = getattr(self.model, "head_dist", None)
        if recipe.distilled_training == "class_head" and isinstance(head_dist, nn.Linear):
            self.model.set_distilled_training(True)  # timm: training forwards return (head, head_dist)
            head_dist.reset_parameters()
            head_dist.requires_grad_(False)
            self._untrained_saved = {f"head_dist.{name}" for name, _ in head_dist.named_parameters()}
        # Frozen weights are not checkpointed; this identifies them instead (see on_save_checkpoint).
        self.backbone_fingerprint = fingerprint(self.model, skip=self._untrained_saved)
        self.strict_loading = False
        self.inference_model: nn.Module | None = None  # a LoRA-folded copy, set for test/predict

        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_test_acc_best = MaxMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.curve: list[dict[str, Any]] | None = None  # elastic runs: results.json["curve"]
        self._curve_models: list[tuple[float | str, list[int], nn.Module, MulticlassAccuracy]] = []

    def configure_model(self) -> None:
        """Lightning's set-up hook: compile the backbone in place for ``compile_model`` (once).

        Copies of it (the LoRA-folded ``inference_model``, the throughput callback's and the
        export's) are deep copies, which ``nn.Module.compile`` leaves uncompiled: each is run by
        the engine its user chooses (``compile_for_inference``).
        """
        if self.hparams.get("compile_model") and self.model.__dict__.get("_compiled_call_impl") is None:
            self.model.compile()

    @property
    def method(self) -> str:
        """``peft`` (no merging), ``tome``, ``pyra`` or the PYRA ablation variant's name."""
        if self.merging.merge_r is None or not any(merge_schedule(self.model)):
            return "peft"
        name = method_name(True, self.merging.pyra)
        return f"{name}_elastic" if self.elastic_plan is not None else name

    def parameter_count(self) -> ParameterCount:
        return count_parameters(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.inference_model if self.inference_model is not None else self.model
        return model(x)

    def _train_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)  # (B, num_classes)
        if isinstance(logits, tuple):  # distilled_training="class_head": (head, head_dist) logits
            logits = logits[0]
        return F.cross_entropy(logits, labels, label_smoothing=self.optim.label_smoothing), logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.elastic_plan is None:
            loss, logits = self._train_loss(images, labels)
        else:  # the sandwich rule: the losses of all this step's schedules, one optimizer step
            seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
            loss, logits = torch.zeros((), device=images.device), None
            for schedule in self.elastic_plan.step_schedules(seed, self.global_step, batch_idx):
                with elastic_merge.scheduled(self.model, schedule):
                    part, part_logits = self._train_loss(images, labels)
                loss, logits = loss + part, part_logits if logits is None else logits
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        logits = self.model(images)
        if dataloader_idx == 0:
            self.val_acc(logits, labels)
            self.log("val/loss", F.cross_entropy(logits, labels), add_dataloader_idx=False, sync_dist=True)
            self.log("val/acc", self.val_acc, prog_bar=True, add_dataloader_idx=False)
        else:  # the test split, evaluated periodically (data.track_test; the paper's protocol)
            self.val_test_acc(logits, labels)
            self.log("val/test_acc", self.val_test_acc, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.val_test_acc.update_called:
            return
        self.val_test_acc_best(self.val_test_acc.compute())
        self.log("test/acc_best", self.val_test_acc_best.compute(), sync_dist=False)

    @property
    def test_acc_best(self) -> float | None:
        """The best test accuracy of the periodic evaluations (``data.track_test``), ``None`` without.

        ``results.json`` reads it here: ``trainer.test`` clears the logged ``test/acc_best``."""
        return float(self.val_test_acc_best.compute()) if self.val_test_acc_best.update_called else None

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        for _, _, model, accuracy in self._curve_models:
            accuracy(model(images), labels)
        self.log("test/acc", self.test_acc, prog_bar=True)
        self.log("test/loss", F.cross_entropy(logits, labels), sync_dist=True)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).argmax(dim=-1)

    def folded_copy(self, schedule: list[int] | None = None) -> nn.Module:
        """A deployable copy: LoRA folded into qkv, eval mode; training state is untouched.

        An elastic model's copy is cut to ``schedule`` (default: the nominal one), so it has the
        shapes a plain model at that schedule has (``training.elastic.deployable``).
        """
        model = fold_lora(copy.deepcopy(self.model)).eval()
        if self.elastic_plan is not None:
            elastic_merge.deployable(model, schedule)
        return model

    def on_test_start(self) -> None:
        """Elastic runs: one deployable model and accuracy per curve point (``test_step`` feeds them)."""
        self._curve_models, self.curve = [], None
        if self.elastic_plan is None:
            return
        for point in self.elastic_plan.curve_points():
            schedule = self.elastic_plan.schedule(point)
            self.elastic_plan.check(schedule, f"model.merging.elastic.curve point {point!r}")
            accuracy = MulticlassAccuracy(self.hparams.num_classes, average="micro").to(self.device)
            self._curve_models.append((point, schedule, self.folded_copy(schedule), accuracy))

    def on_test_epoch_end(self) -> None:
        if self._curve_models:
            self.curve = elastic_curve(self, self._curve_models)
            self._curve_models = []

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW in four groups: {main, PYRA} x {decayed matrices, undecayed norms and biases}."""
        hp = self.optim
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            owner = "pyra" if parameter_group(name, set()) == "pyra" else "main"
            decay = param.ndim > 1 and not name.endswith(".bias")
            groups.setdefault((owner, decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": hp.pyra_lr if owner == "pyra" and hp.pyra_lr is not None else hp.lr,
                "weight_decay": hp.weight_decay if decay else 0.0,
                "name": f"{owner}{'' if decay else '_no_decay'}",
            }
            for (owner, decay), params in sorted(groups.items())
        ]
        optimizer = torch.optim.AdamW(param_groups)
        try:
            trainer: pl.Trainer | None = self.trainer
        except RuntimeError:  # configured outside a Trainer (the export, the tests)
            trainer = None
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=schedule_epochs(trainer),
            lr_min=hp.min_lr,
            warmup_t=hp.warmup_epochs,
            warmup_lr_init=hp.warmup_lr,
            t_in_epochs=True,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any) -> None:
        # Called after each epoch; timm schedulers take the epoch explicitly. "paper": the next
        # epoch trains at its own rate. "reference": train.py's step(epoch), one epoch late.
        lag = 0 if self.recipe.scheduler_step == "reference" else 1
        scheduler.step(epoch=self.current_epoch + lag)

    def _saved_names(self) -> set[str]:
        """Checkpointed parameter names: what trains, plus an untrained ``head_dist``."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad} | self._untrained_saved
        return {f"model.{n}" for n in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what trains (LoRA, PYRA, head) plus the frozen backbone's fingerprint."""
        saved = self._saved_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in saved}
        checkpoint["backbone_fingerprint"] = self.backbone_fingerprint
        # torchmetrics keeps no state in state_dict: a resumed run's best must include the epochs before
        checkpoint["test_acc_best"] = self.test_acc_best
        # Dropout and drop-path draw from these; restoring them makes a resumed run exact.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_train_start(self) -> None:
        # Restored here, after the sanity check, so the RNG sequence continues where it stopped.
        state = getattr(self, "_resume_rng_state", None)
        if state is not None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            self._resume_rng_state = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another backbone, and any missing or unexpected trainable key."""
        theirs = checkpoint.get("backbone_fingerprint")
        if theirs is not None and theirs != self.backbone_fingerprint:
            raise ValueError(
                f"checkpoint was trained on a different frozen backbone (fingerprint {theirs}) than this "
                f"model ({self.hparams.model_name}, fingerprint {self.backbone_fingerprint}); "
                "check model_name / pretrained_file"
            )
        self._resume_rng_state = checkpoint.get("rng_state")
        if checkpoint.get("test_acc_best") is not None:
            self.val_test_acc_best.reset()
            self.val_test_acc_best.update(torch.tensor(float(checkpoint["test_acc_best"])))
        expected = self._saved_names()
        got = set(checkpoint.get("state_dict", {}))
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit this model's trainable parameters: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''} (was it made with another model.lora.rank / model.merging.merge_r / pyra?)"
            )
