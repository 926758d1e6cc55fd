"""Serving benchmark: one ONNX twin, one machine, closed-loop clients sending single 112 x 112 images.

    python bench/serving.py              # full run (10 s per cell, 60 s soak at concurrency 32)
    python bench/serving.py --quick      # smoke run (2 s per cell, 5 s soak)
    python bench/serving.py --out results.json --markdown results.md

Systems, each measured at concurrency 1, 8 and 32 (one closed-loop client thread per slot, each
sending the next request as soon as its previous answer arrives):
  ort        in-process ONNX Runtime, one shared session (the floor: no serving at all)
  predict    our FiringRatePredictor.Predict through neurotwin.client.PredictorClient
  kserve     our KServe v2 ModelInfer through the unmodified tritonclient[grpc]
  torchserve TorchServe serving the same model exported as a .mar, one PNG per call over its gRPC
             Predictions API with token auth (skipped, with the reason, when Java or TorchServe
             is missing)

The server runs in its own process (`neurotwin serve predictor`); each client runs in its own
process too (tritonclient's `inference` protos would collide with ours in one process, and separate
processes keep client and server from sharing one interpreter lock).

The model is the bundled twin (model_store/predictors/v4-201025) when present; otherwise a stand-in
of realistic size is built into a temporary store: a ResNet-18 trunk up to layer3 at 112 px with a
factorized readout for 89 neurons (about 2.8 M parameters), random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_STORE = ROOT / "model_store"
BUNDLED_MODEL = "v4-201025"
STANDIN_MODEL = "standin-resnet18l3"
SIZE = 112
NEURONS = 89
CONCURRENCIES = (1, 8, 32)


# -- the model -------------------------------------------------------------------------------------


def build_standin(store_root: Path) -> None:
    """A realistic-size twin stand-in: ResNet-18 to layer3 + factorized (spatial x feature) readout."""
    sys.path.insert(0, str(ROOT))
    import torch
    from torch import nn

    from tests._models import export_onnx, make_card, neuron_stats_for, write_predictor

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Basic(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(cout)
                self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(cout)
                self.skip = (
                    nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout
                    else nn.Identity()
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = torch.relu(self.bn1(self.conv1(x)))
                return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))

        return Basic()

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            self.trunk = nn.Sequential(
                block(64, 64, 1), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1),
                block(128, 256, 2), block(256, 256, 1),
            )  # fmt: skip
            side = SIZE // 16
            self.spatial = nn.Parameter(torch.randn(NEURONS, side * side) / side)
            self.features = nn.Parameter(torch.randn(NEURONS, 256) / 16)
            self.bias = nn.Parameter(torch.zeros(NEURONS))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).float()
            x = (x - 127.0) / 128.0
            f = self.trunk(self.stem(x)).flatten(2)  # [N, 256, side*side]
            pooled = torch.einsum("ncs,ks->nkc", f, self.spatial)  # [N, K, 256]
            return nn.functional.softplus((pooled * self.features).sum(-1) + self.bias)

    torch.manual_seed(0)
    net = StandIn().eval()
    params = sum(p.numel() for p in net.parameters())
    model_bytes = export_onnx(net, SIZE)
    card = make_card(STANDIN_MODEL, NEURONS, SIZE, neuron_stats_for(model_bytes, SIZE, images=8), seed=0)
    card.description = f"benchmark stand-in: ResNet-18 to layer3 + factorized readout, {params} parameters"
    write_predictor(store_root, STANDIN_MODEL, model_bytes, card, version=1)


def locate_model(workdir: Path) -> tuple[Path, str, str]:
    """(store root, model name, description) of the twin to benchmark."""
    bundled = BUNDLED_STORE / "predictors" / BUNDLED_MODEL
    if bundled.is_dir() and any(p.name.isdigit() for p in bundled.iterdir()):
        return BUNDLED_STORE, BUNDLED_MODEL, f"bundled twin {BUNDLED_MODEL}"
    store = workdir / "store"
    build_standin(store)
    card = json.loads((store / "predictors" / STANDIN_MODEL / "1" / "card.json").read_text())
    return store, STANDIN_MODEL, card["description"]


# -- workers (each runs in its own process) --------------------------------------------------------


@dataclass
class CellResult:
    system: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    throughput: float
    first_error: str = ""
    # Mean images per ONNX Runtime call in the server during the cell (served systems only).
    mean_batch: float | None = None


Call = Callable[[], None]


class ClosedLoop:
    """``concurrency`` client slots, each with its own call, reused across measuring rounds."""

    def __init__(self, make_call: Callable[[int], Call], concurrency: int) -> None:
        self.calls = [make_call(slot) for slot in range(concurrency)]
        for call in self.calls:
            call()  # connection set-up and first-run costs stay out of the numbers

    def run(self, duration: float, warmup: float) -> dict[str, Any]:
        """Every slot calls back to back; latencies of calls that start after the warm-up and end
        within the window."""
        slots = len(self.calls)
        latencies: list[list[float]] = [[] for _ in range(slots)]
        errors = [0] * slots
        first_error: list[str] = []
        barrier = threading.Barrier(slots + 1)
        window = [0.0, 0.0]
        stop = threading.Event()

        def loop(slot: int) -> None:
            call, mine = self.calls[slot], latencies[slot]
            barrier.wait()
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    call()
                except Exception as exc:
                    errors[slot] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                finished = time.perf_counter()
                if started >= window[0] and finished <= window[1]:
                    mine.append((finished - started) * 1e3)

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(slots)]
        for t in threads:
            t.start()
        now = time.perf_counter()
        window[:] = [now + warmup, now + warmup + duration]
        barrier.wait()
        time.sleep(warmup + duration)
        stop.set()
        for t in threads:
            t.join(60)
        return {
            "latencies_ms": [x for per in latencies for x in per],
            "errors": int(sum(errors)),
            "first_error": first_error[0] if first_error else "",
        }


def _image(slot: int) -> np.ndarray:
    return np.random.default_rng(slot).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def floor_session(args: argparse.Namespace) -> Any:
    """A plain ONNX Runtime session with the server's thread settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.intra_op_threads
    if not args.spin_threads:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    folder = Path(args.store) / "predictors" / args.model
    newest = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    model = folder / str(newest) / "model.onnx"
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def calls_ort(args: argparse.Namespace) -> Callable[[int], Call]:
    session = floor_session(args)

    def make_call(slot: int) -> Call:
        batch = _image(slot)[None]
        return lambda: session.run(None, {"images": batch})

    return make_call


def calls_predict(args: argparse.Namespace) -> Callable[[int], Call]:
    sys.path.insert(0, str(ROOT / "services"))
    from neurotwin.client import PredictorClient

    client = PredictorClient(args.address, timeout=30)

    def make_call(slot: int) -> Call:
        image = [_image(slot)]
        return lambda: client.predict(image, args.model)

    return make_call


def calls_kserve(args: argparse.Namespace) -> Callable[[int], Call]:
    import tritonclient.grpc as triton

    def make_call(slot: int) -> Call:
        client = triton.InferenceServerClient(url=args.address)
        tensor = triton.InferInput("images", [1, SIZE, SIZE, 3], "UINT8")
        tensor.set_data_from_numpy(_image(slot)[None])
        outputs = [triton.InferRequestedOutput("rates")]
        return lambda: client.infer(args.model, [tensor], outputs=outputs, client_timeout=30).as_numpy(
            "rates"
        )

    return make_call


def paired(args: argparse.Namespace, served: Callable[[], None]) -> dict[str, Any]:
    """Concurrency 1, alternating an in-process ONNX Runtime call and a served call on the same image.

    Neighbouring calls see the same machine load, so the median of their differences estimates the
    latency serving adds far more steadily than two separate runs on a shared machine can.
    """
    session = floor_session(args)
    batch = _image(0)[None]
    for _ in range(3):
        session.run(None, {"images": batch})
        served()
    floor_ms: list[float] = []
    served_ms: list[float] = []
    errors = 0
    end = time.perf_counter() + args.duration
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        session.run(None, {"images": batch})
        t1 = time.perf_counter()
        try:
            served()
        except Exception:
            errors += 1
            continue
        t2 = time.perf_counter()
        floor_ms.append((t1 - t0) * 1e3)
        served_ms.append((t2 - t1) * 1e3)
    floor_a, served_a = np.array(floor_ms), np.array(served_ms)
    return {
        "pairs": int(floor_a.size),
        "errors": errors,
        "floor_p50_ms": float(np.median(floor_a)),
        "served_p50_ms": float(np.median(served_a)),
        "added_p50_ms": float(np.median(served_a - floor_a)),
    }


def worker_paired_predict(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "services"))
    from neurotwin.client import PredictorClient

    client = PredictorClient(args.address, timeout=30)
    image = [_image(0)]
    return paired(args, lambda: client.predict(image, args.model))


def worker_paired_kserve(args: argparse.Namespace) -> dict[str, Any]:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=args.address)
    tensor = triton.InferInput("images", [1, SIZE, SIZE, 3], "UINT8")
    tensor.set_data_from_numpy(_image(0)[None])
    outputs = [triton.InferRequestedOutput("rates")]
    return paired(args, lambda: client.infer(args.model, [tensor], outputs=outputs).as_numpy("rates"))


ECHO_METHOD = "/neurotwin.bench.Echo/Echo"
ECHO_REPLY_BYTES = 1024  # about a Predict reply for 89 neurons (rates + ids)


def serve_echo() -> None:
    """A bare gRPC Python server (same sync server, no neurotwin code) that answers every request
    with ECHO_REPLY_BYTES bytes: the transport-only cost of one call on this machine."""
    from concurrent import futures

    import grpc

    reply = b"r" * ECHO_REPLY_BYTES
    handler = grpc.method_handlers_generic_handler(
        "neurotwin.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def worker_echo_rtt(args: argparse.Namespace) -> dict[str, Any]:
    """Concurrency-1 round trips to the echo server with a request the size of one 112 px image."""
    import grpc

    channel = grpc.insecure_channel(args.address)
    call = channel.unary_unary(ECHO_METHOD)
    payload = _image(0).tobytes()
    for _ in range(20):
        call(payload)
    latencies = []
    end = time.perf_counter() + args.duration
    while time.perf_counter() < end:
        started = time.perf_counter()
        call(payload)
        latencies.append((time.perf_counter() - started) * 1e3)
    return {
        "calls": len(latencies),
        "p50_ms": float(np.median(latencies)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def _torchserve_bench() -> Any:
    """bench/_torchserve_bench.py (it imports neurotwin, which lives under services/)."""
    sys.path.insert(0, str(ROOT / "services"))
    import _torchserve_bench

    return _torchserve_bench


def calls_torchserve(args: argparse.Namespace) -> Callable[[int], Call]:
    """One gRPC channel per slot, one single-image (PNG) Predictions call per call, with the token."""
    import grpc
    from neurotwin.imagecodec import encode_png

    ts = _torchserve_bench()
    # Each worker compiles its own stubs, in a folder of its own under the benchmark's scratch.
    pb, pb_grpc = ts.torchserve_stubs(Path(args.torchserve_dir) / f"stubs-{os.getpid()}")
    key = json.loads(Path(args.torchserve_key_file).read_text())["inference"]["key"]
    metadata = [("authorization", f"Bearer {key}")]

    def make_call(slot: int) -> Call:
        stub = pb_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(args.torchserve_address))
        request = pb.PredictionsRequest(model_name=args.model, input={"data": encode_png(_image(slot))})

        def call() -> None:
            reply = stub.Predictions(request, metadata=metadata, timeout=30)
            if "rates" not in json.loads(reply.prediction):
                raise RuntimeError(f"TorchServe answered {reply.prediction[:200]!r}")

        return call

    return make_call


def start_torchserve(
    store: Path, model: str, scratch: Path, args: argparse.Namespace, stack: ExitStack
) -> list[str]:
    """Export the twin as a .mar, start TorchServe (stopped when ``stack`` closes), wait until the
    model answers, and return the worker arguments that point torchserve clients at it."""
    from neurotwin.commands.export import export_torchserve

    ts = _torchserve_bench()
    mar = export_torchserve(
        store,
        model,
        out=scratch / "store",
        batch_size=args.max_batch_size,
        max_batch_delay_ms=max(1, round(args.max_queue_delay_ms)),
        workers=args.torchserve_workers,
    )
    (scratch / "work").mkdir()
    with ExitStack() as started:
        # Stopped at once if it never answers; otherwise handed to ``stack``.
        info = started.enter_context(
            ts.torchserve_process(mar, scratch / "work", workers=args.torchserve_workers)
        )
        address = f"127.0.0.1:{info['grpc_port']}"
        key_file = scratch / "work" / "key_file.json"
        # The first calls wait for TorchServe's worker to load the model.
        probe = calls_torchserve(
            argparse.Namespace(
                torchserve_address=address, torchserve_key_file=key_file, torchserve_dir=scratch, model=model
            )
        )(0)
        deadline = time.monotonic() + 180
        while True:
            try:
                probe()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        stack.enter_context(started.pop_all())
    return [
        *("--torchserve-address", address),
        *("--torchserve-key-file", str(key_file)),
        *("--torchserve-dir", str(scratch)),
    ]


CLOSED_LOOP: dict[str, Callable[[argparse.Namespace], Callable[[int], Call]]] = {
    "ort": calls_ort,
    "predict": calls_predict,
    "kserve": calls_kserve,
    "torchserve": calls_torchserve,
}
PAIRED: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "paired-predict": worker_paired_predict,
    "paired-kserve": worker_paired_kserve,
    "echo-rtt": worker_echo_rtt,
}
SYSTEMS = ("ort", "predict", "kserve", "torchserve")


def serve_worker(args: argparse.Namespace) -> None:
    """Worker process: set up the clients, then run one measuring round per "run D W" line on stdin."""
    loop = ClosedLoop(CLOSED_LOOP[args.worker](args), args.concurrency)
    print("ready", flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command != "run":
            break
        duration, warmup = map(float, rest)
        print(json.dumps(loop.run(duration, warmup)), flush=True)


# -- orchestration ---------------------------------------------------------------------------------


def start_server(store: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, str]:
    command = [
        sys.executable,
        "-m",
        "neurotwin.cli",
        "serve",
        "predictor",
        "--model-store",
        str(store),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--max-workers",
        "96",
        "--predictor-poll-seconds",
        "0",
        "--predictor-max-batch-size",
        str(args.max_batch_size),
        "--predictor-max-queue-delay-ms",
        str(args.max_queue_delay_ms),
        "--predictor-intra-op-threads",
        str(args.intra_op_threads),
        "--predictor-spin-threads",
        str(args.spin_threads).lower(),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"serving predictor on ([\w.:-]+):(\d+), metrics on :(\d+)", line)
        if match:
            # Keep draining the server's output so it never blocks on a full pipe.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, f"127.0.0.1:{match.group(2)}", f"http://127.0.0.1:{match.group(3)}/metrics"
    process.kill()
    raise SystemExit("server did not start:\n" + "".join(lines[-30:]))


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(images, runtime calls) so far, from the server's batch-size histogram."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as page:
        text = page.read().decode()
    total = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in total:
            if line.startswith(f"neurotwin_predictor_batch_size_{key}{{"):
                total[key] += float(line.rsplit(" ", 1)[1])
    return total["sum"], total["count"]


class Worker:
    """A client process for one (system, concurrency), driven round by round over a pipe."""

    def __init__(self, system: str, concurrency: int, common: list[str]) -> None:
        self.system, self.concurrency = system, concurrency
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", system]
        command += ["--concurrency", str(concurrency), *common]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.system} worker (concurrency {self.concurrency}) died")
        return line.strip()

    def _expect(self, word: str) -> None:
        while (line := self._readline()) != word:
            print(f"[{self.system}] {line}", flush=True)

    def run(self, duration: float, warmup: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"run {duration} {warmup}\n")
        self.process.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(30)


def run_paired(worker: str, duration: float, common: list[str]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--duration", str(duration)]
    run = subprocess.run([*command, *common], capture_output=True, text=True, timeout=duration + 300)
    if run.returncode != 0:
        raise SystemExit(f"{worker} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def cell_result(system: str, concurrency: int, duration: float, rounds: list[dict[str, Any]]) -> CellResult:
    latencies = np.array([x for r in rounds for x in r["latencies_ms"]])
    first_error = next((r["first_error"] for r in rounds if r["first_error"]), "")
    return CellResult(
        system=system,
        concurrency=concurrency,
        duration_s=duration,
        requests=int(latencies.size),
        errors=sum(r["errors"] for r in rounds),
        p50_ms=float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        p99_ms=float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        throughput=float(latencies.size / duration),
        first_error=first_error,
    )


def measure_level(
    systems: list[str],
    concurrency: int,
    duration: float,
    warmup: float,
    rounds: int,
    common: list[str],
    metrics_url: str,
) -> list[CellResult]:
    """All systems at one concurrency, interleaved: ``rounds`` slices each, in rotating order, so
    that load from outside the benchmark falls on every system alike."""
    workers = {s: Worker(s, concurrency, common) for s in systems}
    collected: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    batches = {s: [0.0, 0.0] for s in systems}
    try:
        for r in range(rounds):
            for s in systems[r % len(systems) :] + systems[: r % len(systems)]:
                before = batch_totals(metrics_url)
                collected[s].append(workers[s].run(duration / rounds, warmup))
                after = batch_totals(metrics_url)
                batches[s][0] += after[0] - before[0]
                batches[s][1] += after[1] - before[1]
    finally:
        for worker in workers.values():
            worker.close()
    results = []
    for s in systems:
        cell = cell_result(s, concurrency, duration, collected[s])
        if s != "ort" and batches[s][1]:
            cell.mean_batch = batches[s][0] / batches[s][1]
        results.append(cell)
    return results


def markdown(
    results: list[CellResult],
    pairs: dict[str, dict[str, Any]],
    echo: dict[str, Any] | None,
    soak: CellResult | None,
    header: dict[str, Any],
) -> str:
    floor = {r.concurrency: r for r in results if r.system == "ort"}
    base = {r.system: r for r in results if r.concurrency == 1}
    lines = [
        f"Model: {header['model']}. Machine: {header['machine']}; load average (1, 5, 15 min) "
        f"before {header['load_average'][:3]}, after {header['load_average'][3:]}. "
        f"{header['duration']:g} s per cell, measured in {header['rounds']} slices interleaved with the "
        f"other systems (each after {header['warmup']:g} s warm-up); "
        f"server: max_batch_size {header['max_batch_size']}, "
        f"max_queue_delay {header['max_queue_delay_ms']:g} ms, "
        f"intra-op threads {header['intra_op_threads'] or 'auto'}, "
        f"spinning {'on' if header['spin_threads'] else 'off'}.",
        "",
        "| system | concurrency | requests | errors | p50 ms | p99 ms | req/s | p50 added vs floor, ms "
        "| throughput / floor | throughput / own c=1 | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f = floor.get(r.concurrency)
        added = f"{r.p50_ms - f.p50_ms:+.2f}" if f and r.system != "ort" else "-"
        ratio = f"{r.throughput / f.throughput:.2f}" if f and f.throughput else "-"
        own = f"{r.throughput / base[r.system].throughput:.2f}" if r.system in base else "-"
        batch = f"{r.mean_batch:.1f}" if r.mean_batch else "-"
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.requests} | {r.errors} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.throughput:.1f} | {added} | {ratio} | {own} | {batch} |"
        )
    for system, reason in header["not_run"].items():
        lines.append(f"| {system} | not run: {reason} | - | - | - | - | - | - | - | - | - |")
    if any(r.system == "torchserve" for r in results):
        lines += [
            "",
            f"TorchServe: the same ONNX model exported as a .mar and served by TorchServe "
            f"({header['torchserve_workers']} worker(s), batchSize {header['max_batch_size']}, "
            f"maxBatchDelay {max(1, round(header['max_queue_delay_ms']))} ms, token auth on), one PNG image "
            "per call over its gRPC Predictions API; mean batch is not reported for it.",
        ]
    if pairs:
        lines += [
            "",
            "Added latency at concurrency 1, paired (one process alternates an in-process ONNX Runtime call "
            "and a served call on the same image; median of the differences):",
            "",
            "| system | pairs | errors | floor p50 ms | served p50 ms | added p50 ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for system, p in pairs.items():
            lines.append(
                f"| {system} | {p['pairs']} | {p['errors']} | {p['floor_p50_ms']:.2f} "
                f"| {p['served_p50_ms']:.2f} | {p['added_p50_ms']:+.2f} |"
            )
    if echo is not None:
        lines += [
            "",
            f"Transport alone: a bare gRPC Python server on the same machine (same sync server, no "
            f"neurotwin code) answering a 37.6 KB request with {ECHO_REPLY_BYTES} B: "
            f"p50 {echo['p50_ms']:.2f} ms, p99 {echo['p99_ms']:.2f} ms over {echo['calls']} calls, "
            "measured just before and after the paired runs.",
        ]
    if soak is not None:
        lines += [
            "",
            f"Soak: predict at concurrency {soak.concurrency} for {soak.duration_s:g} s: "
            f"{soak.requests} requests, {soak.errors} errors, p50 {soak.p50_ms:.2f} ms, "
            f"p99 {soak.p99_ms:.2f} ms, {soak.throughput:.1f} req/s"
            + (f" (first error: {soak.first_error})" if soak.first_error else ""),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s cells, 5 s soak")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds per cell before measuring")
    parser.add_argument("--soak", type=float, default=None, help="seconds at concurrency 32 (default 60)")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {list(CLOSED_LOOP)}"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved slices per cell (default 5; 2 with --quick)"
    )
    parser.add_argument("--concurrency-levels", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="ONNX Runtime threads, server and floor"
    )
    parser.add_argument(
        "--spin-threads", action="store_true", help="let ONNX Runtime threads busy-wait (server and floor)"
    )
    parser.add_argument(
        "--torchserve-workers", type=int, default=1, help="TorchServe worker processes for the model"
    )
    parser.add_argument("--no-paired", action="store_true", help="skip the paired concurrency-1 runs")
    parser.add_argument("--store", help="model store to use instead of the bundled twin or the stand-in")
    parser.add_argument("--model", help="model name in --store")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the results table here")
    # Worker mode (internal): one system's clients in their own process.
    parser.add_argument("--worker", choices=[*CLOSED_LOOP, *PAIRED, "echo-server"], help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    parser.add_argument("--torchserve-address", default="", help=argparse.SUPPRESS)
    parser.add_argument("--torchserve-key-file", default="", help=argparse.SUPPRESS)
    parser.add_argument("--torchserve-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "echo-server":
        serve_echo()
        return 0
    if args.worker in PAIRED:
        print(json.dumps(PAIRED[args.worker](args)))
        return 0
    if args.worker:
        serve_worker(args)
        return 0

    duration = args.duration or (2.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    rounds = args.rounds or (2 if args.quick else 5)
    soak = args.soak if args.soak is not None else (5.0 if args.quick else 60.0)
    systems = [s for s in args.systems.split(",") if s]
    levels = [int(c) for c in args.concurrency_levels.split(",") if c]
    # Other work on the machine skews every number; the load averages (before, after) are reported.
    not_run: dict[str, str] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="neurotwin-bench-") as tmp, ExitStack() as stack:
        if args.store:
            store, model, description = Path(args.store), args.model, f"{args.model} from {args.store}"
        else:
            store, model, description = locate_model(Path(tmp))
        print(f"model: {description}", flush=True)
        server, address, metrics_url = start_server(store, args)
        common = [
            "--address",
            address,
            "--store",
            str(store),
            "--model",
            model,
            "--intra-op-threads",
            str(args.intra_op_threads),
            *(["--spin-threads"] if args.spin_threads else []),
        ]
        if "torchserve" in systems:
            reason = _torchserve_bench().torchserve_missing()
            if reason is None:
                try:
                    common += start_torchserve(store, model, Path(tmp) / "torchserve", args, stack)
                    print("torchserve: ready", flush=True)
                except Exception as exc:
                    reason = f"TorchServe did not start ({type(exc).__name__}: {exc})"[:300]
            if reason is not None:
                print(f"torchserve: not run: {reason}", flush=True)
                systems.remove("torchserve")
                not_run["torchserve"] = reason
        results: list[CellResult] = []
        pairs: dict[str, dict[str, Any]] = {}
        echo: dict[str, Any] | None = None
        soak_result = None
        echo_server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "echo-server"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if not args.no_paired:
                assert echo_server.stdout is not None
                echo_address = f"127.0.0.1:{int(echo_server.stdout.readline())}"
                echo_common = [a if a != address else echo_address for a in common]
                echo = run_paired("echo-rtt", duration / 2, echo_common)
                for system in ("predict", "kserve"):
                    if system in systems:
                        pairs[system] = run_paired(f"paired-{system}", duration, common)
                        print(f"paired {system}: {pairs[system]}", flush=True)
                second = run_paired("echo-rtt", duration / 2, echo_common)
                # Two halves around the paired runs, so the echo sees the same stretch of machine load.
                echo = {
                    "calls": echo["calls"] + second["calls"],
                    "p50_ms": (echo["p50_ms"] + second["p50_ms"]) / 2,
                    "p99_ms": max(echo["p99_ms"], second["p99_ms"]),
                }
                print(f"bare gRPC echo: {echo}", flush=True)
            for concurrency in levels:
                for cell in measure_level(
                    systems, concurrency, duration, warmup, rounds, common, metrics_url
                ):
                    results.append(cell)
                    print(
                        f"{cell.system:>10} c={concurrency:<3} p50 {cell.p50_ms:7.2f} ms  "
                        f"p99 {cell.p99_ms:7.2f} ms  {cell.throughput:8.1f} req/s  errors {cell.errors}"
                        + (f"  mean batch {cell.mean_batch:.1f}" if cell.mean_batch else ""),
                        flush=True,
                    )
            if soak > 0 and "predict" in systems:
                (soak_result,) = measure_level(["predict"], 32, soak, warmup, 1, common, metrics_url)
                print(f"soak: {asdict(soak_result)}", flush=True)
        finally:
            echo_server.kill()
            server.terminate()
            server.wait(30)
    header = {
        "model": description,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": [round(x, 1) for x in (load_before + os.getloadavg())],
        "duration": duration,
        "warmup": warmup,
        "rounds": rounds,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "intra_op_threads": args.intra_op_threads,
        "spin_threads": args.spin_threads,
        "torchserve_workers": args.torchserve_workers,
        "not_run": not_run,
    }
    table = markdown(results, pairs, echo, soak_result, header)
    print(table)
    if args.out:
        payload = {
            "header": header,
            "cells": [asdict(r) for r in results],
            "paired": pairs,
            "grpc_echo": echo,
            "soak": asdict(soak_result) if soak_result else None,
        }
        args.out.write_text(json.dumps(payload, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    failed = soak_result is not None and soak_result.errors > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
