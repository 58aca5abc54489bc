"""``fit --help``: our options first and fast; Lightning's ~60 Trainer flags behind ``--help_all``.

Also the parser class's ``error``: a refused key or value is one line (``cli_errors``).

LightningCLI builds the full parser of every subcommand (``fit``, ``validate``, ``test``,
``predict``) before it parses anything, the Trainer's signature and docstring included, and
prints the Trainer's group first. So ``--help`` took seconds and opened on ``--trainer.accelerator``.
``BriefHelp`` (a mixin for the LightningCLI subclass) changes only what help shows:

- ``--help`` builds the parser of the asked subcommand alone, without the Trainer's arguments,
  and prints our groups (config, model, data, the callbacks, ``auto_resume``...) with a closing
  note naming the Trainer flags and ``--help_all``;
- ``--help_all`` is ``--help`` with every argument, the Trainer's group moved to the end.

Help aside, a command changes only in how a refused key or value is printed. The hooks used are public:
``add_core_arguments_to_parser``, ``subcommands`` and ``parser_class``. One more is not: so that
a config refused while the model or data are built prints its one line alone, Lightning's
"Seed set to N" line (logged as ``LightningCLI`` seeds, before it builds anything) is held back
by a ``logging.Filter`` around LightningCLI's private ``_set_seed`` and logged after
``instantiate_classes``. Should ``_set_seed`` go, only that ordering is lost.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from pyra_lightning.training.cli_errors import refusal

HELP_ALL = "--help_all"
HELP_FLAGS = ("-h", "--help")
TRAINER_KEY = "trainer"
SEED_LOGGER = "lightning.fabric.utilities.seed"  # where ``seed_everything`` logs "Seed set to N"
HelpMode = Literal["brief", "all"] | None


def help_mode(argv: list[str]) -> HelpMode:
    """``"all"`` for ``--help_all``, ``"brief"`` for ``-h``/``--help``, ``None`` for a real command."""
    if HELP_ALL in argv:
        return "all"
    return "brief" if any(arg in HELP_FLAGS for arg in argv) else None


class BriefHelpParser(LightningArgumentParser):
    """Prints the Trainer's group last (``--help_all``), or a line about it where it was left out."""

    trainer_note: str | None = None  # set on the parsers built for a brief help
    argv: Sequence[str] = ()  # the command's arguments (``BriefHelp.init_parser``), for ``error``

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """The refusal on one line (``cli_errors.refusal``), without the subcommand's whole usage
        before it; jsonargparse's own behaviour where it raises instead of exiting."""
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        named = re.search(r"Subcommand '([^']+)'", message)
        if parser is self and named and self._subcommands_action is not None:
            parser = self._subcommands_action._name_parser_map.get(named.group(1), self)
        keys = [action.dest for action in parser._actions]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {refusal(message, self.argv, keys)}; {prog} --help lists the options\n"
        )
        self.exit(2)

    def format_help(self, formatter: Any = None) -> str:
        trainer = (self.groups or {}).get(TRAINER_KEY)
        if trainer is not None and trainer in self._action_groups:
            self._action_groups = [g for g in self._action_groups if g is not trainer] + [trainer]
        text = super().format_help() if formatter is None else super().format_help(formatter)
        return text + (f"\n{self.trainer_note}\n" if self.trainer_note else "")


class BriefHelp:
    """Mixin for a ``LightningCLI`` subclass (``class PyraCLI(BriefHelp, LightningCLI)``): see the module."""

    help_mode: HelpMode = None
    help_subcommand: str | None = None
    argv: Sequence[str] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raw = kwargs.get("args")
        argv = list(sys.argv[1:] if raw is None else raw) if not isinstance(raw, dict) else []
        self.argv = argv
        self.help_mode = help_mode(argv)
        if self.help_mode is not None:
            names = _all_subcommands()
            self.help_subcommand = next((arg for arg in argv if arg in names), None)
            if self.help_mode == "all":
                kwargs["args"] = ["--help" if arg == HELP_ALL else arg for arg in argv]
            if self._brief():  # the other subcommands' parser settings would reach the main parser
                given = kwargs.get("parser_kwargs") or {}
                kwargs["parser_kwargs"] = {
                    key: value
                    for key, value in given.items()
                    if key not in names or key == self.help_subcommand
                }
        kwargs.setdefault("parser_class", BriefHelpParser)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's, with the command's arguments kept for ``BriefHelpParser.error``."""
        parser = super().init_parser(**kwargs)  # type: ignore[misc]
        if isinstance(parser, BriefHelpParser):
            parser.argv = self.argv
        return parser

    def _set_seed(self) -> None:
        """LightningCLI's seeding, its log line held back (see the module)."""
        held = _HeldRecords()
        seed_log = logging.getLogger(SEED_LOGGER)
        seed_log.addFilter(held)
        try:
            super()._set_seed()  # type: ignore[misc]
        finally:
            seed_log.removeFilter(held)
        self._held_seed_records = held.records

    def instantiate_classes(self) -> None:
        """LightningCLI's; then the seed's log line, now that nothing was refused."""
        super().instantiate_classes()  # type: ignore[misc]
        seed_log = logging.getLogger(SEED_LOGGER)
        for record in getattr(self, "_held_seed_records", ()):
            seed_log.handle(record)
        self._held_seed_records = []

    def _brief(self) -> bool:
        return self.help_mode == "brief" and self.help_subcommand is not None

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """All of LightningCLI's subcommands; for a brief help only the one asked about."""
        every = _all_subcommands()
        return {self.help_subcommand: every[self.help_subcommand]} if self._brief() else every  # type: ignore[index]

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's, without the Trainer's arguments for a brief help (the slow, long part)."""
        if not self._brief():
            super().add_core_arguments_to_parser(parser)  # type: ignore[misc]
            return
        cli: Any = self
        parser.add_lightning_class_args(cli._model_class, "model", subclass_mode=cli.subclass_mode_model)
        parser.add_lightning_class_args(
            cli._datamodule_class,
            "data",
            subclass_mode=cli.subclass_mode_data,
            required=cli.datamodule_class is not None,
        )
        if isinstance(parser, BriefHelpParser):
            kwargs: Any = getattr(self, "parser_kwargs", None) or {}
            prog = f"{kwargs.get('prog', 'lightning')} {self.help_subcommand}"
            parser.trainer_note = (
                "Lightning's Trainer flags (--trainer.max_epochs, --trainer.precision, --trainer.devices,\n"
                f"--trainer.default_root_dir, ... about 60) are listed by `{prog} {HELP_ALL}`."
            )


class _HeldRecords(logging.Filter):
    """Keeps the records it is shown instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _all_subcommands() -> dict[str, set[str]]:
    """LightningCLI's own table of subcommands and the arguments each skips."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI.subcommands()
