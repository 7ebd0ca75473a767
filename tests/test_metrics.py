"""Selection-quality metrics, checked on hand-computed examples and by enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from selection.metrics import RandomChoice, random_choice_expected, rel_at_k, top1_gap, weighted_tau

TRUTH = np.array([70.0, 90.0, 60.0, 85.0, 40.0])  # accuracies in points; best is index 1


def test_weighted_tau_wraps_scipy_and_weighs_the_top_more() -> None:
    assert weighted_tau(TRUTH, TRUTH) == pytest.approx(1.0)
    assert weighted_tau(-TRUTH, TRUTH) == pytest.approx(-1.0)
    scores = np.array([0.3, 0.1, 0.5, 0.2, 0.9])
    assert weighted_tau(scores, TRUTH) == pytest.approx(stats.weightedtau(scores, TRUTH).statistic)
    # one swap among the two best models costs more than one swap among the two worst
    order = np.argsort(-TRUTH)  # 1, 3, 0, 2, 4
    ranks = np.empty(5)
    ranks[order] = np.arange(5, 0, -1)
    swap_top, swap_bottom = ranks.copy(), ranks.copy()
    swap_top[[order[0], order[1]]] = swap_top[[order[1], order[0]]]
    swap_bottom[[order[3], order[4]]] = swap_bottom[[order[4], order[3]]]
    assert weighted_tau(swap_top, TRUTH) < weighted_tau(swap_bottom, TRUTH) < 1.0
    # unweighted Kendall tau cannot tell the two apart
    assert stats.kendalltau(swap_top, TRUTH).statistic == pytest.approx(stats.kendalltau(swap_bottom, TRUTH).statistic)


def test_weighted_tau_is_nan_for_constant_input() -> None:
    assert np.isnan(weighted_tau(np.ones(5), TRUTH))
    assert np.isnan(weighted_tau(TRUTH, np.full(5, 50.0)))


def test_top1_gap_in_units_of_truth() -> None:
    assert top1_gap(TRUTH, TRUTH) == 0.0
    assert top1_gap(np.array([0.9, 0.1, 0.2, 0.3, 0.4]), TRUTH) == pytest.approx(20.0)  # picks 70
    assert top1_gap(np.array([0, 0, 0, 0, 1.0]), TRUTH) == pytest.approx(50.0)  # picks 40
    assert top1_gap(np.array([0, 0, 0, 0, 1.0]), TRUTH / 100) == pytest.approx(0.5)


def test_top1_gap_breaks_score_ties_by_lowest_index() -> None:
    assert top1_gap(np.array([1.0, 1.0, 0, 0, 0]), TRUTH) == pytest.approx(20.0)  # index 0, not 1
    assert top1_gap(np.array([0, 1.0, 0, 1.0, 0]), TRUTH) == 0.0  # index 1
    assert top1_gap(np.zeros(5), TRUTH) == pytest.approx(20.0)


def test_rel_at_k() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7])  # ranking: 0 (70), 2 (60), 4 (40), 3 (85), 1 (90)
    assert rel_at_k(scores, TRUTH, 1) == pytest.approx(70 / 90)
    assert rel_at_k(scores, TRUTH, 3) == pytest.approx(70 / 90)
    assert rel_at_k(scores, TRUTH, 4) == pytest.approx(85 / 90)
    assert rel_at_k(scores, TRUTH, 5) == 1.0
    assert rel_at_k(scores, TRUTH, 50) == 1.0  # k > m is k = m
    assert rel_at_k(TRUTH, TRUTH, 1) == 1.0
    # ties: index 1 (90) and 4 (40) tie for the top score; index 1 comes first
    assert rel_at_k(np.array([0, 1.0, 0, 0, 1.0]), TRUTH, 1) == 1.0
    assert rel_at_k(np.array([0, 0, 0, 1.0, 1.0]), TRUTH, 1) == pytest.approx(85 / 90)


def test_rel_at_k_tie_breaking_holds_for_long_inputs() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, 60).astype(float)  # many ties
    truth = np.linspace(1, 2, 60)  # increasing: the top-k set is visible in the result
    for k in range(1, 16):
        top = [i for i in range(60) if scores[i] == 2][:k]  # ties: lowest indices first
        assert rel_at_k(scores, truth, k) == truth[top].max() / truth.max()


def test_rel_at_1_agrees_with_top1_gap() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, truth = rng.normal(size=7), rng.uniform(10, 90, size=7)
        assert rel_at_k(scores, truth, 1) == pytest.approx(1 - top1_gap(scores, truth) / truth.max())


def test_random_choice_expected_matches_enumeration() -> None:
    for k in (1, 2, 3, 5):
        subsets = list(itertools.combinations(range(5), k))
        want = np.mean([TRUTH[list(s)].max() for s in subsets]) / TRUTH.max()
        got = random_choice_expected(TRUTH, k=k)
        assert got.rel_at_k == pytest.approx(want, rel=1e-12)
        assert got.k == k
    got = random_choice_expected(TRUTH)
    assert isinstance(got, RandomChoice) and got.k == 3
    assert got.top1_gap == pytest.approx(90 - TRUTH.mean())
    assert got.rel_at_1 == pytest.approx(TRUTH.mean() / 90)
    # the same as averaging the metrics over every possible single choice
    picks = np.eye(5)
    assert got.top1_gap == pytest.approx(np.mean([top1_gap(p, TRUTH) for p in picks]))
    assert got.rel_at_1 == pytest.approx(np.mean([rel_at_k(p, TRUTH, 1) for p in picks]))
    assert random_choice_expected(TRUTH, k=9).rel_at_k == 1.0


def test_metrics_are_deterministic_and_accept_lists() -> None:
    scores = [0.3, 0.1, 0.5, 0.2, 0.9]
    assert weighted_tau(scores, list(TRUTH)) == weighted_tau(np.array(scores), TRUTH)
    assert top1_gap(scores, list(TRUTH)) == top1_gap(np.array(scores), TRUTH)


@pytest.mark.parametrize(
    "scores,truth,message",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "got 3 scores and 2 truth values"),
        ([1.0], [1.0], "scores should have at least 2 items, got 1"),
        ([1.0, np.nan], [1.0, 2.0], "scores should be finite, got nan at index 1"),
        ([1.0, 2.0], [np.inf, 2.0], "truth should be finite, got inf at index 0"),
        ([[1.0, 2.0]], [1.0, 2.0], r"scores should be 1-d \(m,\), got shape \(1, 2\)"),
        (["a", "b"], [1.0, 2.0], "scores should be real numbers, got dtype <U1"),
    ],
)
def test_metrics_reject_bad_input_with_what_was_received(scores, truth, message) -> None:
    for metric in (weighted_tau, top1_gap, lambda s, t: rel_at_k(s, t, 1)):
        with pytest.raises(ValueError, match=message):
            metric(scores, truth)


def test_rel_at_k_rejects_bad_k_and_nonpositive_truth() -> None:
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k should be a positive integer, got"):
            rel_at_k(TRUTH, TRUTH, k)
    with pytest.raises(ValueError, match=r"max\(truth\) = 0.0"):
        rel_at_k([1.0, 2.0], [0.0, -1.0], 1)
    with pytest.raises(ValueError, match=r"max\(truth\) = -1.0"):
        random_choice_expected([-2.0, -1.0])
    with pytest.raises(ValueError, match="truth should have at least 2 items, got 0"):
        random_choice_expected([])
