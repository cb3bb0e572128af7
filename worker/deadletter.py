"""Dead letters: bad input leaves the pipeline here, with the original message and why."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import KafkaError

from common.errors import ServiceUnavailable
from common.kafka_io import producer_options
from common.settings import KafkaSettings

log = logging.getLogger(__name__)

DETAIL_MAX_CHARS = 500
SEND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SourceRecord:
    """The coordinates and raw bytes of one consumed message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    record: SourceRecord
    reason: str
    detail: str


def _encode_bytes(raw: bytes | None) -> tuple[str | None, str]:
    """Text when it is valid UTF-8, else base64, with the encoding named beside it."""
    if raw is None:
        return None, "none"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def dead_letter_value(letter: DeadLetter, model: str) -> bytes:
    key, key_encoding = _encode_bytes(letter.record.key)
    value, value_encoding = _encode_bytes(letter.record.value)
    document = {
        "model": model,
        "reason": letter.reason,
        "detail": letter.detail[:DETAIL_MAX_CHARS],
        "topic": letter.record.topic,
        "partition": letter.record.partition,
        "offset": letter.record.offset,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
        "failed_at": time.time(),
    }
    return json.dumps(document).encode("utf-8")


class DeadLetterWriter:
    """Publishes one batch's dead letters and waits for the broker before the batch commits."""

    def __init__(self, settings: KafkaSettings, model: str) -> None:
        self.settings = settings
        self.model = model
        self.topic = settings.dead_letter_topic
        self._producer: KafkaProducer | None = None

    def _client(self) -> KafkaProducer:
        if self._producer is None:
            try:
                self._producer = KafkaProducer(**producer_options(self.settings))
            except KafkaError as error:
                raise ServiceUnavailable(
                    "Kafka", self.settings.bootstrap_servers, str(error)
                ) from error
        return self._producer

    def publish(self, letters: Sequence[DeadLetter]) -> Counter[str]:
        """Send and confirm every letter; returns the count per reason."""
        if not letters:
            return Counter()
        producer = self._client()
        try:
            futures = [
                producer.send(self.topic, key=letter.record.key,
                              value=dead_letter_value(letter, self.model))
                for letter in letters
            ]
            for future in futures:
                future.get(timeout=SEND_TIMEOUT_S)
        except KafkaError as error:
            raise ServiceUnavailable(
                "Kafka", self.settings.bootstrap_servers, f"dead letter not sent: {error}"
            ) from error
        for letter in letters:
            log.warning(
                "dead letter model=%s reason=%s topic=%s partition=%d offset=%d detail=%s",
                self.model, letter.reason, letter.record.topic, letter.record.partition,
                letter.record.offset, letter.detail[:200],
            )
        return Counter(letter.reason for letter in letters)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None
