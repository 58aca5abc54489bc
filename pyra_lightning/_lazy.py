"""Lazy public names for a package's ``__init__`` (PEP 562), so importing it stays cheap.

``pyra_lightning`` and ``pyra_lightning.data`` both name their public objects without importing
the modules that define them (torch, timm, Lightning), so ``pyra-lightning --help`` and the
results/report path start fast; the module is imported on the first access of one of its names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to its module.

    A name is imported once and then cached in ``namespace`` (the package's ``globals()``).
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
