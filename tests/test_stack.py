"""The foundation against real services: Kafka, Milvus Lite's gRPC server and Redis."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from common.kafka_io import ensure_topic, producer_options
from common.settings import PROJECT_ROOT, Settings


def _consume(settings: Settings, topic: str, group: str, want: int) -> list[bytes]:
    """Read up to `want` records with a consumer group, commit them, and close."""
    consumer = KafkaConsumer(
        topic, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
        **settings.kafka.client_options(),
    )
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=want - len(values)).values():
            values.extend(record.value for record in records)
    consumer.commit()
    consumer.close()
    return values


def test_consumer_group_resumes_after_committed_offset(
    settings: Settings, cleanup_services: None
) -> None:
    topic = settings.kafka.images_topic
    ensure_topic(settings.kafka, topic, 3, {})
    producer = KafkaProducer(**producer_options(settings.kafka))
    for i in range(10):
        producer.send(topic, key=b"k%d" % i, value=b"first-%d" % i)
    producer.flush()

    first = _consume(settings, topic, "g-resume", want=10)
    for i in range(3):
        producer.send(topic, key=b"k%d" % i, value=b"second-%d" % i)
    producer.flush()
    producer.close()
    resumed = _consume(settings, topic, "g-resume", want=3)

    assert sorted(first) == sorted(b"first-%d" % i for i in range(10))
    assert sorted(resumed) == [b"second-0", b"second-1", b"second-2"]


MILVUS_CLIENT = """
import sys, numpy as np
from pymilvus import MilvusClient
uri, name, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = MilvusClient(uri=uri)
rng = np.random.default_rng(start)
rows = [{"id": start + i, "vec": rng.random(8).astype("float32").tolist()} for i in range(50)]
client.upsert(name, rows)
print(client.search(name, data=[rows[7]["vec"]], limit=1)[0][0]["id"])
"""


def test_milvus_endpoint_serves_two_client_processes(
    settings: Settings, cleanup_services: None
) -> None:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=settings.milvus.uri)
    name = f"{settings.milvus.collection_prefix}_stack"
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index(field_name="vec", index_type="HNSW", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)
    client.load_collection(name)

    runs = [
        subprocess.Popen(
            [sys.executable, "-c", MILVUS_CLIENT, settings.milvus.uri, name, str(start)],
            stdout=subprocess.PIPE, text=True,
        )
        for start in (0, 1000)
    ]
    nearest = [int(run.communicate(timeout=60)[0].strip()) for run in runs]
    client.delete(name, ids=[1007])
    total = client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"]
    after_delete = client.search(name, data=[np.ones(8, np.float32).tolist()], limit=100)

    assert [run.returncode for run in runs] == [0, 0]
    assert nearest == [7, 1007]
    assert total == 99
    assert 1007 not in {hit["id"] for hit in after_delete[0]}
    assert len(after_delete[0]) == 99


def test_redis_keeps_data_across_restart(private_service) -> None:
    import redis

    service, private = private_service("redis")
    client = redis.Redis.from_url(private.redis.url)
    client.hset("imgsearch:test:map", mapping={"1": "/a.jpg", "2": "/b.jpg"})
    client.close()

    service.stop()
    service.start()
    client = redis.Redis.from_url(private.redis.url)
    stored = client.hgetall("imgsearch:test:map")
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    aof = client.config_get("appendonly")["appendonly"]
    client.close()

    assert stored == {b"1": b"/a.jpg", b"2": b"/b.jpg"}
    assert (policy, aof) == ("noeviction", "yes")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("IMGSEARCH_WORKER__BATCH_SIZE", "lots", "invalid setting IMGSEARCH_WORKER__BATCH_SIZE"),
        ("IMGSEARCH_REDIS__URL", "http://x", "invalid setting IMGSEARCH_REDIS__URL"),
        ("IMGSEARCH_KAFKA__PARTITIONS", "0", "invalid setting IMGSEARCH_KAFKA__PARTITIONS"),
        # A list given as plain text once gave only "error parsing value for field watch".
        ("IMGSEARCH_WATCH__ROOTS", "/tmp/x", "invalid setting IMGSEARCH_WATCH__*: a list or "
         "nested value must be JSON"),
    ],
)
def test_bad_setting_fails_with_one_line(variable: str, value: str, expected: str) -> None:
    env = {"PATH": "/usr/bin:/bin", variable: value}

    run = subprocess.run(
        [sys.executable, "-m", "stack", "status"], env=env, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=60,
    )

    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert expected in lines[0]
    assert "Traceback" not in run.stderr


def test_settings_hide_secrets_and_read_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.settings import load_settings

    monkeypatch.setenv("IMGSEARCH_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("IMGSEARCH_WATCH__ROOTS", '["/srv/photos", "/mnt/nas"]')
    monkeypatch.setenv("IMGSEARCH_WATCH__EXTENSIONS", '["JPG", ".png"]')

    loaded = load_settings()

    assert loaded.watch.roots == [Path("/srv/photos"), Path("/mnt/nas")]
    assert loaded.watch.extensions == [".jpg", ".png"]
    assert loaded.kafka.client_options()["sasl_plain_password"] == "hunter2"
    assert "hunter2" not in str(loaded.redacted())


def test_passwords_inside_urls_are_hidden_in_the_logged_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from common.settings import load_settings

    monkeypatch.setenv("IMGSEARCH_REDIS__URL", "redis://:urlsecret@127.0.0.1:6379/0")
    monkeypatch.setenv("IMGSEARCH_MILVUS__URI", "http://root:milvussecret@127.0.0.1:19530")

    shown = load_settings().redacted()

    assert shown["redis"]["url"] == "redis://:**********@127.0.0.1:6379/0"
    assert shown["milvus"]["uri"] == "http://root:**********@127.0.0.1:19530"


def test_stack_from_another_checkout_uses_services_that_answer(
    stack_ready: Settings, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMGSEARCH_STACK__STATE_DIR": str(tmp_path / "other")}

    def stack(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stack", action], env=env,
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)

    up, status, down = stack("up"), stack("status"), stack("down")
    still = stack("status")

    # Once "port 9092 in use by another process" and exit 1, though Kafka answered.
    assert up.returncode == 0, up.stderr
    assert up.stdout.count("started elsewhere; left alone") == 3
    assert status.returncode == 0 and status.stdout.count("ready (started elsewhere)") == 3
    assert down.stdout.count("not started here") == 3
    assert still.returncode == 0
