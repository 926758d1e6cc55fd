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
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import io
import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from neurotwin.errors import InvalidInput

__all__ = [
    "CMAES",
    "AskTellOptimizer",
    "CMAESConfig",
    "GeneticAlgorithm",
    "GeneticConfig",
    "GradientAscent",
    "GradientConfig",
    "decode_array",
    "encode_array",
    "preload",
    "restore_optimizer",
]

STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Exact array and RNG serialization
# ---------------------------------------------------------------------------------------------------


def encode_array(array: np.ndarray | None) -> dict[str, Any] | None:
    """An array as JSON-compatible data that decodes to the identical bits (little-endian bytes)."""
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return {
        "dtype": dtype.str,
        "shape": list(array.shape),
        "data": base64.b64encode(array.astype(dtype, copy=False).tobytes()).decode("ascii"),
    }


def decode_array(data: Mapping[str, Any] | None) -> np.ndarray | None:
    if data is None:
        return None
    raw = base64.b64decode(data["data"])
    return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    # PCG64's state is a dict of Python ints (128-bit values included); JSON carries them exactly.
    return dict(rng.bit_generator.state)


def _rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    name = state["bit_generator"]
    if name != "PCG64":
        raise InvalidInput(f"optimizer state: unsupported bit generator {name!r}")
    bit_generator = np.random.PCG64()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


def _check_scores(scores: np.ndarray | Any, expected: int) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.shape[0] != expected:
        raise InvalidInput(f"tell: expected {expected} scores, got {values.shape[0]}")
    if not np.all(np.isfinite(values)):
        raise InvalidInput("tell: scores must be finite (NaN or Inf given)")
    return values


def _config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Ask/tell interface
# ---------------------------------------------------------------------------------------------------


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
        values = _check_scores(scores, self._pending.shape[0])
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


# ---------------------------------------------------------------------------------------------------
# CMA-ES
# ---------------------------------------------------------------------------------------------------


class _SeededNormal:
    """pycma's ``randn`` option: normal draws from our own generator, not numpy's global one.

    pycma pickles it with the strategy, so a restored strategy continues the same random stream.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


# Modules a pickled pycma strategy may reference; anything else in a journal is refused.
_PICKLE_MODULES = ("cma", "numpy", "collections", "copyreg", "neurotwin.engines.optimizers", "_codecs")
_PICKLE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "float",
        "int",
        "complex",
        "bool",
        "str",
        "bytes",
        "bytearray",
        "slice",
        "range",
        "object",
        "NoneType",
        "type",
    }
)


class _JournalUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _PICKLE_BUILTINS:
            return super().find_class(module, name)
        if any(module == m or module.startswith(m + ".") for m in _PICKLE_MODULES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"optimizer state refers to {module}.{name}, which is not allowed")


@dataclass
class CMAESConfig:
    population: int = 40
    sigma0: float = 1.0
    # Separable (diagonal) covariance: O(D) per generation instead of O(D^2) memory and O(D^3) updates.
    # None chooses it for dimensions above ``diagonal_above``.
    diagonal: bool | None = None
    diagonal_above: int = 512
    bounds: tuple[float | None, float | None] | None = None


@functools.cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run pycma's small matrix algebra on one BLAS thread. With the default pool, OpenBLAS's idle
    workers busy-wait after every call: measured 40 ms of extra CPU per closed-loop generation (128-d),
    taken from the request threads on a small machine, for no speed-up at these sizes."""
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


class CMAES(AskTellOptimizer):
    """CMA-ES (pycma) in latent space, maximizing. Wang & Ponce (2022): ahead of the GA on neurons."""

    method = "cmaes"

    def __init__(self, x0: np.ndarray, config: CMAESConfig | None = None, seed: int = 0) -> None:
        import cma

        config = config or CMAESConfig()
        x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
        super().__init__(x0.shape[0], config.population)
        if config.population < 2:
            raise InvalidInput(f"CMA-ES population must be at least 2, got {config.population}")
        if not config.sigma0 > 0:
            raise InvalidInput(f"CMA-ES sigma0 must be positive, got {config.sigma0}")
        self.config = config
        self.seed = int(seed)
        diagonal = config.diagonal if config.diagonal is not None else self.dim > config.diagonal_above
        options: dict[str, Any] = {
            "popsize": config.population,
            "randn": _SeededNormal(seed),
            "seed": float("nan"),  # seeding happens in randn; keep pycma away from numpy's global RNG
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "CMA_diagonal": bool(diagonal),
            # The caller decides when to stop (budget); never let a termination criterion trigger a restart.
            "tolfun": 0,
            "tolx": 0,
            "tolfunhist": 0,
            "tolflatfitness": 10**9,
            "tolstagnation": 10**9,
            "maxiter": float("inf"),
        }
        if config.bounds is not None:
            options["bounds"] = list(config.bounds)
        self.es = cma.CMAEvolutionStrategy(x0, float(config.sigma0), options)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def _propose(self) -> np.ndarray:
        with single_threaded_blas():
            return np.asarray(self.es.ask(), dtype=np.float64)

    def _update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        # pycma minimizes and wants the very arrays it handed out.
        with single_threaded_blas():
            self.es.tell(list(latents), list(-scores))

    def propose(self, n: int) -> np.ndarray:
        # pycma can sample any number of points from its current distribution and learns from any
        # popsize-sized subset of them.
        if n == self.population:
            return self.ask()
        self._pending = None
        return np.asarray(self.es.ask(number=n), dtype=np.float64)

    def update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        self._pending = np.asarray(latents, dtype=np.float64)
        self.tell(scores)
        # pycma remembers every point it handed out (up to 1,000) until it is told about it; the
        # candidates passed over never will be, and would bloat every journaled state.
        archive = getattr(self.es, "sent_solutions", None)
        if archive is not None:
            archive.truncate_to(0)

    def state_dict(self) -> dict[str, Any]:
        state = self._common_state()
        state["seed"] = self.seed
        state["config"] = asdict(self.config)
        state["es"] = base64.b64encode(pickle.dumps(self._snapshot(), protocol=4)).decode("ascii")
        return state

    def _snapshot(self) -> Any:
        """A shallow copy of the strategy without what the next ask/tell never reads.

        pycma keeps the last samples (``ary``, ``pop_sorted``) and tell() arguments for inspection
        only (ask() rebuilds them, tell() never reads them), and a logger that points back at the
        strategy; dropping them shrinks the journaled state several times.
        """
        snapshot = copy.copy(self.es)
        snapshot.logger = None
        snapshot._tell2_args = None
        snapshot.pop_sorted = None
        snapshot.ary = []
        return snapshot

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_common(state)
        self.seed = int(state["seed"])
        self.config = _config_from_dict(CMAESConfig, state["config"])
        try:
            self.es = _JournalUnpickler(io.BytesIO(base64.b64decode(state["es"]))).load()
        except Exception as exc:
            raise InvalidInput(f"CMA-ES state cannot be restored: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CMAES:
        self = cls.__new__(cls)
        self.load_state_dict(state)
        return self


# ---------------------------------------------------------------------------------------------------
# Genetic algorithm
# ---------------------------------------------------------------------------------------------------


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
        state["rng"] = _rng_state(self.rng)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_common(state)
        self.seed = int(state["seed"])
        self.config = _config_from_dict(GeneticConfig, state["config"])
        codes = decode_array(state["codes"])
        assert codes is not None
        self.codes = codes
        self.rng = _rng_from_state(state["rng"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GeneticAlgorithm:
        self = cls.__new__(cls)
        self.load_state_dict(state)
        return self


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


# ---------------------------------------------------------------------------------------------------
# Gradient ascent
# ---------------------------------------------------------------------------------------------------


@dataclass
class GradientConfig:
    """DGN-AM-style ascent. The step size decays linearly from ``lr`` to ``lr_end`` over ``steps``;
    after each step the codes are multiplied by ``decay`` (DGN-AM: 0.99) and projected back into
    ``clip_norm`` (max L2 norm per code, in units of sqrt(D) x latent std) and ``bounds`` (per unit)."""

    steps: int = 200
    optimizer: str = "adam"
    lr: float = 0.1
    lr_end: float | None = None  # None: lr / 20
    momentum: float = 0.0  # SGD only
    decay: float = 1.0
    clip_norm: float | None = None
    latent_std: float = 1.0
    bounds: tuple[float | None, float | None] | None = None
    transforms: bool = True

    def validate(self) -> None:
        if self.steps < 1:
            raise InvalidInput(f"gradient steps must be >= 1, got {self.steps}")
        if self.optimizer not in ("adam", "sgd"):
            raise InvalidInput(f"gradient optimizer {self.optimizer!r}: expected 'adam' or 'sgd'")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise InvalidInput(f"gradient lr must be positive, got {self.lr}")
        if self.lr_end is not None and (self.lr_end < 0 or not math.isfinite(self.lr_end)):
            raise InvalidInput(f"gradient lr_end must be >= 0, got {self.lr_end}")
        if not 0 < self.decay <= 1:
            raise InvalidInput(f"gradient decay must be in (0, 1], got {self.decay}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise InvalidInput(f"gradient clip_norm must be positive, got {self.clip_norm}")


class GradientAscent:
    """Ascent on a batch of codes ``[n, D]``; each row is an independent image.

    Usage per step: compute ``score [n]`` from :attr:`latents`; set the gradient of ``-score.sum()``
    (``backward()``, or :meth:`set_grad` with a gradient computed elsewhere); ``step()``.

    Adam and SGD are written out here rather than taken from ``torch.optim``: the update is a few
    element-wise ops, its state is three tensors that serialize exactly, and the first
    ``torch.optim`` step imports the compiler stack (seconds of latency on a cold server).
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, latents: Tensor, config: GradientConfig | None = None) -> None:
        config = config or GradientConfig()
        config.validate()
        self.config = config
        self.latents = latents.detach().clone().float().requires_grad_(True)
        self.step_index = 0
        # Adam: first and second moments; SGD: the momentum buffer in ``_m``.
        self._m = torch.zeros_like(self.latents)
        self._v = torch.zeros_like(self.latents) if config.optimizer == "adam" else None
        self._project(decay=False)

    @property
    def done(self) -> bool:
        return self.step_index >= self.config.steps

    def lr_at(self, step: int) -> float:
        cfg = self.config
        end = cfg.lr / 20 if cfg.lr_end is None else cfg.lr_end
        if cfg.steps <= 1:
            return cfg.lr
        return cfg.lr + (end - cfg.lr) * min(step, cfg.steps - 1) / (cfg.steps - 1)

    def zero_grad(self) -> None:
        self.latents.grad = None

    def set_grad(self, grad: Tensor) -> None:
        """The gradient of the loss (minus the score) with respect to :attr:`latents`."""
        self.latents.grad = grad.detach().to(self.latents.dtype)

    @torch.no_grad()
    def step(self) -> None:
        grad = self.latents.grad
        if grad is None:
            raise RuntimeError("GradientAscent.step: no gradient (backpropagate -score first)")
        lr = self.lr_at(self.step_index)
        self.step_index += 1
        if self._v is not None:
            b1, b2 = self.BETAS
            self._m.mul_(b1).add_(grad, alpha=1 - b1)
            self._v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            m_hat = self._m / (1 - b1**self.step_index)
            v_hat = self._v / (1 - b2**self.step_index)
            self.latents.sub_(lr * m_hat / (v_hat.sqrt() + self.EPS))
        else:
            if self.config.momentum:
                self._m.mul_(self.config.momentum).add_(grad)
                grad = self._m
            self.latents.sub_(lr * grad)
        self.latents.grad = None
        self._project(decay=True)

    @torch.no_grad()
    def _project(self, decay: bool) -> None:
        cfg = self.config
        z = self.latents
        if decay and cfg.decay != 1.0:
            z.mul_(cfg.decay)
        if cfg.clip_norm is not None:
            limit = cfg.clip_norm * cfg.latent_std * math.sqrt(z.shape[1])
            norms = z.norm(dim=1, keepdim=True)
            z.mul_(torch.clamp(limit / norms.clamp_min(1e-12), max=1.0))
        if cfg.bounds is not None:
            low, high = cfg.bounds
            z.clamp_(min=low, max=high)

    def state_dict(self) -> dict[str, Any]:
        """Codes, step and optimizer moments, exact (raw bytes), as JSON-compatible data."""

        def enc(t: Tensor | None) -> dict[str, Any] | None:
            return None if t is None else encode_array(t.detach().cpu().numpy())

        return {
            "method": "gradient",
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "step": self.step_index,
            "latents": enc(self.latents),
            "m": enc(self._m),
            "v": enc(self._v),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != "gradient":
            raise InvalidInput(f"optimizer state is for {state.get('method')!r}, not 'gradient'")
        self.config = _config_from_dict(GradientConfig, state["config"])
        device = self.latents.device

        def dec(data: Mapping[str, Any] | None) -> Tensor | None:
            array = decode_array(data)
            return None if array is None else torch.from_numpy(array).to(device)

        latents, m, v = dec(state["latents"]), dec(state["m"]), dec(state["v"])
        assert latents is not None and m is not None
        self.latents = latents.float().requires_grad_(True)
        self._m, self._v = m, v
        self.step_index = int(state["step"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str = "cpu") -> GradientAscent:
        latents = decode_array(state["latents"])
        assert latents is not None
        self = cls(torch.from_numpy(latents).to(device), _config_from_dict(GradientConfig, state["config"]))
        self.load_state_dict(state)
        return self
