"""``neurotwin synthesize-all --model NAME[:VERSION] --out DIR``: preferred stimuli for every neuron.

Synthesizes images for each neuron of a twin with the synthesizer service's defaults (method,
generator, budget) by running the synthesis engine in this process, and writes one folder per neuron
into DIR (see ``neurotwin.engines.sweep_folder``). ``--shard-index I --shard-count N`` does only
slice I of N; in a Kubernetes Indexed Job each pod takes its index from ``$JOB_COMPLETION_INDEX`` and
the count from ``$NEUROTWIN_SYNTHESIZE_ALL_SHARD_COUNT`` (deploy/k8s/jobs/synthesize-all). Running a
slice again skips the neurons already finished. The process that finds every neuron done writes the
contact sheet and index; ``--contact-sheet`` writes them at any time from what DIR holds.

Exit status: 0 done; 2 a fault in the arguments, the model store or DIR that a retry cannot fix
(the Job fails at once); 3 some neurons failed, the others are written (the Job fails that index);
1 anything else, where a retry may help (no usable GPU on this node, a full or broken volume).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from neurotwin.commands._options import ModelRef, add_model_store, parse_model_ref, store_root
from neurotwin.errors import InvalidInput, ModelStoreError, NotFound

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from neurotwin.engines.neuron_sweep import NeuronOutcome
    from neurotwin.engines.sweep_folder import SweepFolder, SweepSpec
    from neurotwin.engines.synthesis import ModelPair

HELP = "synthesize preferred stimuli for every neuron of a twin (resumable, sharded)"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
COUNT_ENV = "NEUROTWIN_SYNTHESIZE_ALL_SHARD_COUNT"
DEVICE_ENV = "NEUROTWIN_SYNTHESIZE_ALL_DEVICE"
EXIT_CONFIG = 2
EXIT_NEURONS_FAILED = 3
# Images the ONNX-vs-torch parity check uses when the twin loads (the service's default).
PARITY_IMAGES = 4


def configure(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False
    parser.add_argument(
        "--model",
        type=parse_model_ref,
        metavar="NAME[:VERSION]",
        help="twin (predictor) NAME[:VERSION] in the model store",
    )
    parser.add_argument(
        "--generator",
        type=parse_model_ref,
        default=None,
        metavar="NAME[:VERSION]",
        help="generator NAME[:VERSION], or 'pixels' for none (default: the synthesizer's, v4-dcgan-h2)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="sweep folder (created; shared by all shards)"
    )
    parser.add_argument("--method", choices=("gradient", "cmaes", "genetic"), default="gradient")
    parser.add_argument(
        "--budget",
        type=int,
        default=0,
        help="gradient steps, or twin evaluations per image for cmaes/genetic (default: the service's)",
    )
    parser.add_argument("--num-images", type=int, default=None, help="images per neuron (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every neuron's job (default 0)")
    parser.add_argument(
        "--shard-index", type=int, default=None, help=f"slice to run (default: ${INDEX_ENV}, else 0)"
    )
    parser.add_argument(
        "--shard-count", type=int, default=None, help=f"number of slices (default: ${COUNT_ENV}, else 1)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="neurons synthesized at once, batched together (default 8)"
    )
    parser.add_argument(
        "--device", default=None, help=f"auto, cpu or cuda (default: ${DEVICE_ENV}, else auto)"
    )
    add_model_store(parser, legacy=False)
    parser.add_argument(
        "--contact-sheet",
        action="store_true",
        help="only write the contact sheet and index from the results in --out (synthesize nothing)",
    )


def _fail(message: str) -> int:
    print(f"neurotwin synthesize-all: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _int_setting(value: int | None, env: str, default: int) -> int:
    if value is not None:
        return value
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"${env}={text!r} is not an integer") from None


def _spec(args: argparse.Namespace, recorded: SweepSpec | None) -> SweepSpec:
    """The sweep asked for; an unpinned version follows a sweep already recorded in --out, so
    slices started after a new version was published still work on the same one."""
    from neurotwin.card import PredictorCard
    from neurotwin.engines.neuron_sweep import DEFAULT_BUDGETS, DEFAULT_GENERATOR, DEFAULT_IMAGES
    from neurotwin.engines.sweep_folder import PIXELS, SweepSpec
    from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

    store = ModelStore(store_root(args))
    if not store.root.is_dir():
        raise NotFound(f"model store {store.root} does not exist")

    def version(ref: ModelRef, recorded_name: str | None, recorded_version: int | None) -> int | None:
        if ref.version or recorded_name != ref.name:
            return ref.version or None
        return recorded_version or None

    model: ModelRef = args.model
    generator: ModelRef = args.generator or ModelRef(DEFAULT_GENERATOR, 0)
    twin = store.resolve(
        PREDICTORS,
        model.name,
        version(model, recorded and recorded.model, recorded and recorded.model_version),
    )
    card = PredictorCard.load(twin.card_path)
    if generator.name == PIXELS:
        if generator.version:
            raise InvalidInput("generator 'pixels' has no versions")
        generator_version = 0
    else:
        pinned = version(generator, recorded and recorded.generator, recorded and recorded.generator_version)
        generator_version = store.resolve(GENERATORS, generator.name, pinned).version
    return SweepSpec(
        model=twin.name,
        model_version=twin.version,
        generator=generator.name,
        generator_version=generator_version,
        method=args.method,
        budget=args.budget or DEFAULT_BUDGETS[args.method],
        num_images=args.num_images if args.num_images is not None else DEFAULT_IMAGES,
        seed=args.seed,
        neuron_ids=list(card.neuron_ids),
    )


def _load_pair(store_root: str, spec: SweepSpec, device: torch.device) -> ModelPair:
    from neurotwin.engines.sweep_folder import PIXELS
    from neurotwin.engines.synthesis import ModelPair
    from neurotwin.runtimes.generators import FourierPixels, load_generator
    from neurotwin.runtimes.onnx_torch import load_differentiable_twin
    from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

    store = ModelStore(store_root)
    twin, card = load_differentiable_twin(
        store.resolve(PREDICTORS, spec.model, spec.model_version), device, parity_images=PARITY_IMAGES
    )
    prior: torch.nn.Module
    if spec.generator == PIXELS:
        prior = FourierPixels(resolution=max(card.input.height, card.input.width))
        prior = prior.to(device).eval().requires_grad_(False)
    else:
        prior = load_generator(store.resolve(GENERATORS, spec.generator, spec.generator_version), device)
    return ModelPair(twin=twin, prior=prior, card=card, key=spec.describe())


def _write_report(out: Path) -> int:
    from neurotwin.engines.neuron_report import write_report

    report = write_report(out)
    print(
        f"{out / 'contact_sheet.png'}: {len(report.complete)} of {report.total} neurons"
        + (f", {len(report.missing)} missing" if report.missing else ""),
        flush=True,
    )
    return 0


def _open_sweep(args: argparse.Namespace) -> tuple[SweepFolder, SweepSpec]:
    """The sweep folder and the sweep it holds (recording ours if it holds none); InvalidInput when it
    holds another one."""
    from neurotwin.engines.sweep_folder import SweepFolder

    folder = SweepFolder(args.out)
    spec = _spec(args, folder.read_spec())
    recorded = folder.claim(spec)
    if recorded != spec:
        # Another slice recorded the sweep between our read and our claim; follow it if we can.
        spec = _spec(args, recorded)
        if recorded != spec:
            raise InvalidInput(
                f"{args.out} holds another sweep ({recorded.describe()}); it differs in "
                f"{'; '.join(recorded.differences(spec))}. Use another --out or the same settings"
            )
    return folder, spec


def _printer(label: str, total: int) -> Callable[[NeuronOutcome], None]:
    """One log line per finished neuron (the pod's log is the progress report)."""
    started = time.monotonic()
    finished = 0

    def on_neuron(outcome: NeuronOutcome) -> None:
        nonlocal finished
        finished += 1
        where = f"[{label} {finished}/{total}, {time.monotonic() - started:.0f} s]"
        if outcome.error:
            print(
                f"{where} neuron {outcome.neuron} ({outcome.neuron_id}) FAILED: {outcome.error}", flush=True
            )
            return
        ratio = f" ({outcome.best_ratio:.2f}x natural max)" if outcome.best_ratio is not None else ""
        print(
            f"{where} neuron {outcome.neuron} ({outcome.neuron_id}): best activation "
            f"{outcome.best_activation:.4g}{ratio} in {outcome.seconds:.1f} s",
            flush=True,
        )

    return on_neuron


def run(args: argparse.Namespace) -> int:
    from neurotwin import __version__
    from neurotwin.engines.neuron_sweep import run_slice, shard_neurons

    out: Path = args.out
    try:
        if args.contact_sheet:
            return _write_report(out)
        if args.model is None:
            raise InvalidInput("--model NAME[:VERSION] is required (unless --contact-sheet)")
        index = _int_setting(args.shard_index, INDEX_ENV, 0)
        count = _int_setting(args.shard_count, COUNT_ENV, 1)
        if args.concurrency < 1:
            raise InvalidInput(f"--concurrency must be at least 1, got {args.concurrency}")
        shard_neurons(0, index, count)  # checks the index against the count before anything loads
        folder, spec = _open_sweep(args)
    except (InvalidInput, NotFound, ModelStoreError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        # The results volume is not writable or not reachable: perhaps not for long, so exit 1.
        print(f"neurotwin synthesize-all: error: {out}: {exc}", file=sys.stderr)
        return 1
    from neurotwin.runtimes.devices import select_device

    device = select_device(args.device or os.environ.get(DEVICE_ENV, "") or "auto")
    neurons = shard_neurons(len(spec.neuron_ids), index, count)
    label = f"shard {index}/{count}"
    todo = [n for n in neurons if folder.read_result(spec, n) is None]
    print(
        f"{label}: {spec.describe()}; {len(neurons)} of {len(spec.neuron_ids)} neurons, "
        f"{len(neurons) - len(todo)} already done, on {device}",
        flush=True,
    )
    if not todo:
        folder.clear_partials(neurons)
    else:
        try:
            pair = _load_pair(store_root(args), spec, device)
        except (NotFound, ModelStoreError) as exc:
            return _fail(str(exc))
        extra = {
            "shard": {"index": index, "count": count},
            "device": str(device),
            "host": socket.gethostname(),
            "neurotwin": __version__,
        }
        try:
            result = run_slice(
                pair,
                spec,
                folder,
                neurons,
                device=device,
                concurrency=args.concurrency,
                extra=extra,
                on_neuron=_printer(label, len(todo)),
            )
        except OSError as exc:
            # A full or unreachable results volume: finished neurons are safe, the rest wait for a retry.
            print(f"neurotwin synthesize-all: error: writing {out}: {exc}", file=sys.stderr)
            return 1
        print(
            f"{label}: {len(result.done)} synthesized, {len(result.skipped)} skipped (already done), "
            f"{len(result.failed)} failed, {result.partials_removed} partial results removed",
            flush=True,
        )
        if result.failed:
            print(f"{label}: neurons {sorted(result.failed)} failed (see above)", file=sys.stderr)
            return EXIT_NEURONS_FAILED
    # The slice that completes the sweep writes the report; the others leave it to that one.
    if all(folder.has_result_file(spec, n) for n in range(len(spec.neuron_ids))):
        return _write_report(out)
    return 0
