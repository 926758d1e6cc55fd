"""Twin accuracy levers on one session, first half -> second half (issue 11, item 4).

Fits the twin through the training API (``fit_twins`` / ``fit_cv_ensemble``, what ``neurotwin train``
runs) with one change per variant against the defaults, on the same split (``split_indices`` first-half,
seed 0, 10% validation), and scores the second half: median and top-decile (p90) per-neuron Pearson r,
train wall and CPU seconds. Results go to a JSON file as each variant finishes (a rerun skips the ones
there), and a markdown table is printed.

Usage (from the repository root; reads ``../shared/data/cowley_v4``)::

    OMP_NUM_THREADS=1 nice -n 10 python bench/twin_levers.py --variants base,same3,folds3
    python bench/twin_levers.py --helpers all --variants base,folds3     # shared core over 9 sessions
    python bench/twin_levers.py --table-only

Variants: ``base`` (the defaults, one member), ``sameK`` (K members, one split, own seeds: the old
``--ensemble K``), ``foldsK`` (K members, each its own validation slice), ``px160`` (input resized to
160 px), ``stages3-10`` (EfficientNet blocks 3,5,7,10), ``hidden192``, ``gaussian`` (Gaussian readout);
``a+b`` combines two (``folds3+px160``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cowley_v4"
DEFAULT_RESULTS = REPO / "bench" / "twin_levers_results.json"

from neurotwin.training.datasets import list_sessions, load_recording, split_indices  # noqa: E402
from neurotwin.training.ensemble import fit_cv_ensemble  # noqa: E402
from neurotwin.training.evaluate import pearson_per_neuron  # noqa: E402
from neurotwin.training.fit import FitConfig, SessionData, fit_twins  # noqa: E402
from neurotwin.training.twin import TwinConfig  # noqa: E402

FIXED = {
    "px160": {"input_size": 160},
    "stages3-10": {"stages": (3, 5, 7, 10)},
    "hidden192": {"hidden": 192},
    "gaussian": {"readout": "gaussian"},
}


def variant_settings(name: str) -> tuple[dict[str, Any], str]:
    """(TwinConfig overrides, member split) of a variant name; ``a+b`` combines two."""
    overrides: dict[str, Any] = {}
    member_split = "same"
    for part in name.split("+"):
        match = re.fullmatch(r"(same|folds)(\d+)", part)
        if match:
            overrides["ensemble"] = int(match.group(2))
            member_split = match.group(1)
        elif part in FIXED:
            overrides.update(FIXED[part])
        elif part != "base":
            raise SystemExit(f"unknown variant {part!r}")
    return overrides, member_split


def run_variant(
    name: str, target: str, recordings: dict[str, Any], helpers: list[str], seed: int
) -> dict[str, Any]:
    overrides, member_split = variant_settings(name)
    config = TwinConfig(**overrides)
    fit_config = FitConfig(seed=seed, progress=False)
    rec = recordings[target]
    split = split_indices(rec.n_images, scheme="first-half", seed=seed, val_fraction=0.1)
    sessions = {target: SessionData(rec, split)}
    sessions.update({h: SessionData(recordings[h], None) for h in helpers})
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if member_split == "folds":
        result, _ = fit_cv_ensemble(sessions, config, fit_config)
    else:
        result = fit_twins(sessions, config, fit_config)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    test = split["test"]
    predicted = result.twins[target].predict(rec.images[test])
    r = pearson_per_neuron(predicted, rec.responses[:, test].T)
    return {
        "variant": name,
        "session": target,
        "helpers": len(helpers),
        "median_r": round(float(np.median(r)), 4),
        "top_decile_r": round(float(np.percentile(r, 90)), 4),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "epochs": result.epochs_run,
        "load_avg": round(os.getloadavg()[0], 1),
        "config": config.to_dict(),
        "member_split": member_split,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| session | helpers | variant | median r | top decile r | train wall s | train CPU s | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(results.values(), key=lambda r: (r["session"], r["helpers"], r["variant"])):
        lines.append(
            f"| {row['session']} | {row['helpers']} | {row['variant']} | **{row['median_r']:.3f}** | "
            f"{row['top_decile_r']:.3f} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} | {row['load_avg']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--session", default="201025")
    parser.add_argument("--helpers", default="none", help="'none', 'all' (every other session) or a list")
    parser.add_argument("--variants", default="base,same3,folds3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(DEFAULT_RESULTS))
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    path = Path(args.results)
    results: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    if not args.table_only:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        available = list_sessions(args.data)
        if args.helpers == "none":
            helpers: list[str] = []
        elif args.helpers == "all":
            helpers = [s for s in available if s != args.session]
        else:
            helpers = [h for h in args.helpers.split(",") if h]
        recordings = {s: load_recording(args.data, session=s) for s in [args.session, *helpers]}
        for name in [v for v in args.variants.split(",") if v]:
            key = f"{args.session}/{len(helpers)}/{name}/{args.seed}"
            if key in results and not args.rerun:
                continue
            row = run_variant(name, args.session, recordings, helpers, args.seed)
            results[key] = row
            print(
                f"{key}: median r {row['median_r']:.3f}, top decile {row['top_decile_r']:.3f}, "
                f"{row['wall_s']:.0f} s",
                flush=True,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
