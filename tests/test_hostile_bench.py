"""The hostile benchmark's attack matrix as a standing test: every bad input over every RPC of a real
``neurotwin serve all`` process is refused with a client-fault status (no crash, no hang, no wrong
answer), the server stays up under idle-stream and connection floods, a kill -9 during Ask and Tell
loses and double-counts nothing, and valid, corrupt and NaN versions dropped into a served store
under 32-client load fail no Predict while the corrupt and NaN ones are refused."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_attack_matrix_a_kill_and_hot_reloads(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("hostile_bench", ROOT / "bench" / "hostile.py")
    assert spec is not None and spec.loader is not None
    hostile = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up by name.
    sys.modules[spec.name] = hostile
    spec.loader.exec_module(hostile)
    out = tmp_path / "hostile.json"
    code = hostile.main(["--quick", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["failures"] == []
    assert summary["inputs_tried"] >= 300
    assert (summary["crashes"], summary["hangs"], summary["wrong_answers"]) == (0, 0, 0)
    assert summary["kills"] == 1 and summary["acknowledged_responses"] > 0
    assert (summary["lost"], summary["double_counted"], summary["corrupted"]) == (0, 0, 0)
    assert summary["count_mismatches"] == 0
    reload = summary["hot_reload"]
    assert reload["clients"] == 32 and reload["predicts_ok"] > 0
    assert reload["predict_failures"] == 0
    assert (reload["non_finite_served_ok"], reload["wrong_served_ok"]) == (0, 0)
    assert reload["refused"] == [3, 4] and reload["refusals_metric"] == 2
    assert "checksum mismatch" in reload["refusal_messages"]["3"]
    assert "NaN or infinite" in reload["refusal_messages"]["4"]
    assert reload["serving_at_end"] == 2 and reload["served_by_version"]["2"] > 0
    assert code == 0
