"""Writing files so that a crash never leaves a half-written one, and teammates can still read them.

``atomic_write`` fills a temporary file next to the target, fsyncs it and renames it into place:
a reader (or a rerun after ``kill -9``) sees the old file or the new one, never a partial one.
``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask; the file is given the mode
a plain ``open()`` would have given it (0666 less the umask) before it is renamed, so results on a
shared cluster filesystem stay readable by the group.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask (read by setting it and putting it back, the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def plain_dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes ``open()``/``os.mkdir`` would have given them.

    Libraries that write through private temporary files leave them 0600: safetensors'
    ``save_file`` does, whatever the umask. A folder of such files (an export) is made readable
    like every other file of the project (0666/0777 less the umask; executables stay executable).
    """
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, plain_dir_mode() if executable else plain_file_mode())


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill a sibling temporary file, fsync it, then rename it over ``target``.

    A reader sees the old file or the new one, never a partial one; temporary files that a killed
    process left behind are removed (nothing ever reads them).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), plain_file_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` for a text file (``results.json``, ``sweep.json``)."""
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))
