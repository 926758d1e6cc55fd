"""A recording as training sees it (images, responses, ids, provenance) and the formats' shared constants."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurotwin.errors import InvalidInput

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf", ".he5"})
DEFAULT_WINDOW = (0.05, 0.15)
SPLIT_SCHEMES = ("random", "kfold", "first-half")
RANDOM_TEST_FRACTION = 0.2
HASH_CHUNK = 1 << 20
DIGITS = re.compile(r"(\d+)")


@dataclass(eq=False)
class Recording:
    """Images and the responses of a set of neurons to them."""

    images: np.ndarray  # uint8 [N, H, W, 3] RGB
    responses: np.ndarray  # float32 [neurons, N]; nanmean over repeats when per-repeat data exists
    repeats: np.ndarray | None  # float32 [neurons, N, R], NaN-padded
    neuron_ids: list[str]
    image_ids: list[str]
    source: str
    sha256: str

    def __post_init__(self) -> None:
        # Cheap consistency checks so a Recording built by hand (tests, other tools) fails early.
        images, responses = self.images, self.responses
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise InvalidInput(
                f"Recording.images: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
            )
        if responses.ndim != 2 or responses.shape[1] != images.shape[0]:
            raise InvalidInput(
                f"Recording.responses: expected [neurons, {images.shape[0]}], got {list(responses.shape)}"
            )
        if self.repeats is not None and self.repeats.shape[:2] != responses.shape:
            raise InvalidInput(
                f"Recording.repeats: expected [{responses.shape[0]}, {responses.shape[1]}, R], "
                f"got {list(self.repeats.shape)}"
            )
        if len(self.neuron_ids) != responses.shape[0] or len(self.image_ids) != images.shape[0]:
            raise InvalidInput(
                f"Recording: {len(self.neuron_ids)} neuron ids and {len(self.image_ids)} "
                f"image ids for responses of shape {list(responses.shape)}"
            )

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.responses.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, image_indices: Sequence[int] | np.ndarray) -> Recording:
        """The same neurons on the chosen images (in the given order); source and sha256 are kept,
        since they name the data the subset was drawn from."""
        idx = np.asarray(image_indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_images,):
                raise InvalidInput(
                    f"subset: boolean mask of shape {list(idx.shape)} for {self.n_images} images"
                )
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.intp)
        elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise InvalidInput(
                f"subset: expected a 1-D list of image indices, got {idx.dtype} {list(idx.shape)}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_images):
            raise InvalidInput(
                f"subset: image indices must be in [0, {self.n_images}), got "
                f"{int(idx.min())}..{int(idx.max())}"
            )
        return Recording(
            images=self.images[idx],
            responses=self.responses[:, idx],
            repeats=None if self.repeats is None else self.repeats[:, idx],
            neuron_ids=list(self.neuron_ids),
            image_ids=[self.image_ids[i] for i in idx.tolist()],
            source=self.source,
            sha256=self.sha256,
        )

    def __repr__(self) -> str:
        rep = "" if self.repeats is None else f", repeats={self.repeats.shape[2]}"
        return (
            f"Recording({self.source!r}, images={self.n_images}x{self.image_size[0]}x{self.image_size[1]}, "
            f"neurons={self.n_neurons}{rep}, sha256={self.sha256[:12]})"
        )
