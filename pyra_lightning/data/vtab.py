"""VTAB-1k (and FGVC-5, or any folder in their layouts) as a LightningDataModule.

The task registry is ``data.tasks``; decoding, the image cache and the sampler are ``data.datasets``.

VTAB-1k (Zhai et al., 2019, "A Large-scale Study of Representation Learning with the Visual Task
Adaptation Benchmark") gives every task 1000 training images: ``train800`` + ``val200`` to choose
hyperparameters, then all 1000 (``train800val200``) to train the model whose top-1 accuracy on the full
``test`` split is reported. PYRA (Xiong et al., 2024) follows the NOAH/VPT release of the data: one folder
per task, images resized straight to 224x224 with bicubic interpolation (no centre crop), no augmentation.

Loaders yield ``uint8`` images; the DataModule normalizes them on the accelerator in
``on_after_batch_transfer``, which moves 4x fewer bytes per batch and keeps the optional image cache
small (``N * 3 * img_size**2`` bytes per split).
"""

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import pyra_lightning.data.tasks as registry
from pyra_lightning.data.backbone_config import (
    NORMALIZATION_STATS,
    Normalization,
    backbone_data_config,
    resolve_img_size,
)
from pyra_lightning.data.datasets import EpochShuffleSampler, VTABSplit, normalize_uint8
from pyra_lightning.data.demo import DEMO_TASK_NAME, generate_demo
from pyra_lightning.data.layouts import (
    LAYOUTS,
    SPLIT_FILES,
    Layout,
    SplitRecord,
    read_layout_split,
    resolve_layout,
)
from pyra_lightning.data.tasks import (
    DEMO_TASK,
    VTABTask,
    _known_names,
    _normalize_name,
    read_class_names,
    resolve_task,
)

VTABProtocol = Literal["tune", "final"]
Role = Literal["train", "val", "test"]
Benchmark = Literal["vtab", "fgvc"]
LayoutName = Literal["vtab", "fgvc", "imagefolder"]

# Which split file each loader reads. In "tune" there is no test split to touch, so test = val200.
_PROTOCOL_SPLITS: dict[str, dict[Role, str]] = {
    "tune": {"train": "train800.txt", "val": "val200.txt", "test": "val200.txt"},
    "final": {"train": "train800val200.txt", "val": "val200.txt", "test": "test.txt"},
}


class VTABDataModule(pl.LightningDataModule):
    """One VTAB-1k task (or the generated ``demo``, or any folder in the same layout).

    ``<root>/<task>/`` holds the images and ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and
    ``test.txt``, whose lines read ``<image path relative to the task folder> <integer label>``.

    Protocols (which split file each loader reads):

    * ``"tune"`` (hyperparameter search): train on ``train800``, validate on ``val200``; the test and
      predict loaders also read ``val200`` so that the test split stays unseen while tuning.
    * ``"final"`` (reported numbers): train on ``train800val200``, validate on ``val200`` (only for
      monitoring, since it is part of the training data) and test/predict on ``test.txt``.

    With ``track_test=True``, ``val_dataloader()`` returns ``[val_loader, test_loader]``: the paper
    reports the best test accuracy seen during training, so the LightningModule logs test accuracy for
    ``dataloader_idx == 1`` (and ``test/acc_best``) at every validation.

    Args:
        root: folder holding one sub-folder per task.
        task: task name or alias (see ``VTAB_TASKS``), ``"demo"`` (generated under ``root`` on first
            use), or the name of any other folder under ``root`` in the same layout.
        protocol: ``"tune"`` or ``"final"``, as above.
        img_size: images are resized (bicubic, antialiased, no crop) to ``img_size`` x ``img_size``;
            ``None`` takes the backbone's default input size (224 without a backbone).
        batch_size: training batch size.
        eval_batch_size: batch size of the validation/test/predict loaders; defaults to ``batch_size``.
        num_workers: DataLoader worker processes per loader.
        normalization: ``"imagenet"`` (timm's default mean/std), ``"inception"`` (0.5/0.5; SigLIP, PE)
            or ``"openai_clip"`` (CLIP, EVA-02), matching the statistics the pretrained backbone was
            trained with; ``None`` takes them from the backbone's timm ``pretrained_cfg`` (ImageNet's
            without a backbone). The paper's configs pin ``imagenet``, what the reference trained
            with, although timm's ``orig_in21k`` tags declare 0.5.
        backbone: the timm model name (with tag) the data is for; the CLI links ``model.model_name``
            here. Only read when ``img_size`` or ``normalization`` is ``None``.
        augment: random horizontal flip and a mild random resized crop on the training split only.
            Off by default, as in the paper; it can change the labels of the structured tasks
            (positions, orientations, distances).
        cache_images: keep each split's decoded, resized images in memory as one ``uint8`` tensor
            (``N * 3 * img_size**2`` bytes), so epochs after the first decode nothing.
        num_classes: optional class count. Known tasks take it from the registry (a different value
            is an error); custom ones default to the largest label in the split files plus one.
        track_test: also return the test loader from ``val_dataloader()``, see above.
        pin_memory: pin host memory of batches (only when CUDA is available).
        persistent_workers: keep worker processes between epochs (only when ``num_workers > 0``).
        seed: seed of the training loader's shuffling.
        drop_last: drop the training split's last partial batch, as the reference implementation's
            train loader does (31 steps per epoch on VTAB-1k's 1000 images at batch 32, not 32).
            Evaluation loaders always keep every image.
        benchmark: ``"vtab"`` (VTAB-1k's tasks) or ``"fgvc"`` (FGVC-5: ``cub``, ``nabirds``,
            ``flowers``, ``dogs``, ``cars`` in VPT's layout, ``train.json``/``val.json``/``test.json``;
            ``tune`` tests on val, ``final`` trains on train and tests on test, as VPT does).
        layout: how the task folder lists its images (``data.layouts``): ``"vtab"`` split files,
            ``"fgvc"`` JSON files, or ``"imagefolder"`` (``train/``, ``val/``, ``test/`` with one
            sub-folder per class); ``None`` takes the benchmark's.

    Labels are checked when the splits are read: a label outside the class count (the registry's,
    ``num_classes``, or the lines of ``classes.txt``) is refused naming its file and line. A class
    count inferred from the labels that leaves classes absent from the training split is warned
    about; ``num_classes`` set explicitly accepts it.
    """

    def __init__(
        self,
        root: str = "data/vtab-1k",
        task: str = "demo",
        protocol: VTABProtocol = "final",
        img_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        normalization: Normalization | None = None,
        augment: bool = False,
        cache_images: bool = False,
        num_classes: int | None = None,
        track_test: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        backbone: str | None = None,
        benchmark: Benchmark = "vtab",
        layout: LayoutName | None = None,
    ) -> None:
        super().__init__()
        registry.check_benchmark(benchmark)
        if protocol not in _PROTOCOL_SPLITS:
            raise ValueError(f"protocol must be 'tune' or 'final', got {protocol!r}")
        if normalization is None:
            normalization = backbone_data_config(backbone)[1] if backbone else "imagenet"
        img_size = resolve_img_size(img_size, backbone)
        if normalization not in NORMALIZATION_STATS:
            raise ValueError(
                f"normalization must be one of {list(NORMALIZATION_STATS)}, got {normalization!r}"
            )
        for name, value in (
            ("img_size", img_size),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        try:
            self.task_info: VTABTask | None = resolve_task(task, benchmark)
        except ValueError:
            self.task_info = None  # a custom folder; whether it exists is checked when data is needed
        if num_classes is not None:
            if num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
            if self.task_info is not None and num_classes != self.task_info.num_classes:
                raise ValueError(
                    f"num_classes={num_classes} contradicts task {self.task_info.name!r}, which has "
                    f"{self.task_info.num_classes} classes; leave num_classes unset for known tasks"
                )
        if augment and self.task_info is not None and self.task_info.group == "structured":
            rank_zero_warn(
                f"augment=True on structured task {self.task_info.name!r}: flips and crops can change its "
                "labels (positions, orientations, distances)"
            )
        self.save_hyperparameters(ignore=["num_classes"])  # the model logs the resolved count
        # The resolved values, so that a checkpoint names the statistics and size it was trained with.
        self.hparams["img_size"], self.hparams["normalization"] = img_size, normalization
        self.root = Path(root)
        self.task = task
        self.protocol = protocol
        self.img_size = img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.normalization = normalization
        self.augment = augment
        self.cache_images = cache_images
        self.track_test = track_test
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.drop_last = drop_last
        self.benchmark = benchmark
        demo = self.task_info is DEMO_TASK and layout is None
        self.layout: Layout = LAYOUTS["vtab"] if demo else resolve_layout(layout, benchmark)
        # where the class count came from: "registry", "argument", "classes.txt" or "labels"
        self._num_classes_source = "argument" if num_classes is not None else "registry"
        self._num_classes = (
            num_classes if num_classes is not None else getattr(self.task_info, "num_classes", None)
        )
        self._task_dir: Path | None = None
        self._records: dict[str, list[SplitRecord]] = {}  # split file name -> parsed lines
        self._cache: dict[str, Tensor] = {}  # split file name -> (N, 3, H, W) uint8
        self._datasets: dict[Role, VTABSplit] = {}

    # ----------------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """Class count; a custom task without ``num_classes`` takes ``classes.txt``'s, else its labels'."""
        if self._num_classes is None:
            names = read_class_names(self.task_dir, None, None)
            if names is not None:
                self._num_classes, self._num_classes_source = len(names), registry.CLASS_NAMES_FILE
                return self._num_classes
            splits = self.layout.splits
            present = [name for name in splits if (self.task_dir / name).exists()]
            if not present:
                raise FileNotFoundError(
                    f"cannot infer num_classes: {self.task_dir} holds none of {', '.join(splits)}"
                )
            labels = [
                r.label for name in present for r in read_layout_split(self.layout, self.task_dir, name, None)
            ]
            self._num_classes, self._num_classes_source = 1 + max(labels), "labels"
        return self._num_classes

    @property
    def group(self) -> str:
        """The task's group (``natural``/``specialized``/``structured``/``demo``), ``custom`` otherwise."""
        return self.task_info.group if self.task_info is not None else "custom"

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of the classes (label ``i`` is ``class_names[i]``) where the task has them, else ``None``."""
        names = read_class_names(self.task_dir, self.task_info, self.num_classes)
        if names is None and self.layout.name == "imagefolder" and (self.task_dir / "train").is_dir():
            names = tuple(sorted(p.name for p in (self.task_dir / "train").iterdir() if p.is_dir()))
        return names

    @property
    def data_identity(self) -> dict[str, Any] | None:
        """The task's entry in ``<root>/manifest.json`` (its digest and image formats), for
        ``results.json``; ``None``, with a warning saying why, where the manifest's check failed or
        it no longer describes the split files and images this run read."""
        from pyra_lightning.data.manifest import data_identity

        name = self.task_info.name if self.task_info is not None else self.task
        identity, stale = data_identity(self.root, name, self.task_dir, self._records)
        if stale is not None:
            rank_zero_warn(f"results.json records no data digest: {stale}")
        return identity

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the selected normalization, for code that normalizes images itself."""
        return tuple(NORMALIZATION_STATS[self.normalization][0])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the selected normalization."""
        return tuple(NORMALIZATION_STATS[self.normalization][1])

    @property
    def split_files(self) -> dict[Role, str]:
        """Split file read by the train/val/test loaders under the chosen protocol."""
        return dict(self.layout.protocol_splits[self.protocol])

    @property
    def task_dir(self) -> Path:
        """The folder of the task under ``root``, found through the task's aliases."""
        if self._task_dir is None:
            self._task_dir = self._find_task_dir()
        return self._task_dir

    def _find_task_dir(self) -> Path:
        if self.task_info is not None and self.task_info.name == DEMO_TASK_NAME:
            return self.root / DEMO_TASK_NAME
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"VTAB-1k root {self.root} (absolute: {self.root.resolve()}) does not exist; expected a folder "
                f"with one sub-folder per task, e.g. {self.root / 'cifar' / 'train800.txt'} (task='demo' generates one)"
            )
        if (self.root / self.task).is_dir():  # the name as given wins over any alias
            return self.root / self.task
        # otherwise match folder names loosely (case, '-' vs '_'), trying the canonical name first
        folders = {
            _normalize_name(p.name): p for p in sorted(self.root.iterdir(), reverse=True) if p.is_dir()
        }
        wanted = (
            [self.task]
            if self.task_info is None
            else [self.task, self.task_info.name, *self.task_info.aliases]
        )
        for name in wanted:
            if _normalize_name(name) in folders:
                return folders[_normalize_name(name)]
        if self.task_info is None:
            raise ValueError(
                f"unknown VTAB-1k task {self.task!r}: it is not a known task and {self.root / self.task} does not "
                f"exist; known tasks: {_known_names(self.benchmark)}"
            )
        raise FileNotFoundError(
            f"no folder for task {self.task_info.name!r} under {self.root}: looked for {', '.join(wanted[1:])}; "
            f"expected e.g. {self.root / self.task_info.name} holding {', '.join(SPLIT_FILES)}"
        )

    # ------------------------------------------------------------------------------------ datasets
    def prepare_data(self) -> None:
        """Generate the ``demo`` task if it is missing; real tasks are never downloaded."""
        if self.task_info is DEMO_TASK:
            generate_demo(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Parse (and, with ``cache_images``, decode) the splits that ``stage`` needs.

        Every line of the split files is checked here, so bad labels or malformed lines fail before
        training starts; images themselves are only opened when cached or loaded. For ``fit``, the
        test split too is read and each of its images must exist: ``fit`` tests after training,
        and a missing test image must not cost the whole training first.
        """
        self.prepare_data()  # no-op unless demo is missing, e.g. when used without a Trainer
        _ = self.class_names  # a classes.txt that contradicts the class count fails here
        roles: dict[str | None, tuple[Role, ...]] = {
            "fit": ("train", "val", "test") if self.track_test else ("train", "val"),
            "validate": ("val", "test") if self.track_test else ("val",),
            "test": ("test",),
            "predict": ("test",),
        }
        for role in roles.get(stage, ("train", "val", "test")):
            self._dataset(role)
        if stage == "fit":
            file = self.split_files["test"]
            if file not in self._records:
                self._records[file] = self._read(file, check_classes=False)
            records = self._records[file]
            missing = next((r for r in records if not (self.task_dir / r.path).is_file()), None)
            if missing is not None:
                raise FileNotFoundError(
                    f"{self.task_dir / file}, line {missing.line}: image {self.task_dir / missing.path} "
                    "does not exist (fit tests on this split after training)"
                )

    def _dataset(self, role: Role) -> VTABSplit:
        """Build the dataset of one role on first use, sharing parsed lines and caches between roles."""
        if role not in self._datasets:
            file = self.split_files[role]
            if file not in self._records:
                self._records[file] = self._read(file, check_classes=role == "train")
            dataset = VTABSplit(
                self.task_dir,
                self.task_dir / file,
                self._records[file],
                self.img_size,
                transform=self._augmentation() if self.augment and role == "train" else None,
                images=self._cache.get(file),
            )
            if self.cache_images:
                self._cache[file] = dataset.build_cache(num_threads=min(4, os.cpu_count() or 1))
            self._datasets[role] = dataset
        return self._datasets[role]

    def _read(self, file: str, check_classes: bool) -> list[SplitRecord]:
        """Read one split strictly; for the training split, warn about classes it never shows."""
        try:
            records = read_layout_split(self.layout, self.task_dir, file, self.num_classes)
        except ValueError as error:
            if self._num_classes_source == registry.CLASS_NAMES_FILE:
                names = self.task_dir / registry.CLASS_NAMES_FILE
                raise ValueError(f"{error} ({names} lists {self.num_classes} classes)") from None
            raise
        absent = sorted(set(range(self.num_classes)) - {r.label for r in records})
        if check_classes and absent and self._num_classes_source == "labels":
            shown = ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else "")
            rank_zero_warn(
                f"{self.task_dir / file}: the class count {self.num_classes} is inferred from the labels, and "
                f"{len(absent)} of its classes never occur in this training split ({shown}); the head gets "
                f"outputs it never learns. Set --data.num_classes {self.num_classes} to accept it, or fix the labels"
            )
        return records

    def _augmentation(self) -> v2.Transform:
        return v2.Compose(
            [
                v2.RandomResizedCrop(
                    self.img_size,
                    scale=(0.8, 1.0),
                    interpolation=v2.InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                v2.RandomHorizontalFlip(),
            ]
        )

    # --------------------------------------------------------------------------------- dataloaders
    def _loader(self, role: Role, shuffle: bool = False, each_image_once: bool = False) -> DataLoader:
        dataset = self._dataset(role)
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        if each_image_once:
            sampler = self._unrepeated(dataset) or sampler
        return DataLoader(
            dataset,
            batch_size=self.batch_size if role == "train" else self.eval_batch_size,
            sampler=sampler,
            drop_last=self.drop_last and role == "train",
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            # Worker seeds come from this generator, not the global RNG: resuming stays exact.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _unrepeated(self, dataset: Any) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each rank's share of an evaluation split with no image counted twice.

        Lightning's own ``DistributedSampler`` pads the last shard with repeated images, so that
        ``val/acc`` and ``test_acc`` would depend on the device count (176/712 against 175/711 on
        two devices). torchmetrics sums each rank's counts, so uneven shards give the exact rate;
        Lightning keeps a sampler that is already a ``DistributedSampler``. ``None`` on one process.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val loader, or ``[val_loader, test_loader]`` with ``track_test`` (test is index 1)."""
        if self.track_test:
            return [self._loader("val", each_image_once=True), self._loader("test", each_image_once=True)]
        return self._loader("val", each_image_once=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", each_image_once=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalize ``uint8`` images on the device; labels and already-float images pass through.

        Lightning casts a batch to a true-precision trainer's dtype (``bf16-true``, ``16-true``,
        ``64-true``) before the transfer, where these images are still ``uint8`` and pass
        unchanged; so the normalized images are cast here, by the same plugin, in the model's dtype.
        """
        images, labels = batch
        if images.dtype == torch.uint8:
            images = normalize_uint8(images, self.mean, self.std)  # (B, 3, H, W) float32
            if self.trainer is not None:
                images = self.trainer.precision_plugin.convert_input(images)
        return images, labels
