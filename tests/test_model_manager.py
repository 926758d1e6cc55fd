"""Model lifecycle over real loopback gRPC: version policies, hot reload under traffic, broken
versions refused while the old one serves, and unloading only after in-flight work finishes."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from neurotwin.client import PredictorClient
from neurotwin.errors import NotFound

from tests._models import make_broken_predictor, make_predictor, random_images, reference_rates
from tests._serving import gate_model, metric_value, metrics_text, predictor_server, wait_until


def _states(client: PredictorClient, name: str = "tiny") -> dict[int, str]:
    for model in client.list_models():
        if model.name == name:
            return {v.version: v.state for v in model.versions}
    return {}


def test_version_policies(tmp_path: Path) -> None:
    for seed in (0, 1, 0):
        make_predictor(tmp_path, seed=seed)
    with predictor_server(tmp_path, version_policy="latest:2") as (server, _):
        with PredictorClient(f"127.0.0.1:{server.port}") as client:
            assert _states(client) == {2: "READY", 3: "READY"}
            assert client.predict(random_images(1), "tiny").version == 3
            assert client.predict(random_images(1), "tiny", version=2).version == 2
            with pytest.raises(NotFound, match=r"no ready version 1.*\[2, 3\]") as err:
                client.predict(random_images(1), "tiny", version=1)
            assert err.value.code.name == "NOT_FOUND"
    with predictor_server(tmp_path, version_policy="pinned:1,3") as (server, _):
        with PredictorClient(f"127.0.0.1:{server.port}") as client:
            assert _states(client) == {1: "READY", 3: "READY"}
            assert client.get_model("tiny").version == 3


def test_hot_reload_under_traffic_and_broken_version_refused(tmp_path: Path) -> None:
    v1 = make_predictor(tmp_path, seed=0)
    images = random_images(2, seed=5)
    with predictor_server(tmp_path, poll_seconds=0.1) as (server, _):
        stop = threading.Event()
        seen: list[int] = []
        errors: list[BaseException] = []

        def traffic() -> None:
            with PredictorClient(f"127.0.0.1:{server.port}", timeout=10) as client:
                while not stop.is_set():
                    try:
                        result = client.predict(images, "tiny")
                    except Exception as exc:
                        errors.append(exc)
                        continue
                    seen.append(result.version)
                    expected = reference_rates(v1 if result.version == 1 else v2, images)
                    if not np.allclose(result.rates, expected, rtol=1e-5, atol=1e-6):
                        errors.append(AssertionError(f"wrong rates from version {result.version}"))

        v2 = None
        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            wait_until(lambda: len(seen) > 5, what="first predictions")
            v2 = make_predictor(tmp_path, seed=1)
            wait_until(lambda: seen and seen[-1] == 2, what="version 2 to serve")
            with PredictorClient(f"127.0.0.1:{server.port}") as client:
                wait_until(lambda: _states(client) == {2: "READY"}, what="version 1 to unload")
                make_broken_predictor(tmp_path, problem="corrupt")
                wait_until(lambda: _states(client).get(3) == "FAILED", what="version 3 refused")
                (failed,) = [v for m in client.list_models() for v in m.versions if v.version == 3]
                assert "not a valid ONNX model" in failed.message
                count = len(seen)
                wait_until(lambda: len(seen) > count + 5, what="traffic after the refusal")
                assert client.get_model("tiny").version == 2
        finally:
            stop.set()
            thread.join(10)
        assert not errors, errors[:3]
        assert seen[0] == 1 and seen[-1] == 2
        # Once version 2 answered, version 1 never did again: the swap is atomic.
        assert 1 not in seen[seen.index(2) :]
        text = metrics_text(server)
        assert metric_value(text, "neurotwin_predictor_model_load_failures_total", model="tiny") == 1
        assert metric_value(text, "neurotwin_predictor_model_versions_ready", model="tiny") == 1


def test_fixed_version_is_retried_and_mismatched_card_is_refused(tmp_path: Path) -> None:
    make_predictor(tmp_path, seed=0)
    broken = make_broken_predictor(tmp_path, problem="neurons")
    with predictor_server(tmp_path) as (server, manager):
        with PredictorClient(f"127.0.0.1:{server.port}") as client:
            states = _states(client)
            assert states == {1: "READY", 2: "FAILED"}
            (failed,) = [v for m in client.list_models() for v in m.versions if v.version == 2]
            assert "7" in failed.message and "5" in failed.message  # card says 7 neurons, graph 5
            assert client.predict(random_images(1), "tiny").version == 1
            with pytest.raises(NotFound, match="FAILED"):
                client.predict(random_images(1), "tiny", version=2)
            # Unchanged files are not retried on every poll...
            manager.refresh()
            assert metric_value(metrics_text(server), "neurotwin_predictor_model_load_failures_total") == 1
            # ...but a repaired version is.
            good = make_predictor(tmp_path / "other", seed=1)
            shutil.copy(good.card_path, broken.card_path)
            manager.refresh()
            assert _states(client)[2] == "READY"
            wait_until(lambda: _states(client) == {2: "READY"}, what="version 1 unloaded")
            assert client.predict(random_images(1), "tiny").version == 2


def test_removed_version_unloads_after_in_flight_work(tmp_path: Path) -> None:
    v1 = make_predictor(tmp_path, seed=0)
    make_predictor(tmp_path, seed=1)
    with predictor_server(tmp_path, version_policy="latest:2") as (server, manager):
        gate = gate_model(manager, "tiny", 1)
        gate.hold()
        with PredictorClient(f"127.0.0.1:{server.port}") as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.predict, random_images(1), "tiny", 1)
            assert gate.entered.wait(5)
            shutil.rmtree(v1.path)
            manager.refresh()
            assert _states(client) == {1: "UNLOADING", 2: "READY"}
            with pytest.raises(NotFound):
                client.predict(random_images(1), "tiny", version=1)
            gate.open.set()
            assert in_flight.result(10).version == 1
            wait_until(lambda: _states(client) == {2: "READY"}, what="version 1 unloaded")
            # Removing the whole model unloads it too.
            shutil.rmtree(tmp_path / "predictors" / "tiny")
            manager.refresh()
            wait_until(lambda: _states(client) == {}, what="model unloaded")
            with pytest.raises(NotFound, match="no model named 'tiny'"):
                client.predict(random_images(1), "tiny")


def test_model_with_only_broken_versions(tmp_path: Path) -> None:
    make_broken_predictor(tmp_path, name="bad", problem="corrupt")
    make_predictor(tmp_path, name="good")
    with predictor_server(tmp_path) as (server, _):
        with PredictorClient(f"127.0.0.1:{server.port}") as client:
            assert _states(client, "bad") == {1: "FAILED"}
            assert _states(client, "good") == {1: "READY"}
            with pytest.raises(NotFound, match="no ready version"):
                client.predict(random_images(1), "bad")
            with pytest.raises(NotFound, match="no ready version"):
                client.get_model("bad")
        text = metrics_text(server)
        assert metric_value(text, "neurotwin_predictor_model_load_failures_total", model="bad") == 1
