import numpy as np
import pytest

from selection.embedding import (embedding_width, model_embedding, ridge_gcv, scores, task_matrix,
                                 task_weights, triu, untriu)
from selection.errors import DataError, ModelError


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


def test_coverage_of_features_that_contain_z_is_one_and_noise_is_low(rng):
    h, z, fit, val = _setup(rng)
    own = model_embedding(h, z, fit, val)
    assert own.coverage.min() > 0.99
    noise = model_embedding(rng.normal(size=h.shape), z, fit, val)
    assert noise.coverage.mean() < 0.2
    # Full form: diagonal of C is close to the coverage when the fit is good.
    c = untriu(own.full, z.shape[1])
    assert np.allclose(np.diag(c), np.var(z[val], axis=0, ddof=1), rtol=0.05)


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


def test_task_embedding_rejects_one_class(rng):
    with pytest.raises(DataError, match="1 class"):
        task_matrix(rng.normal(size=(10, 4)), np.zeros(10, int), name="t")


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
