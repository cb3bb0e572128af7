"""PathIndex against the real Redis."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ServiceUnavailable
from common.mapping import IndexedFile, MappingChanges, PathIndex, connect_redis
from common.settings import RedisSettings
from conftest import free_port

pytestmark = pytest.mark.usefixtures("cleanup_services")


@pytest.fixture
def index(settings):
    client = connect_redis(settings.redis)
    yield PathIndex(client, settings.redis.key_prefix, "toy")
    client.close()


def changes(**fields) -> MappingChanges:
    base = {"indexed": [], "removed": [], "retired": [], "orphans": {}, "dead_letters": {}}
    return MappingChanges(**{**base, **fields})


def file(n: int, fingerprint: str = "", path: str = "") -> IndexedFile:
    return IndexedFile(path=path or f"/r/{n}.jpg", id=n, fingerprint=fingerprint or f"f{n}",
                       size=10 * n, mtime_ns=n)


def test_batch_write_then_reads(index):
    index.apply(changes(indexed=[file(1), file(2), file(3, path="/r/ünï cöde.jpg")],
                        dead_letters={"empty": 2}), orphan_ttl_s=60)

    assert index.count() == 3
    assert index.lookup_paths([2, 9, 3]) == ["/r/2.jpg", None, "/r/ünï cöde.jpg"]
    assert index.get("/r/1.jpg") == file(1)
    assert index.get("/nope.jpg") is None
    assert index.ids_for_fingerprints(["f1", "zz"]) == {"f1": 1}
    assert index.dead_letter_counts() == {"empty": 2}
    assert index.last_batch_at() is not None


def test_delete_releases_fingerprint_only_if_it_points_at_the_file(index):
    original, copy = file(1, fingerprint="same"), file(2, fingerprint="same")
    index.apply(changes(indexed=[copy]), orphan_ttl_s=60)
    index.apply(changes(indexed=[original]), orphan_ttl_s=60)
    assert index.ids_for_fingerprints(["same"]) == {"same": 1}

    index.apply(changes(removed=[copy]), orphan_ttl_s=60)
    assert index.ids_for_fingerprints(["same"]) == {"same": 1}

    index.apply(changes(removed=[original]), orphan_ttl_s=60)
    assert index.ids_for_fingerprints(["same"]) == {}
    assert index.count() == 0


def test_orphan_vectors_round_trip_with_ttl(index):
    vector = np.arange(8, dtype=np.float32) / 10
    index.apply(changes(orphans={"gone": vector}), orphan_ttl_s=60)

    found = index.orphan_vectors(["gone", "never"])
    assert list(found) == ["gone"]
    assert np.array_equal(found["gone"], vector)
    assert 0 < index.client.ttl(f"{index.base}:orphan:gone") <= 60


def test_heartbeats_expire(index):
    index.write_heartbeat("w1", {"partitions": [0, 1]}, ttl_s=30)
    assert index.heartbeats() == {"w1": {"partitions": [0, 1]}}
    index.clear_heartbeat("w1")
    assert index.heartbeats() == {}


def test_unreachable_redis_is_service_unavailable():
    settings = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1)
    with pytest.raises(ServiceUnavailable, match="Redis unavailable at"):
        connect_redis(settings)
