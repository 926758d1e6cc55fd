"""Loading a store predictor as a differentiable twin: store checks, conversion, parity."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from neurotwin.errors import ModelStoreError

from .module import OnnxTorchModule, convert_onnx
from .parity import check_parity
from .pruning import prune_outputs, validate_outputs


def load_differentiable_twin(
    version: Any,
    device: str | torch.device | None = None,
    *,
    trainable: bool = False,
    parity_images: int = 8,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    outputs: Sequence[int] | None = None,
) -> tuple[OnnxTorchModule, Any]:
    """A predictor version from the store -> (differentiable module on ``device``, its PredictorCard).

    The store's checks run first, then the conversion, then a parity check against ONNX Runtime on the
    CPU (float32, so a mismatch means a conversion bug, not TF32 rounding). Every failure is a
    ModelStoreError naming the version.

    With ``outputs`` (neuron indices of the card, distinct), the graph is pruned first
    (:func:`prune_outputs`) so the module computes only those neurons: its output column ``j`` is neuron
    ``outputs[j]`` (callers remap objective indices; ``module.kept_outputs`` records the list), and
    parity compares those columns with the full model's. The card returned is the full model's. A bad
    list raises InvalidInput.
    """
    from neurotwin.store import validate_predictor

    card = validate_predictor(version)
    if outputs is None:
        module = convert_onnx(version.model_path, trainable=trainable, source=str(version))
    else:
        module = _pruned_module(version, validate_outputs(outputs, card.neuron_count), trainable)
    if parity_images > 0:
        check_parity(
            version.model_path,
            module,
            n=parity_images,
            atol=atol,
            rtol=rtol,
            height=module.input_height or card.input.height,
            width=module.input_width or card.input.width,
            outputs=module.kept_outputs,
        )
    if device is not None:
        module = module.to(device)
    module.requires_grad_(trainable)
    return module, card


def _pruned_module(version: Any, outputs: tuple[int, ...], trainable: bool) -> OnnxTorchModule:
    import onnx

    try:
        model = onnx.load(str(version.model_path))
    except Exception as exc:
        raise ModelStoreError(f"{version}: not a readable ONNX model ({exc})") from exc
    pruned = prune_outputs(model, outputs)
    module = convert_onnx(pruned.model, trainable=trainable, source=f"{version} outputs {list(outputs)}")
    module.kept_outputs = pruned.outputs
    module.pruning = dataclasses.replace(pruned, model=None)  # the figures, not a second copy of weights
    return module
