"""``data prepare vtab``: task_adaptation's slices and label rules, PNG output, resumable and atomic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pyra_lightning.data.prepare import SPECS, is_finished, prepare_vtab
from pyra_lightning.data.tasks import VTAB_TASKS
from pyra_lightning.data.verify import verify


class FakeSource:
    """Examples made up per (builder, split): image pixel (0, 0) holds the example's index."""

    def __init__(self, sizes: dict[str, int], make: Any, fail_after: int | None = None) -> None:
        self.sizes, self.make, self.fail_after, self.served = sizes, make, fail_after, 0

    def size(self, builder: str, split: str) -> int:
        return self.sizes[split]

    def examples(self, builder: str, split: str) -> Sequence[dict]:
        source = self

        class Split:
            def __len__(self) -> int:
                return source.sizes[split]

            def __getitem__(self, index: int) -> dict:
                source.served += 1
                if source.fail_after is not None and source.served > source.fail_after:
                    raise KeyboardInterrupt  # an interruption half-way through a task
                return source.make(split, index)

        return Split()


def _cifar_like(split: str, index: int) -> dict:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[0, 0] = (index % 256, index // 256, {"train": 1, "test": 2}[split])
    return {"image": image, "label": index % 100}


def test_every_vtab_task_has_a_spec_citing_task_adaptation() -> None:
    assert set(SPECS) == {t.name for t in VTAB_TASKS}
    assert all(spec.source.startswith("google-research/task_adaptation") for spec in SPECS.values())


def test_cifar_follows_task_adaptation_slices_and_writes_png(tmp_path: Path) -> None:
    source = FakeSource({"train": 2000, "test": 30}, _cifar_like)
    assert prepare_vtab(tmp_path, ["cifar100"], source=source) == ["cifar"]
    task = tmp_path / "cifar"
    lines = {
        s: (task / f"{s}.txt").read_text().split("\n")[:-1]
        for s in ("train800", "val200", "train800val200", "test")
    }
    assert [len(v) for v in lines.values()] == [800, 200, 1000, 30]
    # val200 is train[90%:90%+200] = train[1800:2000]: the first one holds index 1800
    first_val = np.asarray(Image.open(task / lines["val200"][0].split()[0]))
    assert tuple(first_val[0, 0]) == (1800 % 256, 1800 // 256, 1) and lines["val200"][0].endswith(" 0")
    assert Image.open(task / lines["test"][0].split()[0]).format == "PNG"
    (report,) = verify(tmp_path, ["cifar"], progress=False, workers=1)
    assert report.errors == ["cifar/test.txt: 30 images, expected 10000"]  # only the fake's small test split


def test_label_rules_of_structured_tasks() -> None:
    ori = SPECS["dsprites_ori"].example({"image": np.ones((2, 2, 1), np.uint8), "label_orientation": 39})
    assert ori[1] == 15 and ori[0].shape == (2, 2, 3) and ori[0].max() == 255  # 40 -> 16 classes, x255
    assert (
        SPECS["dsprites_loc"].example({"image": np.zeros((2, 2, 1), np.uint8), "label_x_position": 5})[1] == 2
    )
    kitti = {
        "image": np.zeros((2, 2, 3), np.uint8),
        "objects": {"type": np.array([0, 5]), "location": np.array([[0, 0, 12.0], [0, 0, 3.0]])},
    }
    assert (
        SPECS["kitti"].example(kitti)[1] == 1
    )  # closest vehicle at 12 m: bin (8, 20]; the pedestrian at 3 m is no vehicle
    kitti["objects"]["type"] = np.array([4, 5])
    assert SPECS["kitti"].example(kitti)[1] == 3  # no vehicle: 1000 m
    clevr = {
        "image": np.zeros((2, 2, 3), np.uint8),
        "objects": {"size": np.zeros(5), "pixel_coords": np.array([[0, 0, 9.2], [0, 0, 11.0]])},
    }
    assert SPECS["clevr_count"].example(clevr)[1] == 2 and SPECS["clevr_dist"].example(clevr)[1] == 3
    sizes = {"train": 24300, "test": 24300}
    assert SPECS["smallnorb_ele"].slices(sizes.__getitem__) == {
        "train800": [("train", 0, 800)],
        "val200": [("test", 0, 200)],
        "test": [("test", 12150, None)],
    }
    assert SPECS["dsprites_loc"].slices({"train": 737280}.__getitem__)["test"] == [("train", 663552, None)]


def test_interrupted_task_never_looks_finished_and_rerun_completes(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        prepare_vtab(
            tmp_path, ["cifar"], source=FakeSource({"train": 2000, "test": 30}, _cifar_like, fail_after=500)
        )
    assert not is_finished(tmp_path / "cifar") and not (tmp_path / "cifar").exists()
    assert list(tmp_path.iterdir()) == []  # the partial folder is gone too
    source = FakeSource({"train": 2000, "test": 30}, _cifar_like)
    assert prepare_vtab(tmp_path, ["cifar"], source=source) == ["cifar"]
    assert prepare_vtab(tmp_path, ["cifar"], source=source) == []  # finished: skipped


def test_progress_bar_counts_every_image_written_per_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One bar per split, its total the images that split's file lists, reached at the end; the bar
    goes to stderr and stdout keeps only the summary line. A train split of 100 clips train800 to
    train[:100] and val200 to train[90:100], so a total counted from the slices' nominal sizes fails."""
    from tqdm import tqdm

    import pyra_lightning.data.prepare as prepare

    bars: list[tqdm] = []

    class Recording(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(prepare, "tqdm", Recording)
    summary = f"cifar: building from {SPECS['cifar'].builder} ({SPECS['cifar'].source})\n"
    assert prepare_vtab(tmp_path, ["cifar"], source=FakeSource({"train": 100, "test": 30}, _cifar_like))
    written = {
        stem: len((tmp_path / "cifar" / f"{stem}.txt").read_text().splitlines())
        for stem in ("train800", "val200", "test")
    }
    assert written == {"train800": 100, "val200": 10, "test": 30}
    assert [(bar.desc, bar.total, bar.n) for bar in bars] == [
        (f"cifar/{s}", n, n) for s, n in written.items()
    ]
    captured = capsys.readouterr()
    assert captured.out == summary
    assert "cifar/train800: 100%" in captured.err and "30/30" in captured.err

    prepare_vtab(
        tmp_path / "quiet",
        ["cifar"],
        source=FakeSource({"train": 100, "test": 30}, _cifar_like),
        progress=False,
    )
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (summary, "")


def test_a_foreign_task_folder_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """A ``cifar/`` that prepare did not finish (another tool's, half copied) cannot be replaced by
    the rename; it is refused first, not after minutes of writing images."""
    (tmp_path / "cifar" / "images").mkdir(parents=True)
    (tmp_path / "cifar" / "train800.txt").touch()
    source = FakeSource({"train": 2000, "test": 30}, _cifar_like, fail_after=0)  # building would raise
    with pytest.raises(FileExistsError, match=r"cifar exists but is not a finished task .* another --out"):
        prepare_vtab(tmp_path, ["cifar"], source=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar"], "no partial folder left"


def test_missing_tensorflow_datasets_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ValueError, match=r"pip install 'pyra-lightning\[prepare\]'"):
        prepare_vtab(tmp_path, ["svhn"])


def test_with_tfds_mock_data(tmp_path: Path) -> None:
    tfds = pytest.importorskip("tensorflow_datasets", reason="the [prepare] extra is not installed")
    # No TensorFlow needed: as_data_source reads the mocked examples (tfds 4.9.10 here).
    with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
        from pyra_lightning.data.prepare import TfdsSource

        source = TfdsSource(str(tmp_path / "tfds"))
        assert prepare_vtab(tmp_path / "out", ["dsprites_ori"], source=source) == ["dsprites_ori"]
    for name, classes in (("dsprites_ori", 16),):
        (report,) = verify(tmp_path / "out", [name], progress=False, workers=1)
        assert report.counts["train800.txt"] == 800 and report.formats == {
            "PNG": report.manifest["counts"]["train800.txt"] + 200 + report.counts["test.txt"]
        }
        assert not [e for e in report.errors if "out of range" in e or "decode" in e]
        assert (
            report.channels == {3: sum(report.formats.values())} and report.manifest["num_classes"] == classes
        )
