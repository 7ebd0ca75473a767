import numpy as np
import pytest

from selection.embedding import (RIDGE_GCV, TaskQuery, column_groups, embedding_width, linear_queries,
                                 model_embedding, plan_queries, predictive_share, query_scores, ridge_gcv,
                                 source_covariance, source_weights, task_matrix, task_query, task_weights, triu,
                                 untriu, weigh_parts)
from selection.errors import DataError, ModelError


def scores(e, w):
    """The linear forms' scores through the library's sweep scoring."""
    return query_scores(e, linear_queries(w))


def _setup(rng, n=300, d=6, k=40):
    h = rng.normal(size=(n, k))
    z = h[:, :d] @ rng.normal(size=(d, d)) * 0.5
    z = (z - z.mean(0)) / z.std(0)
    idx = rng.permutation(n)
    return h, z, np.sort(idx[: n * 2 // 3]), np.sort(idx[n * 2 // 3:])


def test_ridge_recovers_a_linear_map(rng):
    x = rng.normal(size=(200, 10))
    b = rng.normal(size=(10, 3))
    coef, icpt, alpha = ridge_gcv(x, x @ b + 2.0)
    assert np.allclose(coef, b, atol=1e-3) and np.allclose(icpt, 2.0, atol=1e-3)
    assert alpha < 1e-2
    # a 1-D y broadcast to a (k, k) answer and a wrong strength, without an error (a review, session 43)
    from selection.errors import DataError

    one = ridge_gcv(x, (x @ b)[:, :1])
    assert one[0].shape == (10, 1) and np.allclose(one[0][:, 0], b[:, 0], atol=1e-3)
    with pytest.raises(DataError, match=r"ridge_gcv needs x \(n, k\) and y \(n, t\), got \(200, 10\) and \(200,\)"):
        ridge_gcv(x, (x @ b)[:, 0])


def _closed_form_ridge(x, y, alpha):
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)


@pytest.mark.parametrize("n,k", [(60, 200), (200, 30)])
def test_ridge_trace_scale_is_the_ridge_at_its_strength_and_the_rank_scale_at_full_rank(rng, n, k):
    """The Gram-matrix solve (`trace`) is the closed-form ridge at the strength it chose, for wide and
    narrow x; at full rank both scales search the same strengths and give the same fit. On x of exact
    low rank the SVD's scale counts only the resolved directions, so the searched strengths differ
    (why a standard records its scale)."""
    x = rng.normal(size=(n, k))
    y = x[:, :5] @ rng.normal(size=(5, 3)) + rng.normal(size=(n, 3))
    coef, icpt, alpha = ridge_gcv(x, y, scale="trace")
    assert np.allclose(coef, _closed_form_ridge(x, y, alpha), rtol=1e-6, atol=1e-9)
    assert np.allclose(icpt, y.mean(0) - x.mean(0) @ coef)
    coef_r, icpt_r, alpha_r = ridge_gcv(x, y, scale="rank")
    assert np.isclose(alpha, alpha_r, rtol=1e-9)
    assert np.allclose(coef, coef_r, rtol=1e-6, atol=1e-9) and np.allclose(icpt, icpt_r, atol=1e-9)
    low = rng.normal(size=(n, 4)) @ rng.normal(size=(4, k))
    coef, _, alpha = ridge_gcv(low, y, scale="trace")
    assert np.allclose(coef, _closed_form_ridge(low, y, alpha), rtol=1e-6, atol=1e-9)
    assert not np.isclose(alpha, ridge_gcv(low, y, scale="rank")[2], rtol=1e-3)
    with pytest.raises(ValueError, match="got 'svd'"):
        ridge_gcv(x, y, scale="svd")


def _exact_loo_strength(x, y, grid, scale_ref):
    """The grid strength with the lowest leave-one-out error of the affine ridge, by refitting n times."""
    errs = []
    for rel in grid:
        err = 0.0
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            coef = _closed_form_ridge(x[keep], y[keep], rel * scale_ref)
            icpt = y[keep].mean(0) - x[keep].mean(0) @ coef
            err += ((x[i] @ coef + icpt - y[i]) ** 2).sum()
        errs.append(err)
    return grid[int(np.argmin(errs))]


DRAWS = 20  # the ridge-strength properties below hold for most draws of the data, not every one


@pytest.mark.parametrize("n,k", [(40, 120), (60, 59), (150, 20)])
def test_gcv_counting_the_intercept_picks_the_leave_one_out_strength(n, k):
    """GCV of the affine fit counts the intercept's degree of freedom: on wide x (k >= n - 1) GCV
    without it tends to 0 with the strength and picks the grid's weakest ridge (an interpolation),
    with it GCV picks the strength that exact leave-one-out picks; on narrow x the two agree. Stated
    over 20 draws: on 100 draws affine GCV was within one grid step of leave-one-out on 93-100 %, and
    where leave-one-out wants a ridge (>= 1000x the weakest) it was > 100x slopes GCV's on 89-94 %."""
    from selection.embedding import RIDGE_GRID

    near = weakest = wanted = ahead = 0
    for seed in range(DRAWS):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, k)) / np.sqrt(np.arange(1, k + 1))  # a decaying spectrum
        y = x @ rng.normal(size=(k, 4)) + 0.5 * rng.normal(size=(n, 4))
        _, _, slopes = ridge_gcv(x, y, scale="trace", gcv="slopes")
        coef, icpt, affine = ridge_gcv(x, y, scale="trace", gcv="affine")
        ref = float(((x - x.mean(0)) ** 2).sum()) / min(n - 1, k)
        assert np.allclose(coef, _closed_form_ridge(x, y, affine), rtol=1e-6, atol=1e-9)
        loo = _exact_loo_strength(x, y, RIDGE_GRID, ref)
        near += abs(np.log10(affine / ref) - np.log10(loo)) <= 0.5 + 1e-9  # within one grid step
        if k >= n - 1:
            weakest += bool(np.isclose(slopes, RIDGE_GRID[0] * ref))
            wanted += loo >= 1000 * RIDGE_GRID[0]
            ahead += loo >= 1000 * RIDGE_GRID[0] and affine > 100 * slopes
        else:
            assert np.isclose(slopes, affine, rtol=0.5) or abs(np.log10(slopes / affine)) <= 0.5 + 1e-9
    assert near >= 0.8 * DRAWS, near
    if k >= n - 1:
        assert weakest >= 0.8 * DRAWS and wanted >= 0.25 * DRAWS and ahead >= 0.8 * wanted, (weakest, wanted, ahead)
    with pytest.raises(ValueError, match="got 'both'"):
        ridge_gcv(x, y, gcv="both")


def test_probe_task_matrix_of_a_few_shot_task_is_the_leave_one_out_ridge():
    """The probe task embedding's ridge (one-hot labels on z) has the strength exact leave-one-out
    picks, within one grid step, also when the task has fewer images than z has features; it is
    not the grid's weakest ridge (an interpolation of the labels). Stated over 20 draws (on 100, 91 % of
    draws had both)."""
    from selection.embedding import RIDGE_GRID

    n_per, d = 8, 64
    labels = np.repeat(np.arange(3), n_per)
    y = np.eye(3)[labels]
    near = not_weakest = 0
    for seed in range(DRAWS):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(len(labels), d)) / np.sqrt(np.arange(1, d + 1))
        z[:, :3] += 0.6 * np.eye(3)[labels]
        s = np.linalg.svd(z - z.mean(0), compute_uv=False)
        ref = float((s[s > s[0] * 1e-10] ** 2).mean())  # the `rank` scale task_matrix searches with
        loo = _exact_loo_strength(z, y, RIDGE_GRID, ref)

        def g_at(rel):
            w = _closed_form_ridge(z, y, rel * ref)
            return w @ w.T / np.trace(w @ w.T)

        g = task_matrix(z, labels, "probe")
        near += any(np.allclose(g, g_at(rel), atol=1e-6) for rel in RIDGE_GRID
                    if abs(np.log10(rel) - np.log10(loo)) <= 0.5 + 1e-9)
        not_weakest += not np.allclose(g, g_at(RIDGE_GRID[0]), atol=1e-3)
    assert near >= 0.8 * DRAWS and not_weakest >= 0.8 * DRAWS, (near, not_weakest)


def test_coverage_of_features_that_contain_z_is_one_and_noise_is_low(rng):
    h, z, fit, val = _setup(rng)
    own = model_embedding(h, z, fit, val)
    assert own.coverage.min() > 0.99
    noise = model_embedding(rng.normal(size=h.shape), z, fit, val)
    assert noise.coverage.mean() < 0.2
    # Full form: diagonal of C is close to the variance of z when the fit is good; cross-fitted
    # (the default) it is measured on every image, on the single split on P_val only.
    c = untriu(own.full, z.shape[1])
    assert np.allclose(np.diag(c), np.var(z, axis=0, ddof=1), rtol=0.05)
    split = model_embedding(h, z, fit, val, full_crossfit=None)
    assert split.coverage.min() > 0.99
    assert np.allclose(np.diag(untriu(split.full, z.shape[1])), np.var(z[val], axis=0, ddof=1), rtol=0.05)


def test_cross_fitted_full_form_is_the_mean_over_fold_draws_of_held_out_predictions(rng):
    """Each repeat predicts every image from a ridge fitted on the other folds; C and the coverage
    are measured on all the images and averaged over the repeats (checked by refitting by hand)."""
    h, z, fit, val = _setup(rng, k=12)
    h = h + 0.3 * rng.normal(size=h.shape)
    emb = model_embedding(h, z, fit, val, full_crossfit=(4, 3))
    hs = h - h[fit].mean(0)
    hs /= np.sqrt((hs[fit] ** 2).mean())
    cs, covs = [], []
    for r in range(3):
        zh = np.zeros_like(z)
        perm = np.random.default_rng(r).permutation(len(z))
        for f in range(4):
            test = perm[f::4]
            train = np.setdiff1d(perm, test)
            coef, icpt, _ = ridge_gcv(hs[train], z[train], scale="trace", gcv=RIDGE_GCV)
            zh[test] = hs[test] @ coef + icpt
        cs.append(np.cov(np.concatenate([zh, z], 1), rowvar=False)[:6, 6:])
        covs.append(np.clip(1 - ((z - zh) ** 2).sum(0) / ((z - z.mean(0)) ** 2).sum(0), 0, 1))
    c = np.mean(cs, 0)
    assert np.allclose(untriu(emb.full, 6), 0.5 * (c + c.T), atol=1e-8)
    assert np.allclose(emb.coverage, np.mean(covs, 0), atol=1e-8)
    assert not np.allclose(emb.full, model_embedding(h, z, fit, val, full_crossfit=(4, 1)).full, atol=1e-8)


def test_partial_features_cover_part(rng):
    h, z, fit, val = _setup(rng)
    part = model_embedding(h[:, :3] , z, fit, val)  # only 3 of the 6 driving features
    assert 0.1 < part.coverage.mean() < 0.9


def test_model_embedding_rejects_nan(rng):
    h, z, fit, val = _setup(rng)
    h[3, 2] = np.nan
    with pytest.raises(ModelError, match="non-finite"):
        model_embedding(h, z, fit, val, "m")


@pytest.mark.parametrize("method", ["probe", "fisher"])
def test_task_embedding_normalised(rng, method):
    z = rng.normal(size=(120, 6))
    y = np.repeat([0, 1, 2], 40)
    z[:, 2] += 3 * y  # only feature 2 carries the labels
    g = task_matrix(z, y, method)
    assert np.isclose(np.trace(g), 1.0)
    u = task_weights(g, "diagonal")
    assert np.isclose(u.sum(), 1.0) and u.argmax() == 2 and u[2] > 0.5
    assert np.all(np.linalg.eigvalsh(g) > -1e-9)


def test_predictive_share_is_near_one_for_separable_labels_and_near_zero_for_noise(rng):
    y = np.repeat([0, 1, 2], 40)
    z = rng.normal(size=(120, 4))
    assert abs(predictive_share(z, y)) < 0.1
    z[:, :3] += 20 * (y[:, None] == np.arange(3))  # each class on a feature of its own: linear in z
    assert predictive_share(z, y) > 0.9


def test_weigh_parts_scales_each_part_by_how_well_it_predicts_the_labels(rng):
    y = np.repeat([0, 1, 2], 40)
    z = rng.normal(size=(120, 6))
    z[:, 4] += 2 * y                               # the labels are in the second part only
    z[:, 1] += 0.3 * rng.normal(size=120) + 0.3 * y  # and weakly in the first
    g = task_matrix(z, y, "fisher")
    r = [max(predictive_share(z[:, :3], y), 1e-3), max(predictive_share(z[:, 3:], y), 1e-3)]
    assert r[1] > 2 * r[0]
    w = weigh_parts(g, z, y, (3, 3))
    assert np.isclose(np.trace(w), 1.0) and np.all(np.linalg.eigvalsh(w) > -1e-9)
    # Block by block: G's entries times sqrt(R_p R_q), up to the one trace normalisation.
    scale = np.sqrt(np.repeat(r, 3))
    expect = g * np.outer(scale, scale)
    assert np.allclose(w, expect / np.trace(expect))
    # The second part's share of the trace grows against G's own.
    assert np.trace(w[3:, 3:]) > np.trace(g[3:, 3:])
    assert weigh_parts(g, z, y, (6,)) is g
    with pytest.raises(ValueError, match=r"part widths \(3, 2\) should add up to d = 6"):
        weigh_parts(g, z, y, (3, 2))


def test_task_embedding_rejects_one_class(rng):
    with pytest.raises(DataError, match="1 class"):
        task_matrix(rng.normal(size=(10, 4)), np.zeros(10, int), name="t")
    # non-finite features or labels are named (they were "the labels carry no signal", or a NaN class)
    z = rng.normal(size=(10, 4))
    z[2, 1] = np.inf
    with pytest.raises(DataError, match=r"task 't': its features hold 1 non-finite value\(s\)"):
        task_matrix(z, np.arange(10) % 2, name="t")
    with pytest.raises(DataError, match="task 't': its labels hold non-finite values"):
        task_matrix(rng.normal(size=(4, 4)), np.array([0.0, 1.0, np.nan, 1.0]), name="t")


@pytest.mark.parametrize("method", ["fisher", "probe"])
def test_task_embedding_rejects_labels_that_differ_by_float_noise_only(rng, method):
    z = np.tile(rng.normal(size=(1, 6)), (40, 1))  # the same image under two labels
    y = np.repeat([0, 1], 20)
    with pytest.raises(DataError, match="labels carry no signal"):
        task_matrix(z + 1e-7 * rng.normal(size=z.shape), y, method, name="t")
    z[:, 0] += 1e-3 * y  # a small real difference is signal
    assert np.isclose(np.trace(task_matrix(z, y, method)), 1.0)


def test_score_is_the_documented_formula(rng):
    d = 5
    a = rng.normal(size=(d, d))
    c = (a + a.T) / 2
    b = rng.normal(size=(d, 3))
    g = b @ b.T
    g /= np.trace(g)
    full = scores(triu(c)[None], task_weights(g, "full")[None])[0, 0]
    assert np.isclose(full, np.sum(c * g) / np.trace(g), rtol=1e-5)
    v = rng.random(d)
    diag = scores(v[None], task_weights(g, "diagonal")[None])[0, 0]
    assert np.isclose(diag, np.sum(np.diag(g) * v), rtol=1e-5)
    assert embedding_width("full", d) == len(triu(c)) == 15 and embedding_width("diagonal", d) == d


def test_scores_many_tasks_one_product(rng):
    e = rng.random((50, 15)).astype(np.float32)
    w = rng.random((4, 15))
    s = scores(e, w)
    assert s.shape == (50, 4) and np.allclose(s[:, 1], e @ w[1].astype(np.float32), rtol=1e-5)


# -- per-source form -----------------------------------------------------------------------

def _two_sources(rng, n=120, d=4, k=30):
    """Two probe sources; z is a linear function of h[:, :d] in source 0 and of h[:, d:2d] in source 1."""
    h = rng.normal(size=(2 * n, k))
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    z = np.concatenate([h[:n, :d] @ a, h[n:, d:2 * d] @ b + 3.0])
    sources = np.repeat([0, 1], n)
    idx = rng.permutation(2 * n)
    return h, z, np.sort(idx[:160]), np.sort(idx[160:]), sources


def test_per_source_vector_holds_the_full_form_then_each_source(rng):
    h, z, fit, val, sources = _two_sources(rng)
    emb = model_embedding(h, z, fit, val, sources=sources)
    d, block = z.shape[1], z.shape[1] * (z.shape[1] + 1) // 2
    vec = emb.vector("per-source")
    assert vec.shape == (embedding_width("per-source", d, 2),) == ((1 + 2 * 2) * block,)
    assert np.allclose(vec[:block], emb.vector("full"))
    # Source 0's block: C_0 and S_0 of features that reproduce z there; C_0 ~ S_0 ~ cov(z in source 0).
    c0, s0 = untriu(vec[block:2 * block], d), untriu(vec[2 * block:3 * block], d)
    assert np.allclose(c0, np.cov(z[sources == 0], rowvar=False), rtol=0.1, atol=0.1)
    assert np.allclose(c0, s0, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="probe sources"):
        model_embedding(h, z, fit, val).vector("per-source")


def test_per_source_score_is_the_documented_correlation(rng):
    h, z, fit, val, sources = _two_sources(rng)
    d, block = z.shape[1], z.shape[1] * (z.shape[1] + 1) // 2
    embs = [model_embedding(x, z, fit, val, sources=sources).vector("per-source")
            for x in (h, h[:, :4], rng.normal(size=h.shape))]  # all of it, source 0's part, noise
    b = rng.normal(size=(d, 2))
    g = b @ b.T
    g /= np.trace(g)
    weights = np.array([0.25, 0.75])
    z_cov = source_covariance(z, sources)
    s = query_scores(np.stack(embs), [task_query(g, "per-source", None, weights, z_cov)])[:, 0]
    lam, vecs = np.linalg.eigh(g)
    for e, got in zip(embs, s):
        want = 0.0
        for src in (0, 1):
            c = untriu(e[block * (1 + 2 * src):block * (2 + 2 * src)], d)
            sh = untriu(e[block * (2 + 2 * src):block * (3 + 2 * src)], d)
            for lam_i, u in zip(lam, vecs.T):
                if lam_i > lam.max() * 1e-6:
                    want += weights[src] * lam_i * (u @ c @ u) / np.sqrt((u @ sh @ u) * (u @ z_cov[src] @ u))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert s[0] == pytest.approx(1.0, abs=0.02)  # reproduces z in both sources: correlation 1
    assert s[0] > s[1] > s[2] and abs(s[2]) < 0.3  # source 0 only covers a quarter; noise nothing


def _dense_scores(e, queries):
    """The documented score, one dense float64 product per query (what query_scores computed until session 32)."""
    out = []
    for q in queries:
        s = e.astype(np.float64) @ q.num.T
        if q.den is not None:
            s = np.clip(s / np.sqrt(np.maximum(e.astype(np.float64) @ q.den.T, 1e-12)), -1.0, 1.0)
        out.append(s @ q.coef)
    return np.stack(out, 1)


@pytest.mark.parametrize("align", [1, 32])
def test_query_rows_are_multiplied_with_the_stored_columns_they_weigh_only(rng, monkeypatch, align):
    """A per-source query row weighs one block (C_s or S_s of one source): query_scores multiplies each group of
    rows with its block alone, and the scores are the dense product's, however the rows are split into calls.
    (align 1: every span exactly its block's columns.)"""
    monkeypatch.setattr("selection.embedding.SPAN_ALIGN", align)
    d, n_src = 7, 3
    block, width = d * (d + 1) // 2, embedding_width("per-source", d, n_src)
    emb = rng.normal(size=(301, width)).astype(np.float32)
    b = rng.normal(size=(d, 3))
    g = b @ b.T / np.trace(b @ b.T)
    z_cov = np.stack([np.eye(d)] * n_src)
    queries = [task_query(g, "per-source", width, np.array([0.3, 0.0, 0.7]), z_cov),
               task_query(g, "full", width),
               task_query(g, "per-source", width, np.array([0.0, 1.0, 0.0]), z_cov),
               TaskQuery(np.zeros((1, width)), np.ones(1))]  # weighs nothing: scores 0
    plan = plan_queries(queries)
    spans = [(lo, hi) for lo, hi, _ in plan.groups]
    # the full block, then C_s and S_s of the three sources (widened to multiples of `align` columns)
    assert len(spans) == 7 and spans[0][0] == 0 and spans[-1][1] == width
    assert all(hi - lo <= block + 2 * (align - 1) for lo, hi in spans)
    if align == 1:
        assert spans == [(i * block, (i + 1) * block) for i in range(7)]
    rows = sum(len(q.num) + (0 if q.den is None else len(q.den)) for q in queries)
    assert sum(w.shape[1] for _, _, w in plan.groups) == plan.rows - 1 == rows - 1
    got = query_scores(emb, plan)
    np.testing.assert_allclose(got, _dense_scores(emb, queries), rtol=1e-6, atol=1e-6)
    assert not got[:, 3].any()
    assert np.array_equal(np.concatenate([query_scores(emb[:1], queries), query_scores(emb[1:200], plan),
                                          query_scores(emb[200:], plan)]), got)
    assert query_scores(emb[:0], plan).shape == (0, 4)
    # Rows that weigh the whole vector are one group: splitting them would cost more than it saves.
    dense = linear_queries(rng.normal(size=(3, width)))
    assert [(lo, hi) for lo, hi, _ in column_groups([q.num[0] for q in dense] + [queries[1].num[0]])] == [(0, width)]
    np.testing.assert_allclose(query_scores(emb, dense + queries), _dense_scores(emb, dense + queries),
                               rtol=1e-6, atol=1e-6)
    assert column_groups([np.zeros(width)]) == []
    # A table of another width is refused, not broadcast into the spans; so are queries of two widths.
    with pytest.raises(ValueError, match=f"task queries have width {width}, the stored vectors {width - 1}"):
        query_scores(emb[:, :-1], plan)
    with pytest.raises(ValueError, match="one width"):
        plan_queries(queries + linear_queries(np.ones((1, width + 1))))


def test_task_is_assigned_to_its_nearest_probe_source(rng):
    z_probe = np.concatenate([rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) + 6.0])
    sources = np.repeat([0, 1], 50)
    assert np.allclose(source_weights(rng.normal(size=(20, 3)) + 6.0, z_probe, sources), [0, 1])
    mixed = np.concatenate([rng.normal(size=(5, 3)), rng.normal(size=(15, 3)) + 6.0])
    assert np.allclose(source_weights(mixed, z_probe, sources), [0.25, 0.75])


def test_linear_query_pads_the_full_form_on_a_per_source_table(rng):
    d = 3
    b = rng.normal(size=(d, d))
    g = b @ b.T / np.trace(b @ b.T)
    q = task_query(g, "full", embedding_width("per-source", d, 2))
    assert q.den is None and q.num.shape == (1, 30) and not q.num[0, 6:].any()
    assert np.allclose(q.num[0, :6], task_weights(g, "full"))
    with pytest.raises(ValueError, match="source weights"):
        task_query(g, "per-source")


def test_the_ridge_strength_does_not_depend_on_the_order_of_the_rows():
    """With no more images than dimensions the part of y outside x's span is 0, but was computed as
    +-1e-15, and the affine count's n - 1 - dof cancelled: GCV was noise over noise at the weakest
    ridges, and shuffling a task's rows changed the strength chosen (a review, session 26)."""
    from selection.embedding import ridge_gcv

    rng = np.random.default_rng(1)
    for _ in range(100):
        n, c = int(rng.integers(4, 60)), int(rng.integers(2, 6))
        y = np.arange(n) % c
        z = rng.normal(size=(n, 64)) + 0.7 * rng.normal(size=(c, 64))[y]
        onehot = (y[:, None] == np.arange(c)).astype(float)
        p = rng.permutation(n)
        for gcv in ("affine", "slopes"):
            # the same grid step (the strengths' scale, x's mean s^2, moves by rounding only)
            assert ridge_gcv(z, onehot, gcv=gcv)[2] == pytest.approx(ridge_gcv(z[p], onehot[p], gcv=gcv)[2], rel=1e-9)
