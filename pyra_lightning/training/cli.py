"""The ``pyra-lightning`` command: LightningCLI for fit/validate/test/predict, plus tools.

``pyra-lightning fit --config configs/quickstart.yaml`` trains, then tests the LoRA-folded model
and writes ``results.json``. Other subcommands are separate tools with their own arguments:
``benchmark``, ``export``, ``sweep`` and ``report`` (``pyra-lightning <tool> --help``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from pyra_lightning.data.backbone_config import resolve_img_size
from pyra_lightning.data.vtab import VTABDataModule
from pyra_lightning.training.callbacks import InferenceThroughput, LoRAFolding, ResultsJSON
from pyra_lightning.training.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from pyra_lightning.training.module import PyraClassifier
from pyra_lightning.training.monitoring import (
    LoggerSaveConfigCallback,
    MergeVisualization,
    TrainingThroughput,
    finish_wandb,
    stable_wandb_id,
)


class PyraCLI(LightningCLI):
    """LightningCLI with the data -> model links, evaluation callbacks, safe checkpoints and resume.

    - Checkpoints go to ``checkpoint.dirpath``, by default ``<trainer.default_root_dir>/checkpoints``
      (a fixed place, whatever the logger's versioning), ``last.ckpt`` is written every epoch and
      every write is atomic (``AtomicCheckpointIO``).
    - ``fit`` resumes by itself from the newest ``last.ckpt`` / SLURM ``hpc_ckpt_N.ckpt`` unless
      ``--ckpt_path`` is given or ``--auto_resume false``; a preempted or requeued job just reruns.
    - After ``fit`` the final-epoch model is tested (LoRA folded) and ``results.json`` written.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # Data follows the backbone: unset img_size/normalization come from its timm pretrained_cfg.
        parser.link_arguments("model.model_name", "data.backbone")
        parser.link_arguments(
            ("data.img_size", "model.model_name"), "model.img_size", compute_fn=resolve_img_size
        )
        parser.add_lightning_class_args(LoRAFolding, "lora_folding")
        parser.add_lightning_class_args(InferenceThroughput, "throughput")
        parser.add_lightning_class_args(ResultsJSON, "results")
        parser.add_lightning_class_args(TrainingThroughput, "train_throughput")
        parser.add_lightning_class_args(MergeVisualization, "merge_vis")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="fit: continue from the newest last.ckpt / hpc_ckpt_N.ckpt when no ckpt_path is given.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the final-epoch model (LoRA folded) and write results.json.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        root = config.trainer.get("default_root_dir") or os.getcwd()
        if config.get("checkpoint") is not None and not config.checkpoint.get("dirpath"):
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        logger = config.trainer.get("logger")
        is_wandb = isinstance(logger, Namespace) and str(logger.get("class_path")).endswith("WandbLogger")
        if is_wandb and not logger.init_args.get("id"):
            # One W&B run per run directory: an auto-resumed rerun continues the same run.
            logger.init_args.id = stable_wandb_id(root)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is None and config.get("auto_resume", True):
            checkpoint_dir = self._get(self.config_init, "checkpoint").dirpath
            found = find_resume_checkpoint(checkpoint_dir, self.trainer.default_root_dir)
            if found is not None:
                rank_zero_info(f"auto_resume: continuing from {found}")
                config["ckpt_path"] = str(found)

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)


def build_cli(args: list[str] | None = None, run: bool = True) -> PyraCLI:
    """The CLI exactly as ``pyra-lightning`` builds it; ``run=False`` only parses and instantiates."""
    return PyraCLI(
        PyraClassifier,
        VTABDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "pyra-lightning",
            "description": "pyra-lightning: LoRA + token merging + PYRA on timm ViTs "
            "(`pyra-lightning --help` lists the other commands).",
        },
    )


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning fit|validate|test|predict ...`` (argv starts with the subcommand)."""
    cli = build_cli(argv)
    finish_wandb(cli.trainer)  # Lightning leaves the W&B run open; a later run would reuse it


if __name__ == "__main__":
    main(sys.argv[1:])
