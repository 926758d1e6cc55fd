"""A closed-loop session as a static report: PNG figures and one HTML page.

``write_session_report(data, folder)`` writes ``index.html``, ``score_curve.png``, ``best_stimuli.png``,
``last_generation.png`` and the shown stimuli under ``images/``. The pieces are separate so a live view
can serve them from memory: ``summarize_session`` (numbers, in ``session_summary``), ``render_*``
(PNG bytes; matplotlib's object API without pyplot, so threads of a server can render at once) and
``render_html`` (the page, given where its figures, images and exports are).
"""

from __future__ import annotations

import datetime
import html
import io
import math
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.engines.session_export import SessionData
from neurotwin.reports.session_summary import SessionSummary, StimulusScore, summarize_session

FIGURES = ("score_curve", "best_stimuli", "last_generation")
# Settings worth a row in the report, in this order (the full settings are in the exports).
SETTING_KEYS = (
    "optimizer",
    "generator",
    "generator_version",
    "population_size",
    "natural_per_generation",
    "objective",
    "target_neurons",
    "max_generations",
    "image_size",
    "twin",
    "twin_version",
    "candidates_per_presentation",
    "seed",
    "description",
)
SYNTHETIC_COLOR = "#1f5fa8"
NATURAL_COLOR = "#c0392b"


# ------------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def render_score_curve(summary: SessionSummary) -> bytes:
    """Synthetic mean and max per generation, the best so far, and the natural references."""
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    rows = summary.generations
    x = [r.generation for r in rows]
    # Markers keep a session of one or two generations visible.
    marker = "o" if len(rows) < 20 else None
    ax.plot(x, [r.synthetic_mean for r in rows], color=SYNTHETIC_COLOR, marker=marker, label="synthetic mean")
    ax.plot(x, [r.synthetic_max for r in rows], color=SYNTHETIC_COLOR, alpha=0.45, label="synthetic max")
    ax.plot(x, [r.best_so_far for r in rows], color="black", linestyle="--", linewidth=1, label="best so far")
    natural_mean = [r.natural_mean for r in rows]
    if _finite(natural_mean):
        ax.plot(x, natural_mean, color=NATURAL_COLOR, label="natural mean")
        ax.plot(x, [r.natural_max for r in rows], color=NATURAL_COLOR, alpha=0.45, label="natural max")
    if not rows:
        ax.text(0.5, 0.5, "no generation told yet", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel(f"{summary.objective} of targets\n({summary.response_units})", fontsize=8)
    ax.set_title(f"session {summary.session_id}: score per generation", fontsize=10)
    if rows:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _decode(image: bytes | None) -> np.ndarray | None:
    from neurotwin.imagecodec import decode_image

    return None if image is None else decode_image(image)


def _grid(stimuli: Sequence[StimulusScore], title: str, columns: int, caption: Any) -> bytes:
    count = max(1, len(stimuli))
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    fig = _figure(1.6 * columns + 0.4, 1.9 * rows + 0.5)
    fig.suptitle(title, fontsize=10)
    for k in range(rows * columns):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.set_axis_off()
        if k >= len(stimuli):
            continue
        pixels = _decode(stimuli[k].image)
        if pixels is None:
            ax.text(0.5, 0.5, "no image\nin export", ha="center", va="center", fontsize=7)
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(caption(k, stimuli[k]), fontsize=7, color=_kind_color(stimuli[k].kind))
    if not stimuli:
        fig.text(0.5, 0.5, "nothing told yet", ha="center", va="center")
    fig.tight_layout()
    return _png(fig)


def _kind_color(kind: str) -> str:
    return NATURAL_COLOR if kind == "natural" else "black"


def render_best_stimuli(summary: SessionSummary) -> bytes:
    def caption(k: int, s: StimulusScore) -> str:
        text = f"#{k + 1} g{s.generation} {s.score:.3g}"
        if s.confirmations:
            text += f"\nconfirmed {s.confirmed_score:.3g} (n={len(s.confirmations)})"
        return text

    shown = list(summary.best) + ([summary.best_natural] if summary.best_natural else [])
    return _grid(shown, "best synthetic stimuli (measured score)", 4, caption)


def render_last_generation(summary: SessionSummary) -> bytes:
    generation = summary.last_generation[0].generation if summary.last_generation else -1
    return _grid(
        summary.last_generation,
        f"last told generation ({generation}); natural references in red",
        8,
        lambda k, s: f"{s.index} {s.score:.3g}",
    )


RENDERERS = {
    "score_curve": render_score_curve,
    "best_stimuli": render_best_stimuli,
    "last_generation": render_last_generation,
}


# ------------------------------------------------------------------------------------------------
# HTML

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img.stimulus {{ width: 96px; height: 96px; image-rendering: pixelated; }}
.natural {{ color: {natural}; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{overview}</p>
<h2>Exports</h2>
{exports}
<h2>Score per generation</h2>
<p><img src="{score_curve}" alt="score per generation"></p>
<h2>Best stimuli</h2>
<p>Measured score: the objective ({objective}) of the first presentation. Confirmed: the mean score of
later presentations of the same image (the same sha256), when it was shown again.</p>
{best_table}
<p><img src="{best_stimuli}" alt="best stimuli"></p>
<h2>Last told generation</h2>
<p><img src="{last_generation}" alt="last generation"></p>
{last_table}
<h2>Session</h2>
{metadata_table}
{settings_table}
<p><small>neurotwin session report, written {written}.</small></p>
</body>
</html>
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _url(path: str) -> str:
    return _e(urllib.parse.quote(path))


def _num(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """``rows`` hold already-escaped HTML cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _stimulus_rows(stimuli: Sequence[StimulusScore], images: Mapping[str, str]) -> list[list[str]]:
    rows = []
    for rank, s in enumerate(stimuli, 1):
        src = images.get(s.stimulus_id)
        image = f'<img class="stimulus" src="{_url(src)}" alt="{_e(s.stimulus_id)}">' if src else ""
        kind = f'<span class="natural">{_e(s.kind)}</span>' if s.kind == "natural" else _e(s.kind)
        rows.append(
            [
                str(rank),
                image,
                _e(s.stimulus_id) + (f"<br>{_e(s.natural_name)}" if s.natural_name else ""),
                kind,
                str(s.generation),
                _num(s.score),
                _e(", ".join(_num(v) for v in s.target_rates)),
                str(s.repeats),
                _num(s.confirmed_score) + (f" (n={len(s.confirmations)})" if s.confirmations else ""),
            ]
        )
    return rows


def render_html(
    summary: SessionSummary,
    figures: Mapping[str, str],
    images: Mapping[str, str],
    exports: Sequence[tuple[str, str]] = (),
) -> str:
    """The page. ``figures``: figure name -> URL; ``images``: stimulus id -> URL; ``exports``:
    (label, URL) pairs. Every value from the session is escaped."""
    header = [
        "#",
        "image",
        "stimulus",
        "kind",
        "generation",
        "measured",
        f"target rates ({summary.response_units})",
        "repeats",
        "confirmed",
    ]
    best = list(summary.best) + ([summary.best_natural] if summary.best_natural else [])
    started = datetime.datetime.fromtimestamp(summary.start_time, tz=datetime.UTC)
    overview = (
        f"Status <b>{_e(summary.status)}</b>: {summary.generations_told} generations and "
        f"{summary.presentations_told} presentations told. Targets: "
        f"{_e(', '.join(summary.target_neuron_ids))}. Session start {_e(started.isoformat())}."
    )
    export_list = (
        "<ul>"
        + "".join(f'<li><a href="{_url(url)}">{_e(label)}</a></li>' for label, url in exports)
        + "</ul>"
        if exports
        else "<p>No export written with this report.</p>"
    )
    metadata = summary.metadata
    metadata_rows = [
        [_e(k), _e("; ".join(v) if isinstance(v, list) else v)] for k, v in sorted(metadata.items())
    ]
    settings_rows = [
        [_e(k), _e(summary.settings[k])] for k in SETTING_KEYS if summary.settings.get(k) not in (None, "")
    ]
    return _PAGE.format(
        title=_e(f"Closed-loop session {summary.session_id}"),
        natural="#c0392b",
        overview=overview,
        exports=export_list,
        objective=_e(summary.objective),
        score_curve=_url(figures["score_curve"]),
        best_stimuli=_url(figures["best_stimuli"]),
        last_generation=_url(figures["last_generation"]),
        best_table=_table(header, _stimulus_rows(best, images), numeric=(5, 8)),
        last_table=_table(header, _stimulus_rows(summary.last_generation, images), numeric=(5, 8)),
        metadata_table=_table(["metadata", "value"], metadata_rows)
        if metadata_rows
        else "<p>No subject or device metadata given.</p>",
        settings_table=_table(["setting", "value"], settings_rows),
        written=_e(datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds")),
    )


# ------------------------------------------------------------------------------------------------
# Files


def _image_suffix(data: bytes) -> str:
    return ".png" if data.startswith(b"\x89PNG") else ".jpg"


def _file_name(stimulus_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stimulus_id)


def write_session_report(
    data: SessionData, folder: str | Path, exports: Sequence[str | Path] = (), top: int = 8
) -> Path:
    """Write the report into ``folder`` (created); returns ``index.html``. ``exports``: files to link
    (NWB/HDF5), wherever they are."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    summary = summarize_session(data, top=top)
    figures = {}
    for name in FIGURES:
        (folder / f"{name}.png").write_bytes(RENDERERS[name](summary))
        figures[name] = f"{name}.png"
    images = {}
    shown = [*summary.best, *summary.last_generation]
    if summary.best_natural:
        shown.append(summary.best_natural)
    for stimulus in shown:
        if stimulus.image is None or stimulus.stimulus_id in images:
            continue
        name = f"images/{_file_name(stimulus.stimulus_id)}{_image_suffix(stimulus.image)}"
        (folder / name).write_bytes(stimulus.image)
        images[stimulus.stimulus_id] = name
    links = []
    for path in exports:
        target = Path(path)
        relative = os.path.relpath(target.resolve(), folder.resolve())
        links.append((f"{target.name} ({target.suffix.lstrip('.').upper() or 'file'})", relative))
    page = folder / "index.html"
    page.write_text(render_html(summary, figures, images, links), encoding="utf-8")
    return page
