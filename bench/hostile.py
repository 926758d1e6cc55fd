"""Hostile-client benchmark: an attack matrix against a real ``neurotwin serve all`` process.

    python bench/hostile.py                  # the full matrix, fault injection and 30 kill -9s
    python bench/hostile.py --quick          # the matrix, fault injection and 1 kill -9 (CI)
    python bench/hostile.py --kills 50 --out runs/hostile.json
    python bench/hostile.py --reload-only    # only the hot-reload stage (valid, corrupt, NaN versions)

1. Bad inputs over every RPC (bench/_hostile_cases.py): each is one call that a careless or hostile
   client could make. Counted per outcome: refused with a client-fault status (good), accepted where a
   strange but valid request may be (checked: finite numbers, right counts), and the failures: crash
   (the server process died), hang (no answer within 20 s), wrong answer (OK where a refusal is due,
   OK with non-finite or wrong-sized results, INTERNAL/UNKNOWN for a client's fault, an INTERNAL reply
   that carries more than "internal error (id ...)", or a server file read outside the natural root).
2. Fault injection: 80 idle PredictStream calls, 300 idle HTTP connections and a message over the
   size limit, each followed by health, Predict, Ask and Tell, which must still answer.
3. kill -9 during Ask and Tell: a rig keeps running one session while the server is SIGKILLed at
   random moments and restarted on the same journal. Every acknowledged Tell must be in the journal
   exactly once with the values sent (no lost or double-counted response), and the session's counts
   must equal what the rig was told.
4. Hot reload under load (bench/_hostile_reload.py): 32 threads call Predict on ``serve predictor``
   while a valid, a corrupt (flipped weight bytes) and an all-NaN version are dropped into its store.
   0 failed Predicts, 0 non-finite or wrong replies; the corrupt and NaN versions refused, the valid
   one serving at the end.

Prints one JSON summary (and writes it with ``--out``). Uses a tiny random twin and generator built in a
temporary store; CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench._hostile_cases import (  # noqa: E402
    CALL_TIMEOUT,
    GENERATOR,
    NEURONS,
    SIZE,
    TWIN,
    Case,
    Stubs,
    closed_loop_cases,
    encode,
    health_cases,
    kserve_cases,
    predictor_cases,
    synthesizer_cases,
)
from bench._hostile_reload import ReloadReport, build_reload_store, reload_stage  # noqa: E402

CLIENT_FAULTS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
INTERNAL_REPLY = re.compile(r"^internal error \(id [0-9a-f]+\)$")
SECRET = "secret-outside-the-natural-root"


def build_store(folder: Path) -> tuple[Path, Path]:
    """A tiny twin and generator, and a natural-image root with a link that points outside it."""
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator
    from neurotwin.store import GENERATORS, ModelStore

    from tests._models import make_predictor

    store = folder / "store"
    torch.manual_seed(0)
    with ModelStore(store).new_version(GENERATORS, GENERATOR) as version:
        save_generator(DCGANGenerator(latent_dim=8, resolution=16, width=8), version, GENERATOR)
    make_predictor(store, TWIN, neurons=NEURONS, size=SIZE)
    naturals = folder / "naturals"
    (naturals / "set").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        (naturals / "set" / f"n{i}.png").write_bytes(
            encode(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "PNG")
        )
    outside = folder / "outside"
    outside.mkdir()
    # A file the server must never hand out: a uniform image whose pixel value marks it.
    (outside / "secret.png").write_bytes(encode(np.full((24, 24, 3), 251, np.uint8), "PNG"))
    (outside / "notes.txt").write_text(SECRET)
    (naturals / "escape").symlink_to(outside, target_is_directory=True)
    (naturals / "set" / "leak.png").symlink_to(outside / "secret.png")
    return store, naturals


class Server:
    """``neurotwin serve all`` as a child process (so that it can be SIGKILLed)."""

    def __init__(
        self,
        store: Path,
        journal: Path,
        naturals: Path,
        log: Path,
        services: str = "all",
        poll_seconds: float = 0,
        metrics: bool = False,
    ) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "services"), env.get("PYTHONPATH", "")])
        command = [
            sys.executable,
            "-m",
            "neurotwin.cli",
            "serve",
            *services.split(),
            "--port",
            "0",
            "--metrics-port",
            "0" if metrics else "-1",
        ]
        command += ["--http-port", "0", "--model-store", str(store), "--closed-loop-journal", str(journal)]
        command += ["--closed-loop-default-generator", GENERATOR, "--closed-loop-natural-root", str(naturals)]
        command += ["--closed-loop-compute-threads", "1", "--synthesizer-default-generator", GENERATOR]
        command += ["--synthesizer-device", "cpu", "--predictor-poll-seconds", f"{poll_seconds:g}"]
        command += ["--grace-seconds", "1"]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log.open("ab"), env=env, cwd=ROOT
        )
        self.port = self.http_port = self.metrics_port = 0
        deadline = time.monotonic() + 120
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line and self.proc.poll() is not None:
                break
            match = re.search(r"on [\d.]+:(\d+), HTTP on :(\d+)(?:, metrics on :(\d+))?", line)
            if match:
                self.port, self.http_port = int(match.group(1)), int(match.group(2))
                self.metrics_port = int(match.group(3) or 0)
                return
        raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Tally:
    tried: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, str]] = field(default_factory=list)

    def add(self, case: Case, outcome: str, detail: str = "") -> None:
        self.tried += 1
        self.outcomes[outcome] += 1
        if outcome in ("crash", "hang", "wrong"):
            self.failures.append(
                {"rpc": case.rpc, "case": case.name, "outcome": outcome, "detail": detail[:300]}
            )


def classify(case: Case, stubs: Stubs) -> tuple[str, str]:
    try:
        reply = case.call(stubs)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "hang", f"no answer within {CALL_TIMEOUT:g} s"
        if code in CLIENT_FAULTS:
            return (
                ("wrong", f"reply leaks a server file: {details}") if SECRET in details else ("refused", "")
            )
        if code == grpc.StatusCode.INTERNAL and not INTERNAL_REPLY.match(details):
            return "wrong", f"INTERNAL carries more than an id: {details!r}"
        return "wrong", f"{code.name}: {details}"
    if not case.ok:
        return "wrong", "accepted (status OK) where a refusal is due"
    problem = case.check(reply) if case.check is not None else ""
    return ("wrong", problem) if problem else ("accepted", "")


def run_matrix(server: Server, tally: Tally, sid: str, generation: int, ids: list[str]) -> None:
    cases = [
        *predictor_cases(),
        *kserve_cases(),
        *synthesizer_cases(),
        *closed_loop_cases(sid, generation, ids),
        *health_cases(),
    ]
    with grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 128 << 20)]
    ) as channel:
        stubs = Stubs.on(channel)
        for case in cases:
            outcome, detail = classify(case, stubs)
            if not server.alive:
                outcome, detail = "crash", f"server exited with {server.proc.returncode}"
            tally.add(case, outcome, detail)
            if outcome == "crash":
                raise RuntimeError(f"server crashed on {case.rpc}/{case.name}")
    run_http_cases(server, tally)


def run_http_cases(server: Server, tally: Tally) -> None:
    """Bad requests to the REST listener (/v2): 4xx expected, never 5xx or a hang."""
    import http.client

    infer = f"/v2/models/{TWIN}/infer"
    bodies: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("GET", "/v2/models/nope", b"", {}),
        ("GET", "/v2/models/../../etc/passwd", b"", {}),
        ("POST", infer, b"{not json", {}),
        ("POST", infer, b"[]", {}),
        ("POST", infer, b'{"inputs": 5}', {}),
        (
            "POST",
            infer,
            b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1e9], "data": []}]}',
            {},
        ),
        (
            "POST",
            infer,
            b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1,32,32,3], "data": [NaN]}]}',
            {},
        ),
        ("POST", infer, b"\x1f\x8b junk", {"Content-Encoding": "gzip"}),
        ("POST", infer, b"{}", {"Inference-Header-Content-Length": "-5"}),
        ("POST", infer, b"{}", {"Content-Encoding": "br"}),
        ("POST", "/v2/models/tiny/versions/x/infer", b"{}", {}),
        ("DELETE", "/v2", b"", {}),
    ]
    for method, path, body, headers in bodies:
        case = Case("HTTP", f"{method} {path[:40]}", lambda s: None)
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=CALL_TIMEOUT)
        try:
            connection.request(method, path, body=body, headers=headers)
            status = connection.getresponse().status
        except TimeoutError:
            tally.add(case, "hang", "no HTTP answer")
            continue
        except OSError as exc:
            tally.add(case, "crash" if not server.alive else "wrong", str(exc))
            continue
        finally:
            connection.close()
        tally.add(case, "refused" if 400 <= status < 500 else "wrong", f"HTTP {status}")


def fault_injection(server: Server, tally: Tally, sid: str) -> None:
    """Floods and oversized messages; health, Predict, Ask and Tell must answer after each."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from neurotwin.v1 import closed_loop_pb2 as cpb
    from neurotwin.v1 import predictor_pb2 as ppb

    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    request = ppb.PredictRequest(
        model=TWIN, images=[ppb.Image(raw=ppb.RawImage(shape=[SIZE, SIZE, 3], data=pixels.tobytes()))]
    )

    def essentials(stubs: Stubs, label: str) -> None:
        checks = {
            "health": lambda: health_pb2_grpc.HealthStub(stubs.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            ),
            "predict": lambda: stubs.predictor.Predict(request, timeout=CALL_TIMEOUT),
            "ask": lambda: stubs.closed_loop.Ask(
                cpb.AskRequest(session_id=sid, omit_images=True), timeout=CALL_TIMEOUT
            ),
            "get": lambda: stubs.closed_loop.GetSession(
                cpb.GetSessionRequest(session_id=sid), timeout=CALL_TIMEOUT
            ),
        }
        for name, check in checks.items():
            case = Case("fault", f"{label}: {name}", lambda s: None)
            try:
                check()
                tally.add(case, "accepted")
            except grpc.RpcError as exc:
                tally.add(
                    case,
                    "hang" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "wrong",
                    exc.code().name,
                )

    with grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 256 << 20)]
    ) as channel:
        stubs = Stubs.on(channel)
        # 80 PredictStream calls that never send.
        stop = threading.Event()

        def silent() -> Any:
            stop.wait()
            return
            yield  # pragma: no cover - a generator that yields nothing until stop

        streams = [stubs.predictor.PredictStream(silent(), timeout=120) for _ in range(80)]
        time.sleep(1.0)
        essentials(stubs, "80 idle streams")
        stop.set()
        for stream in streams:
            stream.cancel()
        # 300 idle HTTP connections.
        idle = []
        for _ in range(300):
            try:
                idle.append(socket.create_connection(("127.0.0.1", server.http_port), timeout=5))
            except OSError:
                break
        essentials(stubs, "300 idle HTTP connections")
        for sock in idle:
            sock.close()
        # A message over the server's 64 MiB limit.
        case = Case("fault", "message over the size limit", lambda s: None)
        big = ppb.PredictRequest(model=TWIN, images=[ppb.Image(encoded=bytes(70 << 20))])
        try:
            stubs.predictor.Predict(big, timeout=CALL_TIMEOUT)
            tally.add(case, "wrong", "accepted")
        except grpc.RpcError as exc:
            tally.add(case, "refused" if exc.code() in CLIENT_FAULTS else "wrong", exc.code().name)
        essentials(stubs, "after the oversized message")


@dataclass
class KillReport:
    kills: int = 0
    acknowledged: int = 0
    lost: int = 0
    double_counted: int = 0
    corrupted: int = 0
    count_mismatch: int = 0
    during: Counter[str] = field(default_factory=Counter)
    restarts_seconds: list[float] = field(default_factory=list)


def kill_loop(store: Path, naturals: Path, folder: Path, kills: int, seed: int) -> KillReport:
    """A rig keeps Asking and Telling while the server is SIGKILLed at random moments."""
    from neurotwin.client.closed_loop import ClosedLoopClient
    from neurotwin.engines.journal import SqliteJournal

    journal = folder / "kill-journal.sqlite3"
    log = folder / "kill-server.log"
    rng = random.Random(seed)
    report = KillReport()
    acked: dict[tuple[int, str], list[float]] = {}
    sid = "rig-kill"
    # Only the closed-loop service: restarts are quicker, and it is the one with a journal.
    server = Server(store, journal, naturals, log, services="closed-loop")
    with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=30, retries=0) as client:
        client.create_session(
            session_id=sid, neuron_count=NEURONS, population_size=6, seed=3, max_generations=0
        )
    while report.kills < kills:
        stop = threading.Event()
        # What the rig is waiting on ("ask" or "tell"), and that it has got at least one answer.
        state = {"call": "connect"}
        answered = threading.Event()

        def rig(
            port: int, stop: threading.Event = stop, state: dict = state, answered: threading.Event = answered
        ) -> None:
            with ClosedLoopClient(f"127.0.0.1:{port}", timeout=30, retries=0) as client:
                while not stop.is_set():
                    try:
                        state["call"] = "ask"
                        generation = client.ask(sid, omit_images=True)
                        answered.set()
                        for start in range(0, len(generation.stimuli), 3):
                            part = generation.stimuli[start : start + 3]
                            # Values fixed per stimulus, so that re-telling one whose Tell was cut by a
                            # kill (and may have been journaled) is an identical retry.
                            values = {
                                s.stimulus_id: _rates_for(generation.generation, s.stimulus_id) for s in part
                            }
                            state["call"] = "tell"
                            client.tell(sid, generation.generation, values, partial=True)
                            answered.set()
                            # Acknowledged: it must survive any kill from now on.
                            for stimulus_id, rates in values.items():
                                acked[(generation.generation, stimulus_id)] = [float(v) for v in rates]
                    except Exception:
                        return

        thread = threading.Thread(target=rig, args=(server.port,), daemon=True)
        thread.start()
        # Once the rig is under way (its first answer), at a random moment: mostly mid-Ask or mid-Tell.
        answered.wait(120)
        time.sleep(rng.uniform(0.0, 1.5))
        report.during[state["call"]] += 1
        server.kill()
        report.kills += 1
        stop.set()
        thread.join(30)
        started = time.monotonic()
        server = Server(store, journal, naturals, log, services="closed-loop")
        report.restarts_seconds.append(time.monotonic() - started)
        # What the restarted server says must match what the rig was told.
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=30, retries=0) as client:
            info = client.get_session(sid)
        told_rows = _journal_rows(SqliteJournal, journal, sid)
        if info.presentations_told != len(told_rows):
            report.count_mismatch += 1
    server.stop()
    rows = _journal_rows(SqliteJournal, journal, sid)
    report.acknowledged = len(acked)
    for key, rates in acked.items():
        stored = rows.get(key)
        if stored is None:
            report.lost += 1
        elif stored[0] > 1:
            report.double_counted += 1
        elif not np.allclose(stored[1], rates, rtol=0, atol=1e-6):
            report.corrupted += 1
    return report


def _rates_for(generation: int, stimulus_id: str) -> np.ndarray:
    digest = zlib.crc32(f"{generation}/{stimulus_id}".encode())
    return (np.random.default_rng(digest).random(NEURONS) * 10).astype(np.float32)


def _journal_rows(journal_class: Any, path: Path, sid: str) -> dict[tuple[int, str], tuple[int, np.ndarray]]:
    """(generation, stimulus id) -> (rows stored, mean rates), read straight from the journal file."""
    journal = journal_class(str(path))
    try:
        stimuli = {(s.generation, s.index): s.stimulus_id for s in journal.stimuli(sid, with_images=False)}
        rows: dict[tuple[int, str], tuple[int, np.ndarray]] = {}
        for response in journal.responses(sid):
            key = (response.generation, stimuli[(response.generation, response.index)])
            count = rows[key][0] + 1 if key in rows else 1
            rows[key] = (count, response.mean)
        return rows
    finally:
        journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 kill instead of 30, 1 s between reloads instead of 10 (CI)"
    )
    parser.add_argument("--kills", type=int, default=None, help="kill -9s during Ask and Tell (default 30)")
    parser.add_argument("--reload-only", action="store_true", help="run only the hot-reload stage")
    parser.add_argument("--reload-clients", type=int, default=32, help="Predict threads during reloads")
    parser.add_argument(
        "--reload-hold", type=float, default=None, help="seconds of load around each reload (default 10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    kills = args.kills if args.kills is not None else (1 if args.quick else 30)
    hold = args.reload_hold if args.reload_hold is not None else (1.0 if args.quick else 10.0)
    started = time.monotonic()
    flags = [f for f, on in (("--quick", args.quick), ("--reload-only", args.reload_only)) if on]
    summary: dict[str, Any] = {
        "command": " ".join(["python bench/hostile.py", *flags]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
    }
    bad = False
    with tempfile.TemporaryDirectory(prefix="neurotwin-hostile-") as tmp:
        folder = Path(tmp)
        if not args.reload_only:
            summary.update(attack_stages(folder, kills, args.seed))
            bad = bool(
                summary["crashes"]
                or summary["hangs"]
                or summary["wrong_answers"]
                or summary["lost"]
                or summary["double_counted"]
                or summary["corrupted"]
                or summary["count_mismatches"]
            )
        reload = reload_under_load(folder, args.reload_clients, hold)
        summary["hot_reload"] = reload.summary()
        bad = bad or not reload.passed
    summary["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 1 if bad else 0


def attack_stages(folder: Path, kills: int, seed: int) -> dict[str, Any]:
    """Stages 1-3: the attack matrix and fault injection on ``serve all``, then the kill -9 loop."""
    store, naturals = build_store(folder)
    server = Server(store, folder / "journal.sqlite3", naturals, folder / "server.log")
    tally = Tally()
    try:
        from neurotwin.client.closed_loop import ClosedLoopClient

        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=60, retries=0) as client:
            sid = client.create_session(neuron_count=NEURONS, population_size=4, seed=1).session_id
            generation = client.ask(sid, omit_images=True)
        run_matrix(server, tally, sid, generation.generation, generation.stimulus_ids)
        fault_injection(server, tally, sid)
    finally:
        server.stop()
        server_log = (folder / "server.log").read_text()
    kill = kill_loop(store, naturals, folder, kills, seed)
    return {
        "inputs_tried": tally.tried,
        "outcomes": dict(tally.outcomes),
        "crashes": tally.outcomes["crash"],
        "hangs": tally.outcomes["hang"],
        "wrong_answers": tally.outcomes["wrong"],
        "failures": tally.failures,
        "secret_in_server_log": SECRET in server_log,
        "kills": kill.kills,
        "kills_while_waiting_on": dict(kill.during),
        "acknowledged_responses": kill.acknowledged,
        "lost": kill.lost,
        "double_counted": kill.double_counted,
        "corrupted": kill.corrupted,
        "count_mismatches": kill.count_mismatch,
        "restart_seconds_median": float(np.median(kill.restarts_seconds)) if kill.restarts_seconds else 0.0,
    }


def reload_under_load(folder: Path, clients: int, hold: float) -> ReloadReport:
    """Stage 4: ``serve predictor`` polling its store while valid, corrupt and NaN versions arrive."""
    store = build_reload_store(folder)
    log = folder / "reload-server.log"
    journal = folder / "reload-journal.sqlite3"
    server = Server(store, journal, folder, log, services="predictor", poll_seconds=0.1, metrics=True)
    try:
        return reload_stage(server, store, clients, hold)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
