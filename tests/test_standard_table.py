import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import selection
from selection.catalog import CatalogEntry
from selection.embedder import embed_entry, needs_embedding
from selection.errors import StandardMismatchError, StoreError
from selection.standard import build_standard, load_standard, plan_standard, save_standard
from selection.table import delete_row, load_table, read_index, row_path
from tests.conftest import TINY_BASELINE, tiny_config

A = CatalogEntry("zoo/a", "resnet10t", None, input_size=32)
B = CatalogEntry("zoo/b", "regnetx_002", None, input_size=32)
C = CatalogEntry("zoo/c", "mobilenetv3_small_050", None, input_size=32)


def _emb(store, std, model_id):
    return pq.read_table(os.path.join(store.root, row_path(std.id, model_id))).column("embedding")[0].as_py()


def test_standard_id_changes_with_every_input():
    base = plan_standard(tiny_config())[0]["standard_id"]
    variants = [tiny_config(d=6), tiny_config(form="diagonal"), tiny_config(form="per-source"),
                tiny_config(split_seed=1),
                tiny_config(fit_fraction=0.6), tiny_config(input_size=40),
                tiny_config(probe_sources=("builtin:textures?n=80",)),
                tiny_config(baseline=dataclasses.replace(TINY_BASELINE, id="other-seed"))]
    ids = {plan_standard(c)[0]["standard_id"] for c in variants}
    assert base not in ids and len(ids) == len(variants)
    assert plan_standard(tiny_config())[0]["standard_id"] == base  # and is stable


def test_standard_roundtrip_and_tamper_refused(published):
    store, std = published
    again = load_standard(store)
    assert again.id == std.id and np.array_equal(again.z, std.z)
    assert np.array_equal(again.probe_images, std.probe_images)
    spec = json.loads(store.read_bytes(f"standards/{std.id}/standard.json"))
    spec["d"] = 9
    store.write_bytes(f"standards/{std.id}/standard.json", json.dumps(spec).encode())
    with pytest.raises(StandardMismatchError, match="does not hash to its id"):
        load_standard(store, std.id)


def test_whitened_baseline_features(tiny_standard):
    z_fit = tiny_standard.z[tiny_standard.fit_idx]
    assert np.allclose(z_fit.mean(0), 0, atol=1e-8)
    assert np.allclose(np.cov(z_fit, rowvar=False), np.eye(tiny_standard.d), atol=1e-6)


def test_baseline_covers_itself_and_random_net_is_lower(published):
    store, std = published
    assert embed_entry(TINY_BASELINE, std, store).status == "embedded"
    r = embed_entry(C, std, store)
    assert r.status == "embedded", r.reason

    def coverage(model_id):
        return np.mean(pq.read_table(os.path.join(store.root, row_path(std.id, model_id)))
                       .column("coverage")[0].as_py())

    assert coverage(TINY_BASELINE.id) > 0.99
    assert coverage(C.id) < 0.9 * coverage(TINY_BASELINE.id)
    table = load_table(store, std)
    flags = dict(zip(table.model_ids, table.meta.column("is_baseline").to_pylist()))
    assert flags == {TINY_BASELINE.id: True, C.id: False}


def test_isolation_and_determinism(published, tmp_path):
    store, std = published
    assert embed_entry(A, std, store).status == "embedded"
    alone = _emb(store, std, A.id)
    path_a = os.path.join(store.root, row_path(std.id, A.id))
    stat_a = os.stat(path_a)
    with open(path_a, "rb") as fh:
        bytes_a = fh.read()
    for e in (B, C):
        assert embed_entry(e, std, store).status == "embedded"
    assert delete_row(store, std, B.id)
    assert os.stat(path_a).st_mtime_ns == stat_a.st_mtime_ns  # others never touch its object
    with open(path_a, "rb") as fh:
        assert fh.read() == bytes_a
    table = load_table(store, std)
    assert sorted(table.model_ids) == sorted([A.id, C.id])
    among = table.embeddings[table.model_ids.index(A.id)]
    assert np.array_equal(np.asarray(alone, np.float32), among)  # bit-identical
    # Deterministic: embedding again in a fresh store gives identical numbers.
    other = type(store)(str(tmp_path / "again"))
    save_standard(other, std)
    embed_entry(A, std, other)
    assert _emb(other, std, A.id) == alone


def test_rerun_is_skipped_when_digest_unchanged(published):
    store, std = published
    assert needs_embedding(A, read_index(store, std).get(A.id))
    embed_entry(A, std, store)
    assert not needs_embedding(A, read_index(store, std).get(A.id))
    assert needs_embedding(dataclasses.replace(A, input_size=40), read_index(store, std).get(A.id))


def test_mixing_standards_and_widths_refused(published, tmp_path):
    store, std = published
    embed_entry(A, std, store)
    other = build_standard(tiny_config(d=6))
    save_standard(store, other, make_default=False)
    # Plant a row of the other standard in this standard's folder.
    embed_entry(B, other, store)
    src = row_path(other.id, B.id)
    store.write_bytes(row_path(std.id, B.id), store.read_bytes(src))
    with pytest.raises(StandardMismatchError, match="refusing to mix standards"):
        load_table(store, std)


def test_schema_version_mismatch_refused(published, monkeypatch):
    store, std = published
    embed_entry(A, std, store)
    monkeypatch.setattr(selection, "SCHEMA_VERSION", 99)
    with pytest.raises(StandardMismatchError):
        load_table(store, std)


def test_corrupt_parquet_is_a_clear_error(published):
    store, std = published
    embed_entry(A, std, store)
    store.write_bytes(row_path(std.id, A.id), b"PAR1 this is not parquet")
    with pytest.raises(StoreError, match="corrupt Parquet object"):
        load_table(store, std)


def test_failing_model_reported(published, tmp_path):
    store, std = published
    bad = CatalogEntry("zoo/bad", "resnet10t", str(tmp_path / "missing.safetensors"))
    r = embed_entry(bad, std, store)
    assert r.status == "failed" and "checkpoint not found" in r.reason
    unknown = CatalogEntry("zoo/unknown", "no_such_arch_xyz", None)
    r = embed_entry(unknown, std, store)
    assert r.status == "failed" and "unknown timm architecture 'no_such_arch_xyz'" in r.reason
    assert store.list("embeddings", ".parquet") == []


def test_table_readable_as_plain_parquet(published):
    store, std = published
    embed_entry(A, std, store)
    embed_entry(C, std, store)
    import pyarrow.dataset as ds

    t = ds.dataset(os.path.join(store.root, "embeddings", std.id), format="parquet").to_table()
    assert t.num_rows == 2 and t.schema.field("embedding").type.list_size == std.width


def test_compaction_keeps_the_table_and_updates_stay_single_object(published):
    from selection.table import compact, list_markers, list_rows, list_segments, marker_path

    store, std = published
    for e in (A, B, C):
        embed_entry(e, std, store)
    before = load_table(store, std)
    res = compact(store, std, segment_rows=2)
    assert res.segments_written == 2 and res.rows == 3 and res.objects_removed == 3
    assert list_rows(store, std.id) == [] and len(list_segments(store, std.id)) == 2
    after = load_table(store, std)
    order = [after.model_ids.index(m) for m in before.model_ids]
    assert np.array_equal(after.embeddings[order], before.embeddings)
    # The index (used to skip unchanged models) reads segments too.
    assert not needs_embedding(A, read_index(store, std).get(A.id))

    # Remove one compacted model: no row object to delete, one marker written.
    objects = set(store.list("embeddings"))
    assert delete_row(store, std, B.id)
    assert set(store.list("embeddings")) - objects == {marker_path(std.id, B.id)}
    assert sorted(load_table(store, std).model_ids) == sorted([A.id, C.id])
    # Re-adding writes one row object, which overrides the marker.
    embed_entry(B, std, store)
    assert sorted(load_table(store, std).model_ids) == sorted([A.id, B.id, C.id])
    # Replacing a compacted model: the new row object wins over the segment row.
    changed = dataclasses.replace(A, input_size=40)
    embed_entry(changed, std, store)
    t = load_table(store, std)
    assert t.meta.column("input_size").to_pylist()[t.model_ids.index(A.id)] == 40
    assert len(t) == 3
    compact(store, std)
    t2 = load_table(store, std)
    assert sorted(t2.model_ids) == sorted(t.model_ids) and list_markers(store, std.id) == []
    assert t2.meta.column("input_size").to_pylist()[t2.model_ids.index(A.id)] == 40


def test_sharded_sweep_equals_whole_sweep(published):
    from selection.select import sweep, sweep_shards
    from selection.table import compact, iter_shards

    store, std = published
    for e in (A, B, C):
        embed_entry(e, std, store)
    compact(store, std, segment_rows=1)
    embed_entry(dataclasses.replace(C, id="zoo/d"), std, store)
    w = np.random.default_rng(0).random((2, std.width))
    whole = sweep(load_table(store, std), w, 3)
    sharded = sweep_shards(iter_shards(store, std), w, 3)
    assert [[(r.model_id, round(r.score, 5)) for r in t] for t in whole] == \
        [[(r.model_id, round(r.score, 5)) for r in t] for t in sharded]


def test_out_of_memory_halves_the_batch_then_reports(published, monkeypatch):
    import selection.embedder as embedder

    store, std = published
    real = embedder.extract_features
    seen = []

    def flaky(loaded, images, *, batch_size, **kw):
        seen.append(batch_size)
        if batch_size > 16:
            raise embedder.ModelError(f"model {loaded.entry.id!r}: out of memory at batch size {batch_size}")
        return real(loaded, images, batch_size=batch_size, **kw)

    monkeypatch.setattr(embedder, "extract_features", flaky)
    assert embed_entry(A, std, store, batch_size=64).status == "embedded"
    assert seen == [64, 32, 16]

    def always(loaded, images, *, batch_size, **kw):
        raise embedder.ModelError(f"model {loaded.entry.id!r}: out of memory at batch size {batch_size}")

    monkeypatch.setattr(embedder, "extract_features", always)
    r = embed_entry(B, std, store, batch_size=64)
    assert r.status == "failed" and "out of memory at batch size 8" in r.reason


def test_per_source_standard_end_to_end(store):
    """A per-source standard: rows of its width, tasks assigned to their source, the baseline first."""
    from selection.data import load_dataset
    from selection.embedding import RankQuery, TaskQuery
    from selection.errors import ConfigError
    from selection.select import SelectConfig, embed_task, sweep, sweep_shards
    from selection.table import compact, iter_shards

    with pytest.raises(ConfigError, match="'builtin:photos\\?n=6'.* 6 images"):
        plan_standard(tiny_config(form="per-source", probe_sources=("builtin:textures?n=40", "builtin:photos?n=6")))
    std = build_standard(tiny_config(form="per-source"))
    save_standard(store, std)
    assert std.width == (1 + 2 * 4) * 8 * 9 // 2 and np.bincount(std.sources).tolist() == [60, 40, 40, 60]
    assert load_standard(store).sources.tolist() == std.sources.tolist()
    for e in (TINY_BASELINE, A, C):
        assert embed_entry(e, std, store).status == "embedded"
    table = load_table(store, std)
    assert table.embeddings.shape == (3, std.width)
    task = load_dataset("builtin:digits?split=test&n=40", 32)
    emb = embed_task(std, task, SelectConfig(task_image_size=32))
    assert emb.source_weights.argmax() == 1  # the digits probe source
    query = emb.query(std, "per-source")
    assert query.den is not None
    default = emb.query(std)  # the mean of the per-source and full ranks
    assert isinstance(default, RankQuery) and default.parts[0].den is not None and default.parts[1].den is None
    ranked = sweep(table, [query, emb.query(std, "full"), default], 3)
    assert [r[0].model_id for r in ranked] == [TINY_BASELINE.id] * 3
    assert ranked[0][0].score == pytest.approx(1.0, abs=0.03)  # the baseline: correlation ~1 with itself
    assert ranked[2][0].score == 1.0 and ranked[2][0].parts == pytest.approx(
        (ranked[0][0].score, ranked[1][0].score), rel=1e-5)  # first under both forms
    compact(store, std, segment_rows=1)
    sharded = sweep_shards(iter_shards(store, std), [query, default], 3)
    for whole, parts in zip((ranked[0], ranked[2]), sharded):
        assert [(r.model_id, round(r.score, 5)) for r in parts] == [(r.model_id, round(r.score, 5)) for r in whole]
    with pytest.raises(ConfigError, match="'diagonal'"):
        emb.query(std, "diagonal")
    full_std = dataclasses.replace(std, spec={**std.spec, "form": "full"})
    with pytest.raises(ConfigError, match="'rank-mean' needs a 'per-source' table.*'full'"):
        emb.query(full_std, "rank-mean")
    assert isinstance(emb.query(full_std), TaskQuery)
