"""Training throughput, peak memory and merge visualisations reach the loggers."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import CONFIGS
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from pyra_lightning.accounting import count_flops
from pyra_lightning.patch import apply_merging
from pyra_lightning.training import monitoring
from pyra_lightning.training.module import PyraClassifier
from pyra_lightning.training.monitoring import (
    MergeVisualization,
    TrainingThroughput,
    meta_copy,
    stable_wandb_id,
    training_flops_per_sample,
)

DEPTH = 4


def tiny_module(merge_r: list[int] | None = None) -> PyraClassifier:
    torch.manual_seed(0)
    return PyraClassifier(
        model_name="vit_tiny_patch16_224",
        num_classes=4,
        img_size=32,
        model_kwargs={"patch_size": 4, "embed_dim": 48, "depth": DEPTH, "num_heads": 3},
        drop_path_rate=0.0,
        lora={"rank": 4, "dropout": 0.0},
        merging={"merge_r": [8, 8, 4, 4] if merge_r is None else merge_r},
        optim={"warmup_epochs": 0},
    )


def loader(count: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, torch.randint(0, 4, (count,), generator=generator)), batch_size)


def fit(module: PyraClassifier, root: Path, callbacks: list[pl.Callback], **trainer_kwargs: object) -> Path:
    """Fit on random images with a CSVLogger; return the logger's folder."""
    logger = CSVLogger(root, name="csv")
    trainer_kwargs = {"accelerator": "cpu", **trainer_kwargs}  # the GPU test asks for cuda
    trainer = pl.Trainer(
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(module, loader(), loader(count=16, seed=1))
    return Path(logger.log_dir)


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_meta_copy_allocates_nothing_and_keeps_what_trains() -> None:
    module = tiny_module()
    copy_ = meta_copy(module.model)
    original = dict(module.model.named_parameters())
    for name, param in copy_.named_parameters():
        assert param.device.type == "meta" and param.shape == original[name].shape
        assert param.requires_grad == original[name].requires_grad
    assert all(p.device.type == "cpu" for p in module.model.parameters())


def test_training_flops_are_between_one_and_three_forwards_and_drop_with_merging() -> None:
    merged = tiny_module().model
    unmerged = apply_merging(meta_copy(merged), 0, pyra=False)
    merged_flops = training_flops_per_sample(merged, 32)
    forward = count_flops(merged, 32)
    # Frozen weights need no weight gradients: well under full fine-tuning's ~3x forward.
    assert 1.5 * forward < merged_flops < 3 * forward
    assert merged_flops < training_flops_per_sample(unmerged, 32)
    assert all(p.grad is None for p in merged.parameters()), "counting must not leave gradients"


def test_throughput_reaches_the_csv_logger_on_logging_steps(tmp_path: Path) -> None:
    callback = TrainingThroughput(window_size=3)
    log_dir = fit(tiny_module(), tmp_path, [callback], max_epochs=2, log_every_n_steps=2)
    rows = read_metrics(log_dir)
    logged = [row for row in rows if row.get("train/samples_per_sec")]
    # 6 batches per epoch, 12 steps: rates from the 3rd batch on, written every 2nd step.
    assert [int(row["step"]) for row in logged] == [3, 5, 7, 9, 11]
    assert callback.flops_per_sample == training_flops_per_sample(tiny_module().model, 32)
    for row in logged:
        samples, flops = float(row["train/samples_per_sec"]), float(row["train/flops_per_sec"])
        assert samples > 0 and samples == float(row["train/device/samples_per_sec"])  # world size 1
        assert flops / samples == pytest.approx(callback.flops_per_sample, rel=1e-3)
    columns = set(rows[0])
    assert "train/device/mfu" not in columns, "no known peak FLOP/s on a CPU"
    assert not any(c.startswith(("validate/", "test/")) for c in columns), "training only"
    assert "train/peak_memory_gib" not in columns, "CUDA only"


def test_throughput_excludes_validation_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock (load cannot move it): every training batch takes 1 s, the one validation
    batch of each epoch 100 s. With validation excluded, the rate is exactly 8 images/s."""
    clock = {"now": 0.0}
    # Only the callback's clock is fake; Lightning and torch keep the real one.
    monkeypatch.setattr(
        monitoring, "time", SimpleNamespace(perf_counter=lambda: clock["now"], sleep=time.sleep)
    )

    class Ticks(pl.Callback):
        def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
            clock["now"] += 1.0

        def on_validation_batch_end(self, *args: object, **kwargs: object) -> None:
            clock["now"] += 100.0

    callback = TrainingThroughput(window_size=8)
    log_dir = fit(
        tiny_module(),
        tmp_path,
        [Ticks(), callback],  # ticks first: a batch's second has passed when the meter reads the clock
        max_epochs=2,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    logged = [row for row in read_metrics(log_dir) if row.get("train/samples_per_sec")]
    # The last window (batches 5-12, 7 intervals of 8 images) spans the first validation;
    # counted in, it would give 56 / 107 images/s.
    assert int(logged[-1]["step"]) == 11
    for row in logged:
        assert float(row["train/samples_per_sec"]) == pytest.approx(8.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_and_mfu_are_logged_on_cuda(tmp_path: Path) -> None:
    log_dir = fit(
        tiny_module(),
        tmp_path,
        [TrainingThroughput(window_size=3)],
        max_epochs=1,
        log_every_n_steps=1,
        accelerator="cuda",
        devices=1,
    )
    rows = read_metrics(log_dir)
    peaks = [float(row["train/peak_memory_gib"]) for row in rows if row.get("train/peak_memory_gib")]
    assert len(peaks) == 1 and 0 < peaks[0] < 80
    # MFU needs the device's peak FLOP/s, which Lightning knows for some GPUs only (2.6.6 has the
    # H100 and A100 but not the H200: seen on a lent H200, where this test first ran).
    from lightning.fabric.utilities.throughput import get_available_flops

    if get_available_flops(torch.device("cuda"), torch.float32) is not None:
        assert any(row.get("train/device/mfu") for row in rows)
    else:
        assert not any(row.get("train/device/mfu") for row in rows)


def test_merge_visualization_writes_pngs_and_leaves_the_model_alone(tmp_path: Path) -> None:
    module = tiny_module()
    callback = MergeVisualization(every_n_epochs=2, num_images=3)
    log_dir = fit(module, tmp_path, [callback], max_epochs=3)
    # Epochs 2 (every 2nd) and 3 (the last), three images each.
    names = sorted(p.name for p in (log_dir / "merging").iterdir())
    assert names == [f"epoch={e:03d}-image={i}.png" for e in (1, 2) for i in range(3)]
    with Image.open(log_dir / "merging" / names[0]) as strip:
        # 32 px images upscaled 4x to 128, input + one panel per block, 2 px gaps.
        assert strip.size == ((DEPTH + 1) * 128 + DEPTH * 2, 128)
    assert not any(block.trace_source for block in module.model.blocks)


def test_draw_gives_one_strip_per_image_for_chosen_layers() -> None:
    module = tiny_module()
    images = torch.randn(2, 3, 32, 32)
    raw = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    strips = MergeVisualization(min_panel_size=32, layers=[0, 3]).draw(module.model, images, raw)
    assert len(strips) == 2
    assert all(s.shape == (32, 3 * 32 + 2 * 2, 3) and s.dtype.name == "uint8" for s in strips)
    assert (strips[0][:, :32] == raw[0].permute(1, 2, 0).numpy()).all(), "the input comes first"


def test_unmerged_models_are_not_drawn(tmp_path: Path) -> None:
    callback = MergeVisualization(every_n_epochs=1)
    log_dir = fit(tiny_module(merge_r=[0] * DEPTH), tmp_path, [callback], max_epochs=1)
    assert not (log_dir / "merging").exists() and callback.saved == []


def test_stable_wandb_id_is_made_once_per_run_folder(tmp_path: Path) -> None:
    first = stable_wandb_id(tmp_path / "a")
    assert first == stable_wandb_id(tmp_path / "a") and len(first) == 8
    assert stable_wandb_id(tmp_path / "b") != first


def run_test_with(tmp_path: Path, throughput: pl.Callback, results: pl.Callback) -> None:
    """``trainer.test`` of the tiny module (LoRA folded) with these throughput and results callbacks."""
    from pyra_lightning.training.callbacks import LoRAFolding

    trainer = pl.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[LoRAFolding(), throughput, results],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(tiny_module(), loader(count=8))


def test_test_throughput_takes_threads_and_clock_and_results_say_how_it_was_measured(tmp_path: Path) -> None:
    # The issue: results.json speed-ups of one model ranged 0.22x-2.2x on a shared CPU, and the file
    # did not say how they were taken; the callback had no --threads/--clock like `benchmark`.
    from pyra_lightning.results import COMPARABLE_CONDITIONS, read_result
    from pyra_lightning.training.callbacks import InferenceThroughput, ResultsJSON

    threads = torch.get_num_threads()
    asked = threads + 1  # not the session's count, so that giving it back is seen
    throughput = InferenceThroughput(batch_size=2, warmup=0, runs=1, threads=asked, clock="cpu")
    results = ResultsJSON()
    run_test_with(tmp_path, throughput, results)
    assert torch.get_num_threads() == threads, "the thread count is given back"
    written = read_result(results.path)
    benchmark = written["benchmark"]
    assert set(COMPARABLE_CONDITIONS) <= set(benchmark)
    assert written["throughput_engine"] == benchmark["engine"] == "eager"
    assert (benchmark["threads"], benchmark["clock"], benchmark["batch_size"]) == (asked, "cpu", 2)
    assert benchmark["device"] == "cpu" and benchmark["precision"] == "32" and benchmark["device_name"]
    assert all(len(benchmark[key]) == 3 for key in ("loadavg_before", "loadavg_after"))
    with pytest.raises(ValueError, match="clock='gpu'"):
        InferenceThroughput(clock="gpu")  # type: ignore[arg-type]


def test_the_cpu_clock_is_refused_on_cuda_before_training_and_before_timing() -> None:
    """Process CPU time on a GPU counts the host's launches, not the kernels: a wrong speed-up."""
    from pyra_lightning.timing import time_interleaved
    from pyra_lightning.training.callbacks import InferenceThroughput

    on_cuda = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision="32-true"
    )
    with pytest.raises(
        ValueError, match=r"clock 'cpu' \(process CPU time\) on cuda:0 .*--throughput.clock wall"
    ):
        InferenceThroughput(clock="cpu").setup(on_cuda, None, "fit")  # type: ignore[arg-type]
    InferenceThroughput(clock="wall").setup(on_cuda, None, "fit")  # type: ignore[arg-type]
    InferenceThroughput(clock="cpu", enabled=False).setup(on_cuda, None, "fit")  # type: ignore[arg-type]
    called: list[int] = []
    with pytest.raises(ValueError, match="clock 'cpu'"):
        time_interleaved({"f": lambda: called.append(1)}, 0, 1, "cuda", time.process_time)
    assert not called, "refused before anything ran"
    assert time_interleaved({"f": lambda: called.append(1)}, 0, 1, "cpu", time.process_time)["f"]


def test_the_auto_clock_is_cpu_time_on_one_cpu_thread_and_the_wall_clock_elsewhere() -> None:
    """``auto`` picks per device, so one config neither times a GPU by the host nor a shared CPU
    by the waiting; a named clock is kept, an unknown one refused with the names it could be."""
    from pyra_lightning.timing import resolve_clock

    assert resolve_clock("auto", "cpu", 1) == "cpu"
    assert resolve_clock("auto", "cpu", None) == resolve_clock("auto", "cpu", 4) == "wall"
    assert resolve_clock("auto", "cuda:0", 1) == resolve_clock("auto", torch.device("cuda"), None) == "wall"
    assert resolve_clock("cpu", "cpu", 4) == "cpu" and resolve_clock("wall", "cpu", 1) == "wall"
    with pytest.raises(ValueError, match="clock='gpu': expected one of wall, cpu, auto"):
        resolve_clock("gpu", "cpu", 1)


def test_the_quickstart_throughput_section_runs_on_a_gpu_and_records_the_clock_it_used(
    tmp_path: Path,
) -> None:
    """The quickstart's config was refused on a GPU (cpu clock); with ``auto`` it takes the wall
    clock there, and on this CPU results.json names the resolved clock, never ``auto``."""
    import yaml

    from pyra_lightning.results import read_result
    from pyra_lightning.training.callbacks import InferenceThroughput, ResultsJSON

    section = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())["throughput"]
    assert section["clock"] == "auto" and section["threads"] == 1
    on_cuda = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision="32-true"
    )
    InferenceThroughput(**section).setup(on_cuda, None, "fit")  # type: ignore[arg-type]
    throughput = InferenceThroughput(**{**section, "batch_size": 2, "warmup": 0, "runs": 1})
    results = ResultsJSON()
    run_test_with(tmp_path, throughput, results)
    benchmark = read_result(results.path)["benchmark"]
    assert (benchmark["clock"], benchmark["threads"], benchmark["device"]) == ("cpu", 1, "cpu")


def test_test_throughput_runs_on_compile_for_inference_engines_and_names_them(tmp_path: Path) -> None:
    """``--throughput.engine auto`` times both models through compile_for_inference on one engine
    (on a CPU: eager) and results.json names it."""
    from pyra_lightning.results import read_result
    from pyra_lightning.training.callbacks import InferenceThroughput, ResultsJSON

    throughput = InferenceThroughput(batch_size=2, warmup=0, runs=1, engine="auto")
    results = ResultsJSON()
    run_test_with(tmp_path, throughput, results)
    written = read_result(results.path)
    assert written["throughput_engine"] == written["benchmark"]["engine"] == "eager"
    assert written["throughput"] > 0 and written["speedup"] > 0


def test_a_line_for_the_user_is_a_line_of_its_own_under_a_progress_bar(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # The issue: "results written to ..." came out glued to the bar's last frame.
    import logging

    from tqdm import tqdm

    from pyra_lightning.training.callbacks import say

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    bar = tqdm(total=3, file=sys.stdout, desc="Testing")
    bar.update(3)
    say(trainer, "results written to x.json")
    bar.close()
    frames = capsys.readouterr().out.split("\r")
    assert any(frame.startswith("results written to x.json\n") for frame in frames), frames

    quiet = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO):
        say(quiet, "predictions written to y.csv")
    assert "predictions written to y.csv" in caplog.text, "no bar: Lightning's log, as before"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("attention", "warns"), [("flex", True), ("triton", False), ("sdpa_channel", False)])
def test_only_flex_attention_gets_the_unfused_eager_warning(
    attention: str, warns: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eager FlexAttention is its unfused reference, so an eager throughput of it is warned about;
    the Triton kernel and the key-channel SDPA run fused eager and are not (the warning once named
    every attention but SDPA's)."""
    from helpers import tiny_module

    from pyra_lightning.training import callbacks
    from pyra_lightning.training.callbacks import InferenceThroughput

    said: list[str] = []
    monkeypatch.setattr(callbacks, "rank_zero_warn", lambda message, *args, **kwargs: said.append(message))
    module = tiny_module(merging={"attention": attention}).eval()
    InferenceThroughput(batch_size=2, warmup=0, runs=1).measure(module)
    assert any("FlexAttention's unfused eager reference" in message for message in said) == warns
