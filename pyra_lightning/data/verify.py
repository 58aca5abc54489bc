"""``pyra-lightning data verify``: check a benchmark install before any number is trained on it.

Per task it checks the split files (present, line counts as the registry in ``data/tasks.py`` says),
that train800 and val200 are disjoint and make up train800val200, that labels are in range and every
class occurs in the training data, that every image exists and decodes (channels, size, format), that
the images are lossless, and that no image of a training split reappears, by content, in the test split.

Why the format matters: the VTAB-1k copies most people use are made by NOAH's and the PYRA reference's
``get_vtab1k.py``, which write JPEG; users report CIFAR-100 about 10 points lower than on lossless
images (adapter_plus issue 3, NOAH issue 28). ``pyra-lightning data prepare vtab`` writes PNG.

Images are decoded in a process pool (one worker per core) with a progress bar. Duplicates are found
by file size first; only files whose size occurs on both sides are hashed (unless every file is hashed
for the manifest anyway, ``hashes=True``). The result is a table, and per task what ``manifest.json``
records (counts, class histograms, per-file size and sha256, a digest; ``data/manifest.py`` writes it,
``--against`` compares it file by file and ``results.json`` names it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pyra_lightning.data.layouts import (
    FGVC_IMAGE_DIRS,
    LAYOUTS,
    Layout,
    SplitRecord,
    fgvc_image_dir,
    resolve_layout,
    where,
)
from pyra_lightning.data.tasks import (
    BENCHMARK_TASKS,
    CLASS_NAMES_FILE,
    DEMO_TASK,
    VTABTask,
    _normalize_name,
    check_benchmark,
    resolve_task,
)

TEST_FILES = ("test.txt", "test.json")  # the splits whose size a release may have differently
JPEG_WARNING = (
    "JPEG images: lossy copies (as get_vtab1k.py writes them) cost about 10 points on CIFAR-100 "
    "(adapter_plus issue 3, NOAH issue 28); rebuild losslessly into a new root with 'pyra-lightning data "
    "prepare vtab --out NEW_ROOT' (it skips a task already present)"
)
MISSING_SHOWN = 5  # missing images listed one per line; the rest are one summary line
# Modes the loader's convert("RGB") maps faithfully; 16-bit and float modes are clipped to 255.
_FAITHFUL_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBa", "La"}
_WARN_MODES = {"CMYK": "CMYK (converted to RGB without a colour profile)", "YCbCr": "YCbCr", "LAB": "LAB"}


@dataclass
class ImageInfo:
    """What one worker found out about one file."""

    path: str
    error: str | None = None
    missing: bool = False
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    bytes: int | None = None
    sha256: str | None = None

    @property
    def channels(self) -> int | None:
        return None if self.mode is None else Image.getmodebands(self.mode)


def inspect_image(path: str, want_hash: bool) -> ImageInfo:
    """Read ``path`` once: size on disk, optional sha256 and a full decode (``load``, not ``verify``)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        broken = " (broken symlink)" if os.path.islink(path) else ""
        return ImageInfo(path, "does not exist" + broken, missing=True)
    except OSError as exc:
        return ImageInfo(path, f"cannot be read ({exc.strerror or exc})")
    info = ImageInfo(path, bytes=len(data), sha256=hashlib.sha256(data).hexdigest() if want_hash else None)
    if not data:
        info.error = "is empty (0 bytes)"
        return info
    try:
        with Image.open(io.BytesIO(data)) as image:
            info.format, info.mode, info.size = image.format, image.mode, image.size
            image.load()
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        info.error = (
            f"cannot be decoded: its {len(data)} bytes are in no image format PIL reads (PNG, JPEG, ...)"
        )
    except Exception as exc:  # PIL raises many unrelated types for broken files
        info.error = (
            f"cannot be decoded ({type(exc).__name__}: {exc}; {len(data)} bytes, truncated or corrupt)"
        )
    return info


def _inspect(args: tuple[str, bool]) -> ImageInfo:
    return inspect_image(*args)


@dataclass
class TaskReport:
    """The outcome for one task: counts, formats, errors and warnings (each a ``file:line: what`` line)."""

    name: str
    folder: Path | None
    layout: str
    counts: dict[str, int] = field(default_factory=dict)
    formats: Counter = field(default_factory=Counter)
    channels: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


def find_task_dir(root: Path, name: str, task: VTABTask | None) -> Path | None:
    """The task's folder under ``root``: the name as given, else any alias (case, ``-``/``_`` folded)."""
    if (root / name).is_dir():
        return root / name
    if not root.is_dir():
        return None
    folders = {_normalize_name(p.name): p for p in sorted(root.iterdir(), reverse=True) if p.is_dir()}
    for candidate in [name] + ([task.name, *task.aliases] if task else []):
        if _normalize_name(candidate) in folders:
            return folders[_normalize_name(candidate)]
    return None


def _num_classes(task_dir: Path, task: VTABTask | None, layout: Layout) -> int | None:
    if task is not None:
        return task.num_classes
    names = task_dir / CLASS_NAMES_FILE
    if names.is_file():
        return len([line for line in names.read_text(encoding="utf-8").splitlines() if line.strip()])
    return None  # inferred from the labels below


def _check_splits(
    report: TaskReport, task_dir: Path, task: VTABTask | None, layout: Layout
) -> dict[str, list[SplitRecord]]:
    """Read every split, check counts, disjointness, union and class coverage; return the records."""
    num_classes = _num_classes(task_dir, task, layout)
    splits: dict[str, list[SplitRecord]] = {}
    for split in layout.splits:
        records, problems = layout.read(task_dir, split, num_classes)
        report.errors.extend(problems)
        splits[split] = records
        report.counts[split] = len(records)
        expected = (task.split_sizes if task is not None else {}).get(split)
        if records and expected is not None and len(records) != expected and not problems:
            if task is not None and split in TEST_FILES and len(records) in task.other_test_sizes:
                report.warnings.append(
                    f"{where(task_dir / split)}: {len(records)} images where the registry's split has "
                    f"{expected}; a known release of {task.name} has {len(records)} (data/tasks.py)"
                )
            else:
                report.errors.append(f"{where(task_dir / split)}: {len(records)} images, expected {expected}")
        paths = Counter(record.path for record in records)
        for path, count in paths.items():
            if count > 1:
                report.errors.append(f"{where(task_dir / split)}: {path} is listed {count} times")
    if layout.disjoint is not None:
        (first, second), union = layout.disjoint
        shared = {record.path for record in splits[first]} & {record.path for record in splits[second]}
        if shared:
            report.errors.append(
                f"{where(task_dir / first)}: shares {len(shared)} image(s) with {second}, e.g. {sorted(shared)[0]}"
            )
        if union is not None and splits[union]:
            _check_union(report, task_dir, splits, (first, second), union)
    labels = [record.label for s in layout.splits for record in splits[s]]
    total = num_classes if num_classes is not None else (max(labels) + 1 if labels else 0)
    present = {record.label for record in splits[layout.class_split]}
    absent = [label for label in range(total) if label not in present]
    if splits[layout.class_split] and absent:
        shown = ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else "")
        report.errors.append(
            f"{where(task_dir / layout.class_split)}: {len(absent)} of {total} classes never occur ({shown})"
        )
    report.manifest["num_classes"] = total
    report.manifest["histograms"] = {
        split: [Counter(record.label for record in records).get(label, 0) for label in range(total)]
        for split, records in splits.items()
    }
    return splits


def _check_union(
    report: TaskReport,
    task_dir: Path,
    splits: dict[str, list[SplitRecord]],
    parts: tuple[str, str],
    union: str,
) -> None:
    """``union`` (train800val200) must list exactly the images of ``parts``, with the same labels.

    A relabelled image is one line naming both files and both labels, not an "extra" and a
    "missing" (path, label) pair; images only on one side are reported apart from it.
    """
    given = {record.path: (part, record) for part in parts for record in splits[part]}
    relabelled = [
        (record, *given[record.path])
        for record in splits[union]
        if record.path in given and given[record.path][1].label != record.label
    ]
    if relabelled:
        record, part, other = relabelled[0]
        count = (
            f" ({len(relabelled)} images in all are labelled differently here than in {' or '.join(parts)})"
            if len(relabelled) > 1
            else ""
        )
        report.errors.append(
            f"{where(task_dir / union, record.line)}: {record.path} has label {record.label}, but "
            f"{where(task_dir / part, other.line)} gives it label {other.label}{count}"
        )
    listed = {record.path for record in splits[union]}
    extra = sorted(listed - set(given))
    missing = sorted(set(given) - listed)
    found = [f"{len(extra)} image(s) only in it, e.g. {extra[0]}"] if extra else []
    if missing:
        found.append(
            f"{len(missing)} image(s) of {' or '.join(parts)} missing from it, "
            f"e.g. {missing[0]} of {given[missing[0]][0]}"
        )
    if found:
        report.errors.append(f"{where(task_dir / union)}: is not {' + '.join(parts)} ({'; '.join(found)})")


def _check_images(
    report: TaskReport, task_dir: Path, splits: dict[str, list[SplitRecord]], infos: dict[str, ImageInfo]
) -> None:
    first_line: dict[str, str] = {}
    for split, records in splits.items():
        for record in records:
            first_line.setdefault(record.path, where(task_dir / split, record.line))
    missing: list[tuple[str, str]] = []
    for rel, line in first_line.items():
        info = infos[str(task_dir / rel)]
        if info.missing:
            missing.append((rel, info.error or ""))
            if len(missing) > MISSING_SHOWN:
                continue
        if info.error:
            report.errors.append(f"{line}: image {rel} {info.error}")
            continue
        report.formats[info.format or "?"] += 1
        report.channels[info.channels] += 1
        report.sizes[info.size] += 1
        if info.mode not in _FAITHFUL_MODES and info.mode not in _WARN_MODES:
            report.errors.append(
                f"{line}: image {rel} has mode {info.mode} ({info.format}, e.g. a 16-bit PNG): the loader's RGB "
                "conversion clips it to 8 bits; re-save it as 8-bit RGB"
            )
        elif info.mode in _WARN_MODES:
            report.warnings.append(f"{line}: image {rel} is {_WARN_MODES[info.mode]}")
    if report.formats.get("JPEG") and report.layout == "vtab":  # FGVC's own images are JPEG
        report.warnings.append(f"{task_dir.name}: {report.formats['JPEG']} {JPEG_WARNING}")
    if len(missing) > MISSING_SHOWN:
        report.errors.append(_missing_summary(report, task_dir, missing, len(first_line)))


def _missing_summary(report: TaskReport, task_dir: Path, missing: list[tuple[str, str]], total: int) -> str:
    """One line for many missing images: how many, where they were looked for, and where one is.

    A wrong image folder (``--root``, FGVC's per-dataset image folder, a renamed ``images/``) makes
    every image missing; the first image is looked for under the task folder and its sub-folders,
    as given and without its first folder, so the line can say which folder to move.
    """

    def short(path: Path) -> str:
        return "/".join((task_dir.name, *path.relative_to(task_dir).parts))

    if report.layout == "fgvc":
        known = report.name in FGVC_IMAGE_DIRS
        why = f"VPT's image folder for {report.name}" if known else "the folder of the JSON paths"
        base = f"{short(task_dir / fgvc_image_dir(task_dir))} ({why})"
    else:
        base = f"{short(task_dir)} (the task folder)"
    rel, error = missing[0]
    line = (
        f"{task_dir.name}: {len(missing)} of {total} images do not exist ({MISSING_SHOWN} listed above); "
        f"the split files' paths are read relative to {base}, e.g. {task_dir / rel}"
        + (" (a broken symlink)" if "symlink" in error else "")
    )
    parts = Path(rel).parts
    folders = [task_dir, *sorted(p for p in task_dir.iterdir() if p.is_dir())]
    for cut in range(min(2, len(parts))):
        tail = Path(*parts[cut:])
        for folder in folders:
            if (folder / tail).is_file():
                move = f"move the contents of {short(folder)} into {short(task_dir / Path(*parts[:cut]))}"
                return f"{line}; {short(folder / tail)} exists instead: {move}"
    return line


def _check_duplicates(
    report: TaskReport,
    task_dir: Path,
    layout: Layout,
    splits: dict[str, list[SplitRecord]],
    infos: dict[str, ImageInfo],
) -> None:
    """Images of a training split whose bytes equal a test image: sizes first, hashes for candidates."""
    test_split = layout.protocol_splits["final"]["test"]
    train: dict[str, tuple[str, int]] = {}
    for split in layout.training:
        for record in splits.get(split, []):
            train.setdefault(record.path, (split, record.line))
    test = {record.path: record.line for record in splits.get(test_split, [])}

    def info(rel: str) -> ImageInfo:
        return infos[str(task_dir / rel)]

    by_size: dict[int, list[str]] = {}
    for rel in train:
        if info(rel).bytes is not None:
            by_size.setdefault(info(rel).bytes, []).append(rel)
    candidates = [(rel, by_size[info(rel).bytes]) for rel in test if info(rel).bytes in by_size]
    for rel in {path for pair in candidates for path in [pair[0], *pair[1]]}:
        if info(rel).sha256 is None:
            info(rel).sha256 = hashlib.sha256((task_dir / rel).read_bytes()).hexdigest()
    found = 0
    for rel, same_size in candidates:
        for other in same_size:
            if info(other).sha256 == info(rel).sha256:
                found += 1
                if found <= 20:
                    split, line = train[other]
                    report.errors.append(
                        f"{where(task_dir / test_split, test[rel])}: image {rel} has the same content as "
                        f"{where(task_dir / split, line)} {other} (a training image in the test split)"
                    )
    if found > 20:
        report.errors.append(
            f"{where(task_dir / test_split)}: {found - 20} more duplicates of training images"
        )


def _digest(
    task_dir: Path, splits: dict[str, list[SplitRecord]], infos: dict[str, ImageInfo]
) -> tuple[str, dict]:
    files = {}
    for records in splits.values():
        for record in records:
            info = infos.get(str(task_dir / record.path))
            if info is not None and record.path not in files:
                files[record.path] = {"bytes": info.bytes, "sha256": info.sha256, "format": info.format}
    content = {
        "splits": {
            split: [[record.path, record.label] for record in records] for split, records in splits.items()
        },
        "files": {path: [entry["bytes"], entry["sha256"]] for path, entry in sorted(files.items())},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(), files


def _task_list(root: Path, tasks: Sequence[str] | None, benchmark: str) -> list[tuple[str, VTABTask | None]]:
    if tasks:
        out = []
        for name in tasks:
            try:
                out.append((name, resolve_task(name, benchmark)))
            except ValueError:
                out.append((name, None))  # a custom folder in the same layout
        return out
    return [(task.name, task) for task in BENCHMARK_TASKS[benchmark]]


def verify(
    root: str | Path,
    tasks: Sequence[str] | None = None,
    benchmark: str = "vtab",
    layout: str | None = None,
    hashes: bool = True,
    duplicates: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> list[TaskReport]:
    """Check every task (all of the benchmark's by default) and return one report per task."""
    from tqdm.auto import tqdm

    root = Path(root)
    check_benchmark(benchmark)
    chosen = resolve_layout(layout, benchmark)
    reports: list[tuple[TaskReport, Path | None, dict[str, list[SplitRecord]]]] = []
    for name, task in _task_list(root, tasks, benchmark):
        own_layout = LAYOUTS["vtab"] if task is DEMO_TASK and layout is None else chosen
        task_dir = find_task_dir(root, name, task)
        report = TaskReport(task.name if task else name, task_dir, own_layout.name)
        if task_dir is None:
            report.errors.append(f"{root / name}: task folder missing (looked for {name} under {root})")
            reports.append((report, None, {}))
            continue
        reports.append((report, task_dir, _check_splits(report, task_dir, task, own_layout)))
    paths = sorted(
        {
            str(d / record.path)
            for _, d, splits in reports
            if d is not None
            for rs in splits.values()
            for record in rs
        }
    )
    workers = workers or os.cpu_count() or 1
    infos: dict[str, ImageInfo] = {}
    bar = tqdm(total=len(paths), desc="decoding images", unit="img", disable=not progress, mininterval=0.5)
    if workers > 1 and len(paths) > 256:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for info in pool.map(_inspect, [(p, hashes) for p in paths], chunksize=256):
                infos[info.path] = info
                bar.update()
    else:
        for path in paths:
            infos[path] = inspect_image(path, hashes)
            bar.update()
    bar.close()
    out = []
    for report, task_dir, splits in reports:
        if task_dir is not None:
            own_layout = LAYOUTS[report.layout]
            _check_images(report, task_dir, splits, infos)
            if duplicates:
                _check_duplicates(report, task_dir, own_layout, splits, infos)
            digest, files = _digest(task_dir, splits, infos)
            report.manifest.update(
                layout=report.layout,
                counts=report.counts,
                formats=dict(report.formats),
                digest=digest,
                files=files,
                errors=len(report.errors),  # a digest of a failed check claims nothing
            )
        out.append(report)
    return out


def format_table(reports: Sequence[TaskReport]) -> str:
    """One row per task: the split counts, the image format(s) and channels, the number of problems."""
    rows = [["task", "counts", "format", "channels", "size", "errors", "warnings"]]
    for report in reports:
        counts = (
            "/".join(str(report.counts.get(split, "-")) for split in LAYOUTS[report.layout].splits)
            if report.counts
            else "-"
        )
        formats = ",".join(sorted(report.formats)) or "-"
        channels = ",".join(str(c) for c in sorted(report.channels, key=str)) or "-"
        sizes = ",".join(f"{w}x{h}" for w, h in [s for s, _ in report.sizes.most_common(2)]) + (
            " ..." if len(report.sizes) > 2 else ""
        )
        rows.append(
            [
                report.name,
                counts,
                formats,
                channels,
                sizes or "-",
                str(len(report.errors)),
                str(len(report.warnings)),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
