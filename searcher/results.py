"""Typed search results: per-model ranked hits and the fused ranking across models."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankedHit:
    """One indexed file found for a query by one model; score is cosine similarity."""

    rank: int
    score: float
    path: str
    id: int


@dataclass(frozen=True)
class ModelResult:
    """The ranked hits of one model for one query.

    `left_out` counts results dropped because their file no longer exists on disk (or its
    mapping is gone), so a person can see that the index lags behind the folders.
    """

    model: str
    version: str
    metric: str
    hits: tuple[RankedHit, ...]
    left_out: int = 0
    reused_vector: bool = False


@dataclass(frozen=True)
class FusedHit:
    """One file of the fused ranking with the rank each model gave it (absent: not ranked)."""

    rank: int
    path: str
    score: float
    model_ranks: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """Everything one query returned: per model, and fused when more than one model ran."""

    query: str
    k: int
    models: tuple[ModelResult, ...]
    fused: tuple[FusedHit, ...] = ()

    def model(self, name: str) -> ModelResult:
        for result in self.models:
            if result.model == name:
                return result
        raise KeyError(name)
