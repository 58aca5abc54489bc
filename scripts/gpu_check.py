"""The parts of ``scripts/gpu_check.sh``: each runs in its own process, timed, with its own limit.

Without ``--part`` this is the driver: it runs every part in order of value, each as
``python scripts/gpu_check.py --part NAME`` under a timeout, so a crash, a hang or a CUDA error
in one part loses only that part (a part that stops early keeps what it measured: it saves as
it goes). After every part it rewrites ``<out>/gpu_check.json`` (everything) and
``<out>/gpu_check.md`` (the block for BENCHMARKS.md), so a call cut short still returns them;
at the end it prints the Markdown.

Parts (the first four are issue 17's; ``scripts/gpu_speed.py`` and ``gpu_kernels.py`` have them):
  speed          ViT-B/16 bf16, batch 1/64/256, uncompressed / ToMe high / PYRA low / PYRA high
                 (and FlexAttention, align=8) on eager, cudagraph and inductor-cudagraph: img/s,
                 speed-up, kernels per forward, peak memory, attention micro-benchmark
  kernels        the Triton matcher and merger, first run on a GPU, in a process of their own:
                 logits parity with the torch rule, eager/cudagraph rows beside torch's, micro-benchmarks
  ddp_fit        2 processes, gloo, both on cuda:0, bf16 autocast: trains, aggregates, writes once
  train_step     training steps of uncompressed / ToMe high / PYRA high at batch 64 and 128
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
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from gpu_report import to_markdown  # noqa: E402 (the scripts folder is not a package)

from pyra_lightning.files import atomic_write_text  # noqa: E402

# name -> (time limit in seconds on a GPU, what it measures)
PARTS: dict[str, tuple[int, str]] = {
    "speed": (300, "issue 17: engines x models x batch 1/64/256, kernel counts, memory, attention"),
    "kernels": (
        120,
        "issue 17: the Triton matcher and merger on the GPU: parity, eager/cudagraph rows, bf16-true",
    ),
    "ddp_fit": (90, "2-process DDP (gloo) on one GPU, bf16 autocast: trains, throughput over ranks"),
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
    from gpu_speed import part_speed as speed

    return speed(args, lambda result: _save_partial(args, result))


def part_kernels(args: argparse.Namespace) -> dict[str, Any]:
    from gpu_kernels import part_kernels as kernels

    return kernels(args, lambda result: _save_partial(args, result))


def part_ddp_fit(args: argparse.Namespace) -> dict[str, Any]:
    from gpu_ddp import part_ddp_fit as ddp_fit

    return ddp_fit(args)


def part_train_step(args: argparse.Namespace) -> dict[str, Any]:
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
        props = torch.cuda.get_device_properties(torch.device(args.device))
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
    write_json(Path(args.out, f"part_{args.part}.partial.json"), result)


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
    from gpu_ddp import fit_command

    folder = Path(args.out).resolve() / f"fit_{precision}"
    shutil.rmtree(folder / "runs", ignore_errors=True)  # else fit finds its finished run: old figures
    folder.mkdir(parents=True, exist_ok=True)
    command = fit_command(args, precision, folder)
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
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "/tmp/pyra_gpu_check_inductor_cache"
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TORCHINDUCTOR_CACHE_DIR": cache,
        # The parts profile while CUDA graphs are alive; CUPTI's teardown between profiler
        # sessions is known to crash there. Kept up, it may slow what runs after it, so every
        # part counts kernels last, after all its timing.
        "TEARDOWN_CUPTI": "0",
    }


def run_part(name: str, args: argparse.Namespace) -> None:
    """Child process: run one part, write ``<out>/part_<name>.json``."""
    if args.device.startswith("cuda:"):  # a part's "cuda" (streams, events, memory) is that GPU
        import torch

        torch.cuda.set_device(torch.device(args.device))
    result = globals()[f"part_{name}"](args)
    write_json(Path(args.out, f"part_{name}.json"), result)


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all (``files.atomic_write_text``): a kill mid-write leaves the old file."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _text(stream: str | bytes | None) -> str:
    """What a process printed, also when ``TimeoutExpired`` hands it over as bytes."""
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


class Stopped(Exception):
    """SIGTERM or SIGINT reached the driver (a device call's time limit, a Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    for other in (signal.SIGTERM, signal.SIGINT):  # once: a second signal must not cut the cleanup
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


def _run(command: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run a part in its own process group, killed whole (compile workers, DDP ranks) on timeout,
    so nothing it started keeps the GPU busy under the next part. Returns (exit code or None on
    timeout, the last line of its stderr); everything it printed goes to ``log``."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except (subprocess.TimeoutExpired, Stopped) as error:  # Stopped: the part goes with the driver
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        code = None
        if isinstance(error, Stopped):
            log.write_text(_text(stdout) + _text(stderr))
            raise
    log.write_text(_text(stdout) + _text(stderr))
    tail = [line for line in _text(stderr).strip().splitlines() if line.strip()][-1:]
    return code, " ".join(tail)[:400]


def _finish(report: dict[str, Any], out: Path, started: float, export: str | None) -> str:
    """Write gpu_check.json and gpu_check.md as they stand (after every part: a kill keeps them);
    with ``export``, copy both there with every log and result file (no data, no checkpoints) in
    one ``gpu_check_files.tar.gz``
    (three files: the device tool brings at most 8 back from its $OUT)."""
    report["total_s"] = round(time.monotonic() - started, 1)
    write_json(out / "gpu_check.json", report)
    markdown = to_markdown(report)
    atomic_write_text(out / "gpu_check.md", markdown)
    if export:
        target = Path(export)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_check.json", "gpu_check.md"):
            atomic_write_text(target / name, (out / name).read_text())
        with tarfile.open(target / "gpu_check_files.tar.gz.tmp", "w:gz") as bundle:
            for path in sorted(out.rglob("*")):
                inner = path.relative_to(out)
                skip = inner.parts[0] == "data" or path.suffix in (".ckpt", ".tmp")  # data, weights
                if path.is_file() and not skip:
                    bundle.add(path, arcname=str(inner))
        os.replace(target / "gpu_check_files.tar.gz.tmp", target / "gpu_check_files.tar.gz")
    return markdown


def _drive_part(name: str, args: argparse.Namespace, report: dict[str, Any], started: float) -> None:
    """Run part ``name`` under its limit and record it in ``report``, then rewrite the report."""
    out = Path(args.out)
    limit, what = PARTS[name]
    left = args.budget_s - (time.monotonic() - started)
    entry: dict[str, Any] = {"what": what}
    report["parts"][name] = entry
    if left < 20:
        entry.update(status="skipped", reason=f"time budget of {args.budget_s} s spent")
        _finish(report, out, started, args.export)
        return
    timeout = min(limit, left) if not args.dry_run else max(limit, 300)
    print(f"gpu_check: [{name}] {what} (limit {timeout:.0f} s) ...", flush=True)
    result_path, partial = out / f"part_{name}.json", out / f"part_{name}.partial.json"
    result_path.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--part", name, "--device", args.device, "--out", str(out)]
    command += ["--part_limit_s", f"{timeout:.0f}"] + (["--dry_run"] if args.dry_run else [])
    tic = time.monotonic()
    stopped: Stopped | None = None
    try:
        code, tail = _run(command, timeout, out / f"part_{name}.log")
    except Stopped as stop:
        stopped, code, tail = stop, None, ""
    if result_path.exists():  # finished; a crash at exit (CUDA graphs, CUPTI) is only noted
        entry.update(status="ok", result=json.loads(result_path.read_text()))
        if code != 0 and stopped is None:
            entry["reason"] = f"exited {code} after writing its result: {tail}"
    else:
        why = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}: {tail}"
        entry.update(status="failed", reason=f"{stopped}: the check ends here" if stopped else why)
        if partial.exists():  # what it measured before it stopped
            entry.update(status="partial", result=json.loads(partial.read_text()))
            entry["reason"] += "; the measurements it finished are kept"
    entry["seconds"] = round(time.monotonic() - tic, 1)
    print(
        f"gpu_check: [{name}] {entry['status']} in {entry['seconds']} s {entry.get('reason', '')}", flush=True
    )
    if stopped is not None:
        raise stopped
    _finish(report, out, started, args.export)


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
    # A device call that runs out of time stops the driver: the part running is killed with its
    # process group and the report keeps what finished, instead of the part running on orphaned.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_stopped)
    try:
        for name in chosen:
            _drive_part(name, args, report, started)
        markdown = _finish(report, out, started, args.export)
    except Stopped as stop:  # the running part is killed and recorded; none starts after it
        _finish(report, out, started, args.export)
        print(f"gpu_check: {stop}; wrote what finished", flush=True)
        raise SystemExit(128 + stop.signum) from None
    print("\n" + markdown)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['total_s']} s")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --dry_run")
    parser.add_argument("--dry_run", action="store_true", help="tiny model, 1 run: check the code paths")
    parser.add_argument("--out", default="gpu_check", help="folder for the JSON, the Markdown and logs")
    parser.add_argument(
        "--export",
        default=None,
        help="also keep gpu_check.json, gpu_check.md and a tar.gz of every log there, after every part "
        "(e.g. $OUT/gpu_check on the lent GPU, which returns at most 8 files)",
    )
    parser.add_argument("--parts", default="", help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=440,
        help="seconds (default 440: speed, kernels, ddp_fit and the start of train_step fit one 7-8 minute "
        "device call); no part starts once they are spent, and the last one gets what is left",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part_limit_s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
