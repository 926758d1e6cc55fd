"""Loading a store predictor as a differentiable twin: store checks, conversion, parity."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from neurotwin.errors import ModelStoreError

from .module import OnnxTorchModule, convert_onnx
from .parity import check_parity
from .pruning import prune_outputs, select_outputs, validate_outputs


def load_differentiable_twin(
    version: Any,
    device: str | torch.device | None = None,
    *,
    trainable: bool = False,
    parity_images: int = 8,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    outputs: Sequence[int] | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[OnnxTorchModule, Any]:
    """A predictor version from the store -> (differentiable module on ``device``, its PredictorCard).

    The store's checks run first, then the conversion, then a parity check against ONNX Runtime on the
    CPU (float32, so a mismatch means a conversion bug, not TF32 rounding). Every failure is a
    ModelStoreError naming the version.

    ``output_names`` chooses the graph outputs the module returns, in that order: by default the rates
    alone (the module returns a tensor [N, K]); an ensemble twin also has its members' rates
    (``card.output.member_output``, [N, members, K]), and asking for both returns a tuple. What no chosen
    output needs is not converted. Parity is checked for every chosen output.

    With ``outputs`` (neuron indices of the card, distinct), the graph is pruned first
    (:func:`prune_outputs`) so the module computes only those neurons: its neuron ``j`` (the last axis of
    every output) is neuron ``outputs[j]`` (callers remap objective indices; ``module.kept_outputs``
    records the list), and parity compares those neurons with the full model's. The card returned is the
    full model's. A bad list raises InvalidInput.
    """
    import onnx

    from neurotwin.store import validate_predictor

    card = validate_predictor(version)
    try:
        model = onnx.load(str(version.model_path))
    except Exception as exc:
        raise ModelStoreError(f"{version}: not a readable ONNX model ({exc})") from exc
    if output_names is not None:
        model = select_outputs(model, output_names)
    elif card.output.member_output is not None:
        model = select_outputs(model, [card.output.name])
    if outputs is None:
        module = convert_onnx(model, trainable=trainable, source=str(version))
    else:
        module = _pruned_module(version, model, validate_outputs(outputs, card.neuron_count), trainable)
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


def _pruned_module(version: Any, model: Any, outputs: tuple[int, ...], trainable: bool) -> OnnxTorchModule:
    pruned = prune_outputs(model, outputs)
    module = convert_onnx(pruned.model, trainable=trainable, source=f"{version} outputs {list(outputs)}")
    module.kept_outputs = pruned.outputs
    module.pruning = dataclasses.replace(pruned, model=None)  # the figures, not a second copy of weights
    return module
