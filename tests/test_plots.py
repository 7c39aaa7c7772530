"""The pictures: one style without global matplotlib side effects, overlays that keep the image's colours,
viz's later-layer panels, demo's plain-vs-summary comparison, and a calibration plot readable at one point."""

import ast
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from support import run_cli

import crosstrim
from crosstrim.evaluation.calibration import Calibration, SettingResult
from crosstrim.plots import attention, style

SRC = Path(crosstrim.__file__).resolve().parent


@pytest.fixture
def figures(monkeypatch):
    """Every figure the code under test draws through :func:`crosstrim.plots.style.figure`, kept for inspection."""
    drawn = []
    original = style.figure

    @contextmanager
    def keep(path, **kwargs):
        with original(path, **kwargs) as fig:
            yield fig
        drawn.append(fig)

    monkeypatch.setattr(style, "figure", keep)
    return drawn


def texts(fig) -> list[str]:
    """Every title, legend entry and free text of ``fig``."""
    found = [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        found += [ax.get_title(), *(t.get_text() for t in ax.texts)]
        if ax.get_legend():
            found += [t.get_text() for t in ax.get_legend().get_texts()]
    return [t for t in found if t]


def test_library_code_chooses_no_backend_and_leaves_rcparams_alone(tmp_path):
    # In a fresh process that chose the pdf backend: import every crosstrim module, draw with every style helper.
    script = f"""
import importlib, pkgutil, matplotlib, crosstrim
for info in pkgutil.walk_packages(crosstrim.__path__, "crosstrim."):
    if not info.name.startswith("crosstrim.integrations") and not info.name.endswith("__main__"):
        importlib.import_module(info.name)
before = dict(matplotlib.rcParams)
from crosstrim.plots import style
with style.figure({str(tmp_path / "x.png")!r}, figsize=(2, 2)) as fig:
    fig.subplots().plot([0, 1], **style.family_styles(["a +summary"])["a +summary"])
from crosstrim.tools import calibrate
from crosstrim.evaluation.calibration import Calibration
calibrate.plot(Calibration(0.9, [], None, []), __import__("pathlib").Path({str(tmp_path / "c.png")!r}), "t")
import sys
assert matplotlib.get_backend().lower() == "pdf", matplotlib.get_backend()
assert dict(matplotlib.rcParams) == before
assert "matplotlib.pyplot" not in sys.modules
"""
    env = {**os.environ, "MPLBACKEND": "pdf"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.png").stat().st_size > 0 and (tmp_path / "c.png").stat().st_size > 0


def test_no_module_selects_a_backend_or_uses_pyplot_and_no_tool_imports_another():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use":
                assert ast.unparse(node.func.value) != "matplotlib", f"{path.name}: matplotlib.use"
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert "matplotlib.pyplot" not in names, f"{path.name} imports pyplot (a global figure registry)"
            if path.parent.name == "tools":
                assert not [n for n in names if n.startswith("crosstrim.tools")], f"{path.name} imports a tool: {names}"


def test_family_styles_tell_plain_from_summary_by_marker_and_line():
    styles = style.family_styles(["trimmed (k_ratio)", "trimmed (k_ratio) +summary", "mean (keep_ratio)"])
    plain, summary, mean = styles.values()
    assert plain["color"] == summary["color"] != mean["color"]
    assert plain["marker"] == summary["marker"] != mean["marker"]
    assert plain["markerfacecolor"] != summary["markerfacecolor"] and plain["linestyle"] != summary["linestyle"]


def _result(label, family, kept, low, meets):
    return SettingResult(label, family, {}, 100, 0, low + 0.02, low, low + 0.03, 0.1, 0.1, kept, 0.0, 1000, 500, meets)


@pytest.mark.parametrize("qualified", [True, False])
def test_calibration_plot_with_one_point_per_family(tmp_path, figures, qualified):
    from crosstrim.tools import calibrate

    results = [
        _result("trimmed k=0.25", "trimmed (k_ratio)", 0.5, 0.8, False),
        _result("trimmed k=0.25 +summary", "trimmed (k_ratio) +summary", 0.5, 0.96, qualified),
    ]
    calibrate.plot(Calibration(0.95, results, results[1] if qualified else None, []), tmp_path / "c.png", "t")
    (fig,) = figures
    shown = texts(fig)
    assert {"trimmed (k_ratio)", "trimmed (k_ratio) +summary", "target 95%"} <= set(shown)
    if qualified:
        assert "recommended: trimmed k=0.25 +summary" in shown
    else:
        assert any(t.startswith("no setting qualified") for t in shown)
        assert not any(t.startswith("recommended") for t in shown)
    # One point each: the two series must differ in what a single marker shows.
    plain, summary = [
        line for line in fig.axes[1].lines if line.get_label() in ("trimmed (k_ratio)", results[1].family)
    ]
    assert plain.get_markerfacecolor() != summary.get_markerfacecolor()


def _canvas() -> attention.Canvas:
    """A 2 x 2 grid of 8 px cells, each a saturated colour, tokens 1-4 (token 0 is the CLS)."""
    colours = [(0.1, 0.2, 0.9), (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.9, 0.8, 0.1)]
    pixels = np.zeros((16, 16, 3), dtype=np.float32)
    boxes = {}
    for i, colour in enumerate(colours):
        top, left = (i // 2) * 8, (i % 2) * 8
        pixels[top : top + 8, left : left + 8] = colour
        boxes[i + 1] = (top, left, 8)
    return attention.Canvas(pixels, boxes, (0,), 16)


def _pixel(fig, ax, view, token) -> np.ndarray:
    """The colour drawn at the centre of ``token``'s cell, in [0, 1]."""
    fig.canvas.draw()
    buffer = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    top, left, size = view.boxes[token]
    x, y = ax.transData.transform((left + size / 2 - 0.5, top + size / 2 - 0.5))
    return buffer[int(buffer.shape[0] - y), int(x)]


def test_overlays_keep_the_colours_of_what_matters_and_have_a_scale_and_a_legend(tmp_path):
    view = _canvas()
    with style.figure(tmp_path / "o.png", figsize=(6, 3)) as fig:
        heat, kept = fig.subplots(1, 2)
        attention.attention_panel(heat, view, torch.tensor([0.1, 5.0, 1.0, 0.0, 0.5]), "a")
        attention.kept_panel(kept, view, {0, 1, 2}, summarized=False, title="b")
        # The most-attended token and the kept tokens are drawn in their own colours (blue stays blue) ...
        for ax, token in ((heat, 1), (kept, 1), (kept, 2)):
            assert np.allclose(
                _pixel(fig, ax, view, token), view.pixels[view.boxes[token][0] + 4, view.boxes[token][1] + 4], atol=0.03
            )
        # ... one with no attention, or dropped, is the same hue, darker.
        for ax, token in ((heat, 3), (kept, 3)):
            drawn, true = _pixel(fig, ax, view, token), view.pixels[view.boxes[token][0] + 4, view.boxes[token][1] + 4]
            assert drawn.sum() < 0.6 * true.sum() and np.argmax(drawn) == np.argmax(true)
        assert len(fig.axes) == 3  # the colour scale of the attention panel
        assert "% of the layer's attention" in fig.axes[2].get_ylabel()
        legend = [t.get_text() for t in kept.get_legend().get_texts()]
        assert legend == ["kept: 2 patches (+1 CLS)", "dropped: 2 patches, unseen by later layers"]


def test_viz_draws_the_later_layers_from_the_second_cross_layer_in_words(tmp_path, figures, capsys):
    code, _, err = run_cli(capsys, "viz", "--out", tmp_path / "v.png", "--device", "cpu", "--k-ratio", "0.1")
    assert code == 0, err
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    later = [t for t in titles if " layer " in t.split(",")[0] and t.startswith(("(c)", "(d)"))]
    assert [t.split(",")[0] for t in later] == ["(c) layer 3", "(d) layer 5"]  # the testbed's cross layers: 1, 3, 5
    assert all("most-attended tokens are also" in t and "%" not in t.split("\n")[1] for t in later)
    assert sum("% of the layer's attention" in ax.get_ylabel() for ax in fig.axes) == 3  # (a), (c) and (d)


def test_demo_compares_plain_and_summarised_trimming_side_by_side(tmp_path, figures, capsys):
    code, out, err = run_cli(
        capsys, "demo", "--count", "6", "--summarize-dropped", "--viz", tmp_path / "d.png", "--device", "cpu"
    )
    assert code == 0, err
    assert "trimming: trimmed k=0.25 and trimmed k=0.25 +summary" in out
    assert "full     trimmed  +summary" in out and "correct: full " in out and ", +summary " in out
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("(b) trimmed k=0.25: keeps") for t in titles)
    assert any(t.startswith("(c) trimmed k=0.25 +summary: keeps") for t in titles)
    legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("averaged into 1 summary token" in t for t in legends)
