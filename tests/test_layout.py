"""The architecture as STYLE.md draws it: commands -> training -> method, no cycles, small files.

Checked statically from the import statements (module level and inside functions alike: a lazy
import still is a dependency), and dynamically for what a fresh interpreter actually loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyra_lightning"
MAX_LINES = 500  # the style guide's limit for a module
# The layers, from the bottom up; a module may import its own layer and those below it.
LAYERS = ("method", "data", "training", "commands", "entry")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Top-level modules that sit above the method: the results record canonicalises task names through
# the task registry (data/tasks.py, which imports no Lightning either).
DATA_LAYER = {"pyra_lightning.results"}


def layer(module: str) -> str:
    if module in ("pyra_lightning", "pyra_lightning.__main__"):
        return "entry"
    if module in DATA_LAYER:
        return "data"
    folder = module.split(".")[1]
    return folder if folder in ("data", "training", "commands") else "method"


def internal_imports(path: Path) -> set[str]:
    """The ``pyra_lightning`` modules that ``path`` imports (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyra_lightning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pyra_lightning"))
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


# The package's lazy public API and the command table may name any module: not checked.
@pytest.mark.parametrize("name", sorted(name for name in MODULES if layer(name) != "entry"))
def test_imports_point_down_the_layers(name: str) -> None:
    mine = LAYERS.index(layer(name))
    for target in internal_imports(MODULES[name]):
        assert LAYERS.index(layer(target)) <= mine, (
            f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        )


def test_no_import_cycles() -> None:
    graph = {
        name: {t for t in internal_imports(path) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [node, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# The limit holds for every Python file of the project, not only the package's.
PYTHON_FILES = sorted(
    path.relative_to(PACKAGE.parent)
    for folder in ("pyra_lightning", "scripts", "tools", "tests")
    for path in (PACKAGE.parent / folder).rglob("*.py")
)


@pytest.mark.parametrize("path", PYTHON_FILES, ids=str)
def test_no_file_over_the_limit(path: Path) -> None:
    lines = (PACKAGE.parent / path).read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{path} has {lines} lines (limit {MAX_LINES}): split it"


def test_method_modules_import_no_lightning() -> None:
    method = [name for name in MODULES if layer(name) == "method" and name != "pyra_lightning"]
    code = (
        "import importlib, json, sys\n"
        f"pulled = {{}}\nfor name in {method!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "    if heavy: pulled[name] = heavy[:3]; break\n"
        "print(json.dumps(pulled))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {}, f"a method module imports Lightning: {out}"


def _modules_loaded_by(argv: list[str]) -> tuple[str, set[str]]:
    code = (
        "import sys, json\nfrom pyra_lightning.__main__ import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('\\nMODULES=' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    text, _, modules = out.rpartition("MODULES=")
    return text, set(json.loads(modules))


def test_top_level_help_lists_every_command_and_imports_nothing_heavy() -> None:
    from pyra_lightning.__main__ import COMMANDS

    text, modules = _modules_loaded_by(["--help"])
    assert all(name in text for name in COMMANDS)
    assert not modules & {"torch", "lightning", "timm", "torchvision"}
