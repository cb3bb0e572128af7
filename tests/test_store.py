"""VectorStore against the real Milvus endpoint, with small synthetic specs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from common.registry import ModelSpec
from common.store import StoreError, VectorRow, VectorStore, VersionMismatch, path_fits

pytestmark = pytest.mark.usefixtures("cleanup_services")


def spec(version: str = "1-aaaa", dim: int = 8) -> ModelSpec:
    return ModelSpec(name="toy-model", version=version, dim=dim, metric="COSINE",
                     input_size=224, resize_short=256)


@pytest.fixture
def store(settings):
    store = VectorStore(settings.milvus)
    yield store
    store.close()


def unit(values: list[float]) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def rows(count: int, dim: int = 8) -> list[VectorRow]:
    rng = np.random.default_rng(1)
    return [VectorRow(id=100 + n, path=f"/p/{n}.jpg", fingerprint=f"fp{n}", mtime_ns=n,
                      vector=unit(rng.normal(size=dim).tolist())) for n in range(count)]


def test_collection_is_created_indexed_and_described(store, settings):
    name = store.ensure_collection(spec())

    described = store.client.describe_collection(name)
    assert name.startswith(settings.milvus.collection_prefix)
    assert described["properties"]["imgsearch.version"] == "1-aaaa"
    assert described["properties"]["imgsearch.model"] == "toy-model"
    index = store.client.describe_index(name, "vector")
    assert (index["index_type"], index["metric_type"]) == ("HNSW", "COSINE")
    assert store.has_index(spec()) and not store.has_index(spec("2-bbbb"))


def test_upsert_search_get_delete_count(store):
    toy = spec()
    data = rows(10)
    store.upsert(toy, data)
    store.upsert(toy, data[:3])  # same ids again: still one row each

    assert store.count(toy) == 10
    hits = store.search(toy, np.stack([data[4].vector, data[7].vector]), k=2)
    assert [h[0].path for h in hits] == ["/p/4.jpg", "/p/7.jpg"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0][0].score > hits[0][1].score

    vectors = store.get_vectors(toy, [100, 105, 999])
    assert set(vectors) == {100, 105}
    assert np.allclose(vectors[105], data[5].vector, atol=1e-6)

    store.delete(toy, [100, 101])
    assert store.count(toy) == 8
    listed = [row for chunk in store.iter_rows(toy, batch_size=3) for row in chunk]
    assert sorted(r.id for r in listed) == list(range(102, 110))
    assert {r.fingerprint for r in listed} == {f"fp{n}" for n in range(2, 10)}


def test_version_mismatch_names_both_versions(store):
    # "1.0" and "1_0" fold to the same collection name: a different model version.
    store.ensure_collection(spec("1.0"))
    other = VectorStore(store.settings)
    try:
        with pytest.raises(VersionMismatch, match=r"version 1\.0.*version 1_0"):
            other.ensure_collection(spec("1_0"))
    finally:
        other.close()


def test_dim_mismatch_is_refused(store, settings):
    store.ensure_collection(spec())
    other = VectorStore(settings.milvus)
    try:
        with pytest.raises(StoreError, match="dim 8.*dim 16"):
            other.ensure_collection(replace(spec(), dim=16))
    finally:
        other.close()


def test_path_length_is_measured_in_utf8_bytes():
    assert path_fits("/" + "a" * 4095)
    assert not path_fits("/" + "a" * 4096)
    assert not path_fits("/" + "é" * 2048)  # 2 bytes each: 4097 bytes
