"""Twin quality benchmark: held-out per-neuron Pearson r of our twin against two baselines on real V4 data.

Reads ``../shared/data/cowley_v4`` (Cowley et al. 2023; see its README) and, for each session, protocol
and model, fits on training images and scores on held-out images. Every model sees the *same* image
splits, built by ``neurotwin.training.datasets.split_indices`` with one recorded seed:

- ``kfold``: 5-fold cross-validation over images (each image is test once); within the non-test
  images, ``val_fraction`` are held out for early stopping (ridge folds them back in: its alpha is
  chosen by inner cross-validation). Per-neuron r is averaged over the folds run.
- ``first-half``: train (and val) on images 0..N/2-1, test on images N/2..N-1 (the protocol of the
  data's authors).

Models: ``twin`` (ours, through its fit API), ``ridge`` (EfficientNet-Lite0 stage 4/7/10 features,
3x3 average-pooled, per-neuron ridge with LOO-chosen alpha), ``neuralpredictors`` (the Sinz lab's
stacked core + Gaussian readout, its standard training recipe). See ``bench/_twin_baselines.py``.

Usage (from the repository root)::

    python bench/twin_quality.py                                # everything (hours on a 2-core CPU)
    python bench/twin_quality.py --sessions 201025 --models ridge
    python bench/twin_quality.py --quick                        # 2 of the 5 folds, capped epochs

Results of each fit are cached in ``--results`` (JSON), so runs can be split by model or session and
the final table assembled from all of them; ``--rerun`` refits. The markdown table is printed and
written to ``--out`` (default ``bench/TWIN_QUALITY.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _twin_baselines import (  # noqa: E402
    LiteRidge,
    NeuralPredictorsPeer,
    NeuralPredictorsUnavailable,
)
from neurotwin.stats import pearson_columns  # noqa: E402
from neurotwin.training.datasets import (  # noqa: E402
    Recording,
    list_sessions,
    load_recording,
    split_indices,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cowley_v4"
DEFAULT_SESSIONS = ("201025", "210224", "210621")
MODELS = ("twin", "twin-multi", "ridge", "neuralpredictors")
PROTOCOLS = ("kfold", "first-half")
SEED = 0
N_FOLDS = 5
VAL_FRACTION = 0.1
QUICK_FOLDS = 2
QUICK_EPOCHS = 20
SEED_R = 0.8  # Malakhova 2019: fine-tuned ConvNet on IT columns

METHOD_NOTES = (
    "**ridge**: EfficientNet-Lite0 (PyPI weight wheel) stage outputs 4, 7 and 10 at 112 px, each "
    "average-pooled to 3 x 3 and concatenated (2,088 features), z-scored on the training images; one "
    "ridge regression per neuron, alpha from a 29-point log grid (1 to 1e7) by exact leave-one-out "
    "cross-validation on the training+val images (hat-matrix identity, one SVD per fit). Chosen alphas "
    "lie inside the grid (1e2.75 to 1e4.25). Cross-checked against scikit-learn 1.9.1 "
    "`RidgeCV(alpha_per_target=True)`: same alphas, predictions equal to 5e-7; scikit-learn is not "
    "needed to run the benchmark.",
    "**neuralpredictors** 0.3.0 (the latest on PyPI, 2022) with our torch 2.13 CPU: it installs "
    "(no torch or torchvision is pulled in) but does not import as shipped, for two reasons, both "
    "worked around inside this benchmark's process without modifying the package: (1) "
    "`neuralpredictors/layers/cores/conv2d.py` does `from collections import Iterable`, removed in "
    "Python 3.10 (ImportError) - we restore the alias to `collections.abc.Iterable`; (2) the same module "
    "imports `torchvision` at top level, used only by `TransferLearningCore`; PyPI's torchvision does "
    "not load with this torch build (`operator torchvision::nms does not exist`) and is not installed, "
    "so an empty placeholder module stands in during the import and is removed afterwards. The stacked "
    "core, Gaussian readout, Poisson loss and `early_stopping` then run unmodified.",
    "**neuralpredictors model and recipe** (the lab's SENSORIUM 2022 baseline): `Stacked2dCore` 4 "
    "layers x 64 channels, 9x9 input / 7x7 depth-separable hidden kernels, batch norm, ELU, Laplace "
    "(L2norm) input regularizer gamma 6.3831, last layer read out; `FullGaussian2d` readout "
    "(init_mu_range 0.3, init_sigma 0.1, feature L1 0.0076, bias = mean response); output ELU + 1; "
    "Poisson loss summed and scaled by sqrt(n_train / batch 64) plus regularizers; Adam lr 5e-3; "
    "`early_stopping` on mean validation r (interval 1, patience 5, tolerance 1e-6, 3 lr decays x 0.3 "
    "via ReduceLROnPlateau, min lr 1e-4, best state restored, <= 200 epochs unless capped). Adapted: "
    "RGB input, images resized to 40 px (its cores are trained at a few dozen pixels; 56 px took "
    "~3.5 min per epoch on this shared CPU), pixels z-scored per channel and responses divided by their "
    "per-neuron training std. Activations are kept channels-last: torch's CPU backward of the depthwise "
    "7x7 convolutions is ~40x slower in NCHW (37 s vs 0.9 s per batch); the arithmetic is identical.",
    "**twin**: `neurotwin.training.fit.fit_twin` with the twin's default `TwinConfig` / `FitConfig` "
    "(seed 0, no progress bar); the test indices are never passed to it. **twin-multi**: the same, with "
    "every other session of the folder (all images) training the shared core, one readout per session, "
    "as the data's authors' models do. No helper session shares an image with 201025, 210224 or 210621 "
    "(checked by file hash and by 8x8 thumbnail correlation), so test images stay unseen.",
)

# Published / previously measured figures, shown beside ours (see ../shared/docs/field-notes.md).
REFERENCES = (
    ("201025", "kfold", "ridge (field notes)", 0.62, 0.72),
    ("201025", "first-half", "ridge (field notes)", 0.61, None),
    ("201025", "first-half", "Cowley et al. 2023 compact models", 0.69, 0.80),
)


class Fitter(Protocol):
    """What the harness needs from a model. Indices refer to the full recording."""

    name: str

    def fit(self, rec: Recording, train: np.ndarray, val: np.ndarray) -> None: ...

    def predict(self, rec: Recording, test: np.ndarray) -> np.ndarray:
        """Float rates [len(test), neurons]."""
        ...


def pearson_per_neuron(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r per neuron between [images, neurons] arrays; the one definition every model is scored
    with. A constant prediction (or response) carries no information about the held-out variation, so
    it scores 0 rather than NaN, which would silently drop the neuron from the median."""
    return pearson_columns(measured, predicted, constant=0.0)


# ----------------------------------------------------------------------------------------------------------
# The twin, through its own fit API


class TwinFitter:
    """Adapter from the harness's fitter interface to ``neurotwin.training.fit.fit_twin``, with the
    twin's own default architecture and optimization settings (only the seed is set here, and the
    progress bar turned off). ``helpers`` are other sessions, all their images, that train the shared
    core beside the target session (one readout per session): the multi-session twin."""

    def __init__(self, *, seed: int, helpers: dict[str, Recording] | None = None, name: str = "twin") -> None:
        from neurotwin.training import fit as fit_module
        from neurotwin.training.twin import TwinConfig

        self.name = name
        self._fit = fit_module
        self.config = TwinConfig()
        self.fit_config = fit_module.FitConfig(seed=seed, progress=False)
        self.helpers = helpers or {}
        self.info: dict[str, Any] = {}
        self._twin: Any = None

    @property
    def variant(self) -> str:
        return json.dumps(
            {
                "twin": self.config.to_dict(),
                "fit": self.fit_config.to_dict(),
                "helpers": sorted(self.helpers),
            },
            sort_keys=True,
        )

    def fit(self, rec: Recording, train: np.ndarray, val: np.ndarray) -> None:
        # The test indices are not passed: the twin never sees which images it will be scored on.
        split = {"train": train, "val": val, "test": np.zeros(0, dtype=np.int64)}
        # fit.py keeps frozen features across calls in-process; each fit here must pay for its own, as
        # a user fitting one session would (ridge is charged its feature extraction the same way).
        clear = getattr(self._fit, "clear_feature_cache", None)
        if clear is not None:
            clear()
        # A session name that cannot clash with the helpers' (which are session ids).
        twin, result = self._fit.fit_twin(
            rec, split, self.config, self.fit_config, helpers=self.helpers or None, name="_target"
        )
        self._twin = twin
        self.info = {"epochs": result.epochs_run, "best_epoch": result.best_epoch, "val_r": result.val_r}

    def predict(self, rec: Recording, test: np.ndarray) -> np.ndarray:
        return np.asarray(self._twin.predict(rec.images[test]), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# Running


@dataclass
class FitRecord:
    session: str
    protocol: str
    fold: int
    model: str
    variant: str
    r: list[float]
    wall_s: float
    cpu_s: float
    n_train: int
    n_val: int
    n_test: int
    load_before: float
    load_after: float
    command: str
    extra: dict[str, Any] = field(default_factory=dict)
    finished: float = 0.0  # time.time() when the fit was scored

    @property
    def key(self) -> str:
        return f"{self.session}|{self.protocol}|{self.fold}|{self.model}"


def splits_for(n_images: int, protocol: str, folds: int) -> list[tuple[int, dict[str, np.ndarray]]]:
    if protocol == "kfold":
        return [
            (
                fold,
                split_indices(
                    n_images,
                    scheme="kfold",
                    seed=SEED,
                    fold=fold,
                    n_folds=N_FOLDS,
                    val_fraction=VAL_FRACTION,
                ),
            )
            for fold in range(folds)
        ]
    return [(0, split_indices(n_images, scheme="first-half", seed=SEED, val_fraction=VAL_FRACTION))]


def make_fitter(model: str, args: argparse.Namespace) -> tuple[Fitter, str]:
    """The fitter and a string naming its configuration (cached results with another one are refit)."""
    if model == "ridge":
        return LiteRidge(), "lite0 s4/7/10 112px pool3 z-score LOO-ridge"
    if model == "neuralpredictors":
        epochs = QUICK_EPOCHS if args.quick else args.np_epochs
        peer = NeuralPredictorsPeer(seed=SEED, input_px=args.np_px, max_epochs=epochs, verbose=args.verbose)
        return peer, f"stacked2d+fullgaussian {args.np_px}px max_epochs={epochs}"
    if model == "twin":
        twin = TwinFitter(seed=SEED)
        return twin, twin.variant
    if model == "twin-multi":
        # Helpers are loaded per target session in run_all; the variant is fixed there too.
        twin = TwinFitter(seed=SEED, name="twin-multi")
        return twin, "multi"
    raise ValueError(model)


def load_cache(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def save_cache(path: Path | None, cache: dict[str, dict[str, Any]], keys: Sequence[str]) -> None:
    """Write ``keys`` of ``cache`` into the file, keeping what other runs (e.g. another model's, in
    parallel) wrote there since this one started."""
    if path is None:
        return
    merged = load_cache(path)
    merged.update({k: cache[k] for k in keys})
    cache.update(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)


def run_fit(
    fitter: Fitter,
    rec: Recording,
    split: dict[str, np.ndarray],
    fixed_seconds: Callable[[], tuple[float, float]] | None,
) -> tuple[np.ndarray, float, float]:
    """Fit, predict the test images, score. Returns (r per neuron, wall s, process CPU s)."""
    # Ridge computes the session's frozen features once (before the clock starts); every fit is
    # charged the full extraction, as if it were the only one.
    fixed_wall, fixed_cpu = fixed_seconds() if fixed_seconds is not None else (0.0, 0.0)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fitter.fit(rec, split["train"], split["val"])
    wall = time.perf_counter() - wall0 + fixed_wall
    cpu = time.process_time() - cpu0 + fixed_cpu
    pred = fitter.predict(rec, split["test"])
    measured = rec.responses[:, split["test"]].T
    if pred.shape != measured.shape:
        raise RuntimeError(f"{fitter.name} predicted {pred.shape}, expected {measured.shape}")
    return pearson_per_neuron(measured, pred), wall, cpu


def summarize(records: Sequence[FitRecord]) -> dict[str, Any]:
    """One row: per-neuron r averaged over the folds run, then median / 90th percentile over neurons."""
    r = np.mean([rec.r for rec in records], axis=0)
    return {
        "median": float(np.median(r)),
        "p90": float(np.percentile(r, 90)),
        "best": float(r.max()),
        "mean": float(r.mean()),
        "folds": len(records),
        "wall_s": float(np.mean([rec.wall_s for rec in records])),
        "cpu_s": float(np.mean([rec.cpu_s for rec in records])),
        "load": float(np.mean([(rec.load_before + rec.load_after) / 2 for rec in records])),
        "neurons": int(r.size),
    }


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"`nproc` = {os.cpu_count()}, CPU: {model}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}"
    )


def fmt(x: float | None) -> str:
    # References are quoted to the two decimals they were published with.
    return "" if x is None else f"{x:.2f}"


def render(
    cache: dict[str, dict[str, Any]],
    sessions: Sequence[str],
    protocols: Sequence[str],
    models: Sequence[str],
    notes: Sequence[str],
) -> str:
    lines = [
        "| session | protocol | model | median r | top decile (p90) r | p90 - 0.8 (seed) | best r | "
        "folds | median r, folds all models ran | train wall s / fit | train CPU s / fit | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    commands: list[str] = []
    twin_variants: list[str] = []
    every = [FitRecord(**v) for k, v in cache.items() if not k.startswith("_")]
    for session in sessions:
        for protocol in protocols:
            chosen: dict[str, list[FitRecord]] = {}
            for model in models:
                recs = [r for r in every if (r.session, r.protocol, r.model) == (session, protocol, model)]
                if not recs:
                    continue
                # Only the configuration fitted last counts: folds of an older twin (or epoch cap) left
                # in the cache must not be averaged with the current one.
                latest = max(recs, key=lambda r: r.finished).variant
                chosen[model] = sorted((r for r in recs if r.variant == latest), key=lambda r: r.fold)
                if model.startswith("twin") and latest not in twin_variants:
                    twin_variants.append(latest)
            # When the slow models ran fewer folds, every model is also scored on the common ones, so the
            # comparison is on identical test images.
            fold_sets = [{r.fold for r in recs} for recs in chosen.values()]
            common = sorted(set.intersection(*fold_sets)) if fold_sets else []
            differ = protocol == "kfold" and any(f != set(common) for f in fold_sets)
            for model in models:
                if model not in chosen:
                    lines.append(f"| {session} | {protocol} | {model} | not run | | | | | | | | |")
                    continue
                recs = chosen[model]
                s = summarize(recs)
                shared = ""
                if differ and common:
                    sub = summarize([r for r in recs if r.fold in common])
                    shared = f"{sub['median']:.3f} (fold {', '.join(map(str, common))})"
                for r in recs:
                    if r.command not in commands:
                        commands.append(r.command)
                folds = f"{s['folds']}/{N_FOLDS}" if protocol == "kfold" else "1"
                lines.append(
                    f"| {session} | {protocol} | {model} | **{s['median']:.3f}** | {s['p90']:.3f} | "
                    f"{s['p90'] - SEED_R:+.3f} | {s['best']:.3f} | {folds} | {shared} | {s['wall_s']:.0f} | "
                    f"{s['cpu_s']:.0f} | {s['load']:.1f} |"
                )
            for ref_session, ref_protocol, name, med, p90 in REFERENCES:
                if (ref_session, ref_protocol) == (session, protocol):
                    gap = "" if p90 is None else f"{p90 - SEED_R:+.2f}"
                    lines.append(
                        f"| {session} | {protocol} | *reference: {name}* | {med:.2f} | {fmt(p90)} | {gap} "
                        "| | | | | | |"
                    )
    out = [
        "## Twin quality: held-out per-neuron Pearson r on Cowley et al. V4 sessions",
        "",
        *lines,
        "",
        f"Splits: `neurotwin.training.datasets.split_indices`, seed {SEED}, val_fraction {VAL_FRACTION}; "
        f"kfold = {N_FOLDS}-fold over images (r per neuron averaged over the folds run), first-half = "
        "train/val on images 0..N/2-1, test on N/2..N-1. Identical splits for every model. "
        "r: `pearson_per_neuron` in bench/twin_quality.py (constant predictions score 0). "
        f"Seed's figure: r = {SEED_R} (Malakhova 2019, IT columns).",
        "",
        f"Machine: {machine()}. Wall times are on a machine shared with other jobs (load average "
        "column; 2 cores), so CPU seconds of the process are given too. Ridge's time includes the "
        "session's full feature extraction in every fit.",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in commands],
    ]
    out += ["", "Models:", "", *[f"- {n}" for n in METHOD_NOTES]]
    out += [f"- twin configuration (TwinConfig, FitConfig, helper sessions): `{v}`" for v in twin_variants]
    if notes:
        out += ["", "Could not run:", "", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cowley_v4 folder (default %(default)s)")
    ap.add_argument("--sessions", default=",".join(DEFAULT_SESSIONS), help="comma-separated sessions")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"any of {', '.join(PROTOCOLS)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_FOLDS} of {N_FOLDS} folds, fewer epochs")
    ap.add_argument("--folds", type=int, default=None, help=f"run the first K of the {N_FOLDS} folds")
    ap.add_argument("--np-epochs", type=int, default=200, help="neuralpredictors max epochs (recipe: 200)")
    ap.add_argument("--np-px", type=int, default=40, help="neuralpredictors input size in pixels")
    ap.add_argument("--results", type=Path, default=None, help="JSON cache of per-fit results")
    ap.add_argument("--rerun", action="store_true", help="refit even when cached")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "TWIN_QUALITY.md")
    ap.add_argument("--table-only", action="store_true", help="only render the table from --results")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.sessions = [s for s in args.sessions.split(",") if s]
    args.protocols = [p for p in args.protocols.split(",") if p]
    args.models = [m for m in args.models.split(",") if m]
    for name, given, allowed in (("protocol", args.protocols, PROTOCOLS), ("model", args.models, MODELS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            ap.error(f"unknown {name} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if args.folds is None:
        args.folds = QUICK_FOLDS if args.quick else N_FOLDS
    if not 1 <= args.folds <= N_FOLDS:
        ap.error(f"--folds must be in 1..{N_FOLDS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/twin_quality.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    cache = load_cache(args.results)
    notes: list[str] = []
    if not args.table_only:
        if not (args.data / "responses").is_dir() or not (args.data / "images").is_dir():
            print(
                f"twin_quality: no data at {args.data} (expected images/ and responses/ of "
                "cowley_v4; pass --data)",
                file=sys.stderr,
            )
            return 2
        notes = run_all(args, cache, command)
        # Notes (why a model could not run) outlive the run that found them, like the results.
        on_disk = load_cache(args.results).get("_notes", cache.get("_notes", {}))
        cache["_notes"] = {"notes": sorted(set(on_disk.get("notes", [])) | set(notes))}
        save_cache(args.results, cache, ["_notes"])
    notes = cache.get("_notes", {}).get("notes", [])
    table = render(cache, args.sessions, args.protocols, args.models, notes)
    print(table)
    args.out.write_text(table)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


def run_all(args: argparse.Namespace, cache: dict[str, dict[str, Any]], command: str) -> list[str]:
    notes: list[str] = []
    fitters: dict[str, tuple[Fitter, str]] = {}
    for model in args.models:
        try:
            fitters[model] = make_fitter(model, args)
        except NeuralPredictorsUnavailable as exc:
            notes.append(f"neuralpredictors could not run: {exc}")
        except ImportError as exc:
            notes.append(f"{model} could not run: {type(exc).__name__}: {exc}")
    for session in args.sessions:
        rec = load_recording(args.data, session=session)
        print(f"[{session}] {rec}", file=sys.stderr, flush=True)
        if "twin-multi" in fitters:
            fitter = fitters["twin-multi"][0]
            assert isinstance(fitter, TwinFitter)
            # Every other session of the folder, all images: none of them shares an image with the
            # target (checked by content for 201025, 210224 and 210621), so the test images stay unseen.
            fitter.helpers = {
                other: load_recording(args.data, session=other)
                for other in list_sessions(args.data)
                if other != session
            }
            fitters["twin-multi"] = (fitter, fitter.variant)
        for protocol in args.protocols:
            for fold, split in splits_for(rec.n_images, protocol, args.folds):
                for model, (fitter, variant) in fitters.items():
                    key = f"{session}|{protocol}|{fold}|{model}"
                    if not args.rerun and cache.get(key, {}).get("variant") == variant:
                        continue
                    load0 = os.getloadavg()[0]
                    fixed = partial(fitter.fixed_seconds, rec) if isinstance(fitter, LiteRidge) else None
                    r, wall, cpu = run_fit(fitter, rec, split, fixed)
                    extra: dict[str, Any] = {}
                    if isinstance(fitter, NeuralPredictorsPeer):
                        extra["epochs"] = fitter.epochs_run
                    if isinstance(fitter, LiteRidge) and fitter.chosen_alpha is not None:
                        extra["log10_alpha_range"] = [
                            float(np.log10(fitter.chosen_alpha.min())),
                            float(np.log10(fitter.chosen_alpha.max())),
                        ]
                    if isinstance(fitter, TwinFitter):
                        extra.update(fitter.info)
                    record = FitRecord(
                        session=session,
                        protocol=protocol,
                        fold=fold,
                        model=model,
                        variant=variant,
                        r=[float(v) for v in r],
                        wall_s=wall,
                        cpu_s=cpu,
                        n_train=int(split["train"].size),
                        n_val=int(split["val"].size),
                        n_test=int(split["test"].size),
                        load_before=load0,
                        load_after=os.getloadavg()[0],
                        command=command,
                        extra=extra,
                        finished=time.time(),
                    )
                    cache[key] = asdict(record)
                    save_cache(args.results, cache, [key])
                    print(
                        f"[{session}] {protocol} fold {fold} {model}: median r {np.median(r):.3f} "
                        f"p90 {np.percentile(r, 90):.3f} wall {wall:.0f}s cpu {cpu:.0f}s {extra}",
                        file=sys.stderr,
                        flush=True,
                    )
    return notes


if __name__ == "__main__":
    sys.exit(main())
