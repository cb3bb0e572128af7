"""Path normalisation and the deterministic vector id every process derives from a path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ID_MASK = (1 << 63) - 1


def normalise_path(path: str | os.PathLike[str]) -> str:
    """Absolute, with `.`/`..` and duplicate separators folded; symlinks are not resolved."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def path_id(path: str) -> int:
    """A 63-bit slice of SHA-256 of the normalised path: same in every process and restart.

    Python's hash() is salted per process and must never be used for this.
    """
    digest = hashlib.sha256(normalise_path(path).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") & ID_MASK


def is_under(path: str, roots: list[Path]) -> bool:
    """True when the normalised path lies inside one of the normalised roots."""
    candidate = normalise_path(path)
    for root in roots:
        base = normalise_path(root)
        if candidate == base or candidate.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def file_fingerprint(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """BLAKE2b-128 of the file's bytes: fast, and equal for equal content under any name."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
