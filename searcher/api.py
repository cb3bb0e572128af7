"""The Python API: `Searcher` embeds a query image and ranks indexed files per model.

Created once per process (a web app keeps one): the ONNX sessions, the Milvus client and
the Redis client are made once and reused for every query.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Union

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from common.embedder import Embedder, get_embedder
from common.ids import normalise_path
from common.images import DecodeError, decode_image
from common.mapping import PathIndex, connect_redis
from common.registry import ModelSpec, available_models, resolve_model
from common.settings import Settings
from common.store import Hit, VectorStore
from searcher.errors import ModelNotIndexed, NoIndexedModels, QueryError
from searcher.fusion import reciprocal_rank_fusion
from searcher.results import ModelResult, RankedHit, SearchResult

log = logging.getLogger(__name__)

Query = Union[str, "os.PathLike[str]", bytes, Image.Image]

# Extra results fetched from Milvus so that k remain after dropping files deleted from disk.
MIN_MARGIN = 10
# Milvus caps topk; beyond it a search cannot ask for more.
MAX_FETCH = 16_384


class Searcher:
    """Search indexed images by image, per model and fused across models.

    Safe to share between threads for `search` (ONNX Runtime sessions, the redis client's
    pool and the gRPC channel are); `close` once at the end.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = VectorStore(settings.milvus)
        try:
            self.redis = connect_redis(settings.redis)
        except BaseException:
            self.store.close()
            raise
        self._path_indexes: dict[str, PathIndex] = {}

    def close(self) -> None:
        self.store.close()
        self.redis.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def resolve_models(self, names: Sequence[str] | None = None) -> list[ModelSpec]:
        """The models to search: the named ones (each must be indexed), or every enabled
        model whose file exists and that has an index."""
        if names:
            return [self._indexed(resolve_model(name, self.settings))
                    for name in dict.fromkeys(names)]

        specs = [spec for spec in available_models(self.settings) if self.store.has_index(spec)]
        if not specs:
            enabled = ", ".join(self.settings.models.enabled) or "none"
            raise NoIndexedModels(
                f"no enabled model has an index in Milvus at {self.settings.milvus.uri} "
                f"(enabled: {enabled}); run `python -m worker --model NAME` first"
            )
        return specs

    def search(
        self,
        image_or_path: Query,
        models: Sequence[str | ModelSpec] | None = None,
        k: int = 10,
        *,
        min_score: float | None = None,
    ) -> SearchResult:
        """Rank indexed files by cosine similarity to the query under each model.

        A path that is already indexed (same size and mtime) reuses its stored vector; a
        PIL image is embedded as given (the caller decoded it); bytes go through the same
        decode path as files.
        Raises QueryError for an unreadable query, ModelNotIndexed / UnknownModel for a bad
        model, ServiceUnavailable when Milvus or Redis cannot be reached.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        specs = self._specs(models)
        label = _label(image_or_path)
        started = time.perf_counter()

        decoded: dict[int, Image.Image] = {}  # one decode per query and decode size
        results = tuple(
            self._search_model(spec, image_or_path, label, k, min_score, decoded)
            for spec in specs
        )

        fused = ()
        if len(results) > 1:
            rankings = {r.model: [hit.path for hit in r.hits] for r in results}
            fused = tuple(reciprocal_rank_fusion(rankings, limit=k))
        log.info("query done query=%r models=%d k=%d duration_s=%.3f",
                 label, len(results), k, time.perf_counter() - started)
        return SearchResult(query=label, k=k, models=results, fused=fused)

    def _specs(self, models: Sequence[str | ModelSpec] | None) -> list[ModelSpec]:
        if not models:
            return self.resolve_models()
        names = [m for m in models if isinstance(m, str)]
        given = [self._indexed(m) for m in models if not isinstance(m, str)]
        return given + (self.resolve_models(names) if names else [])

    def _indexed(self, spec: ModelSpec) -> ModelSpec:
        if not self.store.has_index(spec):
            raise ModelNotIndexed(
                f"model {spec.name} (version {spec.version}) has no index in Milvus at "
                f"{self.settings.milvus.uri}; run `python -m worker --model {spec.name}`"
            )
        return spec

    def _search_model(
        self, spec: ModelSpec, query: Query, label: str, k: int, min_score: float | None,
        decoded: dict[int, Image.Image],
    ) -> ModelResult:
        vector, reused = self._query_vector(spec, query, label, decoded)
        hits, left_out = self._ranked_hits(spec, vector, k)

        if min_score is not None:
            hits = [hit for hit in hits if hit.score >= min_score]
        log.info("model searched model=%s version=%s hits=%d left_out=%d reused=%s",
                 spec.name, spec.version, len(hits), left_out, reused)
        return ModelResult(model=spec.name, version=spec.version, metric=spec.metric,
                           hits=tuple(hits), left_out=left_out, reused_vector=reused)

    def _query_vector(
        self, spec: ModelSpec, query: Query, label: str, decoded: dict[int, Image.Image]
    ) -> tuple[NDArray[np.float32], bool]:
        """The query's embedding under this model, and whether it came from the index."""
        if isinstance(query, Image.Image):
            return self._embedder(spec).embed_images([query])[0], False
        if not isinstance(query, bytes):
            query = normalise_path(query)
            stored = self._stored_vector(spec, query)
            if stored is not None:
                return stored, True

        # The worker's decode (same min_side), done once for all models that share it.
        if spec.resize_short not in decoded:
            try:
                decoded[spec.resize_short] = decode_image(
                    query, max_pixels=self._max_pixels, min_side=spec.resize_short)
            except DecodeError as error:
                raise QueryError(label, error.reason, error.detail) from error
        return self._embedder(spec).embed_images([decoded[spec.resize_short]])[0], False

    def _stored_vector(self, spec: ModelSpec, path: str) -> NDArray[np.float32] | None:
        """The indexed vector of this very file, if its size and mtime still match.

        Known limit: like the worker's skip rule, a rewrite that keeps size and mtime is not
        noticed (no content hash here, to keep a query free of a full file read).
        """
        try:
            stat = os.stat(path)
        except OSError:
            return None
        indexed = self._path_index(spec).get(path)
        if indexed is None or (indexed.size, indexed.mtime_ns) != (stat.st_size,
                                                                   stat.st_mtime_ns):
            return None
        return self.store.get_vectors(spec, [indexed.id]).get(indexed.id)

    def _ranked_hits(
        self, spec: ModelSpec, vector: NDArray[np.float32], k: int
    ) -> tuple[list[RankedHit], int]:
        """Top k hits whose file still exists; asks Milvus for more when too many are gone."""
        fetch = min(k + max(MIN_MARGIN, k // 2), MAX_FETCH)
        while True:
            raw = self.store.search(spec, vector[np.newaxis, :], fetch)[0]
            kept, left_out = self._existing(spec, raw, k)
            if len(kept) >= k or len(raw) < fetch or fetch >= MAX_FETCH:
                return kept, left_out
            log.info("refetching model=%s fetched=%d kept=%d", spec.name, fetch, len(kept))
            fetch = min(fetch * 4, MAX_FETCH)

    def _existing(self, spec: ModelSpec, raw: list[Hit], k: int) -> tuple[list[RankedHit], int]:
        """Paths from Redis in one round trip; files gone from disk or mapping are counted."""
        paths = self._path_index(spec).lookup_paths([hit.id for hit in raw])

        kept: list[RankedHit] = []
        left_out = 0
        for hit, path in zip(raw, paths):
            if len(kept) == k:
                break
            if path is None or not os.path.exists(path):
                left_out += 1
                continue
            kept.append(RankedHit(rank=len(kept) + 1, score=hit.score, path=path, id=hit.id))
        return kept, left_out

    def _embedder(self, spec: ModelSpec) -> Embedder:
        return get_embedder(spec.name, self.settings)

    def _path_index(self, spec: ModelSpec) -> PathIndex:
        if spec.name not in self._path_indexes:
            self._path_indexes[spec.name] = PathIndex(
                self.redis, self.settings.redis.key_prefix, spec.name
            )
        return self._path_indexes[spec.name]

    @property
    def _max_pixels(self) -> int:
        return self.settings.images.max_pixels


def _label(query: Query) -> str:
    """How the query is named in output: its normalised path, or what kind of object it is."""
    if isinstance(query, Image.Image):
        return f"<image {query.width}x{query.height}>"
    if isinstance(query, bytes):
        return f"<{len(query)} bytes>"
    return normalise_path(query)
