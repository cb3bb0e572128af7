"""Hold changed paths until their size and mtime stop moving, so a slow copy is read once.

Every hint (a watch event, a scan difference) lands here, keyed by path: repeated events
for one path coalesce into one entry, and an entry is released only when a fresh stat
equals the stat seen `settle_s` earlier.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# (size, mtime_ns, is_dir) of an existing path, or None when it does not exist.
Signature = tuple[int, int, bool] | None


def signature(path: str) -> Signature:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    is_dir = os.path.isdir(path)
    return (0, 0, True) if is_dir else (stat.st_size, stat.st_mtime_ns, False)


@dataclass
class _Pending:
    signature: Signature
    since_s: float
    is_dir: bool


class Settler:
    """Coalescing waiting room; `due()` hands out the paths that have been quiet long enough.

    Known limit: a writer that pauses longer than settle_s mid-copy gets its partial file
    published, then the complete one (two upserts, the last one right).
    """

    def __init__(self, settle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_s = settle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

    def touch(self, path: str, *, is_dir: bool = False) -> None:
        """Something may have changed at path: (re)start its quiet period if the stat moved."""
        current = signature(path)
        now = self._clock()
        with self._lock:
            entry = self._pending.get(path)
            if entry is None:
                self._pending[path] = _Pending(current, now, is_dir)
                return
            entry.is_dir = entry.is_dir or is_dir
            if entry.signature != current:
                entry.signature = current
                entry.since_s = now

    def due(self) -> list[tuple[str, bool]]:
        """Remove and return (path, is_dir) of entries whose stat held still for settle_s."""
        now = self._clock()
        with self._lock:
            candidates = [
                (path, entry.signature, entry.since_s)
                for path, entry in self._pending.items()
                if now - entry.since_s >= self.settle_s
            ]
        fresh = [(path, signature(path), since) for path, _, since in candidates]
        released: list[tuple[str, bool]] = []
        with self._lock:
            for (path, old, since), (_, new, _) in zip(candidates, fresh):
                entry = self._pending.get(path)
                if entry is None or entry.since_s != since:
                    continue
                if new != old:
                    entry.signature, entry.since_s = new, self._clock()
                    continue
                del self._pending[path]
                released.append((path, entry.is_dir))
        return released

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
