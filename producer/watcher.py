"""watchdog observers over the roots, turning file-system events into path hints.

One recursive watch per root on the native (inotify) observer, or on a polling observer
when settings ask for it or when the kernel runs out of inotify watches or instances.
Events are only hints: every hinted path is looked at again once it has settled.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from watchdog.events import (
    EVENT_TYPE_ATTRIB,
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_EVENTS_LOST,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from common.ids import normalise_path

log = logging.getLogger(__name__)

OnChange = Callable[[str, bool], None]
LIMIT_ERRNOS = {errno.ENOSPC, errno.EMFILE}
LIMIT_HINT = (
    "inotify limit reached (raise fs.inotify.max_user_watches / max_user_instances, "
    "e.g. sysctl fs.inotify.max_user_watches=524288); falling back to polling"
)


class _Handler(FileSystemEventHandler):
    """Forwards every meaningful event as (path, is_dir); never raises into watchdog."""

    IGNORED = {EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE}

    def __init__(self, on_change: OnChange) -> None:
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in self.IGNORED:
            return
        # A folder's own modified/attrib events repeat what its files' events say.
        if event.is_directory and event.event_type in {EVENT_TYPE_MODIFIED, EVENT_TYPE_ATTRIB}:
            return
        is_dir = event.is_directory or event.event_type == EVENT_TYPE_EVENTS_LOST
        try:
            self.on_change(normalise_path(os.fsdecode(event.src_path)), is_dir)
            if event.event_type == EVENT_TYPE_MOVED and event.dest_path:
                self.on_change(normalise_path(os.fsdecode(event.dest_path)), is_dir)
        except Exception:  # noqa: BLE001 - one bad event must not stop the observer
            log.exception("watch event dropped event=%r", event)


class _LimitSpotter(logging.Handler):
    """Notices watchdog's 'Unable to watch' warning for ENOSPC/EMFILE on a live watch."""

    def __init__(self, report: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [arg for arg in args if isinstance(arg, OSError)]
        if any(error.errno in LIMIT_ERRNOS for error in errors) and args:
            self.report(os.fsdecode(args[0]) if isinstance(args[0], bytes | str) else "")


class Watcher:
    """Watches each root; `maintain()` (called about once a second) heals watches."""

    def __init__(self, roots: list[str], on_change: OnChange, *, polling: bool,
                 poll_interval_s: float) -> None:
        self.roots = roots
        self.on_change = on_change
        self.polling = polling
        self._handler = _Handler(on_change)
        self._native: BaseObserver = Observer()
        self._poller: BaseObserver = PollingObserver(timeout=poll_interval_s)
        self._watches: dict[str, tuple[BaseObserver, ObservedWatch]] = {}
        self._identity: dict[str, tuple[int, int]] = {}
        self._unwatched: set[str] = set()
        self._limit_hits: set[str] = set()
        self._lock = threading.Lock()
        self._spotter = _LimitSpotter(self._note_limit)

    def start(self) -> None:
        logging.getLogger("watchdog.observers.inotify").addHandler(self._spotter)
        self._native.start()
        self._poller.start()
        for root in self.roots:
            self._watch(root)

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify").removeHandler(self._spotter)
        for observer in (self._native, self._poller):
            observer.stop()
        for observer in (self._native, self._poller):
            observer.join(timeout=10)

    def mode(self, root: str) -> str:
        """'native', 'polling' or 'unwatched' for one root (for logs and tests)."""
        entry = self._watches.get(root)
        if entry is None:
            return "unwatched"
        return "polling" if entry[0] is self._poller else "native"

    def maintain(self) -> None:
        """Re-watch roots that came back, drop vanished ones, move limited ones to polling."""
        for root in self._take_limit_hits():
            self._to_polling(root)
        for root in list(self._watches):
            if not os.path.isdir(root):
                log.warning("root vanished, watch dropped until it returns root=%s", root)
                self._unwatch(root)
                self._unwatched.add(root)
            elif self._watch_died(root):
                log.warning("root replaced or its watch ended, re-watching root=%s", root)
                self._unwatch(root)
                self._unwatched.add(root)
        for root in sorted(self._unwatched):
            if os.path.isdir(root) and self._watch(root):
                log.info("root available again, rescanning root=%s", root)
                self.on_change(root, True)

    def _watch_died(self, root: str) -> bool:
        """True when the root is another folder now (rm -rf + mkdir, mv + mkdir) or the
        watch's emitter stopped (inotify ends a watch whose folder was deleted)."""
        if _identity(root) != self._identity.get(root):
            return True
        observer, watch = self._watches[root]
        return not any(emitter.watch == watch and emitter.is_alive()
                       for emitter in list(observer.emitters))

    def _watch(self, root: str) -> bool:
        identity = _identity(root)
        if identity is None or not os.path.isdir(root):
            log.warning("root missing or not a folder, not watched (retried) root=%s", root)
            self._unwatched.add(root)
            return False
        self._identity[root] = identity
        observer = self._poller if self.polling else self._native
        try:
            watch = observer.schedule(self._handler, root, recursive=True)
        except OSError as error:
            if observer is self._poller or error.errno not in LIMIT_ERRNOS:
                log.warning("root not watched (retried) root=%s error=%s", root, error)
                self._unwatched.add(root)
                return False
            log.warning("%s root=%s error=%s", LIMIT_HINT, root, error)
            observer = self._poller
            watch = observer.schedule(self._handler, root, recursive=True)
        self._watches[root] = (observer, watch)
        self._unwatched.discard(root)
        log.info("watching root=%s mode=%s", root, self.mode(root))
        return True

    def _unwatch(self, root: str) -> None:
        observer, watch = self._watches.pop(root)
        try:
            observer.unschedule(watch)
        except (KeyError, OSError) as error:
            log.debug("unschedule failed root=%s error=%s", root, error)

    def _to_polling(self, root: str) -> None:
        if self.mode(root) != "native":
            return
        log.warning("%s root=%s", LIMIT_HINT, root)
        self._unwatch(root)
        self._watches[root] = (self._poller, self._poller.schedule(
            self._handler, root, recursive=True))
        self.on_change(root, True)

    def _note_limit(self, path: str) -> None:
        normalised = normalise_path(path) if path else ""
        with self._lock:
            for root in self.roots:
                if not normalised or normalised.startswith(root):
                    self._limit_hits.add(root)

    def _take_limit_hits(self) -> list[str]:
        with self._lock:
            hits, self._limit_hits = sorted(self._limit_hits), set()
            return hits


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the folder now at path, None when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino
