"""``pyra-lightning data prepare vtab``: VTAB-1k from tensorflow-datasets, as lossless PNG.

Every task follows google-research/task_adaptation (``task_adaptation/data/<dataset>.py``, the code
that defines VTAB): which TFDS builder and version, which slices make ``train800``/``val200``/``test``,
and how an example becomes an image and a label. The 19 tasks and their arguments are VPT's list
(KMnP/vpt ``src/data/datasets/tf_dataset.py``, ``DATASETS``): ``cifar(num_classes=100)``,
``clevr(task="count_all")``, ``clevr(task="closest_object_distance")``,
``dsprites(predicted_attribute="label_x_position", num_classes=16)``, ``kitti(task=
"closest_vehicle_distance")``, ``smallnorb(predicted_attribute="label_azimuth")``, ... The
per-task rules are in ``SPECS`` below, each citing its file.

The output is the layout ``VTABDataModule`` reads: ``<out>/<task>/images/<split>/<index>.png`` and the
four split files. A task is written into a hidden ``.<task>.partial`` folder and renamed into place
only when complete, so an interrupted run leaves no folder that looks finished; a rerun skips the
finished tasks and starts the unfinished one again.

Writing a task takes minutes (dSprites' test split alone holds 73,728 images), so each split shows
a tqdm bar on stderr, ``<task>/<split>``, images written out of that split's total. stdout keeps
only the one-line summaries, so a script reading them is unaffected.

The TFDS side is isolated in ``TfdsSource`` (random access through ``as_data_source``, which needs
no TensorFlow: install ``pip install 'pyra-lightning[prepare]'``). Tests substitute any object with the
same two methods, or run it under ``tfds.testing.mock_data``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pyra_lightning.data.tasks import VTAB_TASKS, resolve_task

Example = dict[str, Any]
# (tfds split, start, stop): images ``start:stop`` of that split, in its order (None: to the end).
Slice = tuple[str, int, int | None]


class Source(Protocol):
    """Random access to a TFDS dataset's examples (``TfdsSource``, or a fake in tests)."""

    def size(self, builder: str, split: str) -> int: ...

    def examples(self, builder: str, split: str) -> Sequence[Example]: ...


@dataclass(frozen=True)
class TaskSpec:
    """How task_adaptation builds one VTAB task.

    Attributes:
        builder: the TFDS name and version pattern task_adaptation loads.
        slices: ``slices(size) -> {split file stem: [Slice, ...]}``; ``size(split)`` gives a TFDS
            split's example count (task_adaptation's percentages are of these counts).
        example: ``example(tfds example) -> (uint8 image (H, W, 3), label)``.
        source: the task_adaptation file that defines it.
    """

    builder: str
    slices: Callable[[Callable[[str], int]], dict[str, list[Slice]]]
    example: Callable[[Example], tuple[np.ndarray, int]]
    source: str


def _percent_split(
    percent: int, test: str = "test"
) -> Callable[[Callable[[str], int]], dict[str, list[Slice]]]:
    """train800 = train[:800], val200 = train[p%:p%+200] (p% of the TFDS train split), test = ``test``."""

    def slices(size: Callable[[str], int]) -> dict[str, list[Slice]]:
        start = percent * size("train") // 100
        return {
            "train800": [("train", 0, 800)],
            "val200": [("train", start, start + 200)],
            "test": [(test, 0, None)],
        }

    return slices


def _validation_split(size: Callable[[str], int]) -> dict[str, list[Slice]]:
    """train800 = train[:800], val200 = validation[:200], test = test (datasets with a validation split)."""
    return {"train800": [("train", 0, 800)], "val200": [("validation", 0, 200)], "test": [("test", 0, None)]}


def _three_way(train_pct: int, val_pct: int) -> Callable[[Callable[[str], int]], dict[str, list[Slice]]]:
    """One TFDS split cut train_pct / val_pct / rest (EuroSAT, RESISC45, dSprites)."""

    def slices(size: Callable[[str], int]) -> dict[str, list[Slice]]:
        total = size("train")
        train, val = train_pct * total // 100, val_pct * total // 100
        return {
            "train800": [("train", 0, 800)],
            "val200": [("train", train, train + 200)],
            "test": [("train", train + val, None)],
        }

    return slices


def _smallnorb_split(size: Callable[[str], int]) -> dict[str, list[Slice]]:
    """smallnorb.py: val200 = test[:200], test = test[50%:]."""
    half = 50 * size("test") // 100
    return {"train800": [("train", 0, 800)], "val200": [("test", 0, 200)], "test": [("test", half, None)]}


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    return np.repeat(image, 3, axis=-1) if image.ndim == 3 and image.shape[-1] == 1 else image


def _plain(example: Example) -> tuple[np.ndarray, int]:
    return _rgb(example["image"]), int(example["label"])


def _clevr_count(example: Example) -> tuple[np.ndarray, int]:
    """clevr.py ``_count_preprocess_fn``: number of objects minus 3 (3..10 objects -> 8 classes)."""
    return _rgb(example["image"]), len(np.asarray(example["objects"]["size"])) - 3


def _thresholds(value: float, thresholds: Sequence[float]) -> int:
    """task_adaptation's ``reduce_max(where(thrs - value < 0))``: the last threshold below ``value``."""
    return int(np.max(np.nonzero(np.asarray(thresholds) - value < 0)[0]))


def _clevr_distance(example: Example) -> tuple[np.ndarray, int]:
    """clevr.py ``_closest_object_preprocess_fn``: depth of the closest object, binned into 6."""
    depth = float(np.min(np.asarray(example["objects"]["pixel_coords"])[:, 2]))
    return _rgb(example["image"]), _thresholds(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _kitti_vehicle_distance(example: Example) -> tuple[np.ndarray, int]:
    """kitti.py ``_closest_vehicle_distance_pp``: z of the closest Car/Van/Truck (1000 if none), 4 bins."""
    types = np.asarray(example["objects"]["type"])
    depths = np.asarray(example["objects"]["location"]).reshape(-1, 3)[:, 2]
    distance = float(np.min(np.concatenate([depths[types < 3], [1000.0]])))
    return _rgb(example["image"]), _thresholds(distance, [-100.0, 8.0, 20.0, 999.0])


def _dsprites(attribute: str, original: int, classes: int) -> Callable[[Example], tuple[np.ndarray, int]]:
    """dsprites.py ``preprocess_fn``: 0/1 image tiled to RGB x255, label floor(value / (original/classes))."""

    def example(ex: Example) -> tuple[np.ndarray, int]:
        image = (_rgb(ex["image"]).astype(np.int64) * 255).clip(0, 255).astype(np.uint8)
        return image, int(np.floor(int(ex[attribute]) / (original / classes)))

    return example


def _smallnorb(attribute: str) -> Callable[[Example], tuple[np.ndarray, int]]:
    """smallnorb.py ``preprocess_fn``: grey image tiled to RGB, label = ``attribute``."""
    return lambda ex: (_rgb(ex["image"]), int(ex[attribute]))


_TA = "google-research/task_adaptation task_adaptation/data/"
SPECS: dict[str, TaskSpec] = {
    "cifar": TaskSpec("cifar100:3.*.*", _percent_split(90), _plain, _TA + "cifar.py"),
    "caltech101": TaskSpec("caltech101:3.*.*", _percent_split(90), _plain, _TA + "caltech.py"),
    "dtd": TaskSpec("dtd:3.*.*", _validation_split, _plain, _TA + "dtd.py"),
    "oxford_flowers102": TaskSpec(
        "oxford_flowers102:2.*.*", _validation_split, _plain, _TA + "oxford_flowers102.py"
    ),
    "oxford_iiit_pet": TaskSpec(
        "oxford_iiit_pet:3.*.*", _percent_split(80), _plain, _TA + "oxford_iiit_pet.py"
    ),
    "svhn": TaskSpec("svhn_cropped:3.*.*", _percent_split(90), _plain, _TA + "svhn.py"),
    "sun397": TaskSpec("sun397/tfds:4.*.*", _validation_split, _plain, _TA + "sun397.py"),
    "patch_camelyon": TaskSpec("patch_camelyon:2.*.*", _validation_split, _plain, _TA + "patch_camelyon.py"),
    "eurosat": TaskSpec("eurosat/rgb:2.*.*", _three_way(60, 20), _plain, _TA + "eurosat.py"),
    "resisc45": TaskSpec("resisc45:3.*.*", _three_way(60, 20), _plain, _TA + "resisc45.py"),
    "diabetic_retinopathy": TaskSpec(
        "diabetic_retinopathy_detection/btgraham-300:3.*.*",
        _validation_split,
        _plain,
        _TA + "diabetic_retinopathy.py",
    ),
    # clevr.py: the TFDS "validation" split is VTAB's test split.
    "clevr_count": TaskSpec(
        "clevr:3.*.*", _percent_split(90, test="validation"), _clevr_count, _TA + "clevr.py"
    ),
    "clevr_dist": TaskSpec(
        "clevr:3.*.*", _percent_split(90, test="validation"), _clevr_distance, _TA + "clevr.py"
    ),
    "dmlab": TaskSpec("dmlab:2.0.1", _validation_split, _plain, _TA + "dmlab.py"),
    # task_adaptation pins kitti:3.1.0; VPT's VTAB_SETUP.md notes TFDS now needs 3.2.0 (task_adaptation issue 18).
    "kitti": TaskSpec("kitti:3.2.0", _validation_split, _kitti_vehicle_distance, _TA + "kitti.py"),
    "dsprites_loc": TaskSpec(
        "dsprites:2.*.*", _three_way(80, 10), _dsprites("label_x_position", 32, 16), _TA + "dsprites.py"
    ),
    "dsprites_ori": TaskSpec(
        "dsprites:2.*.*", _three_way(80, 10), _dsprites("label_orientation", 40, 16), _TA + "dsprites.py"
    ),
    "smallnorb_azi": TaskSpec(
        "smallnorb:2.*.*", _smallnorb_split, _smallnorb("label_azimuth"), _TA + "smallnorb.py"
    ),
    "smallnorb_ele": TaskSpec(
        "smallnorb:2.*.*", _smallnorb_split, _smallnorb("label_elevation"), _TA + "smallnorb.py"
    ),
}


class TfdsSource:
    """Examples through tensorflow-datasets' ``as_data_source`` (array_record files, no TensorFlow)."""

    def __init__(self, data_dir: str | None = None) -> None:
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ValueError(
                "data prepare needs tensorflow-datasets: pip install 'pyra-lightning[prepare]'"
            ) from None
        self.tfds = tfds
        self.data_dir = data_dir
        self._builders: dict[str, Any] = {}

    def _builder(self, name: str) -> Any:
        if name not in self._builders:
            builder = self.tfds.builder(name, data_dir=self.data_dir)
            builder.download_and_prepare(file_format="array_record")
            self._builders[name] = builder
        return self._builders[name]

    def size(self, builder: str, split: str) -> int:
        return len(self.examples(builder, split))

    def examples(self, builder: str, split: str) -> Sequence[Example]:
        return self._builder(builder).as_data_source(split=split)


def is_finished(task_dir: Path) -> bool:
    """A task folder is finished when it exists: it only ever appears by a rename of a complete one."""
    return task_dir.is_dir() and all(
        (task_dir / f"{stem}.txt").is_file() for stem in ("train800", "val200", "train800val200", "test")
    )


def write_task(name: str, spec: TaskSpec, source: Source, out: Path, progress: bool = True) -> Path:
    """Build one task in a hidden temporary folder under ``out`` and rename it to ``out/<name>``.

    Args:
        name: the task's folder name under ``out``.
        spec: how task_adaptation builds it.
        source: where the examples come from.
        out: the VTAB-1k root.
        progress: show one bar per split on stderr. Its total is counted before the first image is
            written, from the same slices the loop writes, so the bar ends exactly at its total.
            ``False`` writes nothing to stderr; ``True`` draws the bar even when stderr is no
            terminal (tqdm's default, ``disable=False``, which we keep on purpose: a Slurm log is
            where "is it stuck?" is asked most), redrawn at most every 0.5 s.

    Raises:
        FileExistsError: before anything is built, if ``out/<name>`` exists but is not a finished
            task (not one of ours, or left by another tool): the rename could not replace it.
    """
    target = out / name
    if target.exists() and not is_finished(target):
        raise FileExistsError(
            f"{target} exists but is not a finished task (it lacks train800.txt, val200.txt, "
            "train800val200.txt or test.txt); move or delete it, or pass another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{name}.partial*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial", dir=out))
    try:
        slices = spec.slices(lambda split: source.size(spec.builder, split))
        lines: dict[str, list[str]] = {}
        for stem, parts in slices.items():
            lines[stem] = []
            folder = partial / "images" / stem
            folder.mkdir(parents=True)
            ranges: list[tuple[Sequence[Example], range]] = []
            for split, start, stop in parts:
                examples = source.examples(spec.builder, split)
                ranges.append(
                    (examples, range(start, len(examples) if stop is None else min(stop, len(examples))))
                )
            total = sum(len(positions) for _, positions in ranges)
            with tqdm(
                total=total,
                desc=f"{name}/{stem}",
                unit="img",
                file=sys.stderr,
                disable=not progress,
                mininterval=0.5,
            ) as bar:
                for examples, positions in ranges:
                    for position in positions:
                        image, label = spec.example(examples[position])
                        rel = f"images/{stem}/{len(lines[stem]):06d}.png"
                        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
                            partial / rel, format="PNG"
                        )
                        lines[stem].append(f"{rel} {label}")
                        bar.update()
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for stem, content in lines.items():
            (partial / f"{stem}.txt").write_text("\n".join(content) + "\n", encoding="utf-8")
        (partial / "SOURCE.txt").write_text(f"{spec.builder} via {spec.source}\n", encoding="utf-8")
        partial.chmod(0o777 & ~_umask())
        partial.rename(out / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out / name


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare_vtab(
    out: str | Path,
    tasks: Sequence[str] | None = None,
    tfds_dir: str | None = None,
    source: Source | None = None,
    progress: bool = True,
) -> list[str]:
    """Build the VTAB-1k tasks (all 19 by default) under ``out``; return the names written now.

    Finished tasks are skipped, so an interrupted run is resumed by running it again.

    Args:
        out: the VTAB-1k root (one folder per task).
        tasks: task names or aliases; all 19 by default.
        tfds_dir: tensorflow-datasets' data_dir (its default otherwise).
        source: the examples' source; ``TfdsSource(tfds_dir)`` by default (tests pass a fake).
        progress: one bar per task and split on stderr (see ``write_task``); the summary lines on
            stdout are printed either way.
    """
    out = Path(out)
    names = [resolve_task(t).name for t in tasks] if tasks else [t.name for t in VTAB_TASKS]
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        raise ValueError(f"data prepare cannot build {', '.join(unknown)}; it builds: {', '.join(SPECS)}")
    todo = [name for name in names if not is_finished(out / name)]
    for name in names:
        if name not in todo:
            print(f"{name}: already prepared in {out / name}, skipped")
    if todo and source is None:
        source = TfdsSource(tfds_dir)
    for name in todo:
        print(f"{name}: building from {SPECS[name].builder} ({SPECS[name].source})")
        write_task(name, SPECS[name], source, out, progress)  # type: ignore[arg-type]
    return todo
