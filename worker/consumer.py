"""The Kafka side of a worker: one consumer in the model's group, manual commits only."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError

from common.errors import ServiceUnavailable
from common.settings import Settings
from worker.deadletter import SourceRecord

log = logging.getLogger(__name__)


def group_id(settings: Settings, model: str) -> str:
    """Each model has its own group, so every model sees every event."""
    return f"{settings.kafka.group_prefix}.{model}"


class _RebalanceLog(ConsumerRebalanceListener):
    """Rebalances only happen inside poll(), between batches, so nothing is half-done here."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.assigned: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = set(revoked)
        self.assigned -= revoked
        log.info("partitions revoked model=%s partitions=%s", self.model, _names(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = set(assigned)
        self.assigned |= assigned
        log.info("partitions assigned model=%s partitions=%s", self.model, _names(assigned))

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        lost = set(lost)
        self.assigned -= lost
        log.warning("partitions lost model=%s partitions=%s", self.model, _names(lost))


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(partitions)) or "-"


class EventConsumer:
    """Polls bounded batches, commits exact offsets, rewinds a batch it could not finish."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.model = model
        self.group = group_id(settings, model)
        self.listener = _RebalanceLog(model)
        try:
            self.consumer = KafkaConsumer(
                **settings.kafka.client_options(),
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=settings.worker.batch_size,
                max_poll_interval_ms=settings.worker.max_poll_interval_ms,
                session_timeout_ms=settings.worker.session_timeout_ms,
            )
            self.consumer.subscribe([settings.kafka.images_topic], listener=self.listener)
        except KafkaError as error:
            raise ServiceUnavailable(
                "Kafka", settings.kafka.bootstrap_servers, str(error)
            ) from error

    def poll(self) -> list[SourceRecord]:
        """At most batch_size records across the assigned partitions, in offset order."""
        polled = self.consumer.poll(timeout_ms=self.settings.worker.poll_timeout_ms,
                                    max_records=self.settings.worker.batch_size)
        records = []
        for messages in polled.values():
            records.extend(
                SourceRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in messages
            )
        return records

    def commit(self, next_offsets: dict[tuple[str, int], int]) -> bool:
        """Commit after the writes; False when a rebalance took the partitions meanwhile.

        The new owner then repeats the batch, which is harmless: writes are idempotent.
        """
        offsets = {TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
                   for (topic, partition), offset in next_offsets.items()}
        try:
            self.consumer.commit(offsets=offsets)
        except CommitFailedError as error:
            log.warning("commit refused after rebalance model=%s error=%s", self.model, error)
            return False
        except KafkaError as error:
            raise ServiceUnavailable(
                "Kafka", self.settings.kafka.bootstrap_servers, f"commit failed: {error}"
            ) from error
        return True

    def rewind(self, first_offsets: dict[tuple[str, int], int]) -> None:
        """Seek back to a batch's first offsets so the next poll returns it again."""
        assigned = self.consumer.assignment()
        for (topic, partition), offset in first_offsets.items():
            tp = TopicPartition(topic, partition)
            if tp in assigned:
                self.consumer.seek(tp, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def caught_up(self) -> bool:
        """True when this consumer has partitions and its position is at their end."""
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        try:
            ends = self.consumer.end_offsets(list(assigned))
            return all(self.consumer.position(tp) >= ends[tp] for tp in assigned)
        except KafkaError:
            return False

    def close(self) -> None:
        self.consumer.close(autocommit=False)
