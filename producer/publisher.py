"""Send queued events to the images topic; survive a broker that is down or goes away.

One sender thread owns the KafkaProducer. Events wait in an in-memory queue keyed by path
(a newer event for a path replaces the queued one) until the broker acknowledges them;
only then are they written to the ledger. A failed send goes back to the queue and is
retried with backoff; nothing here lets the process die of a broker outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from common.errors import ServiceUnavailable
from common.events import ImageEvent
from common.kafka_io import ensure_images_topic, producer_options
from common.settings import Settings
from producer.ledger import Ledger

log = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT_MS = 5_000
MAX_BLOCK_MS = 10_000
FLUSH_WAIT_S = 5.0
MIN_BACKOFF_S = 0.5


class Publisher:
    """Queue + sender thread; `submit` never blocks on the broker."""

    def __init__(self, settings: Settings, ledger: Ledger,
                 on_fatal: Callable[[BaseException], None] = lambda error: None) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.topic = settings.kafka.images_topic
        self.ledger = ledger
        self.published_total = 0
        self._queue: OrderedDict[str, ImageEvent] = OrderedDict()
        self._unrecorded: OrderedDict[str, ImageEvent] = OrderedDict()
        self._ledger_down_since: float | None = None
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._stop_deadline_s = float("inf")
        self._producer: KafkaProducer | None = None
        self._backoff_s = MIN_BACKOFF_S
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    # -- public API ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, event: ImageEvent) -> None:
        """Queue an event; a queued event for the same path is replaced (coalesced)."""
        with self._cond:
            self._queue.pop(event.path, None)
            self._queue[event.path] = event
            self._cond.notify()

    def pending(self) -> int:
        """Events not yet acknowledged (queued or in flight)."""
        with self._cond:
            return len(self._queue) + self._in_flight

    def unrecorded(self) -> int:
        """Acknowledged events whose ledger write still waits for Redis."""
        with self._cond:
            return len(self._unrecorded)

    def stop(self, flush_timeout_s: float) -> int:
        """Send what is pending within flush_timeout_s; returns how many were left unsent."""
        self._stop_deadline_s = time.monotonic() + flush_timeout_s
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(flush_timeout_s + MAX_BLOCK_MS / 1000 + FLUSH_WAIT_S + 5)
        left = self.pending()
        if left:
            log.warning(
                "shutdown with unsent events count=%d (the next start's reconciliation "
                "publishes them)", left,
            )
        return left

    # -- sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        """Broker outages are retried inside; anything else is a bug or a bad setting, and
        a silently dead sender would leave a producer that never publishes: report it."""
        try:
            self._loop()
        except Exception as error:  # noqa: BLE001 - reported to the owner, which exits
            log.exception("publisher failed, nothing more is sent error=%s", error)
            self.on_fatal(error)

    def _loop(self) -> None:
        while not self._finished():
            if self._producer is None and not self._connect():
                if self._stopping.is_set():
                    break
                self._sleep_backoff()
                continue
            batch = self._take_batch()
            if batch:
                self._publish(batch)
            self._record_ledger()
        self._close()

    def _finished(self) -> bool:
        if not self._stopping.is_set():
            return False
        return self.pending() == 0 or time.monotonic() >= self._stop_deadline_s

    def _connect(self) -> bool:
        """Make sure the topic exists and a producer is bootstrapped; False on an outage."""
        producer: KafkaProducer | None = None
        try:
            # The producer first: it gives up after BOOTSTRAP_TIMEOUT_MS, the admin client
            # used for the topic only after request_timeout_ms.
            producer = KafkaProducer(**self._options())
            ensure_images_topic(self.settings.kafka)
            self._producer = producer
        except (ServiceUnavailable, KafkaError) as error:
            if producer is not None:
                producer.close(timeout=0)
            log.warning(
                "kafka unavailable bootstrap=%s retry_in_s=%.1f queued=%d error=%s",
                self.settings.kafka.bootstrap_servers, self._backoff_s, self.pending(), error,
            )
            return False
        log.info("kafka connected bootstrap=%s topic=%s",
                 self.settings.kafka.bootstrap_servers, self.topic)
        self._backoff_s = MIN_BACKOFF_S
        return True

    def _options(self) -> dict[str, Any]:
        return {
            **producer_options(self.settings.kafka),
            "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
            "max_block_ms": MAX_BLOCK_MS,
        }

    def _sleep_backoff(self) -> None:
        self._stopping.wait(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self.settings.watch.retry_max_backoff_s)

    def _take_batch(self) -> list[ImageEvent]:
        with self._cond:
            if not self._queue and not self._stopping.is_set():
                self._cond.wait(0.2)
            size = min(len(self._queue), self.settings.watch.publish_batch_size)
            batch = [self._queue.popitem(last=False)[1] for _ in range(size)]
            self._in_flight = len(batch)
            return batch

    def _publish(self, batch: list[ImageEvent]) -> None:
        started = time.monotonic()
        futures = self._send_all(batch)
        self._wait_acks(futures)
        acked = [event for event, future in zip(batch, futures)
                 if future is not None and future.succeeded()]
        failed = [event for event, future in zip(batch, futures)
                  if future is None or not future.succeeded()]
        self._settle_batch(acked, failed)
        self._log_batch(acked, failed, time.monotonic() - started)

    def _send_all(self, batch: list[ImageEvent]) -> list[Any]:
        """Hand every event to the client; None marks one that could not be handed over."""
        assert self._producer is not None
        futures: list[Any] = []
        for event in batch:
            try:
                futures.append(self._producer.send(
                    self.topic, key=event.key, value=event.encode()))
            except KafkaError as error:
                log.warning("send failed path=%s error=%s", event.path, error)
                futures.append(None)
        return futures

    def _wait_acks(self, futures: list[Any]) -> None:
        """Block until every record is acknowledged or failed; a dead broker just waits.

        The client retries until delivery_timeout_ms, after which a future fails and its
        event is requeued. At shutdown the wait ends at the flush deadline.
        """
        assert self._producer is not None
        while not all(future is None or future.is_done for future in futures):
            if self._stopping.is_set() and time.monotonic() >= self._stop_deadline_s:
                return
            try:
                self._producer.flush(timeout=FLUSH_WAIT_S)
            except KafkaError:
                log.warning("waiting for broker acks records=%d bootstrap=%s",
                            sum(1 for f in futures if f is not None and not f.is_done),
                            self.settings.kafka.bootstrap_servers)

    def _settle_batch(self, acked: list[ImageEvent], failed: list[ImageEvent]) -> None:
        with self._cond:
            for event in acked:
                self._unrecorded.pop(event.path, None)
                self._unrecorded[event.path] = event
            for event in reversed(failed):
                if event.path not in self._queue:
                    self._queue[event.path] = event
                    self._queue.move_to_end(event.path, last=False)
            self._in_flight = 0
            self.published_total += len(acked)
        if failed:
            self._sleep_backoff()

    def _log_batch(self, acked: Sequence[ImageEvent], failed: Sequence[ImageEvent],
                   duration_s: float) -> None:
        upserts = sum(1 for event in acked if event.kind == "upsert")
        log.info(
            "batch published topic=%s upserts=%d deletes=%d failed=%d queued=%d "
            "duration_s=%.3f", self.topic, upserts, len(acked) - upserts, len(failed),
            self.pending(), duration_s,
        )

    def _record_ledger(self) -> None:
        """Write acknowledged events to the ledger; on a Redis outage keep them for later."""
        with self._cond:
            events = list(self._unrecorded.values())
        if not events:
            return
        try:
            self.ledger.record(events)
        except ServiceUnavailable as error:
            if self._ledger_down_since is None:  # once per outage, not once per retry
                self._ledger_down_since = time.monotonic()
                log.warning("ledger write deferred events=%d error=%s", len(events), error)
            self._stopping.wait(1.0)
            return
        if self._ledger_down_since is not None:
            log.warning("ledger writes resumed events=%d outage_s=%.1f", len(events),
                        time.monotonic() - self._ledger_down_since)
            self._ledger_down_since = None
        with self._cond:
            for event in events:
                if self._unrecorded.get(event.path) is event:
                    del self._unrecorded[event.path]

    def _close(self) -> None:
        self._record_ledger()
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except KafkaError as error:
                log.warning("producer close failed error=%s", error)
