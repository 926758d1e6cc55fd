"""``neurotwin synthesize --model NAME --neuron K --out DIR``: preferred stimuli for a neuron.

Runs the synthesis engine in this process (no server needed), or, with ``--address``, asks a running
``neurotwin serve synthesizer``. Writes one PNG per image, ``latents.npy``, ``summary.json`` and
``contact_sheet.png``: the synthesized images with their activations beside the neuron's top natural
images (from ``--data``), all scored by the same twin.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.commands._options import (
    add_connection,
    add_generator,
    add_model,
    add_model_store,
    channel_config,
    check_store,
    generator_ref,
    model_ref,
    resolve,
    store_root,
)
from neurotwin.errors import DataError, InvalidInput, NeurotwinError
from neurotwin.store import PREDICTORS

HELP = "synthesize preferred stimuli for a neuron"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CELL = 128  # contact-sheet cell side in pixels
CAPTION = 30  # caption band under each cell


def configure(parser: argparse.ArgumentParser) -> None:
    add_model(parser, version_aliases=("--model-version",))
    parser.add_argument(
        "--neuron",
        required=True,
        action="append",
        metavar="K",
        help="0-based neuron index or neuron id; repeat for a population objective",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--method", choices=("gradient", "cmaes", "genetic"), default="gradient")
    add_generator(
        parser,
        help="generator NAME[:VERSION] in the store, or 'pixels' for no generator (default: the "
        "synthesizer's default generator)",
    )
    parser.add_argument(
        "--objective",
        choices=("single", "weighted", "one_hot"),
        default=None,
        help="single neuron (default for one --neuron), weighted population (default for several), "
        "or one-hot population (drive the first neuron, suppress the others)",
    )
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="weights for 'weighted'")
    parser.add_argument("--diversity", type=float, default=0.0, help="weight of the diversity term")
    parser.add_argument(
        "--budget",
        type=int,
        default=0,
        help="gradient steps, or twin evaluations per image for cmaes/genetic (default: server default)",
    )
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=0, help="output side in px (default: twin's input)")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png", help="image files to write")
    parser.add_argument("--learning-rate", type=float, default=0.0, help="gradient step size (0: default)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="natural images for the contact sheet: a folder or zip of images, or a recording root "
        "with images/ and responses/ (see --session)",
    )
    parser.add_argument("--session", default=None, help="session of a recording root given with --data")
    parser.add_argument("--top", type=int, default=0, help="top natural images shown (default: --num-images)")
    add_model_store(parser, legacy=False)
    parser.add_argument("--device", default="auto", help="in-process engine device: auto, cpu or cuda")
    add_connection(parser, "a synthesizer service to use (default: run the engine in this process)", None)
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds before giving up (default: none)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- natural images --------------------------------------------------------------------------------


def _decode_resized(data: bytes, size: tuple[int, int], what: str) -> np.ndarray:
    from neurotwin.imagecodec import decode_image, resize_uint8

    return resize_uint8(decode_image(data, what=what), *size)


def _number_key(name: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", Path(name).stem)
    return (int(digits[-1]) if digits else -1, name)


def read_image_collection(
    path: Path, size: tuple[int, int], session: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, H, W, 3] images resized to ``size`` and their names, from a folder, a zip, or a
    recording root (``images/images_<session>.zip`` beside ``responses/``)."""
    if not path.exists():
        raise DataError(path, None, "no such file or directory")
    if path.is_dir() and (path / "images").is_dir() and (path / "responses").is_dir():
        from neurotwin.training.datasets import load_recording

        recording = load_recording(path, session=session)
        images = np.stack([_resize_array(img, size) for img in recording.images])
        return images, list(recording.image_ids)
    items: list[tuple[str, bytes]] = []
    if path.is_dir():
        for file in sorted(path.rglob("*"), key=lambda p: _number_key(p.name)):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                items.append((file.name, file.read_bytes()))
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [
                n
                for n in archive.namelist()
                if Path(n).suffix.lower() in IMAGE_SUFFIXES and not Path(n).name.startswith(".")
            ]
            for name in sorted(names, key=_number_key):
                items.append((Path(name).name, archive.read(name)))
    else:
        items.append((path.name, path.read_bytes()))
    if not items:
        raise DataError(path, None, "no image files found")
    images = np.stack([_decode_resized(data, size, f"{path}: {name}") for name, data in items])
    return images, [Path(name).stem for name, _ in items]


def _resize_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from neurotwin.imagecodec import resize_uint8

    return resize_uint8(image, *size)


def _onnx_scorer(model_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def score(images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [session.run(None, {name: images[i : i + 64]})[0] for i in range(0, len(images), 64)]
        )

    return score


# -- synthesis -------------------------------------------------------------------------------------


@dataclass
class TwinInfo:
    neuron_ids: list[str]
    size: tuple[int, int]
    predicted_max: list[float]
    score: Callable[[np.ndarray], np.ndarray] | None


def _local_twin(store_root: str, model: str, version: int) -> TwinInfo | None:
    from neurotwin.card import PredictorCard
    from neurotwin.store import PREDICTORS, ModelStore

    try:
        found = ModelStore(store_root).resolve(PREDICTORS, model, version or None)
        card = PredictorCard.load(found.card_path)
    except NeurotwinError:
        return None
    stats = card.neuron_stats
    return TwinInfo(
        neuron_ids=list(card.neuron_ids),
        size=(card.input.height, card.input.width),
        predicted_max=list(stats.predicted_max) if stats else [],
        score=_onnx_scorer(found.model_path),
    )


def _neuron_values(values: list[str]) -> list[int] | list[str]:
    # All-digit arguments are indices; anything else is read as neuron ids.
    if all(v.isdigit() for v in values):
        return [int(v) for v in values]
    return list(values)


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    objective = args.objective or ("single" if len(args.neuron) == 1 else "weighted")
    return {
        "model_version": args.model_version,
        "objective": objective,
        "weights": args.weights or (),
        "diversity": args.diversity,
        "method": args.method,
        "generator": args.generator,
        "generator_version": args.generator_version,
        "budget": args.budget,
        "num_images": args.num_images,
        "image_size": args.image_size,
        "image_format": args.format,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "preview_every": 0,
    }


def _events(args: argparse.Namespace) -> Any:
    """The synthesis event stream (Progress..., Synthesis), local or remote, plus a closer."""
    from neurotwin.client.synthesizer import build_request, parse_events

    request = build_request(args.model, _neuron_values(args.neuron), **_request_options(args))
    if args.address:
        from neurotwin.client.synthesizer import SynthesizerClient

        client = SynthesizerClient(config=channel_config(args), timeout=args.timeout)
        return client.stream_request(request), client.close
    import time

    from neurotwin.server.synthesizer import Settings, SynthesizerService

    settings = Settings(model_store=args.model_store, device=args.device, max_jobs=1, max_images=64)
    service = SynthesizerService(settings)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    return parse_events(service.run(request, deadline)), service.stop


class _Bar:
    """A tqdm bar over optimization steps, showing the best target activation so far."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.bar: Any = None
        self.enabled = enabled
        self.desc = desc
        self.best = float("-inf")

    def update(self, progress: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            total = getattr(progress, "total_steps", 0) or None
            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, leave=True)
        if progress.activation:
            self.best = max(self.best, max(progress.activation))
        self.bar.update(progress.step - self.bar.n)
        self.bar.set_postfix(best=f"{self.best:.3g}", evals=progress.evaluations, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from neurotwin.client.synthesizer import Progress, Synthesis, collect

    _normalize(args)
    if args.num_images < 1:
        raise InvalidInput("--num-images must be at least 1")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    twin = _local_twin(args.model_store, args.model, args.model_version)
    if args.data is not None and twin is None and not args.address:
        raise InvalidInput(f"--data: twin {args.model!r} not found in {args.model_store}")

    events, close = _events(args)
    bar = _Bar(not args.no_progress, f"{args.method} {args.model}:{','.join(args.neuron)}")

    def on_progress(progress: Progress) -> None:
        bar.update(progress)

    try:
        result: Synthesis = collect(events, on_progress)
    finally:
        bar.close()
        close()

    stem = _safe(f"{args.model}_{'-'.join(args.neuron)}_{args.method}")
    suffix = "png" if args.format == "png" else "jpg"
    files = []
    for i, image in enumerate(result.images):
        path = out / f"{stem}_{i:02d}.{suffix}"
        path.write_bytes(image.image)
        files.append(path.name)
    np.save(out / "latents.npy", np.stack([img.latent for img in result.images]))

    naturals: tuple[np.ndarray, list[str], np.ndarray] | None = None
    target = result.target_neuron
    if args.data is not None:
        size = twin.size if twin is not None else result.pixels().shape[1:3]
        images, names = read_image_collection(args.data, size, args.session)
        scorer = twin.score if twin is not None else _remote_scorer(args)
        rates = scorer(images)[:, target]
        order = np.argsort(-rates, kind="stable")[: (args.top or args.num_images)]
        naturals = (images[order], [names[i] for i in order], rates[order])
    generator = result.generator or args.generator or "default generator"
    if result.generator_version:
        generator += f" v{result.generator_version}"
    title = f"{args.model} v{result.model_version}  neuron {result.target_id}  {args.method} / {generator}"
    sheet = contact_sheet(result, naturals, title=title)
    sheet.save(out / "contact_sheet.png")
    summary = {
        "model": args.model,
        "model_version": result.model_version,
        "generator": result.generator or args.generator or "default",
        "generator_version": result.generator_version,
        "method": args.method,
        "neurons": args.neuron,
        "target_neuron": result.target_id,
        "seed": args.seed,
        "steps": result.steps,
        "evaluations": result.evaluations,
        "elapsed_seconds": round(result.elapsed_seconds, 3),
        "images": [
            {
                "file": name,
                "activation": img.activation,
                "activation_ratio": img.activation_ratio,
                "objective": img.objective,
            }
            for name, img in zip(files, result.images, strict=True)
        ],
    }
    if naturals is not None:
        summary["natural_top"] = [
            {"image": name, "activation": float(rate)}
            for name, rate in zip(naturals[1], naturals[2], strict=True)
        ]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for entry in summary["images"]:
        ratio = f" ({entry['activation_ratio']:.2f}x natural max)" if entry["activation_ratio"] else ""
        print(f"{out / entry['file']}: activation {entry['activation']:.4g}{ratio}")
    print(f"{out / 'contact_sheet.png'}")
    return 0


def _normalize(args: argparse.Namespace) -> None:
    """NAME[:VERSION] flags into the name/version fields the request builder takes."""
    twin, generator = model_ref(args), generator_ref(args)
    assert twin is not None  # --model is required
    args.model, args.model_version = twin.name, twin.version or 0
    args.generator = generator.name if generator else ""
    args.generator_version = generator.version or 0 if generator else 0
    args.model_store = store_root(args)
    if not args.address:
        # In this process the store must hold the twin; a server checks its own store.
        resolve(check_store(args.model_store, (PREDICTORS,)), PREDICTORS, twin)


def _remote_scorer(args: argparse.Namespace) -> Callable[[np.ndarray], np.ndarray]:
    """Score natural images with the predictor service at --address (when the twin is not local)."""
    from neurotwin.client import PredictorClient

    client = PredictorClient(config=channel_config(args))

    def score(images: np.ndarray) -> np.ndarray:
        parts = [
            client.predict(images[i : i + 64], args.model, args.model_version or None).rates
            for i in range(0, len(images), 64)
        ]
        return np.concatenate(parts)

    return score


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


# -- contact sheet ---------------------------------------------------------------------------------


def contact_sheet(
    result: Any,
    naturals: tuple[np.ndarray, list[str], np.ndarray] | None,
    title: str = "",
) -> Any:
    """A PIL image: synthesized images (activation, ratio to the natural maximum) in the first row,
    the top natural images (activation, ratio) in the second."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    synthesized = [
        (
            Image.open(io.BytesIO(img.image)).convert("RGB"),
            _caption(img.activation, img.activation_ratio, f"image {i}"),
        )
        for i, img in enumerate(result.images)
    ]
    reference = next((img.reference_max for img in result.images if img.reference_max), 0.0)
    natural_cells = []
    if naturals is not None:
        for image, name, rate in zip(*naturals, strict=True):
            ratio = float(rate) / reference if reference else 0.0
            natural_cells.append((Image.fromarray(image), _caption(float(rate), ratio, name)))
    columns = max(len(synthesized), len(natural_cells), 1)
    rows = [("synthesized", synthesized)] + ([("top natural", natural_cells)] if natural_cells else [])
    label_width = 96
    header = 24
    width = label_width + columns * (CELL + 8) + 8
    height = header + len(rows) * (CELL + CAPTION + 8) + 8
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title, fill="black", font=font)
    for r, (label, cells) in enumerate(rows):
        top = header + r * (CELL + CAPTION + 8)
        draw.text((8, top + CELL // 2), label, fill="black", font=font)
        for c, (image, caption) in enumerate(cells):
            left = label_width + c * (CELL + 8)
            sheet.paste(image.resize((CELL, CELL), Image.Resampling.BILINEAR), (left, top))
            for line_no, line in enumerate(caption.split("\n")):
                draw.text((left, top + CELL + 2 + 12 * line_no), line, fill="black", font=font)
    return sheet


def _caption(activation: float, ratio: float, label: str) -> str:
    text = f"act {activation:.3g}"
    if ratio:
        text += f" ({ratio:.2f}x)"
    return f"{text}\n{label[:20]}"
