"""scripts/gpu_check.sh, the prepared GPU check, run in its CPU dry-run mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The environment of a dry run: this checkout first, and no ``TRITON_INTERPRET`` from the
    caller (with it the kernels would run on the CPU and the dry run check other outcomes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_gpu_check_dry_run_writes_json_and_markdown(tmp_path: Path) -> None:
    """The same code paths as on a GPU, on a tiny ViT: each part timed, its result recorded."""
    parts = "env,throughput,fit_bf16,pytest_gpu"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--dry_run"]
        + ["--out", str(tmp_path), "--parts", parts, "--budget_s", "900"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == parts.split(",") and report["dry_run"] is True
    for name, entry in report["parts"].items():
        assert entry["status"] == "ok", (name, entry.get("reason"))
        assert entry["seconds"] > 0
    table = report["parts"]["throughput"]["result"]["table"]
    assert {(row["batch_size"], row["model"].split("/")[0]) for row in table} == {
        (batch, method) for batch in (1, 2) for method in ("uncompressed", "tome", "pyra")
    }
    fit = report["parts"]["fit_bf16"]["result"]
    assert fit["precision"] == "bf16-mixed" and 0.0 <= fit["test_acc"] <= 1.0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| throughput | ok |" in markdown and "| eager | 2 | pyra/16,8 |" in markdown
    assert "| bf16-mixed |" in markdown
    assert "gpu_check.md" in done.stdout, "the paths of both files are printed"


def test_a_failing_part_is_recorded_and_the_rest_still_runs(tmp_path: Path) -> None:
    """Asking for CUDA on a machine without one: env fails with its reason, nothing is lost."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the failure this test provokes would not happen")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cuda", "--out", str(tmp_path)]
        + ["--parts", "env,pytest_gpu", "--dry_run"],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["env"]["status"] == "failed" and "no usable GPU" in parts["env"]["reason"]
    assert parts["pytest_gpu"]["status"] == "ok"


@pytest.mark.slow
def test_speed_and_ddp_parts_dry_run(tmp_path: Path) -> None:
    """The speed part (first in the check), the 2-process DDP fit and the training steps, on a
    CPU, tiny ViT: each measurement recorded, the graph engines skipped with their reason, the
    DDP fit's throughput summed over its two ranks and its results written once."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--dry_run"]
        + [
            "--out",
            str(tmp_path),
            "--parts",
            "speed,kernels,ddp_fit,train_step",
            "--export",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["speed", "kernels", "ddp_fit", "train_step"]
    speed = parts["speed"]["result"]
    assert {(r["model"], r["batch_size"]) for r in speed["rows"]} == {
        (m, b) for m in ("uncompressed", "tome/8", "pyra/8", "pyra/flops0.8-align8") for b in (1, 2)
    }
    assert all(r["images_per_s"] > 0 and r["speedup"] > 0 for r in speed["rows"])
    assert speed["skipped"][0] == "cudagraph, inductor-cudagraph: need CUDA"
    assert all("Error" not in skipped for skipped in speed["skipped"]), speed["skipped"]
    assert speed["attention"]["flex_max_abs_diff"] < 1e-4
    assert (tmp_path / "part_speed.partial.json").exists(), "measurements are saved as they finish"
    # the Triton kernels in a process of their own, beside the torch rule measured with them
    kernels = parts["kernels"]["result"]
    autocast = [r for r in kernels["rows"] if "precision" not in r]
    assert {(r["model"], r["batch_size"]) for r in autocast} == {
        (m, b)
        for m in ("uncompressed", "tome/8", "pyra/8", "pyra/flops0.8-align8")
        + ("tome/8+kernels", "pyra/8+kernels", "pyra/flops0.8-align8+kernels")
        for b in (1, 2)
    }
    # then the models held in bf16, without autocast, in groups of their own with their own baseline
    held = [r for r in kernels["rows"] if "precision" in r]
    assert {(r["model"], r["group"], r["precision"]) for r in held} == {
        (m, f"eager bf16-true batch {b}", "bf16-true")
        for m in (
            "uncompressed",
            "pyra/8",
            "pyra/flops0.8-align8",
            "pyra/8+kernels",
            "pyra/flops0.8-align8+kernels",
        )
        for b in (1, 2)
    }
    assert [r["speedup"] for r in held if r["model"] == "uncompressed"] == [1.0, 1.0]
    # where a forward's time goes, by kind: every kind's time adds up to the total
    times = kernels["kernel_time"]
    assert set(times) == {"uncompressed", "pyra/8", "pyra/flops0.8-align8", "pyra/8+kernels"} | {
        "pyra/flops0.8-align8+kernels"
    }
    for breakdown in times.values():
        assert breakdown["total_ms"] > 0 and "matmul" in breakdown["by_kind_ms"]
        assert sum(breakdown["by_kind_ms"].values()) == pytest.approx(breakdown["total_ms"], abs=1e-2)
    assert "sort" in times["pyra/8"]["by_kind_ms"] and "sort" not in times["uncompressed"]["by_kind_ms"]
    assert [r["batch_size"] for r in kernels["rows"]][0] == 2, "the largest batch first"
    assert all(r["speedup"] > 0 for r in kernels["rows"]) and "needs CUDA" in kernels["parity"]["triton"]
    assert kernels["merger"]["torch_ms"] > 0 and "needs CUDA" in kernels["merger"]["triton"]
    assert kernels["matcher"]["torch_ms"] > 0
    assert "needs CUDA" in kernels["merge_backward"]["triton"]
    assert kernels["attention"]["sdpa_masked_ms"] > 0 and "needs CUDA" in kernels["attention"]["triton"]
    assert kernels["attention_training"]["grad_max_rel_diff"] < 1e-5  # the key channel's gradient
    ddp = parts["ddp_fit"]["result"]
    # pyra-lightning fit in two processes started as a cluster starts them; one results.json
    assert ddp["world_size"] == 2 and ddp["results_json"].endswith("results.json")
    assert ddp["train_samples_per_sec_all_ranks"] == pytest.approx(2 * ddp["train_samples_per_sec_per_rank"])
    assert ddp["throughput"] > 0 and 0.0 <= ddp["test_acc"] <= 1.0
    train = parts["train_step"]["result"]["rows"]
    assert {(r["model"], r["batch_size"]) for r in train} == {
        (m, b)
        for m in ("uncompressed", "tome/8", "pyra/8", "pyra/8+merge-kernels", "pyra/8+merge-kernels+channel")
        for b in (1, 2)
    }
    assert all(r["images_per_s"] > 0 for r in train)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| eager | 2 | pyra/8 |" in markdown and "Training step" in markdown
    assert "| eager | 2 | pyra/8+kernels |" in markdown
    assert "| eager (bf16-true) | 2 | pyra/8+kernels |" in markdown
    # what the device tool brings back (at most 8 files): the report, its Markdown, one bundle
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_check.json",
        "gpu_check.md",
        "gpu_check_files.tar.gz",
    ]
    with tarfile.open(tmp_path / "out" / "gpu_check_files.tar.gz") as bundle:
        assert {
            "part_speed.log",
            "part_train_step.partial.json",
            "part_ddp_fit.json",
            "ddp_fit/rank1.log",
        } <= set(bundle.getnames())
    assert parts["train_step"]["result"]["skipped"], (
        "the compiled steps are skipped on a CPU, with the reason"
    )


def test_speed_part_runs_first() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check import PARTS

    assert list(PARTS)[:3] == ["speed", "kernels", "ddp_fit"] and PARTS["speed"][0] <= 360


def test_the_speed_part_times_each_group_side_by_side_and_counts_kernels_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each (engine, batch) group's models are timed in one interleaved call, speed-ups are over
    the group's own uncompressed row, and no timing runs after a profiler session (CUPTI stays
    up after one and may slow what follows)."""
    import argparse

    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_speed

    events: list[tuple[str, tuple[str, ...]]] = []
    timed, counted = gpu_speed._interleaved_ms, gpu_speed._kernels_per_forward

    def interleaved(fns, device, runs, warmup=3):  # type: ignore[no-untyped-def]
        events.append(("time", tuple(fns)))
        return timed(fns, device, runs, warmup)

    def kernels(fn, device, forwards=3):  # type: ignore[no-untyped-def]
        events.append(("count", ()))
        return counted(fn, device, forwards)

    monkeypatch.setattr(gpu_speed, "_interleaved_ms", interleaved)
    monkeypatch.setattr(gpu_speed, "_kernels_per_forward", kernels)
    args = argparse.Namespace(device="cpu", dry_run=True, part_limit_s=None)
    out = gpu_speed.part_speed(args, save=lambda result: None)
    models = ("uncompressed", "tome/8", "pyra/8", "pyra/flops0.8-align8")
    kinds = [kind for kind, _ in events]
    assert "count" in kinds and "time" not in kinds[kinds.index("count") :], kinds
    model_timings = [names for kind, names in events if kind == "time" and "uncompressed" in names]
    assert model_timings == [models, models], "one interleaved call per group (eager at batch 1 and 2)"
    for row in out["rows"]:
        base = next(r for r in out["rows"] if r["group"] == row["group"] and r["model"] == "uncompressed")
        assert row["speedup"] == pytest.approx(row["images_per_s"] / base["images_per_s"])
    assert {r["group"] for r in out["rows"]} == {"eager batch 1", "eager batch 2"}


def test_every_kernel_row_has_its_torch_twin_on_the_gpu_settings() -> None:
    """The kernels part times each ``+kernels`` model beside the same model on torch: on the
    ViT-B/16 settings the dry run does not use, too."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_kernels import kernel_models
    from gpu_speed import _settings

    names = kernel_models(_settings(dry_run=False)["models"])
    assert names == [
        "uncompressed",
        "tome/high",
        "pyra/high",
        "pyra/high-align8",
        "tome/high+kernels",
        "pyra/high+kernels",
        "pyra/high-align8+kernels",
    ]
    with pytest.raises(ValueError, match="torch twins"):
        kernel_models({"uncompressed": None, "pyra/low+kernels": None})


def test_the_report_names_the_versions_a_part_recorded_when_env_did_not_run() -> None:
    """The 2026-12-04 run skipped ``env`` and its header read "torch None (CUDA None)": the
    versions the speed part recorded are named instead, and an unknown one is left out."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_report import to_markdown

    versions = {"torch": "2.11.0+cu130", "cuda": "13.0", "timm": "1.0.31", "gpu": "NVIDIA H200"}
    report = {"date": "d", "dry_run": False, "command": "c", "device": "cuda", "total_s": 1.0}
    report["parts"] = {
        "speed": {"status": "ok", "seconds": 1.0, "result": {"rows": [], "versions": versions}}
    }
    header = to_markdown(report).splitlines()[2]
    assert header == "`c`: NVIDIA H200, torch 2.11.0+cu130, cuda 13.0, timm 1.0.31; 1.0 s in all."
    report["parts"]["speed"]["result"].pop("versions")
    assert "versions not recorded" in to_markdown(report) and "None" not in to_markdown(report)


def test_device_timing_asks_triton_for_the_median_and_records_a_failure_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernels part's GPU-clock figures (``device_ms``): each callable timed by
    ``triton.testing.do_bench`` as a median; one that raises leaves its error, not a crash."""
    triton_testing = pytest.importorskip(
        "triton.testing", reason="Triton is not installed (a CPU-only torch)"
    )

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_micro import device_ms

    calls: list[str] = []

    def fake_do_bench(fn: Callable[[], object], return_mode: str) -> float:
        calls.append(return_mode)
        fn()
        return 0.25

    def broken() -> None:
        raise RuntimeError("illegal address")

    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    got = device_ms({"kernel": lambda: None, "broken": broken})
    assert got == {"kernel": 0.25, "broken": "RuntimeError: illegal address"}
    assert calls == ["median", "median"]


def test_a_compile_is_expected_to_take_as_long_as_the_slowest_of_its_kind() -> None:
    """On 2026-12-04 one estimate for every compile (the slowest, 102 s for PYRA high) skipped an
    uncompressed compile (21 s) that fitted: the estimate is kept per kind."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_speed import FIRST_COMPILE_S, compile_estimate_s, note_compile_s

    seen: dict[str, float] = {}
    assert compile_estimate_s(seen, "uncompressed") == FIRST_COMPILE_S
    note_compile_s(seen, "uncompressed", 21.0)
    assert compile_estimate_s(seen, "uncompressed") == 21.0
    assert compile_estimate_s(seen, "pyra/high") == FIRST_COMPILE_S, "a merged model is not yet measured"
    note_compile_s(seen, "pyra/high", 102.0)
    note_compile_s(seen, "tome/high", 80.0)
    assert compile_estimate_s(seen, "pyra/high+flex") == 102.0, "the slowest merged compile"
    assert compile_estimate_s(seen, "uncompressed") == 21.0


def test_a_part_out_of_time_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """The driver kills a part's whole process group on timeout (a compile worker or a DDP rank
    left running would share the GPU with the next part), and keeps what it printed."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check import _run

    script = (  # the grandchild does not hold the part's pipes, so only a group kill ends it
        "import subprocess, time; c = subprocess.Popen(['sleep', '120'], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(c.pid, flush=True); time.sleep(120)"
    )
    log = tmp_path / "part.log"
    code, _ = _run([sys.executable, "-c", script], timeout=5, log=log)
    assert code is None  # timed out
    child = int(log.read_text().split()[0])  # printed before the kill, kept in the log
    assert _all_gone(lambda: [child] if _running(child) else []), "the part's child still runs"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return False


def _processes_with(text: str) -> list[int]:
    """Running processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace") if proc.name.isdigit() else ""
        except OSError:  # gone while we looked
            continue
        if text in command and _running(int(proc.name)):
            found.append(int(proc.name))
    return found


def _all_gone(find: Callable[[], list[int]], seconds: float = 5.0) -> bool:
    """Whether ``find()`` comes back empty within ``seconds`` (a killed process takes a moment)."""
    for _ in range(int(seconds * 10)):
        if not find():
            return True
        time.sleep(0.1)
    return not find()


@pytest.mark.slow
def test_a_stopped_driver_stops_its_part_and_keeps_what_finished(tmp_path: Path) -> None:
    """A device call that runs out of time sends SIGTERM: the driver kills the running part with
    its process group, records it as partial with the rows it saved, and exits 128 + 15."""
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--dry_run"]
        + ["--out", str(tmp_path), "--parts", "speed,kernels", "--export", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    partial = tmp_path / "part_speed.partial.json"
    for _ in range(600):
        if partial.exists() or driver.poll() is not None:
            break
        time.sleep(0.1)
    assert partial.exists(), "the speed part saved nothing in 60 s"
    driver.send_signal(signal.SIGTERM)
    stdout, _ = driver.communicate(timeout=60)
    assert driver.returncode == 128 + signal.SIGTERM, stdout[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    speed = report["parts"]["speed"]
    assert speed["status"] == "partial" and "stopped by SIGTERM" in speed["reason"]
    assert speed["result"]["rows"], "the rows measured before the signal are in the report"
    assert "kernels" not in report["parts"], "no part starts after the signal"
    part = f"--part\0speed\0--device\0cpu\0--out\0{tmp_path}"
    assert _all_gone(lambda: _processes_with(part)), "the part still runs"


def test_every_compiled_pair_names_a_model_of_the_gpu_settings() -> None:
    """The compiled plan is read only on a GPU: a name it lists that the settings lack would fail
    there, minutes into a lent device's time, so check it here."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_speed import COMPILED, _settings

    models = _settings(dry_run=False)["models"]
    batches = _settings(dry_run=False)["batch_sizes"]
    assert [name for name, _ in COMPILED if name not in models] == []
    assert {batch for _, batch in COMPILED} <= set(batches)
    for name, batch in COMPILED:  # every compiled group has its baseline, compiled before it
        if name != "uncompressed":
            assert COMPILED.index(("uncompressed", batch)) < COMPILED.index((name, batch))


def test_kernel_names_fall_into_the_kinds_a_breakdown_reports() -> None:
    """CUDA kernel names as the H200 profile shows them, and CPU operator names, to their kind."""
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_kernels import kernel_kind

    assert kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_kind("aten::linear") == "matmul"
    assert kernel_kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention", "before cutlass"
    assert kernel_kind("merge_kernel") == "triton" and kernel_kind("match_kernel") == "triton"
    # the Triton attention is attention, so a breakdown compares it with SDPA's masked kernel
    assert kernel_kind("attention_kernel") == "attention" and kernel_kind("plan_kernel") == "triton"
    assert kernel_kind("void at::native::vectorized_layer_norm_kernel<float>") == "layer_norm"
    assert kernel_kind("void at::native::radixSortKVInPlace<-2, -1, 32, 4>") == "sort"
    assert kernel_kind("void at::native::_scatter_gather_elementwise_kernel<128, 8>") == "gather/cat/copy"
    assert (
        kernel_kind("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "elementwise"
    )
    assert kernel_kind("aten::something_new") == "other"
