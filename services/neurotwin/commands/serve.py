"""``neurotwin serve SERVICE...``: run one or more services in one gRPC server (one port).

Each service module under ``neurotwin.server`` provides:
  SECTION: str                        config-file section and env prefix (NEUROTWIN_<SECTION>_*)
  Settings: dataclass                 its settings; each becomes a flag --<service>-<setting>
  FLAG_HELP: dict[str, str]           help text per setting
  attach(server, settings) -> None    build engines, register servicers and stop hooks
``model_store`` is shared by every service and set once with --model-store.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import socket
from types import ModuleType

from neurotwin.commands._options import add_model_store, check_store
from neurotwin.errors import InvalidInput
from neurotwin.server.config import ServerSettings, load_settings, read_config_file
from neurotwin.store import GENERATORS, PREDICTORS

HELP = "run the gRPC services (and the HTTP/REST API with --http-port)"
SERVICES = {
    "predictor": "neurotwin.server.predictor",
    "synthesizer": "neurotwin.server.synthesizer",
    "closed-loop": "neurotwin.server.closed_loop",
}
# What each service cannot start without: a store holding none of these is a mistake (a wrong
# --model-store or working directory), better said at once than as "not found" on the first call.
NEEDS = {"predictor": (PREDICTORS,), "synthesizer": (PREDICTORS,), "closed-loop": (GENERATORS,)}
log = logging.getLogger("neurotwin.serve")


def _modules(names: list[str]) -> list[ModuleType]:
    chosen = list(SERVICES) if "all" in names else names
    unknown = [n for n in chosen if n not in SERVICES]
    if unknown:
        raise InvalidInput(f"unknown service(s) {unknown}; choose from {[*SERVICES, 'all']}")
    return [importlib.import_module(SERVICES[n]) for n in dict.fromkeys(chosen)]


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "server (also NEUROTWIN_SERVER_* env vars or the 'server' config section)"
    )
    for f in dataclasses.fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f"server_{f.name}", default=None, metavar=f.name.upper())


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "services",
        nargs="+",
        metavar="SERVICE",
        help=f"one or more of {', '.join(SERVICES)}, or 'all'",
    )
    parser.add_argument("--config", help="YAML or JSON file with sections server, predictor, ...")
    add_model_store(parser, "model store root for every service", legacy=False)
    add_server_flags(parser)
    for name, module_path in SERVICES.items():
        module = importlib.import_module(module_path)
        group = parser.add_argument_group(f"{name} (also NEUROTWIN_{module.SECTION.upper()}_* env vars)")
        helps = getattr(module, "FLAG_HELP", {})
        for f in dataclasses.fields(module.Settings):
            if f.name == "model_store":
                continue
            group.add_argument(
                f"--{name}-{f.name.replace('_', '-')}",
                dest=_dest(module, f.name),
                default=None,
                metavar=f.name.upper(),
                help=helps.get(f.name),
            )


def _dest(module: ModuleType, setting: str) -> str:
    # Per-service destinations: two services may both have a setting called e.g. "device".
    return "model_store" if setting == "model_store" else f"{module.SECTION}__{setting}"


def build_server(args: argparse.Namespace) -> object:
    from neurotwin.server.common import GrpcServer

    file_data = read_config_file(args.config)
    server_overrides = {
        key.removeprefix("server_"): value for key, value in vars(args).items() if key.startswith("server_")
    }
    server_settings = load_settings(ServerSettings, "server", file_data, server_overrides)
    _check_ports(server_settings)
    server = GrpcServer(server_settings)
    chosen = _modules(args.services)
    loaded = []
    for module in chosen:
        overrides = {
            f.name: getattr(args, _dest(module, f.name), None) for f in dataclasses.fields(module.Settings)
        }
        settings = load_settings(module.Settings, module.SECTION, file_data, overrides)
        check_store(settings.model_store, NEEDS[_service_name(module)])
        loaded.append((module, settings))
    for module, settings in loaded:
        module.attach(server, settings)
    return server


def _check_ports(settings: ServerSettings) -> None:
    """Say which port is taken before loading any model (the usual cause: a server already running).
    The listeners still report a port taken in between."""
    ports = (
        ("gRPC", settings.host, settings.port, "--port"),
        ("metrics", settings.metrics_host or settings.host, settings.metrics_port, "--metrics-port"),
        ("health", settings.health_host or settings.host, settings.health_port, "--health-port"),
        ("HTTP", settings.http_host or settings.host, settings.http_port, "--http-port"),
    )
    for what, host, port, flag in ports:
        if port <= 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # SO_REUSEADDR ignores connections lingering in TIME_WAIT, not a listening server.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise InvalidInput(
                    f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc} (is another server "
                    f"running? choose another port with {flag})"
                ) from exc


def _service_name(module: ModuleType) -> str:
    return next(name for name, path in SERVICES.items() if path == module.__name__)


def run(args: argparse.Namespace) -> int:
    server = build_server(args)
    server.install_signal_handlers()
    try:
        server.start()
    except (OSError, InvalidInput) as exc:
        server.stop(0)
        if isinstance(exc, InvalidInput):
            raise
        # The gRPC listeners report their own ports; this is one of the plain sockets (metrics).
        s = server.settings
        raise InvalidInput(
            f"cannot listen: {exc.strerror or exc} (ports: gRPC {s.port}, metrics {s.metrics_port}, "
            f"health {s.health_port}, HTTP {s.http_port}; is another server running?)"
        ) from exc
    print(
        f"neurotwin: serving {', '.join(args.services)} on {server.settings.host}:{server.port}"
        + (f", HTTP on :{server.http_port}" if server.http_port is not None else "")
        + (f", metrics on :{server.metrics_port}" if server.metrics_port is not None else ""),
        flush=True,
    )
    server.wait()
    return 0
