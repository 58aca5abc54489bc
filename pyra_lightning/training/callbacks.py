"""Callbacks: evaluate the deployed (LoRA-folded) model, measure its speed, write ``results.json``
and ``predictions.csv``, and take the reference implementation's number (``ReferenceProtocol``)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Subset
from torchmetrics.aggregation import SumMetric

from pyra_lightning.accounting import count_flops
from pyra_lightning.patch import apply_merging, attention_kernel, merge_schedule
from pyra_lightning.results import RESULTS_FILENAME, RunResult
from pyra_lightning.timing import (
    AUTOCAST_DTYPES,
    HELD_DTYPES,
    ClockName,
    Precision,
    check_clock,
    check_precision,
    clock_function,
    conditions,
    held,
    images_per_second,
    input_dtype,
    load_average,
    num_threads,
    random_images,
    resolve_clock,
    time_forwards,
)
from pyra_lightning.training.runs import fingerprint, run_settings

AUTO_PRECISION = "auto"  # ``InferenceThroughput(precision=...)``: follow the trainer's true precision

TEST_SUBDIR = "test"  # a `test` of a trained run writes <run>/test/results.json, beside its logs


def say(trainer: pl.Trainer, message: str) -> None:
    """A line for the user (rank 0) that stays a line of its own while a progress bar is drawn.

    ``rank_zero_info`` writes right after the bar's carriage return, so "results written to ..."
    came out glued to the bar's last frame; ``tqdm.write`` clears the bars first and redraws them.
    """
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)  # the stream Lightning's bars are drawn on
    else:
        rank_zero_info(message)


class LoRAFolding(pl.Callback):
    """Test and predict with LoRA folded into the weights, as the model would be deployed.

    Folding happens on a copy (``PyraClassifier.folded_copy``), never on the training model, so
    training that continues after a test (or a test in the middle of ``fit``) is unaffected.
    """

    def _fold(self, pl_module: pl.LightningModule) -> None:
        pl_module.inference_model = pl_module.folded_copy()

    def _unfold(self, pl_module: pl.LightningModule) -> None:
        pl_module.inference_model = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unfold(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unfold(pl_module)


class InferenceThroughput(pl.Callback):
    """After testing, measure the folded model's images/s with and without merging.

    Logs ``test/throughput``, ``test/throughput_unmerged``, ``test/speedup``, ``test/gflops`` and
    ``test/gflops_unmerged`` to every logger. Timing is ``pyra_lightning.timing``'s protocol, the
    benchmark's: the model alone on the module's device (CUDA-synchronised), a warm-up, then the
    median of ``runs`` timed batches, merged and unmerged interleaved. ``conditions`` records how
    (engine, device, threads, clock, precision, batch size, load average before and after), and
    ``results.json`` keeps it as ``benchmark``: a speed-up is only comparable to one taken alike.

    Args:
        batch_size: Images per timed forward.
        precision: How the timed models run: ``"32"``, ``"bf16"``/``"16"`` (autocast over fp32
            weights), or ``"bf16-true"``/``"16-true"`` (weights and images in that dtype; a model
            in another dtype is timed as a converted copy, ``timing.held``). ``"auto"``: the
            trainer's true precision after a ``bf16-true``/``16-true`` fit (the dtype its model is
            held in), else ``"32"``. ``results.json`` records the one used.
        warmup: Untimed forwards first.
        runs: Timed forwards; the median is reported.
        threads: ``torch.set_num_threads`` during the timing (as ``benchmark --threads``); ``None``
            keeps torch's setting. On a CPU shared with other jobs, ``1`` with ``clock="cpu"``.
        clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (process CPU time, with ``threads=1``
            the work done rather than the time spent waiting for a core), as ``benchmark --clock``.
            ``"auto"``: ``cpu`` on a CPU with ``threads=1``, ``wall`` on a GPU or with more threads
            (``timing.resolve_clock``), so one config times right on both; ``results.json``
            records the clock used.
        engine: How the deployed model runs while timed: ``eager``, or an engine of
            ``pyra_lightning.compile_for_inference`` (``inductor``, ``cudagraph``,
            ``inductor-cudagraph``, or ``auto``: the fastest available). On a GPU the eager merged
            model is host-bound at small batches, so a deployment's speed is a graph engine's.
            ``results.json`` names the engine the figures come from (``throughput_engine``).
        enabled: Switch the measurement off (e.g. for quick debugging runs).
    """

    def __init__(
        self,
        batch_size: int = 64,
        precision: Literal["auto", "32", "bf16", "16", "bf16-true", "16-true"] = "auto",
        warmup: int = 3,
        runs: int = 10,
        threads: int | None = None,
        clock: ClockName = "wall",
        engine: Literal["eager", "auto", "inductor", "cudagraph", "inductor-cudagraph"] = "eager",
        enabled: bool = True,
    ) -> None:
        # Refuse an unknown clock when the run starts, not after training.
        resolve_clock(clock, "cpu", threads)
        if threads is not None and threads < 1:
            raise ValueError(f"throughput.threads must be a positive integer or null, got {threads}")
        if precision != AUTO_PRECISION:
            check_precision(precision)
        self.batch_size = batch_size
        self.precision = precision  # as configured; ``auto`` is resolved by ``setup``
        self.timing_precision: Precision = "32" if precision == AUTO_PRECISION else precision
        self.warmup = warmup
        self.runs = runs
        self.threads = threads
        self.clock = clock
        self.engine = engine
        self.enabled = enabled
        self.results: dict[str, float] = {}
        self.conditions: dict[str, Any] | None = None  # how ``results`` were measured

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        model = (
            pl_module.inference_model if pl_module.inference_model is not None else pl_module.folded_copy()
        )
        if self.engine in ("eager", "cudagraph") and attention_kernel(model) == "flex":
            rank_zero_warn(
                f"throughput.engine={self.engine} times FlexAttention's unfused eager reference "
                f"(model.merging.attention: {attention_kernel(model)}); throughput.engine inductor-cudagraph "
                "times its fused kernel"
            )
        unmerged = apply_merging(copy.deepcopy(model), 0, pyra=False) if any(merge_schedule(model)) else model
        img_size = pl_module.hparams.img_size
        times, self.conditions = self.time_models(
            {"merged": model, "unmerged": unmerged}, img_size, pl_module.device
        )
        merged_ips = images_per_second(self.batch_size, times["merged"])
        unmerged_ips = images_per_second(self.batch_size, times["unmerged"])
        return {
            "test/throughput": merged_ips,
            "test/throughput_unmerged": unmerged_ips,
            "test/speedup": merged_ips / unmerged_ips,
            "test/gflops": count_flops(model, img_size) / 1e9,
            "test/gflops_unmerged": count_flops(unmerged, img_size) / 1e9,
        }

    def time_models(
        self, models: dict[str, Any], img_size: int, device: torch.device
    ) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Time ``models`` side by side as this callback is configured; their timings and conditions.

        Engine, threads, clock, precision, batch size, warm-up and runs are this callback's, so
        every figure it takes (the speed-up, an elastic run's curve) says how it was measured.
        ``auto`` is resolved on the first model; the others run on the engine it picked, so
        speed-ups compare like with like.
        """
        timed, engine = self._bind(models, img_size, device)
        clock = resolve_clock(self.clock, device, self.threads)
        with num_threads(self.threads):
            measured = conditions(
                device, clock, self.timing_precision, self.batch_size, self.warmup, self.runs, engine
            )
            # Round-robin timing: the speedup compares forwards taken side by side, not minutes apart.
            times = time_forwards(
                timed,
                batch_size=self.batch_size,
                img_size=img_size,
                device=device,
                precision=self.timing_precision,
                warmup=self.warmup,
                runs=self.runs,
                clock=clock_function(clock),
            )
        measured["loadavg_after"] = load_average()
        return times, measured

    def _bind(
        self, models: dict[str, Any], img_size: int, device: torch.device
    ) -> tuple[dict[str, Any], str]:
        """The models as ``engine`` runs them, and the engine's name (``auto`` resolved)."""
        if self.engine == "eager":
            return models, "eager"
        from pyra_lightning.inference import compile_for_inference

        precision = self.timing_precision
        dtype = AUTOCAST_DTYPES.get(precision)  # None: no autocast
        example = random_images(self.batch_size, img_size, device, input_dtype(precision))
        bound: dict[str, Any] = {}
        engine = self.engine
        for name, model in models.items():
            bound[name] = compile_for_inference(held(model, precision), example, engine, dtype)
            engine = bound[name].engine  # the first model resolves ``auto``
        return bound, engine

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.precision == AUTO_PRECISION:  # the dtype a true-precision fit holds its model in
            trainer_precision = str(trainer.precision)
            self.timing_precision = trainer_precision if trainer_precision in HELD_DTYPES else "32"
        if self.enabled:  # before training, not after it
            device = trainer.strategy.root_device
            check_clock(clock_function(resolve_clock(self.clock, device, self.threads)), device)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if trainer.is_global_zero:
            self.results = self.measure(pl_module)
            say(
                trainer,
                "throughput: {:.1f} img/s merged, {:.1f} img/s unmerged ({:.2f}x), {:.3f} GFLOPs".format(
                    self.results["test/throughput"],
                    self.results["test/throughput_unmerged"],
                    self.results["test/speedup"],
                    self.results["test/gflops"],
                ),
            )
            for key, value in self.results.items():
                pl_module.log(key, value, rank_zero_only=True)


class ReferenceProtocol(pl.Callback):
    """The number the reference implementation reports: max test accuracy over a fixed cadence.

    The reference's ``train.py`` evaluates the test split after epoch ``e`` whenever
    ``e % val_interval == 0`` or ``e`` is the last epoch (0, 10, ..., 90 and 99 for 100 epochs), and
    reports the maximum. Choosing the best of several test evaluations looks at the test split, so
    this is kept apart from our own ``test_acc`` (the final model): it is logged as
    ``test/acc_reference_protocol`` and written to ``results.json`` as
    ``test_acc_reference_protocol``. The training model is evaluated as it is (LoRA unfolded, eval
    mode), as the reference does; the ranks share the test split.

    Args:
        val_interval: Evaluate after every epoch divisible by this (the reference's
            ``--val_interval``, 10), plus the last epoch.
    """

    def __init__(self, val_interval: int = 10) -> None:
        if val_interval < 1:
            raise ValueError(f"val_interval must be a positive integer, got {val_interval}")
        self.val_interval = val_interval
        self.evaluations: dict[int, float] = {}  # epoch -> test accuracy (fraction)

    @property
    def best(self) -> float | None:
        """The reported number: the maximum over ``evaluations``, ``None`` before the first."""
        return max(self.evaluations.values()) if self.evaluations else None

    def state_dict(self) -> dict[str, Any]:
        return {"val_interval": self.val_interval, "evaluations": dict(self.evaluations)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = {int(k): float(v) for k, v in state_dict["evaluations"].items()}

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Top-1 accuracy of ``pl_module`` on the data module's test split.

        Under DDP each rank evaluates every ``world_size``-th image (no padding, so no image
        counts twice) and torchmetrics sums the counts over the ranks.
        """
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("ReferenceProtocol needs a LightningDataModule with a test_dataloader()")
        loader = datamodule.test_dataloader()
        shard = Subset(loader.dataset, range(trainer.global_rank, len(loader.dataset), trainer.world_size))
        loader = DataLoader(
            shard, batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn
        )
        # Counts, not a float32 rate: the number written is correct / seen exactly, as in train.py.
        correct, seen = SumMetric().to(pl_module.device), SumMetric().to(pl_module.device)
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            for batch in loader:
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                images, labels = datamodule.on_after_batch_transfer(batch, 0)
                with trainer.precision_plugin.forward_context():
                    logits = pl_module(images)  # (B, num_classes)
                correct.update((logits.argmax(dim=-1) == labels).sum().double())
                seen.update(torch.tensor(float(labels.numel()), dtype=torch.float64))
        finally:
            for module, mode in modes.items():
                module.train(mode)
        total = int(seen.compute())  # both synchronised over the ranks
        return int(correct.compute()) / max(total, 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch % self.val_interval and epoch != trainer.max_epochs - 1:
            return
        self.evaluations[epoch] = self.evaluate(trainer, pl_module)
        pl_module.log("test/acc_reference_protocol", self.best, rank_zero_only=True)


def results_dir(trainer: pl.Trainer) -> Path:
    """Where a run without a run folder (a plain ``Trainer``) puts its files: the logger's
    ``log_dir``, or ``save_dir/name/version`` for loggers such as W&B whose ``trainer.log_dir``
    is a folder shared by all runs."""
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None) is None and logger.save_dir is not None:
        return Path(logger.save_dir) / str(logger.name) / str(logger.version)
    return Path(trainer.log_dir or trainer.default_root_dir)


class ResultsJSON(pl.Callback):
    """Write ``results.json`` (a ``pyra_lightning.results.RunResult``) into the run folder after testing.

    Fields: ``task``, ``group``, ``protocol``, ``method``, ``test_acc`` and ``test_acc_best``
    (fractions), ``throughput``, ``throughput_unmerged`` (images/s), ``speedup``, ``gflops``,
    ``gflops_unmerged``, ``params`` (trainable counts by group, total, ``trainable_pct``),
    ``config`` (the key hyperparameters), ``benchmark`` (how throughput was measured:
    ``timing.conditions``) with ``throughput_engine``, and
    ``test_acc_reference_protocol`` with ``reference_protocol`` (its cadence and the evaluations,
    by epoch, it is the maximum of) when the ``ReferenceProtocol`` callback ran.
    ``pyra-lightning report`` reads these files.
    Besides the metrics it records which run produced them: ``settings`` and ``fingerprint`` (the
    CLI sets ``identity`` to the tested checkpoint's, so a ``test`` of an older checkpoint is
    described by the settings it was trained with) and the ``checkpoint`` tested.
    ``pyra-lightning report`` and ``sweep`` read these files.

    Where: the test that follows ``fit`` writes the run's own ``<run>/results.json`` (the run's
    result, which ``sweep`` and ``fit``'s "finished" check read); a ``test`` of a trained run (no
    fit in this process) writes ``<run>/test/results.json`` beside its logs and never overwrites
    the fit's file. Without a run folder (``dirpath`` unset: a plain ``Trainer``) the file goes
    to the logger's folder.

    Args:
        filename: Name of the file inside the run folder.
    """

    def __init__(self, filename: str = RESULTS_FILENAME) -> None:
        self.filename = filename
        self.path: Path | None = None
        self.dirpath: Path | None = None  # the run folder (set by the CLI); None: the logger's folder
        self.identity: dict[str, Any] | None = None  # {"settings", "fingerprint"} of the tested model
        self.checkpoint: str | None = None
        self.fitted = False  # a fit ran in this process: its test is the run's result

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fitted = True

    def target(self, trainer: pl.Trainer) -> Path:
        """``<run>/results.json`` after a fit, ``<run>/test/results.json`` for a test of a trained run."""
        if self.dirpath is None:
            return results_dir(trainer) / self.filename
        return self.dirpath / self.filename if self.fitted else self.dirpath / TEST_SUBDIR / self.filename

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor | float)
        }
        datamodule = trainer.datamodule
        hp = pl_module.hparams
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, InferenceThroughput)), None)
        reference = next((cb for cb in trainer.callbacks if isinstance(cb, ReferenceProtocol)), None)
        measured = throughput.conditions if throughput is not None and "test/throughput" in metrics else None
        identity = self.identity
        if identity is None:
            settings = run_settings(trainer, pl_module, datamodule)
            identity = {"settings": settings, "fingerprint": fingerprint(settings)}
        result = RunResult(
            task=getattr(datamodule, "task", None) or "unknown",
            group=getattr(datamodule, "group", None),
            protocol=getattr(datamodule, "protocol", None),
            method=pl_module.method,
            test_acc=metrics["test/acc"],
            test_acc_best=getattr(pl_module, "test_acc_best", None),
            throughput=metrics.get("test/throughput"),
            throughput_unmerged=metrics.get("test/throughput_unmerged"),
            speedup=metrics.get("test/speedup"),
            gflops=metrics.get("test/gflops"),
            gflops_unmerged=metrics.get("test/gflops_unmerged"),
            params=pl_module.parameter_count().as_dict(),
            config={
                "model_name": hp.model_name,
                "merge_r": merge_schedule(pl_module.model),
                "lora_rank": hp["lora"]["rank"],
                "pyra": hp["merging"]["pyra"],
                "prop_attn": hp["merging"]["prop_attn"],
                # the kernels (not part of the identity: runs.KERNEL_CHOICES); None before they existed
                **{key: hp["merging"].get(key) for key in ("matcher", "merger", "attention")},
                "compile_model": hp.get("compile_model"),
                "img_size": hp.img_size,
                "max_epochs": trainer.max_epochs,
                "seed": int(os.environ.get("PL_GLOBAL_SEED", "-1")),
                "precision": str(trainer.precision),
                # The training recipe (README: "Reproducing the paper"): ours or the reference's.
                **hp["recipe"],  # scheduler_step, lora_init, distilled_training
                "drop_last": getattr(datamodule, "drop_last", None),
            },
            # The reference implementation's reported number (see ReferenceProtocol); only when
            # that callback ran (configs/recipe/reference.yaml adds it).
            test_acc_reference_protocol=reference.best if reference else None,
            reference_protocol=(
                {"val_interval": reference.val_interval, "evaluations": reference.evaluations}
                if reference
                else None
            ),
            # How the throughput was taken (timing.conditions); the report compares like with like.
            benchmark=measured if measured is not None else {"device": str(pl_module.device)},
            throughput_engine=measured["engine"] if measured is not None else None,
            settings=identity["settings"],
            fingerprint=identity["fingerprint"],
            checkpoint=self.checkpoint,
            data=getattr(datamodule, "data_identity", None),  # the manifest digest, where verified
            curve=getattr(pl_module, "curve", None),  # elastic runs (training.elastic)
        )
        self.path = result.write(self.target(trainer))
        kept = self.dirpath / self.filename if self.dirpath is not None and not self.fitted else None
        note = f" (the fit's {kept} is left as it is)" if kept is not None and kept.is_file() else ""
        say(trainer, f"results written to {self.path}{note}")
