"""The canonical decode path: modes to RGB with real pixel values, and every failure reason."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.images import DecodeError, decode_image

LIMIT = 10_000_000


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a size, followed by one row of pixel data only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    one_row = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", one_row)


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(image)[y, x])  # type: ignore[return-value]


def test_cmyk_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))

    decoded = decode_image(_encode(cmyk, "TIFF"), max_pixels=LIMIT)

    assert decoded.mode == "RGB"
    assert _pixel(decoded, 3, 2) == (255, 0, 0)


def test_palette_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((3, 1), 1)
    data = _encode(palette, "PNG", transparency=0)

    decoded = decode_image(data, max_pixels=LIMIT)

    assert _pixel(decoded, 0, 0) == (255, 255, 255)
    assert _pixel(decoded, 3, 1) == (0, 0, 255)


def test_la_alpha_blends_with_white() -> None:
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (100, 128)])

    decoded = decode_image(_encode(la, "PNG"), max_pixels=LIMIT)

    assert _pixel(decoded, 0, 0) == (255, 255, 255)
    assert _pixel(decoded, 1, 0) == (0, 0, 0)
    blended = round((100 * 128 + 255 * 127) / 255)
    assert all(abs(v - blended) <= 1 for v in _pixel(decoded, 2, 0))


def test_rgba_half_transparent_red_over_white() -> None:
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))

    decoded = decode_image(_encode(rgba, "PNG"), max_pixels=LIMIT)

    red, green, blue = _pixel(decoded, 1, 1)
    assert red == 255 and abs(green - 127) <= 1 and green == blue


def test_16_bit_grey_is_rescaled_by_full_scale_not_clipped() -> None:
    values = np.array([[1000, 2000, 3000, 65535]], dtype=np.uint16)
    grey16 = Image.fromarray(values[:, :3])
    assert grey16.mode.startswith("I;16")

    dark = decode_image(_encode(grey16, "PNG"), max_pixels=LIMIT)
    full = decode_image(_encode(Image.fromarray(values), "PNG"), max_pixels=LIMIT)

    assert [_pixel(dark, x, 0) for x in range(3)] == [(4, 4, 4), (8, 8, 8), (12, 12, 12)]
    assert _pixel(full, 3, 0) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_flat_mid_grey_16_bit_stays_mid_grey(fmt: str) -> None:
    values = np.full((6, 5), 32768, dtype=np.uint16)
    values[2, 2] = 32800  # a speck a range-stretch would turn white, the rest black
    flat = Image.fromarray(values)

    decoded = decode_image(_encode(flat, fmt), max_pixels=LIMIT)

    pixels = np.asarray(decoded).astype(int)
    assert pixels.min() >= 127 and pixels.max() <= 128


def test_32_bit_int_grey_within_16_bits_uses_full_scale_else_its_range() -> None:
    in_range = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    wide = Image.fromarray(np.array([[-5_000_000, 0, 5_000_000]], dtype=np.int32))
    flat = Image.fromarray(np.full((2, 2), 20_000, dtype=np.int32))
    assert in_range.mode == wide.mode == flat.mode == "I"

    decoded = [decode_image(_encode(image, "TIFF"), max_pixels=LIMIT)
               for image in (in_range, wide, flat)]

    assert [_pixel(decoded[0], x, 0)[0] for x in range(3)] == [0, 128, 255]
    assert [_pixel(decoded[1], x, 0)[0] for x in range(3)] == [0, 128, 255]
    assert _pixel(decoded[2], 1, 1) == (78, 78, 78)  # 20000 / 257, not clipped to 255


def test_float_grey_within_0_1_scales_by_255_else_uses_its_range() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    flat = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    wide = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))
    assert unit.mode == flat.mode == wide.mode == "F"

    decoded = [decode_image(_encode(image, "TIFF"), max_pixels=LIMIT)
               for image in (unit, flat, wide)]

    assert [_pixel(decoded[0], x, 0)[0] for x in range(3)] == [0, 64, 255]
    assert _pixel(decoded[1], 0, 0) == (128, 128, 128)
    assert [_pixel(decoded[2], x, 0)[0] for x in range(3)] == [0, 64, 255]


def test_trns_colour_key_in_grey_png_becomes_white() -> None:
    grey = Image.new("L", (3, 1), 7)
    grey.putpixel((2, 0), 90)

    decoded = decode_image(_encode(grey, "PNG", transparency=7), max_pixels=LIMIT)

    assert _pixel(decoded, 0, 0) == (255, 255, 255)
    assert _pixel(decoded, 2, 0) == (90, 90, 90)


def test_trns_colour_key_in_rgb_png_becomes_white() -> None:
    rgb = Image.new("RGB", (3, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (1, 2, 4))

    decoded = decode_image(_encode(rgb, "PNG", transparency=(1, 2, 3)), max_pixels=LIMIT)

    assert _pixel(decoded, 0, 0) == (255, 255, 255)
    assert _pixel(decoded, 1, 0) == (1, 2, 4)


def test_trns_colour_key_in_16_bit_grey_png_becomes_white() -> None:
    grey16 = Image.fromarray(np.array([[500, 32768]], dtype=np.uint16))

    decoded = decode_image(_encode(grey16, "PNG", transparency=500), max_pixels=LIMIT)

    assert _pixel(decoded, 0, 0) == (255, 255, 255)
    assert _pixel(decoded, 1, 0) == (128, 128, 128)


def test_plain_greyscale_keeps_its_value() -> None:
    grey = Image.new("L", (5, 5), 77)

    decoded = decode_image(_encode(grey, "PNG"), max_pixels=LIMIT)

    assert decoded.mode == "RGB" and _pixel(decoded, 2, 2) == (77, 77, 77)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)

    decoded = decode_image(data, max_pixels=LIMIT)

    assert _pixel(decoded, 4, 4) == (255, 0, 0)


def test_exif_orientation_is_applied_first(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)

    decoded = decode_image(path, max_pixels=LIMIT)

    assert decoded.size == (20, 40)
    assert min(_pixel(decoded, 10, 3)) > 200  # the band is now at the top
    assert max(_pixel(decoded, 10, 36)) < 50


def test_format_comes_from_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really-a-png.jpg"
    Image.new("RGB", (3, 3), (10, 20, 30)).save(path, "PNG")

    assert _pixel(decode_image(path, max_pixels=LIMIT), 1, 1) == (10, 20, 30)


def test_jpeg_draft_decodes_smaller_but_covers_min_side() -> None:
    data = _encode(Image.new("RGB", (2000, 1500), (90, 90, 90)), "JPEG")

    full = decode_image(data, max_pixels=LIMIT)
    reduced = decode_image(data, max_pixels=LIMIT, min_side=256)

    assert full.size == (2000, 1500)
    assert min(reduced.size) >= 256 and reduced.size[0] < 1000


def _reason(source: object, max_pixels: int = LIMIT) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_image(source, max_pixels=max_pixels)  # type: ignore[arg-type]
    assert str(caught.value).startswith(caught.value.reason + ": ")
    return caught.value.reason


def test_failure_reasons(tmp_path: Path) -> None:
    photo = _encode(Image.radial_gradient("L").convert("RGB"), "JPEG")
    png = _encode(Image.radial_gradient("L"), "PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(photo[: len(photo) // 2])
    (tmp_path / "notes.jpg").write_text("this is a text file, not a picture\n")

    assert _reason(tmp_path / "missing.jpg") == "not_found"
    assert _reason(tmp_path / "empty.jpg") == "empty"
    assert _reason(tmp_path / "cut.jpg") == "truncated"
    assert _reason(png[: len(png) - 40]) == "truncated"
    assert _reason(tmp_path / "notes.jpg") == "unsupported_format"
    assert _reason(photo[:4] + os.urandom(2000)) in ("corrupt", "truncated")


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The header claims 4000x3000 and no pixel data follows: decoding would say
    # "truncated", so "too_large" proves the limit is enforced before decoding.
    header_only = _png_header_only(4000, 3000)

    assert _reason(header_only, max_pixels=1_000_000) == "too_large"
    assert _reason(header_only, max_pixels=20_000_000) in ("truncated", "corrupt")


def test_pillow_bomb_guard_becomes_too_large_and_global_limit_is_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS

    reason = _reason(_png_header_only(30_000, 30_000), max_pixels=10**10)

    assert reason == "too_large"
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode bits")
def test_unreadable_file_is_permission(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)

    assert _reason(path) == "permission"


@contextmanager
def fifo_rescue(fifo: Path, after_s: float) -> Iterator[None]:
    """If a reader is still blocked in open() after after_s, open the writer end and close
    it, so a regression fails the test (a late, wrong result) instead of hanging the run."""
    def rescue() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader is waiting: nothing to rescue

    timer = threading.Timer(after_s, rescue)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _timed_reason(path: object) -> tuple[str, str, float]:
    started = time.monotonic()
    with pytest.raises(DecodeError) as caught:
        decode_image(path, max_pixels=LIMIT)  # type: ignore[arg-type]
    return caught.value.reason, caught.value.detail, time.monotonic() - started


@pytest.mark.timeout(10)
def test_fifo_named_jpg_fails_fast_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)

    with fifo_rescue(fifo, after_s=3.0):
        reason, detail, elapsed_s = _timed_reason(fifo)

    assert (reason, elapsed_s < 1.0) == ("unsupported_format", True)
    assert detail.startswith("not a regular file: fifo")


@pytest.mark.timeout(10)
def test_directory_socket_and_device_are_not_regular_files(tmp_path: Path) -> None:
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sock.jpg"))
    try:
        outcomes = [_timed_reason(path)[:2] for path in
                    (folder, tmp_path / "sock.jpg", Path("/dev/null"))]
    finally:
        listener.close()

    assert [reason for reason, _ in outcomes] == ["unsupported_format"] * 3
    assert [detail.split(" ")[4] for _, detail in outcomes] == ["directory", "socket",
                                                                 "character"]


def test_path_with_a_nul_byte_is_not_found(tmp_path: Path) -> None:
    assert _reason(str(tmp_path / "bad\x00name.jpg")) == "not_found"
    assert _reason(Path(tmp_path, "x\x00.png")) == "not_found"
