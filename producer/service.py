"""The producer process in one object: watcher -> settler -> resolver -> publisher -> ledger.

Threads: watchdog observers (hints), the settle loop (resolves settled paths and heals
watches), the reconcile loop (ledger load, start-up scan, periodic scans) and the
publisher's sender. Redis down: watching and publishing go on, acknowledged events wait
in memory for their ledger write, and reconciliation retries with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from common.errors import ServiceUnavailable
from common.ids import is_under, normalise_path
from common.settings import Settings
from producer.filters import BAD_NAME, dir_skip_reason, name_skip_reason
from producer.known import KnownFiles
from producer.ledger import Ledger, redis_client
from producer.publisher import Publisher
from producer.reconcile import Reconciler, TreeReport
from producer.resolver import Resolver
from producer.settle import Settler
from producer.watcher import Watcher

log = logging.getLogger(__name__)

MAINTAIN_EVERY_S = 1.0


class Producer:
    """Watch the roots and publish every image change; see module docstring for threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roots = [normalise_path(root) for root in settings.watch.roots]
        self.extensions = settings.watch.extensions
        self._redis = redis_client(settings.redis)
        self.ledger = Ledger(self._redis, settings.redis.key_prefix, settings.redis.url)
        self.known = KnownFiles()
        self.settler = Settler(settings.watch.settle_s)
        self.publisher = Publisher(settings, self.ledger, self._fail)
        self.reconciler = Reconciler(
            self.roots, self.extensions, self.known, self.settler,
            settings.watch.progress_interval_s, lambda: self.publisher.published_total,
            settings.watch.empty_root_is_unmounted,
        )
        self.resolver = Resolver(self.roots, self.extensions, self.known, self.settler,
                                 self.reconciler, self.publisher.submit)
        self.watcher = Watcher(self.roots, self._hint, polling=settings.watch.polling,
                               poll_interval_s=settings.watch.poll_interval_s)
        self._stopping = threading.Event()
        self._reconciled = threading.Event()
        self._reconcile_lock = threading.Lock()
        self._resolving = False
        self._failure: BaseException | None = None
        self.running = False
        self._threads = [
            threading.Thread(target=self._guarded(self._settle_loop), name="settle",
                             daemon=True),
            threading.Thread(target=self._guarded(self._reconcile_loop), name="reconcile",
                             daemon=True),
        ]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        log.info("producer starting roots=%s topic=%s settle_s=%.2f polling=%s",
                 self.roots, self.settings.kafka.images_topic, self.settings.watch.settle_s,
                 self.settings.watch.polling)
        if not self.roots:
            log.warning("no roots configured (IMGSEARCH_WATCH__ROOTS), nothing is watched")
        self.running = True
        self.publisher.start()
        self.watcher.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> int:
        """Stop watching, publish what has settled and flush; returns events left unsent."""
        started = time.monotonic()
        self.watcher.stop()
        self._drain_settler(self.settings.watch.settle_s * 2 + 1.0)
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)
        unsent = self.publisher.stop(self.settings.watch.shutdown_flush_timeout_s)
        self._redis.close()
        self.running = False
        log.info("producer stopped published=%d unsent=%d duration_s=%.2f",
                 self.publisher.published_total, unsent, time.monotonic() - started)
        return unsent

    def reconcile_once(self) -> TreeReport:
        """Load the ledger if needed, then compare every root with it; differences queued.

        Raises ServiceUnavailable when Redis cannot be read (nothing is deleted then).
        """
        with self._reconcile_lock:
            if not self.known.loaded:
                self.known.merge_ledger(self.ledger.load())
            return self.reconciler.reconcile()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once the start-up scan ran and nothing waits to settle, send or record."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return False

    def failure(self) -> BaseException | None:
        """The unexpected error that killed one of the producer's threads, if any.

        A dead thread would leave a process that runs but never publishes, so the entry
        point stops on it and exits non-zero.
        """
        return self._failure

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except Exception as error:  # noqa: BLE001 - reported, the process then exits
                log.exception("producer thread failed thread=%s error=%s",
                              threading.current_thread().name, error)
                self._fail(error)

        return run

    def idle(self) -> bool:
        return (self._reconciled.is_set() and not self._resolving and len(self.settler) == 0
                and self.publisher.pending() == 0 and self.publisher.unrecorded() == 0)

    # -- hints from the watcher ---------------------------------------------------------

    def _hint(self, path: str, is_dir: bool) -> None:
        if not is_under(path, self.settings.watch.roots):
            return
        reason = (dir_skip_reason(path, self.roots) if is_dir
                  else name_skip_reason(path, self.roots, self.extensions))
        if reason == BAD_NAME:
            self.reconciler.notices.warn(path, reason)
            return
        if reason is not None:
            log.debug("ignored path=%s reason=%s", path, reason)
            return
        self.settler.touch(path, is_dir=is_dir)

    # -- loops --------------------------------------------------------------------------

    def _settle_loop(self) -> None:
        tick_s = min(max(self.settings.watch.settle_s / 4, 0.02), 0.1)
        last_maintain_s = time.monotonic()
        while not self._stopping.wait(tick_s):
            self._resolve_due()
            if time.monotonic() - last_maintain_s >= MAINTAIN_EVERY_S:
                last_maintain_s = time.monotonic()
                self.watcher.maintain()

    def _resolve_due(self) -> None:
        self._resolving = True
        try:
            for path, is_dir in self.settler.due():
                try:
                    self.resolver.resolve(path, is_dir)
                except Exception:  # noqa: BLE001 - one bad path must not stop the rest
                    log.exception("path not resolved path=%s", path)
        finally:
            self._resolving = False

    def _drain_settler(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.settler) and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(self.settler):
            log.warning("shutdown before files settled count=%d (the next start's "
                        "reconciliation publishes them)", len(self.settler))

    def _reconcile_loop(self) -> None:
        backoff_s = 0.5
        interval_s = self.settings.watch.reconcile_interval_s
        while not self._stopping.is_set():
            try:
                self.reconcile_once()
            except ServiceUnavailable as error:
                log.warning("reconcile postponed retry_in_s=%.1f error=%s", backoff_s, error)
                self._stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.watch.retry_max_backoff_s)
                continue
            backoff_s = 0.5
            self._reconciled.set()
            if interval_s <= 0:
                return
            self._stopping.wait(interval_s)
