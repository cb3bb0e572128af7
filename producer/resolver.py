"""Turn a settled path into the event it deserves, judged by the folder, not the hint.

Whatever the watch event said (created, modified, moved, deleted), the path is looked at
now: an image that differs from what was published becomes an upsert, a published path
that is gone becomes a delete, and a folder is compared as a whole tree.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
from collections.abc import Callable

from common.events import ImageEvent
from common.ids import file_fingerprint
from producer.filters import (
    FOLDER_LINK,
    NOT_REGULAR,
    content_skip_reason,
    crosses_folder_link,
    name_skip_reason,
)
from producer.known import KnownFiles
from producer.ledger import FileState
from producer.reconcile import Reconciler
from producer.settle import Settler

log = logging.getLogger(__name__)


class Resolver:
    def __init__(self, roots: list[str], extensions: list[str], known: KnownFiles,
                 settler: Settler, reconciler: Reconciler,
                 submit: Callable[[ImageEvent], None]) -> None:
        self.roots = roots
        self.extensions = extensions
        self.known = known
        self.settler = settler
        self.reconciler = reconciler
        self.submit = submit

    def resolve(self, path: str, is_dir: bool) -> None:
        if path not in self.roots and crosses_folder_link(path, self.roots):
            log.debug("ignored path=%s reason=inside a folder symlink", path)
            return
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._gone(path, is_dir)
            return
        except OSError as error:
            log.warning("file skipped path=%s reason=unreadable: %s", path,
                        error.strerror or error)
            return
        if stat_module.S_ISDIR(info.st_mode):
            self._folder(path)
            return
        if stat_module.S_ISREG(info.st_mode):
            self._present(path, info.st_size, info.st_mtime_ns)
            return
        self._not_a_file(path, NOT_REGULAR)

    def _folder(self, path: str) -> None:
        """A folder now: a file published under this path before is gone (tombstone)."""
        if path in self.roots:
            self.reconciler.check_root(path)
            return
        if os.path.islink(path):
            self._not_a_file(path, FOLDER_LINK)
            return
        if self.known.get(path) is not None:
            self._delete(path)
        self.reconciler.check_tree(path)

    def _not_a_file(self, path: str, reason: str) -> None:
        if name_skip_reason(path, self.roots, self.extensions) is not None:
            return
        self.reconciler.notices.warn(path, reason)
        if self.known.get(path) is not None:
            self._delete(path)

    def _present(self, path: str, size: int, mtime_ns: int) -> None:
        if name_skip_reason(path, self.roots, self.extensions) is not None:
            return
        state = self.known.get(path)
        if state is not None and state.same_stat(size, mtime_ns):
            return
        reason = content_skip_reason(path)
        if reason is not None:
            self._skip(path, reason, state)
            return
        try:
            # Known limit: a regular file swapped for a FIFO between the sniff above and
            # this second open could still block here (a window of microseconds).
            fingerprint = file_fingerprint(path)
        except OSError as error:
            log.warning("file skipped path=%s reason=unreadable: %s", path,
                        error.strerror or error)
            return
        self.known.set(path, FileState(size, mtime_ns, fingerprint))
        self.submit(ImageEvent(kind="upsert", path=path, size=size, mtime_ns=mtime_ns,
                               fingerprint=fingerprint))

    def _skip(self, path: str, reason: str, state: FileState | None) -> None:
        """A file that stopped being an image leaves the index instead of staying stale."""
        log.warning("file skipped path=%s reason=%s", path, reason)
        if state is not None:
            self._delete(path)

    def _gone(self, path: str, is_dir: bool) -> None:
        if is_dir:
            self._gone_tree(path)
            return
        if self.known.get(path) is not None or not self.known.loaded:
            if name_skip_reason(path, self.roots, self.extensions) is None:
                self._delete(path)

    def _gone_tree(self, path: str) -> None:
        if any(root == path or root.startswith(path.rstrip(os.sep) + os.sep)
               for root in self.roots):
            log.warning("root vanished, nothing deleted (an unmounted disk?) path=%s", path)
            return
        for inner in self.known.under(path):
            self.settler.touch(inner)

    def _delete(self, path: str) -> None:
        self.known.pop(path)
        self.submit(ImageEvent(kind="delete", path=path))
