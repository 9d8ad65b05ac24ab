"""How the kit reports a number: accuracy with its 95% Wilson interval, and which evaluation produced it.

One place for what Tables 3, 4, 5, 7, A4, 6-right and the `eval-aa` summary all print (before, three copies).
A leaf module (numpy/pandas only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd

NOT_ATTACKED = "not attacked (below clean floor)"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (as fractions)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass(frozen=True)
class Accuracy:
    """An accuracy in % with its 95% Wilson interval; NaN throughout when the images were not evaluated."""
    value: float
    lo: float
    hi: float
    n: int

    @property
    def ci(self) -> str:
        return NOT_ATTACKED if math.isnan(self.value) else f"[{self.lo:.1f}, {self.hi:.1f}]"


def accuracy(flags: Iterable) -> Accuracy:
    """Accuracy of per-image correct flags (True/False; a missing flag — None/NaN — marks a model that was not
    attacked, and the whole accuracy is then NaN rather than a number computed on part of the images)."""
    s = pd.Series(list(flags), dtype="object")
    n = len(s)
    if s.isna().any():
        return Accuracy(np.nan, np.nan, np.nan, n)
    k = int(s.astype(bool).sum())
    lo, hi = wilson(k, n)
    return Accuracy(100 * k / max(n, 1), 100 * lo, 100 * hi, n)


def evaluation_label(records: pd.DataFrame) -> str:
    """Which evaluation produced these per-image records: standard AutoAttack, a named non-standard attack
    (its per-image column, e.g. `pgd-20`), or none (a model below the clean floor)."""
    if records["robust"].isna().all():
        return "not attacked"
    if records["standard"].all():
        return "AutoAttack (standard)"
    dev = [c for c in records.columns if c.startswith("pgd-") and records[c].notna().any()]
    return f"{dev[0].upper()} (non-standard)" if dev else "non-standard"
