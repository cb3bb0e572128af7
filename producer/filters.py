"""Which paths are images worth publishing: name rules first, then a cheap content sniff.

Name rules are checked on every watch event, so they touch no disk. The sniff reads at
most 16 bytes once a file has settled.
"""

from __future__ import annotations

import os
from pathlib import Path

# Partial or temporary names written by browsers, download managers, editors and sync
# tools; the real file appears when they rename it, and that rename is published.
TEMP_SUFFIXES = (
    ".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp", ".swx",
    ".!sync", ".!ut", ".!qb", ".filepart", ".bak", "~",
)
TEMP_PREFIXES = ("~$", ".~lock", ".sb-", ".goutputstream-", ".syncthing.", "~")

SNIFF_BYTES = 16
_JPEG = (b"\xff\xd8\xff",)
_TIFF = (b"II*\x00", b"MM\x00*")
# Signatures per extension; an extension missing here (e.g. .heic) is accepted unsniffed.
MAGIC: dict[str, tuple[bytes, ...]] = {
    ".jpg": _JPEG, ".jpeg": _JPEG, ".jpe": _JPEG, ".jfif": _JPEG,
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".gif": (b"GIF87a", b"GIF89a"),
    ".bmp": (b"BM",),
    ".tif": _TIFF, ".tiff": _TIFF,
    ".webp": (b"RIFF",),
}
ALL_SIGNATURES = tuple({sig for sigs in MAGIC.values() for sig in sigs})


def root_of(path: str, roots: list[str]) -> str | None:
    """The configured root (normalised) that contains path, or None."""
    for root in roots:
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return root
    return None


def name_skip_reason(path: str, roots: list[str], extensions: list[str]) -> str | None:
    """Why this file name is not published (None when it is a candidate image)."""
    root = root_of(path, roots)
    if root is None:
        return "outside roots"
    relative = path[len(root):].lstrip(os.sep)
    if any(part.startswith(".") for part in relative.split(os.sep)):
        return "hidden"
    name = os.path.basename(path)
    lowered = name.lower()
    if lowered.startswith(TEMP_PREFIXES) or lowered.endswith(TEMP_SUFFIXES):
        return "temporary name"
    if Path(lowered).suffix not in extensions:
        return "not an image extension"
    return None


def dir_skip_reason(path: str, roots: list[str]) -> str | None:
    """Why a directory is not descended into (hidden folders such as .git or .thumbnails)."""
    root = root_of(path, roots)
    if root is None:
        return "outside roots"
    relative = path[len(root):].lstrip(os.sep)
    if relative and any(part.startswith(".") for part in relative.split(os.sep)):
        return "hidden"
    return None


def content_skip_reason(path: str) -> str | None:
    """Why the bytes of a settled file are not an image (None when they look like one)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if not head:
        return "empty file"
    expected = MAGIC.get(Path(path).suffix.lower())
    if expected is None:
        return None
    if head.startswith(b"RIFF") and head[8:12] != b"WEBP":
        return "not an image: RIFF container without WEBP"
    # A .jpg holding PNG bytes still decodes, so any known image signature is accepted.
    if head.startswith(ALL_SIGNATURES):
        return None
    return f"not an image: content starts with {head[:8].hex()}"
