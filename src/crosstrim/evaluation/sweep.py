"""The settings a sweep compares, and the interval every accuracy or agreement is reported with.

``crosstrim eval`` (accuracy against labels) and ``crosstrim calibrate`` (agreement with the full model)
sweep the same settings from the same flags, so both build them here, and both report a share of
``n`` answers with the same Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from crosstrim.core import TrimConfig

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
# The TrimConfig field each sweep flag sets, so a bad value is an error naming the flag.
SWEEP_FLAGS = {"method": "--methods", "k_ratio": "--k-ratios", "keep_ratio": "--keep-ratios", "seed": "--seed"}


@dataclass(frozen=True)
class Family:
    """The line a setting is grouped and drawn on: a method with its kind of budget (``k_ratio``: the kept count
    adapts; ``keep_ratio``: exact), with or without the summary token, or a reference line (``budget`` None:
    ``full``, eval's ``one token``). ``str()`` is its label in tables, plots and results files."""

    method: str
    budget: str | None = None
    summary: bool = False

    @classmethod
    def of(cls, config: TrimConfig) -> Family:
        """The family of a trimmed setting."""
        budget = "k_ratio" if config.k_ratio is not None else "keep_ratio"
        return cls(config.method, budget, config.summarize_dropped)

    def __str__(self) -> str:
        base = self.method if self.budget is None else f"{self.method} ({self.budget})"
        return base + (" +summary" if self.summary else "")


@dataclass(frozen=True)
class Setting:
    """One configuration of a sweep: a label, the method family it belongs to (for tables and plots) and
    its trim config (``None``: the untrimmed model)."""

    label: str
    family: Family
    config: TrimConfig | None


def plan(
    k_ratios: Sequence[float | str],
    keep_ratios: Sequence[float | str],
    methods: Sequence[str],
    summarize: bool = False,
    seed: int | str = 0,
) -> list[Setting]:
    """``trimmed`` at every k_ratio (adaptive kept count), then every method at every exact keep_ratio;
    with ``summarize`` each is followed by itself with ``TrimConfig.summarize_dropped`` (``+summary``).
    ``seed`` seeds the ``random`` method. Values may be the flags' strings: they are parsed by
    :meth:`TrimConfig.from_options`, whose errors name the flags (``ValueError``)."""
    settings = []
    for k in k_ratios:
        trimmed = sweep_config(seed, k_ratio=k)
        settings.append(Setting(f"trimmed k={trimmed.k_ratio:g}", Family.of(trimmed), trimmed))
    for keep in keep_ratios:
        for name in methods:
            chosen = sweep_config(seed, method=name, keep_ratio=keep)
            settings.append(Setting(f"{chosen.method} keep={chosen.keep_ratio:g}", Family.of(chosen), chosen))
    if not summarize:
        return settings
    return [
        variant
        for s in settings
        for variant in (
            s,
            Setting(f"{s.label} +summary", replace(s.family, summary=True), replace(s.config, summarize_dropped=True)),
        )
    ]


def sweep_config(seed: int | str, **options: object) -> TrimConfig:
    """A :class:`TrimConfig` from sweep values (numbers or the flags' strings), errors naming the flags."""
    return TrimConfig.from_options({**options, "seed": seed}, names=SWEEP_FLAGS)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a share ``successes / n`` (95% for the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and does not claim zero width at 0 or ``n``
    successes: 3 of 3 right is not evidence of a perfect model.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got {successes} of {n}")
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Exact at the ends: rounding would otherwise put 1.0 just above the upper end of n/n's interval.
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


__all__ = ["SWEEP_FLAGS", "Z_95", "Family", "Setting", "plan", "sweep_config", "wilson_interval"]
