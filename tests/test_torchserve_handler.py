"""The TorchServe handler needs only numpy, Pillow and onnxruntime; TorchServe's worker needs more.

The handler is imported by file path, as TorchServe's worker does, in a fresh interpreter where
``torch`` and ``yaml`` cannot be imported, and serves a real ONNX twin through TorchServe's own
``Context`` class. A second check shows why deploy/README.md lists torch and pyyaml: TorchServe's worker
module itself fails to import without torch.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from neurotwin.card import PredictorCard
from neurotwin.imagecodec import encode_png

from tests._models import make_predictor, random_images, reference_rates

REPO = Path(__file__).resolve().parents[1]
HANDLER = REPO / "services" / "neurotwin" / "training" / "torchserve_handler.py"
BLOCK = "import sys\nsys.modules['torch'] = None\nsys.modules['yaml'] = None\n"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ts") is None, reason="torchserve is not installed")

SCRIPT = (
    BLOCK
    + """
import importlib.util, json
from ts.context import Context, RequestProcessor

spec = importlib.util.spec_from_file_location("torchserve_handler", sys.argv[1])
handler = importlib.util.module_from_spec(spec)
spec.loader.exec_module(handler)
manifest = {"model": {"modelVersion": "1", "serializedFile": "model.onnx"}}
context = Context("tiny", sys.argv[2], manifest, 4, None, "0.12")
context.request_processor = [RequestProcessor({}), RequestProcessor({})]
handler.handle(None, context)
images = [open(path, "rb").read() for path in sys.argv[3:]]
answers = handler.handle([{"data": images[0]}, {"data": b"not an image"}], context)
print(json.dumps({"answers": answers, "loaded": sorted(m for m in ("torch", "yaml") if sys.modules.get(m))}))
"""
)


def test_handler_serves_without_torch_or_yaml(tmp_path: Path) -> None:
    version = make_predictor(tmp_path / "store", "tiny", neurons=4, size=32)
    image = random_images(1, 32, seed=2)
    (tmp_path / "a.png").write_bytes(encode_png(image[0]))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(HANDLER), str(version.path), str(tmp_path / "a.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    good, bad = payload["answers"]
    assert payload["loaded"] == []
    np.testing.assert_allclose(good["rates"], reference_rates(version, image)[0], rtol=1e-5, atol=1e-6)
    assert good["neuron_ids"] == PredictorCard.load(version.card_path).neuron_ids
    assert "not a decodable image" in bad["error"]


def test_torchserve_worker_needs_torch_so_the_deploy_readme_lists_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK + "import ts.model_service_worker"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "torch" in result.stderr
    readme = (REPO / "deploy" / "README.md").read_text()
    install = re.search(r"^pip install torchserve .*$", readme, re.MULTILINE)
    assert install is not None, "deploy/README.md must say what TorchServe's Python needs"
    packages = set(install.group(0).split()[2:])
    assert {"torchserve", "torch", "pyyaml", "numpy", "pillow", "onnxruntime"} <= packages
