"""Cross-validated ensembles: every member early-stops on its own validation fold.

``fit_twins`` with ``TwinConfig.ensemble = K`` trains K members side by side on the same training images
and stops them together on the same validation images. :func:`fit_cv_ensemble` instead trains each member
alone, holding out a different slice of the target sessions' non-test images for its early stopping and
training on the rest: between them the members learn from every non-test image, and they disagree where
the data leaves a twin free to, which is what averaging removes. Helper sessions (no split) train every
member's core on all their images. The members then become one twin per session, exported as one model
(``rates`` their mean, ``member_rates`` each one's).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from neurotwin.errors import InvalidInput
from neurotwin.training.fit import FitConfig, FitResult, SessionData, SharedCore, fit_twins
from neurotwin.training.twin import TwinConfig, TwinModel

MEMBER_SPLITS = ("folds", "same")


def member_split(split: Mapping[str, np.ndarray], member: int, seed: int) -> dict[str, np.ndarray]:
    """Member ``member``'s split of a session: the test part unchanged; validation a slice as large as
    the given one, member ``m`` taking the ``m``-th slice of one seeded shuffle of train + val (so the
    members' slices are disjoint while they fit, and wrap around beyond); the rest trains."""
    train = np.asarray(split["train"], dtype=np.int64)
    val = np.asarray(split.get("val", np.zeros(0, np.int64)), dtype=np.int64)
    pool = np.sort(np.concatenate([train, val]))
    n_val = val.size
    if n_val == 0 or pool.size < 2:
        raise InvalidInput("a cross-validated ensemble needs validation images in every target's split")
    order = np.random.default_rng([seed, 11]).permutation(pool)
    held = np.roll(order, -member * n_val)[:n_val]
    rest = np.setdiff1d(pool, held)
    return {
        "train": rest,
        "val": np.sort(held),
        "test": np.asarray(split.get("test", np.zeros(0, np.int64)), dtype=np.int64),
    }


def fit_cv_ensemble(
    sessions: Mapping[str, SessionData],
    config: TwinConfig,
    fit_config: FitConfig | None = None,
    *,
    core: SharedCore | None = None,
    train_core: bool = False,
) -> tuple[FitResult, dict[str, list[list[int]]]]:
    """Train ``config.ensemble`` members one after another, member ``m`` with its own validation slice
    (:func:`member_split`) and seed ``seed + m``, and join them: one twin per session whose heads are the
    members'. Returns the result (``val_r`` the members' mean, epochs summed) and, per session with a
    split, every member's validation indices."""
    fit_config = fit_config or FitConfig()
    members = int(config.ensemble)
    if core is not None and len(core.cores) != members:
        raise InvalidInput(f"a core of {len(core.cores)} member(s) for an ensemble of {members}")
    started = time.perf_counter()
    single = dataclasses.replace(config, ensemble=1)
    results: list[FitResult] = []
    held: dict[str, list[list[int]]] = {name: [] for name, s in sessions.items() if s.split is not None}
    for member in range(members):
        member_sessions = {
            name: s
            if s.split is None
            else SessionData(s.recording, member_split(s.split, member, fit_config.seed))
            for name, s in sessions.items()
        }
        for name in held:
            held[name].append(member_sessions[name].indices("val").tolist())
        member_core = None if core is None else SharedCore(core.config, [core.cores[member]], core.sessions)
        member_fit = dataclasses.replace(fit_config, seed=fit_config.seed + member)
        results.append(
            fit_twins(member_sessions, single, member_fit, core=member_core, train_core=train_core)
        )
    joined = {
        name: TwinModel(
            results[0].config if members == 1 else dataclasses.replace(results[0].config, ensemble=members),
            results[0].twins[name].features,
            [head for r in results for head in r.twins[name].heads],
        ).eval()
        for name in sessions
    }
    first = results[0]
    history: list[dict[str, Any]] = [{**h, "member": m} for m, r in enumerate(results) for h in r.history]
    result = FitResult(
        twins=joined,
        config=dataclasses.replace(first.config, ensemble=members),
        fit_config=fit_config,
        best_epoch=first.best_epoch,
        epochs_run=sum(r.epochs_run for r in results),
        val_r=float(np.mean([r.val_r for r in results])),
        wall_s=time.perf_counter() - started,
        device=first.device,
        history=history,
    )
    return result, held
