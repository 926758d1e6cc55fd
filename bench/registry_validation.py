"""What validating a version costs when it loads: the bundled predictor and generators opened plainly
(ONNX Runtime session + warm-up; generator weights) and through the model registry (recorded
checksums, outputs on the reference inputs, comparison with the recorded outputs), side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/registry_validation.py [--model-store model_store] [--repeats 5]

Prints the median seconds of each and their ratio. The store must be sealed (``integrity.json`` in every
version), as the bundled one is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.runtimes.generators import load_generator
from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
from neurotwin.store import GENERATORS, PREDICTORS, ModelStore, validate_predictor


def _median_seconds(run: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", default="model_store")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = ModelStore(args.model_store)
    session_settings = SessionSettings(device="cpu", intra_op_threads=1, inter_op_threads=1)
    registry = ModelRegistry(args.model_store, RegistrySettings(poll_seconds=0, session=session_settings))
    print(f"{'version':32s} {'plain s':>9s} {'registry s':>11s} {'ratio':>6s}")
    for name in store.names(PREDICTORS):
        version = store.resolve(PREDICTORS, name)

        def plain(version: object = version) -> None:
            card = validate_predictor(version)  # type: ignore[arg-type]
            session = PredictorSession(version.model_path, card, session_settings)  # type: ignore[attr-defined]
            session.warm_up((1,))
            session.close()

        def validated(version: object = version) -> None:
            loaded = registry.open_version(version)  # type: ignore[arg-type]
            assert loaded.validation.startswith("verified"), loaded.validation
            loaded.release(0)

        a, b = _median_seconds(plain, args.repeats), _median_seconds(validated, args.repeats)
        print(f"{version!s:32s} {a:9.3f} {b:11.3f} {b / a:6.2f}")
    for name in store.names(GENERATORS):
        version = store.resolve(GENERATORS, name)

        def plain_generator(version: object = version) -> None:
            load_generator(version, "cpu")  # type: ignore[arg-type]

        def validated_generator(version: object = version) -> None:
            from neurotwin.engines.model_validation import validate_generator, verify_files

            record = verify_files(version)  # type: ignore[arg-type]
            module = load_generator(version, "cpu")  # type: ignore[arg-type]
            outcome = validate_generator(version, module, record)  # type: ignore[arg-type]
            assert outcome.outcome == "verified", outcome

        a = _median_seconds(plain_generator, args.repeats)
        b = _median_seconds(validated_generator, args.repeats)
        print(f"{version!s:32s} {a:9.3f} {b:11.3f} {b / a:6.2f}")


if __name__ == "__main__":
    main()
