"""Statistics every layer shares (numpy only): Pearson correlation, the one definition.

Training scores twins with it, the closed loop judges its refit readout with it, benchmarks score
models with it. What a constant column scores differs by use, so callers say it: NaN keeps such a
neuron out of an average, 0 counts it as carrying no information.
"""

from __future__ import annotations

import numpy as np

from neurotwin.errors import InvalidInput


def pearson_columns(
    a: np.ndarray, b: np.ndarray, *, constant: float = float("nan"), tolerance: float = 0.0
) -> np.ndarray:
    """Pearson r per column of two [samples, columns] arrays.

    Columns where ``sqrt(sum a'^2 * sum b'^2)`` (centred) is at most ``tolerance`` score ``constant``.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise InvalidInput(
            f"pearson: shapes {list(x.shape)} and {list(y.shape)} must match as [samples, columns]"
        )
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    denom = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
    usable = denom > tolerance
    r = (x * y).sum(axis=0) / np.where(usable, denom, 1.0)
    return np.where(usable, r, constant)


def pearson(a: np.ndarray, b: np.ndarray, *, constant: float = 0.0) -> float:
    """Pearson r of two 1-D samples; ``constant`` when either does not vary."""
    x = np.asarray(a, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(b, dtype=np.float64).reshape(-1, 1)
    return float(pearson_columns(x, y, constant=constant)[0])
