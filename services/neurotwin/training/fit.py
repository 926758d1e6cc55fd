"""Training: Poisson loss, AdamW, early stopping on validation correlation, fixed seeds.

The frozen part of a twin (preprocessing and the pretrained trunk) is run once over every image and its
output cached, so an epoch only runs the small trainable heads: this is what makes a 1,200-image session
train in a minute or two on a laptop CPU. Several recordings train together: one trainable core shared by
all sessions, one readout per session (``fit_twins``), and a twin per session comes out.

For benchmarks, :func:`fit_predict` fits on a split of one recording (optionally helped by other
recordings that train the shared core) and returns the predictions on its test images.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neurotwin.errors import InvalidInput
from neurotwin.runtimes.devices import select_device
from neurotwin.training.datasets import Recording
from neurotwin.training.evaluate import pearson_per_neuron
from neurotwin.training.twin import (
    FrozenCore,
    SessionSpec,
    Standardize,
    TwinConfig,
    TwinModel,
    build_core,
    build_features,
    build_twins,
)

log = logging.getLogger(__name__)

MIN_STEPS_PER_EPOCH = 16


@dataclass
class FitConfig:
    """Optimization settings; stored in the model card beside the architecture."""

    max_epochs: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    # Weight of the readout regularizer (L1 on factorized masks / Gaussian feature weights).
    readout_l1: float = 1e-3
    # Epochs without a better validation r before the learning rate drops (then, after the last drop,
    # before training stops at the best epoch seen).
    patience: int = 10
    lr_decay: float = 0.3
    lr_drops: int = 2
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("progress")
        return data


@dataclass
class SessionData:
    """One recording and its split. ``split=None`` trains on every image (a helper session)."""

    recording: Recording
    split: Mapping[str, np.ndarray] | None = None

    def indices(self, part: str) -> np.ndarray:
        if self.split is None:
            return np.arange(self.recording.n_images) if part == "train" else np.zeros(0, dtype=np.int64)
        return np.asarray(self.split.get(part, np.zeros(0, dtype=np.int64)), dtype=np.int64)


CORE_FORMAT = "neurotwin.core/1"


@dataclass
class SharedCore:
    """The trained core(s) of a multi-session fit, to reuse for new sessions (one per ensemble member).

    Saved as a plain tensor file (``torch.save`` of tensors and JSON strings, loaded with
    ``weights_only=True``), so loading one never runs pickled code.
    """

    config: TwinConfig
    cores: list[nn.Module]
    sessions: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        payload = {
            "format": CORE_FORMAT,
            "config": json.dumps(self.config.to_dict()),
            "sessions": json.dumps(self.sessions),
            "members": [{k: v.detach().cpu() for k, v in c.state_dict().items()} for c in self.cores],
        }
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> SharedCore:
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise InvalidInput(f"{path}: no such core file") from exc
        except Exception as exc:
            raise InvalidInput(f"{path}: not a neurotwin core file ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != CORE_FORMAT:
            raise InvalidInput(f"{path}: not a neurotwin core file (expected format {CORE_FORMAT})")
        config = TwinConfig.from_dict(json.loads(payload["config"]))
        cores = []
        for state in payload["members"]:
            core = build_core(config)
            try:
                core.load_state_dict(state)
            except RuntimeError as exc:
                raise InvalidInput(f"{path}: core weights do not match its config ({exc})") from exc
            cores.append(core.eval())
        return cls(config=config, cores=cores, sessions=list(json.loads(payload["sessions"])))


@dataclass
class FitResult:
    twins: dict[str, TwinModel]
    config: TwinConfig
    fit_config: FitConfig
    best_epoch: int
    epochs_run: int
    val_r: float
    wall_s: float
    device: str
    history: list[dict[str, float]] = field(default_factory=list)

    def shared_core(self) -> SharedCore:
        """The trained core of every ensemble member (copies on the CPU), for reuse."""
        first = next(iter(self.twins.values()))
        cores = []
        for head in first.heads:
            core = head.core.core if isinstance(head.core, FrozenCore) else head.core
            cores.append(copy.deepcopy(core).cpu().eval())
        return SharedCore(self.config, cores, sessions=list(self.twins))


@torch.no_grad()
def frozen_features(
    features: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 100
) -> torch.Tensor:
    """Run the frozen part once over all images; returns a float32 tensor on ``device``."""
    features.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        out.append(features(batch))
    return torch.cat(out)


# Frozen features of recent recordings, so a benchmark fitting many splits of the same sessions (and the
# same helper sessions each time) runs the trunk once per recording. Keyed by the image bytes' digest and
# the settings that shape the features; bounded in bytes.
_FEATURE_CACHE: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
FEATURE_CACHE_BYTES = 3 << 30


def _cached_features(
    features: nn.Module, config: TwinConfig, images: np.ndarray, device: torch.device, *, reuse: bool
) -> torch.Tensor:
    if not reuse:
        return frozen_features(features, images, device)
    digest = hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=16).hexdigest()
    key = (digest, images.shape, config.core, config.stages, config.input_size, config.grid, str(device))
    hit = _FEATURE_CACHE.get(key)
    if hit is not None:
        _FEATURE_CACHE.move_to_end(key)
        return hit
    value = frozen_features(features, images, device)
    _FEATURE_CACHE[key] = value
    total = sum(t.numel() * t.element_size() for t in _FEATURE_CACHE.values())
    while len(_FEATURE_CACHE) > 1 and total > FEATURE_CACHE_BYTES:
        _, dropped = _FEATURE_CACHE.popitem(last=False)
        total -= dropped.numel() * dropped.element_size()
    return value


def clear_feature_cache() -> None:
    _FEATURE_CACHE.clear()


def poisson_loss(rates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Poisson negative log-likelihood up to a constant (mean over images and neurons)."""
    return (rates - counts * torch.log(rates + 1e-8)).mean()


def _unique_modules(twins: Mapping[str, TwinModel]) -> nn.ModuleList:
    seen: dict[int, nn.Module] = {}
    for twin in twins.values():
        for head in twin.heads:
            seen.setdefault(id(head), head)
    return nn.ModuleList(seen.values())


def _param_groups(modules: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and normalization statistics are not shrunk: decaying a mean rate towards 0 only adds bias.
    decay, plain = [], []
    seen: set[int] = set()
    for name, param in modules.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (plain if name.endswith("bias") or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def fit_twins(
    sessions: Mapping[str, SessionData],
    config: TwinConfig | None = None,
    fit_config: FitConfig | None = None,
    *,
    features: nn.Module | None = None,
    core: SharedCore | None = None,
    train_core: bool = False,
) -> FitResult:
    """Train one twin per session (sharing the trainable core) and return them in eval mode.

    Early stopping watches the mean validation r over the neurons of every session that has a val
    split; at least one must. With ``core`` (a pretrained :class:`SharedCore`) only the readouts are
    trained unless ``train_core``; the architecture is the core's (``config`` may only choose the
    readout).
    """
    fit_config = fit_config or FitConfig()
    if core is not None:
        config = _config_for_core(config, core.config)
    config = config or TwinConfig()
    if not sessions:
        raise InvalidInput("fit_twins: no recordings")
    watched = [name for name, s in sessions.items() if s.indices("val").size]
    if not watched:
        raise InvalidInput("fit_twins: no session has validation images for early stopping")
    for name, s in sessions.items():
        if s.indices("train").size < 2:
            raise InvalidInput(f"fit_twins: session {name!r} has fewer than 2 training images")
    started = time.perf_counter()
    device = select_device(fit_config.device)
    torch.manual_seed(fit_config.seed)
    # Only features this function builds itself are known to be the pretrained ones, safe to reuse.
    own_features = features is None
    features = (features if features is not None else build_features(config)).to(device)

    cached: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    for name, s in sessions.items():
        cached[name] = _cached_features(features, config, s.recording.images, device, reuse=own_features)
        targets[name] = torch.from_numpy(np.ascontiguousarray(s.recording.responses.T, dtype=np.float32)).to(
            device
        )
    log.info("cached frozen features in %.1f s", time.perf_counter() - started)

    specs = [
        SessionSpec(name, s.recording.n_neurons, targets[name][torch.from_numpy(s.indices("train"))].mean(0))
        for name, s in sessions.items()
    ]
    cores = None
    if core is not None:
        cores = [copy.deepcopy(c) for c in core.cores]
        cores = [c.train() if train_core else FrozenCore(c) for c in cores]
    twins = build_twins(config, specs, seed=fit_config.seed, features=features, cores=cores)
    for twin in twins.values():
        twin.to(device)
    if core is None:
        # A pretrained core keeps the standardization it was trained with.
        _set_input_statistics(twins, sessions, cached)
    modules = _unique_modules(twins)
    optimizer = torch.optim.AdamW(_param_groups(modules, fit_config.weight_decay), lr=fit_config.lr)

    # Small recordings get smaller batches, so every epoch still takes enough optimizer steps for early
    # stopping to see progress (Adam moves weights by about lr per step, whatever the batch size).
    batch_sizes = {
        name: min(fit_config.batch_size, max(8, math.ceil(s.indices("train").size / MIN_STEPS_PER_EPOCH)))
        for name, s in sessions.items()
    }
    rng = np.random.default_rng(fit_config.seed)
    best_r, best_epoch, stale, drops = -math.inf, -1, 0, 0
    best_state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    history: list[dict[str, float]] = []
    bar = _progress(fit_config)
    epoch = 0
    for epoch in range(fit_config.max_epochs):
        modules.train()
        batches = []
        for name, s in sessions.items():
            order = rng.permutation(s.indices("train"))
            size = batch_sizes[name]
            batches += [(name, order[i : i + size]) for i in range(0, order.size, size)]
        # A one-image batch breaks batch norm; dropping it skips at most one image per session and epoch.
        batches = [b for b in batches if b[1].size > 1]
        rng.shuffle(batches)
        total, count = 0.0, 0
        for name, idx in batches:
            index = torch.from_numpy(idx).to(device)
            x, y = cached[name][index], targets[name][index]
            loss = torch.zeros((), device=device)
            for head in twins[name].heads:
                loss = loss + poisson_loss(head(x), y) + fit_config.readout_l1 * head.readout.regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.size
            count += idx.size
        val_r = _validation_r(twins, sessions, cached, targets, watched)
        train_loss = total / max(count, 1) / len(next(iter(twins.values())).heads)
        history.append(
            {"epoch": epoch, "loss": train_loss, "val_r": val_r, "lr": optimizer.param_groups[0]["lr"]}
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", val_r=f"{val_r:.3f}", best=f"{max(best_r, val_r):.3f}")
        else:
            # Without a terminal (logs, CI) the same figures go to the log, one line per epoch.
            log.info("epoch %d: loss %.4f, validation r %.3f", epoch, train_loss, val_r)
        if val_r > best_r + 1e-5:
            best_r, best_epoch, stale = val_r, epoch, 0
            best_state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
            continue
        stale += 1
        if stale > fit_config.patience:
            if drops >= fit_config.lr_drops:
                break
            # Restart from the best weights with a smaller step: the usual plateau schedule.
            drops += 1
            stale = 0
            modules.load_state_dict(best_state)
            for group in optimizer.param_groups:
                group["lr"] *= fit_config.lr_decay
    if bar is not None:
        bar.close()
    modules.load_state_dict(best_state)
    for twin in twins.values():
        twin.eval()
    wall = time.perf_counter() - started
    log.info("trained %d epochs (best %d, val r %.3f) in %.1f s", epoch + 1, best_epoch, best_r, wall)
    return FitResult(
        twins=twins,
        config=config,
        fit_config=fit_config,
        best_epoch=best_epoch,
        epochs_run=epoch + 1,
        val_r=float(best_r),
        wall_s=wall,
        device=str(device),
        history=history,
    )


@torch.no_grad()
def _set_input_statistics(
    twins: Mapping[str, TwinModel], sessions: Mapping[str, SessionData], cached: Mapping[str, torch.Tensor]
) -> None:
    """Standardize the frozen features with statistics of every session's training images."""
    total = squares = None
    count = 0
    for name, s in sessions.items():
        x = cached[name][torch.from_numpy(s.indices("train")).to(cached[name].device)].double()
        part, part_sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = part if total is None else total + part
        squares = part_sq if squares is None else squares + part_sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    assert total is not None and squares is not None
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    for twin in twins.values():
        for head in twin.heads:
            norm = getattr(head.core, "norm", None)
            if isinstance(norm, Standardize):
                norm.set_statistics(mean.float(), std.float())


@torch.no_grad()
def _validation_r(
    twins: Mapping[str, TwinModel],
    sessions: Mapping[str, SessionData],
    cached: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    watched: Sequence[str],
) -> float:
    rs = []
    for name in watched:
        twin = twins[name]
        twin.eval()
        idx = torch.from_numpy(sessions[name].indices("val")).to(cached[name].device)
        pred = twin.rates_from_features(cached[name][idx]).cpu().numpy()
        rs.append(pearson_per_neuron(pred, targets[name][idx].cpu().numpy()))
    return float(np.nanmean(np.concatenate(rs)))


def _config_for_core(config: TwinConfig | None, core_config: TwinConfig) -> TwinConfig:
    """The pretrained core's architecture, with the readout of ``config`` when one is given."""
    if config is None:
        return core_config
    mine, theirs = config.to_dict(), core_config.to_dict()
    for key in (
        "core",
        "stages",
        "input_size",
        "grid",
        "hidden",
        "core_layers",
        "core_kernel",
        "conv_layers",
    ):
        if mine[key] != theirs[key] and mine[key] != TwinConfig().to_dict()[key]:
            raise InvalidInput(f"{key} = {mine[key]!r} conflicts with the pretrained core's {theirs[key]!r}")
    return TwinConfig.from_dict({**theirs, "readout": config.readout})


def pretrain_core(
    recordings: Mapping[str, Recording],
    config: TwinConfig | None = None,
    fit_config: FitConfig | None = None,
    *,
    val_fraction: float = 0.1,
) -> tuple[SharedCore, FitResult]:
    """Train a shared core on several recordings (each with a seeded random val part for early
    stopping, no test part), for :func:`fit_twin` ``(core=...)`` on other sessions."""
    fit_config = fit_config or FitConfig()
    sessions = {}
    for name, rec in recordings.items():
        order = np.random.default_rng([fit_config.seed, 7]).permutation(rec.n_images)
        n_val = max(1, round(val_fraction * rec.n_images))
        split = {
            "train": np.sort(order[n_val:]),
            "val": np.sort(order[:n_val]),
            "test": np.zeros(0, np.int64),
        }
        sessions[name] = SessionData(rec, split)
    result = fit_twins(sessions, config, fit_config)
    return result.shared_core(), result


def _progress(fit_config: FitConfig) -> Any:
    if not fit_config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=fit_config.max_epochs, desc="train", unit="epoch", leave=False, dynamic_ncols=True)


def fit_twin(
    recording: Recording,
    split: Mapping[str, np.ndarray],
    config: TwinConfig | None = None,
    fit_config: FitConfig | None = None,
    *,
    helpers: Mapping[str, Recording] | None = None,
    name: str = "target",
    core: SharedCore | None = None,
    train_core: bool = False,
) -> tuple[TwinModel, FitResult]:
    """Train a twin for one recording; ``helpers`` are other recordings (all images) that train the
    shared core alongside it; ``core`` reuses a pretrained core (see :func:`fit_twins`). Returns the
    recording's twin and the full result."""
    sessions = {name: SessionData(recording, split)}
    for helper_name, helper in (helpers or {}).items():
        if helper_name == name:
            raise InvalidInput(f"helper recording named {helper_name!r} clashes with the target's name")
        sessions[helper_name] = SessionData(helper, None)
    result = fit_twins(sessions, config, fit_config, core=core, train_core=train_core)
    return result.twins[name], result


def fit_predict(
    recording: Recording,
    split: Mapping[str, np.ndarray],
    config: TwinConfig | None = None,
    fit_config: FitConfig | None = None,
    *,
    helpers: Mapping[str, Recording] | None = None,
    core: SharedCore | None = None,
) -> np.ndarray:
    """Fit on ``split['train']`` (early stopping on ``split['val']``) and return float32 predictions
    [len(split['test']), neurons] for ``recording.images[split['test']]``: the benchmark's entry point."""
    twin, _ = fit_twin(recording, split, config, fit_config, helpers=helpers, core=core)
    test = np.asarray(split["test"], dtype=np.int64)
    return twin.predict(recording.images[test])
