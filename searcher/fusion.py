"""Reciprocal rank fusion: one ranking from several models' rankings, without their scores.

Cosine scores of different models live on different scales (one model's 0.8 may be
another's 0.5), so only ranks are combined: score(file) = sum over models of
1 / (RRF_K + rank). RRF_K = 60 is the constant of Cormack, Clarke and Buettcher (2009);
it damps the weight of the very first ranks so that agreement between models counts more
than a single model's top pick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from searcher.results import FusedHit

RRF_K = 60


def reciprocal_rank_fusion(
    rankings: Mapping[str, Sequence[str]], *, k_constant: int = RRF_K, limit: int | None = None
) -> list[FusedHit]:
    """Fuse per-model rankings of paths (best first) into one list of FusedHit, best first.

    Ties are broken by the best single-model rank, then by path, so output is deterministic.
    """
    ranks = _ranks_by_path(rankings)

    scored = [
        (sum(1.0 / (k_constant + rank) for rank in per_model.values()), path, per_model)
        for path, per_model in ranks.items()
    ]
    scored.sort(key=lambda item: (-item[0], min(item[2].values()), item[1]))

    chosen = scored if limit is None else scored[:limit]
    return [
        FusedHit(rank=position, path=path, score=score, model_ranks=per_model)
        for position, (score, path, per_model) in enumerate(chosen, start=1)
    ]


def _ranks_by_path(rankings: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """path -> {model: 1-based rank}; a path listed twice by one model keeps its best rank."""
    ranks: dict[str, dict[str, int]] = {}
    for model, paths in rankings.items():
        for rank, path in enumerate(paths, start=1):
            ranks.setdefault(path, {}).setdefault(model, rank)
    return ranks
