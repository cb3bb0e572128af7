"""What this process believes the topic holds per path: the ledger plus what it queued since.

Decisions (publish or not) are taken against this map, not the ledger, so an event that is
queued but not yet acknowledged is never published twice.
"""

from __future__ import annotations

import os
import threading

from producer.ledger import FileState


class KnownFiles:
    """Thread-safe path -> FileState map; `loaded` turns True once the ledger was read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, FileState] = {}
        self._decided_before_load: set[str] = set()
        self.loaded = False

    def get(self, path: str) -> FileState | None:
        with self._lock:
            return self._files.get(path)

    def set(self, path: str, state: FileState) -> None:
        with self._lock:
            self._files[path] = state
            self._note(path)

    def pop(self, path: str) -> FileState | None:
        with self._lock:
            self._note(path)
            return self._files.pop(path, None)

    def _note(self, path: str) -> None:
        if not self.loaded:
            self._decided_before_load.add(path)

    def merge_ledger(self, entries: dict[str, FileState]) -> None:
        """Add ledger entries, except for paths this run decided on before the load."""
        with self._lock:
            for path, state in entries.items():
                if path not in self._decided_before_load:
                    self._files[path] = state
            self._decided_before_load.clear()
            self.loaded = True

    def under(self, directory: str) -> list[str]:
        """Known paths inside directory.

        Known limit: a linear pass over every known path; fine for a few million paths,
        called only for directory events and reconciliation.
        """
        prefix = directory.rstrip(os.sep) + os.sep
        with self._lock:
            return [path for path in self._files if path.startswith(prefix)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)
