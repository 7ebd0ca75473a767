"""Selection-quality metrics: how well a score ranks candidate models against the truth.

Every metric takes two 1-d arrays of the same length ``m`` (one entry per candidate
model, ``m >= 2``, all finite):

- ``scores``: what a selection method predicts (higher = predicted better);
- ``truth``: the measured quality of each candidate on the task, e.g. linear-probe test
  accuracy (higher = better).

Ties in ``scores`` are broken by the lowest index (the candidate listed first wins), so
every metric is deterministic; ``expected_best_of_top_k`` instead counts tied candidates as
ordered at random, in expectation (what a scorer that ties says about its pick).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import gammaln

logger = logging.getLogger(__name__)


def _check_vector(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} should be 1-d (m,), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} should be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.size < 2:
        raise ValueError(f"{name} should have at least 2 items, got {arr.size}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} should be finite, got {arr[bad[0]]} at index {int(bad[0])} ({bad.size} non-finite)")
    return arr


def _check_pair(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = _check_vector(scores, "scores")
    t = _check_vector(truth, "truth")
    if s.shape != t.shape:
        raise ValueError(f"scores and truth should have the same length, got {s.size} scores and {t.size} truth values")
    return s, t


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k should be a positive integer, got {k!r}")
    return int(k)


def _ranking(scores: np.ndarray) -> np.ndarray:
    """Indices sorted by decreasing score; equal scores keep index order (lowest first)."""
    return np.argsort(-scores, kind="stable")


def weighted_tau(scores: np.ndarray, truth: np.ndarray) -> float:
    """Weighted Kendall τ between ``scores (m,)`` and ``truth (m,)``, in ``[-1, 1]``.

    ``scipy.stats.weightedtau`` with its defaults (hyperbolic weight ``1/(r + 1)`` on
    rank ``r``, ranks by decreasing value, averaged over ranking by either array), so
    disagreements among the top-ranked models weigh more — the measure of the SFDA and
    Model Spider papers. Returns ``nan`` when either array is constant (τ undefined).
    """
    s, t = _check_pair(scores, truth)
    if np.all(s == s[0]) or np.all(t == t[0]):
        logger.debug("weighted_tau undefined for constant input; returning nan")
        return float("nan")
    return float(stats.weightedtau(s, t).statistic)


def top1_gap(scores: np.ndarray, truth: np.ndarray) -> float:
    """Best truth minus the truth of the top-scored model, ``>= 0``, in truth's units.

    Shapes ``(m,)``. With accuracy in points it is the paper's top-1 gap. Ties in
    ``scores`` pick the lowest index.
    """
    s, t = _check_pair(scores, truth)
    return float(t.max() - t[int(np.argmax(s))])  # argmax returns the first maximum


def rel_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Best truth among the ``k`` top-scored models divided by the best truth overall.

    Shapes ``(m,)``; in ``(−inf, 1]``, 1 when the best model is among the top ``k``.
    ``k > m`` is treated as ``k = m``. Ties in ``scores`` are broken by the lowest index.
    Needs ``max(truth) > 0`` (e.g. accuracies).
    """
    s, t = _check_pair(scores, truth)
    k = _check_k(k)
    best = t.max()
    if best <= 0:
        raise ValueError(f"rel_at_k needs a positive best truth value, got max(truth) = {best}")
    return float(t[_ranking(s)[:k]].max() / best)


def expected_best_of_top_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """The expected best ``truth`` among the ``k`` top-scored models when equal scores are ordered at
    random (every order of a tie equally likely), not by index: what a scorer that ties says about
    its pick. Without ties it is ``truth[top k].max()``. ``top1_gap`` and ``rel_at_k`` follow from it
    (``truth.max() - expected_best_of_top_k(s, t, 1)``, ``expected_best_of_top_k(s, t, k) / truth.max()``).
    """
    s, t = _check_pair(scores, truth)
    k = min(_check_k(k), s.size)
    order = _ranking(s)
    boundary = s[order[k - 1]]  # the score of the k-th place: its tie group is drawn from at random
    sure = t[s > boundary]
    group = np.sort(t[s == boundary])[::-1]  # g_1 >= g_2 >= ...
    n, j = group.size, k - sure.size  # j of the group's n models are in the top k
    # P(the best of a random j-subset is g_i) = C(n - i, j - 1) / C(n, j), i = 1..n
    i = np.arange(1, n + 1)
    ok = n - i >= j - 1
    logp = np.full(n, -np.inf)
    logp[ok] = (gammaln(n - i[ok] + 1) - gammaln(j) - gammaln(n - i[ok] - j + 2)) - \
        (gammaln(n + 1) - gammaln(j + 1) - gammaln(n - j + 1))
    floor = sure.max() if sure.size else -np.inf
    return float(np.sum(np.exp(logp) * np.maximum(group, floor)))


@dataclass(frozen=True)
class RandomChoice:
    """Expected selection quality of picking candidates uniformly at random.

    ``top1_gap``: expected best-truth-minus-chosen; ``rel_at_1``: expected
    chosen/best; ``rel_at_k``: expected best-of-``k`` random candidates / best.
    """

    top1_gap: float
    rel_at_1: float
    rel_at_k: float
    k: int


def random_choice_expected(truth: np.ndarray, k: int = 3) -> RandomChoice:
    """Expected top-1 gap, rel@1 and rel@k of a uniformly random choice, for ``truth (m,)``.

    One model picked uniformly: gap ``max − mean``, rel@1 ``mean / max``. ``k`` distinct
    models picked uniformly (``k > m`` treated as ``m``): with truth sorted ascending
    ``t₁ ≤ … ≤ t_m``, the best of the k is ``tᵢ`` with probability
    ``C(i−1, k−1) / C(m, k)``. Needs ``max(truth) > 0``.
    """
    t = _check_vector(truth, "truth")
    k = min(_check_k(k), t.size)
    best = t.max()
    if best <= 0:
        raise ValueError(f"random_choice_expected needs a positive best truth value, got max(truth) = {best}")
    m = t.size
    ranks = np.arange(1, m + 1)
    # P(best of k is the i-th smallest) = C(i-1, k-1) / C(m, k), zero for i < k
    log_p = (
        gammaln(ranks) - gammaln(k) - gammaln(np.maximum(ranks - k + 1, 1))
        - (gammaln(m + 1) - gammaln(k + 1) - gammaln(m - k + 1))
    )
    p = np.where(ranks >= k, np.exp(log_p), 0.0)
    expected_best_of_k = float(np.sum(p * np.sort(t)))
    mean = float(t.mean())
    return RandomChoice(
        top1_gap=float(best - mean), rel_at_1=float(mean / best), rel_at_k=float(expected_best_of_k / best), k=k
    )
