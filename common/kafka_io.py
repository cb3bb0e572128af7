"""Kafka client construction and topic set-up shared by the producer and the workers."""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from common.errors import ServiceUnavailable
from common.settings import KafkaSettings

log = logging.getLogger(__name__)

# The images topic is a compacted changelog keyed by path: it keeps the latest event of
# every file forever, so a new model's workers can rebuild their index from offset 0.
IMAGES_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": "60000",
    "delete.retention.ms": "86400000",
}
# Dead letters are kept for 30 days for an operator to inspect and replay.
DEAD_LETTER_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": str(30 * 86_400_000)}


def admin_client(settings: KafkaSettings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**settings.client_options())
    except KafkaError as error:
        raise ServiceUnavailable("Kafka", settings.bootstrap_servers, str(error)) from error


def ensure_topic(
    settings: KafkaSettings, name: str, partitions: int, config: dict[str, str]
) -> bool:
    """Create the topic if it is missing; returns True when this call created it."""
    admin = admin_client(settings)
    try:
        topic = NewTopic(name, partitions, settings.replication_factor, topic_configs=config)
        admin.create_topics([topic])
    except TopicAlreadyExistsError:
        return False
    except KafkaError as error:
        raise ServiceUnavailable("Kafka", settings.bootstrap_servers, str(error)) from error
    finally:
        admin.close()
    log.info("topic created topic=%s partitions=%d config=%s", name, partitions, config)
    return True


def ensure_images_topic(settings: KafkaSettings, topic: str | None = None) -> bool:
    return ensure_topic(
        settings, topic or settings.images_topic, settings.partitions, IMAGES_TOPIC_CONFIG
    )


def ensure_dead_letter_topic(settings: KafkaSettings, topic: str | None = None) -> bool:
    return ensure_topic(
        settings, topic or settings.dead_letter_topic, 1, DEAD_LETTER_TOPIC_CONFIG
    )


def producer_options(settings: KafkaSettings) -> dict[str, Any]:
    """Durable producer: every in-sync replica acknowledges, retried, idempotent order per key."""
    return {
        **settings.client_options(),
        "acks": "all",
        "retries": 2_147_483_647,
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": 20,
        "delivery_timeout_ms": 120_000,
    }
