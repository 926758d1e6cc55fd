"""Configuration for the servers: defaults < config file (YAML/JSON) < environment < command-line flags.

Each service keeps its own settings dataclass; ``load_settings`` fills any such dataclass from a
section of the config file, from ``NEUROTWIN_<SECTION>_<FIELD>`` environment variables and from
explicit overrides, converting types from the field annotations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from neurotwin.errors import InvalidInput

T = TypeVar("T")


@dataclass
class ServerSettings:
    """Settings every neurotwin server shares (gRPC, and HTTP when http_port is set)."""

    host: str = "127.0.0.1"
    port: int = 8001
    # Prometheus metrics over HTTP; 0 picks a free port, -1 turns it off. Loopback unless set (the
    # page tells who runs what): deployments that scrape it from outside set 0.0.0.0.
    metrics_port: int = 8002
    metrics_host: str = "127.0.0.1"
    # Plaintext grpc.health.v1 (and nothing else) on its own port, for probes that cannot speak
    # TLS, such as the kubelet's native gRPC probes; -1 turns it off, 0 picks a free port.
    # Loopback unless set, like metrics; Kubernetes deployments set 0.0.0.0 for the kubelet.
    health_port: int = -1
    health_host: str = "127.0.0.1"
    # HTTP/REST (the Open Inference Protocol under /v2) beside gRPC, with the same TLS, tokens and
    # drain; -1 turns it off, 0 picks a free port. Triton's convention is 8000.
    http_port: int = -1
    http_host: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # With a client CA, clients must present a certificate it signed (mutual TLS).
    tls_client_ca: str = ""
    # Bearer tokens: a file with one token per line, and/or tokens given directly (comma-separated).
    auth_token_file: str = ""
    auth_tokens: list[str] = field(default_factory=list)
    max_message_bytes: int = 64 * 1024 * 1024
    # Calls at once, by kind, each with its own budget so that no kind can starve another (a call
    # over its budget is refused with RESOURCE_EXHAUSTED): unary calls, streams in all, streams of
    # one method (stream_caps overrides it per method: "PredictStream=8"), and health checks.
    max_workers: int = 64
    max_streams: int = 32
    max_streams_per_method: int = 16
    stream_caps: list[str] = field(default_factory=list)
    max_health_checks: int = 8
    # A stream waiting on its client (no request arriving, a response not read) this long is closed
    # with DEADLINE_EXCEEDED; 0 keeps idle streams open.
    stream_idle_seconds: float = 120.0
    # How often the health port checks that the main port answers (NOT_SERVING while it does not).
    health_probe_seconds: float = 2.0
    # HTTP requests handled at once; more are answered 503 at once.
    max_http_requests: int = 128
    # In-flight calls get this long to finish after SIGTERM; new calls are refused meanwhile.
    grace_seconds: float = 15.0

    def tokens(self) -> frozenset[str]:
        """The accepted bearer tokens; empty means auth is off, which only happens when no token
        source is configured at all. A configured source that yields no token fails closed."""
        given = {t.strip() for t in self.auth_tokens if t.strip()}
        if self.auth_tokens and not given:
            raise InvalidInput("auth_tokens holds only blank entries; refusing to start with auth off")
        tokens = set(given)
        if self.auth_token_file:
            try:
                lines = Path(self.auth_token_file).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput(f"auth_token_file {self.auth_token_file}: {exc}") from exc
            from_file = {line.strip() for line in lines}
            from_file = {line for line in from_file if line and not line.startswith("#")}
            if not from_file:
                raise InvalidInput(
                    f"auth_token_file {self.auth_token_file} holds no tokens (only comments or blank "
                    "lines); refusing to start with auth off"
                )
            tokens |= from_file
        return frozenset(tokens)


def read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if not path:
        return {}
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"config file {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:
        raise InvalidInput(f"config file {path}: not valid YAML/JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"config file {path}: expected a mapping of sections")
    return data


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(value, non_none[0], where)
    if origin in (list, tuple):
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        converted = [_convert(v.strip() if isinstance(v, str) else v, inner, where) for v in items]
        return tuple(converted) if origin is tuple else converted
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            return annotation(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: cannot read {value!r} as {annotation.__name__}") from exc
    return value


def load_settings(
    cls: type[T],
    section: str,
    file_data: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from defaults, ``file_data[section]``, env vars and non-None ``overrides``."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    from_file = (file_data or {}).get(section) or {}
    if not isinstance(from_file, dict):
        raise InvalidInput(f"config section {section!r}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(from_file) - names
    if unknown:
        raise InvalidInput(f"config section {section!r}: unknown settings {sorted(unknown)}")
    for name in names:
        env_key = f"NEUROTWIN_{section}_{name}".upper().replace("-", "_")
        raw: Any = None
        where = ""
        if overrides and overrides.get(name) is not None:
            raw, where = overrides[name], f"--{name.replace('_', '-')}"
        elif env_key in environ:
            raw, where = environ[env_key], env_key
        elif name in from_file:
            raw, where = from_file[name], f"config {section}.{name}"
        else:
            continue
        values[name] = _convert(raw, hints[name], where)
    return cls(**values)
