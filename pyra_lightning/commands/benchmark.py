"""Inference throughput and training-step speed of uncompressed, ToMe and PYRA ViTs.

The paper's claim (§4, Tables 2-5) is that PYRA keeps ToMe's speed-up while recovering its
accuracy: merging saves FLOPs in every block after the first, and the modulation of eqs. 4-7
costs a few vector operations on the ``merge_r`` merged pairs. This module measures both halves
of that claim on the deployed models, which are LoRA-folded (``fold_lora``) so that LoRA costs
nothing at inference:

- ``uncompressed``: the backbone with LoRA folded in, no merging;
- ``tome/<schedule>``: ToMe merging (``apply_merging(pyra=False)``);
- ``pyra/<schedule>``: PYRA merging (``apply_merging(pyra=True)``) at the same schedule.

Speed-up alone does not tell whether merging itself is cheap, so every row also reports the
*efficiency* ``speedup / (uncompressed FLOPs / model FLOPs)``: 1.0 means the wall-clock gain
equals the FLOPs saving, below 1.0 means time is lost in the merge (gathers, scatters, sorts)
or in matrix products that run less efficiently on fewer tokens.

Timing protocol: eval mode, ``torch.inference_mode()``, autocast for bf16/fp16, one random batch
created once on the device, ``warmup`` untimed forwards, then the median of ``runs`` timed
forwards (``time.perf_counter``, with ``torch.cuda.synchronize()`` on CUDA). When several models
are compared they are timed *interleaved*, one forward of each per round, so that a burst of
load on a shared machine slows all of them alike instead of biasing one ratio.

Run as ``python -m pyra_lightning.commands.benchmark --merge_r '[low, high]' --output bench.json``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pyra_lightning.accounting import count_flops
from pyra_lightning.patch import apply_lora, apply_merging, fold_lora, mark_trainable, merge_schedule

Precision = Literal["32", "bf16", "16"]
# One schedule as ``apply_merging`` takes it; ``(r, inflection)`` tuples are left out because a
# command line cannot tell them from per-layer lists.
ScheduleSpec = int | float | str | list[int]

_AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "16": torch.float16}
_IN_CHANS = 3  # RGB, as every timm ViT the patch supports


@contextlib.contextmanager
def _autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Mixed precision as Lightning's ``precision="bf16-mixed"``/``"16-mixed"`` would run it."""
    if precision == "32":
        yield
        return
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r}: expected '32', 'bf16' or '16'")
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]):
        yield


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a timer measures the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_images(batch_size: int, img_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, _IN_CHANS, img_size, img_size, generator=generator)  # (B, 3, H, W)
    return x.to(device)


def _timed(
    fn: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> float:
    _synchronize(device)
    start = clock()
    fn()
    _synchronize(device)
    return clock() - start


def _round_robin(names: list[str], runs: int) -> Iterator[str]:
    """``runs`` rounds over ``names``, rotated each round so no model always follows the same one."""
    for run in range(runs):
        shift = run % len(names)
        yield from names[shift:] + names[:shift]


def time_forwards(
    models: Mapping[str, nn.Module],
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per inference forward of each model, measured round-robin.

    Interleaving matters on shared or thermally throttled machines: the ratios the benchmark
    reports (speed-up, PYRA vs ToMe) compare runs taken seconds apart instead of minutes apart.

    Args:
        models: Models by name; each is put in eval mode for the measurement and restored after.
        batch_size: Images per forward.
        img_size: Square input resolution in pixels.
        device: Where the input is created; the models must already be there.
        precision: ``"32"`` for fp32, ``"bf16"``/``"16"`` for autocast to bfloat16/float16.
        warmup: Untimed forwards per model before timing (allocator, caches, compiled graphs).
        runs: Timed forwards per model.
        clock: Wall time by default. On a shared CPU, ``time.process_time`` with one thread
            measures the work done rather than how long the scheduler kept the process waiting.

    Returns:
        The ``runs`` timings of every model, in seconds, in the order they were taken.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = torch.device(device)
    x = _random_images(batch_size, img_size, device)
    was_training = {name: model.training for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode(), _autocast(device, precision):
            for _ in range(warmup):
                for model in models.values():
                    model(x)
            for name in _round_robin(list(models), runs):
                times[name].append(_timed(lambda model=models[name]: model(x), device, clock))
    finally:
        for name, model in models.items():
            model.train(was_training[name])
    return times


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

    The model alone is timed (no data loading); see ``time_forwards`` for the protocol and the
    arguments. The median rather than the mean keeps one preempted run from moving the result.
    """
    times = time_forwards({"model": model}, batch_size, img_size, device, precision, warmup, runs)
    return batch_size / statistics.median(times["model"])


def _saved_activation_bytes(step: Callable[[], object], params: Sequence[nn.Parameter]) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``step``, weights excluded.

    This is the activation memory that token merging shrinks, and unlike peak memory it can be
    measured on any device: a merged block saves activations of ``N - merge_r`` tokens only.
    """
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def _training_step(
    model: nn.Module, x: torch.Tensor, device: torch.device, precision: Precision
) -> tuple[Callable[[], None], Callable[[], torch.Tensor]]:
    """``step()`` (forward, cross-entropy, backward, drop the gradients) and ``loss()`` alone."""
    target = torch.arange(x.shape[0], device=device) % model.num_classes

    def loss() -> torch.Tensor:
        with _autocast(device, precision):
            out = model(x)
        outputs = out if isinstance(out, tuple) else (out,)  # distilled DeiT trains two heads
        return sum(F.cross_entropy(o.float(), target) for o in outputs)

    def step() -> None:
        loss().backward()
        model.zero_grad(set_to_none=True)

    return step, loss


def time_training_steps(
    models: Mapping[str, nn.Module],
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, float | str | None]]:
    """Images/s of a training step (forward, cross-entropy, backward) and its memory, per model.

    Only LoRA, PYRA and the head get gradients (``mark_trainable``, which this applies), as in
    training; no optimizer step is taken, because its cost does not depend on merging. Gradients
    are dropped after each step (``zero_grad(set_to_none=True)``) so every step allocates alike.
    Steps are interleaved round-robin, as in ``time_forwards``.

    Args:
        models: Timm ViTs with LoRA (not folded) and optionally merging, on ``device``.
        batch_size, img_size, device, precision, warmup, runs, clock: As in ``time_forwards``.

    Returns:
        Per model: ``images_per_s``; ``median_s``; ``trainable_params``; ``peak_memory_mb`` and
        ``peak_memory_source``: on CUDA the step's peak of ``torch.cuda.max_memory_allocated``
        above what was allocated before it, plus the model's own weights (what the model alone
        would reach, whatever else is resident); on CPU ``None``, because the CPU allocator keeps
        no peak and the process RSS high-water mark would include every other model; and
        ``saved_activations_mb``, the tensors autograd keeps for backward, on every device.
    """
    device = torch.device(device)
    x = _random_images(batch_size, img_size, device)
    steps, losses = {}, {}
    for name, model in models.items():
        mark_trainable(model)
        model.train()
        steps[name], losses[name] = _training_step(model, x, device, precision)
    for _ in range(warmup):
        for step in steps.values():
            step()
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in models}
    transient = dict.fromkeys(models, 0)
    for name in _round_robin(list(models), runs):
        if cuda:
            _synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times[name].append(_timed(steps[name], device, clock))
        if cuda:
            transient[name] = max(transient[name], torch.cuda.max_memory_allocated(device) - before)
    results = {}
    for name, model in models.items():
        median = statistics.median(times[name])
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        results[name] = {
            "images_per_s": batch_size / median,
            "median_s": median,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_memory_mb": (transient[name] + weights) / 2**20 if cuda else None,
            "peak_memory_source": "torch.cuda.max_memory_allocated" if cuda else None,
            "saved_activations_mb": _saved_activation_bytes(losses[name], list(model.parameters())) / 2**20,
        }
    return results


def measure_training_step(
    model: nn.Module,
    batch_size: int,
    img_size: int,
    device: str | torch.device = "cpu",
    precision: Precision = "32",
    warmup: int = 3,
    runs: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float | str | None]:
    """``time_training_steps`` for one model: training images/s, peak and activation memory."""
    return time_training_steps(
        {"model": model}, batch_size, img_size, device, precision, warmup, runs, clock
    )["model"]


def build_model(
    model_name: str,
    merge_r: ScheduleSpec | None,
    pyra: bool,
    lora_rank: int = 8,
    num_classes: int = 100,
    img_size: int = 224,
    fold: bool = True,
    device: str | torch.device = "cpu",
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A randomly initialised timm ViT with LoRA, merging (unless ``merge_r`` is None), folded.

    Every model starts from the same seed, so the variants differ only in what the patch adds.
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``{"depth": 4}``).
    """
    torch.manual_seed(0)
    model = timm.create_model(
        model_name, pretrained=False, num_classes=num_classes, img_size=img_size, **(model_kwargs or {})
    )
    apply_lora(model, lora_rank)
    if merge_r is not None:
        apply_merging(model, merge_r, pyra=pyra)
    if fold:
        fold_lora(model)
    return model.to(device)


def _label(spec: ScheduleSpec, index: int) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, list):
        return f"list{index}"
    return f"r={spec}" if isinstance(spec, int) else f"flops={spec:g}"


def _as_schedule_list(merge_r: Sequence[ScheduleSpec] | ScheduleSpec) -> list[ScheduleSpec]:
    """One schedule or a list of them; a per-layer list must therefore be nested (``[[16, ...]]``)."""
    if isinstance(merge_r, (str, int, float)):
        return [merge_r]
    return list(merge_r)


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What a benchmark figure depends on besides the arguments."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _compile(
    models: dict[str, nn.Module], batch_size: int, img_size: int, device: torch.device, precision: Precision
) -> dict[str, float]:
    """Replace every model by ``torch.compile(model)`` in place; return each one's compile seconds.

    Compilation happens on the first call, so that call is timed on its own and kept out of the
    throughput figures.
    """
    x = _random_images(batch_size, img_size, device)
    seconds = {}
    for name, model in models.items():
        model.eval()
        compiled = torch.compile(model)
        with torch.inference_mode(), _autocast(device, precision):
            seconds[name] = _timed(lambda compiled=compiled: compiled(x), device)
        models[name] = compiled  # type: ignore[assignment]
    return seconds


def run_benchmark(
    model_name: str = "vit_base_patch16_224",
    merge_r: Sequence[int | float | str | list[int]] | int | float | str = ("low", "high"),
    batch_size: int = 8,
    img_size: int = 224,
    device: str = "cpu",
    precision: Precision = "32",
    compile: bool = False,
    runs: int = 10,
    warmup: int = 3,
    lora_rank: int = 8,
    num_classes: int = 100,
    train: bool = False,
    threads: int | None = None,
    clock: Literal["wall", "cpu"] = "wall",
    output: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare the uncompressed, ToMe and PYRA versions of one ViT at one or more schedules.

    Args:
        model_name: A timm ViT name; built with random weights (speed does not depend on them).
        merge_r: The schedules to compare, each in a form ``apply_merging`` accepts: ``"low"``/
            ``"high"`` (the paper's), an int, a FLOPs fraction, or a nested per-layer list.
        batch_size: Images per forward.
        img_size: Input resolution; the paper's named schedules exist for 224 only.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: ``"32"``, or ``"bf16"``/``"16"`` for autocast.
        compile: Time ``torch.compile``d models (default mode); compile time is reported apart.
        runs: Timed forwards per model (the median is reported).
        warmup: Untimed forwards per model first.
        lora_rank: LoRA rank before folding; it changes nothing at inference, only training.
        num_classes: Classes of the random head (the paper's VTAB-1k tasks have up to 397).
        train: Also time a training step (LoRA unfolded, backbone frozen) of every model.
        threads: ``torch.set_num_threads`` for CPU runs; ``None`` keeps torch's default.
        clock: ``"wall"`` (``time.perf_counter``), or ``"cpu"`` (process CPU time) for inference
            on a CPU shared with other jobs; use it with ``threads=1``, where CPU time is the work
            done and not the time spent waiting for a core.
        output: Write the results as JSON to this path.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{"depth": 4}`` for a quick run.

    Returns:
        ``{"args", "environment", "models", "pyra_vs_tome"[, "training"]}``: per model its
        schedule, ``images_per_s``, ``gflops`` (``count_flops`` of one image / 1e9),
        ``speedup`` and ``efficiency`` (speed-up over FLOPs reduction, 1.0 ideal).
    """
    args = dict(locals())
    schedules = _as_schedule_list(merge_r)
    args["merge_r"] = schedules
    with _num_threads(threads):
        result = _run(args, schedules)
    print(format_table(result))
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as file:
            json.dump(result, file, indent=2)
    return result


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(args: dict[str, Any], schedules: list[ScheduleSpec]) -> dict[str, Any]:
    """The measurements of ``run_benchmark``, given its arguments."""
    model_name, lora_rank, num_classes = args["model_name"], args["lora_rank"], args["num_classes"]
    batch_size, img_size, precision = args["batch_size"], args["img_size"], args["precision"]
    warmup, runs, model_kwargs = args["warmup"], args["runs"], args["model_kwargs"]
    dev = torch.device(args["device"])

    def build(spec: ScheduleSpec | None, pyra: bool, fold: bool = True) -> nn.Module:
        return build_model(model_name, spec, pyra, lora_rank, num_classes, img_size, fold, dev, model_kwargs)

    variants: dict[str, tuple[ScheduleSpec | None, bool]] = {"uncompressed": (None, False)}
    for index, spec in enumerate(schedules):
        label = _label(spec, index)
        variants[f"tome/{label}"] = (spec, False)
        variants[f"pyra/{label}"] = (spec, True)

    env_before = environment(dev)
    models = {name: build(spec, pyra) for name, (spec, pyra) in variants.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        spec, pyra = variants[name]
        rows[name] = {
            "method": name.split("/")[0],
            "merge_r": spec,
            "schedule": merge_schedule(model),
            "gflops": count_flops(model, img_size) / 1e9,
        }
    if args["compile"]:
        for name, seconds in _compile(models, batch_size, img_size, dev, precision).items():
            rows[name]["compile_s"] = seconds
    clock = time.process_time if args["clock"] == "cpu" else time.perf_counter
    times = time_forwards(models, batch_size, img_size, dev, precision, warmup, runs, clock)
    del models
    base = rows["uncompressed"]
    base_ips = batch_size / statistics.median(times["uncompressed"])
    for name, row in rows.items():
        median = statistics.median(times[name])
        row["images_per_s"] = batch_size / median
        row["median_ms"] = 1e3 * median
        row["min_ms"] = 1e3 * min(times[name])
        row["speedup"] = row["images_per_s"] / base_ips
        row["flops_reduction"] = base["gflops"] / row["gflops"]
        row["efficiency"] = row["speedup"] / row["flops_reduction"]
    pyra_vs_tome = {
        name.split("/", 1)[1]: row["images_per_s"] / rows["tome/" + name.split("/", 1)[1]]["images_per_s"]
        for name, row in rows.items()
        if row["method"] == "pyra"
    }
    result: dict[str, Any] = {
        "args": args,
        "environment": env_before,
        "models": rows,
        "pyra_vs_tome": pyra_vs_tome,
    }
    if args["train"]:
        trainees = {name: build(spec, pyra, fold=False) for name, (spec, pyra) in variants.items()}
        result["training"] = time_training_steps(
            trainees, batch_size, img_size, dev, precision, warmup, runs, clock
        )
    result["environment"]["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table padded so that it also reads as aligned columns in a terminal."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    rule = ["-" * (width - 1) + ":" if index else "-" * width for index, width in enumerate(widths)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(w) if index == 0 else cell.rjust(w)
            for index, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    return [line(header), line(rule), *(line(row) for row in rows)]


def format_table(result: dict[str, Any]) -> str:
    """The results of ``run_benchmark`` as Markdown tables with aligned columns."""
    args, env = result["args"], result["environment"]
    lines = [
        f"{args['model_name']}, batch {args['batch_size']}, {args['img_size']} px, precision {args['precision']}, "
        f"{env['device_name']} ({env['threads']} threads), torch {env['torch']}, timm {env['timm']}, "
        f"median of {args['runs']} interleaved runs after {args['warmup']} warm-up ({args['clock']} clock), "
        f"loadavg {env['loadavg']} -> {env.get('loadavg_after')}",
        "",
    ]
    lines += _markdown_table(
        ["model", "img/s", "ms/batch", "GFLOPs", "speedup", "FLOPs reduction", "efficiency"],
        [
            [
                name,
                f"{row['images_per_s']:.2f}",
                f"{row['median_ms']:.1f}",
                f"{row['gflops']:.2f}",
                f"{row['speedup']:.2f}x",
                f"{row['flops_reduction']:.2f}x",
                f"{row['efficiency']:.3f}",
            ]
            for name, row in result["models"].items()
        ],
    )
    lines += [
        "",
        "PYRA / ToMe throughput: " + ", ".join(f"{k} {v:.3f}" for k, v in result["pyra_vs_tome"].items()),
    ]
    if any("compile_s" in row for row in result["models"].values()):
        lines.append(
            "compile seconds: " + ", ".join(f"{k} {r['compile_s']:.1f}" for k, r in result["models"].items())
        )
    if "training" in result:
        lines.append("")
        lines += _markdown_table(
            ["model (training step)", "img/s", "ms/batch", "peak MB", "saved activations MB"],
            [
                [
                    name,
                    f"{row['images_per_s']:.2f}",
                    f"{1e3 * row['median_s']:.1f}",
                    _fmt(row["peak_memory_mb"], ".0f"),
                    f"{row['saved_activations_mb']:.0f}",
                ]
                for name, row in result["training"].items()
            ],
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line for ``run_benchmark``: every argument is a ``--flag`` (see ``--help``)."""
    from jsonargparse import CLI

    CLI(run_benchmark, args=argv)


if __name__ == "__main__":
    main()
