"""Gradient ascent on latent codes (DGN-AM): one step at a time, so a scheduler can batch many requests."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from neurotwin.engines.optimizers.state import STATE_VERSION, config_from_dict, decode_array, encode_array
from neurotwin.errors import InvalidInput


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
        self.config = config_from_dict(GradientConfig, state["config"])
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
        self = cls(torch.from_numpy(latents).to(device), config_from_dict(GradientConfig, state["config"]))
        self.load_state_dict(state)
        return self
