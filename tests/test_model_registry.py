"""The model registry's validation over real files, real ONNX Runtime and real loopback gRPC:
versions with NaN outputs, flipped weight bytes or outputs that no longer match their reference are
refused (status, metrics, GetModel) while the last good version keeps serving; checksums and
reference outputs are recorded at export and on a first load; handles keep a retired version alive."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from neurotwin.client import PredictorClient
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.errors import ModelStoreError, NotFound
from neurotwin.integrity import INTEGRITY_FILE, REFERENCE_FILE, load_record
from neurotwin.store import ModelStore

from tests._broken_models import copy_version, flip_weight_bytes, nan_predictor, reseal_with_reference_of
from tests._models import make_card, make_predictor, random_images, reference_rates, tiny_predictor_bytes
from tests._serving import metric_value, metrics_text, predictor_server, wait_until


def _states(client: PredictorClient, name: str = "tiny") -> dict[int, str]:
    for model in client.list_models():
        if model.name == name:
            return {v.version: v.state for v in model.versions}
    return {}


def _message(client: PredictorClient, version: int, name: str = "tiny") -> str:
    status = client.get_model(name).status
    return next(v.message for v in status.versions if v.version == version)


def test_first_load_records_checksums_and_reference_then_verifies(tmp_path: Path) -> None:
    v1 = make_predictor(tmp_path)
    assert not (v1.path / INTEGRITY_FILE).exists()
    registry = ModelRegistry(tmp_path, RegistrySettings(poll_seconds=0))
    registry.start()
    try:
        assert registry.get("tiny").validation == "recorded"
    finally:
        registry.stop()
    record = load_record(v1.path)
    assert record is not None and record.recorded_by == "first-load"
    assert set(record.files) == {"model.onnx", "card.json", REFERENCE_FILE}
    with np.load(v1.path / REFERENCE_FILE) as reference:
        assert reference["inputs"].shape == (4, 32, 32, 3)
        np.testing.assert_allclose(reference["outputs"], reference_rates(v1, reference["inputs"]), rtol=1e-6)
    registry = ModelRegistry(tmp_path, RegistrySettings(poll_seconds=0))
    registry.start()
    try:
        assert registry.get("tiny").validation.startswith("verified")
    finally:
        registry.stop()


def test_export_records_integrity(tmp_path: Path) -> None:
    from neurotwin.training.export import write_predictor

    model_bytes, stats = tiny_predictor_bytes(5, 32, 0)
    version = write_predictor(ModelStore(tmp_path), "tiny", model_bytes, make_card("tiny", 5, 32, stats, 0))
    record = load_record(version.path)
    assert record is not None and record.recorded_by == "export"
    registry = ModelRegistry(tmp_path, RegistrySettings(poll_seconds=0))
    registry.start()
    try:
        assert registry.get("tiny").validation.startswith("verified")
    finally:
        registry.stop()


def test_refused_versions_leave_the_last_good_one_serving(tmp_path: Path) -> None:
    good = make_predictor(tmp_path, seed=0)
    images = random_images(3, seed=4)
    with predictor_server(tmp_path, poll_seconds=0.05) as (server, registry):
        stop = threading.Event()
        served: list[int] = []
        wrong: list[str] = []

        def traffic() -> None:
            with PredictorClient(f"127.0.0.1:{server.port}", timeout=10) as client:
                while not stop.is_set():
                    try:
                        result = client.predict(images, "tiny")
                    except Exception as exc:
                        wrong.append(repr(exc))
                        continue
                    served.append(result.version)
                    if result.version != 1 or not np.allclose(
                        result.rates, reference_rates(good, images), rtol=1e-5
                    ):
                        wrong.append(f"v{result.version}: {np.asarray(result.rates)[:1]}")

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            with PredictorClient(f"127.0.0.1:{server.port}") as client:
                wait_until(lambda: len(served) > 3, timeout=60, what="first predictions")
                # All-NaN outputs, no record yet: refused on its first load, nothing recorded.
                nan = nan_predictor(tmp_path)
                wait_until(lambda: _states(client).get(2) == "FAILED", timeout=60, what="NaN version refused")
                assert "NaN or infinite" in _message(client, 2)
                assert not (nan.path / INTEGRITY_FILE).exists()
                # The good version copied with its records, then 4 KB of its weights flipped.
                copy_version(tmp_path, good, flip_weight_bytes)
                wait_until(
                    lambda: _states(client).get(3) == "FAILED", timeout=60, what="flipped version refused"
                )
                assert "checksum mismatch" in _message(client, 3) and "model.onnx" in _message(client, 3)
                # Other weights behind checksums that match: only the reference outputs tell.
                other = make_predictor(tmp_path / "elsewhere", seed=1)
                copy_version(tmp_path, other, lambda folder: reseal_with_reference_of(folder, good))
                wait_until(
                    lambda: _states(client).get(4) == "FAILED", timeout=60, what="changed version refused"
                )
                assert "differ from the reference outputs" in _message(client, 4)
                count = len(served)
                wait_until(lambda: len(served) > count + 3, timeout=60, what="traffic after the refusals")
                assert _states(client) == {1: "READY", 2: "FAILED", 3: "FAILED", 4: "FAILED"}
                assert client.get_model("tiny").version == 1
                for version in (2, 3, 4):
                    with pytest.raises(NotFound, match="FAILED"):
                        client.predict(images, "tiny", version=version)
        finally:
            stop.set()
            thread.join(10)
        assert wrong == []
        assert set(served) == {1}
        text = metrics_text(server)
        assert metric_value(text, "neurotwin_predictor_model_load_failures_total", model="tiny") == 3
        assert metric_value(text, "neurotwin_model_refusals_total", kind="predictors", model="tiny") == 3
        assert registry.get("tiny").version == 1


def test_handle_keeps_a_retired_version_until_the_request_ends(tmp_path: Path) -> None:
    make_predictor(tmp_path, seed=0)
    registry = ModelRegistry(tmp_path, RegistrySettings(poll_seconds=0, unload_grace_seconds=30))
    registry.start()
    try:
        images = random_images(2)
        with registry.acquire("tiny") as held:
            make_predictor(tmp_path, seed=1)
            registry.refresh()
            assert registry.get("tiny").version == 2
            assert [i.state.value for i in registry.status()["tiny"]] == ["UNLOADING", "READY"]
            # Still usable by the request that holds it, although no new request can get it.
            rates = held.predict(images)
            assert rates.shape == (2, 5) and held.version == 1
            with pytest.raises(NotFound):
                registry.acquire("tiny", 1)
            assert held.session._session is not None
        wait_until(
            lambda: [i.version for i in registry.status()["tiny"]] == [2], timeout=60, what="v1 released"
        )
        assert held.session._session is None
    finally:
        registry.stop()


def test_a_pinned_version_outside_the_policy_is_validated_on_demand(tmp_path: Path) -> None:
    v1 = make_predictor(tmp_path, seed=0)
    make_predictor(tmp_path, seed=1)
    registry = ModelRegistry(tmp_path, RegistrySettings(poll_seconds=0))
    registry.start()
    try:
        assert [i.version for i in registry.status()["tiny"]] == [2]
        with registry.acquire_pinned("tiny", 1) as pinned:
            assert pinned.version == 1
            np.testing.assert_allclose(
                pinned.predict(random_images(1)), reference_rates(v1, random_images(1)), rtol=1e-5
            )
        # A pinned version whose weights changed after it was recorded is refused like a served one.
        registry.stop()
        flip_weight_bytes(v1.path)
        registry = ModelRegistry(tmp_path, RegistrySettings(poll_seconds=0))
        registry.start()
        with pytest.raises(ModelStoreError, match="checksum mismatch"):
            registry.acquire_pinned("tiny", 1)
    finally:
        registry.stop()
