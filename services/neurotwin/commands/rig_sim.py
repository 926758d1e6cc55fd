"""``neurotwin rig-sim``: a headless simulated rig that runs a whole closed-loop session.

The "animal" is a virtual population: an ONNX twin from the model store whose predicted rates (spikes
per 100 ms window) are the neurons' true mean rates, observed through Poisson spike counts over a
fixed presentation time. The rig asks for each generation, "presents" its images, tells the noisy
responses, and prints progress, exactly as a rig's control code would against a real server.

Against a running server (``--address``) or an in-process one on a free loopback port (the default;
``--journal`` picks its journal, so a session can be resumed by running again with ``--session-id``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.commands._options import (
    ModelRef,
    add_alias,
    add_connection,
    add_generator,
    add_metadata_flags,
    add_model,
    add_model_store,
    channel_config,
    check_store,
    generator_ref,
    metadata_from_args,
    model_ref,
    parse_model_ref,
    resolve,
    store_root,
)
from neurotwin.errors import InvalidInput

HELP = "run a closed-loop session against a simulated neuron"


# The species the bundled twins model: genus Macaca (NCBI taxonomy 9539), since the recordings they
# were trained on name the animals macaques without the species.
DEFAULT_SPECIES = "http://purl.obolibrary.org/obo/NCBITaxon_9539"


def configure(parser: argparse.ArgumentParser) -> None:
    add_model(
        parser,
        help="twin NAME[:VERSION] whose outputs play the neurons (no version: the newest)",
        required=False,
        aliases=("--twin",),
        version_aliases=(),
    )
    parser.add_argument(
        "--neuron", type=int, nargs="+", default=[0], help="target neuron index(es) of the twin (default 0)"
    )
    add_model_store(parser, legacy=False)
    add_connection(parser, "a running closed-loop server (default: start one in this process)", None)
    parser.add_argument(
        "--journal", default="", help="in-process server's journal (default: a temporary file)"
    )
    parser.add_argument("--session-id", default="", help="create with this id, or resume it if it exists")
    add_generator(parser)
    parser.add_argument("--optimizer", default="cma-es", choices=["cma-es", "ga"])
    parser.add_argument("--population", type=int, default=40, help="synthetic images per generation (40)")
    parser.add_argument("--generations", type=int, default=75, help="generations to run (75)")
    parser.add_argument("--natural", default="", help="folder or .zip of natural images, uploaded by the rig")
    parser.add_argument("--natural-source", default="", help="natural images as a path on the server instead")
    parser.add_argument(
        "--natural-per-generation", type=int, default=0, help="natural references per generation"
    )
    parser.add_argument("--objective", default="mean", choices=["mean", "contrast"])
    parser.add_argument(
        "--presentation-ms", type=float, default=100.0, help="presentation time per image (100)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="repeats per image (1)")
    parser.add_argument("--realtime", action="store_true", help="really wait the presentation time per image")
    parser.add_argument("--seed", type=int, default=0, help="session seed (optimizer, natural order)")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the simulated spike noise")
    parser.add_argument("--image-size", type=int, default=0, help="image side in px (generator's)")
    parser.add_argument("--image-format", default="png", choices=["png", "jpeg"])
    parser.add_argument(
        "--guide-model",
        type=parse_model_ref,
        default=None,
        metavar="NAME[:VERSION]",
        help="twin guidance: rank candidates with this twin",
    )
    add_alias(parser, "--guide-twin", "guide_model", "--guide-model", type=parse_model_ref)
    parser.add_argument(
        "--guide-neuron",
        type=int,
        nargs="*",
        default=[],
        help="guide twin outputs for the targets (default: same)",
    )
    parser.add_argument(
        "--candidates", type=int, default=10, help="candidates per presented image when guided"
    )
    parser.add_argument("--refit", action="store_true", help="refit the guide's readout online")
    parser.add_argument(
        "--confirm-top",
        type=int,
        default=0,
        help="confirmation: distinct top images re-presented in the last generation (0: the server's "
        "default, population / 5 when --generations >= 10)",
    )
    parser.add_argument(
        "--confirm-repeats", type=int, default=0, help="confirmation: presentations of each (0: 5)"
    )
    parser.add_argument(
        "--no-confirmation", action="store_true", help="no confirmation generation at the end"
    )
    parser.add_argument("--stop-after", type=int, default=0, help="leave after telling this many generations")
    parser.add_argument("--export", default="", help="write the session to this .nwb or .h5 file at the end")
    parser.add_argument(
        "--report",
        default="",
        metavar="DIR",
        help="write a static HTML report with figures (and the NWB export, unless --export) to DIR",
    )
    parser.add_argument("--every", type=int, default=1, help="print progress every N generations")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/BLAS threads of this process and its in-process server (1)",
    )
    add_metadata_flags(
        parser,
        "defaults: subject 'virtual-<twin>', species genus Macaca, sex U, units from the twin's card, "
        "presentation time from --presentation-ms",
    )


@dataclass
class VirtualNeurons:
    """A twin's predictions as true rates, seen through Poisson counts over the presentation time."""

    session: Any
    presentation_ms: float = 100.0
    seed: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    @property
    def neurons(self) -> int:
        return int(self.session.card.neuron_count)

    def true_rates(self, images: np.ndarray) -> np.ndarray:
        """Noise-free rates (spikes per 100 ms window), float64 [N, neurons]."""
        from neurotwin.imagecodec import resize_batch

        card = self.session.card
        batch = resize_batch(images, card.input.height, card.input.width)
        parts = [self.session.run(batch[i : i + 256]) for i in range(0, len(batch), 256)]
        return np.concatenate(parts).astype(np.float64)

    def respond(self, rates: np.ndarray, repeats: int) -> np.ndarray:
        """Poisson counts per repeat, rescaled to spikes per 100 ms: [N, repeats, neurons]."""
        window = self.presentation_ms / 100.0
        lam = np.clip(rates, 0, None)[:, None, :] * window
        counts = self.rng.poisson(np.broadcast_to(lam, (len(rates), repeats, rates.shape[1])))
        return counts / window


def load_twin(store_root: str, name: str, version: int = 0) -> Any:
    from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
    from neurotwin.store import PREDICTORS, ModelStore, validate_predictor

    resolved = ModelStore(store_root).resolve(PREDICTORS, name, version)
    card = validate_predictor(resolved)
    return PredictorSession(resolved.model_path, card, SessionSettings(device="cpu", intra_op_threads=1))


@dataclass
class SimResult:
    session_id: str
    generations: int
    presentations: int
    best_score: float
    best_stimulus_id: str
    # The noise-free objective of the stimulus the session rates best (NaN when not seen by this rig).
    best_true: float
    # Highest noise-free objective among all synthetic stimuli this rig presented.
    max_true: float
    ask_seconds: list[float]
    tell_seconds: list[float]
    history: list[dict[str, float]]
    # CPU time of this whole process during each call (includes an in-process server's work), which
    # unlike wall time does not grow when other programs compete for the cores.
    ask_cpu_seconds: list[float] = field(default_factory=list)
    tell_cpu_seconds: list[float] = field(default_factory=list)
    # The session's confirmed best (confirmation re-presentations): id, mean measured objective over
    # its repeats, and its noise-free objective. Empty / NaN without confirmation.
    confirmed_stimulus_id: str = ""
    confirmed_score: float = math.nan
    confirmed_true: float = math.nan


def simulate(
    client: Any,
    session_id: str,
    neurons: VirtualNeurons,
    targets: Sequence[int],
    *,
    objective: str = "mean",
    generations: int = 0,
    repeats: int = 1,
    realtime: bool = False,
    progress: Callable[[str], None] | None = None,
    every: int = 1,
) -> SimResult:
    """Run ask -> present -> tell until the session finishes or ``generations`` more are told."""
    from neurotwin.engines.objectives import objective_scores

    true_objective: dict[str, float] = {}
    ask_s: list[float] = []
    tell_s: list[float] = []
    ask_cpu: list[float] = []
    tell_cpu: list[float] = []
    history: list[dict[str, float]] = []
    max_true = -math.inf
    told = 0
    clock = 0.0
    while not generations or told < generations:
        started, cpu = time.perf_counter(), time.process_time()
        gen = client.ask(session_id)
        ask_s.append(time.perf_counter() - started)
        ask_cpu.append(time.process_time() - cpu)
        if gen.finished:
            break
        pixels = gen.pixels()
        rates = neurons.true_rates(pixels)
        truth = objective_scores(rates, targets, objective)
        responses = neurons.respond(rates, repeats)
        if realtime:
            time.sleep(len(pixels) * repeats * neurons.presentation_ms / 1000.0)
        payload = {}
        for i, stimulus in enumerate(gen.stimuli):
            true_objective[stimulus.stimulus_id] = float(truth[i])
            if stimulus.kind == "synthetic":
                max_true = max(max_true, float(truth[i]))
            payload[stimulus.stimulus_id] = responses[i] if repeats > 1 else responses[i, 0]
        # The rig's clock: presentations back to back, each repeat taking one presentation time.
        step = repeats * neurons.presentation_ms / 1000.0
        onsets = {s.stimulus_id: clock + i * step for i, s in enumerate(gen.stimuli)}
        clock += len(gen.stimuli) * step
        started, cpu = time.perf_counter(), time.process_time()
        # Each repeat lasts one presentation time; the onset is that of the first repeat.
        durations = dict.fromkeys(onsets, neurons.presentation_ms / 1000.0)
        summary = client.tell(session_id, gen.generation, payload, onsets=onsets, durations=durations)
        tell_s.append(time.perf_counter() - started)
        tell_cpu.append(time.process_time() - cpu)
        told += 1
        synthetic = [truth[i] for i, s in enumerate(gen.stimuli) if s.kind == "synthetic"]
        history.append(
            {
                "generation": gen.generation,
                "measured_mean": summary.best.last_generation_mean,
                "measured_max": summary.best.last_generation_max,
                "best_measured": summary.best.score,
                "true_mean": float(np.mean(synthetic)),
                "true_max": float(np.max(synthetic)),
            }
        )
        if progress is not None and (summary.finished or gen.generation % max(1, every) == 0):
            best = summary.best
            natural = best.best_natural_score
            progress(
                f"gen {gen.generation + 1:4d}  best {best.score:8.3f} (gen {best.generation})"
                f"  last mean {best.last_generation_mean:7.3f} max {best.last_generation_max:7.3f}"
                f"  true mean {np.mean(synthetic):7.3f}"
                + (f"  natural best {natural:7.3f}" if not math.isnan(natural) else "")
                + f"  ask {ask_s[-1] * 1000:6.1f} ms  tell {tell_s[-1] * 1000:5.1f} ms"
            )
        if summary.finished:
            break
    info = client.get_session(session_id)
    confirmed = info.best.confirmed
    return SimResult(
        session_id=session_id,
        generations=info.generations_told,
        presentations=info.presentations_told,
        best_score=info.best.score,
        best_stimulus_id=info.best.stimulus_id,
        best_true=true_objective.get(info.best.stimulus_id, math.nan),
        max_true=max_true if told else math.nan,
        ask_seconds=ask_s,
        tell_seconds=tell_s,
        history=history,
        ask_cpu_seconds=ask_cpu,
        tell_cpu_seconds=tell_cpu,
        confirmed_stimulus_id=confirmed.stimulus_id if confirmed else "",
        confirmed_score=confirmed.mean_score if confirmed else math.nan,
        confirmed_true=true_objective.get(confirmed.stimulus_id, math.nan) if confirmed else math.nan,
    )


@contextlib.contextmanager
def in_process_server(model_store: str, journal: str, **settings: Any) -> Iterator[str]:
    """A closed-loop server on a free loopback port; yields its address."""
    from neurotwin.server import closed_loop
    from neurotwin.server.common import GrpcServer
    from neurotwin.server.config import ServerSettings

    server = GrpcServer(ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5))
    closed_loop.attach(server, closed_loop.Settings(model_store=model_store, journal=journal, **settings))
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(0)


def _natural_bytes(path: str) -> list[bytes]:
    from neurotwin.engines.closed_loop import natural_image_bytes

    return natural_image_bytes(path)


def _metadata(args: argparse.Namespace, twin: Any, ref: ModelRef, version: int) -> dict[str, Any]:
    """What the rig tells the server about its (virtual) subject, with the simulation's defaults."""
    return metadata_from_args(
        args,
        subject_id=f"virtual-{ref.name}",
        species=DEFAULT_SPECIES,
        sex="U",
        subject_description=f"virtual neurons: outputs of twin {ref.name} v{version} as true "
        f"rates, seen through Poisson spike counts over {args.presentation_ms:g} ms",
        device_name="rig-sim",
        device_description="no recording device: neurotwin rig-sim simulated the responses",
        response_units=twin.card.output.units,
        presentation_duration=args.presentation_ms / 1000.0,
    )


def _create(
    client: Any, args: argparse.Namespace, twin: Any, neurons: VirtualNeurons, ref: ModelRef, version: int
) -> Any:
    generator = generator_ref(args)
    guide: ModelRef | None = args.guide_model
    return client.create_session(
        session_id=args.session_id,
        neuron_count=neurons.neurons,
        neuron_ids=list(twin.card.neuron_ids),
        target_neurons=args.neuron,
        generator=(generator.name, generator.version or 0) if generator else None,
        optimizer=args.optimizer,
        population_size=args.population,
        natural_per_generation=args.natural_per_generation,
        natural_source=args.natural_source,
        natural_images=_natural_bytes(args.natural) if args.natural else (),
        objective=args.objective,
        seed=args.seed,
        max_generations=args.generations,
        image_size=args.image_size,
        image_format=args.image_format,
        twin=(guide.name, guide.version or 0) if guide else None,
        twin_neurons=args.guide_neuron,
        candidates_per_presentation=args.candidates if guide else 0,
        refit_readout=args.refit,
        confirmation=False if args.no_confirmation else None,
        confirm_top=args.confirm_top,
        confirm_repeats=args.confirm_repeats,
        description=f"rig-sim: virtual neurons {args.neuron} of {ref}, Poisson noise, "
        f"{args.presentation_ms:g} ms presentations",
        metadata=_metadata(args, twin, ref, version),
    )


def run(args: argparse.Namespace) -> int:
    from neurotwin.client.closed_loop import ClosedLoopClient
    from neurotwin.errors import NotFound
    from neurotwin.store import PREDICTORS

    if args.natural and args.natural_source:
        raise InvalidInput("give --natural or --natural-source, not both")
    ref = model_ref(args)
    if ref is None:
        raise InvalidInput("--model NAME[:VERSION] is required (the twin that plays the neurons)")
    store = store_root(args)
    version = resolve(check_store(store, (PREDICTORS,)), PREDICTORS, ref).version
    if args.threads > 0:
        from neurotwin.server.closed_loop import limit_threads

        limit_threads(args.threads)
    twin = load_twin(store, ref.name, version)
    neurons = VirtualNeurons(twin, args.presentation_ms, args.noise_seed)
    bad = [n for n in args.neuron if not 0 <= n < neurons.neurons]
    if bad:
        raise InvalidInput(f"--neuron {bad}: twin {ref.name} has {neurons.neurons} neurons")
    with contextlib.ExitStack() as stack:
        address = args.address
        journal = ""
        if not address:
            journal = args.journal or str(
                Path(stack.enter_context(tempfile.TemporaryDirectory())) / "journal.sqlite3"
            )
            address = stack.enter_context(in_process_server(store, journal))
            args.address = address
            print(f"rig-sim: in-process server on {address}, journal {journal}", flush=True)
        elif args.journal:
            raise InvalidInput("--journal is the in-process server's; a server at --address keeps its own")
        else:
            _check_reachable(args)
        client = stack.enter_context(ClosedLoopClient(config=channel_config(args)))
        session_id = args.session_id
        resumed = False
        if session_id:
            try:
                info = client.get_session(session_id)
                resumed = True
                print(f"rig-sim: resuming {session_id} at generation {info.generation}", flush=True)
            except NotFound:
                pass
        if not resumed:
            info = _create(client, args, twin, neurons, ref, version)
            session_id = info.session_id
            print(
                f"rig-sim: session {session_id} ({info.settings.optimizer}, population "
                f"{info.settings.population_size}, latent dim {info.latent_dim}, seed {info.settings.seed})",
                flush=True,
            )
        result = simulate(
            client,
            session_id,
            neurons,
            args.neuron,
            objective=args.objective,
            generations=args.stop_after,
            repeats=args.repeats,
            realtime=args.realtime,
            progress=lambda line: print(line, flush=True),
            every=args.every,
        )
        ask_ms = np.median(result.ask_seconds) * 1000 if result.ask_seconds else math.nan
        tell_ms = np.median(result.tell_seconds) * 1000 if result.tell_seconds else math.nan
        print(
            f"rig-sim: session {session_id}: {result.generations} generations, {result.presentations} "
            f"presentations; best measured {result.best_score:.3f} ({result.best_stimulus_id}), "
            f"its noise-free rate {result.best_true:.3f}; best noise-free rate shown {result.max_true:.3f}; "
            f"Ask p50 {ask_ms:.1f} ms, Tell p50 {tell_ms:.1f} ms",
            flush=True,
        )
        if result.confirmed_stimulus_id:
            print(
                f"rig-sim: confirmed best {result.confirmed_stimulus_id}: mean {result.confirmed_score:.3f} "
                f"over its re-presentations, noise-free rate {result.confirmed_true:.3f}",
                flush=True,
            )
        exports: list[Path] = []
        if args.export:
            exports.append(_export(client, session_id, Path(args.export)))
        if args.report:
            folder = Path(args.report)
            folder.mkdir(parents=True, exist_ok=True)
            if not exports:
                exports.append(_export(client, session_id, folder / f"{session_id}.nwb"))
            page = _report(client, session_id, folder, exports, journal)
            print(f"rig-sim: report {page}", flush=True)
    return 0


def _check_reachable(args: argparse.Namespace, timeout: float = 5.0) -> None:
    """Fail at once when nothing answers at --address, rather than after the client's retries (which
    are there to ride out a server restart in the middle of a session)."""
    import grpc

    from neurotwin.errors import Unavailable

    channel = channel_config(args).open()
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError as exc:
        raise Unavailable(f"no answer within {timeout:g} s") from exc
    finally:
        channel.close()


def _export(client: Any, session_id: str, path: Path) -> Path:
    fmt = "hdf5" if path.suffix.lower() in (".h5", ".hdf5") else "nwb"
    path.parent.mkdir(parents=True, exist_ok=True)
    written = client.export_session(session_id, path, fmt)
    print(f"rig-sim: exported to {written}", flush=True)
    return Path(written)


def _report(client: Any, session_id: str, folder: Path, exports: list[Path], journal: str) -> Path:
    """The static report, from the in-process server's journal, or from an HDF5 export of a remote
    server's session (the one file that carries everything the report shows)."""
    from neurotwin.engines.journal import open_journal
    from neurotwin.engines.session_export import collect
    from neurotwin.engines.session_import import read_hdf5
    from neurotwin.reports.session_report import write_session_report

    if journal:
        reader = open_journal(journal)
        try:
            data = collect(reader, session_id)
        finally:
            reader.close()
    else:
        copy = folder / f"{session_id}.h5"
        if copy not in exports:
            exports.append(_export(client, session_id, copy))
        data = read_hdf5(copy)
    return write_session_report(data, folder, exports=exports)


if __name__ == "__main__":  # pragma: no cover
    from neurotwin.cli import main

    sys.exit(main(["rig-sim", *sys.argv[1:]]))
