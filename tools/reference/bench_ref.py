#!/usr/bin/env python
"""CPU throughput of the *reference* PYRA code (THU-MIG/PYRA, model/*.py, timm 0.5.4)
for the ViT-B/16 architecture (`vit_base_patch16_224_in21k` from the reference module),
LoRA_dim=8, all other PEFT dims 0, random weights, num_classes=100.

Variants:
    uncompressed : no apply_tome
    pyra_low     : apply_tome + model.r = pyra_r = get_merging_schedule(..., 'low')
    pyra_high    : apply_tome + model.r = pyra_r = get_merging_schedule(..., 'high')
    (--extra adds tome_low / tome_high: apply_tome with pyra_r=None, i.e. plain ToMe + LoRA)

Protocol: fp32, eval(), torch.inference_mode(), torch.set_num_threads(THREADS),
`--warmup` untimed runs, then the MEDIAN of `--runs` timed runs (time.perf_counter)
-> images/s = batch / median_seconds.

Run (see README.txt):
    cd /tmp/pyra_ref && PYTHONPATH=/tmp/pyra_ref/site:/tmp/pyra_ref \
        /work/main/.venv/bin/python bench_ref.py --runs 10 --batch 8
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")

import timm  # noqa: E402  (must be timm 0.5.4 from /tmp/pyra_ref/site)

with contextlib.redirect_stdout(io.StringIO()):
    import model as ref_models  # noqa: E402  (reference model/__init__.py)
    from model.tome import apply_tome, get_merging_schedule  # noqa: E402

MODEL_NAME = "vit_base_patch16_224_in21k"


def cpu_model_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def tokens_per_layer(schedule, n_tokens=197, protected=1):
    out, t = [], n_tokens
    for r in schedule:
        t -= max(0, min(r, (t - protected) // 2))
        out.append(t)
    return out


def build(variant):
    schedule = None
    pyra_r = None
    if variant != "uncompressed":
        kind, level = variant.split("_")  # pyra_low, tome_high, ...
        schedule = get_merging_schedule(MODEL_NAME, level)
        pyra_r = list(schedule) if kind == "pyra" else None
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints a lot in __init__
        m = ref_models.__dict__[MODEL_NAME](
            pretrained=False,
            num_classes=100,
            img_size=224,
            drop_rate=0.0,
            drop_path_rate=0.0,
            prompt_tuning_dim=0,
            LoRA_dim=8,
            adapter_dim=0,
            prefix_dim=0,
            drop_rate_LoRA=0.0,
            drop_rate_prompt=0.0,
            drop_rate_adapter=0.0,
            pyra_r=pyra_r,
        )
    if schedule is not None:
        apply_tome(m)  # defaults: trace_source=False, prop_attn=True
        m.r = list(schedule)
    m.eval()
    return m, schedule


def bench(m, x, warmup, runs):
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            m(x)
        for _ in range(runs):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", action="store_true", help="also time plain ToMe (no PYRA) low/high")
    ap.add_argument("--out", default=os.path.join(OUT, "ref_bench.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    variants = ["uncompressed", "pyra_low", "pyra_high"]
    if args.extra:
        variants += ["tome_low", "tome_high"]

    load_before = os.getloadavg()
    results = {}
    for v in variants:
        m, schedule = build(v)
        with torch.inference_mode():
            y = m(x)
        assert y.shape == (args.batch, 100), y.shape
        times = bench(m, x, args.warmup, args.runs)
        med = statistics.median(times)
        results[v] = {
            "images_per_s": args.batch / med,
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "times_s": times,
            "schedule": schedule,
            "tokens_after_each_block": tokens_per_layer(schedule) if schedule else [197] * 12,
            "n_params": sum(p.numel() for p in m.parameters()),
            "n_pyra_params": sum(p.numel() for n, p in m.named_parameters() if "pyra" in n),
        }
        print(f"  {v:14s} median {med * 1000:8.1f} ms/batch  ->  {args.batch / med:7.2f} img/s", flush=True)
        del m
    load_after = os.getloadavg()

    base = results["uncompressed"]["images_per_s"]
    for v in results:
        results[v]["speedup_vs_uncompressed"] = results[v]["images_per_s"] / base

    meta = {
        "model": MODEL_NAME,
        "LoRA_dim": 8,
        "num_classes": 100,
        "dtype": "float32",
        "batch": args.batch,
        "warmup": args.warmup,
        "runs": args.runs,
        "statistic": "median",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "timm_path": os.path.dirname(timm.__file__),
        "cpu_model": cpu_model_name(),
        "nproc": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "reference": "THU-MIG/PYRA@03661cf03f284a4f08e47ce52b29b7bd281a8e17 model/*.py",
        "note": "CPU may be shared with other processes; see loadavg_before/after.",
    }
    print()
    print(
        f"Reference PYRA, {MODEL_NAME}, LoRA_dim=8, fp32, batch {args.batch}, "
        f"{meta['threads']} threads, median of {args.runs} (warm-up {args.warmup})"
    )
    print(f"CPU: {meta['cpu_model']}  | torch {meta['torch']}  timm {meta['timm']}")
    print(f"loadavg before {load_before}  after {load_after}")
    print(f"| {'variant':14s} | {'img/s':>8s} | {'median ms':>9s} | {'speedup':>7s} | final tokens |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 14}|")
    for v, r in results.items():
        print(
            f"| {v:14s} | {r['images_per_s']:8.2f} | {r['median_s'] * 1000:9.1f} | "
            f"{r['speedup_vs_uncompressed']:6.2f}x | {r['tokens_after_each_block'][-1]:12d} |"
        )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
