"""``neurotwin`` command line: a thin dispatcher over ``neurotwin.commands.*``.

Subcommand modules are imported only when chosen, so ``neurotwin predict`` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from neurotwin import __version__
from neurotwin.errors import NeurotwinError, Unavailable

# subcommand -> module under neurotwin.commands
COMMANDS: dict[str, str] = {
    "train": "train",
    "evaluate": "evaluate",
    "register": "register",
    "models": "models",
    "train-generator": "train_generator",
    "recode-generator": "recode_generator",
    "serve": "serve",
    "predict": "predict",
    "synthesize": "synthesize",
    "synthesize-all": "synthesize_all",
    "rig-sim": "rig_sim",
    "export": "export",
    "export-session": "export_session",
}

SUMMARIES: dict[str, str] = {
    "train": "train a digital twin on a recording and add it to the model store",
    "evaluate": "evaluate a stored twin on a recording",
    "register": "import an ONNX predictor trained elsewhere as a new store version",
    "models": "list the model store",
    "train-generator": "train a natural-image GAN prior",
    "recode-generator": "store a trained GAN prior with synthesis on a deeper code layer",
    "serve": "run the gRPC services",
    "predict": "predict firing rates for image files through a running service",
    "synthesize": "synthesize preferred stimuli for a neuron",
    "synthesize-all": "synthesize preferred stimuli for every neuron of a twin (resumable, sharded)",
    "rig-sim": "run a closed-loop session against a simulated neuron",
    "export": "export a twin to other serving systems (TorchServe)",
    "export-session": "export a journaled closed-loop session to NWB or HDF5, and a static report",
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    # allow_abbrev=False everywhere: a prefix must never silently become another flag.
    parser = argparse.ArgumentParser(
        prog="neurotwin", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"neurotwin {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    for name, summary in SUMMARIES.items():
        sub_parser = sub.add_parser(name, help=summary, description=summary, allow_abbrev=False)
        if name == chosen:
            module = importlib.import_module(f"neurotwin.commands.{COMMANDS[name]}")
            module.configure(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, _ = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except Unavailable as exc:
        address = getattr(args, "address", None)
        where = f"no neurotwin server reachable at {address}: " if address else ""
        print(f"neurotwin {args.command}: error: {where}{exc}", file=sys.stderr)
        return 1
    except NeurotwinError as exc:
        print(f"neurotwin {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # Files and sockets: a missing folder, no permission, a full disk. One line, no traceback.
        print(f"neurotwin {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
