"""bench/dashboard.py end to end on a stand-in generator, in a few generations: the server, the rig,
the watching process and every measured request run for real, and the figures come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "dashboard.py"),
            "--stand-in",
            "--prefill",
            "3",
            "--population",
            "6",
            "--natural",
            "2",
            "--blocks",
            "1",
            "--block-generations",
            "2",
            "--browsers",
            "2",
            "--poll",
            "0.3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ratio watched / alone (p50)" in run.stdout
    figures = json.loads(out.read_text())
    assert len(figures["rig_alone_ms"]) == len(figures["rig_watched_ms"]) == 2
    assert all(len(values) >= 4 for values in figures["requests_ms"].values())
    assert figures["ratio"] > 0 and figures["once_ms"]["export.h5 download"] > 0
