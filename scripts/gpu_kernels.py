"""The ``kernels`` part of scripts/gpu_check.py: the Triton matcher, merger and attention on the GPU.

The test suite runs these kernels only under Triton's interpreter (``tools/aot_kernels.py``
compiles them for Hopper; a GPU first ran them on 2026-12-04), so they get a process of their
own, after ``speed``: an illegal address in a kernel poisons the CUDA context, and here it costs
only this part. In order, each result saved as it finishes:

1. parity: PYRA high with its modulation weights drawn at random (zeros would hide the
   modulation), logits with the torch rule against the same model on the Triton rule
   (``set_merge_rule``, proportional attention on the Triton kernel too), fp32 and bf16 autocast;
2. one layer's matching, one layer's merge and one layer's proportional attention alone, Triton
   against torch (attention: against SDPA with and without the mask, and the kernel at the
   other tiles of ``ATTENTION_TILES``; merge: with ``norm2`` fused, at batch 256 and 1), on the
   host clock and on the GPU's (``device_ms``);
3. eager and ``cudagraph`` groups of the uncompressed model, ToMe high, PYRA high and PYRA at
   high's FLOPs with ``align=8`` on torch and on the kernels (``+kernels``), each group (one
   engine, one batch) timed side by side (``gpu_speed._build_and_time_group``); batch 256, then
   64, then 1. A group that would pass the part's limit is skipped and named;
4. ``bf16-true`` groups (``gpu_speed.HELD``) at batch 256 and 64 on ``cudagraph``: the
   uncompressed model and the PYRA models held in bf16 and run without autocast;
5. kernels per forward at batch 64, after every timing, then the eager forward's kernel time by
   kind (matmul, attention, Triton, elementwise, ...; ``kernel_time_by_kind``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from gpu_backward import attention_training_micro, merge_backward_micro
from gpu_micro import batch1_fns, device_ms, merge_inputs, norm_fns
from gpu_speed import (
    HELD,
    KERNELS,
    _build,
    _build_and_time_group,
    _count_kernels,
    _guarded,
    _interleaved_ms,
    _say,
    _settings,
    _speedups,
    _versions,
)


def part_kernels(args: Any, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Parity, then the micro-benchmarks, then eager and ``cudagraph`` rows, largest batch first
    (see the module): what only this part measures comes before what a timeout may cut."""
    import torch

    from pyra_lightning.kernels import use_triton

    s = _settings(args.dry_run)
    device = torch.device(args.device)
    limit = args.part_limit_s or 120
    out: dict[str, Any] = {"rows": [], "skipped": [], "kernels": {}, "versions": _versions(device)}
    out["engines"] = ["eager", "cudagraph"] if device.type == "cuda" else ["eager"]
    if device.type != "cuda":
        out["skipped"].append("cudagraph: needs CUDA")
    if not use_triton(torch.empty(0, device=device)):
        out["skipped"].append("the Triton kernels: need CUDA and Triton (the +kernels rows ran torch)")

    def keep() -> None:
        _speedups(out)
        save(out)

    started = time.perf_counter()
    names = kernel_models(s["models"])
    pyra = next(m for m in names if m.startswith("pyra/") and not m.endswith(KERNELS))
    out["parity"] = _guarded(lambda dev, dry: _parity(s, pyra, dev), device, args.dry_run)
    keep()
    micros = (("matcher", _matcher), ("merger", _merger), ("attention", _attention))
    trains = (("merge_backward", merge_backward_micro), ("attention_training", attention_training_micro))
    for key, micro in (*micros, *trains):
        out[key] = _guarded(micro, device, args.dry_run)
        keep()
    models = {name: _build(s, name, device) for name in names}  # ViT-B/16: ~0.35 GB each
    for batch in sorted(s["batch_sizes"], reverse=True):  # batch 1, the cheapest to lose, last
        x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=device)
        for engine in out["engines"]:
            if time.perf_counter() - started > limit - 15:
                out["skipped"].append(f"{engine} batch {batch}: the part's {limit:.0f} s are spent")
                continue
            _build_and_time_group(out, models, x, engine, s, part="kernels")
            keep()
    held = held_models(models)
    for batch in sorted(s["batch_sizes"], reverse=True)[:2]:
        if time.perf_counter() - started > limit - 15:
            out["skipped"].append(f"{HELD} batch {batch}: the part's {limit:.0f} s are spent")
            continue
        x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=device, dtype=torch.bfloat16)
        _build_and_time_group(out, held, x, out["engines"][-1], s, part="kernels")
        keep()
    held = None
    if time.perf_counter() - started > limit - 10:
        out["skipped"].append(f"kernel counts: the part's {limit:.0f} s are spent")
    else:
        batch = s["batch_sizes"][min(1, len(s["batch_sizes"]) - 1)]
        x = torch.randn(batch, 3, s["img_size"], s["img_size"], device=device)
        _count_kernels(out, models, x, out["engines"])
        keep()
        if time.perf_counter() - started > limit - 10:
            out["skipped"].append(f"kernel time by kind: the part's {limit:.0f} s are spent")
        else:
            out["kernel_time"] = _guarded(lambda dev, dry: _kernel_times(models, x), device, args.dry_run)
            keep()
    _say(f"done in {time.perf_counter() - started:.0f} s", part="kernels")
    return out


# Kernel names to a kind, first match wins (lower case): where the GPU's time goes per forward.
KERNEL_KINDS = (
    (
        "triton",
        ("match_kernel", "plan_kernel", "merge_kernel", "modulate_kernel", "modulation_backward", "triton"),
    ),
    ("attention", ("fmha", "flash", "attention", "efficient_attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "cublas", "nvjet", "wgmma", "addmm", "linear", "matmul", "bmm")),
    ("layer_norm", ("layer_norm", "layernorm")),
    ("sort", ("sort", "radix")),
    ("gather/cat/copy", ("index", "gather", "scatter", "cat", "copy")),
    ("reduce", ("reduce", "norm", "max", "mean", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "add", "mul", "div", "gelu", "log", "sigmoid")),
)


def kernel_kind(name: str) -> str:
    """``KERNEL_KINDS``' kind of a kernel (CPU: operator) name, else ``"other"``."""
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lower for key in keys)), "other")


def kernel_time_by_kind(fn: Callable[[], Any], device: Any, forwards: int = 3) -> dict[str, Any]:
    """ms per forward of the device's kernels by kind (``kernel_kind``), their sum, and the five
    slowest kernels, from ``torch.profiler``: what a merged forward spends its GPU time on, beside
    what its FLOPs predict. On CUDA each kernel's duration on the GPU's clock (copies and memsets
    left out, as in the counts); on a CPU each ATen operator's self time."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            fn()
    per_name: collections.Counter[str] = collections.Counter()
    if cuda:
        for event in prof.events():
            if event.device_type.name == "CUDA" and not event.name.startswith(("Memcpy", "Memset")):
                per_name[event.name] += event.time_range.elapsed_us()
    else:
        for average in prof.key_averages():
            if average.key.startswith("aten::"):
                per_name[average.key] += average.self_cpu_time_total
    by_kind: collections.Counter[str] = collections.Counter()
    for name, us in per_name.items():
        by_kind[kernel_kind(name)] += us
    ms = 1e-3 / forwards
    return {
        "total_ms": round(sum(per_name.values()) * ms, 4),
        "by_kind_ms": {kind: round(us * ms, 4) for kind, us in by_kind.most_common()},
        "slowest_ms": {name[:100]: round(us * ms, 4) for name, us in per_name.most_common(5)},
    }


def _kernel_times(models: dict[str, Any], x: Any) -> dict[str, Any]:
    """``kernel_time_by_kind`` of the eager uncompressed model and every PYRA model at ``x``'s
    batch, under bf16 autocast on CUDA (the kernels' durations are a CUDA graph's too)."""
    import functools

    import torch

    out = {}
    for name, model in models.items():
        if name == "uncompressed" or name.startswith("pyra/"):
            with (
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda),
                torch.inference_mode(),
            ):
                out[name] = kernel_time_by_kind(functools.partial(model, x), x.device)
    return out


def held_models(models: dict[str, Any]) -> dict[str, Any]:
    """bf16 copies of the uncompressed model and of every PYRA model, for the ``bf16-true`` groups
    (``gpu_speed.HELD``): the model held in bf16 and run without autocast, on the torch rule and
    on the kernels (which compute in fp32 whatever they read)."""
    import copy

    import torch

    keep = [name for name in models if name == "uncompressed" or name.startswith("pyra/")]
    return {name: copy.deepcopy(models[name]).to(torch.bfloat16) for name in keep}


def kernel_models(models: dict[str, Any]) -> list[str]:
    """The uncompressed model, every ``+kernels`` model's torch twin, then the ``+kernels`` models:
    each kernel row has the same model on torch beside it, measured in the same process."""
    kernels = [m for m in models if m.endswith(KERNELS)]
    twins = [m.removesuffix(KERNELS) for m in kernels]
    missing = [m for m in twins if m not in models]
    if missing:
        raise ValueError(f"settings have {kernels} but not their torch twins {missing}")
    return ["uncompressed", *twins, *kernels]


def _parity(s: dict[str, Any], name: str, device: Any) -> dict[str, Any]:
    """Logits of ``name`` on the torch rule against the Triton rule, same weights, same images."""
    import torch

    from pyra_lightning.kernels import use_triton
    from pyra_lightning.modulation import PyraModulation
    from pyra_lightning.patch import set_merge_rule

    model = _build(s, name, device)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PyraModulation):
                for weight in (module.weight_d, module.weight_r):
                    if weight is not None:
                        weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
    x = torch.randn(s["batch_sizes"][-1], 3, s["img_size"], s["img_size"], device=device)
    result: dict[str, Any] = {"model": name, "batch_size": len(x)}
    if not use_triton(x):
        result["triton"] = "not run: needs CUDA tensors and Triton"
        return result
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        for rule in ("bipartite", "triton"):
            kernels = rule == "triton"
            set_merge_rule(
                model,
                matcher=rule,
                merger="triton" if kernels else "wavg",
                attention="triton" if kernels else "sdpa",
            )
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            ):
                logits[rule, dtype] = model(x).float()
    reference = logits["bipartite", torch.float32]
    result["logit_scale"] = reference.abs().max().item()
    # Each against torch in fp32: in bf16 the torch rule rounds where the kernels keep fp32, so
    # the bf16 rows say which of the two stays nearer the fp32 answer.
    for (rule, dtype), got in logits.items():
        if (rule, dtype) == ("bipartite", torch.float32):
            continue
        diff = (got - reference).abs().amax(dim=1)  # (B,)
        result[f"{rule} {str(dtype).removeprefix('torch.')} vs torch float32"] = {
            "max_abs_diff": diff.max().item(),
            "median_abs_diff": diff.median().item(),
            "images_within_1e-3": (diff < 1e-3).float().mean().item(),
            "same_top1": (got.argmax(1) == reference.argmax(1)).float().mean().item(),
        }
    return result


def _matcher(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of matching one ViT-B layer (197 tokens, merge_r 10): Triton kernel vs torch, side by side."""
    import torch

    from pyra_lightning.kernels import use_triton
    from pyra_lightning.merge import match

    b, n, c = (2, 37, 24) if dry_run else (256, 197, 64)
    metric = torch.randn(
        b, n, c, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    merge_r = 10
    result: dict[str, Any] = {"shape": [b, n, c], "merge_r": merge_r}
    fns = {"torch_ms": lambda: match(metric, merge_r, 1)}
    with torch.inference_mode():
        if use_triton(metric):
            from pyra_lightning.kernels.matching import triton_match, triton_node_max, triton_plan

            # Against the torch matcher on the same values in fp32, as the kernel computes: torch
            # on bf16 rounds the scores to bf16, whose ties pick other sources on most rows.
            got, want = triton_match(metric, merge_r, 1), match(metric.float(), merge_r, 1)
            same = (got[0].sort(dim=1).values == want[0].sort(dim=1).values).all(dim=1)
            result["rows_with_the_same_sources_as_fp32_torch"] = same.float().mean().item()
            fns["triton_ms"] = lambda: triton_match(metric, merge_r, 1)
            if metric.is_cuda:  # do_bench needs a GPU driver, which the interpreter has not
                node_max, node_idx = triton_node_max(metric, 1)
                result["device_ms"] = device_ms(
                    {
                        "torch": fns["torch_ms"],
                        "triton": fns["triton_ms"],
                        "triton kernel alone": lambda: triton_node_max(metric, 1),
                        "plan kernel alone": lambda: triton_plan(node_max, node_idx, n, merge_r, 1),
                        "torch sort it replaces": lambda: torch.sort(node_max, dim=-1, descending=True),
                    }
                )
                one = metric[:1].contiguous()  # batch 1: one program plans, a few match
                node_max1, node_idx1 = triton_node_max(one, 1)
                result["device_ms_batch1"] = device_ms(
                    {
                        "triton kernel alone": lambda: triton_node_max(one, 1),
                        "plan kernel alone": lambda: triton_plan(node_max1, node_idx1, n, merge_r, 1),
                    }
                )
        else:
            result["triton"] = "not run: needs CUDA tensors and Triton"
        result.update(_interleaved_ms(fns, device, 20))
    return result


def _merger(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of one ViT-B PYRA merge (197 tokens, merge_r 16, sizes given): Triton kernels vs torch,
    the residual read by the kernels, and ``norm2`` fused into the merge (batch 256 and 1)."""
    import torch

    from pyra_lightning.kernels import use_triton
    from pyra_lightning.merge import merge_wavg

    b, n, c, merge_r = (2, 37, 24, 8) if dry_run else (256, 197, 768, 16)
    t = merge_inputs(device, b, n, c, merge_r)
    merge, x, size, mod, branch = (t[k] for k in ("merge", "x", "size", "mod", "branch"))
    result: dict[str, Any] = {"shape": [b, n, c], "merge_r": merge_r}
    fns = {"torch_ms": lambda: merge_wavg(merge, x, size, mod)}
    with torch.inference_mode():
        if use_triton(x):
            from pyra_lightning.kernels.merging import kernel_applies, triton_merge_wavg

            if kernel_applies(merge, x, size, mod):  # a fallback would time torch twice
                got, want = triton_merge_wavg(merge, x, size, mod), merge_wavg(merge, x, size, mod)
                diffs = ((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
                result["max_abs_diff"] = max(diffs)
                norm_calls = norm_fns(t)
                apart, fused = (fn() for fn in norm_calls.values())  # in norm_fns's order
                # the fused kernel against the kernel and torch's norm: the same merged tokens and
                # sizes bitwise, norms within bf16 rounding
                result["norm2_merged_equal"] = all(
                    torch.equal(f, a) for f, a in zip(fused[:2], apart[:2], strict=True)
                )
                result["norm2_max_abs_diff"] = (fused[2].float() - apart[2].float()).abs().max().item()
                fns["triton_ms"] = lambda: triton_merge_wavg(merge, x, size, mod)
                if x.is_cuda:  # do_bench needs a GPU driver, which the interpreter has not
                    # as a merging block calls it: the residual stream and a bf16 attention
                    # branch apart (the kernels add them), against torch's add and then the kernels
                    result["device_ms"] = device_ms(
                        {
                            "torch": fns["torch_ms"],
                            "triton": fns["triton_ms"],
                            "triton, residual read by the kernels": lambda: triton_merge_wavg(
                                merge, branch, size, mod, residual=x
                            ),
                            "torch add, then triton": lambda: triton_merge_wavg(merge, x + branch, size, mod),
                            **norm_calls,
                        }
                    )
                    # batch 1, where the fused kernel runs a third of the programs; high's first
                    # merge_r too, since one program per image walks the pairs in sequence there
                    for key, pairs in (("device_ms_batch1", merge_r), ("device_ms_batch1_r40", 40)):
                        result[key] = device_ms(batch1_fns(merge_inputs(device, 1, n, c, pairs)))
            else:
                result["triton"] = "not run: the kernels do not apply to these tensors"
        else:
            result["triton"] = "not run: needs CUDA tensors and Triton"
        result.update(_interleaved_ms(fns, device, 20))
    return result


# Tiles of the attention kernel timed beside its default (``attention_blocks``): which runs
# fastest on the GPU is measured, not assumed; each keeps its registers on sm_90.
ATTENTION_TILES = ((64, 32, 4), (64, 64, 8), (128, 64, 8), (128, 32, 8))


def _attention(device: Any, dry_run: bool) -> dict[str, Any]:
    """ms of one proportional attention at PYRA high's second layer (B 256, 12 heads, 157 tokens,
    64 channels, bf16, q/k/v strided as timm's qkv leaves them): SDPA with the ``log(size)``
    mask, SDPA without one (what the kernel would like to match), SDPA on the key channel
    (``attention="sdpa_channel"``, unmasked too), and the Triton kernel at its default tiles and
    at ``ATTENTION_TILES``, on the GPU's clock; its difference from SDPA."""
    import torch
    import torch.nn.functional as F

    from pyra_lightning.kernels import use_triton
    from pyra_lightning.kernels.attention import channel_proportional_attention

    b, h, n, d = (2, 3, 37, 16) if dry_run else (256, 12, 157, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    q, k, v = torch.randn(b, n, 3, h, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    size = torch.randint(1, 8, (b, n, 1), device=device).float()
    mask = size.log().to(dtype).view(b, 1, 1, n)
    result: dict[str, Any] = {"shape": [b, h, n, d], "dtype": str(dtype)}
    fns = {
        "sdpa_masked_ms": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa_unmasked_ms": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa_channel_ms": lambda: channel_proportional_attention(q, k, v, size),  # no mask either
    }
    with torch.inference_mode():
        if use_triton(q):
            from pyra_lightning.kernels.proportional import attention_blocks, launch_attention

            want = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=size.log().view(b, 1, 1, n)
            )
            result["triton_max_abs_diff_vs_fp32"] = (
                (launch_attention(q, k, v, size).float() - want).abs().max().item()
            )
            result["sdpa_max_abs_diff_vs_fp32"] = (fns["sdpa_masked_ms"]().float() - want).abs().max().item()
            fns["triton_ms"] = lambda: launch_attention(q, k, v, size)
            if q.is_cuda:  # do_bench needs a GPU driver, which the interpreter has not
                timed = {"sdpa masked": fns["sdpa_masked_ms"], "sdpa unmasked": fns["sdpa_unmasked_ms"]}
                timed["sdpa channel"] = fns["sdpa_channel_ms"]
                timed["triton"] = fns["triton_ms"]
                for block_m, block_n, warps in ATTENTION_TILES:
                    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps}
                    tiles["BLOCK_D"] = attention_blocks(d, dtype)["BLOCK_D"]
                    timed[f"triton {block_m}x{block_n} {warps} warps"] = functools.partial(
                        launch_attention, q, k, v, size, tiles
                    )
                result["device_ms"] = device_ms(timed)
        else:
            result["triton"] = "not run: needs CUDA tensors and Triton"
        result.update(_interleaved_ms(fns, device, 20))
    return result
