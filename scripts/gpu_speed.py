"""The ``speed`` and ``train_step`` parts of scripts/gpu_check.py (kept apart so each
file stays short).

``speed`` answers issue 17's question first: ViT-B/16 bf16 at batch 1, 64, 256, uncompressed /
ToMe high / PYRA low / PYRA high, on eager, ``cudagraph`` and ``inductor-cudagraph``
(``pyra_lightning.compile_for_inference``); kernel launches per forward (``torch.profiler``),
peak memory, SDPA with the ``log(size)`` mask against FlexAttention. Every finished measurement
is saved at once (``save``), so a timeout keeps them.

Rows are timed in groups, side by side: every model of a group (one engine, one batch size) is
built first, then all are timed interleaved, round robin, each call timed alone (``_interleaved_ms``),
so a speed-up compares figures taken in the same seconds, not minutes apart as clocks and
neighbours change. A row's ``group`` names its group; its speed-up is over that group's
uncompressed model. Kernels are counted last, after every timing, since a profiler session can
leave the process slower than it found it. The Triton kernels are measured eager and on
``cudagraph`` by the ``kernels`` part (``scripts/gpu_kernels.py``) in a process of their own: a
fault in one of them (an illegal address poisons the CUDA context) cannot cost these rows. Only
their compiled models run here, after every eager and ``cudagraph`` row is saved.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

# Compiling is the expensive part: at most these (model, batch) pairs, in this order, each only
# if it should finish inside the part's limit (``compile_estimate_s``). After each compile, that
# batch's compiled models are timed again, side by side. Since the Triton kernels became custom
# operators that inductor keeps (``pyra_lightning.kernels``), the compiled ``+kernels`` model
# is the candidate best deployment, so it comes first at every batch; on 2026-12-04 the 256
# pair took 21 s (uncompressed) and 102 s (PYRA high, torch rule) to compile. Batch 1 comes next:
# it is bound by kernel count (0.64x on ``cudagraph``), which only a compile's fusion lowers, and
# it was never compiled. ToMe high is there so that PYRA's cost over ToMe can be read on the
# compiled engine too.
COMPILED = [
    ("uncompressed", 256),
    ("pyra/high+kernels", 256),
    ("uncompressed", 1),
    ("pyra/high+kernels", 1),
    ("uncompressed", 64),
    ("pyra/high+kernels", 64),
    ("pyra/high-align8+kernels", 256),
    ("tome/high+kernels", 256),
    ("pyra/high", 64),
    ("pyra/high+flex", 256),
]
FIRST_COMPILE_S = 60.0  # a ViT-B/16 compile and capture, until one of the kind is measured


def compile_estimate_s(seen: dict[str, float], name: str) -> float:
    """Seconds to expect for compiling model ``name``: the slowest compile seen of its kind, the
    uncompressed model or a merged one (on 2026-12-04: 21 s against 102 s at batch 256, so one
    estimate for both would skip an uncompressed compile that fits), else ``FIRST_COMPILE_S``."""
    return seen.get(_compile_kind(name), FIRST_COMPILE_S)


def note_compile_s(seen: dict[str, float], name: str, seconds: float) -> None:
    """Record a compile of ``name`` that took ``seconds`` for ``compile_estimate_s``."""
    kind = _compile_kind(name)
    seen[kind] = max(seen.get(kind, 0.0), seconds)


def _compile_kind(name: str) -> str:
    return "uncompressed" if name == "uncompressed" else "merged"


KERNELS = "+kernels"
# Lightning's name for a model held in bf16, run without autocast: under bf16 autocast the
# residual stream and every elementwise pass stay fp32 (the uncompressed model ran at half the
# matmul rate on 2026-12-04), so a deployment may hold the model in bf16 instead.
HELD = "bf16-true"
# The merge rule and attention kernel of a model variant: "+kernels" runs every Triton kernel,
# the matcher, the merger and proportional attention (eager and CUDA graphs; until 2026-12-05
# it attended with SDPA's mask), "+flex" FlexAttention (fused only when compiled).
RULES = {
    "": {},
    "+kernels": {"matcher": "triton", "merger": "triton", "attention": "triton"},
    "+flex": {"attention": "flex"},
}


def _settings(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {
            "model_name": "vit_tiny_patch16_224",
            "img_size": 32,
            "kwargs": {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3},
            "models": {
                "uncompressed": (None, False),
                "tome/8": (8, False),
                "pyra/8": (8, True),
                "tome/8+kernels": (8, False),
                "pyra/8+kernels": (8, True),
                "pyra/flops0.8-align8": (("flops", 0.8, 8), True),
                "pyra/flops0.8-align8+kernels": (("flops", 0.8, 8), True),
            },
            "batch_sizes": [1, 2],
            "runs": 2,
        }
    return {
        "model_name": "vit_base_patch16_224",
        "img_size": 224,
        "kwargs": {},
        "models": {
            "uncompressed": (None, False),
            "tome/high": ("high", False),
            "pyra/low": ("low", True),
            "pyra/high": ("high", True),
            "tome/high+kernels": ("high", False),
            "pyra/high+kernels": ("high", True),
            "pyra/high+flex": ("high", True),
            # high's FLOPs fraction (0.289) from the solver with every token count a multiple of 8
            "pyra/high-align8": (("flops", 0.289, 8), True),
            # the candidate best deployment, from the 2026-12-04 figures: both gains together
            "pyra/high-align8+kernels": (("flops", 0.289, 8), True),
        },
        "batch_sizes": [1, 64, 256],
        "runs": 20,
    }


def _interleaved_ms(
    fns: dict[str, Callable[[], Any]], device: Any, runs: int, warmup: int = 3
) -> dict[str, float]:
    """Median ms per call of each callable, timed side by side by the project's protocol
    (``timing.time_interleaved``: ``warmup`` calls each, then ``runs`` rotating rounds, each call
    timed alone on the host clock with the device synchronised around it, as ``benchmark`` does)."""
    from pyra_lightning.timing import time_interleaved

    seconds = time_interleaved(fns, warmup, runs, device=device)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def _kernels_per_forward(fn: Callable[[], Any], device: Any, forwards: int = 3) -> int:
    """Device kernels (CPU: ATen operators) per forward, counted by ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            fn()
    events = prof.events()
    if device.type == "cuda":
        copies = ("Memcpy", "Memset")  # the graph engines' input copy and the like: not compute
        count = sum(1 for e in events if e.device_type.name == "CUDA" and not e.name.startswith(copies))
    else:
        count = sum(1 for e in events if e.name.startswith("aten::"))
    return round(count / forwards)


def _build(s: dict[str, Any], name: str, device: Any) -> Any:
    """Model variant ``name`` of the settings, seeded, on ``device``, in eval mode."""
    import timm
    import torch

    import pyra_lightning

    spec, pyra = s["models"][name]
    torch.manual_seed(0)
    model = timm.create_model(s["model_name"], pretrained=False, img_size=s["img_size"], **s["kwargs"])
    if isinstance(spec, tuple):  # ("flops", fraction, align): the FLOPs solver's aligned schedule
        from pyra_lightning.families import model_shape
        from pyra_lightning.schedules import solve_flops_schedule

        spec = solve_flops_schedule(spec[1], model_shape(model), align=spec[2])
    if spec is not None:
        pyra_lightning.apply_merging(model, spec, pyra=pyra, **_rule(name))
    return model.to(device).eval()


def _rule(name: str) -> dict[str, str]:
    return RULES["+" + name.split("+")[1] if "+" in name else ""]


def _say(message: str, part: str = "speed") -> None:
    print(f"{part}: {message}", flush=True)  # the part's log shows how far it got


def _build_runner(out: dict[str, Any], model: Any, name: str, x: Any, engine: str) -> tuple[Any, float]:
    """``engine`` built for ``model`` at ``x``'s batch, and its seconds; ``None`` (recorded in
    ``out["skipped"]``) where it cannot be built: the next model and engine still run. On CUDA
    under bf16 autocast, except for bf16 images: those are for a model held in bf16 (``HELD``)."""
    import torch

    import pyra_lightning

    dtype = torch.bfloat16 if x.device.type == "cuda" and x.dtype == torch.float32 else None
    tic = time.perf_counter()
    try:
        run = pyra_lightning.compile_for_inference(model, x, engine=engine, autocast_dtype=dtype)
    except Exception as error:
        out["skipped"].append(f"{engine} {name} batch {len(x)}: {type(error).__name__}: {error}"[:300])
        return None, time.perf_counter() - tic
    return run, time.perf_counter() - tic


def _time_group(
    out: dict[str, Any],
    runners: dict[str, Any],
    built_s: dict[str, float],
    x: Any,
    engine: str,
    s: dict[str, Any],
    part: str = "speed",
) -> None:
    """Time ``runners`` (one engine, ``x``'s batch) side by side and record one row each, in the
    group ``"<engine> batch <B>"`` (``"<engine> bf16-true batch <B>"`` for bf16 images, whose
    rows say ``precision``); rows an earlier timing of that group left are replaced."""
    if not runners:
        return
    held = str(x.dtype) == "torch.bfloat16"
    group = f"{engine}{' ' + HELD if held else ''} batch {len(x)}"
    ms = _interleaved_ms(
        {name: (lambda run=run: run(x)) for name, run in runners.items()}, x.device, s["runs"]
    )
    out["rows"] = [row for row in out["rows"] if row.get("group") != group]
    for name, value in ms.items():
        row = {"engine": engine, "model": name, "batch_size": len(x), "group": group, "ms": value}
        row.update({"precision": HELD} if held else {})
        out["rows"].append({**row, "images_per_s": 1e3 * len(x) / value, "build_s": round(built_s[name], 1)})
        _say(f"{group} {name}: {1e3 * len(x) / value:.0f} img/s (built in {built_s[name]:.1f} s)", part)


def _build_and_time_group(
    out: dict[str, Any], models: dict[str, Any], x: Any, engine: str, s: dict[str, Any], part: str = "speed"
) -> None:
    """Build ``engine`` for every model at ``x``'s batch, then time them side by side
    (``_time_group``); the runners, and their CUDA graphs' memory, go when this returns."""
    runners, built_s = {}, {}
    for name, model in models.items():
        run, built_s[name] = _build_runner(out, model, name, x, engine)
        if run is not None:
            runners[name] = run
    _time_group(out, runners, built_s, x, engine, s, part)


def _count_kernels(out: dict[str, Any], models: dict[str, Any], x: Any, engines: list[str]) -> None:
    """Kernels per forward of each model on each engine at ``x``'s batch, built afresh: run after
    every timing of the part, because a profiler session may leave the process slower."""
    for engine in engines:
        for name, model in models.items():
            run, _ = _build_runner(out, model, name, x, engine)
            if run is not None:
                key = f"{engine} {name} batch {len(x)}"
                out["kernels"][key] = _kernels_per_forward(functools.partial(run, x), x.device)
            run = None  # one CUDA graph alive at a time


def part_speed(args: Any, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Eager and ``cudagraph`` groups for every batch (every model but the ``+kernels`` ones, which
    the ``kernels`` part runs in a process of its own), peak memory, then the compiled models of
    ``COMPILED`` in that order (``+kernels`` ones too: the kernels ran on the H200 on 2026-12-04), each started only if it should end inside the part's limit, then
    the attention micro-benchmark, and last the kernel counts."""
    import torch

    s = _settings(args.dry_run)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    limit = args.part_limit_s or 360
    out: dict[str, Any] = {"rows": [], "skipped": [], "kernels": {}, "peak_memory_mib": {}}
    out["versions"] = _versions(device)
    out["engines"] = ["eager", "cudagraph", "inductor-cudagraph"] if cuda else ["eager"]
    if not cuda:
        out["skipped"].append("cudagraph, inductor-cudagraph: need CUDA")

    def keep() -> None:
        _speedups(out)
        save(out)

    started = time.perf_counter()
    models = {name: _build(s, name, device) for name in s["models"] if not name.endswith(KERNELS)}
    sdpa = {name: model for name, model in models.items() if _rule(name).get("attention") != "flex"}
    uncompiled = [e for e in out["engines"] if e != "inductor-cudagraph"]
    flex = [name for name in models if name not in sdpa]
    if flex:  # eager FlexAttention is its unfused reference
        out["skipped"].append(
            f"{', '.join(uncompiled)} {', '.join(flex)}: FlexAttention is fused only compiled"
        )
    for batch in s["batch_sizes"]:
        x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=device)
        for engine in uncompiled:
            _build_and_time_group(out, sdpa, x, engine, s)
            keep()
    if cuda:
        for name, model in sdpa.items():
            out["peak_memory_mib"][name] = _peak_memory_mib(model, s)
        keep()
    if cuda and not args.dry_run:
        seen_s: dict[str, float] = {}  # the slowest compile of each kind (``compile_estimate_s``)
        compiled: dict[int, dict[str, Any]] = {}  # batch -> name -> runner, kept to the end
        compile_s: dict[int, dict[str, float]] = {}
        for name, batch in COMPILED:
            left = limit - (time.perf_counter() - started)
            estimate = compile_estimate_s(seen_s, name)
            if left < estimate + 20:
                out["skipped"].append(
                    f"inductor-cudagraph {name} batch {batch}: {left:.0f} s left, a compile takes ~{estimate:.0f} s"
                )
                continue
            x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=device)
            model = models[name] if name in models else _build(s, name, device)  # a +kernels model
            run, seconds = _build_runner(out, model, name, x, "inductor-cudagraph")
            model = None
            note_compile_s(seen_s, name, seconds)
            if run is not None:
                compiled.setdefault(batch, {})[name] = run
                compile_s.setdefault(batch, {})[name] = seconds
                _time_group(out, compiled[batch], compile_s[batch], x, "inductor-cudagraph", s)
            keep()
        compiled = run = None
    else:
        out["skipped"].append(
            "inductor-cudagraph: compiled on CUDA only (a CPU compile of the dry run costs minutes)"
        )
    out["attention"] = _guarded(_attention, device, args.dry_run)
    keep()
    left = limit - (time.perf_counter() - started)
    if left < 30:  # ~10 runners built, each profiled
        out["skipped"].append(f"kernel counts: {left:.0f} s left of the part")
    else:
        batch = s["batch_sizes"][min(1, len(s["batch_sizes"]) - 1)]
        _count_kernels(
            out, sdpa, torch.randn(batch, 3, s["img_size"], s["img_size"], device=device), uncompiled
        )
    keep()
    return out


def _versions(device: Any) -> dict[str, Any]:
    """What the figures depend on, recorded with them (the env part may not run)."""
    import timm
    import torch

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "timm": timm.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if device.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(device)
    return versions


def _guarded(micro: Callable[[Any, bool], dict[str, Any]], device: Any, dry_run: bool) -> dict[str, Any]:
    """A micro-benchmark's result, or the error that stopped it (the part's rows are kept)."""
    try:
        return micro(device, dry_run)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def _peak_memory_mib(model: Any, s: dict[str, Any]) -> float:
    """Peak CUDA memory of one eager bf16 forward at the largest batch as the model alone would
    reach it: the forward's peak above what was allocated before it (every model of the part is
    resident), plus the model's weights and its input."""
    import torch

    x = torch.randn(s["batch_sizes"][-1], 3, s["img_size"], s["img_size"], device="cuda")
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before + weights + x.numel() * x.element_size()
    return peak / 2**20


def _speedups(out: dict[str, Any]) -> None:
    """Each row's speed-up over the uncompressed model timed in its group (``None`` without one)."""
    base = {r["group"]: r["images_per_s"] for r in out["rows"] if r["model"] == "uncompressed"}
    for row in out["rows"]:
        ref = base.get(row["group"])
        row["speedup"] = row["images_per_s"] / ref if ref else None


def _attention(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of one attention at PYRA high's second layer: SDPA + log(size) mask vs FlexAttention."""
    import torch
    import torch.nn.functional as F

    from pyra_lightning.kernels.attention import flex_proportional_attention

    b, h, n, d = (2, 3, 37, 16) if dry_run else (256, 12, 157, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    size = torch.randint(1, 4, (b, n, 1), device=device).float()
    mask = size.log().to(dtype).view(b, 1, 1, n)
    result: dict[str, Any] = {"shape": [b, h, n, d]}
    fns = {
        "sdpa_masked_ms": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_unmasked_ms": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    with torch.inference_mode():
        try:
            flex = (
                torch.compile(flex_proportional_attention, fullgraph=True)
                if device.type == "cuda"
                else flex_proportional_attention
            )
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()
            result["flex_max_abs_diff"] = (flex(q, k, v, size).float() - ref).abs().max().item()
            fns["flex_ms"] = lambda: flex(q, k, v, size)
        except Exception as error:
            result["flex_error"] = f"{type(error).__name__}: {error}"[:300]
        result.update(_interleaved_ms(fns, device, 20))  # side by side, as the model rows
    return result


def part_train_step(args: Any, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Training steps (forward, loss, backward; LoRA, PYRA and head trainable) of ViT-B/16
    uncompressed / ToMe high / PYRA high / PYRA high on the Triton matcher and merger (with the
    merge's backward) at batch 64 and 128, bf16 autocast, eager, timed interleaved per batch size
    (``time_training_steps``, what ``benchmark --train`` runs): issue 17's training target. Then,
    on CUDA and if two compiles should fit the part's limit, uncompressed and PYRA high on the
    merge kernels at 128 with the steps compiled (forward and backward) and replayed as CUDA graphs
    (``mode="reduce-overhead"``), what a compiled, graphed training loop would get."""
    import torch

    from pyra_lightning.commands.benchmark import build_model
    from pyra_lightning.commands.training_speed import time_training_steps

    s = _settings(args.dry_run)
    cuda = args.device.startswith("cuda")
    limit = args.part_limit_s or 200
    spec = 8 if args.dry_run else "high"
    variants = {"uncompressed": (None, False), f"tome/{spec}": (spec, False), f"pyra/{spec}": (spec, True)}
    # the Triton matcher and merger (the merge's backward is kernels.merge_backward); the attention
    # is SDPA with the mask (the Triton proportional attention has no backward), or, "+channel",
    # SDPA unmasked with log(size) in one more key channel, which flash attention can run
    variants[f"pyra/{spec}+merge-kernels"] = (spec, True)
    variants[f"pyra/{spec}+merge-kernels+channel"] = (spec, True)
    rules = {
        "+merge-kernels": {"matcher": "triton", "merger": "triton"},
        "+merge-kernels+channel": {"matcher": "triton", "merger": "triton", "attention": "sdpa_channel"},
    }
    out: dict[str, Any] = {"precision": "bf16" if cuda else "32", "rows": [], "skipped": []}
    out["versions"] = _versions(torch.device(args.device))
    started = time.perf_counter()

    def measure(names: list[str], batch: int, compiled: bool, mode: str | None = None) -> None:
        models = {
            name: build_model(
                s["model_name"], variants[name][0], variants[name][1], img_size=s["img_size"],
                fold=False, device=args.device, model_kwargs=s["kwargs"] or None,
                rule=next((rule for tail, rule in rules.items() if name.endswith(tail)), None),
            )
            for name in names
        }  # fmt: skip
        result = time_training_steps(
            models, batch, s["img_size"], args.device, out["precision"],
            warmup=1 if args.dry_run else 3, runs=2 if args.dry_run else 10, compiled=compiled,
            compile_mode=mode,
        )  # fmt: skip
        engine = f"compile {mode}" if mode else "compile" if compiled else "eager"
        base = result["uncompressed"]["images_per_s"]
        for name, row in result.items():
            out["rows"].append(
                {
                    "batch_size": batch,
                    "model": name,
                    "engine": engine,
                    "images_per_s": row["images_per_s"],
                    "speedup": row["images_per_s"] / base,
                    "peak_memory_mb": row["peak_memory_mb"],
                }
            )
        print(f"train_step: {engine} batch {batch} done", flush=True)
        save(out)
        del models
        if cuda:
            torch.cuda.empty_cache()

    for batch in [1, 2] if args.dry_run else [64, 128]:
        measure(list(variants), batch, compiled=False)
    left = limit - (time.perf_counter() - started)
    if not cuda or args.dry_run:
        out["skipped"].append(
            "compiled training steps: CUDA only (a CPU compile of the dry run costs minutes)"
        )
    elif left < 2 * 60 + 20:  # two forward + backward compiles of ViT-B/16, about a minute each
        out["skipped"].append(f"compiled training steps: {left:.0f} s left, two compiles take ~120 s")
    else:
        # CUDA graphs of the compiled forward and backward: the default mode ran on 2026-12-04
        # (0.98x at 128, the torch rule), which leaves the host launching every kernel of the
        # merged step; PYRA on the merge kernels, whose backward the compile traces since 2026-12-07,
        # and with the key-channel attention if a third compile fits
        names = ["uncompressed", f"pyra/{spec}+merge-kernels"]
        if left >= 3 * 60 + 20:
            names.append(f"pyra/{spec}+merge-kernels+channel")
        else:
            out["skipped"].append(f"compiled pyra/{spec}+merge-kernels+channel: {left:.0f} s left")
        measure(names, 128, compiled=True, mode="reduce-overhead")
    return out
