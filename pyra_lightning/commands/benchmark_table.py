"""The ``benchmark`` command's rows and Markdown tables (``format_table``), and its progress lines."""

from __future__ import annotations

import shlex
import statistics
import sys
from typing import Any


def progress(message: str) -> None:
    """One line on stderr while the benchmark runs (stdout keeps the tables alone)."""
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def table_rows(
    times: dict[str, list[float]], setup: dict[str, float], rows: dict[str, dict[str, Any]], batch: int
) -> list[dict[str, Any]]:
    """One row per engine and model: img/s, speed-up over the engine's uncompressed model, efficiency."""
    out = []
    for key, seconds in times.items():
        engine, name = key.split("|", 1)
        median = statistics.median(seconds)
        base = statistics.median(times[f"{engine}|uncompressed"])
        speedup = base / median
        out.append(
            {
                "engine": engine,
                "batch_size": batch,
                "model": name,
                "images_per_s": batch / median,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(seconds),
                "speedup": speedup,
                "efficiency": speedup / rows[name]["flops_reduction"],
                "setup_s": setup[key],
            }
        )
    return out


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
        f"{args['model_name']}, batch {','.join(map(str, args['batch_sizes']))}, {args['img_size']} px, "
        f"precision {args['precision']}, engines {','.join(args['engine'])}, "
        f"{env['device_name']} ({env['threads']} threads), torch {env['torch']}, timm {env['timm']}, "
        f"median of {args['runs']} interleaved runs after {args['warmup']} warm-up ({args['clock']} clock), "
        f"loadavg {env['loadavg']} -> {env.get('loadavg_after')}",
        "",
    ]
    if "target" in result:
        found = result["target"]
        lines += _markdown_table(
            ["rho", "measured speedup", "FLOPs fraction", "schedule"],
            [
                [f"{t['rho']:.4f}", f"{t['speedup']:.3f}x", f"{t['flops_fraction']:.3f}", str(t["schedule"])]
                for t in found["trials"]
            ],
        )
        measured = (
            f"target speedup {args['target_speedup']:g} ({args['engine'][0]}, batch {args['batch_sizes'][0]}, "
            f"precision {args['precision']}): measured {found['speedup']:.3f}x at {found['flops_fraction']:.3f} "
            "of the FLOPs"
        )
        if args.get("ckpt_path"):  # an elastic run: deploy it there, no training
            schedule = ",".join(map(str, found["schedule"]))
            lines += [
                "",
                f"{measured}, inside the range {args['ckpt_path']} was trained for. Deploy it there:",
                f"  pyra-lightning export --ckpt_path {shlex.quote(args['ckpt_path'])} --merge_r '[{schedule}]' "
                "--out_dir <folder>",
            ]
        else:
            lines += [
                "",
                f"{measured}. Paste into your config:",
                f"  model.merging.merge_r: {found['schedule']}",
            ]
        return "\n".join(lines)
    gflops = {name: row["gflops"] for name, row in result["models"].items()}
    lines += _markdown_table(
        [
            "engine",
            "batch",
            "model",
            "img/s",
            "ms/batch",
            "GFLOPs",
            "speedup",
            "FLOPs reduction",
            "efficiency",
        ],
        [
            [
                row["engine"],
                str(row["batch_size"]),
                row["model"],
                f"{row['images_per_s']:.2f}",
                f"{row['median_ms']:.1f}",
                f"{gflops[row['model']]:.2f}",
                f"{row['speedup']:.2f}x",
                f"{result['models'][row['model']]['flops_reduction']:.2f}x",
                f"{row['efficiency']:.3f}",
            ]
            for row in result["table"]
        ],
    )
    lines += [
        "",
        "PYRA / ToMe throughput: " + ", ".join(f"{k} {v:.3f}" for k, v in result["pyra_vs_tome"].items()),
    ]
    setup = [r for r in result["table"] if r["engine"] != "eager" and r["setup_s"] > 0]
    if setup:
        lines.append(
            "export/compile seconds: "
            + ", ".join(f"{r['engine']} b{r['batch_size']} {r['model']} {r['setup_s']:.1f}" for r in setup)
        )
    for engine, reason in result["skipped"].items():
        lines.append(f"engine {engine} skipped: {reason}")
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
                    _fmt(row["saved_activations_mb"], ".0f"),
                ]
                for name, row in result["training"].items()
            ],
        )
    return "\n".join(lines)
