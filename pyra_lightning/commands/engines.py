"""Inference engines for the benchmark, and the speed-target schedule search.

An *engine* is how a deployed model runs: PyTorch ``eager``, ``torch.compile`` (``compile``; one static
graph per batch size, so a size's figure does not depend on which sizes were timed before it),
``onnxruntime`` (the model exported by ``pyra_lightning.to_onnx``) or an AOTInductor package
(``aoti``). ``build_runner`` turns a LoRA-folded model into a no-argument callable that runs one
fixed batch through the engine, so that every engine is timed by the same protocol
(``pyra_lightning.timing.time_interleaved``).

``search_speed_target`` answers "which schedule gives me speed-up S on *this* device, engine,
batch size and precision?". It bisects over the FLOPs solver's one-parameter family
(``schedules.proportional_schedule``: layer l merges ``floor(rho * max_l)`` tokens), timing every
candidate interleaved with the uncompressed model, and returns the gentlest measured schedule that
reaches S, as a per-layer list for ``model.merging.merge_r``. Training then needs no timing at all.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pyra_lightning.formats as formats
from pyra_lightning.deploy import EngineUnavailable
from pyra_lightning.inference import GRAPH_ENGINES
from pyra_lightning.schedules import ViTShape, flops_fraction, proportional_schedule
from pyra_lightning.timing import (
    AUTOCAST_DTYPES,
    Clock,
    Precision,
    autocast,
    held,
    input_dtype,
    random_images,
    time_interleaved,
)

Runner = Callable[[], object]
# GRAPH_ENGINES, those of ``pyra_lightning.compile_for_inference``: the whole forward as one
# compiled graph (``inductor``: fullgraph, static shapes), one CUDA graph of the eager model
# (``cudagraph``), or both (``inductor-cudagraph``); they take the host out of the loop, which is
# what a GPU needs.


@dataclass
class BuiltRunner:
    """One model on one engine at one batch size: ``run()`` does one forward of a fixed batch."""

    run: Runner
    setup_s: float  # export / compile seconds, kept out of the throughput figures


def build_runner(
    engine: str,
    model: nn.Module,
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    workdir: str | Path | None = None,
    threads: int | None = None,
    compile_mode: str | None = None,
) -> BuiltRunner:
    """Prepare ``model`` (LoRA-folded, on ``device``) to run on ``engine``.

    Args:
        engine: ``eager``, ``compile``, ``inductor``, ``cudagraph``, ``inductor-cudagraph``,
            ``onnxruntime`` or ``aoti``.
        model: The folded model; ``compile`` and exports work on it without changing it.
        batch_size, img_size: The fixed input (``timing.random_images``).
        device: ``cpu`` or a CUDA device; ONNX Runtime uses its CUDA provider on CUDA.
        precision: ``"32"``, ``"bf16"``/``"16"`` autocast, or ``"bf16-true"``/``"16-true"``
            (a copy of the model held in that dtype, ``timing.held``), for every engine of
            ``torch``'s own. The exported engines run fp32 only (an exported graph has no autocast).
        workdir: Where exported files go (a temporary folder if None).
        threads: ONNX Runtime intra-op threads (None: torch's).
        compile_mode: ``torch.compile`` mode, e.g. ``"reduce-overhead"`` (CUDA graphs).

    Raises:
        EngineUnavailable: with the reason, when the engine cannot run here.
    """
    device = torch.device(device)
    x = random_images(batch_size, img_size, device, input_dtype(precision))
    key = id(model)  # the caller's model, which outlives this call (a held copy may not)
    model = held(model, precision)
    model.eval()
    start = time.perf_counter()
    if engine in ("eager", "compile"):
        fn = model if engine == "eager" else torch.compile(model, mode=compile_mode, dynamic=False)

        def run() -> object:
            with torch.inference_mode(), autocast(device, precision):
                return fn(x)

        if engine == "compile":
            from pyra_lightning.inference import bound_compile

            with bound_compile(model):  # past dynamo's limit it would run eager, silently
                run()  # compiles for this shape; timed here, not in the throughput
        return BuiltRunner(run, time.perf_counter() - start)
    if engine in GRAPH_ENGINES:  # compile_for_inference: bound to this one batch shape
        from pyra_lightning.inference import compile_for_inference

        dtype = AUTOCAST_DTYPES.get(precision)  # None: fp32
        try:
            bound = compile_for_inference(model, x, engine, autocast_dtype=dtype)
        except ValueError as error:  # a CUDA-graph engine on a CPU
            raise EngineUnavailable(str(error)) from None
        return BuiltRunner(lambda: bound(x), time.perf_counter() - start)
    fmt = formats.engine_format(engine)
    if fmt is None:
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(formats.engines())}")
    if precision != "32":
        raise EngineUnavailable(f"{engine} runs the exported fp32 graph only, not precision {precision!r}")
    missing = fmt.extra()
    if missing is not None:
        raise EngineUnavailable(f"{engine} needs {missing}")
    folder = Path(workdir or tempfile.mkdtemp(prefix="pyra-engines-"))
    path = folder / f"{key:x}_{fmt.file}"
    if not path.exists():  # exported once per model, whatever the batch size (dynamic axis)
        fmt.write(model, path, random_images(2, img_size, device))
    loaded = fmt.load(path, device, threads)

    def run_exported() -> object:
        with torch.inference_mode():
            return loaded(x)

    return BuiltRunner(run_exported, time.perf_counter() - start)


def parse_engines(engine: str | list[str]) -> list[str]:
    """``"eager,onnxruntime"`` or a list, checked against the known engines."""
    engines = [e.strip() for e in (engine.split(",") if isinstance(engine, str) else engine) if e.strip()]
    unknown = [e for e in engines if e not in formats.engines()]
    if unknown or not engines:
        raise ValueError(
            f"engine {engine!r}: expected a comma-separated subset of {', '.join(formats.engines())}"
        )
    return list(dict.fromkeys(engines))


def parse_batch_sizes(batch_sizes: int | str | list[int]) -> list[int]:
    """``"1,8,32"``, ``8`` or ``[1, 8]`` as a list of positive ints."""
    if isinstance(batch_sizes, int):
        values = [batch_sizes]
    elif isinstance(batch_sizes, str):
        try:
            values = [int(v) for v in batch_sizes.split(",") if v.strip()]
        except ValueError as error:
            raise ValueError(f"batch_sizes={batch_sizes!r}: expected integers such as 1,8,32") from error
    else:
        values = list(batch_sizes)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"batch_sizes={batch_sizes!r}: expected positive integers such as 1,8,32")
    return values


# ------------------------------------------------------------------------- speed-target search
@dataclass
class SpeedTarget:
    """The result of ``search_speed_target``.

    Attributes:
        schedule: The gentlest measured schedule reaching the target (paste as ``model.merging.merge_r``).
        rho: Its parameter in the proportional family.
        speedup: Its measured speed-up over the uncompressed model.
        flops_fraction: Its block FLOPs relative to the uncompressed model.
        trials: Every candidate measured: ``{"rho", "schedule", "speedup", "flops_fraction"}``.
    """

    schedule: list[int]
    rho: float
    speedup: float
    flops_fraction: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def measured_speedup(
    baseline: Runner,
    candidate: Runner,
    warmup: int,
    runs: int,
    clock: Clock = time.perf_counter,
    device: str | torch.device = "cpu",
) -> float:
    """Median baseline time over median candidate time, the two timed interleaved.

    ``device`` is synchronised around every timed call: on a GPU, a runner returns once its work
    is queued, so without it the clock would time the host's launches, not the forwards.
    """
    pair = {"baseline": baseline, "candidate": candidate}
    times = time_interleaved(pair, warmup, runs, device=device, clock=clock)
    return statistics.median(times["baseline"]) / statistics.median(times["candidate"])


def search_speed_target(
    target: float,
    shape: ViTShape,
    make_runner: Callable[[list[int]], Runner],
    warmup: int = 2,
    runs: int = 5,
    iterations: int = 7,
    clock: Clock = time.perf_counter,
    max_rho: float = 1.0,
    bound: str = "half the tokens in every block",
    min_rho: float = 0.0,
    device: str | torch.device = "cpu",
) -> SpeedTarget:
    """The gentlest proportional schedule whose measured speed-up reaches ``target``.

    Bisection over ``rho`` in [0, 1], as ``solve_flops_schedule`` does for FLOPs, but on measured
    time: ``rho = 1`` (halve the tokens in every layer) is tried first and must reach the target;
    then ``iterations`` halvings keep the interval ``(gentle, strong]`` such that ``strong``
    reaches it. Each candidate is timed interleaved with the uncompressed model, so load on the
    machine slows both alike. Schedules already measured are not timed again.

    Args:
        target: Required speed-up, > 1 (e.g. 2.0 for twice the uncompressed img/s).
        shape: The model's ``ViTShape`` (``patch.vit_shape``).
        make_runner: Builds the runner of a model merging with a given schedule; the list of
            zeros is the uncompressed baseline.
        warmup, runs, clock: Timing of each comparison (``pyra_lightning.timing``).
        device: Where the runners run, synchronised around each timed call (a CUDA device).
        iterations: Bisection steps after the first trial.
        max_rho: The strongest ``rho`` allowed (an elastic checkpoint's fastest trained point);
            ``bound`` says what it is in the refusal.
        min_rho: The gentlest ``rho`` allowed (an elastic range that ends below the uncompressed
            model); no candidate gentler than it is built.

    Raises:
        ValueError: for a target <= 1, or one that even ``rho = 1`` does not reach (the message
            gives the speed-up it measured).
    """
    if not target > 1.0:
        raise ValueError(f"target_speedup must be > 1 (the uncompressed model is 1.0), got {target}")
    baseline = make_runner([0] * shape.depth)
    trials: list[dict[str, Any]] = []
    measured: dict[tuple[int, ...], float] = {}

    def speedup_at(rho: float) -> float:
        schedule = proportional_schedule(rho, shape)
        key = tuple(schedule)
        if key not in measured:
            measured[key] = measured_speedup(baseline, make_runner(schedule), warmup, runs, clock, device)
        fraction = flops_fraction(schedule, shape)
        trials.append(
            {"rho": rho, "schedule": schedule, "speedup": measured[key], "flops_fraction": fraction}
        )
        return measured[key]

    strongest = speedup_at(max_rho)
    if strongest < target:
        raise ValueError(
            f"target speed-up {target:g} is out of reach: the strongest schedule allowed ({bound}, "
            f"{proportional_schedule(max_rho, shape)}) measured {strongest:.3f}x"
        )
    gentle, strong = min_rho, max_rho
    for _ in range(iterations):
        mid = (gentle + strong) / 2
        if speedup_at(mid) >= target:
            strong = mid
        else:
            gentle = mid
    schedule = proportional_schedule(strong, shape)
    return SpeedTarget(
        schedule=schedule,
        rho=strong,
        speedup=measured[tuple(schedule)],
        flops_fraction=flops_fraction(schedule, shape),
        trials=trials,
    )
