"""Runs you can trust: one folder per run, and an identity that says what a checkpoint was trained as.

A run folder holds everything one run writes (``run.json``, ``checkpoints/``, ``config.yaml``,
``metrics.csv``, ``results.json``, ``predictions.csv``, merge images, ``wandb/``). By default it is
``runs/<task>/<method>`` (``runs/demo/pyra``), so runs on different tasks or methods never share
a folder; ``--trainer.default_root_dir ROOT`` puts it under ``ROOT`` instead of ``runs`` (it is a
root, as in Lightning) and ``--run_dir DIR`` makes ``DIR`` itself the run folder.

A run's *settings* are everything that shapes training: the module's and the data module's
hyperparameters (minus paths, worker counts and other settings that change no number), the
resolved ``merge_r`` schedule, the frozen backbone's fingerprint, the trainer's epochs, precision,
gradient accumulation and clipping, and the seed. Not the device count, logging or ``max_steps``
(a stop criterion). Their hash is the run's *fingerprint*. Every checkpoint carries both
(``RunIdentity``), and so do ``run.json`` and ``results.json``: a checkpoint is resumed or
evaluated only where the settings match, and a refusal lists the settings that differ.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from pyra_lightning.data.tasks import resolve_task
from pyra_lightning.files import atomic_write_text
from pyra_lightning.modulation import method_name as modulation_method_name
from pyra_lightning.patch import merge_schedule
from pyra_lightning.results import describe_differences
from pyra_lightning.training.cli_errors import config_files
from pyra_lightning.training.settings import GROUPS as SETTING_GROUPS

RUNS_ROOT = "runs"
RUN_FILE = "run.json"
CHECKPOINT_KEY = "pyra_run"  # where a checkpoint keeps {"settings": ..., "fingerprint": ...}
# Hyperparameters that change no number a run produces: where files are, how fast data loads.
# The frozen weights that pretrained/pretrained_file load are covered by model.backbone_fingerprint.
# Which kernels compute the model: the same function (the Triton merger and FlexAttention up to
# rounding; torch.compile also draws dropout masks from inductor's own random stream), so they are
# not part of a run's identity, and a command may choose other ones than a checkpoint was trained
# with (``test --ckpt_path X --model.merging.attention flex``; the CLI keeps them over the checkpoint's).
KERNEL_CHOICES: frozenset[str] = frozenset(
    {"model.merging.merger", "model.merging.attention", "model.compile_model"}
)
EXCLUDED: frozenset[str] = KERNEL_CHOICES | frozenset(
    {
        "model.pretrained",
        "model.pretrained_file",
        "data.root",
        "data.num_workers",
        "data.cache_images",
        "data.pin_memory",
        "data.persistent_workers",
        "data.eval_batch_size",
        "data.track_test",
    }
)
TRAINER_KEYS: tuple[str, ...] = (
    "max_epochs",  # the cosine schedule's length depends on it
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)
# What shortens training, validation or the test that results.json reports, with Lightning's
# defaults: recorded only when not the default, so a full run's identity is what it was before
# these were recorded (a 3-batch fit was taken for the full run of the same flags otherwise).
TRAINER_LIMITS: dict[str, float] = {
    "limit_train_batches": 1.0,
    "limit_val_batches": 1.0,
    "limit_test_batches": 1.0,
    "overfit_batches": 0.0,
}
# Settings that shape training but not the trained model's predictions: evaluating a checkpoint
# (test/validate/predict) compares every setting except these and the trainer's and seeds.
TRAINING_ONLY: frozenset[str] = frozenset(
    {
        "model.optim.lr",
        "model.optim.pyra_lr",
        "model.optim.weight_decay",
        "model.optim.warmup_epochs",
        "model.optim.warmup_lr",
        "model.optim.min_lr",
        "model.optim.label_smoothing",
        "model.drop_path_rate",
        "model.lora.dropout",
        "data.batch_size",
        "data.augment",
        "data.seed",
        "data.protocol",
        "seed_everything",
    }
)
START_FRESH = "To start a new run, choose another folder (--run_dir DIR) or delete {run_dir}."


# ------------------------------------------------------------------------------------- settings
def _plain(value: Any) -> Any:
    """A JSON value: tuples become lists, anything unusual its string."""
    return json.loads(json.dumps(value, default=str))


def run_settings(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any) -> dict[str, Any]:
    """The settings that shape training, as flat keys named like the CLI's flags.

    Built from ``module.hparams`` and ``datamodule.hparams`` (so a new hyperparameter is part of
    the identity without editing this function) minus ``EXCLUDED``; the module's groups
    (``training.settings``) give one key per field, ``model.lora.rank``. Plus what the hyperparameters
    do not say: the resolved ``merge_r`` schedule, the backbone fingerprint, the canonical task
    name, the trainer's ``TRAINER_KEYS`` and the global seed.
    """
    settings: dict[str, Any] = {}
    for key, value in dict(module.hparams).items():
        if key in SETTING_GROUPS and isinstance(value, dict):
            settings.update({f"model.{key}.{field}": item for field, item in value.items()})
        else:
            settings[f"model.{key}"] = value
    if datamodule is not None:
        settings.update({f"data.{k}": v for k, v in dict(getattr(datamodule, "hparams", {})).items()})
    model = getattr(module, "model", None)
    if model is not None:
        settings["model.merging.merge_r"] = merge_schedule(model)  # "low" and its list are one setting
    if getattr(module, "backbone_fingerprint", None) is not None:
        settings["model.backbone_fingerprint"] = module.backbone_fingerprint
    if "data.task" in settings:
        settings["data.task"] = task_name(str(settings["data.task"]))
    for key in TRAINER_KEYS:
        settings[f"trainer.{key}"] = getattr(trainer, key, None)
    for key, default in TRAINER_LIMITS.items():
        value = getattr(trainer, key, default)
        if value is not None and value != default:
            settings[f"trainer.{key}"] = value
    settings["trainer.precision"] = str(trainer.precision)
    settings["seed_everything"] = int(os.environ.get("PL_GLOBAL_SEED", "-1"))
    return {
        key: _plain(value)
        for key, value in sorted(settings.items())
        if key not in EXCLUDED and not key.split(".")[-1].startswith("_")  # LightningCLI's _instantiator
    }


def fingerprint(settings: dict[str, Any]) -> str:
    """A short SHA-256 of the settings (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def eval_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide what an evaluated checkpoint predicts (see ``TRAINING_ONLY``)."""
    return {
        key: value
        for key, value in settings.items()
        if key not in TRAINING_ONLY and not key.startswith("trainer.")
    }


def settings_differences(
    recorded: dict[str, Any], now: dict[str, Any], source: str | Path, evaluation: bool = False
) -> list[str]:
    """Lines ``"model.lora.rank: 16 in <source> vs 8 now"`` for each differing setting."""
    if evaluation:
        recorded, now = eval_settings(recorded), eval_settings(now)
    return describe_differences(recorded, now, str(source), "now")


# ----------------------------------------------------------------------------------- run folder
def task_name(task: str) -> str:
    """The registry's name of a known task (``cifar100`` -> ``cifar``), a custom folder's as given."""
    try:
        return resolve_task(task).name
    except ValueError:
        return task.strip()


def method_name(merge_r: Any, pyra: Any) -> str:
    """``peft`` (no merging), ``tome``, ``pyra`` or the PYRA variant's name, from the config alone."""
    merging = not (
        merge_r is None or merge_r == 0 or (isinstance(merge_r, list | tuple) and not any(merge_r))
    )
    return modulation_method_name(merging, pyra)


def default_run_dir(
    task: str, merge_r: Any, pyra: Any, root: str | Path = RUNS_ROOT, elastic: Any = None
) -> Path:
    """``<root>/<task>/<method>``: runs on different tasks or methods never share a folder (an
    elastic run's method is ``<method>_elastic``, as its results name it)."""
    method = method_name(merge_r, pyra) + ("_elastic" if elastic is not None else "")
    parts = [re.sub(r"[^\w.+-]", "_", part) for part in (task_name(task), method)]
    return Path(root) / parts[0] / parts[1]


def suggest_run_dir(run_dir: Path, recorded: dict[str, Any], now: dict[str, Any], limit: int = 3) -> Path:
    """A sibling folder whose name shows what differs: ``runs/demo/pyra`` -> ``runs/demo/pyra-rank8``.

    A rerun of the default folder with a changed setting is refused (the folder holds the other
    run); this is the ``--run_dir`` the refusal proposes, so that both runs keep their folder.
    """
    changed = [key for key in sorted(now) if key not in recorded or _plain(recorded[key]) != _plain(now[key])]
    parts = []
    for key in changed[:limit]:
        value = now[key]
        text = "-".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        parts.append(re.sub(r"[^\w.+-]", "_", f"{key.split('.')[-1]}{text}")[:40])
    if len(changed) > limit:
        parts.append(f"and{len(changed) - limit}more")
    return run_dir.with_name("-".join([run_dir.name, *parts]))


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of a run folder, or ``None`` when there is none.

    Raises:
        ValueError: the file exists but is not a JSON object with ``settings``.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({error}); delete it or the run folder") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"{path}: expected an object with 'settings'; delete it or the run folder")
    return record


def write_run_record(run_dir: Path, settings: dict[str, Any], status: str, error: str | None = None) -> Path:
    """Write ``run.json``: the run's settings, fingerprint and ``status``.

    ``status`` is ``running``, ``finished``, ``interrupted`` (SIGINT/SIGTERM) or ``failed`` (with
    ``error``, the exception that ended the fit).
    """
    record: dict[str, Any] = {"status": status, "fingerprint": fingerprint(settings), "settings": settings}
    if error is not None:
        record["error"] = error
    path = Path(run_dir) / RUN_FILE
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU, turning torch's errors for a damaged file into one that says what to do.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt or not a checkpoint.
    """
    if str(path) in ("last", "best", "hpc", "registry"):
        raise ValueError(
            f"ckpt_path={str(path)!r}: give the checkpoint's file (e.g. <run folder>/checkpoints/last.ckpt); "
            "without --ckpt_path, test/validate/predict use the run's own last.ckpt"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:  # a damaged file
        raise ValueError(
            f"checkpoint {path} cannot be read: it is truncated or corrupt ({type(error).__name__}). "
            f"Delete it to restart this run from scratch, or give --ckpt_path another checkpoint."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def checkpoint_identity(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """``{"settings": ..., "fingerprint": ...}`` recorded in a checkpoint, ``None`` for older ones."""
    identity = checkpoint.get(CHECKPOINT_KEY)
    return identity if isinstance(identity, dict) and isinstance(identity.get("settings"), dict) else None


class RunIdentity(pl.Callback):
    """Record the run's settings and fingerprint in every checkpoint (key ``pyra_run``)."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        settings = run_settings(trainer, pl_module, trainer.datamodule)
        checkpoint[CHECKPOINT_KEY] = {"settings": settings, "fingerprint": fingerprint(settings)}


# ------------------------------------------------------------------- what the user asked for
def explicit_keys(args: Sequence[str], group: str, subcommand: str | None = None) -> set[str]:
    """The ``group`` settings (e.g. ``model``) that the command line or its config files set.

    LightningCLI gives a setting nobody set its default; a checkpoint's hyperparameters may then
    replace it. A setting the user did set must never be replaced silently. Keys are as deep as
    the module's setting groups: ``model_name``, ``lora.rank``, ``merging.elastic``.
    """
    keys: set[str] = set()
    for file in config_files(args):
        try:
            document = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue  # the CLI itself reports unreadable config files
        for section in (document, document.get(subcommand) if subcommand else None):
            if isinstance(section, dict) and isinstance(section.get(group), dict):
                for key, value in section[group].items():
                    if key in SETTING_GROUPS:  # a dict of some fields, or a file naming any of them
                        keys.update(
                            f"{key}.{field}" for field in (value if isinstance(value, dict) else _fields(key))
                        )
                    else:
                        keys.add(key)
    prefix = f"--{group}."
    for arg in args:
        if arg.startswith(prefix):
            parts = arg[len(prefix) :].split("=", 1)[0].split(".")
            if parts[0] not in SETTING_GROUPS:
                keys.add(parts[0])
            else:  # --model.lora.rank, or the whole group: --model.lora '{rank: 16}' / a file
                keys.update(
                    [f"{parts[0]}.{parts[1]}"]
                    if len(parts) > 1
                    else [f"{parts[0]}.{f}" for f in _fields(parts[0])]
                )
    return keys


def _fields(group: str) -> list[str]:
    return [field.name for field in dataclasses.fields(SETTING_GROUPS[group])]


def _lookup(hparams: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``hparams["lora"]["rank"]`` for ``"lora.rank"``; ``(False, None)`` where it has no such key."""
    value: Any = hparams
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def conflicting_hparams(
    hparams: dict[str, Any], config: Any, keys: Iterable[str], source: str | Path
) -> list[str]:
    """Lines for the explicitly set ``keys`` whose value differs from the checkpoint's ``hparams``
    (``KERNEL_CHOICES`` may differ)."""
    lines = []
    for key in sorted(keys):
        if f"model.{key}" in KERNEL_CHOICES:
            continue
        found, recorded = _lookup(hparams, key)
        if found and _plain(config.get(key)) != _plain(recorded):
            lines.append(
                f"model.{key}: {json.dumps(_plain(recorded))} in {source} vs "
                f"{json.dumps(_plain(config.get(key)))} now"
            )
    return lines


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus deleting ``metrics.csv`` when its folder holds other files.

    A run folder always holds more than logs (``run.json``, checkpoints), and a resumed run must
    add to its ``metrics.csv``, not replace it; the existing header is kept as the known columns.
    Lightning (2.6) has no public "append" option for its CSV writer: this override of the one
    method that deletes the file is the smallest change that gives one.
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that continues the run folder's ``metrics.csv`` on a resume.

    The CLI uses it wherever a config names ``CSVLogger``.
    """

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return super().experiment

    def forget_from_step(self, step: int) -> int:
        """Drop the rows of ``metrics.csv`` logged at ``step`` or later; returns how many.

        A fit killed inside an epoch had logged that epoch's first rows after its last checkpoint,
        and the resumed fit logs them again from the checkpoint's step: without this, the file
        would hold those steps twice and a plot of the run would count them twice. Rows are
        logged at ``step = global_step - 1``, so the rows that the checkpoint covers stay.
        """
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if rank_zero_only.rank != 0 or not path.is_file():
            return 0
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not (row.get("step") or "").isdigit() or int(row["step"]) < step]
        if len(kept) < len(rows):
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=header)  # the dialect Lightning writes
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(path, buffer.getvalue())
        return len(rows) - len(kept)


class ResumedMetrics(pl.Callback):
    """On a resumed fit, ``RunCSVLogger.forget_from_step`` at the step the checkpoint restored."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.forget_from_step(trainer.global_step)


def refusal(what: str, differences: Sequence[str], fix: str) -> ValueError:
    """One error for every refusal: what was refused, the differing settings, how to proceed."""
    listed = "\n".join(f"  {line}" for line in differences)
    return ValueError(f"{what}; these settings differ:\n{listed}\n{fix}")
