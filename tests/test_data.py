"""Tests of the VTAB-1k DataModule, its task registry and the generated demo task."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from torch.utils.data import DataLoader

import pyra_lightning.data.demo as demo
from pyra_lightning.data import (
    DEMO_TASK,
    GROUPS,
    VTAB_TASKS,
    VTABDataModule,
    VTABSplit,
    generate_demo,
    normalize_uint8,
    read_split_file,
    resolve_task,
)

IMG = 16  # img_size used throughout: small enough to keep every test fast


def write_split(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_task(root: Path, name: str, num_classes: int, sizes: tuple[int, int, int] = (6, 3, 5)) -> Path:
    """Write a tiny VTAB-format task: random 8x8 PNGs with labels cycling through the classes.

    ``sizes`` are the numbers of train / val / test images; train800val200.txt lists train + val.
    """
    task_dir = root / name
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        (task_dir / "images" / split).mkdir(parents=True)
        lines[split] = []
        for index in range(count):
            relative = f"images/{split}/{index}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(task_dir / relative)
            lines[split].append(f"{relative} {index % num_classes}")
    write_split(task_dir / "train800.txt", lines["train"])
    write_split(task_dir / "val200.txt", lines["val"])
    write_split(task_dir / "train800val200.txt", lines["train"] + lines["val"])
    write_split(task_dir / "test.txt", lines["test"])
    return task_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def datamodule(root: Path, task: str = "demo", **kwargs: object) -> VTABDataModule:
    options: dict[str, object] = {"img_size": IMG, "batch_size": 8, "num_workers": 0} | kwargs
    return VTABDataModule(root=str(root), task=task, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    generate_demo(root)
    return root


# ------------------------------------------------------------------------------------------ registry
def test_registry_follows_table_2() -> None:
    expected = {
        "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
        "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
        "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
        "smallnorb_azi": 18, "smallnorb_ele": 9,
    }  # fmt: skip
    assert [(t.name, t.num_classes) for t in VTAB_TASKS] == list(expected.items())
    assert GROUPS == ("natural", "specialized", "structured")
    groups = [t.group for t in VTAB_TASKS]
    assert groups == ["natural"] * 7 + ["specialized"] * 4 + ["structured"] * 8
    assert DEMO_TASK not in VTAB_TASKS and DEMO_TASK.num_classes == len(demo.DEMO_CLASSES)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("cifar100", "cifar"),
        ("CIFAR-100", "cifar"),
        ("cifar_100", "cifar"),
        ("oxford_pet", "oxford_iiit_pet"),
        ("pets", "oxford_iiit_pet"),
        ("flowers102", "oxford_flowers102"),
        ("oxford_flowers", "oxford_flowers102"),
        ("camelyon", "patch_camelyon"),
        ("retinopathy", "diabetic_retinopathy"),
        ("kitti_dist", "kitti"),
        ("clevr_distance", "clevr_dist"),
        ("dsprites_location", "dsprites_loc"),
        ("dsprites_orientation", "dsprites_ori"),
        ("smallnorb_azimuth", "smallnorb_azi"),
        ("smallnorb_elevation", "smallnorb_ele"),
        ("demo", "demo"),
    ],
)
def test_resolve_task_aliases(alias: str, canonical: str) -> None:
    assert resolve_task(alias).name == canonical


def test_resolve_task_unknown_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'imagenet'") as error:
        resolve_task("imagenet")
    assert "smallnorb_ele" in str(error.value) and "demo" in str(error.value)


def test_num_classes_known_without_touching_disk(tmp_path: Path) -> None:
    root = tmp_path / "absent"
    dm = VTABDataModule(root=str(root), task="cifar100")
    assert dm.num_classes == 100 and dm.group == "natural"
    assert not root.exists()


def test_num_classes_contradicting_registry_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes=10 contradicts task 'dtd', which has 47"):
        VTABDataModule(root=str(tmp_path), task="dtd", num_classes=10)


def test_signature_is_cli_friendly() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(VTABDataModule, "data")
    config = parser.parse_args(["--data.task=kitti", "--data.protocol=tune", "--data.eval_batch_size=64"])
    assert (config.data.task, config.data.protocol, config.data.eval_batch_size) == ("kitti", "tune", 64)
    with pytest.raises(Exception, match="protocol"):
        parser.parse_args(["--data.protocol=bogus"])


# ---------------------------------------------------------------------------------------------- demo
def test_demo_is_deterministic_and_well_formed(tmp_path: Path, demo_root: Path) -> None:
    again = generate_demo(tmp_path)
    files = snapshot(again)
    assert files == snapshot(demo_root / "demo")
    sizes = {name: len(read_split_file(again / name)) for name in ("train800.txt", "val200.txt", "test.txt")}
    assert sizes == {"train800.txt": 800, "val200.txt": 200, "test.txt": 400}
    both = read_split_file(again / "train800val200.txt")
    assert [r[:2] for r in both] == [r[:2] for r in read_split_file(again / "train800.txt")] + [
        r[:2] for r in read_split_file(again / "val200.txt")
    ]
    labels = np.bincount([r.label for r in both])
    assert labels.tolist() == [250] * 4  # balanced
    image = Image.open(again / both[0].path)
    assert image.size == (demo.DEMO_IMAGE_SIZE, demo.DEMO_IMAGE_SIZE) and image.mode == "RGB"


def test_demo_mean_colour_does_not_give_the_label_away(demo_root: Path) -> None:
    def mean_colours(split: str) -> tuple[np.ndarray, np.ndarray]:
        records = read_split_file(demo_root / "demo" / split)
        rgb = [
            np.asarray(Image.open(demo_root / "demo" / r.path), dtype=np.float64).mean((0, 1))
            for r in records
        ]
        return np.stack(rgb), np.array([r.label for r in records])  # (N, 3), (N,)

    train_rgb, train_labels = mean_colours("train800val200.txt")
    brightness = train_rgb.mean(1)
    per_class = [brightness[train_labels == c].mean() for c in range(4)]
    assert max(per_class) - min(per_class) < 0.15 * brightness.std()
    # nearest class-mean on the mean RGB colour stays near chance (25%) on the test split
    centroids = np.stack([train_rgb[train_labels == c].mean(0) for c in range(4)])  # (4, 3)
    test_rgb, test_labels = mean_colours("test.txt")
    guesses = np.linalg.norm(test_rgb[:, None] - centroids[None], axis=2).argmin(1)
    assert (guesses == test_labels).mean() < 0.35


def test_demo_generation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_root: Path) -> None:
    written = 0
    save = demo._save_png

    def failing_save(pixels: np.ndarray, path: Path) -> None:
        nonlocal written
        if written == 50:
            raise RuntimeError("disk full (simulated)")
        written += 1
        save(pixels, path)

    monkeypatch.setattr(demo, "_save_png", failing_save)
    with pytest.raises(RuntimeError, match="simulated"):
        generate_demo(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither demo/ nor the staging folder is left
    monkeypatch.undo()

    task_dir = generate_demo(tmp_path)
    assert snapshot(task_dir) == snapshot(demo_root / "demo")
    stamp = (task_dir / "test.txt").stat().st_mtime_ns
    generate_demo(tmp_path)  # a finished demo/ is left alone
    assert (task_dir / "test.txt").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_prepare_data_generates_demo(tmp_path: Path) -> None:
    dm = datamodule(tmp_path / "fresh")
    dm.prepare_data()
    assert (tmp_path / "fresh" / "demo" / "test.txt").is_file()


# ------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize(
    ("normalization", "mean", "std"),
    [
        ("imagenet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ("inception", IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    ],
)
def test_batches_are_uint8_and_normalized_after_transfer(
    demo_root: Path, normalization: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    dm = datamodule(demo_root, normalization=normalization)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, IMG, IMG)
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < dm.num_classes
    normalized, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    expected = (images.double() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(same_labels, labels)
    assert (dm.mean, dm.std) == (tuple(mean), tuple(std))
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(normalized, dm.mean, dm.std)


@pytest.mark.parametrize(("protocol", "sizes"), [("tune", (800, 200, 200)), ("final", (1000, 200, 400))])
def test_protocol_picks_split_files(demo_root: Path, protocol: str, sizes: tuple[int, int, int]) -> None:
    dm = datamodule(demo_root, protocol=protocol)
    dm.setup()
    loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
    assert tuple(len(loader.dataset) for loader in loaders) == sizes  # type: ignore[union-attr]
    assert len(dm.predict_dataloader().dataset) == sizes[2]  # type: ignore[arg-type]


def test_track_test_adds_the_test_loader_to_validation(demo_root: Path) -> None:
    dm = datamodule(demo_root, track_test=True)
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and [len(loader.dataset) for loader in loaders] == [200, 400]  # type: ignore[arg-type]
    assert isinstance(datamodule(demo_root).val_dataloader(), DataLoader)


def test_shuffle_follows_seed(demo_root: Path) -> None:
    def first_labels(seed: int) -> list[int]:
        dm = datamodule(demo_root, seed=seed, batch_size=16)
        return next(iter(dm.train_dataloader()))[1].tolist()

    assert first_labels(0) == first_labels(0) != first_labels(1)


def test_cache_matches_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_task(tmp_path, "shapes", num_classes=3)
    plain, cached = datamodule(tmp_path, "shapes"), datamodule(tmp_path, "shapes", cache_images=True)
    plain.setup("fit")
    cached.setup("fit")
    dataset = cached.train_dataloader().dataset
    assert isinstance(dataset, VTABSplit) and dataset.images is not None
    assert dataset.images.shape == (9, 3, IMG, IMG) and dataset.images.dtype == torch.uint8

    def no_decoding(self: VTABSplit, index: int) -> torch.Tensor:
        raise AssertionError("decoded an image although it is cached")

    expected = [plain.val_dataloader().dataset[i] for i in range(3)]  # type: ignore[index]
    monkeypatch.setattr(VTABSplit, "decode", no_decoding)
    for index, (image, label) in enumerate(expected):
        cached_image, cached_label = cached.val_dataloader().dataset[index]  # type: ignore[index]
        assert torch.equal(cached_image, image) and cached_label == label
    assert torch.equal(dataset.images[0], dataset[0][0])


def test_augmentation_only_on_train_split(tmp_path: Path) -> None:
    make_task(tmp_path, "shapes", num_classes=3)
    dm = datamodule(tmp_path, "shapes", augment=True, protocol="tune")
    dm.setup("fit")
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    assert isinstance(train, VTABSplit) and isinstance(val, VTABSplit) and val.transform is None
    torch.manual_seed(0)
    augmented = [train[i][0] for i in range(6)]
    assert all(image.dtype == torch.uint8 and image.shape == (3, IMG, IMG) for image in augmented)
    assert any(not torch.equal(image, train.decode(i)) for i, image in enumerate(augmented))
    with pytest.warns(UserWarning, match="structured task 'kitti'"):
        datamodule(tmp_path, "kitti", augment=True)


# --------------------------------------------------------------------------- aliases and custom tasks
@pytest.mark.parametrize(
    ("folder", "task", "canonical", "num_classes"),
    [
        ("cifar100", "cifar", "cifar", 100),
        ("oxford_pet", "oxford_iiit_pet", "oxford_iiit_pet", 37),
        ("oxford_pet", "pets", "oxford_iiit_pet", 37),
        ("Smallnorb-Azimuth", "smallnorb_azi", "smallnorb_azi", 18),
    ],
)
def test_task_folder_found_through_alias(
    tmp_path: Path, folder: str, task: str, canonical: str, num_classes: int
) -> None:
    make_task(tmp_path, "unrelated", num_classes=2)
    make_task(tmp_path, folder, num_classes=num_classes)
    dm = datamodule(tmp_path, task)
    assert dm.task_info is not None and dm.task_info.name == canonical
    assert dm.num_classes == num_classes and dm.task_dir == tmp_path / folder
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 9  # type: ignore[arg-type]


def test_custom_task_infers_num_classes(tmp_path: Path) -> None:
    make_task(tmp_path, "my_shapes", num_classes=5)
    dm = datamodule(tmp_path, "my_shapes")
    assert dm.task_info is None and dm.group == "custom"
    assert dm.num_classes == 5  # labels 0..4 appear in the split files
    assert datamodule(tmp_path, "my_shapes", num_classes=7).num_classes == 7
    dm.setup("test")
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (5, 3, IMG, IMG) and labels.max() < 5


# -------------------------------------------------------------------------------------- bad input
def test_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        datamodule(tmp_path / "nowhere", "cifar").setup("fit")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_missing_task_folder_names_what_was_looked_for(tmp_path: Path) -> None:
    make_task(tmp_path, "dtd", num_classes=47)
    with pytest.raises(FileNotFoundError, match="no folder for task 'cifar'") as error:
        datamodule(tmp_path, "cifar").setup("fit")
    assert "cifar100" in str(error.value) and str(tmp_path) in str(error.value)


def test_unknown_task_without_folder_lists_known_tasks(tmp_path: Path) -> None:
    make_task(tmp_path, "dtd", num_classes=47)
    dm = datamodule(tmp_path, "imagenet21k")
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'imagenet21k'") as error:
        dm.setup("fit")
    assert "caltech101" in str(error.value) and str(tmp_path / "imagenet21k") in str(error.value)


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "eurosat", num_classes=10)
    (task_dir / "test.txt").unlink()
    dm = datamodule(tmp_path, "eurosat")
    with pytest.raises(FileNotFoundError, match=r"split file test\.txt is missing"):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match=r"split file test\.txt is missing"):
        dm.setup("fit")  # fit tests after training: found before it trains


@pytest.mark.parametrize(
    "bad_line", ["images/train/1.png", "images/train/1.png one", "images/train/1.png 1 2"]
)
def test_malformed_line_gives_file_line_and_text(tmp_path: Path, bad_line: str) -> None:
    task_dir = make_task(tmp_path, "svhn", num_classes=10)
    write_split(task_dir / "val200.txt", ["images/val/0.png 0", "", bad_line])
    with pytest.raises(ValueError) as error:
        datamodule(tmp_path, "svhn").setup("fit")
    message = str(error.value)
    assert str(task_dir / "val200.txt") in message and "line 3" in message and repr(bad_line) in message


@pytest.mark.parametrize("label", [37, -1])
def test_label_outside_classes_is_reported(tmp_path: Path, label: int) -> None:
    task_dir = make_task(tmp_path, "pets", num_classes=37)
    write_split(task_dir / "train800val200.txt", ["images/train/0.png 0", f"images/train/1.png {label}"])
    with pytest.raises(ValueError) as error:
        datamodule(tmp_path, "oxford_iiit_pet").setup("fit")
    message = str(error.value)
    assert "train800val200.txt, line 2" in message and f"label {label}" in message and "37 classes" in message


@pytest.mark.parametrize("cache_images", [False, True])
def test_corrupt_image_names_split_line_and_path(tmp_path: Path, cache_images: bool) -> None:
    task_dir = make_task(tmp_path, "resisc45", num_classes=45)
    (task_dir / "images" / "val" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dm = datamodule(tmp_path, "resisc45", protocol="tune", cache_images=cache_images)  # train800 lacks it
    with pytest.raises(ValueError, match="cannot decode image") as error:
        dm.setup("fit")
        dm.val_dataloader().dataset[1]  # type: ignore[index]
    message = str(error.value)
    assert "val200.txt, line 2" in message and str(task_dir / "images" / "val" / "1.png") in message


def test_missing_image_names_split_line_and_path(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "resisc45", num_classes=45)
    (task_dir / "images" / "test" / "4.png").unlink()
    dm = datamodule(tmp_path, "resisc45")
    dm.setup("test")
    with pytest.raises(FileNotFoundError, match=r"test\.txt, line 5: image .*4\.png does not exist"):
        list(dm.test_dataloader())


def test_fixed_input_then_rerun_works(tmp_path: Path) -> None:
    task_dir = make_task(tmp_path, "dmlab", num_classes=6)
    good = (task_dir / "train800.txt").read_text()
    (task_dir / "train800.txt").write_text(good + "images/train/0.png 6\n")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="label 6"):
        datamodule(tmp_path, "dmlab", protocol="tune", cache_images=True).setup("fit")
    assert snapshot(tmp_path) == before  # the failure left nothing behind
    (task_dir / "train800.txt").write_text(good)
    dm = datamodule(tmp_path, "dmlab", protocol="tune", cache_images=True)
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 6  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- with Trainer
class _Probe(pl.LightningModule):
    """Linear classifier that records what the Trainer hands it."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.save_hyperparameters()  # like the real module, whose num_classes the CLI links from data
        self.head = torch.nn.Linear(3 * IMG * IMG, num_classes)
        self.train_dtypes: set[torch.dtype] = set()
        self.val_indices: set[int] = set()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        self.train_dtypes.add(images.dtype)
        return torch.nn.functional.cross_entropy(self.head(images.flatten(1)), labels)

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        assert batch[0].dtype == torch.float32
        self.val_indices.add(dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_normalizes_and_validates_on_both_loaders(demo_root: Path, tmp_path: Path) -> None:
    dm = datamodule(demo_root, track_test=True)
    probe = _Probe(dm.num_classes)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        # a logger makes Lightning merge model and datamodule hparams, which fails if both hold a
        # different num_classes (None here, 4 in the model)
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    assert "num_classes" not in dm.hparams
    trainer.fit(probe, datamodule=dm)
    assert probe.train_dtypes == {torch.float32} and probe.val_indices == {0, 1}
