"""Producer edge cases found by testing: each test reproduces one defect on real files,
the real broker and Redis, and asserts exactly the events that must reach the topic."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from common.settings import PROJECT_ROOT, Settings
from producer import Producer
from producer.filters import NOT_REGULAR, content_skip_reason
from producer.ledger import Ledger, redis_client
from test_producer import (  # noqa: F401 - fixtures are used by name
    kinds,
    make_image,
    p,
    producer_for,
    reader_for,
    root_of,
    start_subprocess,
    wait_log,
)

pytestmark = [pytest.mark.usefixtures("cleanup_services"), pytest.mark.timeout(120)]


def with_watch(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"watch": settings.watch.model_copy(update=update)})


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


# -- 1: a published file replaced by a folder -------------------------------------------


def test_file_replaced_by_folder_publishes_its_tombstone_live_and_after_restart(
    settings: Settings, producer_for: Callable, reader_for: Callable
) -> None:
    root = root_of(settings)
    live, offline = make_image(root / "g" / "x.png", 1), make_image(root / "g" / "y.png", 2)
    producer = producer_for(settings)
    reader = reader_for(settings)
    reader.wait_for(2)

    live.unlink()
    live.mkdir()
    make_image(live / "inner.png", 3)
    reader.wait_for(4, 20)
    producer.stop()
    offline.unlink()  # the same while stopped, found by the polling producer's start-up scan
    offline.mkdir()
    make_image(offline / "inner.png", 4)
    producer_for(with_watch(settings, polling=True, poll_interval_s=0.2))

    reader.wait_for(6, 20)
    new = reader.settle_quiet()[2:]
    assert kinds(new) == Counter({
        ("delete", p(live)): 1, ("upsert", p(live / "inner.png")): 1,
        ("delete", p(offline)): 1, ("upsert", p(offline / "inner.png")): 1,
    })


# -- 2: a root deleted or moved away and recreated within a second -----------------------


@pytest.mark.parametrize("replace", ["rm -rf", "mv"])
def test_root_recreated_within_a_second_is_watched_again(
    settings: Settings, producer_for: Callable, reader_for: Callable, replace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = root_of(settings)
    caplog.set_level(logging.INFO, logger="producer")
    producer = producer_for(settings)  # reconcile_interval_s is 300: only the watch helps
    reader = reader_for(settings)

    if replace == "mv":
        root.rename(root.parent / "watched.old")
    else:
        shutil.rmtree(root)
    root.mkdir()
    first = make_image(root / "first.jpg", 1)
    reader.wait_for(1, 15)  # found by the rescan that follows the re-watch
    second = make_image(root / "sub" / "second.jpg", 2)

    reader.wait_for(2, 15)  # found through the new watch
    events = reader.settle_quiet()
    assert kinds(events) == Counter({("upsert", p(first)): 1, ("upsert", p(second)): 1})
    assert producer.watcher.mode(p(root)) == "native"
    assert warnings_with(caplog, "re-watching root=")


# -- 3: folder symlinks are never followed -----------------------------------------------


def test_folder_symlink_with_an_image_name_is_not_followed(
    settings: Settings, producer_for: Callable, reader_for: Callable
) -> None:
    root = root_of(settings)
    images = [make_image(root / "f" / f"{name}.png", i) for i, name in enumerate("ab")]
    producer = producer_for(settings)
    reader = reader_for(settings)
    reader.wait_for(2)

    (root / "f" / "back.png").symlink_to(root / "f", target_is_directory=True)
    (root / "link.jpg").symlink_to(images[0])  # a file symlink stays published
    reader.wait_for(3, 15)
    reader.settle_quiet()
    producer.stop()
    producer_for(settings)  # the start-up scan must not follow the folder link either

    new = reader.settle_quiet()[2:]
    assert kinds(new) == Counter({("upsert", p(root / "link.jpg")): 1})


# -- 4: an emptied root ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leftover", "empty_is_unmounted", "deletes"),
    [("notes.txt", True, 3), (".hidden", True, 3), ("folder", True, 3),
     (None, False, 3), (None, True, 0)],
)
def test_root_emptied_while_stopped(
    settings: Settings, producer_for: Callable, reader_for: Callable,
    caplog: pytest.LogCaptureFixture, leftover: str | None, empty_is_unmounted: bool,
    deletes: int,
) -> None:
    root = root_of(settings)
    images = [make_image(root / f"{i}.jpg", i) for i in range(3)]
    producer_for(settings).stop()
    reader = reader_for(settings)
    reader.wait_for(3)
    caplog.set_level(logging.WARNING, logger="producer")

    for image in images:
        image.unlink()
    if leftover == "folder":
        (root / "empty folder").mkdir()
    elif leftover is not None:
        (root / leftover).write_text("left behind")
    producer_for(with_watch(settings, empty_root_is_unmounted=empty_is_unmounted))

    new = reader.settle_quiet()[3:]
    assert kinds(new) == Counter({("delete", p(image)): 1 for image in images[:deletes]})
    unmounted = warnings_with(caplog, "IMGSEARCH_WATCH__EMPTY_ROOT_IS_UNMOUNTED=false")
    assert len(unmounted) == (1 if deletes == 0 else 0)


# -- 5: settings that used to kill a thread, hang or retry forever -----------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMGSEARCH_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:abc"),
        ("IMGSEARCH_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092,127.0.0.1:70000"),
        ("IMGSEARCH_REDIS__URL", "redis://127.0.0.1:notaport"),
        ("IMGSEARCH_KAFKA__IMAGES_TOPIC", "bad topic/name"),
        ("IMGSEARCH_KAFKA__DEAD_LETTER_TOPIC", "x" * 250),
        ("IMGSEARCH_WATCH__ROOTS", "[]"),
    ],
)
def test_bad_setting_exits_2_with_one_line(variable: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", variable: value}

    run = subprocess.run(
        [sys.executable, "-m", "producer", "--once"], env=env, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=60,
    )

    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith(f"producer: invalid setting {variable}")


def test_unexpected_error_in_the_publisher_is_reported_not_silent(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # model_copy skips validation: this is the value the validator now refuses at start.
    bad = settings.model_copy(update={"kafka": settings.kafka.model_copy(
        update={"bootstrap_servers": "127.0.0.1:abc"})})
    producer = Producer(bad)
    producer.start()

    try:
        deadline = time.monotonic() + 20
        while producer.failure() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        producer.stop()
    assert isinstance(producer.failure(), ValueError)
    assert any("publisher failed" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)


# -- 6: file names that are not valid UTF-8 ----------------------------------------------


def test_non_utf8_names_are_skipped_with_one_warning_and_never_marked_known(
    settings: Settings, producer_for: Callable, reader_for: Callable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = root_of(settings)
    good = make_image(root / "good.png", 1)
    at_start = os.fsencode(root) + b"/bad\xff\xfename.png"
    with open(at_start, "wb") as handle:
        handle.write(good.read_bytes())
    caplog.set_level(logging.WARNING, logger="producer")
    producer = producer_for(with_watch(settings, reconcile_interval_s=0.3))
    reader = reader_for(settings)

    later = os.fsencode(root) + b"/later\xe9.png"
    with open(later, "wb") as handle:
        handle.write(good.read_bytes())
    events = reader.settle_quiet(2.0)  # several periodic reconciles run meanwhile

    assert kinds(events) == Counter({("upsert", p(good)): 1})
    assert len(warnings_with(caplog, "reason=file name is not valid UTF-8")) == 2
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len(producer.known) == 1
    assert set(Ledger(redis_client(settings.redis), settings.redis.key_prefix).load()) == {
        p(good)}


# -- 7: a FIFO with an image name --------------------------------------------------------


def test_content_sniff_of_a_fifo_returns_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    result: list[str | None] = []

    worker = threading.Thread(target=lambda: result.append(content_skip_reason(str(fifo))),
                              daemon=True)
    worker.start()
    worker.join(5)

    if worker.is_alive():  # unblock the open so the thread ends, then fail
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        pytest.fail("content sniffing blocked on a FIFO")
    assert result == [NOT_REGULAR]


def test_fifo_named_like_an_image_is_skipped_with_a_warning(
    settings: Settings, producer_for: Callable, reader_for: Callable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = root_of(settings)
    os.mkfifo(root / "at start.jpg")
    caplog.set_level(logging.WARNING, logger="producer")
    producer = producer_for(settings)
    reader = reader_for(settings)

    os.mkfifo(root / "later.jpg")
    image = make_image(root / "photo.jpg", 1)
    reader.wait_for(1, 15)
    events = reader.settle_quiet()

    assert kinds(events) == Counter({("upsert", p(image)): 1})
    assert producer.wait_idle(5)
    assert len(warnings_with(caplog, f"reason={NOT_REGULAR}")) == 2


# -- 8: more SIGTERMs during shutdown -------------------------------------------------


def test_sigterms_repeated_during_shutdown_exit_0_after_a_clean_flush(
    settings: Settings, reader_for: Callable
) -> None:
    root = root_of(settings)
    image = make_image(root / "photo.jpg", 1)
    reader = reader_for(settings)
    log_path = root.parent / "producer.log"
    process = start_subprocess([sys.executable, "-m", "producer"], settings, log_path)

    try:
        reader.wait_for(1, 30)
        wait_log(log_path, "reconcile done")
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        # The second one, then more every 10 ms: one lands in every phase of the shutdown,
        # interpreter finalisation included (where a late signal used to kill the process).
        deadline = time.monotonic() + 3
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        returncode = process.wait(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = log_path.read_text()
    assert returncode == 0, stderr[-3000:]
    assert "producer stopped published=1 unsent=0" in stderr
    assert kinds(reader.settle_quiet(0.5)) == Counter({("upsert", p(image)): 1})
