"""Small numeric helpers the fits share: reading a results-CSV cell, a 95% percentile interval."""
from __future__ import annotations

import math

import numpy as np


def num(row: dict, key: str) -> float:
    """A results-CSV cell as a float; NaN when it is missing or not a number."""
    try:
        return float(row.get(key, "") or "nan")
    except ValueError:
        return float("nan")


def ci95(values: list[float]) -> list[float] | None:
    """The 2.5-97.5 percentile interval of the finite values; None with fewer than 10."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)])
    if len(v) < 10:
        return None
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
