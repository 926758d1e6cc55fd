"""Held-out accuracy of a twin: per-neuron Pearson r, split-half noise ceiling, explainable variance.

All functions take predictions and measurements as [images, neurons] arrays (the layout a predictor
returns); ``Recording.responses`` is [neurons, images] and is transposed by :func:`evaluate_recording`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neurotwin.errors import InvalidInput
from neurotwin.stats import pearson_columns

# Split-half ceilings are averaged over this many random splits of the repeats.
CEILING_SPLITS = 20


def pearson_per_neuron(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r per column of two [images, neurons] arrays; NaN where either column is constant."""
    return pearson_columns(predicted, measured, constant=float("nan"), tolerance=1e-12)


def split_half_ceiling(repeats: np.ndarray, splits: int = CEILING_SPLITS, seed: int = 0) -> np.ndarray:
    """Per-neuron noise ceiling from per-repeat data [neurons, images, repeats] (NaN = missing repeat).

    For each random split, each image's valid repeats are dealt into two halves, the two half-means
    are correlated over images, and the Spearman-Brown formula 2r / (1 + r) extends the half-data
    reliability to all repeats. Images with fewer than two valid repeats are left out. NaN where a
    neuron has under three usable images.
    """
    reps = np.asarray(repeats, dtype=np.float64)
    if reps.ndim != 3:
        raise InvalidInput(f"repeats must be [neurons, images, repeats], got {list(reps.shape)}")
    neurons = reps.shape[0]
    rng = np.random.default_rng(seed)
    valid = ~np.isnan(reps)
    filled = np.where(valid, reps, 0.0)
    total = np.zeros(neurons)
    for _ in range(splits):
        # Random keys order the valid repeats of each (neuron, image); the first half of them form half A.
        keys = np.where(valid, rng.random(reps.shape), np.inf)
        rank = keys.argsort(axis=2).argsort(axis=2)
        count = valid.sum(axis=2, keepdims=True)
        in_a = valid & (rank < count // 2)
        in_b = valid & ~in_a
        na, nb = in_a.sum(axis=2), in_b.sum(axis=2)
        usable = (na > 0) & (nb > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_a = (filled * in_a).sum(axis=2) / na
            mean_b = (filled * in_b).sum(axis=2) / nb
        r = np.full(neurons, np.nan)
        for k in range(neurons):
            cols = usable[k]
            if cols.sum() >= 3:
                r[k] = pearson_per_neuron(mean_a[k, cols, None], mean_b[k, cols, None])[0]
        total += r
    r_half = total / splits
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * r_half / (1 + r_half)


def fraction_explainable_variance_explained(predicted: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """FEVE per neuron: 1 - (MSE to single trials - noise variance) / (total variance - noise variance).

    ``predicted`` is [images, neurons]; ``repeats`` is [neurons, images, repeats] with NaN padding.
    Total variance is over all single trials, noise variance the mean over images of the variance across
    an image's repeats. NaN where a neuron has no explainable variance.
    """
    reps = np.asarray(repeats, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64).T[:, :, None]  # [neurons, images, 1]
    if pred.shape[:2] != reps.shape[:2]:
        raise InvalidInput(f"predictions {list(predicted.shape)} do not match repeats {list(reps.shape)}")
    out = np.full(reps.shape[0], np.nan)
    for k in range(reps.shape[0]):
        trials = reps[k]
        multi = (~np.isnan(trials)).sum(axis=1) >= 2
        if multi.sum() < 2:
            continue
        total_var = np.nanvar(trials, ddof=1)
        noise_var = np.nanmean(np.nanvar(trials[multi], axis=1, ddof=1))
        mse = np.nanmean((trials - pred[k]) ** 2)
        explainable = total_var - noise_var
        if explainable > 1e-12:
            out[k] = 1.0 - (mse - noise_var) / explainable
    return out


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _stat(values: np.ndarray, fn: Any) -> float | None:
    finite = _finite(values)
    return float(fn(finite)) if finite.size else None


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in np.asarray(values, dtype=np.float64)]


def summarize(
    predicted: np.ndarray, measured: np.ndarray, repeats: np.ndarray | None = None, *, part: str = "test"
) -> dict[str, Any]:
    """The metrics a card and report carry, for predictions [images, neurons] of measured [images, neurons]
    (and per-repeat data [neurons, images, R] when the recording has it)."""
    r = pearson_per_neuron(predicted, measured)
    metrics: dict[str, Any] = {
        "part": part,
        "images": int(measured.shape[0]),
        "neurons": int(measured.shape[1]),
        "median_r": _stat(r, np.median),
        "mean_r": _stat(r, np.mean),
        "top_decile_r": _stat(r, lambda v: np.percentile(v, 90)),
        "best_r": _stat(r, np.max),
        "per_neuron_r": _listed(r),
    }
    if repeats is not None and repeats.shape[2] >= 2:
        ceiling = split_half_ceiling(repeats)
        with np.errstate(invalid="ignore", divide="ignore"):
            normalized = np.where(ceiling > 0, r / ceiling, np.nan)
        feve = fraction_explainable_variance_explained(predicted, repeats)
        metrics.update(
            {
                "median_noise_ceiling": _stat(ceiling, np.median),
                "median_normalized_r": _stat(normalized, np.median),
                "median_feve": _stat(feve, np.median),
                "per_neuron_noise_ceiling": _listed(ceiling),
                "per_neuron_feve": _listed(feve),
            }
        )
    return metrics


def evaluate_recording(predicted: np.ndarray, recording: Any, *, part: str = "test") -> dict[str, Any]:
    """:func:`summarize` for predictions on every image of ``recording`` (usually a subset)."""
    return summarize(predicted, recording.responses.T, recording.repeats, part=part)


def headline(metrics: dict[str, Any]) -> str:
    """One line for logs and the CLI."""
    parts = [f"{metrics.get('part', 'test')}: {metrics['images']} images, {metrics['neurons']} neurons"]
    for key, label in (("median_r", "median r"), ("top_decile_r", "top decile r"), ("mean_r", "mean r")):
        if metrics.get(key) is not None:
            parts.append(f"{label} {metrics[key]:.3f}")
    if metrics.get("median_noise_ceiling") is not None:
        parts.append(f"median ceiling {metrics['median_noise_ceiling']:.3f}")
    if metrics.get("median_feve") is not None:
        parts.append(f"median FEVE {metrics['median_feve']:.3f}")
    return ", ".join(parts)
