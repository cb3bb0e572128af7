"""Reciprocal rank fusion on constructed rankings (no services needed)."""

from __future__ import annotations

import pytest

from searcher.fusion import RRF_K, reciprocal_rank_fusion


def test_group_mates_ranked_1_3_and_2_4_fill_the_fused_top_4() -> None:
    # Model a ranks the three mates 1-3; model b puts a stranger first and the mates 2-4.
    # The stranger is also 4th for model a, its best possible case.
    rankings = {
        "a": ["mate1", "mate2", "mate3", "stranger", "x1", "x2"],
        "b": ["stranger", "mate1", "mate2", "mate3", "y1", "y2"],
    }

    fused = reciprocal_rank_fusion(rankings)

    top4 = [hit.path for hit in fused[:4]]
    assert {"mate1", "mate2", "mate3"} <= set(top4)
    assert top4[0] == "mate1"


def test_scores_are_reciprocal_ranks_with_k_60_and_ranks_are_kept() -> None:
    fused = reciprocal_rank_fusion({"a": ["p", "q"], "b": ["q"]})

    by_path = {hit.path: hit for hit in fused}
    assert RRF_K == 60
    assert by_path["q"].score == pytest.approx(1 / 62 + 1 / 61)
    assert by_path["p"].score == pytest.approx(1 / 61)
    assert by_path["q"].model_ranks == {"a": 2, "b": 1}
    assert by_path["p"].model_ranks == {"a": 1}
    assert [hit.rank for hit in fused] == [1, 2]
    assert fused[0].path == "q"


def test_ties_break_on_best_single_rank_then_path() -> None:
    # "z" and "y" mirror each other (1/61 + 1/63 each) and beat "m" (2nd twice, 2/62).
    fused = reciprocal_rank_fusion({"a": ["z", "m", "y"], "b": ["y", "m", "z"]})

    assert [hit.path for hit in fused] == ["y", "z", "m"]


def test_limit_and_duplicates_within_one_ranking() -> None:
    fused = reciprocal_rank_fusion({"a": ["p", "p", "q", "r"]}, limit=2)

    assert [hit.path for hit in fused] == ["p", "q"]
    assert fused[0].model_ranks == {"a": 1}
    assert fused[1].model_ranks == {"a": 3}


def test_no_rankings_give_an_empty_fusion() -> None:
    assert reciprocal_rank_fusion({}) == []
    assert reciprocal_rank_fusion({"a": [], "b": []}) == []
