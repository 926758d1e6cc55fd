"""``neurotwin models [--store DIR]``: list predictors and generators with versions and key metrics.

Also holds the small helpers the other store commands share (store root, model lookup).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from neurotwin.errors import InvalidInput, NeurotwinError, NotFound
from neurotwin.store import (
    CARD_FILE,
    GENERATORS,
    MODEL_FILES,
    PREDICTORS,
    ModelStore,
    ModelVersion,
    validate_generator,
    validate_predictor,
)

HELP = "list the model store"
DEFAULT_STORE = "model_store"


def default_store_root() -> str:
    return os.environ.get("NEUROTWIN_MODEL_STORE") or DEFAULT_STORE


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=None, help="model store root (default: $NEUROTWIN_MODEL_STORE or ./model_store)"
    )


def open_store(arg: str | None) -> ModelStore:
    return ModelStore(arg or default_store_root())


def resolve_predictor(spec: str, store_arg: str | None, version: int | None = None) -> ModelVersion:
    """A predictor given as a version folder (model.onnx + card.json), a model folder (its latest
    version, or ``version``), or a name in the store."""
    path = Path(spec)
    if path.is_dir():
        if (path / MODEL_FILES[PREDICTORS]).is_file() or (path / CARD_FILE).is_file():
            if version is not None:
                raise InvalidInput(f"{spec} is one version's folder; --version does not apply")
            number = int(path.name) if path.name.isdigit() else 0
            return ModelVersion(PREDICTORS, path.parent.name, number, path)
        return ModelStore(path.parent.parent).resolve(PREDICTORS, path.name, version)
    if "/" in spec or os.sep in spec:
        raise NotFound(f"{spec}: no such model folder")
    return open_store(store_arg).resolve(PREDICTORS, spec, version)


def configure(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def _predictor_row(version: ModelVersion) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": "predictor", "name": version.name, "version": version.version}
    try:
        card = validate_predictor(version)
    except NeurotwinError as exc:
        row["error"] = str(exc)
        return row
    test = card.metrics.get("test") if isinstance(card.metrics.get("test"), dict) else card.metrics
    row.update(
        {
            "neurons": card.neuron_count,
            "input": f"{card.input.height}x{card.input.width}",
            "median_r": (test or {}).get("median_r"),
            "top_decile_r": (test or {}).get("top_decile_r"),
            "created": card.created,
            "source": card.training.get("data") or card.training.get("source"),
        }
    )
    return row


def _generator_row(version: ModelVersion) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": "generator", "name": version.name, "version": version.version}
    try:
        card = validate_generator(version)
    except NeurotwinError as exc:
        row["error"] = str(exc)
        return row
    row.update(
        {
            "architecture": card.architecture,
            "latent_dim": card.latent_dim,
            "resolution": card.resolution,
            "created": card.created,
        }
    )
    return row


def listing(store: ModelStore) -> list[dict[str, Any]]:
    rows = []
    for kind, make in ((PREDICTORS, _predictor_row), (GENERATORS, _generator_row)):
        for name in store.names(kind):
            for number in store.versions(kind, name):
                rows.append(make(store.resolve(kind, name, number)))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    rows = listing(store)
    if args.json:
        print(json.dumps({"store": str(store.root), "models": rows}, indent=1))
        return 0
    print(f"model store {store.root}")
    if not rows:
        print("  (empty)")
        return 0
    for kind in ("predictor", "generator"):
        subset = [r for r in rows if r["kind"] == kind]
        if not subset:
            continue
        print(f"{kind}s:")
        for r in subset:
            head = f"  {r['name']}/{r['version']}"
            if "error" in r:
                print(f"{head}  BROKEN: {r['error']}")
            elif kind == "predictor":
                print(
                    f"{head}  neurons {r['neurons']}  input {r['input']}  median r {_fmt(r['median_r'])}"
                    f"  top decile r {_fmt(r['top_decile_r'])}  created {r['created'] or '-'}"
                )
            else:
                print(
                    f"{head}  {r['architecture']}  latent {r['latent_dim']}  {r['resolution']} px"
                    f"  created {r['created'] or '-'}"
                )
    return 0
