"""Which paths are images worth publishing: name rules first, then a cheap content sniff.

Name rules are checked on every watch event, so they touch no disk. The sniff reads at
most 16 bytes once a file has settled.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Partial or temporary names written by browsers, download managers, editors and sync
# tools; the real file appears when they rename it, and that rename is published.
TEMP_SUFFIXES = (
    ".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".swp", ".swx",
    ".!sync", ".!ut", ".!qb", ".filepart", ".bak", "~",
)
TEMP_PREFIXES = ("~$", ".~lock", ".sb-", ".goutputstream-", ".syncthing.", "~")

# Skip reasons an operator must hear about (once per path, see SkipNotices).
BAD_NAME = "file name is not valid UTF-8"
NOT_REGULAR = "not a regular file (FIFO, socket or device)"
FOLDER_LINK = "symlink to a folder (folder symlinks are never followed)"

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
    if not is_utf8(path):
        return BAD_NAME
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


def is_utf8(path: str) -> bool:
    """False for names decoded with surrogateescape: the event key and JSON need UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """The path for a log line, undecodable bytes shown as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def crosses_folder_link(path: str, roots: list[str]) -> bool:
    """True when a folder between the root and path is a symlink (never followed)."""
    root = root_of(path, roots)
    if root is None:
        return False
    folder = os.path.dirname(path)
    while len(folder) > len(root):
        if os.path.islink(folder):
            return True
        folder = os.path.dirname(folder)
    return False


def content_skip_reason(path: str) -> str | None:
    """Why the bytes of a settled file are not an image (None when they look like one).

    The open never blocks: O_NONBLOCK, and the opened object must be a regular file, so a
    FIFO named x.jpg (even one swapped in after an earlier stat) is refused, not waited on.
    """
    try:
        head = _read_head(path)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if head is None:
        return NOT_REGULAR
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


def _read_head(path: str) -> bytes | None:
    """The first SNIFF_BYTES of a regular file; None when path is not a regular file."""
    if not stat_module.S_ISREG(os.stat(path).st_mode):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, SNIFF_BYTES)
    finally:
        os.close(fd)


class SkipNotices:
    """Warns once per (path, reason), so a periodic scan does not repeat the same warning."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()

    def warn(self, path: str, reason: str) -> None:
        with self._lock:
            if (path, reason) in self._seen:
                return
            if len(self._seen) >= self.limit:
                self._seen.clear()  # bounded memory; a very long run may repeat a warning
            self._seen.add((path, reason))
        log.warning("file skipped path=%s reason=%s", printable(path), reason)
