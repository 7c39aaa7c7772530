"""Command-line tools built on the library: each module registers one ``crosstrim`` subcommand.

Here: what several subcommands share, so each spells it the same way: the one-line user error, the
parsers of comma-separated option values, and plain-text tables."""


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits non-zero."""


def ints(text: str, name: str) -> list[int]:
    """Positive integers from ``"1,2,8"``; option ``name`` is named in the error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise UserError(f"{name} must be positive integers, got {text!r}")
    return values


def fractions(text: str, name: str = "--keep") -> list[float]:
    """Fractions in (0, 1] from ``"0.5,0.25"``; option ``name`` is named in the error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{name} must be comma-separated fractions in (0, 1], got {text!r}") from err
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise UserError(f"{name} must be fractions in (0, 1], e.g. 0.5,0.25; got {text!r}")
    return values


def table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a header and a rule of dashes."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
