"""The ``crosstrim`` subcommands: each module registers one (see :data:`crosstrim.cli.TOOLS`).

The code they share is a library of its own, :mod:`crosstrim.evaluation`.
"""
