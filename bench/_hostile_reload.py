"""The hot-reload stage of bench/hostile.py: versions dropped into a served model store under load.

32 client threads call Predict in a loop against a real ``neurotwin serve predictor`` that polls its
store, while one after another a valid new version, a copy of it with flipped weight bytes and a
version whose outputs are all NaN are dropped in (built as tests/test_model_registry.py builds them).
Counted: failed Predicts, replies served OK that are non-finite or differ from what the version that
served them computes, which versions the registry refused (GetModel states, the refusal metric) and
which version serves at the end. Passing: no failure, no wrong reply, versions 3 (corrupt) and
4 (NaN) refused, version 2 (the valid one) serving.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from neurotwin.client import PredictorClient
from neurotwin.integrity import INTEGRITY_FILE
from neurotwin.store import PREDICTORS, ModelStore, ModelVersion

from bench._hostile_cases import NEURONS, SIZE, TWIN
from tests._broken_models import copy_version, flip_weight_bytes, nan_predictor
from tests._models import make_predictor, random_images, reference_rates
from tests._serving import metric_value

# The versions the stage drops in, in order: the valid one must win, the others must be refused.
FIRST, VALID, CORRUPT, NAN = 1, 2, 3, 4
STEP_TIMEOUT = 120.0


class ServedStore(Protocol):
    port: int
    metrics_port: int

    @property
    def alive(self) -> bool: ...


@dataclass
class ReloadReport:
    clients: int = 0
    predicts_ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    non_finite: int = 0
    wrong_replies: int = 0
    served_by_version: Counter[int] = field(default_factory=Counter)
    states: dict[int, str] = field(default_factory=dict)
    refusal_messages: dict[int, str] = field(default_factory=dict)
    refusals_metric: float = 0.0
    serving_at_end: int = 0
    seconds_to_serve_valid: float = 0.0
    seconds_to_refuse: dict[int, float] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        refused = {v for v, state in self.states.items() if state == "FAILED"}
        return (
            not self.failures
            and self.non_finite == 0
            and self.wrong_replies == 0
            and refused == {CORRUPT, NAN}
            and self.serving_at_end == VALID
            and self.served_by_version[VALID] > 0
        )

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "predicts_ok": self.predicts_ok,
            "predict_failures": sum(self.failures.values()),
            "failures_by_status": dict(self.failures),
            "non_finite_served_ok": self.non_finite,
            "wrong_served_ok": self.wrong_replies,
            "served_by_version": {str(v): n for v, n in sorted(self.served_by_version.items())},
            "states": {str(v): s for v, s in sorted(self.states.items())},
            "refused": sorted(v for v, s in self.states.items() if s == "FAILED"),
            "refusal_messages": {str(v): m[:200] for v, m in sorted(self.refusal_messages.items())},
            "refusals_metric": self.refusals_metric,
            "serving_at_end": self.serving_at_end,
            "seconds_to_serve_valid": round(self.seconds_to_serve_valid, 2),
            "seconds_to_refuse": {str(v): round(s, 2) for v, s in sorted(self.seconds_to_refuse.items())},
            "examples": self.examples[:10],
            "passed": self.passed,
        }


def build_reload_store(folder: Path) -> Path:
    """A store holding version 1 of the tiny twin (the one served before any reload)."""
    store = folder / "reload-store"
    make_predictor(store, TWIN, neurons=NEURONS, size=SIZE, seed=0)
    return store


class _Traffic:
    """Client threads calling Predict in a loop; every reply is checked against the version that
    served it, computed directly with ONNX Runtime from that version's files."""

    def __init__(self, address: str, store: Path, clients: int, report: ReloadReport) -> None:
        self.address, self.store, self.report = address, store, report
        self.images = random_images(3, size=SIZE, seed=4)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._expected: dict[int, np.ndarray] = {}
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _expected_for(self, version: int) -> np.ndarray | None:
        # Only the first and the valid version may ever serve; any other is a wrong reply.
        if version not in (FIRST, VALID):
            return None
        with self._lock:
            if version not in self._expected:
                found = ModelStore(self.store).resolve(PREDICTORS, TWIN, version)
                self._expected[version] = reference_rates(found, self.images)
            return self._expected[version]

    def _loop(self) -> None:
        with PredictorClient(self.address, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    result = client.predict(self.images, TWIN)
                except Exception as exc:  # every failure counts, whatever its kind
                    code = getattr(exc, "code", None)
                    name = code().name if callable(code) else type(exc).__name__
                    with self._lock:
                        self.report.failures[name] += 1
                        self.report.examples.append(f"failed: {exc!r}"[:300])
                    continue
                self._check(result.version, np.asarray(result.rates, dtype=np.float32))

    def _check(self, version: int, rates: np.ndarray) -> None:
        problem = ""
        if not np.isfinite(rates).all():
            problem = "non-finite"
        else:
            expected = self._expected_for(version)
            if expected is None:
                problem = f"served by version {version}"
            elif rates.shape != expected.shape or not np.allclose(rates, expected, rtol=1e-5, atol=1e-6):
                problem = f"v{version} rates differ from its own outputs"
        with self._lock:
            self.report.predicts_ok += 1
            self.report.served_by_version[version] += 1
            if problem == "non-finite":
                self.report.non_finite += 1
            elif problem:
                self.report.wrong_replies += 1
            if problem:
                self.report.examples.append(f"v{version}: {problem}")

    def served(self, version: int) -> int:
        with self._lock:
            return self.report.served_by_version[version]


def _wait(condition: Callable[[], bool], server: ServedStore, what: str) -> float:
    """Seconds until ``condition`` holds; raises if the server dies or it takes too long."""
    started = time.monotonic()
    while not condition():
        if not server.alive:
            raise RuntimeError(f"the server exited while waiting for {what}")
        if time.monotonic() - started > STEP_TIMEOUT:
            raise RuntimeError(f"timed out after {STEP_TIMEOUT:g} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def _states(client: PredictorClient) -> dict[int, str]:
    for model in client.list_models():
        if model.name == TWIN:
            return {v.version: v.state for v in model.versions}
    return {}


def reload_stage(server: ServedStore, store: Path, clients: int, hold_seconds: float) -> ReloadReport:
    """Drop the valid, corrupt and NaN versions into ``store`` one after another while ``clients``
    threads call Predict; ``hold_seconds`` of load before the first drop, between drops and after."""
    import urllib.request

    report = ReloadReport(clients=clients)
    address = f"127.0.0.1:{server.port}"
    traffic = _Traffic(address, store, clients, report)
    for thread in traffic.threads:
        thread.start()
    try:
        with PredictorClient(address, timeout=30) as client:
            _wait(lambda: traffic.served(FIRST) >= 2 * clients, server, "the first predictions")
            time.sleep(hold_seconds)
            valid: ModelVersion = make_predictor(store, TWIN, neurons=NEURONS, size=SIZE, seed=1)
            assert valid.version == VALID
            report.seconds_to_serve_valid = _wait(
                lambda: client.get_model(TWIN).version == VALID and traffic.served(VALID) > 0,
                server,
                "the valid version to serve",
            )
            # The corrupt version is the valid one copied with the records its first load wrote.
            _wait(lambda: (valid.path / INTEGRITY_FILE).exists(), server, "the valid version's records")
            time.sleep(hold_seconds)
            copy_version(store, valid, flip_weight_bytes)
            report.seconds_to_refuse[CORRUPT] = _wait(
                lambda: _states(client).get(CORRUPT) == "FAILED", server, "the corrupt version refused"
            )
            time.sleep(hold_seconds)
            nan_version = nan_predictor(store, TWIN, NEURONS, SIZE)
            assert nan_version.version == NAN
            report.seconds_to_refuse[NAN] = _wait(
                lambda: _states(client).get(NAN) == "FAILED", server, "the NaN version refused"
            )
            time.sleep(hold_seconds)
            traffic.stop.set()
            for thread in traffic.threads:
                thread.join(60)
            report.states = _states(client)
            details = client.get_model(TWIN)
            report.serving_at_end = details.version
            report.refusal_messages = {
                v.version: v.message for v in details.status.versions if v.state == "FAILED"
            }
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            metrics = page.read().decode()
        report.refusals_metric = metric_value(
            metrics, "neurotwin_model_refusals_total", kind="predictors", model=TWIN
        )
    finally:
        traffic.stop.set()
        for thread in traffic.threads:
            thread.join(60)
    return report
