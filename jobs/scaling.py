"""Scaling benchmark: `python -m jobs.scaling [--quick] [--max-m 1000000] [--out docs/performance.json]`.

Prints ratios measured in one run (SPEC section 4, issue 3):
1. update: time to add one model (one row object) and to remove one, with m = 10,
   10^3, 10^5 rows already in the table, as row objects and as compacted segments;
2. load + sweep of m = 10^3 .. 10^6 rows (d = 64, full form: 2,080 floats a row)
   against a bare pyarrow read of the same bytes and a bare numpy matrix product,
   and against the machine's memory bandwidth (a numpy copy);
3. embedding throughput per Ray actor against the bare forward pass of the same model
   at the same batch size and thread count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import run_main
from selection.embedding import embedding_width
from selection.keys import model_key
from selection.select import sweep_shards
from selection.standard import Standard
from selection.storage import Store
from selection.table import (META_FIELDS, compact, delete_row, iter_shards, row_path, schema_for,
                             write_row)


def synthetic_standard(d: int = 64) -> Standard:
    """A standard object with the default width; no baseline is run (synthetic rows)."""
    spec = {"form": "full", "d": d, "input_size": None, "schema_version": 1,
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
        pq.write_table(rows.slice(i, 1), path, compression="zstd")


def _time_round(store: Store, std: Standard, model_id: str, rng: np.random.Generator) -> tuple[float, float]:
    row = one_row(std, model_id, rng)
    t0 = time.perf_counter()
    write_row(store, std, row)
    t1 = time.perf_counter()
    delete_row(store, std, model_id)
    return t1 - t0, time.perf_counter() - t1


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
    for r in range(reps):
        for key, store in stores.items():
            times[key].append(_time_round(store, std, f"new/model-{r}", rng))
    out = []
    for m in ms:
        row: dict[str, Any] = {"m": m}
        for layout in ("objects", "segments"):
            adds, rms = zip(*times[(m, layout)])
            row[f"add_{layout}_ms"] = 1e3 * statistics.median(adds)
            row[f"remove_{layout}_ms"] = 1e3 * statistics.median(rms)
        out.append(row)
        print(f"update  m={m:>7}: add {row['add_objects_ms']:6.2f} ms, remove {row['remove_objects_ms']:6.2f} ms "
              f"(row objects); add {row['add_segments_ms']:6.2f} ms, remove {row['remove_segments_ms']:6.2f} ms "
              f"(compacted)", flush=True)
    for key in stores:
        shutil.rmtree(stores[key].root)
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


def bench_sweep(ms: list[int], tasks: int, work: str, segment_rows: int) -> list[dict[str, Any]]:
    std = synthetic_standard()
    rng = np.random.default_rng(1)
    w = rng.random((tasks, std.width))
    bw = memory_bandwidth_gbs()
    print(f"memory bandwidth (numpy copy, read+write): {bw:.1f} GB/s", flush=True)
    out = []
    for m in ms:
        root = os.path.join(work, f"sweep-{m}")
        store = Store(root)
        for start in range(0, m, segment_rows):
            n = min(segment_rows, m - start)
            store.write_table(f"embeddings/{std.id}/segments/seg-{start:09d}.parquet",
                              synthetic_rows(std, start, n, rng))
        segs = sorted(os.path.join(root, "embeddings", std.id, "segments", f)
                      for f in os.listdir(os.path.join(root, "embeddings", std.id, "segments")))
        nbytes = sum(os.path.getsize(p) for p in segs)
        # Ours, end to end: list, read, validate, build matrices, sweep, top-k.
        t_total = min(_timed(lambda: sweep_shards(iter_shards(store, std), w, 10)) for _ in range(2))
        # Ours, load only and sweep only, shard by shard (memory stays at one segment);
        # bare: numpy multiplying the same matrices, pyarrow reading the same bytes.
        wt = w.astype(np.float32).T
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
            t_mm += min(_timed(lambda: shard.embeddings @ wt) for _ in range(2))
            emb_bytes += shard.embeddings.nbytes

        def bare_read() -> None:
            for p in segs:
                with open(p, "rb") as fh:
                    pq.read_table(io.BytesIO(fh.read()))
        t_read = min(_timed(bare_read) for _ in range(2))
        row = {"m": m, "bytes_on_disk": nbytes, "load_s": t_load, "bare_read_s": t_read,
               "load_ratio": t_load / t_read, "sweep_s": t_sweep, "bare_matmul_s": t_mm,
               "sweep_ratio": t_sweep / t_mm, "load_plus_sweep_s": t_total,
               "end_to_end_ratio": t_total / (t_read + t_mm),
               "sweep_gbs": emb_bytes / t_sweep / 1e9, "bandwidth_gbs": bw}
        out.append(row)
        print(f"sweep   m={m:>7}: load+sweep {t_total:7.3f} s = {row['end_to_end_ratio']:.2f}x (bare read "
              f"{t_read:.3f} s + bare matmul {t_mm:.3f} s); load {row['load_ratio']:.2f}x bare read; "
              f"sweep {t_sweep:.3f} s = {row['sweep_ratio']:.2f}x bare matmul, "
              f"{row['sweep_gbs']:.1f} GB/s of {bw:.1f} GB/s", flush=True)
        shutil.rmtree(root)
    return out


def bench_throughput(arch: str, input_size: int, n: int, batch: int, threads: int) -> dict[str, Any]:
    """Images/s of the Ray actor path (the real embed job) vs the bare forward pass."""
    import torch

    from jobs import runtime
    from selection.catalog import CatalogEntry
    from selection.models import load_model, preprocess
    from selection.standard import StandardConfig, build_standard, save_standard

    entry = CatalogEntry(f"bench/{arch}", arch, None, input_size=input_size)
    work = tempfile.mkdtemp(prefix="zs-tput-")
    probe = (f"builtin:textures?n={n}",)
    std = build_standard(StandardConfig(baseline=CatalogEntry("b", "resnet10t", None, input_size=32),
                                        probe_sources=probe, probe_image_size=64, d=8, batch_size=batch))
    store = Store(work)
    save_standard(store, std)
    torch.set_num_threads(threads)
    lm = load_model(entry)
    x = preprocess(std.probe_images[:batch], lm.data_config)  # the library's layout for this device
    model = lm.model
    with torch.inference_mode():
        model.forward_head(model.forward_features(x), pre_logits=True)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model.forward_head(model.forward_features(x), pre_logits=True)
            done += batch
        bare = done / (time.perf_counter() - t0)
    runtime.init(None)
    res = runtime.embed_with_actors([entry], std, store.url, cpus_per_actor=threads, progress=False)[0]
    if res.status != "embedded":
        raise RuntimeError(res.reason)
    shutil.rmtree(work)
    row = {"arch": arch, "input_size": input_size, "batch": batch, "threads": threads, "images": n,
           "actor_img_s": res.images_per_second, "bare_img_s": bare,
           "ratio": res.images_per_second / bare, "device": "cpu"}
    print(f"embed   {arch}@{input_size}px batch {batch}, {threads} threads: actor {row['actor_img_s']:.1f} img/s "
          f"(incl. preprocessing) vs bare forward {bare:.1f} img/s = {100 * row['ratio']:.0f}%", flush=True)
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--max-m", type=int, default=1_000_000, help="largest table for the sweep")
    p.add_argument("--reps", type=int, default=30, help="repetitions per update measurement")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the measurements as JSON")
    p.add_argument("--skip", action="append", default=[], choices=["update", "sweep", "throughput"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="zs-scaling-")
    os.makedirs(work, exist_ok=True)
    update_ms = [10, 100, 1000] if args.quick else [10, 1000, 100_000]
    sweep_ms = [m for m in ([1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000])
                if m <= args.max_m]
    results: dict[str, Any] = {"created_at": time.time(), "cpus": os.cpu_count(),
                               "width": embedding_width("full", 64)}
    if "update" not in args.skip:
        results["update"] = bench_updates(update_ms, 5 if args.quick else args.reps, work)
        u = results["update"]
        print(f"ratio   add m={u[-1]['m']} / m={u[0]['m']}: {u[-1]['add_objects_ms'] / u[0]['add_objects_ms']:.2f}x "
              f"(objects), {u[-1]['add_segments_ms'] / u[0]['add_segments_ms']:.2f}x (compacted); remove "
              f"{u[-1]['remove_objects_ms'] / u[0]['remove_objects_ms']:.2f}x (objects), "
              f"{u[-1]['remove_segments_ms'] / u[0]['remove_segments_ms']:.2f}x (compacted)")
    if "sweep" not in args.skip:
        results["sweep"] = bench_sweep(sweep_ms, 8, work, 20_000 if args.quick else 50_000)
    if "throughput" not in args.skip:
        results["throughput"] = bench_throughput("tf_efficientnet_lite0", 224 if not args.quick else 64,
                                                 64 if args.quick else 256, 32, 2)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print("summary: scaling benchmark done")
    return 0


if __name__ == "__main__":
    run_main(main)
