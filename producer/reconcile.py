"""Compare the folders (the truth) with what was published, and queue every difference.

Differences are not published from here: they go to the settler like any watch event, so
a file still being copied is published once it is complete.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from producer.filters import (
    BAD_NAME,
    FOLDER_LINK,
    NOT_REGULAR,
    SkipNotices,
    dir_skip_reason,
    name_skip_reason,
)
from producer.known import KnownFiles
from producer.settle import Settler

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)

    def covers(self, path: str) -> bool:
        """False for paths inside a folder the scan could not read (never deleted)."""
        return not any(
            path.startswith(folder.rstrip(os.sep) + os.sep) for folder in self.unreadable
        )


@dataclass
class TreeReport:
    seen: int = 0
    changed: int = 0
    gone: int = 0
    skipped_roots: list[str] = field(default_factory=list)

    def add(self, other: TreeReport) -> None:
        self.seen += other.seen
        self.changed += other.changed
        self.gone += other.gone
        self.skipped_roots += other.skipped_roots


class _Progress:
    def __init__(self, top: str, interval_s: float, published: Callable[[], int]) -> None:
        self.top = top
        self.interval_s = interval_s
        self.published = published
        self.started_s = time.monotonic()
        self.last_s = self.started_s
        self.seen = 0

    def tick(self) -> None:
        self.seen += 1
        now = time.monotonic()
        if now - self.last_s >= self.interval_s:
            self.last_s = now
            rate = self.seen / max(now - self.started_s, 1e-6)
            log.info("scan progress root=%s files_seen=%d published_total=%d rate_per_s=%.0f",
                     self.top, self.seen, self.published(), rate)


class Reconciler:
    def __init__(self, roots: list[str], extensions: list[str], known: KnownFiles,
                 settler: Settler, progress_interval_s: float = 5.0,
                 published: Callable[[], int] = lambda: 0,
                 empty_root_is_unmounted: bool = True) -> None:
        self.roots = roots
        self.extensions = extensions
        self.known = known
        self.settler = settler
        self.progress_interval_s = progress_interval_s
        self.published = published
        self.empty_root_is_unmounted = empty_root_is_unmounted
        self.notices = SkipNotices()

    def reconcile(self) -> TreeReport:
        """Scan every root; a missing or unreadable root is skipped, never turned to deletes."""
        started = time.monotonic()
        total = TreeReport()
        for root in self.roots:
            total.add(self.check_root(root))
        log.info(
            "reconcile done roots=%d files_seen=%d changed=%d gone=%d skipped_roots=%d "
            "published_total=%d duration_s=%.2f", len(self.roots), total.seen, total.changed,
            total.gone, len(total.skipped_roots), self.published(), time.monotonic() - started,
        )
        return total

    def check_root(self, root: str) -> TreeReport:
        known_count = len(self.known.under(root))
        if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
            log.warning(
                "root unavailable, skipped (missing, unmounted or unreadable) root=%s "
                "known_files_kept=%d", root, known_count,
            )
            return TreeReport(skipped_roots=[root])
        scan = self.scan(root)
        if not scan.files and root in scan.unreadable:
            log.warning("root unreadable, skipped root=%s known_files_kept=%d",
                        root, known_count)
            return TreeReport(skipped_roots=[root])
        if not scan.files and known_count and self._looks_unmounted(root):
            # An empty mount point looks exactly like an emptied folder: refuse mass deletion.
            log.warning(
                "root is empty but %d files were published from it; treated as unmounted, "
                "no deletes (set IMGSEARCH_WATCH__EMPTY_ROOT_IS_UNMOUNTED=false to publish "
                "them) root=%s", known_count, root,
            )
            return TreeReport(skipped_roots=[root])
        return self.compare(root, scan)

    def _looks_unmounted(self, root: str) -> bool:
        """An empty root may be a bare mount point; one with any entry at all is mounted."""
        if not self.empty_root_is_unmounted:
            return False
        try:
            with os.scandir(root) as entries:
                return next(entries, None) is None
        except OSError:
            return True

    def check_tree(self, top: str) -> TreeReport:
        """Queue differences under one existing folder (a directory event)."""
        return self.compare(top, self.scan(top))

    def scan(self, top: str) -> ScanResult:
        result = ScanResult()
        progress = _Progress(top, self.progress_interval_s, self.published)
        stack = [top]
        while stack:
            folder = stack.pop()
            self._scan_folder(folder, stack, result, progress)
        return result

    def _scan_folder(self, folder: str, stack: list[str], result: ScanResult,
                     progress: _Progress) -> None:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    self._scan_entry(entry, stack, result, progress)
        except OSError as error:
            log.warning("folder unreadable, its files are kept as they are folder=%s "
                        "error=%s", folder, error.strerror or error)
            result.unreadable.append(folder)

    def _scan_entry(self, entry: os.DirEntry[str], stack: list[str], result: ScanResult,
                    progress: _Progress) -> None:
        path = entry.path
        if entry.is_dir(follow_symlinks=False):
            if dir_skip_reason(path, self.roots) is None:
                stack.append(path)
            return
        reason = name_skip_reason(path, self.roots, self.extensions)
        if reason is not None:
            if reason == BAD_NAME:
                self.notices.warn(path, reason)
            return
        try:
            if not entry.is_file():  # follows a file symlink; a folder symlink is refused
                if entry.is_dir():
                    self.notices.warn(path, FOLDER_LINK)
                elif not entry.is_symlink():  # a dangling symlink is just not there yet
                    self.notices.warn(path, NOT_REGULAR)
                return
            stat = entry.stat()
        except OSError:
            return
        progress.tick()
        result.files[path] = (stat.st_size, stat.st_mtime_ns)

    def compare(self, top: str, scan: ScanResult) -> TreeReport:
        report = TreeReport(seen=len(scan.files))
        for path, (size, mtime_ns) in scan.files.items():
            state = self.known.get(path)
            if state is None or not state.same_stat(size, mtime_ns):
                self.settler.touch(path)
                report.changed += 1
        for path in self.known.under(top):
            if path not in scan.files and scan.covers(path):
                self.settler.touch(path)
                report.gone += 1
        return report
