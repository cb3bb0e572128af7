"""Producer against the real broker and Redis, with real files in temporary folders."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from common.events import ImageEvent, decode_event
from common.ids import file_fingerprint, normalise_path
from common.kafka_io import ensure_images_topic
from common.settings import Settings
from producer import Producer
from producer.ledger import Ledger, ledger_key, redis_client

pytestmark = pytest.mark.usefixtures("cleanup_services")

QUIET_S = 1.5


# -- helpers ----------------------------------------------------------------------------


def make_image(path: Path, seed: int) -> Path:
    """A tiny real PNG (".png" in the name) or JPEG whose pixels depend on seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    image = Image.new("RGB", (8, 8), (rng.randrange(256), rng.randrange(256), seed % 256))
    image.save(path, format="PNG" if ".png" in path.name.lower() else "JPEG")
    return path


class TopicReader:
    """Reads the images topic from the beginning with no consumer group."""

    def __init__(self, settings: Settings) -> None:
        ensure_images_topic(settings.kafka)
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers.split(","),
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
        )
        topic = settings.kafka.images_topic
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.events: list[ImageEvent] = []

    def poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=200).values():
            self.events += [decode_event(record.key, record.value) for record in records]

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[ImageEvent]:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count and time.monotonic() < deadline:
            self.poll()
        assert len(self.events) >= count, f"got {len(self.events)} of {count} events"
        return self.events

    def settle_quiet(self, quiet_s: float = QUIET_S) -> list[ImageEvent]:
        """Keep reading for quiet_s more, so an unexpected extra event is caught."""
        deadline = time.monotonic() + quiet_s
        while time.monotonic() < deadline:
            self.poll()
        return self.events

    def close(self) -> None:
        self.consumer.close()


def kinds(events: list[ImageEvent]) -> Counter[tuple[str, str]]:
    return Counter((event.kind, event.path) for event in events)


def p(path: Path) -> str:
    return normalise_path(path)


@pytest.fixture
def reader_for() -> Iterator[Callable[[Settings], TopicReader]]:
    readers: list[TopicReader] = []

    def make(settings: Settings) -> TopicReader:
        readers.append(TopicReader(settings))
        return readers[-1]

    yield make
    for reader in readers:
        reader.close()


@pytest.fixture
def producer_for() -> Iterator[Callable[[Settings], Producer]]:
    """Starts in-process producers; stops whichever are still running at teardown."""
    running: list[Producer] = []

    def start(settings: Settings) -> Producer:
        producer = Producer(settings)
        producer.start()
        running.append(producer)
        assert producer.wait_idle(60), "producer did not finish its start-up scan"
        return producer

    yield start
    for producer in running:
        if producer.running:
            producer.stop()


def root_of(settings: Settings) -> Path:
    return Path(settings.watch.roots[0])


def subprocess_env(settings: Settings) -> dict[str, str]:
    import json

    return {
        **os.environ,
        "IMGSEARCH_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "IMGSEARCH_KAFKA__IMAGES_TOPIC": settings.kafka.images_topic,
        "IMGSEARCH_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "IMGSEARCH_REDIS__URL": settings.redis.url,
        "IMGSEARCH_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "IMGSEARCH_WATCH__ROOTS": json.dumps([str(r) for r in settings.watch.roots]),
        "IMGSEARCH_WATCH__SETTLE_S": str(settings.watch.settle_s),
    }


def start_subprocess(argv: list[str], settings: Settings, log_path: Path) -> subprocess.Popen:
    """Run the producer as its own process, its log lines going to log_path."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen(
            argv, env=subprocess_env(settings), stdout=subprocess.DEVNULL, stderr=log_file,
            cwd=log_path.parent,
        )


def wait_log(log_path: Path, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert text in log_path.read_text(), log_path.read_text()[-3000:]


def stop_subprocess(process: subprocess.Popen, log_path: Path) -> tuple[int, str]:
    """SIGTERM, then the exit code and the log (killed after 40 s, failing the exit code)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode, log_path.read_text()


# -- tests ------------------------------------------------------------------------------


def test_200_images_in_nested_unicode_folders_publish_exactly_200_upserts(
    settings: Settings, producer_for: Callable, reader_for: Callable
) -> None:
    root = root_of(settings)
    producer_for(settings)
    reader = reader_for(settings)
    folders = ["", "Ferien 2024", "Ferien 2024/Strand ü", "写真/家族", "a/b/c/d"]

    images = [
        make_image(root / folders[i % len(folders)] / f"Bild é {i}.{('jpg', 'png')[i % 2]}", i)
        for i in range(200)
    ]
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(images[0].read_bytes())
    (root / "download.jpg.part").write_bytes(images[0].read_bytes())

    reader.wait_for(200, 60)
    events = reader.settle_quiet()
    assert len(events) == 200
    assert {event.kind for event in events} == {"upsert"}
    assert {event.path for event in events} == {p(image) for image in images}
    by_path = {event.path: event for event in events}
    sample = images[137]
    assert by_path[p(sample)].size == sample.stat().st_size
    assert by_path[p(sample)].fingerprint == file_fingerprint(sample)


def test_slow_copy_is_published_once_after_it_ends_with_final_size(
    settings: Settings, producer_for: Callable, reader_for: Callable
) -> None:
    settings = settings.model_copy(
        update={"watch": settings.watch.model_copy(update={"settle_s": 0.5})})
    target = root_of(settings) / "big photo.jpg"
    producer_for(settings)
    reader = reader_for(settings)
    chunk = b"\xff\xd8\xff\xe0" + os.urandom((1 << 19) - 4)

    with open(target, "wb") as handle:
        for index in range(40):  # 40 x 512 KiB = 20 MiB over about two seconds
            handle.write(chunk if index == 0 else chunk[4:] + b"\0\0\0\0")
            handle.flush()
            time.sleep(0.05)
    copy_ended = time.time()

    events = reader.wait_for(1, 30)
    events = reader.settle_quiet()
    assert len(events) == 1, [(event.kind, event.size) for event in events]
    assert events[0].size == 20 * (1 << 20) == target.stat().st_size
    assert events[0].emitted_at >= copy_ended
    assert events[0].fingerprint == file_fingerprint(target)


def test_rename_move_out_delete_folder_moves_and_duplicate_burst(
    settings: Settings, producer_for: Callable, reader_for: Callable, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = root_of(settings)
    outside = tmp_path / "outside"
    outside.mkdir()
    names = ["rename.jpg", "moveout.png", "delete.jpg", "burst.png"]
    files = {name: make_image(root / name, i) for i, name in enumerate(names)}
    album = [make_image(root / "album" / f"{i}.jpg", 10 + i) for i in range(3)]
    trip = [make_image(root / "trip" / f"{i}.png", 20 + i) for i in range(2)]
    producer_for(settings)
    reader = reader_for(settings)
    reader.wait_for(9)
    seen = len(reader.settle_quiet())
    caplog.set_level(logging.WARNING, logger="producer")

    (root / "sub dir").mkdir()
    files["rename.jpg"].rename(root / "sub dir" / "renamed.jpg")
    shutil.move(files["moveout.png"], outside / "moveout.png")
    files["delete.jpg"].unlink()
    (root / "album").rename(root / "album 2")
    (root / "trip").rename(outside / "trip")
    for i in range(30):
        make_image(files["burst.png"], 100 + i)
    stat = files["burst.png"].stat()
    for _ in range(30):
        os.utime(files["burst.png"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    make_image(root / "late.jpg.part", 77).rename(root / "late.jpg")
    (root / "fake.jpg").write_text("this is text, not a JPEG")

    expected = Counter({
        ("delete", p(root / "rename.jpg")): 1,
        ("upsert", p(root / "sub dir" / "renamed.jpg")): 1,
        ("delete", p(root / "moveout.png")): 1,
        ("delete", p(root / "delete.jpg")): 1,
        ("upsert", p(files["burst.png"])): 1,
        ("upsert", p(root / "late.jpg")): 1,
        **{("delete", p(image)): 1 for image in album},
        **{("upsert", p(root / "album 2" / image.name)): 1 for image in album},
        **{("delete", p(image)): 1 for image in trip},
    })
    reader.wait_for(seen + sum(expected.values()), 30)
    new = reader.settle_quiet()[seen:]
    assert kinds(new) == expected
    burst = next(event for event in new if event.path == p(files["burst.png"]))
    assert burst.size == stat.st_size and burst.mtime_ns == stat.st_mtime_ns
    assert any("fake.jpg" in r.message and "not an image" in r.message for r in caplog.records)


def test_restart_publishes_exactly_what_changed_while_stopped(
    settings: Settings, producer_for: Callable, reader_for: Callable
) -> None:
    root = root_of(settings)
    files = [make_image(root / f"dir {i % 3}" / f"img {i}.jpg", i) for i in range(10)]
    producer = producer_for(settings)
    reader = reader_for(settings)
    reader.wait_for(10)
    assert producer.stop() == 0
    assert len(Ledger(redis_client(settings.redis), settings.redis.key_prefix).load()) == 10

    added = [make_image(root / "new" / f"new {i}.png", 50 + i) for i in range(5)]
    changed = files[:2]
    for i, path in enumerate(changed):
        make_image(path, 90 + i)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    deleted = files[-3:]
    for path in deleted:
        path.unlink()
    log_path = root.parent / "producer.log"
    process = start_subprocess([sys.executable, "-m", "producer"], settings, log_path)

    try:
        reader.wait_for(20, 60)
        new = reader.settle_quiet()[10:]
    finally:
        returncode, stderr = stop_subprocess(process, log_path)
    expected = Counter(
        [("upsert", p(path)) for path in added + changed]
        + [("delete", p(path)) for path in deleted]
    )
    assert kinds(new) == expected, stderr[-3000:]
    assert returncode == 0, stderr[-3000:]
    assert "reconcile done" in stderr and "batch published" in stderr


def test_removed_root_publishes_no_deletes_and_is_watched_when_back(
    settings: Settings, producer_for: Callable, reader_for: Callable, tmp_path: Path
) -> None:
    kept, removable = root_of(settings), tmp_path / "usb disk"
    settings = settings.model_copy(update={"watch": settings.watch.model_copy(
        update={"roots": [kept, removable]})})
    for i in range(3):
        make_image(kept / f"k{i}.jpg", i)
        make_image(removable / f"r{i}.jpg", 10 + i)
    producer_for(settings).stop()
    reader = reader_for(settings)
    reader.wait_for(6)
    parked = tmp_path / "parked"

    removable.rename(parked)  # the disk is unmounted while the producer is stopped
    make_image(kept / "k-new.jpg", 5)
    producer = producer_for(settings)
    reader.wait_for(7)
    assert producer.watcher.mode(normalise_path(removable)) == "unwatched"
    parked.rename(removable)  # mounted again, with one more photo
    make_image(removable / "r-new.jpg", 20)

    reader.wait_for(8, 30)
    new = reader.settle_quiet()[6:]
    assert kinds(new) == Counter({("upsert", p(kept / "k-new.jpg")): 1,
                                  ("upsert", p(removable / "r-new.jpg")): 1})
    assert producer.watcher.mode(normalise_path(removable)) == "native"


def test_broker_down_ten_seconds_every_file_published_when_it_returns(
    settings: Settings, private_service: Callable, tmp_path: Path
) -> None:
    kafka, private = private_service("kafka")
    settings = private.model_copy(update={"redis": settings.redis, "watch": settings.watch})
    root = root_of(settings)
    producer = Producer(settings)
    producer.start()
    try:
        make_image(root / "before.jpg", 1)
        reader = TopicReader(settings)
        reader.wait_for(1, 30)
        reader.close()

        kafka.stop()
        arrived = []
        for i in range(10):  # the scenario: one file a second while the broker is down
            arrived.append(make_image(root / "during" / f"photo {i}.jpg", 100 + i))
            time.sleep(1.0)
        assert all(thread.is_alive() for thread in producer._threads)
        assert producer.publisher.pending() == 10
        kafka.start()

        reader = TopicReader(settings)
        events = reader.wait_for(11, 120)
        reader.settle_quiet()
        reader.close()
        assert producer.wait_idle(30)
    finally:
        unsent = producer.stop()
    assert unsent == 0
    assert kinds(events) == Counter(
        [("upsert", p(root / "before.jpg"))] + [("upsert", p(path)) for path in arrived])
    ledger = Ledger(redis_client(settings.redis), settings.redis.key_prefix).load()
    assert set(ledger) == {p(root / "before.jpg")} | {p(path) for path in arrived}


def test_redis_down_publishing_goes_on_and_the_ledger_catches_up(
    settings: Settings, private_service: Callable, reader_for: Callable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="producer.publisher")
    redis_service, private = private_service("redis")
    settings = settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"url": private.redis.url, "socket_timeout_s": 1.0})})
    redis_service.stop()
    producer = Producer(settings)
    producer.start()
    reader = reader_for(settings)

    try:
        image = make_image(root_of(settings) / "while redis is down.jpg", 1)
        events = reader.wait_for(1, 30)
        assert not producer.idle()  # the start-up scan and the ledger write still wait
        time.sleep(3)  # the ledger write is retried about once a second meanwhile
        redis_service.start()
        assert producer.wait_idle(60)
    finally:
        producer.stop()
    assert kinds(events) == Counter({("upsert", p(image)): 1})
    ledger = Ledger(redis_client(settings.redis), settings.redis.key_prefix).load()
    assert set(ledger) == {p(image)}
    assert ledger[p(image)].fingerprint == file_fingerprint(image)
    messages = [record.getMessage() for record in caplog.records]
    # One warning when the outage starts and one when it ends, not one per retry.
    assert sum(m.startswith("ledger write deferred") for m in messages) == 1
    assert sum(m.startswith("ledger writes resumed") for m in messages) == 1


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing")
def test_inotify_watch_limit_falls_back_to_polling(
    settings: Settings, reader_for: Callable
) -> None:
    root = root_of(settings)
    for i in range(6):
        (root / f"folder {i}").mkdir()
    limit = "echo 3 > /proc/sys/user/max_inotify_watches && exec \"$0\" -m producer"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available to set a private inotify limit")
    reader = reader_for(settings)
    log_path = root.parent / "producer.log"
    argv = ["unshare", "--user", "--map-root-user", "sh", "-c", limit, sys.executable]
    process = start_subprocess(argv, settings, log_path)

    try:
        wait_log(log_path, "reconcile done")
        image = make_image(root / "folder 4" / "after start.jpg", 3)
        events = reader.wait_for(1, 60)
    finally:
        returncode, stderr = stop_subprocess(process, log_path)
    assert kinds(events) == Counter({("upsert", p(image)): 1})
    assert "inotify limit reached" in stderr and "mode=polling" in stderr
    assert returncode == 0, stderr[-3000:]


def test_ledger_key_follows_the_redis_key_prefix(settings: Settings) -> None:
    assert ledger_key(settings.redis.key_prefix) == f"{settings.redis.key_prefix}:producer:ledger"
