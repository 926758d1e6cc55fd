"""CMA-ES through pycma, with its state journaled exactly (a restricted unpickler reads it back)."""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import io
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from neurotwin.engines.optimizers.ask_tell import AskTellOptimizer
from neurotwin.engines.optimizers.state import config_from_dict
from neurotwin.errors import InvalidInput


class _SeededNormal:
    """pycma's ``randn`` option: normal draws from our own generator, not numpy's global one.

    pycma pickles it with the strategy, so a restored strategy continues the same random stream.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


# Pickled by the name it had before optimizers became a package, so journals written then (and now)
# restore by the same path; the package re-exports it under that name.
_SeededNormal.__module__ = "neurotwin.engines.optimizers"


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
        self.config = config_from_dict(CMAESConfig, state["config"])
        try:
            self.es = _JournalUnpickler(io.BytesIO(base64.b64decode(state["es"]))).load()
        except Exception as exc:
            raise InvalidInput(f"CMA-ES state cannot be restored: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CMAES:
        self = cls.__new__(cls)
        self.load_state_dict(state)
        return self
