"""Loading a store predictor as a differentiable twin: store checks, conversion, parity."""

from __future__ import annotations

from typing import Any

import torch

from .module import OnnxTorchModule, convert_onnx
from .parity import check_parity


def load_differentiable_twin(
    version: Any,
    device: str | torch.device | None = None,
    *,
    trainable: bool = False,
    parity_images: int = 8,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> tuple[OnnxTorchModule, Any]:
    """A predictor version from the store -> (differentiable module on ``device``, its PredictorCard).

    The store's checks run first, then the conversion, then a parity check against ONNX Runtime on the
    CPU (float32, so a mismatch means a conversion bug, not TF32 rounding). Every failure is a
    ModelStoreError naming the version.
    """
    from neurotwin.store import validate_predictor

    card = validate_predictor(version)
    module = convert_onnx(version.model_path, trainable=trainable, source=str(version))
    if parity_images > 0:
        check_parity(
            version.model_path,
            module,
            n=parity_images,
            atol=atol,
            rtol=rtol,
            height=module.input_height or card.input.height,
            width=module.input_width or card.input.width,
        )
    if device is not None:
        module = module.to(device)
    module.requires_grad_(trainable)
    return module, card
