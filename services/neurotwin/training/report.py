"""Evaluation report: PNG plots and one self-contained HTML page that links them.

``write_report(folder, ...)`` writes ``scatter_best.png``, ``scatter_median.png``, ``r_histogram.png``,
``metrics.json`` and ``index.html``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.training.evaluate import pearson_per_neuron


def _pyplot() -> Any:
    import matplotlib

    # Reports are written by servers and CI too: never ask for a display.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _scatter(path: Path, predicted: np.ndarray, measured: np.ndarray, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    ax.scatter(predicted, measured, s=8, alpha=0.6, edgecolors="none")
    lo = float(min(predicted.min(), measured.min()))
    hi = float(max(predicted.max(), measured.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("predicted rate")
    ax.set_ylabel("measured rate")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _histogram(path: Path, r: np.ndarray, median: float | None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=100)
    finite = r[np.isfinite(r)]
    ax.hist(finite, bins=np.linspace(min(-0.2, float(finite.min(initial=0.0))), 1.0, 31), color="#4a7bb7")
    if median is not None:
        ax.axvline(median, color="black", linewidth=1.0, label=f"median {median:.3f}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("held-out Pearson r per neuron")
    ax.set_ylabel("neurons")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    folder: str | Path,
    predicted: np.ndarray,
    measured: np.ndarray,
    neuron_ids: list[str],
    metrics: dict[str, Any],
    *,
    title: str = "neurotwin evaluation",
    details: dict[str, Any] | None = None,
) -> Path:
    """Plots of held-out predictions [images, neurons] vs measurements, and an HTML page; returns its path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    r = pearson_per_neuron(predicted, measured)
    ranked = [int(i) for i in np.argsort(np.where(np.isfinite(r), r, -np.inf))[::-1] if np.isfinite(r[i])]
    figures: list[tuple[str, str]] = []
    if ranked:
        best = ranked[0]
        median = ranked[len(ranked) // 2]
        for key, k, label in (("best", best, "best"), ("median", median, "median")):
            name = f"scatter_{key}.png"
            _scatter(
                out / name, predicted[:, k], measured[:, k], f"{label} neuron {neuron_ids[k]}: r = {r[k]:.3f}"
            )
            figures.append((name, f"Measured vs predicted, {label} neuron ({neuron_ids[k]})"))
        _histogram(out / "r_histogram.png", r, metrics.get("median_r"))
        figures.append(("r_histogram.png", "Held-out r over neurons"))
    (out / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "details": details or {}}, indent=1) + "\n"
    )
    (out / "index.html").write_text(_html(title, metrics, details or {}, figures, neuron_ids, r))
    return out / "index.html"


def _html(
    title: str,
    metrics: dict[str, Any],
    details: dict[str, Any],
    figures: list[tuple[str, str]],
    neuron_ids: list[str],
    r: np.ndarray,
) -> str:
    esc = html.escape
    summary_keys = [
        ("images", "held-out images"),
        ("neurons", "neurons"),
        ("median_r", "median r"),
        ("mean_r", "mean r"),
        ("top_decile_r", "top-decile r (90th percentile)"),
        ("best_r", "best r"),
        ("median_noise_ceiling", "median split-half noise ceiling"),
        ("median_normalized_r", "median r / ceiling"),
        ("median_feve", "median FEVE"),
    ]
    rows = []
    for key, label in summary_keys:
        value = metrics.get(key)
        if value is not None:
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append(f"<tr><th>{esc(label)}</th><td>{esc(shown)}</td></tr>")
    for key, value in details.items():
        rows.append(f"<tr><th>{esc(str(key))}</th><td>{esc(_short(value))}</td></tr>")
    images = "\n".join(
        f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
        for name, caption in figures
    )
    per_neuron = "\n".join(
        f"<tr><td>{esc(nid)}</td><td>{'' if not np.isfinite(v) else f'{v:.4f}'}</td></tr>"
        for nid, v in zip(neuron_ids, r, strict=True)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
figcaption {{ font-size: 0.85em; color: #444; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<table>{"".join(rows)}</table>
{images}
<h2>Per-neuron held-out r</h2>
<table><tr><th>neuron</th><th>r</th></tr>
{per_neuron}
</table>
</body></html>
"""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 300 else text[:297] + "..."
