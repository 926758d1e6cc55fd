"""The report over a whole sweep (see sweep_folder.py): a contact sheet and an index of every neuron.

- ``contact_sheet.png``: one cell per neuron of the twin, in neuron order, showing its strongest
  synthesized image with the neuron id and its activation relative to the neuron's maximum over
  natural images; a neuron without a result yet gets a grey cell marked "missing".
- ``index.json``: the sweep, then per neuron its folder, best image, activations and ratios, and the
  box its cell occupies on the contact sheet.
- ``index.csv``: the same, one row per neuron, for spreadsheets and pandas.
- ``index.html``: a table with every image, to browse the results from the volume or a copy of it.

Every file is written under a temporary name and renamed, so a reader (or a second pod writing the
same report at the same moment) never sees half of one.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurotwin.engines.sweep_folder import SweepFolder, SweepSpec, write_atomic
from neurotwin.errors import InvalidInput

__all__ = ["CELL", "REPORT_FILES", "Report", "write_report"]

CELL = 64  # contact-sheet cell side in pixels
CAPTION = 26  # two caption lines under each cell
GAP = 6
HEADER = 22
REPORT_FILES = ("contact_sheet.png", "index.json", "index.csv", "index.html")
INDEX_FORMAT = "neurotwin.sweep-index/1"
CSV_COLUMNS = (
    "neuron",
    "neuron_id",
    "status",
    "best_activation",
    "best_ratio",
    "mean_activation",
    "natural_max",
    "best_image",
    "folder",
)


@dataclass
class Report:
    total: int
    complete: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _entries(folder: SweepFolder, spec: SweepSpec) -> list[dict[str, Any]]:
    entries = []
    for neuron, neuron_id in enumerate(spec.neuron_ids):
        record = folder.read_result(spec, neuron)
        if record is None:
            entries.append({"neuron": neuron, "neuron_id": neuron_id, "status": "missing"})
            continue
        rel = folder.neuron_dir(spec, neuron).relative_to(folder.root).as_posix()
        activations = [float(i["activation"]) for i in record["images"]]
        entries.append(
            {
                "neuron": neuron,
                "neuron_id": neuron_id,
                "status": "complete",
                "folder": rel,
                "best_image": f"{rel}/{record['images'][record['best_image']]['file']}",
                "images": [f"{rel}/{i['file']}" for i in record["images"]],
                "best_activation": record["best_activation"],
                "best_ratio": record["best_ratio"],
                "mean_activation": sum(activations) / len(activations),
                "activations": activations,
                "ratios": [i["activation_ratio"] for i in record["images"]],
                "natural_max": record["natural_max"],
            }
        )
    return entries


def _caption_lines(entry: dict[str, Any]) -> tuple[str, str]:
    name = str(entry["neuron_id"])[:11]
    if entry["status"] != "complete":
        return name, "missing"
    ratio = entry["best_ratio"]
    value = f"{ratio:.2f}x" if ratio is not None else f"{entry['best_activation']:.3g}"
    return name, value


def _contact_sheet(folder: SweepFolder, spec: SweepSpec, entries: list[dict[str, Any]]) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    count = max(1, len(entries))
    columns = min(count, max(1, math.ceil(math.sqrt(count * 2))))
    rows = math.ceil(count / columns)
    pitch_x, pitch_y = CELL + GAP, CELL + CAPTION + GAP
    done = sum(e["status"] == "complete" for e in entries)
    title = f"{spec.describe()}: {done}/{len(entries)} neurons"
    title_width = math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font))
    width = max(GAP + columns * pitch_x, title_width + 2 * GAP)
    sheet = Image.new("RGB", (width, HEADER + rows * pitch_y), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 5), title, fill="black", font=font)
    for position, entry in enumerate(entries):
        left = GAP + (position % columns) * pitch_x
        top = HEADER + (position // columns) * pitch_y
        entry["sheet_box"] = [left, top, left + CELL, top + CELL]
        if entry["status"] == "complete":
            with Image.open(folder.root / entry["best_image"]) as image:
                cell = image.convert("RGB").resize((CELL, CELL), Image.Resampling.BILINEAR)
            sheet.paste(cell, (left, top))
        else:
            draw.rectangle([left, top, left + CELL - 1, top + CELL - 1], fill=(200, 200, 200))
        for line, text in enumerate(_caption_lines(entry)):
            draw.text((left, top + CELL + 1 + 12 * line), text, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _csv(entries: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({k: ("" if entry.get(k) is None else entry.get(k, "")) for k in CSV_COLUMNS})
    return buffer.getvalue().encode()


def _html(spec: SweepSpec, entries: list[dict[str, Any]]) -> bytes:
    def cell(value: Any, digits: str = ".3g") -> str:
        return "" if value is None else format(value, digits)

    rows = []
    for entry in entries:
        head = f"<td>{entry['neuron']}</td><td>{html.escape(str(entry['neuron_id']))}</td>"
        if entry["status"] != "complete":
            rows.append(f"<tr class=missing>{head}<td colspan=3>missing</td><td></td></tr>")
            continue
        images = "".join(
            f'<a href="{html.escape(path)}"><img src="{html.escape(path)}" alt="" '
            f'title="activation {act:.4g}"></a>'
            for path, act in zip(entry["images"], entry["activations"], strict=True)
        )
        rows.append(
            f"<tr>{head}<td>{cell(entry['best_activation'], '.4g')}</td>"
            f"<td>{cell(entry['best_ratio'], '.2f')}</td><td>{cell(entry['natural_max'], '.4g')}</td>"
            f"<td>{images}</td></tr>"
        )
    title = html.escape(spec.describe())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Preferred stimuli: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: right; }}
img {{ width: 64px; height: 64px; image-rendering: pixelated; margin-right: 2px; }}
tr.missing {{ color: #999; }}
</style></head><body>
<h1>Preferred stimuli</h1>
<p>{title}. Ratio: activation over the neuron's largest predicted rate on natural images.</p>
<p><a href="contact_sheet.png">contact sheet</a> · <a href="index.csv">index.csv</a> ·
<a href="index.json">index.json</a></p>
<table><thead><tr><th>neuron</th><th>id</th><th>best activation</th><th>ratio</th>
<th>natural max</th><th>images</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    return page.encode()


def write_report(root: str | Path) -> Report:
    """Write the contact sheet and the index for the sweep in ``root`` over the results it holds now."""
    folder = SweepFolder(root)
    spec = folder.read_spec()
    if spec is None:
        raise InvalidInput(f"{folder.root}: no sweep here (no {folder.spec_path.name})")
    entries = _entries(folder, spec)
    report = Report(total=len(entries))
    for entry in entries:
        (report.complete if entry["status"] == "complete" else report.missing).append(entry["neuron"])
    sheet = _contact_sheet(folder, spec, entries)  # also sets each entry's sheet_box
    index = {
        "format": INDEX_FORMAT,
        "sweep": {k: v for k, v in spec.to_dict().items() if k != "neuron_ids"},
        "neuron_count": len(entries),
        "complete": len(report.complete),
        "missing": report.missing,
        "contact_sheet": {"file": "contact_sheet.png", "cell": CELL},
        "neurons": entries,
    }
    outputs = {
        "contact_sheet.png": sheet,
        "index.json": (json.dumps(index, indent=1) + "\n").encode(),
        "index.csv": _csv(entries),
        "index.html": _html(spec, entries),
    }
    for name, data in outputs.items():
        write_atomic(folder.root / name, data)
        report.files.append(folder.root / name)
    return report
