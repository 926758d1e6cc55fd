"""Swappable twin parts: cores and readouts behind small protocols, found by name in a registry.

A twin is frozen features -> a trainable core shared by neurons -> one readout per set of neurons
(neuralpredictors' split). Each kind of core or readout is one file in ``training/cores/`` or
``training/readouts/`` that calls :func:`register_core` or :func:`register_readout` when imported;
the packages are scanned the first time a name is looked up, so adding a kind needs no other edit.
``TwinConfig.core`` and ``TwinConfig.readout`` name the kinds.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    from neurotwin.training.twin import TwinConfig


class Core(Protocol):
    """A trainable module shared by all neurons: features [N, C, H, W] -> [N, out_channels, h, w]."""

    out_channels: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Readout(Protocol):
    """Per-neuron weights on the core's output: [N, C, h, w] -> [N, K] (before the positive nonlinearity).

    ``bias`` [K] starts at each neuron's mean rate; ``regularizer()`` is the penalty fitting adds.
    """

    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def regularizer(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class CoreKind:
    """How to build one kind of core and the frozen features it reads.

    ``features(config, pretrained)``: the frozen part (a module with ``channels`` and ``grid``);
    ``channels(config)``: its channel count without building it; ``core(config)``: a fresh trainable
    core; ``check(config)``: refuses settings this kind cannot use (InvalidInput).
    """

    name: str
    features: Callable[[TwinConfig, bool], nn.Module]
    channels: Callable[[TwinConfig], int]
    core: Callable[[TwinConfig], nn.Module]
    check: Callable[[TwinConfig], None] = lambda config: None


@dataclass(frozen=True)
class ReadoutKind:
    """``build(channels, grid, neurons, mean_rates)``: a fresh readout for ``neurons`` neurons reading a
    core output of ``channels`` x ``grid`` x ``grid``; ``mean_rates`` [K] (or None) sets the bias."""

    name: str
    build: Callable[[int, int, int, torch.Tensor | None], nn.Module]


_CORES: dict[str, CoreKind] = {}
_READOUTS: dict[str, ReadoutKind] = {}
_discovered = False
_discovery_lock = threading.Lock()


def register_core(kind: CoreKind) -> CoreKind:
    if kind.name in _CORES and _CORES[kind.name] != kind:
        raise ValueError(f"core {kind.name!r} is registered twice")
    _CORES[kind.name] = kind
    return kind


def register_readout(kind: ReadoutKind) -> ReadoutKind:
    if kind.name in _READOUTS and _READOUTS[kind.name] != kind:
        raise ValueError(f"readout {kind.name!r} is registered twice")
    _READOUTS[kind.name] = kind
    return kind


def _discover() -> None:
    """Import every module of ``training.cores`` and ``training.readouts`` (each registers its kind)."""
    global _discovered
    with _discovery_lock:
        if _discovered:
            return
        for package_name in ("neurotwin.training.cores", "neurotwin.training.readouts"):
            package = importlib.import_module(package_name)
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{module.name}")
        _discovered = True


def core_names() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_CORES))


def readout_names() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_READOUTS))


def core_kind(name: str) -> CoreKind:
    _discover()
    kind = _CORES.get(name)
    if kind is None:
        raise InvalidInput(f"core {name!r}: expected one of {', '.join(sorted(_CORES))}")
    return kind


def readout_kind(name: str) -> ReadoutKind:
    _discover()
    kind = _READOUTS.get(name)
    if kind is None:
        raise InvalidInput(f"readout {name!r}: expected one of {', '.join(sorted(_READOUTS))}")
    return kind
