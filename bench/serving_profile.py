"""Where a served Predict call spends its work: every thread of one process profiled with yappi.

    pip install yappi
    python bench/serving_profile.py --calls 300            # bundled twin, one raw 112 x 112 image per call

A real predictor server (gate interceptor, auth, budgets, batcher, metrics) and a PredictorClient run
in one process over loopback; after a warm-up, ``--calls`` sequential calls (concurrency 1) are
profiled on all threads. Function-call and lock counts per request do not depend on machine load,
so they compare two versions of the code on a shared machine; the CPU times printed beside them
do depend on it (and include the profiler's own cost): read them as indicative.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

import numpy as np  # noqa: E402

# Our functions whose inclusive CPU time per call is reported (the rest is grpc, protobuf, ORT).
WATCHED = (
    "GateInterceptor.intercept_service",
    "PredictorServicer._predict",
    "decode_images",
    "Batcher.infer",
    "CallMetrics.__exit__",
    "build_request",
    "parse_prediction",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--store", default=str(ROOT / "model_store"))
    parser.add_argument("--model", default="v4-201025")
    parser.add_argument("--pstats", type=Path, help="also save the profile here (pstats format)")
    args = parser.parse_args(argv)

    import yappi
    from neurotwin.client import PredictorClient
    from neurotwin.server import predictor
    from neurotwin.server.common import GrpcServer
    from neurotwin.server.config import ServerSettings

    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    server = GrpcServer(ServerSettings(port=0, metrics_port=0, grace_seconds=1))
    settings = predictor.Settings(model_store=args.store, poll_seconds=0, intra_op_threads=1, kserve=False)
    predictor.attach(server, settings)
    server.start()
    try:
        client = PredictorClient(f"127.0.0.1:{server.port}", timeout=30)
        for _ in range(20):
            client.predict([image], args.model)
        yappi.set_clock_type("cpu")
        yappi.start(builtins=True, profile_threads=True)
        for _ in range(args.calls):
            client.predict([image], args.model)
        yappi.stop()
    finally:
        server.stop(0)
    stats = yappi.get_func_stats()
    per = 1.0 / args.calls
    calls = sum(s.ncall for s in stats)
    ours = sum(s.ncall for s in stats if "/neurotwin/" in s.module)
    metrics = sum(s.ncall for s in stats if "prometheus_client" in s.module)
    locks = sum(
        s.ncall
        for s in stats
        if s.name.endswith("__enter__") and ("lock" in s.name.lower() or "Condition" in s.name)
    )
    print(f"{args.calls} Predict calls, per call:")
    print(f"  function calls {calls * per:.0f}", end=" ")
    print(f"(neurotwin {ours * per:.0f}, prometheus_client {metrics * per:.0f})")
    print(f"  lock/condition acquisitions {locks * per:.1f}")
    for name in WATCHED:
        found = [s for s in stats if s.name == name]
        if found:
            seconds = sum(s.ttot for s in found) / max(1, sum(s.ncall for s in found))
            print(f"  {name}: {seconds * 1e3:.3f} ms CPU")
    if args.pstats:
        stats.save(str(args.pstats), type="pstat")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
