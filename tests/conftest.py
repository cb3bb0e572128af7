"""Shared fixtures: the real local stack once per session, and per-test isolation.

Every test gets its own topic names, consumer-group prefix, Milvus collection prefix and
Redis key prefix through `settings`, and the factories below delete what they create.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import PROJECT_ROOT, Settings, load_settings

SHARED = Path(os.environ.get("IMGSEARCH_SHARED_DIR", PROJECT_ROOT.parent / "shared"))
EFFICIENTNET = SHARED / "models" / "efficientnet-lite0.onnx"
UKBENCH = SHARED / "data" / "ukbench"


@pytest.fixture(scope="session")
def stack_ready() -> Settings:
    """Start the local stack where a service does not answer yet, and wait for readiness.

    A service already answering on its address is used as it is, even when another
    checkout's stack started it.
    """
    from stack.services import services

    base = load_settings()
    for service in services(base).values():
        service.start()
    return base


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(stack_ready: Settings, unique: str, tmp_path: Path) -> Settings:
    """Settings isolated to this test: own topics, group prefix, collections, keys, roots."""
    watch_root = tmp_path / "watched"
    watch_root.mkdir()
    return load_settings(
        kafka={
            "images_topic": f"test.{unique}.images",
            "dead_letter_topic": f"test.{unique}.deadletter",
            "group_prefix": f"test-{unique}",
            "partitions": 4,
        },
        milvus={"collection_prefix": f"t_{unique}"},
        redis={"key_prefix": f"test:{unique}"},
        watch={"roots": [str(watch_root)], "settle_s": 0.3},
    )


@pytest.fixture
def cleanup_services(settings: Settings) -> Iterator[None]:
    """Delete this test's topics, collections and keys afterwards."""
    yield
    _drop_topics(settings)
    _drop_collections(settings)
    _drop_keys(settings)


def _drop_topics(settings: Settings) -> None:
    from kafka.errors import KafkaError

    from common.kafka_io import admin_client

    admin = admin_client(settings.kafka)
    try:
        prefix = settings.kafka.images_topic.rsplit(".", 1)[0]
        mine = [name for name in admin.list_topics() if name.startswith(prefix + ".")]
        if mine:
            admin.delete_topics(mine)
    except KafkaError:
        pass
    finally:
        admin.close()


def _drop_collections(settings: Settings) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=settings.milvus.uri)
    try:
        for name in client.list_collections():
            if name.startswith(settings.milvus.collection_prefix):
                client.drop_collection(name)
    finally:
        client.close()


def _drop_keys(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis.url)
    try:
        keys = list(client.scan_iter(match=f"{settings.redis.key_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def require(path: Path, what: str) -> Path:
    """Skip with a clear reason where a shared model or data file is absent."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (../shared is absent on this machine)")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_service(tmp_path: Path, unique: str) -> Iterator:
    """Factory: a private instance of one service on free loopback ports, for fault tests.

    Stopping it never disturbs the shared stack or other tests. Returns (service, settings)
    where `settings` point every client at the private instance.
    """
    from stack.services import services

    started = []

    def start(name: str) -> tuple:
        port = free_port()
        overrides = {
            "kafka": {"kafka": {"bootstrap_servers": f"127.0.0.1:{port}", "partitions": 4,
                                "images_topic": f"test.{unique}.images",
                                "dead_letter_topic": f"test.{unique}.deadletter",
                                "group_prefix": f"test-{unique}"}},
            "redis": {"redis": {"url": f"redis://127.0.0.1:{port}/0"}},
            "milvus": {"milvus": {"uri": f"http://127.0.0.1:{port}"}},
        }[name]
        private = load_settings(
            stack={"state_dir": str(tmp_path / f"stack-{name}"),
                   "kafka_controller_port": free_port()},
            **overrides,
        )
        service = services(private)[name]
        service.start()
        started.append(service)
        return service, private

    yield start
    for service in started:
        service.stop()
