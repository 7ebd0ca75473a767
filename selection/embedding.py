"""Model and task embeddings, and scores (SPEC section 1).

Shapes: probe features of a candidate `h` (N, k); baseline features `z` (N, d).
Model embedding: diagonal coverage `v` (d,) in [0, 1], full coverage matrix `C` (d, d)
stored as its upper triangle (d(d+1)/2,); the per-source form adds, for each probe source,
the cross-fitted within-source cross-covariance and prediction covariance.
Task embedding: `u` (d,) summing to 1, or `G` (d, d) with trace 1, turned into a
`TaskQuery`: weight rows of the table's width, so that scoring every model is a matrix product
with the stored vectors (one per block of the vector the rows weigh; plus, for the per-source form,
a ratio per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selection.errors import DataError, ModelError

FORMS = ("full", "diagonal", "per-source")
TASK_METHODS = ("probe", "fisher")
# Relative ridge strengths searched by generalised cross-validation, times a scale (ridge_gcv). A
# standard records the scale its rows are fitted with (spec "ridge_scale"); standards that record
# none were built with "rank". New ones use RIDGE_SCALE.
RIDGE_GRID = tuple(10.0 ** p for p in np.arange(-6.0, 2.01, 0.5))
RIDGE_SCALES = ("rank", "trace")
RIDGE_SCALE = "trace"
# What GCV counts as the fit's degrees of freedom (spec "ridge_gcv"; a standard that records none
# uses "slopes"): "affine", the slopes' and the unpenalised intercept's (the hat matrix's trace), or
# "slopes", the slopes' alone. With "slopes" GCV tends to 0 as the strength does whenever the
# centred x has full row rank (k >= n - 1: wide features, few images), so it picks the grid's
# weakest ridge, an interpolation. "affine" fits as leave-one-out would; in a standard's rows it
# ranked much better on the benchmark under the Lite2 standard and worse under the general one
# (whose full form ranks better from interpolating fits, for a reason not yet found), so it is the
# default of standards over the default Lite2 baseline only (`selection.standard.default_ridge_gcv`;
# docs/method-experiments.md, sessions 18, 19 and 46). Everything else (ridge_gcv's own default, the
# task side) counts the intercept.
RIDGE_GCVS = ("slopes", "affine")
RIDGE_GCV = "slopes"


# Per-source coverage: each probe source's images are cross-fitted in SOURCE_FOLDS folds,
# repeated SOURCE_REPEATS times with different fold assignments (docs/method-experiments.md).
# A standard records the values it was built with (spec "source_crossfit"), and its rows are
# always computed with those: these constants only apply to standards built from now on.
SOURCE_FOLDS = 2
SOURCE_REPEATS = 12
# The full form and the diagonal coverage: every probe image predicted by a ridge fitted on the
# other FULL_FOLDS - 1 folds, measured on all images, averaged over FULL_REPEATS fold draws
# (spec "full_crossfit"). Standards that record none keep the single P_fit/P_val split.
FULL_FOLDS = 5
FULL_REPEATS = 2


def embedding_width(form: str, d: int, n_sources: int = 1) -> int:
    """Stored numbers per model: full d(d+1)/2; diagonal d; per-source (1 + 2 n_sources) d(d+1)/2."""
    if form == "full":
        return d * (d + 1) // 2
    if form == "diagonal":
        return d
    if form == "per-source":
        return (1 + 2 * n_sources) * d * (d + 1) // 2
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def triu(mat: np.ndarray) -> np.ndarray:
    """Upper triangle (diagonal included), row-major."""
    return mat[np.triu_indices(mat.shape[0])]


def untriu(vec: np.ndarray, d: int) -> np.ndarray:
    mat = np.zeros((d, d), dtype=np.float64)
    mat[np.triu_indices(d)] = vec
    return mat + np.triu(mat, 1).T


def ridge_gcv(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...] = RIDGE_GRID, scale: str = "rank",
              gcv: str = "affine") -> tuple[np.ndarray, np.ndarray, float]:
    """Affine ridge regression x -> y with the strength chosen by GCV.

    GCV(alpha) = RSS / (n - dof)^2, dof the slopes' effective degrees of freedom plus, with
    `gcv="affine"` (the hat matrix's trace), the intercept's 1. `gcv="slopes"` leaves that 1 out:
    the rows of the standards that record it (`RIDGE_GCVS`, `RIDGE_GCV`) are fitted so.

    x (n, k), y (n, t). Returns (B (k, t), intercept (t,), alpha). Deterministic. The strengths
    searched are `grid` times a scale of the centred x's spectrum: `rank`, the mean s^2 over the
    directions an SVD resolves (s > 1e-10 s_max), or `trace`, its total variance over
    min(n - 1, k). The two are the same number when x has full rank; `trace` does not depend on
    how many near-zero directions a solver resolves, so it is solved through the smaller of the two
    Gram matrices (several times faster than the SVD for wide x; `RIDGE_SCALES`).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):  # a 1-D y broadcast to a (k, k) answer
        raise DataError(f"ridge_gcv needs x (n, k) and y (n, t), got {x.shape} and {y.shape} (y[:, None] for one "
                         f"target)")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n, k = xc.shape
    if scale == "rank":
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        keep = s > s[0] * 1e-10 if s.size and s[0] > 0 else np.zeros_like(s, bool)
        u, s, vt = u[:, keep], s[keep], vt[keep]
        s2, uty = s ** 2, u.T @ yc
        ref = s2.mean() if s.size else 0.0

        def solve(alpha: float) -> np.ndarray:
            return vt.T @ ((s / (s2 + alpha))[:, None] * uty)
    elif scale == "trace":
        wide = n <= k
        s2, vec = np.linalg.eigh(xc @ xc.T if wide else xc.T @ xc)
        keep = s2 > s2[-1] * 1e-12 if s2.size and s2[-1] > 0 else np.zeros_like(s2, bool)
        s2, vec = s2[keep], vec[:, keep]  # the Gram's eigenvalues are x's s^2
        s = np.sqrt(s2)
        uty = vec.T @ yc if wide else (vec.T @ (xc.T @ yc)) / s[:, None]
        ref = float((xc ** 2).sum()) / max(min(n - 1, k), 1)

        def solve(alpha: float) -> np.ndarray:
            if wide:  # x's right singular vectors are x^T u / s
                return xc.T @ (vec @ (uty / (s2 + alpha)[:, None]))
            return vec @ ((s / (s2 + alpha))[:, None] * uty)
    else:
        raise ValueError(f"ridge scale should be one of {RIDGE_SCALES}, got {scale!r}")
    if gcv not in RIDGE_GCVS:
        raise ValueError(f"ridge GCV should be one of {RIDGE_GCVS}, got {gcv!r}")
    n_free = n - (gcv == "affine")  # observations less the intercept's degree of freedom
    if s2.size == 0:
        return np.zeros((k, y.shape[1])), my, float("inf")
    best = (np.inf, None)
    # The part of y outside span(u): none when x spans every centred direction (rank n - 1); |y|^2 - |u'y|^2
    # was then +-1e-15, and with the affine count's n - 1 - dof cancelling to ~1e-6 at the weakest ridges,
    # GCV was noise over noise there: the order of a task's rows chose the strength.
    resid_out = 0.0 if s2.size >= n - 1 else max(float((yc ** 2).sum() - (uty ** 2).sum()), 0.0)
    for rel in grid:
        alpha = rel * ref
        shrink = s2 / (s2 + alpha)
        resid = resid_out + (((1 - shrink)[:, None] * uty) ** 2).sum()
        free = (n_free - s2.size) + (alpha / (s2 + alpha)).sum()  # n_free - dof, without the cancellation
        score = resid / max(free, 1e-9) ** 2
        if score < best[0]:
            best = (score, alpha)
    alpha = float(best[1])
    coef = solve(alpha)
    return coef, my - mx @ coef, alpha


@dataclass(frozen=True, eq=False)
class ModelEmbedding:
    coverage: np.ndarray  # (d,) diagonal form
    full: np.ndarray      # (d(d+1)/2,) upper triangle of C
    alpha: float
    per_source: np.ndarray | None = None  # (2 S d(d+1)/2,): per source triu(C_s), triu(S_s)

    def vector(self, form: str) -> np.ndarray:
        if form == "per-source":
            if self.per_source is None:
                raise ValueError("the per-source form needs the probe sources (model_embedding(sources=...))")
            return np.concatenate([self.full, self.per_source]).astype(np.float32)
        return (self.full if form == "full" else self.coverage).astype(np.float32)


def _covariances(z_hat: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetrised cov(z_hat, z) and cov(z_hat, z_hat)."""
    zh, zc = z_hat - z_hat.mean(0), z - z.mean(0)
    n = max(len(z) - 1, 1)
    cross = zh.T @ zc / n
    return 0.5 * (cross + cross.T), zh.T @ zh / n


def crossfit_predictions(h: np.ndarray, z: np.ndarray, idx: np.ndarray, folds: int, seed: int,
                         scale: str, gcv: str) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Every image of `idx` predicted by a ridge h -> z (`ridge_gcv`, `scale`, `gcv`) fitted on the other folds.

    The images are permuted with `seed` and dealt into `folds` folds. Returns (z_hat, z) in that
    order, and the ridge strength each fold chose.
    """
    perm = np.random.default_rng(seed).permutation(idx)
    z_hat = np.zeros((len(perm), z.shape[1]))
    alphas = []
    for f in range(folds):
        test = np.arange(f, len(perm), folds)
        train = np.setdiff1d(np.arange(len(perm)), test)
        coef, icpt, alpha = ridge_gcv(h[perm[train]], z[perm[train]], scale=scale, gcv=gcv)
        z_hat[test] = h[perm[test]] @ coef + icpt
        alphas.append(alpha)
    return z_hat, z[perm].astype(np.float64), alphas


def source_covariances(h: np.ndarray, z: np.ndarray, idx: np.ndarray,
                       crossfit: tuple[int, int], scale: str, gcv: str) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted (C_s, S_s) on one probe source's images `idx`, averaged over the repeats.

    `crossfit` = (folds, repeats): repeat r predicts every image with `crossfit_predictions`
    (seed r) and measures cov(z_hat, z) and cov(z_hat, z_hat).
    """
    folds, repeats = crossfit
    c_sum = np.zeros((z.shape[1], z.shape[1]))
    s_sum = np.zeros_like(c_sum)
    for r in range(repeats):
        c, s = _covariances(*crossfit_predictions(h, z, idx, folds, r, scale, gcv)[:2])
        c_sum += c
        s_sum += s
    return c_sum / repeats, s_sum / repeats


def _coverage(z_hat: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per-feature R^2 of the prediction, clipped to [0, 1]."""
    sse = ((z - z_hat) ** 2).sum(0)
    sst = ((z - z.mean(0)) ** 2).sum(0)
    return np.clip(1.0 - sse / np.maximum(sst, 1e-12), 0.0, 1.0)


def model_embedding(h: np.ndarray, z: np.ndarray, fit_idx: np.ndarray, val_idx: np.ndarray,
                    model_id: str = "model", sources: np.ndarray | None = None,
                    crossfit: tuple[int, int] = (SOURCE_FOLDS, SOURCE_REPEATS),
                    full_crossfit: tuple[int, int] | None = (FULL_FOLDS, FULL_REPEATS),
                    ridge_scale: str = RIDGE_SCALE, gcv: str = RIDGE_GCV) -> ModelEmbedding:
    """How much of the baseline feature space z the features h reproduce.

    The full form C and the diagonal coverage: with `full_crossfit` = (folds, repeats)
    (`Standard.full_crossfit`), every probe image is predicted by a ridge h -> z fitted on the
    other folds and both are measured on all images, averaged over the repeats; with None, the
    ridge is fitted on P_fit (`fit_idx`) and they are measured on P_val (`val_idx`).
    With `sources` (the probe source of every image, ints 0..S-1), also the per-source form:
    the same question asked within each probe source, cross-fitted on its images
    (`crossfit` = (folds, repeats), `Standard.crossfit`). Every ridge's strength is chosen by
    `ridge_gcv` relative to `ridge_scale` (`Standard.ridge_scale`), counting degrees of freedom
    as `gcv` says (`Standard.ridge_gcv`).
    """
    if h.ndim != 2 or h.shape[0] != z.shape[0]:
        raise ModelError(f"model {model_id!r}: features should be (N={z.shape[0]}, k), got {h.shape}")
    if not np.isfinite(h).all():
        raise ModelError(f"model {model_id!r} produced non-finite (NaN/inf) features")
    h64 = h.astype(np.float64)
    # Centre on P_fit and scale by one global factor: a per-column rescaling would move the
    # row space and stop a model from reproducing features that are linear in its own.
    h64 = h64 - h64[fit_idx].mean(0)
    h64 /= max(float(np.sqrt((h64[fit_idx] ** 2).mean())), 1e-30)
    if full_crossfit is None:
        coef, icpt, alpha = ridge_gcv(h64[fit_idx], z[fit_idx], scale=ridge_scale, gcv=gcv)
        z_val = z[val_idx].astype(np.float64)
        z_hat = h64[val_idx] @ coef + icpt
        coverage, full = _coverage(z_hat, z_val), _covariances(z_hat, z_val)[0]
    else:
        folds, repeats = full_crossfit
        parts = [crossfit_predictions(h64, z, np.arange(len(z)), folds, r, ridge_scale, gcv)
                 for r in range(repeats)]
        coverage = np.mean([_coverage(zh, zt) for zh, zt, _ in parts], 0)
        full = np.mean([_covariances(zh, zt)[0] for zh, zt, _ in parts], 0)
        alpha = float(np.median([a for _, _, alphas in parts for a in alphas]))
    per_source = None
    if sources is not None:
        blocks = []
        for s in range(int(sources.max()) + 1):
            c_s, s_s = source_covariances(h64, z, np.flatnonzero(sources == s), crossfit, ridge_scale,
                                          gcv)
            blocks += [triu(c_s), triu(s_s)]
        per_source = np.concatenate(blocks)
    return ModelEmbedding(coverage, triu(full), alpha, per_source)


NO_SIGNAL_TOLERANCE = 1e-5  # class-mean spread below this fraction of the features' RMS is float noise


def _check_task(z: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise DataError(f"task {name!r}: features (n, d) and labels (n,) expected, got {z.shape} "
                        f"and {labels.shape}")
    bad = int(np.size(z) - np.count_nonzero(np.isfinite(z)))
    if bad:  # it was reported as "the labels carry no signal"
        raise DataError(f"task {name!r}: its features hold {bad} non-finite value(s)")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise DataError(f"task {name!r}: its labels hold non-finite values")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError(f"task {name!r} has {len(classes)} class(es); at least 2 are needed")
    return classes


def task_matrix(z: np.ndarray, labels: np.ndarray, method: str = "probe", name: str = "task") -> np.ndarray:
    """Task embedding as a (d, d) PSD matrix G with trace 1; its diagonal is the diagonal form u."""
    classes = _check_task(z, labels, name)
    z = z.astype(np.float64)
    # Class means that differ by float noise only (e.g. the same image under every label) would give
    # a full-rank G from the ratio of noise to noise: refuse them, relative to the features' scale.
    mu = z.mean(0)
    spread = max(float(np.abs(z[labels == c].mean(0) - mu).max()) for c in classes)
    if not spread > NO_SIGNAL_TOLERANCE * (float(np.sqrt((z ** 2).mean())) + 1e-30):
        raise DataError(f"task {name!r}: the labels carry no signal in the baseline features "
                        f"(all class means coincide)")
    if method == "probe":
        y = (labels[:, None] == classes[None, :]).astype(np.float64)
        # GCV counting the intercept: with "slopes" every task of at most d + 1 images got the grid's
        # weakest ridge (until session 19; docs/method-experiments.md). Nothing stored depends on it.
        w, _, _ = ridge_gcv(z, y)                       # (d, C)
        g = w @ w.T
    elif method == "fisher":
        within = np.zeros(z.shape[1])
        means = []
        for c in classes:
            zc = z[labels == c]
            within += ((zc - zc.mean(0)) ** 2).sum(0)
            means.append(np.sqrt(len(zc)) * (zc.mean(0) - mu))
        m = np.stack(means, 1) / np.sqrt(np.maximum(within, 1e-12))[:, None]  # (d, C)
        g = m @ m.T
    else:
        raise ValueError(f"task embedding method must be one of {TASK_METHODS}, got {method!r}")
    tr = np.trace(g)
    if not np.isfinite(tr) or tr <= 0:
        raise DataError(f"task {name!r}: the labels carry no signal in the baseline features "
                        f"(all class means coincide)")
    return g / tr


def predictive_share(z: np.ndarray, labels: np.ndarray) -> float:
    """Share of the one-hot labels' variance that a ridge probe on `z` (n, k) predicts leave-one-out.

    1 - PRESS / PRESS_0, where PRESS = -`selection.scorers.ridge_loo` (its mean leave-one-out
    squared error) and PRESS_0 that of predicting every image by the mean of the others. In
    [-inf, 1]: 0 when the features predict no better than the class frequencies.
    """
    from selection.scorers import ridge_loo

    n = len(labels)
    y = (labels[:, None] == np.unique(labels)[None, :]).astype(np.float64)
    press0 = float(((y - y.mean(0)) ** 2).sum(1).mean()) * (n / (n - 1)) ** 2
    return 1.0 + ridge_loo(z, labels) / press0


PART_WEIGHT_FLOOR = 1e-3  # a part that predicts nothing keeps this much of its weight


def weigh_parts(g: np.ndarray, z: np.ndarray, labels: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """G with the rows and columns of each part of z scaled by sqrt(R_p), then trace 1.

    `widths`: the widths of z's consecutive parts (the baseline's and the companion's
    dimensions). R_p = `predictive_share` of part p's features (floored at PART_WEIGHT_FLOOR),
    so part p's block of G carries its own mass under the task method (with `fisher`, the
    Fisher ratios of the task's classes in it) times R_p: the task says how much each kind of
    feature tells its classes apart (docs/method-experiments.md, "Session 15"). One part: G
    unchanged.
    """
    if sum(widths) != g.shape[0] or z.shape[1] != g.shape[0]:
        raise ValueError(f"part widths {widths} should add up to d = {g.shape[0]} (z is {z.shape})")
    if len(widths) < 2:
        return g
    bounds = np.cumsum((0,) + tuple(widths))
    scale = np.concatenate([np.full(b - a, np.sqrt(max(predictive_share(z[:, a:b], labels), PART_WEIGHT_FLOOR)))
                            for a, b in zip(bounds[:-1], bounds[1:])])
    g = g * scale[:, None] * scale[None, :]
    return g / np.trace(g)


def task_weights(g: np.ndarray, form: str) -> np.ndarray:
    """The weight vector w with score = <stored embedding, w> for the linear forms.

    diagonal: w = diag(G) (= u, sums to 1), score = sum_j u_j v_j.
    full: w = upper triangle of G with off-diagonal entries doubled, so that
    <triu(C), w> = sum_ij C_ij G_ij = <C, G> / tr G  (tr G = 1).
    """
    if form == "diagonal":
        return np.diag(g).copy()
    if form == "full":
        w = 2.0 * g
        np.fill_diagonal(w, np.diag(g))
        return triu(w)
    raise ValueError(f"form must be one of ('full', 'diagonal'), got {form!r}")


@dataclass(frozen=True, eq=False)
class TaskQuery:
    """How one task scores a stored vector e: sum_i coef_i * clip(num_i.e / sqrt(den_i.e), -1, 1).

    The linear forms have one row and no `den`: the score is num.e. Scoring m models is a matrix
    product of the (m, D) table with the rows of num and den (`query_scores`).
    """

    num: np.ndarray                # (r, D)
    coef: np.ndarray               # (r,)
    den: np.ndarray | None = None  # (r, D)


@dataclass(frozen=True, eq=False)
class RankQuery:
    """Score each row by the mean, over `parts`, of its rank fraction among the rows swept.

    Rank fraction: the row's mid-rank among the swept rows under that part (counted from 1, a tie
    group sharing the mean of its ranks), over the rows swept, so a row's score is in (0, 1] and the
    best scores 1 (`selection.select.mean_rank`). A table-global score: `selection.select.sweep_shards`
    keeps every part's scores (4 bytes a row each) and the rows fewer than k others beat in every part.
    """

    parts: tuple[TaskQuery, ...]


def source_weights(z_task: np.ndarray, z_probe: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(S,) share of the task's images whose nearest probe-source centroid (in z) is each source."""
    cents = np.stack([z_probe[sources == s].mean(0) for s in range(int(sources.max()) + 1)])
    d2 = ((z_task[:, None, :].astype(np.float64) - cents[None]) ** 2).sum(-1)
    return np.bincount(d2.argmin(1), minlength=len(cents)) / len(z_task)


def source_covariance(z_probe: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(S, d, d) covariance of the baseline features within each probe source."""
    return np.stack([np.cov(z_probe[sources == s].astype(np.float64), rowvar=False)
                     for s in range(int(sources.max()) + 1)])


def task_query(g: np.ndarray, form: str, width: int | None = None, weights: np.ndarray | None = None,
               z_cov: np.ndarray | None = None) -> TaskQuery:
    """The query of task matrix G (d, d) against a table of `form` (and `width`, default the form's).

    full/diagonal: linear, <C, G> or sum_j u_j v_j; on a wider table (per-source) the full
    block comes first and the rest is weighted 0. per-source: for every source s with
    weight w_s > 0 (`source_weights`) and every eigen-direction u_i of G (eigenvalue l_i),
    the correlation of u_i.z_hat with u_i.z within s, summed with weights w_s l_i:
    num_i = u_i u_i^T on C_s / sqrt(u_i^T Z_s u_i), den_i = u_i u_i^T on S_s (`z_cov` = Z).
    """
    d = g.shape[0]
    block = d * (d + 1) // 2
    if form in ("full", "diagonal"):
        w = task_weights(g, form)
        row = np.zeros((1, width or len(w)))
        row[0, :len(w)] = w
        return TaskQuery(row, np.ones(1))
    if form != "per-source":
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if weights is None or z_cov is None:
        raise ValueError("the per-source form needs the task's source weights and the sources' z covariance")
    width = width or embedding_width(form, d, len(weights))
    lam, vecs = np.linalg.eigh(g)
    keep = lam > lam.max() * 1e-6
    nums, dens, coefs = [], [], []
    for s, w_s in enumerate(weights):
        if w_s <= 0:
            continue
        for lam_i, u in zip(lam[keep], vecs[:, keep].T):
            w = task_weights(np.outer(u, u), "full")
            num, den = np.zeros(width), np.zeros(width)
            num[block * (1 + 2 * s):block * (2 + 2 * s)] = w / np.sqrt(max(float(u @ z_cov[s] @ u), 1e-12))
            den[block * (2 + 2 * s):block * (3 + 2 * s)] = w
            nums.append(num)
            dens.append(den)
            coefs.append(w_s * lam_i)
    return TaskQuery(np.stack(nums), np.array(coefs), np.stack(dens))


def linear_queries(weights: np.ndarray) -> list[TaskQuery]:
    """(T, D) weight vectors of linear forms as queries."""
    return [TaskQuery(w[None, :], np.ones(1)) for w in np.asarray(weights)]


SCORE_BYTES = 4 << 20  # the float64 copy of the rows multiplied at once: small enough to stay in cache
SPAN_ALIGN = 32  # a query row's span of weighed columns, widened to multiples of this, groups it with its like
SPAN_OVERHEAD = 8  # the cost of converting a span's columns to float64, in query rows multiplied


def column_groups(rows: list[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    """Query rows (each (D,)) grouped by the span of stored columns they weigh.

    Returns (lo, hi, indices): the rows whose nonzero weights all lie in the stored columns lo:hi.
    A per-source query weighs one block of the vector in each row (C_s or S_s of one source), so
    multiplying each group against its span alone does a fraction of the work of the dense product:
    1 / (1 + 2 n_sources) for a task spread over every source. Rows weighing nothing are in no group
    (their products are 0). One group over the span of every row when grouping would not be cheaper
    (rows that weigh the whole vector, as the full form's).
    """
    spans: dict[tuple[int, int], list[int]] = {}
    for i, row in enumerate(rows):
        nonzero = np.flatnonzero(row)
        if len(nonzero):
            lo = int(nonzero[0]) // SPAN_ALIGN * SPAN_ALIGN
            hi = min(len(row), -(-(int(nonzero[-1]) + 1) // SPAN_ALIGN) * SPAN_ALIGN)
            spans.setdefault((lo, hi), []).append(i)
    if not spans:
        return []
    used = np.array(sorted(i for group in spans.values() for i in group))
    a, b = min(lo for lo, _ in spans), max(hi for _, hi in spans)
    grouped = sum((hi - lo) * (len(group) + SPAN_OVERHEAD) for (lo, hi), group in spans.items())
    if grouped >= (b - a) * (len(used) + SPAN_OVERHEAD):
        return [(a, b, used)]
    return [(lo, hi, np.array(group)) for (lo, hi), group in sorted(spans.items())]


@dataclass(frozen=True, eq=False)
class QueryPlan:
    """Task queries made ready for `query_scores` once, for every shard a sweep scores.

    width: the stored vector's; rows: the number of query rows (every query's num rows, then every den
    row); groups: (lo, hi, weights (hi - lo, r) float64) per `column_groups` group; order: the query
    rows in the groups' order (`in_order`: the rows' own order).
    """

    queries: tuple[TaskQuery, ...]
    width: int
    rows: int
    groups: tuple[tuple[int, int, np.ndarray], ...]
    order: np.ndarray

    @property
    def widest(self) -> int:
        return max([hi - lo for lo, hi, _ in self.groups] + [1])

    @property
    def in_order(self) -> bool:
        return len(self.order) == self.rows and bool((self.order == np.arange(self.rows)).all())


def plan_queries(queries: list[TaskQuery]) -> QueryPlan:
    """`queries` as a `QueryPlan`: the query rows grouped by the stored columns they weigh."""
    rows = [r for q in queries for r in q.num] + [r for q in queries if q.den is not None for r in q.den]
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise ValueError(f"task queries of one sweep must have one width, got widths {widths}")
    groups = column_groups(rows)
    return QueryPlan(tuple(queries), widths[0] if widths else 0, len(rows),
                     tuple((lo, hi, np.stack([rows[i][lo:hi] for i in index], axis=1).astype(np.float64))
                           for lo, hi, index in groups),
                     np.concatenate([index for _, _, index in groups] + [np.zeros(0, int)]))


def query_scores(embeddings: np.ndarray, queries: list[TaskQuery] | QueryPlan) -> np.ndarray:
    """(m, D) stored embeddings x T queries -> (m, T) scores: matrix products, then per-row ratios.

    Each group of query rows (`column_groups`) is multiplied with the stored columns it weighs
    only, so a non-finite value in a column no query row's span covers does not reach the scores
    (`selection.select.Sweep` checks whole rows). Computed in float64 and rounded to float32. A
    float32 product rounds a row's score differently by the row's place in the matrix and by the
    other queries beside it, so the order of close or identical rows depended on the table's sharding
    and on which tasks were selected together; rounding the float64 result leaves a row's score a
    function of the row and its query alone, but for a float64 error that lands on a float32 rounding
    boundary (about 1e-9 of the time). The rows are converted a few at a time (SCORE_BYTES), so the
    float64 copy stays in cache.
    """
    plan = queries if isinstance(queries, QueryPlan) else plan_queries(queries)
    m, n = embeddings.shape[0], plan.rows
    if plan.rows and embeddings.shape[1] != plan.width:
        raise ValueError(f"task queries have width {plan.width}, the stored vectors {embeddings.shape[1]}")
    in_order = plan.in_order
    step = max(1, min(m, SCORE_BYTES // (8 * max(plan.widest, n))))
    # Buffers made once: a fresh large array per chunk costs a page fault per 4 KB on every chunk.
    rows64 = np.empty((step, plan.widest), np.float64)
    grouped = np.empty((step, len(plan.order)), np.float64)  # the query rows in the groups' order
    prod = grouped if in_order else np.zeros((step, n), np.float64)  # a row weighing nothing scores 0
    out = np.empty((m, len(plan.queries)), np.float32)
    for start in range(0, m, step):
        rows_now = embeddings[start:start + step]
        k = len(rows_now)
        at = 0
        for lo, hi, wg in plan.groups:
            np.copyto(rows64[:k, :hi - lo], rows_now[:, lo:hi])
            np.matmul(rows64[:k, :hi - lo], wg, out=grouped[:k, at:at + wg.shape[1]])
            at += wg.shape[1]
        if not in_order:
            prod[:k, plan.order] = grouped[:k]
        out[start:start + k] = _ratios(prod[:k], plan.queries)
    return out


def _ratios(prod: np.ndarray, queries: tuple[TaskQuery, ...]) -> np.ndarray:
    """(rows, T) float64 scores from the products `prod` (rows, every query's num rows, then dens)."""
    out = np.empty((len(prod), len(queries)), np.float64)
    i, j = 0, sum(len(q.num) for q in queries)
    for t, q in enumerate(queries):
        r = len(q.num)
        part = prod[:, i:i + r]
        i += r
        if q.den is not None:
            part = np.clip(part / np.sqrt(np.maximum(prod[:, j:j + r], 1e-12)), -1.0, 1.0)
            j += r
        out[:, t] = part @ q.coef.astype(np.float64)
    return out
