"""Datasets and samplers behind ``VTABDataModule``: decoding, the ``uint8`` cache and a resumable shuffle.

Images are decoded and resized once (``load_image``) and kept as ``uint8``; normalisation
(``normalize_uint8``) happens on the accelerator after the batch is transferred.
"""

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from pyra_lightning.data.layouts import SplitRecord


def normalize_uint8(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Turn ``uint8`` images (..., 3, H, W) into float32 ``(x / 255 - mean) / std``, on ``x``'s device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects a uint8 tensor, got {x.dtype}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)  # (3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)


def load_image(path: Path, img_size: int) -> Tensor:
    """Decode an image as RGB and resize it straight to ``img_size`` x ``img_size``.

    PIL's bicubic resize filters over the whole source footprint (antialiased), exactly like the
    ``transforms.Resize((224, 224), interpolation=3)`` of the reference implementation.

    Returns:
        ``uint8`` tensor (3, img_size, img_size), e.g. (3, 224, 224).
    """
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((img_size, img_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


class VTABSplit(Dataset[tuple[Tensor, int]]):
    """The images of one split file, decoded on access or served from an in-memory ``uint8`` cache.

    Args:
        task_dir: the task folder that image paths are relative to.
        split_file: the split file the records came from (named in error messages).
        records: parsed lines of ``split_file``.
        img_size: side of the square output images.
        transform: optional augmentation applied to each ``uint8`` (3, H, W) image after resizing.
        images: a ready cache (N, 3, img_size, img_size), e.g. shared with another split's dataset.
    """

    def __init__(
        self,
        task_dir: Path,
        split_file: Path,
        records: Sequence[SplitRecord],
        img_size: int,
        transform: v2.Transform | None = None,
        images: Tensor | None = None,
    ) -> None:
        self.task_dir = task_dir
        self.split_file = split_file
        self.records = list(records)
        self.img_size = img_size
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [record.label for record in self.records]

    def decode(self, index: int) -> Tensor:
        """Load image ``index`` from disk, naming its split file line if it cannot be read."""
        record = self.records[index]
        path = self.task_dir / record.path
        where = f"{self.split_file}, line {record.line}"
        try:
            return load_image(path, self.img_size)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: image {path} does not exist") from None
        except Exception as exc:  # PIL raises several unrelated types for broken files
            raise ValueError(f"{where}: cannot decode image {path} ({type(exc).__name__}: {exc})") from exc

    def build_cache(self, num_threads: int = 4) -> Tensor:
        """Decode every image once into ``self.images`` (N, 3, H, W); PIL releases the GIL while decoding."""
        if self.images is None:
            images = torch.empty((len(self), 3, self.img_size, self.img_size), dtype=torch.uint8)

            def fill(index: int) -> None:
                images[index] = self.decode(index)

            with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
                for _ in pool.map(fill, range(len(self))):  # re-raises the first failure, in order
                    pass
            self.images = images
        return self.images

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index] if self.images is not None else self.decode(index)  # (3, H, W) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, self.records[index].label


class EpochShuffleSampler(Sampler[int]):
    """A shuffle whose order depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every training epoch, so a run resumed from a checkpoint
    at epoch k sees exactly the orders an uninterrupted run would have seen from epoch k on.
    (Under DDP Lightning substitutes a ``DistributedSampler``, which is seeded per epoch too.)
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())
