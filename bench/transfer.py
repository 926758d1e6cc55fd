"""Transfer benchmark: do stimuli made on one twin drive independent twins of the same neurons?

    python bench/transfer.py                          # sessions 201025, 210224, 210621; 10 neurons each
    python bench/transfer.py --methods gradient,pixels --neurons 6
    python bench/transfer.py --quick                  # 1 synthetic session, 3 neurons, few steps (CI)

For each session, twin A makes the stimuli through the synthesizer's own code path and defaults
(``SynthesizerService.build`` from a ``SynthesizeRequest`` naming only model, neuron, method, generator,
image count and seed; the service's scheduler runs every neuron's job batched). Twin A is the bundled
``v4-<session>`` where the project's store has it, else one trained here with the README's recipe.
Independent twins B (``bench/_transfer_twins.py``: a from-pixels conv core, a Lite0 twin on other
blocks with a Gaussian readout, ridge on other pretrained features; other seeds and splits, trained on
the session alone) then score the uint8 images. Ratio = B's rate for a stimulus / B's maximum over all
the session's natural images.

Reported per method and prior, over every (session, neuron, twin B): median ratio and share of
neurons above 1 for the best of the k images (best as B sees it: a lab shows all k and keeps the best)
and for the average image; the ratio on A itself for reference; and the baseline "A's top natural
image scored by B". Trained twins are cached in ``runs/transfer/store`` so reruns only synthesize.

``--quick`` writes synthetic sessions (``--data`` is not read), trains tiny twins, and runs a few
steps: it checks the machinery (tests/test_transfer_bench.py), its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _transfer_levers import Lever
from _transfer_twins import (
    INDEPENDENT,
    TrainingPlan,
    independent_name,
    load_session,
    prepare_members,
    prepare_store,
    ridge_twin,
    twin_a_name,
    write_synthetic_sessions,
)
from neurotwin.imagecodec import resize_uint8
from neurotwin.store import PREDICTORS, ModelStore
from neurotwin.training.export import onnx_predict, ort_session

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cowley_v4"
DEFAULT_SESSIONS = ("201025", "210224", "210621")


@dataclass(frozen=True)
class Method:
    name: str
    method: str  # the request's method: gradient, cmaes, genetic
    generator: str  # "" = the service's default generator, "pixels" = Fourier pixels
    description: str


METHODS: dict[str, Method] = {
    "gradient": Method("gradient", "gradient", "", "gradient (DGN-AM) on the default generator"),
    "cmaes": Method("cmaes", "cmaes", "", "CMA-ES on the default generator"),
    "genetic": Method("genetic", "genetic", "", "genetic algorithm on the default generator"),
    "pixels": Method("pixels", "gradient", "pixels", "gradient in Fourier pixels (no generator)"),
}


class OnnxTwin:
    def __init__(self, store: ModelStore, name: str) -> None:
        version = store.resolve(PREDICTORS, name)
        self.card = json.loads(version.card_path.read_text())
        self.size = (int(self.card["input"]["height"]), int(self.card["input"]["width"]))
        self.session = ort_session(version.model_path.read_bytes())
        self.source = version.model_path

    @property
    def heldout_r(self) -> float | None:
        return self.card.get("metrics", {}).get("test", {}).get("median_r")

    def predict(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] != self.size:
            images = np.stack([resize_uint8(img, self.size) for img in images])
        return onnx_predict(self.session, images)


@dataclass
class Scored:
    """Ratios of one method on one session: [neurons, k] per twin B, plus A's own."""

    self_ratio: np.ndarray
    ratios: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


# -- synthesis through the service ---------------------------------------------------------------------


def synthesize_session(
    service: Any,
    model: str,
    method: Method,
    neurons: list[int],
    k: int,
    budget: int,
    lever: Lever,
    members: list[Any],
    natural_max: np.ndarray,
) -> tuple[np.ndarray, float]:
    """uint8 [neurons, k, H, W, 3] stimuli, every neuron's job submitted at once (one batched run)."""
    from neurotwin.v1 import synthesizer_pb2 as pb

    jobs = []
    started = time.perf_counter()
    for n in neurons:
        request = pb.SynthesizeRequest(
            model=model,
            generator=method.generator,
            objective=pb.Objective(kind=pb.Objective.SINGLE_NEURON, neurons=[n]),
            method=getattr(pb.SynthesizeRequest, method.method.upper()),
            budget=budget,
            num_images=k,
            seed=n,
        )
        loaded, job_request = service.build(request)
        pair, job_request = lever.apply(loaded.pair, job_request, members, float(natural_max[n]))
        jobs.append(service.scheduler.submit(pair, job_request))
    service.scheduler.run_until_idle()
    images = np.stack([job.result(timeout=0).images for job in jobs])
    return images, time.perf_counter() - started


# -- the run -------------------------------------------------------------------------------------------


def pick_neurons(count: int, n: int) -> list[int]:
    """``n`` neurons spread evenly over the session (no selection by how well they transfer)."""
    return sorted({int(x) for x in np.rint(np.linspace(0, count - 1, min(n, count)))})


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from neurotwin.server.synthesizer import Settings, SynthesizerService

    runs = Path(args.runs)
    data = Path(args.data)
    sessions = list(args.sessions)
    if args.quick:
        data = write_synthetic_sessions(runs / "synthetic-data", sessions)
    work = ModelStore(runs / "store")
    (work.root / PREDICTORS).mkdir(parents=True, exist_ok=True)
    plan = TrainingPlan(quick=args.quick)
    origin = prepare_store(work, ModelStore(args.model_store), data, sessions, plan, log, args.independent)

    settings = Settings(model_store=str(work.root), device=args.device, max_jobs=10_000, max_images=64)
    service = SynthesizerService(settings, start=False)
    methods = [METHODS[m] for m in args.methods]
    levers = [Lever.parse(text) for text in args.lever] or [Lever()]
    rows = [(method, lever) for lever in levers for method in methods]
    results: dict[str, dict[str, Scored]] = {row_key(m, lv): {} for m, lv in rows}
    baseline: dict[str, dict[str, np.ndarray]] = {}
    twins_info: dict[str, dict[str, Any]] = {}
    neurons_used: dict[str, list[int]] = {}
    try:
        for session in sessions:
            rec = load_session(data, session)
            twin_a = OnnxTwin(work, twin_a_name(session))
            scorers: dict[str, Any] = {}
            info: dict[str, Any] = {
                "A": {
                    "name": twin_a_name(session),
                    "origin": origin[session],
                    "heldout_median_r": twin_a.heldout_r,
                }
            }
            for kind in args.independent:
                if kind == "ridge":
                    scorers[kind], r = ridge_twin(runs / "ridge", rec, session, log)
                else:
                    scorers[kind] = OnnxTwin(work, independent_name(kind, session))
                    r = scorers[kind].heldout_r
                info[kind] = {"heldout_median_r": r}
            members = load_members(work, data, session, max(lv.ensemble_size for lv in levers), plan, log)
            info["members"] = {m.name: m.heldout_r for m in members}
            twins_info[session] = info
            neurons = pick_neurons(rec.n_neurons, args.neurons)
            neurons_used[session] = neurons
            natural_a = natural_rates(runs, session, twin_a_name(session), twin_a, rec)
            natural_b = {kind: natural_rates(runs, session, kind, s, rec) for kind, s in scorers.items()}
            max_a = natural_a.max(axis=0)
            max_b = {kind: v.max(axis=0) for kind, v in natural_b.items()}
            top_a = natural_a.argmax(axis=0)
            baseline[session] = {
                kind: np.array([natural_b[kind][top_a[n], n] / max_b[kind][n] for n in neurons])
                for kind in scorers
            }
            idx = np.array(neurons)
            for method, lever in rows:
                budget = args.budget.get(method.name, 0)
                log(f"{session}: {row_key(method, lever)}, {len(neurons)} neurons x {args.images}")
                modules = [m.module for m in members[: lever.ensemble_size]]
                cache = stimulus_cache(runs, session, method, lever, neurons, args.images, budget)
                if cache.exists():
                    saved = np.load(cache)
                    images, seconds = saved["images"], float(saved["seconds"])
                else:
                    images, seconds = synthesize_session(
                        service,
                        twin_a_name(session),
                        method,
                        neurons,
                        args.images,
                        budget,
                        lever,
                        modules,
                        max_a,
                    )
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(cache, images=images, seconds=np.array(seconds))
                flat = images.reshape(-1, *images.shape[2:])
                rates_a = twin_a.predict(flat).reshape(len(neurons), args.images, -1)
                scored = Scored(
                    self_ratio=rates_a[np.arange(len(neurons)), :, idx] / max_a[idx][:, None], seconds=seconds
                )
                for kind, scorer in scorers.items():
                    rates_b = scorer.predict(flat).reshape(len(neurons), args.images, -1)
                    scored.ratios[kind] = rates_b[np.arange(len(neurons)), :, idx] / max_b[kind][idx][:, None]
                results[row_key(method, lever)][session] = scored
                log(f"  {seconds:.0f} s; " + summary_line(scored))
    finally:
        service.stop()
    return report(args, rows, results, baseline, twins_info, neurons_used)


def natural_rates(runs: Path, session: str, name: str, twin: Any, rec: Any) -> np.ndarray:
    """A twin's rates on every natural image of the session, computed once per twin file."""
    source = getattr(twin, "source", None)
    stamp = f"{source.stat().st_mtime_ns}-{source.stat().st_size}" if source is not None else "x"
    path = runs / "natural" / f"{session}-{name}-{rec.sha256[:12]}-{stamp}.npy"
    if path.exists():
        return np.load(path)
    rates = twin.predict(rec.images)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, rates)
    return rates


def stimulus_cache(
    runs: Path, session: str, method: Method, lever: Lever, neurons: list[int], k: int, budget: int
) -> Path:
    """Where a run's stimuli are kept, so scoring them on another twin B does not synthesize again.

    The key holds everything that decides the images, and the code version of the synthesis engine and
    service (their files' hash): a change there makes new stimuli."""
    import hashlib

    import neurotwin

    package = Path(neurotwin.__file__).parent
    digest = hashlib.sha256()
    for part in (
        "engines/synthesis.py",
        "engines/objectives.py",
        "engines/optimizers.py",
        "server/synthesizer.py",
        "runtimes/generators.py",
        "runtimes/twin_ensemble.py",
    ):
        path = package / part
        digest.update(path.read_bytes() if path.exists() else b"")
    digest.update(repr((session, method, lever.text, neurons, k, budget)).encode())
    digest.update((runs / "store" / PREDICTORS / twin_a_name(session)).as_posix().encode())
    return runs / "stimuli" / f"{session}-{method.name}-{digest.hexdigest()[:16]}.npz"


def row_key(method: Method, lever: Lever) -> str:
    return f"{method.name} [{lever.describe()}]"


@dataclass
class Member:
    name: str
    module: Any
    heldout_r: float | None


def load_members(
    work: ModelStore, data: Path, session: str, count: int, plan: TrainingPlan, log: Callable[[str], None]
) -> list[Member]:
    """Twin A's extra ensemble members as differentiable twins (trained on first use)."""
    from neurotwin.runtimes.onnx_torch import load_differentiable_twin

    out = []
    for name in prepare_members(work, data, session, count, plan, log) if count else []:
        module, card = load_differentiable_twin(work.resolve(PREDICTORS, name), "cpu", parity_images=0)
        out.append(Member(name, module, card.metrics.get("test", {}).get("median_r")))
    return out


def summary_line(scored: Scored) -> str:
    best = np.concatenate([r.max(axis=1) for r in scored.ratios.values()])
    return f"on A {np.median(scored.self_ratio.max(axis=1)):.2f}, on B best-of-k median {np.median(best):.2f}"


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(values)), "above_1": float((values > 1).mean()), "n": int(values.size)}


def report(
    args: argparse.Namespace,
    rows: list[tuple[Method, Lever]],
    results: dict[str, dict[str, Scored]],
    baseline: dict[str, dict[str, np.ndarray]],
    twins_info: dict[str, dict[str, Any]],
    neurons_used: dict[str, list[int]],
) -> dict[str, Any]:
    out_rows: list[dict[str, Any]] = []
    base_all = np.concatenate([v for per in baseline.values() for v in per.values()])
    for method, lever in rows:
        per_session = results[row_key(method, lever)]
        best = np.concatenate([r.max(axis=1) for s in per_session.values() for r in s.ratios.values()])
        mean = np.concatenate([r.mean(axis=1) for s in per_session.values() for r in s.ratios.values()])
        own = np.concatenate([s.self_ratio.max(axis=1) for s in per_session.values()])
        per_b = {
            kind: _stats(np.concatenate([s.ratios[kind].max(axis=1) for s in per_session.values()]))
            for kind in args.independent
        }
        out_rows.append(
            {
                "method": method.name,
                "lever": lever.describe(),
                "description": method.description,
                "budget": args.budget.get(method.name, 0) or "default",
                "on_A_best": _stats(own),
                "best_of_k": _stats(best),
                "average_image": _stats(mean),
                "per_independent_twin_best_of_k": per_b,
                "per_session_best_of_k": {
                    session: _stats(np.concatenate([r.max(axis=1) for r in s.ratios.values()]))
                    for session, s in per_session.items()
                },
                "seconds": sum(s.seconds for s in per_session.values()),
            }
        )
    return {
        "sessions": list(neurons_used),
        "neurons": neurons_used,
        "images_per_neuron": args.images,
        "twins": twins_info,
        "baseline_top_natural_of_A": _stats(base_all),
        "methods": out_rows,
        "quick": bool(args.quick),
        "torch_threads": torch.get_num_threads(),
    }


def markdown(result: dict[str, Any]) -> str:
    k = result["images_per_neuron"]
    names = " / ".join(result["methods"][0]["per_independent_twin_best_of_k"]) if result["methods"] else ""
    lines = [
        f"| method | lever | budget | on A (best of {k}) | on B: best of {k}, median | > 1 |"
        f" average image, median | > 1 | per B ({names}), best-of-k median |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["methods"]:
        per_b = " / ".join(f"{v['median']:.2f}" for v in row["per_independent_twin_best_of_k"].values())
        lines.append(
            f"| {row['description']} | {row['lever']} | {row['budget']} | {row['on_A_best']['median']:.2f} | "
            f"**{row['best_of_k']['median']:.2f}** | {row['best_of_k']['above_1']:.0%} | "
            f"{row['average_image']['median']:.2f} | {row['average_image']['above_1']:.0%} | {per_b} |"
        )
    base = result["baseline_top_natural_of_A"]
    lines.append(
        f"| baseline: A's top natural image | - | - | 1.00 | {base['median']:.2f} | {base['above_1']:.0%} |"
        " - | - | - |"
    )
    return "\n".join(lines)


def parse_budgets(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in METHODS or not value.isdigit():
            raise SystemExit(f"--budget: expected METHOD=N with METHOD in {list(METHODS)}, got {part!r}")
        out[name] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cowley_v4 folder")
    parser.add_argument("--sessions", default=",".join(DEFAULT_SESSIONS))
    parser.add_argument(
        "--model-store", type=Path, default=ROOT / "model_store", help="where bundled twins are"
    )
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "transfer", help="cache of trained twins"
    )
    parser.add_argument(
        "--methods", default="gradient,pixels,cmaes", help=f"comma-separated from {list(METHODS)}"
    )
    parser.add_argument("--neurons", type=int, default=10, help="neurons per session, spread evenly")
    parser.add_argument("--images", type=int, default=4, help="images per neuron (k)")
    parser.add_argument(
        "--budget", default="", help="METHOD=N overrides of the service defaults, e.g. cmaes=1000"
    )
    parser.add_argument(
        "--lever",
        action="append",
        default=[],
        help="key=value,... (bench/_transfer_levers.py); repeat for rows",
    )
    parser.add_argument(
        "--independent", default=",".join(INDEPENDENT), help=f"twins B, from {list(INDEPENDENT)}"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="1 synthetic session, 3 neurons, few steps")
    parser.add_argument("--json", type=Path, default=None, help="write the full result here")
    args = parser.parse_args(argv)
    args.sessions = [s for s in args.sessions.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    args.independent = [b for b in args.independent.split(",") if b]
    if not args.independent or set(args.independent) - set(INDEPENDENT):
        raise SystemExit(f"--independent: expected names from {list(INDEPENDENT)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected from {list(METHODS)}")
    args.budget = parse_budgets(args.budget)
    if args.quick:
        args.sessions = args.sessions[:1] if args.sessions != list(DEFAULT_SESSIONS) else ["000001"]
        args.neurons = min(args.neurons, 3)
        args.images = min(args.images, 2)
        quick_budget = {"gradient": 5, "pixels": 5, "cmaes": 40, "genetic": 40}
        args.budget = {**quick_budget, **args.budget}
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()
    result = run(args, lambda line: print(line, flush=True))
    result["wall_s"] = time.perf_counter() - started
    print(markdown(result))
    out = args.json or Path(args.runs) / "transfer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
