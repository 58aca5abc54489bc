"""The parts of ``scripts/gpu_check.sh``: each runs in its own process, timed, with its own limit.

Without ``--part`` this is the driver: it runs every part in order of value, each as
``python scripts/gpu_check.py --part NAME`` under a timeout, so a crash, a hang or a CUDA error
in one part loses only that part. It writes ``<out>/gpu_check.json`` (everything) and
``<out>/gpu_check.md`` (the block for BENCHMARKS.md), and prints the Markdown.

Parts:
  env            versions, GPU, CUDA, CPU
  throughput     ViT-B/16 uncompressed / ToMe / PYRA at low and high, bf16, batch 1, 64, 256,
                 eager: img/s, speedup, efficiency (speedup / FLOPs ratio), peak memory
  fit_bf16       a 1-epoch fit of configs/quickstart.yaml in bf16-mixed, then its test
  fit_16         the same in 16-mixed
  pytest_gpu     the tests marked ``gpu``
  compile        uncompressed / ToMe / PYRA at high under torch.compile (default mode)
  compile_cudagraphs   ... under torch.compile(mode="reduce-overhead"), i.e. CUDA graphs
  onnxruntime_cuda     ONNX Runtime's CUDA provider (fp32, at high), if onnxruntime-gpu is installed

``--device cpu --dry_run`` runs the same code paths on a tiny ViT in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# name -> (time limit in seconds on a GPU, what it measures)
PARTS: dict[str, tuple[int, str]] = {
    "speed": (360, "issue 17: engines x models x batch 1/64/256, kernels, memory, attention, matcher"),
    "ddp_fit": (150, "2-process DDP (gloo) on one GPU, bf16 autocast: trains, throughput over ranks"),
    "train_step": (
        200,
        "issue 17: ViT-B/16 training steps, uncompressed / ToMe / PYRA high, batch 64 and 128",
    ),
    "env": (60, "versions and device"),
    "throughput": (120, "ViT-B/16 eager bf16 throughput, efficiency, peak memory"),
    "fit_bf16": (120, "1-epoch quickstart fit + test, bf16-mixed"),
    "fit_16": (100, "1-epoch quickstart fit + test, 16-mixed"),
    "pytest_gpu": (120, "pytest -m gpu"),
    "compile": (170, "ViT-B/16 throughput under torch.compile"),
    "compile_cudagraphs": (110, "ViT-B/16 throughput under torch.compile(mode='reduce-overhead')"),
    "onnxruntime_cuda": (90, "ONNX Runtime CUDA provider, fp32"),
}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Model and batch sizes: ViT-B/16 on the GPU, a 2-block tiny ViT for the dry run."""
    if args.dry_run:
        return {
            "model_name": "vit_tiny_patch16_224",
            "img_size": 32,
            "model_kwargs": {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3},
            "merge_r": [[8, 8], [16, 8]],
            "batch_sizes": [1, 2],
            "runs": 1,
            "warmup": 1,
            "memory_batch": 2,
        }
    return {
        "model_name": "vit_base_patch16_224",
        "img_size": 224,
        "model_kwargs": None,
        "merge_r": ["low", "high"],
        "batch_sizes": [1, 64, 256],
        "runs": 20,
        "warmup": 5,
        "memory_batch": 256,
    }


# ------------------------------------------------------------------------------------- parts
def part_speed(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_speed import part_speed as speed

    return speed(args, lambda result: _save_partial(args, result))


def part_ddp_fit(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_speed import part_ddp_fit as ddp_fit

    return ddp_fit(args)


def part_train_step(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_speed import part_train_step as train_step

    return train_step(args, lambda result: _save_partial(args, result))


def part_env(args: argparse.Namespace) -> dict[str, Any]:
    import lightning
    import timm
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "device": args.device,
        "cpu_count": os.cpu_count(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False: no usable GPU in this process")
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _throughput(args: argparse.Namespace, engine: str, compile_mode: str | None = None) -> dict[str, Any]:
    """One ``run_benchmark`` per batch size, the part's JSON rewritten after each: a part that
    runs out of time keeps the batch sizes it finished (the driver reports it as ``partial``)."""
    from pyra_lightning.commands.benchmark import run_benchmark

    s = _settings(args)
    if engine != "eager":  # compiling / exporting every model at every batch size would not fit
        s["merge_r"] = s["merge_r"][-1:]
    precision = "32" if engine == "onnxruntime" else ("bf16" if args.device.startswith("cuda") else "32")
    out: dict[str, Any] = {"precision": precision, "compile_mode": compile_mode, "gflops": {}, "table": []}
    for batch in s["batch_sizes"]:
        result = run_benchmark(
            model_name=s["model_name"],
            merge_r=s["merge_r"],
            batch_sizes=[batch],
            img_size=s["img_size"],
            device=args.device,
            precision=precision,
            engine=engine,
            compile_mode=compile_mode,
            runs=s["runs"],
            warmup=s["warmup"],
            model_kwargs=s["model_kwargs"],
        )
        if result["skipped"]:
            raise RuntimeError(f"engine skipped: {result['skipped']}")
        out["gflops"] = {name: row["gflops"] for name, row in result["models"].items()}
        out["table"] += result["table"]
        _save_partial(args, out)
    if engine == "eager":
        out["peak_memory_mib"] = _peak_memory(args, s, precision)
    return out


def _save_partial(args: argparse.Namespace, result: dict[str, Any]) -> None:
    Path(args.out, f"part_{args.part}.partial.json").write_text(json.dumps(result, indent=2, default=str))


def _peak_memory(args: argparse.Namespace, s: dict[str, Any], precision: str) -> dict[str, float] | None:
    """Peak CUDA memory of one inference forward at the largest batch, weights included."""
    import torch

    from pyra_lightning.commands.benchmark import build_model
    from pyra_lightning.timing import autocast, random_images

    if not args.device.startswith("cuda"):
        return None
    device = torch.device(args.device)
    x = random_images(s["memory_batch"], s["img_size"], device)
    peaks = {}
    for name, spec, pyra in [("uncompressed", None, False)] + [
        (f"{method}/{spec}", spec, method == "pyra") for spec in s["merge_r"] for method in ("tome", "pyra")
    ]:
        model = build_model(
            s["model_name"], spec, pyra, img_size=s["img_size"], device=device, model_kwargs=s["model_kwargs"]
        ).eval()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), autocast(device, precision):
            model(x)
        torch.cuda.synchronize(device)
        peaks[str(name)] = torch.cuda.max_memory_allocated(device) / 2**20
        del model
        torch.cuda.empty_cache()
    return peaks


def part_throughput(args: argparse.Namespace) -> dict[str, Any]:
    return _throughput(args, "eager")


def part_compile(args: argparse.Namespace) -> dict[str, Any]:
    return _throughput(args, "compile")


def part_compile_cudagraphs(args: argparse.Namespace) -> dict[str, Any]:
    if not args.device.startswith("cuda"):
        return {"skipped": "CUDA graphs need a CUDA device", **_throughput(args, "compile")}
    return _throughput(args, "compile", compile_mode="reduce-overhead")


def part_onnxruntime_cuda(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import onnxruntime
    except ImportError as error:
        raise RuntimeError("onnxruntime is not installed") from error
    if (
        args.device.startswith("cuda")
        and "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    ):
        raise RuntimeError(
            f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
            f"(providers: {onnxruntime.get_available_providers()}); install onnxruntime-gpu to measure it"
        )
    return _throughput(args, "onnxruntime")


def _fit(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """``pyra-lightning fit`` of the quickstart, one epoch, in its own folder; read its results.json."""
    folder = Path(args.out).resolve() / f"fit_{precision}"
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pyra_lightning",
        "fit",
        f"--config={REPO / 'configs' / 'quickstart.yaml'}",
        f"--data.root={Path(args.out).resolve() / 'data'}",
        f"--run_dir={folder / 'runs'}",
        f"--trainer.accelerator={'cuda' if args.device.startswith('cuda') else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={precision}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
    ]
    if args.dry_run:
        command += [
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--throughput.runs=1",
            "--throughput.warmup=0",
        ]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=_env())
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"fit exited {done.returncode}: {done.stderr.strip().splitlines()[-3:]}")
    found = sorted(folder.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"fit wrote no results.json under {folder}")
    results = json.loads(found[-1].read_text())
    keys = ("test_acc", "throughput", "throughput_unmerged", "speedup", "gflops")
    return {"precision": precision, "results_json": str(found[-1]), **{k: results.get(k) for k in keys}}


def part_fit_bf16(args: argparse.Namespace) -> dict[str, Any]:
    return _fit(args, "bf16-mixed")


def part_fit_16(args: argparse.Namespace) -> dict[str, Any]:
    return _fit(args, "16-mixed")


def part_pytest_gpu(args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider"]
    if args.dry_run:  # the code path only: collect the marked tests of one file
        command += ["--collect-only", "tests/test_monitoring.py"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=_env())
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    if done.returncode not in (0, 5):  # 5: no test collected
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {summary}; {lines[-15:]}")
    return {"summary": summary, "returncode": done.returncode}


# ------------------------------------------------------------------------------------ driver
def _env() -> dict[str, str]:
    # One inductor cache for every part, so a model compiled once is not compiled again.
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(REPO / "gpu_check" / "inductor_cache")
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TORCHINDUCTOR_CACHE_DIR": cache,
    }


def run_part(name: str, args: argparse.Namespace) -> None:
    """Child process: run one part, write ``<out>/part_<name>.json``."""
    result = globals()[f"part_{name}"](args)
    Path(args.out, f"part_{name}.json").write_text(json.dumps(result, indent=2, default=str))


def drive(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "dry_run": args.dry_run,
        "device": args.device,
        "budget_s": args.budget_s,
        "parts": {},
    }
    for name in chosen:
        limit, what = PARTS[name]
        left = args.budget_s - (time.monotonic() - started)
        entry: dict[str, Any] = {"what": what}
        if left < 20:
            entry.update(status="skipped", reason=f"time budget of {args.budget_s} s spent")
        else:
            timeout = min(limit, left) if not args.dry_run else max(limit, 300)
            print(f"gpu_check: [{name}] {what} (limit {timeout:.0f} s) ...", flush=True)
            (out / f"part_{name}.json").unlink(missing_ok=True)
            (out / f"part_{name}.partial.json").unlink(missing_ok=True)
            command = [sys.executable, __file__, "--part", name, "--device", args.device, "--out", str(out)]
            command += ["--dry_run"] if args.dry_run else []
            tic = time.monotonic()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
                (out / f"part_{name}.log").write_text(done.stdout + done.stderr)
                if done.returncode == 0 and (out / f"part_{name}.json").exists():
                    entry.update(status="ok", result=json.loads((out / f"part_{name}.json").read_text()))
                else:
                    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
                    entry.update(status="failed", reason=f"exit {done.returncode}: {' '.join(tail)[:400]}")
            except subprocess.TimeoutExpired:
                partial = out / f"part_{name}.partial.json"
                if partial.exists():
                    entry.update(status="partial", result=json.loads(partial.read_text()))
                entry.setdefault("status", "skipped")
                entry["reason"] = f"timed out after {timeout:.0f} s" + (
                    "; the measurements it finished are kept" if partial.exists() else ""
                )
            entry["seconds"] = round(time.monotonic() - tic, 1)
            print(
                f"gpu_check: [{name}] {entry['status']} in {entry['seconds']} s {entry.get('reason', '')}",
                flush=True,
            )
        report["parts"][name] = entry
    report["total_s"] = round(time.monotonic() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = to_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print("\n" + markdown)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['total_s']} s")
    return report


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


def to_markdown(report: dict[str, Any]) -> str:
    """The block for BENCHMARKS.md: what ran, then the throughput table, memory, fits."""
    parts = report["parts"]
    env = parts.get("env", {}).get("result", {})
    lines = [
        f"### GPU check, {report['date']}{' (dry run)' if report['dry_run'] else ''}",
        "",
        f"`{report['command']}`: {env.get('gpu', report['device'])}, torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}), timm {env.get('timm')}, lightning {env.get('lightning')}, "
        f"onnxruntime {env.get('onnxruntime')}; {report['total_s']} s in all.",
        "",
        "| part | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, entry in parts.items():
        lines.append(
            f"| {name} | {entry['status']} | {entry.get('seconds', '-')} | {entry.get('reason', '')} |"
        )
    lines += _speed_lines(parts.get("speed", {}))
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_speed import train_step_lines

    lines += train_step_lines(parts.get("train_step", {}))
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


def _speed_lines(entry: dict[str, Any]) -> list[str]:
    """The speed part's tables: img/s and speed-up per engine, then what was skipped."""
    result = entry.get("result")
    if not result:
        return []
    lines = [
        "",
        "Speed (issue 17; bf16 autocast on CUDA; speed-up over the uncompressed model on the same engine):",
        "",
    ]
    lines += ["| engine | batch | model | img/s | speedup | build s |", "|---|---:|---|---:|---:|---:|"]
    for row in result.get("rows", []):
        speedup = row.get("speedup")
        lines.append(
            f"| {row['engine']} | {row['batch_size']} | {row['model']} | {row['images_per_s']:.1f} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | {row['build_s']} |"
        )
    if result.get("kernels"):
        lines += ["", "Kernels per forward (torch.profiler; CPU: ATen operators): "]
        lines.append(", ".join(f"{k} {v}" for k, v in result["kernels"].items()))
    for key in ("peak_memory_mib", "attention", "matcher", "merger"):
        if result.get(key):
            lines += ["", f"{key}: {json.dumps(result[key], default=str)}"]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --dry_run")
    parser.add_argument("--dry_run", action="store_true", help="tiny model, 1 run: check the code paths")
    parser.add_argument("--out", default="gpu_check", help="folder for the JSON, the Markdown and logs")
    parser.add_argument("--parts", default="", help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument(
        "--budget_s", type=float, default=570, help="seconds; no part starts once they are spent"
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
