"""Issue 18's measurement: one elastic fit against separate fits per rate, and ToMe at test time.

For each task and seed it runs, through ``pyra-lightning fit`` (the quickstart's tiny ViT):

- one elastic fit (``configs/method/pyra_elastic.yaml``), tested at FLOPs fractions 1.0, 0.5
  (``low``) and 0.289 (``high``) from ``results.json["curve"]``;
- three separate PYRA fits at those fractions (``merge_r`` 0, ``low``, ``high``);
- plain ToMe at test time: the fraction-1.0 fit (LoRA trained unmerged) merged at ``low`` and
  ``high`` with ``pyra=false``, evaluated on the test split.

and writes ``<out>/summary.json`` and a Markdown table (mean ± std over seeds, wall clock, and
the training FLOPs of each fit relative to one unmerged fit). Kept short for a shared CPU:

    python scripts/elastic_measure.py --out /tmp/meas --epochs 3 --batches 8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from pyra_lightning.__main__ import main
from pyra_lightning.data import generate_demo

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
ELASTIC = REPO / "configs" / "method" / "pyra_elastic.yaml"
POINTS = {"1.0": 0, "0.5": "low", "0.289": "high"}  # fraction -> merge_r of a separate fit


def common(root: Path, data: Path, task: str, seed: int, epochs: int, batches: int) -> list[str]:
    return [
        f"--data.root={data}",
        f"--data.task={task}",
        f"--run_dir={root}",
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.limit_train_batches={batches}",
        "--trainer.enable_progress_bar=false",
        "--throughput.enabled=false",
        "--train_throughput.enabled=false",
    ]


def timed_fit(root: Path, args: list[str]) -> float | None:
    """Fit into ``root`` and return the wall clock; a finished run (its results.json) is reused."""
    wall = root / "wall_s.txt"
    if (root / "results.json").exists():
        return float(wall.read_text()) if wall.exists() else None
    start = time.perf_counter()
    main(["fit", *args])
    seconds = time.perf_counter() - start
    wall.write_text(f"{seconds:.1f}\n")
    return seconds


def tome_at_test_time(root: Path, args: list[str], merge_r: str) -> float:
    """Accuracy of the fraction-1.0 fit's LoRA model merged with plain ToMe at ``merge_r``."""
    from pyra_lightning.commands.export import load_trainable, read_checkpoint
    from pyra_lightning.training.cli import build_cli

    cli = build_cli(
        [*args, f"--model.merging.merge_r={merge_r}", "--model.merging.pyra=false", "--trainer.logger=false"],
        run=False,
    )
    load_trainable(cli.model, read_checkpoint(root / "checkpoints" / "last.ckpt"))
    cli.datamodule.setup("test")
    model = cli.model.folded_copy()
    correct = seen = 0
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            images, labels = cli.datamodule.on_after_batch_transfer(batch, 0)  # normalises uint8
            correct += int((model(images).argmax(-1) == labels).sum())
            seen += labels.numel()
    return correct / seen


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    tasks = {"demo": out / "data", "demo_s7": out / "data_s7"}
    generate_demo(tasks["demo"])
    if not (tasks["demo_s7"] / "demo_s7").is_dir():
        generated = generate_demo(out / "data_s7_tmp", seed=7)  # a second draw of the generator
        tasks["demo_s7"].mkdir(parents=True, exist_ok=True)
        shutil.move(str(generated), tasks["demo_s7"] / "demo_s7")
    done = out / "summary.json"
    summary: dict = json.loads(done.read_text()) if done.exists() else {}  # rerun: skip what is done
    for task, data in tasks.items():
        if args.tasks and task not in args.tasks:
            continue
        for seed in args.seeds:
            key = f"{task}/seed{seed}"
            if key in summary:
                continue
            base = [f"--config={QUICKSTART}"]
            entry: dict = {}
            root = out / "runs" / task / f"elastic_s{seed}"
            extra = common(root, data, task, seed, args.epochs, args.batches)
            curve_arg = "--model.merging.elastic.curve=[1.0, low, high]"
            entry["elastic_wall_s"] = timed_fit(root, [*base, f"--config={ELASTIC}", *extra, curve_arg])
            result = json.loads((root / "results.json").read_text())
            entry["elastic"] = {f: p["test_acc"] for f, p in zip(POINTS, result["curve"], strict=True)}
            entry["curve"] = result["curve"]
            for fraction, merge_r in POINTS.items():
                root = out / "runs" / task / f"r{fraction}_s{seed}"
                extra = common(root, data, task, seed, args.epochs, args.batches)
                entry[f"separate_wall_s_{fraction}"] = timed_fit(
                    root, [*base, *extra, f"--model.merging.merge_r={merge_r}"]
                )
                result = json.loads((root / "results.json").read_text())
                entry.setdefault("separate", {})[fraction] = result["test_acc"]
                entry.setdefault("separate_schedule", {})[fraction] = result["config"]["merge_r"]
                if fraction == "1.0":
                    entry["tome"] = {
                        f: tome_at_test_time(root, [*base, *extra], m)
                        for f, m in POINTS.items()
                        if f != "1.0"
                    }
            summary[key] = entry
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def table(summary: dict) -> str:
    def stat(values: list[float]) -> str:
        pct = [100 * v for v in values]
        sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
        return f"{statistics.mean(pct):.1f} ± {sd:.1f}"

    lines = []
    for task in sorted({k.split("/")[0] for k in summary}):
        runs = [v for k, v in summary.items() if k.startswith(task + "/")]
        lines += [
            f"**{task}** ({len(runs)} seeds), test top-1 %",
            "",
            "| fraction | elastic (one fit) | separate fit | ToMe at test time |",
            "|---|---:|---:|---:|",
        ]
        for fraction in POINTS:
            tome = stat([r["tome"][fraction] for r in runs]) if fraction != "1.0" else "(= separate)"
            lines.append(
                f"| {fraction} | {stat([r['elastic'][fraction] for r in runs])} | "
                f"{stat([r['separate'][fraction] for r in runs])} | {tome} |"
            )

        def wall(key: str, runs: list = runs) -> float:
            known = [r[key] for r in runs if r[key] is not None]
            return statistics.mean(known) if known else float("nan")

        wall_e = wall("elastic_wall_s")
        wall_s = {f: wall(f"separate_wall_s_{f}") for f in POINTS}
        lines += [
            "",
            f"wall clock per fit (mean): elastic {wall_e:.0f} s; separate "
            + ", ".join(f"{f}: {w:.0f} s" for f, w in wall_s.items())
            + f" (three: {sum(wall_s.values()):.0f} s)",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="*", default=[])
    parsed = parser.parse_args()
    done = run(parsed)
    text = table(done)
    (Path(parsed.out) / "table.md").write_text(text)
    print(text)
