"""Integration: catalog -> embed -> select on a real local Ray, and the jobs' error exits."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image
import timm

from selection.catalog import CatalogEntry, load_catalog, write_catalog
from selection.errors import ConfigError, StoreError, ZooselectError
from selection.table import load_table, row_path
from tests.conftest import save_checkpoint

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from jobs import runtime

    runtime.init(None)
    yield
    ray.shutdown()


@pytest.fixture()
def catalog(tmp_path) -> str:
    ckpt = save_checkpoint(timm.create_model("resnet10t", num_classes=3), str(tmp_path / "r.safetensors"))
    entries = [CatalogEntry("zoo/trained-ish", "resnet10t", ckpt, input_size=32, tags=("t",)),
               CatalogEntry("zoo/regnet", "regnetx_002", None, input_size=32),
               CatalogEntry("zoo/mobilenet", "mobilenetv3_small_050", None, input_size=32, tags=("small",))]
    path = str(tmp_path / "catalog.jsonl")
    write_catalog(entries, path)
    return path


def _mtimes(root: str) -> dict[str, int]:
    out = {}
    for d, _, files in os.walk(os.path.join(root, "embeddings")):
        for f in files:
            out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return out


def test_embed_select_end_to_end(ray_local, published, catalog, tmp_path, capsys):
    from jobs import embed, reindex, select

    store, std = published
    assert embed.main(["--catalog", catalog, "--store", store.url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "summary: 3 embedded, 0 refreshed, 0 skipped, 0 removed, 0 failed" in out
    assert "time per model (mean of 3, 3 actor process(es)): actor start " in out and ", probe pass " in out, out
    before = _mtimes(store.root)
    assert len(before) == 3
    # A rerun is a no-op: nothing embedded, no object rewritten.
    assert embed.main(["--catalog", catalog, "--store", store.url, "--no-progress"]) == 0
    assert "summary: 0 embedded, 0 refreshed, 3 skipped" in capsys.readouterr().out
    assert _mtimes(store.root) == before
    # New tags: that row alone is rewritten, its vectors kept, in the driver (no actor: no time per model)
    entries = load_catalog(catalog)
    retagged = str(tmp_path / "retagged.jsonl")
    write_catalog([dataclasses.replace(entries[0], tags=("t", "new"))] + entries[1:], retagged)
    vectors = load_table(store, std)
    assert embed.main(["--catalog", retagged, "--store", store.url, "--dry-run"]) == 0
    assert "plan: 0 to embed, 1 to refresh, 2 unchanged" in capsys.readouterr().out
    assert embed.main(["--catalog", retagged, "--store", store.url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "summary: 0 embedded, 1 refreshed, 2 skipped" in out and "time per model" not in out, out
    after = load_table(store, std)
    assert after.meta.column("tags").to_pylist()[after.model_ids.index("zoo/trained-ish")] == ["t", "new"]
    np.testing.assert_array_equal(after.embeddings[[after.model_ids.index(m) for m in vectors.model_ids]],
                                  vectors.embeddings)
    assert [p for p, t in _mtimes(store.root).items() if before[p] != t] == [
        os.path.join(store.root, row_path(std.id, "zoo/trained-ish"))]
    write_catalog(entries, catalog)  # as it was, for the rest of this test
    assert embed.main(["--catalog", catalog, "--store", store.url, "--no-progress"]) == 0
    assert "summary: 0 embedded, 1 refreshed, 2 skipped" in capsys.readouterr().out
    before = _mtimes(store.root)

    out_json = str(tmp_path / "res.json")
    out_pq = str(tmp_path / "res.parquet")
    tasks = ["builtin:fashion-mnist?classes=5,7,9&per_class=12", "builtin:digits?classes=0,1&per_class=10"]
    args = ["--store", store.url, "--top-k", "3", "--verify-top-k", "2", "--json", out_json,
            "--parquet", out_pq, "--no-progress"]  # tasks at the standard's probe size, 32 px
    for t in tasks:
        args += ["--task", t]
    assert select.main(args) == 0
    printed = capsys.readouterr().out
    assert "task builtin:fashion-mnist?classes=5,7,9&per_class=12" in printed
    assert f"\nwrote {out_json}\nwrote {out_pq}\nresults saved to " in printed  # where (a review, session 43)
    doc = json.load(open(out_json))
    assert doc["standard_id"] == std.id and [t["task"] for t in doc["tasks"]] == tasks
    for t in doc["tasks"]:
        ranks = t["ranking"]
        assert [r["rank"] for r in ranks] == [1, 2, 3]
        assert {r["model_id"] for r in ranks} == {"zoo/trained-ish", "zoo/regnet", "zoo/mobilenet"}
        verified = [r for r in ranks if r["verified"] is not None]
        assert len(verified) == 2 and all(math.isfinite(r["verified"]) for r in verified)
        assert verified[0]["verified"] >= verified[1]["verified"]
        assert all(isinstance(r["score"], float) and r["score_parts"] is None for r in ranks)
        assert t["scored_by"] == "full"  # the table's own form (the rank mean needs a per-source table)
        assert t["task_image_size"] == 32
        assert (t["top_k"], t["verify_top_k"], t["where"], t["task_path"]) == (3, 2, [], None)  # the query too
    # The job's workers select as the library does in one process (same size, scores, verification).
    from selection.select import SelectConfig, select_models

    # (tasks given as a generator: its check used it up, and the sweep met no task; a review, session 35)
    [lib] = select_models(store, (t for t in tasks[1:]), SelectConfig(top_k=3, verify_top_k=2))
    job = doc["tasks"][1]["ranking"]
    assert [(r.model_id, round(r.score, 9)) for r in lib.ranking] == [(r["model_id"], r["score"]) for r in job]
    assert [r.verified for r in lib.ranking] == pytest.approx([r["verified"] for r in job], rel=1e-6)
    # ... and writes its results as the job does (selection.results; session 42)
    from selection.results import RESULT_SCHEMA, results_table, selection_record

    record = selection_record(tasks[1], lib, SelectConfig(top_k=3, verify_top_k=2), std)
    timings = ("task_embedding_seconds", "sweep_seconds", "total_seconds", "task_path")

    def comparable(rec):
        return {k: ([dict(r, verified=None) for r in v] if k == "ranking" else v) for k, v in rec.items()
                if k not in timings}

    assert comparable(record) == comparable(doc["tasks"][1]) and record["n_verified"] == 2
    assert results_table([record], std.id).schema == RESULT_SCHEMA
    import pyarrow.parquet as pq

    assert pq.read_table(out_pq).num_rows == 6
    assert pq.read_table(out_pq).column("on_pareto_front").null_count == 6  # no --pareto
    got = pq.read_table(out_pq).select(["run_id", "created_at", "models_swept", "where"]).to_pylist()
    assert {r["run_id"] for r in got} == {doc["run_id"]} and {r["models_swept"] for r in got} == {doc["tasks"][0]["models_swept"]}
    assert all(abs(r["created_at"].timestamp() - doc["created_at"]) <= 1e-3 for r in got)
    saved = store.list("results")
    assert len(saved) == 2 and {p.rsplit(".", 1)[1] for p in saved} == {"json", "parquet"}
    assert "results saved to" in printed

    # Constraints filter inside the sweep. `--json -`: the JSON alone on standard output, the table on stderr.
    assert select.main(["--store", store.url, "--task", tasks[0], "--where", "tag=small",
                        "--json", "-", "--no-progress", "--task-image-size", "32"]) == 0
    out, err = capsys.readouterr()
    ranking = json.loads(out)["tasks"][0]["ranking"]
    assert [r["model_id"] for r in ranking] == ["zoo/mobilenet"] and "summary: 1 task(s)" in err
    assert not os.path.exists("-")
    assert select.main(["--store", store.url, "--task", tasks[0], "--where", "params<=1", "--no-save",
                        "--no-progress", "--task-image-size", "32"]) == 0
    assert "no model ranked: none of the 3 models passes --where params<=1 (a value that is unknown" in \
        capsys.readouterr().out

    # Verifying more than are listed: the top 2 are verified and re-ranked, the best of them listed. With
    # --pareto, the front of score against parameters over all 3 models, cheapest first.
    assert select.main(["--store", store.url, "--task", tasks[0], "--top-k", "1", "--verify-top-k", "2",
                        "--verify-by", "ridge-loo", "--json", out_json, "--parquet", out_pq, "--no-save",
                        "--no-progress", "--task-image-size", "32", "--pareto", "params"]) == 0
    printed = capsys.readouterr().out
    assert "verified: ridge probe's leave-one-out error" in printed and "1 task(s)" in printed
    assert ", 2 verified;" in printed
    res = json.load(open(out_json))["tasks"][0]
    assert res["n_verified"] == 2 and len(res["ranking"]) == 1 and res["ranking"][0]["verified"] is not None
    front = res["pareto"]
    assert res["pareto_cost"] == "params" and front and "Pareto front (score against parameters)" in printed
    assert [r["num_params"] for r in front] == sorted(r["num_params"] for r in front)
    assert all(a["score"] < b["score"] for a, b in zip(front, front[1:]))  # each costlier one scores higher
    listed = res["ranking"][0]
    for r in front:  # only the listed model has a rank; a verified one its measurement (listed or not)
        assert r["rank"] == (1 if r["model_id"] == listed["model_id"] else None)
        if r["model_id"] == listed["model_id"]:
            assert r["verified"] == listed["verified"]
    [lib] = select_models(store, [tasks[0]], SelectConfig(top_k=1, verify_top_k=2, verify_by="ridge-loo",
                                                          task_image_size=32, pareto="params"))
    assert [(r.model_id, r.rank or None, r.verified is None) for r in lib.pareto] == \
        [(r["model_id"], r["rank"], r["verified"] is None) for r in front]  # the library's front is the job's
    table = pq.read_table(out_pq).to_pylist()
    assert {r["model_id"] for r in table if r["on_pareto_front"]} == {r["model_id"] for r in front}
    assert table[0]["model_id"] == listed["model_id"] and len(table) == 1 + len({r["model_id"] for r in front}
                                                                                - {listed["model_id"]})
    # A GPU per verification on a cluster without one is refused before any work (Ray would wait for ever).
    with pytest.raises(ConfigError, match=r"a verification needs 1 GPU\(s\) \(--verify-gpus\) but no node has "
                                          r"more than 0 GPUs \(if the cluster adds nodes on demand: --autoscaling\)"):
        select.main(["--store", store.url, "--task", tasks[0], "--verify-top-k", "2", "--verify-gpus", "1",
                     "--no-save", "--no-progress", "--task-image-size", "32"])
    with pytest.raises(ConfigError, match=r"a task embedding needs 0.5 GPU\(s\) \(--task-gpus\) but no node has "
                                          r"more than 0 GPUs"):
        select.main(["--store", store.url, "--task", tasks[0], "--task-gpus", "0.5", "--no-save", "--no-progress",
                     "--task-image-size", "32"])
    with pytest.raises(ConfigError, match="'rank-mean' needs a 'per-source' table.*is 'full'"):
        select.main(["--store", store.url, "--task", tasks[0], "--score", "rank-mean", "--no-save",
                     "--no-progress", "--task-image-size", "32"])

    # A reindex whose actors the cluster cannot hold (a GPU each here) is refused before it changes
    # anything: it removed the models gone from the catalog first (a review, session 28).
    lines = open(catalog).read().splitlines()
    grown = str(tmp_path / "grown.jsonl")
    write_catalog([CatalogEntry.from_dict(json.loads(line)) for line in lines[:2]]
                  + [CatalogEntry("zoo/new", "resnet10t", None, input_size=32)], grown)
    with pytest.raises(ConfigError, match=r"needs 1 GPU\(s\)"):
        reindex.main(["--catalog", grown, "--store", store.url, "--no-progress", "--gpus-per-actor", "1"])
    assert _mtimes(store.root) == before
    # Reindex with one model gone from the catalog removes exactly its object.
    open(catalog, "w").write("\n".join(lines[:2]) + "\n")
    assert reindex.main(["--catalog", catalog, "--store", store.url, "--no-progress"]) == 0
    assert "0 embedded, 0 refreshed, 2 skipped, 1 removed" in capsys.readouterr().out
    after = _mtimes(store.root)
    assert len(after) == 2 and all(before[p] == m for p, m in after.items())

    # A verification that fails (its checkpoint moved away) is counted, and the job exits 1; two tasks
    # that fail to load are both named (only the first was; a review, session 28).
    ckpt = json.loads(lines[0])["weights"]
    os.rename(ckpt, ckpt + ".moved")
    assert select.main(["--store", store.url, "--task", tasks[1], "--verify-top-k", "2", "--json", out_json,
                        "--no-save", "--no-progress"]) == 1
    assert "1 verified, 1 whose verification failed (the warnings above say why)" in capsys.readouterr().out
    failed_row = json.load(open(out_json))["tasks"][0]
    assert failed_row["n_unverified"] == 1 and [r["model_id"] for r in failed_row["ranking"] if r["verify_error"]] \
        == [json.loads(lines[0])["id"]]  # why, in the results too (a review, session 39)
    with pytest.raises(ZooselectError, match=r"^2 of 3 tasks failed: 'builtin:digits\?classes=3,3,7': .*appear more "
                                             r"than once.*; 'builtin:digits\?classes=42,1': .*out of range"):
        select.main(["--store", store.url, "--task", tasks[1], "--task", "builtin:digits?classes=3,3,7",
                     "--task", "builtin:digits?classes=42,1", "--no-save", "--no-progress"])
    # These pass the spec check (before Ray) and fail to load: the local ones before any task is embedded.
    (tmp_path / "no-images").mkdir()
    (tmp_path / "one-class" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one-class" / "a" / "x.png")
    from jobs import runtime

    real_init = runtime.init
    runtime.init = lambda *a: pytest.fail("Ray started before the local tasks were read")  # (session 44: 10 s later)
    try:
        with pytest.raises(ZooselectError, match=r"^2 of 3 tasks failed: '.*no-images': .*no images in class "
                                                 r"subfolders.*; '.*one-class': .*only one class"):
            select.main(["--store", store.url, "--task", tasks[1], "--task", str(tmp_path / "no-images"),
                         "--task", str(tmp_path / "one-class"), "--no-save", "--no-progress"])
    finally:
        runtime.init = real_init
    with pytest.raises(ZooselectError, match=r"^task 'builtin:digits\?classes=3' has only one class"):
        select.main(["--store", store.url, "--task", tasks[1], "--task", "builtin:digits?classes=3", "--no-save",
                     "--no-progress"])  # loaded by its Ray task


def test_failing_model_does_not_stop_others(ray_local, published, tmp_path, capsys):
    from jobs import embed

    store, std = published
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all")
    entries = [CatalogEntry("ok", "resnet10t", None, input_size=32),
               CatalogEntry("corrupt", "resnet10t", str(corrupt)),
               CatalogEntry("unknown", "no_such_net_abc", None),
               CatalogEntry("missing", "resnet10t", str(tmp_path / "nope.safetensors"))]
    cat = str(tmp_path / "c.jsonl")
    write_catalog(entries, cat)
    # A compaction holds its lease throughout: the row written meanwhile is checked after it, or said unchecked
    store.write_bytes(f"embeddings/{std.id}/_compacting/running", str(time.time()).encode())
    assert embed.main(["--catalog", cat, "--store", store.url, "--no-progress", "--compaction-wait", "0"]) == 1
    out = capsys.readouterr().out
    assert "1 embedded" in out and "3 failed" in out
    assert (f"1 row(s) written while a compaction of standard {std.id} runs: waiting up to 0s for it to end, "
            f"to check them (one that crashed: `python -m jobs.table compact --break-leases`)") in out
    assert (f"warning: a compaction of standard {std.id} still runs after 0s; 1 row(s) written during it are "
            f"unchecked (ok); the next re-index restores any it deleted (a compaction that crashed: "
            f"`zooselect table compact --store {store.url} --standard {std.id} --break-leases`)") in out
    assert "failed: corrupt: corrupt safetensors" in out, out  # the id once (it was twice: session 40)
    assert "failed: unknown: unknown timm architecture 'no_such_net_abc'" in out
    assert "failed: missing: checkpoint not found" in out
    assert len(store.list("embeddings", ".parquet")) == 1

    # rows left unchecked alone make the run exit 1 too: the table may lack them until the next re-index (it was 0)
    write_catalog([CatalogEntry("ok2", "resnet10t", None, input_size=32)], cat)
    assert embed.main(["--catalog", cat, "--store", store.url, "--no-progress", "--compaction-wait", "0"]) == 1
    out = capsys.readouterr().out
    assert "1 embedded" in out and "0 failed" in out and "warning: a compaction of standard" in out


def test_rows_written_during_a_compaction_are_held_on_disk_and_written_back_after_it(ray_local, published,
                                                                                      tmp_path, capsys, monkeypatch):
    """The compaction here writes its segment, deletes the job's new row object and ends: the job writes it
    back from the bytes it held, on local disk (`HeldRows`), not in each result in the driver's memory (a
    review, session 39: 10^4 per-source rows held during a long compaction are 750 MB)."""
    from jobs import embed
    from selection import table

    store, std = published
    entry = CatalogEntry("zoo/held", "resnet10t", None, input_size=32)
    cat = str(tmp_path / "c.jsonl")
    write_catalog([entry], cat)
    lease, row = f"embeddings/{std.id}/_compacting/0badc0de-lease", row_path(std.id, entry.id)
    segment = f"embeddings/{std.id}/segments/seg-20261207T000000000000000-0badc0de-00000.parquet"  # the lease's id
    store.write_bytes(lease, str(time.time()).encode())
    held, written = [], []
    real_add, real_restore = table.HeldRows.add, embed.restore_rows

    def add(self, model_id, data, seen):
        held.append((model_id, len(data), seen))
        real_add(self, model_id, data, seen)

    def compaction_ends_then_restore(store_, std_, rows, **kwargs):  # it deleted the new row object, and ends
        written.append(store.read_bytes(row))
        store.write_table(segment, store.read_table(row))  # (as a compaction that read the row before the job wrote it)
        store.delete(row)
        store.delete(lease)
        return real_restore(store_, std_, rows, **kwargs)

    monkeypatch.setattr(table.HeldRows, "add", add)
    monkeypatch.setattr(embed, "restore_rows", compaction_ends_then_restore)
    assert embed.main(["--catalog", cat, "--store", store.url, "--no-progress", "--compaction-wait", "120"]) == 0
    out = capsys.readouterr().out
    assert "1 row(s) written while a compaction ran; 1 of them written back after it had deleted them" in out, out
    assert held == [(entry.id, len(written[0]), frozenset({"0badc0de"}))] and store.read_bytes(row) == written[0]


def test_rows_held_during_a_compaction_are_checked_when_the_embedding_stops_on_a_cluster_error(published,
                                                                                              monkeypatch, capsys):
    """A cluster error after some actors had written rows during a compaction skipped the check of those
    rows: one the compaction deleted was missing until the next re-index (a review, session 46)."""
    from jobs import embed, runtime
    from selection.embedder import Plan
    from selection.errors import ClusterError

    store, std = published
    entry = CatalogEntry("zoo/held", "resnet10t", None, input_size=32)

    def stops(entries, std_, store_, opts, progress, held):
        held.add(entry.id, b"row bytes", frozenset({"0badc0de"}))
        raise ClusterError("the cluster went away")
    checked = []
    monkeypatch.setattr(runtime, "embed_with_actors", stops)
    monkeypatch.setattr(embed, "restore_rows", lambda store_, std_, rows, **kw: checked.append(dict(rows)) or [])
    plan = Plan(embed=(entry,), refresh=(), skip=(), remove=(), invalid=(), indexed=0)
    with pytest.raises(ClusterError, match="the cluster went away"):
        embed.apply_plan(plan, std, store, runtime.ActorOptions(), 5.0, progress=False)
    assert checked == [{entry.id: b"row bytes"}]
    assert "1 row(s) written while a compaction ran; 0 of them written back" in capsys.readouterr().out


def test_outputs_inside_a_local_store_are_refused_before_any_work(published, tmp_path):
    """A review (session 39): `--json STORE/standards/DEFAULT` replaced the store's default with the results
    (every later selection failed), and `--parquet` over a row object replaced that model's row."""
    from jobs import select, table as table_job

    store, std = published
    default, basis = store.read_bytes("standards/DEFAULT"), store.read_bytes(f"standards/{std.id}/basis.npz")
    for flag, path in (("--json", os.path.join(store.root, "standards", "DEFAULT")),
                       ("--parquet", os.path.join(store.root, "standards", std.id, "basis.npz"))):
        with pytest.raises(ConfigError, match=rf"^{flag} '{re.escape(path)}' is inside the store '.*': write it "
                                              r"elsewhere \(the store holds only what zooselect writes there\)$"):
            select.main(["--store", store.url, "--task", "builtin:digits?classes=0,1&per_class=5", flag, path])
    with pytest.raises(ConfigError, match=r"^--out '.*/x.parquet' is inside the store"):
        table_job.main(["export", "--store", store.url, "--out", os.path.join(store.root, "x.parquet")])
    assert store.read_bytes("standards/DEFAULT") == default
    assert store.read_bytes(f"standards/{std.id}/basis.npz") == basis


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,needle", [
    (["jobs.select", "--store", "ftp://host/x", "--task", "t"], "unsupported store URL scheme 'ftp'"),
    (["jobs.select", "--store", "s3://Bad_Bucket/x", "--task", "t"], "invalid S3 bucket name 'Bad_Bucket'"),
    (["jobs.embed", "--catalog", "/no/such/catalog.yaml", "--store", "/tmp/x"],
     "catalog file not found: '/no/such/catalog.yaml'"),
    (["jobs.embed", "--catalog", "/tmp/c.yaml", "--store", "/tmp/x", "--compaction-wait", "-1"],
     "--compaction-wait must be >= 0 seconds, got -1.0"),
    (["jobs.standard", "--store", "/tmp/zs-bad-d", "--d", "1"], "--d must be in [2, 512], got 1"),
    (["jobs.standard", "--store", "s3:/zoo/x"], "malformed URL 's3:/zoo/x': did you mean s3://zoo/x?"),
    (["jobs.select", "--store", "memory://zs", "--task", "t"], "'memory://zs' lives in one process"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--json", "/no/such/dir/out.json"],
     "directory '/no/such/dir' does not exist"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--parquet", "/tmp"], "--parquet '/tmp' is a directory"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--verify-gpus", "-1"],
     "--verify-gpus must be a number >= 0, got -1.0"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--task-image-size", "4"],
     "--task-image-size must be in [8, 1024] (or None: the standard's probe image size), got 4"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--task-gpus", "nan"],
     "--task-gpus must be a number >= 0, got nan"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--verify-gpus", "1"],
     "--verify-gpus 1 is given but --verify-top-k is 0: nothing is verified"),
    (["jobs.benchmark", "quality", "--small", "--store", "/tmp/zs-none", "--out", "README.md"],
     "--out 'README.md' is a file"),
    # found by a review (session 27): refused after minutes of work, or a traceback after the measurements
    (["jobs.demo", "--store", "/tmp/zs-none", "--verify-top-k", "-1"], "--verify-top-k must be >= 0, got -1"),
    (["jobs.scaling", "--skip", "update", "--out", "/no/such/dir/x.json"], "directory '/no/such/dir' does not exist"),
    (["jobs.scaling", "--reps", "0"], "--reps must be >= 1, got 0"),
    # found by a review (session 28): the JSON silently overwritten by the Parquet file
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--json", "/tmp/zs-r.out", "--parquet", "/tmp/zs-r.out"],
     "--json and --parquet name the same file '/tmp/zs-r.out': one would overwrite the other"),
    (["jobs.scaling", "--images", "0"], "--images must be >= 1, got 0"),
    # found by a review (session 36): the task's own file overwritten by the results
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "/tmp/zs-t.parquet", "--parquet", "/tmp/zs-t.parquet"],
     "--parquet '/tmp/zs-t.parquet' would write over or into the task '/tmp/zs-t.parquet'"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "file:///tmp", "--json", "/tmp/zs-r.json"],
     "--json '/tmp/zs-r.json' would write over or into the task 'file:///tmp'"),
    # found by a review (session 43): the library's field names, not the flags; checked after I/O or Ray's
    # start; a verifier that ran no verification; a hint naming `python -m` under `zooselect`
    (["jobs.standard", "--store", "/tmp/zs-none", "--companion-d", "100"],
     "--companion-d must be between 1 and 63 (one less than --d = 64), got 100"),
    (["jobs.standard", "--store", "/tmp/zs-none", "--probe-image-size", "4"],
     "--probe-image-size must be in [8, 512], got 4"),
    (["jobs.standard", "--store", "/tmp/zs-none", "--baseline-input-size", "-1"],
     "--baseline-input-size must be in [8, 1024], got -1"),
    (["jobs.reindex", "--catalog", "/no/such/catalog.yaml", "--store", "/tmp/zs-none", "--max-remove", "2"],
     "--max-remove must be a fraction from 0 to 1, got 2.0"),
    (["jobs.benchmark", "zoo", "--store", "s3://Bad_Bucket/x", "--train-gpus", "-1"],
     "--train-gpus must be a number >= 0, got -1.0"),
    (["jobs.select", "--store", "/tmp/zs-none", "--task", "t", "--verify-by", "probe"],
     "--verify-by probe is given but --verify-top-k is 0: nothing is verified"),
    (["jobs.embed", "--catalog", "s3://bucket/zoo.yaml", "--store", "/tmp/zs-none"],
     "catalog 's3://bucket/zoo.yaml': a catalog is a local file (YAML or JSON lines), not a URL"),
    (["selection.cli", "select", "--store", "/tmp/zs-none-43", "--task", "builtin:digits", "--no-save"],
     "build one with `zooselect standard --store /tmp/zs-none-43`"),
])
def test_bad_input_one_line_error(args, needle):
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert lines == [f"error: {lines[0][7:]}"] and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_tasks_failing_for_one_cause_say_it_once():
    """A review (session 44): a Ray node that died gave "a tasks task failed: The task's local raylet died…"
    once per task, four times over; the cause is said once, the tasks named."""
    from jobs.select import _raise_failed
    from selection.errors import ClusterError

    died = ClusterError("a task embedding failed: The task's local raylet died.")
    with pytest.raises(ClusterError, match=re.escape("2 of 3 tasks failed ('a', 'c'): a task embedding failed: "
                                                     "The task's local raylet died.") + "$"):
        _raise_failed(["a", "b", "c"], [died, 1, ClusterError(str(died))])


_HELD_IN_AN_IMPORT = r"""
import importlib.abc, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whatever pytest's process had
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
fd = int(os.environ.pop("ZS_HELD_FD"))


class Held(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pyarrow.lib":  # the job's imports half done (torch's, until session 45: the 40-line traceback)
            sys.meta_path.remove(self)
            os.write(fd, b"x")
            os.close(fd)
            while True:  # until the test's SIGINT
                time.sleep(0.05)
        return None


sys.meta_path.insert(0, Held())
import runpy
runpy.run_module("selection.cli", run_name="__main__", alter_sys=True)  # as python -m selection.cli
"""


def test_ctrl_c_while_a_command_imports_its_job_is_one_line_and_130():
    """A review (session 41): Ctrl-C in the seconds `zooselect CMD` imports torch and Ray gave a 40-line
    traceback from inside torch's import, and the process died by the signal. The command is held inside
    an import of its job's (pyarrow's; torch's until session 45, when a job stopped importing torch before
    it runs) until the signal is sent (sessions 43-44: a signal sent after polling the child's memory map
    could land after the imports, on a loaded machine: exit 0, no line)."""
    import select
    import signal

    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", _HELD_IN_AN_IMPORT, "select", "--help"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=(write,),
                            env={**os.environ, "ZS_HELD_FD": str(write)})
    os.close(write)
    try:
        assert select.select([read], [], [], 120)[0] and os.read(read, 1) == b"x", "never reached the import"
    finally:
        os.close(read)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: interrupted\n" and out == "", (proc.returncode, err, out[:80])


@pytest.mark.parametrize("stage,status", [("threads", 0), ("exit handlers", 0), ("exit handlers", 2)])
def test_ctrl_c_after_the_work_is_one_line_and_130(stage, status):
    """A review (session 44): a Ctrl-C while a job's process ended (joining threads, running exit handlers
    such as Ray's shutdown) exited 130 with no line, or 0 with an "Exception ignored in atexit callback …
    KeyboardInterrupt" traceback. The signal is sent from inside that stage."""
    code = ("import atexit, os, signal, threading, time\n"
            "from jobs.common import run_program\n"
            "def ctrl_c():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.5)\n"
            + ("threading.Thread(target=lambda: (time.sleep(0.3), ctrl_c())).start()\n" if stage == "threads"
               else "atexit.register(ctrl_c)\n")
            + f"run_program(lambda argv: print('done') or {status}, [])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (status or 130, "done\n", "error: interrupted\n")  # a failure stays one


def test_a_second_ctrl_c_during_exit_handlers_ends_at_once_with_the_output_kept():
    """An exit handler that hangs (Ray's shutdown) is not waited for after a second Ctrl-C; what the job
    printed still reaches a file or pipe (a review of session 44: `os._exit` dropped buffered output)."""
    code = ("import atexit, os, signal, time\n"
            "from jobs.common import run_program\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.3),\n"
            "                         os.kill(os.getpid(), signal.SIGINT), time.sleep(60)))\n"
            "run_program(lambda argv: print('done') or 0, [])\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (130, "done\n", "error: interrupted\n") and time.monotonic() - t0 < 30


def test_config_errors_name_flags_but_quote_the_value_as_given(tmp_path):
    from jobs.common import as_flags
    from selection.storage import check_output

    with pytest.raises(ConfigError, match=r"^--score must be one of \('full'\), got 'pareto' \(not top_k\)$"):
        with as_flags("score", "pareto", "top_k"):
            raise ConfigError("score must be one of ('full'), got 'pareto' (not top_k)")
    with pytest.raises(ConfigError, match=r"^--autoscaling needs --max-in-flight, got None$"):
        with as_flags("autoscaling", "max_in_flight"):
            raise ConfigError("autoscaling needs max_in_flight, got None")
    if os.path.isdir("/dev/shm"):  # a tmpfs of regular files, scratch space in pods: not a stream
        check_output("/dev/shm/zooselect-check.parquet")
    for bad in ("-", "/dev/stdout", "/dev/stderr", "/dev/null", "/proc/self/fd/1"):
        with pytest.raises(ConfigError, match="outputs are regular files"):
            check_output(bad)


def test_an_empty_zooselect_store_is_as_unset():
    r = _run("jobs.table", "ls", env={"ZOOSELECT_STORE": ""})
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith("error: the following arguments are required: --store")


def test_a_relative_local_store_reaches_the_workers_as_its_absolute_path(tmp_path, monkeypatch):
    """`--store ./s` went to the actors as "./s": with `--address`, a worker started in another directory
    wrote the rows there while the driver read its own (found by a review, session 26)."""
    import argparse

    from jobs.common import open_store

    monkeypatch.chdir(tmp_path)
    store = open_store(argparse.Namespace(store="./s", s3_endpoint=None))
    assert store.url == str(tmp_path / "s") == store.root


def test_select_on_store_without_standard(tmp_path):
    r = _run("jobs.select", "--store", str(tmp_path / "empty"), "--task", "builtin:digits")
    assert r.returncode == 2 and "has no standard (no such directory: a typo?); build one" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.parquet"))


@pytest.mark.parametrize("fn,flag", [("_task_embedding", "--task-gpus"), ("_verify", "--verify-gpus")])
def test_a_worker_given_a_gpu_torch_cannot_see_says_so(monkeypatch, fn, flag):
    import torch

    from jobs import select
    from selection.errors import ModelError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    item = ("builtin:digits", None, True) if fn == "_task_embedding" else ("builtin:digits", None, {}, True)
    with pytest.raises(ModelError, match=f"device \\({flag}\\) is 'cuda' but torch sees no CUDA device"):
        getattr(select, fn)(None, item)


def test_an_actor_given_a_gpu_torch_cannot_see_says_so_instead_of_using_the_cpu(monkeypatch):
    """It embedded on the CPU in float32, in a table meant to be bf16 GPU rows."""
    import ray
    import torch

    from jobs.runtime import _EmbedActor
    from selection.errors import ModelError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the actor's own: not this test process's
    with pytest.raises(ModelError, match=r"the device of an actor given a GPU \(--gpus-per-actor\) is 'cuda' but "
                                         r"torch sees no CUDA device here"):
        _EmbedActor("/tmp/unused-store", None, 1).embed(CatalogEntry("m", "resnet10t"), None)


def test_select_reads_a_local_task_once_in_the_driver(ray_local, published, catalog, tmp_path, monkeypatch, capsys):
    """A remote node cannot see this machine's disk, and Ray's workers keep the directory they started
    in: a local task (here a relative path, after the driver changed directory) is read by the driver,
    and its embedding and verifications use that one copy."""
    import numpy as np
    from PIL import Image

    from jobs import embed, select

    store, _ = published
    assert embed.main(["--catalog", catalog, "--store", store.url, "--no-progress"]) == 0
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "task" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "task" / c / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert select.main(["--store", store.url, "--task", "task", "--verify-top-k", "2", "--json", "res.json",
                        "--no-save", "--no-progress"]) == 0
    assert ", 2 verified;" in capsys.readouterr().out
    res = json.load(open(tmp_path / "res.json"))["tasks"][0]
    assert (res["task"], res["n_images"], res["n_classes"], res["n_verified"]) == ("task", 8, 2, 2)


def test_select_sweeps_a_table_of_several_parts_in_ray_tasks_as_the_driver_does(ray_local, published, tmp_path,
                                                                                monkeypatch, capsys, caplog):
    """A table of several segments and row objects is swept in one Ray task per part, on the driver's
    node for a local store (`--serial-sweep`, or a driver node without CPUs: in the driver; a part whose
    worker crashed: that part in the driver): the same rankings, scores and Pareto front."""
    import numpy as np
    import ray

    import selection
    from jobs import runtime, select
    from selection.keys import model_key
    from selection.table import compact, delete_row, write_row

    store, std = published
    rng = np.random.default_rng(0)

    def row(mid):
        return {"model_id": mid, "model_key": model_key(mid), "arch": "resnet10t", "is_baseline": False,
                "num_params": int(rng.integers(1e5, 1e7)), "gflops": 1.0, "input_size": 32,
                "weights_sha256": "0" * 64, "standard_id": std.id, "schema_version": selection.SCHEMA_VERSION,
                "embedding": rng.random(std.width, dtype=np.float32), "coverage": np.zeros(std.d, np.float32)}

    for i in range(40):
        write_row(store, std, row(f"zoo/m{i}"))
    compact(store, std, segment_rows=12)  # 4 segments
    for i in (2, 50, 51):
        write_row(store, std, row(f"zoo/m{i}"))
    assert delete_row(store, std, "zoo/m7")
    calls = []
    real_map = runtime.map_tasks

    def map_tasks(fn, items, **kw):
        calls.append((kw.get("desc"), kw.get("node")))
        out = real_map(fn, items, **kw)
        if kw.get("desc") == "sweep" and crash:  # the first part's worker died past its retries
            out[0] = runtime.TaskCrashed("a sweep part failed: the worker died")
        return out

    monkeypatch.setattr(runtime, "map_tasks", map_tasks)
    results = []
    for extra, crash, driver_node in (([], False, None), (["--serial-sweep"], False, None), ([], True, None),
                                      ([], False, lambda: None)):  # a driver node without CPUs: in the driver
        if driver_node:
            monkeypatch.setattr(runtime, "driver_node", driver_node)
        out = str(tmp_path / f"res{len(results)}.json")
        with caplog.at_level(logging.WARNING, logger="jobs.select"):
            assert select.main(["--store", store.url, "--task", "builtin:digits?classes=0,1&per_class=10",
                                "--top-k", "8", "--pareto", "params", "--json", out, "--no-save", "--no-progress",
                                *extra]) == 0
        capsys.readouterr()
        res = json.load(open(out))["tasks"][0]
        results.append((res["models_swept"], [(r["model_id"], r["score"]) for r in res["ranking"]],
                        [(r["model_id"], r["score"]) for r in res["pareto"]]))
    here = ray.get_runtime_context().get_node_id()  # a local store: its parts run on the driver's node
    assert calls == [("tasks", None), ("sweep", here), ("tasks", None), ("tasks", None), ("sweep", here),
                     ("tasks", None)]
    assert re.search(r"a sweep part failed: the worker died; sweeping its part \(embeddings/.*/segments/seg-.*\.parquet\) "
                     r"here instead", caplog.text)
    assert results[0][0] == 40 + 2 - 1 and len(results[0][1]) == 8 and results[0][2]
    assert results[1:] == [results[0]] * 3
    # Ray failing a part otherwise (e.g. its runtime env) is the selection's error, not a sweep here.
    from selection.errors import ClusterError
    from selection.select import SelectConfig
    from selection.table import Part

    monkeypatch.setattr(runtime, "map_tasks", lambda fn, items, **kw: [ClusterError("a sweep part failed: env")] * len(items))
    with pytest.raises(ClusterError, match="env"):
        select._map_parts(std, store, [], SelectConfig(), False)([Part(rows=("x",))], set())


def test_select_refuses_one_class_and_empty_tasks(ray_local, published, catalog, tmp_path, capsys):
    from jobs import embed, select
    from jobs.common import run_main

    store, _ = published
    embed.main(["--catalog", catalog, "--store", store.url, "--no-progress"])
    (tmp_path / "one" / "a").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "one" / "a" / f"{i}.png")
    for task, needle in ((str(tmp_path / "one"), "has only one class"),
                         ("builtin:fashion-mnist?classes=1,2&n=0", "is empty")):
        with pytest.raises(SystemExit) as exc:
            run_main(select.main, ["--store", store.url, "--task", task, "--no-progress"])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


def test_help_works():
    for mod in ("jobs.standard", "jobs.embed", "jobs.select", "jobs.reindex", "jobs.demo", "jobs.table"):
        r = _run(mod, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m {mod} "), (mod, r.stderr)
    r = _run("selection.cli", "--help")
    assert r.returncode == 0 and "reindex" in r.stdout
    r = _run("selection.cli")  # no command: a usage error (it exited 0)
    assert r.returncode == 2 and r.stderr.startswith("error: a command is required\nusage: zooselect COMMAND")
    r = _run("selection.cli", "selct")  # a typo is named, with what it is close to (session 44)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown command 'selct' (did you mean 'select'?)\n")
    for cmd in ("select", "reindex", "table"):  # each job's usage names the command that ran it
        r = _run("selection.cli", cmd, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: zooselect {cmd} "), (cmd, r.stdout[:80])
    r = _run("selection.cli", "benchmark", "scaling", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: zooselect benchmark scaling "), r.stdout[:80]
    r = _run("selection.cli", "table", "ls", "--store", "/nonexistent", env={"ZOOSELECT_LOG": "verbose"})
    assert r.returncode == 2 and r.stderr.strip() == ("error: ZOOSELECT_LOG should be a logging level such as "
                                                      "DEBUG, INFO or WARNING, got 'VERBOSE'")
    r = _run("selection.cli", "table", "ls", "--store", "/nonexistent", env={"ZOOSELECT_LOG": "warn"})
    assert "ZOOSELECT_LOG" not in r.stderr  # every name logging knows is accepted


def test_a_jobs_help_imports_no_torch_ray_or_scipy():
    """`--help` of a Ray job took 1.6 s, 1.3 s of it importing torch (session 45): the jobs and the library
    import torch, timm, Ray, SciPy and matplotlib where they run, so that parsing the command line needs none."""
    code = ("import sys\n"
            "import jobs.select, jobs.embed, jobs.standard, jobs.table, jobs.demo, jobs.benchmark, jobs.reindex\n"
            "import jobs.scaling, selection.cli, selection.select, selection.embedder, selection.zoo\n"
            "print(sorted(m for m in ('torch', 'timm', 'ray', 'scipy', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


def test_usage_errors_and_help_name_the_subcommand():
    """A review (session 43): `benchmark quality --bogus` printed the benchmark's usage, not quality's;
    `zooselect table` said "required: command"; `zooselect help select` printed the general usage;
    `python -m jobs.common --help` printed nothing and exited 0."""
    r = _run("jobs.benchmark", "quality", "--store", "/tmp/zs-none", "--out", "/tmp/zs-none-out", "--bogus")
    assert r.returncode == 2 and r.stderr.startswith("usage: python -m jobs.benchmark quality "), r.stderr
    assert r.stderr.endswith("quality: error: unrecognized arguments: --bogus\n"), r.stderr
    r = _run("selection.cli", "table")
    assert r.returncode == 2 and r.stderr.startswith("usage: zooselect table [-h] {ls,export,remove,compact} ")
    assert r.stderr.endswith("error: the following arguments are required: {ls,export,remove,compact}\n")
    r = _run("selection.cli", "help", "select")
    assert r.returncode == 0 and r.stdout.startswith("usage: zooselect select "), r.stdout[:80]
    for mod in ("jobs.common", "jobs.runtime"):
        r = _run(mod, "--help")
        assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith(f"error: {mod} is not a command"), r


def test_results_are_strict_json_and_typed_parquet_even_when_empty(tmp_path):
    """A model whose FLOPs could not be counted (NaN) wrote a bare NaN token, which is not JSON, and
    a selection that no model passed wrote a Parquet file with no columns."""
    import pyarrow.parquet as pq

    from selection.results import write_results
    from selection.results import RESULT_SCHEMA, format_results, ranked_record
    from selection.select import Ranked

    row = {"arch": "resnet10t", "num_params": 5_000_000, "gflops": float("nan"), "tags": ["x"]}
    ranked = Ranked("zoo/a", 0.5, 1, False, row, verified=None)
    results = [{"task": "t1", "n_images": 10, "n_classes": 2, "ranking": [ranked_record(ranked)]},
               {"task": "t2", "n_images": 10, "n_classes": 2, "ranking": []}]
    out_json, out_pq = str(tmp_path / "r.json"), str(tmp_path / "r.parquet")
    write_results(results, "std-x", out_json, out_pq)
    doc = json.loads(open(out_json).read(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert doc["tasks"][0]["ranking"][0]["gflops"] is None
    t = pq.read_table(out_pq)
    assert t.schema == RESULT_SCHEMA and t.num_rows == 1 and t.column("gflops").to_pylist() == [None]
    # plain zstd, as `table export` writes: the byte-stream-split of the store's tables is not for every
    # reader (Spark's); the local file and the store's copy were written with two other encodings
    meta = pq.ParquetFile(out_pq).metadata.row_group(0)
    chunks = [meta.column(i) for i in range(meta.num_columns)]
    assert {c.compression for c in chunks} == {"ZSTD"}
    assert not any("BYTE_STREAM_SPLIT" in c.encodings for c in chunks), [(c.path_in_schema, c.encodings) for c in chunks]
    assert "      ?" in format_results(results, "std-x", 1)
    write_results(results[1:], "std-x", None, out_pq)
    t = pq.read_table(out_pq)
    assert t.schema == RESULT_SCHEMA and t.num_rows == 0
    # A row written by another tool with no parameter count (the schema allows it): `?`, not a traceback
    row = dict(row, num_params=None)
    ranked = Ranked("zoo/b", 0.5, 1, False, row)
    results = [{"task": "t1", "n_images": 10, "n_classes": 2, "ranking": [ranked_record(ranked)]}]
    assert re.search(r"zoo/b .* +\? +\?", format_results(results, "std-x", 1))


def test_results_that_cannot_be_written_locally_are_one_line_and_kept_in_the_store(tmp_path, monkeypatch):
    """An existing output file that is not writable passed the check, and the write failed after the
    whole selection in a traceback, before the store's copy (a review, session 28)."""
    from selection.storage import check_output
    from selection.results import write_results
    from selection.storage import Store

    out = tmp_path / "r.json"
    out.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real_access(p, mode))
    with pytest.raises(ConfigError, match=f"cannot write '{out}': the file exists and is not writable"):
        check_output(str(out))
    monkeypatch.undo()
    store = Store(str(tmp_path / "store"))
    gone = str(tmp_path / "removed-meanwhile" / "r.parquet")
    with pytest.raises(ConfigError, match=r"cannot write '.*r.parquet': No such file or directory \(the results "
                                          r"are in .*r\.json, .*/results/select-.*\.json\)"):
        write_results([{"task": "t", "ranking": []}], "std-x", str(out), gone, store)
    assert json.loads(out.read_text())["standard_id"] == "std-x"  # written whole; the store's copy too
    assert len(store.list("results")) == 2


def test_a_selection_that_does_not_save_needs_no_writable_store(tmp_path, monkeypatch):
    """A read-only store was refused even with --no-save, and with one the job could not write to (an S3
    bucket under read-only credentials) the failed store copy came first and no --json file was written
    (a review, session 35)."""
    from selection.storage import check_output
    from selection.results import write_results
    from selection.storage import Store

    store = Store(str(tmp_path / "store"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    with pytest.raises(StoreError, match="is not writable"):
        store.check()
    store.check(writable=False)
    # the folder a job writes, not only the root (a review, session 47: a read-only `results/` was seen only
    # when the selection was done); a folder not made yet is judged by the nearest one above it that is
    os.makedirs(tmp_path / "store" / "results")
    ro = str(tmp_path / "store" / "results")
    monkeypatch.setattr(os, "access", lambda p, mode: not (mode == os.W_OK and p == ro) and real_access(p, mode))
    with pytest.raises(StoreError, match=re.escape(f"store path {store.root!r} ({ro!r}) is not writable")):
        store.check(write_prefix="results")
    with pytest.raises(StoreError, match="is not writable"):
        store.check(write_prefix="results/new")
    store.check(write_prefix="embeddings")
    (tmp_path / "store" / "embeddings").write_text("")  # a file where the job makes its folder
    for prefix in ("embeddings", "embeddings/std-x"):
        with pytest.raises(StoreError, match=re.escape(f"{str(tmp_path / 'store' / 'embeddings')!r} is a file, "
                                                       f"not a folder")):
            store.check(write_prefix=prefix)
    monkeypatch.undo()
    monkeypatch.setattr(store, "write_bytes", lambda rel, data: (_ for _ in ()).throw(
        StoreError(f"permission denied writing {store.url}/{rel}")))
    out = tmp_path / "r.json"
    with pytest.raises(StoreError, match=r"cannot save the results in .*/results/ \(permission denied writing .*\); "
                                         r"store=None skips that \(the results are in .*r\.json\)$"):
        write_results([{"task": "t", "ranking": []}], "std-x", str(out), None, store)  # the library's words
    assert json.loads(out.read_text())["standard_id"] == "std-x"
    with pytest.raises(ConfigError, match=r"cannot write 's3://bucket/r.json': outputs are local paths, not URLs"):
        check_output("s3://bucket/r.json")
    # the JSON saved but not its Parquet: removed, not left half-saved and unsaid (a review, session 36)
    monkeypatch.undo()
    real_write = store.write_bytes
    monkeypatch.setattr(store, "write_bytes", lambda rel, data: (_ for _ in ()).throw(
        StoreError(f"quota exceeded writing {store.url}/{rel}")) if rel.endswith(".parquet") else real_write(rel, data))
    with pytest.raises(StoreError, match=r"cannot save the results in .*/results/ \(quota exceeded writing .*\.parquet\); "
                                         r"--no-save skips that$"):
        write_results([{"task": "t", "ranking": []}], "std-x", None, None, store, skip_save="--no-save skips that")
    assert store.list("results") == []
    # `~` is the home folder where the outputs are written, as where they are checked (it was `./~`)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    os.makedirs(tmp_path / "home")
    check_output("~/r.json")
    write_results([{"task": "t", "ranking": []}], "std-x", "~/r.json", None)
    assert json.loads((tmp_path / "home" / "r.json").read_text())["standard_id"] == "std-x"


def test_a_score_the_table_cannot_give_is_refused_before_any_work(published, monkeypatch):
    """`--score rank-mean` on a full-form table was refused after Ray started and every task was embedded
    (a review, session 35)."""
    from jobs import select

    store, _ = published
    monkeypatch.setattr(select.runtime, "init", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match="'rank-mean' needs a 'per-source' table.*is 'full'"):
        select.main(["--store", store.url, "--task", "builtin:digits?classes=0,1&per_class=4", "--score",
                     "rank-mean", "--no-save", "--no-progress"])


def test_table_ls_and_export_read_a_store_they_cannot_write(published, tmp_path, monkeypatch, capsys):
    """`zooselect table ls` and `export` refused a read-only store as select did (a review, session 35)."""
    from jobs import table

    store, std = published
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    assert table.main(["ls", "--store", store.url]) == 0
    assert f"default/selected: {std.id}" in capsys.readouterr().out
    with pytest.raises(StoreError, match="is not writable"):
        table.main(["remove", "--store", store.url, "zoo/a"])


def test_a_closed_pipe_ends_a_job_quietly_and_bars_off_a_terminal_write_lines(published, capsys):
    """A review (session 41): `zooselect table ls | head -1` ended in a BrokenPipeError traceback, exit 1;
    progress bars wrote carriage-return frames into logs (`ray job logs`, a pod's, a file)."""
    from jobs.common import progress_bar

    store, _ = published
    for unbuffered in (True, False):  # output printed at once, or still buffered when the job ends
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        proc = subprocess.Popen([sys.executable, "-m", "jobs.table", "ls", "--store", store.url], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**env, "PYTHONUNBUFFERED": "1"} if unbuffered else env)
        proc.stdout.close()  # the reader is gone before the job prints (its imports take seconds)
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141 and err == "", (unbuffered, err)  # as a tool killed by SIGPIPE
    with progress_bar(total=3, desc="embed", unit="model", leave=False) as bar:  # stderr is no terminal here
        for i in range(3):
            bar.update(1)
            bar.set_postfix_str(f"zoo/m{i}: embedded")
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0].startswith("embed:   0%") and "3/3" in err.splitlines()[-1]
    assert "zoo/m1: embedded" in err  # a line per change of its note: a log names each model
    assert sum("3/3" in line for line in err.splitlines()) == 1  # not again when the bar closes (session 42)
    # nor when the closing redraw's rate took a digit more, so its bar a glyph less (CI, session 47)
    from jobs.common import _Lines

    out = io.StringIO()
    lines = _Lines(out)
    for text in ("embed:  67%|######6   | 2/3 [00:00<00:00, 9.99model/s, zoo/m1: embedded]",
                 "\rembed: 100%|##########| 3/3 [00:00<00:00, 9.99model/s, zoo/m2: embedded]",
                 "\rembed: 100%|#########| 3/3 [00:01<00:00, 10.01model/s, zoo/m2: embedded]"):
        lines.write(text)
    assert [line.split("|")[0] for line in out.getvalue().splitlines()] == ["embed:  67%", "embed: 100%"]


def test_two_bars_off_a_terminal_write_no_cursor_moves(capsys):
    """A review (session 43): `table compact` (two bars open) wrote tqdm's `ESC[A` into logs as a line."""
    from jobs.common import progress_bar

    with progress_bar(total=2, desc="folded") as rows, progress_bar(total=2, desc="deleted") as objects:
        for bar in (rows, objects, rows, objects):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\x1b" not in err and all(line.startswith(("folded:", "deleted:")) for line in err.splitlines()), err


def test_table_ls_lists_models_in_order_with_license_and_tags_and_export_writes_parquet_only(published, tmp_path,
                                                                                             capsys, monkeypatch):
    """A review (session 41): `ls` had no header and listed in storage-key order, without the license and
    tags that `select --where` filters on; `export --out t.csv` wrote Parquet into t.csv. A review (session
    43): a relative `--out` was named as given (under `ray job submit`, a path on the head node)."""
    import selection
    from jobs import table
    from selection.keys import model_key
    from selection.table import write_row

    store, std = published
    for mid, tags in (("zoo/b", ["cnn", "small"]), ("zoo/a", [])):
        write_row(store, std, {"model_id": mid, "model_key": model_key(mid), "arch": "resnet10t", "tags": tags,
                               "license": "mit" if tags else None, "standard_id": std.id,
                               "schema_version": selection.SCHEMA_VERSION,
                               "embedding": np.zeros(std.width, np.float32), "coverage": np.zeros(std.d, np.float32)})
    assert table.main(["ls", "--store", store.url, "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["model_id", "arch", "params", "GFLOPs", "size", "sha256", "compute", "license", "/", "tags"]
    assert [ln.split()[0] for ln in lines[2:4]] == ["zoo/a", "zoo/b"]
    assert lines[2].endswith("- / -") and lines[3].endswith("mit / cnn,small")
    with pytest.raises(ConfigError, match=r"^cannot export to '.*t.csv': the table is written as Parquet; name the "
                                          r"file .parquet"):
        table.main(["export", "--store", store.url, "--out", str(tmp_path / "t.csv")])
    for out in ("-", "/dev/stdout"):
        with pytest.raises(ConfigError, match=rf"^cannot write '{out}': outputs are regular files, written whole"):
            table.main(["export", "--store", store.url, "--out", out])
    assert os.listdir(tmp_path) == ["store"]  # no t.csv
    monkeypatch.chdir(tmp_path)
    assert table.main(["export", "--store", store.url, "--out", "t.parquet", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"wrote 2 models under standard {std.id} to {tmp_path / 't.parquet'}\n"


def test_a_local_output_is_named_by_its_absolute_path(tmp_path, monkeypatch, capsys):
    """A review (session 43): under `ray job submit` a relative output path lands on the head node, unsaid;
    `compare --out` says where on stderr (its standard output is the Markdown)."""
    from jobs import benchmark as job
    from selection import benchmark as bench

    se = bench.variant_label("rank-mean/fisher")
    (tmp_path / "a.json").write_text(json.dumps({
        "benchmark": "quality", "plan": "small", "run": {"cpus": 2, "cpu_model": "X"}, "truth": {"t": {"m": 0.5}},
        "summary": {"default_variant": "rank-mean/fisher", "targets": {}},
        "results": {"general": {"standard_id": "std-a", "groups": {"dev": {se: {"tau_w": 0.5, "gap": 2.0}}}}}}))
    monkeypatch.chdir(tmp_path)
    assert job.main(["compare", "a.json", "a.json", "--out", "cmp.md"]) == 0
    printed = capsys.readouterr()
    assert printed.err == f"wrote {tmp_path / 'cmp.md'}\n" and printed.out == (tmp_path / "cmp.md").read_text()


def test_long_model_ids_are_printed_whole():
    """Ids were cut to 36 characters: two timm weights of one architecture printed alike (a review,
    session 35)."""
    from selection.results import format_results

    ids = ["timm/vit_base_patch16_clip_224.openai_ft_in12k_in1k", "timm/vit_base_patch16_clip_224.openai_ft_in1k"]
    rows = [{"rank": i + 1, "model_id": m, "score": 0.5, "verified": None, "is_baseline": False, "num_params": 1,
             "gflops": 1.0} for i, m in enumerate(ids)]
    printed = format_results([{"task": "t", "n_images": 4, "n_classes": 2, "ranking": rows, "pareto": rows,
                               "pareto_cost": "params"}], "std-x", 2)
    assert all(printed.count(m + " ") == 2 for m in ids)
    assert len({line.index("0.5000") for line in printed.splitlines() if "0.5000" in line}) == 1  # aligned


def test_a_row_written_on_a_disk_the_driver_does_not_see_fails_the_model(published, monkeypatch):
    """A review (session 44): on a cluster whose nodes do not share a local store's folder, actors wrote
    their rows to their own nodes' disks; `jobs.embed` said "3 embedded", exit 0, and the store the user
    named held none. The driver now checks each row it is told of (a local store only)."""
    from jobs.runtime import row_seen_here
    from selection.embedder import EmbedResult

    store, std = published
    store.write_bytes("embeddings/x/rows/here.parquet", b"x")
    here = EmbedResult("zoo/a", "embedded", path="embeddings/x/rows/here.parquet", worker="node-a:12")
    gone = EmbedResult("zoo/b", "embedded", path="embeddings/x/rows/there.parquet", worker="node-b:34")
    assert row_seen_here(here, store, std) is here and row_seen_here(gone, None, std) is gone  # None: an S3 store
    failed = row_seen_here(gone, store, std)
    assert failed.status == "failed" and failed.reason == (
        f"model 'zoo/b': its row was written to {store.root} on node-b, but this driver does not see it there "
        f"(unless removed meanwhile): on a cluster of several nodes a local-directory store must be a folder every "
        f"node mounts at the same path; use s3:// or such a folder")
    assert row_seen_here(EmbedResult("zoo/c", "failed", "boom"), store, std).reason == "boom"
    held = dataclasses.replace(gone, written_during_compaction=b"row")  # the job checks those after the compaction
    assert row_seen_here(held, store, std) is held
    from selection.table import compact, write_row  # folded into a segment by a compaction since: in the table
    from tests.test_table_races import _row
    write_row(store, std, _row(std, "zoo/b"))
    compact(store, std)
    assert row_seen_here(gone, store, std) is gone
    # ... found through the key index: it read the whole table's index for each such model (a review, s. 48)
    import selection.table as table_module

    def no_sweep(*args, **kwargs):
        raise AssertionError("the table was read whole")

    monkeypatch.setattr(table_module, "iter_shards", no_sweep)
    assert row_seen_here(gone, store, std) is gone
    assert row_seen_here(dataclasses.replace(gone, model_id="zoo/never"), store, std).status == "failed"


def test_probe_prepared_once_per_config_and_released(ray_local, published, monkeypatch):
    from jobs.runtime import _SharedProbe

    _, std = published
    a = CatalogEntry("a", "resnet10t", None, input_size=32)
    b = CatalogEntry("b", "regnetx_002", None, input_size=48)
    c = CatalogEntry("c", "resnet10t", None, input_size=32)
    shared = _SharedProbe([a, b, c], std, enabled=True)
    assert [e.id for e in shared.order([a, b, c])] == ["a", "c", "b"]
    ref_a = shared.acquire(a)
    assert ref_a is not None and shared.acquire(c) is ref_a and shared.acquire(b) is None
    shared.release(a)
    assert shared.refs
    shared.release(c)
    assert not shared.refs  # released once the group's last model is done
    assert _SharedProbe([a, c], std, enabled=False).acquire(a) is None
    # a probe set that would be large preprocessed is not built in the driver (2.9 GB at 512 px; a review)
    from jobs import runtime

    big = [CatalogEntry(mid, "resnet10t", None, input_size=64) for mid in ("d", "e")]
    monkeypatch.setattr(runtime, "SHARED_PROBE_BYTES", len(std.probe_images) * 4 * 3 * 32 * 32)
    assert _SharedProbe(big, std, enabled=True).acquire(big[0]) is None
    assert _SharedProbe([a, c], std, enabled=True).acquire(a) is not None  # 32 px: within it


def test_scaling_benchmark_smoke(ray_local, tmp_path, capsys):
    """The scaling benchmark's four parts run end to end and print/record their ratios."""
    from jobs import scaling

    out = tmp_path / "perf.json"
    assert scaling.main(["--quick", "--max-m", "1000", "--reps", "2", "--images", "16",
                         "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [u["m"] for u in res["update"]] == [10, 100, 1000]
    assert all(u["add_objects_ms"] > 0 and u["remove_objects_ms"] > 0 and u["remove_segment_only_ms"] > 0
               for u in res["update"])
    assert [s["m"] for s in res["sweep"]] == [1000] and res["sweep"][0]["end_to_end_ratio"] > 0
    (ps,) = res["sweep_per_source"]  # 9x wider rows, queries with ratio rows
    assert ps["m"] == 1000 and ps["width"] == 9 * res["width"] and ps["end_to_end_ratio"] > 0
    assert ps["rank_mean_load_plus_sweep_s"] > 0 and ps["rank_mean_ratio"] > 0  # the default score, same rows
    assert ps["pareto_load_plus_sweep_s"] > 0 and ps["pareto_ratio"] > 0  # the same with --pareto gflops
    assert res["sweep"][0]["encoding_speedup"] > 0 and res["sweep"][0]["plain_zstd_bytes_on_disk"] > 0
    (tp,) = res["throughput"]
    assert tp["device"] == "cpu" and tp["images"] == 16 and tp["actor_img_s"] > 0 and tp["ratio"] > 0
    printed = capsys.readouterr().out
    assert "ratio   add" in printed and "sweep   per-source m=   1000" in printed and "bare forward" in printed
    assert [(c["layout"], c["m"]) for c in res["compaction"]] == [("segments", 4000), ("segments", 8000),
                                                                  ("rows", 500), ("rows", 1000)]
    assert all(c["peak_mib"] > 0 for c in res["compaction"])
    assert "ratio   compaction peak memory, segments, m=8000 / m=4000" in printed
    assert "ratio   compaction peak memory, rows, m=1000 / m=500" in printed


def test_scaling_leaves_no_scratch_table_when_a_stage_fails(tmp_path, monkeypatch):
    """A stage that failed or was interrupted left its scratch tables (10^6 rows: about 8 GB) in the
    temporary folder, and an existing --out untouched or half-written (a review, session 46)."""
    from jobs import scaling

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "perf.json"
    out.write_text('{"kept": true}')

    def interrupted(ms, reps, work):
        os.makedirs(os.path.join(work, "upd-10-objects"))
        raise KeyboardInterrupt
    monkeypatch.setattr(scaling, "bench_updates", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scaling.main(["--quick", "--skip", "sweep", "--skip", "throughput", "--skip", "compaction",
                      "--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["perf.json"] and json.loads(out.read_text()) == {"kept": True}


def test_scaling_checks_its_flags_before_any_stage(tmp_path):
    """A review (session 43): `--archs ''` was an IndexError on a GPU (on the CPU no throughput at all),
    `--device cuda` without one failed after the other stages, `--work FILE` a FileExistsError traceback."""
    import torch

    from jobs import scaling

    (tmp_path / "f").write_text("")
    cases = [(["--archs", " , "], "--archs names no timm architecture, got ' , '"),
             (["--archs", "resnet18,nope"], "--archs: unknown timm architecture 'nope'"),
             (["--work", str(tmp_path / "f")], f"--work '{tmp_path / 'f'}' is a file")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: torch sees no CUDA device here"))
    for args, message in cases:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            scaling.main(["--quick", "--skip", "update", "--skip", "sweep", "--skip", "compaction", *args,
                          "--out", str(tmp_path / "out.json")])
    assert os.listdir(tmp_path) == ["f"]


def test_demo_selects_on_the_labelled_half_only(tmp_path):
    from jobs import demo
    from selection.data import load_dataset
    from selection.linear_probe import ProbeProtocol
    from selection.select import SelectConfig, load_task, task_image_size, task_split

    paths = demo.labelled_tasks(str(tmp_path))
    assert set(paths) == set(demo.TASKS.values())
    for spec, path in paths.items():
        task = load_task(spec, SelectConfig())
        train, test = task_split(task, ProbeProtocol())
        written = load_dataset(path, task_image_size(SelectConfig()))
        # exactly the probes' training half, image for image; the measured half is not in it
        assert len(written) == len(train) < len(task)
        assert sorted(map(bytes, written.images)) == sorted(map(bytes, task.images[train]))


def test_the_demos_gap_line_says_which_ground_truth_failed():
    """A ground-truth probe that failed left the task's or the pick's accuracy out, and the demo ended,
    after all its work, with a KeyError traceback (a review, session 46)."""
    from jobs.demo import _gap_line

    assert _gap_line("t", "a", {"a": 0.5, "b": 0.75}) == \
        "task t: selected a (50.0%), best b (75.0%), gap 25.0 points"
    assert _gap_line("t", "a", {"b": 0.75}) == "task t: selected a (no ground truth measured), best b (75.0%)"
    assert _gap_line("t", "a", {}) == "task t: selected a; no ground truth measured"


def test_the_demo_runs_on_a_store_of_its_own_and_keeps_its_default_standard(published, tmp_path, monkeypatch):
    """A review (session 43): with $ZOOSELECT_STORE set for a real zoo, the demo made its standard that
    store's default and embedded its toy and random-init models into the zoo's table."""
    import selection
    from jobs import demo, runtime, standard as standard_job
    from selection.keys import model_key
    from selection.storage import Store
    from selection.standard import save_standard
    from selection.table import write_row

    store, std = published  # a zoo's standard, nothing embedded under it yet

    def add_row(store, mid):
        write_row(store, std, {"model_id": mid, "model_key": model_key(mid), "arch": "resnet10t", "tags": [],
                               "standard_id": std.id, "schema_version": selection.SCHEMA_VERSION,
                               "embedding": np.zeros(std.width, np.float32), "coverage": np.zeros(std.d, np.float32)})

    default = store.read_bytes("standards/DEFAULT")
    monkeypatch.setattr(runtime, "init", lambda address=None: pytest.fail("Ray started"))
    monkeypatch.setenv("ZOOSELECT_STORE", store.url)
    with pytest.raises(ConfigError, match=rf"^store '{re.escape(store.url)}' \(\$ZOOSELECT_STORE\) holds standard\(s\) "
                                          rf"{std.id} that no demo built; .*: --store DIR \(a new directory, or an "
                                          r"earlier demo's\)$"):
        demo.main(["--no-progress"])
    add_row(store, "team-a/footwear-v3")
    with pytest.raises(ConfigError, match=rf"^store '{re.escape(store.url)}' holds models other than the demo's "
                                          rf"\(1 of them under standard {std.id}\)"):
        demo.main(["--store", store.url, "--no-progress"])
    assert store.read_bytes("standards/DEFAULT") == default and not store.exists(demo.MARK)
    # An earlier demo's store (the demo's rows alone) is used; its default standard is kept
    old = Store(str(tmp_path / "old-demo"))
    save_standard(old, std)
    add_row(old, "random/resnet18")
    from selection.table import compact, list_segments

    compact(old, std)  # compacted: its segment holds the demo's rows alone (it was refused; a review, session 43)
    assert list_segments(old, std.id)

    class Built(Exception):
        pass

    def publish(args):
        raise Built(args)
    monkeypatch.setattr(runtime, "init", lambda address=None: None)
    monkeypatch.setattr(standard_job, "publish", publish)
    with pytest.raises(Built) as built:
        demo.main(["--store", old.url, "--no-progress"])
    assert built.value.args[0].no_default and built.value.args[0].store == old.url and old.exists(demo.MARK)
    fresh = str(tmp_path / "new")  # a new store gets the demo's standard as its default
    with pytest.raises(Built) as built:
        demo.main(["--store", fresh, "--no-progress"])
    assert not built.value.args[0].no_default


def test_stage_means_split_the_wall_time_and_name_the_rest():
    from jobs.embed import stage_means
    from selection.embedder import EmbedResult

    a = EmbedResult("a", "embedded", seconds=3.0, stage_seconds={"actor start": 2.0, "load": 1.0, "fit": 1.5})
    b = EmbedResult("b", "embedded", seconds=5.0, stage_seconds={"actor start": 4.0, "load": 2.0, "fit": 2.5})
    # wall = start + seconds: 5 and 9 s; what no stage names (0.5 and 0.5 s) is "other".
    assert stage_means([a, b]) == "actor start 3.00s, load 1.50s, fit 2.00s, other 0.50s"


def test_sigterm_ends_a_job_with_one_line_and_143(ray_local, capsys):
    """SIGTERM (a cancelled `ray job`, a stopped pod) ended a job in Ray's C++ stack dump and SIGABRT; inside
    a Ray call Ray turns the handler's exception into SystemExit(1) (a review, session 28)."""
    import signal

    from jobs import common

    from jobs import runtime

    runtime.init(None)  # Ray runs already (the module's): the handler is installed all the same
    assert signal.getsignal(signal.SIGTERM) is common.terminated

    def main(argv):
        try:
            common.terminated(signal.SIGTERM, None)
        except SystemExit:
            raise SystemExit(1) from None  # what ray.wait makes of it

    try:
        with pytest.raises(SystemExit) as exc:
            common.run_main(main, [])
    finally:
        common._terminated = False
    assert exc.value.code == 143 and capsys.readouterr().err == "error: terminated\n"

    def cleanup_fails(argv):  # a `finally` block that fails after SIGTERM (a lease delete on S3; a review, session 47)
        try:
            common.terminated(signal.SIGTERM, None)
        finally:
            raise StoreError("storage unreachable for delete x")

    try:
        with pytest.raises(SystemExit) as exc:
            common.run_main(cleanup_fails, [])
    finally:
        common._terminated = False
    assert exc.value.code == 143
    assert capsys.readouterr().err == "error: storage unreachable for delete x\nerror: terminated\n"


def test_a_reindex_with_a_catalog_cut_short_removes_nothing(published, tmp_path, capsys):
    """A catalog mounted half-empty (a ConfigMap cut short, the wrong file) made the nightly re-index remove
    every model it lacked, exit 0 (a review, session 36). With a catalog smaller than the table, more than
    --max-remove of the table is not removed (the rest of the run goes on; exit 1); renames, a catalog as
    large as the table, are not held back."""
    import numpy as np

    import selection
    from jobs import reindex
    from selection.keys import model_key
    from selection.table import load_table, write_row

    store, std = published
    for mid in ("zoo/a", "zoo/b", "zoo/c"):
        write_row(store, std, {"model_id": mid, "model_key": model_key(mid), "arch": "resnet10t",
                               "is_baseline": False, "num_params": 1, "gflops": 1.0, "input_size": 32,
                               "weights_sha256": "0" * 64, "standard_id": std.id,
                               "schema_version": selection.SCHEMA_VERSION,
                               "embedding": np.ones(std.width, np.float32), "coverage": np.zeros(std.d, np.float32)})
    gone = str(tmp_path / "gone.safetensors")  # entries whose checkpoint is not there: invalid, nothing to embed
    renamed = str(tmp_path / "renamed.jsonl")
    write_catalog([CatalogEntry(f"zoo/new{i}", "resnet10t", gone) for i in range(3)], renamed)
    assert reindex.main(["--catalog", renamed, "--store", store.url, "--dry-run"]) == 1  # the invalid entries
    out = capsys.readouterr().out
    assert "3 to remove, 3 invalid" in out and "refused" not in out, out
    catalog = str(tmp_path / "cut.jsonl")
    write_catalog([CatalogEntry("zoo/new", "resnet10t", gone)], catalog)
    base = ["--catalog", catalog, "--store", store.url, "--no-progress"]
    assert reindex.main(base + ["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "plan: 0 to embed, 0 to refresh, 0 unchanged, 3 to remove, 1 invalid" in out and out.count("  remove  zoo/") == 3
    assert "refused: not removing 3 of the table's 3 models, more than --max-remove 0.5 allows, with a catalog " \
           "of only 1 (is '" in out, out
    assert reindex.main(base) == 1
    assert "refused: not removing 3 of the table's 3 models" in capsys.readouterr().out
    assert sorted(load_table(store, std).model_ids) == ["zoo/a", "zoo/b", "zoo/c"]
    with pytest.raises(ConfigError, match="--max-remove must be a fraction from 0 to 1, got 2.0"):
        reindex.main(base + ["--max-remove", "2"])
    assert reindex.main(base + ["--max-remove", "1"]) == 1  # removed; the invalid entry still fails the run
    assert load_table(store, std).model_ids == []


def test_zooselect_help_into_a_closed_pipe_ends_quietly():
    """`zooselect --help | head -1` ended in a BrokenPipeError traceback, exit 1 (a review, session 36)."""
    proc = subprocess.Popen([sys.executable, "-c", "from selection.cli import main; main()", "--help"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the usage is written
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_a_local_ray_keeps_token_authentication_without_advice_to_turn_it_off(tmp_path):
    """Every job that started a local Ray printed Ray's "Set RAY_AUTH_MODE=disabled to opt out" (session 40)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    code = ("import os; from jobs import runtime; runtime.init(); import ray\n"
            "print(os.environ.get('RAY_AUTH_MODE'), ray.get(ray.remote(lambda: 'ran').remote()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={**env, "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.split() == ["token", "ran"], (r.stdout, r.stderr[-2000:])
    assert "RAY_AUTH_MODE" not in r.stderr and "Token authentication" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / ".ray" / "auth_token").exists()  # Ray made the token, as before


def _readme_python_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_a_local_tasks_read_bar_shows_its_total_from_its_first_line(published, tmp_path, capsys):
    """Off a terminal the bar of a local task's images opened before the loader knew the total, so its
    first line read `read task: 0img [00:00, ?img/s]` (a new user, session 45)."""
    from jobs.select import load_local_tasks
    from selection.select import SelectConfig

    _, std = published
    for cls, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (tmp_path / "task" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), tuple(min(255, c + 9 * i) for c in color)).save(tmp_path / "task" / cls / f"{i}.png")
    [(task, _)] = load_local_tasks([str(tmp_path / "task")], SelectConfig(), std).values()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("read task:")]
    assert len(task) == 6 and lines and all("/6 [" in line for line in lines), lines


def test_the_readmes_library_examples_run_as_written(published, tmp_path, capsys, monkeypatch):
    """README.md's Python blocks, run with their placeholders (a bucket, a task folder, a catalog) pointed
    at a local store, a task and a catalog of tiny models: the library's documented use stays true."""
    store, std = published
    for cls, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (tmp_path / "task" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), tuple(min(255, c + 9 * i) for c in color)).save(tmp_path / "task" / cls / f"{i}.png")
    catalog = tmp_path / "zoo.yaml"
    catalog.write_text("models:\n" + "".join(f"  - {{id: zoo/{a}, arch: {a}, input_size: 32}}\n"
                                             for a in ("resnet10t", "regnetx_002", "mobilenetv3_small_050")))
    select_block, embed_block, results_block = _readme_python_blocks()
    assert '"s3://bucket/zoo"' in select_block and '"path/to/imagefolder"' in select_block
    assert '"zoo.yaml"' in embed_block
    scope: dict = {}
    exec(select_block.split("[result] =")[0].replace('"s3://bucket/zoo"', repr(store.url)), scope)  # the store
    exec(embed_block.replace('"zoo.yaml"', repr(str(catalog))), scope)
    assert capsys.readouterr().out.split() == ["embedded"] * 3
    exec(embed_block.replace('"zoo.yaml"', repr(str(catalog))), scope)  # planned again: nothing to embed
    assert capsys.readouterr().out == ""
    exec(select_block.replace('"s3://bucket/zoo"', repr(store.url))
         .replace('"path/to/imagefolder"', repr(str(tmp_path / "task"))), scope)
    ranked = [line.split() for line in capsys.readouterr().out.splitlines()]
    small = {m for m, n in zip(*(load_table(store, std).meta.column(c).to_pylist() for c in ("model_id", "num_params")))
             if n <= 5e6}  # its constraint
    assert small and {r[1] for r in ranked} == small, ranked
    assert [r[0] for r in ranked] == [str(i + 1) for i in range(len(small))]
    assert all(r[3] != "None" for r in ranked)  # verified (the top 3)
    monkeypatch.chdir(tmp_path)  # the block writes results.json and results.parquet where it runs
    exec(results_block.replace('"path/to/imagefolder"', repr(str(tmp_path / "task"))), scope)
    printed = capsys.readouterr().out
    assert f"task {tmp_path / 'task'}  (12 images, 2 classes" in printed and all(m in printed for m in small), printed
    assert list(scope["frame"]["model_id"]) == [r[1] for r in ranked]
    assert json.loads((tmp_path / "results.json").read_text())["tasks"][0]["task"] == str(tmp_path / "task")
    assert __import__("pyarrow.parquet").parquet.read_table(tmp_path / "results.parquet").num_rows == len(small)
    assert len(store.list("results", ".parquet")) == 1
