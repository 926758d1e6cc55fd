"""The flags every command shares, defined once so the grammar is the same everywhere.

- ``--model-store DIR``: default ``$NEUROTWIN_MODEL_STORE``, else ``./model_store``.
- ``--model NAME[:VERSION]`` for a twin, ``--generator NAME[:VERSION]`` for a generator (no version:
  the newest).
- ``--address`` and the TLS/token flags of the commands that call a server.

Old spellings (``--store``, ``--twin``, ``--version``, ``--model-version``, ...) stay accepted as
hidden aliases that print a one-line notice: lab scripts and rig control code call these command
lines unattended, and a renamed flag must not stop an experiment between two sessions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurotwin.errors import InvalidInput, NotFound
from neurotwin.store import KINDS, ModelStore, ModelVersion, default_store_root

ADDRESS_ENV = "NEUROTWIN_ADDRESS"
TOKEN_ENV = "NEUROTWIN_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:8001"


def subparser_options() -> dict[str, Any]:
    """Keyword arguments for every ``add_parser``: no prefix matching (``--model`` must never quietly
    become ``--model-store``)."""
    return {"allow_abbrev": False}


# ------------------------------------------------------------------------------------------------
# NAME[:VERSION]


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line; ``version`` None means the newest."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


def parse_model_ref(text: str) -> ModelRef:
    """``NAME`` or ``NAME:VERSION`` (VERSION 1, 2, ...); an argparse ``type``. A path (it has a slash)
    is kept whole unless it ends in ``:VERSION``, for the commands that also take model folders."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and int(tail) > 0 and head:
        return ModelRef(head, int(tail))
    if text and (not sep or _is_path(text)):
        return ModelRef(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected NAME or NAME:VERSION (VERSION 1, 2, ...)")


def _is_path(text: str) -> bool:
    return "/" in text or "\\" in text or os.sep in text


class _DeprecatedAlias(argparse.Action):
    """An old spelling: does what ``target`` does and says so on stderr, once per run."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str = "", **kwargs: Any):
        self.replacement = replacement
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        print(f"neurotwin: {option} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_alias(parser: argparse.ArgumentParser, old: str, dest: str, replacement: str, **kwargs: Any) -> None:
    """A hidden ``old`` flag that stores into ``dest`` with a deprecation notice."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, replacement=replacement, **kwargs)


# ------------------------------------------------------------------------------------------------
# The model store


def add_model_store(
    parser: argparse.ArgumentParser, what: str = "model store root", legacy: bool = True
) -> None:
    """``--model-store DIR``; ``legacy`` keeps the old ``--store`` of the commands that had it."""
    parser.add_argument(
        "--model-store",
        dest="model_store",
        default=None,
        metavar="DIR",
        help=f"{what} (default: $NEUROTWIN_MODEL_STORE, else ./model_store)",
    )
    if legacy:
        add_alias(parser, "--store", "model_store", "--model-store")


def store_root(args: argparse.Namespace) -> str:
    return getattr(args, "model_store", None) or default_store_root()


def check_store(root: str, kinds: Sequence[str] = KINDS) -> ModelStore:
    """The store at ``root``; a missing folder, or one with no model of ``kinds``, is a clear error
    rather than a later "model not found"."""
    path = Path(root)
    hint = "give --model-store DIR or set $NEUROTWIN_MODEL_STORE"
    if not path.is_dir():
        raise NotFound(f"model store {root} does not exist ({hint})")
    store = ModelStore(path)
    if kinds and not any(store.names(kind) for kind in kinds):
        raise NotFound(f"model store {root} holds no {' or '.join(kinds)} ({hint})")
    return store


def open_store(args: argparse.Namespace, kinds: Sequence[str] = KINDS) -> ModelStore:
    """The store named by ``--model-store`` (see ``check_store``)."""
    return check_store(store_root(args), kinds)


def resolve(store: ModelStore, kind: str, ref: ModelRef) -> ModelVersion:
    """``store.resolve`` with the names the store does have in the error."""
    try:
        return store.resolve(kind, ref.name, ref.version)
    except NotFound as exc:
        names = store.names(kind)
        if ref.name in names:
            raise
        listed = ", ".join(names) if names else "none"
        raise NotFound(f"no {kind[:-1]} named {ref.name!r} in {store.root} (it has: {listed})") from exc


def output_folder(args: argparse.Namespace, kind: str) -> str:
    """``--out``: ``<store>/<kind>/NAME`` as given, or a bare NAME placed in ``--model-store``."""
    out = str(args.out)
    if _is_path(out):
        return out
    return str(Path(store_root(args)) / kind / out)


# ------------------------------------------------------------------------------------------------
# --model and --generator


def add_model(
    parser: argparse.ArgumentParser,
    help: str = "twin (predictor) NAME[:VERSION] in the model store (no version: the newest)",
    required: bool = True,
    aliases: Sequence[str] = (),
    version_aliases: Sequence[str] = ("--version",),
) -> None:
    parser.add_argument(
        "--model", type=parse_model_ref, required=required, default=None, metavar="NAME[:VERSION]", help=help
    )
    for old in aliases:
        add_alias(parser, old, "model", "--model NAME[:VERSION]", type=parse_model_ref)
    for old in version_aliases:
        add_alias(parser, old, "legacy_model_version", "--model NAME:VERSION", type=int)


def add_generator(
    parser: argparse.ArgumentParser,
    help: str = "generator NAME[:VERSION] in the model store (default: the server's default generator)",
) -> None:
    parser.add_argument(
        "--generator", type=parse_model_ref, default=None, metavar="NAME[:VERSION]", help=help
    )
    add_alias(parser, "--generator-version", "legacy_generator_version", "--generator NAME:VERSION", type=int)


def _with_version(ref: ModelRef | None, legacy: int | None, flag: str) -> ModelRef | None:
    if not legacy:
        return ref
    if ref is None:
        raise InvalidInput(f"a version needs a name: give {flag} NAME:{legacy}")
    if ref.version is not None and ref.version != legacy:
        raise InvalidInput(f"{flag} {ref} and version {legacy} disagree")
    return ModelRef(ref.name, legacy)


def model_ref(args: argparse.Namespace) -> ModelRef | None:
    """``--model`` with an old ``--version``/``--model-version`` folded in."""
    return _with_version(args.model, getattr(args, "legacy_model_version", None), "--model")


def generator_ref(args: argparse.Namespace) -> ModelRef | None:
    return _with_version(args.generator, getattr(args, "legacy_generator_version", None), "--generator")


# ------------------------------------------------------------------------------------------------
# Talking to a server


def add_connection(parser: argparse.ArgumentParser, address_help: str, address_default: str | None) -> None:
    """``--address`` plus TLS, token and timeout flags for client commands."""
    parser.add_argument("--address", default=address_default, metavar="HOST:PORT", help=address_help)
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA certificate to trust; implies TLS")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="client key for mutual TLS")
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help="bearer token (default: $NEUROTWIN_TOKEN)"
    )


def default_address() -> str:
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def channel_config(args: argparse.Namespace) -> Any:
    from neurotwin.client import ChannelConfig

    return ChannelConfig(
        address=args.address,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token,
    )


# ------------------------------------------------------------------------------------------------
# Session metadata (neurotwin.v1.RecordingMetadata), for rig-sim and export-session

_METADATA_FLAGS: tuple[tuple[str, str], ...] = (
    ("subject_id", "the animal's id"),
    ("species", "Latin binomial (e.g. 'Macaca mulatta') or an NCBI taxonomy URL"),
    ("sex", "M, F, U (unknown) or O (other)"),
    ("age", "ISO 8601 duration, e.g. P7Y; a range P7Y/P8Y; P7Y/ for 7 years or older"),
    ("subject_description", "anything else about the animal"),
    ("session_description", "one sentence on the session (default: from its settings)"),
    ("lab", "lab name"),
    ("institution", "institution name"),
    ("experiment_description", "the experiment the session belongs to"),
    ("protocol", "protocol, e.g. an animal-care protocol number"),
    ("device_name", "recording device, e.g. 'Utah array 96ch'"),
    ("device_description", "more about the device"),
    ("device_manufacturer", "device manufacturer"),
    ("brain_area", "where the neurons are, e.g. V4"),
    ("response_units", "units of the responses, e.g. 'spikes per 100 ms window'"),
)


def add_metadata_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """One flag per RecordingMetadata field (``--subject-id``, ``--species``, ...)."""
    group = parser.add_argument_group(f"subject, device and session metadata ({what})")
    for name, help in _METADATA_FLAGS:
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=f"meta_{name}", default=None, metavar=name.upper(), help=help
        )
    group.add_argument(
        "--experimenter",
        dest="meta_experimenter",
        action="append",
        default=None,
        metavar="'LAST, FIRST'",
        help="person who ran the session; repeat for several",
    )


def metadata_from_args(args: argparse.Namespace, **defaults: Any) -> dict[str, Any]:
    """The metadata fields given on the command line, over ``defaults``."""
    given = {k.removeprefix("meta_"): v for k, v in vars(args).items() if k.startswith("meta_") and v}
    return {**{k: v for k, v in defaults.items() if v}, **given}
