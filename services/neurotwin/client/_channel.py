"""Channel set-up shared by every neurotwin client: plaintext, TLS or mutual TLS, bearer tokens,
message size limits, and translation of gRPC errors into ``neurotwin.errors`` exceptions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from neurotwin.errors import RECEIVED_ERRORS, InvalidInput, NeurotwinError, RemoteError
from neurotwin.server.statuses import kind_of_status

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def translate_error(error: grpc.RpcError | grpc.aio.AioRpcError) -> NeurotwinError:
    """The neurotwin exception for a failed call; its ``code`` is the gRPC status the server sent."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    message = f"{code.name}: {details}"
    kind = kind_of_status(code)
    cls = RECEIVED_ERRORS.get(kind)
    translated = cls(message) if cls is not None else RemoteError(message, kind)
    translated.code = code
    return translated


def _read(value: str | bytes | os.PathLike[str] | None, what: str) -> bytes | None:
    """PEM given as bytes, or read from a path."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {value}: {exc}") from exc


@dataclass(frozen=True)
class ChannelConfig:
    """Where and how to connect. TLS is on when any TLS field is set (or ``tls`` is True).

    ``tls_ca``: CA certificate(s) to trust (PEM path or bytes; None: the system roots).
    ``tls_cert`` / ``tls_key``: client certificate and key for mutual TLS.
    ``tls_server_name``: expected name in the server certificate when it differs from the host.
    ``token``: bearer token sent as ``authorization: Bearer <token>`` on every call.
    """

    address: str = DEFAULT_ADDRESS
    tls: bool = False
    tls_ca: str | bytes | None = None
    tls_cert: str | bytes | None = None
    tls_key: str | bytes | None = None
    tls_server_name: str | None = None
    token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def _credentials(self) -> grpc.ChannelCredentials:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInput("mutual TLS needs both a client certificate and its key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "TLS CA"),
            private_key=_read(self.tls_key, "TLS key"),
            certificate_chain=_read(self.tls_cert, "TLS certificate"),
        )

    def open(self) -> grpc.Channel:
        """A synchronous channel (the token travels as per-call metadata, see ``metadata()``)."""
        if self.uses_tls:
            return grpc.secure_channel(self.address, self._credentials(), options=self._options())
        return grpc.insecure_channel(self.address, options=self._options())

    def open_aio(self) -> grpc.aio.Channel:
        """An asyncio channel; create it inside the event loop that will use it."""
        if self.uses_tls:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=self._options())
        return grpc.aio.insecure_channel(self.address, options=self._options())
