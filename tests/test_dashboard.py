"""The live session dashboard over real HTTP: a real server (closed loop over gRPC on loopback, the
dashboard on its HTTP listener), sessions created and told by a gRPC client as a rig does, and plain
HTTP requests. Auth (nothing without the token or its cookie; the cookie only for /ui), the JSON
against the static report's numbers, images, the report page and figures, NWB/HDF5 downloads read
back, caching (304s) and errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from neurotwin.engines.journal import SqliteJournal
from neurotwin.engines.session_export import collect
from neurotwin.engines.session_import import read_hdf5
from neurotwin.reports.session_summary import summarize_session
from neurotwin.server.dashboard_auth import COOKIE, CookieAuth
from PIL import Image

from tests._closed_loop import NEURONS, natural_png
from tests._dashboard import TOKEN, Served, dashboard_server, tell_generation

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def served(store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    journal = tmp_path_factory.mktemp("dashboard") / "journal.sqlite3"
    with dashboard_server(store_root, journal) as served:
        yield served


@pytest.fixture(scope="module")
def session_id(served: Served) -> str:
    """A GA session with natural references, 3 generations told (the GA re-shows its elites)."""
    sid = served.client.create_session(
        session_id="dash-ga",
        neuron_count=NEURONS,
        target_neurons=[2],
        optimizer="ga",
        population_size=6,
        natural_images=[natural_png(i) for i in range(3)],
        natural_per_generation=2,
        seed=5,
        max_generations=20,
        description=HOSTILE,
        metadata={"lab": HOSTILE, "species": "Macaca mulatta"},
    ).session_id
    for _ in range(3):
        tell_generation(served.client, sid, seed=1)
    return sid


def _login(served: Served) -> str:
    """Log in through the form as a browser does; the cookie header value to send afterwards."""
    reply = served.request(
        "POST",
        "/ui/login",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": served.base},
        body=urllib.parse.urlencode({"token": TOKEN}).encode(),
    )
    assert reply.status == 303 and reply.headers["location"] == "./"
    (cookie,) = reply.cookies
    return cookie.split(";", 1)[0]


# ------------------------------------------------------------------------------------------------
# Auth


def test_nothing_is_served_without_a_credential(served: Served, session_id: str) -> None:
    base = f"/ui/api/sessions/{session_id}"
    protected = [
        "/ui/static/dashboard.js",
        "/ui/static/dashboard.css",
        "/ui/api/sessions",
        base,
        f"{base}/images/0/0",
        f"{base}/export.nwb",
        f"{base}/export.h5",
        f"/ui/sessions/{session_id}/report",
        f"/ui/sessions/{session_id}/figures/score_curve.png",
        "/ui/api/sessions/no-such-session",
        "/ui/no-such-page",
    ]
    forged = f"{COOKIE}=9999999999.bm9uY2U.{'A' * 43}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": forged}, {"Cookie": f"{COOKIE}=junk"}):
        for path in protected:
            reply = served.get(path, headers=headers)
            assert reply.status == 401, (path, headers, reply.status)
            assert reply.headers["www-authenticate"] == 'Bearer realm="neurotwin"'
            assert session_id.encode() not in reply.body and b"dashboard.js" not in reply.body
        # Page loads go to the login form instead.
        for path, target in (("/ui/", "login"), ("/ui", "ui/login")):
            reply = served.get(path, headers=headers)
            assert (reply.status, reply.headers["location"]) == (303, target)
            assert session_id.encode() not in reply.body
    form = served.get("/ui/login")
    assert form.status == 200 and b'name="token"' in form.body and b'type="password"' in form.body
    assert session_id.encode() not in form.body and b"<script" not in form.body
    assert "style-src 'sha256-" in form.headers["content-security-policy"]
    assert form.headers["cache-control"] == "no-store"


def test_login_cookie_opens_the_dashboard_and_nothing_else(served: Served, session_id: str) -> None:
    reply = served.request(
        "POST",
        "/ui/login",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": served.base},
        body=urllib.parse.urlencode({"token": TOKEN}).encode(),
    )
    (set_cookie,) = reply.cookies
    attributes = {a.strip().split("=", 1)[0].lower(): a.strip() for a in set_cookie.split(";")[1:]}
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/ui" and attributes["max-age"] == "Max-Age=28800"
    cookie = set_cookie.split(";", 1)[0]
    assert TOKEN not in cookie, "the cookie must not carry the token"

    page = served.get("/ui/", headers={"Cookie": cookie})
    assert page.status == 200 and b"static/dashboard.js" in page.body
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert served.get("/ui/api/sessions", headers={"Cookie": cookie}).status == 200
    assert served.get(f"/ui/api/sessions/{session_id}/images/0/0", headers={"Cookie": cookie}).status == 200

    # The cookie is not a bearer token: the rest of the API, and anything but GET, still want the token.
    assert served.get("/v2", headers={"Cookie": cookie}).status in (401, 404)
    assert served.request("POST", "/ui/api/sessions", headers={"Cookie": cookie}).status == 401

    # Logging out clears it.
    out = served.request("POST", "/ui/logout", headers={"Cookie": cookie, "Origin": served.base})
    assert out.status == 303 and out.headers["location"] == "login"
    assert any(c.startswith(f'{COOKIE}=""') or "Max-Age=0" in c for c in out.cookies)


def test_login_refuses_wrong_tokens_and_other_sites(served: Served) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    started = time.monotonic()
    wrong = served.request(
        "POST", "/ui/login", headers={**form, "Origin": served.base}, body=b"token=not-the-token"
    )
    assert wrong.status == 401 and not wrong.cookies
    assert b"not valid" in wrong.body and time.monotonic() - started >= 0.9, "a wrong token costs a second"
    empty = served.request("POST", "/ui/login", headers=form, body=b"")
    assert empty.status == 401 and not empty.cookies
    body = urllib.parse.urlencode({"token": TOKEN}).encode()
    for header in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = served.request("POST", "/ui/login", headers={**form, **header}, body=body)
        assert refused.status == 403 and not refused.cookies
    # A client that is not a browser (no Origin, no Sec-Fetch-Site) may log in too.
    assert served.request("POST", "/ui/login", headers=form, body=body).status == 303


def test_cookies_expire_and_follow_the_token_list() -> None:
    auth = CookieAuth({"alpha", "beta"}, secure=False, login_page="", lifetime_s=60)
    now = 1_000_000.0
    cookie = auth.issue("beta", now=now)
    assert auth.cookie_valid(cookie, now=now + 59)
    assert not auth.cookie_valid(cookie, now=now + 61), "expired"
    expires, nonce, mac = cookie.split(".")
    assert not auth.cookie_valid(f"{int(expires) + 3600}.{nonce}.{mac}", now=now), "expiry is signed"
    assert not auth.cookie_valid(f"{expires}.{nonce}.{mac[:-2]}AA", now=now)
    # A replica with the same tokens accepts it; removing the token used voids it.
    assert CookieAuth({"beta", "alpha"}, False, "").cookie_valid(cookie, now=now)
    assert not CookieAuth({"alpha"}, False, "").cookie_valid(cookie, now=now)
    with pytest.raises(ValueError):
        auth.issue("gamma")


def test_without_tokens_the_dashboard_is_open(store_root: Path, tmp_path: Path) -> None:
    with dashboard_server(store_root, tmp_path / "journal.sqlite3", token=None) as served:
        served.client.create_session(
            session_id="open", neuron_count=NEURONS, target_neurons=[0], population_size=4
        )
        assert served.get("/ui/").status == 200
        assert served.get("/ui/login").headers["location"] == "./"
        assert [s["session_id"] for s in served.get("/ui/api/sessions").json()["sessions"]] == ["open"]


# ------------------------------------------------------------------------------------------------
# Data


def test_session_json_matches_the_static_report(served: Served, session_id: str, tmp_path: Path) -> None:
    listing = served.get("/ui/api/sessions", bearer=True).json()["sessions"]
    row = next(s for s in listing if s["session_id"] == session_id)
    assert row["status"] == "open" and row["generations_told"] == 3 and row["max_generations"] == 20
    assert row["description"] == HOSTILE and row["best_score"] is not None

    reply = served.get(f"/ui/api/sessions/{session_id}", bearer=True)
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    data = reply.json()
    journal = SqliteJournal(str(served.engine.journal.url).removeprefix("sqlite:///"))
    try:
        summary = summarize_session(collect(journal, session_id), top=8)
    finally:
        journal.close()
    # The same numbers as rig-sim --report shows.
    assert [g["generation"] for g in data["generations"]] == [0, 1, 2]
    for got, want in zip(data["generations"], summary.generations, strict=True):
        assert got["synthetic_mean"] == pytest.approx(want.synthetic_mean)
        assert got["natural_max"] == pytest.approx(want.natural_max)
        assert got["best_so_far"] == pytest.approx(want.best_so_far)
    assert [b["stimulus_id"] for b in data["best"]] == [s.stimulus_id for s in summary.best]
    assert [b["confirmations"] for b in data["best"]] == [list(s.confirmations) for s in summary.best]
    assert any(b["confirmed_score"] is not None for b in data["best"]), "the GA re-shows its elites"
    assert all(b["confirmed_score"] is None for b in data["best"] if not b["confirmations"])
    assert data["best_natural"]["kind"] == "natural"
    assert len(data["last_generation"]) == 6 + 2 and {s["generation"] for s in data["last_generation"]} == {2}
    assert data["metadata"]["lab"] == HOSTILE and data["target_neuron_ids"] == ["neuron2"]
    assert data["status"] == "open" and data["generations_told"] == 3

    # Image URLs are relative to /ui/ and serve the image the rig was shown.
    for stimulus in [*data["best"], data["best_natural"], *data["last_generation"]]:
        image = served.get("/ui/" + stimulus["image_url"], bearer=True)
        assert image.status == 200 and image.headers["content-type"] in ("image/png", "image/jpeg")
        assert hashlib.sha256(image.body).hexdigest() == stimulus["sha256"]
        with Image.open(io.BytesIO(image.body)) as decoded:
            assert decoded.size[0] > 0
    assert {e["label"] for e in data["exports"]} == {"NWB", "HDF5"}


def test_polls_are_cheap_until_a_tell_changes_the_session(served: Served, session_id: str) -> None:
    path = f"/ui/api/sessions/{session_id}"
    first = served.get(path, bearer=True)
    etag = first.headers["etag"]
    again = served.get(path, bearer=True, headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    listing = served.get("/ui/api/sessions", bearer=True)
    assert (
        served.get("/ui/api/sessions", bearer=True, headers={"If-None-Match": listing.headers["etag"]}).status
        == 304
    )

    generation = tell_generation(served.client, session_id, seed=2)
    changed = served.get(path, bearer=True, headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["etag"] != etag
    data = changed.json()
    assert data["revision"] > first.json()["revision"]
    assert data["generations"][-1]["generation"] == generation == data["generations_told"] - 1
    assert {s["generation"] for s in data["last_generation"]} == {generation}
    image = served.get("/ui/" + data["last_generation"][0]["image_url"], bearer=True)
    assert (
        served.get(
            "/ui/" + data["last_generation"][0]["image_url"],
            bearer=True,
            headers={"If-None-Match": image.headers["etag"]},
        ).status
        == 304
    )


def test_report_page_and_figures(served: Served, session_id: str) -> None:
    page = served.get(f"/ui/sessions/{session_id}/report", bearer=True)
    assert page.status == 200
    html = page.body.decode()
    assert HOSTILE not in html and "&lt;script&gt;" in html, "session text is escaped"
    csp = page.headers["content-security-policy"]
    assert "script-src" not in csp and "default-src 'none'" in csp and "style-src 'sha256-" in csp
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    figures = [s for s in sources if "figures/" in s]
    assert len(figures) == 3 and len(sources) > 3
    for source in sources:
        url = urllib.parse.urljoin(f"/ui/sessions/{session_id}/report", source.replace("&amp;", "&"))
        reply = served.get(url, bearer=True)
        assert reply.status == 200, url
        if "figures/" in source:
            assert reply.headers["content-type"] == "image/png"
            with Image.open(io.BytesIO(reply.body)) as figure:
                pixels = np.asarray(figure.convert("RGB"), dtype=np.float64)
            assert pixels.std() > 5, f"{url} is blank"
    links = re.findall(r'<a href="([^"]+)"', html)
    assert sorted(link.rsplit("/", 1)[-1] for link in links) == ["export.h5", "export.nwb"]


def test_exports_download_through_the_export_code(served: Served, session_id: str, tmp_path: Path) -> None:
    reply = served.get(f"/ui/api/sessions/{session_id}/export.h5", bearer=True)
    assert reply.status == 200
    assert reply.headers["content-disposition"] == f'attachment; filename="{session_id}.h5"'
    h5 = tmp_path / "s.h5"
    h5.write_bytes(reply.body)
    data = served.get(f"/ui/api/sessions/{session_id}", bearer=True).json()
    from_file = summarize_session(read_hdf5(h5))
    assert [g.generation for g in from_file.generations] == [g["generation"] for g in data["generations"]]
    assert [s.stimulus_id for s in from_file.best] == [b["stimulus_id"] for b in data["best"]]

    reply = served.get(f"/ui/api/sessions/{session_id}/export.nwb", bearer=True)
    assert reply.status == 200 and reply.body[:8] == b"\x89HDF\r\n\x1a\n"
    nwb = tmp_path / "s.nwb"
    nwb.write_bytes(reply.body)
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(nwb), "r") as io_:
        trials = io_.read().trials
        assert len(trials) == data["presentations_told"]


def test_errors(served: Served, session_id: str) -> None:
    def error(path: str, method: str = "GET") -> tuple[int, str]:
        reply = served.request(method, path, bearer=True)
        return reply.status, reply.json()["error"] if reply.body.startswith(b"{") else ""

    status, message = error("/ui/api/sessions/nope")
    assert status == 404 and "nope" in message
    assert error("/ui/api/sessions/nope/export.nwb")[0] == 404
    assert error("/ui/sessions/nope/report")[0] == 404
    status, message = error(f"/ui/api/sessions/{session_id}/images/0/999")
    assert status == 404 and "999" in message
    assert error(f"/ui/api/sessions/{session_id}/images/99/0")[0] == 404
    status, message = error(f"/ui/api/sessions/{session_id}/export.zip")
    assert status == 404 and "export.nwb" in message
    status, message = error(f"/ui/sessions/{session_id}/figures/secrets.png")
    assert status == 404 and "score_curve" in message
    assert error("/ui/static/index.html")[0] == 404
    assert error("/ui/static/..%2Fdashboard_auth.py")[0] == 404
    assert error("/ui/api/sessions", method="POST")[0] == 405
    assert error(f"/ui/api/sessions/{session_id}", method="DELETE")[0] == 405


def test_closed_and_finished_sessions_show_their_status(served: Served) -> None:
    sid = served.client.create_session(
        session_id="dash-short",
        neuron_count=NEURONS,
        target_neurons=[1],
        population_size=4,
        max_generations=1,
    ).session_id
    tell_generation(served.client, sid, seed=3)
    assert served.get(f"/ui/api/sessions/{sid}", bearer=True).json()["status"] == "finished"
    served.client.close_session(sid)
    rows = served.get("/ui/api/sessions", bearer=True).json()["sessions"]
    assert next(r for r in rows if r["session_id"] == sid)["status"] == "closed"
    assert rows[0]["session_id"] == sid, "newest first"


def test_assets_ship_as_package_data() -> None:
    import tomllib

    from neurotwin.server.dashboard import ASSET_FOLDER, load_assets

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["neurotwin.server"]
    folder = ROOT / "services" / "neurotwin" / "server" / ASSET_FOLDER
    shipped = {p.name for pattern in patterns for p in folder.parent.glob(pattern)}
    assert shipped == {p.name for p in folder.iterdir() if p.is_file()}
    assert set(load_assets()) <= shipped


def test_curl_examples_of_the_docs(served: Served, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    served.client.create_session(
        session_id="demo", neuron_count=NEURONS, target_neurons=[3], population_size=4
    )
    tell_generation(served.client, "demo", seed=4)
    block = re.search(r"```shell\n(.*?)```", (ROOT / "docs" / "HTTP.md").read_text(), re.S)
    assert block, "docs/HTTP.md has no dashboard curl example"
    commands = block.group(1).strip().splitlines()
    assert len(commands) == 2
    env = {**os.environ, "NEUROTWIN_TOKEN": TOKEN}
    outputs = []
    for command in commands:
        command = command.replace("http://127.0.0.1:8000", served.base)
        run = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
        )
        assert run.returncode == 0, (command, run.stderr)
        outputs.append(run.stdout)
    assert "demo" in [s["session_id"] for s in json.loads(outputs[0])["sessions"]]
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(tmp_path / "demo.nwb"), "r") as io_:
        assert io_.read().identifier


def test_summaries_are_recomputed_only_when_what_they_show_changes(served: Served) -> None:
    from neurotwin.reports.session_live import LiveSessions

    sid = served.client.create_session(
        session_id="dash-cache", neuron_count=NEURONS, target_neurons=[0], population_size=4
    ).session_id
    tell_generation(served.client, sid, seed=6)
    live = LiveSessions(served.engine.journal, min_interval_s=0)
    first = live.snapshot(sid)
    assert live.snapshot(sid) is first
    # An Ask that proposes a generation bumps the revision but changes nothing a summary shows.
    pending = served.client.ask(sid)
    assert served.engine.journal.get_session(sid).revision > first.revision
    assert live.snapshot(sid) is first
    served.client.tell(sid, pending.generation, {s.stimulus_id: np.ones(NEURONS) for s in pending.stimuli})
    second = live.snapshot(sid)
    assert second is not first and second.summary.generations_told == 2

    # With a minimum interval, a Tell within it is shown by a later poll, not recomputed at once.
    throttled = LiveSessions(served.engine.journal, min_interval_s=3600)
    held = throttled.snapshot(sid)
    tell_generation(served.client, sid, seed=7)
    assert throttled.snapshot(sid) is held
    throttled.min_interval_s = 0
    assert throttled.snapshot(sid).summary.generations_told == 3

    # Rows are read incrementally (told generations are kept): the summary is still the one the
    # static report makes from a full read, with a generation proposed but not told, and after it.
    served.client.ask(sid)
    for _ in range(2):
        incremental = live.snapshot(sid).summary
        journal = SqliteJournal(str(served.engine.journal.url).removeprefix("sqlite:///"))
        try:
            full = summarize_session(collect(journal, sid, with_images=False), top=8)
        finally:
            journal.close()
        assert incremental == full
        tell_generation(served.client, sid, seed=11)


def test_long_summaries_stretch_the_refresh_interval(served: Served) -> None:
    from neurotwin.reports.session_live import COST_FACTOR, LiveSessions, Snapshot

    sid = served.client.create_session(
        session_id="dash-cost", neuron_count=NEURONS, target_neurons=[0], population_size=4
    ).session_id
    tell_generation(served.client, sid, seed=8)
    live = LiveSessions(served.engine.journal, min_interval_s=0.01)
    first = live.snapshot(sid)
    # As if that summary had taken a minute: the next may wait COST_FACTOR minutes.
    live._summaries[sid] = Snapshot(first.record, first.summary, time.monotonic(), cost=60.0)
    tell_generation(served.client, sid, seed=9)
    held = live.snapshot(sid)
    assert held.summary.generations_told == 1 and COST_FACTOR * 60.0 > 0.01
    live._summaries[sid] = Snapshot(
        first.record, first.summary, time.monotonic() - 61 * COST_FACTOR, cost=60.0
    )
    assert live.snapshot(sid).summary.generations_told == 2
