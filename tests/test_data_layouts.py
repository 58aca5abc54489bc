"""The DataModule on FGVC-5 (VPT's JSON splits) and ImageFolder layouts, and its label checks at setup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyra_lightning.data import VTABDataModule
from pyra_lightning.data.tasks import BENCHMARK_GROUPS

IMG = 16


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def dm(root: Path, task: str, **kwargs) -> VTABDataModule:
    return VTABDataModule(root=str(root), task=task, img_size=IMG, batch_size=4, num_workers=0, **kwargs)


def make_fgvc(root: Path, name: str, image_dir: str, class_ids: tuple[int, ...]) -> Path:
    """A task in VPT's layout: ``{split}.json`` maps a path under ``image_dir`` to a class id."""
    task = root / name
    for split, count in (("train", 6), ("val", 3), ("test", 4)):
        mapping = {}
        for index in range(count):
            rel = f"{split}/{index}.png"
            _png(task / image_dir / rel, hash((split, index)) % 1000)
            mapping[rel] = class_ids[index % len(class_ids)]
        (task / f"{split}.json").write_text(json.dumps(mapping))
    return task


@pytest.mark.parametrize(("name", "image_dir"), [("cub", "images"), ("dogs", "Images"), ("cars", "")])
def test_fgvc_task_reads_vpt_json_splits(tmp_path: Path, name: str, image_dir: str) -> None:
    make_fgvc(tmp_path, name, image_dir, (5, 17, 3))  # VPT maps sorted class ids to 0..n-1
    data = dm(tmp_path, name, benchmark="fgvc")
    assert data.num_classes == {"cub": 200, "dogs": 120, "cars": 196}[name] and data.group == "fgvc"
    assert data.split_files == {"train": "train.json", "val": "val.json", "test": "test.json"}
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()))
    assert images.shape == (4, 3, IMG, IMG)
    assert labels.tolist() == [1, 2, 0, 1]  # ids 5, 17, 3, 5 -> sorted order 3, 5, 17
    assert dm(tmp_path, name, benchmark="fgvc", protocol="tune").split_files["test"] == "val.json"


def test_fgvc_class_id_unseen_in_train_is_refused(tmp_path: Path) -> None:
    task = make_fgvc(tmp_path, "flowers", "", (0, 1, 2))
    test = json.loads((task / "test.json").read_text())
    test["test/2.png"] = 9
    (task / "test.json").write_text(json.dumps(test))
    data = dm(tmp_path, "flowers", benchmark="fgvc")
    with pytest.raises(
        ValueError, match=r"flowers/test\.json:3: 'test/2\.png' has class id 9, which train\.json never uses"
    ):
        data.setup("test")


def test_benchmark_groups_are_in_the_registry() -> None:
    assert BENCHMARK_GROUPS["fgvc"] == {"fgvc": ("cub", "nabirds", "flowers", "dogs", "cars")}
    assert [len(v) for v in BENCHMARK_GROUPS["vtab"].values()] == [7, 4, 8]
    with pytest.raises(ValueError, match="unknown benchmark 'imagenet'"):
        dm(Path("."), "cub", benchmark="imagenet")  # type: ignore[arg-type]


def make_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox")) -> Path:
    task = root / "pets_folder"
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        for c, name in enumerate(classes):
            for index in range(per_class):
                _png(task / split / name / f"{index}.png", 100 * c + index + len(split))
    return task


def test_imagefolder_layout_for_fit(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    data = dm(tmp_path, "pets_folder", layout="imagefolder")
    assert data.num_classes == 3 and data.class_names == ("cat", "dog", "fox")
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert len(data.train_dataloader().dataset) == 6 and images.shape[1:] == (3, IMG, IMG)  # type: ignore[arg-type]
    assert sorted(data._dataset("train").labels) == [0, 0, 1, 1, 2, 2]
    data.setup("test")
    assert len(data.test_dataloader().dataset) == 3  # type: ignore[arg-type]


def test_imagefolder_class_missing_from_train_is_refused(tmp_path: Path) -> None:
    task = make_imagefolder(tmp_path)
    _png(task / "test" / "wolf" / "0.png", 7)
    with pytest.raises(ValueError, match=r"class folder 'wolf' does not exist in train/"):
        dm(tmp_path, "pets_folder", layout="imagefolder").setup("test")


def make_custom(root: Path, train_labels: list[int], classes: int | None = None) -> Path:
    task = root / "mine"
    for split, labels in (("train800", train_labels), ("val200", [0, 1]), ("test", [0, 1])):
        lines = []
        for index, label in enumerate(labels):
            _png(task / f"{split}/{index}.png", index)
            lines.append(f"{split}/{index}.png {label}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (task / "train800val200.txt").write_text(
        (task / "train800.txt").read_text() + (task / "val200.txt").read_text()
    )
    if classes is not None:
        (task / "classes.txt").write_text("\n".join(f"class{i}" for i in range(classes)) + "\n")
    return task


def test_stray_label_against_classes_txt_is_refused_at_setup(tmp_path: Path) -> None:
    make_custom(tmp_path, [0, 1, 2, 7, 1, 0], classes=3)
    data = dm(tmp_path, "mine")
    assert data.num_classes == 3  # classes.txt wins over the largest label
    with pytest.raises(
        ValueError, match=r"train800val200\.txt, line 4: label 7 .*classes\.txt lists 3 classes"
    ):
        data.setup("fit")


def test_classes_txt_contradicting_num_classes_is_refused(tmp_path: Path) -> None:
    make_custom(tmp_path, [0, 1, 2], classes=3)
    with pytest.raises(ValueError, match="lists 3 class names, expected 5"):
        dm(tmp_path, "mine", num_classes=5).setup("fit")


def test_inferred_count_with_classes_absent_from_training_warns(tmp_path: Path) -> None:
    make_custom(tmp_path, [0, 1, 4, 4])  # classes 2 and 3 never occur in training
    with pytest.warns(
        UserWarning,
        match=r"2 of its classes never occur in this training split \(2, 3\).*--data.num_classes 5",
    ):
        dm(tmp_path, "mine").setup("fit")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm(tmp_path, "mine", num_classes=5).setup("fit")  # accepted explicitly: no warning


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cli(*args: str):
    from pyra_lightning.training.cli import build_cli

    return build_cli(
        [f"--config={CONFIGS / 'model/vit_b16_in21k.yaml'}", "--model.pretrained=false", *args], run=False
    )


@pytest.mark.parametrize("task", ["cub", "nabirds", "flowers", "dogs", "cars"])
def test_fgvc_config_instantiates_every_task(task: str) -> None:
    cli = _cli(f"--config={CONFIGS / 'data/fgvc.yaml'}", f"--data.task={task}")
    assert cli.datamodule.benchmark == "fgvc" and cli.datamodule.group == "fgvc"
    assert (
        cli.model.model.num_classes
        == {"cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}[task]
    )


def test_imagefolder_config_instantiates_on_generated_images(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    cli = _cli(
        f"--config={CONFIGS / 'data/imagefolder.yaml'}", f"--data.root={tmp_path}", "--data.task=pets_folder"
    )
    assert cli.datamodule.layout.name == "imagefolder" and cli.model.model.num_classes == 3
