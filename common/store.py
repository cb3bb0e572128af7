"""The Milvus vector store: one collection per model and model version.

Each row keeps the path, fingerprint and mtime beside the vector, so the Redis mapping can
be rebuilt from Milvus alone (`python -m worker rebuild-mapping`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from numpy.typing import NDArray
from pymilvus import DataType, MilvusClient, MilvusException

from common.errors import ImgSearchError, ServiceUnavailable
from common.settings import MilvusSettings

if TYPE_CHECKING:
    from common.registry import ModelSpec

log = logging.getLogger(__name__)

PATH_MAX_BYTES = 4096
FINGERPRINT_MAX_CHARS = 128
MODEL_PROPERTY = "imgsearch.model"
VERSION_PROPERTY = "imgsearch.version"
ROW_FIELDS = ["id", "path", "fingerprint", "mtime_ns"]
HNSW_PARAMS = {"M": 16, "efConstruction": 200}
# Query expressions are capped in length by the server; look rows up in slices.
IDS_PER_QUERY = 512


class StoreError(ImgSearchError):
    """The collection exists but does not match what this code expects."""


class VersionMismatch(StoreError):
    """The collection was built by another model version; mixing vectors would be wrong."""


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine similarity: higher is closer
    path: str


@dataclass(frozen=True)
class VectorRow:
    """One file's row, as written by the worker."""

    id: int
    path: str
    fingerprint: str
    mtime_ns: int
    vector: NDArray[np.float32] | None = None


def path_fits(path: str) -> bool:
    """True when the path fits the VARCHAR field (measured in UTF-8 bytes, as Milvus does)."""
    return len(path.encode("utf-8", "surrogateescape")) <= PATH_MAX_BYTES


class VectorStore:
    """One MilvusClient reused for every call; every failure to reach it is ServiceUnavailable."""

    def __init__(self, settings: MilvusSettings) -> None:
        self.settings = settings
        self.timeout_s = settings.timeout_s
        self._ready: set[str] = set()
        token = settings.token.get_secret_value() if settings.token else ""
        try:
            self.client = MilvusClient(
                uri=settings.uri, token=token, db_name=settings.db_name,
                timeout=settings.timeout_s,
            )
        except (MilvusException, grpc.RpcError, OSError) as error:
            raise ServiceUnavailable("Milvus", settings.uri, str(error)) from error

    def close(self) -> None:
        self.client.close()

    def collection_name(self, spec: ModelSpec) -> str:
        """Prefix, model and version, folded to the characters Milvus accepts."""
        raw = f"{self.settings.collection_prefix}_{spec.name}_{spec.version}"
        return re.sub(r"[^0-9A-Za-z_]", "_", raw)

    def has_index(self, spec: ModelSpec) -> bool:
        with self._calls():
            return bool(self.client.has_collection(
                self.collection_name(spec), timeout=self.timeout_s
            ))

    def ensure_collection(self, spec: ModelSpec) -> str:
        """Create (schema, index, load) or check the model's collection; returns its name."""
        name = self.collection_name(spec)
        if name in self._ready:
            return name
        with self._calls():
            if self.client.has_collection(name, timeout=self.timeout_s):
                self._check_existing(name, spec)
            else:
                self._create(name, spec)
            self.client.load_collection(name, timeout=self.timeout_s)
        self._ready.add(name)
        return name

    def _create(self, name: str, spec: ModelSpec) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=spec.dim)
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_MAX_BYTES)
        schema.add_field("fingerprint", DataType.VARCHAR, max_length=FINGERPRINT_MAX_CHARS)
        schema.add_field("mtime_ns", DataType.INT64)
        properties = {MODEL_PROPERTY: spec.name, VERSION_PROPERTY: spec.version}
        self.client.create_collection(
            name, schema=schema, properties=properties, timeout=self.timeout_s,
            consistency_level="Strong",
        )

        index_type = self._create_index(name, spec)
        log.info("collection created name=%s model=%s version=%s dim=%d index=%s",
                 name, spec.name, spec.version, spec.dim, index_type)

    def _create_index(self, name: str, spec: ModelSpec) -> str:
        """HNSW where the endpoint supports it, else the endpoint's own AUTOINDEX."""
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type="HNSW", metric_type=spec.metric,
                         params=HNSW_PARAMS)
        try:
            self.client.create_index(name, params, timeout=self.timeout_s)
            return "HNSW"
        except MilvusException as error:
            log.warning("HNSW refused, falling back to AUTOINDEX collection=%s error=%s",
                        name, error)
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type="AUTOINDEX", metric_type=spec.metric)
        self.client.create_index(name, params, timeout=self.timeout_s)
        return "AUTOINDEX"

    def _check_existing(self, name: str, spec: ModelSpec) -> None:
        described = self.client.describe_collection(name, timeout=self.timeout_s)
        properties = described.get("properties") or {}
        version = properties.get(VERSION_PROPERTY)
        if version is not None and version != spec.version:
            raise VersionMismatch(
                f"collection {name} holds model {properties.get(MODEL_PROPERTY)} version "
                f"{version}, but the loaded model {spec.name} is version {spec.version}"
            )
        vector = next((f for f in described["fields"] if f["name"] == "vector"), None)
        dim = int(vector["params"]["dim"]) if vector else None
        if dim != spec.dim:
            raise StoreError(
                f"collection {name} has vector dim {dim}, model {spec.name} "
                f"version {spec.version} produces dim {spec.dim}"
            )

    def upsert(self, spec: ModelSpec, rows: Sequence[VectorRow]) -> None:
        """Insert or replace rows by id; the caller has collapsed duplicate ids."""
        if not rows:
            return
        name = self.ensure_collection(spec)
        data = [_row_data(row) for row in rows]
        with self._calls():
            self.client.upsert(name, data, timeout=self.timeout_s)

    def flush(self, spec: ModelSpec) -> None:
        """Seal the rows written so far into indexed segments.

        Milvus Lite searches unsealed rows by brute force in Python (about 60 ms a query
        at a few hundred rows, 10 ms once flushed); Milvus standalone seals on its own
        and accepts an occasional manual flush.
        """
        name = self.ensure_collection(spec)
        with self._calls():
            self.client.flush(name, timeout=self.timeout_s)

    def delete(self, spec: ModelSpec, ids: Sequence[int]) -> None:
        if not ids:
            return
        name = self.ensure_collection(spec)
        with self._calls():
            self.client.delete(name, ids=[int(i) for i in ids], timeout=self.timeout_s)

    def fetch_rows(
        self, spec: ModelSpec, ids: Sequence[int], *, with_vectors: bool = True
    ) -> dict[int, VectorRow]:
        """The stored rows for these ids (absent ids are left out)."""
        name = self.ensure_collection(spec)
        fields = ROW_FIELDS + (["vector"] if with_vectors else [])
        unique = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, VectorRow] = {}
        for start in range(0, len(unique), IDS_PER_QUERY):
            chunk = unique[start:start + IDS_PER_QUERY]
            with self._calls():
                result = self.client.get(name, ids=chunk, output_fields=fields,
                                         timeout=self.timeout_s)
            for entity in result:
                row = _row_from(entity)
                found[row.id] = row
        return found

    def get_vectors(
        self, spec: ModelSpec, ids: Sequence[int]
    ) -> dict[int, NDArray[np.float32]]:
        rows = self.fetch_rows(spec, ids)
        return {row_id: row.vector for row_id, row in rows.items() if row.vector is not None}

    def search(
        self, spec: ModelSpec, vectors: NDArray[np.float32], k: int
    ) -> list[list[Hit]]:
        """Top-k per query vector by cosine similarity."""
        name = self.ensure_collection(spec)
        data = np.asarray(vectors, dtype=np.float32).reshape(-1, spec.dim).tolist()
        params = {"params": {"ef": max(64, k)}}
        with self._calls():
            result = self.client.search(
                name, data=data, limit=k, output_fields=["path"],
                search_params=params, timeout=self.timeout_s,
            )
        return [
            # Rounding can put a cosine a hair above 1; clamp to the metric's range.
            [Hit(int(hit["id"]), min(1.0, max(-1.0, float(hit["distance"]))),
                 hit["entity"]["path"])
             for hit in hits]
            for hits in result
        ]

    def count(self, spec: ModelSpec) -> int:
        name = self.ensure_collection(spec)
        with self._calls():
            result = self.client.query(name, filter="", output_fields=["count(*)"],
                                       timeout=self.timeout_s)
        return int(result[0]["count(*)"])

    def iter_rows(self, spec: ModelSpec, batch_size: int = 1000) -> Iterator[list[VectorRow]]:
        """Every row without its vector, in batches (for rebuilding the Redis mapping)."""
        name = self.ensure_collection(spec)
        with self._calls():
            iterator = self.client.query_iterator(
                name, batch_size=batch_size, output_fields=ROW_FIELDS, timeout=self.timeout_s
            )
        try:
            while True:
                with self._calls():
                    batch = iterator.next()
                if not batch:
                    return
                yield [_row_from(entity) for entity in batch]
        finally:
            iterator.close()

    def _calls(self) -> _Translate:
        return _Translate(self.settings.uri)


class _Translate:
    """Turns a connection-level failure of a Milvus call into ServiceUnavailable."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if error is None or isinstance(error, ImgSearchError):
            return False
        if isinstance(error, (MilvusException, grpc.RpcError, OSError, TimeoutError)):
            raise ServiceUnavailable("Milvus", self.uri, _short(error)) from error
        return False


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text[:limit] or type(error).__name__


def _row_data(row: VectorRow) -> dict[str, Any]:
    if row.vector is None:
        raise StoreError(f"row for {row.path} has no vector")
    return {
        "id": int(row.id),
        "vector": np.asarray(row.vector, dtype=np.float32).tolist(),
        "path": row.path,
        "fingerprint": row.fingerprint,
        "mtime_ns": int(row.mtime_ns),
    }


def _row_from(entity: dict[str, Any]) -> VectorRow:
    vector = entity.get("vector")
    return VectorRow(
        id=int(entity["id"]),
        path=entity["path"],
        fingerprint=entity["fingerprint"],
        mtime_ns=int(entity["mtime_ns"]),
        vector=None if vector is None else np.asarray(vector, dtype=np.float32),
    )
