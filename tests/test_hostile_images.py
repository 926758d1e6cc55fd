"""Images from clients: only PNG, JPEG, BMP, TIFF, WebP and GIF are decoded (EPS never reaches
Ghostscript), and 16-bit and float images are scaled to 0..255, not clipped; through Predict too."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import decode_image
from neurotwin.v1 import predictor_pb2 as pb
from neurotwin.v1 import predictor_pb2_grpc as pb_grpc
from PIL import Image

from tests._models import make_predictor
from tests._serving import predictor_server

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill
showpage
%%EOF
"""


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def spy_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real ``gs`` executable first on PATH that records that it ran (and would render nothing)."""
    marker = tmp_path / "gs-ran"
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("gs", "gswin32c", "gswin64c"):
        script = folder / name
        script.write_text(
            f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo 10.02.1; exit 0; fi\ntouch {marker}\nexit 1\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return marker


def test_eps_is_refused_without_running_ghostscript(spy_ghostscript: Path) -> None:
    from PIL import EpsImagePlugin

    # Pillow would use Ghostscript: it finds our gs on PATH.
    EpsImagePlugin.gs_binary = None
    EpsImagePlugin.gs_windows_binary = None
    assert EpsImagePlugin.has_ghostscript()
    with pytest.raises(InvalidInput, match=r"allowed: PNG, JPEG, BMP, TIFF, WebP or GIF"):
        decode_image(EPS, what="upload")
    assert not spy_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"])
def test_allowed_formats_decode(fmt: str) -> None:
    pixels = np.full((12, 10, 3), 90, np.uint8)
    decoded = decode_image(_encode(pixels, fmt))
    assert decoded.shape == (12, 10, 3) and decoded.dtype == np.uint8
    assert abs(int(decoded.mean()) - 90) <= 3


@pytest.mark.parametrize(
    "data",
    [
        b"P6\n2 2\n255\n" + bytes(12),  # PPM: Pillow reads it, but it is not on the list
        b"GIF87a" + bytes(8),  # truncated
        b"\x89PNG\r\n\x1a\n" + b"junk",
        b"%PDF-1.4\n",
    ],
    ids=["ppm", "short-gif", "bad-png", "pdf"],
)
def test_other_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_is_scaled(fmt: str) -> None:
    values = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    decoded = decode_image(_encode(values, fmt))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 2], expected)
    # Clipping (the old behaviour) sent 99.6% of the pixels to 255.
    assert (decoded == 255).mean() < 0.01


def test_float_images_are_scaled() -> None:
    unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    decoded = decode_image(_encode(unit, "TIFF"))
    assert decoded.min() == 0 and decoded.max() == 255
    assert np.abs(decoded[..., 0].astype(int) - np.rint(unit * 255)).max() <= 1
    wide = np.linspace(0, 255, 64 * 64, dtype=np.float32).reshape(64, 64)
    assert np.abs(decode_image(_encode(wide, "TIFF"))[..., 1].astype(int) - np.rint(wide)).max() <= 1
    broken = unit.copy()
    broken[3, 3] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        decode_image(_encode(broken, "TIFF"))


def test_predict_sees_sixteen_bit_as_its_eight_bit_twin(tmp_path: Path, spy_ghostscript: Path) -> None:
    make_predictor(tmp_path, "tiny", neurons=5, size=32)
    gray8 = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    gray16 = gray8.astype(np.uint16) * 257
    with predictor_server(tmp_path) as (server, _):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.FiringRatePredictorStub(channel)

            def predict(data: bytes) -> np.ndarray:
                request = pb.PredictRequest(model="tiny", images=[pb.Image(encoded=data)])
                return np.asarray(stub.Predict(request, timeout=10).rates)

            eight = predict(_encode(np.repeat(gray8[:, :, None], 3, axis=2), "PNG"))
            assert np.array_equal(predict(_encode(gray16, "PNG")), eight)
            with pytest.raises(grpc.RpcError) as refused:
                predict(EPS)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "allowed: PNG, JPEG" in refused.value.details()
    assert not spy_ghostscript.exists()
