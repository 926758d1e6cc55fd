"""The differentiable twin: an ONNX predictor graph evaluated with torch ops, so gradients reach the image.

Any predictor in the store (trained anywhere, exported by anything) is synthesized for through this
module. The graph is converted once: every node is checked against the supported op set (an unknown op
fails here, naming it, never at the first forward), constant subgraphs are folded, and initializers
become buffers (or parameters, for callers that fine-tune a readout). ``forward`` then walks the nodes in
topological order.

Devices: float data lives where the module lives. Shape arithmetic (Shape -> Gather -> Concat -> Reshape
chains that exporters emit for dynamic batch sizes) stays on the CPU, so reading a target shape never
waits on the GPU.

The predictor contract takes uint8 [N, H, W, 3]; this module takes the same layout as float 0..255 so that
gradients flow (the graph's Cast from uint8 becomes a float-to-float no-op). ``forward_chw01`` takes the
[N, 3, H, W] images in [0, 1] that generators produce.

Output pruning (``pruning``, ``pruning_rules``): a twin for an objective that reads a few neurons is
cut down, before conversion, to the part of the graph those neurons depend on
(``load_differentiable_twin(..., outputs=[...])``, or :func:`prune_outputs` on a ModelProto).

Ensemble twins return ``rates`` (the members' mean) and ``member_rates`` [N, members, K]; the module
returns the rates unless ``load_differentiable_twin(..., output_names=[...])`` asks for other outputs by
name (:func:`select_outputs` on a ModelProto), e.g. both, for objectives that need the members to agree.

Layout: ``registry`` (node record, op registry, helpers), ``ops_*`` (converters by family), ``module``
(the compiled graph), ``parity`` (against ONNX Runtime), ``loading`` (from the store), ``pruning``.
"""

from __future__ import annotations

from neurotwin.errors import UnsupportedOperator

from .loading import load_differentiable_twin
from .module import SUPPORTED_OPS, OnnxTorchModule, convert_onnx
from .parity import ParityReport, check_parity
from .pruning import PrunedGraph, prune_outputs, select_outputs

__all__ = [
    "SUPPORTED_OPS",
    "OnnxTorchModule",
    "ParityReport",
    "PrunedGraph",
    "UnsupportedOperator",
    "check_parity",
    "convert_onnx",
    "load_differentiable_twin",
    "prune_outputs",
    "select_outputs",
]
