"""Train/val/test image indices, the same for training and every benchmarked model."""

from __future__ import annotations

import numpy as np

from neurotwin.errors import InvalidInput
from neurotwin.training.datasets.recording import (
    RANDOM_TEST_FRACTION,
    SPLIT_SCHEMES,
)


def split_indices(
    n_images: int,
    *,
    scheme: str,
    seed: int,
    fold: int = 0,
    n_folds: int = 5,
    val_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Disjoint, covering ``{"train", "val", "test"}`` image indices (sorted int64), fixed by the arguments.

    - ``random``: a seeded permutation; its first ``round(0.2 * n)`` images are test.
    - ``kfold``: a seeded permutation cut into ``n_folds`` near-equal parts (``np.array_split``); part
      ``fold`` is test. Every image is test in exactly one fold for a given seed.
    - ``first-half``: test is the second half of the images in recording order (indices ``n // 2`` and
      up); train and val come from the first half. No seed affects the test set.

    In every scheme val is ``round(val_fraction * m)`` images drawn (seeded) from the ``m`` non-test
    images, and train is the rest. The same arguments give the same split on every machine (numpy's
    PCG64 generator), so a model card's split can be rebuilt from its recorded arguments.
    """
    n = _check_int(n_images, "n_images")
    if n < 2:
        raise InvalidInput(f"split_indices: need at least 2 images, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInput(f"split_indices: val_fraction must be in [0, 1), got {val_fraction}")
    seed = _check_int(seed, "seed")
    if seed < 0:
        raise InvalidInput(f"split_indices: seed must be >= 0, got {seed}")
    if scheme == "random":
        perm = np.random.default_rng(seed).permutation(n)
        n_test = max(1, round(RANDOM_TEST_FRACTION * n))
        test, rest = perm[:n_test], perm[n_test:]
    elif scheme == "kfold":
        n_folds, fold = _check_int(n_folds, "n_folds"), _check_int(fold, "fold")
        if not 2 <= n_folds <= n:
            raise InvalidInput(f"split_indices: n_folds must be in [2, {n}], got {n_folds}")
        if not 0 <= fold < n_folds:
            raise InvalidInput(f"split_indices: fold must be in [0, {n_folds}), got {fold}")
        parts = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
        test = parts[fold]
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
    elif scheme == "first-half":
        test, rest = np.arange(n // 2, n), np.arange(n // 2)
    else:
        raise InvalidInput(
            f"split_indices: unknown scheme {scheme!r}; expected one of {', '.join(SPLIT_SCHEMES)}"
        )
    n_val = round(val_fraction * rest.size)
    if n_val >= rest.size:
        raise InvalidInput(
            f"split_indices: val_fraction {val_fraction} leaves no training images of {rest.size}"
        )
    # A generator of its own for val, keyed by the fold too, so each fold's val set is drawn afresh and
    # the val draw never shifts the test permutation above.
    val_rng = np.random.default_rng([seed, fold if scheme == "kfold" else 0, 1])
    pick = val_rng.permutation(rest.size)[:n_val]
    val = rest[pick]
    train = np.delete(rest, pick)
    return {
        name: np.sort(arr).astype(np.int64) for name, arr in (("train", train), ("val", val), ("test", test))
    }


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInput(f"split_indices: {name} must be an integer, got {value!r}")
    return int(value)


def split_summary(splits: dict[str, np.ndarray]) -> dict[str, int]:
    """Sizes of each part, for logs and cards."""
    return {name: int(arr.size) for name, arr in splits.items()}
