"""Retrieval metrics on hand-built rankings whose right values are worked out by hand."""

from __future__ import annotations

import pytest

from demo.metrics import average_precision, score_rankings, ukbench_hits

GROUPS = {"a0": 0, "a1": 0, "a2": 0, "a3": 0, "b0": 1, "b1": 1, "b2": 1, "b3": 1}


def test_perfect_ranking_scores_four_and_one() -> None:
    rankings = {"a0": ["a0", "a1", "a2", "a3", "b0"], "b2": ["b2", "b0", "b3", "b1"]}

    scores = score_rankings(rankings, GROUPS)

    assert scores.ukbench == 4.0
    assert scores.mean_ap == 1.0
    assert scores.recall_at_1 == 1.0


def test_interleaved_ranking_has_hand_computed_values() -> None:
    ranking = ["a0", "b0", "a1", "b1", "a2", "a3"]

    hits = ukbench_hits("a0", ranking, GROUPS)
    ap = average_precision("a0", ranking, GROUPS)
    scores = score_rankings({"a0": ranking}, GROUPS)

    # others: b0 a1 b1 a2 a3 -> mates at positions 2, 4, 5: (1/2 + 2/4 + 3/5) / 3
    assert hits == 2
    assert ap == pytest.approx((0.5 + 0.5 + 0.6) / 3)
    assert scores.recall_at_1 == 0.0


def test_missing_mates_count_as_not_found() -> None:
    ap = average_precision("a0", ["a0", "a1", "b0"], GROUPS)

    assert ap == pytest.approx(1 / 3)


def test_results_outside_the_evaluated_set_do_not_count() -> None:
    from demo.evaluate import names_in_set

    names = {"/r/set/a0": "a0", "/r/set/a1": "a1", "/r/set/b0": "b0"}
    results = ["/r/set/a0", "/r/dup/a0", "/r/dup/a1", "/r/set/b0", "/r/set/a1"]

    ranking = names_in_set(results, names)

    # Before, copies elsewhere were matched by file name and gave an mAP of 2.0.
    assert ranking == ["a0", "b0", "a1"]
    assert average_precision("a0", ranking, {"a0": 0, "a1": 0, "b0": 1}) == 0.5
