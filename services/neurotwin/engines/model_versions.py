"""What the registry knows about each version: its state, why, since when; and when to retry one."""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurotwin.errors import NeurotwinError
from neurotwin.integrity import INTEGRITY_FILE, REFERENCE_FILE
from neurotwin.store import CARD_FILE, MODEL_FILES


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionInfo:
    version: int
    state: VersionState
    message: str = ""
    since: float = field(default_factory=time.time)


def fingerprint(path: Path, kind: str) -> tuple[Any, ...]:
    """Changes when any file of the version is rewritten, so a fixed refused version is retried."""
    parts: list[Any] = []
    for name in (MODEL_FILES[kind], CARD_FILE, INTEGRITY_FILE, REFERENCE_FILE):
        try:
            stat = os.stat(path / name)
            parts.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            parts.append(None)
    return tuple(parts)


def refusal_message(exc: BaseException) -> str:
    """Why a version was refused, as its status says: our own errors' message, else the exception."""
    return str(exc) if isinstance(exc, NeurotwinError) else f"{type(exc).__name__}: {exc}"
