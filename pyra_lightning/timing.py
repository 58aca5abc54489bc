"""The timing protocol, in one place: warm-up, interleaved rounds, median.

Both the ``InferenceThroughput`` callback (``test/throughput`` in ``results.json``) and
``pyra-lightning benchmark`` time models with these functions, so a figure from training and a
figure from the benchmark mean the same thing:

- every callable runs ``warmup`` untimed times first (allocator, caches, compiled graphs,
  ONNX Runtime's first-run planning);
- then ``runs`` rounds, one timed call of each callable per round, the order rotated every round
  (``round_robin``), so that a burst of load on a shared machine slows all of them alike instead
  of biasing one ratio, and no callable always runs right after the same one;
- each call is timed with ``time.perf_counter`` (or a given clock), CUDA-synchronised on both
  sides so a timer measures the work and not just its launch;
- the reported figure is the median, which one preempted call cannot move.

Engines that are not ``nn.Module`` (an ONNX Runtime session, an AOTInductor package) are timed
through ``time_interleaved``, which takes plain callables; ``time_forwards`` is its form for
PyTorch models (eval mode, ``inference_mode``, autocast).

This module imports neither Lightning nor timm.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

# "32": fp32; "bf16"/"16": autocast over fp32 weights (Lightning's "-mixed"); "bf16-true"/"16-true":
# the model held in that dtype and fed images in it, no autocast (Lightning's "-true")
Precision = Literal["32", "bf16", "16", "bf16-true", "16-true"]
Clock = Callable[[], float]
ClockName = Literal["wall", "cpu", "auto"]
# "cpu": process CPU time; with one thread on a shared CPU it is the work done, not the waiting.
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}
AUTO_CLOCK = "auto"  # resolved per device by ``resolve_clock``
ENGINE = "eager"  # what the throughput callback times: the PyTorch model as it is (issue 17 adds more)

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "16": torch.float16}
HELD_DTYPES: dict[str, torch.dtype] = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
PRECISIONS: tuple[str, ...] = ("32", *AUTOCAST_DTYPES, *HELD_DTYPES)
IN_CHANS = 3  # RGB, as every timm ViT the patch supports


def clock_function(name: str) -> Clock:
    """The clock named ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``)."""
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r}: expected one of {', '.join(CLOCKS)}")
    return CLOCKS[name]


def resolve_clock(name: str, device: str | torch.device, threads: int | None) -> str:
    """The clock a measurement uses: ``name``, or for ``"auto"`` the one that suits ``device``.

    ``auto`` is process CPU time on a CPU timed with one thread (there it is the work done, not
    the time spent waiting for a core on a shared machine), and the wall clock otherwise: on a GPU
    the kernels run outside the host process, and with several CPU threads process time adds them
    up instead of measuring the latency. One config then times right on a laptop and on a GPU,
    and the figure records the resolved name (``conditions``), never ``"auto"``.
    """
    if name == AUTO_CLOCK:
        return "cpu" if torch.device(device).type == "cpu" and threads == 1 else "wall"
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r}: expected one of {', '.join(CLOCKS)}, {AUTO_CLOCK}")
    return name


def check_clock(clock: Clock, device: str | torch.device) -> None:
    """Refuse the process-CPU clock on CUDA: it counts the host's work, not the GPU's kernels."""
    if clock is time.process_time and torch.device(device).type == "cuda":
        raise ValueError(
            f"clock 'cpu' (process CPU time) on {device} would time the host's work, not the GPU's; "
            "use the wall clock on a GPU (benchmark --clock wall or auto, --throughput.clock wall or auto)"
        )


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none): how busy the machine was."""
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> str:
    """The GPU's name on CUDA, the CPU's model otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def conditions(
    device: str | torch.device,
    clock: str,
    precision: str,
    batch_size: int,
    warmup: int,
    runs: int,
    engine: str = ENGINE,
) -> dict[str, Any]:
    """How a throughput figure is being taken, as ``results.json`` ``benchmark`` records it.

    Call it inside the ``num_threads`` block of the measurement (``threads`` is read from torch).
    ``results.COMPARABLE_CONDITIONS`` must be equal for two figures to share a column; ``loadavg_before`` is
    filled in here and ``loadavg_after`` by the caller once the timing is done.
    """
    return {
        "engine": engine,
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "precision": precision,
        "batch_size": batch_size,
        "warmup": warmup,
        "runs": runs,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_average(),
    }


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Mixed precision as Lightning's ``precision="bf16-mixed"``/``"16-mixed"`` would run it;
    nothing for ``"32"`` and the true precisions (their model is held in the dtype, ``held``)."""
    check_precision(precision)
    if precision not in AUTOCAST_DTYPES:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision]):
        yield


def check_precision(precision: str) -> None:
    """Refuse a precision that is not one of ``PRECISIONS``, in one line naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}")


def input_dtype(precision: Precision) -> torch.dtype:
    """The dtype of the images a model timed at ``precision`` is fed: its held dtype, else fp32."""
    check_precision(precision)
    return HELD_DTYPES.get(precision, torch.float32)


def held(model: nn.Module, precision: Precision) -> nn.Module:
    """``model`` with its floating-point weights in the dtype ``precision`` runs them in.

    That dtype is bf16/fp16 for ``"bf16-true"``/``"16-true"`` and fp32 otherwise (autocast casts
    fp32 weights as it goes). So a model trained under ``trainer.precision: bf16-true`` (held in
    bf16) can be timed in fp32, and an fp32 one in bf16, each as that deployment would run it. A
    model whose floating-point parameters have that dtype is returned as is (its buffers, which a
    model may keep in another dtype on purpose, are not asked); otherwise a deep copy converted as
    Lightning converts a true-precision model (``module.to(dtype)``), never the caller's model.
    """
    dtype = input_dtype(precision)
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (``None`` keeps torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer measures the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(
    batch_size: int, img_size: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The benchmark's input: one seeded batch of (B, 3, H, W) normal noise (speed ignores content),
    drawn in fp32 and then cast, so every dtype times the same images."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, IN_CHANS, img_size, img_size, generator=generator)  # (B, 3, H, W)
    return x.to(device=device, dtype=dtype)


def timed(fn: Callable[[], object], device: torch.device, clock: Clock = time.perf_counter) -> float:
    """Seconds of one call of ``fn``, synchronised on CUDA."""
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def round_robin(names: list[str], runs: int) -> Iterator[str]:
    """``runs`` rounds over ``names``, rotated each round so no callable always follows the same one."""
    for run in range(runs):
        shift = run % len(names)
        yield from names[shift:] + names[:shift]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    clock: Clock = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of every callable: ``warmup`` untimed calls each, then ``runs`` interleaved rounds.

    Args:
        fns: Callables by name, each doing one unit of work (e.g. one forward of one batch).
        warmup: Untimed calls of each callable first.
        runs: Timed calls of each callable.
        device: Synchronised around every timed call when it is a CUDA device.
        clock: Wall time by default. On a shared CPU, ``time.process_time`` with one thread
            measures the work done rather than how long the scheduler kept the process waiting.

    Returns:
        The ``runs`` timings of every callable, in seconds, in the order they were taken.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if not fns:
        raise ValueError("nothing to time: no callables given")
    device = torch.device(device)
    check_clock(clock, device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name in round_robin(list(fns), runs):
        times[name].append(timed(fns[name], device, clock))
    return times


def time_forwards(
    models: Mapping[str, nn.Module],
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
    clock: Clock = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per inference forward of each model, measured round-robin (``time_interleaved``).

    Interleaving matters on shared or thermally throttled machines: the ratios a benchmark
    reports (speed-up, PYRA vs ToMe) compare runs taken seconds apart instead of minutes apart.

    Args:
        models: Models by name (or any callables on a tensor, e.g. compiled models); each
            ``nn.Module`` is put in eval mode for the measurement and restored after.
        batch_size: Images per forward.
        img_size: Square input resolution in pixels.
        device: Where the input is created; the models must already be there.
        precision: ``"32"`` for fp32, ``"bf16"``/``"16"`` for autocast to bfloat16/float16,
            ``"bf16-true"``/``"16-true"`` for the models held in that dtype (``held``: a module
            in another dtype is timed as a converted copy) and bf16/fp16 images.
        warmup, runs, clock: As in ``time_interleaved``.

    Returns:
        The ``runs`` timings of every model, in seconds, in the order they were taken.
    """
    device = torch.device(device)
    x = random_images(batch_size, img_size, device, input_dtype(precision))
    models = {name: held(m, precision) if isinstance(m, nn.Module) else m for name, m in models.items()}
    was_training = {name: model.training for name, model in models.items() if isinstance(model, nn.Module)}
    try:
        for model in models.values():
            if isinstance(model, nn.Module):
                model.eval()
        with torch.inference_mode(), autocast(device, precision):
            fns = {name: (lambda model=model: model(x)) for name, model in models.items()}
            return time_interleaved(fns, warmup, runs, device, clock)
    finally:
        for name, training in was_training.items():
            models[name].train(training)


def images_per_second(batch_size: int, seconds: list[float]) -> float:
    """``batch_size`` over the median of the timed calls."""
    return batch_size / statistics.median(seconds)


def measure_throughput(
    model: nn.Module,
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
) -> float:
    """Inference images/s of ``model``: ``batch_size`` over the median forward time.

    The model alone is timed (no data loading); see ``time_forwards`` for the protocol.
    """
    times = time_forwards({"model": model}, batch_size, img_size, device, precision, warmup, runs)
    return images_per_second(batch_size, times["model"])
