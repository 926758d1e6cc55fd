"""The genetic algorithm of XDream (Ponce et al. 2019) over latent codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from neurotwin.engines.optimizers.ask_tell import AskTellOptimizer
from neurotwin.engines.optimizers.state import (
    config_from_dict,
    decode_array,
    encode_array,
    rng_from_state,
    rng_state,
)
from neurotwin.errors import InvalidInput


@dataclass
class GeneticConfig:
    """XDream defaults (Ponce et al. 2019): 20 codes, mutation rate/size 0.5, selectivity 2, heritability
    0.5, one elite. ``mutation_size`` is in units of ``latent_std``."""

    population: int = 20
    mutation_rate: float = 0.5
    mutation_size: float = 0.5
    selectivity: float = 2.0
    heritability: float = 0.5
    n_elite: int = 1
    latent_std: float = 1.0
    bounds: tuple[float | None, float | None] | None = None

    def validate(self) -> None:
        if self.population < 2:
            raise InvalidInput(f"genetic population must be at least 2, got {self.population}")
        if not 0 <= self.n_elite < self.population:
            raise InvalidInput(f"genetic n_elite must be in [0, population), got {self.n_elite}")
        for name in ("mutation_rate", "heritability"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidInput(f"genetic {name} must be in [0, 1], got {getattr(self, name)}")
        if self.mutation_size < 0 or self.selectivity < 0 or self.latent_std <= 0:
            raise InvalidInput("genetic mutation_size and selectivity must be >= 0, latent_std > 0")


class GeneticAlgorithm(AskTellOptimizer):
    """Selection by softmax of z-scored fitness (sharpened by ``selectivity``), uniform crossover biased
    towards the fitter parent (``heritability``), Gaussian mutation of a fraction of genes, elites kept."""

    method = "genetic"

    def __init__(self, initial: np.ndarray, config: GeneticConfig | None = None, seed: int = 0) -> None:
        config = config or GeneticConfig(population=int(np.asarray(initial).shape[0]))
        initial = np.asarray(initial, dtype=np.float64)
        if initial.ndim != 2 or initial.shape[0] != config.population:
            raise InvalidInput(
                f"genetic: initial codes must be [{config.population}, D], got {list(initial.shape)}"
            )
        config.validate()
        super().__init__(initial.shape[1], config.population)
        self.config = config
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.codes = self._bound(initial.copy())

    def _bound(self, codes: np.ndarray) -> np.ndarray:
        if self.config.bounds is not None:
            low, high = self.config.bounds
            codes = np.clip(codes, low, high)
        return codes

    def _propose(self) -> np.ndarray:
        return self.codes.copy()

    def _update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        cfg = self.config
        n, dim = latents.shape
        order = np.argsort(-scores, kind="stable")
        spread = scores.std()
        z = (scores - scores.mean()) / spread if spread > 0 else np.zeros_like(scores)
        logits = cfg.selectivity * z
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        children = n - cfg.n_elite
        # All draws in a fixed order and shape, so the generation is a pure function of (state, scores).
        parents = self.rng.choice(n, size=(children, 2), p=weights)
        inherit = self.rng.random((children, dim)) < cfg.heritability
        mutate = self.rng.random((children, dim)) < cfg.mutation_rate
        noise = self.rng.standard_normal((children, dim)) * (cfg.mutation_size * cfg.latent_std)
        first, second = parents[:, 0], parents[:, 1]
        fitter_first = scores[first] >= scores[second]
        fit = np.where(fitter_first, first, second)
        other = np.where(fitter_first, second, first)
        kids = np.where(inherit, latents[fit], latents[other]) + mutate * noise
        elites = latents[order[: cfg.n_elite]]
        self.codes = self._bound(np.concatenate([elites, kids], axis=0))

    def state_dict(self) -> dict[str, Any]:
        state = self._common_state()
        state["seed"] = self.seed
        state["config"] = asdict(self.config)
        state["codes"] = encode_array(self.codes)
        state["rng"] = rng_state(self.rng)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_common(state)
        self.seed = int(state["seed"])
        self.config = config_from_dict(GeneticConfig, state["config"])
        codes = decode_array(state["codes"])
        assert codes is not None
        self.codes = codes
        self.rng = rng_from_state(state["rng"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GeneticAlgorithm:
        self = cls.__new__(cls)
        self.load_state_dict(state)
        return self
