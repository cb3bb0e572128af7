"""Helpers shared by the worker tests: small real images, real events, real topic reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from common.events import ImageEvent
from common.ids import normalise_path
from common.kafka_io import ensure_images_topic, producer_options
from common.settings import PROJECT_ROOT, Settings

EFFICIENTNET_NAME = "efficientnet-lite0"
NSFW_NAME = "resnet50-nsfw"


def make_images(folder: Path, count: int, *, seed: int = 0, size: int = 64) -> list[Path]:
    """Distinct small JPEGs: an 8x8 random colour field scaled up (cheap to embed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        cells = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(cells, "RGB").resize((size, size), Image.BICUBIC)
        path = folder / f"img_{seed}_{number:04d}.jpg"
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def upsert_event(path: Path | str) -> ImageEvent:
    info = os.stat(path)
    return ImageEvent(kind="upsert", path=normalise_path(path), size=info.st_size,
                      mtime_ns=info.st_mtime_ns)


def delete_event(path: Path | str) -> ImageEvent:
    return ImageEvent(kind="delete", path=normalise_path(path))


def publish(settings: Settings, events: Iterable[ImageEvent]) -> int:
    """Send events keyed by path (as the producer does) and wait for every ack."""
    ensure_images_topic(settings.kafka)
    producer = KafkaProducer(**producer_options(settings.kafka))
    try:
        futures = [producer.send(settings.kafka.images_topic, key=e.key, value=e.encode())
                   for e in events]
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()
    return len(futures)


def publish_raw(settings: Settings, key: bytes | None, value: bytes | None) -> None:
    ensure_images_topic(settings.kafka)
    producer = KafkaProducer(**producer_options(settings.kafka))
    try:
        producer.send(settings.kafka.images_topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


def read_dead_letters(settings: Settings, expected: int, timeout_s: float = 20) -> list[dict]:
    """Every dead letter on this test's dead-letter topic (waits for `expected` of them)."""
    consumer = KafkaConsumer(
        settings.kafka.dead_letter_topic, **settings.kafka.client_options(),
        auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=2000,
    )
    found: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for message in consumer:
                found.append(json.loads(message.value))
    finally:
        consumer.close()
    return found


def settings_env(settings: Settings) -> dict[str, str]:
    """IMGSEARCH_* variables that reproduce these settings in a subprocess."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("IMGSEARCH_")}
    groups = {"kafka": settings.kafka, "milvus": settings.milvus, "redis": settings.redis,
              "worker": settings.worker, "images": settings.images}
    for group, values in groups.items():
        for name, value in values.model_dump(exclude_none=True).items():
            env[f"IMGSEARCH_{group.upper()}__{name.upper()}"] = str(value)
    env["IMGSEARCH_WATCH__ROOTS"] = json.dumps([str(r) for r in settings.watch.roots])
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


def start_worker_process(settings: Settings, model: str, log_file: Path) -> subprocess.Popen:
    with open(log_file, "ab") as handle:
        return subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-m", "worker", "--model", model],
            env=settings_env(settings), cwd=PROJECT_ROOT,
            stdout=handle, stderr=subprocess.STDOUT,
        )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
              interval_s: float = 0.3) -> None:
    """Poll a real condition against a deadline (never a bare sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
