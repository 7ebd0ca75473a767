"""Scaling benchmark: `python -m jobs.scaling [--quick] [--max-m 1000000] [--out docs/performance.json]`.

Prints ratios measured in one run:
1. update: time to add one model (one row object) and to remove one, with m = 10,
   10^3, 10^5 rows already in the table, as row objects and as compacted segments, and to remove one
   that lives only in the segments (found through the compaction's key index);
2. load + sweep of m = 10^3 .. 10^6 rows (d = 64, full form: 2,080 floats a row)
   against a bare pyarrow read of the same bytes and a bare numpy float32 product (each span of columns
   the queries weigh times the query rows weighing it), and against the machine's memory bandwidth (a numpy copy);
3. embedding throughput per Ray actor (CPU, or CUDA with bf16) against the bare forward pass of the same model
   at the same batch size and thread count;
4. compaction memory: the peak RSS of `compact` (each in a fresh process) on tables of m and 2m rows in
   segments, against each other (1.0x: memory does not grow with the table; 2.0x: it holds the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import prog, run_program
from selection.embedding import RankQuery, TaskQuery, embedding_width, linear_queries, plan_queries
from selection.errors import ConfigError, ModelError
from selection.keys import model_key
from selection.select import sweep_fronts, sweep_shards
from selection.standard import Standard, save_standard
from selection.storage import Store, check_output, parquet_bytes, write_file_atomically
from selection.table import (META_FIELDS, compact, delete_row, iter_shards, marker_path,
                             row_path, schema_for, segment_row_group, write_row)


def synthetic_standard(d: int = 64, form: str = "full") -> Standard:
    """A standard object of `form`'s width (4 probe sources); no baseline is run (synthetic rows)."""
    spec = {"form": form, "d": d, "input_size": None, "schema_version": 1, "probe_sources": ["a", "b", "c", "d"],
            "baseline": {"entry": {"id": "synthetic", "arch": "resnet18"}, "weights_sha256": "0" * 64}}
    z = np.zeros((4, d))
    return Standard("std-synthetic000000", spec, np.zeros((4, 8, 8, 3), np.uint8), np.arange(2),
                    np.arange(2, 4), np.zeros(8), np.zeros((8, d)), z)


def synthetic_rows(std: Standard, start: int, n: int, rng: np.random.Generator) -> pa.Table:
    ids = [f"synthetic/model-{i:07d}" for i in range(start, start + n)]
    cols: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in META_FIELDS}
    cols.update({"model_id": pa.array(ids), "model_key": pa.array([model_key(i) for i in ids]),
                 "arch": pa.array(["resnet18"] * n), "is_baseline": pa.array([False] * n),
                 "tags": pa.array([["synthetic"]] * n, pa.list_(pa.string())),
                 "num_params": pa.array(rng.integers(1e6, 1e8, n)), "gflops": pa.array(rng.random(n) * 10),
                 "input_size": pa.array([224] * n, pa.int32()), "standard_id": pa.array([std.id] * n),
                 "schema_version": pa.array([1] * n, pa.int32()), "weights_sha256": pa.array(["0" * 64] * n)})
    cols["coverage"] = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * std.d, dtype=np.float32)), std.d)
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(
        pa.array(rng.random(n * std.width, dtype=np.float32)), std.width)
    schema = schema_for(std)
    return pa.table([cols[f.name] for f in schema], schema=schema)


def one_row(std: Standard, model_id: str, rng: np.random.Generator) -> dict[str, Any]:
    return {"model_id": model_id, "model_key": model_key(model_id), "arch": "resnet18", "is_baseline": False,
            "tags": [], "standard_id": std.id, "schema_version": 1, "weights_sha256": "1" * 64,
            "num_params": 1, "gflops": 1.0, "input_size": 224,
            "embedding": rng.random(std.width, dtype=np.float32), "coverage": rng.random(std.d, dtype=np.float32)}


def fill_objects(root: str, std: Standard, m: int, rng: np.random.Generator) -> None:
    """m row objects written straight to disk (setup, not measured)."""
    rows = synthetic_rows(std, 0, m, rng)
    for i in range(m):
        path = os.path.join(root, row_path(std.id, rows.column("model_id")[i].as_py()))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(parquet_bytes(rows.slice(i, 1)))


def _time_round(store: Store, std: Standard, model_id: str, rng: np.random.Generator) -> tuple[float, float]:
    row = one_row(std, model_id, rng)
    t0 = time.perf_counter()
    write_row(store, std, row)
    t1 = time.perf_counter()
    delete_row(store, std, model_id)
    return t1 - t0, time.perf_counter() - t1


def _time_segment_only_remove(store: Store, std: Standard, model_id: str) -> float:
    """Remove a model that lives only in the segments (its key looked up, its marker written), timed;
    then put it back by deleting the marker (not timed)."""
    t0 = time.perf_counter()
    if not delete_row(store, std, model_id):
        raise AssertionError(f"{model_id} was not found in the segments")
    seconds = time.perf_counter() - t0
    store.delete(marker_path(std.id, model_id))
    return seconds


def bench_updates(ms: list[int], reps: int, work: str) -> list[dict[str, Any]]:
    """Add/remove one model in tables of each size, interleaved round-robin so that
    machine noise hits every size alike; medians over `reps` rounds."""
    std = synthetic_standard()
    rng = np.random.default_rng(0)
    stores: dict[tuple[int, str], Store] = {}
    for m in ms:
        for layout in ("objects", "segments"):
            root = os.path.join(work, f"upd-{m}-{layout}")
            fill_objects(root, std, m, rng)
            stores[(m, layout)] = Store(root)
            if layout == "segments":
                compact(stores[(m, layout)], std)
            print(f"update  table m={m} ({layout}) ready", flush=True)
    times: dict[tuple[int, str], list[tuple[float, float]]] = {k: [] for k in stores}
    segment_only: dict[int, list[float]] = {m: [] for m in ms}
    for r in range(reps):
        for key, store in stores.items():
            times[key].append(_time_round(store, std, f"new/model-{r}", rng))
            if key[1] == "segments":
                segment_only[key[0]].append(_time_segment_only_remove(store, std, f"synthetic/model-{r % key[0]:07d}"))
    out = []
    for m in ms:
        row: dict[str, Any] = {"m": m}
        for layout in ("objects", "segments"):
            adds, rms = zip(*times[(m, layout)])
            row[f"add_{layout}_ms"] = 1e3 * statistics.median(adds)
            row[f"remove_{layout}_ms"] = 1e3 * statistics.median(rms)
        row["remove_segment_only_ms"] = 1e3 * statistics.median(segment_only[m])
        out.append(row)
        print(f"update  m={m:>7}: add {row['add_objects_ms']:6.2f} ms, remove {row['remove_objects_ms']:6.2f} ms "
              f"(row objects); add {row['add_segments_ms']:6.2f} ms, remove {row['remove_segments_ms']:6.2f} ms "
              f"(compacted), remove {row['remove_segment_only_ms']:6.2f} ms (a model only in segments)", flush=True)
    for key in stores:
        shutil.rmtree(stores[key].root)
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def compaction_peak_mib(root: str, segment_rows: int) -> float:
    """Compact the synthetic table at `root` in this process; its peak RSS above the RSS before (MiB).

    The peak is Linux's VmHWM, reset first (`/proc/self/clear_refs`), so that the imports' own peak
    does not hide the compaction's."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    compact(Store(root), synthetic_standard(), segment_rows=segment_rows)
    return (_status_kib("VmHWM") - before) / 1024


def bench_compaction(ms: list[int], segment_rows: int, work: str, layout: str = "segments") -> list[dict[str, Any]]:
    """Peak memory of compacting m rows held in segments of `segment_rows` (or, `layout="rows"`, in one
    object each, as before a first compaction), each m in a fresh process."""
    std = synthetic_standard()
    rng = np.random.default_rng(2)
    out = []
    for m in ms:
        root = os.path.join(work, f"compact-{layout}-{m}")
        store = Store(root)
        if layout == "rows":
            fill_objects(root, std, m, rng)
        else:
            for i, start in enumerate(range(0, m, segment_rows)):
                store.write_table(f"embeddings/{std.id}/segments/seg-20000101T000000-{i:08x}-00000.parquet",
                                  synthetic_rows(std, start, min(segment_rows, m - start), rng),
                                  row_group_size=segment_row_group(std))
        code = ("from jobs.scaling import compaction_peak_mib; "
                f"print(compaction_peak_mib({root!r}, {segment_rows}))")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        peak = float(run.stdout.strip().splitlines()[-1])
        vectors = m * std.width * 4 / 2**20
        out.append({"m": m, "layout": layout, "segment_rows": segment_rows, "vectors_mib": round(vectors, 1),
                    "peak_mib": round(peak, 1)})
        print(f"compact m={m:>8} in {layout:<8}: {vectors:,.0f} MiB of vectors, peak RSS {peak:,.0f} MiB above "
              f"the process's start", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return out


def memory_bandwidth_gbs() -> float:
    a = np.ones(256 * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best / 1e9  # read + write


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


PER_SOURCE_MAX_M = 100_000


def synthetic_queries(std: Standard, tasks: int, rng: np.random.Generator) -> list[TaskQuery]:
    """Random task queries of the standard's form. Per-source: as `selection.embedding.task_query` lays
    them out for a 10-class task whose images are nearest one probe source (source t mod 4): 10
    eigen-directions, each a numerator row weighing that source's C_s block and a denominator row
    weighing its S_s block; numerators scaled so that the correlations (on rows of uniform numbers)
    are about 0.3, not clipped."""
    if std.form != "per-source":
        return linear_queries(rng.random((tasks, std.width)))
    r, block = 10, std.d * (std.d + 1) // 2
    queries = []
    for t in range(tasks):
        s = t % len(std.spec["probe_sources"])
        num, den = np.zeros((r, std.width)), np.zeros((r, std.width))
        num[:, block * (1 + 2 * s):block * (2 + 2 * s)] = rng.random((r, block)) / np.sqrt(block)
        den[:, block * (2 + 2 * s):block * (3 + 2 * s)] = rng.random((r, block)) + 1.0
        queries.append(TaskQuery(num, rng.random(r), den))
    return queries


def bare_product(embeddings: np.ndarray, weights: list[tuple[int, int, np.ndarray]]) -> list[np.ndarray]:
    """numpy's float32 product of each span of stored columns with the query rows weighing it (the
    least a sweep multiplies): the baseline a sweep's product is measured against."""
    return [embeddings[:, lo:hi] @ w for lo, hi, w in weights]


PLAIN_MAX_M = 100_000  # the sweep also times segments in plain zstd up to this size (disk, time)


def bench_sweep(ms: list[int], tasks: int, work: str, segment_rows: int, form: str = "full") -> list[dict[str, Any]]:
    std = synthetic_standard(form=form)
    rng = np.random.default_rng(1)
    w = synthetic_queries(std, tasks, rng)
    print(f"sweep   form {form}: {std.width} float32 per model, {sum(len(q.num) for q in w)} query rows"
          + (" + as many ratio rows" if form == "per-source" else "") + f" for {tasks} tasks", flush=True)
    bw = memory_bandwidth_gbs()
    print(f"memory bandwidth (numpy copy, read+write): {bw:.1f} GB/s", flush=True)
    out = []
    for m in ms:
        root = os.path.join(work, f"sweep-{m}")
        store = Store(root)
        for start in range(0, m, segment_rows):
            n = min(segment_rows, m - start)
            store.write_table(f"embeddings/{std.id}/segments/seg-{start:09d}.parquet",
                              synthetic_rows(std, start, n, rng), row_group_size=segment_row_group(std))
        segs = sorted(os.path.join(root, "embeddings", std.id, "segments", f)
                      for f in os.listdir(os.path.join(root, "embeddings", std.id, "segments")))
        nbytes = sum(os.path.getsize(p) for p in segs)
        # Ours, end to end: list, read, validate, build matrices, sweep, top-k. Up to PLAIN_MAX_M, the
        # same rows in plain zstd segments (float columns not byte-stream-split, as stores wrote them
        # before session 29) too, the two timed in turn.
        plain = None
        if m <= PLAIN_MAX_M:
            plain = Store(root + "-plain")
            for p in segs:
                sink = io.BytesIO()
                pq.write_table(pq.read_table(p), sink, compression="zstd", row_group_size=segment_row_group(std))
                plain.write_bytes(os.path.relpath(p, root), sink.getvalue())
        totals: dict[str, list[float]] = {"ours": [], "plain": []}
        for _ in range(2):
            totals["ours"].append(_timed(lambda: sweep_shards(iter_shards(store, std), w, 10)))
            if plain is not None:
                totals["plain"].append(_timed(lambda: sweep_shards(iter_shards(plain, std), w, 10)))
        t_total = min(totals["ours"])
        plain_bytes = None
        if plain is not None:
            plain_bytes = sum(os.path.getsize(os.path.join(plain.root, os.path.relpath(p, root))) for p in segs)
            shutil.rmtree(plain.root)
        # Ours, load only and sweep only, shard by shard (memory stays at one segment);
        # bare: numpy multiplying the same matrices, pyarrow reading the same bytes.
        wt = [(lo, hi, g.astype(np.float32)) for lo, hi, g in plan_queries(w).groups]
        t_load = t_sweep = t_mm = 0.0
        emb_bytes = 0
        shards = iter_shards(store, std)
        while True:
            t0 = time.perf_counter()
            shard = next(shards, None)
            t_load += time.perf_counter() - t0
            if shard is None:
                break
            t_sweep += min(_timed(lambda: sweep_shards([shard], w, 10)) for _ in range(2))
            t_mm += min(_timed(lambda: bare_product(shard.embeddings, wt)) for _ in range(2))
            emb_bytes += shard.embeddings.nbytes

        def bare_read() -> None:
            for p in segs:
                with open(p, "rb") as fh:
                    pq.ParquetFile(pa.BufferReader(fh.read())).read()  # as Store.read_table
        t_read = min(_timed(bare_read) for _ in range(2))
        row = {"m": m, "form": form, "width": std.width, "bytes_on_disk": nbytes, "load_s": t_load,
               "bare_read_s": t_read,
               "load_ratio": t_load / t_read, "sweep_s": t_sweep, "bare_matmul_s": t_mm,
               "sweep_ratio": t_sweep / t_mm, "load_plus_sweep_s": t_total,
               "end_to_end_ratio": t_total / (t_read + t_mm),
               "sweep_gbs": emb_bytes / t_sweep / 1e9, "bandwidth_gbs": bw}
        if totals["plain"]:
            row.update(plain_zstd_load_plus_sweep_s=min(totals["plain"]), plain_zstd_bytes_on_disk=plain_bytes,
                       encoding_speedup=min(totals["plain"]) / t_total)
        out.append(row)
        print(f"sweep   {form} m={m:>7}: load+sweep {t_total:7.3f} s = {row['end_to_end_ratio']:.2f}x (bare read "
              f"{t_read:.3f} s + bare matmul {t_mm:.3f} s); load {row['load_ratio']:.2f}x bare read; "
              f"sweep {t_sweep:.3f} s = {row['sweep_ratio']:.2f}x bare matmul, "
              f"{row['sweep_gbs']:.1f} GB/s of {bw:.1f} GB/s"
              + (f"; plain zstd: {row['plain_zstd_load_plus_sweep_s']:.3f} s ({row['encoding_speedup']:.2f}x "
                 f"ours), {plain_bytes / nbytes:.2f}x the bytes" if totals["plain"] else ""), flush=True)
        if form == "per-source":
            # The default score: each task's per-source query and its full one, ranks over every row.
            block = std.d * (std.d + 1) // 2
            full = np.zeros((tasks, std.width))
            full[:, :block] = rng.random((tasks, block))
            ranked = [RankQuery((q, f)) for q, f in zip(w, linear_queries(full))]
            t_rank = min(_timed(lambda: sweep_shards(iter_shards(store, std), ranked, 10)) for _ in range(2))
            # The same with each task's Pareto front of score against GFLOPs (jobs.select --pareto).
            t_front = min(_timed(lambda: sweep_fronts(iter_shards(store, std), ranked, 10, pareto="gflops"))
                          for _ in range(2))
            row.update(rank_mean_load_plus_sweep_s=t_rank, rank_mean_ratio=t_rank / t_total,
                       pareto_load_plus_sweep_s=t_front, pareto_ratio=t_front / t_rank)
            print(f"sweep   rank-mean m={m:>7}: load+sweep {t_rank:7.3f} s = {t_rank / t_total:.2f}x the "
                  f"per-source score alone; with --pareto gflops {t_front:.3f} s = {t_front / t_rank:.2f}x", flush=True)
        shutil.rmtree(root)
    return out


def throughput_standard(n: int, batch: int) -> Standard:
    """A standard whose probe set is n images: up to 2,000 procedural textures, repeated.

    Throughput only: repeating the images repeats their baseline features, so the
    whitening and split are what a standard built on the repeated set would have.
    """
    from selection.catalog import CatalogEntry
    from selection.standard import StandardConfig, build_standard

    base = min(max(n, 20), 2000)  # a standard needs at least 20 probe images
    std = build_standard(StandardConfig(baseline=CatalogEntry("b", "resnet10t", None, input_size=32),
                                        probe_sources=(f"builtin:textures?n={base}",), probe_image_size=64,
                                        d=8, form="full", batch_size=batch))
    reps = -(-n // base)
    idx = np.arange(n)
    fit = np.isin(idx % base, std.fit_idx)
    return dataclasses.replace(std, probe_images=np.concatenate([std.probe_images] * reps)[:n],
                               z=np.concatenate([std.z] * reps)[:n], fit_idx=idx[fit], val_idx=idx[~fit],
                               spec=dict(std.spec, n_probe=n, n_fit=int(fit.sum()), n_val=int((~fit).sum())))


def _bare_forward(lm: Any, x: Any, n: int, device: str, amp: Any) -> float:
    """Images/s of the bare forward loop over a ready on-device batch (after 3 warm-up passes)."""
    import torch

    model = lm.model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=amp, enabled=amp is not None):
        for _ in range(3):
            model.forward_head(model.forward_features(x), pre_logits=True)
        sync()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model.forward_head(model.forward_features(x), pre_logits=True)
            done += len(x)
        sync()
    return done / (time.perf_counter() - t0)


def bench_throughput(arch: str, input_size: int, std: Standard, threads: int, device: str,
                     gpus_per_actor: float = 1.0, actors: int = 1) -> dict[str, Any]:
    """Images/s of the Ray actor path (the real embed job) vs the bare forward pass.

    The actor runs first (on a GPU it sizes its batch to memory); the bare loop then runs
    in the driver at the batch size the actor used, same precision and memory layout.
    With `actors` > 1 that many copies of the model share the GPU (`gpus_per_actor` < 1).
    """
    import torch

    from jobs import runtime
    from selection.catalog import CatalogEntry
    from selection.models import load_model, preprocess

    entries = [CatalogEntry(f"bench/{arch}/{i}", arch, None, input_size=input_size) for i in range(actors)]
    work = tempfile.mkdtemp(prefix="zs-tput-")
    store = Store(work)
    save_standard(store, std)
    try:
        runtime.init(None)
        t0 = time.perf_counter()
        opts = runtime.ActorOptions(gpus_per_actor if device == "cuda" else 0.0, threads)
        results = runtime.embed_with_actors(entries, std, store, opts=opts, progress=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for res in results:
        if res.status != "embedded":
            raise ModelError(f"throughput run of {res.model_id}: {res.reason}")
    batch = results[0].batch_size
    torch.set_num_threads(threads)
    lm = load_model(entries[0])
    amp = torch.bfloat16 if device == "cuda" else None
    lm.model.to(device).to(memory_format=torch.channels_last)  # the layout extract_features uses
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = preprocess(std.probe_images[:batch], lm.data_config, device).contiguous(memory_format=torch.channels_last)
    bare = _bare_forward(lm, x, len(std.probe_images), device, amp)
    bare_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    actor = [r.images_per_second for r in results]
    row = {"arch": arch, "input_size": input_size, "batch": batch, "threads": threads,
           "images": len(std.probe_images), "device": device, "gpu_name":
           torch.cuda.get_device_name() if device == "cuda" else "", "precision": "bf16" if amp else "fp32",
           "actors": actors, "gpus_per_actor": gpus_per_actor if device == "cuda" else 0.0,
           "actor_img_s": actor[0] if actors == 1 else actor, "bare_img_s": bare,
           "ratio": sum(actor) / len(actor) / bare, "job_wall_s": wall,
           "actor_peak_gpu_mib": max(r.peak_gpu_mib for r in results), "bare_peak_gpu_mib": bare_mib}
    what = f"{actors} actors x {gpus_per_actor} GPU" if actors > 1 else "actor"
    print(f"embed   {arch}@{input_size}px {device} {row['precision']} batch {batch}: {what} "
          f"{' + '.join(f'{a:.0f}' for a in actor)} img/s (incl. preprocessing) vs bare forward {bare:.0f} "
          f"img/s = {100 * row['ratio']:.0f}% per actor"
          + (f"; peak GPU memory actor {row['actor_peak_gpu_mib']:.0f} MiB, bare {bare_mib:.0f} MiB"
             if device == "cuda" else ""), flush=True)
    return row


def bench_bf16(arch: str, input_size: int, std: Standard, n: int = 500) -> dict[str, Any]:
    """How far the GPU's bf16 embedding is from the fp32 CPU one (same model, same images)."""
    import torch

    from selection.catalog import CatalogEntry
    from selection.embedding import model_embedding
    from selection.models import extract_features, load_model

    lm = load_model(CatalogEntry(f"bench/{arch}", arch, None, input_size=input_size))
    images = std.probe_images[:n]
    h32 = extract_features(lm, images, batch_size=64).astype(np.float64)
    h16 = extract_features(lm, images, batch_size=256, device="cuda", amp_dtype=torch.bfloat16).astype(np.float64)
    rel = float(np.linalg.norm(h16 - h32) / np.linalg.norm(h32))
    sub = _first_images(std, n)
    e32, e16 = (model_embedding(x, sub.z, sub.fit_idx, sub.val_idx, arch, full_crossfit=std.full_crossfit,
                                ridge_scale=std.ridge_scale, gcv=std.ridge_gcv).vector(std.form) for x in (h32, h16))
    corr = float(np.corrcoef(e32, e16)[0, 1])
    row = {"arch": arch, "images": n, "feature_rel_error": rel, "embedding_corr": corr,
           "embedding_max_abs_diff": float(np.abs(np.asarray(e32) - np.asarray(e16)).max())}
    print(f"bf16    {arch}: features rel. error {rel:.4f} (bf16 GPU vs fp32 CPU, {n} images); "
          f"embedding correlation {corr:.5f}, max abs diff {row['embedding_max_abs_diff']:.4f}", flush=True)
    return row


def _first_images(std: Standard, n: int) -> Standard:
    """The first n probe images of `std` with their fit/val split (for a small comparison)."""
    return dataclasses.replace(std, probe_images=std.probe_images[:n], z=std.z[:n],
                               fit_idx=std.fit_idx[std.fit_idx < n], val_idx=std.val_idx[std.val_idx < n])


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    size = 64 if args.quick else 224
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if device == "cpu":
        std = throughput_standard(args.images or (64 if args.quick else 256), 32)
        return {"throughput": [bench_throughput(a, size, std, 2, device) for a in archs]}
    std = throughput_standard(args.images or 40_000, 256)
    out: dict[str, Any] = {"throughput": [bench_throughput(a, size, std, 4, device) for a in archs]}
    out["throughput"].append(bench_throughput(archs[0], size, std, 4, device, gpus_per_actor=0.5, actors=2))
    if "bf16" not in args.skip:
        out["bf16"] = [bench_bf16(a, size, std) for a in archs]
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.scaling"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--max-m", type=int, default=1_000_000, help="largest table for the sweep (default 1,000,000)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per update measurement (default 30; 5 with --quick)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the measurements as JSON")
    p.add_argument("--skip", action="append", default=[],
                   choices=["update", "sweep", "throughput", "bf16", "compaction"],
                   help="leave out one measurement (repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="throughput device (auto: cuda when available)")
    p.add_argument("--archs", default="tf_efficientnet_lite0",
                   help="comma-separated timm architectures for the throughput test")
    p.add_argument("--images", type=int, default=None,
                   help="probe images per throughput run (default 256 on the CPU, 40,000 on a GPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag, value in (("--max-m", args.max_m), ("--reps", args.reps), ("--images", args.images)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    check_output(args.out, flag="--out")
    check_output(args.work, directory=True, flag="--work")  # a file there was a FileExistsError traceback
    if "throughput" not in args.skip:  # checked before any stage, not when the throughput stage starts
        import timm
        import torch

        archs = [a.strip() for a in args.archs.split(",") if a.strip()]
        if not archs:
            raise ConfigError(f"--archs names no timm architecture, got {args.archs!r}")
        for arch in archs:
            if not timm.is_model(arch):
                raise ConfigError(f"--archs: unknown timm architecture {arch!r}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here")
    work = args.work or tempfile.mkdtemp(prefix="zs-scaling-")
    os.makedirs(work, exist_ok=True)
    try:
        results = _stages(args, work)
    finally:  # an error or Ctrl-C leaves no scratch table (10^6 rows: about 8 GB) behind
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        out = os.path.abspath(os.path.expanduser(args.out))  # as check_output checked it
        write_file_atomically(out, json.dumps(results, indent=2).encode())
        print(f"wrote {out}")  # under `ray job submit`, on the head node
    print("summary: scaling benchmark done")
    return 0


def _stages(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """The stages `args` asks for, their tables under `work`: what `--out` records."""
    update_ms = [10, 100, 1000] if args.quick else [10, 1000, 100_000]
    sweep_ms = [m for m in ([1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000])
                if m <= args.max_m]
    results: dict[str, Any] = {"created_at": time.time(), "cpus": os.cpu_count(),
                               "width": embedding_width("full", 64),
                               "width_per_source": embedding_width("per-source", 64, 4)}
    if "update" not in args.skip:
        results["update"] = bench_updates(update_ms, args.reps or (5 if args.quick else 30), work)
        u = results["update"]
        print(f"ratio   add m={u[-1]['m']} / m={u[0]['m']}: {u[-1]['add_objects_ms'] / u[0]['add_objects_ms']:.2f}x "
              f"(objects), {u[-1]['add_segments_ms'] / u[0]['add_segments_ms']:.2f}x (compacted); remove "
              f"{u[-1]['remove_objects_ms'] / u[0]['remove_objects_ms']:.2f}x (objects), "
              f"{u[-1]['remove_segments_ms'] / u[0]['remove_segments_ms']:.2f}x (compacted), "
              f"{u[-1]['remove_segment_only_ms'] / u[0]['remove_segment_only_ms']:.2f}x (a model only in segments)")
    if "sweep" not in args.skip:
        results["sweep"] = bench_sweep(sweep_ms, 8, work, 20_000 if args.quick else 50_000)
        # 9x wider rows: 10^6 of them would be 75 GB, more than this machine's disk holds.
        results["sweep_per_source"] = bench_sweep([m for m in sweep_ms if m <= PER_SOURCE_MAX_M], 8, work,
                                                  2_000 if args.quick else 10_000, form="per-source")
    if "throughput" not in args.skip:
        results.update(run_throughput(args))
    if "compaction" not in args.skip and not os.path.exists("/proc/self/clear_refs"):
        print("compact: skipped (the peak-memory measurement needs Linux's /proc/self/clear_refs)")
    elif "compaction" not in args.skip:
        results["compaction"] = []
        for layout, m in (("segments", 4_000 if args.quick else 60_000), ("rows", 500 if args.quick else 10_000)):
            c = bench_compaction([m, 2 * m], 1_000 if args.quick else 10_000, work, layout)
            results["compaction"] += c
            ratio = f"{c[1]['peak_mib'] / c[0]['peak_mib']:.2f}x" if c[0]["peak_mib"] > 0 else "n/a"
            print(f"ratio   compaction peak memory, {layout}, m={2 * m} / m={m}: {ratio} (the table: 2.00x)")
    return results


if __name__ == "__main__":
    run_program(main)
