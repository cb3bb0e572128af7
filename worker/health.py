"""Worker health: a heartbeat key with a TTL per worker, and the `status` report built on it."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from common.errors import ServiceUnavailable
from common.kafka_io import admin_client
from common.mapping import PathIndex
from common.settings import Settings
from worker.consumer import group_id

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Heartbeat:
    """Writes the worker's liveness at most every ttl/3 seconds; a Redis outage is tolerated."""

    def __init__(self, index: PathIndex, worker_id: str, ttl_s: int) -> None:
        self.index = index
        self.worker_id = worker_id
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.last_sent = 0.0

    def beat(self, state: dict, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_sent < self.interval_s:
            return
        try:
            self.index.write_heartbeat(self.worker_id, {**state, "at": time.time()}, self.ttl_s)
            self.last_sent = now
        except ServiceUnavailable as error:
            log.debug("heartbeat not written worker=%s error=%s", self.worker_id, error)

    def clear(self) -> None:
        try:
            self.index.clear_heartbeat(self.worker_id)
        except ServiceUnavailable:
            pass


@dataclass
class ModelStatus:
    model: str
    indexed: int
    workers: dict[str, dict]
    last_batch_at: float | None
    dead_letters: dict[str, int]
    lag: dict[int, int | None] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return bool(self.workers)

    def lines(self) -> list[str]:
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_batch_at))
                if self.last_batch_at else "never")
        lag = " ".join(f"p{p}={'-' if v is None else v}" for p, v in sorted(self.lag.items()))
        letters = " ".join(f"{r}={n}" for r, n in self.dead_letters.items()) or "none"
        return [
            f"model {self.model}: {'OK' if self.healthy else 'NO LIVE WORKER'}",
            f"  indexed files: {self.indexed}",
            f"  live workers: {len(self.workers)} {' '.join(sorted(self.workers))}".rstrip(),
            f"  last batch: {when}",
            f"  consumer lag: {lag or 'no partitions'} (total {self.total_lag})",
            f"  dead letters: {letters}",
        ]

    @property
    def total_lag(self) -> int:
        return sum(v for v in self.lag.values() if v is not None)


def model_status(settings: Settings, index: PathIndex, model: str) -> ModelStatus:
    return ModelStatus(
        model=model,
        indexed=index.count(),
        workers=index.heartbeats(),
        last_batch_at=index.last_batch_at(),
        dead_letters=index.dead_letter_counts(),
        lag=consumer_lag(settings, model),
    )


def consumer_lag(settings: Settings, model: str) -> dict[int, int | None]:
    """Per partition: end offset minus the group's committed offset (or the log start)."""
    topic = settings.kafka.images_topic
    admin = admin_client(settings.kafka)
    try:
        group = group_id(settings, model)
        committed = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError as error:
        raise ServiceUnavailable("Kafka", settings.kafka.bootstrap_servers, str(error)) from error
    finally:
        admin.close()

    reader = KafkaConsumer(**settings.kafka.client_options(), enable_auto_commit=False)
    try:
        partitions = reader.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = reader.end_offsets(tps) if tps else {}
        begins = reader.beginning_offsets(tps) if tps else {}
    except KafkaError as error:
        raise ServiceUnavailable("Kafka", settings.kafka.bootstrap_servers, str(error)) from error
    finally:
        reader.close()
    lag: dict[int, int | None] = {}
    for tp in tps:
        done = committed.get(tp)
        start = begins[tp] if done is None or done.offset < 0 else done.offset
        lag[tp.partition] = max(0, ends[tp] - start)
    return lag
