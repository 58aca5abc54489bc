"""The ``pyra-lightning`` command table (also ``python -m pyra_lightning``).

Each command's module is imported only when that command runs, so ``pyra-lightning --help`` and
the tools' ``--help`` answer without importing Lightning, timm or torchvision.

Bad input that the project detects (a ``ValueError`` or a missing file, whose message names the
file, key or value) is printed as one line and the command exits with status 2; ``--traceback``
anywhere on the command line, or ``PYRA_TRACEBACK=1``, shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

PROG = "pyra-lightning"
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "PYRA_TRACEBACK"


class Command(NamedTuple):
    entry: str  # "module:function"; the function takes the argument list after the command name
    summary: str
    lightning: bool = False  # a LightningCLI subcommand: its name is passed on with the arguments


COMMANDS: dict[str, Command] = {
    "fit": Command(
        "pyra_lightning.training.help_cache:main",
        "train LoRA + PYRA, test the LoRA-folded model, write results.json",
        True,
    ),
    "validate": Command(
        "pyra_lightning.training.help_cache:main", "evaluate a run's checkpoint on the val split", True
    ),
    "test": Command(
        "pyra_lightning.training.help_cache:main", "evaluate a run's checkpoint on the test split", True
    ),
    "predict": Command(
        "pyra_lightning.training.help_cache:main", "write predictions.csv for the test split of a run", True
    ),
    "sweep": Command("pyra_lightning.commands.sweep:main", "run fit on many VTAB-1k tasks, one folder each"),
    "report": Command(
        "pyra_lightning.commands.report:main", "tabulate results.json files as the paper's Table 2"
    ),
    "export": Command("pyra_lightning.commands.export:main", "write a deployable model from a checkpoint"),
    "benchmark": Command("pyra_lightning.commands.benchmark:main", "measure throughput, FLOPs and speedups"),
    "data": Command(
        "pyra_lightning.commands.data:main", "verify a VTAB-1k/FGVC install, or prepare VTAB-1k as PNG"
    ),
}

# Exceptions whose message is the whole story: bad input the project checks and explains.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [--help] [arguments]",
        "",
        "Training-inference efficient task adaptation of ViTs: LoRA + token merging + PYRA.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        f"`{PROG} <command> --help` lists a command's arguments. {TRACEBACK_FLAG} (or {TRACEBACK_ENV}=1)",
        "shows the traceback of an error instead of its one-line message.",
    ]
    return "\n".join(lines)


def load(command: Command) -> Callable[[list[str]], None]:
    module_name, function = command.entry.split(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pyra-lightning`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    show_traceback = TRACEBACK_FLAG in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    args = [arg for arg in args if arg != TRACEBACK_FLAG]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"{PROG}: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    try:
        load(command)([name, *rest] if command.lightning else rest)
    except USER_ERRORS as error:
        if show_traceback:
            raise
        print(f"{PROG} {name}: error: {error} ({TRACEBACK_FLAG} shows where it was raised)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
