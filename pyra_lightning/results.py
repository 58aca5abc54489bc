"""The ``results.json`` contract: one typed record, written by a run, read by the sweep and the report.

Every ``fit`` (which tests afterwards) and every ``test`` writes one ``results.json`` into its run
folder. ``RunResult`` is its schema; ``write`` writes it atomically (honouring the umask),
``validate_result`` checks a document read back and ``read_result`` does both for a file. The
training callback, ``pyra-lightning sweep`` (a task is finished when its file validates) and
``pyra-lightning report`` all go through this module, so they cannot disagree on what a result is.

``settings`` and ``fingerprint`` say which run produced the numbers (the settings that shape
training, see ``pyra_lightning.training.runs``): the report averages as seeds only results whose
settings differ by the seed alone. This module imports neither Lightning nor torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pyra_lightning.data.tasks import benchmark_of_group, resolve_task
from pyra_lightning.files import atomic_write_text

RESULTS_FILENAME = "results.json"
# Settings keys that hold the seed: runs that differ only here are repeats (seeds) of one setting.
SEED_KEYS: tuple[str, ...] = ("seed_everything", "data.seed")
# The measurement conditions (``benchmark``, see ``timing.conditions``) that must agree for two
# throughput figures to be comparable; the load average is recorded, not compared.
COMPARABLE_CONDITIONS: tuple[str, ...] = (
    "engine",
    "device",
    "device_name",
    "threads",
    "clock",
    "precision",
    "batch_size",
)
_FRACTIONS = ("test_acc", "test_acc_best", "test_acc_reference_protocol")
_OPTIONAL_NUMBERS = ("throughput", "throughput_unmerged", "speedup", "gflops", "gflops_unmerged")
_OPTIONAL_DICTS = ("params", "config", "benchmark", "settings", "reference_protocol", "data")


@dataclass
class RunResult:
    """One run's test result, as stored in ``results.json``.

    Attributes:
        task: canonical task name (``cifar``), or a custom task folder's name.
        group: ``natural``/``specialized``/``structured``/``demo``/``custom``.
        protocol: ``final`` (reported numbers) or ``tune`` (tested on val200).
        method: ``peft``, ``tome``, ``pyra`` or a PYRA ablation variant.
        test_acc: top-1 accuracy of the final (LoRA-folded) model, a fraction.
        test_acc_best: best test accuracy seen during training (``data.track_test``), or ``None``.
        test_acc_reference_protocol: the reference implementation's reported number: the maximum
            over test evaluations every ``val_interval`` epochs and at the last, or ``None``.
        reference_protocol: ``val_interval`` and the evaluations (epoch -> accuracy) behind it.
        throughput, throughput_unmerged: inference images/s with and without merging.
        speedup: ``throughput / throughput_unmerged``.
        gflops, gflops_unmerged: FLOPs per image (2 x multiply-adds), in 1e9.
        params: trainable parameter counts by group, ``total`` and ``trainable_pct``.
        config: the key hyperparameters (``model_name``, ``merge_r`` schedule, ``lora_rank``, ``seed``...).
        benchmark: how throughput was measured (``timing.conditions``): engine, device and its
            name, threads, clock, precision, batch size, warm-up and runs, CPU count and the load
            average before and after. Figures are comparable only where ``COMPARABLE_CONDITIONS`` agree.
        throughput_engine: the engine the throughput was timed on (``eager``: the PyTorch model),
            ``None`` without a throughput.
        settings: every setting that shapes training (``model.lora.rank``, ``data.task``,
            ``trainer.max_epochs``, ``seed_everything``...), as ``training.runs.run_settings`` makes them.
        fingerprint: hash of ``settings``: two results with the same fingerprint are one run.
        checkpoint: the checkpoint that was tested.
        data: the data's ``manifest.json`` entry (``manifest``, ``digest``, ``formats``) when
            ``pyra-lightning data verify`` wrote one; the report averages only runs on equal data.
        curve: elastic runs (``model.merging.elastic``): one entry per evaluated point, each with
            ``flops_fraction``, ``merge_r`` (the schedule), ``gflops``, ``throughput``, ``speedup``
            (over the uncompressed model, timed side by side) and ``test_acc`` (a fraction).
    """

    task: str
    method: str
    test_acc: float
    group: str | None = None
    protocol: str | None = None
    test_acc_best: float | None = None
    test_acc_reference_protocol: float | None = None
    reference_protocol: dict[str, Any] | None = None
    throughput: float | None = None
    throughput_unmerged: float | None = None
    speedup: float | None = None
    gflops: float | None = None
    gflops_unmerged: float | None = None
    params: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None
    fingerprint: str | None = None
    checkpoint: str | None = None
    data: dict[str, Any] | None = None
    throughput_engine: str | None = None
    curve: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        """Check the record, then write it atomically (a reader never sees half a file)."""
        data = self.to_dict()
        validate_result(data, path)
        atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path = "<memory>") -> RunResult:
        """The record of a validated document; keys this version does not know are dropped."""
        checked = validate_result(data, path)
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in checked.items() if key in known})

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        return cls.from_dict(read_result(path), path)


def is_number(value: Any) -> bool:
    """A finite int or float (``bool`` excluded): what every numeric field holds."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_result(data: Any, path: str | Path = "<memory>") -> dict[str, Any]:
    """Check one results.json document and return it with ``task``/``group`` made canonical.

    Known task aliases (``cifar100``) become the registry's name (``cifar``) and a missing group
    is filled in; an unknown task (e.g. a custom folder) is kept as it is.

    Raises:
        ValueError: naming ``path`` and what is wrong (a missing key, a wrong type, an accuracy
            given in percent, a group that contradicts the task registry, ...).
    """
    where = f"{path}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key in ("task", "method"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {data.get(key)!r}")
    for key in _FRACTIONS:
        value = data.get(key)
        if value is None and key != "test_acc":
            continue
        if not is_number(value):
            raise ValueError(f"{where}: {key!r} must be a finite number (a fraction), got {value!r}")
        if not 0.0 <= value <= 1.0:
            hint = " (it looks like a percentage)" if 1.0 < value <= 100.0 else ""
            raise ValueError(f"{where}: {key!r} = {value} is outside [0, 1]; expected a fraction{hint}")
    for key in _OPTIONAL_NUMBERS:
        value = data.get(key)
        if value is not None and (not is_number(value) or value < 0):
            raise ValueError(f"{where}: {key!r} must be a non-negative number or null, got {value!r}")
    for key in _OPTIONAL_DICTS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"{where}: {key!r} must be an object, got {type(data[key]).__name__}")
    for key in ("fingerprint", "checkpoint", "throughput_engine"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ValueError(f"{where}: {key!r} must be a string or null, got {data[key]!r}")
    curve = data.get("curve")
    if curve is not None and not (isinstance(curve, list) and all(isinstance(p, dict) for p in curve)):
        raise ValueError(f"{where}: 'curve' must be a list of objects or null, got {curve!r}")
    for index, point in enumerate(curve or []):
        acc = point.get("test_acc")
        if acc is not None and not (is_number(acc) and 0.0 <= acc <= 1.0):
            raise ValueError(f"{where}: 'curve[{index}].test_acc' must be a fraction in [0, 1], got {acc!r}")
    pct = (data.get("params") or {}).get("trainable_pct")
    if pct is not None and (not is_number(pct) or not 0.0 <= pct <= 100.0):
        raise ValueError(f"{where}: 'params.trainable_pct' must be a percentage in [0, 100], got {pct!r}")
    result = dict(data)
    try:
        task = resolve_task(data["task"], benchmark_of_group(data.get("group")))  # FGVC's are group "fgvc"
    except ValueError:
        return result  # a custom task: its own column, in no mean
    if data.get("group") is not None and data["group"] != task.group:
        raise ValueError(
            f"{where}: task {data['task']!r} belongs to group {task.group!r}, but the file says {data['group']!r}"
        )
    result.update(task=task.name, group=task.group)
    return result


def read_result(path: str | Path) -> dict[str, Any]:
    """Read and check one ``results.json``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a valid result; the message names the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return validate_result(data, path)


def seed_free(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without its seeds: equal for runs that are seeds of one setting."""
    return {key: value for key, value in settings.items() if key not in SEED_KEYS}


def result_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The settings of a result; files written before ``settings`` existed give their ``config``.

    Old files' ``config`` holds ``seed`` under that name; it is returned as ``seed_everything``
    so that the seed logic treats both alike.
    """
    if isinstance(result.get("settings"), dict):
        return dict(result["settings"])
    config = dict(result.get("config") or {})
    if "seed" in config:
        config["seed_everything"] = config.pop("seed")
    return config


def describe_differences(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> list[str]:
    """One line per key whose value differs: ``"model.lora.rank: 16 in <a> vs 8 in <b>"``."""
    missing = "(not set)"
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, missing) != b.get(key, missing):
            lines.append(
                f"{key}: {json.dumps(a.get(key, missing))} in {name_a} vs {json.dumps(b.get(key, missing))} {name_b}"
            )
    return lines
