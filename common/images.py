"""The one image-decode path shared by workers and the searcher.

Every input becomes an RGB image with its EXIF orientation applied, or a DecodeError with a
reason code; no Pillow exception escapes. Animated and multi-page files use their first
frame (frame 0, as Pillow opens them). Known limit: embedded ICC profiles are ignored, so
CMYK and wide-gamut files use Pillow's plain conversion rather than colour management.
"""

from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import ImgSearchError

log = logging.getLogger(__name__)

REASONS = (
    "not_found", "permission", "empty", "truncated", "corrupt", "unsupported_format",
    "too_large",
)
BACKGROUND_RGB = (255, 255, 255)
"""Transparent pixels are composited on white so the same picture always embeds alike."""

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_GREY_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


class DecodeError(ImgSearchError):
    """An image could not be decoded; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self) -> tuple:
        return (DecodeError, (self.reason, self.detail))


def decode_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int, min_side: int = 0
) -> Image.Image:
    """Decode a file or bytes into an RGB image, EXIF orientation applied.

    The pixel limit is checked from the header before any pixel is decoded. With
    `min_side`, large JPEGs are decoded at a reduced scale whose short side stays
    >= min_side (JPEG draft mode), which is much faster and uses less memory.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_stream(io.BytesIO(bytes(source)), "<bytes>", max_pixels, min_side)

    name = os.fspath(source)
    try:
        with open(name, "rb") as handle:
            return _decode_stream(handle, name, max_pixels, min_side)
    except DecodeError:
        raise
    except FileNotFoundError as e:
        raise DecodeError("not_found", f"no such file {name}") from e
    except PermissionError as e:
        raise DecodeError("permission", f"cannot read {name}") from e
    except OSError as e:
        raise DecodeError("not_found", f"cannot open {name}: {e}") from e


def _decode_stream(
    stream: BinaryIO, name: str, max_pixels: int, min_side: int
) -> Image.Image:
    if _stream_size(stream) == 0:
        raise DecodeError("empty", f"{name} has 0 bytes")

    try:
        image = _open_checked(stream, name, max_pixels)
        _use_draft(image, min_side)
        image.load()
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("too_large", f"{name}: {e}") from e
    except (EOFError, OSError, SyntaxError, ValueError) as e:
        raise DecodeError(_failure_reason(e), f"{name}: {e}") from e
    except Exception as e:  # any other Pillow failure is a bad file, never a crash
        raise DecodeError("corrupt", f"{name}: {type(e).__name__}: {e}") from e

    oriented = _apply_orientation(image, name)
    return to_rgb(oriented, name)


def _stream_size(stream: BinaryIO) -> int:
    current = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(current)
    return end - current


def _open_checked(stream: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images over the pixel limit before decoding."""
    try:
        image = Image.open(stream)
    except UnidentifiedImageError as e:
        stream.seek(0)
        known = _known_signature(stream.read(16))
        if known:
            raise DecodeError("corrupt", f"{name}: {known} signature, unreadable header") from e
        raise DecodeError("unsupported_format", f"{name}: not a supported image") from e

    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            "too_large", f"{name}: {width}x{height} exceeds max_pixels={max_pixels}"
        )
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"{name}: header declares size {width}x{height}")
    return image


def _known_signature(head: bytes) -> str | None:
    """Name the format whose magic bytes start the file, to tell corrupt from foreign."""
    for magic, label in _SIGNATURES:
        if head.startswith(magic):
            return label
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _use_draft(image: Image.Image, min_side: int) -> None:
    """Let libjpeg scale by 1/2, 1/4 or 1/8 while both sides stay >= min_side."""
    if min_side <= 0 or image.format != "JPEG" or min(image.size) < 2 * min_side:
        return
    image.draft(image.mode, (min_side, min_side))


def _failure_reason(error: BaseException) -> str:
    text = str(error).lower()
    if isinstance(error, EOFError) or "truncated" in text or "end of file" in text:
        return "truncated"
    if "not supported" in text or "unsupported" in text or "unknown" in text:
        return "unsupported_format"
    return "corrupt"


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    """Rotate/flip by EXIF orientation; a malformed EXIF block leaves pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:
        log.warning("exif_ignored path=%s error=%s", name, e)
        return image


def to_rgb(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to RGB: alpha over white, wide greyscale stretched by range."""
    try:
        if image.mode == "RGB":
            return image
        if image.mode in _WIDE_GREY_MODES:
            return _stretch_grey(image).convert("RGB")
        if image.mode == "P" or image.mode in _ALPHA_MODES:
            return _flatten_alpha(image)
        if image.mode == "1":
            image = image.convert("L")
        return image.convert("RGB")
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("unsupported_format", f"{name}: mode {image.mode}: {e}") from e


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _stretch_grey(image: Image.Image) -> Image.Image:
    """Map the values actually present onto 0..255 (16/32-bit and float greyscale).

    A flat image has no range to stretch: 16-bit values scale by 65535, others clip.
    """
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    if high > low:
        scaled = (values - low) * (255.0 / (high - low))
    elif image.mode.startswith("I;16"):
        scaled = values * (255.0 / 65535.0)
    else:
        scaled = values
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
