"""Twin + prior pairs for synthesis, checked out of the model registry (and the pixel prior).

Pairs of the same modules are reused, so concurrent jobs on them batch together in the scheduler.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch

from neurotwin.card import GeneratorCard, PredictorCard
from neurotwin.engines.model_handles import RefCounted
from neurotwin.engines.registry import ModelRegistry
from neurotwin.engines.synthesis.requests import ModelPair
from neurotwin.errors import InvalidInput

# The generator name that means "no generator": Fourier-parametrized pixels at the twin's resolution.
PIXELS = "pixels"


@dataclass(frozen=True)
class PairKey:
    model: str
    model_version: int
    generator: str
    generator_version: int

    def __str__(self) -> str:
        gen = self.generator if self.generator == PIXELS else f"{self.generator}/{self.generator_version}"
        return f"{self.model}/{self.model_version}|{gen}"


@dataclass(eq=False)
class LoadedPair:
    """A twin + prior pair checked out of the model registry for one job; ``release`` when it ends."""

    key: PairKey
    pair: ModelPair
    card: PredictorCard
    generator_card: GeneratorCard | None
    handles: tuple[RefCounted, ...] = ()
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            for handle in self.handles:
                handle.exit()


class PairCache:
    """Twin + generator pairs from the model registry: the twin is converted from a predictor version
    that passed validation (newest served one unless pinned), the generator is the newest validated
    version unless pinned. Pairs of the same modules are reused, so concurrent jobs batch together."""

    def __init__(
        self,
        models: ModelRegistry,
        device: torch.device,
        *,
        default_generator: str,
        parity_images: int = 4,
        max_loaded_pairs: int = 4,
    ) -> None:
        self.models = models
        self.device = device
        self.default_generator = default_generator
        self.parity_images = parity_images
        self.max_loaded_pairs = max_loaded_pairs
        self._lock = threading.Lock()
        self._pairs: collections.OrderedDict[PairKey, ModelPair] = collections.OrderedDict()
        self._pixels: dict[int, torch.nn.Module] = {}

    def checkout(self, model: str, model_version: int, generator: str, generator_version: int) -> LoadedPair:
        """The pair, counted in with the registry until ``release``. NotFound / ModelStoreError."""
        if not model:
            raise InvalidInput("model: name the twin to synthesize for")
        generator = generator or self.default_generator
        if generator == PIXELS and generator_version:
            raise InvalidInput("generator 'pixels' has no versions; leave generator_version at 0")
        twin = self.models.derived.twin(
            model,
            model_version or None,
            device=self.device,
            parity_images=max(0, self.parity_images),
            # An ensemble twin gives synthesis its members' rates, so objectives can ask them to agree.
            members=True,
        )
        handles: list[RefCounted] = [twin]
        try:
            generator_card: GeneratorCard | None = None
            if generator == PIXELS:
                prior = self._pixel_prior(max(twin.card.input.height, twin.card.input.width))
                key = PairKey(twin.name, twin.version, PIXELS, 0)
            else:
                loaded = self.models.derived.generator(generator, generator_version or None, self.device)
                handles.append(loaded)
                prior, generator_card = loaded.module, loaded.card
                key = PairKey(twin.name, twin.version, loaded.name, loaded.version)
            with self._lock:
                pair = self._pairs.get(key)
                if pair is None or pair.twin is not twin.module or pair.prior is not prior:
                    pair = ModelPair(twin=twin.module, prior=prior, card=twin.card, key=str(key))
                    self._pairs[key] = pair
                self._pairs.move_to_end(key)
                while len(self._pairs) > max(1, self.max_loaded_pairs):
                    self._pairs.popitem(last=False)
        except BaseException:
            for handle in handles:
                handle.exit()
            raise
        return LoadedPair(key, pair, twin.card, generator_card, tuple(handles))

    def _pixel_prior(self, resolution: int) -> torch.nn.Module:
        from neurotwin.runtimes.generators import FourierPixels

        with self._lock:
            prior = self._pixels.get(resolution)
            if prior is None:
                prior = FourierPixels(resolution=resolution).to(self.device).eval().requires_grad_(False)
                self._pixels[resolution] = prior
            return prior

    def loaded(self) -> list[str]:
        with self._lock:
            return [str(k) for k in self._pairs]
