"""Twin guidance: a store predictor ranks candidate images, or a ridge readout refit on the session.

With ``refit_readout`` the ranking comes from a ridge map from the twin's predicted rates (all
outputs) to the measured objective, once its leave-one-out correlation beats the twin's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from neurotwin.engines.closed_loop.settings import SessionConfig
from neurotwin.engines.objectives import objective_scores
from neurotwin.imagecodec import resize_batch
from neurotwin.stats import pearson

if TYPE_CHECKING:
    from neurotwin.engines.registry import ModelRegistry

# Ridge penalties tried for the refit readout (features are z-scored, so these are on a fixed scale).
READOUT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 15))
# The readout is only trusted once it has this many measured stimuli to be judged on.
READOUT_MIN_SAMPLES = 20


@dataclass
class Readout:
    """Ridge map from the twin's predicted rates (all outputs) to the measured objective."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float
    loo_r: float
    samples: int

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef + self.intercept


def fit_readout(features: np.ndarray, targets: np.ndarray) -> Readout | None:
    """Ridge with the penalty chosen by exact leave-one-out error (hat-matrix identity, one SVD)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    n = len(y)
    if n < READOUT_MIN_SAMPLES or not np.isfinite(x).all() or not np.isfinite(y).all():
        return None
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    y_mean = float(y.mean())
    yc = y - y_mean
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ yc
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in READOUT_ALPHAS:
        shrink = s**2 / (s**2 + alpha)
        fitted = u @ (shrink * uty)
        # The intercept is fitted too, which adds 1/n to every leverage.
        leverage = (u**2) @ shrink + 1.0 / n
        loo_residual = (yc - fitted) / np.clip(1.0 - leverage, 1e-9, None)
        error = float(np.mean(loo_residual**2))
        if best is None or error < best[0]:
            best = (error, alpha, loo_residual)
    assert best is not None
    _, alpha, loo_residual = best
    coef = vt.T @ ((s / (s**2 + alpha)) * uty)
    return Readout(mean, scale, coef, y_mean, alpha, pearson(y - loo_residual, y), n)


# Candidates scored per ONNX Runtime call: one call for a usual generation (400), bounded memory for
# the largest (MAX_CANDIDATES at 112 px is 750 MB of uint8 input in one piece).
SCORE_BATCH = 1024


class Twin:
    """A validated predictor version from the model registry, run with ONNX Runtime on uint8 images of
    any size. Each ``predict`` checks the version out for the call only, so a version the registry
    retires is released once the call ends, and a later call gets it again on demand.

    With ``outputs`` it runs its own copy of the graph pruned to those output columns (what a
    session's objective reads; ``PredictorSession(outputs=)``), still checked out per call, and
    ``predict`` returns every output, NaN where not computed, so journaled predictions keep one layout.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        name: str,
        version: int | None,
        outputs: tuple[int, ...] | None = None,
    ) -> None:
        from neurotwin.runtimes.onnx_session import PredictorSession

        self.registry = registry
        with registry.acquire_pinned(name, version or None) as loaded:
            self.version = loaded.model
            self.card = loaded.card
        self.outputs = outputs
        self.pruned: PredictorSession | None = None
        if outputs is not None:
            self.pruned = PredictorSession(
                self.version.model_path, self.card, registry.settings.session, outputs=outputs
            )

    @property
    def neurons(self) -> int:
        return self.card.neuron_count

    def predict(self, images: np.ndarray, batch: int = SCORE_BATCH) -> np.ndarray:
        """float32 [N, neurons] for uint8 images [N, H, W, 3] of any size (resized to the twin's input)."""
        images = resize_batch(images, self.card.input.height, self.card.input.width)
        with self.registry.acquire_pinned(self.version.name, self.version.version) as loaded:
            session = self.pruned or loaded.session
            parts = [session.run(images[i : i + batch]) for i in range(0, len(images), batch)]
        rates = np.concatenate(parts, axis=0).astype(np.float32)
        if self.outputs is None:
            return rates
        full = np.full((len(rates), self.neurons), np.nan, dtype=np.float32)
        full[:, list(self.outputs)] = rates
        return full


def guidance_outputs(config: SessionConfig) -> tuple[int, ...] | None:
    """The twin outputs a session's guidance reads, when that is fewer than all of them.

    The refit readout and the contrast objective read every output; the mean objective only the
    twin neurons of the targets.
    """
    if config.refit_readout or config.objective == "contrast":
        return None
    return tuple(sorted(set(config.twin_neurons)))


def twin_objective(config: SessionConfig, predicted: np.ndarray) -> np.ndarray:
    """The session's objective on the twin's outputs (targets mapped to twin neurons)."""
    objective = config.objective
    if objective == "contrast" and predicted.shape[1] <= len(config.twin_neurons):
        # The twin has no neurons besides the mapped targets to contrast them with.
        objective = "mean"
    return objective_scores(predicted, config.twin_neurons, objective)


@dataclass
class Guide:
    """A session's twin guidance: what has been measured so far and the readout fitted to it."""

    config: SessionConfig
    # Twin predictions and measured objective of every told stimulus (for the refit readout).
    features: list[np.ndarray] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    readout: Readout | None = None
    readout_samples: int = -1
    readout_beats_twin: bool = False
    readout_twin_r: float = float("nan")

    def learn(self, predicted: np.ndarray | None, score: float) -> None:
        """One measured stimulus (ignored when the twin did not predict it)."""
        if predicted is not None:
            self.features.append(predicted.astype(np.float64))
            self.targets.append(float(score))

    def scores(self, predicted: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Scores to rank candidates by: the objective on the twin's outputs, or the refit readout."""
        cfg = self.config
        twin_scores = twin_objective(cfg, predicted)
        meta: dict[str, Any] = {"ranking": "twin"}
        if cfg.refit_readout and len(self.targets) >= READOUT_MIN_SAMPLES:
            if self.readout_samples != len(self.targets):
                features = np.stack(self.features)
                targets = np.asarray(self.targets)
                self.readout = fit_readout(features, targets)
                self.readout_samples = len(self.targets)
                twin_r = pearson(twin_objective(cfg, features), targets)
                self.readout_beats_twin = self.readout is not None and self.readout.loo_r > twin_r
                self.readout_twin_r = twin_r
            if self.readout is not None:
                meta.update(
                    readout_loo_r=self.readout.loo_r,
                    twin_r=self.readout_twin_r,
                    readout_alpha=self.readout.alpha,
                    readout_samples=self.readout.samples,
                )
                if self.readout_beats_twin:
                    meta["ranking"] = "readout"
                    return self.readout.predict(predicted), meta
        return twin_scores, meta
