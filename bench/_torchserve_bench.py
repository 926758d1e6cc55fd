"""TorchServe as a serving baseline for ``bench/serving.py``: the same twin, exported with
``neurotwin export torchserve``, served by TorchServe 0.12 and called over its gRPC Predictions API.

``run_torchserve(store, model, images, concurrency, requests)`` exports the twin, starts TorchServe
(token auth on, Prometheus metrics, ports of its own), sends one image per call from ``concurrency``
client threads (TorchServe's API carries one input per call; it batches on the server, up to the
archive's batchSize within maxBatchDelay) and returns throughput and latency percentiles. The same
dictionary keys as the other systems make the rows comparable.

Standalone: ``python bench/_torchserve_bench.py --store model_store --model v4-201025``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
from neurotwin.commands.export import export_torchserve
from neurotwin.imagecodec import encode_png
from neurotwin.store import PREDICTORS, ModelStore, validate_predictor


def torchserve_missing() -> str | None:
    """Why TorchServe cannot run here, or None."""
    if shutil.which("java") is None:
        return "Java is not installed (TorchServe's frontend needs Java 17)"
    for module, package in (("ts", "torchserve"), ("model_archiver", "torch-model-archiver")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def torchserve_stubs(folder: Path) -> tuple[ModuleType, ModuleType]:
    """(messages, services) for TorchServe's inference API, compiled from the protos in its jar."""
    from grpc_tools import protoc

    spec = importlib.util.find_spec("ts")
    assert spec is not None and spec.submodule_search_locations
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    src = folder / "src"
    (src / "google" / "rpc").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jar) as archive:
        # Renamed: "inference.proto" is also the KServe proto's name in protobuf's descriptor pool.
        (src / "torchserve_inference.proto").write_bytes(archive.read("proto/inference.proto"))
        (src / "google" / "rpc" / "status.proto").write_bytes(archive.read("google/rpc/status.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={folder}",
            f"--grpc_python_out={folder}",
            "torchserve_inference.proto",
            "google/rpc/status.proto",
        ]
    )
    if rc != 0:
        raise RuntimeError("protoc failed on TorchServe's protos")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return (
        importlib.import_module("torchserve_inference_pb2"),
        importlib.import_module("torchserve_inference_pb2_grpc"),
    )


@contextmanager
def torchserve_process(mar: Path, workdir: Path, workers: int = 1) -> Iterator[dict[str, Any]]:
    """A running TorchServe serving ``mar``; yields its ports, inference key and work folder."""
    http, management, metrics, grpc_port, grpc_management, worker = _free_ports(6)
    config = workdir / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{http}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"grpc_inference_port={grpc_port}",
                f"grpc_management_port={grpc_management}",
                # Worker sockets are /tmp/.ts.sock.<port>; our own port avoids clashing with another
                # TorchServe on the machine.
                f"initial_worker_port={worker}",
                "enable_token_auth=true",
                "metrics_mode=prometheus",
                "disable_system_metrics=true",
                f"default_workers_per_model={workers}",
                "vmargs=-Xmx1g -XX:-UsePerfData",
                "",
            ]
        )
    )
    command = [
        str(Path(sys.executable).parent / "torchserve"),
        *("--start", "--foreground", "--ncs"),
        *("--model-store", str(mar.parent), "--models", f"{mar.stem}={mar.name}"),
        *("--ts-config", str(config)),
    ]
    env = {**os.environ, "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs")}
    with open(workdir / "torchserve.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        key_file = workdir / "key_file.json"
        while not key_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TorchServe did not start; see {workdir / 'torchserve.log'}")
            time.sleep(0.5)
        key = json.loads(key_file.read_text())["inference"]["key"]
        yield {"grpc_port": grpc_port, "metrics_port": metrics, "key": key, "workdir": workdir}
    finally:
        # The Java frontend and its Python workers share the session; stop them together.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_torchserve(
    store_root: str | Path,
    model: str,
    images: np.ndarray | None = None,
    concurrency: int = 8,
    requests: int = 2000,
    batch_size: int = 8,
    max_batch_delay_ms: int = 5,
    workers: int = 1,
    warmup: int = 50,
) -> dict[str, Any]:
    """Throughput and latency of TorchServe serving ``model`` (PNG images, one per call)."""
    reason = torchserve_missing()
    if reason:
        return {"system": "torchserve", "skipped": reason}
    version = ModelStore(store_root).resolve(PREDICTORS, model)
    card = validate_predictor(version)
    if images is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (64, card.input.height, card.input.width, 3), dtype=np.uint8)
    payloads = [encode_png(image) for image in images]
    with tempfile.TemporaryDirectory(prefix="neurotwin-ts-bench-") as scratch:
        root = Path(scratch)
        pb, pb_grpc = torchserve_stubs(root / "stubs")
        mar = export_torchserve(
            store_root,
            model,
            out=root / "store",
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            workers=workers,
        )
        (root / "work").mkdir()
        with torchserve_process(mar, root / "work", workers=workers) as ts:
            metadata = [("authorization", f"Bearer {ts['key']}")]
            channel = grpc.insecure_channel(f"127.0.0.1:{ts['grpc_port']}")
            stub = pb_grpc.InferenceAPIsServiceStub(channel)

            def call(index: int) -> float:
                request = pb.PredictionsRequest(
                    model_name=model, input={"data": payloads[index % len(payloads)]}
                )
                started = time.perf_counter()
                reply = stub.Predictions(request, metadata=metadata, timeout=60)
                elapsed = time.perf_counter() - started
                if "rates" not in json.loads(reply.prediction):
                    raise RuntimeError(f"TorchServe answered {reply.prediction[:200]!r}")
                return elapsed

            # The first calls wait for the worker to load the model.
            deadline = time.monotonic() + 180
            while True:
                try:
                    call(0)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            for i in range(warmup):
                call(i)

            latencies: list[float] = []
            errors = 0
            lock = threading.Lock()
            counter = iter(range(requests))

            def client() -> None:
                nonlocal errors
                while True:
                    with lock:
                        index = next(counter, None)
                    if index is None:
                        return
                    try:
                        elapsed = call(index)
                    except (grpc.RpcError, RuntimeError):
                        with lock:
                            errors += 1
                        continue
                    with lock:
                        latencies.append(elapsed)

            threads = [threading.Thread(target=client) for _ in range(concurrency)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            channel.close()
    ms = np.asarray(latencies) * 1000.0
    return {
        "system": "torchserve",
        "protocol": "gRPC Predictions (one PNG per call)",
        "model": f"{model}/{version.version}",
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "images_per_second": len(latencies) / wall if wall > 0 else 0.0,
        "latency_ms": {
            q: float(np.percentile(ms, p)) if len(ms) else float("nan")
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "settings": {"batch_size": batch_size, "max_batch_delay_ms": max_batch_delay_ms, "workers": workers},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--model", default="v4-201025")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    result = run_torchserve(
        args.store,
        args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        workers=args.workers,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
