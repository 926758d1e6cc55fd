"""Synthesis benchmark: how far synthesized images drive the neurons of session 201025, and how fast.

    python bench/synthesis.py                      # every neuron, every method (long on a CPU)
    python bench/synthesis.py --quick              # 8 neurons, smaller timing runs
    python bench/synthesis.py --neurons 0-9,40 --methods gradient,cmaes
    python bench/synthesis.py --lucent-path /tmp/lucent-site   # where torch-lucent was installed
    python bench/synthesis.py --only-pruning       # just the output-pruning section (no natural images)

For each neuron of the session, each method synthesizes one image (seed = neuron index), and the
score is the twin's activation on that image (quantized to uint8 at the twin's input size) divided by
the twin's maximum over the session's natural images (all 1,200, scored by the same twin). Reported per
method: median and 10th percentile of that ratio over neurons, the fraction above 1, and wall time.

Methods (name: optimizer, prior, budget per image):
  gradient  Adam on the generator latent through generator and twin (DGN-AM style), 200 steps
  pixels    Adam in the Fourier pixel parameterization (no generator), 512 steps
  cmaes     CMA-ES in the generator latent, 3,000 twin evaluations (75 generations of 40)
  genetic   genetic algorithm in the generator latent (XDream defaults), 3,000 evaluations
  lucent    torch-lucent render_vis, decorrelated Fourier pixels with its standard transforms,
            512 steps (the field's peer; see LUCENT below)

Timing:
  - wall time per image: all neurons' jobs submitted together to one scheduler (the service's batching)
    divided by the number of images; and one job alone (the latency of a single request);
  - the scheduler against the naive eager loop (``naive_synthesis``: one image at a time, no batching)
    for the same 16 gradient jobs;
  - 16 concurrent gRPC requests against one, through a real loopback server (``neurotwin serve``'s
    synthesizer service in this process).

Output pruning (``bench/_pruning_bench.py``): a per-neuron twin (one small conv net per neuron, built and
ONNX-exported here, >= 50 neurons) costs per gradient step for one target neuron: converted whole, and
pruned to that neuron (``load_differentiable_twin(..., outputs=[k])``), each against the bundled twin.

LUCENT: torch-lucent 0.1.8 depends on torchvision and kornia<=0.4.1; PyPI's torchvision does not
load with this CPU torch, and installing torch-lucent with dependencies would pull a CUDA torch. So:
``pip install --target DIR --no-deps torch-lucent==0.1.8 kornia==0.4.1`` and
``pip install --target DIR decorator ipython``; lucent imports ``torchvision.transforms.Normalize`` at
module import but uses it only for ImageNet preprocessing (``preprocess=True``). We call render_vis
with ``preprocess=False`` (the twin normalizes inside its graph) and, when torchvision is missing,
register a stand-in ``torchvision.transforms`` whose ``Normalize`` raises if it is ever constructed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE = ROOT / "model_store"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cowley_v4"
DEFAULT_MODEL = "v4-201025"
DEFAULT_GENERATOR = "v4-dcgan"
SESSION = "201025"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    method: str  # engine method, or "lucent"
    prior: str  # "generator" or "pixels"
    budget: int
    description: str


METHODS: dict[str, MethodSpec] = {
    "gradient": MethodSpec("gradient", "gradient", "generator", 200, "Adam through the generator"),
    "pixels": MethodSpec("pixels", "gradient", "pixels", 512, "Adam in Fourier pixel space"),
    "cmaes": MethodSpec("cmaes", "cmaes", "generator", 3000, "CMA-ES in the generator latent"),
    "genetic": MethodSpec("genetic", "genetic", "generator", 3000, "genetic algorithm (XDream)"),
    "lucent": MethodSpec("lucent", "lucent", "pixels", 512, "torch-lucent render_vis (Fourier pixels)"),
}


@dataclass
class MethodResult:
    spec: MethodSpec
    neurons: list[int]
    ratios: list[float] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)
    batched_seconds: float = 0.0
    single_seconds: float | None = None
    error: str = ""
    images: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3], one per neuron

    def summary(self) -> dict[str, Any]:
        r = np.asarray(self.ratios, dtype=np.float64)
        return {
            "method": self.spec.name,
            "prior": self.spec.prior,
            "budget": self.spec.budget,
            "neurons": len(self.ratios),
            "median_ratio": float(np.median(r)) if r.size else None,
            "p10_ratio": float(np.percentile(r, 10)) if r.size else None,
            "fraction_above_1": float((r > 1).mean()) if r.size else None,
            "seconds_per_image_batched": self.batched_seconds / max(1, len(self.ratios)),
            "seconds_single_request": self.single_seconds,
            "error": self.error,
        }


# -- setup -----------------------------------------------------------------------------------------


def parse_neurons(text: str, count: int) -> list[int]:
    if text in ("", "all"):
        return list(range(count))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    bad = [n for n in out if not 0 <= n < count]
    if bad:
        raise SystemExit(f"--neurons: {bad} out of range (the twin has {count} neurons)")
    return sorted(dict.fromkeys(out))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = os.cpu_count() or 0
    info: dict[str, Any] = {
        "nproc": nproc,
        "cpu": cpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_models(store: Path, model: str, generator: str, device: torch.device) -> tuple[Any, Any, Any, Any]:
    from neurotwin.runtimes.generators import FourierPixels, load_generator
    from neurotwin.runtimes.onnx_torch import load_differentiable_twin
    from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

    ms = ModelStore(store)
    twin_version = ms.resolve(PREDICTORS, model)
    twin, card = load_differentiable_twin(twin_version, device)
    gen = load_generator(ms.resolve(GENERATORS, generator), device)
    pixels = FourierPixels(resolution=card.input.height).to(device).eval().requires_grad_(False)
    return twin, card, gen, pixels


def natural_images(data: Path, session: str, size: tuple[int, int]) -> np.ndarray:
    from neurotwin.imagecodec import resize_uint8
    from neurotwin.training.datasets import load_recording

    recording = load_recording(data, session=session)
    images = recording.images
    if images.shape[1:3] != size:
        images = np.stack([resize_uint8(img, *size) for img in images])
    return images


def twin_rates(twin: Any, images: np.ndarray, device: torch.device, chunk: int = 100) -> np.ndarray:
    out = []
    with torch.no_grad():
        for lo in range(0, len(images), chunk):
            batch = torch.from_numpy(images[lo : lo + chunk]).to(device).float()
            out.append(twin(batch).float().cpu().numpy())
    return np.concatenate(out)


# -- our methods -----------------------------------------------------------------------------------


def make_request(spec: MethodSpec, neuron: int, budget: int | None = None, seed: int | None = None) -> Any:
    from neurotwin.engines.objectives import neuron as neuron_objective
    from neurotwin.engines.synthesis import SynthesisRequest

    return SynthesisRequest(
        objective=neuron_objective(neuron),
        method=spec.method,
        budget=budget or spec.budget,
        n_images=1,
        seed=neuron if seed is None else seed,
    )


def run_scheduler(pair: Any, requests: list[Any], device: torch.device) -> tuple[list[Any], float]:
    """All requests submitted at once and stepped together; (results, wall seconds)."""
    from neurotwin.engines.synthesis import SynthesisScheduler

    scheduler = SynthesisScheduler(device=device, max_jobs=len(requests), max_batch_images=4096)
    started = time.perf_counter()
    jobs = [scheduler.submit(pair, r) for r in requests]
    scheduler.run_until_idle()
    results = [job.result(timeout=0) for job in jobs]
    return results, time.perf_counter() - started


def run_method(
    spec: MethodSpec,
    neurons: list[int],
    pairs: dict[str, Any],
    natural_max: np.ndarray,
    device: torch.device,
    single: bool,
    log: Callable[[str], None],
) -> MethodResult:
    result = MethodResult(spec, neurons)
    pair = pairs[spec.prior]
    requests = [make_request(spec, n) for n in neurons]
    outcomes, seconds = run_scheduler(pair, requests, device)
    result.batched_seconds = seconds
    for n, outcome in zip(neurons, outcomes, strict=True):
        activation = float(outcome.rates[0, n])
        result.images.append(np.asarray(outcome.images[0]))
        result.activations.append(activation)
        result.ratios.append(activation / float(natural_max[n]))
    if single:
        _, result.single_seconds = run_scheduler(pair, [make_request(spec, neurons[0])], device)
    s = result.summary()
    log(
        f"{spec.name:9s} median {s['median_ratio']:.3f}  p10 {s['p10_ratio']:.3f}  "
        f"{s['seconds_per_image_batched']:.3f} s/image batched"
        + (f", {result.single_seconds:.2f} s alone" if result.single_seconds is not None else "")
    )
    return result


# -- lucent ----------------------------------------------------------------------------------------


def import_lucent(path: str | None) -> tuple[Any, str]:
    """(lucent's render, objectives, param modules), and a note on how it was made importable."""
    if path:
        sys.path.insert(0, path)
    note = ""
    if importlib.util.find_spec("torchvision") is None:
        # lucent imports torchvision.transforms.Normalize at import time but only uses it for ImageNet
        # preprocessing, which this benchmark turns off; a stand-in that refuses to be used keeps
        # any hidden use from going unnoticed.
        class _NormalizeUnavailable:
            def __init__(self, *args: object, **kwargs: object) -> None:
                raise RuntimeError("torchvision is not installed; lucent preprocessing is unavailable")

        vision = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.Normalize = _NormalizeUnavailable  # type: ignore[attr-defined]
        vision.transforms = transforms  # type: ignore[attr-defined]
        sys.modules["torchvision"] = vision
        sys.modules["torchvision.transforms"] = transforms
        note = "torchvision missing: stand-in torchvision.transforms.Normalize (unused with preprocess=False)"
    from lucent.optvis import objectives, param, render

    return (render, objectives, param), note


class _LucentTwin(torch.nn.Module):
    """The twin as lucent sees it: NCHW images in [0, 1] in, rates out of a hookable ``rates`` layer."""

    def __init__(self, twin: Any) -> None:
        super().__init__()
        self.twin = twin
        self.rates = torch.nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.rates(self.twin.forward_chw01(images.clamp(0, 1)))


def run_lucent(
    spec: MethodSpec,
    neurons: list[int],
    twin: Any,
    size: int,
    natural_max: np.ndarray,
    device: torch.device,
    lucent_path: str | None,
    log: Callable[[str], None],
) -> MethodResult:
    result = MethodResult(spec, neurons)
    try:
        (render, objectives, param), note = import_lucent(lucent_path)
    except Exception as exc:
        result.error = f"cannot import lucent: {type(exc).__name__}: {exc}"
        log(f"lucent    {result.error}")
        return result
    if note:
        result.error = note
    model = _LucentTwin(twin).to(device).eval()
    images = []
    started = time.perf_counter()
    try:
        for n in neurons:
            # lucent draws from the global RNGs; seed them per neuron for a reproducible run.
            np.random.seed(n)
            torch.manual_seed(n)
            out = render.render_vis(
                model,
                objectives.channel("rates", n),
                param_f=lambda: param.image(size, fft=True, decorrelate=True),
                thresholds=(spec.budget,),
                preprocess=False,
                progress=False,
                show_image=False,
                fixed_image_size=size,
            )
            images.append(np.clip(np.round(out[-1][0] * 255.0), 0, 255).astype(np.uint8))
    except Exception as exc:
        result.error = (note + "; " if note else "") + f"render_vis failed: {type(exc).__name__}: {exc}"
        log(f"lucent    {result.error}")
        return result
    result.batched_seconds = time.perf_counter() - started
    result.single_seconds = result.batched_seconds / len(neurons)
    rates = twin_rates(twin, np.stack(images), device)
    result.images = images
    for k, n in enumerate(neurons):
        result.activations.append(float(rates[k, n]))
        result.ratios.append(float(rates[k, n]) / float(natural_max[n]))
    s = result.summary()
    log(
        f"lucent    median {s['median_ratio']:.3f}  p10 {s['p10_ratio']:.3f}  "
        f"{s['seconds_per_image_batched']:.3f} s/image (one at a time)"
    )
    return result


# -- timing: naive loop, concurrency -----------------------------------------------------------------


def naive_vs_scheduler(
    pair: Any, neurons: list[int], steps: int, device: torch.device, log: Callable[[str], None]
) -> dict[str, Any]:
    from neurotwin.engines.synthesis import naive_synthesis

    spec = METHODS["gradient"]
    requests = [make_request(spec, n, budget=steps) for n in neurons]
    started = time.perf_counter()
    for request in requests:
        naive_synthesis(pair, request, device)
    naive = time.perf_counter() - started
    _, batched = run_scheduler(pair, [make_request(spec, n, budget=steps) for n in neurons], device)
    out = {
        "jobs": len(neurons),
        "steps": steps,
        "naive_seconds": naive,
        "scheduler_seconds": batched,
        "speedup": naive / batched,
    }
    log(
        f"naive loop {naive:.2f} s vs scheduler {batched:.2f} s for {len(neurons)} jobs x {steps} steps "
        f"({out['speedup']:.2f}x)"
    )
    return out


def concurrency(
    store: Path,
    model: str,
    generator: str,
    device: str,
    neurons: list[int],
    steps: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One request vs 16 concurrent ones through a real loopback gRPC server."""
    from neurotwin.client.synthesizer import SynthesizerClient
    from neurotwin.server import synthesizer
    from neurotwin.server.common import GrpcServer
    from neurotwin.server.config import ServerSettings

    server = GrpcServer(ServerSettings(port=0, metrics_port=-1, grace_seconds=1))
    settings = synthesizer.Settings(
        model_store=str(store), default_generator=generator, device=device, max_jobs=64, max_images=16
    )
    synthesizer.attach(server, settings)
    server.start()
    try:
        with SynthesizerClient(f"127.0.0.1:{server.port}", timeout=3600) as client:
            client.synthesize(model, neurons[0], budget=2)  # load the models before timing
            started = time.perf_counter()
            client.synthesize(model, neurons[0], budget=steps, seed=0)
            one = time.perf_counter() - started
            errors: list[BaseException] = []

            def call(n: int) -> None:
                try:
                    client.synthesize(model, n, budget=steps, seed=n)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=call, args=(n,)) for n in neurons[:16]]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sixteen = time.perf_counter() - started
            if errors:
                raise errors[0]
    finally:
        server.stop(0)
    out = {
        "steps": steps,
        "one_seconds": one,
        "sixteen_seconds": sixteen,
        "ratio": sixteen / one,
        "requests": len(threads),
    }
    log(f"gRPC: 1 request {one:.2f} s, {len(threads)} concurrent {sixteen:.2f} s ({out['ratio']:.2f}x)")
    return out


# -- report ----------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Synthesis benchmark results",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"device {report['device']}" + (f" ({m['gpu']})" if "gpu" in m else "") + f"; {report['date']}.",
        "",
        f"Twin `{report['model']}` v{report['model_version']}, generator `{report['generator']}` "
        f"v{report['generator_version']}, session {report['session']}: {report['natural_images']} natural "
        f"images; {len(report['neurons'])} neurons. Ratio = twin activation on the synthesized image "
        "(uint8, twin input size) / the twin's maximum over the session's natural images; one image per "
        "neuron, seed = neuron index.",
        "",
        f"Twin card: {report.get('twin_description') or '-'}. "
        f"Generator card: {report.get('generator_description') or '-'}.",
        "",
        "| method | prior | budget per image | neurons | median ratio | 10th pct ratio | ratio > 1 | "
        "s/image (all neurons batched) | s (one request alone) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["methods"]:
        if s["median_ratio"] is None:
            lines.append(f"| {s['method']} | {s['prior']} | {s['budget']} | - | - | - | - | - | - |")
            continue
        unit = "steps" if s["method"] in ("gradient", "pixels", "lucent") else "evaluations"
        single = f"{s['seconds_single_request']:.2f}" if s["seconds_single_request"] is not None else "-"
        lines.append(
            f"| {s['method']} | {s['prior']} | {s['budget']} {unit} | {s['neurons']} | "
            f"{s['median_ratio']:.3f} | {s['p10_ratio']:.3f} | {100 * s['fraction_above_1']:.0f}% | "
            f"{s['seconds_per_image_batched']:.3f} | {single} |"
        )
    notes = [s for s in report["methods"] if s["error"]]
    if notes:
        lines += ["", "Notes:"] + [f"- {s['method']}: {s['error']}" for s in notes]
    targets = report.get("targets", {})
    if targets:
        lines += ["", "Targets:"] + [f"- {k}: {v}" for k, v in targets.items()]
    if report.get("naive"):
        n = report["naive"]
        lines += [
            "",
            f"Scheduler vs naive eager loop ({report['device']}): "
            f"{n['jobs']} gradient jobs x {n['steps']} steps: "
            f"naive {n['naive_seconds']:.2f} s, scheduler {n['scheduler_seconds']:.2f} s, "
            f"speedup {n['speedup']:.2f}x.",
        ]
    if report.get("concurrency"):
        c = report["concurrency"]
        lines += [
            "",
            f"gRPC loopback ({report['device']}), gradient through the generator, "
            f"{c['steps']} steps, 1 image: "
            f"one request {c['one_seconds']:.2f} s; {c['requests']} concurrent requests "
            f"{c['sixteen_seconds']:.2f} s ({c['ratio']:.2f}x the time of one).",
        ]
    if report.get("pruning"):
        lines += _pruning_bench().markdown_lines(report["pruning"], report["device"])
    return "\n".join(lines) + "\n"


def _pruning_bench() -> Any:
    import _pruning_bench  # bench/ is the script's folder, first on sys.path

    return _pruning_bench


def run_pruning(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    if args.pruning_neurons < 50:
        raise SystemExit("--pruning-neurons: the target is stated for a per-neuron twin of >= 50 neurons")
    return _pruning_bench().pruning_section(
        args.store,
        args.model,
        args.generator,
        device,
        neurons=args.pruning_neurons,
        steps=args.pruning_steps or (4 if args.quick else 10),
        repeats=args.pruning_repeats or (1 if args.quick else 3),
        images=4,
        log=log,
    )


def targets(report: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    by_name = {s["method"]: s for s in report["methods"]}

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    gradient = by_name.get("gradient", {}).get("median_ratio")
    if gradient is not None:
        out["gradient through the generator, median >= 1.5"] = f"{gradient:.3f} ({verdict(gradient >= 1.5)})"
    cmaes = by_name.get("cmaes", {}).get("median_ratio")
    if cmaes is not None:
        out["CMA-ES within 3,000 evaluations, median >= 1.2"] = f"{cmaes:.3f} ({verdict(cmaes >= 1.2)})"
    if report.get("concurrency"):
        ratio = report["concurrency"]["ratio"]
        out["16 concurrent requests within 2x the time of one"] = f"{ratio:.2f}x ({verdict(ratio <= 2)})"
    if report.get("pruning"):
        ratio = report["pruning"]["pruned_over_bundled"]
        nets = report["pruning"]["neurons"]
        goal = f"per-neuron twin ({nets} nets) pruned to one neuron, <= 1.5x the bundled twin per step"
        out[goal] = f"{ratio:.2f}x ({verdict(ratio <= 1.5)})"
    if report.get("naive") and report["device"].startswith("cuda"):
        speedup = report["naive"]["speedup"]
        out["GPU: at least 2x faster than the naive eager loop"] = f"{speedup:.2f}x ({verdict(speedup >= 2)})"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--generator", default=DEFAULT_GENERATOR)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cowley_v4 folder")
    parser.add_argument("--session", default=SESSION)
    parser.add_argument("--neurons", default="all", help="'all', or e.g. 0-9,40")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {list(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="8 neurons, shorter timing runs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--lucent-path",
        default=os.environ.get("NEUROTWIN_LUCENT_PATH"),
        help="folder torch-lucent was installed into with pip --target",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared CPU, spinning OpenMP workers of the "
        "calling thread slowed steps down 25x in our runs)",
    )
    parser.add_argument("--skip-timing", action="store_true", help="no naive-loop or concurrency runs")
    parser.add_argument("--skip-pruning", action="store_true", help="no output-pruning section")
    parser.add_argument(
        "--only-pruning",
        action="store_true",
        help="only the output-pruning section (needs no natural images); prints its table",
    )
    parser.add_argument("--pruning-neurons", type=int, default=89, help="nets in the per-neuron twin (>= 50)")
    parser.add_argument("--pruning-steps", type=int, default=0, help="timed steps (default 10, --quick 4)")
    parser.add_argument("--pruning-repeats", type=int, default=0, help="median of (default 3, --quick 1)")
    parser.add_argument(
        "--budget-factor",
        type=float,
        default=1.0,
        help="scale every method's budget (smoke runs only; the targets assume 1)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "SYNTHESIS_RESULTS.md")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="PNG contact sheet: a row per method (an image per neuron), then the best natural images",
    )
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.budget_factor != 1.0:
        for key, spec in list(METHODS.items()):
            floor = 40 if spec.method == "cmaes" else 20 if spec.method == "genetic" else 1
            METHODS[key] = replace(spec, budget=max(floor, round(spec.budget * args.budget_factor)))

    def log(text: str) -> None:
        print(text, flush=True)

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.only_pruning:
        pruning = run_pruning(args, device, log)
        ratio = pruning["pruned_over_bundled"]
        print("\n".join(_pruning_bench().markdown_lines(pruning, str(device))))
        print(f"\nTarget: pruned per-neuron twin <= 1.5x the bundled twin per step: {ratio:.2f}x")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "pruning": pruning}, indent=1) + "\n")
        return 0

    twin, card, gen, pixels = load_models(args.store, args.model, args.generator, device)
    size = (card.input.height, card.input.width)
    from neurotwin.engines.synthesis import ModelPair
    from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

    ms = ModelStore(args.store)
    pairs = {
        "generator": ModelPair(twin=twin, prior=gen, card=card, key="bench|generator"),
        "pixels": ModelPair(twin=twin, prior=pixels, card=card, key="bench|pixels"),
    }
    naturals = natural_images(args.data, args.session, size)
    natural_rates = twin_rates(twin, naturals, device)
    natural_max = natural_rates.max(axis=0)
    neurons = parse_neurons(args.neurons, card.neuron_count)
    if args.quick and args.neurons == "all":
        neurons = [int(i) for i in np.linspace(0, card.neuron_count - 1, 8).round()]
    log(
        f"twin {args.model} ({card.neuron_count} neurons, {size[0]} px), {len(naturals)} natural images, "
        f"{len(neurons)} neurons, device {device}"
    )

    report: dict[str, Any] = {
        "command": "python bench/synthesis.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "model_version": ms.resolve(PREDICTORS, args.model).version,
        "generator": args.generator,
        "generator_version": ms.resolve(GENERATORS, args.generator).version,
        "twin_description": card.description,
        "generator_description": getattr(getattr(gen, "card", None), "description", ""),
        "session": args.session,
        "natural_images": len(naturals),
        "neurons": neurons,
        "methods": [],
        "per_neuron": {},
        "targets": {},
    }

    def save() -> None:
        # Written after every stage, so a long run that is stopped still leaves its numbers.
        report["targets"] = targets(report)
        if args.out:
            args.out.write_text(markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    sheet_rows: list[np.ndarray] = []
    for name in names:
        spec = METHODS[name]
        if spec.method == "lucent":
            result = run_lucent(spec, neurons, twin, size[0], natural_max, device, args.lucent_path, log)
        else:
            result = run_method(spec, neurons, pairs, natural_max, device, single=True, log=log)
        report["methods"].append(result.summary())
        report["per_neuron"][name] = dict(zip(map(str, result.neurons), result.ratios, strict=False))
        if result.images:
            sheet_rows.append(np.concatenate(result.images, axis=1))
        save()
    if args.examples and sheet_rows:
        from neurotwin.imagecodec import encode_png

        best_natural = [naturals[int(natural_rates[:, n].argmax())] for n in neurons]
        sheet = np.concatenate([*sheet_rows, np.concatenate(best_natural, axis=1)], axis=0)
        args.examples.write_bytes(encode_png(sheet))
        log(f"examples: {args.examples} (rows: {', '.join(names)}, best natural image)")
    if not args.skip_timing:
        count = 4 if args.quick else 16
        timing_neurons = [n % card.neuron_count for n in range(count)]
        steps = 50 if args.quick else 200
        report["naive"] = naive_vs_scheduler(pairs["generator"], timing_neurons, steps, device, log)
        save()
        report["concurrency"] = concurrency(
            args.store, args.model, args.generator, str(device), list(range(16)), steps, log
        )
        save()
    if not args.skip_pruning:
        report["pruning"] = run_pruning(args, device, log)
        save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
