"""The ``speed``, ``ddp_fit`` and ``train_step`` parts of scripts/gpu_check.py (kept apart so each
file stays short).

``speed`` answers issue 17's question first: ViT-B/16 bf16 at batch 1, 64, 256, uncompressed /
ToMe high / PYRA low / PYRA high, on eager, ``cudagraph`` and ``inductor-cudagraph``
(``pyra_lightning.compile_for_inference``); kernel launches per forward (``torch.profiler``),
peak memory, SDPA with the ``log(size)`` mask against FlexAttention, the Triton matcher against
torch. Every finished measurement is saved at once (``save``), so a timeout keeps them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

# Compiling is the expensive part: at most these (model, batch) pairs, in this order, and none
# that would start later than COMPILE_DEADLINE_S into the part (its limit is 360 s).
COMPILED = [
    ("uncompressed", 256),
    ("pyra/high", 256),
    ("uncompressed", 64),
    ("pyra/high", 64),
    ("pyra/high+flex", 256),
]
COMPILE_DEADLINE_S = 240
# The merge rule and attention kernel of a model variant: "+kernels" runs the Triton matcher and
# merger (eager and CUDA graphs), "+flex" FlexAttention (fused only when compiled).
RULES = {
    "": {},
    "+kernels": {"matcher": "triton", "merger": "triton"},
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
                "pyra/8+kernels": (8, True),
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
        },
        "batch_sizes": [1, 64, 256],
        "runs": 20,
    }


def _time_ms(fn: Callable[[], Any], device: Any, runs: int) -> float:
    """Median ms per call: CUDA events on a GPU, the host clock (after a sync) elsewhere."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - tic))
    return statistics.median(times)


def _kernels_per_forward(fn: Callable[[], Any], device: Any, forwards: int = 3) -> int:
    """Device kernels (CPU: ATen operators) per forward, counted by ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            fn()
    events = prof.events()
    if device.type == "cuda":
        count = sum(1 for e in events if e.device_type.name == "CUDA")
    else:
        count = sum(1 for e in events if e.name.startswith("aten::"))
    return round(count / forwards)


def part_speed(args: Any, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    import timm
    import torch

    import pyra_lightning

    s = _settings(args.dry_run)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else None
    engines = ["eager", "cudagraph", "inductor-cudagraph"] if cuda else ["eager"]
    out: dict[str, Any] = {
        "rows": [],
        "skipped": [],
        "kernels": {},
        "peak_memory_mib": {},
        "engines": engines,
    }
    if not cuda:
        out["skipped"].append("cudagraph, inductor-cudagraph: need CUDA")
    compiled_budget = list(COMPILED) if not args.dry_run else []
    started = time.perf_counter()
    for name, (spec, pyra) in s["models"].items():
        torch.manual_seed(0)
        model = timm.create_model(s["model_name"], pretrained=False, img_size=s["img_size"], **s["kwargs"])
        rule = RULES["+" + name.split("+")[1] if "+" in name else ""]
        if spec is not None:
            pyra_lightning.apply_merging(model, spec, pyra=pyra, **rule)
        model = model.to(device).eval()
        for batch in s["batch_sizes"]:
            x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=device)
            for engine in engines:
                if engine == "inductor-cudagraph" and (name, batch) not in compiled_budget:
                    out["skipped"].append(f"{engine} {name} batch {batch}: outside the compile budget")
                    continue
                if engine == "inductor-cudagraph" and time.perf_counter() - started > COMPILE_DEADLINE_S:
                    out["skipped"].append(
                        f"{engine} {name} batch {batch}: past the {COMPILE_DEADLINE_S} s compile deadline"
                    )
                    continue
                if "attention" in rule and engine != "inductor-cudagraph":
                    out["skipped"].append(
                        f"{engine} {name} batch {batch}: FlexAttention is fused only compiled"
                    )
                    continue
                tic = time.perf_counter()
                try:
                    run = pyra_lightning.compile_for_inference(model, x, engine=engine, autocast_dtype=dtype)
                except Exception as error:  # recorded, the next engine still runs
                    out["skipped"].append(
                        f"{engine} {name} batch {batch}: {type(error).__name__}: {error}"[:300]
                    )
                    continue
                build_s = time.perf_counter() - tic
                ms = _time_ms(lambda run=run, x=x: run(x), device, s["runs"])
                out["rows"].append(
                    {
                        "engine": engine,
                        "model": name,
                        "batch_size": batch,
                        "ms": ms,
                        "images_per_s": 1e3 * batch / ms,
                        "build_s": round(build_s, 1),
                    }
                )
                if (
                    batch == s["batch_sizes"][min(1, len(s["batch_sizes"]) - 1)]
                    and engine != "inductor-cudagraph"
                ):
                    out["kernels"][f"{engine} {name} batch {batch}"] = _kernels_per_forward(
                        lambda run=run, x=x: run(x), device
                    )
                save(out)
        if cuda and "attention" not in rule:  # eager FlexAttention is its unfused reference
            x = torch.randn(s["batch_sizes"][-1], 3, s["img_size"], s["img_size"], device=device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)
            torch.cuda.synchronize()
            out["peak_memory_mib"][name] = torch.cuda.max_memory_allocated() / 2**20
        del model
        save(out)
    _speedups(out)
    out["attention"] = _attention(device, args.dry_run)
    save(out)
    out["matcher"] = _matcher(device, args.dry_run)
    save(out)
    out["merger"] = _merger(device, args.dry_run)
    save(out)
    return out


def _speedups(out: dict[str, Any]) -> None:
    base = {
        (r["engine"], r["batch_size"]): r["images_per_s"] for r in out["rows"] if r["model"] == "uncompressed"
    }
    for row in out["rows"]:
        ref = base.get((row["engine"], row["batch_size"]))
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
    with torch.inference_mode():
        result["sdpa_masked_ms"] = _time_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device, 20
        )
        result["sdpa_unmasked_ms"] = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, 20)
        try:
            flex = (
                torch.compile(flex_proportional_attention, fullgraph=True)
                if device.type == "cuda"
                else flex_proportional_attention
            )
            result["flex_ms"] = _time_ms(lambda: flex(q, k, v, size), device, 20)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()
            result["flex_max_abs_diff"] = (flex(q, k, v, size).float() - ref).abs().max().item()
        except Exception as error:
            result["flex_error"] = f"{type(error).__name__}: {error}"[:300]
    return result


def _matcher(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of matching one ViT-B layer (197 tokens, merge_r 40): Triton kernel vs torch."""
    import torch

    from pyra_lightning.kernels import use_triton
    from pyra_lightning.merge import match

    b, n, c = (2, 37, 24) if dry_run else (256, 197, 64)
    metric = torch.randn(
        b, n, c, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    result: dict[str, Any] = {"shape": [b, n, c]}
    with torch.inference_mode():
        result["torch_ms"] = _time_ms(lambda: match(metric, 10, 1), device, 20)
        if not use_triton(metric):
            result["triton"] = "not run: needs CUDA tensors and Triton"
            return result
        from pyra_lightning.kernels.matching import triton_match

        got, want = triton_match(metric, 10, 1), match(metric, 10, 1)
        result["same_sources"] = bool(torch.equal(got[0], want[0]))
        result["triton_ms"] = _time_ms(lambda: triton_match(metric, 10, 1), device, 20)
    return result


def _merger(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of one ViT-B PYRA merge (197 tokens, merge_r 16, sizes given): Triton kernels vs torch."""
    import torch

    from pyra_lightning.kernels import use_triton
    from pyra_lightning.merge import bipartite_soft_matching, merge_wavg
    from pyra_lightning.modulation import PyraModulation

    b, n, c, merge_r = (2, 37, 24, 8) if dry_run else (256, 197, 768, 16)
    torch.manual_seed(0)
    x = torch.randn(b, n, c, device=device)
    size = torch.randint(1, 4, (b, n, 1), device=device).float()
    merge, _ = bipartite_soft_matching(torch.randn(b, n, 64, device=device), merge_r, 1)
    mod = PyraModulation(merge_r, c).to(device)
    with torch.no_grad():
        mod.weight_d.normal_(std=0.1)
    result: dict[str, Any] = {"shape": [b, n, c], "merge_r": merge_r}
    with torch.inference_mode():
        result["torch_ms"] = _time_ms(lambda: merge_wavg(merge, x, size, mod), device, 20)
        if not use_triton(x):
            result["triton"] = "not run: needs CUDA tensors and Triton"
            return result
        from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg

        if not kernel_applies(merge, x, size, mod):  # a fallback would time torch twice
            result["triton"] = "not run: the kernels do not apply to these tensors"
            return result
        got, want = triton_merge_wavg(merge, x, size, mod), merge_wavg(merge, x, size, mod)
        result["max_abs_diff"] = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
        result["triton_ms"] = _time_ms(lambda: triton_merge_wavg(merge, x, size, mod), device, 20)
    return result


def part_train_step(args: Any, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Training steps (forward, loss, backward; LoRA, PYRA and head trainable) of ViT-B/16
    uncompressed / ToMe high / PYRA high at batch 64 and 128, bf16 autocast, eager: issue 17's
    training target (``benchmark --train``), timed interleaved per batch size. Then, on CUDA, the
    three at 128 with the steps compiled (``--train_compile``: three compiles of forward and
    backward), what a compiled training loop would get."""
    from pyra_lightning.commands.benchmark import run_benchmark

    s = _settings(args.dry_run)
    cuda = args.device.startswith("cuda")
    out: dict[str, Any] = {"precision": "bf16" if cuda else "32", "rows": [], "skipped": []}
    plan = [(batch, False) for batch in ([1, 2] if args.dry_run else [64, 128])]
    if cuda and not args.dry_run:
        plan.append((128, True))
    else:
        out["skipped"].append(
            "compiled training steps: CUDA only (a CPU compile of the dry run costs minutes)"
        )
    for batch, compiled in plan:
        result = run_benchmark(
            model_name=s["model_name"],
            merge_r=[8] if args.dry_run else ["high"],
            batch_sizes=[batch],
            img_size=s["img_size"],
            device=args.device,
            precision=out["precision"],
            runs=2 if args.dry_run else 10,
            warmup=1 if args.dry_run else 3,
            model_kwargs=s["kwargs"] or None,
            train=True,
            train_compile=compiled,
        )
        base = result["training"]["uncompressed"]["images_per_s"]
        for name, row in result["training"].items():
            out["rows"].append(
                {
                    "batch_size": batch,
                    "model": name,
                    "engine": "compile" if compiled else "eager",
                    "images_per_s": row["images_per_s"],
                    "speedup": row["images_per_s"] / base,
                    "peak_memory_mb": row["peak_memory_mb"],
                }
            )
        save(out)
    return out


def train_step_lines(entry: dict[str, Any]) -> list[str]:
    """The train_step part's table for BENCHMARKS.md."""
    rows = (entry.get("result") or {}).get("rows") or []
    if not rows:
        return []
    lines = [
        "",
        "Training step (forward + backward; speed-up over the uncompressed step on the same engine):",
        "",
    ]
    lines += ["| engine | batch | model | img/s | speedup | peak MiB |", "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        memory = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        lines.append(
            f"| {row['engine']} | {row['batch_size']} | {row['model']} | {row['images_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {memory} |"
        )
    skipped = (entry.get("result") or {}).get("skipped")
    return lines + (["", "Skipped: " + "; ".join(skipped)] if skipped else [])


def _ddp_worker(rank: int, world: int, device: str, dry_run: bool, out: str, port: int) -> None:
    import json
    import os
    from pathlib import Path

    import timm
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import pyra_lightning

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = _settings(dry_run)
    torch.manual_seed(0)
    model = timm.create_model(
        s["model_name"], pretrained=False, img_size=s["img_size"], num_classes=4, **s["kwargs"]
    )
    pyra_lightning.apply_lora(model, lora_rank=8)
    pyra_lightning.apply_merging(model, 8 if dry_run else "high", pyra=True)
    pyra_lightning.mark_trainable(model)
    dev = torch.device(device)  # every rank on the same GPU (cuda:0)
    model = model.to(dev)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = 4 if dry_run else 64
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, s["img_size"], s["img_size"], generator=gen).to(dev)
    y = torch.randint(0, 4, (batch,), generator=gen).to(dev)
    losses, steps = [], 3 if dry_run else 20
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    tic = time.perf_counter()
    for _ in range(steps):
        with amp:
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - tic
    rate = torch.tensor([batch * steps / seconds])
    dist.all_reduce(rate)  # images/s summed over ranks
    same = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(
        same, sum(p.detach().float().sum().cpu() for p in model.parameters() if p.requires_grad).view(1)
    )
    if rank == 0:
        path = Path(out) / "ddp_results.json"
        if path.exists():
            raise RuntimeError(f"{path} exists: results.json would be written twice")
        path.write_text(
            json.dumps(
                {
                    "world_size": world,
                    "losses": losses,
                    "trained": losses[-1] < losses[0],
                    "images_per_s_all_ranks": rate.item(),
                    "ranks_agree": bool(torch.allclose(same[0], same[1])),
                }
            )
        )
    dist.destroy_process_group()


def part_ddp_fit(args: Any) -> dict[str, Any]:
    """2 processes, gloo, both on ``args.device``, bf16 autocast: trains, aggregates, writes once."""
    import json
    import socket
    from pathlib import Path

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = Path(args.out) / "ddp_results.json"
    path.unlink(missing_ok=True)
    mp.spawn(_ddp_worker, args=(2, args.device, args.dry_run, args.out, port), nprocs=2, join=True)
    result = json.loads(path.read_text())
    if not result["ranks_agree"]:
        raise RuntimeError(
            "the two ranks hold different weights after training: gradients were not synchronised"
        )
    return result
