"""Which torch device to run on: the one reading of ``--device auto|cpu|cuda[:N]`` every part shares."""

from __future__ import annotations

import torch

from neurotwin.errors import FailedPrecondition, InvalidInput

DEVICE_CHOICES = "auto, cpu or cuda[:N]"


def select_device(choice: str = "auto", what: str = "device") -> torch.device:
    """``auto`` is the first GPU when torch sees one, else the CPU; ``cuda`` without a GPU is refused.

    ``what`` names the setting in messages (for example "synthesizer device").
    """
    name = choice.strip().lower()
    if name == "auto":
        return default_device()
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InvalidInput(f"{what} {choice!r}: expected {DEVICE_CHOICES}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"{what} {name}: no usable CUDA device is visible to this process")
    return torch.device(name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
