"""The committed generated gRPC code matches protos/ (regenerated here and compared byte for byte)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"


def _load_generator() -> object:
    path = ROOT / "protos" / "generate.py"
    spec = importlib.util.spec_from_file_location("_neurotwin_protos_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_in_sync(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    generator = _load_generator()
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generator.generate(tmp_path)}
    assert fresh, "protos/ holds no .proto files"
    missing = sorted(str(rel) for rel in fresh if not (SERVICES / rel).is_file())
    differ = sorted(
        str(rel)
        for rel, data in fresh.items()
        if (SERVICES / rel).is_file() and (SERVICES / rel).read_bytes() != data
    )
    assert not missing and not differ, (
        f"generated code out of date; run `python protos/generate.py` (missing {missing}, differ {differ})"
    )
    # Generated modules whose .proto is gone would still be importable and silently serve old APIs.
    committed = {
        p.relative_to(SERVICES)
        for folder in {rel.parent for rel in fresh}
        for p in (SERVICES / folder).glob("*_pb2*.py*")
    }
    orphans = sorted(str(p) for p in committed - set(fresh))
    assert not orphans, f"generated files without a .proto: {orphans}"


def test_generated_packages_import() -> None:
    """Generated modules import each other as ``neurotwin.<folder>``, which must resolve in our package."""
    for path in sorted(SERVICES.glob("neurotwin/*/*_pb2_grpc.py")):
        module = ".".join(path.relative_to(SERVICES).with_suffix("").parts)
        assert (path.parent / "__init__.py").is_file(), f"{path.parent} needs an __init__.py"
        importlib.import_module(module)
    assert "neurotwin.v1.predictor_pb2" in sys.modules
