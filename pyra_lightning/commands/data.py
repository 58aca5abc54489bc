"""``pyra-lightning data``: ``verify`` a benchmark install, ``prepare`` VTAB-1k losslessly.

``data verify --root data/vtab-1k [--task T ...]`` prints one row per task and every problem as
``file:line: what``, writes ``<root>/manifest.json`` and exits with status 1 when it found errors
(warnings alone, such as JPEG images, exit 0). ``--against other/manifest.json`` compares the two
installs file by file and exits 1 when they differ.

``data prepare vtab --out data/vtab-1k`` builds the 19 tasks from tensorflow-datasets (the
``[prepare]`` extra) with task_adaptation's splits and label mappings, as PNG, then verifies them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

TASK_HELP = "tasks to work on (names, aliases or custom folders); all of the benchmark's by default"
USAGE = "usage: pyra-lightning data {verify,prepare} [--help] [arguments]"


def run_verify(
    root: str = "data/vtab-1k",
    task: Sequence[str] | None = None,
    benchmark: str = "vtab",
    layout: str | None = None,
    hashes: bool = True,
    duplicates: bool = True,
    workers: int | None = None,
    manifest: str | None = None,
    against: str | None = None,
    progress: bool = True,
) -> int:
    """Verify a benchmark install; return the exit status (0 clean, 1 errors or differences).

    Args:
        root: folder holding one sub-folder per task.
        task: tasks to check (names or aliases, or custom folders in the same layout); all of the
            benchmark's tasks by default.
        benchmark: ``vtab`` (VTAB-1k's 19 tasks) or ``fgvc`` (FGVC-5 in VPT's layout).
        layout: ``vtab``, ``fgvc`` or ``imagefolder``; the benchmark's own by default.
        hashes: record a sha256 per file in the manifest (each file is read once anyway; off saves
            the hashing itself). Duplicates are found either way.
        duplicates: look for training images repeated, by content, in the test split.
        workers: decoding processes; one per core by default.
        manifest: where to write the manifest (``<root>/manifest.json`` by default; ``""``: nowhere).
        against: another install's manifest.json to compare with, file by file.
        progress: show a progress bar.
    """
    from pyra_lightning.data.manifest import (
        MANIFEST_FILENAME,
        MANIFEST_VERSION,
        compare_manifests,
        read_manifest,
        write_manifest,
    )
    from pyra_lightning.data.verify import format_table, verify

    if not Path(root).is_dir():  # refused before a manifest (and its folder) is written there
        raise NotADirectoryError(
            f"--root {root} (absolute: {Path(root).resolve()}) is not a folder; expected the folder "
            "holding one sub-folder per task"
        )
    reports = verify(root, task, benchmark, layout, hashes, duplicates, workers, progress)
    print(format_table(reports))
    for report in reports:
        for line in report.errors:
            print(f"error: {line}")
        for line in report.warnings:
            print(f"warning: {line}")
    errors = sum(len(r.errors) for r in reports)
    status = 1 if errors else 0
    target = Path(root) / MANIFEST_FILENAME if manifest is None else (Path(manifest) if manifest else None)
    if target is not None:
        try:
            write_manifest(reports, target, root, benchmark)
            print(f"manifest: {target}")
        except OSError as exc:
            print(f"warning: cannot write {target} ({exc}); pass --manifest elsewhere")
    if against:
        mine = {"version": MANIFEST_VERSION, "tasks": {r.name: r.manifest for r in reports if r.folder}}
        differences = compare_manifests(mine, read_manifest(against), str(root), against)
        for line in differences[:200]:
            print(f"differs: {line}")
        if len(differences) > 200:
            print(f"differs: ... {len(differences) - 200} more")
        print(f"{len(differences)} difference(s) against {against}")
        status = status or (1 if differences else 0)
    print(f"{errors} error(s), {sum(len(r.warnings) for r in reports)} warning(s) in {len(reports)} task(s)")
    return status


def run_prepare(
    benchmark: str = "vtab",
    out: str = "data/vtab-1k",
    task: Sequence[str] | None = None,
    tfds_dir: str | None = None,
    verify: bool = True,
    progress: bool = True,
) -> int:
    """Build VTAB-1k from tensorflow-datasets as PNG in the DataModule's layout, then verify it.

    Args:
        benchmark: only ``vtab`` can be prepared (FGVC-5 comes from VPT's released splits).
        out: the VTAB-1k root to write (one folder per task).
        task: tasks to build; all 19 by default. Finished tasks are skipped.
        tfds_dir: tensorflow-datasets' data_dir (its default, ~/tensorflow_datasets, otherwise).
        verify: run ``data verify`` on the result.
        progress: show progress bars on stderr (one per task and split while writing, then
            verify's), also when stderr is no terminal; ``--progress=false`` for quiet logs.
    """
    from pyra_lightning.data.prepare import prepare_vtab

    if benchmark != "vtab":
        raise ValueError(
            f"data prepare builds 'vtab' only, got {benchmark!r}; FGVC-5 uses VPT's released splits"
        )
    prepare_vtab(out, task, tfds_dir, progress=progress)
    return run_verify(out, task, "vtab", progress=progress) if verify else 0


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning data verify|prepare``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print("  verify   check split files, labels, images, formats and duplicates; write manifest.json")
        print(
            "  prepare  build VTAB-1k losslessly from tensorflow-datasets (pip install 'pyra-lightning[prepare]')"
        )
        return
    from jsonargparse import ArgumentParser

    name, rest = args[0], args[1:]
    if name == "verify":
        parser = ArgumentParser(
            prog="pyra-lightning data verify", description=run_verify.__doc__, allow_abbrev=False
        )
        parser.add_argument("--task", type=str, nargs="+", default=None, help=TASK_HELP)
        parser.add_function_arguments(run_verify, skip={"task"}, as_group=False)
        sys.exit(run_verify(**vars(parser.parse_args(rest))))
    if name == "prepare":
        parser = ArgumentParser(
            prog="pyra-lightning data prepare", description=run_prepare.__doc__, allow_abbrev=False
        )
        parser.add_argument("benchmark", type=str, help="vtab")
        parser.add_argument("--task", type=str, nargs="+", default=None, help=TASK_HELP)
        parser.add_function_arguments(run_prepare, skip={"benchmark", "task"}, as_group=False)
        sys.exit(run_prepare(**vars(parser.parse_args(rest))))
    raise ValueError(f"unknown data command {name!r}; expected 'verify' or 'prepare'")


if __name__ == "__main__":
    main()
