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

Timing protocol (``pyra_lightning.timing``, shared with the ``InferenceThroughput`` callback):
eval mode, ``torch.inference_mode()``, autocast for bf16/fp16, one random batch created once on
the device, ``warmup`` untimed forwards, then the median of ``runs`` timed forwards
(``time.perf_counter``, with ``torch.cuda.synchronize()`` on CUDA). Models and engines are timed
*interleaved*, one forward of each per round, so that a burst of load on a shared machine slows
all of them alike instead of biasing one ratio.

Deployment: ``--engine eager,compile,onnxruntime,aoti`` times the same models on several engines
(the exported ones are rows of ``formats.FORMATS``), interleaved, at every ``--batch_sizes``;
speed-up and efficiency compare each engine with its own uncompressed model. ``--target_speedup
S`` finds the schedule that reaches a measured speed-up instead (``commands/engines.py``).

Run as ``pyra-lightning benchmark --merge_r '[low, high]' --engine eager,onnxruntime
--batch_sizes 1,8,32 --output bench.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pyra_lightning.commands.benchmark_table import format_table, progress, table_rows
from pyra_lightning.commands.engines import build_runner, parse_batch_sizes, parse_engines
from pyra_lightning.commands.training_speed import time_training_steps
from pyra_lightning.timing import (
    ClockName,
    Precision,
    clock_function,
    cpu_model,
    device_name,
    held,
    load_average,
    num_threads,
    resolve_clock,
    time_interleaved,
)

# One schedule as ``apply_merging`` takes it; ``(r, inflection)`` tuples are left out because a
# command line cannot tell them from per-layer lists.
ScheduleSpec = int | float | str | list[int]
# apply_merging's merge rule and attention kernel where neither the command nor a checkpoint names them
DEFAULT_RULE = {"matcher": "bipartite", "merger": "wavg", "attention": "sdpa"}


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
    rule: dict[str, str] | None = None,
) -> nn.Module:
    """A randomly initialised timm ViT with LoRA, merging (unless ``merge_r`` is None), folded.

    Every model starts from the same seed, so the variants differ only in what the patch adds.
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``{"depth": 4}``); ``rule`` to
    ``apply_merging`` (``matcher``, ``merger``, ``attention``).
    """
    import timm

    from pyra_lightning.backbone import check_model_name
    from pyra_lightning.patch import apply_lora, apply_merging, check_model, fold_lora

    check_model_name(model_name)
    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes, **(model_kwargs or {})}
    try:
        model = timm.create_model(model_name, pretrained=False, img_size=img_size, **kwargs)
    except TypeError as error:  # e.g. a CNN (resnet18) takes no img_size: say what it is instead
        check_model(timm.create_model(model_name, pretrained=False, **kwargs))
        raise ValueError(f"timm.create_model({model_name!r}, img_size={img_size}): {error}") from error
    check_model(model)  # the one-line refusal apply_merging gives, before LoRA is attempted
    apply_lora(model, lora_rank)
    if merge_r is not None:
        apply_merging(model, merge_r, pyra=pyra, **(rule or {}))
    if fold:
        fold_lora(model)
    return model.to(device)


def _label(spec: ScheduleSpec) -> str:
    """A schedule's row name: its name, ``r=8``, ``flops=0.5``, or a list by its contents (``16x11,10``)."""
    from pyra_lightning.commands.table import describe_schedule

    if isinstance(spec, str):
        return spec
    if isinstance(spec, list):
        return describe_schedule(spec)
    return f"r={spec}" if isinstance(spec, int) else f"flops={spec:g}"


def _as_schedule_list(merge_r: Sequence[ScheduleSpec] | ScheduleSpec) -> list[ScheduleSpec]:
    """One schedule or a list of them; a per-layer list must therefore be nested (``[[16, ...]]``)."""
    if isinstance(merge_r, (str, int, float)):
        return [merge_r]
    return list(merge_r)


def environment(device: torch.device) -> dict[str, Any]:
    """What a benchmark figure depends on besides the arguments."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": importlib.metadata.version("timm"),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": load_average(),
    }


def run_benchmark(
    model_name: str = "vit_base_patch16_224",
    merge_r: Sequence[int | float | str | list[int]] | int | float | str = ("low", "high"),
    batch_size: int = 8,
    batch_sizes: list[int] | str | None = None,
    img_size: int = 224,
    device: str = "cpu",
    precision: Precision = "32",
    engine: list[str] | str = "eager",
    compile_mode: str | None = None,
    runs: int = 10,
    warmup: int = 3,
    lora_rank: int = 8,
    num_classes: int = 100,
    train: bool = False,
    train_compile: bool = False,
    threads: int | None = None,
    clock: ClockName = "wall",
    output: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    target_speedup: float | None = None,
    target_pyra: bool = True,
    target_iterations: int = 7,
    ckpt_path: str | None = None,
    matcher: str | None = None,
    merger: str | None = None,
    attention: str | None = None,
) -> dict[str, Any]:
    """Compare the uncompressed, ToMe and PYRA versions of one ViT, per engine and batch size.

    Args:
        model_name: A timm ViT name; built with random weights (speed does not depend on them).
        merge_r: The schedules to compare, each in a form ``apply_merging`` accepts: ``"low"``/
            ``"high"`` (the paper's), an int, a FLOPs fraction, or a nested per-layer list.
        batch_size: Images per forward (when ``batch_sizes`` is not given).
        batch_sizes: Several batch sizes, e.g. ``1,8,32``; each is a separate interleaved run.
        img_size: Input resolution; the paper's named schedules exist for 224 only.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: ``"32"``, ``"bf16"``/``"16"`` for autocast, or ``"bf16-true"``/``"16-true"``
            for the models held in bf16/fp16 (Lightning's true precisions; no autocast). The
            exported engines (``onnxruntime``, ``aoti``) run ``"32"`` only.
        engine: One or more of ``eager``, ``compile`` (``torch.compile(dynamic=False)``: a static
            graph per batch size, graph breaks allowed), ``inductor``, ``cudagraph``,
            ``inductor-cudagraph`` (``compile_for_inference``), ``onnxruntime``
            (``to_onnx`` + ONNX Runtime), ``aoti`` (AOTInductor), comma-separated. All models on
            all engines are timed interleaved; export and compile time is reported apart. An
            engine that cannot run here is skipped with its reason.
        compile_mode: ``torch.compile`` mode for the ``compile`` engine and for
            ``train_compile`` (``reduce-overhead``: CUDA graphs).
        runs: Timed forwards per model and engine (the median is reported).
        warmup: Untimed forwards per model and engine first.
        lora_rank: LoRA rank before folding; it changes nothing at inference, only training.
        num_classes: Classes of the random head (the paper's VTAB-1k tasks have up to 397).
        train: Also time a training step (LoRA unfolded, backbone frozen) of every model, at the
            first batch size.
        train_compile: Compile those training steps (``torch.compile``, forward and backward).
        threads: ``torch.set_num_threads`` (and ONNX Runtime's intra-op threads) for CPU runs;
            ``None`` keeps torch's default.
        clock: ``"wall"`` (``time.perf_counter``), or ``"cpu"`` (process CPU time) for inference
            on a CPU shared with other jobs; use it with ``threads=1``, where CPU time is the work
            done and not the time spent waiting for a core. ``"auto"``: ``cpu`` on a CPU with
            ``threads=1``, ``wall`` otherwise (``timing.resolve_clock``); the JSON names the one used.
        output: Write the results as JSON to this path.
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{"depth": 4}`` for a quick run.
        target_speedup: Instead of the comparison, find the gentlest schedule whose measured
            speed-up over the uncompressed model reaches this (first engine and batch size), by
            bisection over the FLOPs solver's family; prints it as a ``model.merging.merge_r`` list.
        target_pyra: The speed-target search times PYRA (True) or ToMe (False) models.
        target_iterations: Bisection steps of the speed-target search.
        ckpt_path: With ``target_speedup``: search on this elastic run's own model (its
            checkpoint: backbone, trained LoRA and PYRA, deployable at any schedule of its range)
            and only inside the range it was trained for; a target the range cannot reach, or a
            checkpoint trained at one schedule, is refused. The model arguments above are then
            the checkpoint's.
        matcher: The merged models' matcher (``merge_rules.MATCHERS``; ``triton`` on CUDA);
            ``None``: ``bipartite``, or with ``ckpt_path`` the checkpoint's own.
        merger: Their merger (``merge_rules.MERGERS``; ``triton``: the fused merge kernels);
            ``None``: ``wavg``, or the checkpoint's.
        attention: Their attention kernel (``kernels.attention.ATTENTIONS``: ``sdpa``, ``flex``);
            ``None``: ``sdpa``, or the checkpoint's.

    Returns:
        ``{"args", "environment", "models", "table", "skipped", "pyra_vs_tome"[, "training"]}``:
        ``models`` holds each model's schedule and ``gflops`` (``count_flops`` of one image / 1e9)
        and the figures of the first engine and batch size; ``table`` one row per engine, batch
        size and model with ``images_per_s``, ``speedup`` over the same engine's uncompressed
        model and ``efficiency`` (speed-up over FLOPs reduction, 1.0 ideal). With
        ``target_speedup``: ``{"args", "environment", "target"}``.
    """
    args = dict(locals())
    args["clock"] = resolve_clock(clock, device, threads)  # the JSON names the clock that timed
    if ckpt_path is None:  # with ckpt_path, unset ones become the checkpoint's (``_elastic_builder``)
        args.update({key: args[key] or default for key, default in DEFAULT_RULE.items()})
    if train_compile and not train:
        raise ValueError("--train_compile compiles the training steps of --train; add --train")
    if ckpt_path is not None and target_speedup is None:
        raise ValueError("--ckpt_path is an option of --target_speedup (the search on an elastic run)")
    if ckpt_path is not None and not target_pyra:
        raise ValueError("--target_pyra false with --ckpt_path: an elastic PYRA run deploys with its PYRA")
    schedules = _as_schedule_list(merge_r)
    args["merge_r"] = schedules
    args["engine"] = parse_engines(engine)
    args["batch_sizes"] = parse_batch_sizes(batch_size if batch_sizes is None else batch_sizes)
    with num_threads(threads):
        result = _run_target(args) if target_speedup is not None else _run(args, schedules)
    print(format_table(result))
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as file:
            json.dump(result, file, indent=2)
    return result


def _clock(args: dict[str, Any]) -> Callable[[], float]:
    return clock_function(args["clock"])


def _builder(args: dict[str, Any]) -> Callable[..., nn.Module]:
    def build(spec: ScheduleSpec | None, pyra: bool, fold: bool = True) -> nn.Module:
        return build_model(
            args["model_name"],
            spec,
            pyra,
            args["lora_rank"],
            args["num_classes"],
            args["img_size"],
            fold,
            torch.device(args["device"]),
            args["model_kwargs"],
            {key: args[key] for key in DEFAULT_RULE},
        )

    return build


def _runner_kwargs(args: dict[str, Any], workdir: str) -> dict[str, Any]:
    return {
        "img_size": args["img_size"],
        "device": args["device"],
        "precision": args["precision"],
        "workdir": workdir,
        "threads": args["threads"],
        "compile_mode": args["compile_mode"],
    }


def _run(args: dict[str, Any], schedules: list[ScheduleSpec]) -> dict[str, Any]:
    """The measurements of ``run_benchmark``, given its arguments."""
    from pyra_lightning.accounting import count_flops
    from pyra_lightning.patch import merge_schedule

    dev = torch.device(args["device"])
    build = _builder(args)
    variants: dict[str, tuple[ScheduleSpec | None, bool]] = {"uncompressed": (None, False)}
    for spec in schedules:
        label = _label(spec)
        variants[f"tome/{label}"] = (spec, False)
        variants[f"pyra/{label}"] = (spec, True)

    env_before = environment(dev)
    progress(f"building {args['model_name']}: {', '.join(variants)}")
    # held once in the timed dtype (``bf16-true``: a bf16 copy), not again per engine and batch size
    models = {name: held(build(spec, pyra), args["precision"]) for name, (spec, pyra) in variants.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        spec, pyra = variants[name]
        rows[name] = {
            "method": name.split("/")[0],
            "merge_r": spec,
            "schedule": merge_schedule(model),
            "gflops": count_flops(model, args["img_size"]) / 1e9,
        }
    for row in rows.values():
        row["flops_reduction"] = rows["uncompressed"]["gflops"] / row["gflops"]
    table, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="pyra-bench-") as workdir:
        for batch in args["batch_sizes"]:
            runners: dict[str, Callable[[], object]] = {}
            setup: dict[str, float] = {}
            for engine in args["engine"]:
                if engine in skipped:
                    continue
                if engine != "eager":
                    progress(f"batch {batch}, {engine}: preparing {len(models)} models")
                try:
                    for name, model in models.items():
                        built = build_runner(engine, model, batch, **_runner_kwargs(args, workdir))
                        runners[f"{engine}|{name}"], setup[f"{engine}|{name}"] = built.run, built.setup_s
                except Exception as error:  # one engine failing must not lose the others
                    skipped[engine] = f"{type(error).__name__}: {error}"
                    progress(f"{engine} skipped: {skipped[engine]}")
                    runners = {k: v for k, v in runners.items() if not k.startswith(f"{engine}|")}
            if not runners:
                continue
            each = f"{args['warmup']} warm-up + {args['runs']} timed forwards each"
            progress(f"batch {batch}: timing {len(runners)} model-engine pairs interleaved, {each}")
            times = time_interleaved(runners, args["warmup"], args["runs"], dev, _clock(args))
            table += table_rows(times, setup, rows, batch)
    figures = [
        r for r in table if r["engine"] == args["engine"][0] and r["batch_size"] == args["batch_sizes"][0]
    ]
    for figure in figures:
        rows[figure["model"]].update(
            {k: figure[k] for k in ("images_per_s", "median_ms", "min_ms", "speedup", "efficiency")}
        )
    pyra_vs_tome = {
        name.split("/", 1)[1]: row["images_per_s"] / rows["tome/" + name.split("/", 1)[1]]["images_per_s"]
        for name, row in rows.items()
        if row["method"] == "pyra" and "images_per_s" in row
    }
    result: dict[str, Any] = {
        "args": args,
        "environment": env_before,
        "models": rows,
        "table": table,
        "skipped": skipped,
        "pyra_vs_tome": pyra_vs_tome,
    }
    if args["train"]:
        progress(f"timing the training steps of {len(variants)} models at batch {args['batch_sizes'][0]}")
        trainees = {name: build(spec, pyra, fold=False) for name, (spec, pyra) in variants.items()}
        result["training"] = time_training_steps(
            trainees,
            args["batch_sizes"][0],
            args["img_size"],
            dev,
            args["precision"],
            args["warmup"],
            args["runs"],
            _clock(args),
            compiled=args["train_compile"],
            compile_mode=args["compile_mode"],
        )
    result["environment"]["loadavg_after"] = load_average()
    return result


def _run_target(args: dict[str, Any]) -> dict[str, Any]:
    """``--target_speedup``: the measured bisection of ``engines.search_speed_target``."""
    from pyra_lightning.commands.engines import search_speed_target
    from pyra_lightning.patch import vit_shape

    dev = torch.device(args["device"])
    build = _builder(args)
    engine, batch = args["engine"][0], args["batch_sizes"][0]
    env_before = environment(dev)
    bounds: dict[str, Any] = {}
    if args["ckpt_path"] is not None:
        build, shape, bounds = _elastic_builder(args)
    else:
        shape = vit_shape(build(None, False))
    with tempfile.TemporaryDirectory(prefix="pyra-target-") as workdir:

        def make_runner(schedule: list[int]) -> Callable[[], object]:
            model = build(schedule if any(schedule) else None, args["target_pyra"])
            return build_runner(engine, model, batch, **_runner_kwargs(args, workdir)).run

        found = search_speed_target(
            args["target_speedup"],
            shape,
            make_runner,
            warmup=args["warmup"],
            runs=args["runs"],
            iterations=args["target_iterations"],
            clock=_clock(args),
            device=dev,
            **bounds,
        )
    env_before["loadavg_after"] = load_average()
    return {"args": args, "environment": env_before, "target": dataclasses.asdict(found)}


def _elastic_builder(args: dict[str, Any]) -> tuple[Callable[..., nn.Module], Any, dict[str, Any]]:
    """``--target_speedup`` on an elastic checkpoint: its deployable model at any schedule, the
    model's shape, and the search's bound (the range's fastest point).

    Raises:
        ValueError: the checkpoint was trained at one schedule (not elastic).
    """
    from pyra_lightning.commands.export import (
        load_trainable,
        module_from_checkpoint,
        random_backbone,
        read_checkpoint,
        recorded_seed,
    )
    from pyra_lightning.patch import set_merge_rule
    from pyra_lightning.schedules import solve_flops_rho

    path = args["ckpt_path"]
    checkpoint = read_checkpoint(path)
    seed = recorded_seed(checkpoint)  # a random-weight backbone is rebuilt from the fit's seed
    module = module_from_checkpoint(checkpoint, 0 if seed is None and random_backbone(checkpoint) else seed)
    load_trainable(module, checkpoint)
    plan = module.elastic_plan
    if plan is None:
        raise ValueError(
            f"--ckpt_path {path} was trained at one schedule, not for a range (no model.merging.elastic): "
            "it deploys only at that schedule. Leave --ckpt_path out to find a schedule to train, or "
            "fit an elastic run (configs/method/pyra_elastic.yaml)"
        )
    module.to(torch.device(args["device"]))
    hp = module.hparams  # what was timed is the checkpoint's model: record its arguments
    args.update(
        model_name=hp.model_name,
        img_size=int(hp.img_size),
        num_classes=int(hp.num_classes),
        model_kwargs=hp.model_kwargs,
        lora_rank=module.lora.rank,
    )

    merging = module.hparams["merging"]  # the fit's own rule, unless the command names another
    rule = {key: args[key] or merging.get(key) or DEFAULT_RULE[key] for key in DEFAULT_RULE}
    args.update(rule)

    def build(spec: list[int] | None, pyra: bool, fold: bool = True) -> nn.Module:
        schedule = [0] * plan.shape.depth if spec is None else list(spec)
        if not any(schedule):
            return module.folded_copy(schedule)
        plan.check(schedule, "target schedule")
        return set_merge_rule(module.folded_copy(schedule), **rule)

    fastest, gentlest = plan.config.min_fraction, plan.config.max_fraction
    bounds = {
        "max_rho": solve_flops_rho(fastest, plan.shape) if fastest < 1.0 else 0.0,
        "min_rho": solve_flops_rho(gentlest, plan.shape) if gentlest < 1.0 else 0.0,
        "bound": f"the trained range's fastest point, {plan.describe()}",
    }
    return build, plan.shape, bounds


def main(argv: list[str] | None = None) -> None:
    """Command line for ``run_benchmark``: every argument is a ``--flag`` (see ``--help``).

    timm and the patch are imported only when a benchmark runs, so ``--help`` answers fast.
    """
    from jsonargparse import CLI

    CLI(run_benchmark, args=argv, prog="pyra-lightning benchmark", allow_abbrev=False)


if __name__ == "__main__":
    main()
