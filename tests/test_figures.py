"""Figures fit for a paper: titles, labelled axes, a legend saying what "x" is relative to, and point
labels inside the frame that never overlap (issue 15 item 8); the elastic accuracy-speed-up curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyra_lightning.commands.figures import (
    accuracy_throughput_figure,
    annotation_boxes,
    elastic_curve_figure,
    elastic_curve_series,
    place_annotations,
)
from pyra_lightning.commands.report import report
from pyra_lightning.commands.table import collect_results
from pyra_lightning.results import RunResult

DEPTH = 6


def run(method: str, acc: float, seed: int, merge_r: list[int], speedup: float, **extra: Any) -> dict:
    settings = {"model.merging.merge_r": merge_r, "model.method": method, "seed_everything": seed}
    return {
        "task": "demo",
        "method": method,
        "protocol": "final",
        "test_acc": acc,
        "throughput": 100.0 * speedup,
        "throughput_unmerged": 100.0,
        "speedup": speedup,
        "gflops": 0.1 / speedup,
        "gflops_unmerged": 0.1,
        "config": {"merge_r": merge_r, "model_name": "vit_tiny_patch16_224"},
        "settings": {**settings, **extra.pop("settings", {})},
        **extra,
    }


def curve(seed: int) -> list[dict]:
    points = [(1.0, [0] * DEPTH, 1.0), (0.5, [15, 11, 8, 7, 5, 4], 1.9), (0.289, [28, 16, 8, 5, 2, 1], 3.1)]
    return [
        {
            "point": f,
            "flops_fraction": f,
            "merge_r": s,
            "gflops": 0.1 * f,
            "throughput": 100 * x,
            "speedup": x,
            "test_acc": 0.8 - 0.05 * i + 0.01 * seed,
        }
        for i, (f, s, x) in enumerate(points)
    ]


@pytest.fixture
def crowded(tmp_path: Path) -> Path:
    """The results of ``crowded_results`` as run folders, read back as ``report`` reads them."""
    for index, result in enumerate(crowded_results()):
        RunResult.from_dict(result).write(tmp_path / "runs" / str(index) / "results.json")
    return tmp_path / "runs"


def crowded_results() -> list[dict]:
    """Elastic runs (3 seeds) and separate PYRA/ToMe fits at three rates, points close together."""
    results = []
    for seed in range(3):
        results.append(
            run(
                "pyra_elastic",
                0.75,
                seed,
                [15, 11, 8, 7, 5, 4],
                1.9,
                curve=curve(seed),
                settings={"model.merging.elastic": {"min_fraction": 0.289}},
            )
        )
        for method, drop in (("pyra", 0.0), ("tome", 0.004)):
            for i, (schedule, speedup) in enumerate(
                (([2] * DEPTH, 1.2), ([15, 11, 8, 7, 5, 4], 1.95), ([28, 16, 8, 5, 2, 1], 3.05))
            ):
                results.append(run(method, 0.79 - 0.05 * i - drop + 0.01 * seed, seed, schedule, speedup))
    return [RunResult.from_dict(r).to_dict() for r in results]


def assert_labels_fit(fig: Any) -> None:
    (ax,) = fig.axes
    frame, boxes = annotation_boxes(ax)
    assert boxes, "the figure labels its points"
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1), "labels overlap"
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    legend = ax.get_legend()
    assert "unmerged model" in legend.get_title().get_text(), "the legend says what x is relative to"


def test_accuracy_throughput_labels_stay_inside_and_apart(crowded: Path) -> None:
    fig = accuracy_throughput_figure(collect_results(crowded))
    assert_labels_fit(fig)
    assert fig.axes[0].get_title() == "Accuracy vs. inference throughput"
    assert_labels_fit(accuracy_throughput_figure(collect_results(crowded), x="gflops", title="demo"))


def test_placement_refuses_overlap_even_for_coincident_points(crowded: Path) -> None:
    fig = accuracy_throughput_figure(collect_results(crowded))
    ax = fig.axes[0]
    left_out = place_annotations(ax, [("1.00x", 200.0, 70.0)] * 12)  # twelve labels at one spot
    assert left_out > 0, "what cannot be placed is counted, not drawn on top"
    assert_labels_fit(fig)


def test_elastic_curve_has_error_bars_over_seeds_and_overlays_separate_fits(crowded: Path) -> None:
    results = collect_results(crowded)
    series = elastic_curve_series(results, "demo")
    assert set(series) == {"pyra_elastic (one fit)", "pyra (a fit per rate)", "tome (a fit per rate)"}
    elastic = series["pyra_elastic (one fit)"]
    assert [round(p[0], 3) for p in elastic] == [1.0, 1.9, 3.1] and all(p[4] == 3 for p in elastic)
    assert elastic[0][2] == pytest.approx(81.0) and elastic[0][3] == pytest.approx(1.0)  # mean ± std, %
    flops = elastic_curve_series(results, "demo", x="flops")["pyra_elastic (one fit)"]
    assert [round(p[0], 3) for p in flops] == [1.0, 2.0, round(1 / 0.289, 3)]
    fig = elastic_curve_figure(results, "demo")
    assert_labels_fit(fig)
    assert len(fig.axes[0].containers) == 3, "one errorbar series each"
    with pytest.raises(ValueError, match="no elastic run"):
        elastic_curve_series(results, "cifar")
    for result in results:
        for entry in result.get("curve") or []:
            entry["speedup"] = None
    with pytest.raises(ValueError, match="x='flops'"):
        elastic_curve_series(results, "demo")


def test_report_writes_the_elastic_curve(crowded: Path, tmp_path: Path) -> None:
    written = report([str(crowded)], out_dir=str(tmp_path / "out"))
    assert written["elastic_demo"].name == "elastic_curve_demo.png"
    assert written["elastic_demo"].read_bytes()[:4] == b"\x89PNG"
