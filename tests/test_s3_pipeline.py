"""Integration on a real SeaweedFS S3 server and a real local Ray: the table on s3://."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from selection.catalog import CatalogEntry, write_catalog
from selection.standard import save_standard
from selection.storage import Store

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.s3_fixtures"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENTRIES = [CatalogEntry("s3zoo/resnet", "resnet10t", None, input_size=32),
           CatalogEntry("s3zoo/regnet", "regnetx_002", None, input_size=32),
           CatalogEntry("s3zoo/mobilenet", "mobilenetv3_small_050", None, input_size=32)]


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """A local Ray started with the server's AWS_* variables, so its workers reach it."""
    import ray

    from jobs import runtime

    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    if ray.is_initialized():
        ray.shutdown()
    runtime.init(None)
    yield s3_server
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _objects(store: Store) -> dict[str, str]:
    """path -> ETag of every object under the store's embeddings/."""
    out = {}
    for path in store.fs.find(store._full("embeddings"), detail=True).values():
        out[path["name"]] = path.get("ETag") or path.get("etag")
    return out


def _catalog(tmp_path, entries) -> str:
    path = str(tmp_path / f"catalog-{len(entries)}.jsonl")
    write_catalog(list(entries), path)
    return path


def test_s3_embed_select_update_remove(s3_ray, s3_store_url, tiny_standard, tmp_path, capsys):
    from jobs import embed, reindex, select

    from selection.table import may_have_rows

    store = Store(s3_store_url)
    store.check()
    save_standard(store, tiny_standard)
    assert not may_have_rows(store, tiny_standard.id)  # select's cheap pre-check: one LIST per prefix
    cat2 = _catalog(tmp_path, ENTRIES[:2])
    assert embed.main(["--catalog", cat2, "--store", s3_store_url, "--no-progress"]) == 0
    assert may_have_rows(store, tiny_standard.id)
    first = _objects(store)
    assert len(first) == 2

    # Rerun: nothing written (same ETags, same objects).
    assert embed.main(["--catalog", cat2, "--store", s3_store_url, "--no-progress"]) == 0
    assert "0 embedded, 0 refreshed, 2 skipped" in capsys.readouterr().out
    assert _objects(store) == first

    # Add one model: exactly one new object, the others untouched.
    cat3 = _catalog(tmp_path, ENTRIES)
    assert embed.main(["--catalog", cat3, "--store", s3_store_url, "--no-progress"]) == 0
    after_add = _objects(store)
    assert set(after_add) - set(first) and len(set(after_add) - set(first)) == 1
    assert all(after_add[p] == e for p, e in first.items())

    out = str(tmp_path / "sel.json")
    task_url = _upload_parquet_task(store, "tasks/colours.parquet")
    assert select.main(["--store", s3_store_url, "--task", "builtin:digits?classes=0,1,2&per_class=8",
                        "--task", task_url, "--top-k", "3", "--json", out, "--no-progress",
                        "--task-image-size", "32"]) == 0
    tasks = json.load(open(out))["tasks"]
    assert [t["task"] for t in tasks][1] == task_url and tasks[1]["n_images"] == 8
    for t in tasks:
        assert sorted(r["model_id"] for r in t["ranking"]) == sorted(e.id for e in ENTRIES)
    # The same task as a folder of part files (as Spark writes it) reads as the one file does.
    import numpy as np

    from selection.data import load_dataset

    whole = store.read_table("tasks/colours.parquet")
    for i, (start, n) in enumerate(((0, 5), (5, 3))):
        store.write_table(f"tasks/parts.parquet/part-{i:05d}.parquet", whole.slice(start, n))
    store.write_bytes("tasks/parts.parquet/_SUCCESS", b"")
    one, parts = load_dataset(task_url, 32), load_dataset(f"{store.url}/tasks/parts.parquet", 32)
    assert np.array_equal(one.images, parts.images) and one.labels.tolist() == parts.labels.tolist()

    # --s3-endpoint alone (no AWS_ENDPOINT_URL* in the environment) reaches the task too, not only the store.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    r = subprocess.run([sys.executable, "-m", "jobs.select", "--store", s3_store_url, "--s3-endpoint",
                        os.environ["AWS_ENDPOINT_URL_S3"], "--task", task_url, "--top-k", "3", "--no-save",
                        "--no-progress", "--task-image-size", "32"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"task {task_url}  (8 images, 2 classes" in r.stdout

    # Remove one (gone from the catalog): exactly one object deleted, none written.
    assert reindex.main(["--catalog", cat2, "--store", s3_store_url, "--no-progress"]) == 0
    after_rm = _objects(store)
    assert set(after_add) - set(after_rm) == set(after_add) - set(first)
    assert after_rm == first

    # Compacted into a segment per model: select sweeps them in Ray tasks that read the bucket (as the
    # driver would), and a compacted model is removed through the key index on S3.
    from selection.table import compact, delete_rows, list_segments

    compact(store, tiny_standard, segment_rows=1)
    assert len(list_segments(store, tiny_standard.id)) == 2
    ranked = []
    for extra in ([], ["--serial-sweep"]):
        assert select.main(["--store", s3_store_url, "--task", task_url, "--top-k", "3", "--json", out, "--no-save",
                            "--no-progress", "--task-image-size", "32", *extra]) == 0
        ranked.append([(r["model_id"], r["score"]) for r in json.load(open(out))["tasks"][0]["ranking"]])
    assert ranked[0] == ranked[1] and sorted(m for m, _ in ranked[0]) == sorted(e.id for e in ENTRIES[:2])
    assert delete_rows(store, tiny_standard, [ENTRIES[0].id, "zoo/absent"]) == ["zoo/absent"]


def _upload_parquet_task(store: Store, rel: str) -> str:
    import io

    import pyarrow as pa
    from PIL import Image

    images = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), (200 * (i % 2), 30 * i, 0)).save(buf, "PNG")
        images.append(buf.getvalue())
    store.write_table(rel, pa.table({"image": images, "label": ["red", "green"] * 4}))
    return f"{store.url}/{rel}"


def test_s3_checkpoint_loads_through_the_store(s3_ray, s3_store_url, tiny_standard, tmp_path, capsys, monkeypatch):
    import numpy as np
    import timm
    from safetensors.torch import save

    from jobs import embed
    from selection.models import extract_features, load_model

    store = Store(s3_store_url)
    save_standard(store, tiny_standard)
    model = timm.create_model("resnet10t", num_classes=4)
    store.write_bytes("ckpt/r.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    entry = CatalogEntry("s3zoo/from-s3", "resnet10t", f"{s3_store_url}/ckpt/r.safetensors", input_size=32)
    lm = load_model(entry)
    assert lm.model.num_classes == 4
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    assert np.allclose(extract_features(lm, imgs), extract_features(load_model(
        CatalogEntry("local", "resnet10t", _local_copy(store, tmp_path), input_size=32)), imgs))
    cat = _catalog(tmp_path, [entry])
    assert embed.main(["--catalog", cat, "--store", s3_store_url, "--no-progress"]) == 0
    assert len(_objects(store)) == 1
    # The row keeps the object's ETag: a re-index compares it (one HEAD), never downloading the checkpoint
    from selection import models
    from selection.standard import load_standard
    from selection.table import read_index

    assert read_index(store, load_standard(store))["s3zoo/from-s3"]["weights_stamp"].startswith("etag:")
    for reader in ("_read_weights_bytes", "_hash_weights"):
        monkeypatch.setattr(models, reader, lambda w: pytest.fail(f"{w} was downloaded"))
    capsys.readouterr()
    assert embed.main(["--catalog", cat, "--store", s3_store_url, "--no-progress"]) == 0
    assert "0 embedded, 0 refreshed, 1 skipped" in capsys.readouterr().out


def _local_copy(store: Store, tmp_path) -> str:
    path = tmp_path / "r.safetensors"
    path.write_bytes(store.read_bytes("ckpt/r.safetensors"))
    return str(path)


def test_two_concurrent_reindex_runs_leave_each_model_once(s3_server, s3_store_url, tiny_standard, tmp_path):
    store = Store(s3_store_url)
    save_standard(store, tiny_standard)
    cat = _catalog(tmp_path, ENTRIES)
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "jobs.reindex", "--catalog", cat, "--store", s3_store_url, "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    from selection.standard import load_standard
    from selection.table import load_table

    table = load_table(store, load_standard(store))
    assert sorted(table.model_ids) == sorted(e.id for e in ENTRIES)
    assert len(_objects(store)) == len(ENTRIES)
    assert not any("Traceback" in err for _, err in outs)


def test_s3_bad_store_errors_are_one_line(s3_server, s3_env, tmp_path):
    env = {**os.environ, **s3_env}
    cases = [
        (["--store", "s3://no-such-bucket-zs/x"], "bucket 'no-such-bucket-zs' does not exist"),
        (["--store", s3_server.store_url("x")], None),
    ]
    bad_creds = {**env, "AWS_SECRET_ACCESS_KEY": "definitely-wrong-secret-123"}
    for args, needle in cases:
        r = subprocess.run([sys.executable, "-m", "jobs.select", *args, "--task", "builtin:digits"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        if needle:
            assert needle in r.stderr, r.stderr
        else:
            assert "has no standard" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.select", "--store", s3_server.store_url("x"),
                        "--task", "builtin:digits"], cwd=ROOT, env=bad_creds, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "definitely-wrong-secret-123" not in r.stderr + r.stdout
    assert "access denied" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.select", "--store", s3_server.store_url("x"),
                        "--s3-endpoint", "http://127.0.0.1:1", "--task", "builtin:digits"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unreachable" in r.stderr, r.stderr


def test_s3_benchmark_zoo_trains_into_the_bucket_and_resumes(s3_ray, s3_store_url, capsys):
    """`jobs.benchmark zoo` on an s3:// store: the general model's data, the checkpoints and the
    catalog land in the bucket, the entries load from there, and a second run trains nothing."""
    from jobs import benchmark as job
    from selection import benchmark as bench
    from selection.catalog import parse_catalog
    from selection.models import load_model

    store = Store(s3_store_url)
    assert job.main(["zoo", "--store", s3_store_url, "--small", "--no-progress"]) == 0
    assert f"catalog {s3_store_url}/benchmark/catalog.jsonl" in capsys.readouterr().out
    entries = parse_catalog(store.read_bytes("benchmark/catalog.jsonl").decode(), "catalog")
    plan = bench.small_plan()
    assert [e.id for e in entries] == [m.id for m in plan.zoo]
    trained = [e for e, m in zip(entries, plan.zoo) if m.train is not None]
    assert trained and all(e.weights.startswith(f"{s3_store_url}/zoo/") for e in trained)
    assert load_model(trained[0]).num_params > 0
    def written() -> dict[str, object]:  # a rewrite of the same bytes keeps the ETag, not the time
        return {p["name"]: p["LastModified"] for p in store.fs.find(store._full("zoo"), detail=True).values()}

    before = written()
    assert len(before) == 2 * (len(trained) + 1)  # and the general model; each with how it was trained
    assert job.main(["zoo", "--store", s3_store_url, "--small", "--no-progress"]) == 0
    store.fs.invalidate_cache()
    assert written() == before


def test_a_large_object_streamed_to_s3_goes_up_in_parts_whole(s3_store_url, monkeypatch):
    """`Store.write_tables` (a compaction's segments) uploads an object larger than two parts as a
    multipart upload from its spool file: the object reads back whole, and no spool file is left."""
    import glob
    import tempfile

    import numpy as np
    import pyarrow as pa

    from selection import storage

    monkeypatch.setattr(storage, "UPLOAD_PART_BYTES", 5 << 20)  # S3's smallest part
    store = Store(s3_store_url)
    rng = np.random.default_rng(0)
    schema = pa.schema([("i", pa.int64()), ("v", pa.list_(pa.float32(), 1000))])
    values = rng.normal(size=(4000, 1000)).astype(np.float32)  # 16 MB, about 13.6 MB in Parquet

    def tables():
        for a in range(0, 4000, 700):
            part = values[a:a + 700]
            yield pa.table({"i": np.arange(a, a + len(part)),
                            "v": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), 1000)}, schema=schema)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), ".zooselect-spool-*.parquet")))
    assert store.write_tables("big/x.parquet", schema, tables(), 512) == 4000
    etag = store.stamp("big/x.parquet")
    assert etag.split(":")[1].endswith("-3")  # three parts of 5 MiB, 5 MiB and the rest
    back = store.read_table("big/x.parquet")
    assert back.column("i").to_pylist() == list(range(4000))
    np.testing.assert_array_equal(np.stack(back.column("v").to_numpy(zero_copy_only=False)), values)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), ".zooselect-spool-*.parquet"))) == before
    # the same bytes written again: the ETag comes back, the time of writing does not (so an object
    # replaced and put back while the plan hashed it is not taken for the one stamped before)
    import time

    store.write_bytes("big/y.bin", b"same bytes")
    first = store.stamp("big/y.bin")
    time.sleep(1.1)  # S3 keeps whole seconds
    store.write_bytes("big/y.bin", b"same bytes")
    assert first.split(":")[1] == store.stamp("big/y.bin").split(":")[1] and first != store.stamp("big/y.bin")


def test_store_sha256_reads_an_object_in_pieces(s3_store_url, tmp_path, monkeypatch):
    """`Store.sha256` (a plan hashing a changed checkpoint) reads the object in pieces of `piece_bytes`,
    never whole: a checkpoint of gigabytes was read into the driver in one piece."""
    import hashlib

    import numpy as np

    from selection.errors import ObjectGoneError

    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 5)
    for store in (Store(s3_store_url), Store(str(tmp_path))):
        store.write_bytes("ckpt/w.bin", data)
        assert store.sha256("ckpt/w.bin") == hashlib.sha256(data).hexdigest()
        with pytest.raises(ObjectGoneError, match="no object at .*ckpt/gone.bin"):
            store.sha256("ckpt/gone.bin")
    store = Store(s3_store_url)
    real_open, reads = store.fs.open, []

    def counting_open(*args, **kwargs):
        fh = real_open(*args, **kwargs)
        real_read = fh.read
        fh.read = lambda n=-1: reads.append(n) or real_read(n)
        return fh
    monkeypatch.setattr(store.fs, "open", counting_open)
    assert store.sha256("ckpt/w.bin", piece_bytes=1 << 20) == hashlib.sha256(data).hexdigest()
    assert reads == [1 << 20] * 5  # 3 whole pieces, the 5 bytes left, then the end


def test_read_only_credentials_are_refused_before_the_work_unless_nothing_is_written(s3_server, s3_store_url,
                                                                                    tiny_standard, tmp_path,
                                                                                    capsys, monkeypatch):
    """A selection saving its results to an S3 store with credentials that may only read ran its whole
    work, then failed to save (a local store's permissions were checked first). `Store.check` now
    writes and deletes a hidden empty object; a job that only reads (`--no-save`, a dry run) is not refused."""
    from jobs import embed, select
    from jobs.common import run_main
    from selection.errors import StoreError
    from selection.storage import WRITE_CHECK
    from tests.s3_fixtures import point_env_at

    store = Store(s3_store_url)
    save_standard(store, tiny_standard)
    store.check()
    store.check(write_prefix="results")
    assert not store.exists(WRITE_CHECK) and not store.exists(f"results/{WRITE_CHECK}")
    assert store.list("") == store.list("standards")  # deleted, never listed
    monkeypatch.setattr(s3_server, "access_key", s3_server.reader_key)  # point_env_at reads these
    monkeypatch.setattr(s3_server, "secret_key", s3_server.reader_secret)
    point_env_at(s3_server, monkeypatch)
    reader = Store(s3_store_url)
    reader.check(writable=False)
    with pytest.raises(StoreError, match=rf"^access denied for write {s3_store_url}/{WRITE_CHECK}: check the AWS "):
        reader.check()
    task, catalog = "builtin:digits?classes=0,1&per_class=4", str(tmp_path / "c.jsonl")
    write_catalog([CatalogEntry("m", "resnet10t", None, input_size=32)], catalog)

    def error_of(job, *args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_main(job.main, [*args, "--store", s3_store_url, "--no-progress"])
        assert exc.value.code == 2
        return capsys.readouterr().err
    for job, args, folder in ((select, ["--task", task], "results"), (embed, ["--catalog", catalog], "embeddings")):
        # under the folder the job writes: credentials may allow writes there only
        assert f"error: access denied for write {s3_store_url}/{folder}/{WRITE_CHECK}: " in error_of(job, *args)
    # reading is allowed: past the store check, to the empty table
    assert "no models are embedded under standard" in error_of(select, "--task", task, "--no-save")
    capsys.readouterr()
    assert embed.main(["--catalog", catalog, "--store", s3_store_url, "--dry-run"]) == 0
    assert "plan: 1 to embed" in capsys.readouterr().out
