"""The Markdown block ``scripts/gpu_check.py`` writes for BENCHMARKS.md (``gpu_check.md``), from its
report: what ran, then each part's tables (speed, training steps, throughput, memory, fits)."""

from __future__ import annotations

import json
from typing import Any


def _throughput_rows(name: str, result: dict[str, Any]) -> list[str]:
    rows = []
    for row in result["table"]:
        rows.append(
            f"| {name} | {row['batch_size']} | {row['model']} | {row['images_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {result['gflops']['uncompressed'] / result['gflops'][row['model']]:.2f}x | "
            f"{row['efficiency']:.3f} |"
        )
    return rows


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_VERSIONS = ("torch", "cuda", "triton", "timm", "lightning", "onnxruntime")


def _environment(parts: dict[str, Any]) -> dict[str, Any]:
    """The ``env`` part's versions, or, where it did not run, the versions a measuring part
    recorded (``speed``, ``kernels`` and ``train_step`` each keep torch, CUDA, timm, Triton, GPU)."""
    env = parts.get("env", {}).get("result")
    if env and "torch" in env:  # a failed env part leaves no versions: look further
        return env
    for entry in parts.values():
        versions = (entry.get("result") or {}).get("versions")
        if versions:
            return versions
    return {}


def to_markdown(report: dict[str, Any]) -> str:
    """The block for BENCHMARKS.md: what ran, then the throughput table, memory, fits."""
    parts = report["parts"]
    env = _environment(parts)
    found = ", ".join(f"{name} {env[name]}" for name in _VERSIONS if env.get(name) is not None)
    lines = [
        f"### GPU check, {report['date']}{' (dry run)' if report['dry_run'] else ''}",
        "",
        f"`{report['command']}`: {env.get('gpu', report['device'])}, {found or 'versions not recorded'}; "
        f"{report['total_s']} s in all.",
        "",
        "| part | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, entry in parts.items():
        lines.append(
            f"| {name} | {entry['status']} | {entry.get('seconds', '-')} | {entry.get('reason', '')} |"
        )
    lines += _speed_lines(parts.get("speed", {}), "Speed")
    lines += _speed_lines(parts.get("kernels", {}), "The Triton kernels, measured in their own process")
    lines += train_step_lines(parts.get("train_step", {}))
    ddp = parts.get("ddp_fit", {})
    if ddp.get("status") == "ok":
        r = ddp["result"]
        lines += [
            "",
            f"DDP fit (2 processes, gloo, one device, bf16-mixed, the quickstart for 1 epoch): "
            f"train/samples_per_sec {r['train_samples_per_sec_all_ranks']:.1f} over both ranks "
            f"({r['train_samples_per_sec_per_rank']:.1f} per rank), one results.json "
            f"(test acc {_num(r['test_acc'], '.4f')}, throughput {_num(r['throughput'], '.1f')} img/s "
            f"on {r['throughput_engine']}, speed-up {_num(r['speedup'], '.2f')})",
        ]
    table = []
    for name in ("throughput", "compile", "compile_cudagraphs", "onnxruntime_cuda"):
        if parts.get(name, {}).get("status") in ("ok", "partial"):
            result = parts[name]["result"]
            label = {
                "throughput": "eager",
                "compile": "compile",
                "compile_cudagraphs": "compile (CUDA graphs)",
            }
            table += _throughput_rows(label.get(name, f"onnxruntime ({report['device']}, fp32)"), result)
    if table:
        lines += [
            "",
            "Inference throughput (precision bf16 autocast unless noted; speed-up over the same engine's "
            "uncompressed model; efficiency = speed-up / FLOPs reduction):",
            "",
            "| engine | batch | model | img/s | speedup | FLOPs reduction | efficiency |",
            "|---|---:|---|---:|---:|---:|---:|",
            *table,
        ]
    peaks = parts.get("throughput", {}).get("result", {}).get("peak_memory_mib")
    if peaks:
        lines += ["", "Peak memory of one inference forward at the largest batch (MiB, weights included): "]
        lines.append(", ".join(f"{name} {mib:.0f}" for name, mib in peaks.items()))
    fits = [parts[n]["result"] for n in ("fit_bf16", "fit_16") if parts.get(n, {}).get("status") == "ok"]
    if fits:
        lines += [
            "",
            "| fit (quickstart, 1 epoch) | test acc | throughput img/s | speedup |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {f['precision']} | {_num(f['test_acc'], '.4f')} | {_num(f['throughput'], '.1f')} | "
            f"{_num(f['speedup'], '.2f')} |"
            for f in fits
        ]
    if parts.get("pytest_gpu", {}).get("status") == "ok":
        lines += ["", f"pytest -m gpu: {parts['pytest_gpu']['result']['summary']}"]
    return "\n".join(lines) + "\n"


def _speed_lines(entry: dict[str, Any], title: str) -> list[str]:
    """The speed or kernels part's tables: img/s and speed-up per engine, then what was skipped."""
    result = entry.get("result")
    if not result:
        return []
    lines = [
        "",
        f"{title} (issue 17; bf16 autocast on CUDA, or held in bf16 where the engine says bf16-true; "
        "each engine and batch size timed side by side, interleaved; speed-up over the uncompressed "
        "model of the same group):",
        "",
    ]
    lines += ["| engine | batch | model | img/s | speedup | build s |", "|---|---:|---|---:|---:|---:|"]
    for row in result.get("rows", []):
        speedup = row.get("speedup")
        engine = f"{row['engine']} ({row['precision']})" if "precision" in row else row["engine"]
        lines.append(
            f"| {engine} | {row['batch_size']} | {row['model']} | {row['images_per_s']:.1f} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | {row['build_s']} |"
        )
    if result.get("kernels"):
        lines += ["", "Kernels per forward (torch.profiler; CPU: ATen operators): "]
        lines.append(", ".join(f"{k} {v}" for k, v in result["kernels"].items()))
    micros = ("attention", "matcher", "merger", "merge_backward", "attention_training")
    for key in ("versions", "peak_memory_mib", "parity", *micros, "kernel_time"):
        if result.get(key):
            lines += ["", f"{key}: {json.dumps(result[key], default=str)}"]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return lines


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
