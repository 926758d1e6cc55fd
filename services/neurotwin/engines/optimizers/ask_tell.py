"""The ask/tell interface every gradient-free optimizer implements (maximizing)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from neurotwin.engines.optimizers.state import STATE_VERSION, check_scores, decode_array, encode_array
from neurotwin.errors import InvalidInput


class AskTellOptimizer(ABC):
    """Maximizes a black-box score over latent codes, one generation at a time."""

    method: ClassVar[str]

    def __init__(self, dim: int, population: int) -> None:
        self.dim = int(dim)
        self.population = int(population)
        self.generation = 0
        self.evaluations = 0
        self.best_latent: np.ndarray | None = None
        self.best_score = -math.inf
        self._pending: np.ndarray | None = None

    @abstractmethod
    def _propose(self) -> np.ndarray:
        """Draw the next generation [P, D] (called once per generation)."""

    @abstractmethod
    def _update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        """Learn from a told generation."""

    def ask(self) -> np.ndarray:
        """The pending generation [P, D] (float64). Asking again before telling returns the same codes."""
        if self._pending is None:
            self._pending = np.asarray(self._propose(), dtype=np.float64)
        return self._pending.copy()

    def tell(self, scores: np.ndarray | Any) -> None:
        """Scores (higher is better) for the rows of the pending generation, in order."""
        if self._pending is None:
            raise InvalidInput("tell: no pending generation (call ask first)")
        values = check_scores(scores, self._pending.shape[0])
        latents = self._pending
        best = int(np.argmax(values))
        if values[best] > self.best_score:
            self.best_score = float(values[best])
            self.best_latent = latents[best].copy()
        self._update(latents, values)
        self._pending = None
        self.generation += 1
        self.evaluations += latents.shape[0]

    # -- screening: sample more candidates than are measured --------------------------------------------

    def propose(self, n: int) -> np.ndarray:
        """``n`` candidates [n, D] of which the caller measures a ``population``-sized subset.

        Only optimizers that can learn from any such subset sample more than their population; the
        others' next generation is fully determined, so there is nothing to choose from.
        """
        if n != self.population:
            raise InvalidInput("twin pre-screening (candidates_per_presentation > 1) needs cma-es")
        return self.ask()

    def update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        """Scores of the ``latents`` chosen among the last :meth:`propose` (rows in order)."""
        if not np.array_equal(latents, self.ask()):
            raise InvalidInput(f"{self.method} update: latents are not the pending generation")
        self.tell(scores)

    # -- state ----------------------------------------------------------------------------------------

    def _common_state(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "version": STATE_VERSION,
            "dim": self.dim,
            "population": self.population,
            "generation": self.generation,
            "evaluations": self.evaluations,
            "best_latent": encode_array(self.best_latent),
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "pending": encode_array(self._pending),
        }

    def _load_common(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.method:
            raise InvalidInput(f"optimizer state is for {state.get('method')!r}, not {self.method!r}")
        if state.get("version") != STATE_VERSION:
            raise InvalidInput(f"optimizer state version {state.get('version')} is not {STATE_VERSION}")
        self.dim = int(state["dim"])
        self.population = int(state["population"])
        self.generation = int(state["generation"])
        self.evaluations = int(state["evaluations"])
        self.best_latent = decode_array(state["best_latent"])
        self.best_score = -math.inf if state["best_score"] is None else float(state["best_score"])
        self._pending = decode_array(state["pending"])

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as JSON-compatible data."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
