"""The package layout the README describes: imports run downward, and ``tools/`` holds only subcommands."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import crosstrim
from crosstrim import cli, tools

SRC = Path(crosstrim.__file__).resolve().parent
CORE = ("config", "method", "mllama", "mllama_checks", "stats", "generation", "memory", "tiny")
# Layer -> the crosstrim layers above it, which it must never import.
FORBIDDEN = {
    **{f"{name}.py": ("evaluation", "testbed", "integrations", "tools", "cli") for name in CORE},
    "evaluation": ("testbed", "integrations", "tools", "cli"),
    "testbed": ("integrations", "tools", "cli"),
    "integrations": ("testbed", "tools", "cli"),
    "bench": ("evaluation", "testbed", "integrations", "tools", "cli"),
}


def crosstrim_imports(path: Path) -> set[str]:
    """The first component after ``crosstrim.`` of every crosstrim module ``path`` imports (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("crosstrim.")}
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_downward(layer):
    files = [SRC / layer] if layer.endswith(".py") else sorted((SRC / layer).rglob("*.py"))
    assert files and all(f.is_file() for f in files)
    upward = {
        f"{f.relative_to(SRC)} imports crosstrim.{target}"
        for f in files
        for target in crosstrim_imports(f) & set(FORBIDDEN[layer])
    }
    assert not upward


def test_tools_holds_one_subcommand_module_each_and_the_cli_lists_them_all():
    modules = {info.name for info in pkgutil.iter_modules(tools.__path__)}
    assert modules == set(cli.TOOLS)
    for name in modules:
        assert callable(importlib.import_module(f"crosstrim.tools.{name}").register)
