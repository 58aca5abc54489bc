"""``fit --help`` in a fraction of a second: the help text, cached per installed version.

Building LightningCLI's parser needs torch, Lightning and timm imported, several seconds on a
laptop before one line of help shows. The help of ``pyra-lightning <subcommand> --help`` depends
only on the code and the installed packages, so the first call prints and stores it, and later
calls print the stored text without importing any of them. The key holds the subcommand and
flag, the size and modification time of every module of this package, and the versions of
Python, torch, Lightning, jsonargparse and timm: any change of code or of an installed package
builds the help anew. Only the bare ``<subcommand> --help`` / ``-h`` / ``--help_all`` is cached;
with any other argument (``--config`` changes the defaults shown) the help is built as usual.

Set ``PYRA_HELP_CACHE=0`` to switch the cache off. The folder is ``$XDG_CACHE_HOME/pyra-lightning``
(``~/.cache/pyra-lightning``); a cache that cannot be written is skipped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

HELP_FLAGS = ("-h", "--help", "--help_all")
PACKAGES = ("torch", "lightning", "jsonargparse", "timm")
CACHE_ENV = "PYRA_HELP_CACHE"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyra-lightning" / "help"


def help_key(argv: list[str]) -> str | None:
    """The cache key of a bare ``<subcommand> --help``; ``None`` for anything else."""
    if os.environ.get(CACHE_ENV, "1") in ("0", "false") or len(argv) != 2 or argv[1] not in HELP_FLAGS:
        return None
    digest = hashlib.sha256(" ".join(argv).encode())
    digest.update(sys.version.encode())
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(PACKAGE_DIR)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def cached_help(argv: list[str], build: Callable[[list[str]], None]) -> None:
    """Print the help of ``argv`` from the cache, or run ``build(argv)`` and cache what it printed.

    ``build`` is the command's own entry point; whatever ``argv`` is, it runs unless a stored help
    answers it, and its exit (``SystemExit(0)`` after the help) is kept.
    """
    key = help_key(argv)
    path = cache_dir() / f"{argv[0]}-{key}.txt" if key else None
    if path is not None and path.is_file():
        sys.stdout.write(path.read_text(encoding="utf-8"))
        raise SystemExit(0)
    if path is None:
        build(argv)
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            build(argv)
    except SystemExit as stop:
        sys.stdout.write(captured.getvalue())
        if stop.code in (None, 0) and captured.getvalue():
            with contextlib.suppress(OSError):
                from pyra_lightning.files import atomic_write_text

                atomic_write_text(path, captured.getvalue())
        raise
    sys.stdout.write(captured.getvalue())


def main(argv: list[str] | None = None) -> None:
    """``pyra-lightning fit|validate|test|predict``: the cached help, else ``training.cli.main``."""

    def build(args: list[str]) -> None:
        from pyra_lightning.training.cli import main as cli_main

        cli_main(args)

    cached_help(sys.argv[1:] if argv is None else list(argv), build)
