"""Closed-loop benchmark: evolution against virtual V4 neurons, GA vs CMA-ES vs twin-guided CMA-ES.

    python bench/closed_loop.py                 # 20 neurons x 75 generations x 40 images, all methods
    python bench/closed_loop.py --quick         # 4 neurons x 15 generations (smoke run)
    python bench/closed_loop.py --methods ga,cma-es --neurons 10 --out runs/cl.json
    python bench/closed_loop.py --neuron-twin indep-lite-201025 --generations 30 --methods ga,cma-es
    python bench/closed_loop.py --ask-latency 12 --baseline-rev REV   # guided Ask p50, this code vs REV

Each virtual neuron is one output of a twin observed through Poisson spike counts over a 100 ms
presentation (one repeat per image): the true rate of an image is the twin's prediction, the rig sees
a Poisson draw of it. By default that twin is the bundled one (model_store/predictors/v4-201025), the
same the service guides with; ``--neuron-twin`` takes it from ``--neuron-store`` instead (default
``runs/transfer/store``, where ``bench/transfer.py`` trains and caches twins independent of the bundled
one: other seeds, splits, cores and readouts), so the service never sees the model of the neuron.

Sessions of >= 10 generations confirm by default (the last generation re-presents the top images 5
times each); the table then reports the confirmed best next to the single best measurement.

``--ask-latency N`` measures N twin-guided Asks (400 candidates: population 40 x 10) on this code
and on the code of git revision ``--baseline-rev`` (its ``services/`` unpacked into a scratch folder),
alternating, each in its own process on the same store and settings, and prints both p50s and the
ratio. Sessions run through the real
service (an in-process gRPC server on loopback with a SQLite journal in WAL/FULL mode, the rig-sim
client), so the Ask and Tell latencies are what a rig would see on this CPU.

Score per run: the noise-free rate of the session's pick, divided by the neuron's maximum noise-free
rate over the 1,200 natural images of session 201025 (``--natural``). The pick is the confirmed best
(highest mean over its re-presentations) when the session confirmed, else the stimulus with the best
single noisy measurement; the latter is reported too. Also reported: the best noise-free rate among
everything shown.

Methods (3,000 presentations each: 75 generations x 40 images; no natural references in the budget):
  ga                 genetic algorithm, XDream defaults (mutation 0.5/0.5, selectivity 2, heritability 0.5)
  cma-es             CMA-ES, sigma0 = the generator's latent std
  cma-es+twin        CMA-ES; each generation samples 10x candidates and presents the 40 the twin ranks
                     highest. Without --neuron-twin the guide IS the neuron's noise-free model: an upper
                     bound on what guidance can give; with an independent --neuron-twin it is what a
                     lab would get from a good twin of its neurons.
  cma-es+proxy       the same, but the guide is a *different* twin neuron: the one whose predictions over
                     the natural images correlate with the target's closest to r = 0.6 (about the twin's
                     held-out accuracy on real V4 neurons). A stand-in for an imperfect twin.
  cma-es+proxy+refit the proxy guide with the readout refit online from the session's own responses.
                     Caveat: the refit's features are all twin outputs, the true neuron's included, so it
                     can learn to lean on it; in vivo the twin's own model of the neuron (r ~ 0.6-0.8)
                     plays that part, so this is optimistic too.

Without the bundled models (or with ``--stand-in``) a test-sized stand-in store is built (a tiny
random DCGAN and a tiny random ONNX twin); numbers from it only show that the pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_STORE = ROOT / "model_store"
TWIN = "v4-201025"
GENERATOR = "v4-dcgan"
DATA = ROOT.parent / "shared" / "data" / "cowley_v4"
SESSION = "201025"
METHODS = ("ga", "cma-es", "cma-es+twin", "cma-es+proxy", "cma-es+proxy+refit")
PROXY_TARGET_R = 0.6


@dataclass
class Run:
    method: str
    neuron: int
    guide_neuron: int
    natural_max: float
    best_true: float
    max_true: float
    best_measured: float
    generations: int
    presentations: int
    seconds: float
    ask_ms: list[float]
    tell_ms: list[float]
    ask_cpu_ms: list[float]
    tell_cpu_ms: list[float]
    curve: list[float]
    # Mean noise-free rate of the last generation's synthetic images (robust to the winner's curse).
    final_mean: float = math.nan
    # The confirmed best's noise-free rate (NaN without confirmation) and its measured mean.
    confirmed_true: float = math.nan
    confirmed_measured: float = math.nan

    @property
    def ratio_confirmed(self) -> float:
        """The session's pick over natural max: the confirmed best, else the single best measurement."""
        pick = self.best_true if math.isnan(self.confirmed_true) else self.confirmed_true
        return pick / self.natural_max

    @property
    def ratio_final(self) -> float:
        return self.final_mean / self.natural_max

    @property
    def ratio(self) -> float:
        return self.best_true / self.natural_max

    @property
    def ratio_shown(self) -> float:
        return self.max_true / self.natural_max


def build_standin(store_root: Path) -> tuple[str, str]:
    """A tiny random generator and twin, for running the pipeline without the bundled models."""
    sys.path.insert(0, str(ROOT))
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator
    from neurotwin.store import GENERATORS, ModelStore

    from tests._models import make_predictor

    torch.manual_seed(0)
    with ModelStore(store_root).new_version(GENERATORS, "standin-dcgan") as folder:
        save_generator(DCGANGenerator(latent_dim=32, resolution=32, width=16), folder, "standin-dcgan")
    make_predictor(store_root, "standin-twin", neurons=24, size=32)
    return "standin-twin", "standin-dcgan"


def natural_images(path: Path, count: int, size: int) -> np.ndarray:
    """The session's natural images (uint8 [N, H, W, 3]), or random stand-ins when the data are absent."""
    if path.is_dir():
        from neurotwin.training.datasets import load_recording

        return load_recording(path, session=SESSION).images
    print(f"bench: {path} not found; using {count} random images as the natural set", flush=True)
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def pick_neurons(rates: np.ndarray, count: int) -> list[int]:
    """``count`` neurons spread evenly over the twin's outputs (no cherry-picking)."""
    k = rates.shape[1]
    return sorted({round(float(x)) for x in np.linspace(0, k - 1, min(count, k))})


def proxy_neuron(rates: np.ndarray, target: int) -> int:
    """The other neuron whose natural-image predictions correlate with the target's closest to 0.6."""
    r = np.corrcoef(rates.T)[target]
    r[target] = np.inf
    return int(np.argmin(np.abs(r - PROXY_TARGET_R)))


def summarize(runs: list[Run], methods: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        ratios = np.array([r.ratio for r in mine])
        picked = np.array([r.ratio_confirmed for r in mine])
        shown = np.array([r.ratio_shown for r in mine])
        final = np.array([r.ratio_final for r in mine])
        asks = np.concatenate([r.ask_ms for r in mine])
        tells = np.concatenate([r.tell_ms for r in mine])
        ask_cpu = np.concatenate([r.ask_cpu_ms for r in mine])
        tell_cpu = np.concatenate([r.tell_cpu_ms for r in mine])
        table[method] = {
            "neurons": len(mine),
            "best_over_natural_median": float(np.median(ratios)),
            "best_over_natural_mean": float(ratios.mean()),
            "best_over_natural_q25": float(np.percentile(ratios, 25)),
            "best_over_natural_q75": float(np.percentile(ratios, 75)),
            "beats_natural_max": float((ratios > 1).mean()),
            "confirmed_sessions": int(sum(not math.isnan(r.confirmed_true) for r in mine)),
            "pick_over_natural_median": float(np.median(picked)),
            "pick_over_natural_q25": float(np.percentile(picked, 25)),
            "pick_over_natural_q75": float(np.percentile(picked, 75)),
            "pick_beats_natural_max": float((picked > 1).mean()),
            "max_shown_over_natural_median": float(np.median(shown)),
            "final_mean_over_natural_median": float(np.median(final)),
            "ask_ms_p50": float(np.median(asks)),
            "ask_ms_p90": float(np.percentile(asks, 90)),
            "tell_ms_p50": float(np.median(tells)),
            "tell_ms_p90": float(np.percentile(tells, 90)),
            "ask_cpu_ms_p50": float(np.median(ask_cpu)),
            "tell_cpu_ms_p50": float(np.median(tell_cpu)),
            "seconds_per_session": float(np.mean([r.seconds for r in mine])),
        }
    for reference, key in (("ga", "ga"), ("cma-es", "cmaes")):
        # Compared on the session's pick: the confirmed best where the session confirmed.
        base = {r.neuron: r.ratio_confirmed for r in runs if r.method == reference}
        for method in methods:
            pairs = [
                (r.ratio_confirmed, base[r.neuron]) for r in runs if r.method == method and r.neuron in base
            ]
            if pairs and method != reference and method in table:
                gains = [a / b - 1 for a, b in pairs if b > 0]
                table[method][f"median_gain_over_{key}"] = float(np.median(gains)) if gains else math.nan
                table[method][f"wins_over_{key}"] = float(np.mean([a > b for a, b in pairs]))
    return table


def markdown(table: dict[str, Any], header: str) -> str:
    lines = [
        header,
        "",
        "| method | neurons | session's pick (confirmed best) / natural max: median (IQR) | > natural max "
        "| single best measurement / natural max: median (IQR) | > natural max "
        "| vs GA (median gain, wins) | vs CMA-ES (same neurons) | best shown | last evolved gen mean "
        "| Ask p50 / p90 ms (CPU p50) | Tell p50 / p90 ms (CPU p50) | s per session |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in table.items():
        gain, gain_cmaes = (
            f"{row[f'median_gain_over_{key}'] * 100:+.0f}%, {row[f'wins_over_{key}'] * 100:.0f}%"
            if f"median_gain_over_{key}" in row
            else "-"
            for key in ("ga", "cmaes")
        )
        confirmed = row.get("confirmed_sessions", 0)
        pick_note = "" if confirmed == row["neurons"] else f" [{confirmed} of {row['neurons']} confirmed]"
        lines.append(
            f"| {method} | {row['neurons']} | {row['pick_over_natural_median']:.2f} "
            f"({row['pick_over_natural_q25']:.2f}-{row['pick_over_natural_q75']:.2f}){pick_note} "
            f"| {row['pick_beats_natural_max'] * 100:.0f}% "
            f"| {row['best_over_natural_median']:.2f} "
            f"({row['best_over_natural_q25']:.2f}-{row['best_over_natural_q75']:.2f}) "
            f"| {row['beats_natural_max'] * 100:.0f}% "
            f"| {gain} | {gain_cmaes} | {row['max_shown_over_natural_median']:.2f} "
            f"| {row['final_mean_over_natural_median']:.2f} "
            f"| {row['ask_ms_p50']:.0f} / {row['ask_ms_p90']:.0f} ({row['ask_cpu_ms_p50']:.0f}) "
            f"| {row['tell_ms_p50']:.1f} / {row['tell_ms_p90']:.1f} ({row['tell_cpu_ms_p50']:.1f}) "
            f"| {row['seconds_per_session']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 neurons x 15 generations")
    parser.add_argument("--neurons", type=int, default=20)
    parser.add_argument("--generations", type=int, default=75)
    parser.add_argument("--population", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=10, help="candidates per presented image (guided)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--guided-neurons",
        type=int,
        default=0,
        help="run the twin-guided methods on only the first N of the chosen neurons (0: all); they cost "
        "about 10x more CPU per generation",
    )
    parser.add_argument("--model-store", default=str(BUNDLED_STORE))
    parser.add_argument("--twin", default=TWIN)
    parser.add_argument("--generator", default=GENERATOR)
    parser.add_argument("--natural", default=str(DATA), help="cowley_v4 data root (session 201025)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--stand-in", action="store_true", help="use test-sized stand-in models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shard",
        default="",
        help="K/N: run only every N-th chosen neuron from the K-th (parallel processes)",
    )
    parser.add_argument(
        "--merge", nargs="+", default=[], help="combine the JSON results of shards and report"
    )
    parser.add_argument(
        "--neuron-twin",
        default="",
        help="the virtual neurons' twin, from --neuron-store (default: the service's own twin)",
    )
    parser.add_argument(
        "--neuron-store",
        default=str(ROOT / "runs" / "transfer" / "store"),
        help="model store of --neuron-twin (bench/transfer.py's cache of independent twins)",
    )
    parser.add_argument(
        "--confirm", choices=["default", "off"], default="default", help="sessions' confirmation setting"
    )
    parser.add_argument(
        "--ask-latency", type=int, default=0, help="measure this many guided Asks per round instead"
    )
    parser.add_argument("--baseline-rev", default="", help="git revision to compare guided Asks with")
    parser.add_argument("--ask-rounds", type=int, default=3, help="alternating rounds per code version")
    parser.add_argument("--ask-threads", type=int, default=1, help="twin threads for --ask-latency")
    parser.add_argument(
        "--ask-per-neuron",
        type=int,
        default=0,
        help="--ask-latency with a per-neuron twin of this many neurons (bench/_pruning_bench.py: one "
        "compact conv net per neuron, as third-party twins are built) instead of --twin",
    )
    parser.add_argument("--ask-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_closed_loop.json"))
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.ask_worker:
        return ask_worker(args)
    if args.ask_latency:
        return ask_latency(args)
    if args.quick:
        args.neurons, args.generations = min(args.neurons, 4), min(args.generations, 15)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "services"))
    from neurotwin.client.closed_loop import ClosedLoopClient
    from neurotwin.commands.rig_sim import VirtualNeurons, in_process_server, load_twin, simulate
    from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

    work = Path(tempfile.mkdtemp(prefix="neurotwin-bench-cl-"))
    store_root = Path(args.model_store)
    store = ModelStore(store_root)
    stand_in = args.stand_in or not (
        store.versions(PREDICTORS, args.twin) and store.versions(GENERATORS, args.generator)
    )
    if stand_in:
        print(
            f"bench: bundled {args.twin} / {args.generator} not in {store_root}; building stand-ins",
            flush=True,
        )
        store_root = work / "store"
        args.twin, args.generator = build_standin(store_root)
        args.image_size = 32
    twin = load_twin(str(store_root), args.twin)
    neuron_model = twin
    if args.neuron_twin:
        neuron_model = load_twin(args.neuron_store, args.neuron_twin)
        if list(neuron_model.card.neuron_ids) != list(twin.card.neuron_ids):
            parser.error(f"{args.neuron_twin} does not model the neurons of {args.twin} (neuron ids differ)")
    natural = natural_images(Path(args.natural), 300, twin.card.input.height)
    probe = VirtualNeurons(neuron_model)
    natural_rates = probe.true_rates(natural)
    neurons = pick_neurons(natural_rates, args.neurons)
    count = args.guided_neurons or len(neurons)
    # An evenly spread subset for the expensive guided methods, when asked for.
    guided = {neurons[round(i * len(neurons) / count)] for i in range(min(count, len(neurons)))}
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        active = [x for x in neurons if any("+" not in m or x in guided for m in methods)]
        neurons = active[k::n]
    print(
        f"bench: twin {args.twin} ({twin.card.neuron_count} neurons), generator {args.generator}, "
        f"{len(natural)} natural images, neurons {neurons}, {args.generations} generations x "
        f"{args.population}, methods {methods}",
        flush=True,
    )

    runs: list[Run] = []
    journal = work / "journal.sqlite3"
    settings = {"compute_threads": 1, "twin_threads": 1, "max_sessions": 1000}
    with (
        in_process_server(str(store_root), str(journal), **settings) as address,
        ClosedLoopClient(address) as client,
    ):
        for neuron in neurons:
            natural_max = float(natural_rates[:, neuron].max())
            for method in methods:
                if "+" in method and neuron not in guided:
                    continue
                guide = neuron
                options: dict[str, Any] = {}
                if method == "ga":
                    options["optimizer"] = "ga"
                else:
                    options["optimizer"] = "cma-es"
                if args.confirm == "off":
                    options["confirmation"] = False
                if method == "cma-es+twin":
                    options.update(twin=args.twin, candidates_per_presentation=args.candidates)
                if method.startswith("cma-es+proxy"):
                    guide = proxy_neuron(natural_rates, neuron)
                    options.update(
                        twin=args.twin,
                        twin_neurons=[guide],
                        candidates_per_presentation=args.candidates,
                        refit_readout=method.endswith("+refit"),
                    )
                info = client.create_session(
                    neuron_count=twin.card.neuron_count,
                    target_neurons=[neuron],
                    generator=args.generator,
                    population_size=args.population,
                    max_generations=args.generations,
                    image_size=args.image_size,
                    seed=args.seed * 1000 + neuron,
                    description=f"bench {method} neuron {neuron}",
                    **options,
                )
                # The same spike noise stream for every method on a neuron.
                virtual = VirtualNeurons(neuron_model, presentation_ms=100.0, seed=args.seed * 1000 + neuron)
                started = time.perf_counter()
                result = simulate(client, info.session_id, virtual, [neuron])
                seconds = time.perf_counter() - started
                run = Run(
                    method=method,
                    neuron=neuron,
                    guide_neuron=guide,
                    natural_max=natural_max,
                    best_true=result.best_true,
                    max_true=result.max_true,
                    best_measured=result.best_score,
                    generations=result.generations,
                    presentations=result.presentations,
                    seconds=seconds,
                    ask_ms=[s * 1000 for s in result.ask_seconds[:-1]],  # the last Ask only says "finished"
                    tell_ms=[s * 1000 for s in result.tell_seconds],
                    ask_cpu_ms=[s * 1000 for s in result.ask_cpu_seconds[:-1]],
                    tell_cpu_ms=[s * 1000 for s in result.tell_cpu_seconds],
                    curve=[h["true_max"] / natural_max for h in result.history],
                    # The last evolved generation (the confirmation, when there is one, re-shows images).
                    final_mean=result.history[-2 if result.confirmed_stimulus_id else -1]["true_mean"]
                    if result.history
                    else math.nan,
                    confirmed_true=result.confirmed_true,
                    confirmed_measured=result.confirmed_score,
                )
                runs.append(run)
                # Keep what is done on disk, so an interrupted run still leaves its sessions behind.
                partial = Path(args.out).with_suffix(".partial.json")
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"methods": methods, "runs": [asdict(r) for r in runs]}))
                print(
                    f"neuron {neuron:3d} {method:18s} pick/natural {run.ratio_confirmed:5.2f}"
                    f"  single best/natural {run.ratio:5.2f}"
                    f"  shown max {run.ratio_shown:5.2f}  guide {guide:3d}"
                    f"  Ask p50 {np.median(run.ask_ms):6.1f} ms  Tell p50 {np.median(run.tell_ms):5.1f} ms"
                    f"  {seconds:6.1f} s",
                    flush=True,
                )
                client.close_session(info.session_id)

    neuron_source = args.neuron_twin or args.twin
    header = (
        f"Closed loop, {len(neurons)} virtual neurons of {neuron_source} (Poisson, 100 ms), "
        f"guide twin {args.twin}, confirmation {args.confirm}, "
        f"generator {args.generator}, {args.generations} generations x {args.population} images "
        f"at {args.image_size} px"
        + (" [STAND-IN MODELS]" if stand_in else "")
        + f"; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        + "/".join(f"{x:.1f}" for x in os.getloadavg())
    )
    write_results(Path(args.out), header, runs, methods, {"args": vars(args), "stand_in": stand_in})
    # The journal and stand-in store are scratch: the results file holds what the run found.
    shutil.rmtree(work, ignore_errors=True)
    return 0


def ask_worker(args: argparse.Namespace) -> int:
    """One process's guided Asks (``--ask-worker SERVICES_DIR``): prints a JSON line of timings.

    Drives ``ClosedLoopEngine`` directly (no gRPC: the compute of an Ask is what differs between code
    versions), with a SQLite journal, a CMA-ES session guided by the twin (population x candidates
    scored per Ask), random Poisson responses told between Asks (not timed).
    """
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, args.ask_worker)
    from neurotwin.engines.closed_loop import ClosedLoopEngine, SessionRequest, ToldResponse
    from neurotwin.engines.journal import SqliteJournal
    from neurotwin.store import ModelStore

    work = Path(tempfile.mkdtemp(prefix="neurotwin-bench-ask-"))
    engine = ClosedLoopEngine(
        ModelStore(args.model_store),
        SqliteJournal(work / "journal.sqlite3"),
        default_generator=args.generator,
        twin_threads=args.ask_threads,
    )
    engine.create_session(
        SessionRequest(
            session_id="ask",
            neuron_count=engine.models.twin(args.twin, 0).neurons,
            target_neurons=[7],
            population_size=args.population,
            seed=args.seed,
            image_size=args.image_size,
            twin=args.twin,
            candidates_per_presentation=args.candidates,
        )
    )
    rng = np.random.default_rng(args.seed)
    wall, cpu = [], []
    for _ in range(args.ask_latency + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        gen = engine.ask("ask")
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        rates = rng.poisson(3.0, (len(gen.stimuli), engine.models.twin(args.twin, 0).neurons))
        engine.tell(
            "ask",
            gen.generation,
            [
                ToldResponse(s.stimulus_id, rates=list(map(float, r)))
                for s, r in zip(gen.stimuli, rates, strict=True)
            ],
        )
    engine.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    # The first Ask loads models and warms ONNX Runtime up: left out.
    print(json.dumps({"wall_ms": [w * 1000 for w in wall[1:]], "cpu_ms": [c * 1000 for c in cpu[1:]]}))
    return 0


def ask_latency(args: argparse.Namespace) -> int:
    """Guided Ask p50 of this code and of ``--baseline-rev``, in alternating worker processes."""
    import subprocess

    versions = {"this code": str(ROOT / "services")}
    scratch = Path(tempfile.mkdtemp(prefix="neurotwin-bench-baseline-"))
    if args.baseline_rev:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline_rev, "services"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
        versions[f"baseline {args.baseline_rev}"] = str(scratch / "services")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    if args.ask_per_neuron:
        # A store with the bundled generators and a per-neuron twin the guided session reads one
        # output of: the case output pruning is for.
        sys.path.insert(0, str(ROOT / "services"))
        from _pruning_bench import write_per_neuron_twin

        store = scratch / "store"
        store.mkdir()
        (store / "generators").symlink_to(Path(args.model_store).resolve() / "generators")
        args.twin = write_per_neuron_twin(store, args.ask_per_neuron).name
        args.model_store = str(store)
    timings: dict[str, dict[str, list[float]]] = {name: {"wall_ms": [], "cpu_ms": []} for name in versions}
    worker_args = [
        "--model-store", args.model_store, "--twin", args.twin, "--generator", args.generator,
        "--population", str(args.population), "--candidates", str(args.candidates),
        "--image-size", str(args.image_size), "--ask-latency", str(args.ask_latency),
        "--ask-threads", str(args.ask_threads), "--seed", str(args.seed),
    ]  # fmt: skip
    for round_ in range(args.ask_rounds):
        for name, services in versions.items():
            out = subprocess.run(
                [sys.executable, __file__, "--ask-worker", services, *worker_args],
                check=True, capture_output=True, text=True, env=env, cwd=scratch,
            ).stdout  # fmt: skip
            result = json.loads(out.strip().splitlines()[-1])
            for key in ("wall_ms", "cpu_ms"):
                timings[name][key] += result[key]
            print(f"round {round_ + 1} {name}: Ask p50 {np.median(result['wall_ms']):.0f} ms", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nGuided Ask, {args.population} x {args.candidates} = {args.population * args.candidates} "
        "candidates "
        f"scored by {args.twin}, {args.image_size} px, twin threads {args.ask_threads}; "
        f"{args.ask_rounds} alternating rounds x {args.ask_latency} Asks; {os.cpu_count()} CPUs, load {load}"
    )
    print("| code | Ask p50 ms | p90 ms | CPU p50 ms |\n|---|---|---|---|")
    for name, t in timings.items():
        print(
            f"| {name} | {np.median(t['wall_ms']):.0f} | {np.percentile(t['wall_ms'], 90):.0f} "
            f"| {np.median(t['cpu_ms']):.0f} |"
        )
    if len(timings) == 2:
        new, old = (timings[name] for name in versions)
        wall_ratio = np.median(old["wall_ms"]) / np.median(new["wall_ms"])
        cpu_ratio = np.median(old["cpu_ms"]) / np.median(new["cpu_ms"])
        print(f"\nratio baseline / this code: wall p50 {wall_ratio:.2f}x, CPU p50 {cpu_ratio:.2f}x")
    return 0


def write_results(out: Path, header: str, runs: list[Run], methods: list[str], extra: dict[str, Any]) -> None:
    table = summarize(runs, methods)
    text = markdown(table, header)
    print()
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    neurons = sorted({r.neuron for r in runs})
    payload = {**extra, "header": header, "methods": methods, "neurons": neurons, "table": table}
    payload.update(runs=[asdict(r) for r in runs], markdown=text)
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nbench: wrote {out}")


def merge(paths: list[str], out: Path) -> int:
    """One table from the JSON results of several shards."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs = [Run(**r) for part in parts for r in part["runs"]]
    methods = list(dict.fromkeys(m for part in parts for m in part["methods"]))
    count = len({r.neuron for r in runs})
    first = next((part["header"] for part in parts if "header" in part), "Closed loop, 0 virtual neurons")
    header = re.sub(r"^Closed loop, \d+ ", f"Closed loop, {count} ", first)
    header += f"; merged from {len(parts)} shards"
    write_results(out, header, runs, methods, {"shards": paths})
    return 0


if __name__ == "__main__":
    sys.exit(main())
