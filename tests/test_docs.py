"""Every Python block in docs/*.md runs as written (tests/test_readme.py does the README's testbed example).

Marker convention: a block that needs a real checkpoint (hub weights, GPUs, a benchmark file) is preceded,
on the line right above its opening fence, by

    <!-- docs-test: needs a real checkpoint -->

Such a block is not run, but it is still compiled, every ``crosstrim`` name it imports must exist, every
attribute it reads from a crosstrim module must exist, and every call of a crosstrim function must bind to
that function's signature (argument count and keyword names). Every other block runs in a fresh namespace,
in a temporary working directory, on the testbed.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARK = "<!-- docs-test: needs a real checkpoint -->"
FENCE = re.compile(r"^(?P<before>[^\n]*)\n```python\n(?P<code>.*?)^```", re.M | re.S)


def python_blocks() -> list[tuple[str, str, bool]]:
    """(``file:line`` of the fence, code, marked as needing a real checkpoint) for every ```python block."""
    found = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            found.append((f"{path.name}:{line}", match["code"], match["before"].strip() == MARK))
    return found


BLOCKS = python_blocks()


def test_docs_have_python_blocks_and_markers_only_where_stated():
    names = {name.split(":")[0] for name, _, _ in BLOCKS}
    assert {"calibration.md", "testbed.md", "evaluation.md"} <= names
    # A marker anywhere else (misspelt, or not right above a fence) would silently run nothing: refuse it.
    for path in DOCS.glob("*.md"):
        text = path.read_text()
        for match in re.finditer(r"<!--\s*docs-test", text):
            assert text.startswith(MARK + "\n```python\n", match.start()), f"{path.name}: misplaced docs-test marker"


@pytest.mark.parametrize(("where", "code", "marked"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_docs_python_block(where, code, marked, tmp_path, monkeypatch):
    tree = ast.parse(code, filename=where)
    problems = crosstrim_references(tree)
    assert not problems, f"{where}: " + "; ".join(problems)
    if marked:
        return
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(tree, where, "exec"), {"__name__": "__docs__"})


def crosstrim_references(tree: ast.Module) -> list[str]:
    """What the block takes from crosstrim that does not exist: imports, module attributes, call signatures."""
    bound: dict[str, object] = {}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "crosstrim":
                    try:
                        module = importlib.import_module(alias.name)
                    except ImportError as err:
                        problems.append(f"import {alias.name}: {err}")
                        continue
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module("crosstrim")
                    )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "crosstrim":
            try:
                module = importlib.import_module(node.module)
            except ImportError as err:
                problems.append(f"from {node.module}: {err}")
                continue
            for alias in node.names:
                try:
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
                except AttributeError:
                    try:
                        bound[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        problems.append(f"from {node.module} import {alias.name}: no such name")

    def resolve(expr: ast.expr) -> object | None:
        """The crosstrim object a ``name.attr.attr`` chain names (``None`` if it does not start at one)."""
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            owner = resolve(expr.value)
            if owner is None or not inspect.ismodule(owner):
                return None
            try:
                return getattr(owner, expr.attr)
            except AttributeError:
                try:
                    return importlib.import_module(f"{owner.__name__}.{expr.attr}")
                except ImportError:
                    problems.append(f"{ast.unparse(expr)}: {owner.__name__} has no {expr.attr!r}")
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node)
        if isinstance(node, ast.Call) and callable(target := resolve(node.func)):
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            try:
                signature.bind(*node.args, **{k.arg: None for k in node.keywords})
            except TypeError as err:
                problems.append(f"{ast.unparse(node.func)}(...): {err}")
    return list(dict.fromkeys(problems))  # a chain is met once as an attribute and once as a call


def test_reference_check_catches_what_the_docs_once_got_wrong():
    wrong = "from crosstrim.evaluation import calibration\ncalibration.plan([0.5], [], ['trimmed'])\n"
    assert crosstrim_references(ast.parse(wrong)) == [
        "calibration.plan: crosstrim.evaluation.calibration has no 'plan'"
    ]
    keyword = "from crosstrim.evaluation.inference import predict\npredict(1, 2, 3, None, batch=8)\n"
    assert "got an unexpected keyword argument 'batch'" in crosstrim_references(ast.parse(keyword))[0]
    assert crosstrim_references(ast.parse("from crosstrim import nothing_here\n")) == [
        "from crosstrim import nothing_here: no such name"
    ]
