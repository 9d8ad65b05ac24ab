"""One plotting style for every figure the kit saves next to its tables (results/*.png).

`pyplot()` gives matplotlib on the file-only Agg backend with the kit's theme; `MODEL_COLOURS` fixes one
colour per model label, so that "MPM AT" has the same colour in every figure; `save` writes a figure
atomically (a killed run never leaves half a PNG) and closes it. Leaf module (matplotlib/seaborn only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import fileio

MODEL_COLOURS = {"vanilla": "#8c8c8c", "MPM": "#9ecae1", "vanilla AT": "#4d4d4d", "MPM AT": "#2171b5",
                 "clean": "#8c8c8c", "robust": "#2171b5"}
DPI = 120


def pyplot():
    """matplotlib.pyplot on the Agg backend with the kit's theme (seaborn "whitegrid", paper context)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="paper")
    return plt


def palette(labels: list[str]) -> dict[str, Any]:
    """A colour per label: the fixed model colours where known, then seaborn's default cycle."""
    import seaborn as sns
    others = iter(sns.color_palette("tab10", len(labels)))
    return {lab: MODEL_COLOURS.get(lab) or next(others) for lab in labels}


def save(fig, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` to `path` atomically, then close it."""
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
