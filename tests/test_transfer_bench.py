"""bench/transfer.py --quick end to end: synthetic session, twins trained by the bench, real synthesis."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench() -> object:
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "bench" / "transfer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["transfer_bench"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_quick_transfer_bench_trains_twins_and_scores_stimuli_on_them(tmp_path: Path) -> None:
    bench = _load_bench()
    project = tmp_path / "project_store"
    # Only the generators of the project's store: twin A must be trained by the bench.
    shutil.copytree(
        ROOT / "model_store" / "generators" / "v4-dcgan-h2", project / "generators" / "v4-dcgan-h2"
    )
    (project / "predictors").mkdir()
    runs = tmp_path / "runs"
    out = tmp_path / "result.json"
    common = [
        "--quick",
        "--runs",
        str(runs),
        "--model-store",
        str(project),
        "--data",
        str(tmp_path / "no-such-data"),
    ]
    assert bench.main([*common, "--json", str(out), "--methods", "gradient,pixels,cmaes"]) == 0
    result = json.loads(out.read_text())
    assert result["quick"] and result["sessions"] == ["000001"]
    assert result["neurons"]["000001"] == [0, 2, 5]
    twins = result["twins"]["000001"]
    assert twins["A"]["origin"] == "trained here"
    assert set(twins) == {"A", "conv", "lite", "ridge", "members"} and twins["members"] == {}
    rows = {row["method"]: row for row in result["methods"]}
    assert set(rows) == {"gradient", "pixels", "cmaes"}
    for row in rows.values():
        # 3 neurons x 3 independent twins, each ratio a finite positive number.
        assert row["best_of_k"]["n"] == 9 and row["average_image"]["n"] == 9
        assert np.isfinite(row["best_of_k"]["median"]) and row["best_of_k"]["median"] > 0
        assert row["best_of_k"]["median"] >= row["average_image"]["median"]
    assert result["baseline_top_natural_of_A"]["n"] == 9
    # The twins are cached: a second run trains nothing but the ensemble member its lever asks for,
    # and its defaults row repeats the first run's exactly.
    store = runs / "store" / "predictors"
    stamps = {p: p.stat().st_mtime for p in store.rglob("model.onnx")}
    assert len(stamps) == 3
    out2 = tmp_path / "again.json"
    lever = "ens=1,agg=softmin,disagree=0.2,clip=1.2,blur=0.02,jitter=0.1"
    again_argv = [*common, "--json", str(out2), "--methods", "gradient", "--lever", "", "--lever", lever]
    assert bench.main(again_argv) == 0
    after = {p: p.stat().st_mtime for p in store.rglob("model.onnx")}
    assert {p: t for p, t in after.items() if p in stamps} == stamps
    assert sorted(p.parts[-3] for p in after if p not in stamps) == ["ens-000001-s10"]
    again = json.loads(out2.read_text())
    assert again["baseline_top_natural_of_A"] == result["baseline_top_natural_of_A"]
    assert [row["lever"] for row in again["methods"]] == ["defaults", lever]
    assert again["methods"][0]["best_of_k"] == rows["gradient"]["best_of_k"]
    assert list(again["twins"]["000001"]["members"]) == ["ens-000001-s10"]
    assert again["methods"][1]["best_of_k"]["n"] == 9
