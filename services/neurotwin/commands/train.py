"""``neurotwin train DATA --out model_store/predictors/NAME``: fit, evaluate, export and register a twin.

One recording gives one twin. Several (``--session`` repeated, ``--session all``, or several DATA paths)
train one shared core with a readout per session and export one twin per session, named
``NAME-<session>``. ``--helper-session`` / ``--helper`` add recordings that only help train the core
(all their images, nothing exported): the way to give one session's twin the benefit of the others.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from neurotwin.commands._options import add_model_store
from neurotwin.commands.models import default_store_root
from neurotwin.errors import InvalidInput
from neurotwin.store import PREDICTORS, ModelStore

HELP = "train a digital twin on a recording and add it to the model store"


def configure(parser: argparse.ArgumentParser) -> None:
    from neurotwin.training.fit import FitConfig
    from neurotwin.training.parts import core_names, readout_names
    from neurotwin.training.twin import TwinConfig

    model, fit = TwinConfig(), FitConfig()
    parser.add_argument(
        "data",
        nargs="+",
        metavar="DATA",
        help="recording: a zip/folder of images (+ --responses), an HDF5 or NWB file, or a folder "
        "with images/ and responses/ per session (+ --session)",
    )
    parser.add_argument(
        "--responses", default=None, help="responses .npy (neurons x images) for a zip/folder"
    )
    parser.add_argument(
        "--session",
        action="append",
        default=None,
        help="session id in a sessions folder; repeat for several (one twin each), or 'all'",
    )
    parser.add_argument(
        "--helper-session",
        action="append",
        default=None,
        help="session of the same folder that only helps train the shared core; repeat, or 'all' "
        "(every session not trained as a target)",
    )
    parser.add_argument(
        "--helper",
        action="append",
        default=None,
        help="another recording file that only helps train the core",
    )
    parser.add_argument(
        "--core-from",
        default=None,
        metavar="CORE.pt",
        help="reuse a core saved by --save-core (its architecture; only readouts train unless --train-core)",
    )
    parser.add_argument("--train-core", action="store_true", help="with --core-from: fine-tune the core too")
    parser.add_argument(
        "--save-core", default=None, metavar="CORE.pt", help="also save the trained shared core for reuse"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="<store>/predictors/NAME, or just NAME (in --model-store): where the new version goes",
    )
    add_model_store(parser, "store root when --out is a bare name")
    parser.add_argument("--core", choices=core_names(), default=model.core)
    parser.add_argument(
        "--core-kernel", type=int, default=model.core_kernel, help="kernel of the learned core's later layers"
    )
    parser.add_argument(
        "--stages", default=",".join(str(s) for s in model.stages), help="EfficientNet blocks to read (0-15)"
    )
    parser.add_argument("--readout", choices=readout_names(), default=model.readout)
    parser.add_argument("--hidden", type=int, default=model.hidden, help="channels of the learned core")
    parser.add_argument(
        "--core-layers", type=int, default=model.core_layers, help="layers of the learned core"
    )
    parser.add_argument("--input-size", type=int, default=model.input_size, help="training resolution (px)")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=model.ensemble,
        help="members (core + readout, own seeds) in one exported model: output rates is their mean, "
        "member_rates [N, members, neurons] each one's",
    )
    parser.add_argument(
        "--member-split",
        choices=("folds", "same"),
        default="folds",
        help="folds: each member early-stops on its own validation slice and trains on the rest (one "
        "after another); same: members train side by side on one split",
    )
    parser.add_argument("--epochs", type=int, default=fit.max_epochs, help="maximum epochs")
    parser.add_argument("--lr", type=float, default=fit.lr)
    parser.add_argument("--weight-decay", type=float, default=fit.weight_decay)
    parser.add_argument("--batch-size", type=int, default=fit.batch_size)
    parser.add_argument("--patience", type=int, default=fit.patience)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split",
        default="random",
        help="test split: random (20%% test), first-half (test = second half), kfold:K or kfold:K:FOLD",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of non-test images for validation"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--report", default=None, help="report folder (default: reports/<name>-v<version>); 'none' to skip"
    )
    parser.add_argument("--description", default="", help="free text for the model card")
    parser.add_argument(
        "--units", default=None, help="response units for the card (default: spikes per 100 ms)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_out(out: str, store_arg: str | None) -> tuple[ModelStore, str]:
    """``<root>/predictors/<name>`` -> (store at root, name); a bare name uses ``--model-store``."""
    path = Path(out)
    if len(path.parts) == 1:
        return ModelStore(store_arg or default_store_root()), out
    if path.parent.name != PREDICTORS:
        raise InvalidInput(f"--out {out}: expected <store>/predictors/<name> (or a bare name)")
    if store_arg and Path(store_arg).resolve() != path.parent.parent.resolve():
        raise InvalidInput(f"--out {out} lies outside --model-store {store_arg}")
    return ModelStore(path.parent.parent), path.name


def parse_split(text: str) -> dict[str, Any]:
    scheme, _, rest = text.partition(":")
    if scheme in ("random", "first-half") and not rest:
        return {"scheme": scheme}
    if scheme == "kfold":
        parts = rest.split(":") if rest else []
        try:
            n_folds = int(parts[0]) if parts else 5
            fold = int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            parts = ["x", "x", "x"]
        if len(parts) <= 2:
            return {"scheme": "kfold", "n_folds": n_folds, "fold": fold}
    raise InvalidInput(f"--split {text!r}: expected random, first-half, kfold:K or kfold:K:FOLD")


def parse_stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        stages = ()
    if not stages:
        raise InvalidInput(f"--stages {text!r}: expected comma-separated block numbers, e.g. 4,7,10")
    return stages


def load_targets(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(targets, helpers): name -> Recording, with names the session ids or file stems."""
    from neurotwin.training.datasets import list_sessions, load_recording

    targets: dict[str, Any] = {}
    helpers: dict[str, Any] = {}
    sessions = args.session or []
    if sessions or args.helper_session:
        if len(args.data) != 1:
            raise InvalidInput("--session and --helper-session need exactly one sessions folder as DATA")
        root = args.data[0]
        available = list_sessions(root)
        chosen = available if sessions == ["all"] else sessions
        if not chosen:
            raise InvalidInput("--helper-session needs at least one --session to train a twin for")
        for session in chosen:
            targets[session] = load_recording(root, session=session)
        extra = args.helper_session or []
        extra = [s for s in available if s not in targets] if extra == ["all"] else extra
        for session in extra:
            if session in targets:
                raise InvalidInput(f"session {session} is both a target and a helper")
            helpers[session] = load_recording(root, session=session)
    else:
        if args.responses and len(args.data) != 1:
            raise InvalidInput("--responses applies to one DATA path")
        for path in args.data:
            name = _unique(Path(path).stem, targets)
            targets[name] = load_recording(path, responses=args.responses)
    for path in args.helper or []:
        helpers[_unique(f"helper-{Path(path).stem}", {**targets, **helpers})] = load_recording(path)
    return targets, helpers


def _unique(name: str, taken: dict[str, Any]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def run(args: argparse.Namespace) -> int:
    from neurotwin.training.datasets import split_indices
    from neurotwin.training.ensemble import fit_cv_ensemble
    from neurotwin.training.evaluate import headline, summarize
    from neurotwin.training.export import export_twin
    from neurotwin.training.fit import FitConfig, SessionData, SharedCore, fit_twins
    from neurotwin.training.report import write_report
    from neurotwin.training.twin import TwinConfig

    started = time.perf_counter()
    store, name = parse_out(args.out, args.model_store)
    split_args = parse_split(args.split)
    config = TwinConfig(
        core=args.core,
        stages=parse_stages(args.stages),
        readout=args.readout,
        hidden=args.hidden,
        core_layers=args.core_layers,
        core_kernel=args.core_kernel,
        input_size=args.input_size,
        ensemble=args.ensemble,
    )
    fit_config = FitConfig(
        max_epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    targets, helpers = load_targets(args)
    splits = {
        key: split_indices(
            rec.n_images,
            scheme=split_args["scheme"],
            seed=args.seed,
            fold=split_args.get("fold", 0),
            n_folds=split_args.get("n_folds", 5),
            val_fraction=args.val_fraction,
        )
        for key, rec in targets.items()
    }
    sessions = {key: SessionData(rec, splits[key]) for key, rec in targets.items()}
    sessions.update({key: SessionData(rec, None) for key, rec in helpers.items()})
    for key, rec in {**targets, **helpers}.items():
        print(f"{key}: {rec!r}", file=sys.stderr)
    shared = SharedCore.load(args.core_from) if args.core_from else None
    if args.train_core and shared is None:
        raise InvalidInput("--train-core applies only with --core-from")
    member_val: dict[str, list[list[int]]] = {}
    if config.ensemble > 1 and args.member_split == "folds":
        result, member_val = fit_cv_ensemble(
            sessions, config, fit_config, core=shared, train_core=args.train_core
        )
    else:
        result = fit_twins(sessions, config, fit_config, core=shared, train_core=args.train_core)
    config = result.config
    if args.save_core:
        result.shared_core().save(args.save_core)
        print(f"saved the shared core ({len(result.shared_core().cores)} member(s)) to {args.save_core}")
    print(
        f"trained in {result.wall_s:.1f} s on {result.device}: {result.epochs_run} epochs, "
        f"best {result.best_epoch}, validation r {result.val_r:.3f}"
    )
    helper_info = [
        {"name": k, "data": h.source, "sha256": h.sha256, "images": h.n_images} for k, h in helpers.items()
    ]
    for key, rec in targets.items():
        twin = result.twins[key]
        split = splits[key]
        out_name = name if len(targets) == 1 else f"{name}-{key}"
        test, train = split["test"], split["train"]
        predicted = twin.predict(rec.images[test])
        repeats = None if rec.repeats is None else rec.repeats[:, test]
        metrics = summarize(predicted, rec.responses[:, test].T, repeats)
        training = {
            "data": rec.source,
            "session": key,
            "sha256": rec.sha256,
            "images": rec.n_images,
            "image_size": list(rec.image_size),
            "seed": args.seed,
            "split": {
                **split_args,
                "seed": args.seed,
                "val_fraction": args.val_fraction,
                **{part: idx.tolist() for part, idx in split.items()},
                **({"member_val": member_val[key]} if key in member_val else {}),
            },
            "member_split": args.member_split if config.ensemble > 1 else None,
            "config": config.to_dict(),
            "fit": fit_config.to_dict(),
            "helpers": helper_info,
            "core_from": None
            if shared is None
            else {"path": str(args.core_from), "sessions": shared.sessions, "trained": args.train_core},
            "co_trained": [k for k in targets if k != key],
            "device": result.device,
            "wall_s": round(result.wall_s, 2),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "val_r": round(result.val_r, 5),
        }
        version, _ = export_twin(
            twin,
            store=store,
            name=out_name,
            neuron_ids=rec.neuron_ids,
            image_size=rec.image_size,
            parity_images=rec.images[test[:64]],
            stats_images=rec.images[train],
            stats_measured=rec.responses[:, train].T,
            training=training,
            metrics={"test": metrics, "val_r": round(result.val_r, 5)},
            description=args.description or f"neurotwin {config.core} twin of {rec.source} ({key})",
            units=args.units,
        )
        print(f"{out_name}: {headline(metrics)}")
        print(f"  wrote {version.model_path} and {version.card_path}")
        if (args.report or "").lower() != "none":
            folder = Path(args.report or f"reports/{out_name}-v{version.version}")
            if len(targets) > 1 and args.report:
                folder = folder / out_name
            page = write_report(
                folder,
                predicted,
                rec.responses[:, test].T,
                rec.neuron_ids,
                metrics,
                title=f"{out_name} v{version.version}: held-out evaluation",
                details={
                    "data": rec.source,
                    "model": str(version.path),
                    "split": args.split,
                    "seed": args.seed,
                },
            )
            print(f"  report {page}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0
