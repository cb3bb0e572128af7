"""The worker loop: poll a batch, apply it (retrying service outages), commit, report health.

Offsets are committed only after Milvus, the dead-letter topic and Redis are written. A
batch that cannot be finished within half the poll interval is rewound (seek to its first
offsets) and polled again, so the group never evicts a worker that is waiting out an
outage, and a rebalance in between hands the uncommitted batch to the next owner whole.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass

from kafka.errors import KafkaError

from common.embedder import Embedder, get_embedder
from common.errors import ImgSearchError, ServiceUnavailable
from common.kafka_io import ensure_dead_letter_topic, ensure_images_topic
from common.mapping import PathIndex, connect_redis
from common.registry import ModelSpec, resolve_model
from common.settings import Settings
from common.store import VectorStore
from worker.consumer import EventConsumer, group_id
from worker.deadletter import DeadLetterWriter, SourceRecord
from worker.health import Heartbeat, worker_identity
from worker.pipeline import Batch, BatchResult, Pipeline, prepare_batch

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5
# Quiet time after the last write before the worker flushes (seals) the collection.
FLUSH_IDLE_S = 1.0


class MappingVersionMismatch(ImgSearchError):
    """The Redis mapping was written for another version of the model."""


class WorkerTimeout(ImgSearchError):
    """run_until_idle did not catch up within its time limit."""


@dataclass
class WorkerTotals:
    batches: int = 0
    records: int = 0
    embedded: int = 0
    reused: int = 0
    skipped: int = 0
    deleted: int = 0
    dead_lettered: int = 0
    abandoned_batches: int = 0

    def add(self, result: BatchResult) -> None:
        self.batches += 1
        self.records += result.records
        self.embedded += result.embedded
        self.reused += result.reused
        self.skipped += result.skipped
        self.deleted += result.deleted
        self.dead_lettered += result.dead_lettered


class Worker:
    """One consumer of one model's group; several may run per model (threads or processes)."""

    def __init__(self, settings: Settings, model: str, *, worker_id: str | None = None,
                 embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.model = model
        self.worker_id = worker_id or worker_identity()
        self.embedder = embedder or get_embedder(model, settings)
        self.spec: ModelSpec = self.embedder.spec if embedder else resolve_model(model, settings)
        self.totals = WorkerTotals()
        self._stop = threading.Event()
        self._outage: ServiceUnavailable | None = None
        self._outage_started = 0.0
        self._last_batch_at: float | None = None
        self._unflushed = False
        self._last_write_s = 0.0

        with ExitStack() as undo:  # a failed start closes what it opened
            ensure_images_topic(settings.kafka)
            ensure_dead_letter_topic(settings.kafka)
            self.store = VectorStore(settings.milvus)
            undo.callback(self.store.close)
            self.store.ensure_collection(self.spec)
            self.redis = connect_redis(settings.redis)
            undo.callback(self.redis.close)
            self.index = PathIndex(self.redis, settings.redis.key_prefix, model)
            self._check_mapping_version()
            self.dead_letters = DeadLetterWriter(settings.kafka, model)
            undo.callback(self.dead_letters.close)
            self.pool = ThreadPoolExecutor(settings.worker.decode_threads,
                                           thread_name_prefix=f"decode-{model}")
            undo.callback(self.pool.shutdown)
            self.pipeline = Pipeline(
                self.spec, self.embedder, self.store, self.index, self.dead_letters,
                self.pool, max_pixels=settings.images.max_pixels,
                orphan_ttl_s=settings.worker.orphan_vector_ttl_s,
            )
            self.consumer = EventConsumer(settings, model)
            undo.pop_all()
        self.heartbeat = Heartbeat(self.index, self.worker_id, settings.worker.heartbeat_ttl_s)
        log.info("worker started model=%s version=%s dim=%d worker=%s group=%s",
                 model, self.spec.version, self.spec.dim, self.worker_id, self.consumer.group)

    def _check_mapping_version(self) -> None:
        """Refuse a mapping written for another model version: its skips would be wrong.

        Known limit: a new model version starts an empty collection, but the group's
        offsets stay where the old version left them; the operator resets the group's
        offsets to the earliest and runs `rebuild-mapping` (which records the version).
        """
        recorded = self.index.claim_version(self.spec.version)
        if recorded != self.spec.version:
            raise MappingVersionMismatch(
                f"Redis mapping of model {self.model} describes version {recorded}, the "
                f"model file is version {self.spec.version}: run `python -m worker "
                f"rebuild-mapping --model {self.model}` and reset the consumer group "
                f"{group_id(self.settings, self.model)} to the earliest offsets"
            )

    # Loops

    def run(self, stop: threading.Event | None = None) -> WorkerTotals:
        """Consume until `stop` is set; the batch in hand is finished or left uncommitted."""
        stop = stop or self._stop
        while not stop.is_set():
            self.step(stop)
        return self.totals

    def run_until_idle(self, timeout_s: float, stop: threading.Event | None = None
                       ) -> WorkerTotals:
        """Consume until this worker's partitions are read to their end (tests, demo)."""
        stop = stop or self._stop
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            if self.step(stop) == 0 and self.consumer.caught_up():
                return self.totals
            if time.monotonic() > deadline:
                raise WorkerTimeout(
                    f"model {self.model} not caught up after {timeout_s:.0f}s "
                    f"(totals {asdict(self.totals)})"
                )
        return self.totals

    def step(self, stop: threading.Event) -> int:
        """One poll and, if it returned records, one batch; returns the record count."""
        records = self._poll(stop)
        if records:
            self._process(records, stop)
        else:
            self._flush_when_idle()
        self.heartbeat.beat(self._health_state())
        return len(records)

    def _flush_when_idle(self) -> None:
        """Once the stream goes quiet, seal what was written so searches use the index."""
        if not self._unflushed or time.monotonic() - self._last_write_s < FLUSH_IDLE_S:
            return
        try:
            self.store.flush(self.spec)
        except ServiceUnavailable as error:
            log.warning("flush failed model=%s error=%s", self.model, error)
            return
        self._unflushed = False
        log.debug("flushed model=%s", self.model)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Leave the group (partitions go to the other workers at once) and free clients."""
        self.heartbeat.clear()
        self.consumer.close()
        self.dead_letters.close()
        self.pool.shutdown(wait=True)
        self.store.close()
        self.redis.close()
        log.info("worker stopped model=%s worker=%s totals=%s",
                 self.model, self.worker_id, asdict(self.totals))

    # One batch

    def _poll(self, stop: threading.Event) -> list[SourceRecord]:
        try:
            return self.consumer.poll()
        except KafkaError as error:
            self._note_outage(ServiceUnavailable(
                "Kafka", self.settings.kafka.bootstrap_servers, str(error)))
            stop.wait(FIRST_BACKOFF_S)
            return []

    def _process(self, records: list[SourceRecord], stop: threading.Event) -> None:
        started = time.monotonic()
        batch = prepare_batch(records, self.settings.watch.roots)
        budget_s = self.settings.worker.max_poll_interval_ms / 1000 / 2
        backoff_s = FIRST_BACKOFF_S
        while True:
            try:
                result = self.pipeline.apply(batch)
                self.consumer.commit(batch.next_offsets)
                break
            except ServiceUnavailable as error:
                self._note_outage(error)
                if stop.is_set() or time.monotonic() - started + backoff_s > budget_s:
                    self._abandon(batch)
                    return
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.worker.retry_max_backoff_s)

        self._note_recovery()
        self._unflushed = True
        self._last_write_s = time.monotonic()
        self.totals.add(result)
        self._last_batch_at = time.time()
        self._log_batch(batch, result, time.monotonic() - started)

    def _abandon(self, batch: Batch) -> None:
        """Rewind so the next poll returns the same records; nothing of it is committed."""
        self.totals.abandoned_batches += 1
        try:
            self.consumer.rewind(batch.first_offsets)
        except KafkaError as error:
            log.warning("rewind failed model=%s error=%s", self.model, error)
        log.info("batch left uncommitted model=%s partitions=%s records=%d",
                 self.model, batch.describe_range(), len(batch.records))

    def _log_batch(self, batch: Batch, result: BatchResult, duration_s: float) -> None:
        images = result.embedded + result.reused
        log.info(
            "batch model=%s partitions=%s records=%d embedded=%d reused=%d skipped=%d "
            "deleted=%d dead_lettered=%d duration_s=%.3f images_per_s=%.1f",
            self.model, batch.describe_range(), result.records, result.embedded,
            result.reused, result.skipped, result.deleted, result.dead_lettered,
            duration_s, images / duration_s if duration_s > 0 else 0.0,
        )

    # Outages are logged once when they start and once when they end

    def _note_outage(self, error: ServiceUnavailable) -> None:
        if self._outage is not None:
            return
        self._outage = error
        self._outage_started = time.monotonic()
        log.warning("service unavailable, retrying with backoff model=%s service=%s "
                    "address=%s error=%s", self.model, error.service, error.address, error)

    def _note_recovery(self) -> None:
        if self._outage is None:
            return
        log.warning("service recovered model=%s service=%s outage_s=%.1f", self.model,
                    self._outage.service, time.monotonic() - self._outage_started)
        self._outage = None

    def _health_state(self) -> dict:
        return {
            "worker": self.worker_id,
            "model": self.model,
            "version": self.spec.version,
            "partitions": sorted(tp.partition for tp in self.consumer.assignment()),
            "last_batch_at": self._last_batch_at,
            "batches": self.totals.batches,
            "records": self.totals.records,
            "outage": self._outage.service if self._outage else None,
        }
