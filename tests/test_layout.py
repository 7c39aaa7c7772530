"""The package layout the README describes: the folders are the architecture, imports run downward,
no module reads another's private names, and ``tools/`` holds only subcommands."""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import crosstrim
from crosstrim import cli, tools

SRC = Path(crosstrim.__file__).resolve().parent
# Layer -> the only crosstrim packages/modules it may import: the core imports nothing else, the model adapters
# at most the core, the engine the core and the adapters. ``tiny.py`` builds configs for tests and the testbed.
ALLOWED = {
    "core": {"core"},
    "adapters": {"core", "adapters"},
    "engine": {"core", "adapters", "engine"},
    "tiny.py": set(),
}
# Layer -> the crosstrim layers above it, which it must never import.
FORBIDDEN = {
    "evaluation": ("testbed", "integrations", "tools", "cli"),
    "testbed": ("integrations", "tools", "cli"),
    "integrations": ("testbed", "tools", "cli"),
    "bench": ("evaluation", "testbed", "integrations", "tools", "cli"),
}
# What the library below the tools may import besides the standard library and crosstrim.
THIRD_PARTY = {"core": {"torch"}, "adapters": {"torch", "transformers"}, "engine": {"torch", "transformers"}}


def files_of(layer: str) -> list[Path]:
    files = [SRC / layer] if layer.endswith(".py") else sorted((SRC / layer).rglob("*.py"))
    assert files and all(f.is_file() for f in files)
    return files


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, lazy imports too (``from a import b`` counts ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def crosstrim_imports(path: Path) -> set[str]:
    """The first component after ``crosstrim.`` of every crosstrim module ``path`` imports (lazy ones too)."""
    return {name.split(".")[1] for name in imported_modules(path) if name.startswith("crosstrim.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_downward(layer):
    upward = {
        f"{f.relative_to(SRC)} imports crosstrim.{target}"
        for f in files_of(layer)
        for target in crosstrim_imports(f) & set(FORBIDDEN[layer])
    }
    assert not upward


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_core_adapters_and_engine_import_only_what_is_below_them(layer):
    stray = {
        f"{f.relative_to(SRC)} imports crosstrim.{target}"
        for f in files_of(layer)
        for target in crosstrim_imports(f) - ALLOWED[layer]
    }
    assert not stray


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY))
def test_the_library_imports_torch_and_transformers_only(layer):
    """The core never imports transformers (the vLLM model reuses it); no plotting, progress bars or
    evaluation libraries below the tools."""
    stray = {
        f"{f.relative_to(SRC)} imports {name}"
        for f in files_of(layer)
        for name in {module.split(".")[0] for module in imported_modules(f)}
        if name not in sys.stdlib_module_names and name not in THIRD_PARTY[layer] | {"crosstrim", "__future__"}
    }
    assert not stray


def private_uses(path: Path) -> set[str]:
    """``from crosstrim.x import _name`` and ``module._name`` on an imported crosstrim module, in ``path``."""
    tree = ast.parse(path.read_text())
    found, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crosstrim"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.add(f"{node.module}.{alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name.split(".")[0] for alias in node.names if "crosstrim" in alias.name}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.add(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    used = {f"{f.relative_to(SRC)}: {name}" for f in sorted(SRC.rglob("*.py")) for name in private_uses(f)}
    assert not used


def test_the_private_name_check_finds_both_forms(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from crosstrim.engine.handle import _Step\nfrom crosstrim import core\ncore._keep_top\n")
    assert private_uses(sample) == {"crosstrim.engine.handle._Step", "core._keep_top"}


def test_the_folders_name_the_architecture():
    """What a newcomer reads from the tree: the core, the engine, the model adapters (Mllama's in one module),
    and the layers above, each with its import rule declared here."""
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {"core", "engine", "adapters", "cli", "tools"} <= packages
    undeclared = packages - set(ALLOWED) - set(FORBIDDEN) - {"cli", "tools"}
    assert not undeclared, f"declare the import rule of {sorted(undeclared)} in ALLOWED or FORBIDDEN"
    mllama = {f.relative_to(SRC).as_posix() for f in SRC.rglob("*.py") if "mllama" in f.name.lower()}
    assert mllama == {"adapters/mllama.py"}


def test_tools_holds_one_subcommand_module_each_and_the_cli_lists_them_all():
    modules = {info.name for info in pkgutil.iter_modules(tools.__path__)}
    assert modules == set(cli.TOOLS)
    for name in modules:
        assert callable(importlib.import_module(f"crosstrim.tools.{name}").register)


def test_importing_the_library_changes_no_global_state():
    """Importing crosstrim and every tool leaves transformers' progress bars and matplotlib's backend alone."""
    import subprocess

    code = (
        "import matplotlib, transformers.utils.logging as l; backend = matplotlib.get_backend(); "
        "import crosstrim, crosstrim.cli, importlib; "
        "[importlib.import_module('crosstrim.tools.' + t) for t in crosstrim.cli.TOOLS]; "
        "assert l.is_progress_bar_enabled(); assert matplotlib.get_backend() == backend, matplotlib.get_backend()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
