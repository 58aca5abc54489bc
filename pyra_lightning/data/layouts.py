"""How a task folder lists its images: one reader per layout, shared by the DataModule and ``data verify``.

Three layouts, registered by name in ``LAYOUTS``:

* ``vtab``: the NOAH/VPT release of VTAB-1k (and the generated ``demo``): ``train800.txt``,
  ``val200.txt``, ``train800val200.txt`` and ``test.txt``, lines ``<image path> <integer label>``.
* ``fgvc``: VPT's FGVC-5 release (KMnP/vpt, ``src/data/datasets/json_dataset.py``): ``train.json``,
  ``val.json`` and ``test.json`` map an image path to a class id. Paths are relative to an image
  folder that depends on the dataset (``images/`` for CUB and NABirds, ``Images/`` for Stanford Dogs,
  the task folder itself for Flowers and Cars); class ids are mapped to contiguous labels in sorted
  order, as VPT does. Here the order is taken from ``train.json`` for every split, so a class id seen
  only in val or test is refused instead of shifting every label after it.
* ``imagefolder``: ``train/``, ``val/`` and ``test/`` folders of class sub-folders (torchvision's
  ``ImageFolder``); classes are ``train/``'s sub-folders in sorted order.

A reader never raises on bad content: it returns the records it could read and one problem line per
defect, ``"<file>:<line>: <what>"``; the DataModule raises the first problem, ``verify`` lists them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

# Which split each loader reads, per protocol: in "tune" the test split stays unseen (test = val).
Role = str
ROLES: tuple[Role, ...] = ("train", "val", "test")


class SplitRecord(NamedTuple):
    """One image of a split."""

    path: str  # relative to the task folder
    label: int
    line: int  # 1-based line number in the split file (0 where the split is a folder), for messages


@dataclass(frozen=True)
class Layout:
    """One way of listing a task's images.

    Attributes:
        name: the layout's name (``--data.layout``).
        splits: the split names, in the order ``verify`` reports them.
        training: the splits that hold training data (checked for overlap with ``test``).
        protocol_splits: ``{protocol: {role: split}}``: which split each loader reads.
        class_split: the split that must hold every class.
        disjoint: pairs of splits that must share no image, and the split that is their union
            (``None`` where there is none).
        read: ``read(task_dir, split, num_classes) -> (records, problems)``.
        strict: a reader that raises instead (``read_split_file(path, num_classes)``), where the
            layout has one with its own messages; ``None``: raise ``read``'s first problem.
    """

    name: str
    splits: tuple[str, ...]
    training: tuple[str, ...]
    protocol_splits: dict[str, dict[Role, str]]
    class_split: str
    disjoint: tuple[tuple[str, str], str | None] | None
    read: Callable[[Path, str, int | None], tuple[list[SplitRecord], list[str]]]
    strict: Callable[[Path, int | None], list[SplitRecord]] | None = None


SPLIT_FILES: tuple[str, ...] = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")


def where(path: Path, line: int | None = None) -> str:
    """``cifar/test.txt:14`` (the last two path parts keep messages short but unambiguous)."""
    short = "/".join(path.parts[-2:])
    return f"{short}:{line}" if line else short


def _label_problem(path: Path, number: int, label: int, num_classes: int | None) -> str | None:
    if label < 0:
        return f"{where(path, number)}: label {label} is negative"
    if num_classes is not None and label >= num_classes:
        return f"{where(path, number)}: label {label} out of range for {num_classes} classes"
    return None


def read_text_split(
    task_dir: Path, split: str, num_classes: int | None
) -> tuple[list[SplitRecord], list[str]]:
    """Read a ``<image path> <label>`` split file of the ``vtab`` layout.

    Blank lines before the last entry are one problem naming their line numbers (an entry deleted
    by hand leaves one, and a count one short would not say where); trailing ones are harmless.
    """
    path = task_dir / split
    if not path.is_file():
        return [], [f"{where(path)}: split file missing (expected lines '<image path> <label>')"]
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        return [], [f"{where(path)}: cannot be read as UTF-8 text ({exc})"]
    records: list[SplitRecord] = []
    problems: list[str] = []
    blank: list[int] = []
    last = 0  # the last line that is not blank: blank lines after it (a trailing newline) are fine
    for number, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts:
            blank.append(number)
            continue
        last = number
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            problems.append(f"{where(path, number)}: expected '<image path> <integer label>', got {raw!r}")
            continue
        label = int(parts[1])
        problem = _label_problem(path, number, label, num_classes)
        if problem:
            problems.append(problem)
            continue
        records.append(SplitRecord(parts[0], label, number))
    blank = [number for number in blank if number < last]
    if blank:
        problems.insert(0, _blank_problem(path, blank))
    if not records and not problems:
        problems.append(f"{where(path)}: split file lists no images")
    return records, problems


def _blank_problem(path: Path, blank: list[int]) -> str:
    """One line for all blank lines of a split file (a deleted entry leaves one; counts alone hide it)."""
    expected = "expected '<image path> <integer label>' on every line"
    if len(blank) == 1:
        return f"{where(path, blank[0])}: blank line; {expected}"
    if len(blank) > 10:
        shown = ", ".join(map(str, blank[:10]))
        return f"{where(path)}: {len(blank)} lines are blank (lines {shown}, ...); {expected}"
    return f"{where(path)}: lines {', '.join(map(str, blank[:-1]))} and {blank[-1]} are blank; {expected}"


# VPT's image folder per FGVC dataset (json_dataset.py's get_imagedir), by canonical task name.
FGVC_IMAGE_DIRS: dict[str, str] = {
    "cub": "images",
    "nabirds": "images",
    "dogs": "Images",
    "flowers": "",
    "cars": "",
}


def fgvc_image_dir(task_dir: Path) -> str:
    """The folder the JSON paths are relative to: VPT's for known tasks, else ``images/`` if present."""
    from pyra_lightning.data.tasks import resolve_task

    try:
        return FGVC_IMAGE_DIRS[resolve_task(task_dir.name, "fgvc").name]
    except (ValueError, KeyError):
        for name in ("images", "Images"):
            if (task_dir / name).is_dir():
                return name
        return ""


def _json_class_ids(path: Path) -> tuple[dict[str, int] | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return None, f"{where(path)}: not a JSON file ({exc})"
    if not isinstance(data, dict):
        return None, f"{where(path)}: expected a JSON object mapping image path -> class id"
    return data, None


def read_json_split(
    task_dir: Path, split: str, num_classes: int | None
) -> tuple[list[SplitRecord], list[str]]:
    """Read a VPT ``{image path: class id}`` JSON file; class ids become labels in ``train.json``'s order."""
    path = task_dir / split
    if not path.is_file():
        return [], [f"{where(path)}: split file missing (expected a JSON object image path -> class id)"]
    data, problem = _json_class_ids(path)
    if data is None:
        return [], [problem or ""]
    train, problem = (data, None) if split == "train.json" else _json_class_ids(task_dir / "train.json")
    if train is None:
        return [], [f"{where(path)}: its labels are numbered by train.json, which cannot be read ({problem})"]
    ids = sorted(
        {value for value in train.values() if isinstance(value, int) and not isinstance(value, bool)}
    )
    contiguous = {class_id: index for index, class_id in enumerate(ids)}
    prefix = fgvc_image_dir(task_dir)
    records: list[SplitRecord] = []
    problems: list[str] = []
    # A JSON object has no line numbers; the entry's position (1-based) stands in for one.
    for number, (image, class_id) in enumerate(data.items(), start=1):
        if not isinstance(class_id, int) or isinstance(class_id, bool):
            problems.append(
                f"{where(path, number)}: {image!r} has class id {class_id!r}, expected an integer"
            )
            continue
        if class_id not in contiguous:
            problems.append(
                f"{where(path, number)}: {image!r} has class id {class_id}, which train.json never uses"
            )
            continue
        label = contiguous[class_id]
        problem = _label_problem(path, number, label, num_classes)
        if problem:
            problems.append(problem)
            continue
        records.append(SplitRecord(f"{prefix}/{image}" if prefix else image, label, number))
    if not records and not problems:
        problems.append(f"{where(path)}: split file lists no images")
    return records, problems


def read_image_folder(
    task_dir: Path, split: str, num_classes: int | None
) -> tuple[list[SplitRecord], list[str]]:
    """List ``<task_dir>/<split>/<class>/<image>``; class indices come from ``train/``'s sub-folders."""
    folder = task_dir / split
    if not folder.is_dir():
        return [], [f"{where(folder)}: folder missing (expected one sub-folder per class)"]
    try:
        classes, class_to_idx = find_classes(str(task_dir / "train"))
    except (FileNotFoundError, OSError) as exc:
        return [], [f"{where(task_dir / 'train')}: cannot list the classes ({exc})"]
    records: list[SplitRecord] = []
    problems: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in class_to_idx:
            problems.append(
                f"{where(sub)}: class folder {sub.name!r} does not exist in train/ ({len(classes)} classes)"
            )
            continue
        label = class_to_idx[sub.name]
        problem = _label_problem(sub, 0, label, num_classes)
        if problem:
            problems.append(problem)
            continue
        for image in sorted(sub.rglob("*")):
            if image.suffix.lower() in IMG_EXTENSIONS and not image.is_dir():
                records.append(SplitRecord(image.relative_to(task_dir).as_posix(), label, 0))
    if not records and not problems:
        problems.append(f"{where(folder)}: holds no images")
    return records, problems


def read_split_file(path: Path, num_classes: int | None = None) -> list[SplitRecord]:
    """Parse a ``<image path> <label>`` split file, checking every line.

    Args:
        path: the split file, e.g. ``<root>/cifar/train800.txt``.
        num_classes: when given, labels must lie in ``[0, num_classes)``; otherwise only ``>= 0``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a line is malformed, a label is out of range, or the file lists no images.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path.name} is missing: expected {path}; a VTAB-1k task folder holds "
            f"{', '.join(SPLIT_FILES)} with lines '<image path> <label>'"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"split file {path} is not UTF-8 text ({exc})") from None
    records = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        try:
            label = int(parts[1]) if len(parts) == 2 else None
        except ValueError:
            label = None
        if label is None:
            raise ValueError(f"{path}, line {number}: expected '<image path> <integer label>', got {raw!r}")
        if label < 0 or (num_classes is not None and label >= num_classes):
            limit = (
                "labels >= 0"
                if num_classes is None
                else f"the task's {num_classes} classes (0..{num_classes - 1})"
            )
            raise ValueError(f"{path}, line {number}: label {label} is outside {limit}")
        records.append(SplitRecord(parts[0], label, number))
    if not records:
        raise ValueError(f"split file {path} lists no images")
    return records


def read_layout_split(
    layout: Layout, task_dir: Path, split: str, num_classes: int | None
) -> list[SplitRecord]:
    """Read one split of ``layout`` strictly: the first problem is raised, naming its file and line.

    A layout with its own strict reader (``vtab``: ``read_split_file``) uses it; the others raise
    the first problem their reader reports (``verify`` lists every problem at once).

    Raises:
        FileNotFoundError: the split file or folder is missing.
        ValueError: a line, entry or label is wrong.
    """
    if layout.strict is not None:
        return layout.strict(task_dir / split, num_classes)
    records, problems = layout.read(task_dir, split, num_classes)
    if problems:
        more = (
            f" (and {len(problems) - 1} more; 'pyra-lightning data verify' lists them)"
            if len(problems) > 1
            else ""
        )
        error = FileNotFoundError if not (task_dir / split).exists() else ValueError
        raise error(f"{problems[0]}{more} (in {task_dir})")
    return records


LAYOUTS: dict[str, Layout] = {
    "vtab": Layout(
        "vtab",
        ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"),
        ("train800.txt", "val200.txt", "train800val200.txt"),
        {
            "tune": {"train": "train800.txt", "val": "val200.txt", "test": "val200.txt"},
            "final": {"train": "train800val200.txt", "val": "val200.txt", "test": "test.txt"},
        },
        "train800val200.txt",
        (("train800.txt", "val200.txt"), "train800val200.txt"),
        read_text_split,
        read_split_file,
    ),
    # VPT trains on train, selects on val and reports test (tune_fgvc.py); "tune" keeps test unseen.
    "fgvc": Layout(
        "fgvc",
        ("train.json", "val.json", "test.json"),
        ("train.json", "val.json"),
        {
            "tune": {"train": "train.json", "val": "val.json", "test": "val.json"},
            "final": {"train": "train.json", "val": "val.json", "test": "test.json"},
        },
        "train.json",
        (("train.json", "val.json"), None),
        read_json_split,
    ),
    "imagefolder": Layout(
        "imagefolder",
        ("train", "val", "test"),
        ("train", "val"),
        {
            "tune": {"train": "train", "val": "val", "test": "val"},
            "final": {"train": "train", "val": "val", "test": "test"},
        },
        "train",
        (("train", "val"), None),
        read_image_folder,
    ),
}
BENCHMARK_LAYOUTS: dict[str, str] = {"vtab": "vtab", "fgvc": "fgvc"}


def resolve_layout(layout: str | None, benchmark: str = "vtab") -> Layout:
    """The named layout, or the benchmark's own for ``None``."""
    name = layout or BENCHMARK_LAYOUTS.get(benchmark, "vtab")
    if name not in LAYOUTS:
        raise ValueError(f"unknown data layout {name!r}; expected one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
