"""matplotlib for files only: the Agg backend (no display), imported when a plot is drawn, so
commands that draw nothing never import it."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
