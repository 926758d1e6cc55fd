"""Optimizers over latent codes: gradient ascent (DGN-AM), CMA-ES (pycma) and a genetic algorithm (XDream).

Gradient-free optimizers share one ask/tell interface (:class:`AskTellOptimizer`) that maximizes:
``ask()`` returns the pending generation ``[P, D]`` (the same array until it is told), ``tell(scores)``
takes one score per row. ``state_dict()`` is plain JSON-compatible data and ``load_state_dict`` (or
:func:`restore_optimizer`) resumes exactly: the next ``ask()`` after a restore returns bit for bit what
the original would have returned. That is what the closed loop journals after every generation.

Gradient ascent (:class:`GradientAscent`) needs gradients, so it does not ask: the caller computes
``-score`` through generator and twin, backpropagates to :attr:`GradientAscent.latents`, then calls
:meth:`GradientAscent.step`. One step at a time, so a scheduler can interleave many requests in one
batched forward/backward.

Randomness comes only from a per-optimizer seeded generator (never numpy's or torch's global state), so
a seed reproduces a run and concurrent optimizers do not disturb each other.

Modules: ``state`` (exact serialization), ``ask_tell`` (the interface), ``cmaes``, ``genetic`` and
``gradient``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neurotwin.engines.optimizers.ask_tell import AskTellOptimizer
from neurotwin.engines.optimizers.cmaes import CMAES, CMAESConfig, _SeededNormal, single_threaded_blas
from neurotwin.engines.optimizers.genetic import GeneticAlgorithm, GeneticConfig
from neurotwin.engines.optimizers.gradient import GradientAscent, GradientConfig
from neurotwin.engines.optimizers.state import STATE_VERSION, decode_array, encode_array
from neurotwin.errors import InvalidInput

__all__ = [
    "CMAES",
    "STATE_VERSION",
    "AskTellOptimizer",
    "CMAESConfig",
    "GeneticAlgorithm",
    "GeneticConfig",
    "GradientAscent",
    "GradientConfig",
    "_SeededNormal",
    "decode_array",
    "encode_array",
    "preload",
    "restore_optimizer",
    "single_threaded_blas",
]


def preload() -> None:
    """Import pycma now (it pulls in scipy.stats: seconds); servers call this at startup, not per request."""
    import cma  # noqa: F401


_ASK_TELL: dict[str, type[CMAES] | type[GeneticAlgorithm]] = {"cmaes": CMAES, "genetic": GeneticAlgorithm}


def restore_optimizer(state: Mapping[str, Any]) -> AskTellOptimizer:
    """Rebuild an ask/tell optimizer from its ``state_dict()`` (as journaled)."""
    cls = _ASK_TELL.get(str(state.get("method")))
    if cls is None:
        raise InvalidInput(f"optimizer state: unknown method {state.get('method')!r}")
    return cls.from_state_dict(state)
