"""The dashboard in a real browser: Debian's headless Chromium (installed by the README's test command
and ``.ci/run``), driven over the DevTools protocol on a pipe, against a real server whose sessions a
gRPC client creates and tells as a rig does. The browser logs in through the form, the page must draw
the session (checked in the DOM and in a screenshot: not blank, the score curve's colors where the
curve is), follow new Tells while it is open, and never run text from a session as code."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from neurotwin.reports.session_report import NATURAL_COLOR, SYNTHETIC_COLOR
from PIL import Image

from tests._chromium import HeadlessChromium, chromium_path
from tests._closed_loop import NEURONS, natural_png
from tests._dashboard import TOKEN, Served, dashboard_server, tell_generation

HOSTILE = '<img src=x onerror="window.pwned=1">'
# Collects Content-Security-Policy violations of every document (CDP scripts are exempt from CSP).
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
    (e) => window.cspViolations.push(e.violatedDirective + " " + e.blockedURI));
"""


@pytest.fixture
def browser() -> Iterator[HeadlessChromium]:
    binary = chromium_path()
    if binary is None:
        # Not a skip: the README's test command (and CI) install Debian's chromium for this test.
        pytest.fail("no Chromium: apt-get install chromium (or set NEUROTWIN_CHROMIUM)")
    with HeadlessChromium(binary, width=1280, height=1100) as chromium:
        chromium.add_init_script(RECORD_CSP_VIOLATIONS)
        yield chromium


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _color_count(pixels: np.ndarray, color: str, tolerance: float = 40.0) -> int:
    return int((np.abs(pixels - _rgb(color)).sum(axis=-1) < tolerance).sum())


def _curve_box(browser: HeadlessChromium) -> tuple[int, int, int, int]:
    box = browser.evaluate(
        "(() => { const r = document.getElementById('curve').getBoundingClientRect();"
        " return [r.left, r.top, r.right, r.bottom].map(Math.round); })()"
    )
    return tuple(box)


def _session(served: Served, session_id: str, description: str = "", generations: int = 0) -> str:
    sid = served.client.create_session(
        session_id=session_id,
        neuron_count=NEURONS,
        target_neurons=[2],
        optimizer="ga",
        population_size=6,
        natural_images=[natural_png(i) for i in range(3)],
        natural_per_generation=2,
        seed=7,
        max_generations=30,
        description=description,
        metadata={"lab": description} if description else None,
    ).session_id
    for _ in range(generations):
        tell_generation(served.client, sid, seed=9)
    return sid


def test_dashboard_in_chromium(
    store_root: Path,
    tmp_path: Path,
    browser: HeadlessChromium,
) -> None:
    with dashboard_server(store_root, tmp_path / "journal.sqlite3") as served:
        hostile = _session(served, "hostile", description=HOSTILE, generations=1)
        sid = _session(served, "rig-a", generations=3)

        # Not logged in: the page load lands on the login form and shows nothing of the sessions.
        browser.navigate(f"{served.base}/ui/?poll=300")
        assert browser.evaluate("location.pathname") == "/ui/login"
        text = browser.evaluate("document.body.innerText")
        assert "API token" in text and sid not in text
        # The login page's inline style passed its CSP hash.
        assert browser.evaluate("getComputedStyle(document.querySelector('main')).borderRadius") == "6px"
        browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
        browser.evaluate("document.querySelector('form').submit()")
        browser.wait_for_event("Page.loadEventFired")
        assert browser.evaluate("location.pathname") == "/ui/"

        # The newest session is selected and drawn.
        browser.wait_for(f"document.body.dataset.sessionId === {json.dumps(sid)}", what="the session drawn")
        assert browser.evaluate("document.body.dataset.generations") == "3"
        rows = browser.evaluate(
            "[...document.querySelectorAll('#sessions tbody tr')].map(r => r.innerText.split('\\t')[0])"
        )
        assert rows == [sid, hostile]
        points = browser.evaluate(
            "[...document.querySelectorAll('#curve g')].map(g => [g.id, Number(g.dataset.points)])"
        )
        assert dict(points) == {
            "curve-synthetic-mean": 3,
            "curve-synthetic-max": 3,
            "curve-best-so-far": 3,
            "curve-natural-mean": 3,
            "curve-natural-max": 3,
        }
        cards = browser.evaluate("document.querySelectorAll('#best .card').length")
        assert cards == 8 + 1, "8 best synthetic images and the best natural one"
        confirmed = browser.evaluate(
            "[...document.querySelectorAll('#best .confirmed')].map(e => e.textContent)"
        )
        assert any(c.startswith("confirmed") for c in confirmed), "the GA re-shows its elites"
        assert browser.evaluate("document.querySelectorAll('#last .card').length") == 6 + 2
        browser.wait_for(
            "[...document.images].every(i => i.complete && i.naturalWidth > 0)", what="every image loaded"
        )
        # The download links work with the login cookie (the same request a click makes); the HDF5
        # one is fetched (NWB's is the same route, downloaded in test_dashboard.py).
        links = browser.evaluate(
            "[...document.querySelectorAll('a.export')].map(a => [a.textContent, a.href])"
        )
        assert [label for label, _ in links] == ["NWB", "HDF5"]
        assert links[0][1] == f"{served.base}/ui/api/sessions/{sid}/export.nwb"
        status, size, magic = browser.evaluate(
            "(async () => { const r = await fetch(document.querySelectorAll('a.export')[1].href);"
            " const b = new Uint8Array(await r.arrayBuffer()); return [r.status, b.length,"
            " Array.from(b.slice(1, 4))]; })()"
        )
        assert status == 200 and size > 10_000 and bytes(magic) == b"HDF"

        first = browser.screenshot(tmp_path / "dashboard-3.png")
        pixels = _pixels(first)
        assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "blank screenshot"
        left, top, right, bottom = _curve_box(browser)
        curve = pixels[top:bottom, left:right]
        assert _color_count(curve, SYNTHETIC_COLOR) > 150, "the synthetic curve is not drawn"
        assert _color_count(curve, NATURAL_COLOR) > 150, "the natural reference curve is not drawn"
        assert _color_count(pixels[:, :left], SYNTHETIC_COLOR) < _color_count(curve, SYNTHETIC_COLOR)

        # The rig goes on: the open page follows.
        revision = int(browser.evaluate("document.body.dataset.revision"))
        for _ in range(2):
            tell_generation(served.client, sid, seed=10)
        browser.wait_for("document.body.dataset.generations === '5'", timeout=45, what="two more generations")
        assert int(browser.evaluate("document.body.dataset.revision")) > revision
        assert browser.evaluate("document.getElementById('last-title').textContent").startswith(
            "Last told generation (4)"
        )
        assert browser.evaluate("document.querySelector('#curve-synthetic-mean').dataset.points") == "5"
        browser.wait_for(
            "[...document.images].every(i => i.complete && i.naturalWidth > 0)", what="new images loaded"
        )
        second = _pixels(browser.screenshot(tmp_path / "dashboard-5.png"))
        assert np.abs(second[top:bottom, left:right] - curve).sum() > 0, "the curve was not redrawn"
        served.client.close_session(sid)
        browser.wait_for(
            f"document.querySelector('#sessions tr[data-session-id={json.dumps(sid)}] .status')"
            ".textContent === 'closed'",
            what="the closed status",
        )

        # Text from a session is shown as text, never run.
        browser.evaluate(f"document.querySelector('tr[data-session-id={json.dumps(hostile)}]').click()")
        browser.wait_for(
            f"document.body.dataset.sessionId === {json.dumps(hostile)}", what="the other session"
        )
        assert HOSTILE in browser.evaluate("document.getElementById('settings').innerText")
        assert browser.evaluate("window.pwned") is None
        assert browser.evaluate("window.cspViolations") == []

        # The static report's page, live, in the browser: figures and images load, its style applies.
        browser.navigate(f"{served.base}/ui/sessions/{sid}/report")
        browser.wait_for(
            "document.images.length > 3 && [...document.images].every(i => i.complete && i.naturalWidth > 0)",
            what="the report's figures",
        )
        assert (
            browser.evaluate("getComputedStyle(document.querySelector('table')).borderCollapse") == "collapse"
        )
        assert browser.evaluate("window.cspViolations") == []
        report = _pixels(browser.screenshot(tmp_path / "report.png"))
        assert report.std() > 5

        # Logging out ends it: the page is the login form again.
        browser.navigate(f"{served.base}/ui/")
        browser.evaluate("document.querySelector('header form').submit()")
        browser.wait_for_event("Page.loadEventFired")
        assert browser.evaluate("location.pathname") == "/ui/login"
        browser.navigate(f"{served.base}/ui/")
        assert browser.evaluate("location.pathname") == "/ui/login"
        assert io.BytesIO(first.read_bytes()).getbuffer().nbytes > 0
