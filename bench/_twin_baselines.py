"""Baseline models for ``bench/twin_quality.py``: pretrained features + ridge, and neuralpredictors.

Every model here implements the benchmark's fitter interface: ``fit(rec, train, val)`` trains on the
images ``train`` (``val`` is for early stopping or, for ridge, folded into the training set because its
regularization is chosen by inner cross-validation) and ``predict(rec, test)`` returns float rates
[len(test), neurons]. Indices refer to the full recording, so models can cache per-image work.
"""

from __future__ import annotations

import collections
import collections.abc
import math
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from neurotwin.stats import pearson_columns
from neurotwin.training.backbone import EfficientNetLite0Trunk
from neurotwin.training.datasets import Recording
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# (b) EfficientNet-Lite0 intermediate features + per-neuron ridge

RIDGE_STAGES = (4, 7, 10)
RIDGE_INPUT_PX = 112
RIDGE_POOL = 3
# Wide enough that the per-neuron choice never sits on an edge for z-scored features of this size
# (checked on 201025: chosen alphas span the interior of the grid).
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(0, 7, 29))


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pearson_columns(a, b, constant=0.0)


class LiteRidge:
    """Frozen EfficientNet-Lite0 stage outputs, average-pooled to 3 x 3 and concatenated, then one ridge
    regression per neuron whose alpha is picked by exact leave-one-out cross-validation on the training
    images (the hat-matrix identity makes LOO as cheap as a single fit)."""

    name = "ridge"

    def __init__(self, stages: tuple[int, ...] = RIDGE_STAGES, pool: int = RIDGE_POOL) -> None:
        self.stages = stages
        self.pool = pool
        self._trunk: EfficientNetLite0Trunk | None = None
        self._features: dict[str, np.ndarray] = {}
        self.feature_seconds: dict[str, tuple[float, float]] = {}
        self.chosen_alpha: np.ndarray | None = None

    def _session_features(self, rec: Recording) -> np.ndarray:
        # The features do not depend on the split, so every fold of a session reuses one pass.
        key = f"{rec.sha256}:{rec.n_images}"
        if key not in self._features:
            start, cpu_start = time.perf_counter(), time.process_time()
            if self._trunk is None:
                self._trunk = EfficientNetLite0Trunk(stages=self.stages).eval()
            chunks = []
            with torch.inference_mode():
                for lo in range(0, rec.n_images, 100):
                    x = torch.from_numpy(rec.images[lo : lo + 100]).permute(0, 3, 1, 2).float()
                    if x.shape[-2:] != (RIDGE_INPUT_PX, RIDGE_INPUT_PX):
                        x = F.interpolate(
                            x,
                            size=(RIDGE_INPUT_PX, RIDGE_INPUT_PX),
                            mode="bilinear",
                            antialias=True,
                            align_corners=False,
                        )
                    maps = self._trunk(x)
                    pooled = [F.adaptive_avg_pool2d(m, self.pool).flatten(1) for m in maps]
                    chunks.append(torch.cat(pooled, 1).numpy().astype(np.float64))
            self._features[key] = np.concatenate(chunks)
            self.feature_seconds[key] = (time.perf_counter() - start, time.process_time() - cpu_start)
        return self._features[key]

    def fit(self, rec: Recording, train: np.ndarray, val: np.ndarray) -> None:
        feats = self._session_features(rec)
        idx = np.concatenate([train, val])
        x = feats[idx]
        y = rec.responses[:, idx].T.astype(np.float64)
        self._mu = x.mean(0)
        self._sd = x.std(0) + 1e-8
        xz = (x - self._mu) / self._sd
        self._ymean = y.mean(0)
        yc = y - self._ymean
        n = xz.shape[0]
        u, s, vt = np.linalg.svd(xz, full_matrices=False)
        uty = u.T @ yc
        s2 = s * s
        alphas = np.asarray(RIDGE_ALPHAS)
        loo_mse = np.empty((alphas.size, y.shape[1]))
        for i, alpha in enumerate(alphas):
            shrink = s2 / (s2 + alpha)
            fitted = u @ (shrink[:, None] * uty)
            # Leverage includes 1/n for the intercept that centering removed.
            leverage = (u * u) @ shrink + 1.0 / n
            loo_mse[i] = (((yc - fitted) / (1.0 - leverage)[:, None]) ** 2).mean(0)
        best = loo_mse.argmin(0)
        self.chosen_alpha = alphas[best]
        coef = np.empty((xz.shape[1], y.shape[1]))
        for i in np.unique(best):
            cols = best == i
            coef[:, cols] = vt.T @ ((s / (s2 + alphas[i]))[:, None] * uty[:, cols])
        self._coef = coef

    def predict(self, rec: Recording, test: np.ndarray) -> np.ndarray:
        xz = (self._session_features(rec)[test] - self._mu) / self._sd
        return (xz @ self._coef + self._ymean).astype(np.float32)

    def fixed_seconds(self, rec: Recording) -> tuple[float, float]:
        """(wall, CPU) seconds of the session's feature extraction (done once, charged to every fit)."""
        self._session_features(rec)
        return self.feature_seconds[f"{rec.sha256}:{rec.n_images}"]


# ----------------------------------------------------------------------------------------------------------
# (c) neuralpredictors: stacked conv core + Gaussian readout, the Sinz lab's standard recipe


class NeuralPredictorsUnavailable(RuntimeError):
    """neuralpredictors cannot be imported or run here; the message says exactly why."""


def import_neuralpredictors() -> types.SimpleNamespace:
    """Import the pieces of neuralpredictors the peer model needs, working around two known breakages
    of its last PyPI release (0.3.0) without touching the installed package:

    1. ``neuralpredictors/layers/cores/conv2d.py`` does ``from collections import Iterable``, an alias
       removed in Python 3.10. We restore the alias (it is the same class as ``collections.abc``'s).
    2. The same module does ``import torchvision`` at top level, only for ``TransferLearningCore``
       (``torchvision.models``), which the stacked core does not use. PyPI's torchvision cannot load
       with this project's torch build (``operator torchvision::nms does not exist``) and is not
       installed, so an empty placeholder module stands in while neuralpredictors imports, and is
       removed again so nothing else mistakes it for the real package.
    """
    try:
        import neuralpredictors  # noqa: F401
    except ImportError as exc:
        raise NeuralPredictorsUnavailable(
            f"neuralpredictors is not installed ({exc}); pip install neuralpredictors"
        ) from exc
    if not hasattr(collections, "Iterable"):
        collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]
    placeholder = None
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:
            placeholder = types.ModuleType("torchvision")
            placeholder.__doc__ = "placeholder installed by bench/_twin_baselines.py; not torchvision"
            sys.modules["torchvision"] = placeholder
    try:
        from neuralpredictors.layers.cores import Stacked2dCore
        from neuralpredictors.layers.readouts import FullGaussian2d
        from neuralpredictors.measures.modules import PoissonLoss
        from neuralpredictors.training import early_stopping
    except Exception as exc:
        raise NeuralPredictorsUnavailable(
            f"importing neuralpredictors failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if placeholder is not None and sys.modules.get("torchvision") is placeholder:
            del sys.modules["torchvision"]
    return types.SimpleNamespace(
        Stacked2dCore=Stacked2dCore,
        FullGaussian2d=FullGaussian2d,
        PoissonLoss=PoissonLoss,
        early_stopping=early_stopping,
    )


class _CoreReadout(nn.Module):
    def __init__(self, core: nn.Module, readout: nn.Module) -> None:
        super().__init__()
        self.core = core
        self.readout = readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ELU + 1 keeps rates positive, as the Poisson loss requires (the lab's usual output nonlinearity).
        return F.elu(self.readout(self.core(x))) + 1.0

    def regularizer(self) -> torch.Tensor:
        return self.core.regularizer() + self.readout.regularizer()


class NeuralPredictorsPeer:
    """The field's standard data-driven model built from neuralpredictors' own parts: a 4-layer stacked,
    depth-separable conv core (64 channels, 9x9 input kernel, 7x7 hidden kernels, Laplace-regularized
    input filters) and a full-covariance Gaussian readout, with the hyperparameters and training loop
    of the lab's published baseline (SENSORIUM 2022 ``standard_trainer``): Adam at 5e-3, Poisson loss
    scaled by sqrt(train size / batch), early stopping on validation correlation with patience 5,
    three learning-rate decays by 0.3 (ReduceLROnPlateau, min 1e-4), best state restored, up to 200
    epochs. Adapted to these data: RGB input (3 channels), images downsampled to ``input_px`` (40 by
    default, as in the lab's monkey V1 work; its stacked cores train from scratch at a few dozen pixels,
    and on this shared 2-core CPU 56 px made one fit take hours), per-channel
    z-scoring of pixels and per-neuron scaling of responses by their training std (the lab's
    normalizers do the same).

    Inputs are kept channels-last: on CPU, torch's backward pass of the depthwise 7x7 convolutions is
    ~40x slower in the default NCHW layout than through oneDNN's channels-last kernels (37 s vs 0.9 s
    for one batch of 64 at 48x48 on this machine); the arithmetic is the same either way. Only the
    activations are converted, because the core's Laplace regularizer reshapes the input filters with
    ``.view``, which channels-last weights would break."""

    name = "neuralpredictors"

    def __init__(
        self,
        *,
        seed: int = 0,
        input_px: int = 40,
        max_epochs: int = 200,
        batch_size: int = 64,
        verbose: bool = False,
    ) -> None:
        self.seed = seed
        self.input_px = input_px
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.verbose = verbose
        self.epochs_run = 0
        self._np = import_neuralpredictors()

    def _prepare(self, rec: Recording, idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(rec.images[idx]).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True, align_corners=False
            )
        return x.contiguous(memory_format=torch.channels_last)

    def fit(self, rec: Recording, train: np.ndarray, val: np.ndarray) -> None:
        lib = self._np
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        x_tr, x_va = self._prepare(rec, train), self._prepare(rec, val)
        self._pix_mean = x_tr.mean((0, 2, 3), keepdim=True)
        self._pix_std = x_tr.std((0, 2, 3), keepdim=True)
        x_tr = (x_tr - self._pix_mean) / self._pix_std
        x_va = (x_va - self._pix_mean) / self._pix_std
        y_all = rec.responses.astype(np.float32)
        scale = y_all[:, train].std(1) + 1e-6
        y_tr = torch.from_numpy((y_all[:, train] / scale[:, None]).T.copy())
        y_va = (y_all[:, val] / scale[:, None]).T

        core = lib.Stacked2dCore(
            input_channels=3,
            hidden_channels=64,
            input_kern=9,
            hidden_kern=7,
            layers=4,
            gamma_input=6.3831,
            gamma_hidden=0.0,
            skip=0,
            final_nonlinearity=True,
            bias=False,
            momentum=0.9,
            pad_input=False,
            batch_norm=True,
            hidden_dilation=1,
            laplace_padding=None,
            input_regularizer="LaplaceL2norm",
            stack=-1,
            depth_separable=True,
            linear=False,
            use_avg_reg=False,
        )
        with torch.no_grad():
            c, h, w = core(x_tr[:2]).shape[1:]
        readout = lib.FullGaussian2d(
            in_shape=(c, h, w),
            outdims=rec.n_neurons,
            bias=True,
            init_mu_range=0.3,
            init_sigma=0.1,
            gauss_type="full",
            mean_activity=y_tr.mean(0),
            feature_reg_weight=0.0076,
        )
        model = _CoreReadout(core, readout)
        criterion = lib.PoissonLoss(avg=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max",
            factor=0.3,
            patience=5,
            threshold=1e-6,
            min_lr=1e-4,
            threshold_mode="abs",
        )
        loss_scale = math.sqrt(len(train) / self.batch_size)

        def val_corr(m: nn.Module) -> float:
            pred = self._forward(m, x_va)
            return float(np.nanmean(_pearson_columns(y_va, pred)))

        gen = torch.Generator().manual_seed(self.seed)
        self.epochs_run = 0
        for epoch, score in lib.early_stopping(
            model,
            val_corr,
            interval=1,
            patience=5,
            start=0,
            max_iter=self.max_epochs,
            maximize=True,
            tolerance=1e-6,
            restore_best=True,
            scheduler=scheduler,
            lr_decay_steps=3,
        ):
            self.epochs_run = epoch
            if self.verbose:
                print(f"    neuralpredictors epoch {epoch:3d} val r {score:.4f}", flush=True)
            model.train()
            for batch in torch.randperm(len(train), generator=gen).split(self.batch_size):
                optimizer.zero_grad()
                xb = x_tr[batch].contiguous(memory_format=torch.channels_last)
                loss = loss_scale * criterion(model(xb), y_tr[batch]) + model.regularizer()
                loss.backward()
                optimizer.step()
        self._model = model.eval()

    @staticmethod
    def _forward(model: nn.Module, x: torch.Tensor) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            return torch.cat([model(x[lo : lo + 256]) for lo in range(0, len(x), 256)]).numpy()

    def predict(self, rec: Recording, test: np.ndarray) -> np.ndarray:
        x = (self._prepare(rec, test) - self._pix_mean) / self._pix_std
        return self._forward(self._model, x)


def describe_import_problem() -> str | None:
    """None when neuralpredictors imports (with the workarounds above), else the reason."""
    try:
        import_neuralpredictors()
    except NeuralPredictorsUnavailable as exc:
        return str(exc)
    return None


__all__ = [
    "LiteRidge",
    "NeuralPredictorsPeer",
    "NeuralPredictorsUnavailable",
    "describe_import_problem",
    "import_neuralpredictors",
]
