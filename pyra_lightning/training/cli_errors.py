"""One line for a config or flag the parser refuses, instead of ~140 lines of usage first.

jsonargparse answers a typo'd key, a value of the wrong type or a missing ``--config`` file by
printing the subcommand's whole usage (every Trainer, model and data flag), then the message on
its last line, often split over two. ``refusal`` turns the message into the line a user needs:
which key or value, where it was set (the ``--config`` files, when the key is not on the command
line), and the closest key the subcommand does accept, the way timm's model-name check does.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

# jsonargparse's wording of the key it refuses: "... option 'a.b'" (unknown) or 'Parser key "a.b": ...'
_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'")
_KEY_PATTERNS = (_UNKNOWN_OPTION, re.compile(r'Parser key "([^"]+)"'))


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given as ``--config FILE``, ``-c FILE`` or ``--config=FILE``, in order."""
    files = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            files.append(argv[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _on_command_line(key: str, argv: Sequence[str]) -> bool:
    flag = f"--{key}"
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


def _closest(key: str, known: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return match[0] if match else None


def refusal(message: str, argv: Sequence[str], known_keys: Iterable[str]) -> str:
    """The parser's ``message`` on one line, with where the key was set and the closest known key.

    Args:
        message: jsonargparse's error message (may span lines).
        argv: The subcommand's arguments, to tell a key from a ``--config`` file from a flag.
        known_keys: Every key the subcommand accepts (``trainer.max_epochs``, ``model.lora.rank``...).
    """
    known = list(known_keys)
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    notes = []
    unknown_flags = []
    if line.startswith("unrecognized arguments:"):
        unknown_flags = [arg[2:].split("=", 1)[0] for arg in line.split()[2:] if arg.startswith("--")]
    key = next((m.group(1) for pattern in _KEY_PATTERNS if (m := pattern.search(line))), None)
    files = config_files(argv)
    if key is not None and key != "config" and files and not _on_command_line(key, argv):
        notes.append(f"set in --config {', '.join(files)}")
    refused = unknown_flags or ([key] if key is not None and _UNKNOWN_OPTION.search(line) else [])
    for name in refused:
        closest = _closest(name, known)
        if closest is not None:
            notes.append(f"did you mean {closest}?")
    return line + (f" ({'; '.join(notes)})" if notes else "")
