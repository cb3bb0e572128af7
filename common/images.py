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
import stat
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
        with _open_regular(name) as handle:
            return _decode_stream(handle, name, max_pixels, min_side)
    except DecodeError:
        raise
    except FileNotFoundError as e:
        raise DecodeError("not_found", f"no such file {name}") from e
    except PermissionError as e:
        raise DecodeError("permission", f"cannot read {name}") from e
    except ValueError as e:  # a NUL byte in the path: no such file can exist
        raise DecodeError("not_found", f"invalid path {name!r}: {e}") from e
    except OSError as e:
        raise DecodeError("not_found", f"cannot open {name}: {e}") from e


def _open_regular(name: str) -> BinaryIO:
    """Open a regular file only: a FIFO would block open() forever, a device never end.

    The type is checked before opening (so no device is ever opened) and again on the
    open descriptor (O_NONBLOCK, so a file swapped for a FIFO in between cannot block).
    """
    _require_regular(os.stat(name).st_mode, name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(name, flags)
    try:
        _require_regular(os.fstat(fd).st_mode, name)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    raise DecodeError("unsupported_format", f"not a regular file: {_file_kind(mode)} {name}")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((label for test, label in kinds if test(mode)), "special file")


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
    """Convert any Pillow mode to RGB: alpha and tRNS over white, wide greyscale rescaled."""
    try:
        if _has_colour_key(image):
            return _flatten_colour_key(image)
        if image.mode == "RGB":
            return image
        if image.mode in _WIDE_GREY_MODES:
            return Image.fromarray(_grey_to_8bit(image)).convert("RGB")
        if image.mode == "P" or image.mode in _ALPHA_MODES:
            return _flatten_alpha(image)
        if image.mode == "1":
            image = image.convert("L")
        return image.convert("RGB")
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError("unsupported_format", f"{name}: mode {image.mode}: {e}") from e


def _has_colour_key(image: Image.Image) -> bool:
    """A tRNS colour key (one fully transparent value) in a greyscale or RGB image."""
    key = image.info.get("transparency")
    if image.mode == "RGB":
        return (isinstance(key, tuple) and len(key) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in key))
    if image.mode == "L":
        return isinstance(key, int) and 0 <= key <= 255
    return image.mode in _WIDE_GREY_MODES and isinstance(key, int)


def _flatten_colour_key(image: Image.Image) -> Image.Image:
    """Pixels equal to the key become the background; the key is compared on raw values.

    Known limit: Pillow reduces 16-bit RGB PNGs to 8 bits but keeps a 16-bit key, which
    then matches nothing, so such images are not flattened.
    """
    key = image.info["transparency"]
    raw = np.asarray(image)
    if image.mode == "RGB":
        hidden = np.all(raw == np.asarray(key, dtype=raw.dtype), axis=-1)
        rgb = raw.copy()
    else:
        hidden = raw == key
        grey = raw if image.mode == "L" else _grey_to_8bit(image)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[hidden] = BACKGROUND_RGB
    return Image.fromarray(rgb, "RGB")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


_FULL_SCALE_16 = 65535.0


def _grey_to_8bit(image: Image.Image) -> np.ndarray:
    """8-bit grey from 16/32-bit integer or float greyscale, keeping absolute brightness.

    16-bit modes and 32-bit values inside 0..65535 scale by full range (/257); floats
    inside 0..1 by 255. Only values outside those ranges (no known full scale) are
    mapped from their own min..max; a flat such image is clipped to 0..255.
    """
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0

    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0
                                          and high <= _FULL_SCALE_16):
        scaled = values * (255.0 / _FULL_SCALE_16)
    elif image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = values

    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
