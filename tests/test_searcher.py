"""The searcher against the real stack: 400 ukbench photos indexed by the real workers.

Indexing is CPU-heavy (400 images x 2 models), so it happens once for this module, with
its own topic, consumer groups, collections and keys, all dropped afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.embedder import get_embedder
from common.events import ImageEvent
from common.ids import normalise_path
from common.kafka_io import ensure_images_topic, producer_options
from common.settings import PROJECT_ROOT, Settings, load_settings
from conftest import (
    UKBENCH, _drop_collections, _drop_keys, _drop_topics, free_port, require,
)
from searcher import Searcher, SearchResult

MODELS = ["efficientnet-lite0", "resnet50-nsfw"]
# Every 20th photo is a query; 397-399 are kept out because copies of them are indexed too.
QUERY_NUMBERS = list(range(0, 400, 20))
INDEX_TIMEOUT_S = 600.0
CRAFTED_DIR = "<b>x<"  # with the file "b>.jpg" inside, the path ends in "<b>x</b>.jpg"


def photo(number: int) -> str:
    return normalise_path(UKBENCH / f"ukbench{number:05d}.jpg")


def group_of(path: str) -> int:
    return int(Path(path).stem.removeprefix("ukbench")) // 4


@dataclass
class Indexed:
    settings: Settings
    searcher: Searcher
    extras: Path
    crafted: str
    doomed: str
    touched: str


@pytest.fixture(scope="module")
def indexed(stack_ready: Settings, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Indexed]:
    require(UKBENCH / "ukbench00399.jpg", "ukbench photographs")
    extras = tmp_path_factory.mktemp("extras")
    settings = _module_settings(extras)
    crafted, doomed, touched = _make_extras(extras)
    try:
        paths = [photo(n) for n in range(400)] + [crafted, doomed, touched]
        _publish(settings, paths)
        for model in MODELS:
            _index(settings, model, expected=len(paths))
        with Searcher(settings) as searcher:
            yield Indexed(settings, searcher, extras, crafted, doomed, touched)
    finally:
        _drop_topics(settings)
        _drop_collections(settings)
        _drop_keys(settings)


def _module_settings(extras: Path) -> Settings:
    unique = uuid.uuid4().hex[:10]
    return load_settings(
        kafka={"images_topic": f"test.{unique}.images",
               "dead_letter_topic": f"test.{unique}.deadletter",
               "group_prefix": f"test-{unique}", "partitions": 4},
        milvus={"collection_prefix": f"t_{unique}"},
        redis={"key_prefix": f"test:{unique}"},
        watch={"roots": [str(UKBENCH), str(extras)]},
    )


def _make_extras(extras: Path) -> tuple[str, str, str]:
    """Copies of three photos: a crafted HTML name, one to delete, one to touch."""
    (extras / CRAFTED_DIR).mkdir()
    crafted = extras / CRAFTED_DIR / "b>.jpg"
    doomed = extras / "doomed.jpg"
    touched = extras / "touched.jpg"
    for number, target in ((399, crafted), (398, doomed), (397, touched)):
        shutil.copyfile(photo(number), target)
    return normalise_path(crafted), normalise_path(doomed), normalise_path(touched)


def _publish(settings: Settings, paths: list[str]) -> None:
    from kafka import KafkaProducer

    ensure_images_topic(settings.kafka)
    producer = KafkaProducer(**producer_options(settings.kafka))
    try:
        for path in paths:
            stat = os.stat(path)
            event = ImageEvent(kind="upsert", path=path, size=stat.st_size,
                               mtime_ns=stat.st_mtime_ns)
            producer.send(settings.kafka.images_topic, key=event.key, value=event.encode())
        producer.flush(timeout=60)
    finally:
        producer.close()


def _index(settings: Settings, model: str, expected: int) -> None:
    from worker import Worker

    worker = Worker(settings, model)
    try:
        totals = worker.run_until_idle(INDEX_TIMEOUT_S)
    finally:
        worker.close()
    assert totals.dead_lettered == 0, totals
    assert totals.embedded + totals.reused == expected, totals


# Ranking quality and the shared decode + embed path


def test_each_query_photo_finds_itself_first_under_every_model(
    indexed: Indexed, tmp_path: Path
) -> None:
    # Copies outside the index are decoded and embedded afresh, as the workers did.
    before = {m: get_embedder(m, indexed.settings).images_embedded for m in MODELS}
    results = {}
    for number in QUERY_NUMBERS:
        copy = tmp_path / f"query{number}.jpg"
        shutil.copyfile(photo(number), copy)
        results[number] = indexed.searcher.search(str(copy), k=10)

    for number, result in results.items():
        assert [r.model for r in result.models] == MODELS
        for model in result.models:
            assert not model.reused_vector
            assert model.hits[0].path == photo(number), (number, model.model)
            assert 0.99 < model.hits[0].score <= 1.0, (number, model.model, model.hits[0].score)
            assert len(model.hits) == 10
            scores = [hit.score for hit in model.hits]
            assert scores == sorted(scores, reverse=True)
    for model in MODELS:
        embedded = get_embedder(model, indexed.settings).images_embedded - before[model]
        assert embedded == len(QUERY_NUMBERS)


def test_fused_ranking_on_real_results(indexed: Indexed) -> None:
    recall = {name: 0 for name in [*MODELS, "fused"]}
    for number in QUERY_NUMBERS:
        result = indexed.searcher.search(photo(number), k=10)

        assert result.fused[0].path == photo(number)
        assert result.fused[0].model_ranks == {m: 1 for m in MODELS}
        _assert_fused_ranks_match(result)
        group = group_of(photo(number))
        mates = {photo(n) for n in range(group * 4, group * 4 + 4)}
        for model in result.models:
            recall[model.model] += len(mates & {hit.path for hit in model.hits[:4]})
        recall["fused"] += len(mates & {hit.path for hit in result.fused[:4]})

    # Reported for the record; fusion must not be worse than the weaker model.
    print(f"group recall@4 over {len(QUERY_NUMBERS)} queries: {recall}")
    assert recall["fused"] >= min(recall[m] for m in MODELS)


def _assert_fused_ranks_match(result: SearchResult) -> None:
    ranks = {m.model: {hit.path: hit.rank for hit in m.hits} for m in result.models}
    for hit in result.fused:
        expected = {m: ranks[m][hit.path] for m in MODELS if hit.path in ranks[m]}
        assert hit.model_ranks == expected
        assert hit.score == pytest.approx(sum(1 / (60 + r) for r in expected.values()))
    assert [hit.rank for hit in result.fused] == list(range(1, len(result.fused) + 1))


# Reusing stored vectors


def test_indexed_path_reuses_its_vector_without_inference(indexed: Indexed) -> None:
    before = {m: get_embedder(m, indexed.settings).images_embedded for m in MODELS}

    result = indexed.searcher.search(photo(40), k=5)

    for model in result.models:
        assert model.reused_vector
        assert model.hits[0].path == photo(40)
        assert model.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert {m: get_embedder(m, indexed.settings).images_embedded for m in MODELS} == before


def test_changed_file_is_embedded_again(indexed: Indexed) -> None:
    stat = os.stat(indexed.touched)
    os.utime(indexed.touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    before = get_embedder(MODELS[0], indexed.settings).images_embedded

    result = indexed.searcher.search(indexed.touched, models=[MODELS[0]], k=3)

    assert not result.models[0].reused_vector
    assert get_embedder(MODELS[0], indexed.settings).images_embedded == before + 1
    assert {hit.path for hit in result.models[0].hits[:2]} == {indexed.touched, photo(397)}
    assert result.fused == ()


def test_bytes_and_min_score(indexed: Indexed) -> None:
    data = Path(photo(120)).read_bytes()

    result = indexed.searcher.search(data, k=10, min_score=0.99)

    for model in result.models:
        assert [hit.path for hit in model.hits] == [photo(120)]
        assert model.hits[0].score > 0.99


# Deleted files


def test_file_deleted_after_indexing_never_appears(indexed: Indexed) -> None:
    before = indexed.searcher.search(photo(398), k=5)
    for model in before.models:
        assert indexed.doomed in {hit.path for hit in model.hits}
        assert model.left_out == 0

    os.remove(indexed.doomed)
    after = indexed.searcher.search(photo(398), k=5)

    for model in after.models:
        assert indexed.doomed not in {hit.path for hit in model.hits}
        assert model.left_out == 1
        assert len(model.hits) == 5
        assert model.hits[0].path == photo(398)
    assert indexed.doomed not in {hit.path for hit in after.fused}


# Command line: --json, the table, --html


def _run_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "searcher", *args], capture_output=True, text=True,
        cwd=PROJECT_ROOT, env={**os.environ, **(env or {})}, timeout=timeout_s,
    )


def _env(settings: Settings) -> dict[str, str]:
    return {"IMGSEARCH_MILVUS__COLLECTION_PREFIX": settings.milvus.collection_prefix,
            "IMGSEARCH_REDIS__KEY_PREFIX": settings.redis.key_prefix}


def test_json_matches_table_and_html_shows_every_result(
    indexed: Indexed, tmp_path: Path
) -> None:
    queries = [photo(399), photo(200)]
    page = tmp_path / "page.html"
    as_json = _run_cli(*queries, "-k", "5", "--json", "--html", str(page),
                       env=_env(indexed.settings))
    as_table = _run_cli(*queries, "-k", "5", env=_env(indexed.settings))

    assert as_json.returncode == 0, as_json.stderr
    assert as_table.returncode == 0, as_table.stderr
    document = json.loads(as_json.stdout)
    assert [q["query"] for q in document["queries"]] == queries
    assert _table_rows(as_table.stdout) == _json_rows(document)
    crafted_hits = [h for m in document["queries"][0]["models"] for h in m["hits"]
                    if h["path"] == indexed.crafted]
    assert len(crafted_hits) == len(MODELS)

    html = page.read_text(encoding="utf-8")
    images = sum(1 + sum(len(m["hits"]) for m in q["models"]) + len(q["fused"])
                 for q in document["queries"])
    assert html.count("<img ") == images == 2 * (1 + 5 + 5 + 5)
    assert html.count('src="data:image/jpeg;base64,') == images
    assert "<b>x</b>" not in html
    assert "&lt;b&gt;x&lt;/b&gt;.jpg" in html


def _json_rows(document: dict) -> list[tuple]:
    rows = []
    for query in document["queries"]:
        for model in query["models"]:
            assert model["metric"] == "cosine"
            rows += [(model["model"], hit["rank"], f"{hit['score']:.4f}", hit["path"])
                     for hit in model["hits"]]
        rows += [("fused", hit["fused_rank"], f"{hit['score']:.5f}", hit["path"])
                 for hit in query["fused"]]
    return rows


def _table_rows(text: str) -> list[tuple]:
    """(model, rank, score, path) per result line of the text tables."""
    rows, model = [], None
    for line in text.splitlines():
        if line.startswith("model "):
            model = line.split()[1]
            assert "metric cosine" in line
        elif line.startswith("fused "):
            model = "fused"
        elif line.strip() and line.split()[0].isdigit():
            fields = line.split()
            path = line.split("  ")[-1].strip()
            rows.append((model, int(fields[0]), fields[1], path))
    return rows


# Errors: one line on stderr, nothing on stdout, non-zero exit


def test_error_cases_exit_non_zero_with_one_line(indexed: Indexed, tmp_path: Path) -> None:
    text_as_jpg = tmp_path / "notes.jpg"
    text_as_jpg.write_text("not an image\n")
    env = _env(indexed.settings)
    milvus_port, redis_port = free_port(), free_port()
    empty_prefix = f"t_none_{uuid.uuid4().hex[:8]}"
    cases = {
        "missing": ([str(tmp_path / "missing.jpg")], env,
                    f"query {tmp_path / 'missing.jpg'}: not_found"),
        "undecodable": ([str(text_as_jpg)], env, f"query {text_as_jpg}: "),
        "unknown model": (["--model", "nope", photo(0)], env, "unknown model 'nope'"),
        "not indexed": (["--model", MODELS[0], photo(0)],
                        {**env, "IMGSEARCH_MILVUS__COLLECTION_PREFIX": empty_prefix},
                        f"model {MODELS[0]} (version "),
        "milvus down": ([photo(0)],
                        {**env, "IMGSEARCH_MILVUS__URI": f"http://127.0.0.1:{milvus_port}",
                         "IMGSEARCH_MILVUS__TIMEOUT_S": "3"},
                        f"Milvus unavailable at http://127.0.0.1:{milvus_port}"),
        "redis down": ([photo(0)],
                       {**env, "IMGSEARCH_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0"},
                       f"Redis unavailable at redis://127.0.0.1:{redis_port}/0"),
    }
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "searcher", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT, env={**os.environ, **case_env},
        )
        for name, (args, case_env, _) in cases.items()
    }

    first_lines = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 1, (name, stderr)
        assert stdout == "", name
        assert len(lines) == 1 and "Traceback" not in stderr, (name, stderr)
        assert lines[0].startswith("searcher: " + cases[name][2]), (name, lines[0])
        first_lines[name] = lines[0]
    reason = first_lines["undecodable"].split(": ")[2]
    assert reason in ("corrupt", "unsupported_format"), first_lines["undecodable"]
