"""ONNX Runtime session for one predictor version: provider choice, threads, input checks, IO binding.

The session is the only place the serving path touches ONNX Runtime. Inputs are checked against the
model card before they reach the runtime, so a wrong image produces an InvalidInput naming the
problem instead of an opaque runtime error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurotwin.card import PredictorCard
from neurotwin.errors import InvalidInput, ModelStoreError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class SessionSettings:
    # 0 lets ONNX Runtime choose (one thread per physical core for intra-op).
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # Idle intra-op threads busy-wait for the next run by default. That saves a wake-up per run on a
    # dedicated machine but steals the cores that request decoding and other processes need.
    allow_spinning: bool = True
    # "auto": CUDA when onnxruntime-gpu sees a GPU, else CPU; or "cpu" / "cuda" to force one.
    device: str = "auto"
    device_id: int = 0


def _ort() -> object:
    import onnxruntime

    return onnxruntime


def choose_providers(settings: SessionSettings) -> list[str | tuple[str, dict[str, object]]]:
    """Providers in preference order; CUDA only when the installed runtime has it."""
    device = settings.device.lower()
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"device {settings.device!r}: expected 'auto', 'cpu' or 'cuda'")
    available = _ort().get_available_providers()
    if device == "cpu" or (device == "auto" and CUDA not in available):
        return [CPU]
    if CUDA not in available:
        raise InvalidInput("device 'cuda' requested but this onnxruntime has no CUDA provider")
    # Dynamic batching produces many batch sizes; EXHAUSTIVE (the default) would benchmark cuDNN
    # algorithms on the first request of every new size, a latency spike each time.
    cuda_options = {"device_id": settings.device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    return [(CUDA, cuda_options), CPU]


class PredictorSession:
    """One loaded predictor: ``run(uint8 [N, H, W, 3]) -> float32 [N, K]`` (the card's output, by
    name); thread-safe."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        card: PredictorCard,
        settings: SessionSettings,
        outputs: Sequence[int] | None = None,
    ) -> None:
        """``outputs``: compute only these output columns (the ONNX graph pruned to what they depend
        on, ``onnx_torch.prune_outputs``); ``run`` then returns [N, len(outputs)] in that order."""
        ort = _ort()
        self.card = card
        self.path = Path(model_path)
        self.outputs = None if outputs is None else tuple(int(o) for o in outputs)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, settings.intra_op_threads)
        options.inter_op_num_threads = max(0, settings.inter_op_threads)
        if not settings.allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if settings.inter_op_threads > 1:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = choose_providers(settings)
        model: str | bytes = str(self.path)
        if self.outputs is not None:
            model = _pruned_model_bytes(self.path, self.outputs)
        try:
            self._session: object | None = ort.InferenceSession(
                model, sess_options=options, providers=requested
            )
        except Exception as exc:
            raise ModelStoreError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc
        self.providers: list[str] = list(self._session.get_providers())
        self.on_cuda = self.providers[0] == CUDA
        self._device_id = settings.device_id
        # Where IO binding puts the output; None runs without binding (CPU: plain run() is as fast).
        self.bind_output_to: str | None = "cuda" if self.on_cuda else None
        wanted_cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA for p in requested)
        if wanted_cuda and not self.on_cuda:
            # onnxruntime-gpu without a usable GPU (or CUDA libraries) silently falls back to CPU:
            # fine for "auto", a configuration error when CUDA was asked for.
            if settings.device.lower() == "cuda":
                raise ModelStoreError(f"{self.path}: device 'cuda' requested but the CUDA provider failed")
            log.warning("%s: CUDA provider unavailable at run time, using %s", self.path, self.providers[0])
        log.info(
            "%s: ONNX Runtime %s on %s (intra-op threads %s, inter-op threads %s)",
            self.path,
            ort.__version__,
            self.providers[0],
            settings.intra_op_threads or "auto",
            settings.inter_op_threads or "auto",
        )
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise ModelStoreError(f"{self.path}: expected one input, the graph has {len(inputs)}")
        names = [o.name for o in outputs]
        if len(names) > 1 and card.output.name not in names:
            raise ModelStoreError(f"{self.path}: no output {card.output.name!r} (the graph has {names})")
        self.input_name = inputs[0].name
        # The rates, asked for by name: an ensemble graph also has its members' output, which the server
        # never returns. A one-output graph's output is the rates whatever its name.
        self.output_name = card.output.name if len(names) > 1 else names[0]
        self.height = card.input.height
        self.width = card.input.width
        self.channels = card.input.channels
        self.neurons = card.neuron_count if self.outputs is None else len(self.outputs)

    def check(self, images: np.ndarray, what: str = "images") -> np.ndarray:
        """The batch as a contiguous uint8 [N, H, W, C] array, or InvalidInput saying what is off."""
        if not isinstance(images, np.ndarray):
            raise InvalidInput(f"{what}: expected an array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise InvalidInput(f"{what}: dtype {images.dtype}, expected uint8")
        if images.ndim != 4:
            raise InvalidInput(f"{what}: shape {list(images.shape)}, expected [N, H, W, C] (4 dimensions)")
        count, height, width, channels = images.shape
        if count == 0:
            raise InvalidInput(f"{what}: no images")
        if channels != self.channels:
            raise InvalidInput(f"{what}: {channels} channels, model {self.card.name} expects {self.channels}")
        if (height, width) != (self.height, self.width):
            raise InvalidInput(
                f"{what}: {height} x {width} pixels (H x W), model {self.card.name} expects "
                f"{self.height} x {self.width}"
            )
        return np.ascontiguousarray(images)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Checked batch -> float32 [N, neurons]. Safe to call from several threads."""
        batch = self.check(images)
        # A local reference keeps the session alive even if close() runs meanwhile.
        session = self._session
        if session is None:
            raise ModelStoreError(f"{self.path}: session closed")
        if self.bind_output_to is not None:
            out = self._run_bound(session, batch, self.bind_output_to)
        else:
            out = session.run([self.output_name], {self.input_name: batch})[0]
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        if out.shape != (batch.shape[0], self.neurons):
            raise ModelStoreError(
                f"{self.path}: returned shape {list(out.shape)}, card says [{batch.shape[0]}, {self.neurons}]"
            )
        return out

    def _run_bound(self, session: object, batch: np.ndarray, device: str) -> np.ndarray:
        # IO binding: the input is copied to the GPU once and the output stays in a device buffer ORT
        # allocates, instead of run() staging both through its own host copies. A binding is not
        # thread-safe, so each call makes its own (cheap next to the copy it saves).
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, device, self._device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run once per batch size so that the first request does not pay for allocations or tuning."""
        for size in batch_sizes:
            self.run(np.zeros((size, self.height, self.width, self.channels), dtype=np.uint8))

    def close(self) -> None:
        # Dropping the session releases its memory (GPU memory included) once no run holds it.
        self._session = None


def _pruned_model_bytes(path: Path, outputs: tuple[int, ...]) -> bytes:
    """The model at ``path`` cut to the output columns ``outputs``, serialized for ONNX Runtime."""
    import onnx

    from neurotwin.runtimes.onnx_torch import prune_outputs

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a readable ONNX model ({exc})") from exc
    return bytes(prune_outputs(model, outputs).model.SerializeToString())
