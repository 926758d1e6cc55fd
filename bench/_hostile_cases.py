"""The attack catalogue of bench/hostile.py: bad inputs over every RPC of ``neurotwin serve all``.

Each case is one call a careless or hostile client could make. ``ok`` says whether the server may
accept it (a strange but valid request); accepted replies are checked by ``check`` (finite numbers, the
right count). Everything else must be refused with a client-fault status.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from neurotwin.kserve import grpc_service_pb2 as kpb
from neurotwin.kserve import grpc_service_pb2_grpc as kpb_grpc
from neurotwin.v1 import closed_loop_pb2 as cpb
from neurotwin.v1 import closed_loop_pb2_grpc as cpb_grpc
from neurotwin.v1 import predictor_pb2 as ppb
from neurotwin.v1 import predictor_pb2_grpc as ppb_grpc
from neurotwin.v1 import synthesizer_pb2 as spb
from neurotwin.v1 import synthesizer_pb2_grpc as spb_grpc
from PIL import Image

TWIN = "tiny"
GENERATOR = "tiny-gan"
NEURONS = 5
SIZE = 32
CALL_TIMEOUT = 20.0


@dataclass
class Stubs:
    channel: grpc.Channel
    predictor: ppb_grpc.FiringRatePredictorStub
    kserve: kpb_grpc.GRPCInferenceServiceStub
    synthesizer: spb_grpc.StimulusSynthesizerStub
    closed_loop: cpb_grpc.ClosedLoopStub

    @classmethod
    def on(cls, channel: grpc.Channel) -> Stubs:
        return cls(
            channel,
            ppb_grpc.FiringRatePredictorStub(channel),
            kpb_grpc.GRPCInferenceServiceStub(channel),
            spb_grpc.StimulusSynthesizerStub(channel),
            cpb_grpc.ClosedLoopStub(channel),
        )


@dataclass
class Case:
    rpc: str
    name: str
    call: Callable[[Stubs], Any]
    ok: bool = False
    check: Callable[[Any], str] | None = None


# -- images ----------------------------------------------------------------------------------------


def encode(array: np.ndarray, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is one empty deflate stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke showpage\n"


def bad_image_bytes() -> Iterator[tuple[str, bytes, bool]]:
    """(name, bytes, may be accepted) for Predict's encoded images."""
    rng = np.random.default_rng(0)
    good = encode(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "PNG")
    yield "empty", b"", False
    yield "zeros", bytes(64), False
    for i in range(16):
        yield f"random-{i}", rng.integers(0, 256, 200 + 300 * i, dtype=np.uint8).tobytes(), False
    for cut in (8, 16, 33, 60, 100, 200, len(good) // 3, len(good) // 2, len(good) - 40):
        yield f"truncated-png-{cut}", good[:cut], False
    # Only the 12-byte IEND trailer missing: every pixel is there, so decoding it is right.
    yield "png-without-iend", good[:-12], True
    yield "eps", EPS, False
    yield "pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\n", False
    yield "svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='32' height='32'/>", False
    yield "ppm", b"P6\n32 32\n255\n" + bytes(32 * 32 * 3), False
    for w, h in (
        (100_000, 100_000),
        (2**31 - 1, 1),
        (1, 2**31 - 1),
        (4096, 4096),
        (33, 32),
        (64, 64),
        (0, 0),
    ):
        yield f"header-{w}x{h}", png_header_only(w, h), False
    yield "bomb-4096-zeros", encode(np.zeros((4096, 4096), np.uint8), "PNG"), False
    sixteen = (rng.integers(0, 65536, (SIZE, SIZE))).astype(np.uint16)
    yield "png-16bit", encode(sixteen, "PNG"), True
    yield "tiff-float", encode(rng.random((SIZE, SIZE)).astype(np.float32), "TIFF"), True
    nan = rng.random((SIZE, SIZE)).astype(np.float32)
    nan[0, 0] = np.nan
    yield "tiff-float-nan", encode(nan, "TIFF"), False
    for fmt in ("JPEG", "BMP", "WEBP", "GIF", "TIFF"):
        yield f"ok-{fmt.lower()}", encode(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), fmt), True
    yield "rgba", encode(rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8), "PNG"), True


def finite_rates(expected_images: int) -> Callable[[Any], str]:
    def check(reply: Any) -> str:
        rates = np.asarray(reply.rates, dtype=np.float64)
        if rates.size != expected_images * NEURONS:
            return f"{rates.size} rates for {expected_images} images"
        return "" if np.isfinite(rates).all() else "non-finite rates with status OK"

    return check


def predict_request(images: list[ppb.Image], **fields: Any) -> ppb.PredictRequest:
    return ppb.PredictRequest(**{"model": TWIN, "images": images, **fields})


def raw(shape: list[int], data: bytes) -> ppb.Image:
    return ppb.Image(raw=ppb.RawImage(shape=shape, data=data))


def predictor_cases() -> Iterator[Case]:
    for name, data, ok in bad_image_bytes():
        request = predict_request([ppb.Image(encoded=data)])
        yield Case(
            "Predict",
            f"image-{name}",
            lambda s, r=request: s.predictor.Predict(r, timeout=CALL_TIMEOUT),
            ok,
            finite_rates(1) if ok else None,
        )
    pixels = bytes(SIZE * SIZE * 3)
    raws = {
        "raw-no-shape": raw([], pixels),
        "raw-1d": raw([SIZE * SIZE * 3], pixels),
        "raw-2d": raw([SIZE, SIZE * 3], pixels),
        "raw-4-channels": raw([SIZE, SIZE, 4], bytes(SIZE * SIZE * 4)),
        "raw-zero": raw([0, 0, 3], b""),
        "raw-short": raw([SIZE, SIZE, 3], pixels[:-1]),
        "raw-long": raw([SIZE, SIZE, 3], pixels + b"x"),
        "raw-huge-shape": raw([2**31, 2**31, 3], pixels),
        "raw-4d": raw([1, SIZE, SIZE, 3], pixels),
        "raw-wrong-size": raw([16, 16, 3], bytes(16 * 16 * 3)),
        "raw-empty-data": raw([SIZE, SIZE, 3], b""),
        "no-image-set": ppb.Image(),
    }
    for name, image in raws.items():
        request = predict_request([image])
        yield Case("Predict", name, lambda s, r=request: s.predictor.Predict(r, timeout=CALL_TIMEOUT))
    good = raw([SIZE, SIZE, 3], pixels)
    variants: dict[str, tuple[ppb.PredictRequest, bool]] = {
        "no-images": (predict_request([]), False),
        "too-many-images": (predict_request([good] * 300), False),
        "no-model": (ppb.PredictRequest(images=[good]), False),
        "unknown-model": (predict_request([good], model="nope"), False),
        "path-model": (predict_request([good], model="../../../etc/passwd"), False),
        "long-model": (predict_request([good], model="m" * 100_000), False),
        "nul-model": (predict_request([good], model="tiny\x00x"), False),
        "unicode-model": (predict_request([good], model="tïny-😀"), False),
        "version-999": (predict_request([good], version=999), False),
        "version-max": (predict_request([good], version=2**32 - 1), False),
        "neuron-index-5": (predict_request([good], neurons=ppb.NeuronSelection(indices=[5])), False),
        "neuron-index-max": (
            predict_request([good], neurons=ppb.NeuronSelection(indices=[2**32 - 1])),
            False,
        ),
        "neuron-id-unknown": (predict_request([good], neurons=ppb.NeuronSelection(ids=["nope"])), False),
        "neuron-ids-and-indices": (
            predict_request([good], neurons=ppb.NeuronSelection(ids=["n0"], indices=[0])),
            False,
        ),
    }
    for name, (request, ok) in variants.items():
        yield Case("Predict", name, lambda s, r=request: s.predictor.Predict(r, timeout=CALL_TIMEOUT), ok)
    for name in ("", "nope", "../x", "x" * 10_000):
        yield Case(
            "GetModel",
            f"model-{name[:12] or 'empty'}",
            lambda s, n=name: s.predictor.GetModel(ppb.GetModelRequest(model=n), timeout=CALL_TIMEOUT),
        )
    yield Case(
        "GetModel",
        "version-999",
        lambda s: s.predictor.GetModel(ppb.GetModelRequest(model=TWIN, version=999), timeout=CALL_TIMEOUT),
    )
    # A stream of bad requests: every item must come back as a per-item client-fault error.
    stream_items = [
        ppb.PredictStreamRequest(request_id=str(i), request=predict_request([ppb.Image(encoded=data)]))
        for i, (_, data, ok) in enumerate(bad_image_bytes())
        if not ok
    ][:12]

    def stream_check(replies: Any) -> str:
        bad = [r.request_id for r in replies if not r.HasField("error") or r.error.code in (2, 13, 0)]
        return f"items answered OK or INTERNAL: {bad}" if bad else ""

    yield Case(
        "PredictStream",
        "bad-items",
        lambda s: list(s.predictor.PredictStream(iter(stream_items), timeout=CALL_TIMEOUT)),
        True,
        stream_check,
    )


def kserve_cases() -> Iterator[Case]:
    def infer(**fields: Any) -> Callable[[Stubs], Any]:
        inputs = fields.pop("inputs", None)
        request = kpb.ModelInferRequest(model_name=fields.pop("model_name", TWIN), **fields)
        for spec in inputs or []:
            tensor = request.inputs.add(
                name=spec.get("name", "images"), datatype=spec.get("datatype", "UINT8")
            )
            tensor.shape.extend(spec.get("shape", [1, SIZE, SIZE, 3]))
            if "contents" in spec:
                tensor.contents.CopyFrom(spec["contents"])
        return lambda s: s.kserve.ModelInfer(request, timeout=CALL_TIMEOUT)

    pixels = bytes(SIZE * SIZE * 3)
    table: dict[str, Callable[[Stubs], Any]] = {
        "no-inputs": infer(),
        "unknown-model": infer(model_name="nope", inputs=[{}], raw_input_contents=[pixels]),
        "bad-version": infer(model_version="abc", inputs=[{}], raw_input_contents=[pixels]),
        "version-999": infer(model_version="999", inputs=[{}], raw_input_contents=[pixels]),
        "fp32": infer(inputs=[{"datatype": "FP32"}], raw_input_contents=[bytes(SIZE * SIZE * 3 * 4)]),
        "bad-datatype": infer(inputs=[{"datatype": "COMPLEX"}], raw_input_contents=[pixels]),
        "short-raw": infer(inputs=[{}], raw_input_contents=[pixels[:-1]]),
        "no-contents": infer(inputs=[{}]),
        "wrong-name": infer(inputs=[{"name": "pixels"}], raw_input_contents=[pixels]),
        "neg-shape": infer(inputs=[{"shape": [-1, SIZE, SIZE, 3]}], raw_input_contents=[pixels]),
        "huge-shape": infer(inputs=[{"shape": [2**40, SIZE, SIZE, 3]}], raw_input_contents=[pixels]),
        "3d-shape": infer(inputs=[{"shape": [SIZE, SIZE, 3]}], raw_input_contents=[pixels]),
        "wrong-size": infer(inputs=[{"shape": [1, 16, 16, 3]}], raw_input_contents=[bytes(16 * 16 * 3)]),
        "two-raw": infer(inputs=[{}], raw_input_contents=[pixels, pixels]),
        "contents-too-few": infer(inputs=[{"contents": kpb.InferTensorContents(uint_contents=[1, 2, 3])}]),
        "contents-over-255": infer(
            inputs=[{"contents": kpb.InferTensorContents(uint_contents=[300] * (SIZE * SIZE * 3))}]
        ),
        "contents-fp-for-uint8": infer(
            inputs=[{"contents": kpb.InferTensorContents(fp32_contents=[0.5] * (SIZE * SIZE * 3))}]
        ),
    }
    for datatype in ("INT8", "UINT16", "FP16", "FP64", "BYTES", "BOOL", "INT64", ""):
        table[f"datatype-{datatype or 'empty'}"] = infer(
            inputs=[{"datatype": datatype}], raw_input_contents=[pixels]
        )
    for name, call in table.items():
        yield Case("ModelInfer", name, call)
    for name in ("nope", "", "../x"):
        yield Case(
            "ModelMetadata",
            f"model-{name or 'empty'}",
            lambda s, n=name: s.kserve.ModelMetadata(kpb.ModelMetadataRequest(name=n), timeout=CALL_TIMEOUT),
        )
        yield Case(
            "ModelReady",
            f"model-{name or 'empty'}",
            lambda s, n=name: s.kserve.ModelReady(kpb.ModelReadyRequest(name=n), timeout=CALL_TIMEOUT),
            True,
            lambda r: "" if not r.ready else "unknown model reported ready",
        )
    for name in ("nope", TWIN):
        yield Case(
            "RepositoryModelLoad",
            f"load-{name}",
            lambda s, n=name: s.kserve.RepositoryModelLoad(
                kpb.RepositoryModelLoadRequest(model_name=n), timeout=CALL_TIMEOUT
            ),
        )
        yield Case(
            "RepositoryModelUnload",
            f"unload-{name}",
            lambda s, n=name: s.kserve.RepositoryModelUnload(
                kpb.RepositoryModelUnloadRequest(model_name=n), timeout=CALL_TIMEOUT
            ),
        )


def synthesizer_cases() -> Iterator[Case]:
    def synth(**fields: Any) -> Callable[[Stubs], Any]:
        objective = fields.pop("objective", spb.Objective(neurons=[0]))
        request = spb.SynthesizeRequest(
            **{
                "model": TWIN,
                "generator": GENERATOR,
                "budget": 3,
                "num_images": 1,
                "objective": objective,
                **fields,
            }
        )
        return lambda s: list(s.synthesizer.Synthesize(request, timeout=CALL_TIMEOUT))

    weighted = spb.Objective.WEIGHTED_POPULATION
    table: dict[str, Callable[[Stubs], Any]] = {
        "unknown-model": synth(model="nope"),
        "path-model": synth(model="../../etc"),
        "unknown-generator": synth(generator="nope"),
        "path-generator": synth(generator="../predictors/tiny"),
        "model-version-999": synth(model_version=999),
        "generator-version-999": synth(generator_version=999),
        "method-99": synth(method=99),
        "budget-huge": synth(budget=2**32 - 1),
        "cmaes-budget-2": synth(method=spb.SynthesizeRequest.CMAES, budget=2),
        "genetic-budget-2": synth(method=spb.SynthesizeRequest.GENETIC, budget=2),
        "num-images-huge": synth(num_images=2**32 - 1),
        "image-size-huge": synth(image_size=2**31),
        "image-size-3": synth(image_size=3),
        "format-eps": synth(image_format="eps"),
        "format-junk": synth(image_format="../../x"),
        "lr-nan": synth(learning_rate=math.nan),
        "lr-inf": synth(learning_rate=math.inf),
        "lr-negative": synth(learning_rate=-1.0),
        "lr-huge": synth(learning_rate=3e38),
        "neuron-5": synth(objective=spb.Objective(neurons=[5])),
        "neuron-max": synth(objective=spb.Objective(neurons=[2**32 - 1])),
        "neuron-id-unknown": synth(objective=spb.Objective(neuron_ids=["nope"])),
        "kind-99": synth(objective=spb.Objective(kind=99, neurons=[0])),
        "weights-nan": synth(objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[math.nan, 1])),
        "weights-inf": synth(objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[math.inf, 1])),
        "weights-huge": synth(objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[3e38, 3e38])),
        "weights-count": synth(objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[1])),
        "diversity-nan": synth(objective=spb.Objective(neurons=[0], diversity_weight=math.nan)),
        "diversity-huge": synth(objective=spb.Objective(neurons=[0], diversity_weight=3e38), num_images=2),
        "temperature-nan": synth(
            objective=spb.Objective(
                kind=spb.Objective.ONE_HOT_POPULATION, neurons=[0, 1], temperature=math.nan
            )
        ),
        "lr-above-range": synth(learning_rate=1e4),
        "weights-above-range": synth(
            objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[1e7, 1])
        ),
        "diversity-negative": synth(objective=spb.Objective(neurons=[0], diversity_weight=-1), num_images=2),
        "two-neurons-single": synth(objective=spb.Objective(neurons=[0, 1])),
        "weights-on-single": synth(objective=spb.Objective(neurons=[0], weights=[1.0])),
        "no-neurons": synth(objective=spb.Objective()),
        "num-images-0": synth(num_images=0),
        "num-images-17": synth(num_images=17),
        "image-size-7": synth(image_size=7),
        "image-size-5000": synth(image_size=5000),
        "budget-over-limit": synth(budget=200_000),
        "cmaes-budget-over-limit": synth(method=spb.SynthesizeRequest.CMAES, budget=10**6),
        "cmaes-budget-39": synth(method=spb.SynthesizeRequest.CMAES, budget=39),
        "genetic-budget-19": synth(method=spb.SynthesizeRequest.GENETIC, budget=19),
    }
    for name, call in table.items():
        yield Case("Synthesize", name, call)
    # Strange but valid: accepted, with finite results.
    valid = {
        "seed-max": synth(seed=2**64 - 1),
        "temperature-tiny": synth(
            objective=spb.Objective(kind=spb.Objective.ONE_HOT_POPULATION, neurons=[0, 1], temperature=1e-38)
        ),
        "preview-never": synth(preview_every=2**32 - 1),
        "lr-zero": synth(learning_rate=0.0),
        "weights-zero": synth(objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[0, 0])),
        "weights-at-range": synth(
            objective=spb.Objective(kind=weighted, neurons=[0, 1], weights=[1e6, -1e6])
        ),
        "cmaes-budget-50": synth(method=spb.SynthesizeRequest.CMAES, budget=50),
        "jpeg-8px": synth(image_format="jpg", image_size=8),
    }
    for name, call in valid.items():
        yield Case("Synthesize", name, call, True, synth_check)


def synth_check(replies: Any) -> str:
    result = replies[-1].result if replies else None
    if result is None or not result.images:
        return "no result"
    values = [v for image in result.images for v in image.rates]
    return "" if np.isfinite(values).all() else "non-finite rates with status OK"


def closed_loop_cases(session_id: str, generation: int, stimulus_ids: list[str]) -> Iterator[Case]:
    def create(**fields: Any) -> Callable[[Stubs], Any]:
        guidance = fields.pop("guidance", None)
        request = cpb.CreateSessionRequest(**{"neuron_count": NEURONS, "population_size": 4, **fields})
        if guidance is not None:
            request.guidance.CopyFrom(guidance)
        return lambda s: s.closed_loop.CreateSession(request, timeout=CALL_TIMEOUT)

    junk_png = b"\x89PNG\r\n\x1a\nnot really"
    creates: dict[str, Callable[[Stubs], Any]] = {
        "population-0-neurons-0": create(neuron_count=0),
        "population-1": create(population_size=1),
        "population-huge": create(population_size=2**31 - 1),
        "population-1000-512px": create(population_size=1000, image_size=512),
        "neurons-huge": create(neuron_count=2**31 - 1),
        "target-out-of-range": create(target_neurons=[5]),
        "target-negative": create(target_neurons=[-1]),
        "target-duplicate": create(target_neurons=[0, 0]),
        "optimizer-junk": create(optimizer="adam"),
        "objective-junk": create(objective="max"),
        "image-size-4": create(image_size=4),
        "image-size-huge": create(image_size=2**31 - 1),
        "image-size-negative": create(image_size=-5),
        "format-gif": create(image_format="gif"),
        "sigma0-1e308": create(optimizer_options={"sigma0": 1e308}),
        "sigma0-negative": create(optimizer_options={"sigma0": -1}),
        "sigma0-nan": create(optimizer_options={"sigma0": math.nan}),
        "option-unknown": create(optimizer_options={"learning_rate": 1}),
        "ga-elite-huge": create(optimizer="ga", optimizer_options={"n_elite": 1e9}),
        "ga-std-huge": create(optimizer="ga", optimizer_options={"latent_std": 1e300}),
        "description-40MB": create(description="x" * (40 << 20)),
        "description-5k": create(description="x" * 5000),
        "metadata-huge": create(metadata=cpb.RecordingMetadata(session_description="y" * 200_000)),
        "session-id-slash": create(session_id="../../etc/passwd"),
        "session-id-long": create(session_id="s" * 1000),
        "session-id-nul": create(session_id="a\x00b"),
        "natural-abs": create(natural_source="/etc", natural_per_generation=1),
        "natural-proc": create(natural_source="/proc/self", natural_per_generation=1),
        "natural-dotdot": create(natural_source="../../../../etc", natural_per_generation=1),
        "natural-outside-link": create(natural_source="escape", natural_per_generation=1),
        "natural-missing": create(natural_source="nope", natural_per_generation=1),
        "natural-both": create(natural_source="set", natural_images=[junk_png], natural_per_generation=1),
        "natural-junk": create(natural_images=[junk_png], natural_per_generation=1),
        "natural-eps": create(natural_images=[EPS], natural_per_generation=1),
        "natural-bomb": create(
            natural_images=[encode(np.zeros((4096, 4096), np.uint8), "PNG")], natural_per_generation=1
        ),
        "natural-per-gen-without": create(natural_per_generation=3),
        "natural-per-gen-huge": create(natural_per_generation=2**31 - 1),
        "max-generations-negative": create(max_generations=-1),
        "session-bytes": create(population_size=200, image_size=256, max_generations=2**31 - 1),
        "unknown-generator": create(generator=cpb.ClosedLoopModelRef(name="nope")),
        "generator-version-999": create(generator=cpb.ClosedLoopModelRef(name=GENERATOR, version=999)),
        "unknown-twin": create(guidance=cpb.TwinGuidance(twin=cpb.ClosedLoopModelRef(name="nope"))),
        "guidance-without-twin": create(guidance=cpb.TwinGuidance(candidates_per_presentation=5)),
        "candidates-huge": create(
            guidance=cpb.TwinGuidance(
                twin=cpb.ClosedLoopModelRef(name=TWIN), candidates_per_presentation=2**31 - 1
            )
        ),
        "twin-neuron-out-of-range": create(
            guidance=cpb.TwinGuidance(twin=cpb.ClosedLoopModelRef(name=TWIN), twin_neurons=[99])
        ),
        "neuron-ids-count": create(neuron_ids=["a", "b"]),
        "neuron-ids-duplicate": create(neuron_count=2, neuron_ids=["a", "a"]),
        "metadata-duration-nan": create(metadata=cpb.RecordingMetadata(presentation_duration=math.nan)),
        "metadata-start-inf": create(metadata=cpb.RecordingMetadata(session_start_time=math.inf)),
    }
    for population in (-1, 1001, 10**6):
        creates[f"population-{population}"] = create(population_size=population)
    for size in (-1, 7, 1025, 10**6):
        creates[f"image-size-{size}"] = create(image_size=size)
    for count in (-1, 100_001):
        creates[f"neurons-{count}"] = create(neuron_count=count)
    for name, value in (("sigma0", 1e4), ("latent_std", -1), ("mutation_rate", 2), ("heritability", -0.5)):
        optimizer = "cma-es" if name == "sigma0" else "ga"
        creates[f"{optimizer}-{name}-{value:g}"] = create(
            optimizer=optimizer, optimizer_options={name: value}
        )
    for name, call in creates.items():
        yield Case("CreateSession", name, call)

    # Valid: natural images from the root, where one file is a link to an image outside it. That image
    # (uniformly 251) must never come back as a stimulus.
    def natural_session(stubs: Stubs) -> Any:
        created = create(natural_source="set", natural_per_generation=3)(stubs)
        return stubs.closed_loop.Ask(cpb.AskRequest(session_id=created.session_id), timeout=CALL_TIMEOUT)

    def no_leak(reply: Any) -> str:
        from neurotwin.imagecodec import decode_image

        naturals = [s for s in reply.stimuli if s.kind == "natural"]
        leaked = [s.natural_name for s in naturals if int(decode_image(s.image).min()) == 251]
        if leaked:
            return f"a file outside the natural root came back as a stimulus: {leaked}"
        return "" if len(naturals) == 3 else f"{len(naturals)} natural stimuli, expected 3"

    yield Case("CreateSession", "natural-root-with-outside-link", natural_session, True, no_leak)
    for sid in ("", "nope", "../x", "s" * 10_000):
        label = sid[:10] or "empty"
        yield Case(
            "Ask",
            f"session-{label}",
            lambda s, i=sid: s.closed_loop.Ask(cpb.AskRequest(session_id=i), timeout=CALL_TIMEOUT),
        )
        yield Case(
            "GetSession",
            f"session-{label}",
            lambda s, i=sid: s.closed_loop.GetSession(
                cpb.GetSessionRequest(session_id=i), timeout=CALL_TIMEOUT
            ),
        )
        yield Case(
            "CloseSession",
            f"session-{label}",
            lambda s, i=sid: s.closed_loop.CloseSession(
                cpb.CloseSessionRequest(session_id=i), timeout=CALL_TIMEOUT
            ),
        )
        yield Case(
            "ExportSession",
            f"session-{label}",
            lambda s, i=sid: list(
                s.closed_loop.ExportSession(cpb.ExportSessionRequest(session_id=i), timeout=CALL_TIMEOUT)
            ),
        )
    for fmt in ("pdf", "../x", "nwb\x00"):
        yield Case(
            "ExportSession",
            f"format-{fmt[:6]}",
            lambda s, f=fmt: list(
                s.closed_loop.ExportSession(
                    cpb.ExportSessionRequest(session_id=session_id, format=f), timeout=CALL_TIMEOUT
                )
            ),
        )

    def tell(values: dict[str, Any] | None = None, **fields: Any) -> Callable[[Stubs], Any]:
        request = cpb.TellRequest(**{"session_id": session_id, "generation": generation, **fields})
        for sid, rates in (values or {}).items():
            response = request.responses.add(stimulus_id=sid)
            if isinstance(rates, list) and rates and isinstance(rates[0], list):
                for repeat in rates:
                    response.repeats.add(rates=repeat)
            else:
                response.rates.extend(rates)
        return lambda s: s.closed_loop.Tell(request, timeout=CALL_TIMEOUT)

    first = stimulus_ids[0]
    ok = [1.0] * NEURONS
    tells: dict[str, Callable[[Stubs], Any]] = {
        "nan": tell({first: [math.nan, *ok[1:]]}),
        "inf": tell({first: [math.inf, *ok[1:]]}),
        "minus-inf": tell({first: [-math.inf, *ok[1:]]}),
        "float-max": tell({first: [3.4e38] * NEURONS}),
        "float-max-negative": tell({first: [-3.4e38] * NEURONS}),
        "too-few": tell({first: ok[:-1]}),
        "too-many": tell({first: [*ok, 1.0]}),
        "empty": tell({first: []}),
        "unknown-stimulus": tell({"g0000-s999": ok}),
        "generation-negative": tell({first: ok}, generation=-1),
        "generation-future": tell({first: ok}, generation=generation + 5),
        "ragged-repeats": tell({first: [ok, ok[:-1]]}),
        "many-repeats": tell({first: [ok] * 100_000}),
        "unknown-session": tell({first: ok}, session_id="nope"),
        "no-responses": tell({}),
        "duplicate": tell({first: ok}),
    }
    # The duplicate case sends the same stimulus twice in one request.
    duplicate = cpb.TellRequest(session_id=session_id, generation=generation)
    for _ in range(2):
        duplicate.responses.add(stimulus_id=first, rates=ok)
    tells["duplicate"] = lambda s: s.closed_loop.Tell(duplicate, timeout=CALL_TIMEOUT)
    onset = cpb.TellRequest(session_id=session_id, generation=generation)
    onset.responses.add(stimulus_id=first, rates=ok, onset_time=math.nan, onset_known=True)
    tells["onset-nan"] = lambda s: s.closed_loop.Tell(onset, timeout=CALL_TIMEOUT)
    duration = cpb.TellRequest(session_id=session_id, generation=generation)
    duration.responses.add(stimulus_id=first, rates=ok, duration=-1.0)
    tells["duration-negative"] = lambda s: s.closed_loop.Tell(duration, timeout=CALL_TIMEOUT)
    # Every non-finite or overflowing value at the first and the last neuron, as rates and as repeats.
    for label, value in (
        ("nan", math.nan),
        ("inf", math.inf),
        ("-inf", -math.inf),
        ("1e39", 1e39),
        ("-1e39", -1e39),
    ):
        for position in (0, NEURONS - 1):
            rates = list(ok)
            rates[position] = value
            tells[f"{label}-at-{position}"] = tell({first: rates})
            tells[f"{label}-at-{position}-repeat"] = tell({first: [ok, rates]})
    for name, call in tells.items():
        yield Case("Tell", name, call)


def health_cases() -> Iterator[Case]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name in ("nope", "x" * 10_000, "../", "\x00"):

        def call(stubs: Stubs, n: str = name) -> Any:
            return health_pb2_grpc.HealthStub(stubs.channel).Check(
                health_pb2.HealthCheckRequest(service=n), timeout=5
            )

        yield Case("Health.Check", f"service-{name[:8]!r}", call)
