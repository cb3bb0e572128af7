"""Retrieval metrics for a set with ground-truth groups (UKBench and the like).

The query itself is in the index. The UKBench (N-S) score counts it, as the benchmark
defines; mean average precision and recall@1 leave it out, so they measure how well the
*other* views of the object are found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Scores:
    queries: int
    ukbench: float  # mean number of group members in the top 4, query included (best 4.0)
    mean_ap: float  # mean average precision over the other group members
    recall_at_1: float  # share of queries whose best other result is a group member

    def as_dict(self) -> dict[str, float]:
        return {"queries": self.queries, "ukbench_score": round(self.ukbench, 4),
                "mAP": round(self.mean_ap, 4), "recall@1": round(self.recall_at_1, 4)}


def ukbench_hits(query: str, ranking: Sequence[str], group_of: dict[str, int]) -> int:
    group = group_of[query]
    return sum(1 for name in ranking[:4] if group_of.get(name) == group)


def average_precision(query: str, ranking: Sequence[str], group_of: dict[str, int]) -> float:
    """AP over the query's group mates; mates missing from the ranking count as not found."""
    group = group_of[query]
    relevant = sum(1 for name, g in group_of.items() if g == group and name != query)
    if relevant == 0:
        return 0.0
    found, precision_sum = 0, 0.0
    others = [name for name in ranking if name != query]
    for position, name in enumerate(others, start=1):
        if group_of.get(name) == group:
            found += 1
            precision_sum += found / position
    return precision_sum / relevant


def first_other_is_mate(query: str, ranking: Sequence[str], group_of: dict[str, int]) -> bool:
    others = [name for name in ranking if name != query]
    return bool(others) and group_of.get(others[0]) == group_of[query]


def score_rankings(rankings: dict[str, Sequence[str]], group_of: dict[str, int]) -> Scores:
    """`rankings`: query name -> result names, best first."""
    count = len(rankings)
    if count == 0:
        return Scores(0, 0.0, 0.0, 0.0)
    return Scores(
        queries=count,
        ukbench=sum(ukbench_hits(q, r, group_of) for q, r in rankings.items()) / count,
        mean_ap=sum(average_precision(q, r, group_of) for q, r in rankings.items()) / count,
        recall_at_1=sum(first_other_is_mate(q, r, group_of) for q, r in rankings.items())
        / count,
    )
