"""Twins for ``bench/transfer.py``: the twin stimuli are made on (A), independent ones that score them (B).

All of them live in one working model store (``runs/transfer/store`` by default), so a rerun finds them
and trains nothing. Twin A of a session is the bundled ``v4-<session>`` when the project's store has
it (copied over), else it is trained here with the README's recipe for one session (seed 0, random
split; without the helper sessions, which cost most of an hour on this CPU). The independent twins
differ from A in seed, image split, core and readout, and are trained on that session alone:

- ``conv``: a stacked conv core learned from pixels (no pretrained features; 56 px, 48 channels), seed 1;
- ``lite``: frozen EfficientNet-Lite0 blocks 3/6/9 (A reads 4/7/10) + learned core + Gaussian readout,
  seed 2;
- ``ridge``: per-neuron ridge on other pretrained features (Lite0 blocks 5/8/12, 2 x 2 pooled), its
  own random split (seed 3), alpha per neuron by exact leave-one-out; stored as ``.npz``.

The first two are made by ``neurotwin train`` itself (ONNX + card in the store); ridge is not a servable
model, so it stays a bench artefact. ``--quick`` shrinks every training (tiny conv cores, few epochs).
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from neurotwin.store import GENERATORS, PREDICTORS, ModelStore
from neurotwin.training.backbone import EfficientNetLite0Trunk
from neurotwin.training.datasets import Recording, load_recording, split_indices
from PIL import Image

RIDGE_STAGES = (5, 8, 12)
RIDGE_POOL = 2
RIDGE_SEED = 3
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(0, 7, 29))
INDEPENDENT = ("conv", "lite", "ridge")


@dataclass(frozen=True)
class TrainingPlan:
    """How big the trainings are: the real ones, or ``--quick``'s tiny ones."""

    quick: bool

    def twin_a_args(self) -> list[str]:
        if self.quick:
            return ["--core", "conv", "--hidden", "8", "--input-size", "32", "--epochs", "4", "--seed", "0"]
        # The bundled twin's recipe without its helper sessions: on this shared 2-core CPU the shared core
        # over all nine sessions takes most of an hour; one session's features take minutes.
        return ["--split", "random", "--seed", "0"]

    def member_args(self, seed: int) -> list[str]:
        if self.quick:
            return [
                "--core",
                "conv",
                "--hidden",
                "8",
                "--input-size",
                "32",
                "--epochs",
                "3",
                "--seed",
                str(seed),
            ]
        return ["--seed", str(seed), "--split", "random"]

    def independent_args(self, kind: str) -> list[str]:
        if kind == "conv":
            # From pixels at 56 px, 48 channels, at most 40 epochs: minutes on this CPU, not an hour.
            size = ["--hidden", "8", "--input-size", "32", "--epochs", "4"]
            if not self.quick:
                size = ["--hidden", "48", "--input-size", "56", "--epochs", "40", "--patience", "5"]
            return ["--core", "conv", "--seed", "1", "--split", "random", *size]
        if kind == "lite":
            size = ["--hidden", "16", "--input-size", "32", "--epochs", "3"] if self.quick else []
            return ["--stages", "3,6,9", "--readout", "gaussian", "--seed", "2", "--split", "random", *size]
        raise ValueError(kind)


def _train(data: Path, sessions: list[str], out: Path, extra: list[str], log: Callable[[str], None]) -> None:
    from neurotwin.cli import main as neurotwin

    argv = ["train", str(data)]
    for s in sessions:
        argv += ["--session", s]
    argv += ["--out", str(out), "--report", "none", "--no-progress", *extra]
    log("  neurotwin " + " ".join(argv))
    code = neurotwin(argv)
    if code not in (0, None):
        raise SystemExit(f"neurotwin train failed ({code}): {' '.join(argv)}")


def member_name(session: str, index: int) -> str:
    """Extra ensemble member ``index`` (0-based) of twin A for the ``ens=K`` lever."""
    return f"ens-{session}-s{10 + index}"


def prepare_members(
    work: ModelStore, data: Path, session: str, count: int, plan: TrainingPlan, log: Callable[[str], None]
) -> list[str]:
    """Twin A's extra ensemble members: single-session twins of A's architecture, seeds 10, 11, ..."""
    names = [member_name(session, i) for i in range(count)]
    for i, name in enumerate(names):
        if name not in work.names(PREDICTORS):
            log(f"training ensemble member {name}")
            _train(data, [session], work.root / PREDICTORS / name, plan.member_args(10 + i), log)
    return names


def twin_a_name(session: str) -> str:
    return f"v4-{session}"


def independent_name(kind: str, session: str) -> str:
    return f"indep-{kind}-{session}"


def prepare_store(
    work: ModelStore,
    project: ModelStore,
    data: Path,
    sessions: list[str],
    plan: TrainingPlan,
    log: Callable[[str], None],
    independent: tuple[str, ...] | list[str] = INDEPENDENT,
) -> dict[str, str]:
    """Fill the working store: generators copied, twin A per session, the ONNX independent twins.

    Returns session -> where twin A came from ("bundled" or "trained here").
    """
    for name in project.names(GENERATORS):
        for version in project.versions(GENERATORS, name):
            target = work.root / GENERATORS / name / str(version)
            if not target.exists():
                shutil.copytree(project.root / GENERATORS / name / str(version), target)
    origin: dict[str, str] = {}
    missing: list[str] = []
    for session in sessions:
        name = twin_a_name(session)
        if name in work.names(PREDICTORS):
            origin[session] = "bundled" if name in project.names(PREDICTORS) else "trained here"
        elif name in project.names(PREDICTORS) and not plan.quick:
            version = project.resolve(PREDICTORS, name)
            shutil.copytree(version.path, work.root / PREDICTORS / name / str(version.version))
            origin[session] = "bundled"
        else:
            missing.append(session)
    if missing:
        # One run for every missing session: they share the core, each gets its own readout.
        out = work.root / PREDICTORS / ("v4" if len(missing) > 1 else twin_a_name(missing[0]))
        log(f"training twin A for {', '.join(missing)}")
        _train(data, missing, out, plan.twin_a_args(), log)
        for session in missing:
            origin[session] = "trained here"
    for session in sessions:
        for kind in [k for k in independent if k != "ridge"]:
            name = independent_name(kind, session)
            if name not in work.names(PREDICTORS):
                log(f"training independent twin {name}")
                _train(data, [session], work.root / PREDICTORS / name, plan.independent_args(kind), log)
    return origin


# -- ridge on other pretrained features --------------------------------------------------------------


class RidgeTwin:
    """Per-neuron ridge on Lite0 block outputs (``RIDGE_STAGES``), pooled to ``RIDGE_POOL`` squared."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self.state = state
        self.source: Path | None = None  # the .npz it was loaded from (caches key on it)
        self._trunk = EfficientNetLite0Trunk(stages=RIDGE_STAGES).eval()

    @staticmethod
    def features(trunk: torch.nn.Module, images: np.ndarray, size: int) -> np.ndarray:
        chunks = []
        with torch.inference_mode():
            for lo in range(0, len(images), 100):
                x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + 100])).permute(0, 3, 1, 2).float()
                if x.shape[-2:] != (size, size):
                    x = F.interpolate(
                        x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                    )
                maps = trunk(x)
                chunks.append(
                    torch.cat([F.adaptive_avg_pool2d(m, RIDGE_POOL).flatten(1) for m in maps], 1)
                    .double()
                    .numpy()
                )
        return np.concatenate(chunks)

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = self.features(self._trunk, images, int(self.state["input_size"]))
        xz = (x - self.state["mu"]) / self.state["sd"]
        return (xz @ self.state["coef"] + self.state["ymean"]).astype(np.float32)

    @classmethod
    def fit(cls, rec: Recording, input_size: int) -> tuple[dict[str, np.ndarray], float]:
        """Fit on the non-test images of a seed-3 random split; returns (state, held-out median r)."""
        split = split_indices(rec.n_images, scheme="random", seed=RIDGE_SEED)
        trunk = EfficientNetLite0Trunk(stages=RIDGE_STAGES).eval()
        feats = cls.features(trunk, rec.images, input_size)
        idx = np.concatenate([split["train"], split["val"]])
        x, y = feats[idx], rec.responses[:, idx].T.astype(np.float64)
        mu, sd = x.mean(0), x.std(0) + 1e-8
        xz = (x - mu) / sd
        ymean = y.mean(0)
        yc = y - ymean
        u, s, vt = np.linalg.svd(xz, full_matrices=False)
        uty, s2, n = u.T @ yc, s * s, xz.shape[0]
        loo = np.empty((len(RIDGE_ALPHAS), y.shape[1]))
        for i, alpha in enumerate(RIDGE_ALPHAS):
            shrink = s2 / (s2 + alpha)
            fitted = u @ (shrink[:, None] * uty)
            leverage = (u * u) @ shrink + 1.0 / n
            loo[i] = (((yc - fitted) / (1.0 - leverage)[:, None]) ** 2).mean(0)
        best = loo.argmin(0)
        coef = np.empty((xz.shape[1], y.shape[1]))
        for i in np.unique(best):
            cols = best == i
            coef[:, cols] = vt.T @ ((s / (s2 + RIDGE_ALPHAS[i]))[:, None] * uty[:, cols])
        state = {"mu": mu, "sd": sd, "coef": coef, "ymean": ymean, "input_size": np.array(input_size)}
        test = split["test"]
        pred = ((feats[test] - mu) / sd) @ coef + ymean
        r = [np.corrcoef(pred[:, k], rec.responses[k, test])[0, 1] for k in range(rec.n_neurons)]
        return state, float(np.nanmedian(r))


def ridge_twin(
    folder: Path, rec: Recording, session: str, log: Callable[[str], None]
) -> tuple[RidgeTwin, float]:
    path = folder / f"ridge-{session}.npz"
    if not path.exists():
        log(f"fitting ridge twin for {session}")
        state, r = RidgeTwin.fit(rec, max(rec.image_size))
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(path, **state, heldout_median_r=np.array(r))
    loaded = dict(np.load(path))
    r = float(loaded.pop("heldout_median_r"))
    twin = RidgeTwin(loaded)
    twin.source = path
    return twin, r


# -- synthetic sessions for --quick without the data ---------------------------------------------------


def write_synthetic_sessions(root: Path, sessions: list[str], n_images: int = 96, neurons: int = 6) -> Path:
    """A cowley_v4-shaped folder whose responses depend on the images (so twins can learn them).

    Images are smooth random colour blobs (32 px); neuron k responds to the mean of one colour channel
    in one quadrant, through a softplus, plus noise.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "responses").mkdir(parents=True, exist_ok=True)
    for number, session in enumerate(sessions):
        rng = np.random.default_rng(1000 + number)
        low = rng.uniform(0, 255, size=(n_images, 3, 4, 4))
        images = F.interpolate(torch.from_numpy(low), size=(32, 32), mode="bicubic", align_corners=False)
        images = images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        quads = images.reshape(n_images, 2, 16, 2, 16, 3).mean(axis=(2, 4)).reshape(n_images, 12) / 255.0
        weights = rng.normal(0, 1, size=(12, neurons)) * 3
        drive = quads @ weights
        rates = np.log1p(np.exp(drive - drive.mean(0))) * 4 + rng.gamma(1.0, 0.3, size=drive.shape)
        with zipfile.ZipFile(root / "images" / f"images_{session}.zip", "w") as zf:
            for i, img in enumerate(images):
                buf = _png(img)
                zf.writestr(f"image{i + 1:04d}.png", buf)
        np.save(root / "responses" / f"responses_{session}.npy", rates.T.astype(np.float64))
    return root


def _png(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def load_session(data: Path, session: str) -> Recording:
    return load_recording(data, session=session)
