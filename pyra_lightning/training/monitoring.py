"""Monitoring at scale: training throughput and memory, merge visualisations, the config in every logger.

- ``TrainingThroughput`` logs training samples/s, FLOPs/s and MFU (on GPUs Lightning knows) with
  Lightning's ``Throughput`` meter, from a FLOPs count of one training step measured once with
  ``measure_flops`` on a meta-device copy of the model; and peak CUDA memory per epoch.
- ``MergeVisualization`` shows which patches token merging joins (ToMe's figure) on a few fixed
  validation images as training goes, to W&B, TensorBoard or PNG files.
- ``LoggerSaveConfigCallback`` sends the whole resolved CLI config to every logger (for W&B: the
  run's config), not only the module's and data module's hyperparameters.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.throughput import Throughput, get_available_flops, measure_flops
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import default_collate

from pyra_lightning.patch import apply_merging, attention_kernel, merge_rule, merge_schedule
from pyra_lightning.visualize import layer_sources, merge_overlay


def batch_size_of(batch: Any) -> int:
    """Samples in a ``(images, labels)`` batch, or in a bare tensor of images."""
    images = batch[0] if isinstance(batch, list | tuple) else batch
    return int(images.size(0))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, made without copying (or allocating) any weight.

    Passing meta tensors in ``deepcopy``'s memo replaces every parameter and buffer, so even a
    ViT-L on a full GPU is copied in milliseconds; ``requires_grad`` is kept, so a backward pass
    computes exactly the gradients training computes.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def training_flops_per_sample(model: nn.Module, img_size: int) -> int:
    """FLOPs of one training step (forward + backward) per image, counted on a meta-device copy.

    Token merging removes the same number of tokens from every image, so FLOPs grow linearly with
    the batch size and one image is enough. The backward pass differentiates only what trains
    (LoRA, PYRA, head) and the activations leading to it, as training does, which is well under
    the 3x forward of full fine-tuning. Attention counts as PyTorch's FLOP counter sees the meta
    device's math path; matmul FLOPs are exact.
    """
    copy_ = meta_copy(model).train()
    x = torch.empty(1, 3, img_size, img_size, device="meta")
    return int(measure_flops(copy_, lambda: copy_(x), loss_fn=torch.Tensor.sum))


def _compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Trainer precision string, to look up the device's peak FLOP/s."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


class TrainingThroughput(pl.Callback):
    """Log training throughput (samples/s, FLOPs/s, MFU) and peak CUDA memory to every logger.

    Lightning's ``Throughput`` meter averages over the last ``window_size`` training batches of
    global rank 0. DDP trains in lock-step, so the global rates are rank 0's times the world size
    (as Lightning's ``ThroughputMonitor`` computes them); ``train/device/*`` are per device. Time
    spent validating is excluded. Logged on the trainer's logging steps (``log_every_n_steps``):

    - ``train/samples_per_sec`` and ``train/device/samples_per_sec`` (images/s),
    - ``train/flops_per_sec`` and ``train/device/flops_per_sec`` (model FLOPs of forward + backward),
    - ``train/device/mfu``: model FLOPs utilisation, only on devices whose peak Lightning knows
      (recent NVIDIA GPUs, TPUs; never on CPU);
    - per epoch on CUDA: ``train/peak_memory_gib`` and ``train/peak_reserved_gib`` (max over ranks).

    Unlike ``ThroughputMonitor``, this logs nothing while validating or testing (the folded
    model's inference speed is ``InferenceThroughput``'s job) and logs global rates at any world
    size, so 1-GPU and 8-GPU runs share their keys.

    Args:
        window_size: Training batches the rates are averaged over (at least 2).
        log_memory: Log peak CUDA memory per epoch (ignored off CUDA).
        enabled: Switch the callback off.
    """

    def __init__(self, window_size: int = 20, log_memory: bool = True, enabled: bool = True) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2, got {window_size}")
        self.window_size = window_size
        self.log_memory = log_memory
        self.enabled = enabled
        self.flops_per_sample: int | None = None
        self._meter: Throughput | None = None
        self._t0 = 0.0
        self._paused = 0.0  # seconds spent validating since training started
        self._val_t0: float | None = None
        self._batches = 0
        self._samples = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        model = getattr(pl_module, "model", pl_module)
        img_size = pl_module.hparams.get("img_size")
        try:
            self.flops_per_sample = training_flops_per_sample(model, img_size) if img_size else None
        except Exception as error:  # a throughput meter must never stop training
            rank_zero_warn(f"TrainingThroughput: could not count FLOPs ({error}); logging samples/s only")
            self.flops_per_sample = None
        if self.flops_per_sample:
            rank_zero_info(f"training step: {self.flops_per_sample / 1e9:.3f} GFLOPs per image")
        peak = get_available_flops(trainer.strategy.root_device, _compute_dtype(str(trainer.precision)))
        self._meter = Throughput(
            available_flops=peak, world_size=trainer.world_size, window_size=self.window_size
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._meter is not None:
            self._meter.reset()
        self._batches = self._samples = 0
        self._paused = 0.0
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.log_memory and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._meter is None or not self.enabled or not trainer.is_global_zero:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # time the work, not its launch
        size = batch_size_of(batch)
        self._batches += 1
        self._samples += size
        self._meter.update(
            time=time.perf_counter() - self._t0 - self._paused,
            batches=self._batches,
            samples=self._samples,
            flops=None if self.flops_per_sample is None else self.flops_per_sample * size,
        )
        metrics = self._meter.compute()
        world = trainer.world_size
        logged = {
            f"train/{key}": float(value)
            for key, value in metrics.items()
            if key.startswith("device/") or key.endswith("_per_sec")
        }
        for key in ("samples_per_sec", "flops_per_sec"):  # Throughput leaves these out at world size 1
            if f"train/device/{key}" in logged:
                logged.setdefault(f"train/{key}", logged[f"train/device/{key}"] * world)
        logged.pop("train/batches_per_sec", None)
        logged.pop("train/device/batches_per_sec", None)
        if logged:
            pl_module.log_dict(logged, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_t0 is not None:
            self._paused += time.perf_counter() - self._val_t0
            self._val_t0 = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.enabled and self.log_memory and pl_module.device.type == "cuda"):
            return
        gib = 2**30
        allocated = torch.cuda.max_memory_allocated(pl_module.device) / gib
        reserved = torch.cuda.max_memory_reserved(pl_module.device) / gib
        for key, value in (("train/peak_memory_gib", allocated), ("train/peak_reserved_gib", reserved)):
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")


class MergeVisualization(pl.Callback):
    """Log which patches token merging joins on fixed validation images, every few epochs.

    At the end of every ``every_n_epochs``-th validation (and of the last epoch), a copy of the
    model, with source tracking switched on, runs on the first ``num_images`` validation images;
    each image becomes one strip: the input, then its merged groups after every block, each group
    in its mean colour with white borders (ToMe's figure). The training model is not touched.
    Only global rank 0 draws. The strips go to every logger that takes images: W&B
    (``log_image``, key ``val/merging``), TensorBoard (``add_image``); any other logger (CSV) gets
    PNG files in ``<log_dir>/merging/``.

    Args:
        every_n_epochs: Draw after every n-th epoch's validation.
        num_images: Validation images shown (the first ones of the validation set).
        layers: Blocks to show; ``None`` shows all.
        min_panel_size: Small images are upscaled (nearest) to at least this many pixels.
        enabled: Switch the callback off.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        num_images: int = 4,
        layers: list[int] | None = None,
        min_panel_size: int = 128,
        enabled: bool = True,
    ) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(
                f"every_n_epochs and num_images must be >= 1, got {every_n_epochs}, {num_images}"
            )
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.layers = layers
        self.min_panel_size = min_panel_size
        self.enabled = enabled
        self.saved: list[Path] = []  # PNG files written, for loggers without images

    def should_draw(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return self.enabled and not trainer.sanity_checking and (epoch % self.every_n_epochs == 0 or last)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.should_draw(trainer) or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        model = getattr(pl_module, "model", None)
        if model is None or not any(merge_schedule(model)):
            return
        images, raw, labels = self._fixed_images(trainer, pl_module)
        strips = self.draw(model, images, raw)
        captions = [f"epoch {trainer.current_epoch}, label {int(y)}" for y in labels]
        self._log(trainer, strips, captions)

    @torch.no_grad()
    def draw(self, model: nn.Module, images: torch.Tensor, raw: torch.Tensor) -> list[np.ndarray]:
        """One (H', W', 3) ``uint8`` strip per image: the input, then its groups after each block.

        Args:
            model: A model patched by ``apply_merging``; it is copied, never changed.
            images: Model inputs (B, 3, H, W), normalized, on the model's device.
            raw: The same images for display, (B, 3, H, W) ``uint8`` or floats in any range.
        """
        traced = copy.deepcopy(model).eval()
        variant = next((b.pyra.variant for b in traced.blocks if getattr(b, "pyra", None) is not None), False)
        prop_attn = bool(getattr(traced.blocks[0], "prop_attn", True))
        matcher, merger = merge_rule(traced)  # the model's own rule, not the default
        apply_merging(
            traced,
            merge_schedule(traced),
            pyra=variant,
            prop_attn=prop_attn,
            trace_source=True,
            matcher=matcher,
            merger=merger,
            attention=attention_kernel(traced),
        )
        sources = layer_sources(traced, images)  # per block: (B, N_l, N0)
        patch_size = tuple(traced.patch_embed.patch_size)
        layers = range(len(sources)) if self.layers is None else self.layers
        scale = max(1, -(-self.min_panel_size // images.shape[-1]))
        strips = []
        for index in range(images.shape[0]):
            image = _displayable(raw[index])
            panels = [image.permute(1, 2, 0).repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()]
            for layer in layers:
                source = sources[layer][index]
                panels.append(merge_overlay(image, source, patch_size, traced.num_prefix_tokens, scale=scale))
            gap = np.full((panels[0].shape[0], 2, 3), 255, dtype=np.uint8)
            strips.append(np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1))
        return strips

    def _fixed_images(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first validation images: model inputs, their raw pixels and their labels."""
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        dataset = loader.dataset
        count = min(self.num_images, len(dataset))
        raw, labels = default_collate([dataset[i] for i in range(count)])
        batch = (raw.to(pl_module.device), labels.to(pl_module.device))
        hooks = trainer.datamodule if trainer.datamodule is not None else pl_module
        images, _ = hooks.on_after_batch_transfer(batch, 0)  # e.g. uint8 -> normalized float
        return images, raw, labels

    def _log(self, trainer: pl.Trainer, strips: list[np.ndarray], captions: list[str]) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/merging", strips, step=step, caption=captions)
            elif isinstance(logger, TensorBoardLogger):
                for index, strip in enumerate(strips):
                    logger.experiment.add_image(f"val/merging/{index}", strip, step, dataformats="HWC")
            else:
                folder = getattr(logger, "log_dir", None) or logger.save_dir or trainer.default_root_dir
                self._save_png(Path(folder), trainer, strips)
        if not trainer.loggers:
            self._save_png(Path(trainer.default_root_dir), trainer, strips)

    def _save_png(self, log_dir: Path, trainer: pl.Trainer, strips: list[np.ndarray]) -> None:
        from PIL import Image

        folder = log_dir / "merging"
        folder.mkdir(parents=True, exist_ok=True)
        for index, strip in enumerate(strips):
            path = folder / f"epoch={trainer.current_epoch:03d}-image={index}.png"
            Image.fromarray(strip).save(path)
            self.saved.append(path)


def _displayable(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) ``uint8`` CPU image: ``uint8`` as is, floats stretched to the full range."""
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    low, high = image.min(), image.max()
    return ((image - low) / (high - low).clamp_min(1e-8) * 255 + 0.5).to(torch.uint8)


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save ``config.yaml`` as LightningCLI does, and also send the resolved config to every logger.

    Lightning logs the module's and data module's hyperparameters by itself; this adds the rest
    (trainer, callbacks, seed, logger), as one nested ``cli`` entry, so a W&B run or an
    ``hparams.yaml`` alone says how to reproduce it. The config is dumped by the parser, the same
    text as ``config.yaml``; secrets do not belong in configs (W&B reads ``WANDB_API_KEY``).
    """

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


def finish_wandb(trainer: pl.Trainer | None, exit_code: int = 0) -> None:
    """Finish the W&B run that ``trainer``'s ``WandbLogger`` started, if any.

    Lightning's ``WandbLogger`` never finishes its run, and a new ``WandbLogger`` in the same
    process *reuses* a run that is still open. So anything that runs the CLI twice in one process
    (a sweep, a notebook, the tests) would log both trainings into one W&B run unless the first is
    finished; a process that exits finishes its run by itself.
    """
    if trainer is None or not any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


WANDB_ID_FILE = "wandb_run_id"


def stable_wandb_id(root_dir: str | Path, filename: str = WANDB_ID_FILE) -> str:
    """A W&B run id tied to a run folder: made once, then read back by every rerun.

    A fixed ``id`` in a shared config would make every run resume one W&B run; no id makes a
    rerun that auto-resumes from ``<root_dir>/checkpoints/last.ckpt`` a new W&B run. An id kept
    in the run folder gives each run its own W&B run, continued by every resume, test or predict
    of that folder (``WandbLogger`` passes ``resume="allow"``); the CLI deletes the file when a
    new run starts in a folder. The file is created exclusively, so concurrent processes (DDP
    ranks) agree on one id.
    """
    import secrets

    path = Path(root_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as handle:
            handle.write(secrets.token_hex(4) + "\n")
    except FileExistsError:
        pass
    for _ in range(50):  # another process may have created it an instant before writing
        run_id = path.read_text().strip()
        if run_id:
            return run_id
        time.sleep(0.1)
    raise RuntimeError(f"{path} is empty; delete it to start a new W&B run")


CSV_LIKE = ("CSVLogger", "RunCSVLogger", "TensorBoardLogger")
RUN_CSV_LOGGER = "pyra_lightning.training.runs.RunCSVLogger"


def _logger_kind(item: Namespace) -> str:
    """A parsed logger's class name: ``WandbLogger`` for ``lightning.pytorch.loggers.WandbLogger``."""
    return str(item.get("class_path")).rsplit(".", 1)[-1]


def run_loggers(logger: Any, run_dir: Path, stage: str) -> Any:
    """Point every logger of a parsed config at the run folder, with a fixed version.

    No ``version_N`` folders: CSV-like loggers write ``<run>/metrics.csv`` for ``fit`` and
    ``<run>/<stage>/`` for the evaluations; ``CSVLogger`` becomes ``RunCSVLogger``, which
    continues ``metrics.csv`` on a resume; W&B gets one stable run id per folder. Loggers that
    write no file of the run (W&B alone) get a ``RunCSVLogger`` beside them, so every run folder
    holds its ``metrics.csv`` and ``hparams.yaml`` whatever dashboard it also reports to.
    """
    if logger is False:
        return False
    if logger is None or logger is True:
        logger = Namespace(class_path=RUN_CSV_LOGGER, init_args=Namespace())
    items = [
        item for item in (logger if isinstance(logger, list) else [logger]) if isinstance(item, Namespace)
    ]
    kinds = {_logger_kind(item) for item in items}
    if kinds and not kinds & set(CSV_LIKE):
        logger = [*(logger if isinstance(logger, list) else [logger]), Namespace(class_path=RUN_CSV_LOGGER)]
        items.append(logger[-1])
    for item in items:
        kind = _logger_kind(item)
        init = item.get("init_args") or Namespace()
        given = init.get("save_dir")
        if given not in (None, "", ".") and Path(given).resolve() != run_dir.resolve():
            rank_zero_warn(f"{kind} save_dir {given} is replaced by the run folder {run_dir}")
        init.save_dir = str(run_dir)
        if kind == "CSVLogger":
            item.class_path = RUN_CSV_LOGGER
        if kind in CSV_LIKE:
            init.name, init.version = "", ("" if stage == "fit" else stage)
        elif kind == "WandbLogger":
            init.id = init.get("id") or stable_wandb_id(run_dir)
            init.name = init.get("name") or "/".join(run_dir.parts[-2:])
        item.init_args = init
    return logger
