"""The static session report, from real short sessions: created and told over real gRPC (the GA keeps
its elite, so the best image is shown again and its responses confirmed), read from the journal and
from an HDF5 export, rendered with matplotlib. The HTML is parsed, every image it shows must exist and
decode, and the figures must not be blank."""

from __future__ import annotations

import io
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from neurotwin.cli import main
from neurotwin.client.closed_loop import ClosedLoopClient
from neurotwin.engines.journal import SqliteJournal
from neurotwin.engines.session_export import collect
from neurotwin.engines.session_import import read_hdf5
from neurotwin.reports.session_report import write_session_report
from neurotwin.reports.session_summary import summarize_session
from neurotwin.server.common import GrpcServer
from PIL import Image

from tests._closed_loop import GENERATOR, NEURONS, TWIN, natural_png
from tests._closed_loop import start_server as _start_server

HOSTILE = '<script>alert("x")</script> & Co'


class Page(HTMLParser):
    """Tags, image sources, links, table rows and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        elif tag == "a":
            self.links.append(values["href"] or "")
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: Path) -> Page:
    parser = Page()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _not_blank(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{path} looks blank"
    return pixels


@pytest.fixture
def session(store_root: Path, tmp_path: Path) -> Iterator[tuple[ClosedLoopClient, Path, str]]:
    journal = tmp_path / "journal.sqlite3"
    server: GrpcServer
    server, _ = _start_server(store_root, str(journal))
    client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=30, retries=2, retry_delay=0.05)
    sid = client.create_session(
        neuron_count=NEURONS,
        target_neurons=[2],
        optimizer="ga",
        population_size=6,
        natural_images=[natural_png(i) for i in range(3)],
        natural_per_generation=2,
        seed=11,
        metadata={"lab": HOSTILE, "species": "Macaca mulatta"},
    ).session_id
    rng = np.random.default_rng(0)
    for _ in range(4):
        gen = client.ask(sid)
        responses = {s.stimulus_id: rng.poisson(5.0, (2, NEURONS)).astype(np.float32) for s in gen.stimuli}
        client.tell(sid, gen.generation, responses)
    yield client, journal, sid
    client.close()
    server.stop(0)


def test_report_from_a_real_session(session: tuple[ClosedLoopClient, Path, str], tmp_path: Path) -> None:
    client, journal_path, sid = session
    (tmp_path / "exports").mkdir()
    export = client.export_session(sid, tmp_path / "exports" / "s.nwb")
    journal = SqliteJournal(str(journal_path))
    try:
        data = collect(journal, sid)
    finally:
        journal.close()
    summary = summarize_session(data, top=5)
    assert [g.generation for g in summary.generations] == [0, 1, 2, 3]
    assert all(np.isfinite(g.natural_max) for g in summary.generations)
    assert summary.best[0].score == max(s.score for s in summary.best)
    # The GA re-presents its elite: some image was shown again and its later responses confirm it.
    assert summary.has_repeats and any(s.confirmations for s in summary.best)

    folder = tmp_path / "report"
    page = write_session_report(data, folder, exports=[export], top=5)
    parsed = _parse(page)
    assert "script" not in parsed.tags, "session text must be escaped"
    assert HOSTILE in "".join(parsed.text)
    assert parsed.links == ["../exports/s.nwb"] and (folder / parsed.links[0]).is_file()
    for src in parsed.images:
        with Image.open(folder / src) as image:
            image.load()
    for figure in ("score_curve.png", "best_stimuli.png", "last_generation.png"):
        assert figure in parsed.images
        _not_blank(folder / figure)
    header = next(row for row in parsed.rows if row and row[0] == "#")
    assert header[5] == "measured" and header[8] == "confirmed"
    table_rows = [row for row in parsed.rows if row and row[0].isdigit()]
    # Best table: the 5 best synthetic images and the best natural one; then the last generation (8).
    assert len(table_rows) == 5 + 1 + 8
    best_ids = [row[2] for row in table_rows[:5]]
    assert best_ids == [s.stimulus_id for s in summary.best]
    confirmed = [row[8] for row in table_rows[:5]]
    assert any("(n=" in cell for cell in confirmed)
    assert any(row[3] == "natural" for row in table_rows[5:])


def test_report_from_an_hdf5_export_matches_the_journal(
    session: tuple[ClosedLoopClient, Path, str], tmp_path: Path
) -> None:
    client, journal_path, sid = session
    h5 = client.export_session(sid, tmp_path / "s.h5", format="hdf5")
    journal = SqliteJournal(str(journal_path))
    try:
        from_journal = summarize_session(collect(journal, sid))
    finally:
        journal.close()
    from_file = summarize_session(read_hdf5(h5))
    assert from_file.generations == from_journal.generations
    assert [s.stimulus_id for s in from_file.best] == [s.stimulus_id for s in from_journal.best]
    assert [s.confirmations for s in from_file.best] == [s.confirmations for s in from_journal.best]
    assert from_file.metadata == from_journal.metadata
    # Pixels survive the round trip (the export holds decoded pixels; the report re-encodes them).
    first = from_journal.best[0]
    again = next(s for s in from_file.best if s.stimulus_id == first.stimulus_id)
    assert first.image is not None and again.image is not None
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(first.image)).convert("RGB")),
        np.asarray(Image.open(io.BytesIO(again.image)).convert("RGB")),
    )


def test_rig_sim_report_in_process_and_against_a_server(
    store_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = [
        "rig-sim",
        "--model",
        TWIN,
        "--neuron",
        "3",
        "--model-store",
        str(store_root),
        "--generator",
        GENERATOR,
        "--population",
        "6",
        "--generations",
        "3",
        "--lab",
        "Vision Lab",
    ]
    local = tmp_path / "local"
    assert main([*common, "--report", str(local)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    page = local / "index.html"
    assert f"rig-sim: report {page}" in out
    parsed = _parse(page)
    # Without --export, the report folder gets the NWB file and links it.
    assert len(parsed.links) == 1 and parsed.links[0].endswith(".nwb") and (local / parsed.links[0]).is_file()
    _not_blank(local / "score_curve.png")
    assert "Vision Lab" in "".join(parsed.text)

    server, _ = _start_server(store_root, str(tmp_path / "remote.sqlite3"))
    try:
        remote = tmp_path / "remote"
        export = tmp_path / "remote.nwb"
        argv = [*common, "--address", f"127.0.0.1:{server.port}", "--report", str(remote)]
        assert main([*argv, "--export", str(export)]) == 0, capsys.readouterr().err
    finally:
        server.stop(0)
    parsed = _parse(remote / "index.html")
    # The remote session's report is built from an HDF5 export, linked beside the NWB one.
    assert sorted(Path(link).suffix for link in parsed.links) == [".h5", ".nwb"]
    assert all((remote / link).is_file() for link in parsed.links)
    for src in parsed.images:
        with Image.open(remote / src) as image:
            image.load()
    _not_blank(remote / "best_stimuli.png")
