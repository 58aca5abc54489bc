"""``predict``: class predictions for a task's test split or for your own images, as one CSV.

``PredictionsCSV`` is Lightning's ``BasePredictionWriter``: under DDP every rank predicts its
shard, the (dataset index, class) pairs are gathered, and rank 0 writes one file in dataset
order, each image once (``DistributedSampler`` pads the last shard with repeats).

``--images DIR_OR_GLOB`` (or a text file listing one image path per line) predicts images
that are not in a split file; their CSV goes beside them, or to ``--out``, and never over the
run's own ``predictions.csv``.
"""

from __future__ import annotations

import csv
import glob
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import Dataset

from pyra_lightning.data.datasets import load_image, normalize_uint8
from pyra_lightning.data.layouts import SplitRecord
from pyra_lightning.files import atomic_write_text
from pyra_lightning.training.callbacks import say

PREDICTIONS_FILENAME = "predictions.csv"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def find_images(spec: str | Path) -> tuple[list[Path], Path]:
    """The images ``spec`` names, sorted, and the folder their CSV goes to by default.

    ``spec`` is a folder (every image under it, recursively), a glob pattern, or a text file with
    one image path per line (relative paths are relative to the file).

    Raises:
        ValueError: nothing matched, or a listed file is not an image.
        FileNotFoundError: a listed image does not exist.
    """
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        home = path
    elif path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        found = []
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            image = Path(line) if Path(line).is_absolute() else path.parent / line
            if not image.is_file():
                raise FileNotFoundError(f"{path}, line {number}: image {image} does not exist")
            found.append(image)
        home = path.parent
    else:
        found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        found = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        home = Path(found[0]).parent if found else Path(".")
    if not found:
        raise ValueError(
            f"--images {spec}: no images found (expected a folder, a glob such as 'photos/*.jpg', or a "
            f"text file listing image paths; image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found, home


class ImageFiles(Dataset[tuple[Tensor, int]]):
    """Images that no split file lists, resized and normalized as the task's test images are.

    Labels are unknown (-1). ``records`` and ``task_dir`` are the same attributes a split's
    dataset has, so the writer names every image the same way.
    """

    def __init__(
        self, paths: Sequence[Path], img_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.records = [SplitRecord(str(Path(p).resolve()), -1, i + 1) for i, p in enumerate(paths)]
        self.task_dir = Path("/")
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = Path(self.records[index].path)
        try:
            image = load_image(path, self.img_size)  # (3, H, W) uint8
        except Exception as exc:  # PIL raises several unrelated types for broken files
            raise ValueError(f"--images: cannot decode {path} ({type(exc).__name__}: {exc})") from exc
        return normalize_uint8(image, self.mean, self.std), -1  # (3, H, W) float32


class PredictionsCSV(BasePredictionWriter):
    """Write ``image, label, predicted, class_name`` rows after ``predict``, on any number of devices.

    ``label`` is the split file's true label (empty for ``--images``); ``class_name`` comes from
    ``class_names`` or the datamodule's ``class_names`` where the task has names.

    Args:
        filename: Name of the file inside the run folder.
    """

    def __init__(self, filename: str = PREDICTIONS_FILENAME) -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.dirpath: Path | None = None  # the run folder (set by the CLI)
        self.out: Path | None = None  # an exact destination (--images / --out)
        self.class_names: Sequence[str] | None = None
        self.path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # predict has one dataloader: Lightning passes its (B,) tensors flat, but the batch indices
        # still nested per dataloader.
        if len(batch_indices) == 1 and (not batch_indices[0] or isinstance(batch_indices[0][0], list)):
            batch_indices = batch_indices[0]
        device = pl_module.device
        classes = torch.cat([torch.as_tensor(p).reshape(-1) for p in predictions]).to(device)
        indices = torch.tensor([i for batch in batch_indices for i in batch], device=device)
        if trainer.world_size > 1:  # every rank holds as many (padded) items: gather them all
            classes = trainer.strategy.all_gather(classes).reshape(-1)
            indices = trainer.strategy.all_gather(indices).reshape(-1)
        if not trainer.is_global_zero:
            return
        by_index = dict(zip(indices.tolist(), classes.tolist(), strict=True))  # repeats collapse
        loaders = trainer.predict_dataloaders
        dataset = (loaders[0] if isinstance(loaders, list | tuple) else loaders).dataset
        records = getattr(dataset, "records", None)
        task_dir = Path(getattr(dataset, "task_dir", "."))
        names = self.class_names or getattr(trainer.datamodule, "class_names", None)
        lines = io.StringIO()
        writer = csv.writer(lines)
        writer.writerow(["image", "label", "predicted", "class_name"])
        for index in sorted(by_index):
            predicted = int(by_index[index])
            record = records[index] if records is not None and index < len(records) else None
            writer.writerow(
                [
                    str(task_dir / record.path) if record is not None else index,
                    record.label if record is not None and record.label >= 0 else "",
                    predicted,
                    names[predicted] if names is not None and 0 <= predicted < len(names) else "",
                ]
            )
        self.path = self.out or (self.dirpath or Path(trainer.default_root_dir)) / self.filename
        atomic_write_text(self.path, lines.getvalue())
        say(trainer, f"predictions written to {self.path}")
