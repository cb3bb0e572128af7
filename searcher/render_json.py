"""The --json document: every query's per-model hits and fused ranking, nothing else."""

from __future__ import annotations

import json
from typing import Any

from searcher.fusion import RRF_K
from searcher.results import SearchResult


def result_document(result: SearchResult) -> dict[str, Any]:
    return {
        "query": result.query,
        "k": result.k,
        "models": [
            {
                "model": model.model,
                "version": model.version,
                "metric": model.metric.lower(),
                "left_out": model.left_out,
                "reused_vector": model.reused_vector,
                "hits": [
                    {"rank": hit.rank, "score": hit.score, "path": hit.path, "id": hit.id}
                    for hit in model.hits
                ],
            }
            for model in result.models
        ],
        "fused": [
            {"fused_rank": hit.rank, "score": hit.score, "path": hit.path,
             "ranks": hit.model_ranks}
            for hit in result.fused
        ],
    }


def render_document(entries: list[SearchResult | tuple[str, str]]) -> str:
    """One JSON document; an entry is a result, or (query, error message) for a failed query."""
    queries = [
        result_document(entry) if isinstance(entry, SearchResult)
        else {"query": entry[0], "error": entry[1]}
        for entry in entries
    ]
    document = {
        "fusion": {"method": "reciprocal_rank_fusion", "k": RRF_K},
        "queries": queries,
    }
    return json.dumps(document, indent=2)
