"""Image bytes <-> uint8 RGB arrays, with limits that refuse decompression bombs before decoding."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from neurotwin.errors import InvalidInput

DEFAULT_MAX_PIXELS = 4096 * 4096


# Formats Pillow may even try to identify. Never EPS/PS/PDF: Pillow hands those to Ghostscript, an
# external interpreter of a programming language, on whatever bytes a client sends.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
_ALLOWED_NAMES = "PNG, JPEG, BMP, TIFF, WebP or GIF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> np.ndarray:
    """PNG, JPEG, BMP, TIFF, WebP or GIF -> uint8 [H, W, 3] RGB; 16-bit and float images are scaled
    to 0..255 rather than clipped.

    The format is identified among the allowed ones only, and the pixel count is read from the
    header and checked before any pixel is decoded.
    """
    if not data:
        raise InvalidInput(f"{what}: empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"{what}: {width} x {height} pixels exceeds the limit of {max_pixels} decoded pixels"
                )
            img.load()
    except InvalidInput:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"{what}: not a decodable image (allowed: {_ALLOWED_NAMES})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{what}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:
        raise InvalidInput(f"{what}: not a decodable image ({type(exc).__name__}: {exc})") from exc
    return _to_rgb8(img, what)


def _to_rgb8(img: Image.Image, what: str) -> np.ndarray:
    """Any decoded mode -> uint8 RGB. Pillow's own convert("RGB") clips 16-bit and float grays at 255
    (a 16-bit scan comes out almost all white), so those are scaled here."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(img, dtype=np.float32) / 257.0
    elif mode == "I":
        # 32-bit integers: 8-bit data kept as is, anything wider read as 16-bit (what PNG and TIFF
        # scanners write), clipped to it.
        values = np.asarray(img, dtype=np.int64)
        wide = values.size and values.max() > 255
        gray = np.clip(values, 0, 65535).astype(np.float32) / (257.0 if wide else 1.0)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InvalidInput(f"{what}: float image with NaN or infinite pixels")
        # The float convention is 0..1; data already on 0..255 is taken as that, and clipped.
        unit = values.size and values.min() >= 0 and values.max() <= 1
        gray = np.clip(values * 255.0 if unit else values, 0, 255).astype(np.float32)
    else:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray8[:, :, None], 3, axis=2)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png_fast(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG with the 'sub' filter and run-length-only deflate.

    Pillow's encoder tries harder for little gain; on smooth generator images the 'sub' filter leaves
    mostly runs, which Z_RLE codes about as small as full deflate in half the time. That keeps a
    40-image closed-loop generation well inside the Ask budget, and any PNG decoder reads the result.
    """
    height, width, _ = image.shape
    flat = np.ascontiguousarray(image, dtype=np.uint8).reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type 1 (sub): each byte minus the byte one pixel to the left
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = deflate.compress(rows.tobytes()) + deflate.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    fmt = fmt.lower()
    if fmt == "png":
        return encode_png(image)
    if fmt in ("jpeg", "jpg"):
        return encode_jpeg(image)
    raise InvalidInput(f"image format {fmt!r}: expected 'png' or 'jpeg'")


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one uint8 [H, W, 3] image (used for stimulus sizes, not in the predictor path)."""
    if image.shape[:2] == (height, width):
        return image
    img = Image.fromarray(image, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def resize_batch(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, height, width, 3], bilinear (antialiased when shrinking).

    Pillow resamples uint8 directly, about twice as fast as interpolating floats in torch.
    """
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        resized = Image.fromarray(np.ascontiguousarray(image), "RGB").resize(
            (width, height), Image.Resampling.BILINEAR
        )
        out[i] = np.asarray(resized)
    return out
