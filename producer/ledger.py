"""The producer's memory of what the broker acknowledged, per path, kept in one Redis hash.

Key `{key_prefix}:producer:ledger`, field = path (UTF-8, surrogateescape), value = JSON
{size, mtime_ns, fingerprint}. Reconciliation compares a scan of the roots with it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import redis

from common.errors import ServiceUnavailable
from common.events import ImageEvent
from common.settings import RedisSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    fingerprint: str | None = None

    def same_stat(self, size: int, mtime_ns: int) -> bool:
        return self.size == size and self.mtime_ns == mtime_ns


def ledger_key(key_prefix: str) -> str:
    return f"{key_prefix}:producer:ledger"


def redis_client(settings: RedisSettings) -> redis.Redis:
    """A lazily connecting client; outages surface per call as ServiceUnavailable."""
    password = settings.password.get_secret_value() if settings.password else None
    return redis.Redis.from_url(
        settings.url,
        password=password,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        decode_responses=False,
    )


def _field(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


class Ledger:
    """Reads and writes the ledger hash; every Redis failure becomes ServiceUnavailable."""

    def __init__(self, client: redis.Redis, key_prefix: str, address: str = "") -> None:
        self.client = client
        self.key = ledger_key(key_prefix)
        self.address = address

    def load(self) -> dict[str, FileState]:
        started = time.monotonic()
        entries: dict[str, FileState] = {}
        try:
            for field, value in self.client.hscan_iter(self.key, count=5000):
                entries[field.decode("utf-8", "surrogateescape")] = _parse(value)
        except redis.RedisError as error:
            raise ServiceUnavailable("Redis", self.address, str(error)) from error
        log.info(
            "ledger loaded key=%s paths=%d duration_s=%.2f",
            self.key, len(entries), time.monotonic() - started,
        )
        return entries

    def record(self, events: Iterable[ImageEvent]) -> int:
        """Write acknowledged events: an upsert sets the path's state, a delete drops it."""
        pipe = self.client.pipeline(transaction=False)
        count = 0
        for event in events:
            count += 1
            if event.kind == "delete":
                pipe.hdel(self.key, _field(event.path))
                continue
            state = FileState(event.size or 0, event.mtime_ns or 0, event.fingerprint)
            pipe.hset(self.key, _field(event.path), json.dumps(asdict(state)))
        try:
            pipe.execute()
        except redis.RedisError as error:
            raise ServiceUnavailable("Redis", self.address, str(error)) from error
        return count


def _parse(value: bytes) -> FileState:
    """A damaged entry reads as size -1, so the next scan republishes that file."""
    try:
        data = json.loads(value)
        return FileState(int(data["size"]), int(data["mtime_ns"]), data.get("fingerprint"))
    except (ValueError, KeyError, TypeError):
        return FileState(-1, -1, None)
