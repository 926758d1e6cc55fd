"""Live dashboard benchmark: what watching a running session costs, and what the rig feels of it.

    python bench/dashboard.py                  # 60 generations x 40 images told first, then measured
    python bench/dashboard.py --quick          # 15 generations, shorter phases (smoke run)
    python bench/dashboard.py --browsers 8 --poll 0.5

One process serves the closed loop (bundled generator ``v4-dcgan``, SQLite journal in WAL/FULL mode)
and the HTTP listener with the dashboard, behind a token; the rig is a gRPC client on loopback in the
same process (Ask, then Tell Poisson counts for every stimulus), as ``rig-sim`` runs, by default
without pausing to present the images (``--presenting S``: seconds a generation is on screen).
Watchers are threads of a second process speaking plain HTTP as a browser tab does: every
``--poll`` seconds the session list and the session (with ``If-None-Match``), and, when the session
changed, the new last generation's images.

Measured side by side in one run:
1. per request while the rig runs: the first session poll after a Tell (the summary is recomputed for
   the new revision), the same again (cached), a poll with the ETag (304), the session list, the page,
   one stimulus image;
2. the rig's Ask + Tell time per generation alone, then with the watchers, alternating blocks of
   generations so that drift of a shared machine hits both alike; the ratio is the cost to the rig;
3. once: the HDF5 download (and the NWB one with ``--nwb``: pynwb takes minutes for a long session)
   and the live report page and its score-curve figure (matplotlib) at the end.

Without the bundled generator (or with ``--stand-in``) a tiny random DCGAN is used.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_STORE = ROOT / "model_store"
GENERATOR = "v4-dcgan"
TOKEN = "bench-dashboard-token"
NEURONS = 16


def _stand_in_store(root: Path) -> tuple[Path, str]:
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator
    from neurotwin.store import GENERATORS, ModelStore

    torch.manual_seed(0)
    with ModelStore(root).new_version(GENERATORS, "tiny-gan") as folder:
        save_generator(DCGANGenerator(latent_dim=8, resolution=16, width=8), folder, "tiny-gan")
    return root, "tiny-gan"


def _png(seed: int, size: int = 64) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = connection.getresponse()
        body = response.read()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def _timed_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[float, int, bytes]:
    started = time.perf_counter()
    status, body, _ = _get(port, path, headers)
    return (time.perf_counter() - started) * 1000, status, body


# ------------------------------------------------------------------------------------------------
# Watchers (a separate process, so their own CPU time is not the server's GIL's)


def _watch(port: int, session_id: str, poll: float, stop: Any, counts: Any) -> None:
    etag = ""
    seen_revision = -1
    cached: set[str] = set()  # images a browser has cached (they answer with max-age)
    while not stop.is_set():
        started = time.monotonic()
        _get(port, "/ui/api/sessions")
        status, body, headers = _get(port, f"/ui/api/sessions/{session_id}", {"If-None-Match": etag})
        with counts.get_lock():
            counts.value += 2
        if status == 200:
            etag = headers.get("etag", "")
            data = json.loads(body)
            if data["revision"] != seen_revision:
                seen_revision = data["revision"]
                new = [s["image_url"] for s in data["last_generation"] if s["image_url"] not in cached]
                for url in new:
                    _get(port, "/ui/" + url)
                cached.update(new)
                with counts.get_lock():
                    counts.value += len(new)
        stop.wait(max(0.0, poll - (time.monotonic() - started)))


def _watchers(port: int, session_id: str, browsers: int, poll: float, stop: Any, counts: Any) -> None:
    threads = [
        threading.Thread(target=_watch, args=(port, session_id, poll, stop, counts), daemon=True)
        for _ in range(browsers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# ------------------------------------------------------------------------------------------------
# Rig


class Rig:
    def __init__(self, client: Any, session_id: str, seed: int = 0) -> None:
        self.client = client
        self.session_id = session_id
        self.rng = np.random.default_rng(seed)

    def generation(self, presenting_s: float = 0.0) -> tuple[float, int]:
        """One generation: Ask, ``presenting_s`` of showing the images, Tell. The wall ms of Ask + Tell
        (the server's part, what the rig waits for) and the generation number."""
        started = time.perf_counter()
        pending = self.client.ask(self.session_id)
        asked = time.perf_counter()
        time.sleep(presenting_s)
        responses = {
            s.stimulus_id: self.rng.poisson(4.0, (1, NEURONS)).astype(np.float32) for s in pending.stimuli
        }
        told = time.perf_counter()
        self.client.tell(self.session_id, pending.generation, responses)
        return (asked - started + time.perf_counter() - told) * 1000, pending.generation


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.1f} / {p90:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="15 generations told first, short phases")
    parser.add_argument("--prefill", type=int, default=60, help="generations told before measuring")
    parser.add_argument("--population", type=int, default=36, help="synthetic images per generation")
    parser.add_argument("--natural", type=int, default=4, help="natural references per generation")
    parser.add_argument("--browsers", type=int, default=4, help="watching browser tabs")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between a tab's polls")
    parser.add_argument("--refresh", type=float, default=1.0, help="--closed-loop-dashboard-refresh-seconds")
    parser.add_argument(
        "--presenting",
        type=float,
        default=0.0,
        help="seconds the rig spends showing a generation between Ask and Tell (0: none, the worst case)",
    )
    parser.add_argument("--blocks", type=int, default=4, help="alternating alone/watched blocks")
    parser.add_argument("--block-generations", type=int, default=8)
    parser.add_argument(
        "--stand-in", action="store_true", help="a tiny random generator, not the bundled one"
    )
    parser.add_argument("--nwb", action="store_true", help="also time the NWB download (pynwb: minutes)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prefill, args.blocks, args.block_generations = 15, 2, 4

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from neurotwin.client.closed_loop import ClosedLoopClient
    from neurotwin.reports.session_live import LiveSessions
    from neurotwin.server import closed_loop as service
    from neurotwin.server.common import GrpcServer
    from neurotwin.server.config import ServerSettings

    scratch = Path(tempfile.mkdtemp(prefix="neurotwin-bench-dashboard-"))
    store, generator = BUNDLED_STORE, GENERATOR
    if args.stand_in or not (BUNDLED_STORE / "generators" / GENERATOR).is_dir():
        store, generator = _stand_in_store(scratch / "store")
    server = GrpcServer(
        ServerSettings(port=0, metrics_port=-1, http_port=0, auth_tokens=[TOKEN], grace_seconds=2)
    )
    engine = service.attach(
        server,
        service.Settings(
            model_store=str(store),
            journal=str(scratch / "journal.sqlite3"),
            default_generator=generator,
            compute_threads=1,
            dashboard_refresh_seconds=args.refresh,
        ),
    )
    server_journal = engine.journal
    server.start()
    port = server.http_port
    assert port is not None
    client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120, token=TOKEN)
    session_id = client.create_session(
        session_id="bench",
        neuron_count=NEURONS,
        target_neurons=[3],
        optimizer="ga",
        population_size=args.population,
        natural_images=[_png(i) for i in range(max(args.natural * 2, 1))] if args.natural else [],
        natural_per_generation=args.natural,
        seed=0,
    ).session_id
    rig = Rig(client, session_id)
    started = time.perf_counter()
    for _ in range(args.prefill):
        rig.generation()
    prefill_s = time.perf_counter() - started
    images_per_generation = args.population + args.natural
    print(
        f"dashboard bench: generator {generator}, {images_per_generation} images/generation, "
        f"{args.prefill} generations told in {prefill_s:.1f} s; {args.browsers} tabs polling every "
        f"{args.poll} s; summaries at most every {args.refresh} s",
        flush=True,
    )

    # 1. Requests while the rig runs (here: between its generations, one sample each per generation).
    requests: dict[str, list[float]] = {
        name: []
        for name in (
            "summary recompute (journal read + summarize, in process)",
            "session, first poll after a Tell",
            "session, again",
            "session, 304",
            "list",
            "page",
            "image",
        )
    }
    recompute = LiveSessions(server_journal, min_interval_s=0)
    base = f"/ui/api/sessions/{session_id}"
    for _ in range(max(4, args.block_generations)):
        rig.generation()
        begun = time.perf_counter()
        recompute.snapshot(session_id)
        requests["summary recompute (journal read + summarize, in process)"].append(
            (time.perf_counter() - begun) * 1000
        )
        ms, status, body = _timed_get(port, base)
        assert status == 200, body[:200]
        requests["session, first poll after a Tell"].append(ms)
        ms, _, _ = _timed_get(port, base)
        requests["session, again"].append(ms)
        # The summary may still change under the ETag (the refresh interval passes): ask again.
        for _ in range(10):
            etag = _get(port, base)[2]["etag"]
            ms, status, _ = _timed_get(port, base, {"If-None-Match": etag})
            if status == 304:
                break
        assert status == 304
        requests["session, 304"].append(ms)
        requests["list"].append(_timed_get(port, "/ui/api/sessions")[0])
        requests["page"].append(_timed_get(port, "/ui/")[0])
        image = json.loads(body)["last_generation"][0]["image_url"]
        requests["image"].append(_timed_get(port, "/ui/" + image)[0])
    session_bytes = len(_get(port, base)[1])

    # 2. The rig alone and watched, alternating.
    alone: list[float] = []
    watched: list[float] = []
    watcher_requests = 0
    watched_seconds = 0.0
    context = multiprocessing.get_context("spawn")
    for _ in range(args.blocks):
        alone += [rig.generation(args.presenting)[0] for _ in range(args.block_generations)]
        stop = context.Event()
        counts = context.Value("i", 0)
        process = context.Process(
            target=_watchers, args=(port, session_id, args.browsers, args.poll, stop, counts), daemon=True
        )
        process.start()
        time.sleep(min(2.0, 2 * args.poll))  # the tabs have loaded and are polling
        begun = time.monotonic()
        watched += [rig.generation(args.presenting)[0] for _ in range(args.block_generations)]
        watched_seconds += time.monotonic() - begun
        stop.set()
        process.join(30)
        watcher_requests += counts.value

    # 3. Once: downloads and the live report page.
    once = {"export.h5 download": _timed_get(port, f"{base}/export.h5")}
    if args.nwb:
        once["export.nwb download"] = _timed_get(port, f"{base}/export.nwb")
    once["report page"] = _timed_get(port, f"/ui/sessions/{session_id}/report")
    once["report figure (score curve)"] = _timed_get(
        port, f"/ui/sessions/{session_id}/figures/score_curve.png"
    )
    generations = client.get_session(session_id).generations_told
    client.close()
    server.stop(0)

    print(
        f"\nrequests while the rig runs ({generations} generations at the end; "
        f"session JSON {session_bytes} bytes)"
    )
    print("| request | ms p50 / p90 |")
    print("|---|---|")
    for name, values in requests.items():
        print(f"| {name} | {_stats(values)} |")
    ratio = statistics.median(watched) / statistics.median(alone)
    print(
        f"\nrig, Ask + Tell per generation ({args.blocks} x {args.block_generations} generations each way, "
        f"{args.presenting} s presenting each)"
    )
    print("| rig | ms p50 / p90 |")
    print("|---|---|")
    print(f"| alone | {_stats(alone)} |")
    print(f"| {args.browsers} tabs polling every {args.poll} s | {_stats(watched)} |")
    print(f"| ratio watched / alone (p50) | {ratio:.2f} |")
    print(f"watchers made {watcher_requests / max(watched_seconds, 1e-9):.1f} requests/s while watching")
    print("\nonce, at the end")
    print("| request | ms | bytes |")
    print("|---|---|---|")
    for name, (ms, status, body) in once.items():
        assert status == 200, (name, status)
        print(f"| {name} | {ms:.0f} | {len(body)} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = platform.processor() or platform.machine()
    print(
        f"\nmachine: {os.cpu_count()} CPUs, {cpu}, Python {sys.version.split()[0]}, load average {load:.1f}"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "requests_ms": requests,
                    "rig_alone_ms": alone,
                    "rig_watched_ms": watched,
                    "ratio": ratio,
                    "once_ms": {k: v[0] for k, v in once.items()},
                    "load_average": load,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
