"""Model and task embeddings, and scores (SPEC section 1).

Shapes: probe features of a candidate `h` (N, k); baseline features `z` (N, d).
Model embedding: diagonal coverage `v` (d,) in [0, 1], full coverage matrix `C` (d, d)
stored as its upper triangle (d(d+1)/2,). Task embedding: `u` (d,) summing to 1, or `G`
(d, d) with trace 1, stored as a *weight vector* of the table's width so that the score
of every model is one dot product with its stored vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selection.errors import DataError, ModelError

FORMS = ("full", "diagonal")
TASK_METHODS = ("probe", "fisher")
# Relative ridge strengths searched by generalised cross-validation (times mean s^2).
RIDGE_GRID = tuple(10.0 ** p for p in np.arange(-6.0, 2.01, 0.5))


def embedding_width(form: str, d: int) -> int:
    if form == "full":
        return d * (d + 1) // 2
    if form == "diagonal":
        return d
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def triu(mat: np.ndarray) -> np.ndarray:
    """Upper triangle (diagonal included), row-major."""
    return mat[np.triu_indices(mat.shape[0])]


def untriu(vec: np.ndarray, d: int) -> np.ndarray:
    mat = np.zeros((d, d), dtype=np.float64)
    mat[np.triu_indices(d)] = vec
    return mat + np.triu(mat, 1).T


def ridge_gcv(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...] = RIDGE_GRID
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Affine ridge regression x -> y with the strength chosen by GCV.

    x (n, k), y (n, t). Returns (B (k, t), intercept (t,), alpha). Deterministic.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    keep = s > s[0] * 1e-10 if s.size and s[0] > 0 else np.zeros_like(s, bool)
    u, s, vt = u[:, keep], s[keep], vt[keep]
    n = x.shape[0]
    if s.size == 0:
        return np.zeros((x.shape[1], y.shape[1])), my, float("inf")
    uty = u.T @ yc
    s2 = s ** 2
    scale = s2.mean()
    best = (np.inf, None)
    resid_out = (yc ** 2).sum() - (uty ** 2).sum()  # part of y outside span(u)
    for rel in grid:
        alpha = rel * scale
        shrink = s2 / (s2 + alpha)
        resid = resid_out + (((1 - shrink)[:, None] * uty) ** 2).sum()
        dof = shrink.sum()
        gcv = resid / max(n - dof, 1e-9) ** 2
        if gcv < best[0]:
            best = (gcv, alpha)
    alpha = float(best[1])
    coef = vt.T @ ((s / (s2 + alpha))[:, None] * uty)
    return coef, my - mx @ coef, alpha


@dataclass(frozen=True, eq=False)
class ModelEmbedding:
    coverage: np.ndarray  # (d,) diagonal form
    full: np.ndarray      # (d(d+1)/2,) upper triangle of C
    alpha: float

    def vector(self, form: str) -> np.ndarray:
        return (self.full if form == "full" else self.coverage).astype(np.float32)


def model_embedding(h: np.ndarray, z: np.ndarray, fit_idx: np.ndarray, val_idx: np.ndarray,
                    model_id: str = "model") -> ModelEmbedding:
    """How much of the baseline feature space z the features h reproduce (fit on P_fit, measured on P_val)."""
    if h.ndim != 2 or h.shape[0] != z.shape[0]:
        raise ModelError(f"model {model_id!r}: features should be (N={z.shape[0]}, k), got {h.shape}")
    if not np.isfinite(h).all():
        raise ModelError(f"model {model_id!r} produced non-finite (NaN/inf) features")
    h64 = h.astype(np.float64)
    # Centre on P_fit and scale by one global factor: a per-column rescaling would move the
    # row space and stop a model from reproducing features that are linear in its own.
    h64 = h64 - h64[fit_idx].mean(0)
    h64 /= max(float(np.sqrt((h64[fit_idx] ** 2).mean())), 1e-30)
    coef, icpt, alpha = ridge_gcv(h64[fit_idx], z[fit_idx])
    z_val = z[val_idx].astype(np.float64)
    z_hat = h64[val_idx] @ coef + icpt
    sse = ((z_val - z_hat) ** 2).sum(0)
    sst = ((z_val - z_val.mean(0)) ** 2).sum(0)
    coverage = np.clip(1.0 - sse / np.maximum(sst, 1e-12), 0.0, 1.0)
    zc, hc = z_val - z_val.mean(0), z_hat - z_hat.mean(0)
    cross = hc.T @ zc / max(len(val_idx) - 1, 1)
    full = 0.5 * (cross + cross.T)
    return ModelEmbedding(coverage, triu(full), alpha)


def _check_task(z: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise DataError(f"task {name!r}: features (n, d) and labels (n,) expected, got {z.shape} "
                        f"and {labels.shape}")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError(f"task {name!r} has {len(classes)} class(es); at least 2 are needed")
    return classes


def task_matrix(z: np.ndarray, labels: np.ndarray, method: str = "probe", name: str = "task") -> np.ndarray:
    """Task embedding as a (d, d) PSD matrix G with trace 1; its diagonal is the diagonal form u."""
    classes = _check_task(z, labels, name)
    z = z.astype(np.float64)
    if method == "probe":
        y = (labels[:, None] == classes[None, :]).astype(np.float64)
        w, _, _ = ridge_gcv(z, y)                       # (d, C)
        g = w @ w.T
    elif method == "fisher":
        mu = z.mean(0)
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


def task_weights(g: np.ndarray, form: str) -> np.ndarray:
    """The weight vector w with score = <stored embedding, w>.

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
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def scores(embeddings: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(m, D) stored embeddings x (T, D) task weights -> (m, T) scores: one matrix product."""
    return embeddings.astype(np.float32, copy=False) @ weights.astype(np.float32, copy=False).T
