"""One look for every crosstrim figure, drawn without touching matplotlib's global state.

Library code runs inside other programs (notebooks, servers, test runners) that chose their own matplotlib
backend and rcParams. ``matplotlib.use("Agg")`` or pyplot's figure registry would change theirs, so a figure
here is a plain :class:`matplotlib.figure.Figure` rendered by its own Agg canvas (no backend, no pyplot), and
:data:`STYLE` applies only while that figure is drawn and saved (``matplotlib.rc_context``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The one place for rcParams: every figure of every tool is drawn under these.
STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "figure.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "image.interpolation": "nearest",
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}

SUMMARY = " +summary"  # the suffix sweep.plan gives a setting's summarize_dropped twin
MARKERS = "os^Dv<>P"


@contextmanager
def figure(path: str | Path, *, dpi: int = 120, **kwargs) -> Iterator[Figure]:
    """A new ``Figure(**kwargs)`` drawn under :data:`STYLE`, saved to ``path`` (folders created) when the block
    ends without an error."""
    path = Path(path)
    with matplotlib.rc_context(STYLE):
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        yield fig
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


def family_styles(families: Sequence[object]) -> dict[object, dict]:
    """Line style per sweep family (``trimmed (k_ratio)``, ``mean (keep_ratio)`` ...; its ``str()`` is the
    label), for ``Axes.plot``.

    A selection keeps one colour and one marker; its ``+summary`` twin is dashed with a hollow marker. The
    marker carries the difference when a family has a single point and no line shows.
    """
    names = [str(f) for f in families]
    bases = list(dict.fromkeys(name.removesuffix(SUMMARY) for name in names))
    styles = {}
    for family, name in zip(families, names):
        base = bases.index(name.removesuffix(SUMMARY))
        summary = name.endswith(SUMMARY)
        styles[family] = {
            "color": f"C{base % 10}",
            "marker": MARKERS[base % len(MARKERS)],
            "linestyle": "--" if summary else "-",
            "markerfacecolor": "white" if summary else f"C{base % 10}",
            "markersize": 7 if summary else 6,
            "label": name,
        }
    return styles
