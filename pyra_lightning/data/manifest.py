"""``manifest.json``: what ``data verify`` found, written, read, compared and claimed by a run.

Per task the manifest holds the split counts, class histograms, per-file size and sha256 and a
digest (``verify._digest``). ``--against`` compares two installs file by file
(``compare_manifests``) and ``results.json`` names the digest of the data a run read
(``data_identity``), so that the report never averages runs on different data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyra_lightning.data.layouts import SplitRecord
from pyra_lightning.files import atomic_write_text

if TYPE_CHECKING:
    from pyra_lightning.data.verify import TaskReport

MANIFEST_FILENAME = "manifest.json"
MANIFEST_VERSION = 1


def write_manifest(reports: Sequence[TaskReport], path: str | Path, root: str | Path, benchmark: str) -> Path:
    """Write ``manifest.json`` atomically: per task its counts, histograms, digest and files."""
    document = {
        "version": MANIFEST_VERSION,
        "root": str(root),
        "benchmark": benchmark,
        "tasks": {report.name: report.manifest for report in reports if report.folder is not None},
    }
    atomic_write_text(Path(path), json.dumps(document, indent=1, sort_keys=True) + "\n")
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest, refusing anything that is not one (the message names the file)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such manifest (write one with 'pyra-lightning data verify')"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), dict):
        raise ValueError(f"{path}: not a pyra-lightning data manifest (no 'tasks' object)")
    return document


def compare_manifests(mine: dict[str, Any], other: dict[str, Any], name_a: str, name_b: str) -> list[str]:
    """One line per difference between two installs: tasks, counts, files (missing, size, sha256)."""
    lines: list[str] = []
    for task in sorted(set(mine["tasks"]) | set(other["tasks"])):
        a, b = mine["tasks"].get(task), other["tasks"].get(task)
        if a is None or b is None:
            lines.append(f"{task}: only in {name_a if b is None else name_b}")
            continue
        if a.get("digest") == b.get("digest"):
            continue
        for split in sorted(set(a.get("counts", {})) | set(b.get("counts", {}))):
            ca, cb = a.get("counts", {}).get(split), b.get("counts", {}).get(split)
            if ca != cb:
                lines.append(f"{task}/{split}: {ca} images in {name_a} vs {cb} in {name_b}")
            elif a.get("histograms", {}).get(split) != b.get("histograms", {}).get(split):
                lines.append(f"{task}/{split}: same count, different class histogram")
        fa, fb = a.get("files", {}), b.get("files", {})
        for rel in sorted(set(fa) | set(fb)):
            if rel not in fa or rel not in fb:
                lines.append(f"{task}/{rel}: only in {name_a if rel in fa else name_b}")
            elif fa[rel].get("bytes") != fb[rel].get("bytes"):
                lines.append(
                    f"{task}/{rel}: {fa[rel].get('bytes')} bytes in {name_a} vs {fb[rel].get('bytes')} in {name_b}"
                )
            elif fa[rel].get("sha256") and fb[rel].get("sha256") and fa[rel]["sha256"] != fb[rel]["sha256"]:
                lines.append(f"{task}/{rel}: same size, different content (sha256)")
        if not any(line.startswith(f"{task}/") or line.startswith(f"{task}:") for line in lines):
            lines.append(f"{task}: same files, different split lists or labels")
    return lines


def data_identity(
    root: str | Path,
    task: str,
    task_dir: Path | None = None,
    read: dict[str, list[SplitRecord]] | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """What ``results.json`` records about the data: the task's manifest digest and image formats.

    The identity is ``None`` when ``<root>/manifest.json`` is absent or does not cover the task (a
    run on unverified data is still a run, it just cannot claim its data), and also, with the
    reason as the second value, when the manifest's check found errors or no longer describes
    the data the run read (``read``: the split files' records, by file name, under ``task_dir``):
    another image count, or an image absent from it or of another size. Sizes, not hashes: it
    costs a ``stat`` per image, not a read.
    """
    path = Path(root) / MANIFEST_FILENAME
    try:
        entry = read_manifest(path)["tasks"].get(task)
    except (OSError, ValueError):
        return None, None
    if not isinstance(entry, dict) or "digest" not in entry:
        return None, None
    rerun = "rerun 'pyra-lightning data verify'"
    if "errors" not in entry:  # written before manifests recorded the check's outcome
        return None, f"{path}: it does not record whether {task} passed its check; {rerun}"
    if entry["errors"] != 0:
        return None, f"{path}: its check of {task} found {entry['errors']} error(s); fix them and {rerun}"
    files, counts = entry.get("files") or {}, entry.get("counts") or {}
    for split, records in (read or {}).items():
        if counts.get(split) != len(records):
            return None, f"{path}: {task}/{split} has {len(records)} images, the manifest {counts.get(split)}"
        for record in records:
            known = files.get(record.path)
            try:
                size = (task_dir / record.path).stat().st_size if task_dir is not None else None
            except OSError:  # gone since the run read it: not what the manifest describes either
                size = -1
            if known is None or (size is not None and known.get("bytes") != size):
                return None, f"{path}: {task}/{record.path} is not the file the manifest describes"
    formats = sorted(entry.get("formats") or {})
    return {"manifest": str(path), "digest": entry["digest"], "formats": formats}, None
