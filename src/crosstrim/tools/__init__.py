"""Command-line tools built on the library: each module registers one ``crosstrim`` subcommand."""


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits non-zero."""
