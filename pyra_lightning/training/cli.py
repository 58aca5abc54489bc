"""The ``pyra-lightning`` command: LightningCLI for fit/validate/test/predict, plus tools.

``pyra-lightning fit --config configs/quickstart.yaml`` trains, then tests the LoRA-folded model
and writes ``results.json``. Other subcommands are separate tools with their own arguments:
``benchmark``, ``export``, ``sweep`` and ``report`` (``pyra-lightning <tool> --help``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from pyra_lightning.data.backbone_config import resolve_img_size
from pyra_lightning.data.vtab import VTABDataModule
from pyra_lightning.results import RESULTS_FILENAME, read_result
from pyra_lightning.training.callbacks import (
    InferenceThroughput,
    LoRAFolding,
    ResultsJSON,
)
from pyra_lightning.training.checkpointing import (
    AtomicCheckpointIO,
    RunCheckpoint,
    RunStatus,
    find_resume_checkpoint,
    named_checkpoint,
)
from pyra_lightning.training.cli_help import BriefHelp
from pyra_lightning.training.cli_notices import quiet_lightning_notices
from pyra_lightning.training.lock import hold, launch_rank, release_all
from pyra_lightning.training.module import PyraClassifier, schedule_epochs
from pyra_lightning.training.monitoring import (
    WANDB_ID_FILE,
    LoggerSaveConfigCallback,
    MergeVisualization,
    TrainingThroughput,
    finish_wandb,
    run_loggers,
)
from pyra_lightning.training.predict import PREDICTIONS_FILENAME, ImageFiles, PredictionsCSV, find_images
from pyra_lightning.training.run_folder import debug_run_dir, fit_completed, holds_run, job_limit_stop
from pyra_lightning.training.runs import (
    KERNEL_CHOICES,
    RUNS_ROOT,
    START_FRESH,
    ResumedMetrics,
    RunIdentity,
    checkpoint_identity,
    conflicting_hparams,
    default_run_dir,
    explicit_keys,
    fingerprint,
    load_checkpoint,
    read_run_record,
    refusal,
    run_settings,
    settings_differences,
    suggest_run_dir,
    write_run_record,
)
from pyra_lightning.training.settings import refuse_flat

EVALUATIONS = ("validate", "test", "predict")


class PyraCLI(BriefHelp, LightningCLI):
    """LightningCLI with the data -> model links, evaluation callbacks, run folders and checked resume.

    - One run, one folder: ``--run_dir`` if given, else ``<root>/<task>/<method>`` where the root is
      ``--trainer.default_root_dir`` (as in Lightning) or ``runs``.
      Checkpoints (``checkpoints/last.ckpt``, every epoch, atomic), logs, ``config.yaml``,
      ``run.json``, ``results.json``, ``predictions.csv`` and W&B files all go there; ``test``,
      ``validate`` and ``predict`` log into ``<run>/<command>/``.
    - ``fit`` resumes by itself from the newest ``last.ckpt`` / SLURM ``hpc_ckpt_N.ckpt`` of its
      folder, only if the checkpoint's settings match (``training.runs``); a folder holding another
      run, or a checkpoint of other settings, is refused with the differing settings listed.
      A finished run is not trained or tested again.
    - ``--ckpt_path`` with command-line settings that contradict the checkpoint is refused.
    - ``test``/``validate``/``predict`` use the run's ``last.ckpt`` without ``--ckpt_path`` and
      refuse to run without a checkpoint.
    - After ``fit`` the final-epoch model is tested (LoRA folded) and ``results.json`` written.
    - ``--trainer.fast_dev_run`` writes to a scratch folder instead (``training.run_folder``).
    """

    run_dir: Path
    run_dir_given: bool = False
    finished_results: Path | None = None
    kernel_choices: dict[str, Any] = {}  # explicit runs.KERNEL_CHOICES given with --ckpt_path

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then settle the run folder and ``--ckpt_path`` before LightningCLI reads the checkpoint.

        LightningCLI (2.6) loads a checkpoint's hyperparameters over the parsed config right after
        this method. Two things must happen first, and this is the last public hook before it:
        ``--ckpt_path last``/``hpc`` become the run's own file, and a setting the user set
        explicitly (command line or config file) that the checkpoint contradicts is refused,
        since it would otherwise be replaced silently.
        """
        self.raw_args = (
            [] if isinstance(args, dict | Namespace) else list(sys.argv[1:] if args is None else args)
        )
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        for option in ("images", "out"):
            if config.get(option) and subcommand != "predict":
                raise ValueError(f"--{option} is an option of `predict`, not of `{subcommand}`")
        self.run_dir_given = bool(config.get("run_dir"))
        self.run_dir = self._run_dir(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "hpc"):
            found = named_checkpoint(ckpt_path, self._checkpoint_dir(config), self.run_dir, subcommand)
            config.ckpt_path = ckpt_path = str(found)
        if ckpt_path:
            hparams = load_checkpoint(ckpt_path).get("hyper_parameters") or {}
            refuse_flat(hparams, f"--ckpt_path {ckpt_path}")
            keys = explicit_keys(self.raw_args, "model", subcommand)
            # Kernels may differ from the checkpoint's; LightningCLI's merge would replace them.
            self.kernel_choices = {k: config.model.get(k) for k in keys if f"model.{k}" in KERNEL_CHOICES}
            conflicts = conflicting_hparams(hparams, config.model, keys, ckpt_path)
            if conflicts:
                raise refusal(
                    f"--ckpt_path {ckpt_path} was trained with other model settings than this command sets",
                    conflicts,
                    "Leave these arguments out to use the checkpoint as it was trained, or train a new "
                    "run without --ckpt_path.",
                )

    @staticmethod
    def _run_dir(config: Namespace) -> Path:
        """``--run_dir`` if given, else ``<default_root_dir or runs>/<task>/<method>``."""
        if config.get("run_dir"):
            return Path(config.run_dir)
        root = config.trainer.get("default_root_dir") or RUNS_ROOT
        merging = config.model.merging
        return default_run_dir(config.data.task, merging.merge_r, merging.pyra, root, merging.elastic)

    def _checkpoint_dir(self, config: Namespace) -> Path:
        given = config.checkpoint.get("dirpath") if config.get("checkpoint") is not None else None
        return Path(given) if given else self.run_dir / "checkpoints"

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
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="The run's folder, exactly. Default: <trainer.default_root_dir or runs>/<task>/<method>, "
            "e.g. runs/demo/pyra.",
        )
        parser.add_argument(
            "--images",
            type=str | None,
            default=None,
            help="predict: classify these images instead of the task's test split: a folder, a glob "
            "('photos/*.jpg') or a text file of image paths. The CSV goes beside them, or to --out.",
        )
        parser.add_argument(
            "--out",
            type=str | None,
            default=None,
            help="predict: where to write the CSV (default: the run folder's predictions.csv, or "
            "beside the --images).",
        )
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="fit: continue the run in its folder from the newest last.ckpt / hpc_ckpt_N.ckpt "
            "(only if its settings match); false refuses a folder that holds a run.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the final-epoch model (LoRA folded) and write results.json.",
        )

    # ------------------------------------------------------------------------- the run folder
    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        for key, value in self.kernel_choices.items():  # as given, over the checkpoint's
            config.model[key] = value
        self.run_dir = self._run_dir(config)
        # The saved config.yaml names the folder exactly: `--config <run>/config.yaml` comes back here.
        config.run_dir = config.trainer.default_root_dir = str(self.run_dir)
        if config.get("checkpoint") is not None:
            config.checkpoint.dirpath = str(self._checkpoint_dir(config))
        # before the lock, which would leave an empty run folder behind a refusal
        if self.subcommand in EVALUATIONS and not config.get("ckpt_path"):
            found = find_resume_checkpoint(config.checkpoint.dirpath, self.run_dir)
            if found is None:
                raise ValueError(
                    f"no checkpoint in {self.run_dir} (looked for "
                    f"{Path(config.checkpoint.dirpath) / 'last.ckpt'}); train the run first with `fit` and "
                    "the same arguments, or pass --ckpt_path FILE. Untrained weights are never evaluated."
                )
            rank_zero_info(f"{self.subcommand}: using {found}")
            config.ckpt_path = str(found)
        self.run_dir = debug_run_dir(config, self.run_dir, launch_rank())  # fast_dev_run: a scratch folder
        if launch_rank() == 0:  # DDP's other ranks run inside this command
            hold(self.run_dir)
        fresh = self.subcommand == "fit" and not holds_run(self.run_dir, config.checkpoint.dirpath)
        if fresh and launch_rank() == 0:
            # A new run is a new W&B run, and a start that failed before its first checkpoint left
            # nothing worth continuing: its metrics must not open the new run's metrics.csv.
            for stale in (WANDB_ID_FILE, "metrics.csv", "hparams.yaml"):
                (self.run_dir / stale).unlink(missing_ok=True)
        config.trainer.logger = run_loggers(
            config.trainer.get("logger"), self.run_dir, self.subcommand or "fit"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = (
            self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        )
        if not (config.get("trainer") or {}).get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend([RunIdentity(), PredictionsCSV()])
        if self.subcommand == "fit":
            checkpoint_dir = next(
                (cb.dirpath for cb in trainer.callbacks if isinstance(cb, RunCheckpoint) and cb.dirpath),
                self.run_dir / "checkpoints",
            )
            trainer.callbacks.append(RunStatus(self._mark_run, Path(checkpoint_dir), self.run_dir))
            trainer.callbacks.append(ResumedMetrics())
        for callback in trainer.callbacks:
            if isinstance(callback, ResultsJSON | PredictionsCSV):
                callback.dirpath = self.run_dir
        return trainer

    # ------------------------------------------------------------------------------ identity
    def _settings(self) -> dict[str, Any]:
        return run_settings(self.trainer, self.model, self.datamodule)

    def _check_checkpoint(
        self, path: str | Path, settings: dict[str, Any], what: str, fix: str, evaluation: bool, strict: bool
    ) -> dict[str, Any]:
        """The checkpoint's identity if its settings match ``settings``; otherwise a refusal."""
        identity = checkpoint_identity(load_checkpoint(path))
        if identity is None:
            message = f"{path} records no run settings (written before pyra-lightning checked them)"
            if strict:
                raise ValueError(f"{message}, so resuming it could silently continue another run. {fix}")
            rank_zero_warn(f"{message}: they cannot be checked against this command")
            return {"settings": settings, "fingerprint": fingerprint(settings)}
        differences = settings_differences(identity["settings"], settings, path, evaluation)
        if differences:
            raise refusal(what, differences, fix)
        return identity

    def _mark_run(self, trainer: Trainer, module: Any, status: str, error: str | None = None) -> None:
        """Write ``run.json`` with ``status`` (``RunStatus`` calls this when a fit ends early)."""
        if launch_rank() != 0:
            return
        try:
            write_run_record(self.run_dir, run_settings(trainer, module, trainer.datamodule), status, error)
        except Exception as problem:  # never hide the error that ended the fit behind this one
            rank_zero_warn(f"could not mark {self.run_dir / 'run.json'} {status}: {problem}")

    def _results_callback(self) -> ResultsJSON | None:
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, ResultsJSON)), None)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        schedule_epochs(self.trainer)  # refuses a run without a number of epochs, before training
        settings = self._settings()
        fresh_fix = START_FRESH.format(run_dir=self.run_dir)
        record = read_run_record(self.run_dir)
        if record is not None and not holds_run(self.run_dir, config.checkpoint.dirpath):
            rank_zero_info(
                f"{self.run_dir}: the previous start ({record.get('status')}) left no checkpoint; "
                "this run takes the folder"
            )
            record = None
        if record is not None:
            differences = settings_differences(record["settings"], settings, self.run_dir / "run.json")
            if differences:
                fix = fresh_fix
                if not self.run_dir_given:  # the default folder: propose one named by the change
                    other = suggest_run_dir(self.run_dir, record["settings"], settings)
                    fix = (
                        f"To keep both runs, rerun this command with --run_dir {other}; or delete "
                        f"{self.run_dir} to replace the old run."
                    )
                raise refusal(f"{self.run_dir} holds another run", differences, fix)
            if not config.get("auto_resume", True) and not config.get("ckpt_path"):
                raise ValueError(
                    f"--auto_resume false, but {self.run_dir} holds this run already. {fresh_fix}"
                )
            self.finished_results = self._finished(record, settings)
            if self.finished_results is not None:
                return
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            self._check_checkpoint(
                ckpt_path,
                settings,
                f"--ckpt_path {ckpt_path} was trained with other settings than this command",
                "Pass the settings it was trained with (its run folder's config.yaml), or train without "
                "--ckpt_path.",
                evaluation=False,
                strict=False,
            )
        elif config.get("auto_resume", True):
            found = find_resume_checkpoint(config.checkpoint.dirpath, self.run_dir)
            if found is not None:
                what = f"auto_resume: {found} belongs to another run than this command"
                self._check_checkpoint(found, settings, what, fresh_fix, evaluation=False, strict=True)
                rank_zero_info(f"auto_resume: continuing from {found}")
                config["ckpt_path"] = str(found)
        if launch_rank() == 0:
            write_run_record(self.run_dir, settings, "running")

    def _finished(self, record: dict[str, Any], settings: dict[str, Any]) -> Path | None:
        """The run's ``results.json`` if the run finished and its result is of these settings."""
        path = self.run_dir / RESULTS_FILENAME
        if record.get("status") != "finished" or not path.is_file():
            return None
        try:
            result = read_result(path)
        except ValueError:
            return None
        return path if result.get("fingerprint") == fingerprint(settings) else None

    def fit(self, **kwargs: Any) -> None:
        if self.finished_results is not None:
            print(
                f"fit: {self.run_dir} holds a finished run of these settings; its results: "
                f"{self.finished_results}. Nothing to do (`test` evaluates it again; to train again, "
                "delete the folder or choose another --run_dir)."
            )
            return
        self.trainer.fit(**kwargs)

    def after_fit(self) -> None:
        if self.finished_results is not None or self.trainer.interrupted:
            return
        settings = self._settings()
        if not fit_completed(self.trainer):  # max_steps / max_time: a partial run is not a result
            config = self.config_init[self.subcommand]
            rank_zero_info(job_limit_stop(self.trainer, config.checkpoint.dirpath, self.run_dir))
            return
        if self.config.get(self.subcommand, {}).get("test_after_fit", True):
            results = self._results_callback()
            if results is not None:
                last = getattr(self.trainer.checkpoint_callback, "last_model_path", None)
                results.identity = {"settings": settings, "fingerprint": fingerprint(settings)}
                results.checkpoint = last or None
            self.trainer.test(self.model, datamodule=self.datamodule)
        if launch_rank() == 0:
            write_run_record(self.run_dir, settings, "finished")

    def _before_evaluation(self) -> None:
        ckpt_path = self.config_init[self.subcommand]["ckpt_path"]
        identity = self._check_checkpoint(
            ckpt_path,
            self._settings(),
            f"{self.subcommand}: {ckpt_path} was trained with other settings than this command",
            "Pass the settings the run was trained with (e.g. --config <its run folder>/config.yaml), "
            "or another --ckpt_path.",
            evaluation=True,
            strict=False,
        )
        record = read_run_record(self.run_dir)
        if (
            identity is not None
            and record is not None
            and record.get("fingerprint") != identity["fingerprint"]
        ):
            raise ValueError(
                f"{self.subcommand}: {ckpt_path} is not the run in {self.run_dir} (its run.json records other "
                "settings), and evaluating it there would overwrite that run's results. Pass "
                "--run_dir <the checkpoint's own run folder>."
            )
        results = self._results_callback()
        if results is not None:
            results.identity, results.checkpoint = identity, str(ckpt_path)

    def before_validate(self) -> None:
        self._before_evaluation()

    def before_test(self) -> None:
        self._before_evaluation()

    def before_predict(self) -> None:
        self._before_evaluation()

    def predict(self, **kwargs: Any) -> None:
        """Predict the test split, or ``--images``, and write one CSV (``training.predict``)."""
        config = self.config_init[self.subcommand]
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, PredictionsCSV))
        own = (self.run_dir / PREDICTIONS_FILENAME).resolve()
        out = Path(config["out"]) if config.get("out") else None
        if config.get("images"):
            paths, home = find_images(config["images"])
            out = out or home / PREDICTIONS_FILENAME
            if out.resolve() == own:
                raise ValueError(
                    f"predict --images would write {out}, the run's own predictions of its test split; "
                    "give --out FILE"
                )
            datamodule = kwargs.pop("datamodule")
            dataset = ImageFiles(paths, datamodule.img_size, datamodule.mean, datamodule.std)
            kwargs["dataloaders"] = DataLoader(
                dataset, batch_size=datamodule.eval_batch_size, num_workers=datamodule.num_workers
            )
            writer.class_names = datamodule.class_names
            rank_zero_info(f"predict: {len(paths)} images from {config['images']}")
        writer.out = out
        self.trainer.predict(**kwargs)


def build_cli(args: list[str] | None = None, run: bool = True, cli: type[PyraCLI] = PyraCLI) -> PyraCLI:
    """The CLI exactly as ``pyra-lightning`` builds it; ``run=False`` only parses and instantiates."""
    with warnings.catch_warnings(), quiet_lightning_notices():
        # the command table (and export, and the tests) pass the arguments; sys.argv is not them
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli(
            PyraClassifier,
            VTABDataModule,
            args=args,
            run=run,
            seed_everything_default=0,
            save_config_callback=LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "predict": {
                    "description": "Predict the class of every image of the run's test split (or of "
                    "--images DIR_OR_GLOB) with the run's LoRA-folded model, and write a CSV: image, "
                    "label, predicted class index, class name."
                },
                "prog": "pyra-lightning",
                # a misspelt flag is refused, not taken for the option it abbreviates (jsonargparse
                # 5 makes this its default); the subcommands inherit it
                "allow_abbrev": False,
                "description": "pyra-lightning: LoRA + token merging + PYRA on timm ViTs "
                "(`pyra-lightning --help` lists the other commands).",
            },
        )


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning fit|validate|test|predict ...`` (argv starts with the subcommand)."""
    try:
        cli = build_cli(argv)
        finish_wandb(cli.trainer)
    except SIGTERMException:
        # Lightning ends a SIGTERMed fit with a bare SystemExit (status 0); a scheduler must see
        # that the job did not finish. RunStatus has marked run.json and said how to resume.
        raise SystemExit(128 + 15) from None
    except SystemExit as stop:
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):
            # Lightning ends a Ctrl-C'd fit with sys.exit(1) while handling the KeyboardInterrupt;
            # 130 (128 + SIGINT) is what shells and `sweep` report for an interrupt
            raise SystemExit(128 + 2) from None
        raise
    finally:
        release_all()  # Lightning leaves the W&B run open; a later run would reuse it


if __name__ == "__main__":
    main(sys.argv[1:])
