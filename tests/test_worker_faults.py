"""Worker faults through real knobs: kill -9, a second worker leaving, Milvus stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import pytest

from common.ids import path_id
from common.mapping import PathIndex, connect_redis
from common.registry import resolve_model
from common.settings import Settings
from common.store import VectorStore
from conftest import EFFICIENTNET, require
from test_worker_support import (
    EFFICIENTNET_NAME, make_images, publish, start_worker_process, upsert_event, wait_for,
)
from worker import Worker

pytestmark = pytest.mark.usefixtures("cleanup_services")


def tuned(settings: Settings, **worker: object) -> Settings:
    """Small batches (many commits to interrupt) and a short session for kill -9."""
    values = {"batch_size": 8, "session_timeout_ms": 8000, **worker}
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=values)})


def stored_ids(settings: Settings) -> list[int]:
    store = VectorStore(settings.milvus)
    try:
        spec = resolve_model(EFFICIENTNET_NAME, settings)
        return [row.id for rows in store.iter_rows(spec) for row in rows]
    finally:
        store.close()


@pytest.fixture
def mapping(settings: Settings):
    client = connect_redis(settings.redis)
    yield PathIndex(client, settings.redis.key_prefix, EFFICIENTNET_NAME)
    client.close()


def test_kill_9_mid_batch_then_restart_keeps_one_row_per_file(settings, mapping, tmp_path):
    require(EFFICIENTNET, "efficientnet-lite0 model")
    config = tuned(settings)
    paths = make_images(Path(settings.watch.roots[0]) / "k", 120, seed=21)
    publish(settings, [upsert_event(p) for p in paths])
    log_file = tmp_path / "worker.log"

    first = start_worker_process(config, EFFICIENTNET_NAME, log_file)
    try:
        wait_for(lambda: mapping.count() >= 16, 90, "a few committed batches")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert mapping.count() < 120, "the worker finished before it could be killed"

    second = start_worker_process(config, EFFICIENTNET_NAME, log_file)
    try:
        wait_for(lambda: mapping.count() == 120, 120, "all files indexed after restart")
    finally:
        second.send_signal(signal.SIGTERM)
        exit_code = second.wait(30)

    assert exit_code == 0
    ids = stored_ids(settings)
    assert len(ids) == 120
    assert set(ids) == {path_id(str(p)) for p in paths}
    assert "batch model=efficientnet-lite0" in log_file.read_text()


def _run_in_thread(worker: Worker, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def test_two_workers_split_partitions_and_hand_over(settings, mapping):
    require(EFFICIENTNET, "efficientnet-lite0 model")
    config = tuned(settings)
    root = Path(settings.watch.roots[0])
    first_paths = make_images(root / "a", 40, seed=31)
    publish(settings, [upsert_event(p) for p in first_paths])
    stop_a, stop_b = threading.Event(), threading.Event()
    worker_a = Worker(config, EFFICIENTNET_NAME, worker_id="a")
    worker_b = Worker(config, EFFICIENTNET_NAME, worker_id="b")
    threads = [_run_in_thread(worker_a, stop_a), _run_in_thread(worker_b, stop_b)]
    try:
        wait_for(lambda: mapping.count() == 40, 90, "first 40 files")
        parts_a, parts_b = worker_a.consumer.assignment(), worker_b.consumer.assignment()
        assert parts_a and parts_b and not parts_a & parts_b
        assert len(parts_a | parts_b) == 4

        stop_b.set()
        threads[1].join(60)
        worker_b.close()
        second_paths = make_images(root / "b", 40, seed=32)
        publish(settings, [upsert_event(p) for p in second_paths])
        wait_for(lambda: mapping.count() == 80, 90, "40 more files after the hand-over")
        assert len(worker_a.consumer.assignment()) == 4
    finally:
        stop_a.set()
        stop_b.set()
        threads[0].join(60)
        worker_a.close()

    ids = stored_ids(settings)
    assert len(ids) == 80
    assert set(ids) == {path_id(str(p)) for p in first_paths + second_paths}
    assert worker_a.totals.records > 0 and worker_b.totals.records > 0


def test_milvus_stopped_for_20_s_loses_and_duplicates_nothing(
    settings, mapping, private_service, caplog
):
    require(EFFICIENTNET, "efficientnet-lite0 model")
    milvus, private = private_service("milvus")
    config = tuned(settings).model_copy(update={"milvus": private.milvus.model_copy(
        update={"timeout_s": 3.0})})
    paths = make_images(Path(settings.watch.roots[0]) / "m", 80, seed=41)
    publish(settings, [upsert_event(p) for p in paths])
    worker = Worker(config, EFFICIENTNET_NAME)
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="worker")
    thread = _run_in_thread(worker, stop)
    try:
        wait_for(lambda: mapping.count() >= 8, 60, "a first committed batch")
        milvus.stop()
        outage_started = time.monotonic()
        count_during = mapping.count()
        time.sleep(20)  # the fault itself: Milvus stays down for 20 s
        assert mapping.count() == count_during, "nothing may be committed while Milvus is down"
        milvus.start()
        assert time.monotonic() - outage_started >= 20
        wait_for(lambda: mapping.count() == 80, 120, "ingestion to resume by itself")
    finally:
        stop.set()
        thread.join(60)
        worker.close()

    ids = stored_ids(config)
    assert len(ids) == 80
    assert set(ids) == {path_id(str(p)) for p in paths}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("service unavailable" in m and "service=Milvus" in m for m in messages) == 1
    assert sum("service recovered" in m and "service=Milvus" in m for m in messages) == 1
