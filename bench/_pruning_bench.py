"""Output pruning, measured: a per-neuron twin (one small conv net per neuron, as registered third-party
twins are built) against the bundled twin, per gradient step of one synthesis job for one neuron.

Used by ``bench/synthesis.py`` (its "pruning" section). The per-neuron twin is built here, exported to
ONNX and written into a temporary store with a card, so it loads through the same path as any
registered model; nothing is downloaded. Each net resembles the compact per-neuron models of Cowley et
al. 2023: a 5 x 5 stride-2 convolution, two depthwise-separable stride-2 blocks, a linear readout of the
14 x 14 map (112 px input). Weights are random: the figure is cost, not quality.

A gradient step is what the synthesis engine runs: generator forward, augmentations, resize to the
twin's input, twin forward, the objective on one neuron, backward to the latent, Adam. Cost per step is
the difference between two runs of one job (``n_images`` images) with budgets ``2`` and ``2 + steps``,
so job set-up is not counted; runs of the twins alternate, and the median over repeats is reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIZE = 112


class CompactNeuronNet(nn.Module):
    """One neuron's network: uint8 NHWC -> normalized -> 3 stride-2 stages -> one rate."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 5, stride=2, padding=2)
        self.block1 = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width), nn.Conv2d(width, 2 * width, 1)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, groups=2 * width),
            nn.Conv2d(2 * width, 2 * width, 1),
        )
        self.readout = nn.Linear(2 * width * (SIZE // 8) ** 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block1(x))
        x = torch.relu(self.block2(x))
        return self.readout(x.flatten(1))


class PerNeuronTwin(nn.Module):
    def __init__(self, neurons: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(CompactNeuronNet() for _ in range(neurons))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        return nn.functional.softplus(torch.cat([net(x) for net in self.nets], dim=1))


def write_per_neuron_twin(store_root: Path, neurons: int, seed: int = 0) -> Any:
    """Export a PerNeuronTwin to ONNX and store it as predictor ``per-neuron-bench`` v1."""
    import io

    from neurotwin.card import InputSpec, PredictorCard
    from neurotwin.store import PREDICTORS, ModelStore

    torch.manual_seed(seed)
    net = PerNeuronTwin(neurons).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter says it is deprecated
        torch.onnx.export(
            net,
            (torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8),),
            buffer,
            input_names=["images"],
            output_names=["rates"],
            dynamic_axes={"images": {0: "batch"}, "rates": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    card = PredictorCard(
        name="per-neuron-bench",
        neuron_ids=[f"n{i:03d}" for i in range(neurons)],
        input=InputSpec(height=SIZE, width=SIZE),
        opset=17,
        description=f"{neurons} compact conv nets, one per neuron (random weights, bench/_pruning_bench.py)",
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    store = ModelStore(store_root)
    with store.new_version(PREDICTORS, "per-neuron-bench", 1) as folder:
        (folder / "model.onnx").write_bytes(buffer.getvalue())
        card.save(folder / "card.json")
    return store.resolve(PREDICTORS, "per-neuron-bench", 1)


def _load(version: Any, device: torch.device, outputs: list[int] | None) -> tuple[Any, Any, float]:
    from neurotwin.runtimes.onnx_torch import load_differentiable_twin

    started = time.perf_counter()
    twin, card = load_differentiable_twin(version, device, outputs=outputs)
    return twin, card, time.perf_counter() - started


def _job_seconds(pair: Any, neuron: int, budget: int, images: int, device: torch.device) -> float:
    from neurotwin.engines.objectives import neuron as neuron_objective
    from neurotwin.engines.synthesis import SynthesisRequest, SynthesisScheduler

    request = SynthesisRequest(
        objective=neuron_objective(neuron), method="gradient", budget=budget, n_images=images, seed=0
    )
    scheduler = SynthesisScheduler(device=device, max_jobs=1, max_batch_images=4096)
    started = time.perf_counter()
    job = scheduler.submit(pair, request)
    scheduler.run_until_idle()
    job.result(timeout=0)
    return time.perf_counter() - started


def pruning_section(
    store: Path,
    model: str,
    generator: str,
    device: torch.device,
    neurons: int,
    steps: int,
    repeats: int,
    images: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from neurotwin.engines.synthesis import ModelPair
    from neurotwin.runtimes.generators import load_generator
    from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

    load_before = os.getloadavg()
    ms = ModelStore(store)
    prior = load_generator(ms.resolve(GENERATORS, generator), device)
    target = neurons // 2
    with tempfile.TemporaryDirectory(prefix="neurotwin-pruning-") as tmp:
        started = time.perf_counter()
        version = write_per_neuron_twin(Path(tmp), neurons)
        export_seconds = time.perf_counter() - started
        full, _, full_load = _load(version, device, None)
        pruned, _, pruned_load = _load(version, device, [target])
        bundled, bundled_card, bundled_load = _load(ms.resolve(PREDICTORS, model), device, None)
        bundled_pruned, _, bundled_pruned_load = _load(ms.resolve(PREDICTORS, model), device, [target])
    # Pruned twins have one output column: the objective reads column 0. Their card would name the wrong
    # neurons, so they get none (their graphs fix the input size); the bundled twin needs its card.
    twins = {
        "per-neuron, full": (ModelPair(full, prior, key="full"), target, full_load),
        "per-neuron, pruned": (ModelPair(pruned, prior, key="pruned"), 0, pruned_load),
        "bundled": (ModelPair(bundled, prior, bundled_card, key="bundled"), target, bundled_load),
        "bundled, pruned": (ModelPair(bundled_pruned, prior, bundled_card, key="bp"), 0, bundled_pruned_load),
    }
    for pair, column, _ in twins.values():  # warm-up: first-call allocations, oneDNN kernel choice
        _job_seconds(pair, column, 2, images, device)
    per_step: dict[str, list[float]] = {name: [] for name in twins}
    for _ in range(repeats):
        for name, (pair, column, _) in twins.items():
            short = _job_seconds(pair, column, 2, images, device)
            long = _job_seconds(pair, column, 2 + steps, images, device)
            per_step[name].append(max(long - short, 0.0) / steps)
    seconds = {name: statistics.median(values) for name, values in per_step.items()}
    info = pruned.pruning
    out: dict[str, Any] = {
        "neurons": neurons,
        "target": target,
        "steps": steps,
        "repeats": repeats,
        "images": images,
        "export_seconds": export_seconds,
        "seconds_per_step": seconds,
        "load_seconds": {name: load for name, (_, _, load) in twins.items()},
        "pruned_over_bundled": seconds["per-neuron, pruned"] / seconds["bundled"],
        "full_over_bundled": seconds["per-neuron, full"] / seconds["bundled"],
        "full_over_pruned": seconds["per-neuron, full"] / seconds["per-neuron, pruned"],
        "nodes": [info.nodes_before, info.nodes_after],
        "parameters": [info.parameters_before, info.parameters_after],
        "fallbacks": list(info.fallbacks) + list(bundled_pruned.pruning.fallbacks),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    for name, value in seconds.items():
        log(f"pruning: {name:20s} {1000 * value:8.1f} ms/step (load {out['load_seconds'][name]:.1f} s)")
    log(
        f"pruning: per-neuron twin of {neurons} nets, neuron {target}: pruned/bundled "
        f"{out['pruned_over_bundled']:.2f}x, full/bundled {out['full_over_bundled']:.2f}x "
        f"(nodes {info.nodes_before} -> {info.nodes_after}, parameters {info.parameters_before} -> "
        f"{info.parameters_after}); load average {load_before[0]:.2f} -> {out['loadavg_after'][0]:.2f}"
    )
    return out


def markdown_lines(p: dict[str, Any], device: str) -> list[str]:
    s, load = p["seconds_per_step"], p["load_seconds"]
    rows = [
        "",
        f"Output pruning ({device}): a per-neuron twin of {p['neurons']} compact conv nets (ONNX, random "
        f"weights) against the bundled twin; one gradient job for neuron {p['target']}, "
        f"{p['images']} images, "
        f"cost per step = (budget {2 + p['steps']} - budget 2) / {p['steps']}, median of {p['repeats']}; "
        f"load average {p['loadavg_before'][0]:.2f} before, {p['loadavg_after'][0]:.2f} after.",
        "",
        "| twin | ms per gradient step | x bundled | load + parity check (s) |",
        "|---|---|---|---|",
    ]
    for name, value in s.items():
        rows.append(f"| {name} | {1000 * value:.1f} | {value / s['bundled']:.2f} | {load[name]:.1f} |")
    rows.append(
        f"\nPruned graph: {p['nodes'][0]} -> {p['nodes'][1]} compute nodes, {p['parameters'][0]} -> "
        f"{p['parameters'][1]} parameters; full/pruned per step {p['full_over_pruned']:.1f}x."
    )
    return rows
