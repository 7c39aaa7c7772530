"""Drawing for the tools' figures: one style (:mod:`.style`) and the image overlays ``viz`` and ``demo`` share
(:mod:`.attention`).

Plots belong with the tools, not the core: nothing below ``evaluation`` imports this package, and importing it
changes no global matplotlib state (no backend is chosen, pyplot is never used).
"""
