"""Export a trained twin to ONNX (opset 17), prove parity with ONNX Runtime, write card + model to the store.

The exported graph takes ``images`` uint8 [N, H, W, 3] (N, H and W dynamic: the graph resizes to the
training resolution) and returns ``rates`` float32 [N, neurons]. Casting, resizing and normalization are
inside the graph, so every runtime computes the same rates from the same bytes. An ensemble twin (more
than one member) returns the members' mean as ``rates`` and, second, every member's rates as
``member_rates`` float32 [N, members, neurons]; parity is checked for both, member by member.
"""

from __future__ import annotations

import datetime
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neurotwin.card import MEMBER_OUTPUT, ONNX_CARD_KEY, InputSpec, NeuronStats, OutputSpec, PredictorCard
from neurotwin.errors import NeurotwinError, ParityError
from neurotwin.integrity import REFERENCE_COUNT, Reference, record_integrity, reference_images
from neurotwin.store import PREDICTORS, ModelStore, ModelVersion, validate_predictor
from neurotwin.training.twin import TwinModel

OPSET = 17
RATES = "rates"
# Parity: |onnx - torch| <= ATOL + RTOL * max |torch rate| for every image and neuron. The graphs are
# the same float32 arithmetic in a different order, so anything beyond this is an export bug.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


class _EnsembleGraph(nn.Module):
    """What an ensemble twin exports: (members' mean [N, K], members' rates [N, members, K])."""

    def __init__(self, model: TwinModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = self.model.member_rates(images)
        return members.mean(dim=1), members


def output_names(model: TwinModel) -> list[str]:
    """The graph outputs ``model`` exports to, in order."""
    return [RATES, MEMBER_OUTPUT] if model.members > 1 else [RATES]


def export_onnx(model: TwinModel, *, example_size: int | None = None) -> bytes:
    """Serialize ``model`` (put in eval mode, on the CPU) as ONNX bytes with dynamic batch and image size."""
    model = model.cpu().eval()
    size = int(example_size or model.input_size)
    names = output_names(model)
    graph: nn.Module = _EnsembleGraph(model) if len(names) > 1 else model
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript (not a dependency); the
        # TorchScript exporter handles these static-shaped graphs exactly and says it is deprecated.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
            buffer,
            input_names=["images"],
            output_names=names,
            dynamic_axes={
                "images": {0: "batch", 1: "height", 2: "width"},
                **{n: {0: "batch"} for n in names},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def ort_session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def onnx_predict(
    session: Any, images: np.ndarray, batch_size: int = 128, *, output: str | None = None
) -> np.ndarray:
    """One output (by name; default the graph's first, the rates) from an ONNX Runtime session, in
    batches: [N, K], or [N, members, K] for an ensemble's member output."""
    name = session.get_inputs()[0].name
    info = next((o for o in session.get_outputs() if output in (None, o.name)), None)
    if info is None:
        raise NeurotwinError(f"the graph has no output {output!r}")
    outs = [
        session.run([info.name], {name: np.ascontiguousarray(images[i : i + batch_size], dtype=np.uint8)})[0]
        for i in range(0, len(images), batch_size)
    ]
    if not outs:
        return np.zeros((0, *[int(d) if isinstance(d, int) else 0 for d in info.shape[1:]]), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32)


def parity_check(
    model: TwinModel,
    model_bytes: bytes,
    images: np.ndarray,
    *,
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
) -> dict[str, Any]:
    """Compare torch and ONNX Runtime on ``images`` (and on one image alone, to exercise the dynamic
    batch), for the rates and, for an ensemble, every member's rates; raise :class:`ParityError` above
    tolerance. Returns the figures for the card."""
    if len(images) == 0:
        raise ParityError("parity check needs at least one image")
    model = model.cpu().eval()
    session = ort_session(model_bytes)
    report: dict[str, Any] = {"images": len(images), "runtime": "onnxruntime-cpu"}
    expected = model.predict(images)
    report.update(_compare(RATES, expected, session, images, atol, rtol))
    if model.members > 1:
        members = model.predict(images, members=True)
        figures = []
        for member in range(model.members):
            found = _compare(MEMBER_OUTPUT, members[:, member], session, images, atol, rtol, member=member)
            figures.append(found["max_abs_diff"])
        report["members"] = model.members
        report["member_max_abs_diff"] = figures
    return report


def _compare(
    output: str,
    expected: np.ndarray,
    session: Any,
    images: np.ndarray,
    atol: float,
    rtol: float,
    member: int | None = None,
) -> dict[str, float]:
    got = onnx_predict(session, images, output=output)
    single = onnx_predict(session, images[:1], output=output)
    what = output if member is None else f"{output} of member {member}"
    if member is not None:
        if got.ndim != 3 or got.shape[1] <= member:
            raise ParityError(f"ONNX {output} has shape {list(got.shape)}; expected [N, members, K]")
        got, single = got[:, member], single[:, member]
    if got.shape != expected.shape:
        raise ParityError(f"ONNX {what}: shape {list(got.shape)}, torch {list(expected.shape)}")
    tolerance = atol + rtol * float(np.abs(expected).max())
    diff = float(np.abs(got - expected).max())
    single_diff = float(np.abs(single - expected[:1]).max())
    if not np.isfinite(diff) or diff > tolerance or single_diff > tolerance:
        raise ParityError(
            f"ONNX Runtime differs from torch by {max(diff, single_diff):.3g} in {what} "
            f"(tolerance {tolerance:.3g}) on {len(images)} held-out images"
        )
    return {"max_abs_diff": diff, "tolerance": tolerance}


def neuron_stats(
    predicted: np.ndarray, measured: np.ndarray | None = None, *, digits: int = 5
) -> NeuronStats:
    """Per-neuron max and 99th percentile of predicted (and measured) rates, both [images, neurons]."""

    def listed(values: np.ndarray) -> list[float]:
        return [round(float(v), digits) for v in values]

    stats = NeuronStats(
        image_count=int(predicted.shape[0]),
        predicted_max=listed(predicted.max(axis=0)),
        predicted_p99=listed(np.percentile(predicted, 99, axis=0)),
    )
    if measured is not None:
        stats.measured_max = listed(measured.max(axis=0))
        stats.measured_p99 = listed(np.percentile(measured, 99, axis=0))
    return stats


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def embed_card(model_bytes: bytes, card: PredictorCard) -> bytes:
    """The model with the card JSON in its metadata_props (replacing any earlier card)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != ONNX_CARD_KEY]
    del model.metadata_props[:]
    for key, value in [*keep, (ONNX_CARD_KEY, card.to_json())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def write_predictor(
    store: ModelStore, name: str, model_bytes: bytes, card: PredictorCard, recorded_by: str = "export"
) -> ModelVersion:
    """Write model (card embedded) + card.json as the next version of ``name``, validated first, with
    its checksums and reference outputs (``integrity.json``, ``reference.npz``).

    Validation runs on the staging folder, so a broken twin never becomes a version (the staging folder
    is removed and the error propagates); a valid one appears atomically.
    """
    payload = embed_card(model_bytes, card)
    with store.new_version(PREDICTORS, name) as folder:
        (folder / "model.onnx").write_bytes(payload)
        card.save(folder / "card.json")
        validate_predictor(ModelVersion(PREDICTORS, name, 0, Path(folder)))
        spec = card.input
        images = reference_images(REFERENCE_COUNT, spec.height, spec.width, spec.channels)
        outputs = onnx_predict(ort_session(payload), images)
        record_integrity(folder, ["model.onnx"], Reference(images, outputs), recorded_by=recorded_by)
    return store.resolve(PREDICTORS, name)


def build_card(
    *,
    name: str,
    neuron_ids: list[str],
    image_size: tuple[int, int],
    training: Mapping[str, Any],
    metrics: Mapping[str, Any],
    stats: NeuronStats | None,
    description: str = "",
    units: str | None = None,
    members: int = 1,
) -> PredictorCard:
    output = OutputSpec(members=members, member_output=MEMBER_OUTPUT if members > 1 else None)
    if units is not None:
        output.units = units
    return PredictorCard(
        name=name,
        neuron_ids=list(neuron_ids),
        input=InputSpec(height=int(image_size[0]), width=int(image_size[1])),
        output=output,
        opset=OPSET,
        description=description,
        created=now_iso(),
        training=dict(training),
        metrics=dict(metrics),
        neuron_stats=stats,
    )


def export_twin(
    model: TwinModel,
    *,
    store: ModelStore,
    name: str,
    neuron_ids: list[str],
    image_size: tuple[int, int],
    parity_images: np.ndarray,
    stats_images: np.ndarray,
    stats_measured: np.ndarray | None,
    training: Mapping[str, Any],
    metrics: Mapping[str, Any],
    description: str = "",
    units: str | None = None,
) -> tuple[ModelVersion, PredictorCard]:
    """Export, check parity (raises :class:`ParityError`), compute neuron statistics (of the rates, the
    members' mean for an ensemble) through ONNX Runtime over ``stats_images`` (the training images), and
    register a new version in ``store``."""
    model_bytes = export_onnx(model)
    parity = parity_check(model, model_bytes, parity_images)
    predicted = onnx_predict(ort_session(model_bytes), stats_images)
    card = build_card(
        name=name,
        neuron_ids=neuron_ids,
        image_size=image_size,
        training={**training, "parity": parity},
        metrics=metrics,
        stats=neuron_stats(predicted, stats_measured),
        description=description,
        units=units,
        members=model.members,
    )
    version = write_predictor(store, name, model_bytes, card)
    return version, card
