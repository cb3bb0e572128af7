"""The Redis mapping per model: id <-> path, path -> file state, fingerprint -> id.

Keys (P = key prefix, M = model name):
  P:M:ids       hash  id -> path
  P:M:paths     hash  path -> JSON {id, fingerprint, size, mtime_ns}; HLEN = indexed count
  P:M:fps       hash  fingerprint -> id of one indexed file with that content
  P:M:orphan:F  string, TTL: vector of a deleted file with fingerprint F (rename reuse)
  P:M:deadletters  hash  reason -> count
  P:M:heartbeat:W  string, TTL: JSON health of worker W
  P:M:last_batch   string: unix time of the last committed batch
  P:M:version      string: the model version the mapping describes
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import redis
from numpy.typing import NDArray

from common.errors import ServiceUnavailable
from common.settings import RedisSettings

log = logging.getLogger(__name__)

_DELETE_IF_EQUAL = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


def connect_redis(settings: RedisSettings) -> redis.Redis:
    """One client (with its own connection pool); ServiceUnavailable if it does not answer."""
    password = settings.password.get_secret_value() if settings.password else None
    client = redis.Redis.from_url(
        settings.url,
        password=password,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
    )
    with redis_calls(settings.url):
        client.ping()
    return client


@contextmanager
def redis_calls(address: str) -> Iterator[None]:
    """Turn a Redis connection failure or timeout into ServiceUnavailable."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise ServiceUnavailable("Redis", address, str(error)) from error
    except redis.ResponseError as error:
        if "LOADING" in str(error) or "MISCONF" in str(error):
            raise ServiceUnavailable("Redis", address, str(error)) from error
        raise


@dataclass(frozen=True)
class IndexedFile:
    path: str
    id: int
    fingerprint: str | None
    size: int | None
    mtime_ns: int | None

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "fingerprint": self.fingerprint,
                           "size": self.size, "mtime_ns": self.mtime_ns})

    @classmethod
    def from_json(cls, path: str, raw: bytes | str) -> IndexedFile:
        data = json.loads(raw)
        return cls(path=path, id=int(data["id"]), fingerprint=data.get("fingerprint"),
                   size=data.get("size"), mtime_ns=data.get("mtime_ns"))


@dataclass
class MappingChanges:
    """Everything one batch writes to Redis, applied in one MULTI/EXEC."""

    indexed: list[IndexedFile]
    removed: list[IndexedFile]
    retired: list[IndexedFile]  # previous states whose fingerprint entry should go
    orphans: dict[str, NDArray[np.float32]]
    dead_letters: dict[str, int]


def _path_text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _path_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


class PathIndex:
    """One model's mapping; every read is one round trip, every batch write one transaction."""

    def __init__(self, client: redis.Redis, key_prefix: str, model: str) -> None:
        self.client = client
        self.model = model
        self.base = f"{key_prefix}:{model}"
        self.ids_key = f"{self.base}:ids"
        self.paths_key = f"{self.base}:paths"
        self.fps_key = f"{self.base}:fps"
        self.dead_letters_key = f"{self.base}:deadletters"
        self.last_batch_key = f"{self.base}:last_batch"
        self.version_key = f"{self.base}:version"
        self.address = _address(client)

    # Reads

    def lookup_paths(self, ids: Sequence[int]) -> list[str | None]:
        if not ids:
            return []
        with redis_calls(self.address):
            raw = self.client.hmget(self.ids_key, [str(int(i)) for i in ids])
        return [_path_text(value) for value in raw]

    def get(self, path: str) -> IndexedFile | None:
        return self.get_many([path])[0]

    def get_many(self, paths: Sequence[str]) -> list[IndexedFile | None]:
        if not paths:
            return []
        with redis_calls(self.address):
            raw = self.client.hmget(self.paths_key, [_path_key(p) for p in paths])
        return [None if value is None else IndexedFile.from_json(path, value)
                for path, value in zip(paths, raw)]

    def ids_for_fingerprints(self, fingerprints: Sequence[str]) -> dict[str, int]:
        """Fingerprint -> id of an indexed file with that content (may be stale: verify)."""
        if not fingerprints:
            return {}
        with redis_calls(self.address):
            raw = self.client.hmget(self.fps_key, list(fingerprints))
        return {fp: int(value) for fp, value in zip(fingerprints, raw) if value is not None}

    def orphan_vectors(self, fingerprints: Sequence[str]) -> dict[str, NDArray[np.float32]]:
        """Vectors kept briefly after a delete, so a rename (delete + upsert) needs no model."""
        if not fingerprints:
            return {}
        with redis_calls(self.address):
            raw = self.client.mget([self._orphan_key(fp) for fp in fingerprints])
        return {fp: np.frombuffer(value, dtype=np.float32).copy()
                for fp, value in zip(fingerprints, raw) if value is not None}

    def count(self) -> int:
        with redis_calls(self.address):
            return int(self.client.hlen(self.paths_key))

    def dead_letter_counts(self) -> dict[str, int]:
        with redis_calls(self.address):
            raw = self.client.hgetall(self.dead_letters_key)
        return {key.decode(): int(value) for key, value in sorted(raw.items())}

    def last_batch_at(self) -> float | None:
        with redis_calls(self.address):
            raw = self.client.get(self.last_batch_key)
        return None if raw is None else float(raw)

    def version(self) -> str | None:
        """The model version whose vectors this mapping describes."""
        with redis_calls(self.address):
            raw = self.client.get(self.version_key)
        return None if raw is None else raw.decode()

    def claim_version(self, version: str) -> str:
        """Record `version` unless another is recorded; returns the recorded one."""
        with redis_calls(self.address):
            self.client.set(self.version_key, version, nx=True)
        return self.version() or version

    def heartbeats(self) -> dict[str, dict]:
        """Live workers of this model (heartbeat keys that have not expired)."""
        with redis_calls(self.address):
            keys = list(self.client.scan_iter(match=f"{self.base}:heartbeat:*", count=500))
            values = self.client.mget(keys) if keys else []
        found = {}
        for key, value in zip(keys, values):
            if value is not None:
                found[key.decode().rsplit(":", 1)[1]] = json.loads(value)
        return found

    # Writes

    def apply(self, changes: MappingChanges, *, orphan_ttl_s: int) -> None:
        """Write one batch's mapping changes atomically (MULTI/EXEC)."""
        pipe = self.client.pipeline(transaction=True)
        for old in changes.removed:
            pipe.hdel(self.ids_key, str(old.id))
            pipe.hdel(self.paths_key, _path_key(old.path))
        for fingerprint, vector in (changes.orphans if orphan_ttl_s > 0 else {}).items():
            data = np.asarray(vector, dtype=np.float32).tobytes()
            pipe.set(self._orphan_key(fingerprint), data, ex=orphan_ttl_s)
        for item in changes.indexed:
            pipe.hset(self.ids_key, str(item.id), _path_key(item.path))
            pipe.hset(self.paths_key, _path_key(item.path), item.to_json())
            if item.fingerprint:
                pipe.hset(self.fps_key, item.fingerprint, str(item.id))
        self._drop_stale_fingerprints(pipe, changes)
        for reason, count in changes.dead_letters.items():
            pipe.hincrby(self.dead_letters_key, reason, count)
        pipe.set(self.last_batch_key, repr(time.time()))
        with redis_calls(self.address):
            pipe.execute()

    def _drop_stale_fingerprints(self, pipe: redis.client.Pipeline,
                                 changes: MappingChanges) -> None:
        """Remove fingerprint -> id entries that still point at a removed or rewritten file.

        Conditional (Lua, inside the transaction) so a copy's entry is never dropped.
        """
        kept = {item.fingerprint for item in changes.indexed}
        for old in changes.removed + changes.retired:
            if old.fingerprint and old.fingerprint not in kept:
                pipe.eval(_DELETE_IF_EQUAL, 1, self.fps_key, old.fingerprint, str(old.id))

    def write_heartbeat(self, worker_id: str, state: dict, ttl_s: int) -> None:
        with redis_calls(self.address):
            self.client.set(f"{self.base}:heartbeat:{worker_id}", json.dumps(state), ex=ttl_s)

    def clear_heartbeat(self, worker_id: str) -> None:
        with redis_calls(self.address):
            self.client.delete(f"{self.base}:heartbeat:{worker_id}")

    def replace_all(self, files: Iterable[list[IndexedFile]], version: str) -> int:
        """Drop the id/path/fingerprint maps and write these files instead (rebuild)."""
        with redis_calls(self.address):
            self.client.delete(self.ids_key, self.paths_key, self.fps_key)
            self.client.set(self.version_key, version)
        total = 0
        for chunk in files:
            pipe = self.client.pipeline(transaction=True)
            for item in chunk:
                pipe.hset(self.ids_key, str(item.id), _path_key(item.path))
                pipe.hset(self.paths_key, _path_key(item.path), item.to_json())
                if item.fingerprint:
                    pipe.hset(self.fps_key, item.fingerprint, str(item.id))
            with redis_calls(self.address):
                pipe.execute()
            total += len(chunk)
        return total

    def _orphan_key(self, fingerprint: str) -> str:
        return f"{self.base}:orphan:{fingerprint}"


def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
