"""The ``pyra-lightning`` command: LightningCLI for fit/validate/test/predict, plus tools.

``pyra-lightning fit --config configs/quickstart.yaml`` trains, then tests the LoRA-folded model
and writes ``results.json``. Other subcommands are separate tools with their own arguments:
``benchmark``, ``export``, ``sweep`` and ``report`` (``pyra-lightning <tool> --help``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pyra_lightning.callbacks import InferenceThroughput, LoRAFolding, ResultsJSON
from pyra_lightning.data.vtab import VTABDataModule
from pyra_lightning.module import PyraClassifier

# Tool subcommands -> "module:function" taking argv; imported only when used.
TOOLS: dict[str, str] = {
    "benchmark": "pyra_lightning.benchmark:main",
    "export": "pyra_lightning.export:main",
    "sweep": "pyra_lightning.sweep:main",
    "report": "pyra_lightning.report:main",
}


class PyraCLI(LightningCLI):
    """LightningCLI with the data -> model links, the evaluation callbacks and test-after-fit."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")
        parser.add_lightning_class_args(LoRAFolding, "lora_folding")
        parser.add_lightning_class_args(InferenceThroughput, "throughput")
        parser.add_lightning_class_args(ResultsJSON, "results")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the final-epoch model (LoRA folded) and write results.json.",
        )

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule)


def run_tool(name: str, argv: list[str]) -> None:
    module_name, function = TOOLS[name].split(":")
    entry: Callable[[list[str]], None] = getattr(importlib.import_module(module_name), function)
    entry(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pyra-lightning`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in TOOLS:
        run_tool(args[0], args[1:])
        return
    PyraCLI(
        PyraClassifier,
        VTABDataModule,
        args=argv,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "pyra-lightning: LoRA + token merging + PYRA on timm ViTs. "
            f"Also: {', '.join(TOOLS)} (pyra-lightning <tool> --help)."
        },
    )


if __name__ == "__main__":
    main()
