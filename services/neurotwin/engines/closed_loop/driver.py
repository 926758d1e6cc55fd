"""The optimizer driver: the one place that knows ``neurotwin.engines.optimizers``' interface."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import numpy as np

from neurotwin.engines.closed_loop.settings import SessionConfig
from neurotwin.errors import InvalidInput, OptimizerFault


def encode_state(state: dict[str, Any]) -> bytes:
    """An optimizer's ``state_dict()`` (JSON-compatible by contract) as journal bytes.

    Not compressed: the state is mostly base64 of float arrays, where zlib saves a quarter of the
    bytes but costs more time than the rest of a Tell.
    """
    return json.dumps(state, sort_keys=True).encode()


def decode_state(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def options_into(cls: type, options: dict[str, float], fixed: set[str]) -> dict[str, Any]:
    """Map the request's name -> number options onto a config dataclass's typed fields."""
    hints = typing.get_type_hints(cls)
    allowed = {
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in fixed and hints[f.name] in (int, float, bool, bool | None, float | None)
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidInput(f"unknown optimizer option(s) {unknown}; this optimizer takes {sorted(allowed)}")
    values: dict[str, Any] = {}
    for name, value in options.items():
        kind = hints[name]
        if kind in (bool, bool | None):
            values[name] = bool(value)
        elif kind is int:
            if value != int(value):
                raise InvalidInput(f"optimizer option {name}: expected an integer, got {value}")
            values[name] = int(value)
        else:
            values[name] = float(value)
    return values


class OptimizerDriver:
    """Builds and restores a session's optimizer from ``neurotwin.engines.optimizers``.

    ``propose(n)`` samples ``n`` latents (more than the population when the twin pre-screens);
    ``update(latents, scores)`` tells it the measured objective of the presented ones.
    """

    def __init__(
        self, config: SessionConfig, prior: dict[str, Any], initial: np.ndarray | None = None
    ) -> None:
        from neurotwin.engines.optimizers import CMAES, CMAESConfig, GeneticAlgorithm, GeneticConfig

        self.config = config
        options = dict(config.optimizer_options)
        std = float(prior.get("std", 1.0))
        self.optimizer: CMAES | GeneticAlgorithm
        if config.optimizer == "cma-es":
            values = options_into(CMAESConfig, options, {"population"})
            values.setdefault("sigma0", std)
            x0 = np.full(config.latent_dim, float(prior.get("mean", 0.0)))
            self.optimizer = CMAES(
                x0, CMAESConfig(population=config.population_size, **values), seed=config.seed
            )
        else:
            values = options_into(GeneticConfig, options, {"population"})
            values.setdefault("latent_std", std)
            if initial is None:
                initial = np.zeros((config.population_size, config.latent_dim))
            self.optimizer = GeneticAlgorithm(
                initial, GeneticConfig(population=config.population_size, **values), seed=config.seed
            )

    def propose(self, n: int) -> np.ndarray:
        latents = self.optimizer.propose(n)
        if latents.shape != (n, self.config.latent_dim):
            raise OptimizerFault(
                f"optimizer returned latents of shape {latents.shape}, expected {(n, self.config.latent_dim)}"
            )
        return latents

    def update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        self.optimizer.update(np.asarray(latents, dtype=np.float64), np.asarray(scores, dtype=np.float64))

    def state(self) -> bytes:
        return encode_state(self.optimizer.state_dict())

    def load(self, data: bytes) -> None:
        self.optimizer.load_state_dict(decode_state(data))

    def trajectory(self) -> dict[str, float]:
        """Scalars describing the optimizer now, for the exported trajectory."""
        sigma = getattr(self.optimizer, "sigma", None)
        return {"sigma": float(sigma)} if isinstance(sigma, int | float) else {}


def latent_prior(generator: Any) -> dict[str, Any]:
    """The generator's latent prior (its card's, when it has one), which centres and scales the search."""
    card = getattr(generator, "card", None)
    if card is not None and card.latent_prior:
        return dict(card.latent_prior)
    return dict(generator.latent_prior())
