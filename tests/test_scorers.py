"""Brute-force scorers checked against the published formulas, computed independently."""

from __future__ import annotations

import numpy as np
import pytest

from selection.errors import ConfigError, DataError
from selection.scorers import (
    SCORERS,
    _log_evidence_svd,
    hscore,
    ledoit_wolf_shrinkage,
    logme,
    regularized_hscore,
    ridge_loo,
)


def _task(n: int, k: int, c: int, seed: int, signal: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Random features (n, k) and labels (n,) with every class present; ``signal`` adds a
    class-dependent offset to the first min(k, c) features."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    features = rng.normal(size=(n, k))
    j = min(k, c)
    features[:, :j] += signal * np.eye(c)[labels][:, :j]
    return features, labels


# ----------------------------------------------------------------------------- LogME


def explicit_log_evidence(f: np.ndarray, y: np.ndarray, alpha, beta) -> np.ndarray:
    """L = n/2 log β + k/2 log α − n/2 log 2π − β/2‖Fm − y‖² − α/2 mᵀm − 1/2 log|A|,
    A = αI + βFᵀF, m = βA⁻¹Fᵀy: the paper's formula with dense matrices, evaluated for
    every (α, β) pair of the broadcast arrays ``alpha`` and ``beta``."""
    n, k = f.shape
    alpha, beta = np.broadcast_arrays(np.asarray(alpha, dtype=float), np.asarray(beta, dtype=float))
    a_, b_ = alpha.reshape(-1, 1, 1), beta.reshape(-1, 1, 1)
    a = a_ * np.eye(k) + b_ * (f.T @ f)  # (p, k, k)
    m = b_[:, :, 0] * np.linalg.solve(a, np.broadcast_to(f.T @ y, (a.shape[0], k))[..., None])[..., 0]
    sign, logdet = np.linalg.slogdet(a)
    assert np.all(sign > 0)
    a_, b_ = alpha.reshape(-1), beta.reshape(-1)
    value = (
        n / 2 * np.log(b_)
        + k / 2 * np.log(a_)
        - n / 2 * np.log(2 * np.pi)
        - b_ / 2 * np.sum((m @ f.T - y) ** 2, axis=1)
        - a_ / 2 * np.sum(m**2, axis=1)
        - logdet / 2
    )
    return value.reshape(alpha.shape)


def brute_force_max_evidence(f: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Maximise the explicit log evidence over log10 α, log10 β in [lo, hi] by grid search,
    and over the closed-form limits on the boundary of the (α, β) quadrant.

    The evidence can be very flat along α, so a plain 2-d zoom can lose the optimum:
    for every α of a 0.1-decade grid, β is searched on a 0.1-decade grid and then on
    finer grids around each row's best; then the same for α 0.002 decades apart around
    the best α.
    """

    def profile(log_a: np.ndarray) -> np.ndarray:  # max over β, per α
        log_b = np.tile(np.arange(lo, hi + 1e-9, 0.1), (log_a.size, 1))
        for _ in range(3):
            values = explicit_log_evidence(f, y, 10 ** log_a[:, None], 10**log_b)
            best = log_b[np.arange(log_a.size), np.argmax(values, axis=1)]
            step = log_b[0, 1] - log_b[0, 0]
            log_b = np.clip(best[:, None] + np.linspace(-step, step, 21), lo, hi)
        return values.max(axis=1)

    coarse = np.arange(lo, hi + 1e-9, 0.1)
    values = profile(coarse)
    centre = coarse[np.argmax(values)]
    fine = np.clip(np.arange(centre - 0.1, centre + 0.1 + 1e-9, 0.002), lo, hi)
    candidates = [values.max(), profile(fine).max()]

    n, k = f.shape
    # α → ∞ (w = 0): y ~ N(0, β⁻¹I), best at β = n / ‖y‖².
    candidates.append(n / 2 * np.log(n / (y @ y)) - n / 2 * np.log(2 * np.pi) - n / 2)
    if n <= k and np.linalg.matrix_rank(f) == n:
        # β → ∞ (exact fit): y ~ N(0, α⁻¹FFᵀ), best at α = n / yᵀ(FFᵀ)⁻¹y.
        gram = f @ f.T
        q = y @ np.linalg.solve(gram, y)
        candidates.append(
            n / 2 * np.log(n / q) - n / 2 - n / 2 * np.log(2 * np.pi) - np.linalg.slogdet(gram)[1] / 2
        )
    return float(max(candidates))


@pytest.mark.parametrize("n,k", [(40, 6), (7, 12), (15, 15)])
def test_log_evidence_svd_matches_explicit_formula(n: int, k: int) -> None:
    f, labels = _task(n, k, c=3, seed=n + k, signal=1.0)
    targets = np.eye(3)[labels]
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    z = u.T @ targets
    out = np.sum(targets**2, axis=0) - np.sum(z**2, axis=0)
    for alpha, beta in [(0.3, 2.0), (5.0, 0.1), (1e-3, 40.0)]:
        got = _log_evidence_svd((s**2)[:, None], z, out, n, k, np.full(3, alpha), np.full(3, beta))
        want = [explicit_log_evidence(f, targets[:, c], alpha, beta) for c in range(3)]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize(
    "n,k,signal,lo,hi",
    [
        (60, 5, 1.5, -3.0, 7.0),  # n > k, informative: interior optimum
        (50, 8, 0.0, -3.0, 7.0),  # n > k, uninformative: very flat in alpha
        (12, 12, 0.5, -2.0, 6.0),  # n == k: some classes fit exactly (beta -> infinity)
        (8, 20, 1.0, -2.0, 6.0),  # n < k: likewise
    ],
)
def test_logme_fixed_point_reaches_brute_force_maximum(n: int, k: int, signal: float, lo: float, hi: float) -> None:
    f, labels = _task(n, k, c=3, seed=100 + n + k, signal=signal)
    targets = np.eye(3)[labels]
    brute = np.mean([brute_force_max_evidence(f, targets[:, c], lo, hi) for c in range(3)]) / n
    got = logme(f, labels)
    # The fixed point is at least as good as any grid point (up to its slow drift when the
    # optimum is at alpha or beta = infinity), and the grid gets close to it.
    assert got >= brute - 1e-8
    assert got == pytest.approx(brute, abs=1e-6)


def test_logme_prefers_features_that_separate_classes() -> None:
    random_f, labels = _task(300, 16, c=4, seed=1, signal=0.0)
    good_f, _ = _task(300, 16, c=4, seed=1, signal=3.0)
    weak_f, _ = _task(300, 16, c=4, seed=1, signal=0.7)
    assert logme(good_f, labels) > logme(weak_f, labels) > logme(random_f, labels)


def test_logme_invariances_and_determinism() -> None:
    f, labels = _task(80, 10, c=3, seed=2, signal=1.0)
    base = logme(f, labels)
    assert logme(f, labels) == base  # deterministic
    assert logme(f.astype(np.float32), labels) == pytest.approx(base, abs=1e-6)
    # evidence is unchanged by a global feature scale (alpha absorbs it), however small: from alpha =
    # beta = 1 the fixed point met a flat evidence at 1e-8 and stopped at once (a review, session 33) ...
    for scale in (7.5, 1e-4, 1e-8, 1e-12):
        assert logme(scale * f, labels) == pytest.approx(base, abs=1e-8)
    # ... by reordering samples, and by renaming classes
    perm = np.random.default_rng(0).permutation(80)
    assert logme(f[perm], labels[perm]) == pytest.approx(base, abs=1e-10)
    assert logme(f, np.array([10, -4, 7])[labels]) == pytest.approx(base, abs=1e-12)


def test_logme_is_finite_on_degenerate_features() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1])
    assert np.isfinite(logme(np.zeros((6, 3)), labels))
    # features that reproduce the one-hot target exactly
    assert np.isfinite(logme(np.eye(2)[labels], labels))
    assert logme(np.eye(2)[labels], labels) > logme(np.zeros((6, 3)), labels)


# --------------------------------------------------------------------------- H-score


def explicit_hscore(f: np.ndarray, labels: np.ndarray) -> float:
    """tr(cov(f)⁻¹ cov(E[f|y])) with explicit loops (1/n covariances) and a dense inverse."""
    n, k = f.shape
    mean = [sum(f[i, a] for i in range(n)) / n for a in range(k)]
    cov_f = np.zeros((k, k))
    for i in range(n):
        for a in range(k):
            for b in range(k):
                cov_f[a, b] += (f[i, a] - mean[a]) * (f[i, b] - mean[b]) / n
    class_mean = {}
    for c in set(labels.tolist()):
        rows = [i for i in range(n) if labels[i] == c]
        class_mean[c] = [sum(f[i, a] for i in rows) / len(rows) for a in range(k)]
    cov_g = np.zeros((k, k))
    for i in range(n):
        g = class_mean[int(labels[i])]
        for a in range(k):
            for b in range(k):
                cov_g[a, b] += (g[a] - mean[a]) * (g[b] - mean[b]) / n
    return float(np.trace(np.linalg.inv(cov_f) @ cov_g))


def test_hscore_hand_computed_example() -> None:
    # f = 0, 2, 4, 6; var f = (9 + 1 + 1 + 9) / 4 = 5; class means 1, 5 -> var E[f|y] = 4.
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert hscore(f, np.array([0, 0, 1, 1])) == pytest.approx(4 / 5, abs=1e-12)
    # labels interleaved: class means 2 and 4 -> var E[f|y] = 1.
    assert hscore(f, np.array([0, 1, 0, 1])) == pytest.approx(1 / 5, abs=1e-12)


@pytest.mark.parametrize("n,k,c", [(30, 3, 2), (25, 4, 5)])
def test_hscore_matches_explicit_loops(n: int, k: int, c: int) -> None:
    f, labels = _task(n, k, c, seed=n * k, signal=1.0)
    assert hscore(f, labels) == pytest.approx(explicit_hscore(f, labels), rel=1e-10)


def test_hscore_invariant_to_invertible_linear_maps_and_translation() -> None:
    f, labels = _task(100, 6, c=3, seed=3, signal=1.0)
    rng = np.random.default_rng(4)
    m = rng.normal(size=(6, 6))
    assert abs(np.linalg.det(m)) > 1e-2
    base = hscore(f, labels)
    assert hscore(f @ m + rng.normal(size=6), labels) == pytest.approx(base, rel=1e-8)
    assert hscore(f, labels) == base  # deterministic


def test_hscore_pseudo_inverse_ignores_redundant_features() -> None:
    f, labels = _task(50, 3, c=3, seed=5, signal=1.0)
    redundant = np.column_stack([f, f[:, 0] + 2 * f[:, 1], np.ones(50)])
    assert hscore(redundant, labels) == pytest.approx(hscore(f, labels), rel=1e-8)


def test_hscore_range_and_separation() -> None:
    labels = np.repeat(np.arange(4), 5)
    one_hot = np.eye(4)[labels]  # perfectly separating, rank-deficient covariance
    assert hscore(one_hot, labels) == pytest.approx(3.0, abs=1e-9)  # the maximum, c - 1
    random_f, labels = _task(200, 8, c=4, seed=6)
    good_f, _ = _task(200, 8, c=4, seed=6, signal=3.0)
    assert 0.0 <= hscore(random_f, labels) < hscore(good_f, labels) <= 3.0 + 1e-9


def test_ledoit_wolf_shrinkage_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    for seed, (n, k) in enumerate([(40, 5), (10, 30), (200, 3)]):
        f = np.random.default_rng(seed).normal(size=(n, k)) * np.arange(1, k + 1)
        assert ledoit_wolf_shrinkage(f) == pytest.approx(covariance.ledoit_wolf_shrinkage(f), abs=1e-12)
    assert ledoit_wolf_shrinkage(np.ones((5, 3))) == 0.0
    # isotropic data: the estimate is clipped to 1 (full shrinkage)
    iid = np.random.default_rng(0).normal(size=(200, 3))
    assert ledoit_wolf_shrinkage(iid) == 1.0 == covariance.ledoit_wolf_shrinkage(iid)


def test_regularized_hscore_matches_formula() -> None:
    f, labels = _task(40, 5, c=3, seed=7, signal=1.0)
    f[:, 1] *= 10.0  # unequal variances, so shrinkage changes the score
    alpha = ledoit_wolf_shrinkage(f)
    assert 0.0 < alpha < 1.0
    cov_f = np.cov(f, rowvar=False, bias=True)
    means = np.array([f[labels == c].mean(axis=0) for c in range(3)])
    cov_g = np.cov(means[labels], rowvar=False, bias=True)
    shrunk = (1 - alpha) * cov_f + alpha * np.trace(cov_f) / 5 * np.eye(5)
    want = np.trace(np.linalg.inv(shrunk) @ ((1 - alpha) * cov_g))
    assert regularized_hscore(f, labels) == pytest.approx(want, rel=1e-10)
    assert regularized_hscore(f, labels, shrinkage=0.0) == pytest.approx(hscore(f, labels), rel=1e-10)
    assert regularized_hscore(f, labels, shrinkage=1.0) == 0.0
    assert regularized_hscore(f, labels) != pytest.approx(hscore(f, labels), rel=1e-3)


@pytest.mark.parametrize("n,k", [(40, 5), (12, 30)])
def test_h_scores_match_the_dense_covariance_formulas(n: int, k: int) -> None:
    # the scorers work from the centred features' SVD; here every (k, k) matrix is formed
    f, labels = _task(n, k, c=3, seed=n + k, signal=1.0)
    f[:, 1] *= 10.0
    cov_f = np.cov(f, rowvar=False, bias=True)
    means = np.array([f[labels == c].mean(axis=0) for c in range(3)])
    cov_g = np.cov(means[labels], rowvar=False, bias=True)
    pinv = np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True)
    assert hscore(f, labels) == pytest.approx(np.trace(pinv @ cov_g), rel=1e-9)
    for alpha in (0.3, ledoit_wolf_shrinkage(f)):
        shrunk = (1 - alpha) * cov_f + alpha * np.trace(cov_f) / k * np.eye(k)
        want = np.trace(np.linalg.inv(shrunk) @ ((1 - alpha) * cov_g))
        assert regularized_hscore(f, labels, shrinkage=alpha) == pytest.approx(want, rel=1e-9)


def test_regularized_hscore_prefers_separating_features_when_n_is_small() -> None:
    random_f, labels = _task(20, 40, c=4, seed=8)
    good_f, _ = _task(20, 40, c=4, seed=8, signal=3.0)
    # the plain H-score saturates (n < k: every feature set "separates" the samples) ...
    assert hscore(random_f, labels) == pytest.approx(3.0, abs=1e-6)
    # ... the shrunk covariance does not
    assert regularized_hscore(good_f, labels) > regularized_hscore(random_f, labels)


# ------------------------------------------------------------------------- ridge LOO


def refit_press(f: np.ndarray, labels: np.ndarray, lam: float) -> float:
    """Mean leave-one-out squared error of ridge onto one-hot labels, by refitting n times.

    Standardised features with an unpenalised intercept: the normal equations of [1, X]
    with penalty diag(0, λ, ..., λ), solved without sample i, then predicting sample i."""
    sd = f.std(0)
    x = (f - f.mean(0)) / np.where(sd > 1e-8, sd, 1.0)
    classes = np.unique(labels)
    y = (labels[:, None] == classes[None]).astype(float)
    z = np.hstack([np.ones((len(x), 1)), x])
    pen = lam * np.diag([0.0] + [1.0] * x.shape[1])
    err = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        w = np.linalg.solve(z[keep].T @ z[keep] + pen, z[keep].T @ y[keep])
        err.append(np.sum((z[i] @ w - y[i]) ** 2))
    return float(np.mean(err))


@pytest.mark.parametrize("n,k,c", [(40, 5, 3), (12, 30, 2), (25, 25, 4)])
def test_ridge_loo_equals_refitting_without_each_sample(n: int, k: int, c: int) -> None:
    f, labels = _task(n, k, c, seed=11, signal=1.5)
    sd = f.std(0)
    mu = float(np.sum(((f - f.mean(0)) / sd) ** 2)) / n  # mean eigenvalue of the Gram matrix
    for g in (0.01, 1.0, 30.0):
        assert -ridge_loo(f, labels, grid=(g,)) == pytest.approx(refit_press(f, labels, g * mu), rel=1e-8)
    # the default grid keeps the best penalty: its error is the smallest of the grid's
    best = min(refit_press(f, labels, g * mu) for g in (0.1, 1.0, 10.0))
    assert -ridge_loo(f, labels, grid=(0.1, 1.0, 10.0)) == pytest.approx(best, rel=1e-8)


def test_ridge_loo_prefers_separating_features_and_is_scale_free() -> None:
    random_f, labels = _task(30, 50, c=3, seed=12)
    good_f, _ = _task(30, 50, c=3, seed=12, signal=3.0)
    assert ridge_loo(good_f, labels) > ridge_loo(random_f, labels)
    # interpolating features (n < k) do not look perfect: leave-one-out sees through them
    assert ridge_loo(random_f, labels) < -0.5
    scale = np.random.default_rng(3).uniform(0.1, 10.0, size=50)
    assert ridge_loo(good_f * scale + 7.0, labels) == pytest.approx(ridge_loo(good_f, labels), rel=1e-9)
    const = np.hstack([good_f, np.full((30, 1), 4.0)])  # a constant column changes nothing
    assert ridge_loo(const, labels, grid=(1.0,)) == pytest.approx(ridge_loo(good_f, labels, grid=(1.0,)), rel=1e-9)
    # columns are standardised whatever their scale (an absolute cut of 1e-8 left out columns of features
    # around 1e-9); a column constant up to rounding is still left as it is
    for tiny in (1e-9, 1e-15):
        assert ridge_loo(good_f * tiny, labels) == pytest.approx(ridge_loo(good_f, labels), rel=1e-9)
    rounding = np.hstack([good_f, 0.3 + np.random.default_rng(4).normal(0, 1e-17, (30, 1))])
    assert ridge_loo(rounding, labels, grid=(1.0,)) == pytest.approx(ridge_loo(good_f, labels, grid=(1.0,)), rel=1e-9)
    with pytest.raises(ValueError, match=r"grid should be positive finite ridge multiples, got \(0.0,\)"):
        ridge_loo(good_f, labels, grid=(0.0,))


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize("scorer", list(SCORERS.values()), ids=list(SCORERS))
def test_scorers_reject_bad_input_with_what_was_received(scorer) -> None:
    f, labels = _task(10, 3, c=2, seed=9)
    with pytest.raises(DataError, match=r"features should be 2-d \(n, k\), got shape \(10,\)"):
        scorer(f[:, 0], labels)
    with pytest.raises(ValueError, match=r"got 9 labels for features of shape \(10, 3\)"):
        scorer(f, labels[:9])
    with pytest.raises(ValueError, match=r"labels should be 1-d \(n,\), got shape \(10, 1\)"):
        scorer(f, labels[:, None])
    with pytest.raises(ValueError, match=r"at least 2 classes, got 1 \(\[4\]\)"):
        scorer(f, np.full(10, 4))
    with pytest.raises(ValueError, match="integer class ids, got dtype float64"):
        scorer(f, labels.astype(float))
    bad = f.copy()
    bad[2, 1] = np.nan
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="got 2 non-finite values"):
        scorer(bad, labels)


def test_scorers_return_python_floats() -> None:
    f, labels = _task(30, 4, c=3, seed=10, signal=1.0)
    for name, scorer in SCORERS.items():
        value = scorer(f, labels)
        assert type(value) is float and np.isfinite(value), name


def test_the_linear_probe_is_scale_free_and_refuses_labels_that_do_not_fit_its_features() -> None:
    """The ground truth's probe (selection.linear_probe) standardises each column: features around 1e-9
    were left unstandardised (an absolute cut of 1e-8) and the probe was at chance. Labels of another
    length broadcast (one label scored 10 images), non-finite features were scored: one-line errors."""
    from selection.linear_probe import probe_accuracy

    f, labels = _task(60, 6, c=3, seed=5, signal=2.0)
    tr, te = np.arange(0, 60, 2), np.arange(1, 60, 2)
    base = probe_accuracy(f[tr], labels[tr], f[te], labels[te])
    assert base > 0.6
    for scale in (1e-9, 1e-20):
        assert probe_accuracy(f[tr] * scale, labels[tr], f[te] * scale, labels[te]) == base
    # a caller's inference mode (service code's habit) was a RuntimeError that ended the selection after
    # every task was swept: 'element 0 of tensors does not require grad' (a review, session 43)
    import torch

    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            assert probe_accuracy(f[tr], labels[tr], f[te], labels[te]) == base
    nan = f[te].copy()
    nan[3, 2] = np.nan
    for args, match in (((f[tr], labels[tr], f[te], labels[te][:1]),
                         r"test split has features \(30, 6\) and labels \(1,\)"),
                        ((f[tr], labels[tr][:, None], f[te], labels[te]), r"train split .* labels \(30, 1\)"),
                        ((f[tr], labels[tr], f[te][:0], labels[te][:0]), "at least one image"),
                        ((f[tr], labels[tr], nan, labels[te]), "the probe's test features hold 1 non-finite value"),
                        (([["a"]], labels[:1], f[te], labels[te]), "probe features should be .* numbers, got <U1")):
        with pytest.raises(DataError, match=match):
            probe_accuracy(*args)
    # lists and tensors are features too; the protocol is checked (a review, session 47: AttributeErrors)
    assert probe_accuracy(f[tr].tolist(), labels[tr], torch.from_numpy(f[te]), labels[te]) == base
    with pytest.raises(ConfigError, match="^protocol should be a ProbeProtocol, got NoneType$"):
        probe_accuracy(f[tr], labels[tr], f[te], labels[te], protocol=None)


@pytest.mark.parametrize("scorer,params", [
    (logme, [("max_iter", 2.5, "max_iter should be an integer of at least 1, got 2.5"),
             ("tol", float("nan"), "tol should be a number in"), ("tol", -1, "tol should be a number in")]),
    (hscore, [("rtol", float("nan"), r"rtol should be a number in \[0, 1\], got nan"), ("rtol", 2.0, "got 2.0")]),
    (regularized_hscore, [("shrinkage", "0.5", r"shrinkage should be a number in \[0, 1\], got '0.5'"),
                          ("shrinkage", True, "got True")]),
    (ridge_loo, [("grid", ("a",), r"grid should be positive finite ridge multiples, got \('a',\)"),
                 ("grid", 1.0, "got 1.0")]),
])
def test_scorer_parameters_of_the_wrong_type_or_range_are_refused_by_name(scorer, params) -> None:
    """They were silently a score of 0.0 (rtol=nan, shrinkage=True), a loop to max_iter (tol=nan) or a
    numpy TypeError (a review, session 33)."""
    f, labels = _task(20, 4, c=2, seed=9)
    for name, value, match in params:
        for feats in (f, np.ones_like(f)):  # constant features return early: the parameter is checked first
            with pytest.raises(ValueError, match=match):
                scorer(feats, labels, **{name: value})


def test_columns_constant_up_to_rounding_count_as_constant_in_every_scorer_and_the_probe() -> None:
    """A review (session 42): constant float64 features (0.1 centres to a 1e-17 leftover) scored the maximum
    H-score on a binary task; float32 columns constant but for one-ulp jitter (another batch's kernel)
    were standardised into unit-variance noise, taking the ridge LOO and the linear probe (the benchmark's
    ground truth) from 0.88 to 0.56; the cut, relative to the largest magnitude alone, also left a
    float64 column of spread 1e-3 around 1e6 unstandardised."""
    from selection.linear_probe import ProbeProtocol, probe_accuracy
    from selection.scorers import hscore, regularized_hscore, ridge_loo, rounding_constant

    rng = np.random.default_rng(0)
    y = np.arange(100) % 2
    dead = np.full((100, 16), 0.1)
    assert hscore(dead, y) == regularized_hscore(dead, y) == hscore(dead.tolist(), y) == 0.0
    n, y3 = 200, np.arange(200) % 3
    good = (rng.normal(size=(n, 8)) + 2 * rng.normal(size=(3, 8))[y3]).astype(np.float32)
    three = np.float32(3.0)
    jitter = (three + np.spacing(three) * rng.integers(-1, 2, (n, 300))).astype(np.float32)
    assert rounding_constant(jitter).all() and not rounding_constant(jitter.astype(np.float64)).any()
    train, test = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    for feats in (good, np.hstack([good, jitter])):
        assert probe_accuracy(feats[train], y3[train], feats[test], y3[test], ProbeProtocol()) == pytest.approx(
            probe_accuracy(good[train], y3[train], good[test], y3[test], ProbeProtocol()))
        assert ridge_loo(feats[:60], y3[:60]) == pytest.approx(ridge_loo(good[:60], y3[:60]), rel=1e-9)
    shifted = rng.normal(size=(60, 3))
    moved = shifted.copy()
    moved[:, 0] = shifted[:, 0] * 1e-3 + 1e6  # float64: a spread far above its rounding
    assert ridge_loo(moved, y3[:60]) == pytest.approx(ridge_loo(shifted, y3[:60]), rel=1e-6)


def test_every_scorer_takes_torch_tensors_as_numpy_arrays():
    """`hscore`, `regularized_hscore` and `ridge_loo` raised `TypeError: Cannot interpret 'torch.float64' as a
    data type` on torch tensors, which `logme` took (a review, session 45)."""
    import torch

    from selection.scorers import hscore, logme, regularized_hscore, ridge_loo

    x = np.random.default_rng(3).normal(size=(40, 8))
    y = np.arange(40) % 3
    for score in (hscore, regularized_hscore, ridge_loo, logme):
        assert score(torch.tensor(x), torch.tensor(y)) == score(x, y), score.__name__
        assert score(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == score(x.astype(np.float32), y)
