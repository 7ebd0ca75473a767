"""Brute-force transferability scorers, used as baselines for zooselect.

Each scorer is a pure function ``(features, labels) -> float`` in the style of
``tllib.ranking``:

- ``features``: array of shape ``(n, k)``, one row of a candidate model's features per
  labelled task sample (any real dtype; computed in float64);
- ``labels``: integer array of shape ``(n,)`` with the class id of each sample (any
  integer values; only the classes present count, and there must be at least two);
- the result is a finite float, **higher = the model is predicted to transfer better**.

Scores are comparable between candidate models on the *same* task, not across tasks.
They need one forward pass of every candidate over the task data, which is exactly the
cost zooselect avoids; they are here to be compared against.

References (implemented from the published formulas):

- LogME: K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained
  Models for Transfer Learning", ICML 2021.
- H-score: Y. Bao, Y. Li, S.-L. Huang, L. Zhang, L. Zheng, A. Zamir, L. Guibas,
  "An Information-Theoretic Approach to Transferability in Task Transfer Learning",
  ICIP 2019.
- Regularised H-score: S. Ibrahim, N. Ponomareva, R. Mazumder, "Newer is not always
  better: Rethinking transferability metrics, their peculiarities, stability and
  performance", ECML-PKDD 2022 (shrinkage covariance estimated by Ledoit-Wolf).
- Ridge leave-one-out: the PRESS statistic (D. M. Allen, "The relationship between variable
  selection and data augmentation and a method for prediction", Technometrics 1974) of
  ridge regression onto one-hot labels, computed in closed form from the hat matrix, with
  the ridge chosen by the same leave-one-out error (G. H. Golub, M. Heath, G. Wahba,
  "Generalized cross-validation as a method for choosing a good ridge parameter",
  Technometrics 1979, on the leave-one-out form).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from selection.errors import DataError

logger = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray, np.ndarray], float]

# alpha and beta are kept inside this range so that a fixed point drifting to 0 or
# infinity (e.g. a target that the features fit exactly) never produces inf or nan.
_PARAM_MIN = 1e-100
_PARAM_MAX = 1e100
_TINY = 1e-300


ROUNDING_STEPS = 16  # a column whose values span at most this many rounding steps of its magnitude is constant


def _eps(feats: Any) -> float:
    """The relative rounding step of the precision `feats` was computed in (0 for integers: exact)."""
    dtype = getattr(feats, "dtype", None)
    if not isinstance(dtype, np.dtype):  # a list, or a torch tensor (torch.float32 is no numpy dtype)
        dtype = np.asarray(feats).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0


def rounding_constant(feats: np.ndarray, eps: float | None = None) -> np.ndarray:
    """Which columns of `feats` (n, k) are constant up to rounding: their range is at most ROUNDING_STEPS
    relative steps `eps` (default: of `feats`' own dtype; float32 for a model's features) of their
    largest magnitude. Relative to the column, so its scale never decides (an absolute cut left out
    every column of features around 1e-9); a range, so its offset does not either;
    in the features' own precision (float32 features constant but for one-ulp jitter between batches
    were taken for signal, and blown up to unit variance)."""
    eps = _eps(feats) if eps is None else eps
    return np.ptp(feats, axis=0) <= ROUNDING_STEPS * eps * np.abs(feats).max(axis=0)


def standardisation(feats: np.ndarray, eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std that standardise each column of `feats` (n, k). A column constant up to rounding
    (`rounding_constant`) keeps std 1: it stays about 0 instead of being blown up."""
    return feats.mean(axis=0), np.where(rounding_constant(feats, eps), 1.0, feats.std(axis=0))


def _is_number(value: object) -> bool:
    """A real number, not a bool (True is an int to Python)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_number(name: str, value: object, low: float, high: float) -> float:
    """`value` as a float in [low, high]; ValueError naming it otherwise (a string, a bool, NaN)."""
    if not _is_number(value) or not low <= float(value) <= high:
        raise ValueError(f"{name} should be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _check_inputs(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate a scorer's inputs.

    Returns ``(F, y, c)``: features as a float64 ``(n, k)`` array, labels re-coded as
    class indices ``0..c-1`` of shape ``(n,)``, and the number of classes ``c``.
    """
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise DataError(f"features should be 2-d (n, k), got shape {features.shape}")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise DataError(f"features should be a real numeric array, got dtype {features.dtype}")
    n, k = features.shape
    if n < 2 or k < 1:
        raise DataError(f"features need at least 2 samples and 1 feature, got shape {features.shape}")
    if labels.ndim != 1:
        raise DataError(f"labels should be 1-d (n,), got shape {labels.shape}")
    if labels.shape[0] != n:
        raise DataError(
            f"labels and features should have the same number of samples, "
            f"got {labels.shape[0]} labels for features of shape {features.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels should be integer class ids, got dtype {labels.dtype}")
    feats = features.astype(np.float64, copy=False)
    bad = int(np.size(feats) - np.count_nonzero(np.isfinite(feats)))
    if bad:
        raise DataError(
            f"features should be finite, got {bad} non-finite values (nan or inf) in shape {features.shape}"
        )
    classes, y = np.unique(labels, return_inverse=True)
    if classes.size < 2:
        raise DataError(f"labels should contain at least 2 classes, got {classes.size} ({classes.tolist()})")
    return feats, y.reshape(-1), int(classes.size)


# ----------------------------------------------------------------------------- LogME


def _log_evidence_svd(
    s2: np.ndarray, z: np.ndarray, out_norm2: np.ndarray, n: int, k: int, alpha: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """Log evidence of Bayesian linear regression for several targets at once.

    ``F = U diag(s) Vᵀ`` (thin SVD, r = min(n, k) singular values); for each target
    column ``y``: ``z = Uᵀy`` and ``out_norm2 = ‖y‖² − ‖z‖²`` (the part of y outside the
    column space of F). Shapes: ``s2`` (r, 1), ``z`` (r, c), ``out_norm2``, ``alpha``,
    ``beta`` (c,). Returns the total (not per-sample) log evidence per target, shape (c,):

        L = n/2 log β + k/2 log α − n/2 log 2π − β/2 ‖Fm − y‖² − α/2 mᵀm − 1/2 log|A|,
        A = αI + βFᵀF,  m = βA⁻¹Fᵀy.
    """
    t = alpha + beta * s2  # eigenvalues of A on the row space of F, (r, c)
    m_norm2 = np.sum((beta * np.sqrt(s2) * z / t) ** 2, axis=0)
    res_norm2 = out_norm2 + np.sum((alpha * z / t) ** 2, axis=0)
    r = s2.shape[0]
    logdet_a = np.sum(np.log(t), axis=0) + (k - r) * np.log(alpha)
    return (
        0.5 * n * np.log(beta)
        + 0.5 * k * np.log(alpha)
        - 0.5 * n * np.log(2.0 * np.pi)
        - 0.5 * beta * res_norm2
        - 0.5 * alpha * m_norm2
        - 0.5 * logdet_a
    )


def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 1000, tol: float = 1e-12) -> float:
    """LogME score (You et al., ICML 2021) of ``features`` for a classification task.

    Args:
        features: ``(n, k)`` features of the task samples, used as is (no centring,
            as in the paper).
        labels: ``(n,)`` integer class ids.
        max_iter: most fixed-point iterations per class.
        tol: stop when no class's per-sample log evidence changes by more than this
            in one iteration.

    For every class c, the target is the one-hot column ``y_c`` and the model is the
    Bayesian linear regression ``y = Fw + ε``, ``w ~ N(0, α⁻¹I)``, ``ε ~ N(0, β⁻¹I)``.
    The log evidence ``log p(y_c | F, α, β)`` is maximised over ``α, β`` by MacKay's
    fixed-point iteration from ``α = β = 1``, computed on the SVD of ``F`` (so ``n < k``
    and ``n > k`` are both fine)::

        γ = Σᵢ βσᵢ² / (α + βσᵢ²),   α ← γ / mᵀm,   β ← (n − γ) / ‖Fm − y‖².

    The evidence can have two maxima: with features far from the origin, or one dominant channel,
    one uses that direction alone (the value of constant features) and the iteration from α = β = 1
    (F at unit RMS) can stop there, as the published algorithm's start does. Kept as published: the
    higher maximum (a second start, tried in session 48) made brute-force LogME pick random-init
    models on few-shot tasks, an evidence of small directions fitting fewer images than features.

    When the supremum lies at α → ∞ (useless features) or β → ∞ (features that fit the
    target exactly, possible when n <= k), the iteration approaches it slowly and the
    returned evidence is within about 1e-8 per sample of it. When the features also put two
    samples of a class on one vector (a class collapsed onto a point; with n <= k, any two),
    the evidence has no maximum (β → ∞ along their difference, where every target is 0): the
    value returned is where the iteration stops, high, and a near-copy scores high too. That is
    LogME's reading of a perfect fit; merging such samples (tried, session 35) scored a fully
    collapsed class, the best features there are, as one sample, so it was not kept. Jobs drop
    a task's repeated images before any scorer sees them.

    Returns:
        The mean over classes of the maximised log evidence divided by ``n`` (per-sample
        log evidence). Higher is better.
    """
    feats, y, c = _check_inputs(features, labels)
    if not _is_number(max_iter) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter should be an integer of at least 1, got {max_iter!r}")
    _check_number("tol", tol, 0.0, np.inf)
    n, k = feats.shape
    targets = np.zeros((n, c), dtype=np.float64)
    targets[np.arange(n), y] = 1.0

    # The maximised evidence does not depend on F's scale (α absorbs it): F at unit RMS, so that the
    # fixed point starts from α = β = 1 at the data's scale. Features around 1e-8 met a flat evidence
    # there, and the iteration stopped at once, at the value of useless features.
    rms = float(np.sqrt(np.mean(feats**2)))
    if rms > 0:
        feats = feats / rms
    u, s, _ = np.linalg.svd(feats, full_matrices=False)
    # Numerical rank: singular values at rounding level are zero (their directions then
    # count as outside the column space of F, and in the (k - r) log α term).
    rank = int(np.count_nonzero(s > s[0] * max(n, k) * np.finfo(np.float64).eps)) if s[0] > 0 else 0
    u, s = u[:, :rank], s[:rank]  # u (n, r), s (r,)
    s2 = (s**2)[:, None]
    z = u.T @ targets  # (r, c)
    # ‖y − UUᵀy‖² computed directly, not as ‖y‖² − ‖z‖², to keep it accurate near 0
    # (n <= k: F can fit y exactly and the fixed point pushes β up to the residual's precision).
    out_norm2 = np.sum((targets - u @ z) ** 2, axis=0)

    alpha = np.ones(c)
    beta = np.ones(c)
    evidence = _log_evidence_svd(s2, z, out_norm2, n, k, alpha, beta) / n
    for iteration in range(1, max_iter + 1):
        t = alpha + beta * s2
        gamma = np.sum(beta * s2 / t, axis=0)
        m_norm2 = np.sum((beta * np.sqrt(s2) * z / t) ** 2, axis=0)
        res_norm2 = out_norm2 + np.sum((alpha * z / t) ** 2, axis=0)
        alpha = np.clip(gamma / np.maximum(m_norm2, _TINY), _PARAM_MIN, _PARAM_MAX)
        beta = np.clip((n - gamma) / np.maximum(res_norm2, _TINY), _PARAM_MIN, _PARAM_MAX)
        previous, evidence = evidence, _log_evidence_svd(s2, z, out_norm2, n, k, alpha, beta) / n
        change = float(np.max(np.abs(evidence - previous)))
        if change < tol:
            break
    else:
        logger.debug("LogME fixed point not converged after %d iterations (last change %.3g)", max_iter, change)
    logger.debug("LogME: n=%d k=%d classes=%d iterations=%d evidence=%s", n, k, c, iteration, evidence)
    return float(np.mean(evidence))


# --------------------------------------------------------------------------- H-score


def _centred_svd(feats: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The centred features and their thin SVD: ``(X (n, k), U (n, r), s (r,))``, r = min(n, k).

    The biased covariance is ``cov(f) = XᵀX/n = V diag(s²/n) Vᵀ``; working from ``U`` and ``s``
    costs O(n k r) and never forms the ``(k, k)`` covariance, which matters when k >> n. A column
    constant up to rounding (`rounding_constant`, steps `eps`) is exactly 0 once centred: its leftover
    rounding was a direction of its own, kept by the pseudo-inverse (constant features scored the
    maximum H-score on binary tasks).
    """
    centred = feats - feats.mean(axis=0)
    centred[:, rounding_constant(feats, eps)] = 0.0
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return centred, u, s


def _class_energy(u: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """``‖P uⱼ‖²`` for every column j of ``u``, P replacing each entry by its class mean."""
    sums = np.zeros((c, u.shape[1]))
    np.add.at(sums, y, u)
    return np.sum(sums**2 / np.bincount(y, minlength=c)[:, None], axis=0)


def _pinv_trace(u: np.ndarray, s: np.ndarray, y: np.ndarray, c: int, rtol: float) -> float:
    """``tr(cov(f)⁺ cov(E[f | y]))`` from the centred SVD, directions with ``sⱼ² ≤ rtol s₀²`` dropped."""
    rtol = _check_number("rtol", rtol, 0.0, 1.0)  # before the constant case: a bad rtol is refused always
    if s.size == 0 or s[0] <= 0.0:
        return 0.0  # constant features: no variance to explain anything
    keep = s**2 > rtol * s[0] ** 2
    return float(np.sum(_class_energy(u[:, keep], y, c)))


def hscore(features: np.ndarray, labels: np.ndarray, *, rtol: float = 1e-10) -> float:
    """H-score (Bao et al., 2019): ``tr(cov(f)⁺ cov(E[f | y]))``.

    Args:
        features: ``(n, k)`` features of the task samples.
        labels: ``(n,)`` integer class ids.
        rtol: eigenvalues of ``cov(f)`` below ``rtol`` times the largest are treated as
            zero by the pseudo-inverse (so redundant or constant features add nothing).

    ``cov(f)`` is the ``(k, k)`` covariance of the features, ``E[f | y]`` replaces each
    sample's features by its class mean. Invariant to translation and to an invertible
    linear map of the features whose condition number stays below about ``rtol^-1/2`` (1e5:
    directions of less variance are dropped as rounding); between 0 and ``min(k, c − 1)``.
    Higher is better.

    Computed from the centred features' SVD ``U diag(s) Vᵀ``: ``cov(E[f | y])`` is
    ``(PX)ᵀ(PX)/n`` with P the class-mean projection, so the trace is ``Σⱼ ‖P uⱼ‖²`` over
    the kept singular directions.
    """
    feats, y, c = _check_inputs(features, labels)
    _, u, s = _centred_svd(feats, _eps(features))
    return _pinv_trace(u, s, y, c, rtol)


def _ledoit_wolf(centred: np.ndarray, s: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage of centred rows ``(n, k)`` with singular values ``s``."""
    n, k = centred.shape
    eig = s**2 / n  # the covariance's non-zero eigenvalues (the others are 0)
    mu = np.sum(eig) / k
    cov_norm2 = np.sum(eig**2)  # ‖S‖²_F
    delta2 = cov_norm2 - k * mu**2  # ‖S − μI‖²_F
    if delta2 <= 0.0:
        return 0.0
    row_norm2 = np.sum(centred**2, axis=1)
    b2 = (np.sum(row_norm2**2) - n * cov_norm2) / n**2
    return float(min(max(b2, 0.0), delta2) / delta2)


def ledoit_wolf_shrinkage(features: np.ndarray) -> float:
    """Ledoit-Wolf (2004) optimal shrinkage intensity in ``[0, 1]`` for ``features (n, k)``.

    With ``S`` the biased covariance, ``μ = tr(S)/k`` and centred rows ``xᵢ``:
    ``δ² = ‖S − μI‖²_F``, ``b² = min(δ², Σᵢ ‖xᵢxᵢᵀ − S‖²_F / n²)``, shrinkage ``b²/δ²``
    (0 when ``δ² = 0``, i.e. S is already a multiple of the identity).
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 1:
        raise DataError(f"features should be 2-d (n, k) with n >= 1, got shape {feats.shape}")
    centred = feats - feats.mean(axis=0)
    return _ledoit_wolf(centred, np.linalg.svd(centred, compute_uv=False))


def regularized_hscore(
    features: np.ndarray, labels: np.ndarray, *, shrinkage: float | None = None, rtol: float = 1e-10
) -> float:
    """Shrinkage-regularised H-score (Ibrahim et al., 2022).

    Args:
        features: ``(n, k)`` features of the task samples.
        labels: ``(n,)`` integer class ids.
        shrinkage: ``α`` in ``[0, 1]``; ``None`` (default) estimates it by Ledoit-Wolf.
        rtol: pseudo-inverse tolerance, as in :func:`hscore` (only matters when ``α = 0``).

    Score: ``tr(Σ_α⁻¹ (1 − α) cov(E[f | y]))`` with the shrunk covariance
    ``Σ_α = (1 − α) cov(f) + α (tr cov(f) / k) I``. With ``α = 0`` it is :func:`hscore`.
    More stable than the plain H-score when ``n`` is small relative to ``k``. Higher is better.
    ``cov(E[f | y])`` lives in the span of the singular directions, where ``Σ_α`` has the
    eigenvalues ``(1 − α) sⱼ²/n + αμ``: the score is ``Σⱼ (1 − α) sⱼ² ‖P uⱼ‖² / ((1 − α) sⱼ² + nαμ)``.
    """
    feats, y, c = _check_inputs(features, labels)
    if shrinkage is not None:
        shrinkage = _check_number("shrinkage", shrinkage, 0.0, 1.0)
    n, k = feats.shape
    centred, u, s = _centred_svd(feats, _eps(features))
    alpha = _ledoit_wolf(centred, s) if shrinkage is None else float(shrinkage)
    logger.debug("regularized H-score: shrinkage=%.4g", alpha)
    if alpha == 0.0 or s[0] <= 0.0:
        return _pinv_trace(u, s, y, c, rtol)
    signal = (1.0 - alpha) * s**2
    mu = np.sum(s**2) / (n * k)
    return float(np.sum(signal * _class_energy(u, y, c) / (signal + n * alpha * mu)))


# ----------------------------------------------------------------------- ridge LOO

RIDGE_GRID = tuple(10.0 ** (np.arange(-8, 9) / 2.0))
"""Ridge penalties tried by :func:`ridge_loo`, relative to the mean eigenvalue of the Gram matrix."""


def ridge_loo(features: np.ndarray, labels: np.ndarray, *, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """Negative leave-one-out squared error of a ridge probe onto one-hot labels (closed form).

    Args:
        features: ``(n, k)`` features of the task samples.
        labels: ``(n,)`` integer class ids.
        grid: ridge penalties to try, as multiples of ``μ = tr(XXᵀ)/n`` (the mean eigenvalue
            of the Gram matrix of the standardised features X).

    The features are standardised over the n samples (mean 0, std 1), as the linear-probe
    protocol (selection.linear_probe) does. For each penalty ``λ = g μ`` the probe is
    ridge regression of the one-hot targets Y on X with an unpenalised intercept. It is a
    linear smoother ``Ŷ = HY`` with ``H = 11ᵀ/n + U diag(s²/(s² + λ)) Uᵀ`` (``X = U diag(s) Vᵀ``,
    thin SVD), so each sample's leave-one-out residual is exact without refitting:
    ``(yᵢ − ŷᵢ) / (1 − hᵢᵢ)``. The score is ``−min over λ of (1/n) Σᵢ ‖yᵢ − ŷᵢ‖² / (1 − hᵢᵢ)²``:
    the prediction error on unseen samples of the best ridge probe, in ``(−∞, 0]``. Higher is
    better. Cost: one SVD of an ``(n, k)`` matrix, then O(n r c) per penalty.
    """
    feats, y, c = _check_inputs(features, labels)
    if not isinstance(grid, (list, tuple, np.ndarray)) or not len(grid) or not all(_is_number(g) and 0 < g < np.inf
                                                                                    for g in grid):
        raise ValueError(f"grid should be positive finite ridge multiples, got {grid}")
    n = feats.shape[0]
    mean, sd = standardisation(feats, _eps(features))
    x = (feats - mean) / sd
    targets = np.zeros((n, c))
    targets[np.arange(n), y] = 1.0
    centred = targets - targets.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    s2 = s**2
    mu = float(s2.sum()) / n
    z = u.T @ centred  # (r, c)
    best, best_g = -np.inf, None
    for g in grid:
        f = s2 / (s2 + g * mu) if mu > 0 else np.zeros_like(s2)
        resid = centred - u @ (f[:, None] * z)
        lev = 1.0 / n + np.einsum("ij,j,ij->i", u, f, u)
        press = float(np.mean(np.sum(resid**2, axis=1) / np.maximum(1.0 - lev, 1e-12) ** 2))
        if -press > best:
            best, best_g = -press, g
    logger.debug("ridge LOO: n=%d k=%d classes=%d penalty %.3g x mean eigenvalue, score %.6g",
                 n, feats.shape[1], c, best_g, best)
    return best


SCORERS: dict[str, Scorer] = {
    "logme": logme,
    "hscore": hscore,
    "regularized_hscore": regularized_hscore,
    "ridge-loo": ridge_loo,
}
"""Scorers by name, for benchmarks and the CLI."""
