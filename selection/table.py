"""The embedding table of a standard: one Parquet object per model, optionally compacted.

    embeddings/<standard_id>/rows/<shard>/<model_key>.parquet   one object per model
    embeddings/<standard_id>/segments/<segment>.parquet          compacted rows (optional)
    embeddings/<standard_id>/deleted/<model_key>                deletion markers
    embeddings/<standard_id>/key_index/<compaction>/            the segments' model keys, hashed into
                                                                 buckets (NNNNN.keys) under index.json
    embeddings/<standard_id>/_compacting/<id>                   a compaction in progress
    embeddings/<standard_id>/stamps/<shard>/<model_key>.json    a checkpoint's newer stamp (StampMemo)

Add writes one row object; remove deletes it and, once segments exist or a compaction
runs, writes one deletion marker (before the delete, so that a remove stopped between the two
hides the model's older segment rows): both O(1) whatever the table's size. Removing a model
without a row object looks its key up in the key index its compaction wrote (two small reads);
segments without one (written before session 30, or by a compaction that stopped before writing
it) have their key column read.
A row object overrides a marker and any segment row, a marker hides segment rows, a later
segment overrides an earlier one. A marker holds a token of its own: a compaction deletes only
the markers it read, not one rewritten since. `compact` folds row objects and markers into segments,
so reading 10^5-10^6 models lists a few segments instead of 10^6 objects (one compaction at a
time: a second one refuses to start). Reading validates every object against the standard
(id, schema version, width) and refuses to mix; a read that finds a listed object gone (removed
or compacted meanwhile) lists the table again (`read_consistently`).
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import selection
from selection.errors import (ConfigError, CorruptObjectError, ModelError, ObjectGoneError, StandardMismatchError,
                              StoreError, brief)
from selection.keys import model_key, shard_of
from selection.standard import Standard, check_standard
from selection.storage import (READ_THREADS, STALE_TEMPORARY_S, Store, as_store, atomic_local_file, check_output,
                               check_outside_store, parquet_bytes, parquet_options)

log = logging.getLogger(__name__)
T = TypeVar("T")
LEASE_REFRESH_S = 600.0  # a running compaction rewrites its lease's time this often
# A lease not refreshed for this long (6 refresh periods) is one whose compaction crashed. It was 6 h
# before leases were refreshed: a crash held up every writer's check for that long.
STALE_LEASE_S = 6 * LEASE_REFRESH_S
DELETE_THREADS = 16  # row objects a compaction re-reads and deletes at once
READS = 3  # listings of the table a read tries while an object it listed is gone when read (`read_consistently`)
KEY_BUCKET_ROWS = 2048  # model keys per object of a compaction's key index (about 60 KB)
# A segment's name: its compaction's id (its start, to the nanosecond since session 30, and a random
# part), then its number. A name of whole seconds sorts before the later ones of the same second.
_SEGMENT_NAME = re.compile(r"seg-(\d{8}T\d{6}(?:\d{9})?-[0-9a-f]{8})-\d{5}\.parquet")
# `progress(what, n)`: n more rows read ("rows") or objects deleted ("objects") by a long table operation.
Progress = Callable[[str, int], None]
_ignored_leases: set[str] = set()  # stale leases already warned about (once per process, not per row)

META_FIELDS = [
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_key", pa.string(), nullable=False),
    pa.field("arch", pa.string()),
    pa.field("weights_source", pa.string()),
    pa.field("weights_sha256", pa.string()),
    pa.field("is_baseline", pa.bool_()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("license", pa.string()),
    pa.field("input_size", pa.int32()),
    pa.field("feature_dim", pa.int32()),
    pa.field("num_params", pa.int64()),
    pa.field("gflops", pa.float64()),
    pa.field("standard_id", pa.string(), nullable=False),
    pa.field("form", pa.string()),
    pa.field("schema_version", pa.int32()),
    pa.field("ridge_alpha", pa.float64()),
    pa.field("embed_seconds", pa.float64()),
    pa.field("images_per_second", pa.float64()),
    pa.field("library_versions", pa.string()),
    pa.field("catalog_entry", pa.string()),
    # Added after the first release, so objects written before lack it: read as null.
    pa.field("compute", pa.string()),  # device type / precision of the probe pass: "cpu/float32", "cuda/bfloat16"
    # The checkpoint's version when it was read (`selection.models.weights_stamp`): a re-index whose
    # stamp matches skips reading and hashing it.
    pa.field("weights_stamp", pa.string()),
]
OPTIONAL_COLUMNS = ("compute", "weights_stamp")


def schema_for(std: Standard) -> pa.Schema:
    return pa.schema(META_FIELDS + [
        pa.field("coverage", pa.list_(pa.float32(), std.d)),
        pa.field("embedding", pa.list_(pa.float32(), std.width), nullable=False),
    ], metadata={b"zooselect.standard_id": std.id.encode(),
                 b"zooselect.schema_version": str(selection.SCHEMA_VERSION).encode()})


def _standard_id(standard_id: str | Standard) -> str:
    """A standard's id, given it or the Standard (which most table functions take); else a ConfigError."""
    if isinstance(standard_id, Standard):
        standard_id = standard_id.id
    if not isinstance(standard_id, str) or not re.fullmatch(r"[\w.-]+", standard_id):
        raise ConfigError(f"a standard id should be a name such as 'std-0123456789abcdef', got "
                          f"{type(standard_id).__name__} {brief(standard_id, 60)}")
    return standard_id


def _base(standard_id: str | Standard) -> str:
    """Where the table of a standard lives."""
    return f"embeddings/{_standard_id(standard_id)}"


def row_path(standard_id: str, model_id: str) -> str:
    key = model_key(model_id)
    return f"{_base(standard_id)}/rows/{shard_of(key)}/{key}.parquet"


def marker_path(standard_id: str, model_id: str) -> str:
    return f"{_base(standard_id)}/deleted/{model_key(model_id)}"


def stamp_memo_path(standard_id: str, model_id: str) -> str:
    key = model_key(model_id)
    return f"{_base(standard_id)}/stamps/{shard_of(key)}/{key}.json"


@dataclass(frozen=True)
class StampMemo:
    """Checkpoints found by their bytes to be their row's under a newer stamp (a copy, a restore
    from backup, the same bytes written again): one small object per model, read only when the
    row's stamp differs, so the next plan takes the stamp alone again instead of hashing the
    checkpoint every time. It never decides alone: a memo counts only while its stamp is the
    checkpoint's and its digest the row's, so a stale or lost memo costs one hash, nothing else.
    Rewriting the row's stamp instead would mean writing rows outside the embed step, racing
    compactions."""
    store: Store  # or its URL or path
    standard_id: str
    writable: bool = True  # False: `put` records nothing (a dry run changes nothing)

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", as_store(self.store))
        # refused now if it is no id, not where the first memo is written
        object.__setattr__(self, "standard_id", _standard_id(self.standard_id))

    def get(self, model_id: str) -> tuple[str, str] | None:
        """(stamp, weights_sha256) last recorded for the model, or None (absent or unreadable)."""
        path = stamp_memo_path(self.standard_id, model_id)
        try:
            memo = json.loads(self.store.read_bytes(path))
            return str(memo["weights_stamp"]), str(memo["weights_sha256"])
        except ObjectGoneError:
            return None
        except (StoreError, ValueError, TypeError, KeyError, RecursionError) as exc:  # damaged or unreachable: hashed
            log.warning("ignoring the unreadable stamp memo %s (%s)", path, exc)
            return None

    def put(self, model_id: str, stamp: str, sha256: str) -> None:
        """Record that the checkpoint under `stamp` has digest `sha256`; a failed write is logged
        (the next plan hashes it again)."""
        if not self.writable:
            return
        path = stamp_memo_path(self.standard_id, model_id)
        try:
            self.store.write_bytes(path, json.dumps({"model_id": model_id, "weights_stamp": stamp,
                                                     "weights_sha256": sha256}).encode())
        except StoreError as exc:
            log.warning("could not record the stamp of %r (%s): the next plan hashes it again", model_id, exc)

    def forget(self, model_id: str) -> None:
        self.store.delete(stamp_memo_path(self.standard_id, model_id))


def make_row_table(std: Standard, row: dict[str, Any]) -> pa.Table:
    """One-row Parquet table; validates the embedding's width and that it is finite."""
    emb = np.asarray(row["embedding"], np.float32)
    if emb.shape != (std.width,):
        raise StandardMismatchError(f"embedding of {row['model_id']!r} has width {emb.shape}, "
                                    f"standard {std.id} needs ({std.width},)")
    if row.get("model_key") != model_key(row["model_id"]):
        raise ModelError(f"the row of {row['model_id']!r} has model_key {row.get('model_key')!r}, not "
                         f"{model_key(row['model_id'])!r}; not written")
    if row.get("standard_id") != std.id or row.get("schema_version") != selection.SCHEMA_VERSION:
        # written, it made the whole table unreadable ('rows of standard(s) [...] found in the table of ...')
        raise StandardMismatchError(f"the row of {row['model_id']!r} says standard {row.get('standard_id')!r}, schema "
                                    f"version {row.get('schema_version')!r}; the table of standard {std.id} holds "
                                    f"version {selection.SCHEMA_VERSION}: not written")
    coverage = np.asarray(row["coverage"], np.float32)
    for name, values in (("embedding", emb), ("coverage", coverage)):
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad:
            raise ModelError(f"the {name} of {row['model_id']!r} has {bad} non-finite value(s); not written")
    for f in META_FIELDS:
        if not _fits(row.get(f.name), f.type):  # tags="cnn" was ['c', 'n', 'n'], input_size=3.5 was 3
            raise ModelError(f"the row of {row['model_id']!r}: {f.name} should be {f.type}, got "
                             f"{type(row.get(f.name)).__name__} {brief(row.get(f.name))}; not written")
    data = {f.name: [row.get(f.name)] for f in META_FIELDS}
    data["coverage"] = [coverage.tolist()]
    data["embedding"] = [emb.tolist()]
    return pa.table(data, schema=schema_for(std))


def _fits(value: Any, kind: pa.DataType) -> bool:
    """Whether a row's value is one of its column's type (None: null), without a conversion that changes it."""
    if value is None:
        return True
    if pa.types.is_string(kind):
        return isinstance(value, str)
    if pa.types.is_boolean(kind):
        return isinstance(value, (bool, np.bool_))
    if pa.types.is_integer(kind):
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if pa.types.is_floating(kind):
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if pa.types.is_list(kind):
        return isinstance(value, (list, tuple, np.ndarray)) and all(_fits(v, kind.value_type) for v in value)
    return True


def row_object(std: Standard, row: dict[str, Any]) -> tuple[str, bytes]:
    """The row object of one model: its path and its Parquet bytes."""
    return row_path(std.id, row["model_id"]), parquet_bytes(make_row_table(std, row))


def write_row(store: Store | str, std: Standard, row: dict[str, Any]) -> str:
    """Add or replace one model: a single object write (`store`: a Store, or its URL or path)."""
    store, std = as_store(store), check_standard(std)
    path, data = row_object(std, row)
    store.write_bytes(path, data)
    return path


def _lease_time(data: bytes) -> float:
    """The time a compaction's lease says it was last refreshed; ValueError if it says none (not a lease
    this version wrote: `nan`, `inf`, text that is not a number or not UTF-8)."""
    started = float(data.decode())
    try:
        time.gmtime(started)  # also refuses a time before 1970 and far beyond (1e20: an OverflowError)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"not a time: {started}") from None
    if started < 0:
        raise ValueError(f"not a time: {started}")
    return started


def _leases(store: Store, folder: str, skip: str | None = None) -> Iterator[tuple[str, float | None]]:
    """Each compaction lease in `folder` but `skip`, with the time it was last refreshed: None for one this
    version did not write, which counts as running until `--break-leases` removes it. A lease gone
    meanwhile (its compaction ended) is left out."""
    for path in store.list(folder):
        if path == skip:
            continue
        try:
            yield path, _lease_time(store.read_bytes(path))
        except ObjectGoneError:
            continue
        except ValueError:
            yield path, None


def _stale(started: float) -> bool:
    """A lease not refreshed for STALE_LEASE_S: its compaction crashed (the next compaction deletes it)."""
    return time.time() - started > STALE_LEASE_S


def running_compactions(store: Store | str, standard_id: str) -> frozenset[str]:
    """The compactions of the table that hold a lease (a LIST of the leases, and a read of each), each
    named by the first 8 characters of its lease's name, which also end its segments' names.

    A lease older than STALE_LEASE_S is that of a compaction that crashed (the next compaction
    deletes it): it is ignored, with a warning, as a compaction ignores it. A lease whose start
    cannot be read as a time counts as running, as a compaction counts it, until `--break-leases`
    removes it. `store`: a Store, or its URL or path.
    """
    store = as_store(store)
    running = set()
    for path, started in _leases(store, f"{_base(standard_id)}/_compacting"):
        if started is None or not _stale(started):
            running.add(_lease_id(path))
        elif f"{store.url}/{path}" not in _ignored_leases:
            _ignored_leases.add(f"{store.url}/{path}")
            log.warning("ignoring the lease of a compaction last refreshed %s, which crashed: %s/%s "
                        "(not refreshed for %d h; the next compaction deletes it)",
                        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), store.url, path,
                        STALE_LEASE_S // 3600)
    return frozenset(running)


def compaction_running(store: Store | str, standard_id: str) -> bool:
    """Whether a compaction of the table holds its lease (`running_compactions`)."""
    return bool(running_compactions(store, standard_id))


def _lease_id(path: str) -> str:
    return path.rsplit("/", 1)[-1][:8]


class HeldRows(collections.abc.Mapping):
    """Row objects' bytes held for `restore_rows` (model id -> bytes) in an unnamed temporary file, not in
    memory: a re-embed of a large zoo during a compaction of hours holds a row a model (10^4 per-source
    rows are 750 MB). `seen`: model id -> the compactions running as its row was written
    (`running_compactions`), None where that is unknown. A model held again keeps its last bytes."""

    def __init__(self) -> None:
        import tempfile

        self._file = tempfile.TemporaryFile()
        self._at: dict[str, tuple[int, int]] = {}
        self.seen: dict[str, frozenset[str] | None] = {}

    def add(self, model_id: str, data: bytes, seen: frozenset[str] | None = None) -> None:
        self._file.seek(0, 2)
        self._at[model_id] = (self._file.tell(), len(data))
        self._file.write(data)
        self.seen[model_id] = seen

    def __getitem__(self, model_id: str) -> bytes:
        start, size = self._at[model_id]
        self._file.seek(start)
        return self._file.read(size)

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)

    def close(self) -> None:
        self._file.close()


def restore_rows(store: Store | str, std: Standard, written: collections.abc.Mapping[str, bytes], wait_s: float = 600.0,
                 poll_s: float = 2.0,
                 seen: collections.abc.Mapping[str, collections.abc.Set[str] | None] | None = None) -> list[str]:
    """Write back the rows a compaction deleted right after they were rewritten; return their model ids.

    `written`: model id -> the bytes of a row object written while a compaction held its lease (the
    writer looked after writing). Such a compaction may have checked the object's old bytes, then
    deleted the new ones (its check and its delete are two calls): the table would serve the old row
    from the segment until the next re-index. Once no compaction runs (waiting up to `wait_s`), each
    row whose object is gone is written back, unless its model was removed since (a marker).
    A compaction still running after `wait_s` raises StoreError naming the rows left unchecked.

    `seen`: model id -> the compactions running as its row was written (`running_compactions`; None or
    absent: unknown). Where the table's segments are another, later compaction's (or there are none: a later
    one left none), that one listed the table after the write: it holds this row (nothing to do) or, if the
    row was deleted before, the model's older row, a newer one written since, or none (a remove since,
    its marker folded in). Such a row is never written back: one whose model the segments hold in another
    row is named by a StoreError, raised after the others are written back (the next `jobs.embed` embeds
    it again if its row is stale). `store`: a Store, or its URL or path.
    """
    store, std = as_store(store), check_standard(std)
    deadline = time.monotonic() + wait_s
    while written and compaction_running(store, std.id):
        if time.monotonic() >= deadline:
            raise StoreError(f"a compaction of standard {std.id} still runs after {wait_s:.0f}s; "
                             f"{len(written)} row(s) written during it are unchecked "
                             f"({', '.join(sorted(written)[:5])}); the next re-index restores any it deleted "
                             f"(a compaction that crashed: `zooselect table compact --store {store.url} "
                             f"--standard {std.id} --break-leases`)")
        time.sleep(poll_s)
    gone = [mid for mid in sorted(written)
            if not store.exists(row_path(std.id, mid)) and not store.exists(marker_path(std.id, mid))]
    seen = seen or {}
    compactions = {_compaction_of(seg).rsplit("-", 1)[-1] for seg in list_segments(store, std.id)}
    # Known: the compaction(s) it ran beside. Segments of no other mean none has run since; no segments at all
    # mean one has (the compaction that deleted the row had folded its older one into a segment).
    later = [mid for mid in gone if seen.get(mid) is not None and not (compactions and compactions <= seen[mid])]
    in_segments = {row["model_id"]: row for row, _ in _iter_rows(store, std, later)} if later else {}
    unsure = [mid for mid in later if mid in in_segments and not _same_row(written[mid], in_segments[mid])]
    restored = []
    for mid in gone:  # each one's bytes read only if written back (`HeldRows`: from its file)
        if mid not in later:
            store.write_bytes(row_path(std.id, mid), written[mid])
            restored.append(mid)
    if restored:
        log.warning("wrote back %d row(s) a compaction deleted as they were rewritten: %s",
                    len(restored), ", ".join(restored))
    if unsure:
        raise StoreError(f"{len(unsure)} row(s) written during a compaction of standard {std.id} were deleted, "
                         f"and the table's segments, another compaction's (a later one, or one run by an older "
                         f"zooselect), hold another row of the model ({', '.join(unsure[:5])}): not "
                         f"written back, as that row may be newer; the next `jobs.embed` embeds them again if "
                         f"their rows are stale" + (f" ({len(restored)} other(s) written back)" if restored else ""))
    return restored


def _same_row(data: bytes, row: dict[str, Any]) -> bool:
    """Whether a row object's bytes hold `row` (as `iter_rows` yields it)."""
    # Not pq.read_table, which over an in-memory file leaves the process to abort at exit (Store.read_table)
    held = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=READ_THREADS).to_pylist()[0]

    def same(a: Any, b: Any) -> bool:  # NaN too (a model whose FLOPs could not be counted)
        return a == b or isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)
    return np.array_equal(np.asarray(held.pop("embedding"), np.float32), row["embedding"]) and \
        all(same(v, row.get(k)) for k, v in held.items())


def write_marker(store: Store, standard_id: str, model_id: str) -> None:
    """Write the deletion marker of a model: its id and a token of its own, so that a compaction
    tells the marker it read from one written since (same path, other bytes)."""
    store.write_bytes(marker_path(standard_id, model_id),
                      json.dumps({"model_id": model_id, "token": uuid.uuid4().hex}).encode())


def _check_ids(model_ids: Any) -> None:
    if isinstance(model_ids, (str, bytes)):  # iterated, it was one id per character
        raise ConfigError(f"model_ids must be a list of model ids, got one string {model_ids!r}; pass "
                          f"[{model_ids!r}]")


def delete_rows(store: Store | str, std: Standard, model_ids: list[str]) -> list[str]:
    """Remove models; return those that were not in the table (nothing done for them).

    A model is in the table if it has a row object, or a segment row and no marker.
    Its row object is deleted and, if a compaction is running (which may have read the object
    already) or segments exist, a marker written that hides its segment rows:
    - segments or a compaction seen first: the marker is written before the delete (a remove
      stopped in between leaves the row object, which overrides the marker, never an older segment
      row), and again after it with a new token (a compaction that read the row in between and the
      first marker deletes only the marker it read);
    - neither: the row object is deleted, then the lease and the segments looked at again. The
      lease is looked at before the segments: a compaction writes its lease before it lists the
      table and deletes it only after writing its segments, so a compaction that read the row is
      seen by one or the other.
    Ids without a row object are looked up in the segments once, together (`_in_segments`).
    """
    store, std = as_store(store), check_standard(std)
    _check_ids(model_ids)
    segment_only = {}
    for mid in dict.fromkeys(model_ids):  # an id given twice is removed once
        row = row_path(std.id, mid)
        if not store.exists(row):
            segment_only[_key_of(row)] = mid
            continue
        hide = compaction_running(store, std.id) or bool(list_segments(store, std.id))
        if hide:
            write_marker(store, std.id, mid)
        store.delete(row)
        if hide or compaction_running(store, std.id) or list_segments(store, std.id):
            write_marker(store, std.id, mid)
    found = _in_segments(store, std, set(segment_only)) if segment_only else set()
    missing = []
    for key, mid in segment_only.items():
        if key in found and not store.exists(marker_path(std.id, mid)):
            write_marker(store, std.id, mid)
        else:
            missing.append(mid)
    memo = StampMemo(store, std.id)
    for mid in dict.fromkeys(model_ids):  # after the rows: a remove stopped before this leaves a harmless memo
        memo.forget(mid)
    return missing


def _bucket_of(key: str, buckets: int) -> int:
    """The key index bucket of a model key (any string: a segment another tool wrote may hold any)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % buckets


def _key_index(standard_id: str, compaction: str) -> str:
    return f"{_base(standard_id)}/key_index/{compaction}"


def _write_key_index(store: Store, std: Standard, compaction: str, segments: list[str], keys: pa.Array) -> None:
    """Write the model keys of a compaction's `segments` in buckets of about KEY_BUCKET_ROWS keys (one
    text object each, a key a line), then `index.json` (the bucket count, each bucket's sha256 and the
    segments' names) last: an index without it is incomplete and never read."""
    folder = _key_index(std.id, compaction)
    buckets = max(1, -(-len(keys) // KEY_BUCKET_ROWS))
    of = np.fromiter((_bucket_of(k, buckets) for k in keys.to_pylist()), np.int64, len(keys))
    order = np.argsort(of, kind="stable")
    ends = np.searchsorted(of[order], np.arange(buckets), side="right")
    grouped = keys.take(pa.array(order))

    def write(b: int) -> str:
        start = int(ends[b - 1]) if b else 0
        data = "\n".join(grouped[start:int(ends[b])].to_pylist()).encode()
        store.write_bytes(f"{folder}/{b:05d}.keys", data)
        return hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(DELETE_THREADS) as pool:
        digests = list(pool.map(write, range(buckets)))
    store.write_bytes(f"{folder}/index.json", json.dumps(
        {"buckets": buckets, "rows": len(keys), "segments": [p.rsplit("/", 1)[-1] for p in segments],
         "sha256": digests}).encode())


def _in_segments(store: Store, std: Standard, keys: set[str]) -> set[str]:
    """Which of `keys` the segments hold. The segments of a compaction whose key index is whole cost one
    read of its `index.json` and one of each bucket `keys` fall in (read at once), whatever the table's
    size; others have their key column read: segments written before the index existed, by a
    compaction that stopped before writing it, or whose index covers segments no longer listed (a
    compaction replacing them runs). Listed again if a listed segment or index object is gone when read
    (a compaction replaced them: it writes its segments and index before it deletes the old ones, and an
    old index's `index.json` before its buckets)."""
    def read() -> set[str]:
        found: set[str] = set()
        listed = list_segments(store, std.id)
        by_compaction: dict[str, list[str]] = {}
        unindexed = []
        for seg in listed:
            if _SEGMENT_NAME.fullmatch(seg.rsplit("/", 1)[-1]):
                by_compaction.setdefault(_compaction_of(seg), []).append(seg)
            else:
                unindexed.append(seg)
        # (compaction, bucket object, its sha256 if the index has it, the keys to look for in it)
        wanted: list[tuple[str, str, str | None, list[str]]] = []
        for compaction, segs in by_compaction.items():
            index = _usable_key_index(store, _key_index(std.id, compaction), segs)
            if index is None:
                unindexed += segs
                continue
            buckets, digests = index
            groups: dict[int, list[str]] = {}
            for k in keys:
                groups.setdefault(_bucket_of(k, buckets), []).append(k)
            wanted += [(compaction, f"{_key_index(std.id, compaction)}/{b:05d}.keys", digests and digests[b], ks)
                       for b, ks in groups.items()]
        damaged: dict[str, str] = {}  # compaction -> what is wrong with its index
        for (compaction, path, digest, ks), data in zip(wanted, store.read_many([w[1] for w in wanted],
                                                                                missing_ok=True)):
            if data is None:
                if not store.exists(f"{_key_index(std.id, compaction)}/index.json"):
                    raise ObjectGoneError(f"no object at {store.url}/{path}")  # being deleted: list again
                damaged[compaction] = "lacks a bucket"
                continue
            if digest is not None and hashlib.sha256(data).hexdigest() != digest:  # emptied, truncated, rewritten
                damaged[compaction] = f"has a damaged bucket ({path.rsplit('/', 1)[-1]})"
                continue
            lines = b"\n" + data + b"\n"  # one key a line
            found.update(k for k in ks if f"\n{k}\n".encode() in lines)
        for compaction, what in sorted(damaged.items()):
            log.warning("the key index %s/%s %s: reading its segments' keys instead",
                        store.url, _key_index(std.id, compaction), what)
            unindexed += by_compaction[compaction]
        for seg in unindexed:
            found |= keys.intersection(segment_keys(store, seg))
        return found

    return _until_unchanged(f"the segments of standard {std.id}", read)


def segments_hold(store: Store | str, std: Standard, model_id: str) -> bool:
    """Whether the table's segments hold a row of `model_id` (removed or not): through the key index,
    a few reads whatever the table's size (`_in_segments`)."""
    store, std = as_store(store), check_standard(std)
    key = model_key(model_id)
    return key in _in_segments(store, std, {key})


def _usable_key_index(store: Store, folder: str, segments: list[str]) -> tuple[int, list[str] | None] | None:
    """The bucket count and the buckets' sha256 (None in an index written before they were recorded) of
    the key index in `folder` if it is whole (its `index.json` written last, and readable) and covers
    exactly the listed `segments` of its compaction; else None."""
    try:
        index = json.loads(store.read_bytes(f"{folder}/index.json"))
        buckets, covered = int(index["buckets"]), set(index["segments"])
        digests = index.get("sha256")
        if buckets < 1:
            raise ValueError(f"{buckets} buckets")
        if digests is not None and (not isinstance(digests, list) or len(digests) != buckets
                                    or not all(isinstance(d, str) for d in digests)):
            raise ValueError(f"its sha256 are not {buckets} strings")
    except ObjectGoneError:
        return None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("unreadable key index %s/%s/index.json (%s): reading its segments' keys instead",
                    store.url, folder, exc)
        return None
    return (buckets, digests) if covered == {s.rsplit("/", 1)[-1] for s in segments} else None


def delete_row(store: Store, std: Standard, model_id: str) -> bool:
    """Remove one model (see delete_rows); return whether it was in the table."""
    return not delete_rows(store, std, [model_id])


_strays: set[str] = set()  # row objects outside their shard folder, warned of once


def list_rows(store: Store, standard_id: str) -> list[str]:
    """The table's row objects. One outside its key's shard folder (a copy zooselect did not write, e.g.
    `rows/zz/<key>.parquet`) is left out with a warning: read too, it served its model twice, and a
    compaction wrote the key twice into a segment, which no read then accepted."""
    rows = []
    for path in store.list(f"{_base(standard_id)}/rows", ".parquet"):
        folder, key = path.rsplit("/", 2)[-2], _key_of(path)
        if folder == shard_of(key):
            rows.append(path)
        elif f"{store.url}/{path}" not in _strays:
            _strays.add(f"{store.url}/{path}")
            log.warning("%s/%s is not where zooselect keeps the row of key %s (rows/%s/); left out: move or "
                        "delete it", store.url, path, key, shard_of(key))
    return rows


def list_segments(store: Store, standard_id: str) -> list[str]:
    return store.list(f"{_base(standard_id)}/segments", ".parquet")


def list_markers(store: Store, standard_id: str) -> list[str]:
    return store.list(f"{_base(standard_id)}/deleted")


def may_have_rows(store: Store, standard_id: str) -> bool:
    """A cheap check before the expensive part of a job (one or two LIST calls, where `list_table`
    makes one per 1,000 objects): False when the table has no segment and no row object. True can
    still be a table whose every model was removed; the sweep says so."""
    return store.has_entries(f"{_base(standard_id)}/segments") or store.has_entries(f"{_base(standard_id)}/rows")


def _key_of(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def _validate(t: pa.Table, std: Standard, where: str, some_columns: bool = False, known_only: bool = False) -> None:
    """Refuse an object of another standard, schema version or width. `some_columns`: `t` holds only
    the columns a reader asked for (no vectors), so a missing `embedding` column is expected.
    `known_only`: refuse columns this version does not know (a rewrite would drop them)."""
    names = set(t.column_names)
    if known_only and names - set(schema_for(std).names):
        raise StandardMismatchError(f"{where}: holds column(s) {sorted(names - set(schema_for(std).names))} that "
                                    f"this zooselect ({selection.__version__}) does not know, written by a newer "
                                    f"one: rewriting its rows would drop them; run this with that version")
    if not set(REQUIRED_COLUMNS) <= names:
        raise StandardMismatchError(f"{where}: not a zooselect embedding object (columns {sorted(names)})")
    sids = set(pc.unique(t.column("standard_id")).to_pylist())
    if sids != {std.id}:
        raise StandardMismatchError(f"{where}: rows of standard(s) {sorted(map(str, sids))} found in "
                                    f"the table of standard {std.id}; refusing to mix standards")
    versions = set(pc.unique(t.column("schema_version")).to_pylist())
    if versions != {selection.SCHEMA_VERSION}:
        raise StandardMismatchError(f"{where}: schema version(s) {sorted(map(str, versions))}, this "
                                    f"zooselect reads {selection.SCHEMA_VERSION}{selection.schema_remedy(versions)}")
    if "embedding" in names:
        width = getattr(t.schema.field("embedding").type, "list_size", None)
        if width != std.width:
            raise StandardMismatchError(f"{where}: embedding width {width}, standard {std.id} "
                                        f"({std.form}, d={std.d}) needs {std.width}")
    elif not some_columns:  # a full object without an embedding column
        raise StandardMismatchError(f"{where}: not a zooselect embedding object (no 'embedding' column)")


@dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """Rows of one standard: metadata (Arrow, all columns but `embedding`) and (m, D) float32."""

    standard_id: str
    meta: pa.Table
    embeddings: np.ndarray

    @property
    def model_ids(self) -> list[str]:
        return self.meta.column("model_id").to_pylist()

    def __len__(self) -> int:
        return self.meta.num_rows


def embeddings_matrix(t: pa.Table) -> np.ndarray:
    """The `embedding` column as an (m, D) float32 array (zero-copy for one chunk)."""
    chunks = t.column("embedding")
    col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()  # combine copies
    width = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), width)


REQUIRED_COLUMNS = ("model_id", "model_key", "standard_id", "schema_version")  # what makes an object a row
INDEX_COLUMNS = [*REQUIRED_COLUMNS, "weights_sha256",
                 "catalog_entry", "weights_stamp", "library_versions"]


def _with_optional(std: Standard, t: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """`t` with the OPTIONAL_COLUMNS it lacks (of `columns`, if given) appended as nulls: objects
    written before a column was added read as if it were null."""
    schema = schema_for(std)
    missing = [n for n in OPTIONAL_COLUMNS if n not in t.column_names and (columns is None or n in columns)]
    for name in missing:
        t = t.append_column(schema.field(name), pa.nulls(t.num_rows, schema.field(name).type))
    if missing and columns is None and set(schema.names) <= set(t.column_names):
        t = t.select(schema.names)  # in the table's order, as newer objects are: they concatenate as one
    return t


def _shard(std: Standard, t: pa.Table, columns: list[str] | None, where: str) -> EmbeddingTable:
    """One shard of the table from a read object `t`: the table's columns in order and types (or only
    `columns`, no vectors); an object whose columns do not fit is refused in one line naming `where`."""
    schema = schema_for(std)
    t = _with_optional(std, t, columns)
    try:
        wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        t = t.select(wanted.names).cast(wanted)  # the table's types and nullability (others wrote some rows)
    except (KeyError, ValueError, pa.ArrowException) as exc:
        raise StandardMismatchError(f"{where}: its columns do not fit the table of standard {std.id} "
                                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    if columns is not None:
        return EmbeddingTable(std.id, t, np.zeros((t.num_rows, 0), np.float32))
    return EmbeddingTable(std.id, t.drop_columns(["embedding"]), embeddings_matrix(t))


@dataclass(frozen=True)
class Listing:
    """The objects one read of the table saw."""

    segments: tuple[str, ...]
    rows: tuple[str, ...]
    markers: tuple[str, ...]


def list_table(store: Store | str, std: Standard) -> Listing:
    """List the table's objects in the reverse of the order a compaction deletes them (it writes its
    segments first, then deletes old segments and markers, then row objects): rows, markers, then
    segments. A row object compacted and deleted after its listing is gone when read (the read lists
    again), and one deleted before is in a segment written before that, which the later segment
    listing sees; listing segments first could miss both. `store`: a Store, or its URL or path."""
    store, std = as_store(store), check_standard(std)
    rows = tuple(list_rows(store, std.id))
    markers = tuple(list_markers(store, std.id))
    segments = tuple(list_segments(store, std.id))
    if not rows and not segments:
        refuse_first_layout(store, std.id)
    return Listing(segments, rows, markers)


_FIRST_LAYOUT = re.compile(r"[0-9a-f]{2}/[^/]+\.parquet")  # <shard>/<key>.parquet beside rows/ (until commit 3)


def refuse_first_layout(store: Store, standard_id: str) -> None:
    """A StoreError if an empty table's folder holds row objects of the first layout
    (`embeddings/<id>/<shard>/<key>.parquet`, before `rows/`): read as no table at all, an embed wrote a
    second copy of each beside them, and the first version then refused the store. One listing, only
    of a table without rows or segments."""
    base = _base(standard_id)
    old = [p for p in store.list(base, ".parquet") if _FIRST_LAYOUT.fullmatch(p[len(base) + 1:])]
    if old:
        raise StoreError(f"{store.url}/{base} holds {len(old)} row object(s) of zooselect's first layout (e.g. "
                         f"{old[0][len(base) + 1:]}), which this version reads under rows/: move each two-hex-digit "
                         f"folder there into {store.url}/{base}/rows/ (the names stay), then run this again")


ROW_BATCH = 4096  # row objects read and yielded as one shard: memory stays bounded before a compaction
# A segment's row groups: about SEGMENT_GROUP_BYTES of vectors, at most SEGMENT_ROW_GROUP rows
# (`segment_row_group`). Each is swept where Arrow decoded it (`_segment_shards`). Arrow decodes row groups
# of 4,096 rows 2x faster than one of 50,000 (session 27), and with groups of ~16 MB a segment's read
# and sweep ran 1.6x faster for full-form rows (2,016 rows of 8.3 KB) and 2.2x-2.6x for per-source rows
# (224 of 75 KB) than with 4,096 rows (session 31, docs/performance.md).
SEGMENT_ROW_GROUP = 4096
SEGMENT_GROUP_BYTES = 16 << 20
# A compacted segment: at most SEGMENT_ROWS rows and about SEGMENT_BYTES of vectors, which a compaction
# holds, then writes, at once (50,000 per-source rows were 3.7 GB, 7 GB of memory with their bytes).
SEGMENT_ROWS = 50_000
SEGMENT_BYTES = 1 << 30


def segment_row_group(std: Standard) -> int:
    """Rows per row group of a segment of `std`'s table."""
    return max(1, min(SEGMENT_ROW_GROUP, SEGMENT_GROUP_BYTES // (4 * std.width)))


def iter_shards(store: Store | str, std: Standard, listing: Listing | None = None,
                columns: list[str] | None = None,
                on_row_bytes: Callable[[str, bytes], None] | None = None,
                skip_gone: bool = False, known_only: bool = False) -> Iterator[EmbeddingTable]:
    """The table as shards (each segment, newest first, then the row objects, ROW_BATCH at a time),
    each model once.

    With `columns`, only those metadata columns are read (no vectors): the cheap index.
    `on_row_bytes(path, data)` sees each row object's bytes as they are read. `skip_gone`: a listed
    row object that is gone when read is left out (else ObjectGoneError: the listing is out of date).
    `known_only`: an object holding a column this version does not know is refused (StandardMismatchError),
    where the rows are to be rewritten. `store`: a Store, or its URL or path.
    """
    store, std = as_store(store), check_standard(std)
    listing = listing or list_table(store, std)
    # Keys already yielded or overridden (row objects win over segments, markers delete):
    # one hash lookup per row, so a table of S segments costs O(m), not O(m * S).
    # A segment's keys hide rows of older compactions only (one compaction's segments hold each model
    # once, as `table_parts` takes them): none are kept when no older compaction follows (the usual
    # table, one compaction: a set of every key was 100 MB at a million models).
    hidden = hidden_keys(listing)
    # names sort by time, a compaction's segments together: the oldest segment's is the oldest compaction
    oldest = _compaction_of(listing.segments[0]) if listing.segments else ""
    for seg in reversed(listing.segments):  # newest first: newest wins
        keys, shards = _segment_shards(store, std, seg, hidden, columns, known_only)
        yield from shards
        if _compaction_of(seg) != oldest:
            hidden.update(keys)
    for start in range(0, len(listing.rows), ROW_BATCH):
        shard = _row_batch(store, std, listing.rows[start:start + ROW_BATCH], columns, on_row_bytes, skip_gone,
                           known_only)
        if shard is not None:
            yield shard


@dataclass(frozen=True)
class Part:
    """Rows of a listed table that one reader sweeps on its own (`table_parts`, `iter_part`): a segment
    less the rows that row objects, markers and the `newer` segments (of later compactions) hide, or a
    batch of row objects."""

    segment: str = ""
    newer: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()


def table_parts(listing: Listing) -> list[Part]:
    """The listing cut into parts whose rows, together, are those `iter_shards` yields, each model
    once: one part per segment, one per ROW_BATCH row objects. The segments of one compaction hold
    distinct models, so a segment's part reads the keys of later compactions' segments only (none on
    a compacted table; segments named before session 30 each count as a compaction of their own)."""
    segments = listing.segments
    of = [_compaction_of(seg) for seg in segments]
    parts = [Part(segment=seg, newer=tuple(n for n, c in zip(segments[i + 1:], of[i + 1:]) if c != of[i]))
             for i, seg in enumerate(segments)]
    return parts + [Part(rows=listing.rows[i:i + ROW_BATCH]) for i in range(0, len(listing.rows), ROW_BATCH)]


def iter_part(store: Store, std: Standard, part: Part, hidden: set[str],
              columns: list[str] | None = None) -> Iterator[EmbeddingTable]:
    """The shards of one part of a listing (`table_parts`); `hidden`: `hidden_keys` of that listing."""
    if part.segment:
        if part.newer:
            hidden = hidden.union(*(segment_keys(store, seg) for seg in part.newer))
        yield from _segment_shards(store, std, part.segment, hidden, columns)[1]
    elif part.rows:
        shard = _row_batch(store, std, part.rows, columns)
        if shard is not None:
            yield shard


def hidden_keys(listing: Listing) -> set[str]:
    """The keys whose segment rows a listing hides: those of its row objects and markers."""
    return {_key_of(p) for p in listing.rows} | {_key_of(p) for p in listing.markers}


def _compaction_of(segment: str) -> str:
    """The id of the compaction that wrote a segment: time and random part of its name (before session
    30 the random part was drawn per segment, so each such segment counts as a compaction of its own);
    a name of another pattern is its own id."""
    name = segment.rsplit("/", 1)[-1]
    match = _SEGMENT_NAME.fullmatch(name)
    return match.group(1) if match else name


def _needed(columns: list[str] | None) -> list[str] | None:
    return None if columns is None else sorted(set(columns) | set(REQUIRED_COLUMNS))


def _segment_shards(store: Store, std: Standard, seg: str, hidden: set[str], columns: list[str] | None,
                    known_only: bool = False) -> tuple[list[str], Iterator[EmbeddingTable]]:
    """Every key a segment holds, and its shards less the rows of `hidden` keys, validated. With
    `columns`, those columns (`_needed`) are read at once, one shard; without, its keys are read first,
    then its row groups streamed (`Store.iter_row_groups`), a shard each: memory holds a few row groups,
    not the segment (a sweep of 50,000-row per-source segments held 7 GB: the object's bytes and the
    decoded table)."""
    where = f"{store.url}/{seg}"
    with _segment_remedy():
        t = store.read_table_columns(seg, _needed(columns if columns is not None else []))
    _validate(t, std, where, some_columns=True)
    keys = t.column("model_key").to_pylist()
    keep = np.fromiter((k not in hidden for k in keys), bool, len(keys))
    kept = [k for k, ok in zip(keys, keep) if ok] if not keep.all() else keys
    if len(set(kept)) != len(kept):  # a model twice (another tool's segment): one copy would be served twice
        twice = next(k for k, n in collections.Counter(kept).items() if n > 1)
        raise StoreError(f"{where}: model_key {twice!r} is in the segment more than once; a segment "
                         f"holds each model once (`jobs.table remove` that model, or rewrite or delete the object)")
    if columns is not None:
        if not keep.all():
            t = t.filter(pa.array(keep))
        return keys, iter([_shard(std, t, columns, where)])

    def stream() -> Iterator[EmbeddingTable]:
        at = 0
        for group in _segment_groups(store, seg):
            if not group.num_rows:  # another tool's writer may leave an empty row group
                continue
            _validate(group, std, where, known_only=known_only)
            mask, at = keep[at:at + group.num_rows], at + group.num_rows
            if at > len(keys):  # the object changed between its two reads (another tool rewrote it)
                raise StoreError(f"{where}: its row groups hold more rows than its key column ({len(keys)})")
            if not mask.all():  # filtering copies the row group: only when something is hidden
                group = group.filter(pa.array(mask))
            if group.num_rows:
                yield _shard(std, group, None, where)
        if at != len(keys):
            raise StoreError(f"{where}: its row groups hold {at} rows, its key column {len(keys)}")
    return keys, stream()


@contextlib.contextmanager
def _segment_remedy() -> Iterator[None]:
    """A corrupt segment's error says what to do: every read of the table fails on it until it is gone."""
    try:
        yield
    except CorruptObjectError as exc:
        raise CorruptObjectError(f"{exc} (a segment: move it out of the store, and the next `python -m jobs.embed` "
                                 f"or `python -m jobs.reindex` run embeds its models again)") from exc


def _segment_groups(store: Store, seg: str, rows: list[int] | None = None) -> Iterator[pa.Table]:
    """`Store.iter_row_groups` of a segment, a corrupt one's error with its remedy."""
    with _segment_remedy():
        yield from store.iter_row_groups(seg) if rows is None else store.iter_row_groups(seg, rows=rows)


def segment_keys(store: Store, seg: str) -> list[str]:
    """The model keys a segment holds (its key column only)."""
    with _segment_remedy():
        t = store.read_table_columns(seg, ["model_key"])
    if "model_key" not in t.column_names:
        raise StandardMismatchError(f"{store.url}/{seg}: not a zooselect embedding object (no 'model_key' column)")
    return t.column("model_key").to_pylist()


def _row_batch(store: Store, std: Standard, paths: tuple[str, ...], columns: list[str] | None,
               on_row_bytes: Callable[[str, bytes], None] | None = None,
               skip_gone: bool = False, known_only: bool = False) -> EmbeddingTable | None:
    """Row objects read at once as one shard (None if `skip_gone` left them all out)."""
    tables, read = [], []
    for p, data in zip(paths, store.read_many(paths, missing_ok=skip_gone)):
        if data is None:
            log.info("%s/%s was removed after the table was listed; left out", store.url, p)
            continue
        if on_row_bytes is not None:
            on_row_bytes(p, data)
        try:
            tables.append(store.read_table(p, data))
        except StoreError as exc:  # its bytes in hand: a corrupt object, one model's
            raise CorruptObjectError(f"{exc} (a row object: delete it, and the next `python -m jobs.embed` or "
                                     f"`python -m jobs.reindex` run embeds its model again)") from exc
        read.append(p)
        _validate(tables[-1], std, f"{store.url}/{p}", known_only=known_only)
        keys, ids = (tables[-1].column(c).to_pylist() for c in ("model_key", "model_id"))
        if not _one_row_of(_key_of(p), keys, ids):  # else a model served twice, or under another's key
            raise StoreError(f"{store.url}/{p}: a row object holds one row, of the model its name keys; this one "
                             f"holds {len(keys)} row(s), model_key(s) {keys[:3]!r}, model id(s) {ids[:3]!r} "
                             f"(not written by zooselect? rewrite or delete it)")
    if not tables:
        return None
    try:  # rows written before an optional column was added lack it: null-filled, still one concat
        both = pa.concat_tables([_with_optional(std, t) for t in tables])
    except pa.ArrowInvalid:  # their schemas differ: conform each one (refusing, by name, one that cannot)
        shards = [_shard(std, t, columns, f"{store.url}/{p}") for p, t in zip(read, tables)]
        both = pa.concat_tables([s.meta if columns is not None else to_arrow(std, s) for s in shards])
    return _shard(std, both, columns, f"{len(read)} row objects alike, e.g. {store.url}/{read[0]}")


def _one_row_of(key: str, keys: list[Any], ids: list[Any]) -> bool:
    """Whether a row object named `key` holds one row, of a model whose key that is."""
    try:
        return keys == [key] and model_key(ids[0]) == key
    except ConfigError:  # not a model id at all
        return False


def read_consistently(store: Store, std: Standard, read: Callable[[Listing], T]) -> T:
    """`read(listing)` on a fresh listing of the table. A listed object that is gone when read (a
    remove, re-index or compaction deleted it meanwhile) means the listing is out of date: list
    again and read again, up to READS times."""
    return _until_unchanged(f"the table of standard {std.id}", lambda: read(list_table(store, std)))


def _until_unchanged(what: str, read: Callable[[], T]) -> T:
    """`read()`, again while it finds an object it listed gone, up to READS times; then a StoreError."""
    for attempt in range(1, READS + 1):
        try:
            return read()
        except ObjectGoneError as exc:
            _changed(what, exc, attempt)
    raise AssertionError("unreachable")


def _changed(what: str, exc: ObjectGoneError, attempt: int) -> None:
    """A read of `what` found an object it listed gone: a StoreError after the last of READS."""
    if attempt == READS:
        raise StoreError(f"{what} changed during each of {READS} reads ({exc}); try again") from exc
    log.info("%s changed while it was read (%s); listing it again", what, exc)


def read_index(store: Store | str, std: Standard) -> dict[str, dict[str, Any]]:
    """model_id -> {weights_sha256, catalog_entry, ...} for every model, without vectors."""
    return index_of(store, std)[0]


def index_of(store: Store | str, std: Standard,
             model_ids: collections.abc.Collection[str] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`read_index` of only `model_ids` (every model when None), and the ids of every model in the table:
    one read of the table's index columns, holding as dicts only the rows asked for (every row as a dict
    was 1.2 GB at a million models, for a catalog of one)."""
    store, std = as_store(store), check_standard(std)
    wanted = None if model_ids is None else pa.array(sorted(set(model_ids)), pa.string())

    def index(listing: Listing) -> tuple[dict[str, dict[str, Any]], list[str]]:
        rows, versions, ids = {}, {}, []  # rows share a few library_versions strings: each held once
        for shard in iter_shards(store, std, listing, columns=INDEX_COLUMNS):
            meta = shard.meta
            ids += meta.column("model_id").to_pylist()
            if wanted is not None:
                meta = meta.filter(pc.is_in(meta.column("model_id"), value_set=wanted))
            for row in meta.to_pylist():
                row["library_versions"] = versions.setdefault(row["library_versions"], row["library_versions"])
                rows[row["model_id"]] = row
        return rows, ids
    return read_consistently(store, std, index)


def iter_rows(store: Store | str, std: Standard, model_ids: list[str],
              known_only: bool = False) -> Iterator[tuple[dict[str, Any], str]]:
    """The whole rows (`embedding` an array, as written) of those of `model_ids` in the table, each once,
    with the object each was read from: as a read of the table serves them, the model's row object,
    else (unless a marker removed it) its row in the newest segment holding it (a row object or
    marker written since then is not seen). In the order they are stored, so that memory holds
    ROW_BATCH row objects or a batch of row groups, not the rows: the table is listed, the wanted row
    objects read, then the key columns of the segments, newest first, until every model is found, and
    of a segment only the row groups that hold one (not the table's vectors). A listed object gone when
    read (a compaction replaced it) lists the table again and goes on with the models not yet yielded,
    up to READS times. `known_only`: as `iter_shards`'s (the rows are to be rewritten)."""
    store, std = as_store(store), check_standard(std)
    _check_ids(model_ids)  # at the call, not at the first row
    return _iter_rows(store, std, model_ids, known_only)


def _iter_rows(store: Store, std: Standard, model_ids: list[str],
               known_only: bool = False) -> Iterator[tuple[dict[str, Any], str]]:
    wanted = {model_key(m): m for m in model_ids}
    done: set[str] = set()
    for attempt in range(1, READS + 1):
        try:
            for row, source in _rows_of(store, std, list_table(store, std), wanted, done, known_only):
                done.add(row["model_key"])
                yield row, source
            return
        except ObjectGoneError as exc:
            _changed(f"the table of standard {std.id}", exc, attempt)


def _rows_of(store: Store, std: Standard, listing: Listing, wanted: dict[str, str],
             done: set[str], known_only: bool) -> Iterator[tuple[dict[str, Any], str]]:
    """`iter_rows` over one listing, less the keys in `done`."""
    def rows(shard: EmbeddingTable | None, segment: str = "") -> Iterator[tuple[dict[str, Any], str]]:
        for row, vector in zip(shard.meta.to_pylist() if shard else [], shard.embeddings if shard else []):
            if wanted.get(row["model_key"]) == row["model_id"] and row["model_key"] not in done:
                yield dict(row, embedding=vector), segment or row_path(std.id, row["model_id"])
    objects = tuple(p for p in listing.rows if _key_of(p) in wanted and _key_of(p) not in done)
    for start in range(0, len(objects), ROW_BATCH):
        yield from rows(_row_batch(store, std, objects[start:start + ROW_BATCH], None, known_only=known_only))
    todo = set(wanted) - hidden_keys(listing) - done
    for seg in reversed(listing.segments):  # newest first: the newest holds the row a read serves
        if not todo:
            break
        keys = segment_keys(store, seg)
        at = [i for i, k in enumerate(keys) if k in todo]
        if not at:
            continue
        if len({keys[i] for i in at}) != len(at):
            raise StoreError(f"{store.url}/{seg}: a model_key is in the segment more than once; a segment "
                             f"holds each model once (rewrite or delete the object)")
        found = pa.array(sorted(keys[i] for i in at), pa.string())
        for group in _segment_groups(store, seg, rows=at):
            _validate(group, std, f"{store.url}/{seg}", known_only=known_only)
            yield from rows(_shard(std, group.filter(pc.is_in(group.column("model_key"), found)), None,
                                   f"{store.url}/{seg}"), seg)
        todo -= {keys[i] for i in at}


def load_table(store: Store | str, std: Standard, listing: Listing | None = None) -> EmbeddingTable:
    """The whole table of `std` in memory (validated, each model once). Without `listing`, the
    table is listed now, and again if it changes while it is read (`read_consistently`)."""
    store, std = as_store(store), check_standard(std)
    if listing is None:
        return read_consistently(store, std, lambda fresh: load_table(store, std, fresh))
    shards = list(iter_shards(store, std, listing))
    if not shards:
        return _shard(std, schema_for(std).empty_table(), None, "an empty table")
    meta = pa.concat_tables([s.meta for s in shards])
    ids = meta.column("model_id").to_pylist()
    if len(set(ids)) != len(ids):  # one object per key makes this impossible; guard anyway
        raise StoreError(f"table of standard {std.id} holds duplicate model ids")
    return EmbeddingTable(std.id, meta, np.concatenate([s.embeddings for s in shards]))


def export_table(store: Store | str, std: Standard, path: str | os.PathLike, progress: Progress | None = None) -> int:
    """Write the live table of `std` to one local Parquet file, shard by shard (memory holds one
    shard, not the table); return its rows. The file appears whole or not at all (`atomic_local_file`).
    A path that cannot be written, or inside a local store, is a ConfigError before anything is read."""
    store, std = as_store(store), check_standard(std)
    path = os.fspath(path)
    check_output(path)
    check_outside_store(store, {"path": path})
    if os.path.splitext(path)[1].lower() in (".csv", ".tsv", ".json", ".jsonl", ".txt", ".arrow", ".feather"):
        raise ConfigError(f"cannot export to {path!r}: the table is written as Parquet; name the file .parquet "
                          f"(DuckDB, Polars and pandas read it, and write the other formats)")
    report = progress or (lambda what, n: None)
    with atomic_local_file(path) as tmp:
        def write(listing: Listing) -> int:
            rows = 0
            try:
                schema = schema_for(std)
                with pq.ParquetWriter(tmp, schema, **parquet_options(schema, portable=True)) as out:
                    for shard in iter_shards(store, std, listing):
                        if len(shard):  # a segment whose every row was removed or rewritten since
                            out.write_table(to_arrow(std, shard))
                        rows += len(shard)
                        report("rows", len(shard))
            except ObjectGoneError:
                report("rows", -rows)  # read again from the start (`read_consistently`)
                raise
            return rows

        return read_consistently(store, std, write)


@dataclass(frozen=True)
class CompactResult:
    segments_written: int
    rows: int
    objects_removed: int
    seconds: float
    temporaries_removed: int = 0  # of local writes killed part-way (`Store.remove_stale_temporaries`)


def to_arrow(std: Standard, table: EmbeddingTable) -> pa.Table:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(table.embeddings.reshape(-1), pa.float32()), std.width)
    return table.meta.append_column("embedding", emb).select(schema_for(std).names).cast(schema_for(std))


def default_segment_rows(std: Standard) -> int:
    """Rows per compacted segment unless told: SEGMENT_ROWS, fewer for rows wider than SEGMENT_BYTES /
    SEGMENT_ROWS (14,339 per-source rows of 18,720 floats)."""
    return max(1, min(SEGMENT_ROWS, SEGMENT_BYTES // (4 * std.width)))


def compact(store: Store | str, std: Standard, segment_rows: int | None = None,
            break_leases: bool = False, progress: Progress | None = None) -> CompactResult:
    """Fold row objects, markers and old segments into new segments of <= `segment_rows` rows
    (`default_segment_rows` when None).

    New segments are written first, consumed objects deleted after; a row object is
    deleted only if it still holds the compacted bytes (one re-embedded meanwhile keeps
    its newer object, which overrides the segment; one re-embedded between that check and the
    delete is written back by its writer, see `restore_rows`). Readers see a complete table throughout.
    Refuses while another compaction's lease is younger than STALE_LEASE_S; `break_leases`
    deletes such leases first (for one whose compaction crashed; never while one runs). The temporary
    files of local writes killed part-way, older than STALE_TEMPORARY_S, are deleted too.
    """
    store, std = as_store(store), check_standard(std)
    segment_rows = default_segment_rows(std) if segment_rows is None else segment_rows
    if isinstance(segment_rows, bool) or not isinstance(segment_rows, (int, np.integer)) or segment_rows < 1:
        raise ConfigError(f"segment rows must be an integer >= 1, got {segment_rows!r}")
    t0 = time.perf_counter()
    leases = f"{_base(std.id)}/_compacting"
    lease = f"{leases}/{uuid.uuid4().hex}"
    # Written before listing: a remove from now on writes its marker. It holds its start time, so
    # that the lease of a compaction that crashed is cleared by the next one (else every remove
    # would write a marker).
    store.write_bytes(lease, str(time.time()).encode())
    stop = threading.Event()
    heartbeat = threading.Thread(target=_keep_lease, args=(store, lease, stop), daemon=True)
    heartbeat.start()
    try:
        running = _other_leases(store, leases, keep=lease, remove=break_leases)
        if running:
            raise StoreError(f"another compaction of standard {std.id} is running (lease {running[0]}, "
                             f"last refreshed {running[1]}); run this one after it ends, or, if that one crashed, "
                             f"with --break-leases")
        return _compact(store, std, segment_rows, t0, progress or (lambda what, n: None), _lease_id(lease))
    finally:
        stop.set()
        heartbeat.join()  # its last write lands before the delete, never after it
        store.delete(lease)


def _keep_lease(store: Store, lease: str, stop: threading.Event) -> None:
    """Rewrite the lease's time every LEASE_REFRESH_S while the compaction runs: a long one (10^6 row
    objects at 10 ms a call take hours) is never taken for a crashed one (STALE_LEASE_S)."""
    while not stop.wait(LEASE_REFRESH_S):
        try:
            store.write_bytes(lease, str(time.time()).encode())
        except StoreError as exc:
            log.warning("could not refresh the compaction's lease %s: %s", lease, exc)


def _other_leases(store: Store, leases: str, keep: str, remove: bool = False) -> tuple[str, str] | None:
    """Clear the leases of compactions that crashed (all other leases with `remove`); return
    (path, start) of one that is running.

    Two compactions that start at once may both see the other and both refuse: safe, unlike two
    running at once (the older one's segment could be written last and bring back old rows).
    """
    running = None
    for path, started in _leases(store, leases, skip=keep):
        when = "at a time it does not say" if started is None else \
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
        if remove or (started is not None and _stale(started)):
            log.warning("removing the lease of a compaction last refreshed %s: %s", when, path)
            store.delete(path)
        else:
            running = running or (f"{store.url}/{path}", when)
    return running


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _delete_if_unchanged(store: Store, path: str, digest: str | None, flush: bool = True) -> bool:
    """Delete `path` if it still holds the bytes of `digest` (re-read and compared first); False if
    it is gone or holds other bytes."""
    try:
        data = store.read_bytes(path)
    except ObjectGoneError:
        return False
    return _digest(data) == digest and store.delete(path, flush=flush)


def _compact(store: Store, std: Standard, segment_rows: int, t0: float, progress: Progress,
             lease_id: str) -> CompactResult:
    listing = list_table(store, std)
    # Of the objects as read: one rewritten meanwhile is not deleted. The markers are read before any
    # row object: a remove that rewrites one after this compaction read its row is kept.
    digests: dict[str, str] = {}
    if listing.markers:
        read = store.read_many(listing.markers, missing_ok=True)
        digests = {p: _digest(data) for p, data in zip(listing.markers, read) if data is not None}
    # Named by the time to the nanosecond: segment names sort by it, and the newest wins (two compactions
    # in one second used to sort by their random part); then by the lease's id, which `restore_rows`
    # compares with the compactions a writer saw running.
    now = time.time_ns()
    compaction = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}{now % 10**9:09d}-{lease_id}"
    rows = 0
    segments: list[str] = []
    keys: list[pa.Array] = []  # of each segment written, for its key index

    def tables() -> Iterator[pa.Table]:
        nonlocal rows
        # A row object removed since the listing is left out: its remove saw the lease and wrote a marker.
        for shard in iter_shards(store, std, listing, skip_gone=True, known_only=True,
                                 on_row_bytes=lambda p, data: digests.update({p: _digest(data)})):
            rows += len(shard)
            progress("rows", len(shard))
            if len(shard):
                yield to_arrow(std, shard)

    # Streamed: memory holds one shard (an old segment's batch of row groups, or a batch of row
    # objects) and one row group of the new segment, never a segment or the table.
    for segment in _split(tables(), segment_rows):
        segments.append(f"{_base(std.id)}/segments/seg-{compaction}-{len(segments):05d}.parquet")
        store.write_tables(segments[-1], schema_for(std), _keeping_keys(segment, keys), segment_row_group(std))
    if segments:  # after the segments: a remove uses an index only once it is complete
        _write_key_index(store, std, compaction, segments, pa.concat_arrays(keys))
    # Old segments (then their key indexes), then markers, then row objects: stopped at any point (a
    # crash, a reader in between), the table is the same. Rows first would let an old marker hide a
    # re-added model. Each step's deletes are flushed to disk (local stores) before the next step's.
    def step(paths: Sequence[str], delete: Callable[[str], bool], mapper: Callable[..., Iterable[bool]] = map) -> int:
        deleted = 0
        for gone in mapper(delete, paths):
            deleted += gone
            progress("objects", gone)
        store.flush_folders(paths)
        return deleted

    removed = step(listing.segments, lambda p: store.delete(p, flush=False))
    # The key indexes of the old segments and of compactions that stopped: each `index.json` first, so
    # that an index stopped half-deleted is never read.
    own = _key_index(std.id, compaction) + "/"
    stale = [p for p in store.list(f"{_base(std.id)}/key_index") if not p.startswith(own)]
    removed += step(sorted(stale, key=lambda p: not p.endswith("/index.json")), lambda p: store.delete(p, flush=False))
    store.remove_empty_folders(f"{_base(std.id)}/key_index")  # a local store's folder per compaction
    # A marker rewritten since it was read is a remove of a row this compaction may have folded in:
    # kept. One that cannot be read stops the compaction here (deleting rows after it, the marker
    # could hide a re-added model's row in the new segment).
    removed += step(listing.markers, lambda p: _delete_if_unchanged(store, p, digests.get(p), flush=False))

    # A marker left now (written or rewritten since the markers were read: a remove while this compaction
    # ran, its model perhaps added back since, its new row object folded in above) hides that model's
    # row in the new segment. Its row object, which overrides the marker, is kept for the next compaction:
    # deleted, a model added back would be hidden.
    marked = {_key_of(p) for p in list_markers(store, std.id)}

    def drop_row(p: str) -> bool:
        if _key_of(p) in marked:
            return False
        try:
            return _delete_if_unchanged(store, p, digests.get(p), flush=False)
        except StoreError:
            return False  # kept: the row object overrides the segment

    with ThreadPoolExecutor(DELETE_THREADS) as pool:  # two calls a row: in parallel, as the reads are
        removed += step(listing.rows, drop_row, pool.map)
    temporaries = store.remove_stale_temporaries(_base(std.id), STALE_TEMPORARY_S)
    log.info("compacted %d rows of %s into %d segment(s), removed %d objects", rows, std.id, len(segments), removed)
    return CompactResult(len(segments), rows, removed, time.perf_counter() - t0, temporaries)


def _split(tables: Iterator[pa.Table], rows: int) -> Iterator[Iterator[pa.Table]]:
    """Cut a stream of non-empty tables into consecutive streams of `rows` rows (the last may hold
    fewer), each consumed before the next is asked for."""
    head = next(tables, None)
    while head is not None:
        def take() -> Iterator[pa.Table]:
            nonlocal head
            left = rows
            while left and head is not None:
                if head.num_rows <= left:
                    yield head
                    left -= head.num_rows
                    head = next(tables, None)
                else:
                    yield head.slice(0, left)
                    head, left = head.slice(left), 0
        segment = take()
        yield segment
        for _ in segment:  # one its reader stopped early: the next begins after it
            pass


def _keeping_keys(tables: Iterator[pa.Table], keys: list[pa.Array]) -> Iterator[pa.Table]:
    """The tables, each one's model keys appended to `keys` as it passes."""
    for t in tables:
        keys.append(t.column("model_key").combine_chunks())
        yield t


def versions_json(**extra: str) -> str:
    """The versions a row was made by (`library_versions`), with `extra` facts of the same kind."""
    import pyarrow
    import timm
    import torch

    from selection.models import PREPROCESS_VERSION

    return json.dumps({"zooselect": selection.__version__, "timm": timm.__version__,
                       "torch": torch.__version__, "numpy": np.__version__,
                       "pyarrow": pyarrow.__version__, "preprocess": str(PREPROCESS_VERSION), **extra},
                      sort_keys=True)
