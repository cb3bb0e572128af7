"""Query by image across models: `Searcher` for Python callers, `python -m searcher` for people."""

from searcher.api import Searcher
from searcher.errors import ModelNotIndexed, NoIndexedModels, QueryError
from searcher.fusion import RRF_K, reciprocal_rank_fusion
from searcher.results import FusedHit, ModelResult, RankedHit, SearchResult

__all__ = [
    "RRF_K", "FusedHit", "ModelNotIndexed", "ModelResult", "NoIndexedModels", "QueryError",
    "RankedHit", "SearchResult", "Searcher", "reciprocal_rank_fusion",
]
