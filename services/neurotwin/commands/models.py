"""``neurotwin models [--model-store DIR]``: list predictors and generators with versions and key metrics.

Also holds the predictor lookup the other store commands share (a name in the store or a folder).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from neurotwin.commands._options import ModelRef, add_model_store, open_store, resolve
from neurotwin.errors import InvalidInput, NeurotwinError, NotFound
from neurotwin.store import (
    CARD_FILE,
    GENERATORS,
    MODEL_FILES,
    PREDICTORS,
    ModelStore,
    ModelVersion,
    default_store_root,
    validate_generator,
    validate_predictor,
)

HELP = "list the model store"
__all__ = ["default_store_root", "resolve_predictor"]


def resolve_predictor(ref: ModelRef, args: argparse.Namespace) -> ModelVersion:
    """A predictor given as a version folder (model.onnx + card.json), a model folder (its latest
    version, or ``ref.version``), or a name in the store."""
    path = Path(ref.name)
    if path.is_dir():
        if (path / MODEL_FILES[PREDICTORS]).is_file() or (path / CARD_FILE).is_file():
            if ref.version is not None:
                raise InvalidInput(f"{ref.name} is one version's folder; a :VERSION does not apply")
            number = int(path.name) if path.name.isdigit() else 0
            return ModelVersion(PREDICTORS, path.parent.name, number, path)
        return ModelStore(path.parent.parent).resolve(PREDICTORS, path.name, ref.version)
    if "/" in ref.name or os.sep in ref.name:
        raise NotFound(f"{ref.name}: no such model folder")
    return resolve(open_store(args, (PREDICTORS,)), PREDICTORS, ref)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_store(parser)
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
    # A missing folder is an error (a typo, or the wrong directory); an existing empty store is listed.
    store = open_store(args, kinds=())
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
